"""Shared fixtures for the notebook tests: a kernelspec for the build tree's lathe, found
through JUPYTER_PATH, and a helper that executes a notebook with `jupyter nbconvert`."""
import json
import os
import subprocess
import sys

import pytest

BUILDDIR = os.environ.get("LATHE_BUILDDIR", os.getcwd())
SRCDIR = os.environ.get("LATHE_SRCDIR", os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


@pytest.fixture(scope="session")
def jupyter_env(tmp_path_factory):
    prefix = os.path.join(BUILDDIR, "test-prefix")
    subprocess.run([os.path.join(BUILDDIR, "lathe"), "install", "--prefix", prefix], check=True,
                   stdout=subprocess.DEVNULL)
    env = dict(os.environ)
    env["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")
    home = tmp_path_factory.mktemp("home")
    env["JUPYTER_RUNTIME_DIR"] = str(home / "runtime")
    env["JUPYTER_CONFIG_DIR"] = str(home / "config")
    return env


@pytest.fixture
def execute_notebook(jupyter_env, tmp_path):
    """Runs `jupyter nbconvert --to notebook --execute` and returns the executed notebook."""
    def run(path, allow_errors=False, timeout=900, kernel="lathe"):
        cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
               "--ExecutePreprocessor.kernel_name=%s" % kernel,
               "--ExecutePreprocessor.timeout=%d" % timeout,
               "--output-dir", str(tmp_path), path]
        if allow_errors:
            cmd.append("--allow-errors")
        r = subprocess.run(cmd, env=jupyter_env, capture_output=True, text=True, timeout=timeout + 120)
        assert r.returncode == 0, "nbconvert failed:\n" + r.stderr[-4000:]
        with open(tmp_path / os.path.basename(path)) as f:
            return json.load(f)
    return run


def outputs_text(cell):
    """All text a code cell showed: streams, text/plain of displays and results, errors."""
    parts = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            parts.append("".join(o["text"]) if isinstance(o["text"], list) else o["text"])
        elif o["output_type"] in ("display_data", "execute_result"):
            t = o["data"].get("text/plain", "")
            parts.append("".join(t) if isinstance(t, list) else t)
        elif o["output_type"] == "error":
            parts.append(o["ename"] + ": " + o["evalue"])
    return "\n".join(parts)


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]
