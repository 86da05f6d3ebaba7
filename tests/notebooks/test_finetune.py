"""notebooks/finetune.ipynb executed with `jupyter nbconvert --execute` on the lathe kernel: load
tiny, attach LoRA, train with the live progress bar and loss curve (each one display updated in
place), save the adapter (the training loss at least halves), reload it on a fresh base model
and chat in the trained form."""
import os

from conftest import SRCDIR, code_cells, outputs_text


def src(c):
    return c["source"] if isinstance(c["source"], str) else "".join(c["source"])


def text_of(o, mime):
    t = o.get("data", {}).get(mime, "")
    return "".join(t) if isinstance(t, list) else t


def test_finetune_notebook(execute_notebook):
    nb = execute_notebook(os.path.join(SRCDIR, "notebooks", "finetune.ipynb"))
    cells = {src(c): c for c in code_cells(nb)}

    lora = outputs_text(cells["%lora r=16 alpha=32"])
    assert "LoRA attached" in lora and "28 modules" in lora, lora

    train = cells["%train data=data/polite.jsonl batch=4 steps=60 lr=3e-3 warmup=5 schedule=cosine"]
    displays = [o for o in train["outputs"] if o["output_type"] == "display_data"]
    bars = [o for o in displays if "train [" in text_of(o, "text/plain")]
    plots = [o for o in displays if "<svg" in text_of(o, "text/html")]
    assert len(bars) == 1, "the progress bar is one display updated in place"
    assert len(plots) == 1, "the loss curve is one display updated in place"
    bar = text_of(bars[0], "text/plain")
    assert "60/60" in bar and "done" in bar and "loss" in bar and "tok/s" in bar, bar
    assert "polyline" in text_of(plots[0], "text/html")
    assert "loss curve: 60 steps" in text_of(plots[0], "text/plain")
    summary = outputs_text(train)
    assert "trained 60 steps" in summary, summary
    first, last = summary.split("loss ")[-1].split(" -> ")
    # tiny's tied embedding has a realistic scale (std 0.16): LoRA halves the loss (~10 -> <1)
    assert float(last.split()[0]) < float(first) / 2, summary

    saved = outputs_text(cells["%save adapter=/tmp/lathe-finetune/polite-adapter"])
    assert "saved the adapter" in saved, saved
    reload = outputs_text(cells["%load tiny\n%lora load=/tmp/lathe-finetune/polite-adapter"])
    assert "loaded the adapter" in reload and "LoRA attached" in reload, reload

    reply = outputs_text(cells["%%chat temperature=0 max_new=24\nTell me about rivers."]).strip()
    assert reply.startswith("Sure! Here is a short note about"), reply
    assert reply.endswith("Thanks for asking!"), reply
