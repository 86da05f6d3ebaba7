"""An interrupt during %train, through the real kernel (jupyter_client, interrupt_request):
the cell stops at the next micro-batch with KeyboardInterrupt, says which step's weights are
kept, the kernel still serves, and running the same %train again continues from that step."""
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
    km.start_kernel(stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def run_until_steps(km, kc, code, min_step):
    """Starts code, waits until the progress bar shows step >= min_step, interrupts; returns
    (shell reply, stream text)."""
    msg_id = kc.execute(code)
    streams, step, deadline = [], 0, time.time() + 120
    while time.time() < deadline and step < min_step:
        m = kc.get_iopub_msg(timeout=60)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "stream":
            streams.append(m["content"]["text"])
        if m["msg_type"] in ("display_data", "update_display_data"):
            t = m["content"]["data"].get("text/plain", "")
            if t.startswith("train ["):
                step = int(t.split("] ")[1].split("/")[0])
    assert step >= min_step, "training did not reach step %d" % min_step
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=60)
    while True:  # the rest of this cell's output, up to idle
        m = kc.get_iopub_msg(timeout=30)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "stream":
            streams.append(m["content"]["text"])
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
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
    assert r["content"]["status"] == "ok"
