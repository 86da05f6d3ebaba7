/* siglip.c — the SigLIP image tower and Gemma 3's multimodal projector: loading from a
 * checkpoint and the forward of one image, written against backend.h (siglip.h says what).
 *
 * The forward reads like transformers' modeling_siglip.py (SiglipVisionEmbeddings, the
 * encoder layers, post_layernorm) followed by modeling_gemma3.py's Gemma3MultiModalProjector:
 *   x = patches · Wpatchᵀ + b + pos            the conv with stride = kernel = patch size is a
 *                                               linear on each flattened (c, y, x) patch
 *   per layer: x += o(attn(ln1(x))), x += fc2(gelu_tanh(fc1(ln2(x))))   biases everywhere,
 *              attention bidirectional (every patch sees every patch), scale head_dim^-0.5
 *   x = post_layernorm(x)
 *   y = rmsnorm(avg_pool_k(x)) (1 + w), eps = the vision layer_norm_eps; out = y · Wproj
 * Bidirectional attention is the table's attention op with every position 0 (then every key
 * satisfies kpos <= qpos). Owns siglip_tower; never branches on the device.
 */
#include "cuda/model/siglip.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The Hub's files and transformers 4.5x write the SiglipVisionModel's own `vision_model.`
 * level; transformers 5 keeps the tower's modules one level up (model.vision_tower.embeddings.
 * in memory), and files written from that tree have no `vision_model.`. */
static const char *const tower_prefixes[] = {"vision_tower.vision_model.",
                                             "model.vision_tower.vision_model.", "vision_tower.",
                                             "model.vision_tower."};
static const char *const proj_prefixes[] = {"multi_modal_projector.",
                                            "model.multi_modal_projector."};

void siglip_free(siglip_tower *t) {
    if (!t) return;
    for (int i = 0; i < t->n_blocks; i++)
        free(t->blocks[i]);
    free(t->blocks);
    free(t->layers);
    free(t);
}

static void *tower_alloc(siglip_tower *t, size_t bytes) {
    if (t->n_blocks == t->cap_blocks) {
        int nc = t->cap_blocks ? t->cap_blocks * 2 : 64;
        void **nb = realloc(t->blocks, sizeof(void *) * (size_t)nc);
        if (!nb) return NULL;
        t->blocks = nb;
        t->cap_blocks = nc;
    }
    void *p = malloc(bytes ? bytes : 1);
    if (p) t->blocks[t->n_blocks++] = p;
    return p;
}

int siglip_present(const st_set *st) {
    for (size_t i = 0; i < sizeof tower_prefixes / sizeof *tower_prefixes; i++) {
        char n[160];
        snprintf(n, sizeof n, "%sembeddings.patch_embedding.weight", tower_prefixes[i]);
        if (st_find(st, n)) return 1;
    }
    return 0;
}

/* The tensor pfx+suffix with the given shape (ndim dims of dims[]), or an error naming it. */
static lt_status find(const st_set *st, const char *pfx, const char *suffix, int ndim,
                      const int64_t *dims, const st_tensor **out, char *err) {
    char name[256];
    snprintf(name, sizeof name, "%s%s", pfx, suffix);
    const st_tensor *s = st_find(st, name);
    if (!s)
        return lt_fail(err, LT_ERR_FORMAT,
                       "image tower: tensor '%s' is missing (config.json has a vision_config)",
                       name);
    int ok = s->ndim == ndim && s->dtype_ok && lt_dtype_is_float(s->dtype);
    for (int d = 0; ok && d < ndim; d++)
        ok = s->shape[d] == dims[d];
    if (!ok) {
        char got[96];
        st_shape_str(s, got, sizeof got);
        char want[96] = "[";
        for (int d = 0; d < ndim; d++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", d ? ", " : "",
                     (long long)dims[d]);
        snprintf(want + strlen(want), sizeof want - strlen(want), "]");
        return lt_fail(err, LT_ERR_FORMAT,
                       "image tower: tensor '%s' is %s %s, but vision_config implies float %s",
                       name, s->dtype_name, got, want);
    }
    *out = s;
    return LT_OK;
}

