"""notebooks/quickstart.ipynb executed with `jupyter nbconvert --execute` on the lathe
kernel; every cell's outputs are asserted (the final state of live displays included)."""
import os

from conftest import SRCDIR, code_cells, outputs_text


def test_quickstart_notebook(execute_notebook):
    nb = execute_notebook(os.path.join(SRCDIR, "notebooks", "quickstart.ipynb"))
    assert nb["metadata"]["language_info"]["name"] == "lathe"
    cells = {c["source"] if isinstance(c["source"], str) else "".join(c["source"]): c
             for c in code_cells(nb)}
    help_cell = cells["%help"]
    assert help_cell["execution_count"] == 1
    data = help_cell["outputs"][0]["data"]
    assert "text/html" in data and "%load" in "".join(data["text/plain"])

    load = outputs_text(cells["%load tiny"])
    assert "tiny" in load and "gemma3" in load, load
    status = outputs_text(cells["%status"])
    assert "parameters" in status and "layers" in status, status

    chat = outputs_text(cells["%%chat temperature=0 max_new=24\nHello! Who are you?"])
    assert chat.strip(), "the chat produced no text"
    gen = outputs_text(cells["%generate \"The capital of France is\" temperature=0 max_new=16"])
    assert gen.strip(), "the generation produced no text"

    sleep = cells["%sleep 1"]
    assert len(sleep["outputs"]) == 1, "the progress bar is one output updated in place"
    final = "".join(sleep["outputs"][0]["data"]["text/plain"])
    assert "1000/1000" in final and "done" in final, final


def test_error_cell_reported(execute_notebook, tmp_path):
    """A failing cell gives an error output naming the problem; later cells still run."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    nb = new_notebook(cells=[new_code_cell("%load tiny dtype=int3"), new_code_cell("%echo after")],
                      metadata={"kernelspec": {"name": "lathe", "display_name": "Lathe"}})
    path = tmp_path / "errors.ipynb"
    nbformat.write(nb, str(path))
    out = execute_notebook(str(path), allow_errors=True)
    first, second = code_cells(out)
    err = [o for o in first["outputs"] if o["output_type"] == "error"]
    assert err and err[0]["ename"] == "CellError" and "dtype=auto|fp32|fp16|bf16" in err[0]["evalue"]
    assert outputs_text(second).strip() == "after"
