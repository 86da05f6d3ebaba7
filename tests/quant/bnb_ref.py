"""bnb_ref.py -- an independent NumPy reference for bitsandbytes' weight formats.

What it does: the arithmetic of bitsandbytes' backends/default/ops.py and functional.py, in
float32 step by step, written from the published algorithm (bitsandbytes itself does not install
here): quantize_4bit with quant_type "nf4" (blocks of 64 over the row-major flattened weight,
x * (1 / absmax), clamp, torch.bucketize against the fp32 midpoints: a value exactly between two
codes takes the lower one; the even element in the high nibble), quantize_blockwise with the
signed dynamic map (create_dynamic_map, torch.linspace in fp32 as its 8-wide CPU kernel computes
it), double quantization (offset = mean of the absmax, absmax - offset quantized in blocks of
256), their dequantization, and LLM.int8 as Int8Params quantizes (fp16 first, row absmax, round
half to even). It also writes checkpoints in the exact layout bitsandbytes and transformers save
(QuantState.as_dict(packed=True) names, dtypes and the quant_state JSON; P.weight int8 + P.SCB +
P.weight_format), and reads safetensors of any dtype.
What it owns: nothing on disk beyond the directories it is asked to write. Needs only numpy.
"""

import json
import os
import struct

import numpy as np

F = np.float32

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=F)


# ---- maps -------------------------------------------------------------------------------------

def _linspace_f32(start, end, steps, width=8):
    """torch.linspace(start, end, steps, dtype=float32) on the CPU, vectors of `width`."""
    start, end = F(start), F(end)
    step = F((end - start) / F(steps - 1))
    half = steps // 2
    out = np.zeros(steps, dtype=F)

    def one(i):
        return F(start + F(step * F(i))) if i < half else F(end - F(step * F(steps - i - 1)))

    i = 0
    while i + width <= steps:
        base = one(i)
        out[i] = base
        for j in range(1, width):
            out[i + j] = F(base + F(F(j) * step))
        i += width
    while i < steps:
        out[i] = one(i)
        i += 1
    return out


def dynamic_map():
    """create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 fp32 values."""
    data = []
    for i in range(7):
        b = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = ((b[:-1] + b[1:]) / F(2.0)).astype(F)
        scale = F(10.0 ** (i - 6))
        data += list((scale * means).astype(F))
        data += list((-scale * means).astype(F))
    data += [F(0.0), F(1.0)]
    return np.array(sorted(data), dtype=F)


def _bounds(code):
    return ((code[:-1] + code[1:]) / F(2.0)).astype(F)


# ---- blockwise quantizers -------------------------------------------------------------------------

def _blocks(x, bs):
    """Scaled values and stored absmax as quantize_4bit / quantize_blockwise form them."""
    x = np.asarray(x, dtype=F).reshape(-1)
    n = x.size
    full = n - n % bs
    tiny = F(1e-38)
    scaled = np.empty(n, dtype=F)
    absmax = []
    if full:
        blk = x[:full].reshape(-1, bs)
        am = np.abs(blk).max(axis=1).astype(F)
        inv = (F(1.0) / np.maximum(am, tiny)).astype(F)
        scaled[:full] = np.clip((blk * inv[:, None]).astype(F), F(-1), F(1)).reshape(-1)
        absmax += list(am)
    if n % bs:
        am = np.maximum(np.abs(x[full:]).max(), tiny).astype(F)
        scaled[full:] = np.clip((x[full:] / am).astype(F), F(-1), F(1))
        absmax.append(am)
    return scaled, np.array(absmax, dtype=F)


