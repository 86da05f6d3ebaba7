"""vision_ref.py -- a float64 NumPy reference of Gemma 3 with images, written from transformers'
modeling_siglip.py (SiglipVisionModel, vision_use_head false) and modeling_gemma3.py
(Gemma3MultiModalProjector, Gemma3Model's masked_scatter of the image features, the
token_type_ids or-mask that lets each image block attend to itself both ways), plus a tiny
random multimodal checkpoint maker and PNG writer, all with NumPy and the standard library.

Functions:
  make_checkpoint(d, layout, seed, ...)  writes config.json + model.safetensors (+ tokenizer)
  write_png(path, rgb)                    an 8-bit RGB / RGBA / grey PNG (zlib, no PIL)
  pil_bilinear(rgb, w, h)                 PIL's Image.resize(resample=BILINEAR) on uint8 RGB
  pixels(rgb)                             Gemma3ImageProcessor's rescale + normalize, [3, H, W]
  image_features(cfg, t, px)              the tower + projector: [mm_tokens, H] float64
  logits(cfg, t, ids, feats, bidir=True)  float64 logits [T, V] of ids with the image features
It owns nothing else and imports only numpy and tests/fixtures/gemma3_ref.py (for reading and
writing checkpoints and config.json's text hyper-parameters).
"""
import json
import math
import os
import struct
import zlib

import numpy as np

import gemma3_ref

TOWER = ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.",
         "model.vision_tower.")
PROJ = ("multi_modal_projector.", "model.multi_modal_projector.")
LAYOUTS = {  # text, tower, projector prefixes on disk
    "hub": ("language_model.model.", TOWER[0], PROJ[0]),
    "v5": ("model.language_model.", TOWER[1], PROJ[1]),
}


# ---- writing ------------------------------------------------------------------------------

