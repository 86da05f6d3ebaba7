"""test_parity.py — the CPU engine against Hugging Face transformers.

For every fixture directory under tests/fixtures/ with reference.json + logits.npy (written by
transformers, see tests/fixtures/README.md; not vision/, whose logits need its image and which
tests/vision/test_vision.py checks): the engine's fp32 logits must match within
1e-4 * max|logit|, and its greedy continuation (through the KV cache) must be identical.
Then a checkpoint written here with numpy (odd shapes, a 3-token sliding window, 300+ tokens so
the KV cache works in several chunks) must match the float64 NumPy forward of
tests/fixtures/gemma3_ref.py."""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # enginetool.py
from enginetool import FIXTURES, SRCDIR, TINY_TOKENIZER, csv, ids_of, run  # noqa: E402

sys.path.insert(0, FIXTURES)
import gemma3_ref  # noqa: E402


def fixture_dirs():
    out = []
    if os.path.isdir(FIXTURES):
        for name in sorted(os.listdir(FIXTURES)):
            d = os.path.join(FIXTURES, name)
            if os.path.isfile(os.path.join(d, "reference.json")) and os.path.isfile(os.path.join(d, "logits.npy")):
                with open(os.path.join(d, "reference.json")) as f:
                    if "image" in json.load(f):  # an image's logits: tests/vision/test_vision.py
                        continue
                out.append(name)
    return out


FIXTURE_NAMES = fixture_dirs()


def source_of(name):
    """The checkpoint of a fixture: its own directory, or `tiny` for the embedded model."""
    d = os.path.join(FIXTURES, name)
    return d if os.path.isfile(os.path.join(d, "config.json")) else name


def test_fixtures_present():
    # the fixtures are committed; without them the parity tests below would silently shrink
    assert {"tiny", "flat", "nested", "tf5"} <= set(FIXTURE_NAMES), FIXTURE_NAMES


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_logits(name, tmp_path):
    ref = json.load(open(os.path.join(FIXTURES, name, "reference.json")))
    want = np.load(os.path.join(FIXTURES, name, "logits.npy"))
    out = tmp_path / "logits.npy"
    run("logits", source_of(name), csv(ref["ids"]), out)
    got = np.load(out)
    assert got.shape == want.shape
    diff = float(np.abs(got - want).max())
    bound = 1e-4 * float(np.abs(want).max())
    print(f"{name}: max|diff| {diff:.3g}, bound {bound:.3g}")
    assert diff <= bound


@pytest.mark.parametrize("name", [n for n in ("nested", "tf5") if n in FIXTURE_NAMES])
def test_logits_after_dtype_conversion(name, tmp_path):
    """dtype=fp32 widens the bf16/f16 weights on load: exact, so the logits still match."""
    ref = json.load(open(os.path.join(FIXTURES, name, "reference.json")))
    want = np.load(os.path.join(FIXTURES, name, "logits.npy"))
    run("logits", source_of(name), csv(ref["ids"]), tmp_path / "l.npy", "fp32")
    got = np.load(tmp_path / "l.npy")
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_greedy(name):
    g = json.load(open(os.path.join(FIXTURES, name, "reference.json")))["greedy"]
    got = ids_of(run("greedy", source_of(name), csv(g["prompt_ids"]), g["max_new"]))
    assert got == g["ids"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_generate_ids_stops(name):
    """lt_generate_ids (the session's cache) gives the same tokens, cut after the first stop."""
    g = json.load(open(os.path.join(FIXTURES, name, "reference.json")))["greedy"]
    got = ids_of(run("generate_ids", source_of(name), csv(g["prompt_ids"]), g["max_new"]))
    want = list(g["ids"])
    for i, t in enumerate(want):
        if t in (1, 7, 106):  # <eos>, and <end_of_turn> in the tiny vocabulary / in Gemma's
            want = want[: i + 1]
            break
    assert got == want


def test_nested_vision_loaded():
    if "nested" not in FIXTURE_NAMES:
        pytest.skip("no nested fixture")
    info = dict(line.split("=", 1) for line in run("info", source_of("nested")).stdout.decode().splitlines())
    # its 1-layer SigLIP loads: vision weights present and loaded are not "skipped"
    assert info["skipped_vision"] == "0"
    assert info["arch"] == "gemma3 (text + image tower)"
    assert info["vocab"] == "4160"
    info = dict(line.split("=", 1) for line in run("info", "tiny").stdout.decode().splitlines())
    assert info["skipped_vision"] == "0"


# ---- a checkpoint made here -----------------------------------------------------------------

def make_checkpoint(d, dtype):
    rng = np.random.default_rng(5)
    V, H, I, L, nh, nkv, hd = 4096, 40, 72, 7, 6, 3, 12
    cfg = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": V,
           "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": nh,
           "num_key_value_heads": nkv, "head_dim": hd, "query_pre_attn_scalar": 30, "sliding_window": 3,
           "rope_theta": 100000.0, "rope_local_base_freq": 5000.0,
           "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 4096, "sliding_window_pattern": 3}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    t = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, H))}
    for i in range(L):
        p = f"model.layers.{i}."
        for n, s in [("input_layernorm", (H,)), ("post_attention_layernorm", (H,)),
                     ("pre_feedforward_layernorm", (H,)), ("post_feedforward_layernorm", (H,)),
                     ("self_attn.q_norm", (hd,)), ("self_attn.k_norm", (hd,))]:
            t[p + n + ".weight"] = rng.normal(0, 0.3, s)
        for n, s in [("self_attn.q_proj", (nh * hd, H)), ("self_attn.k_proj", (nkv * hd, H)),
                     ("self_attn.v_proj", (nkv * hd, H)), ("self_attn.o_proj", (H, nh * hd)),
                     ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)), ("mlp.down_proj", (H, I))]:
            t[p + n + ".weight"] = rng.normal(0, 1 / np.sqrt(s[1]), s)
    t["model.norm.weight"] = rng.normal(0, 0.3, (H,))
    gemma3_ref.write_safetensors(os.path.join(d, "model.safetensors"), t, dtype)
    shutil.copyfile(TINY_TOKENIZER, os.path.join(d, "tokenizer.model"))


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_handmade_checkpoint_vs_numpy(dtype, tmp_path):
    d = str(tmp_path)
    make_checkpoint(d, dtype)
    spec, prefix, w, _ = gemma3_ref.load(d)
    assert prefix == "model."
    ids = [2] + [int(x) for x in np.random.default_rng(1).integers(3, 4096, 330)]
    want = gemma3_ref.forward(spec, w, ids)
    run("logits", d, csv(ids), tmp_path / "l.npy")
    got = np.load(tmp_path / "l.npy")
    diff = float(np.abs(got - want).max())
    bound = 1e-4 * float(np.abs(want).max())
    print(f"{dtype}: max|diff| {diff:.3g}, bound {bound:.3g}")
    assert diff <= bound
    # greedy through the cache == argmax of the reference over a full forward, step by step
    prompt = ids[:20]
    got_ids = ids_of(run("greedy", d, csv(prompt), 5))
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(np.argmax(gemma3_ref.forward(spec, w, seq)[-1])))
    assert got_ids == seq[20:]
