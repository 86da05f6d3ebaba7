#!/usr/bin/python3
"""make_notebooks.py — writes the notebooks under notebooks/ (without outputs) from the
cell lists below, so that their text stays reviewable here. Run from the repository root."""
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

KERNEL = {"kernelspec": {"name": "lathe", "display_name": "Lathe (Gemma 3)", "language": "lathe"},
          "language_info": {"name": "lathe", "file_extension": ".lathe"}}


def write(path, cells):
    nb = new_notebook(cells=cells, metadata=KERNEL)
    for i, c in enumerate(nb.cells):
        c["id"] = "cell-%d" % i
    nbformat.write(nb, path)


write("notebooks/quickstart.ipynb", [
    new_markdown_cell("# lathe quickstart\n\nA cell holds magics. `%help` lists them; "
                      "`%help NAME` explains one and its options."),
    new_code_cell("%help"),
    new_markdown_cell("Load the small model shipped with lathe (`tiny`: Gemma 3's architecture, "
                      "a few million parameters, random weights until you train it). Any "
                      "Gemma 3 checkpoint directory or Hugging Face cache id works the same way."),
    new_code_cell("%load tiny"),
    new_code_cell("%status"),
    new_markdown_cell("Chat uses Gemma 3's chat template. `temperature=0` is greedy decoding."),
    new_code_cell("%%chat temperature=0 max_new=24\nHello! Who are you?"),
    new_code_cell("%generate \"The capital of France is\" temperature=0 max_new=16"),
    new_markdown_cell("Long magics show a progress bar that updates in place, and stop "
                      "cleanly on *Kernel > Interrupt*."),
    new_code_cell("%sleep 1"),
])
