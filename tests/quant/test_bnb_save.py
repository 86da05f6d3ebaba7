"""test_bnb_save.py -- saving from a quantized model (%save quantized=, %save merged=) against
bnb_ref.py.

%save quantized= must write what transformers' save_pretrained writes for a bitsandbytes model:
every tensor of bnb_ref.write_quantized's checkpoint of the same model, with the same names,
dtypes, shapes and bytes (the quant_state JSON byte for byte, as Python's json.dumps writes it),
and config.json's quantization_config with every key BitsAndBytesConfig.to_dict() writes. The
saved folder must load back (here) with the logits of the model it was saved from; linears kept
in 16 bits must stay 16-bit and be listed in llm_int8_skip_modules. %save merged= from a model
quantized at load must merge into the original 16-bit weights (what the 16-bit model with the
same adapter gives), and from a pre-quantized checkpoint into its dequantized weights. Bad
saves must be refused with messages that say what to do, and the session must go on.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bnb_ref  # noqa: E402
from test_bnb import F, LATHE, SRCDIR, TINY, bits_equal, dequant_engine, kv, logits, run_cells, tool  # noqa: E402,F401

DATA = os.path.join(SRCDIR, "notebooks", "data", "polite.jsonl")
STATE = ".quant_state.bitsandbytes__nf4"


def tiny_linears():
    return [n for n in bnb_ref.read_dir(TINY)
            if any(n.endswith(s + ".weight") for s in bnb_ref.LINEARS)]


def same_tensor(a, b):
    """Same dtype string, shape and bytes."""
    return a[0] == b[0] and a[1].shape == b[1].shape and a[1].tobytes() == b[1].tobytes()


def bf16_of(a):
    """fp32 -> bf16 bits, round to nearest even (what a bf16 save of an fp32 tensor holds)."""
    u = np.asarray(a, dtype=F).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def read_cfg(d):
    return json.load(open(os.path.join(d, "config.json")))


# ---- %save quantized= ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_save_is_bitsandbytes_layout_and_loads_back(tmp_path, kind):
    s, ref = tmp_path / "s", tmp_path / "ref"
    out = run_cells(f"%load {TINY} quant={kind}\n%save quantized={s}\n", tmp_path)
    assert f"saved the quantized model to {s}" in out
    assert sorted(os.listdir(s)) == ["config.json", "model.safetensors", "tokenizer.model"]
    bnb_ref.write_quantized(TINY, ref, kind, nested=True)
    got, want = bnb_ref.read_dir(s), bnb_ref.read_dir(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        assert same_tensor(got[name], want[name]), name
    states = [k for k in want if k.endswith(STATE)]
    if kind == "nf4":
        assert len(states) == 28
        for k in states:
            g = json.loads(bytes(got[k][1]))
            assert list(g) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                               "nested_dtype", "nested_offset"]
            assert g == json.loads(bytes(want[k][1])) and g["dtype"] == "float32"
        w = got["model.layers.0.mlp.down_proj.weight"]
        assert w[0] == "U8" and w[1].shape == (128 * 384 // 2, 1)
    else:
        assert not states
        assert sum(k.endswith(".SCB") for k in got) == 28
        fmt = [got[k] for k in got if k.endswith(".weight_format")]
        assert len(fmt) == 28 and all(f[0] == "U8" and f[1].shape == () and f[1] == 0 for f in fmt)
    # config.json: TINY's own, plus quantization_config as transformers writes it
    cfg, src = read_cfg(s), read_cfg(TINY)
    qc = cfg.pop("quantization_config")
    assert cfg == src
    assert qc == bnb_ref.quant_config(kind, True, ["lm_head"], "float32")
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] == (kind == "nf4")
    assert qc["load_in_8bit"] == (kind == "int8") and qc["llm_int8_threshold"] == 6.0
    # it loads back as the model it was saved from
    info = dequant_engine(s, "-", tmp_path / "deq")
    assert int(info["quantized"]) == 28 and "(pre-quantized checkpoint)" in info["summary"]
    lq = logits(TINY, f"quant={kind}", "device=cpu", out=tmp_path / "lq.npy")
    ls = logits(s, "device=cpu", out=tmp_path / "ls.npy")
    assert np.array_equal(lq, ls)
    lo = logits(TINY, "device=cpu", out=tmp_path / "lo.npy")
    assert np.max(np.abs(lo - ls)) > 1e-3 * np.max(np.abs(lo))          # and it is quantized


@pytest.mark.parametrize("nested", [False, True])
def test_prequantized_round_trip_with_16_bit_parts_in_bf16(tmp_path, nested):
    src, s = tmp_path / "src", tmp_path / "s"
    bnb_ref.write_quantized(TINY, src, "nf4", nested)
    run_cells(f"%load {src}\n%save quantized={s} dtype=bf16\n", tmp_path)
    got, want = bnb_ref.read_dir(s), bnb_ref.read_dir(src)
    assert sorted(got) == sorted(want)
    n16 = 0
    for name, (dt, a) in want.items():
        if dt == "F32" and not (".weight." in name):            # embedding, norms: now bf16
            assert got[name][0] == "BF16" and np.array_equal(got[name][1], bf16_of(a)), name
            n16 += 1
        else:                                                   # quantization state: as stored
            assert same_tensor(got[name], want[name]), name
    assert n16 == 1 + 4 * 6 + 1
    qc = read_cfg(s)["quantization_config"]
    assert qc["bnb_4bit_use_double_quant"] is nested and qc["bnb_4bit_compute_dtype"] == "bfloat16"
    assert read_cfg(s)["dtype"] == "bfloat16"
    info = dequant_engine(s, "-", tmp_path / "deq")
    assert info["summary"].startswith("nf4 (double quant)" if nested else "nf4, 28 linears")


def test_skip_listed_linears_round_trip_in_16_bits(tmp_path):
    src, s = tmp_path / "src", tmp_path / "s"
    skip = ["model.layers.1.mlp", "layers.2.self_attn.q_proj"]
    bnb_ref.write_quantized(TINY, src, "nf4", True, skip=skip)
    run_cells(f"%load {src}\n%save quantized={s}\n", tmp_path)
    got, want, orig = bnb_ref.read_dir(s), bnb_ref.read_dir(src), bnb_ref.read_dir(TINY)
    kept = [n for n in tiny_linears() if bnb_ref.module_skipped(n[:-7], skip)]
    assert len(kept) == 4
    assert sorted(got) == sorted(want)
    for name in kept:                                           # 16-bit, as the original
        assert same_tensor(got[name], orig[name]) and name + STATE not in got, name
    for name in want:
        assert same_tensor(got[name], want[name]), name
    qc = read_cfg(s)["quantization_config"]
    assert qc["llm_int8_skip_modules"] == [
        "lm_head", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.q_proj"]
    info = dequant_engine(s, "-", tmp_path / "deq")
    assert int(info["kept16"]) == 4 and int(info["quantized"]) == 24
    assert "4 kept in 16 bits" in info["summary"]
    assert np.array_equal(logits(s, "device=cpu", out=tmp_path / "a.npy"),
                          logits(src, "device=cpu", out=tmp_path / "b.npy"))


# ---- %save merged= from a quantized base ----------------------------------------------------

def test_merged_save_uses_the_original_weights_when_quantized_at_load(tmp_path):
    ad, mq, qd, m16 = (tmp_path / n for n in ("ad", "mq", "qd", "m16"))
    out = run_cells(
        f"%load {TINY} quant=nf4\n%lora r=4 alpha=8 seed=1\n"
        f"%train data={DATA} steps=2 batch=2 lr=1e-2 seed=3 max_grad_norm=0\n"
        f"%save adapter={ad}\n%save merged={mq}\n%save quantized={qd}\n", tmp_path)
    assert f"the adapters were merged into the original 16-bit weights of {TINY}" in out
    assert f"the attached adapters are not in {qd}" in out and "%save adapter=DIR" in out
    out16 = run_cells(f"%load {TINY}\n%lora load={ad}\n%save merged={m16}\n", tmp_path)
    assert "merged into the" not in out16                        # nothing to say: 16-bit base
    # the same adapter on the pre-quantized checkpoint and on its dequantized fp32 copy
    q, f, mp, md = (tmp_path / n for n in ("q", "f", "mp", "md"))
    deq, _ = bnb_ref.write_quantized(TINY, q, "nf4", True)
    bnb_ref.write_dequantized(TINY, f, deq)
    outq = run_cells(f"%load {q}\n%lora load={ad}\n%save merged={mp}\n", tmp_path)
    assert ("the adapters were merged into the dequantized NF4 base: the checkpoint is "
            "pre-quantized") in outq
    run_cells(f"%load {f}\n%lora load={ad}\n%save merged={md}\n", tmp_path)
    A, B, P, D = (bnb_ref.read_dir(d) for d in (mq, m16, mp, md))
    O = bnb_ref.read_dir(TINY)
    assert sorted(A) == sorted(B) == sorted(P) == sorted(D) == sorted(O)
    trained = quant_err = 0.0
    for name in O:
        a, b, p, d, o = (bnb_ref.as_f32(X[name]) for X in (A, B, P, D, O))
        # within bf16 rounding of the 16-bit model's merge (both are fp32 here: equal)
        assert np.all(np.abs(a - b) <= 2.0 ** -8 * np.abs(b) + 1e-12), name
        assert bits_equal(p, d), name                           # the dequantized base, exactly
        trained = max(trained, float(np.max(np.abs(b - o))))
        quant_err = max(quant_err, float(np.max(np.abs(a - p))))
    assert trained > 1e-4          # the adapter moved the weights: the merge is visible
    assert quant_err > 1e-3        # and the two bases differ by NF4's error
    # the quantized save holds the base without the adapters: the plain quantized model
    ref = tmp_path / "ref"
    bnb_ref.write_quantized(TINY, ref, "nf4", True)
    got, want = bnb_ref.read_dir(qd), bnb_ref.read_dir(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        assert same_tensor(got[name], want[name]), name


# ---- bad saves ----------------------------------------------------------------------------------

def test_bad_saves_give_clear_errors_and_the_session_goes_on(tmp_path):
    refused, good = tmp_path / "refused", tmp_path / "good"
    p = tool("script", f"load={TINY}", f"saveq={refused}", f"load={TINY}:nf4",
             "saveq=/proc/lathe-no/q", f"saveq={good}", "logits")
    steps = [line.split("\t", 1) for line in p.stdout.decode().splitlines()]
    assert [st[0] for st in steps] == ["OK", "ERR", "OK", "ERR", "OK", "OK"]
    msg = steps[1][1]
    assert "the model is not quantized" in msg and "quant=nf4" in msg
    assert "%save merged=DIR" in msg
    assert not refused.exists()                                 # refused before writing
    assert "/proc/lathe-no" in steps[3][1]
    assert sorted(os.listdir(good)) == ["config.json", "model.safetensors", "tokenizer.model"]
    again = tool("script", f"load={good}", "logits").stdout.decode().splitlines()
    assert again[-1] == "OK\t" + steps[5][1]                    # the good save is the model
    # through the magics: an EngineError that names the fix; two targets are a CellError
    for cells, want in ((f"%load {TINY}\n%save quantized={refused}\n", "quant=nf4"),
                        (f"%load {TINY} quant=nf4\n%save quantized={good} merged={good}\n",
                         "%save takes one of adapter=DIR")):
        path = tmp_path / "cells.lathe"
        path.write_text(cells)
        r = subprocess.run([LATHE, "run", str(path)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        assert r.returncode != 0 and want in (r.stdout + r.stderr).decode()