#define LAYER_FIELD(f) offsetof(siglip_layer, f)
const siglip_layer_tensor siglip_layer_tensors[SIGLIP_LAYER_TENSORS] = {
    {"layer_norm1.weight", LAYER_FIELD(ln1_w), 'D', 0},
    {"layer_norm1.bias", LAYER_FIELD(ln1_b), 'D', 0},
    {"self_attn.q_proj.weight", LAYER_FIELD(q), 'D', 'D'},
    {"self_attn.q_proj.bias", LAYER_FIELD(q_b), 'D', 0},
    {"self_attn.k_proj.weight", LAYER_FIELD(k), 'D', 'D'},
    {"self_attn.k_proj.bias", LAYER_FIELD(k_b), 'D', 0},
    {"self_attn.v_proj.weight", LAYER_FIELD(v), 'D', 'D'},
    {"self_attn.v_proj.bias", LAYER_FIELD(v_b), 'D', 0},
    {"self_attn.out_proj.weight", LAYER_FIELD(o), 'D', 'D'},
    {"self_attn.out_proj.bias", LAYER_FIELD(o_b), 'D', 0},
    {"layer_norm2.weight", LAYER_FIELD(ln2_w), 'D', 0},
    {"layer_norm2.bias", LAYER_FIELD(ln2_b), 'D', 0},
    {"mlp.fc1.weight", LAYER_FIELD(fc1), 'I', 'D'},
    {"mlp.fc1.bias", LAYER_FIELD(fc1_b), 'I', 0},
    {"mlp.fc2.weight", LAYER_FIELD(fc2), 'D', 'I'},
    {"mlp.fc2.bias", LAYER_FIELD(fc2_b), 'D', 0},
};
#undef LAYER_FIELD

/* A vector [n] converted to fp32. */
static lt_status load_vec(siglip_tower *t, const st_set *st, const char *pfx, const char *suffix,
                          int64_t n, lt_tensor *dst, char *err) {
    const st_tensor *s;
    lt_status rc = find(st, pfx, suffix, 1, &n, &s, err);
    if (rc != LT_OK) return rc;
    float *p = tower_alloc(t, sizeof(float) * (size_t)n);
    if (!p || st_convert(s, p, LT_F32) != LT_OK)
        return lt_fail(err, LT_ERR_MEMORY, "image tower: out of memory reading '%s%s'", pfx,
                       suffix);
    *dst = lt_tensor_1d(LT_F32, p, n);
    t->n_params += n;
    return LT_OK;
}

/* A matrix seen as [rows, cols] (the tensor's own shape is dims[ndim]): mapped as stored when
 * it is a float dtype aligned to its element, else converted to fp32. */
static lt_status load_mat(siglip_tower *t, const st_set *st, const char *pfx, const char *suffix,
                          int ndim, const int64_t *dims, int64_t rows, int64_t cols, lt_weight *w,
                          char *err) {
    const st_tensor *s;
    lt_status rc = find(st, pfx, suffix, ndim, dims, &s, err);
    if (rc != LT_OK) return rc;
    memset(w, 0, sizeof *w);
    if (((uintptr_t)s->data % lt_dtype_size(s->dtype)) == 0) {
        w->w = lt_tensor_2d(s->dtype, (void *)s->data, rows, cols);
    } else {
        float *p = tower_alloc(t, sizeof(float) * (size_t)(rows * cols));
        if (!p || st_convert(s, p, LT_F32) != LT_OK)
            return lt_fail(err, LT_ERR_MEMORY, "image tower: out of memory reading '%s%s'", pfx,
                           suffix);
        w->w = lt_tensor_2d(LT_F32, p, rows, cols);
    }
    t->n_params += rows * cols;
    return LT_OK;
}

