"""conftest — shared fixtures for the protocol tests (jupyter_client against `lathe kernel`).

Installs the kernelspec of the build tree's `lathe` with
`$LATHE_BUILDDIR/lathe install --prefix $LATHE_BUILDDIR/test-prefix` and points JUPYTER_PATH
at it (at import time, so that jupyter_kernel_test's setUpClass finds it too). Provides:
  kernel            one kernel for a whole test module: (KernelManager, BlockingKernelClient)
  fresh_kernel      a factory for kernels a test may restart or shut down
  execute(...)      runs a cell and collects the reply and the iopub messages of that request
  Raw               signed raw-ZeroMQ messaging for the bad-input tests
Kernel stderr goes to a log file per kernel (tests read it to check what was logged).
"""
import fcntl
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

BUILDDIR = os.environ.get("LATHE_BUILDDIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
LATHE = os.path.join(BUILDDIR, "lathe")
PREFIX = os.path.join(BUILDDIR, "test-prefix")
JUPYTER_DIR = os.path.join(PREFIX, "share", "jupyter")
KERNEL_NAME = "lathe"
TIMEOUT = 15


def _install_kernelspec():
    if not os.access(LATHE, os.X_OK):
        raise RuntimeError("no lathe binary at %s (build it: make lathe; LATHE_BUILDDIR=%s)"
                           % (LATHE, BUILDDIR))
    os.makedirs(PREFIX, exist_ok=True)
    # Several test files may start at once under `make -j`: install under a lock.
    with open(os.path.join(PREFIX, ".install-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = subprocess.run([LATHE, "install", "--prefix", PREFIX],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("lathe install --prefix %s failed (%d): %s"
                               % (PREFIX, r.returncode, r.stderr))
    spec = os.path.join(JUPYTER_DIR, "kernels", KERNEL_NAME, "kernel.json")
    if not os.path.exists(spec):
        raise RuntimeError("lathe install did not write %s" % spec)


_install_error = None
try:
    _install_kernelspec()
except Exception as e:  # reported by every test through the fixtures
    _install_error = str(e)
os.environ["JUPYTER_PATH"] = JUPYTER_DIR + (
    os.pathsep + os.environ["JUPYTER_PATH"] if os.environ.get("JUPYTER_PATH") else "")


def start_kernel(transport="tcp"):
    """Starts lathe through jupyter_client; returns (km, kc, stderr log path)."""
    if _install_error:
        pytest.fail(_install_error)
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name=KERNEL_NAME, transport=transport)
    if transport == "ipc":
        km.ip = os.path.join(tempfile.mkdtemp(prefix="lathe-ipc-"), "k")
    fd, log = tempfile.mkstemp(prefix="lathe-kernel-", suffix=".log")
    logf = os.fdopen(fd, "w")  # stays open: a restart launches again with the same kwargs
    km.start_kernel(stderr=logf)
    km._lathe_logf = logf
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
    except Exception:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        raise RuntimeError("kernel not ready; its log:\n" + open(log).read())
    km._lathe_log = log
    return km, kc


def stop_kernel(km, kc):
    try:
        kc.stop_channels()
    finally:
        if km.is_alive():
            km.shutdown_kernel(now=False)
        km._lathe_logf.close()


def kernel_log(km):
    with open(km._lathe_log, errors="replace") as f:
        return f.read()


@pytest.fixture(scope="module")
def kernel():
    km, kc = start_kernel()
    yield km, kc
    stop_kernel(km, kc)


@pytest.fixture
def fresh_kernel():
    started = []

    def make(**kw):
        km, kc = start_kernel(**kw)
        started.append((km, kc))
        return km, kc

    yield make
    for km, kc in started:
        stop_kernel(km, kc)


def flush(kc):
    for get in (kc.get_shell_msg, kc.get_iopub_msg, kc.get_stdin_msg):
        while True:
            try:
                get(timeout=0.05)
            except Exception:
                break


def _read_cell(kc, msg_id, timeout, done, what):
    """iopub messages whose parent is msg_id, up to and including the first for which done(m)."""
    out = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            m = kc.get_iopub_msg(timeout=max(0.01, deadline - time.time()))
        except Exception:
            break
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        out.append(m)
        if done(m):
            return out
    raise AssertionError("no %s for %s within %ss; got %s"
                         % (what, msg_id, timeout, [m["msg_type"] for m in out]))


def collect_iopub(kc, msg_id, timeout=TIMEOUT):
    """iopub messages whose parent is msg_id, up to and including its idle."""
    return _read_cell(kc, msg_id, timeout, lambda m: m["msg_type"] == "status"
                      and m["content"]["execution_state"] == "idle", "idle")


def wait_running(kc, msg_id, timeout=TIMEOUT):
    """Reads iopub until the cell msg_id has shown output (%sleep's progress bar comes first),
    so an interrupt sent next finds the cell running, however slow the machine; returns what
    it read of that cell, for the caller to keep."""
    return _read_cell(kc, msg_id, timeout, lambda m: m["msg_type"] in
                      ("display_data", "update_display_data", "stream"), "output")


def shell_reply(kc, msg_id, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = kc.get_shell_msg(timeout=max(0.01, deadline - time.time()))
        if m["parent_header"].get("msg_id") == msg_id:
            return m
    raise AssertionError("no shell reply to %s" % msg_id)


def execute(kc, code, timeout=TIMEOUT, **kw):
    """Runs code; returns (reply, iopub messages of that request up to idle)."""
    msg_id = kc.execute(code, **kw)
    reply = shell_reply(kc, msg_id, timeout)
    return reply, collect_iopub(kc, msg_id, timeout)


def types(msgs):
    return [m["msg_type"] for m in msgs]


def stream_text(msgs, name="stdout"):
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and m["content"]["name"] == name)


# ---- raw ZeroMQ ------------------------------------------------------------------------

DELIM = b"<IDS|MSG>"


class Raw:
    """Hand-made messages on our own DEALER/SUB sockets, signed with the kernel's key."""

    def __init__(self, km):
        import zmq
        self.zmq = zmq
        self.ctx = zmq.Context()
        info = km.get_connection_info()
        self.key = info["key"] if isinstance(info["key"], bytes) else info["key"].encode()
        self.info = info
        self.session = str(uuid.uuid4())
        self.sockets = []

    def url(self, channel):
        i = self.info
        port = i[channel + "_port"]
        if i["transport"] == "tcp":
            return "tcp://%s:%d" % (i["ip"], port)
        return "ipc://%s-%d" % (i["ip"], port)

    def socket(self, kind, channel, identity=None):
        s = self.ctx.socket(kind)
        s.linger = 0
        if identity is not None:
            s.setsockopt(self.zmq.ROUTING_ID, identity)
        if kind == self.zmq.SUB:
            s.setsockopt(self.zmq.SUBSCRIBE, b"")
        s.connect(self.url(channel))
        self.sockets.append(s)
        return s

    def sign(self, parts):
        h = hmac.new(self.key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()

    def header(self, msg_type, **extra):
        h = {"msg_id": str(uuid.uuid4()), "session": self.session, "username": "test",
             "date": "2026-11-30T10:00:00.000000Z", "msg_type": msg_type, "version": "5.4"}
        h.update(extra)
        return h

    def frames(self, msg_type, content=None, header=None, idents=(), raw_parts=None,
               sig=None, buffers=()):
        """Frames of a message; raw_parts (4 bytes objects) override the JSON parts."""
        header = header or self.header(msg_type)
        parts = raw_parts or [json.dumps(header).encode(), b"{}", b"{}",
                              json.dumps(content or {}).encode()]
        signature = self.sign(parts) if sig is None else sig
        return list(idents) + [DELIM, signature] + list(parts) + list(buffers), header

    def recv(self, sock, timeout=TIMEOUT):
        """Next message on sock as (idents, header, parent, content), or None on timeout."""
        if not sock.poll(int(timeout * 1000)):
            return None
        frames = sock.recv_multipart()
        i = frames.index(DELIM)
        parts = frames[i + 2:i + 6]
        assert frames[i + 1] == self.sign(parts), "kernel's signature does not verify"
        return (frames[:i],) + tuple(json.loads(p) for p in parts[:2]) + (json.loads(parts[3]),)

    def close(self):
        for s in self.sockets:
            s.close(0)
        self.ctx.term()


@pytest.fixture
def raw(kernel):
    r = Raw(kernel[0])
    yield r
    r.close()
