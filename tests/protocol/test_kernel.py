"""test_kernel — lathe's kernel server through jupyter_client's KernelManager.

Checks every message type the server handles (and the error reply to malformed or unknown
requests), with busy/idle around each (jupyter_client's
docs/messaging.rst, "Kernel status" and the request/reply sections): kernel_info, execute
(counter, execute_input, stream, display_data/update_display_data, execute_result, error,
silent, store_history, stop_on_error), is_complete, complete (code points), inspect,
history, comm_*, interrupt (message and SIGINT), stdin input_request, restart and shutdown.
Uses the interpreter's magics %echo, %sleep, %input, %help, %version and an unknown magic.
"""
import os
import re
import signal
import time

import pytest

from conftest import (collect_iopub, execute, flush, kernel_log, shell_reply, stream_text,
                      types, wait_running, TIMEOUT)

DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
HEADER_KEYS = {"msg_id", "session", "username", "date", "msg_type", "version"}


def check_header(m, session=None):
    h = m["header"]
    assert set(h) == HEADER_KEYS, h
    assert h["version"] == "5.4"
    # jupyter_client parses the date; read the raw form back from isoformat
    d = h["date"]
    if not isinstance(d, str):
        d = d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert h["date"].utcoffset().total_seconds() == 0, "date is not UTC"
    assert DATE.match(d), d
    if session:
        assert h["session"] == session


def test_kernel_info_and_status(kernel):
    km, kc = kernel
    flush(kc)
    msg_id = kc.kernel_info()
    reply = shell_reply(kc, msg_id)
    c = reply["content"]
    assert c["status"] == "ok"
    assert c["protocol_version"] == "5.4"
    assert c["implementation"] == "lathe"
    assert c["language_info"]["name"] == "lathe"
    assert c["language_info"]["file_extension"].startswith(".")
    assert c["banner"]
    assert c["help_links"] and {"text", "url"} <= set(c["help_links"][0])
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["parent_header"]["msg_type"] == "kernel_info_request"
    check_header(reply)
    io = collect_iopub(kc, msg_id)
    assert types(io) == ["status", "status"]
    assert [m["content"]["execution_state"] for m in io] == ["busy", "idle"]
    for m in io:
        check_header(m, reply["header"]["session"])


def test_iopub_output_waits_for_the_first_subscriber():
    """A client whose iopub SUB joins after its first request still gets that request's
    busy, output and idle (jupyter console sends a cell as soon as kernel_info is answered and
    then waits for its idle status). Deterministic: nothing subscribes until the reply is in."""
    from conftest import KERNEL_NAME, _install_error
    if _install_error:
        pytest.fail(_install_error)
    from jupyter_client.manager import KernelManager
    import tempfile
    km = KernelManager(kernel_name=KERNEL_NAME)
    fd, log = tempfile.mkstemp(prefix="lathe-kernel-", suffix=".log")
    with os.fdopen(fd, "w") as logf:
        km.start_kernel(stderr=logf)
        kc = km.client()
        try:
            kc.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
            msg_id = kc.execute("%echo before-any-subscriber")
            reply = shell_reply(kc, msg_id, timeout=60)
            assert reply["content"]["status"] == "ok"
            kc.iopub_channel.start()  # the first subscription, after the request is done
            msgs = collect_iopub(kc, msg_id, timeout=60)
            states = [m["content"]["execution_state"] for m in msgs if m["msg_type"] == "status"]
            assert states == ["busy", "idle"], types(msgs)
            assert "before-any-subscriber" in stream_text(msgs), types(msgs)
            # and the kernel goes on publishing as usual
            _, later = execute(kc, "%echo after")
            assert "after" in stream_text(later)
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def test_kernel_info_on_control(kernel):
    km, kc = kernel
    msg = kc.session.msg("kernel_info_request", {})
    kc.control_channel.send(msg)
    reply = kc.get_control_msg(timeout=TIMEOUT)
    assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
    assert reply["content"]["implementation"] == "lathe"
    io = collect_iopub(kc, msg["header"]["msg_id"])
    assert [m["content"]["execution_state"] for m in io] == ["busy", "idle"]