lt_status siglip_load(siglip_tower **out, const st_set *st, const gemma3_config *c, char *err) {
    *out = NULL;
    const gemma3_vision_config *vc = &c->vision;
    if (!vc->present)
        return lt_fail(err, LT_ERR_ARG, "image tower: config.json has no vision_config");
    const char *pfx = NULL, *ppfx = NULL;
    for (size_t i = 0; i < sizeof tower_prefixes / sizeof *tower_prefixes && !pfx; i++) {
        char n[160];
        snprintf(n, sizeof n, "%sembeddings.patch_embedding.weight", tower_prefixes[i]);
        if (st_find(st, n)) pfx = tower_prefixes[i];
    }
    for (size_t i = 0; i < sizeof proj_prefixes / sizeof *proj_prefixes && !ppfx; i++) {
        char n[160];
        snprintf(n, sizeof n, "%smm_input_projection_weight", proj_prefixes[i]);
        if (st_find(st, n)) ppfx = proj_prefixes[i];
    }
    if (!pfx || !ppfx)
        return lt_fail(err, LT_ERR_FORMAT,
                       "image tower: config.json has a vision_config but the checkpoint has no "
                       "%s (looked under %s)",
                       !pfx ? "embeddings.patch_embedding.weight" : "mm_input_projection_weight",
                       !pfx ? "vision_tower.vision_model., model.vision_tower.vision_model., "
                              "vision_tower., model.vision_tower."
                            : "multi_modal_projector., model.multi_modal_projector.");
    siglip_tower *t = calloc(1, sizeof *t);
    if (t) t->layers = calloc((size_t)vc->num_hidden_layers, sizeof(siglip_layer));
    if (!t || !t->layers) {
        siglip_free(t);
        return lt_fail(err, LT_ERR_MEMORY, "image tower: out of memory");
    }
    t->cfg = *vc;
    t->text_hidden = c->hidden_size;
    snprintf(t->prefix, sizeof t->prefix, "%s", pfx);
    snprintf(t->proj_prefix, sizeof t->proj_prefix, "%s", ppfx);
    int64_t D = vc->hidden_size, p = vc->patch_size, g = vc->image_size / vc->patch_size,
            H = c->hidden_size;
    lt_status rc = LT_OK;
    {
        int64_t conv[4] = {D, vc->num_channels, p, p}, pos[2] = {g * g, D};
        LT_TRY(load_mat(t, st, pfx, "embeddings.patch_embedding.weight", 4, conv, D,
                        vc->num_channels * p * p, &t->patch, err));
        LT_TRY(load_vec(t, st, pfx, "embeddings.patch_embedding.bias", D, &t->patch_b, err));
        const st_tensor *s;
        LT_TRY(find(st, pfx, "embeddings.position_embedding.weight", 2, pos, &s, err));
        float *pe = tower_alloc(t, sizeof(float) * (size_t)(g * g * D));
        if (!pe || st_convert(s, pe, LT_F32) != LT_OK) {
            rc = lt_fail(err, LT_ERR_MEMORY, "image tower: out of memory");
            goto done;
        }
        t->pos = lt_tensor_2d(LT_F32, pe, g * g, D);
        t->n_params += g * g * D;
    }
    for (int l = 0; l < vc->num_hidden_layers; l++) {
        siglip_layer *L = &t->layers[l];
        char lp[160];
        snprintf(lp, sizeof lp, "%sencoder.layers.%d.", pfx, l);
        for (int i = 0; i < SIGLIP_LAYER_TENSORS; i++) {
            const siglip_layer_tensor *e = &siglip_layer_tensors[i];
            int64_t rows = siglip_dim(vc, e->rows);
            if (e->cols) {
                int64_t cols = siglip_dim(vc, e->cols), dims[2] = {rows, cols};
                LT_TRY(load_mat(t, st, lp, e->name, 2, dims, rows, cols,
                                (lt_weight *)((char *)L + e->offset), err));
            } else {
                LT_TRY(
                    load_vec(t, st, lp, e->name, rows, (lt_tensor *)((char *)L + e->offset), err));
            }
        }
    }
    LT_TRY(load_vec(t, st, pfx, "post_layernorm.weight", D, &t->post_w, err));
    LT_TRY(load_vec(t, st, pfx, "post_layernorm.bias", D, &t->post_b, err));
    LT_TRY(load_vec(t, st, ppfx, "mm_soft_emb_norm.weight", D, &t->mm_norm, err));
    {
        /* stored input-major [D, H] and used as x @ W (not nn.Linear): transposed here into
         * the [out, in] = [H, D] the linear op takes */
        int64_t dh[2] = {D, H};
        const st_tensor *s;
        LT_TRY(find(st, ppfx, "mm_input_projection_weight", 2, dh, &s, err));
        float *tmp = malloc(sizeof(float) * (size_t)(D * H));
        float *wt = tower_alloc(t, sizeof(float) * (size_t)(D * H));
        if (!tmp || !wt || st_convert(s, tmp, LT_F32) != LT_OK) {
            free(tmp);
            rc = lt_fail(err, LT_ERR_MEMORY, "image tower: out of memory");
            goto done;
        }
        for (int64_t i = 0; i < D; i++)
            for (int64_t j = 0; j < H; j++)
                wt[j * D + i] = tmp[i * H + j];
        free(tmp);
        memset(&t->mm_proj, 0, sizeof t->mm_proj);
        t->mm_proj.w = lt_tensor_2d(LT_F32, wt, H, D);
        t->n_params += D * H;
    }
done:
    if (rc != LT_OK) {
        siglip_free(t);
        return rc;
    }
    *out = t;
    return LT_OK;
}

