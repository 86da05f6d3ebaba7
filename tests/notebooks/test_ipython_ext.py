"""The IPython extension (ipython/lathe): %load_ext lathe in an ordinary Python notebook (the
way hosted Colab runs lathe), then %%lathe cells, executed with nbconvert on Debian's python3
kernel. Checked: streams, a result, a live progress bar that stays one output updated in
place, a model that stays loaded between cells, and a failing cell that reports lathe's
error and stops the run."""
import os

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from conftest import SRCDIR, code_cells, outputs_text

PY = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


def notebook(tmp_path, cells):
    nb = new_notebook(cells=[new_code_cell(c) for c in cells], metadata=PY)
    path = tmp_path / "colab.ipynb"
    nbformat.write(nb, str(path))
    return str(path)


def test_lathe_cells_in_a_python_notebook(execute_notebook, tmp_path):
    path = notebook(tmp_path, [
        "import sys; sys.path.insert(0, %r)" % os.path.join(SRCDIR, "ipython"),
        "%load_ext lathe",
        "%%lathe\n%echo hello from lathe\n%version",
        "%%lathe\n%sleep 0.5",
        "%%lathe\n%load tiny",
        "%%lathe\n%%chat temperature=0 max_new=8\nHello!",
        "%%lathe\n%status",
    ])
    cells = code_cells(execute_notebook(path, kernel="python3"))
    assert "lathe kernel started" in outputs_text(cells[1])
    echo = outputs_text(cells[2])
    assert "hello from lathe" in echo and "lathe 0.1.0" in echo, echo
    sleep = cells[3]["outputs"]
    assert len(sleep) == 1, "the progress bar is one output, updated in place: %r" % sleep
    final = "".join(sleep[0]["data"]["text/plain"])
    assert "500/500" in final and "done" in final, final
    assert "tiny" in outputs_text(cells[4])
    assert outputs_text(cells[5]).strip(), "the chat gave no text"
    assert "source             tiny" in outputs_text(cells[6]), "the model stayed loaded"


def test_failing_lathe_cell_stops_the_run(execute_notebook, tmp_path):
    path = notebook(tmp_path, [
        "import sys; sys.path.insert(0, %r)" % os.path.join(SRCDIR, "ipython"),
        "%load_ext lathe",
        "%%lathe\n%load tiny dtype=int3",
        "%%lathe\n%echo after",
    ])
    cells = code_cells(execute_notebook(path, kernel="python3", allow_errors=True))
    text = outputs_text(cells[2])
    assert "LatheError" in text and "dtype=auto|fp32|fp16|bf16" in text, text
    # with allow_errors the next cell still runs, and lathe is still there
    assert outputs_text(cells[3]).strip() == "after"
