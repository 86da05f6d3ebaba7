/* mmproj_export.c — Gemma 3's image tower and projector as llama.cpp's mmproj GGUF.
 *
 * What llama.cpp expects, and where each fact comes from (llama.cpp's source):
 *   - metadata: conversion/base.py MmprojModel.set_gguf_parameters and conversion/gemma.py
 *     Gemma3VisionModel write general.architecture "clip", general.type "mmproj",
 *     clip.has_vision_encoder, clip.projector_type "gemma3", clip.use_gelu, and the
 *     clip.vision.* hyperparameters (image_size, patch_size, embedding_length,
 *     feed_forward_length, block_count, attention.head_count, attention.layer_norm_epsilon,
 *     projection_dim = the text model's hidden size, image_mean / image_std), plus
 *     clip.vision.projector.scale_factor when the pooling is not Gemma 3's 4x4 (tiny test
 *     models); tools/mtmd/clip.cpp's clip_model_loader::load_hparams reads them (counts u32, eps
 *     f32, mean / std f32 arrays of 3) and defaults n_merge to 4 for gemma3;
 *   - tensor names: gguf-py/gguf/tensor_mapping.py and constants.py (v.patch_embd,
 *     v.position_embd, v.blk.N.{ln1, attn_q, attn_k, attn_v, attn_out, ln2, ffn_up (fc1),
 *     ffn_down (fc2)}, v.post_ln, mm.soft_emb_norm, mm.input_projection), as clip-impl.h's TN_*
 *     look them up;
 *   - values: Gemma3VisionModel.modify_tensors adds 1 to mm_soft_emb_norm (Gemma's RMSNorm
 *     scales by 1 + w; clip.cpp's siglip graph multiplies by the stored weight); every other
 *     tensor goes in as transformers stores it, so mm.input_projection keeps its input-major
 *     [D, H] layout (ne = [H, D]): tools/mtmd/models/siglip.cpp transposes it in the graph, and
 *     clip_n_mmproj_embd reads the text width from its ne[0]. The patch conv [D, 3, p, p] is
 *     4-D (ne = [p, p, 3, D]);
 *   - types: conversion/base.py prepare_tensors keeps 1-D tensors and *_norm.weight in f32,
 *     Gemma3VisionModel.tensor_force_quant forces the embeddings to f32 and the projection to
 *     f16 (mmproj_tensor_type).
 * lathe keeps the projection transposed ([H, D], siglip.c) for its linear op; it is transposed
 * back here. Rows are read from host or backend memory (a device copy of the tower), widened to
 * fp32 with any enabled LoRA adapter merged (W + scale·B·A) and written by formats/gguf.h.
 * Must not touch: the model (read-only), files other than the output (the writer owns it).
 */
#include "cuda/export/mmproj_export.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/model/siglip.h"