/* ---- a device copy --------------------------------------------------------------------------- */

/* Every tensor of t in a fixed order; matrix[i] = 1 for the linears' weights. Returns the count
 * (ts / matrix may be NULL to count). */
static int tower_tensors(siglip_tower *t, lt_tensor **ts, int *matrix) {
    int n = 0;
#define PUT(x, m)                                                                                  \
    do {                                                                                           \
        if (ts) ts[n] = &(x);                                                                      \
        if (matrix) matrix[n] = (m);                                                               \
        n++;                                                                                       \
    } while (0)
    PUT(t->patch.w, 1);
    PUT(t->patch_b, 0);
    PUT(t->pos, 0);
    for (int l = 0; l < t->cfg.num_hidden_layers; l++) {
        siglip_layer *L = &t->layers[l];
        PUT(L->ln1_w, 0);
        PUT(L->ln1_b, 0);
        PUT(L->q.w, 1);
        PUT(L->q_b, 0);
        PUT(L->k.w, 1);
        PUT(L->k_b, 0);
        PUT(L->v.w, 1);
        PUT(L->v_b, 0);
        PUT(L->o.w, 1);
        PUT(L->o_b, 0);
        PUT(L->ln2_w, 0);
        PUT(L->ln2_b, 0);
        PUT(L->fc1.w, 1);
        PUT(L->fc1_b, 0);
        PUT(L->fc2.w, 1);
        PUT(L->fc2_b, 0);
    }
    PUT(t->post_w, 0);
    PUT(t->post_b, 0);
    PUT(t->mm_norm, 0);
    PUT(t->mm_proj.w, 1);
#undef PUT
    return n;
}

static size_t round256(size_t n) {
    return (n + 255) & ~(size_t)255;
}

void siglip_release(siglip_tower *t, lt_ctx *ctx) {
    if (!t) return;
    if (t->arena && ctx && ctx->be) ctx->be->release(ctx, t->arena);
    siglip_free(t);
}

/* Gives back the host bytes of tensor s of t once copied: a block of t freed, else its pages
 * of st's mapping. */
static void tower_drop(siglip_tower *t, const st_set *st, lt_tensor *s) {
    for (int i = 0; i < t->n_blocks; i++) {
        if (t->blocks[i] != s->data) continue;
        free(t->blocks[i]);
        t->blocks[i] = t->blocks[--t->n_blocks];
        s->data = NULL;
        return;
    }
    if (st) st_release_pages(st, s->data, lt_tensor_bytes(s));
}

static lt_status to_device(siglip_tower **out, siglip_tower *host, lt_ctx *ctx, lt_dtype dt,
                           const st_set *drop, int dropping, char *err);

lt_status siglip_to_device(siglip_tower **out, const siglip_tower *host, lt_ctx *ctx, lt_dtype dt,
                           char *err) {
    return to_device(out, (siglip_tower *)host, ctx, dt, NULL, 0, err);
}

lt_status siglip_to_device_dropping(siglip_tower **out, siglip_tower *host, lt_ctx *ctx,
                                    lt_dtype dt, const st_set *st, char *err) {
    return to_device(out, host, ctx, dt, st, 1, err);
}

/* dropping: give each host tensor back once copied (tower_drop); host is not changed
 * otherwise. */