def stored(a, dtype):
    """The float64 values a tensor has once stored in dtype."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "BF16":
        return (gemma3_ref.bf16_bits(a).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def write_png(path, img):
    """img: uint8 [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA)."""
    img = np.asarray(img, dtype=np.uint8)
    ctype = 0 if img.ndim == 2 else {3: 2, 4: 6}[img.shape[2]]
    h, w = img.shape[:2]
    rows = img.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def test_image(w, h, seed):
    """A deterministic RGB image with smooth and sharp parts."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1))
    g = (y * 255 // max(h - 1, 1))
    b = ((x // 3 + y // 5 + seed) % 2) * 200 + (seed * 37) % 50
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def make_checkpoint(d, layout="hub", seed=1, dtype="F32", image_size=32, patch=4, mm=16,
                    vocab=4160, image_id=4096, tokenizer=None):
    """A tiny random Gemma3ForConditionalGeneration checkpoint in directory d."""
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    H, L, nh, nkv, hd, I = 64, 3, 4, 2, 16, 128
    D, DI, VL, VH = 32, 48, 2, 4
    lt = ["sliding_attention", "sliding_attention", "full_attention"]
    cfg = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": 8, "eoi_token_index": 9, "image_token_index": image_id,
        "mm_tokens_per_image": mm, "eos_token_id": [1, 7], "initializer_range": 0.02,
        "text_config": {
            "model_type": "gemma3_text", "hidden_size": H, "intermediate_size": I,
            "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": nkv,
            "head_dim": hd, "query_pre_attn_scalar": 16, "sliding_window": 6,
            "layer_types": lt, "vocab_size": vocab, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 1024,
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": D, "intermediate_size": DI,
            "num_hidden_layers": VL, "num_attention_heads": VH, "image_size": image_size,
            "patch_size": patch, "layer_norm_eps": 1e-6, "vision_use_head": False,
        },
        "torch_dtype": "float32" if dtype == "F32" else "bfloat16",
    }
    tp, vp, pp = LAYOUTS[layout]
    n = lambda *s, std=0.2: rng.normal(0.0, std, s)  # noqa: E731
    t = {tp + "embed_tokens.weight": n(vocab, H, std=0.5), tp + "norm.weight": n(H, std=0.3)}
    for i in range(L):
        p = f"{tp}layers.{i}."
        for k in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            t[p + k + ".weight"] = n(H, std=0.3)
        t[p + "self_attn.q_proj.weight"] = n(nh * hd, H, std=0.15)
        t[p + "self_attn.k_proj.weight"] = n(nkv * hd, H, std=0.15)
        t[p + "self_attn.v_proj.weight"] = n(nkv * hd, H, std=0.15)
        t[p + "self_attn.o_proj.weight"] = n(H, nh * hd, std=0.15)
        t[p + "self_attn.q_norm.weight"] = n(hd, std=0.3)
        t[p + "self_attn.k_norm.weight"] = n(hd, std=0.3)
        t[p + "mlp.gate_proj.weight"] = n(I, H, std=0.15)
        t[p + "mlp.up_proj.weight"] = n(I, H, std=0.15)
        t[p + "mlp.down_proj.weight"] = n(H, I, std=0.15)
    g = image_size // patch
    t[vp + "embeddings.patch_embedding.weight"] = n(D, 3, patch, patch, std=0.15)
    t[vp + "embeddings.patch_embedding.bias"] = n(D)
    t[vp + "embeddings.position_embedding.weight"] = n(g * g, D, std=0.3)
    for i in range(VL):
        p = f"{vp}encoder.layers.{i}."
        for k in ("layer_norm1", "layer_norm2"):
            t[p + k + ".weight"] = 1.0 + n(D)
            t[p + k + ".bias"] = n(D)
        for k in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{k}.weight"] = n(D, D, std=0.3)
            t[p + f"self_attn.{k}.bias"] = n(D)
        t[p + "mlp.fc1.weight"] = n(DI, D, std=0.3)
        t[p + "mlp.fc1.bias"] = n(DI)
        t[p + "mlp.fc2.weight"] = n(D, DI, std=0.3)
        t[p + "mlp.fc2.bias"] = n(D)
    t[vp + "post_layernorm.weight"] = 1.0 + n(D)
    t[vp + "post_layernorm.bias"] = n(D)
    t[pp + "mm_soft_emb_norm.weight"] = n(D, std=0.3)
    t[pp + "mm_input_projection_weight"] = n(D, H, std=0.3)  # input-major [D, H]
    gemma3_ref.write_safetensors(os.path.join(d, "model.safetensors"), t, dtype)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer:
        with open(tokenizer, "rb") as src, open(os.path.join(d, "tokenizer.model"), "wb") as dst:
            dst.write(src.read())
    return cfg, {k: stored(v, dtype) for k, v in t.items()}


def load_checkpoint(d):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    return cfg, {k: v[1] for k, v in gemma3_ref.read_checkpoint(d).items()}


# ---- preprocessing ------------------------------------------------------------------------

def _pil_coeffs(n_in, n_out):
    """Pillow's precompute_coeffs (bilinear) + normalize_coeffs_8bpc, as a dense int matrix."""
    scale = n_in / n_out
    fs = max(scale, 1.0)
    support = fs
    m = np.zeros((n_out, n_in), dtype=np.int64)
    for o in range(n_out):
        c = (o + 0.5) * scale
        lo = max(int(c - support + 0.5), 0)
        hi = min(int(c + support + 0.5), n_in)
        w = np.array([max(0.0, 1.0 - abs((x - c + 0.5) / fs)) for x in range(lo, hi)])
        if w.sum() != 0:
            w = w / w.sum()
        m[o, lo:hi] = np.where(w < 0, (-0.5 + w * (1 << 22)).astype(np.int64),
                               (0.5 + w * (1 << 22)).astype(np.int64))
    return m


def pil_bilinear(rgb, w, h):
    """uint8 [H, W, 3] -> uint8 [h, w, 3], horizontal pass then vertical, each rounded."""
    rgb = np.asarray(rgb, dtype=np.int64)
    if rgb.shape[1] == w and rgb.shape[0] == h:
        return rgb.astype(np.uint8)
    tmp = rgb
    if rgb.shape[1] != w:
        kh = _pil_coeffs(rgb.shape[1], w)
        tmp = np.clip((np.einsum("ox,yxc->yoc", kh, rgb) + (1 << 21)) >> 22, 0, 255)
    out = tmp
    if rgb.shape[0] != h:
        kv = _pil_coeffs(rgb.shape[0], h)
        out = np.clip((np.einsum("oy,yxc->oxc", kv, tmp) + (1 << 21)) >> 22, 0, 255)
    return out.astype(np.uint8)


def pixels(rgb):
    """uint8 [H, W, 3] -> float64 [3, H, W] as the processor's rescale (float64 * 1/255 ->
    float32) and normalize ((x - 0.5) / 0.5 in float32) compute them."""
    r = (np.asarray(rgb, dtype=np.float64) * (1 / 255)).astype(np.float32)
    p = (r - np.float32(0.5)) / np.float32(0.5)
    return p.transpose(2, 0, 1).astype(np.float64)


# ---- the forward --------------------------------------------------------------------------

def _ln(x, w, b, eps):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def _prefix(t, options, probe):
    for p in options:
        if p + probe in t:
            return p
    raise KeyError(probe)


def image_features(cfg, t, px):
    """px float [3, S, S] -> float64 [mm, H]: SiglipVisionModel's last hidden state, then
    Gemma3MultiModalProjector."""
    vc = cfg["vision_config"]
    D, nh, p, S = vc["hidden_size"], vc["num_attention_heads"], vc["patch_size"], vc["image_size"]
    eps = vc.get("layer_norm_eps", 1e-6)
    vp = _prefix(t, TOWER, "post_layernorm.weight")
    pp = _prefix(t, PROJ, "mm_input_projection_weight")
    g = S // p
    # the conv (kernel = stride = p) output at (r, c), flattened row-major as patch r*g + c
    W = t[vp + "embeddings.patch_embedding.weight"]                  # [D, 3, p, p]
    patches = px.reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, 3 * p * p)
    x = patches @ W.reshape(D, -1).T + t[vp + "embeddings.patch_embedding.bias"]
    x = x + t[vp + "embeddings.position_embedding.weight"]
    hd = D // nh
    for i in range(vc["num_hidden_layers"]):
        q = f"{vp}encoder.layers.{i}."
        lin = lambda a, k: a @ t[q + k + ".weight"].T + t[q + k + ".bias"]  # noqa: E731
        a = _ln(x, t[q + "layer_norm1.weight"], t[q + "layer_norm1.bias"], eps)
        Q = lin(a, "self_attn.q_proj").reshape(-1, nh, hd)
        K = lin(a, "self_attn.k_proj").reshape(-1, nh, hd)
        V = lin(a, "self_attn.v_proj").reshape(-1, nh, hd)
        s = np.einsum("qhd,khd->hqk", Q, K) * hd ** -0.5           # no mask: bidirectional
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, V).reshape(-1, D)
        x = x + lin(o, "self_attn.out_proj")
        a = _ln(x, t[q + "layer_norm2.weight"], t[q + "layer_norm2.bias"], eps)
        x = x + lin(gemma3_ref._gelu_tanh(lin(a, "mlp.fc1")), "mlp.fc2")
    x = _ln(x, t[vp + "post_layernorm.weight"], t[vp + "post_layernorm.bias"], eps)
    side = int(round(math.sqrt(cfg.get("mm_tokens_per_image", 256))))
    k = g // side
    pooled = x.reshape(side, k, side, k, D).mean(axis=(1, 3)).reshape(side * side, D)
    normed = gemma3_ref._rms(pooled, t[pp + "mm_soft_emb_norm.weight"], eps)
    return normed @ t[pp + "mm_input_projection_weight"]