def quantize_nf4(x, bs=64):
    """-> packed uint8 [(n+1)//2], absmax fp32 [ceil(n/bs)]."""
    scaled, absmax = _blocks(x, bs)
    if scaled.size % 2:
        scaled = np.concatenate([scaled, np.zeros(1, dtype=F)])
    q = np.searchsorted(_bounds(NF4_CODE), scaled, side="left").astype(np.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
    return packed, absmax


def quantize_blockwise(x, code, bs):
    scaled, absmax = _blocks(x, bs)
    q = np.searchsorted(_bounds(code), scaled, side="left").astype(np.uint8)
    return q, absmax


def double_quantize(absmax, code, nbs=256):
    """-> qabsmax uint8, absmax2 fp32, offset fp32 (the mean, accumulated in float64)."""
    offset = F(np.asarray(absmax, dtype=np.float64).mean())
    q, absmax2 = quantize_blockwise((np.asarray(absmax, dtype=F) - offset).astype(F), code, nbs)
    return q, absmax2, offset


def dequantize_blockwise(q, absmax, code, bs):
    out = code[q.astype(np.int64)].astype(F)
    blk = np.arange(out.size) // bs
    return (out * absmax[blk]).astype(F)


def dequantize_nf4(packed, absmax, n, bs=64, nested=None):
    """nested = (qabsmax, absmax2, code2, nbs, offset) for double quantization."""
    if nested is not None:
        qa, a2, code2, nbs, offset = nested
        absmax = (dequantize_blockwise(qa, a2, code2, nbs) + F(offset)).astype(F)
    codes = np.empty(packed.size * 2, dtype=np.int64)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    vals = NF4_CODE[codes[:n]]
    return (vals * absmax[np.arange(n) // bs]).astype(F)


def quantize_int8(w):
    """Int8Params: fp16 first, SCB = row absmax, w8 = rint(x * ((1 / SCB) * 127))."""
    x = np.asarray(w, dtype=F).astype(np.float16).astype(F)
    scb = np.abs(x).max(axis=1).astype(F)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = ((F(1.0) / scb) * F(127.0)).astype(F)
        q = np.rint((x * scale[:, None]).astype(F))
    q = np.where(scb[:, None] > 0, q, 0)
    return q.astype(np.int8), scb


def dequantize_int8(w8, scb):
    return ((w8.astype(F) * scb[:, None]).astype(F) * F(7.874015718698502e-3)).astype(F)


# ---- safetensors --------------------------------------------------------------------------

_NP = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "U8": "u1", "I8": "i1", "I32": "<i4"}
_ST = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("u1"): "U8",
       np.dtype("i1"): "I8", np.dtype("<i4"): "I32"}


def read_safetensors(path):
    """-> {name: (dtype string, array in its stored dtype; BF16 as uint16)}."""
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            f.seek(base + b)
            arr = np.frombuffer(f.read(e - b), dtype=_NP[info["dtype"]]).reshape(info["shape"])
            out[name] = (info["dtype"], arr)
    return out


def read_dir(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx)
             else ["model.safetensors"])
    t = {}
    for fn in files:
        t.update(read_safetensors(os.path.join(d, fn)))
    return t


def as_f32(entry):
    dt, a = entry
    if dt == "BF16":
        return (a.astype(np.uint32) << 16).view(F)
    return a.astype(F)


def write_safetensors(path, tensors):
    """tensors: {name: (dtype string, array)} -> one file, in name order."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        dt, a = tensors[name]
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def write_dir(d, tensors, shards=1):
    os.makedirs(d, exist_ok=True)
    if shards == 1:
        write_safetensors(os.path.join(d, "model.safetensors"), tensors)
        return
    names = sorted(tensors)
    wm = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::shards]}
        write_safetensors(os.path.join(d, fn), part)
        wm.update({k: fn for k in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f, indent=2)


# ---- bitsandbytes' checkpoint layout ---------------------------------------------------------

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def nf4_group(prefix, w, nested, dtype_name="float32"):
    """Tensors QuantState.as_dict(packed=True) saves for weight `prefix`.weight, plus the
    dequantized fp32 weight bitsandbytes' dequantize_4bit computes."""
    out_, in_ = w.shape
    packed, absmax = quantize_nf4(w.reshape(-1))
    P = prefix + ".weight"
    qs = {"quant_type": "nf4", "blocksize": 64, "dtype": dtype_name, "shape": [out_, in_]}
    t = {P: ("U8", packed.reshape(-1, 1)), P + ".quant_map": ("F32", NF4_CODE.copy())}
    if nested:
        code2 = dynamic_map()
        qa, a2, offset = double_quantize(absmax, code2)
        t[P + ".absmax"] = ("U8", qa)
        t[P + ".nested_absmax"] = ("F32", a2)
        t[P + ".nested_quant_map"] = ("F32", code2)
        qs.update({"nested_blocksize": 256, "nested_dtype": "float32",
                   "nested_offset": float(offset)})
        deq = dequantize_nf4(packed, None, w.size, nested=(qa, a2, code2, 256, offset))
    else:
        t[P + ".absmax"] = ("F32", absmax)
        deq = dequantize_nf4(packed, absmax, w.size)
    blob = np.frombuffer(json.dumps(qs).encode("utf-8"), dtype=np.uint8)
    t[P + ".quant_state.bitsandbytes__nf4"] = ("U8", blob.copy())
    return t, deq.reshape(out_, in_)