static lt_status to_device(siglip_tower **out, siglip_tower *host, lt_ctx *ctx, lt_dtype dt,
                           const st_set *drop, int dropping, char *err) {
    *out = NULL;
    const lt_backend *be = ctx->be;
    siglip_tower *d = calloc(1, sizeof *d);
    int L = host->cfg.num_hidden_layers;
    if (d) {
        *d = *host;
        d->blocks = NULL;
        d->n_blocks = d->cap_blocks = 0;
        d->arena = NULL;
        d->layers = malloc(sizeof(siglip_layer) * (size_t)L);
    }
    int n = tower_tensors((siglip_tower *)host, NULL, NULL);
    lt_tensor **hs = malloc(sizeof *hs * (size_t)n), **ds = malloc(sizeof *ds * (size_t)n);
    int *mat = malloc(sizeof *mat * (size_t)n);
    lt_status rc = LT_OK;
    if (!d || !d->layers || !hs || !ds || !mat) {
        rc = lt_fail(err, LT_ERR_MEMORY, "image tower: out of host memory copying it");
        goto done;
    }
    memcpy(d->layers, host->layers, sizeof(siglip_layer) * (size_t)L);
    tower_tensors((siglip_tower *)host, hs, mat);
    tower_tensors(d, ds, NULL);
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += round256((size_t)lt_tensor_numel(hs[i]) * lt_dtype_size(mat[i] ? dt : LT_F32));
    d->arena = be->alloc(ctx, total);
    if (!d->arena) {
        rc = lt_fail(err, LT_ERR_MEMORY, "image tower: not enough %s memory (%.1f MiB): %s",
                     be->name, total / 1048576.0, ctx->err);
        goto done;
    }
    size_t off = 0;
    for (int i = 0; i < n && rc == LT_OK; i++) {
        const lt_tensor *s = hs[i];
        lt_dtype want = mat[i] ? dt : LT_F32;
        int64_t cnt = lt_tensor_numel(s);
        char *dst = (char *)d->arena + off;
        if (s->dtype == want) {
            rc = be->upload(ctx, dst, s->data, lt_tensor_bytes(s));
        } else { /* stored F16/BF16/F32 -> the device dtype, converted there */
            void *stage = be->alloc(ctx, lt_tensor_bytes(s));
            rc = stage ? be->upload(ctx, stage, s->data, lt_tensor_bytes(s)) : LT_ERR_MEMORY;
            if (rc == LT_OK) rc = be->convert(ctx, dst, want, stage, s->dtype, cnt);
            if (rc == LT_OK) rc = be->sync(ctx); /* the stage is released next */
            if (stage) be->release(ctx, stage);
        }
        ds[i]->data = dst;
        ds[i]->dtype = want;
        off += round256((size_t)cnt * lt_dtype_size(want));
        if (rc == LT_OK && dropping) tower_drop(host, drop, hs[i]);
    }
    if (rc == LT_OK) rc = be->sync(ctx);
    if (rc != LT_OK) lt_fail(err, rc, "image tower: copying it to %s: %s", be->name, ctx->err);
done:
    free(hs);
    free(ds);
    free(mat);
    if (rc != LT_OK) {
        siglip_release(d, ctx);
        return rc;
    }
    *out = d;
    return LT_OK;
}

/* ---- forward ------------------------------------------------------------------------------ */

/* y = x·Wᵀ + b */
static lt_status linear_b(lt_ctx *ctx, lt_tensor y, lt_tensor x, const lt_weight *w, lt_tensor b) {
    lt_status rc = ctx->be->linear(ctx, y, x, w);
    return rc == LT_OK ? ctx->be->add_bias(ctx, y, b) : rc;
}

uint64_t siglip_module_seed(uint64_t seed, int layer, int k) {
    return seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(layer * 16 + k + 1));
}

int siglip_uses_dropout(const siglip_acts *b, const lt_weight *w) {
    return b->drop_seed && w->lora && w->lora->enabled && w->lora->dropout > 0.0f &&
           w->lora->a.data;
}

/* y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ, the mask of element i of x lt_dropout_keep(seed, i) (as
 * gemma3_backward.c's adapters): linear_b when no dropout runs. */
