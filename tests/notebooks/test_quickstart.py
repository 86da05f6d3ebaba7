"""notebooks/quickstart.ipynb executed with `jupyter nbconvert --execute` on the lathe
kernel; every cell's outputs are asserted (the final state of live displays included):
the notebook ./quickstart shows a newcomer, so it must do lathe's whole job."""
import os
import re

from conftest import SRCDIR, code_cells, outputs_text


def test_quickstart_notebook(execute_notebook):
    """The whole job on tiny: load, LoRA, train with the live bar and curve, chat in the
    trained form (gibberish before: the notebook says tiny's weights are random until it
    trains), save the adapter, export GGUF."""
    nb = execute_notebook(os.path.join(SRCDIR, "notebooks", "quickstart.ipynb"))
    assert nb["metadata"]["language_info"]["name"] == "lathe"
    prose = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "weights are random until it trains" in prose
    cells = {c["source"] if isinstance(c["source"], str) else "".join(c["source"]): c
             for c in code_cells(nb)}
    help_cell = cells["%help"]
    assert help_cell["execution_count"] == 1
    data = help_cell["outputs"][0]["data"]
    assert "text/html" in data and "%load" in "".join(data["text/plain"])

    load = outputs_text(cells["%load tiny"])
    assert "tiny" in load and "gemma3" in load, load
    before = outputs_text(cells["%%chat temperature=0 max_new=16\nTell me about rivers."])
    assert before.strip() and "Thanks for asking" not in before, before
    assert "LoRA attached: r=16" in outputs_text(cells["%lora r=16 alpha=32"])

    train = cells["%train data=data/polite.jsonl batch=4 steps=30 lr=3e-3 warmup=3"]
    shown = [o for o in train["outputs"] if o["output_type"] == "display_data"]
    plain = ["".join(o["data"]["text/plain"]) for o in shown]
    bars = [t for t in plain if t.startswith("train [")]
    curves = [o for o, t in zip(shown, plain) if t.startswith("loss curve")]
    assert len(bars) == 1 and "30/30" in bars[0] and "(done)" in bars[0], plain
    assert len(curves) == 1, "the live loss curve is one display"
    assert "<svg" in "".join(curves[0]["data"]["text/html"]), "drawn"
    assert "30 steps" in "".join(curves[0]["data"]["text/plain"]), "to its last step"
    m = re.search(r"trained 30 steps in (\d+):(\d\d) .*loss ([\d.]+) -> ([\d.]+)",
                  outputs_text(train))
    assert m, outputs_text(train)
    assert int(m.group(1)) == 0, "training takes well under a minute"
    assert float(m.group(4)) < float(m.group(3)) / 5, "the loss fell"

    after = outputs_text(cells["%%chat reset temperature=0 max_new=24\nTell me about rivers."])
    assert after.startswith("Sure! Here is a short note about") and \
        "Thanks for asking!" in after, "the trained form: %r" % after
    assert os.path.exists("/tmp/lathe-quickstart/polite-adapter/adapter_model.safetensors")
    export = outputs_text(cells["%export_gguf /tmp/lathe-quickstart/polite-q8_0.gguf "
                                "type=q8_0 overwrite=true"])
    assert "type q8_0" in export, export
    with open("/tmp/lathe-quickstart/polite-q8_0.gguf", "rb") as f:
        assert f.read(4) == b"GGUF"
    status = outputs_text(cells["%status"])
    assert "parameters" in status and "layers" in status, status


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
