/* gemma3_device.c — places a loaded Gemma 3 model's weights in a device backend's memory.
 *
 * Owns the device copies of models (one allocation per model from ctx's backend, carved into
 * 256-byte-aligned tensors) and the registry that tells device copies from host models, plus
 * gemma3_forward_host. The matrices are converted on the device when the policy dtype differs
 * from the loaded one (fp16 results clamped to ±65504 as the last guard; Gemma 3's weights sit
 * far inside that range). NF4/int8 weights go as they are stored, with their quantization
 * state; the backend decodes them inside its matmuls. Does not touch gemma3.c's storage or
 * the host model, which the caller still owns. Also owns the arithmetic of what a device copy
 * takes (from a config or from a loaded model, through lt_weight_parts) and the refusal of a
 * load that cannot fit, which names the quantized loads that would, and gemma3_device_sink: the
 * same placement one weight at a time while a loader runs, each weight in a block of its own,
 * its host copy given back at once. See gemma3_device.h.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/formats/bnb.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/model/siglip.h"

/* ---- registry of device models ----------------------------------------------------------------
 */

typedef struct dev_entry {
    const gemma3_model *m;
    void **blocks; /* backend memory holding every tensor (a malloc'd array) */
    int n_blocks;
} dev_entry;

#define DEV_MAX 64
static dev_entry dev_models[DEV_MAX];
static pthread_mutex_t dev_mu = PTHREAD_MUTEX_INITIALIZER;

static int dev_find(const gemma3_model *m) {
    for (int i = 0; i < DEV_MAX; i++)
        if (dev_models[i].m == m) return i;
    return -1;
}

/* Records m as a device model owning blocks[n] (taken over on success). err on failure. */
static lt_status dev_register(const gemma3_model *m, void **blocks, int n, char *err) {
    pthread_mutex_lock(&dev_mu);
    int slot = dev_find(NULL);
    if (slot >= 0) {
        dev_models[slot].m = m;
        dev_models[slot].blocks = blocks;
        dev_models[slot].n_blocks = n;
    }
    pthread_mutex_unlock(&dev_mu);
    if (slot < 0)
        return lt_fail(err, LT_ERR_STATE, "too many models on the device at once (%d)", DEV_MAX);
    return LT_OK;
}

int gemma3_on_device(const gemma3_model *m) {
    if (!m) return 0;
    pthread_mutex_lock(&dev_mu);
    int i = dev_find(m);
    pthread_mutex_unlock(&dev_mu);
    return i >= 0;
}

void gemma3_model_release(gemma3_model *m, lt_ctx *ctx) {
    if (!m) return;
    pthread_mutex_lock(&dev_mu);
    int i = dev_find(m);
    dev_entry e = i >= 0 ? dev_models[i] : (dev_entry){0};
    if (i >= 0) memset(&dev_models[i], 0, sizeof dev_models[i]);
    pthread_mutex_unlock(&dev_mu);
    if (i < 0) {
        gemma3_model_free(m);
        return;
    }
    for (int b = 0; b < e.n_blocks; b++)
        if (e.blocks[b] && ctx && ctx->be && ctx->be->release) ctx->be->release(ctx, e.blocks[b]);
    free(e.blocks);
    siglip_release(m->vision, ctx);
    gemma3_host_drop(m); /* NULL for device models; kept for safety */
    free(m->layers);
    free(m);
}

/* ---- copying ------------------------------------------------------------------------------------
 */

static size_t align256(size_t n) {
    return (n + 255) & ~(size_t)255;
}

typedef struct place_job {
    lt_ctx *ctx;
    gemma3_model *m; /* the device copy being filled */
    lt_dtype dt;
    char *arena;
    size_t off, total;
    int sizing;  /* 1: only add up sizes */
    void *stage; /* device staging buffer for conversions */
    size_t stage_cap;
    char *err;
} place_job;

static lt_dtype target_dtype(const lt_tensor *t, lt_dtype dt) {
    return t->ndim == 2 ? dt : LT_F32;
}

