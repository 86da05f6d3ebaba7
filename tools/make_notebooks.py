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
    new_markdown_cell("# lathe quickstart\n\nThe whole job in a minute on a laptop's CPU: load a "
                      "model, attach LoRA adapters, fine-tune it on a small chat dataset while the "
                      "loss curve draws itself, save the adapter, chat with the result and export "
                      "it for llama.cpp. A cell holds magics; `%help` lists them and `%help NAME` "
                      "explains one and its options."),
    new_code_cell("%help"),
    new_markdown_cell("## Load\n\n`tiny` is the small model shipped with lathe: Gemma 3's "
                      "architecture with 1.3 million parameters, so that everything here runs in "
                      "seconds. **Its weights are random until it trains**: before training it "
                      "answers gibberish, as the next cell shows. Any Gemma 3 checkpoint "
                      "directory or Hugging Face id (`google/gemma-3-1b-it`) loads the same way, "
                      "and the cells below work on it unchanged."),
    new_code_cell("%load tiny"),
    new_code_cell("%%chat temperature=0 max_new=16\nTell me about rivers."),
    new_markdown_cell("## LoRA\n\nRank-16 adapters on every linear layer (q, k, v, o, gate, up, "
                      "down). They start at zero (B = 0, as PEFT's do), so the model is unchanged "
                      "until it trains; only they train."),
    new_code_cell("%lora r=16 alpha=32"),
    new_markdown_cell("## Train\n\n`data/polite.jsonl` holds 40 chat conversations whose answers "
                      "all follow one pattern (\"Sure! Here is a short note about ... Thanks for "
                      "asking!\"); only the model's turns are trained. The progress bar and the "
                      "loss curve update in place; *Kernel > Interrupt* stops at the next "
                      "micro-batch and keeps the last complete step."),
    new_code_cell("%train data=data/polite.jsonl batch=4 steps=30 lr=3e-3 warmup=3"),
    new_markdown_cell("## Chat\n\nThe same question as before training (`reset` starts a new "
                      "conversation), on a topic the dataset does not have: the answer now takes "
                      "the trained form."),
    new_code_cell("%%chat reset temperature=0 max_new=24\nTell me about rivers."),
    new_markdown_cell("## Save and export\n\nThe adapter in PEFT's format "
                      "(`peft.PeftModel.from_pretrained` and `%lora load=` read it), and the model "
                      "with the adapter merged in as a GGUF file that llama.cpp, Ollama and LM "
                      "Studio run."),
    new_code_cell("%save adapter=/tmp/lathe-quickstart/polite-adapter"),
    new_code_cell("%export_gguf /tmp/lathe-quickstart/polite-q8_0.gguf type=q8_0 overwrite=true"),
    new_markdown_cell("`%status` shows what is loaded. Next: `finetune.ipynb` (LoRA in more "
                      "detail), `qlora.ipynb` (Gemma 3 12B in 4 bits on a T4), `export.ipynb` "
                      "(llama.cpp), `grpo.ipynb` (reinforcement learning), `colab.ipynb` "
                      "(Google Colab)."),
    new_code_cell("%status"),
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

