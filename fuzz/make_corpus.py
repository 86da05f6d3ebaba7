#!/usr/bin/env python3
"""make_corpus.py — writes the seed corpora of the fuzz harnesses into fuzz/corpus/NAME/.

Seeds come from the repository's own fixtures (tests/fixtures, models/tiny, notebooks/data,
notebooks/*.ipynb) and from small files built here in each format (safetensors headers,
bitsandbytes NF4 / int8 groups, wire frames, GGUF blocks), so every harness starts past its
format's first checks. Run from the repository root; afterwards minimise with libFuzzer's
-merge=1 (FUZZING.md says how). Standard library only.
"""
import hashlib
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def put(name, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


def read(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        return f.read()


# ---- safetensors --------------------------------------------------------------------------
def safetensors(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape, bytes)."""
    hdr, off, blob = {}, 0, b""
    if metadata is not None:
        hdr["__metadata__"] = metadata
    for name, dt, shape, data in tensors:
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
        blob += data
    h = json.dumps(hdr, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


def f32(vals):
    return struct.pack("<%df" % len(vals), *vals)


put("safetensors", safetensors([("w", "F32", [2, 2], f32([1, 2, 3, 4]))], {"format": "pt"}))
put("safetensors", safetensors([("a", "BF16", [3], b"\x80\x3f" * 3), ("b", "F16", [1, 2], b"\x00\x3c" * 2),
                                ("c", "I32", [1], b"\x01\0\0\0"), ("d", "U8", [0], b""),
                                ("e", "F64", [1], b"\0" * 8), ("f", "BOOL", [2], b"\x01\x00")]))
put("safetensors", safetensors([("x", "F32", [], f32([7]))], pad=False))
put("safetensors", "{\"weight_map\": {\"x\": \"a.safetensors\", \"y\": \"b.safetensors\"}, "
                   "\"metadata\": {\"total_size\": 24}}")
put("safetensors", "{\"weight_map\": {\"x\": \"a.safetensors\", \"z\": \"a.safetensors\"}}")

# ---- bitsandbytes ---------------------------------------------------------------------------
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230850219727, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def nf4_group(prefix, out, inn, nested):
    n = out * inn
    bs = 64
    nb = (n + bs - 1) // bs
    st = {"quant_type": "nf4", "blocksize": bs, "dtype": "bfloat16", "shape": [out, inn]}
    t = [(prefix + ".weight", "U8", [(n + 1) // 2, 1], bytes(range(256))[: (n + 1) // 2] if n < 512 else b"\x12" * ((n + 1) // 2)),
         (prefix + ".weight.quant_map", "F32", [16], f32(NF4))]
    if nested:
        st.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5})
        t.append((prefix + ".weight.absmax", "U8", [nb], bytes([128] * nb)))
        t.append((prefix + ".weight.nested_absmax", "F32", [(nb + 255) // 256], f32([0.25] * ((nb + 255) // 256))))
        t.append((prefix + ".weight.nested_quant_map", "F32", [256], f32([i / 128 - 1 for i in range(256)])))
    else:
        t.append((prefix + ".weight.absmax", "F32", [nb], f32([0.5] * nb)))
    js = json.dumps(st).encode()
    t.append((prefix + ".weight.quant_state.bitsandbytes__nf4", "U8", [len(js)], js))
    return t


put("bnb", safetensors(nf4_group("model.layers.0.self_attn.q_proj", 4, 32, False)))
put("bnb", safetensors(nf4_group("model.layers.0.mlp.up_proj", 8, 40, True)))
put("bnb", safetensors([("model.layers.0.mlp.down_proj.weight", "I8", [2, 4], bytes([1, 2, 3, 4, 255, 254, 253, 0])),
                        ("model.layers.0.mlp.down_proj.SCB", "F32", [2], f32([1.5, 2.0])),
                        ("model.norm.weight", "F32", [2], f32([1, 1]))]))
put("bnb", safetensors([("model.layers.1.self_attn.k_proj.weight", "U8", [4, 1], b"\x01\x02\x03\x04"),
                        ("model.layers.1.self_attn.k_proj.weight.quant_state.bitsandbytes__fp4", "U8", [2], b"{}")]))

# ---- config.json ------------------------------------------------------------------------------
for rel in ["models/tiny/config.json", "tests/fixtures/flat/config.json",
            "tests/fixtures/nested/config.json", "tests/fixtures/tf5/config.json"]:
    put("hfconfig", read(rel))
cfg = json.loads(read("models/tiny/config.json"))
cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                              "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                              "bnb_4bit_compute_dtype": "bfloat16",
                              "llm_int8_skip_modules": ["lm_head", "model.layers.0.mlp"]}
put("hfconfig", json.dumps(cfg))
cfg["quantization_config"] = {"quant_method": "bitsandbytes", "_load_in_8bit": True,
                              "llm_int8_skip_modules": None}
put("hfconfig", json.dumps(cfg))

# ---- datasets (byte 0: format % 5, responses_only bit 3, max_seq bits 4-7) --------------------
def data(opt, text):
    put("data", bytes([opt]) + (text.encode() if isinstance(text, str) else text))


data(0, read("tests/fixtures/peft/data.jsonl"))
data(0x18, b"".join(read("notebooks/data/polite.jsonl").splitlines(True)[:6]))
data(0x21, '{"text": "The cat sat on the mat."}\n\n{"text": "Bonjour \\u00e9 \\ud83d\\ude42"}\n')
data(0x02, '{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."}\n')
data(0x13, '[{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}, '
           '{"from": "gpt", "value": "hello"}]}]')
data(0x0c, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, '
           '{"type": "text", "text": "b"}]}, {"role": "model", "content": "c<end_of_turn>"}]}\r\n')
data(0x00, b"\xef\xbb\xbf" + b'{"text": "a BOM first"}\n')
data(0xf1, b'{"text": "' + b"long " * 300 + b'"}\n')

# ---- PEFT adapter_config.json -------------------------------------------------------------------
put("peft", read("tests/fixtures/peft/final/adapter_config.json"))
put("peft", json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"]}))
put("peft", json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True,
                        "lora_dropout": 0.1, "target_modules": ".*\\.(q_proj|v_proj)"}))
put("peft", json.dumps({"peft_type": "LORA", "use_dora": True, "target_modules": ["q_proj"]}))

# ---- connection files -------------------------------------------------------------------------
put("connection", json.dumps({"shell_port": 50001, "iopub_port": 50002, "stdin_port": 50003,
                              "control_port": 50004, "hb_port": 50005, "ip": "127.0.0.1",
                              "key": "a0436f6c-1916-498b-8eb9-e81ab9368e84", "transport": "tcp",
                              "signature_scheme": "hmac-sha256", "kernel_name": "lathe"}))
put("connection", json.dumps({"shell_port": "1", "iopub_port": 2, "stdin_port": 3,
                              "control_port": 4, "hb_port": 5, "ip": "/tmp/k", "key": "",
                              "transport": "ipc"}))

# ---- cells ----------------------------------------------------------------------------------------
cells = set()
for nb in sorted(os.listdir(os.path.join(ROOT, "notebooks"))):
    if nb.endswith(".ipynb"):
        for c in json.loads(read("notebooks/" + nb))["cells"]:
            if c["cell_type"] == "code":
                src = "".join(c["source"])
                if src.lstrip().startswith("%"):
                    cells.add(src)
for c in sorted(cells)[:40]:
    put("cell", c)
put("cell", '%train data="a b.jsonl" lr=2e-4 \\\n  steps=3 # comment\n%%chat max_new=5\nhi "there"')
put("cell", "%lora r=8 targets=q,v\n%help train\n%generate prompt=\"x\\\"y\" temperature=0.5")

# ---- wire frames (byte 0: bit 0 signed, bit 1 the harness signs) --------------------------------
def frames(mode, parts):
    out = bytes([mode])
    for p in parts:
        p = p.encode() if isinstance(p, str) else p
        out += struct.pack("<H", len(p)) + p
    return out


hdr = json.dumps({"msg_id": "1", "msg_type": "execute_request", "session": "s", "username": "u",
                  "date": "2026-01-01T00:00:00.000000Z", "version": "5.4"})
content = json.dumps({"code": "%help", "silent": False, "store_history": True,
                      "user_expressions": {}, "allow_stdin": False})
put("wire", frames(0, ["ident", "<IDS|MSG>", "", hdr, "{}", "{}", content]))
put("wire", frames(3, ["<IDS|MSG>", "0" * 64, hdr, "{}", "{\"x\": [1, 2.5, null]}", content, b"\x00\xff"]))
put("wire", frames(1, ["a", "b", "<IDS|MSG>", "f" * 64, hdr, "{}", "{}", "{}"]))
put("wire", frames(2, ["<IDS|MSG>", "", json.dumps({"msg_id": "\\ud800", "msg_type": "kernel_info_request"}),
                       "{}", "{}", "{\"s\": \"\\u0000 \\udfff\"}"]))

# ---- GGUF blocks (byte 0: type) -------------------------------------------------------------------
SIZES = [4, 2, 2, 34, 18, 22, 144, 210]
for t, bb in enumerate(SIZES):
    put("gguf", bytes([t]) + bytes((i * 37 + t) & 0xFF for i in range(2 * bb)) + b"q4_k_m")

# ---- tokenizer ----------------------------------------------------------------------------------
put("tokenizer", read("models/tiny/tokenizer.model"))
# ---- the Hub (byte 0: 0 revision JSON, 1 header lines, 2 refs file, 3 id, 4 index, 5 ETag) --------
# Shaped as tests/hub/hubserver.py and huggingface.co answer; COMMIT is the one fuzz_hub.c checks
# X-Repo-Commit against.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub(sel, data):
    put("hub", bytes([sel]) + (data.encode() if isinstance(data, str) else data))


tiny_files = sorted(["config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                     "tokenizer_config.json", "README.md", "pytorch_model.bin",
                     "original/model.safetensors", "unused.safetensors"])
hub(0, json.dumps({"id": "tiny-org/tiny", "sha": COMMIT,
                   "siblings": [{"rfilename": f} for f in tiny_files]}))
shards = ["model-%05d-of-00003.safetensors" % i for i in (1, 2, 3)]
hub(0, json.dumps({
    "_id": "67b5e1b1c2d3e4f5a6b7c8d9", "id": "google/gemma-3-1b-it", "private": False,
    "pipeline_tag": "text-generation", "library_name": "transformers",
    "tags": ["transformers", "safetensors", "gemma3_text"], "downloads": 1234567, "likes": 512,
    "modelId": "google/gemma-3-1b-it", "author": "google", "sha": COMMIT,
    "lastModified": "2025-04-04T13:12:40.000Z", "gated": "manual", "disabled": False,
    "config": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"},
    "siblings": [{"rfilename": ".gitattributes", "blobId": "a6344aac8c09253b3b630fb776ae94478aa0275b",
                  "size": 1570},
                 {"rfilename": "config.json", "blobId": "3f4ad7a5c2d5ad8ecf3b0da3d2e2d42d4a3e4f7a",
                  "size": 899},
                 {"rfilename": "model.safetensors.index.json",
                  "blobId": "0b4a4a2d9f1b3b0c6f1a4e6f5d8c2b1a0e9d8c7b", "size": 11391}]
                + [{"rfilename": s, "blobId": "b" * 40, "size": 4994,
                    "lfs": {"sha256": "%064x" % (i + 1), "size": 4994, "pointerSize": 135}}
                   for i, s in enumerate(shards)]
                + [{"rfilename": "tokenizer.model", "blobId": "c" * 40, "size": 4689074,
                    "lfs": {"sha256": "1299c11d7cf632ef3b4e11937501358ada021bbdf7c47638d13c0ee982f2e79c",
                            "size": 4689074, "pointerSize": 132}}],
    "spaces": [], "createdAt": "2025-03-10T16:34:21.000Z",
    "safetensors": {"parameters": {"BF16": 999885952}, "total": 999885952},
    "usedStorage": 4007630072}))
hub(0, json.dumps({"sha": COMMIT, "siblings": [
    {"rfilename": "../config.json"}, {"rfilename": "/etc/passwd"}, {"rfilename": ".."},
    {"rfilename": "config.json"}, {"rfilename": "sub/../model.safetensors"},
    {"rfilename": "..safetensors"}, {"rfilename": ".hidden.safetensors"}, {"rfilename": 7},
    {"rfilename": "a\\u0000.safetensors"}, {"rfilename": "C:\\\\x.safetensors"}, {}]}))
hub(0, '{"sha": "0123456789ABCDEF0123456789abcdef01234567", "siblings": []}')
hub(0, "<html>a captive portal</html>")

CRLF = "\r\n"
hub(1, CRLF.join(["HTTP/1.1 302 Found", "X-Repo-Commit: " + COMMIT,
                  "Location: http://localhost:8080/cdn/%064x?Policy=%s&Signature=test" % (5, "p" * 300),
                  'ETag: "%s"' % ("d" * 40), 'X-Linked-Etag: "%064x"' % 5, "X-Linked-Size: 4689074",
                  "Content-Length: 0", "", ""]))
hub(1, CRLF.join(["HTTP/1.1 307 Temporary Redirect", "X-Repo-Commit: " + COMMIT,
                  "Location: /api/resolve-cache/models/tiny-org/tiny/%s/config.json?etag=%%22%s%%22"
                  % (COMMIT, "e" * 40), "Content-Length: 0", "", ""]))
hub(1, CRLF.join(["HTTP/1.1 307 Temporary Redirect", "Location: /tiny-org/tiny/resolve/main/config.json",
                  "", "HTTP/1.1 200 OK", "X-Repo-Commit: " + COMMIT, 'ETag: "%s"' % ("e" * 40),
                  "Content-Length: 899", "", ""]))
hub(1, CRLF.join(["HTTP/2 206", "content-length: 4000", 'etag: "%064x"' % 5,
                  "content-range: bytes 689074-4689073/4689074", "", ""]))
hub(1, CRLF.join(["HTTP/1.1 401 Unauthorized", "X-Error-Code: GatedRepo",
                  "X-Error-Message: Access to model gated-org/tiny is restricted.", "Content-Length: 52",
                  "", ""]))
hub(1, CRLF.join(["HTTP/1.1 302 Found", "Location: //evil.example/x", 'X-Linked-Etag: "../../../escaped"',
                  "X-Linked-Size: -1", "X-Repo-Commit: " + "f" * 40, "", ""]))

hub(2, COMMIT)
hub(2, COMMIT + "\n")
hub(2, "0123abc\n")
hub(2, "../../../etc")
for i in ["google/gemma-3-1b-it", "org/name@v1.0", "org/name@refs/pr/1", "a_b/c.d@" + COMMIT,
          "org/name@a/../b", "a-/b", "org/na--me", "org/name@"]:
    hub(3, i)
hub(4, read("tests/fixtures/tf5/model.safetensors.index.json"))
hub(4, '{"metadata": {"total_size": 8}, "weight_map": {"a": "model-1.safetensors", '
       '"b": "../model-1.safetensors", "c": "model-1.safetensors"}}')
for e in ['"%064x"' % 5, 'W/"%s"' % ("d" * 40), '"../../../escaped"', '"."']:
    hub(5, e)

# ---- trainer_state.json (a checkpoint's run, as %train save= writes it) ---------------------------
def trainer_state(step, per_step, full, losses, **opts):
    o = {"batch": 2, "beta1": 0.9, "beta2": 0.999, "data": "notebooks/data/sft.jsonl", "epochs": 1.0,
         "eps": 1e-08, "format": "auto", "grad_accum": 1, "lr": 0.0002, "max_grad_norm": 1.0,
         "max_seq": 256, "packing": False, "responses_only": True, "schedule": "linear",
         "seed": 3407, "shuffle": True, "steps": 10, "warmup": 0, "weight_decay": 0.0}
    o.update(opts)
    put("trainer_state", json.dumps({"format_version": 1, "full": full, "losses": losses,
                                     "options": o, "position": step * per_step, "step": step,
                                     "tokens": 57 * step, "total_steps": 10, "units": 12},
                                    indent=1, sort_keys=True))


trainer_state(2, 2, False, [2.75, 2.5])
trainer_state(4, 6, True, [3.0, 2.0, 1.5, 1.25], batch=3, grad_accum=2, packing=True, seed=-81985529216486896,
              schedule="cosine", data="", format="chat")
trainer_state(0, 2, False, [])

# ---- GRPO's built-in rewards: markers option, NUL, completion, NUL, the data row ------------------
def rewards(markers, completion, row='{"answer": "42"}'):
    put("rewards", markers + "\0" + completion + "\0" + row)


R = "<start_working_out>let me think<end_working_out><SOLUTION>%s</SOLUTION>"
rewards("", R % "42")
rewards("", R % " 42.0 ", '{"answer": 42}')
rewards("", R % "1_000", '{"answer": "1e3"}')
rewards("", R % "-0", '{"answer": 0}')
rewards("", "<SOLUTION>41.9 apples</SOLUTION><SOLUTION>", '{"answer": 41.5}')
rewards("[think],[/think],[ans],[/ans]", "  [think] x [/think]\n[ans]inf[/ans]  ", '{"answer": "nan"}')
rewards("a,b,c", R % "42")
rewards("", "no markers at all", '{"question": "q"}')

print("corpus written under", OUT, file=sys.stderr)