/* Backend memory for n bytes of the arena (sizing: only counted), filled from host src. */
static void *place_bytes(place_job *j, const void *src, size_t n, lt_status *rc) {
    if (j->sizing) {
        j->total += align256(n);
        return NULL;
    }
    void *dst = j->arena + j->off;
    j->off += align256(n);
    if (*rc == LT_OK) *rc = j->ctx->be->upload(j->ctx, dst, src, n);
    return dst;
}

/* An NF4 / int8 weight goes as it is stored: its packed codes and every array of its
 * quantization state, with the state's pointers moved to the device copies. */
static int place_quantized(place_job *j, const char *name, lt_tensor *t) {
    lt_weight *w = gemma3_weight_owner(j->m, t);
    if (!w || w->q.kind == LT_QUANT_NONE) {
        lt_fail(j->err, LT_ERR_ARG, "%.100s is stored as %s but is not a quantized linear weight",
                name, lt_dtype_user_name(t->dtype));
        return 1;
    }
    lt_quant *q = &w->q;
    int nested = q->kind == LT_QUANT_NF4 && q->qabsmax;
    size_t sz[LT_WEIGHT_MAX_PARTS];
    lt_weight_parts(q->kind, lt_tensor_numel(t), t->shape[0], 1, q->blocksize,
                    nested ? q->nested_blocksize : 0, sz);
    lt_status rc = LT_OK;
    if (q->kind == LT_QUANT_NF4) {
        void *codes = place_bytes(j, t->data, sz[0], &rc);
        const float *code = place_bytes(j, q->code, sz[1], &rc);
        if (nested) {
            const uint8_t *qa = place_bytes(j, q->qabsmax, sz[2], &rc);
            const float *a2 = place_bytes(j, q->absmax2, sz[3], &rc);
            const float *c2 = place_bytes(j, q->code2, sz[4], &rc);
            if (!j->sizing) q->qabsmax = qa, q->absmax2 = a2, q->code2 = c2;
        } else {
            const float *am = place_bytes(j, q->absmax, sz[2], &rc);
            if (!j->sizing) q->absmax = am;
        }
        if (!j->sizing) t->data = codes, q->code = code;
    } else {
        void *w8 = place_bytes(j, t->data, sz[0], &rc);
        const float *scb = place_bytes(j, q->scb, sz[1], &rc);
        if (!j->sizing) t->data = w8, q->scb = scb;
    }
    if (rc != LT_OK) {
        lt_fail(j->err, rc, "placing %.100s on %s: %.800s", name, j->ctx->be->name, j->ctx->err);
        return 1;
    }
    return 0;
}

static int place_one(void *user, const char *name, lt_tensor *t) {
    place_job *j = user;
    if (!t || !t->data) return 0; /* an absent (tied) head */
    if (t->dtype == LT_U8 || t->dtype == LT_I8) return place_quantized(j, name, t);
    lt_dtype want = target_dtype(t, j->dt);
    int64_t n = lt_tensor_numel(t);
    size_t bytes = (size_t)n * lt_dtype_size(want);
    if (j->sizing) {
        j->total += align256(bytes);
        size_t sb = lt_tensor_bytes(t) < GEMMA3_STAGE_MAX ? lt_tensor_bytes(t) : GEMMA3_STAGE_MAX;
        if (want != t->dtype && sb > j->stage_cap) j->stage_cap = sb;
        return 0;
    }
    lt_ctx *ctx = j->ctx;
    void *dst = j->arena + j->off;
    j->off += align256(bytes);
    lt_status rc;
    if (want == t->dtype) {
        rc = ctx->be->upload(ctx, dst, t->data, bytes);
    } else { /* through the stage, a stage-full at a time */
        size_t ses = lt_dtype_size(t->dtype), des = lt_dtype_size(want);
        int64_t per = (int64_t)(j->stage_cap / ses);
        rc = LT_OK;
        for (int64_t i = 0; i < n && rc == LT_OK; i += per) {
            int64_t k = n - i < per ? n - i : per;
            rc = ctx->be->upload(ctx, j->stage, (const char *)t->data + (size_t)i * ses,
                                 (size_t)k * ses);
            if (rc == LT_OK)
                rc = ctx->be->convert(ctx, (char *)dst + (size_t)i * des, want, j->stage, t->dtype,
                                      k);
        }
    }
    if (rc != LT_OK) {
        lt_fail(j->err, rc, "placing %.100s on %s: %.800s", name, ctx->be->name, ctx->err);
        return 1;
    }
    t->data = dst;
    t->dtype = want;
    return 0;
}

