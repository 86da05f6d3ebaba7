"""test_raw — bad input on raw ZeroMQ sockets; after each, the kernel still answers.

Every case sends hand-made frames (signed with the kernel's key by Python's hmac) from our
own DEALER socket, checks that nothing comes back (bad signature or framing) or the right
thing (an error reply to a correctly signed but malformed or unknown request), that the kernel
logged it to stderr with a "lathe:" prefix, and that a kernel_info_request is still answered.
"""
import json
import time

import pytest

from conftest import DELIM, kernel_log

QUIET = 0.4  # seconds we wait to be sure no reply comes


@pytest.fixture
def shell(raw):
    return raw.socket(raw.zmq.DEALER, "shell")


@pytest.fixture
def iopub(raw):
    """A SUB socket known to be subscribed: kernel_info requests until one's status arrives
    (jupyter_client's wait_for_ready handshake), so no message is lost to a slow join."""
    sub = raw.socket(raw.zmq.SUB, "iopub")
    probe = raw.socket(raw.zmq.DEALER, "shell")
    deadline = time.time() + 60
    while time.time() < deadline:
        frames, header = raw.frames("kernel_info_request")
        probe.send_multipart(frames)
        got = raw.recv(sub, timeout=0.5)
        if got and got[2].get("msg_id") == header["msg_id"]:
            while raw.recv(sub, timeout=0.2) is not None:  # this probe's idle, and others'
                pass
            return sub
    raise AssertionError("iopub never delivered a status")


def kernel_info_works(raw, sock):
    frames, header = raw.frames("kernel_info_request")
    sock.send_multipart(frames)
    deadline = time.time() + 10
    while time.time() < deadline:
        got = raw.recv(sock, timeout=deadline - time.time())
        assert got is not None, "no kernel_info_reply"
        idents, h, parent, content = got
        if parent.get("msg_id") == header["msg_id"]:
            assert h["msg_type"] == "kernel_info_reply"
            assert content["implementation"] == "lathe"
            return True
    return False


def no_reply(raw, sock):
    return raw.recv(sock, timeout=QUIET) is None


def test_golden_signed_request(raw, shell):
    assert kernel_info_works(raw, shell)


def test_wrong_signature(kernel, raw, shell):
    frames, _ = raw.frames("kernel_info_request", sig=b"0" * 64)
    shell.send_multipart(frames)
    assert no_reply(raw, shell)
    assert "invalid signature" in kernel_log(kernel[0])
    assert kernel_info_works(raw, shell)


def test_missing_signature(kernel, raw, shell):
    frames, _ = raw.frames("kernel_info_request", sig=b"")
    shell.send_multipart(frames)
    assert no_reply(raw, shell)
    assert "missing signature" in kernel_log(kernel[0])
    assert kernel_info_works(raw, shell)


def test_signature_over_other_bytes(raw, shell):
    frames, header = raw.frames("kernel_info_request")
    # same JSON value, different bytes: the HMAC covers bytes, not values
    i = frames.index(DELIM)
    frames[i + 2] = json.dumps(header, indent=1).encode()
    shell.send_multipart(frames)
    assert no_reply(raw, shell)
    assert kernel_info_works(raw, shell)


@pytest.mark.parametrize("keep", [0, 1, 2, 3, 4])
def test_missing_frames(kernel, raw, shell, keep):
    frames, _ = raw.frames("kernel_info_request")
    i = frames.index(DELIM)
    shell.send_multipart(frames[:i + 1 + keep])  # delimiter + `keep` of the 5 frames
    assert no_reply(raw, shell)
    assert kernel_info_works(raw, shell)


def test_no_delimiter(kernel, raw, shell):
    frames, _ = raw.frames("kernel_info_request")
    shell.send_multipart([f for f in frames if f != DELIM])
    assert no_reply(raw, shell)
    assert "delimiter" in kernel_log(kernel[0])
    assert kernel_info_works(raw, shell)