static lt_status linear_drop(lt_ctx *ctx, const siglip_acts *b, lt_tensor y, lt_tensor x,
                             const lt_weight *w, lt_tensor bias, uint64_t seed) {
    if (!siglip_uses_dropout(b, w)) return linear_b(ctx, y, x, w, bias);
    const lt_backend *be = ctx->be;
    lt_lora *lo = w->lora;
    int64_t n = x.shape[0], in = w->w.shape[1], out = w->w.shape[0], r = lo->a.shape[0];
    lo->enabled = 0;
    lt_status rc = linear_b(ctx, y, x, w, bias); /* the base path */
    lo->enabled = 1;
    if (rc != LT_OK) return rc;
    lt_weight wa = {.w = lo->a}, wb = {.w = lo->b};
    siglip_drop_bufs s;
    siglip_drop_carve(b, n, &s);
    lt_tensor xd = lt_tensor_2d(LT_F32, s.xd, n, in), u = lt_tensor_2d(LT_F32, s.u, n, r),
              y2 = lt_tensor_2d(LT_F32, s.y2, n, out);
    if ((rc = be->dropout(ctx, xd, x, lo->dropout, 1.0f, seed)) != LT_OK) return rc;
    if ((rc = be->linear(ctx, u, xd, &wa)) != LT_OK) return rc;
    if ((rc = be->linear(ctx, y2, u, &wb)) != LT_OK) return rc;
    if ((rc = be->scale(ctx, y2, lo->scale)) != LT_OK) return rc;
    return be->add(ctx, y, y2);
}

void siglip_drop_carve(const siglip_acts *b, int64_t n, siglip_drop_bufs *s) {
    float *p = b->drop;
    s->xd = p, p += n * b->drop_w;
    s->y2 = p, p += n * b->drop_w;
    s->dx = p, p += n * b->drop_w;
    s->u = p, p += n * b->drop_r;
    s->du = p;
}

size_t siglip_dropout_floats(const siglip_tower *t, int64_t *w, int64_t *r) {
    siglip_dims d;
    siglip_dims_get(t, &d);
    *r = 1;
    *w = d.I > d.D ? d.I : d.D;
    for (int l = 0; l < t->cfg.num_hidden_layers; l++) {
        const siglip_layer *L = &t->layers[l];
        const lt_weight *ws[6] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
        for (int i = 0; i < 6; i++)
            if (ws[i]->lora && ws[i]->lora->a.shape[0] > *r) *r = ws[i]->lora->a.shape[0];
    }
    return (size_t)(d.P * (3 * *w + 2 * *r));
}

void siglip_patches(const siglip_tower *t, const float *pixels, float *host) {
    const gemma3_vision_config *c = &t->cfg;
    int64_t p = c->patch_size, S = c->image_size, g = S / p, C = c->num_channels, K = C * p * p;
    for (int64_t r = 0; r < g; r++)
        for (int64_t cc = 0; cc < g; cc++)
            for (int64_t ch = 0; ch < C; ch++)
                for (int64_t yy = 0; yy < p; yy++)
                    for (int64_t xx = 0; xx < p; xx++)
                        host[(r * g + cc) * K + (ch * p + yy) * p + xx] =
                            pixels[(ch * S + r * p + yy) * S + cc * p + xx];
}

void siglip_dims_get(const siglip_tower *t, siglip_dims *d) {
    const gemma3_vision_config *c = &t->cfg;
    d->D = c->hidden_size;
    d->I = c->intermediate_size;
    d->g = c->image_size / c->patch_size;
    d->P = d->g * d->g;
    d->K = (int64_t)c->num_channels * c->patch_size * c->patch_size;
    d->nh = c->num_attention_heads;
    d->hd = d->D / d->nh;
    d->H = t->text_hidden;
    int64_t side = 0;
    while ((side + 1) * (side + 1) <= c->mm_tokens_per_image)
        side++;
    d->side = side;
    d->M = side * side;
    d->eps = (float)c->layer_norm_eps;
    d->scale = (float)(1.0 / sqrt((double)d->hd));
}

siglip_acts siglip_acts_aliased(float *x, float *a, float *f, float *q, float *k, float *v,
                                float *att, int32_t *pos0) {
    siglip_acts b = {.x = x,
                     .a1 = a,
                     .q = q,
                     .k = k,
                     .v = v,
                     .att = att,
                     .o = a,
                     .h = x,
                     .a2 = a,
                     .f1 = f,
                     .g = f,
                     .f2 = a,
                     .out = x,
                     .pos0 = pos0};
    return b;
}