write("notebooks/qlora.ipynb", [
    new_markdown_cell("# QLoRA: Gemma 3 12B on a free T4\n\n"
                      "Unsloth's Gemma 3 notebooks fine-tune Gemma 3 12B on Colab's free T4 by "
                      "loading the base model in 4 bits (bitsandbytes NF4, the QLoRA recipe) and "
                      "training LoRA adapters on top of it. This notebook is that recipe in lathe: "
                      "load in 4 bits, attach rank-16 LoRA adapters to all seven linears of every "
                      "layer, train on the model's turns, then keep the result three ways: the "
                      "adapter, a merged 16-bit checkpoint and a GGUF file for llama.cpp.\n\n"
                      "The cells run `tiny` (Gemma 3's architecture, a few million parameters) so "
                      "that they finish on a CPU in seconds; CI runs them that way. On a T4, put "
                      "`unsloth/gemma-3-12b-it` where they say `tiny` and use the learning rate "
                      "below; everything else stays as it is."),
    new_markdown_cell("## Load in 4 bits\n\n"
                      "Gemma 3 12B has 11.8 billion text parameters (lathe loads the language model "
                      "and skips the vision tower). In 16 bits its weights take 21.9 GiB of GPU "
                      "memory; the T4 has 15 GB, about 14.7 GiB of it free. `quant=nf4` quantizes "
                      "the seven linears of every layer (q, k, v, o, gate, up, down) as they load, "
                      "the way bitsandbytes' `quantize_4bit` does with double quantization: half a "
                      "byte per weight plus about 0.127 bit per weight of scales. The embedding and "
                      "the norms stay 16 and 32 bits (fp16 on the T4, which has no bf16 tensor "
                      "cores), so the 12B takes 7.0 GiB. A 16-bit load that cannot fit is refused "
                      "before anything goes to the GPU, with the sizes of the loads that would:\n\n"
                      "    google/gemma-3-12b-it needs 22.0 GiB of GPU memory in fp16 but 14.7 GiB "
                      "are free: load it with quant=nf4 (7.1 GiB) or quant=dynamic (8.6 GiB), or "
                      "device=cpu\n\n"
                      "On the T4 (the first `%load` of a Hub id downloads it into the Hugging Face "
                      "cache):\n\n"
                      "    %load unsloth/gemma-3-12b-it quant=nf4\n\n"
                      "or a checkpoint stored in 4 bits already, which loads as stored (the modules "
                      "its `llm_int8_skip_modules` lists stay 16-bit):\n\n"
                      "    %load unsloth/gemma-3-12b-it-bnb-4bit"),
    new_code_cell("%load tiny quant=nf4"),
    new_markdown_cell("## LoRA on all seven linears\n\n"
                      "Rank 16 on q, k, v, o, gate, up and down of every layer, alpha equal to the "
                      "rank and no dropout, as Unsloth's notebooks attach them. The adapters are "
                      "fp32 and train; the NF4 base stays frozen and is decoded inside each matmul. "
                      "On the 12B that is 65.5 million trainable parameters: about 1 GiB with their "
                      "gradients and AdamW's two moments, so weights and adapters take about 8 GiB "
                      "of the T4 and the rest is left for activations (checkpointed per layer)."),
    new_code_cell("%lora r=16 alpha=16 dropout=0"),
    new_markdown_cell("## Train\n\n"
                      "The settings of Unsloth's notebooks: 2 conversations per micro-batch, 4 "
                      "micro-batches per step, 5 warmup steps, a linear schedule, weight decay "
                      "0.01, and the loss on the model's turns only (`responses_only=true`, the "
                      "default, as Unsloth's `train_on_responses_only` does); 60 steps make a "
                      "short run. `tiny` starts from "
                      "random weights, so it trains at lr=3e-3 here; on the 12B use Unsloth's "
                      "lr=2e-4 (%train's default):\n\n"
                      "    %train data=data/polite.jsonl batch=2 grad_accum=4 steps=60 lr=2e-4 "
                      "warmup=5 schedule=linear weight_decay=0.01\n\n"
                      "`%train` prints its memory plan before the first step and refuses a batch "
                      "that would not fit. Any chat dataset in the `messages` or ShareGPT format "
                      "works (Unsloth's notebooks use FineTome-100k)."),
    new_code_cell("%train data=data/polite.jsonl batch=2 grad_accum=4 steps=60 lr=3e-3 warmup=5 "
                  "schedule=linear weight_decay=0.01"),
    new_markdown_cell("The model now answers in the trained form, on the 4-bit base with the "
                      "adapters:"),
    new_code_cell("%%chat temperature=0 max_new=24\nTell me about rivers."),
    new_markdown_cell("## Save\n\n"
                      "As Unsloth's notebooks end: the adapter alone in PEFT's format "
                      "(`peft.PeftModel.from_pretrained` and `%lora load=` read it; 262 MB for the "
                      "12B at rank 16), a merged checkpoint (the adapters merged into the "
                      "dequantized base, written in 16 bits for transformers and `%load`, 23.5 GB "
                      "for the 12B; `%load DIR quant=nf4` quantizes it again), and a GGUF file for "
                      "llama.cpp, Ollama and LM Studio in `q8_0` (12.5 GB for the 12B)."),
    new_code_cell("%save adapter=/tmp/lathe-qlora/gemma-3-adapter"),
    new_code_cell("%save merged=/tmp/lathe-qlora/gemma-3-merged"),
    new_code_cell("%export_gguf /tmp/lathe-qlora/gemma-3-q8_0.gguf type=q8_0 overwrite=true"),
])

PY_KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
             "accelerator": "GPU", "colab": {"gpuType": "T4"}}