/* The image tower of a device copy: copied when the backend has the image ops; otherwise (or
 * when it does not fit) the text model goes on without it and vision_error says why. drop (the
 * host's checkpoint, or NULL to leave the host tower as it is): give each host tensor back as
 * soon as it is copied (the host tower is thrown away next). */
static void device_vision(gemma3_model *m, siglip_tower *host_tower, lt_ctx *ctx, lt_dtype dt,
                          const st_set *drop) {
    m->vision = NULL;
    if (!host_tower) return; /* vision_error came with the copy */
    const char *missing = lt_backend_missing_vision_op(ctx->be);
    char err[LT_ERRLEN];
    if (missing)
        snprintf(m->vision_error, sizeof m->vision_error,
                 "the %s backend has no '%s' op, which the image tower needs (load the model "
                 "with device=cpu to use images)",
                 ctx->be->name, missing);
    else if ((drop ? siglip_to_device_dropping(&m->vision, host_tower, ctx, dt, drop, err)
                   : siglip_to_device(&m->vision, host_tower, ctx, dt, err)) != LT_OK)
        snprintf(m->vision_error, sizeof m->vision_error, "%s", err);
}

lt_status gemma3_to_device(gemma3_model **out, const gemma3_model *host, lt_ctx *ctx, lt_dtype dt,
                           char *err) {
    *out = NULL;
    if (dt != LT_F32 && dt != LT_F16 && dt != LT_BF16) {
        return lt_fail(err, LT_ERR_ARG, "device weights: dtype must be fp32, fp16 or bf16");
    }
    int L = host->cfg.num_hidden_layers;
    gemma3_model *m = malloc(sizeof *m);
    gemma3_layer *layers = malloc(sizeof(gemma3_layer) * (size_t)(L ? L : 1));
    if (!m || !layers) {
        free(m);
        free(layers);
        return lt_fail(err, LT_ERR_MEMORY, "out of host memory copying the model description");
    }
    *m = *host;
    memcpy(layers, host->layers, sizeof(gemma3_layer) * (size_t)L);
    m->layers = layers;
    m->storage = NULL;
    m->vision = NULL; /* copied below, once the text weights are placed */
    /* adapters belong to whoever attaches them on the device copy */
    m->embed_tokens.lora = NULL;
    m->lm_head.lora = NULL;
    for (int l = 0; l < L; l++) {
        lt_weight *ws[7] = {&layers[l].q_proj,   &layers[l].k_proj,    &layers[l].v_proj,
                            &layers[l].o_proj,   &layers[l].gate_proj, &layers[l].up_proj,
                            &layers[l].down_proj};
        for (int k = 0; k < 7; k++) {
            ws[k]->lora = NULL;
            ws[k]->grad_w.data = NULL;
        }
    }
    m->embed_tokens.grad_w.data = NULL;
    m->lm_head.grad_w.data = NULL;

    place_job j = {.ctx = ctx, .m = m, .dt = dt, .sizing = 1, .err = err};
    if (gemma3_weights_foreach(m, place_one, &j)) { /* a weight no device format can hold */
        free(layers);
        free(m);
        return LT_ERR_ARG;
    }
    j.arena = ctx->be->alloc(ctx, j.total);
    if (!j.arena) {
        lt_fail(err, LT_ERR_MEMORY, "not enough %s memory for the weights (%.2f GiB in %s): %.900s",
                ctx->be->name, j.total / 1073741824.0, lt_dtype_user_name(dt), ctx->err);
        free(layers);
        free(m);
        return LT_ERR_MEMORY;
    }
    if (j.stage_cap) {
        j.stage = ctx->be->alloc(ctx, j.stage_cap);
        if (!j.stage) {
            lt_fail(err, LT_ERR_MEMORY, "not enough %s memory to convert the weights: %.900s",
                    ctx->be->name, ctx->err);
            ctx->be->release(ctx, j.arena);
            free(layers);
            free(m);
            return LT_ERR_MEMORY;
        }
    }
    j.sizing = 0;
    int bad = gemma3_weights_foreach(m, place_one, &j);
    lt_status rc = bad ? LT_ERR_DEVICE : ctx->be->sync(ctx);
    if (j.stage) ctx->be->release(ctx, j.stage);
    void **blocks = NULL;
    if (rc == LT_OK) {
        blocks = malloc(sizeof *blocks);
        if (blocks) blocks[0] = j.arena;
        rc = blocks ? dev_register(m, blocks, 1, err)
                    : lt_fail(err, LT_ERR_MEMORY, "out of host memory recording the device copy");
    } else if (!bad) {
        lt_fail(err, rc, "copying the weights to %s: %.900s", ctx->be->name, ctx->err);
    }
    if (rc != LT_OK) {
        free(blocks);
        ctx->be->release(ctx, j.arena);
        free(layers);
        free(m);
        return rc;
    }
    m->dtype = dt;
    m->weight_bytes = (int64_t)j.total;
    device_vision(m, host->vision, ctx, dt, NULL);
    *out = m;
    return LT_OK;
}