lt_status siglip_layer_forward(const siglip_tower *t, lt_ctx *ctx, int l, const siglip_acts *b) {
    const lt_backend *be = ctx->be;
    siglip_dims d;
    siglip_dims_get(t, &d);
    int64_t P = d.P, D = d.D, I = d.I;
    const siglip_layer *L = &t->layers[l];
    lt_tensor X = lt_tensor_2d(LT_F32, b->x, P, D), A1 = lt_tensor_2d(LT_F32, b->a1, P, D);
    lt_tensor O = lt_tensor_2d(LT_F32, b->o, P, D), Hh = lt_tensor_2d(LT_F32, b->h, P, D);
    lt_tensor A2 = lt_tensor_2d(LT_F32, b->a2, P, D), F2 = lt_tensor_2d(LT_F32, b->f2, P, D);
    lt_tensor F1 = lt_tensor_2d(LT_F32, b->f1, P, I), G = lt_tensor_2d(LT_F32, b->g, P, I);
    lt_tensor POS = lt_tensor_1d(LT_I32, b->pos0, P);
    size_t bytes = sizeof(float) * (size_t)(P * D);
    lt_status rc = LT_OK;
    LT_TRY(be->layernorm(ctx, A1, X, L->ln1_w, L->ln1_b, d.eps));
    LT_TRY(linear_drop(ctx, b, lt_tensor_2d(LT_F32, b->q, P, D), A1, &L->q, L->q_b,
                       siglip_module_seed(b->drop_seed, l, 0)));
    LT_TRY(linear_drop(ctx, b, lt_tensor_2d(LT_F32, b->k, P, D), A1, &L->k, L->k_b,
                       siglip_module_seed(b->drop_seed, l, 1)));
    LT_TRY(linear_drop(ctx, b, lt_tensor_2d(LT_F32, b->v, P, D), A1, &L->v, L->v_b,
                       siglip_module_seed(b->drop_seed, l, 2)));
    LT_TRY(be->attention(ctx, lt_tensor_2d(LT_F32, b->att, P, D),
                         lt_tensor_3d(LT_F32, b->q, P, d.nh, d.hd),
                         lt_tensor_3d(LT_F32, b->k, P, d.nh, d.hd),
                         lt_tensor_3d(LT_F32, b->v, P, d.nh, d.hd), POS, POS, 0, d.scale));
    LT_TRY(linear_drop(ctx, b, O, lt_tensor_2d(LT_F32, b->att, P, D), &L->o, L->o_b,
                       siglip_module_seed(b->drop_seed, l, 3)));
    if (b->h != b->x) LT_TRY(be->copy(ctx, b->h, b->x, bytes));
    LT_TRY(be->add(ctx, Hh, O)); /* h = x + o */
    LT_TRY(be->layernorm(ctx, A2, Hh, L->ln2_w, L->ln2_b, d.eps));
    LT_TRY(linear_drop(ctx, b, F1, A2, &L->fc1, L->fc1_b, siglip_module_seed(b->drop_seed, l, 4)));
    LT_TRY(be->gelu(ctx, G, F1));
    if (!b->out) goto done; /* a recompute for the backward: the output is not needed */
    LT_TRY(linear_drop(ctx, b, F2, G, &L->fc2, L->fc2_b, siglip_module_seed(b->drop_seed, l, 5)));
    if (b->out != b->h) LT_TRY(be->copy(ctx, b->out, b->h, bytes));
    LT_TRY(be->add(ctx, lt_tensor_2d(LT_F32, b->out, P, D), F2)); /* out = h + fc2(g) */
done:
    return rc;
}

lt_status siglip_encode(const siglip_tower *t, lt_ctx *ctx, const float *pixels, float *out) {
    return siglip_encode_train(t, ctx, pixels, out, 0);
}

