"""notebooks/qlora.ipynb executed with `jupyter nbconvert --execute` on the lathe kernel: tiny
loads in NF4 (double quant, all 28 linears), rank-16 LoRA goes on all seven linears, 60 steps
of training at least halve the loss, the chat answer takes the trained form, and the three
files it writes are checked for what they hold, not only that they exist: the PEFT adapter
(config and 56 trained tensors of the right shapes), the merged checkpoint (every linear equals
bitsandbytes' NF4 round trip of tiny's weight plus scale * B @ A, computed here with
tests/quant/bnb_ref.py; everything else is tiny's own), and the q8_0 GGUF (its header, tensor
types and extents, and a real llama.cpp answering in the trained form). The output folder is
removed first, so no file of an earlier run can pass for this one."""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np

from conftest import SRCDIR, code_cells, outputs_text

sys.path.insert(0, os.path.join(SRCDIR, "tests", "quant"))
import bnb_ref  # noqa: E402

OUT = "/tmp/lathe-qlora"
TINY = os.path.join(SRCDIR, "models", "tiny")
LINEARS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
F = np.float32


def nf4_round_trip(w):
    """bitsandbytes' quantize_4bit (NF4, blocksize 64, double quantization) then
    dequantize_4bit, in numpy: what the frozen base of a quant=nf4 load holds."""
    flat = np.ascontiguousarray(w, dtype=F).reshape(-1)
    packed, absmax = bnb_ref.quantize_nf4(flat)
    code2 = bnb_ref.dynamic_map()
    qa, a2, offset = bnb_ref.double_quantize(absmax, code2, 256)
    out = bnb_ref.dequantize_nf4(packed, absmax, flat.size, nested=(qa, a2, code2, 256, offset))
    return out.reshape(w.shape)


def read_gguf_header(path):
    """-> (metadata {key: value}, tensors {name: (dims, ggml type, offset)}, data start, size)."""
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return v

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
              12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(scalar[t])

    assert buf[:4] == b"GGUF", "not a GGUF file: %r" % buf[:4]
    pos = 4
    assert take("I") == 3, "GGUF version"
    n_t, n_kv = take("Q"), take("Q")
    kv = {}
    for _ in range(n_kv):
        k = string()
        kv[k] = value(take("I"))
    tensors = {}
    for _ in range(n_t):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        tensors[name] = (dims, take("I"), take("Q"))
    align = kv.get("general.alignment", 32)
    return kv, tensors, (pos + align - 1) // align * align, len(buf)