@pytest.mark.parametrize("msg_type,content,ename,reply_type", [
    ("execute_request", {"silent": False}, "BadRequest", "execute_reply"),
    ("execute_request", {"code": ["%echo x"]}, "BadRequest", "execute_reply"),
    ("execute_request", {"code": "%echo x", "silent": "no"}, "BadRequest", "execute_reply"),
    ("frobnicate_request", {}, "UnknownMessageType", "frobnicate_reply")])
def test_malformed_request_gets_error_reply(kernel, msg_type, content, ename, reply_type):
    """A correctly signed request that cannot be served is answered (with an error), so the
    client does not wait for its own timeout; busy/idle as for any request; nothing runs."""
    km, kc = kernel
    flush(kc)
    msg = kc.session.msg(msg_type, content)
    kc.shell_channel.send(msg)
    reply = shell_reply(kc, msg["header"]["msg_id"])
    assert reply["msg_type"] == reply_type
    c = reply["content"]
    assert c["status"] == "error" and c["ename"] == ename, c
    assert c["evalue"] and isinstance(c["traceback"], list)
    if reply_type == "execute_reply":
        assert isinstance(c["execution_count"], int)
    check_header(reply)
    io = collect_iopub(kc, msg["header"]["msg_id"])
    assert [(m["msg_type"], m["content"].get("execution_state")) for m in io] == [
        ("status", "busy"), ("status", "idle")]
    r, io = execute(kc, "%echo still-serving")
    assert r["content"]["status"] == "ok" and stream_text(io) == "still-serving\n"


def test_execute_stream_order_and_counter(kernel):
    km, kc = kernel
    flush(kc)
    r1, io1 = execute(kc, "%echo hello")
    assert r1["content"]["status"] == "ok"
    n = r1["content"]["execution_count"]
    assert isinstance(n, int) and n >= 1
    assert types(io1) == ["status", "execute_input", "stream", "status"]
    assert io1[0]["content"]["execution_state"] == "busy"
    assert io1[1]["content"] == {"code": "%echo hello", "execution_count": n}
    assert io1[2]["content"] == {"name": "stdout", "text": "hello\n"}
    assert io1[3]["content"]["execution_state"] == "idle"
    check_header(io1[2], r1["header"]["session"])
    r2, io2 = execute(kc, "%echo stream=stderr oops")
    assert r2["content"]["execution_count"] == n + 1
    assert stream_text(io2, "stderr") == "oops\n"
    assert stream_text(io2, "stdout") == ""


def test_silent_and_store_history(kernel):
    km, kc = kernel
    flush(kc)
    r0, _ = execute(kc, "%echo a")
    n = r0["content"]["execution_count"]
    r1, io1 = execute(kc, "%echo quiet", silent=True)
    assert r1["content"]["status"] == "ok"
    assert r1["content"]["execution_count"] == n
    assert types(io1) == ["status", "status"], "silent: no execute_input, no output"
    r2, io2 = execute(kc, "%echo nohist", store_history=False)
    assert r2["content"]["execution_count"] == n
    assert "execute_input" in types(io2) and stream_text(io2) == "nohist\n"
    r3, _ = execute(kc, "%echo b")
    assert r3["content"]["execution_count"] == n + 1


def test_execute_result(kernel):
    km, kc = kernel
    r, io = execute(kc, "%version")
    assert r["content"]["status"] == "ok"
    res = [m for m in io if m["msg_type"] == "execute_result"]
    assert len(res) == 1
    assert res[0]["content"]["execution_count"] == r["content"]["execution_count"]
    assert "lathe" in res[0]["content"]["data"]["text/plain"]
    assert res[0]["content"]["metadata"] == {}


def test_display_data_html(kernel):
    km, kc = kernel
    r, io = execute(kc, "%help")
    assert r["content"]["status"] == "ok"
    d = [m for m in io if m["msg_type"] == "display_data"]
    assert d and "text/html" in d[0]["content"]["data"] and "text/plain" in d[0]["content"]["data"]
    assert isinstance(d[0]["content"]["metadata"], dict)