static int device_dtype_ok(lt_dtype dt) {
    return dt == LT_F32 || dt == LT_F16 || dt == LT_BF16;
}

/* ---- loading straight into a backend's memory ---------------------------------------------------
 */

/* A new block of backend memory for weight `name`, kept in ds's list (abort releases it). */
static lt_status sink_block(gemma3_device_sink *ds, size_t bytes, const char *name, char **out,
                            char *err) {
    lt_ctx *ctx = ds->ctx;
    if (ds->n_blocks == ds->cap_blocks) {
        int nc = ds->cap_blocks ? ds->cap_blocks * 2 : 256;
        void **nb = realloc(ds->blocks, sizeof(void *) * (size_t)nc);
        if (!nb) return lt_fail(err, LT_ERR_MEMORY, "out of host memory placing %.100s", name);
        ds->blocks = nb;
        ds->cap_blocks = nc;
    }
    void *p = ctx->be->alloc(ctx, bytes);
    if (!p)
        return lt_fail(err, LT_ERR_MEMORY,
                       "not enough %s memory for %.100s (%.1f MiB, with %.2f GiB of weights "
                       "placed): %.800s",
                       ctx->be->name, name, bytes / 1048576.0, ds->bytes / 1073741824.0, ctx->err);
    ds->blocks[ds->n_blocks++] = p;
    ds->bytes += bytes;
    *out = p;
    return LT_OK;
}

/* An NF4 / int8 linear: its packed codes and every array of its quantization state in one
 * block, the state's pointers moved there. */