lt_status siglip_encode_train(const siglip_tower *t, lt_ctx *ctx, const float *pixels, float *out,
                              uint64_t drop_seed) {
    const lt_backend *be = ctx->be;
    const char *missing = lt_backend_missing_vision_op(be);
    if (missing)
        return lt_fail(ctx->err, LT_ERR_ARG,
                       "the %s backend has no '%s' op, which the image tower needs (load the "
                       "model with device=cpu to use images)",
                       be->name, missing);
    const gemma3_vision_config *c = &t->cfg;
    siglip_dims dm;
    siglip_dims_get(t, &dm);
    int64_t D = dm.D, I = dm.I, g = dm.g, P = dm.P, K = dm.K, H = dm.H, side = dm.side, M = dm.M;
    float eps = dm.eps;
    lt_status rc = LT_OK;

    /* patches on the host: row r*g + cc holds channel-major (ch, y, x) of patch (r, cc), the
     * order of the conv weight [D, C, p, p] flattened */
    float *host = malloc(sizeof(float) * (size_t)(P * K));
    int32_t *zeros = calloc((size_t)P, sizeof(int32_t));
    float *patches = NULL, *x = NULL, *a = NULL, *q = NULL, *k = NULL, *v = NULL, *att = NULL,
          *f = NULL, *pooled = NULL, *drop = NULL;
    int32_t *pos0 = NULL;
    if (!host || !zeros) {
        rc = lt_fail(ctx->err, LT_ERR_MEMORY, "image tower: out of host memory");
        goto done;
    }
    siglip_patches(t, pixels, host);
    size_t fs = sizeof(float);
    patches = be->alloc(ctx, fs * (size_t)(P * K));
    x = be->alloc(ctx, fs * (size_t)(P * D));
    a = be->alloc(ctx, fs * (size_t)(P * D));
    q = be->alloc(ctx, fs * (size_t)(P * D));
    k = be->alloc(ctx, fs * (size_t)(P * D));
    v = be->alloc(ctx, fs * (size_t)(P * D));
    att = be->alloc(ctx, fs * (size_t)(P * D));
    f = be->alloc(ctx, fs * (size_t)(P * I));
    pooled = be->alloc(ctx, fs * (size_t)(M * D));
    pos0 = be->alloc(ctx, sizeof(int32_t) * (size_t)P);
    int64_t dw = 0, dr = 0;
    size_t dn = siglip_dropout_floats(t, &dw, &dr);
    if (drop_seed) drop = be->alloc(ctx, fs * dn);
    if (!patches || !x || !a || !q || !k || !v || !att || !f || !pooled || !pos0 ||
        (drop_seed && !drop)) {
        rc = lt_fail(ctx->err, LT_ERR_MEMORY,
                     "image tower: out of %s memory for the activations of %lld patches", be->name,
                     (long long)P);
        goto done;
    }
    LT_TRY(be->upload(ctx, patches, host, fs * (size_t)(P * K)));
    LT_TRY(be->upload(ctx, pos0, zeros, sizeof(int32_t) * (size_t)P));
    lt_tensor X = lt_tensor_2d(LT_F32, x, P, D);
    LT_TRY(linear_b(ctx, X, lt_tensor_2d(LT_F32, patches, P, K), &t->patch, t->patch_b));
    LT_TRY(be->add(ctx, X, t->pos));
    /* a holds ln1(x), then out_proj's output, ln2(h) and fc2's; f fc1's output and its gelu */
    siglip_acts b = siglip_acts_aliased(x, a, f, q, k, v, att, pos0);
    b.drop_seed = drop_seed;
    b.drop = drop;
    b.drop_w = dw;
    b.drop_r = dr;
    for (int l = 0; l < c->num_hidden_layers; l++)
        LT_TRY(siglip_layer_forward(t, ctx, l, &b));
    LT_TRY(be->layernorm(ctx, X, X, t->post_w, t->post_b, eps));
    /* the projector */
    lt_tensor PO = lt_tensor_2d(LT_F32, pooled, M, D);
    LT_TRY(be->avg_pool(ctx, PO, X, (int)(g / side)));
    LT_TRY(be->rmsnorm(ctx, PO, PO, t->mm_norm, eps));
    LT_TRY(be->linear(ctx, lt_tensor_2d(LT_F32, out, M, H), PO, &t->mm_proj));
done:
    free(host);
    free(zeros);
    void *all[] = {patches, x, a, q, k, v, att, f, pooled, pos0, drop};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        if (all[i]) be->release(ctx, all[i]);
    return rc;
}

size_t siglip_encode_bytes(const siglip_tower *t) {
    const gemma3_vision_config *c = &t->cfg;
    size_t D = (size_t)c->hidden_size, I = (size_t)c->intermediate_size, p = (size_t)c->patch_size,
           g = (size_t)c->image_size / (p ? p : 1), P = g * g, K = (size_t)c->num_channels * p * p,
           side = 0;
    while ((side + 1) * (side + 1) <= (size_t)c->mm_tokens_per_image)
        side++;
    /* patches, x, a, q, k, v, att, f, pooled, pos0: siglip_encode's allocations */
    return sizeof(float) * (P * K + 6 * P * D + P * I + side * side * D) + sizeof(int32_t) * P;
}