nb = new_notebook(cells=[
    new_markdown_cell("# lathe on Google Colab\n\nHosted Colab runs only its own Python kernel, so "
                      "lathe comes in as an IPython extension: `%load_ext lathe` starts a lathe "
                      "kernel beside Colab's and `%%lathe` cells run in it, with their output, "
                      "progress bars and loss curves shown here; the stop button interrupts them. "
                      "Pick *Runtime > Change runtime type > T4 GPU* first: on a GPU the notebook "
                      "fine-tunes Gemma 3 1B; without one it runs the same cells on `tiny`, "
                      "lathe's own small model (random weights until it trains), which is how CI "
                      "runs this notebook (`tests/notebooks/test_ipython_ext.py`)."),
    new_markdown_cell("Get lathe and build it (`./quickstart`: Debian packages, the build, the "
                      "kernelspec). Where lathe is built and installed already, this cell says so "
                      "and skips both."),
    new_code_cell("import os, sys\n"
                  "from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel\n"
                  "SRC = os.environ.get('LATHE_SRCDIR', '/content/lathe')\n"
                  "try:\n"
                  "    lathe_bin = KernelSpecManager().get_kernel_spec('lathe').argv[0]\n"
                  "except NoSuchKernel:\n"
                  "    lathe_bin = None\n"
                  "if lathe_bin and os.access(lathe_bin, os.X_OK):\n"
                  "    print('lathe is built and installed already (%s): no clone, no ./quickstart'"
                  " % lathe_bin)\n"
                  "else:\n"
                  "    if not os.path.isdir(SRC):\n"
                  "        !git clone --depth 1 https://github.com/lathe-ml/lathe {SRC}\n"
                  "    !cd {SRC} && ./quickstart   # apt packages, build, kernelspec, a first notebook\n"
                  "sys.path.insert(0, os.path.join(SRC, 'ipython'))\n"
                  "os.chdir(os.path.join(SRC, 'notebooks'))   # lathe starts here: data/ is beside it"),
    new_markdown_cell("On a GPU, Gemma 3 1B from the Hugging Face Hub: `%load` downloads what the "
                      "Hugging Face cache lacks, into that cache (Gemma needs its licence accepted "
                      "on the model page and a token: Colab's secret `HF_TOKEN`, read below, the "
                      "`HF_TOKEN` variable or `huggingface-cli login`); otherwise `tiny`. The "
                      "one-line form `%lathe` takes these Python values in braces, as every IPython "
                      "magic line does."),
    new_code_cell("import shutil, tempfile\n"
                  "if shutil.which('nvidia-smi'):\n"
                  "    MODEL, DEVICE, STEPS, LR, OUT = 'google/gemma-3-1b-it', 'cuda', 60, '2e-4', "
                  "'/content'\n"
                  "    try:  # Colab's secrets hold the token for the gated Gemma repositories\n"
                  "        from google.colab import userdata\n"
                  "        token = userdata.get('HF_TOKEN')\n"
                  "        if token:\n"
                  "            os.environ.setdefault('HF_TOKEN', token)\n"
                  "    except Exception:  # not Colab, or no such secret: HF_TOKEN or the token file\n"
                  "        pass\n"
                  "else:\n"
                  "    MODEL, DEVICE, STEPS, LR, OUT = 'tiny', 'cpu', 30, '3e-3', "
                  "tempfile.mkdtemp(prefix='lathe-colab-')\n"
                  "print(MODEL, 'on', DEVICE)"),
    new_code_cell("%load_ext lathe"),
    new_code_cell("%lathe %load {MODEL} device={DEVICE}"),
    new_code_cell("%%lathe\n%status"),
    new_markdown_cell("LoRA adapters on every linear layer, then training on `data/polite.jsonl` "
                      "(40 conversations whose answers all follow one pattern). The progress bar "
                      "and the loss curve update in place; the stop button ends the run at the "
                      "next micro-batch and keeps the last complete step."),
    new_code_cell("%%lathe\n%lora r=16 alpha=32"),
    new_code_cell("%lathe %train data=data/polite.jsonl batch=4 steps={STEPS} lr={LR} warmup=3"),
    new_markdown_cell("A topic the dataset does not have; the answer takes the trained form."),
    new_code_cell("%%lathe\n%%chat temperature=0 max_new=24\nTell me about rivers."),
    new_markdown_cell("Keep the result: the adapter in PEFT's format, and a GGUF file for "
                      "llama.cpp, Ollama and LM Studio."),
    new_code_cell("%lathe %save adapter={OUT}/polite-adapter"),
    new_code_cell("%lathe %export_gguf {OUT}/polite-q8_0.gguf type=q8_0 overwrite=true"),
], metadata=PY_KERNEL)
for i, c in enumerate(nb.cells):
    c["id"] = "cell-%d" % i
nbformat.write(nb, "notebooks/colab.ipynb")