def test_extra_frames_are_buffers(raw, shell):
    frames, header = raw.frames("kernel_info_request", buffers=[b"\x00\x01binary", b""])
    shell.send_multipart(frames)
    idents, h, parent, content = raw.recv(shell)
    assert parent["msg_id"] == header["msg_id"]


def statuses(raw, iopub, msg_id):
    """busy/idle states published with parent msg_id, up to idle."""
    states = []
    deadline = time.time() + 10
    while "idle" not in states and time.time() < deadline:
        got = raw.recv(iopub, timeout=1)
        if got and got[2].get("msg_id") == msg_id and got[1]["msg_type"] == "status":
            states.append(got[3]["execution_state"])
    return states


def error_reply(raw, sock):
    got = raw.recv(sock)
    assert got is not None, "no error reply: the client would wait for its own timeout"
    idents, h, parent, content = got
    assert content["status"] == "error", content
    assert isinstance(content["ename"], str) and content["ename"]
    assert isinstance(content["evalue"], str) and content["evalue"]
    assert isinstance(content["traceback"], list)
    return h, parent, content


@pytest.mark.parametrize("part", [1, 2, 3])
@pytest.mark.parametrize("bad", [b"{\"a\":", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_json(kernel, raw, shell, part, bad):
    header = raw.header("kernel_info_request")
    parts = [json.dumps(header).encode(), b"{}", b"{}", b"{}"]
    parts[part] = bad
    frames, _ = raw.frames("kernel_info_request", raw_parts=parts)
    shell.send_multipart(frames)
    h, parent, c = error_reply(raw, shell)
    name = ["header", "parent_header", "metadata", "content"][part]
    assert h["msg_type"] == "kernel_info_reply" and parent == header
    assert c["ename"] == "BadRequest" and name in c["evalue"], c
    assert "malformed kernel_info_request" in kernel_log(kernel[0])
    assert kernel_info_works(raw, shell)


@pytest.mark.parametrize("bad", [b"{\"a\":", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_header(kernel, raw, shell, bad):
    frames, _ = raw.frames("kernel_info_request", raw_parts=[bad, b"{}", b"{}", b"{}"])
    shell.send_multipart(frames)
    h, parent, c = error_reply(raw, shell)
    # nothing names the request: the reply says so in its own type
    assert h["msg_type"] == "error_reply" and parent == {}
    assert c["ename"] == "BadRequest" and "header" in c["evalue"]
    assert kernel_info_works(raw, shell)


def test_header_cut_short_still_names_its_request(kernel, raw, shell, iopub):
    header = raw.header("execute_request")
    text = json.dumps(header).encode()[:-1]  # no closing brace
    frames, _ = raw.frames("execute_request",
                           raw_parts=[text, b"{}", b"{}", b'{"code": "%echo x"}'])
    shell.send_multipart(frames)
    h, parent, c = error_reply(raw, shell)
    assert h["msg_type"] == "execute_reply"
    assert parent["msg_id"] == header["msg_id"] and parent["session"] == header["session"]
    assert c["ename"] == "BadRequest" and "header is not valid JSON" in c["evalue"]
    assert isinstance(c["execution_count"], int)
    assert statuses(raw, iopub, header["msg_id"]) == ["busy", "idle"]
    assert kernel_info_works(raw, shell)


def test_header_without_msg_type(raw, shell):
    h = raw.header("kernel_info_request")
    del h["msg_type"]
    frames, _ = raw.frames("kernel_info_request", header=h)
    shell.send_multipart(frames)
    rh, parent, c = error_reply(raw, shell)
    assert rh["msg_type"] == "error_reply" and parent == h
    assert "msg_type" in c["evalue"]
    assert kernel_info_works(raw, shell)


def test_unknown_msg_type(kernel, raw, shell, iopub):
    frames, header = raw.frames("no_such_request")
    shell.send_multipart(frames)
    h, parent, c = error_reply(raw, shell)
    assert h["msg_type"] == "no_such_reply" and parent["msg_id"] == header["msg_id"]
    assert c["ename"] == "UnknownMessageType" and "no_such_request" in c["evalue"]
    assert statuses(raw, iopub, header["msg_id"]) == ["busy", "idle"]
    assert "no_such_request" in kernel_log(kernel[0])
    assert kernel_info_works(raw, shell)


def test_unknown_reply_type_gets_no_reply(kernel, raw, shell, iopub):
    frames, header = raw.frames("stray_reply")
    shell.send_multipart(frames)
    assert statuses(raw, iopub, header["msg_id"]) == ["busy", "idle"]
    assert no_reply(raw, shell)
    assert kernel_info_works(raw, shell)


def test_identities_round_trip(raw):
    sock = raw.socket(raw.zmq.DEALER, "shell", identity=b"\x00\xffbinary-id")
    frames, header = raw.frames("kernel_info_request", idents=[b"hop-2", b"hop-3"])
    sock.send_multipart(frames)
    idents, h, parent, content = raw.recv(sock)
    assert idents == [b"hop-2", b"hop-3"], "every routing frame comes back, in order"
    assert parent["msg_id"] == header["msg_id"]


def test_parent_header_verbatim(raw, shell):
    header = raw.header("kernel_info_request", subshell_id=None, x_custom={"k": [1, 2]})
    frames, _ = raw.frames("kernel_info_request", header=header)
    shell.send_multipart(frames)
    idents, h, parent, content = raw.recv(shell)
    assert parent == header


def test_invalid_utf8_in_code(raw, shell, iopub):
    header = raw.header("execute_request")
    content = b'{"code": "%echo a\xffb \\ud800 c", "silent": false}'
    frames, _ = raw.frames("execute_request", raw_parts=[json.dumps(header).encode(), b"{}",
                                                         b"{}", content])
    shell.send_multipart(frames)
    got = raw.recv(shell)
    assert got is not None, "a cell with invalid UTF-8 is repaired and run"
    assert got[3]["status"] == "ok"
    text = ""
    deadline = time.time() + 5
    while time.time() < deadline:
        m = raw.recv(iopub, timeout=1)
        if m and m[2].get("msg_id") == header["msg_id"]:
            if m[1]["msg_type"] == "stream":
                text += m[3]["text"]
            if m[1]["msg_type"] == "status" and m[3]["execution_state"] == "idle":
                break
    assert text == "a\ufffdb \ufffd c\n"


def test_invalid_utf8_in_header(raw, shell):
    header = json.dumps(raw.header("kernel_info_request")).encode()
    header = header.replace(b'"username": "test"', b'"username": "t\xc0st"')
    frames, _ = raw.frames("kernel_info_request", raw_parts=[header, b"{}", b"{}", b"{}"])
    shell.send_multipart(frames)
    got = raw.recv(shell)
    assert got is not None
    assert got[2]["username"] == "t\ufffdst"


def test_ten_megabyte_cell(raw, shell):
    code = "%echo big\n# " + "x" * (10 * 1024 * 1024)
    frames, header = raw.frames("execute_request", {"code": code, "silent": False,
                                                    "store_history": True})
    shell.send_multipart(frames)
    got = raw.recv(shell, timeout=60)
    assert got is not None, "no reply to a 10 MB cell"
    assert got[2]["msg_id"] == header["msg_id"]
    assert got[3]["status"] in ("ok", "error")
    assert kernel_info_works(raw, shell)


def test_flood_of_requests(raw, shell):
    n = 10000
    ids = set()
    got = 0
    for _ in range(n):
        frames, header = raw.frames("kernel_info_request")
        ids.add(header["msg_id"])
        shell.send_multipart(frames)
        while shell.poll(0):
            shell.recv_multipart()
            got += 1
    deadline = time.time() + 120
    while got < n and time.time() < deadline:
        if shell.poll(1000):
            frames = shell.recv_multipart()
            got += 1
    assert got == n, "%d of %d replies" % (got, n)
    assert kernel_info_works(raw, shell)


def test_flood_of_bad_messages(kernel, raw, shell):
    for i in range(10000):
        frames, _ = raw.frames("kernel_info_request", sig=b"%064d" % i)
        shell.send_multipart(frames)
    assert kernel_info_works(raw, shell)


def test_heartbeat_echo(raw):
    hb = raw.socket(raw.zmq.REQ, "hb")
    for payload in (b"ping", b"\x00\xff" * 100):
        hb.send(payload)
        assert hb.poll(5000), "no heartbeat echo"
        assert hb.recv() == payload


def test_stdin_stray_reply_ignored(kernel, raw, shell):
    stdin = raw.socket(raw.zmq.DEALER, "stdin")
    frames, _ = raw.frames("input_reply", {"value": "nobody asked"})
    stdin.send_multipart(frames)
    time.sleep(0.3)
    assert kernel_info_works(raw, shell)


def test_control_bad_input(kernel, raw):
    control = raw.socket(raw.zmq.DEALER, "control")
    frames, _ = raw.frames("kernel_info_request", sig=b"f" * 64)
    control.send_multipart(frames)
    assert no_reply(raw, control)
    header = raw.header("kernel_info_request")
    frames, _ = raw.frames("kernel_info_request",
                           raw_parts=[json.dumps(header).encode(), b"{}", b"{}", b"{"])
    control.send_multipart(frames)
    h, parent, c = error_reply(raw, control)  # signed but malformed: answered on control too
    assert parent["msg_id"] == header["msg_id"] and c["ename"] == "BadRequest"
    assert kernel_info_works(raw, control)


@pytest.mark.parametrize("content,field", [
    ({"code": 5}, "code"), ({}, "code"), ({"code": None, "silent": "yes"}, "code"),
    ({"code": "%echo x", "silent": "yes"}, "silent"),
    ({"code": "%echo x", "store_history": 1}, "store_history"),
    ({"code": "%echo x", "stop_on_error": "false"}, "stop_on_error"),
    ({"code": "%echo x", "allow_stdin": []}, "allow_stdin"),
    ({"code": "%echo x", "user_expressions": [1]}, "user_expressions")])
def test_execute_with_malformed_content(raw, shell, iopub, content, field):
    frames, header = raw.frames("execute_request", content)
    shell.send_multipart(frames)
    h, parent, c = error_reply(raw, shell)
    assert h["msg_type"] == "execute_reply" and parent["msg_id"] == header["msg_id"]
    assert c["ename"] == "BadRequest" and "'%s'" % field in c["evalue"], c
    assert isinstance(c["execution_count"], int)
    io = []
    deadline = time.time() + 10
    while time.time() < deadline and not (io and io[-1] == ("status", "idle")):
        got = raw.recv(iopub, timeout=1)
        if got and got[2].get("msg_id") == header["msg_id"]:
            io.append((got[1]["msg_type"], got[3].get("execution_state")))
    assert io == [("status", "busy"), ("status", "idle")], "not run: no execute_input"
    assert kernel_info_works(raw, shell)


@pytest.mark.parametrize("content", [{}, {"code": "%he"}, {"code": "%he", "cursor_pos": "x"},
                                     {"code": "%he", "cursor_pos": -5}, {"code": 7}])
def test_complete_with_odd_fields(raw, shell, content):
    frames, header = raw.frames("complete_request", content)
    shell.send_multipart(frames)
    idents, h, parent, c = raw.recv(shell)
    assert c["status"] == "ok"
    code = content.get("code")
    assert 0 <= c["cursor_start"] <= c["cursor_end"] <= len(code if isinstance(code, str) else "")


def test_execute_on_control_is_refused(raw):
    control = raw.socket(raw.zmq.DEALER, "control")
    frames, header = raw.frames("execute_request", {"code": "%echo x"})
    control.send_multipart(frames)
    idents, h, parent, c = raw.recv(control)
    assert c["status"] == "error" and c["ename"] == "ChannelError"
