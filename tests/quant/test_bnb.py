"""test_bnb.py -- bitsandbytes' NF4 / LLM.int8 formats in the engine against bnb_ref.py.

Bytes: the engine's quantizers (formats/bnb.c, through quant_tool) must write exactly what the
NumPy reference of bitsandbytes' arithmetic writes, on shapes with short last blocks, values
exactly between two codes, all-zero and negative-only blocks. Checkpoints: a pre-quantized copy
of the tiny model (and of the sharded / multimodal fixtures) in bitsandbytes' layout must
dequantize to the reference's values bit for bit, give the logits of the same model stored
dequantized in fp32, and give the same QLoRA loss and adapter gradients. The skip list must
decide which linears stay 16-bit, and every broken checkpoint must be refused with its own
message while the session goes on.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))
import bnb_ref  # noqa: E402
import gemma3_ref  # noqa: E402

SRCDIR = os.environ.get("LATHE_SRCDIR") or os.path.abspath(os.path.join(HERE, "..", ".."))
BUILDDIR = os.environ.get("LATHE_BUILDDIR") or SRCDIR
TOOL = os.path.join(BUILDDIR, "tests", "quant", "quant_tool")
LATHE = os.path.join(BUILDDIR, "lathe")
TINY = os.path.join(SRCDIR, "models", "tiny")
FIX = os.path.join(SRCDIR, "tests", "fixtures")
IDS = [2, 651, 3081, 11, 17, 99, 1024, 7, 300, 45, 2000, 4000]
F = np.float32


def tool(*args, check=True):
    p = subprocess.run([TOOL, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check and p.returncode != 0:
        raise AssertionError(f"quant_tool {' '.join(map(str, args))}: {p.stderr.decode()}")
    return p


def kv(out):
    return dict(line.split("\t", 1) for line in out.stdout.decode().splitlines() if "\t" in line)


def raw(path, dtype):
    return np.fromfile(path, dtype=dtype)


def bits_equal(a, b):
    a, b = np.asarray(a, dtype=F), np.asarray(b, dtype=F)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---- inputs ---------------------------------------------------------------------------------

def _ties_block(bounds, absmax):
    """A block whose values, scaled by 1/absmax, land exactly on the midpoints (absmax a power
    of two, so x * (1/absmax) is exact)."""
    x = np.concatenate([[absmax], bounds * F(absmax), -bounds[:8] * F(absmax)]).astype(F)
    return x


def nf4_inputs():
    rng = np.random.default_rng(7)
    bounds = ((bnb_ref.NF4_CODE[:-1] + bnb_ref.NF4_CODE[1:]) / F(2)).astype(F)
    ties = np.zeros(64, dtype=F)
    tb = _ties_block(bounds, 2.0)
    ties[:tb.size] = tb
    cases = {
        "normal_128x128": rng.standard_normal((128, 128)).astype(F) * F(0.02),
        "normal_384x128": rng.standard_normal((384, 128)).astype(F),
        "tail_5x13": rng.standard_normal((5, 13)).astype(F),        # 65: a 1-element last block
        "odd_1x63": rng.standard_normal((1, 63)).astype(F),         # one short block, odd count
        "ties": ties,
        "zeros_and_neg": np.concatenate([np.zeros(64, F), -np.abs(rng.standard_normal(64)).astype(F),
                                         np.full(64, -3.0, F), rng.standard_normal(64).astype(F)]),
        "tiny_values": (rng.standard_normal(128) * 1e-30).astype(F),
    }
    return cases


def test_nf4_bytes_equal_reference(tmp_path):
    for name, x in nf4_inputs().items():
        x = np.asarray(x, dtype=F).reshape(-1)
        x.tofile(tmp_path / "x.f32")
        tool("nf4", tmp_path / "x.f32", tmp_path / "p", tmp_path / "a")
        packed, absmax = bnb_ref.quantize_nf4(x)
        got_p, got_a = raw(tmp_path / "p", np.uint8), raw(tmp_path / "a", F)
        assert np.array_equal(got_p, packed), f"{name}: packed NF4 bytes differ"
        assert bits_equal(got_a, absmax), f"{name}: absmax differs"


def test_nf4_reference_sees_ties_and_nibble_order():
    """The inputs above exercise what they claim: midpoints take the lower code, the even
    element sits in the high nibble, an all-zero block is code 7, a negative-only block
    reaches code 0."""
    ties = nf4_inputs()["ties"]
    packed, absmax = bnb_ref.quantize_nf4(ties)
    codes = np.empty(64, dtype=np.int64)
    codes[0::2], codes[1::2] = packed >> 4, packed & 15
    assert codes[0] == 15                              # x = absmax
    assert list(codes[1:16]) == list(range(15))        # midpoint i -> code i, not i + 1
    z, _ = bnb_ref.quantize_nf4(np.zeros(64, F))
    assert np.all(z == 0x77)
    neg, _ = bnb_ref.quantize_nf4(np.array([-3.0, 1.0] + [0.0] * 62, F))
    assert neg[0] == (0 << 4 | 11)                     # -1 -> 0 (high nibble), 1/3 -> 11


def test_dynamic_map_equals_reference(tmp_path):
    tool("dmap", tmp_path / "m")
    got, want = raw(tmp_path / "m", F), bnb_ref.dynamic_map()
    assert bits_equal(got, want)
    assert got.size == 256 and np.all(np.diff(got) >= 0) and got[-1] == 1.0 and 0.0 in got
    assert np.isclose(got[0], -0.9921875, atol=1e-2) and got[128] > 0


def test_blockwise_bytes_equal_reference(tmp_path):
    code = bnb_ref.dynamic_map()
    code.tofile(tmp_path / "code")
    rng = np.random.default_rng(3)
    bounds = ((code[:-1] + code[1:]) / F(2)).astype(F)
    ties = np.concatenate([[F(1.0)], bounds[100:160]]).astype(F)
    for name, x in {"normal": rng.standard_normal(1000).astype(F),
                    "ties": ties, "zeros": np.zeros(300, F),
                    "neg": -np.abs(rng.standard_normal(256)).astype(F)}.items():
        x.tofile(tmp_path / "x")
        tool("blockwise", tmp_path / "x", tmp_path / "code", tmp_path / "q", tmp_path / "a", 256)
        q, a = bnb_ref.quantize_blockwise(x, code, 256)
        assert np.array_equal(raw(tmp_path / "q", np.uint8), q), name
        assert bits_equal(raw(tmp_path / "a", F), a), name
    q, _ = bnb_ref.quantize_blockwise(ties, code, 256)
    assert list(q[1:]) == list(range(100, 160))        # ties take the lower code


def test_double_quant_bytes_and_round_trip(tmp_path):
    rng = np.random.default_rng(11)
    code = bnb_ref.dynamic_map()
    for nb in (300, 512, 7):
        absmax = np.abs(rng.standard_normal(nb)).astype(F) * F(0.05) + F(0.01)
        absmax.tofile(tmp_path / "am")
        tool("double", tmp_path / "am", tmp_path / "q", tmp_path / "a2", tmp_path / "off")
        q, a2, off = bnb_ref.double_quantize(absmax, code)
        assert np.array_equal(raw(tmp_path / "q", np.uint8), q)
        assert bits_equal(raw(tmp_path / "a2", F), a2)
        assert bits_equal(raw(tmp_path / "off", F), [off])
        back = (bnb_ref.dequantize_blockwise(q, a2, code, 256) + off).astype(F)
        # the dynamic map's coarsest gap near +-1 is 1/64 of the block's scale
        assert np.max(np.abs(back - absmax)) <= np.max(a2) / 32
        assert np.max(np.abs(back - absmax)) > 0      # it is lossy: the test sees the codes


def test_int8_bytes_equal_reference(tmp_path):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((37, 50)).astype(F) * F(0.03)
    w[3] = 0.0                                                     # an all-zero row
    w[4, :6] = [127.0, 2.5, 3.5, -2.5, 0.5, 1.5]                   # scale exactly 1: halves tie
    w[4, 6:] = 0.0
    w[5] = -np.abs(w[5])
    w[6] = 1e-6                                                    # fp16 rounds these
    w.tofile(tmp_path / "w")
    tool("int8", tmp_path / "w", 37, 50, tmp_path / "q", tmp_path / "s")
    q, scb = bnb_ref.quantize_int8(w)
    got = raw(tmp_path / "q", np.int8).reshape(37, 50)
    assert np.array_equal(got, q)
    assert bits_equal(raw(tmp_path / "s", F), scb)
    assert list(got[4, :6]) == [127, 2, 4, -2, 0, 2]               # round half to even
    assert np.all(got[3] == 0)


# ---- checkpoints ------------------------------------------------------------------------------

def dequant_engine(d, quant, out):
    os.makedirs(out, exist_ok=True)
    return kv(tool("dequant", d, quant, out))


def engine_linears(out):
    return {f[:-4]: raw(os.path.join(out, f), F) for f in os.listdir(out) if f.endswith(".f32")}


def canon(name):
    for p in ("model.language_model.", "language_model.model."):
        if name.startswith(p):
            return "model." + name[len(p):]
    return name


MODES = [("nf4", True), ("nf4", False), ("int8", False)]


@pytest.mark.parametrize("kind,nested", MODES)
def test_prequantized_dequantizes_bit_for_bit(tmp_path, kind, nested):
    d = tmp_path / "q"
    deq, quantized = bnb_ref.write_quantized(TINY, d, kind, nested)
    assert len(quantized) == 28
    info = dequant_engine(d, "-", tmp_path / "out")
    got = engine_linears(tmp_path / "out")
    assert int(info["quantized"]) == 28 and int(info["kept16"]) == 0
    assert info["summary"].startswith(kind + (" (double quant)" if nested else ","))
    for name, want in deq.items():
        assert bits_equal(got[canon(name)], want.reshape(-1)), name


def logits(d, *opts, out):
    p = subprocess.run([LATHE, "logits", str(d), *opts, "--ids", ",".join(map(str, IDS)),
                        "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.returncode == 0, p.stderr.decode()
    return np.load(out)


@pytest.mark.parametrize("kind,nested", MODES)
def test_prequantized_logits_equal_dequantized_fp32(tmp_path, kind, nested):
    q, f = tmp_path / "q", tmp_path / "f"
    deq, _ = bnb_ref.write_quantized(TINY, q, kind, nested)
    bnb_ref.write_dequantized(TINY, f, deq)
    lq = logits(q, out=tmp_path / "lq.npy")
    lf = logits(f, out=tmp_path / "lf.npy")
    tol = 1e-4 * np.max(np.abs(lf))
    assert np.max(np.abs(lq - lf)) <= tol
    spec, _, w, _ = gemma3_ref.load(str(f))
    ref = gemma3_ref.forward(spec, w, IDS)
    assert np.max(np.abs(lq - ref)) <= tol
    lo = logits(TINY, out=tmp_path / "lo.npy")                   # quantization is visible
    assert np.max(np.abs(lo - lq)) > 10 * tol


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantize_at_load_matches_reference(tmp_path, kind):
    info = dequant_engine(TINY, kind, tmp_path / "out")
    got = engine_linears(tmp_path / "out")
    tensors = bnb_ref.read_dir(TINY)
    n = 0
    for name, entry in tensors.items():
        if not any(name.endswith(s + ".weight") for s in bnb_ref.LINEARS):
            continue
        w = bnb_ref.as_f32(entry)
        if kind == "nf4":
            _, want = bnb_ref.nf4_group(name[:-7], w, True)
        else:
            _, want = bnb_ref.int8_group(name[:-7], w)
        assert bits_equal(got[name], want.reshape(-1)), name
        n += 1
    assert n == 28 and int(info["quantized"]) == 28
    assert "quantized at load" in info["summary"]
    # and the CLI takes %load's option: the same logits as the reference model
    deq, _ = bnb_ref.write_quantized(TINY, tmp_path / "q", kind, True)
    bnb_ref.write_dequantized(TINY, tmp_path / "f", deq)
    lq = logits(TINY, f"quant={kind}", "dtype=fp32", "device=cpu", out=tmp_path / "lq.npy")
    lf = logits(tmp_path / "f", out=tmp_path / "lf.npy")
    assert np.max(np.abs(lq - lf)) <= 1e-4 * np.max(np.abs(lf))


UNSLOTH_SKIP = ["lm_head", "multi_modal_projector", "merger", "modality_projection",
                "vision_tower"]


@pytest.mark.parametrize("fixture", ["tf5", "nested"])
def test_sharded_and_multimodal_layouts(tmp_path, fixture):
    src = os.path.join(FIX, fixture)
    q, f = tmp_path / "q", tmp_path / "f"
    # layer 1's MLP is listed in the other spelling of the text tower than the saved keys use
    # (module tree vs saved names): still kept in 16 bits
    other = {"tf5": "language_model.model.", "nested": "model.language_model."}[fixture]
    mlp = ("layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj")
    deq, quantized = bnb_ref.write_quantized(src, q, "nf4", True, shards=3, keep16=mlp,
                                             skip=UNSLOTH_SKIP + [other + "layers.1.mlp"])
    spec = gemma3_ref.spec_from_config(json.load(open(os.path.join(src, "config.json"))))
    n_lin = 7 * spec["num_hidden_layers"]
    assert len(quantized) == n_lin - 3 and os.path.exists(q / "model.safetensors.index.json")
    info = dequant_engine(q, "-", tmp_path / "out")
    got = engine_linears(tmp_path / "out")
    for name, want in deq.items():
        assert bits_equal(got[canon(name)], want.reshape(-1)), name
    orig = bnb_ref.read_dir(src)
    for name in orig:
        if any(name.endswith(k + ".weight") for k in mlp):
            assert bits_equal(got[canon(name)], bnb_ref.as_f32(orig[name]).reshape(-1)), name
    assert int(info["quantized"]) == n_lin - 3 and int(info["kept16"]) == 3
    bnb_ref.write_dequantized(src, f, deq)
    lq = logits(q, "dtype=fp32", out=tmp_path / "lq.npy")
    lf = logits(f, "dtype=fp32", out=tmp_path / "lf.npy")
    assert np.max(np.abs(lq - lf)) <= 1e-4 * np.max(np.abs(lf))


def test_skip_modules_decide_what_stays_16_bit(tmp_path):
    skip = ["model.layers.1.mlp", "layers.2.self_attn.q_proj"]
    q = tmp_path / "q"
    # layers.3.mlp.up_proj is stored 16-bit but not listed: it must be quantized at load
    deq, quantized = bnb_ref.write_quantized(TINY, q, "nf4", True, skip=skip,
                                             keep16=("layers.3.mlp.up_proj",))
    assert len(quantized) == 28 - 4 - 1
    info = dequant_engine(q, "-", tmp_path / "out")
    got = engine_linears(tmp_path / "out")
    assert int(info["kept16"]) == 4 and int(info["quantized"]) == 24
    assert "4 kept in 16 bits" in info["summary"]
    orig = {k: bnb_ref.as_f32(v) for k, v in bnb_ref.read_dir(TINY).items()}
    for name in orig:
        if not any(name.endswith(s + ".weight") for s in bnb_ref.LINEARS):
            continue
        mod = name[:-7]
        if bnb_ref.module_skipped(mod, skip):
            want = orig[name]                                        # 16-bit, untouched
        elif name in deq:
            want = deq[name]
        else:
            _, want = bnb_ref.nf4_group(mod, orig[name], True)       # quantized at load
        assert bits_equal(got[name], want.reshape(-1)), name
    # the same tensors without the list: every 16-bit linear is quantized, values change
    cfg = json.load(open(q / "config.json"))
    cfg["quantization_config"]["llm_int8_skip_modules"] = None
    json.dump(cfg, open(q / "config.json", "w"))
    info2 = dequant_engine(q, "-", tmp_path / "out2")
    got2 = engine_linears(tmp_path / "out2")
    assert int(info2["kept16"]) == 0 and int(info2["quantized"]) == 28
    assert not bits_equal(got2["model.layers.1.mlp.down_proj.weight"],
                          got["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("kind,nested,skip", [(k, n, None) for k, n in MODES] + [
    ("nf4", False, ["model.layers.1.mlp", "layers.2.self_attn.q_proj"]),
    ("int8", False, ["model.layers.0.self_attn"])])
def test_fit_estimate_of_a_prequantized_checkpoint_is_its_arena(tmp_path, kind, nested, skip):
    """The device fit check reads only config.json: its estimate for a checkpoint stored
    quantized must be the arena the load then takes, with or without double quantization
    (a float absmax a block is 4x the bytes of a nested one) and with the skip list's linears
    in 16 bits. Before, it counted every NF4 checkpoint as double-quantized and every linear as
    quantized. (On tiny, nested and plain NF4 happen to take the same 256-byte-aligned bytes;
    test_device_fit checks the difference at 27B by hand.)"""
    q = tmp_path / "q"
    bnb_ref.write_quantized(TINY, q, kind, nested, skip=skip)
    got = kv(tool("fit", q, "-"))
    assert int(got["estimate"]) == int(got["arena"]), got
    if skip:  # quant=KIND's own storage (what the estimate counted before) is another size
        again = kv(tool("fit", TINY, kind))
        assert int(again["estimate"]) == int(again["arena"]) != int(got["arena"]), (got, again)


@pytest.mark.parametrize("kind,nested", MODES)
def test_qlora_step_equals_dequantized_model(tmp_path, kind, nested):
    q, f = tmp_path / "q", tmp_path / "f"
    deq, _ = bnb_ref.write_quantized(TINY, q, kind, nested)
    bnb_ref.write_dequantized(TINY, f, deq)
    ids = ",".join(map(str, IDS))
    (tmp_path / "gq").mkdir()
    (tmp_path / "gf").mkdir()
    lq = float(kv(tool("grads", q, "-", tmp_path / "gq", ids))["loss"])
    lf = float(kv(tool("grads", f, "-", tmp_path / "gf", ids))["loss"])
    assert abs(lq - lf) <= 1e-5 * abs(lf)
    names = sorted(os.listdir(tmp_path / "gq"))
    assert len(names) == 56 and names == sorted(os.listdir(tmp_path / "gf"))
    for n in names:
        a, b = raw(tmp_path / "gq" / n, F), raw(tmp_path / "gf" / n, F)
        assert np.max(np.abs(b)) > 0, n
        assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b)) + 1e-9, n
    (tmp_path / "g0").mkdir()                                     # the base matters
    l0 = float(kv(tool("grads", TINY, "-", tmp_path / "g0", ids))["loss"])
    assert abs(l0 - lf) > 1e-4 * abs(lf)


# ---- bad checkpoints ---------------------------------------------------------------------------

def _edit(d, fn):
    """Loads d's tensors, lets fn edit the dict, writes them back (one file)."""
    t = bnb_ref.read_dir(d)
    fn(t)
    for p in os.listdir(d):
        if p.endswith(".safetensors") or p.endswith(".index.json"):
            os.remove(os.path.join(d, p))
    bnb_ref.write_dir(d, t, 1)


