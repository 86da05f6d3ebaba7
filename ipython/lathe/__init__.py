"""lathe's IPython extension: lathe cells inside a Python notebook (hosted Colab, or any
IPython kernel): the third way into lathe, beside `lathe kernel` (Jupyter) and `lathe run`.

    %load_ext lathe          # once: starts a lathe kernel next to this Python kernel
    %%lathe                  # each cell: the body runs in lathe, its outputs show here
    %load tiny
    %status

    %lathe %train data=d.jsonl steps={STEPS}   # one line; IPython puts Python values in

Hosted Colab runs only its own Python kernel and ignores other kernelspecs, so this bridges
to lathe through the Jupyter protocol itself: the extension starts the installed `lathe`
kernelspec with jupyter_client (the package every IPython kernel already has) and relays each
cell's iopub messages to IPython's display system — streams as streams, displays with their
display_id so live progress bars and loss curves update in place, results, errors. The model
lives in the lathe process (its GPU memory is its own); it stays loaded between cells.
Interrupting a %%lathe cell (Colab's stop button) sends lathe an interrupt_request and waits
for the cell to end cleanly. Run `lathe install --user` (./quickstart does) first.
"""
import atexit
import os
import subprocess
import sys
import tempfile
import time

__all__ = ["load_ipython_extension", "unload_ipython_extension", "LatheBridge"]


class LatheError(Exception):
    """A %%lathe cell failed; the message is lathe's (ename: evalue)."""


class LatheBridge:
    """One lathe kernel and the client that talks to it."""

    def __init__(self, kernel_name="lathe", startup_timeout=60):
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name=kernel_name)
        # lathe's own log goes to a file, not to this kernel's stdout/stderr: a child holding
        # them open would also keep an nbconvert run waiting after this kernel exits
        fd, self.log_path = tempfile.mkstemp(prefix="lathe-kernel-", suffix=".log")
        with os.fdopen(fd, "w") as log:
            self.km.start_kernel(stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=startup_timeout)
        except RuntimeError:
            self.close()
            raise
        self.handles = {}  # lathe display_id -> IPython DisplayHandle

    def close(self, at_exit=False):
        """Stops the lathe kernel. At interpreter exit the event loop jupyter_client's
        KernelManager waits on may be gone, so only a shutdown_request is sent there (lathe
        also stops by itself once this process, its launcher, has ended)."""
        if at_exit:
            try:
                self.kc.shutdown()
            finally:
                self.kc.stop_channels()
            return
        try:
            self.kc.stop_channels()
        finally:
            if self.km.is_alive():
                self.km.shutdown_kernel(now=False)

    # -- one cell ---------------------------------------------------------------------------
    def run(self, code, display=None, update_display=None, out=None, err=None):
        """Runs code in lathe, relaying its outputs; returns the execute_reply content and
        raises LatheError when the cell failed."""
        if display is None:
            from IPython.display import display
        if update_display is None:
            from IPython.display import update_display
        out = out or sys.stdout
        err = err or sys.stderr
        msg_id = self.kc.execute(code, allow_stdin=False, stop_on_error=True)
        interrupted = False
        idle = False
        reply = None
        while not (idle and reply is not None):
            try:
                if not idle:
                    msg = self.kc.get_iopub_msg(timeout=0.2)
                    self._relay(msg, msg_id, display, update_display, out, err)
                    if (msg["parent_header"].get("msg_id") == msg_id and
                            msg["msg_type"] == "status" and
                            msg["content"]["execution_state"] == "idle"):
                        idle = True
                if reply is None:
                    r = self.kc.get_shell_msg(timeout=0 if not idle else 5)
                    if r["parent_header"].get("msg_id") == msg_id:
                        reply = r["content"]
            except KeyboardInterrupt:
                if not interrupted:
                    interrupted = True
                    self.km.interrupt_kernel()
            except Exception as e:  # queue.Empty from either channel
                if type(e).__name__ != "Empty":
                    raise
                if not self.km.is_alive():
                    raise LatheError("the lathe kernel died; %load_ext lathe again to restart it")
        if reply.get("status") == "error":
            raise LatheError("%s: %s" % (reply.get("ename", "Error"), reply.get("evalue", "")))
        return reply

    def _relay(self, msg, msg_id, display, update_display, out, err):
        if msg["parent_header"].get("msg_id") != msg_id:
            return
        kind, c = msg["msg_type"], msg["content"]
        if kind == "stream":
            (err if c.get("name") == "stderr" else out).write(c.get("text", ""))
            (err if c.get("name") == "stderr" else out).flush()
        elif kind in ("display_data", "execute_result"):
            did = (c.get("transient") or {}).get("display_id")
            if did:
                display(c["data"], metadata=c.get("metadata") or {}, raw=True,
                        display_id=self._local_id(did))
            else:
                display(c["data"], metadata=c.get("metadata") or {}, raw=True)
        elif kind == "update_display_data":
            did = (c.get("transient") or {}).get("display_id")
            if did:
                update_display(c["data"], metadata=c.get("metadata") or {}, raw=True,
                               display_id=self._local_id(did))
        elif kind == "clear_output":
            from IPython.display import clear_output
            clear_output(wait=c.get("wait", False))
        elif kind == "error":
            err.write("\n".join(c.get("traceback") or [c.get("ename", "") + ": " +
                                                       c.get("evalue", "")]) + "\n")
            err.flush()

    def _local_id(self, did):
        # one IPython display id per lathe display id, unique across kernel restarts
        return self.handles.setdefault(did, "lathe-%d-%s" % (id(self), did))


_bridge = None


def _lathe_cell(line, cell=None):
    """%%lathe (a cell: its line, then its body) and %lathe (one line). IPython expands
    {expr} and $name in the line (only there), so Python values reach lathe that way."""
    global _bridge
    if _bridge is None or not _bridge.km.is_alive():
        _bridge = LatheBridge()
        atexit.register(_shutdown, True)
    code = (line + "\n" if line.strip() else "") + (cell or "")
    try:
        _bridge.run(code)
    except LatheError as e:
        # the traceback is already shown; stop "Run all" like a failing Python cell does
        raise LatheError(str(e)) from None


def load_ipython_extension(ipython):
    """%load_ext lathe: registers %%lathe and starts the lathe kernel."""
    global _bridge
    ipython.register_magic_function(_lathe_cell, magic_kind="line_cell", magic_name="lathe")
    if _bridge is None or not _bridge.km.is_alive():
        started = time.time()
        _bridge = LatheBridge()
        atexit.register(_shutdown, True)
        print("lathe kernel started in %.1f s (log: %s); run lathe cells with %%%%lathe" %
              (time.time() - started, _bridge.log_path))


def _shutdown(at_exit=False):
    """Stops the lathe kernel (at unload, and when this Python process exits)."""
    global _bridge
    if _bridge is not None:
        try:
            _bridge.close(at_exit)
        finally:
            _bridge = None


def unload_ipython_extension(ipython):
    _shutdown()