static lt_status sink_quantized(gemma3_device_sink *ds, gemma3_model *m, const char *name,
                                lt_tensor *t, char *err) {
    lt_ctx *ctx = ds->ctx;
    lt_weight *w = gemma3_weight_owner(m, t);
    if (!w || w->q.kind == LT_QUANT_NONE)
        return lt_fail(err, LT_ERR_ARG,
                       "%.100s is stored as %s but is not a quantized linear weight", name,
                       lt_dtype_user_name(t->dtype));
    lt_quant *q = &w->q;
    int nested = q->kind == LT_QUANT_NF4 && q->qabsmax;
    size_t sz[LT_WEIGHT_MAX_PARTS];
    int np = lt_weight_parts(q->kind, lt_tensor_numel(t), t->shape[0], 1, q->blocksize,
                             nested ? q->nested_blocksize : 0, sz);
    const void *host[LT_WEIGHT_MAX_PARTS] = {t->data};
    if (q->kind == LT_QUANT_NF4) {
        host[1] = q->code;
        host[2] = nested ? (const void *)q->qabsmax : (const void *)q->absmax;
        host[3] = nested ? q->absmax2 : NULL;
        host[4] = nested ? q->code2 : NULL;
    } else {
        host[1] = q->scb;
    }
    size_t total = 0;
    for (int i = 0; i < np; i++)
        total += align256(sz[i]);
    char *blk;
    lt_status rc = sink_block(ds, total, name, &blk, err);
    if (rc != LT_OK) return rc;
    void *dev[LT_WEIGHT_MAX_PARTS];
    size_t off = 0;
    for (int i = 0; i < np && rc == LT_OK; i++) {
        dev[i] = blk + off;
        off += align256(sz[i]);
        rc = ctx->be->upload(ctx, dev[i], host[i], sz[i]);
    }
    if (rc != LT_OK)
        return lt_fail(err, rc, "placing %.100s on %s: %.800s", name, ctx->be->name, ctx->err);
    for (int i = 0; i < np; i++) /* static tables (the NF4 code) and shared maps stay */
        gemma3_host_release(m, host[i], sz[i]);
    t->data = dev[0];
    if (q->kind == LT_QUANT_NF4) {
        q->code = dev[1];
        if (nested)
            q->qabsmax = dev[2], q->absmax2 = dev[3], q->code2 = dev[4];
        else
            q->absmax = dev[2];
    } else {
        q->scb = dev[1];
    }
    return LT_OK;
}

static lt_status sink_place(void *user, gemma3_model *m, const char *name, lt_tensor *t,
                            char *err) {
    gemma3_device_sink *ds = user;
    lt_ctx *ctx = ds->ctx;
    if (!t || !t->data) return LT_OK; /* an absent (tied) head */
    if (!device_dtype_ok(ds->dt))
        return lt_fail(err, LT_ERR_ARG, "device weights: dtype must be fp32, fp16 or bf16");
    if (t->dtype == LT_U8 || t->dtype == LT_I8) return sink_quantized(ds, m, name, t, err);
    lt_dtype want = target_dtype(t, ds->dt);
    int64_t n = lt_tensor_numel(t);
    size_t bytes = (size_t)n * lt_dtype_size(want), hb = lt_tensor_bytes(t);
    char *dst;
    lt_status rc = sink_block(ds, bytes, name, &dst, err);
    if (rc != LT_OK) return rc;
    if (want == t->dtype) {
        rc = ctx->be->upload(ctx, dst, t->data, bytes);
    } else { /* through the stage, a stage-full at a time */
        size_t need = hb < GEMMA3_STAGE_MAX ? hb : GEMMA3_STAGE_MAX;
        if (ds->stage_cap < need) {
            if (ds->stage) {
                rc = ctx->be->sync(ctx); /* the last conversion has read the old stage */
                ctx->be->release(ctx, ds->stage);
            }
            ds->stage = ctx->be->alloc(ctx, need);
            ds->stage_cap = ds->stage ? need : 0;
            if (!ds->stage)
                return lt_fail(err, LT_ERR_MEMORY,
                               "not enough %s memory to convert the weights: %.900s", ctx->be->name,
                               ctx->err);
        }
        size_t ses = lt_dtype_size(t->dtype), des = lt_dtype_size(want);
        int64_t per = (int64_t)(ds->stage_cap / ses);
        for (int64_t i = 0; i < n && rc == LT_OK; i += per) {
            int64_t k = n - i < per ? n - i : per;
            rc = ctx->be->upload(ctx, ds->stage, (const char *)t->data + (size_t)i * ses,
                                 (size_t)k * ses);
            if (rc == LT_OK)
                rc = ctx->be->convert(ctx, dst + (size_t)i * des, want, ds->stage, t->dtype, k);
        }
    }
    if (rc != LT_OK)
        return lt_fail(err, rc, "placing %.100s on %s: %.800s", name, ctx->be->name, ctx->err);
    gemma3_host_release(m, t->data, hb); /* upload has copied it: the host copy goes */
    t->data = dst;
    t->dtype = want;
    return LT_OK;
}

