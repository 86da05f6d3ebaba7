"""An interrupt during %train and %grpo, through the real kernel (jupyter_client,
interrupt_request): the cell stops at the next micro-batch (or, in %grpo, the next decode step)
with KeyboardInterrupt, says which step's weights are kept, the kernel still serves, running
the same %train again continues from that step, and after %grpo, %save and %grpo work."""
import fcntl
import os
import subprocess
import time

import pytest

from conftest import BUILDDIR, SRCDIR

DATA = os.path.join(SRCDIR, "notebooks", "data", "polite.jsonl")
TRAIN = f"%train data={DATA} batch=4 steps=100000 lr=1e-3"


@pytest.fixture
def kernel(tmp_path):
    prefix = os.path.join(BUILDDIR, "test-prefix")
    os.makedirs(prefix, exist_ok=True)
    with open(os.path.join(prefix, ".install-lock"), "w") as lock:  # other suites install too
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([os.path.join(BUILDDIR, "lathe"), "install", "--prefix", prefix], check=True,
                       stdout=subprocess.DEVNULL)
    os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")
    os.environ.setdefault("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name="lathe")
    env = dict(os.environ)
    env["OPENBLAS_NUM_THREADS"] = "1"  # parallel test suites on 2 cores: no BLAS spin-waiting
    km.start_kernel(stderr=subprocess.DEVNULL, env=env)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def run_until_steps(km, kc, code, min_step, label="train", on_text=None):
    """Starts code, waits until the progress bar `label` shows step >= min_step (or, with
    on_text, until a stream shows that text), interrupts; returns (shell reply, stream text)."""
    msg_id = kc.execute(code, stop_on_error=False)  # the next cell must not be aborted
    streams, step, reply, interrupted = [], 0, None, False
    deadline = time.time() + 180
    idle = False
    while time.time() < deadline and not (reply and idle):
        if not interrupted and (step >= min_step if on_text is None
                                else on_text in "".join(streams)):
            km.interrupt_kernel()
            interrupted = True
        try:
            m = kc.get_iopub_msg(timeout=0.2)
        except Exception:
            m = None
        if m and m["parent_header"].get("msg_id") == msg_id:
            if m["msg_type"] == "stream":
                streams.append(m["content"]["text"])
            elif m["msg_type"] in ("display_data", "update_display_data"):
                t = m["content"]["data"].get("text/plain", "")
                if t.startswith(label + " ["):
                    step = max(step, int(t.split("] ")[1].split("/")[0]))
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                idle = True
        if reply is None:
            try:
                r = kc.get_shell_msg(timeout=0.01)
                if r["parent_header"].get("msg_id") == msg_id:
                    reply = r
            except Exception:
                pass
    assert reply is not None and idle, "no reply within 180 s; output so far:\n" + "".join(streams)
    assert interrupted, "the cell ended before step %d: %s\n%s" % (min_step, reply["content"], "".join(streams))
    return reply, "".join(streams)


def test_interrupt_keeps_last_step_and_continues(kernel):
    km, kc = kernel
    r = kc.execute_interactive("%load tiny\n%lora r=8", timeout=60, output_hook=lambda m: None)
    assert r["content"]["status"] == "ok"
    reply, text = run_until_steps(km, kc, TRAIN, 2)
    c = reply["content"]
    assert c["status"] == "error" and c["ename"] == "KeyboardInterrupt", c
    assert "training stopped at step" in c["evalue"], c["evalue"]
    stopped = int(c["evalue"].split("training stopped at step ")[1].split()[0])
    assert stopped >= 2
    assert f"the weights are those of step {stopped}" in text, text
    # the same %train again continues from there
    reply, text = run_until_steps(km, kc, TRAIN, stopped + 1)
    assert f"continuing the interrupted run at step {stopped}/100000" in text, text
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    r = kc.execute_interactive("%echo alive", timeout=30, output_hook=lambda m: None)
    assert r["content"]["status"] == "ok", r["content"]


GRPO_DATA = os.path.join(SRCDIR, "notebooks", "data", "arith.jsonl")
REWARD = os.path.join(SRCDIR, "notebooks", "data", "short_reward.py")


def test_interrupt_grpo_between_steps_and_mid_sampling(kernel, tmp_path):
    km, kc = kernel
    r = kc.execute_interactive("%load tiny\n%lora r=8", timeout=60, output_hook=lambda m: None)
    assert r["content"]["status"] == "ok"
    grpo = (f"%grpo data={GRPO_DATA} reward=\"exec:python3 {REWARD}\" group=4 max_prompt=128 "
            "max_completion=16 lr=1e-3 show_every=0")
    reply, text = run_until_steps(km, kc, grpo + " steps=100000", 2, label="grpo")
    c = reply["content"]
    assert c["status"] == "error" and c["ename"] == "KeyboardInterrupt", c
    assert "%grpo interrupted after step" in c["evalue"], c["evalue"]
    stopped = int(c["evalue"].split("after step ")[1].split()[0])
    assert stopped >= 2
    assert f"the adapters hold the weights of step {stopped}" in text, text
    # mid-sampling: a long rollout, interrupted as soon as it starts
    reply, text = run_until_steps(km, kc, grpo.replace("max_completion=16", "max_completion=1800")
                                  .replace("max_prompt=128", "max_prompt=200").replace("group=4", "group=8")
                                  + " steps=3",
                                  0, label="grpo", on_text="memory plan")
    c = reply["content"]
    assert c["ename"] == "KeyboardInterrupt" and "after step 0 of 3" in c["evalue"], c
    out = str(tmp_path / "adapter")
    r = kc.execute_interactive(f"%save adapter={out}", timeout=60, output_hook=lambda m: None)
    assert r["content"]["status"] == "ok", r["content"]
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    r = kc.execute_interactive(grpo + " steps=1", timeout=120, output_hook=lambda m: None)
    assert r["content"]["status"] == "ok", r["content"]
