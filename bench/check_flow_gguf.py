"""check_flow_gguf.py -- the GPU flow's GGUF files (bench/gpu_flow.lathe, brought back in
OUTDIR/flow by `bench/run-bench.sh OUTDIR flow`) in llama.cpp on this machine, through
node-llama-cpp's CPU build (tests/gguf/llama.mjs).

usage: python3 bench/check_flow_gguf.py OUTDIR/flow

For flow-f16.gguf and flow-q8_0.gguf: the log-probability llama.cpp gives each of 11 ids after
the ones before, against the same from lathe's logits of the merged checkpoint (lathe_logits.npy,
computed on the GPU machine by `lathe logits` on the same ids). Prints the largest difference
per file; exits 1 when llama.cpp refuses a file. Not a test: a check of a device run.
"""
import json
import os
import subprocess
import sys

import numpy as np

IDS = [2, 651, 1203, 77, 3001, 18, 940, 12, 33, 1500, 2047, 812]  # run-bench.sh's flow ids
HERE = os.path.dirname(os.path.abspath(__file__))


def main(d):
    logits = np.load(os.path.join(d, "lathe_logits.npy")).astype(np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    want = np.array([lp[t, IDS[t + 1]] for t in range(len(IDS) - 1)])
    for name in ("flow-f16.gguf", "flow-q8_0.gguf"):
        run = subprocess.run(["node", os.path.join(HERE, "..", "tests", "gguf", "llama.mjs"),
                              os.path.join(d, name), "--eval", ",".join(map(str, IDS))],
                             capture_output=True, text=True)
        last = (run.stdout.strip().splitlines() or ["{}"])[-1]
        r = json.loads(last)
        if run.returncode != 0 or "logp" not in r:
            print(f"{name}: llama.cpp refused it: {r.get('error', run.stderr.strip())}")
            return 1
        diff = float(np.abs(np.array(r["logp"]) - want).max())
        print(f"{name}: arch {r.get('arch')}, file type {r.get('file_type')}, "
              f"max |log-prob difference| against lathe {diff:.5f}, nll {r['nll']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
