"""The IPython extension (ipython/lathe): %load_ext lathe in an ordinary Python notebook (the
way hosted Colab runs lathe), then %%lathe cells, executed with nbconvert on Debian's python3
kernel (python3-ipykernel). notebooks/colab.ipynb itself runs, with cells added after its
own: checked are streams (the cell's and what lathe's libraries write to fds 1/2), a result,
live progress bars and the loss curve that stay one output each, updated in place, the
trained form in the chat, the saved adapter and GGUF file, an interrupt (Colab's stop
button: SIGINT to the Python kernel), an error, and a model that stays loaded throughout;
and a failing cell that reports lathe's error and stops the run."""
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


# Cells the test adds after notebooks/colab.ipynb's own. The interrupt is what Colab's stop
# button does, SIGINT to the Python kernel, sent when lathe's first progress display arrives
# (so the lathe cell surely runs, whatever the machine's speed).
INTERRUPT_ON_FIRST_DISPLAY = """\
import os, signal, lathe
_relay = lathe._bridge._relay
def _stop_on_first_display(msg, *args):
    _relay(msg, *args)
    if msg["msg_type"] == "display_data":
        lathe._bridge._relay = _relay
        os.kill(os.getpid(), signal.SIGINT)
lathe._bridge._relay = _stop_on_first_display"""
EXTRA = [
    ("%%lathe\n%echo out-1\n%echo err-1 stream=stderr\n%echo lib-1 fd=true\n%version", []),
    (INTERRUPT_ON_FIRST_DISPLAY, []),
    ("%%lathe\n%sleep 600", ["raises-exception"]),
    ("%%lathe\n%lora r=0", ["raises-exception"]),
    ("%%lathe\n%status", []),
]


def test_colab_notebook(execute_notebook, tmp_path):
    """notebooks/colab.ipynb as Colab runs it: a Python kernel, %load_ext lathe, %%lathe and
    %lathe cells (without a GPU its cells pick tiny), then streams, an interrupt and an error
    in the same session."""
    nb = nbformat.read(os.path.join(SRCDIR, "notebooks", "colab.ipynb"), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    own = len(code_cells(nb))
    for src, tags in EXTRA:
        cell = new_code_cell(src)
        cell.metadata["tags"] = tags
        nb.cells.append(cell)
    path = tmp_path / "colab.ipynb"
    nbformat.write(nb, str(path))
    cells = code_cells(execute_notebook(str(path), kernel="python3"))
    by_src = {"".join(c["source"]): c for c in cells[:own]}

    def cell(prefix):
        found = [c for s, c in by_src.items() if s.startswith(prefix)]
        assert len(found) == 1, prefix
        return found[0]

    assert "no clone, no ./quickstart" in outputs_text(cells[0]), "setup skips itself when built"
    assert "lathe kernel started" in outputs_text(cell("%load_ext lathe"))
    assert "tiny" in outputs_text(cell("%lathe %load"))
    assert "source             tiny" in outputs_text(cell("%%lathe\n%status"))
    # live progress: one output per display, updated in place to its final state
    train = cell("%lathe %train")["outputs"]
    bars = [o for o in train if o["output_type"] == "display_data"
            and "".join(o["data"]["text/plain"]).startswith("train [")]
    assert len(bars) == 1, "the progress bar is one output updated in place: %r" % train
    assert "30/30" in "".join(bars[0]["data"]["text/plain"]) and "(done)" in "".join(
        bars[0]["data"]["text/plain"])
    curves = [o for o in train if o["output_type"] == "display_data"
              and "".join(o["data"]["text/plain"]).startswith("loss curve")]
    assert len(curves) == 1 and "30 steps" in "".join(curves[0]["data"]["text/plain"])
    assert "trained 30 steps" in outputs_text(cell("%lathe %train"))
    chat = outputs_text(cell("%%lathe\n%%chat"))
    assert chat.startswith("Sure! Here is a short note about"), "the trained form: %r" % chat
    assert "saved the adapter" in outputs_text(cell("%lathe %save"))
    assert "type q8_0" in outputs_text(cell("%lathe %export_gguf"))

    streams, interrupt, error, status = cells[own], cells[own + 2], cells[own + 3], cells[own + 4]
    runs = []
    for o in streams["outputs"]:
        if o["output_type"] == "stream":
            if runs and runs[-1][0] == o["name"]:
                runs[-1] = (o["name"], runs[-1][1] + "".join(o["text"]))
            else:
                runs.append((o["name"], "".join(o["text"])))
    assert runs == [("stdout", "out-1\n"), ("stderr", "err-1\n"), ("stdout", "lib-1\n")], runs
    assert "lathe 0.1.0" in outputs_text(streams)
    text = outputs_text(interrupt)
    assert "LatheError" in text and "KeyboardInterrupt" in text and "interrupted" in text, text
    bar = [o for o in interrupt["outputs"] if o["output_type"] == "display_data"]
    assert len(bar) == 1 and "(interrupted)" in "".join(bar[0]["data"]["text/plain"]), bar
    text = outputs_text(error)
    assert "LatheError: CellError" in text and "r=INTEGER from 1 to 4096" in text, text
    assert "source             tiny" in outputs_text(status), "lathe lived on with its model"


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
