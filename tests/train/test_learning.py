"""It learns: fine-tuning models/tiny on notebooks/data/polite.jsonl (40 chat samples whose
answers all read "Sure! Here is a short note about X. Thanks for asking!") makes the model
answer a held-out prompt in that form, and lowers the training loss.

models/tiny has random weights with a tied, frozen output head whose rows are small
(|E_j| ~ 0.23, hidden 128): with the final norm frozen too, no LoRA update can push a logit
more than ~2.7 above the rest, so the loss of LoRA training has a floor near
ln(4096) - 2.7 = 5.6 nats (from 8.3). LoRA is therefore asserted to learn the form and to take
the loss most of the way to that floor; full fine-tuning (which trains the head) must halve it.
"""
import json
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
    assert last < first - 2.0, f"LoRA loss {first:.3f} -> {last:.3f}"
    reply = out.strip().splitlines()[-1]
    assert reply.startswith("Sure! Here is a short note about"), reply
    assert reply.endswith("Thanks for asking!"), reply
    assert "rivers" not in open(DATA).read(), "the prompt must be held out"


def test_full_finetuning_halves_the_loss(work):
    script = f"""%load tiny
%lora full=true
%train data={DATA} batch=4 steps=40 lr=3e-3 warmup=5 schedule=cosine save={work}/ck
%%chat temperature=0 max_new=24
What do you know about rivers?
"""
    rc, out, err = lathe_run(script, work)
    assert rc == 0, out + err
    losses = losses_of(work, 40)
    assert losses[-1] < losses[0] / 2, f"full fine-tuning loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    reply = out.strip().splitlines()[-1]
    assert re.match(r"Sure! Here is a short note about .*Thanks for asking!$", reply), reply
