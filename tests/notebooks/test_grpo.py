"""%grpo through a real Jupyter client (jupyter nbconvert --execute on the lathe kernel).

test_grpo_notebook runs notebooks/grpo.ipynb on tiny: the built-in rewards' run writes TRL's
metric names to its log, and the exec: reward in Python (data/short_reward.py, which prefers
short completions) is learnt: the mean reward of the last steps is above that of the first.
test_grpo_bad_inputs runs a notebook of bad calls, each of which must fail with a message that
says what to change while the kernel carries on, and then a good call that works. Bad inputs
tried: %grpo before %lora, a missing data file, a line without "prompt", a line that is not
JSON, an unknown reward, a weight count that disagrees, and reward programs that crash, print
a non-number, answer too few lines, never answer (timeout) or do not exist, and a rollout far
larger than the machine's memory (refused by the memory plan with a group= that fits)."""
import json
import os

from conftest import SRCDIR, code_cells, outputs_text

TRL_KEYS = ["step", "loss", "reward", "reward_std", "kl", "completion_length",
            "completions/clipped_ratio", "clip_ratio", "learning_rate"]


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def has_svg(cell):
    for o in cell.get("outputs", []):
        html = o.get("data", {}).get("text/html", "")
        if "<svg" in ("".join(html) if isinstance(html, list) else html):
            return True
    return False


def test_grpo_notebook(execute_notebook):
    os.makedirs("/tmp/lathe-grpo", exist_ok=True)
    for name in ("builtin.jsonl", "short.jsonl"):
        if os.path.exists(os.path.join("/tmp/lathe-grpo", name)):
            os.remove(os.path.join("/tmp/lathe-grpo", name))
    nb = execute_notebook(os.path.join(SRCDIR, "notebooks", "grpo.ipynb"))
    load, lora, shell, builtin, short, save = code_cells(nb)
    for c in (load, lora, builtin, short, save):
        assert not [o for o in c["outputs"] if o["output_type"] == "error"], outputs_text(c)
    text = outputs_text(builtin)
    assert "memory plan" in text and "GRPO: 4 steps" in text, text
    assert has_svg(builtin), "no reward curve"
    log = read_log("/tmp/lathe-grpo/builtin.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for key in TRL_KEYS + ["rewards/format/mean", "rewards/format_approx/std",
                           "rewards/answer/mean", "rewards/number/mean"]:
        assert key in log[0], key
    # format_approx gives +0.5 or -1.0 per marker: its mean lies in [-4, 2]
    assert all(-4 <= r["rewards/format_approx/mean"] <= 2 for r in log)
    assert all(0 <= r["completion_length"] <= 24 for r in log)
    # the learnable reward rises
    log = read_log("/tmp/lathe-grpo/short.jsonl")
    assert len(log) == 30
    first = sum(r["reward"] for r in log[:5]) / 5
    last = sum(r["reward"] for r in log[-5:]) / 5
    assert last > first + 0.05, (first, last, [round(r["reward"], 3) for r in log])
    assert "rewards/exec:python3 data/short_reward.py/mean" in log[0]
    assert os.path.exists("/tmp/lathe-grpo/adapter/adapter_config.json")


BAD = {
    "crash.py": "import sys\nsys.exit(3)\n",
    "abc.py": "import sys\nfor line in sys.stdin:\n    print('abc', flush=True)\n",
    "few.py": "import sys\nsys.stdin.read()\nprint(1.0, flush=True)\n",
    "silent.py": "import sys, time\nsys.stdin.readline()\ntime.sleep(60)\n",
    "ok.py": "import json, sys\nfor line in sys.stdin:\n"
             "    print(len(json.loads(line)['completion']) % 3, flush=True)\n",
}


def test_grpo_bad_inputs(execute_notebook, tmp_path):
    for name, src in BAD.items():
        (tmp_path / name).write_text(src)
    row = {"prompt": "Say something", "answer": "4"}
    (tmp_path / "good.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    (tmp_path / "noprompt.jsonl").write_text(json.dumps(row) + "\n" + '{"answer": "3"}\n')
    (tmp_path / "notjson.jsonl").write_text("this is not json\n")
    g = "data=good.jsonl group=2 max_prompt=32 max_completion=4"
    calls = [
        ("%load tiny", None),
        ("%grpo " + g + " steps=1 reward=format", "%lora"),
        ("%lora r=4", None),
        ("%grpo data=missing.jsonl reward=format", "missing.jsonl"),
        ("%grpo data=noprompt.jsonl reward=format group=2 steps=1", "noprompt.jsonl:2"),
        ("%grpo data=notjson.jsonl reward=format group=2 steps=1", "notjson.jsonl:1"),
        ("%grpo " + g + " steps=1 reward=bogus", "bogus"),
        ("%grpo " + g + " steps=1 reward=format,answer weights=1", "weights"),
        ("%grpo " + g + " steps=1 reward=\"exec:python3 crash.py\"", "crash.py"),
        ("%grpo " + g + " steps=1 reward=\"exec:python3 abc.py\"", "abc"),
        ("%grpo " + g + " steps=1 reward=\"exec:python3 few.py\"", "few.py"),
        ("%grpo " + g + " steps=1 reward=\"exec:python3 silent.py\" reward_timeout=1", "silent.py"),
        ("%grpo " + g + " steps=1 reward=\"exec:./no-such-program\"", "no-such-program"),
        # a rollout far beyond this machine's memory: refused before anything is allocated,
        # naming a group= that would fit
        ("%grpo data=good.jsonl max_prompt=32 max_completion=2000 group=4096 batch=64 steps=1 "
         "reward=format", "try group="),
        ("%grpo " + g + " reward=\"format,exec:python3 ok.py\" steps=2", None),
    ]
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "execution_count": None,
                     "outputs": [], "source": src, "id": "c%d" % i}
                    for i, (src, _) in enumerate(calls)],
          "metadata": {"kernelspec": {"name": "lathe", "display_name": "Lathe (Gemma 3)",
                                      "language": "lathe"}},
          "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "bad.ipynb"
    path.write_text(json.dumps(nb))
    out = execute_notebook(str(path), allow_errors=True, timeout=600)
    for (src, want), cell in zip(calls, code_cells(out)):
        errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
        text = outputs_text(cell)
        if want is None:
            assert not errors, (src, text)
        else:
            assert errors, (src, text)
            assert want in text, (src, want, text)
    assert "GRPO: 2 steps" in outputs_text(code_cells(out)[-1])
