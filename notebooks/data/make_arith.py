#!/usr/bin/env python3
"""make_arith.py — writes arith.jsonl, the arithmetic word problems notebooks/grpo.ipynb trains
on: one JSON object a line, {"prompt": [system, user messages], "answer": "N"}, generated
from a fixed seed (there is no network to fetch GSM8K from; the problems have its shape: a
short story, one integer answer). The system prompt asks for the format the built-in rewards
check, with the markers of Unsloth's Gemma 3 GRPO notebook. Run it again to get the same file.
"""
import json
import os
import random

SYSTEM = ("You are given a problem. Think about the problem and provide your working out. "
          "Place it between <start_working_out> and <end_working_out>. Then, provide your "
          "solution between <SOLUTION></SOLUTION>")

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas"]
THINGS = ["apples", "stickers", "marbles", "books", "coins", "pencils", "shells", "cards"]


def problem(r):
    n, t = r.choice(NAMES), r.choice(THINGS)
    kind = r.randrange(5)
    a, b = r.randint(2, 60), r.randint(2, 40)
    if kind == 0:
        return f"{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?", a + b
    if kind == 1:
        a += b
        return f"{n} had {a} {t} and gave away {b}. How many {t} are left?", a - b
    if kind == 2:
        a, b = r.randint(2, 12), r.randint(2, 12)
        return f"{n} fills {a} boxes with {b} {t} each. How many {t} is that in all?", a * b
    if kind == 3:
        b, q = r.randint(2, 9), r.randint(2, 12)
        return f"{n} shares {b * q} {t} equally among {b} friends. How many does each get?", q
    c = r.randint(2, 9)
    return (f"{n} buys {c} packs of {t} with {b} in each, then loses {min(a, c * b - 1)}. "
            f"How many {t} remain?", c * b - min(a, c * b - 1))


def main():
    r = random.Random(3407)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arith.jsonl")
    with open(out, "w") as f:
        for _ in range(200):
            q, ans = problem(r)
            row = {"prompt": [{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": q}],
                   "answer": str(ans)}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