int mmproj_default_path(const char *text_path, char *out, size_t cap) {
    const char *slash = strrchr(text_path, '/');
    int dir = slash ? (int)(slash - text_path + 1) : 0;
    int n = snprintf(out, cap, "%.*smmproj-%s", dir, text_path, text_path + dir);
    return n < 0 || (size_t)n >= cap ? -1 : 0;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

gguf_type mmproj_tensor_type(gguf_ftype f, const char *name, int n_dims) {
    if (n_dims <= 1 || ends_with(name, "_norm.weight")) return GGUF_TYPE_F32;
    if (strcmp(name, "v.patch_embd.weight") == 0 || strcmp(name, "v.position_embd.weight") == 0)
        return GGUF_TYPE_F32;
    if (strcmp(name, "mm.input_projection.weight") == 0) return GGUF_TYPE_F16;
    return f == GGUF_FTYPE_F32    ? GGUF_TYPE_F32
           : f == GGUF_FTYPE_BF16 ? GGUF_TYPE_BF16
                                  : GGUF_TYPE_F16;
}

/* ---- one tensor's rows ------------------------------------------------------------------ */

typedef struct mm_src {
    lt_ctx *dev;         /* backend holding the tower; NULL = host memory */
    const lt_tensor *t;  /* lathe's tensor, [rows, ne0] (1-D: one row) */
    const lt_lora *lora; /* merged when non-NULL and enabled */
    float add;           /* +1 for mm_soft_emb_norm */
    int transpose;       /* the projection: lathe's [H, D] written as transformers' [D, H] */
    int64_t ne0;         /* the file's row length (the patch conv's rows are p long) */
    float *whole;        /* the transposed matrix, made on first use */
} mm_src;

/* dst[n] fp32 <- n elements of t from element `first`. */
static lt_status read_f32(lt_ctx *dev, const lt_tensor *t, int64_t first, int64_t n, float *dst,
                          char *err, size_t errlen) {
    size_t es = lt_dtype_size(t->dtype);
    const uint8_t *src = (const uint8_t *)t->data + (size_t)first * es;
    if (t->dtype != LT_F32 && t->dtype != LT_F16 && t->dtype != LT_BF16) {
        snprintf(err, errlen, "unsupported weight dtype %s", lt_dtype_name(t->dtype));
        return LT_ERR_FORMAT;
    }
    if (!dev) {
        lt_to_f32(dst, src, t->dtype, n);
        return LT_OK;
    }
    /* a device copy: bring the bytes over, then widen (F32 lands in place) */
    void *stage = t->dtype == LT_F32 ? (void *)dst : malloc((size_t)n * es);
    if (!stage) {
        snprintf(err, errlen, "out of memory staging %lld weights", (long long)n);
        return LT_ERR_MEMORY;
    }
    lt_status st = dev->be->download(dev, stage, src, (size_t)n * es);
    if (st != LT_OK)
        snprintf(err, errlen, "reading the image tower from %s: %s", dev->be->name, dev->err);
    else if (stage != dst)
        lt_to_f32(dst, stage, t->dtype, n);
    if (stage != dst) free(stage);
    return st;
}

/* dst [nrows, ne0] <- rows [row0, row0 + nrows) of the tensor as the file lays it out (the
 * same bytes as lathe's; rows of s->ne0), adapter merged. */
static lt_status lathe_rows(mm_src *s, int64_t row0, int64_t nrows, float *dst, char *err,
                            size_t errlen) {
    const lt_tensor *t = s->t;
    const int64_t ne0 = s->ne0;
    lt_status st = read_f32(s->dev, t, row0 * ne0, nrows * ne0, dst, err, errlen);
    const lt_lora *lo = s->lora;
    if (st != LT_OK || !lo || !lo->enabled || !lo->a.data || !lo->b.data || lo->scale == 0.0f)
        return st;
    const int64_t r = lo->a.shape[0]; /* a: [r, in], b: [out, r] */
    if (lo->a.shape[1] != ne0 || lo->b.shape[1] != r || t->shape[t->ndim - 1] != ne0) {
        snprintf(err, errlen, "LoRA adapter shapes do not match the weight");
        return LT_ERR_ARG;
    }
    float *a = malloc(sizeof(float) * (size_t)(r * ne0));
    float *b = malloc(sizeof(float) * (size_t)(nrows * r));
    if (!a || !b) {
        free(a);
        free(b);
        snprintf(err, errlen, "out of memory for the LoRA matrices");
        return LT_ERR_MEMORY;
    }
    st = read_f32(s->dev, &lo->a, 0, r * ne0, a, err, errlen);
    if (st == LT_OK) st = read_f32(s->dev, &lo->b, row0 * r, nrows * r, b, err, errlen);
    for (int64_t o = 0; st == LT_OK && o < nrows; ++o) /* W[o, :] += scale · B[o, :] · A */
        for (int64_t k = 0; k < r; ++k) {
            const float c = lo->scale * b[o * r + k];
            for (int64_t j = 0; j < ne0; ++j)
                dst[o * ne0 + j] += c * a[k * ne0 + j];
        }
    free(a);
    free(b);
    return st;
}

static lt_status fill_rows(void *vctx, int64_t row0, int64_t nrows, float *dst, char *err,
                           size_t errlen) {
    mm_src *s = vctx;
    if (s->transpose) {
        const int64_t H = s->t->shape[0], D = s->t->shape[1]; /* lathe: [H, D]; file: [D, H] */
        if (!s->whole) {
            float *hd = malloc(sizeof(float) * (size_t)(H * D));
            s->whole = malloc(sizeof(float) * (size_t)(H * D));
            s->ne0 = D; /* read as lathe keeps it, then transposed */
            lt_status st = hd && s->whole ? lathe_rows(s, 0, H, hd, err, errlen) : LT_ERR_MEMORY;
            if (st == LT_ERR_MEMORY && (!hd || !s->whole))
                snprintf(err, errlen, "out of memory for the projection");
            if (st == LT_OK)
                for (int64_t h = 0; h < H; ++h)
                    for (int64_t d = 0; d < D; ++d)
                        s->whole[d * H + h] = hd[h * D + d];
            free(hd);
            if (st != LT_OK) {
                free(s->whole);
                s->whole = NULL;
                return st;
            }
        }
        memcpy(dst, s->whole + row0 * H, sizeof(float) * (size_t)(nrows * H));
        return LT_OK;
    }
    lt_status st = lathe_rows(s, row0, nrows, dst, err, errlen);
    if (st == LT_OK && s->add != 0.0f) {
        for (int64_t i = 0; i < nrows * s->ne0; ++i)
            dst[i] += s->add;
    }
    return st;
}

/* ---- the export ------------------------------------------------------------------------- */

enum { MM_FIXED = 7, MM_PER_LAYER = 16 }; /* tensors outside the layers / in each layer */

typedef struct mm_export {
    gguf_writer *w;
    gguf_ftype ftype;
    lt_ctx *dev;
    mm_src *srcs;
    int n, cap;
    char *err;
} mm_export;

/* Declares one tensor: lathe's t (its matrices [out, in]; the patch conv seen as [D, 3·p·p])
 * under name with n_dims / ne (fastest first). */
static lt_status add(mm_export *e, const char *name, const lt_tensor *t, const lt_weight *lw,
                     int n_dims, const int64_t *ne, float add_one, int transpose) {
    if (!t->data)
        return lt_fail(e->err, LT_ERR_STATE, "mmproj export: tensor '%s' has no data", name);
    if (lw && lw->q.kind != LT_QUANT_NONE)
        return lt_fail(e->err, LT_ERR_FORMAT,
                       "mmproj export: tensor '%s' is quantized; the image tower is exported "
                       "from 16/32-bit weights only",
                       name);
    if (e->n == e->cap)
        return lt_fail(e->err, LT_ERR_STATE, "mmproj export: more tensors than counted");
    mm_src *s = &e->srcs[e->n++];
    memset(s, 0, sizeof *s);
    s->dev = e->dev;
    s->t = t;
    s->lora = lw ? lw->lora : NULL;
    s->add = add_one;
    s->transpose = transpose;
    s->ne0 = ne[0];
    int64_t n_file = 1;
    for (int d = 0; d < n_dims; d++)
        n_file *= ne[d];
    if (n_file != lt_tensor_numel(t))
        return lt_fail(e->err, LT_ERR_STATE, "mmproj export: tensor '%s' has %lld values, not %lld",
                       name, (long long)lt_tensor_numel(t), (long long)n_file);
    lt_status st = gguf_add_tensor(e->w, name, n_dims, ne,
                                   mmproj_tensor_type(e->ftype, name, n_dims), fill_rows, s);
    if (st != LT_OK) return lt_fail(e->err, st, "%s", gguf_writer_error(e->w));
    return LT_OK;
}

static lt_status add_vec(mm_export *e, const char *name, const lt_tensor *t, float add_one) {
    int64_t ne[1] = {lt_tensor_numel(t)};
    return add(e, name, t, NULL, 1, ne, add_one, 0);
}

static lt_status add_mat(mm_export *e, const char *name, const lt_weight *w) {
    int64_t ne[2] = {w->w.shape[1], w->w.shape[0]};
    return add(e, name, &w->w, w, 2, ne, 0.0f, 0);
}

static lt_status add_layer(mm_export *e, const siglip_layer *L, int l) {
    static const char *const names[MM_PER_LAYER] = {
        "ln1.weight",      "ln1.bias",      "attn_q.weight",   "attn_q.bias",
        "attn_k.weight",   "attn_k.bias",   "attn_v.weight",   "attn_v.bias",
        "attn_out.weight", "attn_out.bias", "ln2.weight",      "ln2.bias",
        "ffn_up.weight",   "ffn_up.bias",   "ffn_down.weight", "ffn_down.bias"};
    const lt_tensor *vecs[MM_PER_LAYER] = {
        &L->ln1_w, &L->ln1_b, NULL,      &L->q_b,   NULL, &L->k_b,   NULL, &L->v_b,
        NULL,      &L->o_b,   &L->ln2_w, &L->ln2_b, NULL, &L->fc1_b, NULL, &L->fc2_b};
    const lt_weight *mats[MM_PER_LAYER] = {NULL,  NULL, &L->q, NULL, &L->k,   NULL, &L->v,   NULL,
                                           &L->o, NULL, NULL,  NULL, &L->fc1, NULL, &L->fc2, NULL};
    for (int i = 0; i < MM_PER_LAYER; i++) {
        char name[64];
        snprintf(name, sizeof name, "v.blk.%d.%s", l, names[i]);
        lt_status st = mats[i] ? add_mat(e, name, mats[i]) : add_vec(e, name, vecs[i], 0.0f);
        if (st != LT_OK) return st;
    }
    return LT_OK;
}

static void say(const lt_callbacks *cb, const char *text) {
    if (cb && cb->message) cb->message(cb->ctx, text);
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        st = (call);                                                                               \
        if (st != LT_OK) {                                                                         \
            lt_fail(err, st, "mmproj export: %s", gguf_writer_error(w));                           \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)
#define TRY(call)                                                                                  \
    do {                                                                                           \
        if ((st = (call)) != LT_OK) goto done;                                                     \
    } while (0)

lt_status mmproj_export_gemma3(const gemma3_model *m, lt_ctx *dev, const char *path,
                               const gguf_export_opts *o, gguf_export_result *res, char *err) {
    err[0] = '\0';
    if (res) memset(res, 0, sizeof *res);
    if (!o) return lt_fail(err, LT_ERR_ARG, "mmproj export: no options");
    const siglip_tower *t = m->vision;
    if (!t)
        return lt_fail(err, LT_ERR_STATE, "mmproj export: the model has no image tower (%s)",
                       m->vision_error[0] ? m->vision_error : "text only");
    if (t->arena && !dev)
        return lt_fail(err, LT_ERR_ARG,
                       "mmproj export: the image tower is in backend memory and no backend was "
                       "given to read it");
    const gemma3_vision_config *vc = &t->cfg;
    const int g = vc->image_size / vc->patch_size;
    const int side = (int)lround(sqrt((double)vc->mm_tokens_per_image));
    if (side <= 0 || side * side != vc->mm_tokens_per_image || g % side != 0)
        return lt_fail(err, LT_ERR_ARG,
                       "mmproj export: %d soft tokens per image do not pool a %dx%d patch grid "
                       "into a square (llama.cpp's gemma3 projector average-pools k x k)",
                       vc->mm_tokens_per_image, g, g);
    const int k = g / side;

    lt_status st = LT_OK;
    mm_export e = {0};
    e.ftype = o->ftype;
    e.dev = t->arena ? dev : NULL;
    e.err = err;
    e.cap = MM_FIXED + MM_PER_LAYER * vc->num_hidden_layers;
    e.srcs = calloc((size_t)e.cap, sizeof *e.srcs);
    gguf_writer *w = e.w = gguf_writer_new();
    if (!e.srcs || !w) {
        st = lt_fail(err, LT_ERR_MEMORY, "mmproj export: out of memory");
        goto done;
    }

    /* general.* and clip.* as convert_hf_to_gguf.py --mmproj writes them for Gemma 3 */
    const char *base = strrchr(m->source, '/');
    base = base && base[1] ? base + 1 : m->source;
    const float mean[3] = {0.5f, 0.5f, 0.5f}, stdv[3] = {0.5f, 0.5f, 0.5f}; /* image.c's */
    CHECK(gguf_set_str(w, "general.architecture", "clip"));
    CHECK(gguf_set_str(w, "general.type", "mmproj"));
    CHECK(gguf_set_str(w, "general.name", o->name ? o->name : base[0] ? base : "gemma3"));
    CHECK(gguf_set_u32(w, "general.file_type", (uint32_t)o->ftype));
    CHECK(gguf_set_u32(w, "general.quantization_version", 2));
    CHECK(gguf_set_u32(w, "general.alignment", 32));
    CHECK(gguf_set_bool(w, "clip.has_vision_encoder", 1));
    CHECK(gguf_set_u32(w, "clip.vision.projection_dim", (uint32_t)t->text_hidden));
    CHECK(gguf_set_u32(w, "clip.vision.image_size", (uint32_t)vc->image_size));
    CHECK(gguf_set_u32(w, "clip.vision.patch_size", (uint32_t)vc->patch_size));
    CHECK(gguf_set_u32(w, "clip.vision.embedding_length", (uint32_t)vc->hidden_size));
    CHECK(gguf_set_u32(w, "clip.vision.feed_forward_length", (uint32_t)vc->intermediate_size));
    CHECK(gguf_set_u32(w, "clip.vision.block_count", (uint32_t)vc->num_hidden_layers));
    CHECK(gguf_set_u32(w, "clip.vision.attention.head_count", (uint32_t)vc->num_attention_heads));
    CHECK(gguf_set_arr_f32(w, "clip.vision.image_mean", mean, 3));
    CHECK(gguf_set_arr_f32(w, "clip.vision.image_std", stdv, 3));
    CHECK(gguf_set_str(w, "clip.projector_type", "gemma3"));
    CHECK(gguf_set_f32(w, "clip.vision.attention.layer_norm_epsilon", (float)vc->layer_norm_eps));
    CHECK(gguf_set_bool(w, "clip.use_gelu", 1));
    if (k != 4) CHECK(gguf_set_u32(w, "clip.vision.projector.scale_factor", (uint32_t)k));

    /* tensors: the embeddings, the layers, post_layernorm, the projector */
    {
        const int64_t p = vc->patch_size, D = vc->hidden_size;
        int64_t conv[4] = {p, p, vc->num_channels, D};
        TRY(add(&e, "v.patch_embd.weight", &t->patch.w, &t->patch, 4, conv, 0.0f, 0));
        TRY(add_vec(&e, "v.patch_embd.bias", &t->patch_b, 0.0f));
        int64_t pos[2] = {D, (int64_t)g * g};
        TRY(add(&e, "v.position_embd.weight", &t->pos, NULL, 2, pos, 0.0f, 0));
        for (int l = 0; l < vc->num_hidden_layers; l++)
            TRY(add_layer(&e, &t->layers[l], l));
        TRY(add_vec(&e, "v.post_ln.weight", &t->post_w, 0.0f));
        TRY(add_vec(&e, "v.post_ln.bias", &t->post_b, 0.0f));
        TRY(add_vec(&e, "mm.soft_emb_norm.weight", &t->mm_norm, 1.0f)); /* Gemma's 1 + w */
        int64_t proj[2] = {t->text_hidden, D};                          /* transformers' [D, H] */
        TRY(add(&e, "mm.input_projection.weight", &t->mm_proj.w, &t->mm_proj, 2, proj, 0.0f, 1));
    }
    if (o->ftype != GGUF_FTYPE_F32 && o->ftype != GGUF_FTYPE_BF16)
        say(o->cb, "the image tower's matrices are written in f16 (llama.cpp's mmproj files are "
                   "not quantized)");

    uint64_t bytes;
    if ((st = gguf_export_write(w, path, o, "export mmproj", &bytes, err)) != LT_OK) goto done;
    if (res) {
        res->bytes = bytes;
        res->n_tensors = e.n;
    }
done:
    for (int i = 0; i < e.n; i++)
        free(e.srcs[i].whole);
    free(e.srcs);
    gguf_writer_free(w);
    return st;
}