def test_qlora_notebook(execute_notebook):
    shutil.rmtree(OUT, ignore_errors=True)
    nb = execute_notebook(os.path.join(SRCDIR, "notebooks", "qlora.ipynb"))
    load, lora, train, chat, save_adapter, save_merged, export = code_cells(nb)
    cfg = json.load(open(os.path.join(TINY, "config.json")))
    L, H, I = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    qo, kvo = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"q_proj": (qo, H), "k_proj": (kvo, H), "v_proj": (kvo, H), "o_proj": (H, qo),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}

    # ---- the load summary says NF4 --------------------------------------------------------
    text = outputs_text(load)
    assert "nf4 (double quant), %d linears (quantized at load)" % (7 * L) in text, text

    text = outputs_text(lora)
    assert "r=16 alpha=16" in text and "on %d modules" % (7 * L) in text, text
    assert all(m in text for m in LINEARS), text

    # ---- the loss falls --------------------------------------------------------------------
    text = outputs_text(train)
    assert "memory plan:" in text, text
    assert "trained 60 steps" in text, text
    first, last = text.split("loss ")[-1].split(" -> ")
    assert float(last.split()[0]) < float(first) / 2, text

    reply = outputs_text(chat).strip()
    assert reply.startswith("Sure! Here is a short note about"), reply
    assert reply.endswith("Thanks for asking!"), reply

    # ---- the PEFT adapter ------------------------------------------------------------------
    assert "saved the adapter" in outputs_text(save_adapter), outputs_text(save_adapter)
    ad = os.path.join(OUT, "gemma-3-adapter")
    acfg = json.load(open(os.path.join(ad, "adapter_config.json")))
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 16 and acfg["lora_alpha"] == 16, acfg
    assert sorted(acfg["target_modules"]) == sorted(LINEARS), acfg
    adapter = bnb_ref.read_safetensors(os.path.join(ad, "adapter_model.safetensors"))
    assert len(adapter) == 2 * 7 * L, sorted(adapter)
    lora_ab = {}
    for l in range(L):
        for m, part in LINEARS.items():
            pre = "base_model.model.model.layers.%d.%s.%s." % (l, part, m)
            a = bnb_ref.as_f32(adapter[pre + "lora_A.weight"])
            b = bnb_ref.as_f32(adapter[pre + "lora_B.weight"])
            out, inp = shapes[m]
            assert a.shape == (16, inp) and b.shape == (out, 16), (pre, a.shape, b.shape)
            assert np.isfinite(a).all() and np.isfinite(b).all(), pre
            lora_ab[(l, m)] = (a, b)
    assert max(np.abs(b).max() for _, b in lora_ab.values()) > 0, "lora_B is still zero: untrained"

    # ---- the merged checkpoint: NF4 base dequantized + the adapters ------------------------
    assert "saved the merged model" in outputs_text(save_merged), outputs_text(save_merged)
    md = os.path.join(OUT, "gemma-3-merged")
    for f in ("config.json", "tokenizer.model", "model.safetensors"):
        assert os.path.isfile(os.path.join(md, f)), f
    assert "quantization_config" not in json.load(open(os.path.join(md, "config.json")))
    merged = bnb_ref.read_safetensors(os.path.join(md, "model.safetensors"))
    base = bnb_ref.read_safetensors(os.path.join(TINY, "model.safetensors"))
    assert sorted(merged) == sorted(base), sorted(set(merged) ^ set(base))
    scale = F(16.0 / 16)
    for name in base:
        got = bnb_ref.as_f32(merged[name])
        w0 = bnb_ref.as_f32(base[name])
        assert got.shape == w0.shape, name
        parts = name.split(".")
        if len(parts) > 4 and parts[4] in LINEARS:
            a, b = lora_ab[(int(parts[2]), parts[4])]
            want = nf4_round_trip(w0) + scale * (b @ a)
            tol = 1e-5 if merged[name][0] == "F32" else 1e-2
            err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
            assert err <= tol, "%s: merged differs from NF4(base) + B@A by %.3g" % (name, err)
            assert np.abs(got - w0).max() > 0, name
        else:  # embedding and norms are tiny's own (in the saved dtype)
            tol = 0 if merged[name][0] == "F32" else 1e-2
            assert np.abs(got - w0).max() <= tol * max(np.abs(w0).max(), 1e-30), name

    # ---- the GGUF file ---------------------------------------------------------------------
    written = outputs_text(export)
    path = os.path.join(OUT, "gemma-3-q8_0.gguf")
    assert "wrote " + path in written and "type q8_0" in written, written
    kv, tensors, data, size = read_gguf_header(path)
    assert kv["general.architecture"] == "gemma3", kv.get("general.architecture")
    assert kv["gemma3.block_count"] == L and kv["gemma3.embedding_length"] == H, kv
    assert len(tensors) == len(base), sorted(tensors)
    Q8_0, F32 = 8, 0
    for name, (dims, typ, off) in tensors.items():
        n = int(np.prod(dims))
        nbytes = n // 32 * 34 if typ == Q8_0 else n * 4
        assert typ in (Q8_0, F32), (name, typ)
        assert typ == (F32 if len(dims) == 1 else Q8_0), (name, dims, typ)
        assert data + off + nbytes <= size, "%s runs past the end of the file" % name
    # a real llama.cpp loads the file and answers in the trained form
    gen = os.path.join(SRCDIR, "tests", "gguf", "generate.mjs")
    r = subprocess.run(["node", gen, path, "--chat", "Tell me about rivers.", "24"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    said = r.stdout.strip()
    assert said.split()[0] == reply.split()[0], "llama.cpp said %r, lathe %r" % (said, reply)
