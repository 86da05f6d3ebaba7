#!/usr/bin/env python3
"""check_flow.py -- what bench/gpu_flow.lathe wrote, read back by transformers + PEFT.

Usage: python3 bench/check_flow.py DIR   (DIR holds adapter/, merged/ and lathe_logits.npy, the
logits `lathe logits DIR/merged` computed for IDS below; run from the repository root, where
models/tiny is). Loads models/tiny in float32 with eager attention, then:
  base + adapter (PeftModel.from_pretrained(DIR/adapter)) -> logits of IDS;
  DIR/merged (AutoModelForCausalLM, with its loading info: no missing or unexpected keys);
and prints one JSON line: the relative differences ||a - b|| / ||b|| of merged vs base + adapter
(the merge lathe did on the GPU against PEFT applying the adapter), of lathe's logits vs
transformers' on the merged model, and of base + adapter vs the base (training changed it).
Exit status 1 when a difference is above 1e-4 (1e-3 for lathe's) or the training left no trace.
"""
import json
import os
import sys

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

IDS = [2, 651, 1203, 77, 3001, 18, 940, 12, 33, 1500, 2047, 812]


def load(path, **kw):
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    attn_implementation="eager", **kw)
    except TypeError:
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                    attn_implementation="eager", **kw)


def logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0].float().numpy()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    d = sys.argv[1]
    base = load("models/tiny")
    lb = logits(base)
    peft_model = PeftModel.from_pretrained(base, os.path.join(d, "adapter"))
    la = logits(peft_model)
    merged, info = load(os.path.join(d, "merged"), output_loading_info=True)
    lm = logits(merged)
    lathe = np.load(os.path.join(d, "lathe_logits.npy"))
    r = {"merged_vs_base_plus_adapter": rel(lm, la), "lathe_vs_transformers_merged": rel(lathe, lm),
         "adapter_changed_base": rel(la, lb),
         "merged_missing_keys": len(info.get("missing_keys", [])),
         "merged_unexpected_keys": len(info.get("unexpected_keys", []))}
    print(json.dumps(r), flush=True)
    good = (r["merged_vs_base_plus_adapter"] < 1e-4 and r["lathe_vs_transformers_merged"] < 1e-3
            and r["adapter_changed_base"] > 1e-3 and not r["merged_missing_keys"]
            and not r["merged_unexpected_keys"])
    print("flow checks " + ("passed" if good else "FAILED"), flush=True)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