def test_bad_checkpoints_give_clear_errors_and_the_session_goes_on(tmp_path):
    good = tmp_path / "good"
    bnb_ref.write_quantized(TINY, good, "nf4", True)
    P = "model.layers.0.mlp.up_proj.weight"
    cases = {}

    def variant(name, fn, cfg=None, kind="nf4"):
        d = tmp_path / name
        if kind == "int8":
            bnb_ref.write_quantized(TINY, d, "int8")
        else:
            shutil.copytree(good, d)
        _edit(d, fn)
        if cfg:
            c = json.load(open(d / "config.json"))
            cfg(c)
            json.dump(c, open(d / "config.json", "w"))
        cases[name] = d

    variant("no_quant_state", lambda t: t.pop(P + ".quant_state.bitsandbytes__nf4"))
    variant("short_absmax", lambda t: t.__setitem__(P + ".absmax", ("U8", t[P + ".absmax"][1][:-1])))

    def bad_shape(t):
        qs = json.loads(bytes(t[P + ".quant_state.bitsandbytes__nf4"][1]))
        t[P] = ("U8", t[P][1][:-8])
        t[P + ".quant_state.bitsandbytes__nf4"] = ("U8", np.frombuffer(json.dumps(qs).encode(), np.uint8))
    variant("bytes_vs_shape", bad_shape)

    def fp4(t):
        blob = t.pop(P + ".quant_state.bitsandbytes__nf4")[1]
        qs = json.loads(bytes(blob))
        qs["quant_type"] = "fp4"
        t[P + ".quant_state.bitsandbytes__fp4"] = ("U8", np.frombuffer(json.dumps(qs).encode(), np.uint8))
    variant("fp4_tensor", fp4)
    variant("fp4_config", lambda t: None,
            cfg=lambda c: c["quantization_config"].__setitem__("bnb_4bit_quant_type", "fp4"))
    variant("int8_no_scb", lambda t: t.pop("model.layers.2.self_attn.o_proj.SCB"), kind="int8")
    expect = {
        "no_quant_state": "quant_state",
        "short_absmax": ".absmax",
        "bytes_vs_shape": "packed two 4-bit codes a byte needs",
        "fp4_tensor": "fp4 is not supported: use an nf4 checkpoint",
        "fp4_config": "fp4 is not supported: use an nf4 checkpoint",
        "int8_no_scb": "SCB",
        "mismatch": "cannot re-quantize",
        "dynamic": "already quantized",
    }
    args = [str(cases[k]) for k in cases] + [f"{good}:int8", f"{good}:dynamic", "--", str(good)]
    out = tool("session", *args).stdout.decode().splitlines()
    errs = [line.split("\t", 1)[1] for line in out if line.startswith("ERR\t")]
    assert len(errs) == len(expect)
    for msg, (name, phrase) in zip(errs, expect.items()):
        assert phrase in msg, f"{name}: {msg}"
    assert out[-1].startswith("OK\tnf4 (double quant), 28 linears")
    # the messages say what to change
    assert "re-save" in errs[0] and "quant=nf4" in errs[0]
    assert "elements" in errs[1]


