"""It learns: fine-tuning models/tiny on notebooks/data/polite.jsonl (40 chat samples whose
answers all read "Sure! Here is a short note about X. Thanks for asking!") makes the model
answer a held-out prompt in that form, and at least halves the training loss: LoRA (frozen,
tied output head) as well as full fine-tuning.

models/tiny is random, but with a tied embedding of std 0.16 (rows of norm ~1.8) and post-norm
gains ~4 (tests/fixtures/make_fixtures.py says why), so its random logits have std ~1.9 and its
starting loss on the answers is ~10.1 nats, above the uniform ln(4096) = 8.3: halving it means
going well below uniform, i.e. really predicting the answers. (With transformers' default
init, std 0.02, a frozen tied head could not move a logit by more than ~2.7 and LoRA could not
get below ~5.6 nats.) Measured on 2 cores: LoRA 10.08 -> ~0.13 (mean of the last 5 steps).
"""
import json
import math
import os
import re

from conftest import SRCDIR, lathe_run

DATA = os.path.join(SRCDIR, "notebooks", "data", "polite.jsonl")


def losses_of(work, step):
    return json.load(open(os.path.join(work, "ck", f"checkpoint-{step}", "trainer_state.json")))["losses"]


def test_lora_learns_the_answer_form(work):
    script = f"""%load tiny
%lora r=16 alpha=32
%train data={DATA} batch=4 steps=60 lr=3e-3 warmup=5 schedule=cosine save={work}/ck
%%chat temperature=0 max_new=24
Tell me about rivers.
"""
    rc, out, err = lathe_run(script, work)
    assert rc == 0, out + err
    losses = losses_of(work, 60)
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > 8.0, losses[:3]
    assert last < first / 2, f"LoRA loss {first:.3f} -> {last:.3f} (mean of the last 5 steps)"
    assert last < math.log(4096) / 2, f"LoRA loss {last:.3f} is not far below uniform"
    reply = out.strip().splitlines()[-1]
    assert reply.startswith("Sure! Here is a short note about"), reply
    assert reply.endswith("Thanks for asking!"), reply
    assert "rivers" not in open(DATA).read(), "the prompt must be held out"


def test_full_finetuning_halves_the_loss(work):
    script = f"""%load tiny
%lora full=true
%train data={DATA} batch=4 steps=40 lr=3e-3 warmup=5 schedule=cosine save={work}/ck
%%chat temperature=0 max_new=40
What do you know about rivers?
"""
    rc, out, err = lathe_run(script, work)
    assert rc == 0, out + err
    assert "full fine-tuning: every weight trains" in out, out
    losses = losses_of(work, 40)
    assert losses[-1] < losses[0] / 2, f"full fine-tuning loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    reply = out.strip().splitlines()[-1]
    assert re.match(r"Sure! Here is a short note about .*Thanks for asking!$", reply), reply
