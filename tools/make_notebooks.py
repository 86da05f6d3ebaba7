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

write("notebooks/finetune.ipynb", [
    new_markdown_cell("# Fine-tuning with LoRA\n\nSupervised fine-tuning of a Gemma 3 model on a small "
                      "chat dataset, with LoRA adapters: load, attach, train (with a live loss curve), "
                      "save the adapter, load it back and chat. Everything here runs on the CPU in "
                      "well under a minute with `tiny`; the same cells train `google/gemma-3-1b-it`."),
    new_code_cell("%load tiny"),
    new_markdown_cell("Attach LoRA adapters to every linear layer of the language model (q, k, v, o, "
                      "gate, up, down). They start as PEFT's do (B = 0), so the model is unchanged "
                      "until it trains. `%help lora` lists the options (rank, alpha, dropout, "
                      "targets, rsLoRA, `load=` a PEFT adapter, `full=true`)."),
    new_code_cell("%lora r=16 alpha=32"),
    new_markdown_cell("The dataset is `data/polite.jsonl`: 40 chat conversations in the `messages` "
                      "format, whose answers all follow one pattern (\"Sure! Here is a short note "
                      "about ... Thanks for asking!\"). With `responses_only=true` (the default) "
                      "only the model's turns are trained. The progress bar and the loss curve "
                      "update in place; *Kernel > Interrupt* stops at the next micro-batch and "
                      "keeps the weights of the last complete step."),
    new_code_cell("%train data=data/polite.jsonl batch=4 steps=60 lr=3e-3 warmup=5 schedule=cosine"),
    new_markdown_cell("Save the adapter in PEFT's format (`adapter_config.json` + "
                      "`adapter_model.safetensors`): `peft.PeftModel.from_pretrained` loads it, and "
                      "so does `%lora load=`. `%save merged=DIR` would write a full checkpoint with "
                      "the adapter merged in."),
    new_code_cell("%save adapter=/tmp/lathe-finetune/polite-adapter"),
    new_markdown_cell("Start again from the base model, load the saved adapter and ask about a "
                      "topic that is not in the dataset: the answer takes the trained form."),
    new_code_cell("%load tiny\n%lora load=/tmp/lathe-finetune/polite-adapter"),
    new_code_cell("%%chat temperature=0 max_new=24\nTell me about rivers."),
])

write("notebooks/export.ipynb", [
    new_markdown_cell("# From the notebook to llama.cpp\n\nFine-tune `tiny` for a few steps, "
                      "then write it as GGUF files that llama.cpp, Ollama and LM Studio load "
                      "(`%export_gguf` merges the LoRA adapters into the weights first), and run "
                      "them with a real llama.cpp: the answer is the one lathe gives here."),
    new_code_cell("%load tiny\n%lora r=16 alpha=32\n"
                  "%train data=data/polite.jsonl batch=4 steps=30 lr=3e-3 warmup=3"),
    new_markdown_cell("Greedy decoding (`temperature=0`) of one chat turn, by lathe:"),
    new_code_cell("%%chat temperature=0 max_new=20\nTell me about rivers."),
    new_markdown_cell("Two files: 16-bit floats, and llama.cpp's 8-bit `q8_0`. Each is written "
                      "atomically; `overwrite=true` replaces an earlier export."),
    new_code_cell("%export_gguf /tmp/lathe-export/tiny-f16.gguf type=f16 overwrite=true\n"
                  "%export_gguf /tmp/lathe-export/tiny-q8_0.gguf type=q8_0 overwrite=true"),
    new_markdown_cell("llama.cpp (the prebuilt build inside the npm package `node-llama-cpp`, "
                      "installed by `npm ci` in `tests/gguf`) runs each file with the same "
                      "chat turn and greedy decoding:"),
    new_code_cell("%%shell\ntest -d ../tests/gguf/node_modules || "
                  "(cd ../tests/gguf && npm ci --no-audit --no-fund --loglevel=error)\n"
                  "node ../tests/gguf/generate.mjs /tmp/lathe-export/tiny-f16.gguf "
                  "--chat \"Tell me about rivers.\" 20"),
    new_code_cell("%%shell\nnode ../tests/gguf/generate.mjs /tmp/lathe-export/tiny-q8_0.gguf "
                  "--chat \"Tell me about rivers.\" 20"),
])

PY_KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
             "accelerator": "GPU", "colab": {"gpuType": "T4"}}
nb = new_notebook(cells=[
    new_markdown_cell("# lathe on Google Colab\n\nHosted Colab runs only its own Python kernel, so "
                      "lathe comes in as an IPython extension: `%load_ext lathe` starts a lathe "
                      "kernel beside Colab's and `%%lathe` cells run in it, with their progress "
                      "bars and loss curves shown here. Pick *Runtime > Change runtime type > T4 "
                      "GPU* first. (This notebook needs Colab's network and GPU, so CI does not "
                      "run it; the extension itself is tested in `tests/notebooks/test_ipython_ext.py`.)"),
    new_code_cell("!git clone --depth 1 https://github.com/lathe-ml/lathe /content/lathe\n"
                  "!cd /content/lathe && ./quickstart   # apt packages, build, kernelspec, a first notebook"),
    new_code_cell("import sys\nsys.path.insert(0, '/content/lathe/ipython')\n%load_ext lathe"),
    new_markdown_cell("lathe never downloads: fetch the checkpoint into the Hugging Face cache "
                      "first (Gemma needs its licence accepted and a token: "
                      "`huggingface-cli login`)."),
    new_code_cell("!huggingface-cli download google/gemma-3-1b-it"),
    new_code_cell("%%lathe\n%load google/gemma-3-1b-it device=cuda\n%status"),
    new_code_cell("%%lathe\n%lora r=16 alpha=32\n"
                  "%train data=/content/lathe/notebooks/data/polite.jsonl batch=4 steps=60 lr=2e-4"),
    new_code_cell("%%lathe\n%%chat temperature=0 max_new=64\nTell me about rivers."),
    new_code_cell("%%lathe\n%save adapter=/content/polite-adapter\n"
                  "%export_gguf /content/gemma-3-1b-polite-q8_0.gguf type=q8_0"),
], metadata=PY_KERNEL)
for i, c in enumerate(nb.cells):
    c["id"] = "cell-%d" % i
nbformat.write(nb, "notebooks/colab.ipynb")
