"""test_dynamic.py -- %load quant=dynamic: NF4 with double quantization for every linear except the
ones whose quantization hurts most, measured at load, which stay 16-bit within quant_keep.

The tiny model has random weights, so its quantization errors are flat; a copy with a few input
columns of one linear scaled by 50 (outlier channels, the case AWQ and Unsloth's dynamic 4-bit
are about) must have that linear kept in 16 bits, while quant=nf4 quantizes it. The errors the
engine reports are recomputed here: the weight error from bnb_ref.py's dequantized bytes, the
output error from the inputs gemma3_ref.py's float64 forward gives each linear on the engine's
calibration tokens. The choice is recomputed from the reported errors (scores, greedy budget),
the bytes of every linear are checked (16-bit as stored, or bnb_ref's NF4), and the dynamic
model's logits must be closer to the 16-bit model's than plain NF4's.
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
F = np.float32
LINEAR_PARAMS = 4 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 384 * 128)  # the tiny model's 28 linears
OUTLIER_COLS = [3, 40, 70, 100]


def tool(*args, check=True):
    p = subprocess.run([TOOL, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check and p.returncode != 0:
        raise AssertionError(f"quant_tool {' '.join(map(str, args))}: {p.stderr.decode()}")
    return p


def bits_equal(a, b):
    a, b = np.asarray(a, dtype=F), np.asarray(b, dtype=F)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def outlier_copy(d, layer, module, scale=50.0):
    """The tiny checkpoint with input columns OUTLIER_COLS of one linear scaled by `scale`."""
    t = bnb_ref.read_dir(TINY)
    name = f"model.layers.{layer}.{module}.weight"
    w = bnb_ref.as_f32(t[name]).copy()
    w[:, OUTLIER_COLS] *= F(scale)
    t[name] = ("F32", w)
    os.makedirs(d, exist_ok=True)
    bnb_ref.write_dir(d, t)
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(TINY, f), d)
    return f"model.layers.{layer}.{module}"


def dynamic(d, keep, out):
    """quant_tool dynamic: (info, {module: dict}, {linear name: fp32 values}, calibration ids)."""
    os.makedirs(out, exist_ok=True)
    p = tool("dynamic", d, keep, out)
    info, mods, ids = {}, {}, []
    for line in p.stdout.decode().splitlines():
        f = line.split("\t")
        if f[0] == "module":
            mods[f[1]] = {"params": int(f[2]), "weight": float(f[3]), "output": float(f[4]),
                          "score": float(f[5]), "kept": f[6] == "1", "order": len(mods)}
        elif f[0] == "calib":
            ids = [int(x) for x in f[1].split(",")]
        else:
            info[f[0]] = f[1]
    lin = {fn[:-4]: np.fromfile(os.path.join(out, fn), dtype=F)
           for fn in os.listdir(out) if fn.endswith(".f32")}
    return info, mods, lin, ids


def dequant(d, quant, out):
    os.makedirs(out, exist_ok=True)
    p = tool("dequant", d, quant, out)
    info = dict(line.split("\t", 1) for line in p.stdout.decode().splitlines() if "\t" in line)
    lin = {fn[:-4]: np.fromfile(os.path.join(out, fn), dtype=F)
           for fn in os.listdir(out) if fn.endswith(".f32")}
    return info, lin


def reference_choice(mods, keep):
    """The choice recomputed from the reported errors: score = weight / median + output /
    median (medians over all linears); worst first, keep what still fits in the budget."""
    names = sorted(mods, key=lambda n: mods[n]["order"])
    we = np.array([mods[n]["weight"] for n in names])
    oe = np.array([mods[n]["output"] for n in names])
    score = we / np.median(we) + oe / np.median(oe)
    budget = int(np.floor(keep * sum(mods[n]["params"] for n in names)))
    kept, used = set(), 0
    for i in sorted(range(len(names)), key=lambda i: (-score[i], i)):
        if used + mods[names[i]]["params"] <= budget:
            kept.add(names[i])
            used += mods[names[i]]["params"]
    return dict(zip(names, score)), kept, used


def check_bytes(d, mods, lin):
    """Kept linears hold the checkpoint's values; the others bnb_ref's NF4 (double quant)."""
    tensors = bnb_ref.read_dir(d)
    for mod, m in mods.items():
        w = bnb_ref.as_f32(tensors[mod + ".weight"])
        if m["kept"]:
            assert bits_equal(lin[mod + ".weight"], w.reshape(-1)), mod
        else:
            _, deq = bnb_ref.nf4_group(mod, w, True)
            assert bits_equal(lin[mod + ".weight"], deq.reshape(-1)), mod


# ---- what is kept ---------------------------------------------------------------------------

@pytest.mark.parametrize("layer,module", [(1, "mlp.down_proj"), (2, "self_attn.o_proj")])
def test_the_outlier_heavy_linear_stays_16_bit_and_nf4_quantizes_it(tmp_path, layer, module):
    d = tmp_path / "m"
    target = outlier_copy(d, layer, module)
    info, mods, lin, _ = dynamic(d, 0.1, tmp_path / "dyn")
    assert len(mods) == 28 and int(info["linear_params"]) == LINEAR_PARAMS
    assert mods[target]["kept"], mods[target]
    worst = max(mods, key=lambda n: mods[n]["score"])
    assert worst == target
    quantized = [m for m in mods.values() if not m["kept"]]
    assert mods[target]["weight"] > 1.1 * np.median([m["weight"] for m in quantized])
    assert mods[target]["output"] > 1.2 * np.median([m["output"] for m in quantized])
    check_bytes(d, mods, lin)
    # quant=nf4 quantizes it like every other linear
    ninfo, nlin = dequant(d, "nf4", tmp_path / "nf4")
    assert int(ninfo["kept16"]) == 0 and int(ninfo["quantized"]) == 28
    w = bnb_ref.as_f32(bnb_ref.read_dir(d)[target + ".weight"])
    _, deq = bnb_ref.nf4_group(target, w, True)
    assert bits_equal(nlin[target + ".weight"], deq.reshape(-1))
    assert not bits_equal(nlin[target + ".weight"], w.reshape(-1))
    # in the unmodified model the same linear is unremarkable
    _, plain, _, _ = dynamic(TINY, 0.1, tmp_path / "plain")
    assert plain[target]["score"] < 1.05 * np.median([m["score"] for m in plain.values()])


def test_a_budget_of_one_down_proj_keeps_exactly_the_outlier(tmp_path):
    d = tmp_path / "m"
    target = outlier_copy(d, 1, "mlp.down_proj")
    keep = 384 * 128 / LINEAR_PARAMS                          # room for one MLP projection
    info, mods, lin, _ = dynamic(d, keep, tmp_path / "dyn")
    assert [n for n, m in mods.items() if m["kept"]] == [target]
    assert int(info["kept_params"]) == 384 * 128 and int(info["n_kept"]) == 1
    assert "1 kept in 16 bits by quant=dynamic" in info["summary"]
    check_bytes(d, mods, lin)


@pytest.mark.parametrize("keep", [0.0, 0.03, 0.1, 0.37, 1.0])
def test_the_budget_is_respected_and_the_choice_is_the_greedy_one(tmp_path, keep):
    d = tmp_path / "m"
    outlier_copy(d, 1, "mlp.down_proj")
    info, mods, lin, _ = dynamic(d, keep, tmp_path / "dyn")
    kept_params = sum(m["params"] for m in mods.values() if m["kept"])
    assert kept_params == int(info["kept_params"]) <= np.floor(keep * LINEAR_PARAMS)
    scores, want, used = reference_choice(mods, keep)
    for n, m in mods.items():
        assert m["score"] == pytest.approx(scores[n], rel=1e-12), n
    assert {n for n, m in mods.items() if m["kept"]} == want and used == kept_params
    assert int(info["kept16"]) == len(want) and int(info["quantized"]) == 28 - len(want)
    check_bytes(d, mods, lin)
    quantized = [m for m in mods.values() if not m["kept"]]
    for key, which in (("median_weight", "weight"), ("median_output", "output")):
        med = np.median([m[which] for m in quantized]) if quantized else 0.0
        assert float(info[key]) == pytest.approx(med, rel=1e-12)
    if keep == 0.0:                                           # plain nf4, byte for byte
        ninfo, nlin = dequant(d, "nf4", tmp_path / "nf4")
        assert info["bytes"] == ninfo["bytes"] and int(info["kept16"]) == 0
        for name in nlin:
            assert bits_equal(lin[name], nlin[name]), name
    if keep == 1.0:                                           # everything fits: the 16-bit model
        finfo, _ = dequant(d, "-", tmp_path / "f")
        assert len(want) == 28 and info["bytes"] == finfo["bytes"]


# ---- what is measured -------------------------------------------------------------------------

def test_errors_equal_a_numpy_recomputation(tmp_path):
    d = tmp_path / "m"
    outlier_copy(d, 1, "mlp.down_proj")
    info, mods, _, ids = dynamic(d, 0.1, tmp_path / "dyn")
    assert ids[0] == 2 and 200 <= len(ids) <= 2048             # BOS + a few hundred tokens
    spec, _, w, _ = gemma3_ref.load(str(d))
    capture = {}
    gemma3_ref.forward(spec, w, ids, capture)
    assert len(capture) == 28
    for mod, m in mods.items():
        key = mod[len("model."):]
        W = w[key + ".weight"]                                # float64 of the stored fp32
        _, deq = bnb_ref.nf4_group(mod, W.astype(F), True)
        R = W - deq.astype(np.float64)
        X = capture[key]
        assert m["params"] == W.size
        assert m["weight"] == pytest.approx(np.linalg.norm(R) / np.linalg.norm(W), rel=1e-9), mod
        want = np.linalg.norm(X @ R.T) / np.linalg.norm(X @ W.T)
        assert m["output"] == pytest.approx(want, rel=2e-4), mod
    # the two measures are not the same number: the inputs matter
    assert max(abs(m["output"] / m["weight"] - 1) for m in mods.values()) > 0.02


def test_dynamic_logits_are_closer_to_16_bit_than_nf4(tmp_path):
    d = tmp_path / "m"
    outlier_copy(d, 1, "mlp.down_proj")
    rng = np.random.default_rng(7)
    ids = ",".join(map(str, [2] + list(rng.integers(10, 4096, 47))))

    def logits(*opts):
        out = tmp_path / "l.npy"
        p = subprocess.run([LATHE, "logits", str(d), "device=cpu", *opts, "--ids", ids, "--out",
                            str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.returncode == 0, p.stderr.decode()
        return np.load(out).astype(np.float64)

    l16 = logits()
    lnf4 = logits("quant=nf4")
    ldyn = logits("quant=dynamic")
    rel = lambda x: np.linalg.norm(x - l16) / np.linalg.norm(l16)  # noqa: E731
    assert rel(lnf4) > 0.05                                   # quantization is visible
    assert rel(ldyn) < 0.97 * rel(lnf4)
    assert np.array_equal(logits("quant=dynamic", "quant_keep=0"), lnf4)


# ---- what the user sees -----------------------------------------------------------------------

def run_cells(script, tmp_path, ok=True):
    path = tmp_path / "cells.lathe"
    path.write_text(script)
    env = dict(os.environ, LATHE_TINY_DIR=TINY)
    p = subprocess.run([LATHE, "run", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=env)
    if ok:
        assert p.returncode == 0, p.stderr.decode() + p.stdout.decode()
    return p.returncode, p.stdout.decode() + p.stderr.decode()


def test_load_and_status_list_what_was_kept_and_why(tmp_path):
    d = tmp_path / "m"
    target = outlier_copy(d, 1, "mlp.down_proj")
    info, mods, _, ids = dynamic(d, 0.1, tmp_path / "dyn")
    _, out = run_cells(f"%load {d} quant=dynamic\n%status\n", tmp_path)
    m = mods[target]
    row = f"kept in 16 bits  {target}: weight error {m['weight']:.3g}, output error {m['output']:.3g}"
    assert out.count(row) == 2, out                           # %load's summary and %status
    n_kept = sum(x["kept"] for x in mods.values())
    assert out.count("  kept in 16 bits  ") == 2 * n_kept
    assert (f"{n_kept} of 28 linears kept in 16 bits, "
            f"{100 * int(info['kept_params']) / LINEAR_PARAMS:.1f}% of the linear parameters "
            f"(quant_keep=0.1), chosen by their quantization errors on {len(ids)} "
            "calibration tokens") in out
    med = (f"{'  quantized':<18} weight error {float(info['median_weight']):.3g}, output error "
           f"{float(info['median_output']):.3g} (median of {28 - n_kept})")
    assert med in out
    assert f"nf4 (double quant), {28 - n_kept} linears; {n_kept} kept in 16 bits by " \
           "quant=dynamic (quantized at load)" in out
    # the worst first
    rows = [line for line in out.splitlines() if line.startswith("  kept in 16 bits")]
    assert target in rows[0]
    # plain nf4 shows no such rows
    _, out = run_cells("%load tiny quant=nf4\n%status\n", tmp_path)
    assert "quant=dynamic" not in out and "kept in 16 bits" not in out


def test_bad_inputs_are_refused(tmp_path):
    # the kernel: the range of quant_keep, and quant_keep without quant=dynamic
    rc, out = run_cells("%load tiny quant=dynamic quant_keep=1.5\n", tmp_path, ok=False)
    assert rc != 0 and "bad value '1.5' for option 'quant_keep'" in out
    rc, out = run_cells("%load tiny quant=dynamic quant_keep=-0.1\n", tmp_path, ok=False)
    assert rc != 0 and "bad value '-0.1' for option 'quant_keep'" in out
    rc, out = run_cells("%load tiny quant=nf4 quant_keep=0.2\n", tmp_path, ok=False)
    assert rc != 0 and "quant_keep= applies to quant=dynamic only" in out
    # the engine, in one session that goes on: out of range, and a pre-quantized checkpoint
    pre = tmp_path / "pre"
    bnb_ref.write_quantized(TINY, pre, "nf4", True)
    p = tool("session", f"{TINY}:dynamic:1.5", f"{TINY}:dynamic:-0.25", f"{pre}:dynamic",
             "--", f"{TINY}:dynamic:0.1")
    lines = p.stdout.decode().splitlines()
    errs = [line.split("\t", 1)[1] for line in lines if line.startswith("ERR\t")]
    assert len(errs) == 3
    assert "quant_keep=1.5 is outside [0, 1]" in errs[0]
    assert "quant_keep=-0.25 is outside [0, 1]" in errs[1]
    assert "already quantized" in errs[2] and "llm_int8_skip_modules" in errs[2]
    assert "without quant=" in errs[2]
    assert lines[-1].startswith("OK\tnf4 (double quant), ") and "by quant=dynamic" in lines[-1]
    # the command line
    def logits(*opts):
        return subprocess.run([LATHE, "logits", TINY, *opts, "--ids", "2,10", "--out",
                               str(tmp_path / "l.npy")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    p = logits("quant=dynamic", "quant_keep=abc")
    assert p.returncode == 2 and b"'quant_keep=abc': the value is not a number" in p.stderr
    p = logits("quant=dynamic", "quant_keep=2")
    assert p.returncode == 1 and b"quant_keep=2 is outside [0, 1]" in p.stderr
    p = logits(f"quant=dynamic", "quant_keep=0.25")
    assert p.returncode == 0 and np.load(tmp_path / "l.npy").shape == (2, 4096)


def test_random_weights_measure_flat_errors(tmp_path):
    """random:gemma-3-270m quant=dynamic: drawn, measured and quantized layer by layer. Random
    weights have no outliers, so the scores are flat; the budget still holds."""
    _, out = run_cells("%load random:gemma-3-270m quant=dynamic quant_keep=0.05\n"
                       "%generate \"Hi\" max_new=2 temperature=0\n", tmp_path)
    line = [x for x in out.splitlines() if x.startswith("quant=dynamic ")][0]
    pct = float(line.split("linears kept in 16 bits, ")[1].split("%")[0])
    assert 0 < pct <= 5.0
    scores = [float(x.rsplit("(score ", 1)[1].rstrip(")")) for x in out.splitlines()
              if x.startswith("  kept in 16 bits")]
    assert scores and max(scores) < 1.2 * 2                   # 2 = the score of a median linear


def test_save_quantized_lists_the_kept_linears_in_the_skip_list(tmp_path):
    """%save quantized= from a quant=dynamic model writes what Unsloth's dynamic 4-bit uploads
    hold: NF4 linears in bitsandbytes' layout and the kept ones 16-bit, named in
    llm_int8_skip_modules; loading it back gives the same weights."""
    d = tmp_path / "m"
    target = outlier_copy(d, 1, "mlp.down_proj")
    _, mods, lin, _ = dynamic(d, 0.1, tmp_path / "dyn")
    kept = {n for n, m in mods.items() if m["kept"]}
    assert target in kept
    sq = tmp_path / "sq"
    run_cells(f"%load {d} quant=dynamic\n%save quantized={sq}\n", tmp_path)
    qc = json.load(open(sq / "config.json"))["quantization_config"]
    skip = set(qc["llm_int8_skip_modules"])
    assert {s for s in skip if ".layers." in s} == kept
    info, back = dequant(sq, "-", tmp_path / "back")
    assert int(info["kept16"]) == len(kept) and "pre-quantized checkpoint" in info["summary"]
    assert sorted(back) == sorted(lin)
    for name in lin:
        assert bits_equal(back[name], lin[name]), name