def test_error_reply(kernel):
    km, kc = kernel
    r, io = execute(kc, "%nonexistent")
    c = r["content"]
    assert c["status"] == "error"
    assert c["ename"] == "CellError"
    assert "nonexistent" in c["evalue"]
    assert isinstance(c["traceback"], list) and all(isinstance(t, str) for t in c["traceback"])
    assert isinstance(c["execution_count"], int)
    errs = [m for m in io if m["msg_type"] == "error"]
    assert len(errs) == 1
    assert errs[0]["content"]["ename"] == "CellError"
    assert types(io) == ["status", "execute_input", "error", "status"]


def test_progress_display_updates(kernel):
    km, kc = kernel
    r, io = execute(kc, "%sleep 1")
    assert r["content"]["status"] == "ok"
    disp = [m for m in io if m["msg_type"] == "display_data"]
    upd = [m for m in io if m["msg_type"] == "update_display_data"]
    assert disp, "progress bar display_data"
    did = disp[0]["content"]["transient"]["display_id"]
    assert did
    assert upd, "progress bar updates"
    for m in upd:
        assert m["content"]["transient"]["display_id"] == did
        assert {"data", "metadata", "transient"} <= set(m["content"])
    # throttled to <= 10 updates/s per display (plus the final one)
    assert len(upd) <= 15, len(upd)


def test_stop_on_error_aborts_queue(kernel):
    km, kc = kernel
    flush(kc)
    first = kc.execute("%sleep 5")
    queued = [kc.execute("%%echo queued-%d" % i) for i in range(2)]
    wait_running(kc, first)
    km.interrupt_kernel()
    r = shell_reply(kc, first)
    assert r["content"]["status"] == "error"
    assert r["content"]["ename"] == "KeyboardInterrupt"
    for q in queued:
        rq = shell_reply(kc, q)
        assert rq["content"]["status"] == "error", rq["content"]
        io = collect_iopub(kc, q)
        assert "execute_input" not in types(io), "an aborted request is not run"
        assert stream_text(io) == ""
    # stop_on_error=False: the queued cells run
    flush(kc)
    first = kc.execute("%nonexistent", stop_on_error=False)
    after = kc.execute("%echo still-runs")
    assert shell_reply(kc, first)["content"]["status"] == "error"
    ra = shell_reply(kc, after)
    assert ra["content"]["status"] == "ok"


def test_interrupt_message(kernel):
    km, kc = kernel
    flush(kc)
    msg_id = kc.execute("%sleep 30")
    seen = wait_running(kc, msg_id)
    t0 = time.time()
    km.interrupt_kernel()  # interrupt_mode "message": interrupt_request on control
    r = shell_reply(kc, msg_id, timeout=10)
    elapsed = time.time() - t0
    assert r["content"]["status"] == "error"
    assert r["content"]["ename"] == "KeyboardInterrupt"
    assert elapsed < 3, "interrupt took %.1f s (the cell sleeps 30 s)" % elapsed
    io = seen + collect_iopub(kc, msg_id)
    assert [m for m in io if m["msg_type"] == "error"]
    # kernel still serves
    r2, _ = execute(kc, "%echo alive")
    assert r2["content"]["status"] == "ok"


def test_interrupt_reply_on_control(kernel):
    km, kc = kernel
    msg = kc.session.msg("interrupt_request", {})
    kc.control_channel.send(msg)
    reply = kc.get_control_msg(timeout=TIMEOUT)
    assert reply["msg_type"] == "interrupt_reply"
    assert reply["content"]["status"] == "ok"
    # an interrupt while idle does not spoil the next cell
    r, io = execute(kc, "%echo after-interrupt")
    assert r["content"]["status"] == "ok" and stream_text(io) == "after-interrupt\n"


