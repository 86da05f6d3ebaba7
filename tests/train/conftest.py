"""Helpers for the fine-tuning tests: run a cell script with the build tree's `lathe run`, and
read safetensors files with numpy (no torch here)."""
import json
import os
import struct
import subprocess

import numpy as np
import pytest

BUILDDIR = os.environ.get("LATHE_BUILDDIR", os.getcwd())
SRCDIR = os.environ.get("LATHE_SRCDIR", os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def lathe_run(script, cwd, timeout=600):
    """Runs a cell script; returns (exit status, stdout, stderr)."""
    path = os.path.join(cwd, "script.lathe")
    with open(path, "w") as f:
        f.write(script)
    env = dict(os.environ)
    env.setdefault("LATHE_THREADS", "2")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # parallel test suites on 2 cores
    r = subprocess.run([os.path.join(BUILDDIR, "lathe"), "run", path], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env=env)
    return r.returncode, r.stdout, r.stderr


def load_safetensors(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        raw = b[8 + n + s:8 + n + e]
        if v["dtype"] == "F32":
            a = np.frombuffer(raw, dtype=np.float32)
        elif v["dtype"] == "F16":
            a = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        elif v["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: dtype {v['dtype']}")
        out[k] = a.reshape(v["shape"])
    return out, header


@pytest.fixture
def work(tmp_path):
    return str(tmp_path)
