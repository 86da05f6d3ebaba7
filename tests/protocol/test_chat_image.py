"""test_chat_image -- %%chat image=FILE through jupyter_client against `lathe kernel`, on the
committed tf5 fixture (a tiny multimodal Gemma 3): the reply streams into the cell; a relative
path is read from the kernel's working directory; a missing image gives an error reply naming
the file, and the next cells (a text turn, another image turn) still work; %%chat reset
forgets the images; a text-only model refuses an image and keeps chatting."""
import os

from conftest import execute, stream_text

SRCDIR = os.environ.get("LATHE_SRCDIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
TF5 = os.path.join(SRCDIR, "tests", "fixtures", "tf5")
RGB = os.path.join(SRCDIR, "tests", "vision", "data", "rgb.png")
GREY = os.path.join(SRCDIR, "tests", "vision", "data", "grey.png")
TIMEOUT = 120


def run(kc, code):
    r, io = execute(kc, code, timeout=TIMEOUT)
    return r["content"], io


def streamed(io):
    return [m for m in io if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"]


def test_chat_with_images(kernel):
    km, kc = kernel
    c, io = run(kc, "%%load %s device=cpu" % TF5)
    assert c["status"] == "ok", c
    assert any("chat image=FILE" in str(m["content"].get("data", {})) for m in io), \
        "the load summary says images work"

    c, io = run(kc, "%%%%chat image=%s temperature=0 max_new=6\nWhat is in the picture?" % RGB)
    assert c["status"] == "ok", c
    assert streamed(io) and stream_text(io).strip(), "the reply streams into the cell"

    c, io = run(kc, "%%chat image=no-such-picture.png\nAnd this one?")
    assert c["status"] == "error"
    assert c["ename"] == "EngineError"
    assert "no-such-picture.png" in c["evalue"] and "cannot open" in c["evalue"], c["evalue"]

    c, io = run(kc, "%%chat temperature=0 max_new=6\nTell me more.")
    assert c["status"] == "ok", c
    assert stream_text(io).strip(), "a text turn after the refused one"

    rel = os.path.relpath(GREY, os.getcwd())  # the kernel runs in the test's directory
    c, io = run(kc, "%%%%chat image=%s,%s temperature=0 max_new=6\nCompare them." % (rel, RGB))
    assert c["status"] == "ok", c
    assert stream_text(io).strip()

    c, io = run(kc, "%%chat reset")
    assert c["status"] == "ok" and "conversation reset" in stream_text(io)

    c, io = run(kc, "%%chat image=\nx")
    assert c["status"] == "error" and "image=" in c["evalue"]


def test_text_only_model_refuses_an_image(kernel):
    km, kc = kernel
    c, io = run(kc, "%load tiny")
    assert c["status"] == "ok", c
    c, io = run(kc, "%%%%chat image=%s\nWhat is it?" % RGB)
    assert c["status"] == "error" and "image tower" in c["evalue"], c
    c, io = run(kc, "%%chat temperature=0 max_new=4\nHello")
    assert c["status"] == "ok" and stream_text(io).strip(), (c, io)