def test_sigint_interrupts_but_never_kills(kernel):
    km, kc = kernel
    flush(kc)
    msg_id = kc.execute("%sleep 30")
    wait_running(kc, msg_id)
    os.kill(km.provisioner.process.pid, signal.SIGINT)
    r = shell_reply(kc, msg_id, timeout=10)
    assert r["content"]["ename"] == "KeyboardInterrupt"
    os.kill(km.provisioner.process.pid, signal.SIGINT)  # while idle
    time.sleep(0.2)
    assert km.is_alive()
    r2, io = execute(kc, "%echo survived")
    assert stream_text(io) == "survived\n"


def test_control_served_while_cell_runs(kernel):
    km, kc = kernel
    flush(kc)
    msg_id = kc.execute("%sleep 8")
    wait_running(kc, msg_id)
    for req, content in (("kernel_info_request", {}),
                         ("complete_request", {"code": "%he", "cursor_pos": 3}),
                         ("is_complete_request", {"code": "%echo"}),
                         ("comm_info_request", {})):
        t0 = time.time()
        msg = kc.session.msg(req, content)
        kc.control_channel.send(msg)
        reply = kc.get_control_msg(timeout=5)
        assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
        assert reply["content"]["status"] in ("ok", "unknown", "complete"), reply["content"]
        assert time.time() - t0 < 3, "%s waited for the cell" % req
    km.interrupt_kernel()
    shell_reply(kc, msg_id)


def test_is_complete(kernel):
    km, kc = kernel
    flush(kc)
    for code in ("%echo hi", "%help"):
        mid = kc.is_complete(code)
        assert shell_reply(kc, mid)["content"]["status"] == "complete", code
    mid = kc.is_complete("%%chat")
    c = shell_reply(kc, mid)["content"]
    if c["status"] == "incomplete":
        assert "indent" in c
    mid = kc.is_complete('%echo "unclosed')
    c = shell_reply(kc, mid)["content"]
    assert c["status"] in ("incomplete", "invalid")
    if c["status"] == "incomplete":
        assert isinstance(c["indent"], str)
    io = collect_iopub(kc, mid)
    assert [m["content"]["execution_state"] for m in io] == ["busy", "idle"]


def test_complete_code_points(kernel):
    km, kc = kernel
    flush(kc)
    mid = kc.complete("%he", 3)
    c = shell_reply(kc, mid)["content"]
    assert c["status"] == "ok"
    assert "%help" in c["matches"]
    assert (c["cursor_start"], c["cursor_end"]) == (0, 3)
    assert c["metadata"] == {}
    code = "%echo h\u00e9\u00e9 \U0001F600\n%sl"
    mid = kc.complete(code, len(code))  # len() counts code points
    c = shell_reply(kc, mid)["content"]
    assert "%sleep" in c["matches"], c
    assert c["cursor_end"] == len(code)
    assert c["cursor_start"] == len(code) - 3, "cursor positions must be code points"
    mid = kc.complete("%he", 999)  # out-of-range cursor is clamped
    c = shell_reply(kc, mid)["content"]
    assert c["status"] == "ok" and c["cursor_end"] <= 3


def test_inspect(kernel):
    km, kc = kernel
    flush(kc)
    mid = kc.inspect("%sleep", 3)
    c = shell_reply(kc, mid)["content"]
    assert c["status"] == "ok" and c["found"] is True
    assert "text/plain" in c["data"]
    assert "SECONDS" in c["data"]["text/plain"]
    mid = kc.inspect("   ", 1)
    c = shell_reply(kc, mid)["content"]
    assert c == {"status": "ok", "found": False, "data": {}, "metadata": {}}