static void sink_abort(void *user, gemma3_model *m) {
    gemma3_device_sink *ds = user;
    (void)m;
    lt_ctx *ctx = ds->ctx;
    if (ds->n_blocks || ds->stage) ctx->be->sync(ctx);
    for (int i = 0; i < ds->n_blocks; i++)
        ctx->be->release(ctx, ds->blocks[i]);
    if (ds->stage) ctx->be->release(ctx, ds->stage);
    free(ds->blocks);
    ds->blocks = NULL;
    ds->n_blocks = ds->cap_blocks = 0;
    ds->stage = NULL;
    ds->stage_cap = 0;
    ds->bytes = 0;
}

static lt_status sink_finish(void *user, gemma3_model *m, char *err) {
    gemma3_device_sink *ds = user;
    lt_ctx *ctx = ds->ctx;
    lt_status rc = ctx->be->sync(ctx);
    if (rc != LT_OK)
        return lt_fail(err, rc, "copying the weights to %s: %.900s", ctx->be->name, ctx->err);
    if (ds->stage) ctx->be->release(ctx, ds->stage);
    ds->stage = NULL;
    ds->stage_cap = 0;
    rc = dev_register(m, ds->blocks, ds->n_blocks, err);
    if (rc != LT_OK) return rc; /* abort releases the blocks */
    ds->blocks = NULL;          /* the model owns them now */
    ds->n_blocks = ds->cap_blocks = 0;
    m->dtype = ds->dt;
    m->weight_bytes = (int64_t)ds->bytes;
    siglip_tower *tower = m->vision;
    device_vision(m, tower, ctx, ds->dt, gemma3_host_checkpoint(m));
    siglip_free(tower);
    gemma3_host_drop(m);
    return LT_OK;
}

void gemma3_device_sink_init(gemma3_device_sink *ds, lt_ctx *ctx, lt_dtype dt) {
    memset(ds, 0, sizeof *ds);
    ds->ctx = ctx;
    ds->dt = dt;
    ds->sink = (gemma3_sink){sink_place, sink_finish, sink_abort, ds};
}

/* ---- what a device copy takes ------------------------------------------------------------------
 */

/* The arena bytes of one [rows, cols] weight stored as kind (elem: bytes of a 16/32-bit value),
 * laid out as place_one / place_quantized lay it out; NF4 in blocks of 64, nested: with double
 * quantization (quant=nf4's way). */
static size_t weight_arena_bytes(lt_quant_kind kind, int nested, int64_t rows, int64_t cols,
                                 size_t elem) {
    size_t parts[LT_WEIGHT_MAX_PARTS], bytes = 0;
    int np = lt_weight_parts(kind, rows * cols, rows, elem, BNB_NF4_BLOCKSIZE,
                             nested ? BNB_NESTED_BLOCKSIZE : 0, parts);
    for (int i = 0; i < np; i++)
        bytes += align256(parts[i]);
    return bytes;
}

/* quant's storage of the linears: 0 for an unknown name. */
static int quant_kind_of(const char *quant, lt_quant_kind *kind, int *dynamic) {
    const char *q = quant && *quant ? quant : "none";
    *dynamic = !strcmp(q, "dynamic");
    *kind = !strcmp(q, "nf4") || *dynamic ? LT_QUANT_NF4
            : !strcmp(q, "int8")          ? LT_QUANT_INT8
                                          : LT_QUANT_NONE;
    return *kind != LT_QUANT_NONE || !strcmp(q, "none");
}

/* The arena for c with its linears stored as kind (nested: NF4 with double quantization);
 * dynamic: a tenth of the linear bytes kept in dt; kept16[k] (NULL: none): the layers whose
 * linear k stays in dt. */