# ---- a notebook's QLoRA cell through `lathe run` -------------------------------------------

def run_cells(script, tmp_path):
    path = tmp_path / "cells.lathe"
    path.write_text(script)
    env = dict(os.environ, LATHE_TINY_DIR=TINY)
    p = subprocess.run([LATHE, "run", str(path)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env)
    assert p.returncode == 0, p.stderr.decode() + p.stdout.decode()
    return p.stdout.decode()


def test_qlora_train_save_and_export_through_magics(tmp_path):
    q, f = tmp_path / "q", tmp_path / "f"
    deq, _ = bnb_ref.write_quantized(TINY, q, "nf4", True)
    bnb_ref.write_dequantized(TINY, f, deq)
    data = os.path.join(SRCDIR, "notebooks", "data", "polite.jsonl")
    outs = {}
    for tag, src in (("q", q), ("f", f)):
        outs[tag] = run_cells(
            f"%load {src}\n%status\n%lora r=4 alpha=8 seed=1\n"
            f"%train data={data} steps=2 batch=2 lr=1e-3 seed=3 max_grad_norm=0\n"
            f"%save adapter={tmp_path}/ad_{tag}\n%save merged={tmp_path}/mg_{tag}\n"
            f"%export_gguf {tmp_path}/m_{tag}.gguf type=f32\n", tmp_path)
    assert "nf4 (double quant), 28 linears (pre-quantized checkpoint)" in outs["q"]
    assert "merged into the dequantized NF4 base: the checkpoint is pre-quantized" in outs["q"]
    assert "dequantized to fp32 for the export" in outs["q"]
    assert "merged into the" not in outs["f"]
    a = bnb_ref.read_safetensors(tmp_path / "ad_q" / "adapter_model.safetensors")
    b = bnb_ref.read_safetensors(tmp_path / "ad_f" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 56
    for k in a:
        assert np.allclose(a[k][1], b[k][1], rtol=1e-3, atol=1e-6), k
    ma = bnb_ref.read_dir(tmp_path / "mg_q")
    mb = bnb_ref.read_dir(tmp_path / "mg_f")
    assert sorted(ma) == sorted(mb)
    for k in ma:
        assert ma[k][0] == "F32" and np.allclose(ma[k][1], mb[k][1], rtol=1e-4, atol=1e-6), k
    assert "quantization_config" not in json.load(open(tmp_path / "mg_q" / "config.json"))
    ga, gb = (tmp_path / "m_q.gguf").read_bytes(), (tmp_path / "m_f.gguf").read_bytes()
    assert len(ga) == len(gb) and len(ga) > 1 << 20


def test_lathe_logits_takes_load_options_and_refuses_unknown_ones(tmp_path):
    def run(*opts):
        return subprocess.run([LATHE, "logits", TINY, *opts, "--ids", "2,10", "--out",
                               str(tmp_path / "l.npy")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    p = run("colour=blue")
    assert p.returncode == 2 and b"unknown option 'colour=blue'" in p.stderr
    p = run("quant=nf5")
    assert p.returncode == 1 and b"quant='nf5' is not accepted (accepted: none, nf4, int8, dynamic)" in p.stderr
    p = run("quant=int8", "device=cpu")
    assert p.returncode == 0 and np.load(tmp_path / "l.npy").shape == (2, 4096)


@pytest.mark.parametrize("kind,ratio", [("nf4", 0.75), ("int8", 0.9)])
def test_random_weights_quantize_as_they_are_drawn(tmp_path, kind, ratio):
    """random:gemma-3-270m quant=...: every linear quantized (126 of them), the weights take less
    memory than the bf16 model's, and the model runs. The embedding stays bf16, so the ratio to
    bf16 is bounded well above NF4's quarter."""
    def weights_mib(out):
        line = [x for x in out.splitlines() if x.startswith("weights in memory")][-1]
        return float(line.split()[3])
    base = run_cells("%load random:gemma-3-270m\n%status\n", tmp_path)
    out = run_cells("%%load random:gemma-3-270m quant=%s\n%%status\n"
                    "%%generate \"Hi\" max_new=2 temperature=0\n" % kind, tmp_path)
    assert "%s%s, 126 linears (quantized at load)" % (kind, " (double quant)" if kind == "nf4" else "") in out
    assert weights_mib(out) < ratio * weights_mib(base)
