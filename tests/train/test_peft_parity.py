"""LoRA training parity with PEFT (tests/fixtures/peft, made with real peft + torch on
models/tiny): starting from PEFT's initial adapter, 3 AdamW steps (lr 1e-2, betas 0.9/0.999,
eps 1e-8, no decay, no clipping, constant lr, batch 2 in file order, format text) must give the
same per-step losses (rel 1e-4) and the same final adapter (rel 1e-3 per tensor), written under
PEFT's names with an adapter_config.json PEFT reads."""
import json
import os

import numpy as np

from conftest import SRCDIR, lathe_run, load_safetensors

FIX = os.path.join(SRCDIR, "tests", "fixtures", "peft")


def test_losses_and_final_adapter_match_peft(work):
    ref = json.load(open(os.path.join(FIX, "reference.json")))
    script = f"""%load tiny
%lora load={FIX}/initial
%train data={FIX}/data.jsonl format=text batch=2 steps=3 lr=1e-2 schedule=constant warmup=0 max_grad_norm=0 weight_decay=0 shuffle=false save={work}/ck
%save adapter={work}/final
"""
    rc, out, err = lathe_run(script, work)
    assert rc == 0, out + err
    state = json.load(open(os.path.join(work, "ck", "checkpoint-3", "trainer_state.json")))
    ours, theirs = state["losses"], ref["losses"]
    assert len(ours) == 3
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {i + 1}: loss {a} vs PEFT {b}"
    got, _ = load_safetensors(os.path.join(work, "final", "adapter_model.safetensors"))
    want, _ = load_safetensors(os.path.join(FIX, "final", "adapter_model.safetensors"))
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
    for k in want:
        assert got[k].shape == want[k].shape, k
        rel = np.linalg.norm(got[k] - want[k]) / max(np.linalg.norm(want[k]), 1e-12)
        assert rel <= 1e-3, f"{k}: relative difference {rel:.2e}"
    # the B matrices moved away from zero (the test would pass on a no-op otherwise)
    assert all(np.abs(got[k]).max() > 0 for k in got if "lora_B" in k)


def test_adapter_config_is_peft_shaped(work):
    rc, out, err = lathe_run(f"%load tiny\n%lora r=4 alpha=8 targets=q,v\n%save adapter={work}/a\n", work)
    assert rc == 0, out + err
    cfg = json.load(open(os.path.join(work, "a", "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    t, header = load_safetensors(os.path.join(work, "a", "adapter_model.safetensors"))
    assert header["__metadata__"] == {"format": "pt"}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in t
    assert t["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"].shape == (64, 4)
    assert not any("k_proj" in k for k in t)
    a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    bound = 1 / np.sqrt(128)  # kaiming_uniform(a=sqrt(5)) on in_features=128
    assert a.shape == (4, 128) and np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert all(np.all(v == 0) for k, v in t.items() if "lora_B" in k)