static size_t device_bytes(const gemma3_config *c, lt_dtype dt, lt_quant_kind kind, int nested,
                           int dynamic, const int *kept16) {
    if (!device_dtype_ok(dt)) return 0;
    size_t es = lt_dtype_size(dt);
    int64_t H = c->hidden_size, I = c->intermediate_size, hd = c->head_dim, V = c->vocab_size;
    int64_t qo = (int64_t)c->num_attention_heads * hd, kvo = (int64_t)c->num_key_value_heads * hd;
    size_t L = (size_t)c->num_hidden_layers;
    /* q, k, v, o, gate, up, down: [out, in] */
    const int64_t lin[7][2] = {{qo, H}, {kvo, H}, {kvo, H}, {H, qo}, {I, H}, {I, H}, {H, I}};
    size_t lin16 = 0, linq = 0, kept = 0;
    for (int k = 0; k < 7; k++) {
        size_t b16 = weight_arena_bytes(LT_QUANT_NONE, 0, lin[k][0], lin[k][1], es),
               bq = weight_arena_bytes(kind, nested, lin[k][0], lin[k][1], es);
        size_t nk = kept16 && kept16[k] > 0 ? (size_t)kept16[k] : 0;
        if (nk > L) nk = L;
        lin16 += b16;
        linq += bq;
        kept += nk * (b16 - bq); /* those layers' linear k in dt instead */
    }
    size_t layer_lin = dynamic ? linq + (lin16 - linq) / 10 : linq;
    /* input, post-attention, pre- and post-feedforward norms [H]; q_norm, k_norm [hd] */
    size_t layer_norms =
        4 * align256((size_t)H * sizeof(float)) + 2 * align256((size_t)hd * sizeof(float));
    size_t embed = weight_arena_bytes(LT_QUANT_NONE, 0, V, H, es);
    size_t total = embed + align256((size_t)H * sizeof(float)); /* + the final norm */
    if (!c->tie_word_embeddings) total += embed;
    return total + L * (layer_lin + layer_norms) + kept;
}

size_t gemma3_device_bytes(const gemma3_config *c, lt_dtype dt, const char *quant) {
    lt_quant_kind kind;
    int dynamic;
    if (!quant_kind_of(quant, &kind, &dynamic)) return 0;
    return device_bytes(c, dt, kind, 1, dynamic, NULL);
}

size_t gemma3_device_need(const gemma3_model *host, lt_dtype dt) {
    if (!device_dtype_ok(dt)) return 0;
    gemma3_model view = *host; /* the walk wants a mutable model; sizing changes nothing */
    char err[LT_ERRLEN];
    place_job j = {.m = &view, .dt = dt, .sizing = 1, .err = err};
    if (gemma3_weights_foreach(&view, place_one, &j)) return 0;
    return j.total + j.stage_cap;
}

/* "7.6 GiB", "12.3 MiB", "40.0 KiB" */
static const char *size_text(size_t b, char *buf, size_t cap) {
    if (b >= ((size_t)1 << 30))
        snprintf(buf, cap, "%.1f GiB", b / 1073741824.0);
    else if (b >= ((size_t)1 << 20))
        snprintf(buf, cap, "%.1f MiB", b / 1048576.0);
    else
        snprintf(buf, cap, "%.1f KiB", b / 1024.0);
    return buf;
}

size_t gemma3_fit_arena(const gemma3_config *c, const gemma3_fit *f) {
    const char *q = f->quant && *f->quant ? f->quant : "none";
    lt_quant_kind kind;
    int dynamic;
    if (!quant_kind_of(q, &kind, &dynamic)) return 0;
    if (f->fixed) /* as the checkpoint stores it */
        return device_bytes(c, f->dt, kind, kind == LT_QUANT_NF4 && f->nested, 0, f->kept16);
    size_t est = gemma3_device_bytes(c, f->dt, q);
    if (est && dynamic && f->keep_given) { /* NF4 + keep of the 16-bit linears */
        size_t nf4 = gemma3_device_bytes(c, f->dt, "nf4"),
               all16 = gemma3_device_bytes(c, f->dt, "none");
        double k = f->keep < 0 ? 0 : f->keep > 1 ? 1 : f->keep;
        est = nf4 + (size_t)(k * (double)(all16 - nf4));
    }
    return est;
}