def int8_group(prefix, w):
    """Linear8bitLt._save_to_state_dict: P.weight int8, P.SCB fp32 and P.weight_format, a uint8
    scalar (0 = "row", the only layout bitsandbytes still saves)."""
    w8, scb = quantize_int8(w)
    return ({prefix + ".weight": ("I8", w8), prefix + ".SCB": ("F32", scb),
             prefix + ".weight_format": ("U8", np.array(0, dtype=np.uint8))},
            dequantize_int8(w8, scb))


def quant_config(kind, nested=True, skip=None, compute="float32"):
    """quantization_config as transformers' BitsAndBytesConfig.to_dict() writes it; for int8
    the 4-bit keys keep BitsAndBytesConfig's defaults (fp4, no double quant, float32)."""
    nf4 = kind == "nf4"
    return {"_load_in_4bit": nf4, "_load_in_8bit": kind == "int8",
            "bnb_4bit_compute_dtype": compute if nf4 else "float32",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "nf4" if nf4 else "fp4",
            "bnb_4bit_use_double_quant": nf4 and bool(nested),
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
            "load_in_4bit": kind == "nf4", "load_in_8bit": kind == "int8",
            "quant_method": "bitsandbytes"}


def module_skipped(module, skip):
    """The engine's rule: an entry K matches when K + '.' occurs in module + '.' at a component
    boundary."""
    hay = module + "."
    for k in skip or []:
        key = k + "."
        i = hay.find(key)
        while i >= 0:
            if i == 0 or hay[i - 1] == ".":
                return True
            i = hay.find(key, i + 1)
    return False


def write_quantized(src, dst, kind, nested=True, skip=None, keep16=(), shards=None,
                    config=True):
    """Reads the checkpoint `src` and writes `dst` with its linears in bitsandbytes' layout
    (kind "nf4" or "int8"); modules listed in skip or keep16 are written in their stored
    16-bit form (skip also goes into quantization_config). Returns (dequantized text weights
    {checkpoint name: fp32 array} for every linear as the engine must see it, dict of names
    written quantized)."""
    tensors = read_dir(src)
    cfg = json.load(open(os.path.join(src, "config.json")))
    dtype_name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    out, deq, quantized = {}, {}, set()
    for name, entry in tensors.items():
        mod = name[:-len(".weight")] if name.endswith(".weight") else None
        is_lin = (mod is not None and any(mod.endswith("." + s) for s in LINEARS)
                  and "vision_tower" not in mod and "multi_modal_projector" not in mod)
        if not is_lin or module_skipped(mod, skip) or any(mod.endswith(k) for k in keep16):
            out[name] = entry
            continue
        w = as_f32(entry)
        if kind == "nf4":
            g, d = nf4_group(mod, w, nested, dtype_name[entry[0]])
        else:
            g, d = int8_group(mod, w)
        out.update(g)
        deq[name] = d
        quantized.add(name)
    if config:
        cfg["quantization_config"] = quant_config(kind, nested, skip)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    n_shards = shards if shards else (3 if os.path.exists(
        os.path.join(src, "model.safetensors.index.json")) else 1)
    write_dir(dst, out, n_shards)
    with open(os.path.join(src, "tokenizer.model"), "rb") as f:
        tok = f.read()
    with open(os.path.join(dst, "tokenizer.model"), "wb") as f:
        f.write(tok)
    return deq, quantized


def write_dequantized(src, dst, deq):
    """`src` with each linear in deq replaced by its fp32 dequantized values (F32), and no
    quantization_config: the same model as a plain checkpoint."""
    tensors = read_dir(src)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.pop("quantization_config", None)
    out = {}
    for name, entry in tensors.items():
        out[name] = ("F32", deq[name]) if name in deq else entry
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_dir(dst, out, 1)
    with open(os.path.join(src, "tokenizer.model"), "rb") as f:
        tok = f.read()
    with open(os.path.join(dst, "tokenizer.model"), "wb") as f:
        f.write(tok)
