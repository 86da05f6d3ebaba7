"""check_bnb_load.py -- the checkpoints `%save quantized=` writes, loaded by transformers with
bitsandbytes, give lathe's logits.

Two steps, because lathe and transformers run on different machines here:
  python3 bench/check_bnb_load.py make OUTDIR   (needs the lathe binary: LATHE or _build/lathe)
      saves models/tiny quantized at load in each of lathe's modes with `%save quantized=`
      (nf4 with double quantization; nf4 with the 16-bit parts in bf16; int8; dynamic, which
      keeps some linears in 16 bits and lists them in llm_int8_skip_modules), and next to each
      folder lathe's own logits of it (`lathe logits DIR device=cpu`) in DIR.lathe.npy;
  python3 bench/check_bnb_load.py check OUTDIR  (needs torch, transformers and bitsandbytes)
      loads each folder with transformers' from_pretrained, which reads config.json's
      quantization_config and builds bitsandbytes' Linear4bit / Linear8bitLt layers, runs the
      same ids and compares. Prints one JSON line per folder and exits 1 on a mismatch.

NF4: bitsandbytes dequantizes each weight to the compute dtype (float32 here, as
bnb_4bit_compute_dtype in the saved config says) and multiplies in it, as lathe's CPU backend
does, so the logits must agree to 1e-4 of the largest. LLM.int8: bitsandbytes also rounds the
activations to int8 (row-wise absmax) and takes columns above llm_int8_threshold in 16 bits,
which lathe does not do, so there the check is the greedy token at every position and 5e-2 of
the largest logit. Without a GPU (or with CUDA_VISIBLE_DEVICES empty) bitsandbytes runs its
pure-torch backend (bitsandbytes/backends/default/ops.py).
"""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SRCDIR = os.environ.get("LATHE_SRCDIR") or os.path.abspath(os.path.join(HERE, ".."))
TINY = os.path.join(SRCDIR, "models", "tiny")
IDS = [2, 651, 3081, 11, 17, 99, 1024, 7, 300, 45, 2000, 4000]
# name -> (%load options, %save options)
MODES = {
    "nf4": ("quant=nf4", ""),
    "nf4_bf16": ("quant=nf4", "dtype=bf16"),
    "int8": ("quant=int8", ""),
    "dynamic": ("quant=dynamic", ""),
}


def make(out):
    lathe = os.environ.get("LATHE") or os.path.join(SRCDIR, "_build", "lathe")
    os.makedirs(out, exist_ok=True)
    for name, (load, save) in MODES.items():
        d = os.path.join(out, name)
        cells = os.path.join(out, name + ".lathe")
        with open(cells, "w") as f:
            f.write(f"%load {TINY} {load} device=cpu\n%status\n%save quantized={d} {save}\n")
        p = subprocess.run([lathe, "run", cells], capture_output=True, text=True)
        with open(os.path.join(out, name + ".log"), "w") as f:
            f.write(p.stdout + p.stderr)
        if p.returncode != 0:
            sys.exit(f"{name}: lathe run failed:\n{p.stdout}{p.stderr}")
        p = subprocess.run([lathe, "logits", d, "device=cpu", "--ids", ",".join(map(str, IDS)),
                            "--out", d + ".lathe.npy"], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{name}: lathe logits failed:\n{p.stderr}")
        print(f"{name}: saved {d}")


def check(out):
    import torch
    import bitsandbytes
    import transformers
    from transformers import AutoModelForCausalLM

    print(json.dumps(dict(torch=torch.__version__, transformers=transformers.__version__,
                          bitsandbytes=bitsandbytes.__version__,
                          cuda=torch.cuda.is_available())), flush=True)
    fails = 0
    for name in MODES:
        d = os.path.join(out, name)
        if not os.path.isdir(d):
            print(json.dumps(dict(mode=name, ok=False, error="missing")))
            fails += 1
            continue
        want = np.load(d + ".lathe.npy").astype(np.float64)
        qc = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
        try:
            model = AutoModelForCausalLM.from_pretrained(d).eval()
            layers = {}
            for _, m in model.named_modules():
                layers[type(m).__name__] = layers.get(type(m).__name__, 0) + 1
            with torch.no_grad():
                got = model(torch.tensor([IDS])).logits[0].double().numpy()
        except Exception as e:  # the check's finding, reported with the others
            print(json.dumps(dict(mode=name, ok=False, error=f"{type(e).__name__}: {e}")))
            fails += 1
            continue
        big = float(np.max(np.abs(want)))
        err = float(np.max(np.abs(got - want)))
        same_argmax = bool(np.array_equal(got.argmax(-1), want.argmax(-1)))
        int8 = bool(qc.get("load_in_8bit"))
        tol = (5e-2 if int8 else 1e-4) * big
        ok = err <= tol and (same_argmax or not int8)
        bnb_layers = {k: v for k, v in layers.items() if k in ("Linear4bit", "Linear8bitLt")}
        ok = ok and bool(bnb_layers)
        print(json.dumps(dict(mode=name, ok=ok, max_abs_err=err, largest_logit=big, tol=tol,
                              same_argmax=same_argmax, bnb_layers=bnb_layers,
                              linear_16bit=layers.get("Linear", 0),
                              skip_modules=qc.get("llm_int8_skip_modules"))), flush=True)
        fails += 0 if ok else 1
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "check"):
        sys.exit("usage: check_bnb_load.py make|check OUTDIR")
    (make if sys.argv[1] == "make" else check)(sys.argv[2])