def test_history(kernel):
    km, kc = kernel
    flush(kc)
    codes = ["%echo hist-one", "%version", "%echo hist-two"]
    counts = [execute(kc, code)[0]["content"]["execution_count"] for code in codes]
    mid = kc.history(hist_access_type="tail", n=3, output=False, raw=True)
    h = shell_reply(kc, mid)["content"]["history"]
    assert [e[2] for e in h] == codes
    assert [e[1] for e in h] == counts
    session = h[0][0]
    mid = kc.history(hist_access_type="tail", n=3, output=True, raw=True)
    h = shell_reply(kc, mid)["content"]["history"]
    assert h[1][2][0] == "%version" and "lathe" in h[1][2][1]
    mid = kc.history(hist_access_type="range", session=session, start=counts[1],
                     stop=counts[1] + 1, output=False, raw=True)
    h = shell_reply(kc, mid)["content"]["history"]
    assert h == [[session, counts[1], "%version"]]
    mid = kc.history(hist_access_type="search", pattern="%echo hist-*", output=False,
                     raw=True)
    h = shell_reply(kc, mid)["content"]["history"]
    assert [e[2] for e in h][-2:] == ["%echo hist-one", "%echo hist-two"]
    mid = kc.history(hist_access_type="search", pattern="%echo hist-*", n=1, output=False,
                     raw=True)
    assert [e[2] for e in shell_reply(kc, mid)["content"]["history"]] == ["%echo hist-two"]
    execute(kc, "%echo hist-two")
    mid = kc.history(hist_access_type="search", pattern="%echo hist-t*", unique=True,
                     output=False, raw=True)
    assert len(shell_reply(kc, mid)["content"]["history"]) == 1
    # silent cells are not kept
    execute(kc, "%echo hist-silent", silent=True)
    mid = kc.history(hist_access_type="search", pattern="*hist-silent*", output=False,
                     raw=True)
    assert shell_reply(kc, mid)["content"]["history"] == []


def test_comms(kernel):
    km, kc = kernel
    flush(kc)
    msg = kc.session.msg("comm_info_request", {})
    kc.shell_channel.send(msg)
    r = shell_reply(kc, msg["header"]["msg_id"])
    assert r["content"] == {"status": "ok", "comms": {}}
    msg = kc.session.msg("comm_open", {"comm_id": "c-123", "target_name": "jupyter.widget",
                                       "data": {}})
    kc.shell_channel.send(msg)
    io = collect_iopub(kc, msg["header"]["msg_id"])
    assert types(io) == ["status", "comm_close", "status"]
    assert io[1]["content"]["comm_id"] == "c-123"
    for t in ("comm_msg", "comm_close"):
        msg = kc.session.msg(t, {"comm_id": "c-123", "data": {}})
        kc.shell_channel.send(msg)
        io = collect_iopub(kc, msg["header"]["msg_id"])
        assert types(io) == ["status", "status"]
    with pytest.raises(Exception):
        kc.get_shell_msg(timeout=0.5)  # no replies to comm_* messages


def test_unknown_msg_type_is_answered_and_logged(kernel):
    km, kc = kernel
    flush(kc)
    msg = kc.session.msg("frobnicate_request", {})
    kc.shell_channel.send(msg)
    reply = shell_reply(kc, msg["header"]["msg_id"])
    assert reply["content"]["status"] == "error"
    io = collect_iopub(kc, msg["header"]["msg_id"])
    assert [m["content"]["execution_state"] for m in io] == ["busy", "idle"]
    assert "unknown msg_type 'frobnicate_request': error reply" in kernel_log(km)


def test_stdin_input_request(kernel):
    km, kc = kernel
    flush(kc)
    msg_id = kc.execute("%input \"Your name?\"", allow_stdin=True)
    req = kc.get_stdin_msg(timeout=TIMEOUT)
    assert req["msg_type"] == "input_request"
    assert req["content"]["prompt"] == "Your name?"
    assert req["content"]["password"] is False
    assert req["parent_header"]["msg_id"] == msg_id
    kc.input("Ad\u00e1 L.")
    r = shell_reply(kc, msg_id)
    assert r["content"]["status"] == "ok"
    io = collect_iopub(kc, msg_id)
    assert "Ad\u00e1 L." in stream_text(io)


def test_stdin_not_allowed(kernel):
    km, kc = kernel
    flush(kc)
    r, io = execute(kc, "%input x", allow_stdin=False)
    assert r["content"]["status"] == "error"
    assert r["content"]["ename"] == "StdinNotImplementedError"


