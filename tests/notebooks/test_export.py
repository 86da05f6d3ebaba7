"""notebooks/export.ipynb executed with `jupyter nbconvert --execute`: train tiny with LoRA,
chat greedily, export f16 and q8_0 GGUF files, run both through a real llama.cpp
(node-llama-cpp's prebuilt build via %%shell): the f16 file gives lathe's answer token for
token; the q8_0 file loads and answers (8-bit rounding may change later tokens)."""
import os

from conftest import SRCDIR, code_cells, outputs_text


def test_export_notebook(execute_notebook):
    nb = execute_notebook(os.path.join(SRCDIR, "notebooks", "export.ipynb"))
    train, chat, export, llama_f16, llama_q8 = code_cells(nb)
    assert "trained 30 steps" in outputs_text(train), outputs_text(train)
    answer = outputs_text(chat).strip()
    assert answer, "lathe gave no answer"
    written = outputs_text(export)
    assert "tiny-f16.gguf" in written and "tiny-q8_0.gguf" in written, written
    assert "llama-cli -m" in written, written
    f16 = outputs_text(llama_f16).strip().splitlines()[-1].strip()
    assert f16 == answer, "llama.cpp (f16) said %r, lathe said %r" % (f16, answer)
    q8 = outputs_text(llama_q8).strip()
    assert q8 and q8.split()[0] == answer.split()[0], "llama.cpp (q8_0) said %r" % q8