def logits(cfg, t, ids, feats, bidir=True, window_outside_block=False):
    """float64 logits [T, V]: image tokens take feats' rows (unscaled), the rest E[id]*sqrt(H);
    a key is visible when it is not later than the query OR both lie in the same run of image
    tokens, and (sliding layers) the query is less than the window past it: transformers 5.17's
    mask from token_type_ids (its sliding window cuts the block on the past side too; measured
    against Gemma3ForConditionalGeneration by tests/fixtures/make_vision_fixture.py).
    window_outside_block (a diagnostic of another reading): the window cuts only the causal part,
    the whole block stays visible."""
    spec = gemma3_ref.spec_from_config(cfg)
    _, w = gemma3_ref.text_weights({k: (None, v) for k, v in t.items()})
    H, nh, nkv, hd = (spec["hidden_size"], spec["num_attention_heads"],
                      spec["num_key_value_heads"], spec["head_dim"])
    eps = spec["rms_norm_eps"]
    E = w["embed_tokens.weight"]
    img = _top(cfg, "image_token", 262144)
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    is_img = ids == img
    h = E[np.where(is_img & (ids >= E.shape[0]), 0, ids)] * math.sqrt(H)
    if feats is not None:
        assert is_img.sum() == len(feats), (is_img.sum(), len(feats))
        h[is_img] = feats
    group = np.cumsum(is_img & ~np.concatenate([[False], is_img[:-1]])) - 1
    group = np.where(is_img, group, -1)
    qi, ki = np.arange(T)[:, None], np.arange(T)[None, :]
    same = (group[:, None] >= 0) & (group[:, None] == group[None, :])
    pos = np.arange(T, dtype=np.float64)
    for i in range(spec["num_hidden_layers"]):
        p = f"layers.{i}."
        lt = spec["layer_types"][i]
        a = gemma3_ref._rms(h, w[p + "input_layernorm.weight"], eps)
        q = (a @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
        q = gemma3_ref._rms(q, w[p + "self_attn.q_norm.weight"], eps)
        k = gemma3_ref._rms(k, w[p + "self_attn.k_norm.weight"], eps)
        theta, factor = spec["rope"][lt]
        inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd) / factor
        ang = pos[:, None] * inv[None, :]
        cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]
        q = q * cos + gemma3_ref._rotate_half(q) * sin
        k = k * cos + gemma3_ref._rotate_half(k) * sin
        k = np.repeat(k, nh // nkv, axis=1)
        v = np.repeat(v, nh // nkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) * spec["query_pre_attn_scalar"] ** -0.5
        allowed = ki <= qi
        if bidir and not window_outside_block:
            allowed = allowed | same
        if lt == "sliding_attention":
            allowed = allowed & (qi - ki < spec["sliding_window"])
        if bidir and window_outside_block:
            allowed = allowed | same
        s = np.where(allowed[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, v).reshape(T, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        h = h + gemma3_ref._rms(o, w[p + "post_attention_layernorm.weight"], eps)
        m = gemma3_ref._rms(h, w[p + "pre_feedforward_layernorm.weight"], eps)
        f = gemma3_ref._gelu_tanh(m @ w[p + "mlp.gate_proj.weight"].T) * (m @ w[p + "mlp.up_proj.weight"].T)
        h = h + gemma3_ref._rms(f @ w[p + "mlp.down_proj.weight"].T, w[p + "post_feedforward_layernorm.weight"], eps)
    h = gemma3_ref._rms(h, w["norm.weight"], eps)
    return h @ E.T


def _top(cfg, key, default):
    """Gemma3Config's top-level ids under either spelling (*_index, or *_id)."""
    for k in (key + "_index", key + "_id"):
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def image_ids(cfg, text_before=(2, 300, 301), text_after=(302, 303, 304, 305, 306, 307), n_images=1):
    """[bos, text..., (boi, mm x image, eoi) per image, text...]."""
    mm = cfg.get("mm_tokens_per_image", 256)
    out = list(text_before)
    for _ in range(n_images):
        out += [_top(cfg, "boi_token", 255999)] + [_top(cfg, "image_token", 262144)] * mm
        out += [_top(cfg, "eoi_token", 256000)]
    return out + list(text_after)
