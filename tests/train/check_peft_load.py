#!/usr/bin/env python3
"""check_peft_load.py -- proves that what lathe saves is read by the real libraries: the PEFT
adapter of `%save adapter=` by peft.PeftModel.from_pretrained, and the checkpoint of
`%save merged=` by transformers.AutoModelForCausalLM.from_pretrained, with the same logits
lathe computes.

Run it where torch, transformers and peft are installed (the GPU machine; CPU is enough):
  python3 tests/train/check_peft_load.py --lathe BUILD/lathe            # makes everything
  python3 tests/train/check_peft_load.py --adapter A --merged M --logits L.npy   # precomputed
With --lathe it trains models/tiny for 20 LoRA steps on notebooks/data/polite.jsonl (r=8,
alpha=16, all seven targets), saves the adapter and the merged model (fp32), and writes lathe's
logits of the merged model for a fixed id sequence. Then it checks:
  1. PeftModel.from_pretrained loads the adapter with no missing and no unexpected LoRA keys,
     rank/alpha/targets as saved;
  2. the adapter changes the base model's logits (the check can fail);
  3. PEFT's logits (base + adapter) == transformers' logits of lathe's merged checkpoint ==
     lathe's logits (max |diff| <= 1e-3 * max |logit|);
  4. PEFT's merge_and_unload() weights == lathe's merged weights (rel 1e-5 per tensor).
Prints one line per check and exits non-zero if any fails.
What it owns: its output folder (--out, default a temp dir). It must not touch anything else.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
IDS = [2, 106, 1645, 108, 200, 300, 400, 500, 600, 700, 800, 107, 108, 106, 2516, 108]


def log(*a):
    print(*a, flush=True)


def make_artifacts(lathe, out):
    tiny = os.path.join(ROOT, "models", "tiny")
    data = os.path.join(ROOT, "notebooks", "data", "polite.jsonl")
    script = (f"%load {tiny}\n%lora r=8 alpha=16\n"
              f"%train data={data} batch=4 steps=20 lr=1e-2 schedule=constant\n"
              f"%save adapter={out}/adapter\n%save merged={out}/merged dtype=fp32\n")
    with open(os.path.join(out, "make.lathe"), "w") as f:
        f.write(script)
    subprocess.run([lathe, "run", os.path.join(out, "make.lathe")], check=True)
    subprocess.run([lathe, "logits", os.path.join(out, "merged"), "--ids", ",".join(map(str, IDS)), "--out",
                    os.path.join(out, "lathe_logits.npy")], check=True)
    return os.path.join(out, "adapter"), os.path.join(out, "merged"), os.path.join(out, "lathe_logits.npy")


def load_model(path):
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except TypeError:
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lathe", help="path to the lathe binary (makes the artifacts)")
    ap.add_argument("--adapter")
    ap.add_argument("--merged")
    ap.add_argument("--logits")
    ap.add_argument("--base", default=os.path.join(ROOT, "models", "tiny"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import peft
    import transformers
    from peft import PeftModel
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    out = args.out or tempfile.mkdtemp(prefix="lathe-peft-check-")
    os.makedirs(out, exist_ok=True)
    if args.lathe:
        adapter, merged, logits_path = make_artifacts(args.lathe, out)
    else:
        adapter, merged, logits_path = args.adapter, args.merged, args.logits
    failures = 0

    def check(ok, what):
        nonlocal failures
        log(("ok   " if ok else "FAIL ") + what)
        failures += 0 if ok else 1

    ids = torch.tensor([IDS])
    base = load_model(args.base).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits[0].float().numpy()

    # 1. PEFT loads the adapter, every key used
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    pm = PeftModel.from_pretrained(load_model(args.base), adapter).eval()
    sd = load_peft_weights(adapter)
    res = set_peft_model_state_dict(pm, sd)
    unexpected = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
    check(not unexpected and not missing,
          f"PeftModel.from_pretrained loads {len(sd)} tensors (unexpected {unexpected[:3]}, missing {missing[:3]})")
    pc = pm.peft_config["default"]
    check(pc.r == cfg["r"] and float(pc.lora_alpha) == float(cfg["lora_alpha"]),
          f"rank {pc.r}, alpha {pc.lora_alpha}, targets {sorted(pc.target_modules)}")
    n_lora = sum(1 for n, _ in pm.named_parameters() if "lora_A" in n)
    check(n_lora == 28, f"{n_lora} adapted modules (expect 28: 4 layers x 7)")

    with torch.no_grad():
        peft_logits = pm(input_ids=ids).logits[0].float().numpy()
    scale = float(np.abs(peft_logits).max())
    # 2. the adapter matters
    check(np.abs(peft_logits - base_logits).max() > 1e-3 * scale, "the adapter changes the logits")

    # 3. logits agree three ways
    hf_merged = load_model(merged).eval()
    with torch.no_grad():
        merged_logits = hf_merged(input_ids=ids).logits[0].float().numpy()
    lathe_logits = np.load(logits_path)
    d1 = float(np.abs(peft_logits - merged_logits).max())
    d2 = float(np.abs(lathe_logits - peft_logits).max())
    check(d1 <= 1e-3 * scale, f"PEFT (base + adapter) vs transformers(lathe merged): max |diff| {d1:.2e}")
    check(lathe_logits.shape == peft_logits.shape and d2 <= 1e-3 * scale,
          f"lathe logits vs PEFT logits: max |diff| {d2:.2e} (scale {scale:.2f})")

    # 4. PEFT's merge == lathe's merge
    mu = pm.merge_and_unload()
    theirs = {k: v.detach().float().numpy() for k, v in mu.state_dict().items()}
    ours = {k: v.detach().float().numpy() for k, v in hf_merged.state_dict().items()}
    worst, worst_k = 0.0, ""
    for k, v in theirs.items():
        if k not in ours:
            continue
        r = float(np.linalg.norm(ours[k] - v) / max(np.linalg.norm(v), 1e-12))
        if r > worst:
            worst, worst_k = r, k
    check(worst <= 1e-5, f"merge_and_unload() vs lathe merged weights: worst relative diff {worst:.2e} ({worst_k})")
    log(f"artifacts in {out}")
    log("peft load check " + ("passed" if failures == 0 else f"FAILED ({failures})"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