lt_status gemma3_fit_check(const gemma3_config *c, const gemma3_fit *f, size_t free_bytes,
                           char *err) {
    const char *q = f->quant && *f->quant ? f->quant : "none";
    /* an estimate's stage: at most the cap, at most the largest tensor (the embedding) in fp32 */
    size_t stage = (size_t)c->vocab_size * (size_t)c->hidden_size * sizeof(float);
    if (stage > GEMMA3_STAGE_MAX) stage = GEMMA3_STAGE_MAX;
    size_t est = gemma3_fit_arena(c, f);
    if (!est)
        return lt_fail(err, LT_ERR_ARG, "%s: no device size for quant='%s' in %s", f->name, q,
                       lt_dtype_user_name(f->dt));
    size_t need = f->need ? f->need : est + stage;
    if (need <= free_bytes) return LT_OK;

    char b1[32], b2[32], b3[32];
    const char *in = !strcmp(q, "none")      ? lt_dtype_user_name(f->dt)
                     : !strcmp(q, "dynamic") ? "dynamic 4-bit"
                                             : q;
    int n = snprintf(err, LT_ERRLEN, "%.200s needs %s of %s in %s%s but %s are free", f->name,
                     size_text(need, b1, sizeof b1), f->where ? f->where : "device memory", in,
                     f->fixed ? " (as the checkpoint stores it)" : "",
                     size_text(free_bytes, b2, sizeof b2));
    if (f->held && n < LT_ERRLEN)
        n += snprintf(err + n, LT_ERRLEN - (size_t)n,
                      " (the model loaded now holds %s of it until another load succeeds)",
                      size_text(f->held, b3, sizeof b3));
    /* the quantized loads that would fit, smallest first */
    const char *alts[2] = {"nf4", "dynamic"};
    int n_fit = 0;
    size_t smallest = 0;
    const char *smallest_q = NULL;
    for (int i = 0; i < 2 && !f->fixed; i++) {
        if (!strcmp(alts[i], q)) continue;
        size_t a = gemma3_device_bytes(c, f->dt, alts[i]) + stage;
        if (a >= need) continue;
        if (!smallest || a < smallest) smallest = a, smallest_q = alts[i];
        if (a > free_bytes || n >= LT_ERRLEN) continue;
        n += snprintf(err + n, LT_ERRLEN - (size_t)n, "%s quant=%s (%s)",
                      n_fit ? " or" : ": load it with", alts[i], size_text(a, b1, sizeof b1));
        n_fit++;
    }
    if (n < LT_ERRLEN) {
        if (n_fit)
            snprintf(err + n, LT_ERRLEN - (size_t)n, ", or device=cpu");
        else if (smallest)
            snprintf(err + n, LT_ERRLEN - (size_t)n,
                     "; even quant=%s would need %s: load a smaller model, or device=cpu",
                     smallest_q, size_text(smallest, b1, sizeof b1));
        else
            snprintf(err + n, LT_ERRLEN - (size_t)n, ": load a smaller model, or device=cpu");
    }
    return LT_ERR_MEMORY;
}

lt_status gemma3_forward_host(const gemma3_model *m, lt_ctx *ctx, const int32_t *ids, int T,
                              gemma3_cache *cache, float *logits, float *last_logits) {
    if (!gemma3_on_device(m)) {
        gemma3_outputs o = {.logits = logits, .last_logits = last_logits};
        return gemma3_forward(m, ctx, ids, T, cache, &o);
    }
    size_t V = (size_t)m->cfg.vocab_size;
    float *dl = logits ? ctx->be->alloc(ctx, sizeof(float) * V * (size_t)T) : NULL;
    float *dlast = last_logits ? ctx->be->alloc(ctx, sizeof(float) * V) : NULL;
    lt_status rc = LT_OK;
    if ((logits && !dl) || (last_logits && !dlast)) {
        rc = LT_ERR_MEMORY;
    } else {
        gemma3_outputs o = {.logits = dl, .last_logits = dlast};
        rc = gemma3_forward(m, ctx, ids, T, cache, &o);
        if (rc == LT_OK && dl)
            rc = ctx->be->download(ctx, logits, dl, sizeof(float) * V * (size_t)T);
        if (rc == LT_OK && dlast)
            rc = ctx->be->download(ctx, last_logits, dlast, sizeof(float) * V);
    }
    if (dl) ctx->be->release(ctx, dl);
    if (dlast) ctx->be->release(ctx, dlast);
    return rc;
}
