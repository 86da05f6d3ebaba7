"""enginetool.py — runs tests/engine/engine_tool (the C door into the engine) for the pytest
files in this folder. Finds the tool under $LATHE_BUILDDIR (set by `make check`)."""
import os
import subprocess

SRCDIR = os.environ.get("LATHE_SRCDIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILDDIR = os.environ.get("LATHE_BUILDDIR") or SRCDIR
TOOL = os.path.join(BUILDDIR, "tests", "engine", "engine_tool")
TINY_TOKENIZER = os.path.join(SRCDIR, "models", "tiny", "tokenizer.model")
FIXTURES = os.path.join(SRCDIR, "tests", "fixtures")


def run(*args, stdin=b"", check=True):
    p = subprocess.run([TOOL, *map(str, args)], input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check and p.returncode != 0:
        raise AssertionError(f"engine_tool {' '.join(map(str, args))} failed ({p.returncode}): "
                             f"{p.stderr.decode(errors='replace')}")
    return p


def ids_of(out):
    s = out.stdout.decode().strip()
    return [int(x) for x in s.split(",")] if s else []


def csv(ids):
    return ",".join(str(i) for i in ids)
