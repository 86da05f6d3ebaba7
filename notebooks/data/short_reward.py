#!/usr/bin/env python3
"""short_reward.py — a reward program for %grpo's exec: rewards (notebooks/grpo.ipynb): reads
one JSON object a line ({"prompt", "completion", and the data row's fields}) and answers one
line each: minus the completion's length in characters / 50, so shorter answers score higher.
Any program that keeps this line-for-line exchange works; this one shows the protocol in
Python, and gives tiny (which knows no arithmetic) something it can learn in a few steps."""
import json
import sys

for line in sys.stdin:
    item = json.loads(line)
    print(-len(item["completion"]) / 50.0, flush=True)
