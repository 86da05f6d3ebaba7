"""%load + %%chat in a notebook (nbconvert) on every committed checkpoint layout: the flat
legacy config (model.), the nested sparse 4B-style config (language_model.model., bf16,
with a vision tower), the transformers-5 nested config (model.language_model., sharded, f16,
with a vision tower); %status names the vision tower of the two multimodal ones."""
import os

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import SRCDIR, code_cells, outputs_text


@pytest.mark.parametrize("layout,dtype", [("flat", "fp32"), ("nested", "bf16"), ("tf5", "fp16")])
def test_load_and_chat(execute_notebook, tmp_path, layout, dtype):
    d = os.path.join(SRCDIR, "tests", "fixtures", layout)
    nb = new_notebook(cells=[
        new_code_cell('%%load "%s"' % d),
        new_code_cell("%%chat temperature=0 max_new=8\nHello!"),
        new_code_cell("%%chat temperature=0 max_new=8\nAnd again?"),
        new_code_cell("%status"),
    ], metadata={"kernelspec": {"name": "lathe", "display_name": "Lathe (Gemma 3)"}})
    path = tmp_path / ("%s.ipynb" % layout)
    nbformat.write(nb, str(path))
    load, chat1, chat2, status = code_cells(execute_notebook(str(path)))
    text = outputs_text(load)
    assert layout in text and dtype in text, text
    assert outputs_text(chat1).strip() and outputs_text(chat2).strip()
    st = outputs_text(status)
    if layout in ("nested", "tf5"):  # their towers load and %status describes them
        assert "text + image tower" in st and "image tower        SigLIP" in st, st
    else:
        assert "vision" not in st and "image tower" not in st, st