def test_stdin_interrupt_unblocks(kernel):
    km, kc = kernel
    flush(kc)
    msg_id = kc.execute("%input waiting", allow_stdin=True)
    kc.get_stdin_msg(timeout=TIMEOUT)
    t0 = time.time()
    km.interrupt_kernel()
    r = shell_reply(kc, msg_id, timeout=10)
    assert r["content"]["ename"] == "KeyboardInterrupt"
    assert time.time() - t0 < 3
    r2, io = execute(kc, "%echo ok-after-input")
    assert stream_text(io) == "ok-after-input\n"


def test_heartbeat(kernel):
    km, kc = kernel
    assert kc.is_alive()
    deadline = time.time() + 10
    while not kc.hb_channel.is_beating() and time.time() < deadline:
        time.sleep(0.2)
    assert kc.hb_channel.is_beating()


def test_restart_new_session(fresh_kernel):
    km, kc = fresh_kernel()
    mid = kc.kernel_info()
    s1 = shell_reply(kc, mid)["header"]["session"]
    pid1 = km.provisioner.process.pid
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=30)
    mid = kc.kernel_info()
    s2 = shell_reply(kc, mid)["header"]["session"]
    assert km.provisioner.process.pid != pid1
    assert s1 != s2, "a new process must have a new session id"
    r, io = execute(kc, "%echo after-restart")
    assert stream_text(io) == "after-restart\n"
    assert r["content"]["execution_count"] == 1, "counter starts over in the new process"


@pytest.mark.parametrize("restart", [False, True])
def test_shutdown_on_control(fresh_kernel, restart):
    km, kc = fresh_kernel()
    proc = km.provisioner.process
    msg = kc.session.msg("shutdown_request", {"restart": restart})
    kc.control_channel.send(msg)
    reply = kc.get_control_msg(timeout=TIMEOUT)
    assert reply["msg_type"] == "shutdown_reply"
    assert reply["content"] == {"status": "ok", "restart": restart}
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 5:
        time.sleep(0.05)
    assert proc.poll() == 0, "kernel must exit promptly with status 0"
    assert time.time() - t0 < 4, "exit took %.1f s" % (time.time() - t0)


def test_shutdown_on_shell_while_idle(fresh_kernel):
    km, kc = fresh_kernel()
    proc = km.provisioner.process
    msg = kc.session.msg("shutdown_request", {"restart": False})
    kc.shell_channel.send(msg)
    reply = shell_reply(kc, msg["header"]["msg_id"])
    assert reply["content"]["status"] == "ok"
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 5:
        time.sleep(0.05)
    assert proc.poll() == 0


def test_shutdown_during_running_cell(fresh_kernel):
    km, kc = fresh_kernel()
    proc = km.provisioner.process
    wait_running(kc, kc.execute("%sleep 30"))
    t0 = time.time()
    km.shutdown_kernel(now=False)  # interrupt, shutdown_request, wait
    assert proc.poll() is not None
    assert time.time() - t0 < 4, "shutdown took %.1f s" % (time.time() - t0)
    assert "kernel stopped" in kernel_log(km)


def test_ipc_transport(fresh_kernel):
    km, kc = fresh_kernel(transport="ipc")
    r, io = execute(kc, "%echo over-ipc")
    assert r["content"]["status"] == "ok" and stream_text(io) == "over-ipc\n"


def test_stream_coalescing_keeps_text_and_order(kernel):
    km, kc = kernel
    flush(kc)
    n = 500
    code = "\n".join("%%echo line-%d" % i for i in range(n))
    r, io = execute(kc, code)
    assert r["content"]["status"] == "ok"
    assert stream_text(io) == "".join("line-%d\n" % i for i in range(n))
    streams = [m for m in io if m["msg_type"] == "stream"]
    assert len(streams) < n / 5, "%d stream messages for %d quick lines" % (len(streams), n)
    # stdout/stderr alternation: each message holds one name, the order is kept
    code = "\n".join("%%echo stream=%s s-%d" % ("stderr" if i % 2 else "stdout", i)
                     for i in range(20))
    r, io = execute(kc, code)
    got = [(m["content"]["name"], m["content"]["text"]) for m in io if m["msg_type"] == "stream"]
    assert "".join(t for _, t in got) == "".join("s-%d\n" % i for i in range(20))
    for name, text in got:
        assert text == "s-%d\n" % int(text[2:-1]), "one line per message here"
        assert name == ("stderr" if int(text[2:-1]) % 2 else "stdout")


# ---- what the process writes to fds 1 and 2 ----------------------------------------------

def pieces(msgs):
    """The cell's stream output as (name, text) runs, consecutive runs of a name merged."""
    out = []
    for m in msgs:
        if m["msg_type"] != "stream":
            continue
        name, text = m["content"]["name"], m["content"]["text"]
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + text)
        else:
            out.append((name, text))
    return out


def test_fd_output_reaches_the_cell_in_order(kernel):
    """Bytes written to fds 1/2 (as the engine's libraries do: %echo fd=true) are the cell's
    stdout/stderr, in order with what the cell shows itself."""
    km, kc = kernel
    flush(kc)
    r, io = execute(kc, "%echo own-1\n%echo lib-1 fd=true\n%echo own-2\n"
                        "%echo lib-2 stream=stderr fd=true\n%echo own-3\n"
                        "%echo lib-3 fd=true")
    assert r["content"]["status"] == "ok"
    assert pieces(io) == [("stdout", "own-1\nlib-1\nown-2\n"), ("stderr", "lib-2\n"),
                          ("stdout", "own-3\nlib-3\n")]
    assert "lib-1" not in kernel_log(km), "it went to the cell, not to the log"


def test_fd_output_of_a_child_is_complete_at_the_cell_end(kernel):
    """A child writing to the kernel's own fd 1 (its /proc/PPID/fd/1) more than a pipe holds,
    right up to the end of the cell, and a UTF-8 character cut across two writes on fd 2:
    every byte is in the cell before its idle."""
    km, kc = kernel
    flush(kc)
    code = ("%%shell\n"
            "head -c 300000 /dev/zero | tr '\\0' x > /proc/$PPID/fd/1\n"
            "printf '\\303' > /proc/$PPID/fd/2; printf '\\251\\n' > /proc/$PPID/fd/2\n"
            "printf 'tail' > /proc/$PPID/fd/1\n")
    r, io = execute(kc, code, timeout=60)
    assert r["content"]["status"] == "ok"
    assert stream_text(io) == "x" * 300000 + "tail"
    assert stream_text(io, "stderr") == "\u00e9\n"


def test_kernel_log_stays_out_of_the_cell(kernel):
    """What the kernel logs while a cell runs goes to its log, not into the cell: the cell
    waits for input (so it surely runs) while control gets a request that is logged."""
    km, kc = kernel
    flush(kc)
    msg_id = kc.execute("%echo before\n%input x\n%echo after", allow_stdin=True)
    assert kc.get_stdin_msg(timeout=TIMEOUT)["msg_type"] == "input_request"
    msg = kc.session.msg("logged_while_running_request", {})
    kc.control_channel.send(msg)
    reply = kc.get_control_msg(timeout=TIMEOUT)
    assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
    kc.input("typed")
    assert shell_reply(kc, msg_id)["content"]["status"] == "ok"
    io = collect_iopub(kc, msg_id)
    assert pieces(io) == [("stdout", "before\ntyped\nafter\n")]
    assert "logged_while_running_request" in kernel_log(km)


def test_fd_output_between_cells_goes_to_the_log(fresh_kernel, tmp_path):
    """A child left running writes to fd 2 once the cell is over (the test says when, by
    creating a file after the cell's idle): that goes to the kernel's log."""
    km, kc = fresh_kernel()
    mark = tmp_path / "cell-is-over"
    r, io = execute(kc, "%%%%shell\n(while [ ! -e %s ]; do sleep 0.01; done;"
                        " echo between-cells > /proc/$PPID/fd/2) >/dev/null 2>&1 &" % mark)
    assert r["content"]["status"] == "ok"
    assert "between-cells" not in stream_text(io, "stderr")
    mark.write_text("")
    deadline = time.time() + TIMEOUT
    while "between-cells" not in kernel_log(km) and time.time() < deadline:
        time.sleep(0.05)
    assert "between-cells" in kernel_log(km)
