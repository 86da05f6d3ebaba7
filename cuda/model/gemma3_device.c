/* gemma3_device.c — places a loaded Gemma 3 model's weights in a device backend's memory.
 *
 * Owns the device copies of models (one allocation per model from ctx's backend, carved into
 * 256-byte-aligned tensors) and the registry that tells device copies from host models, plus
 * gemma3_forward_host. The matrices are converted on the device when the policy dtype differs
 * from the loaded one (fp16 results clamped to ±65504 as the last guard; Gemma 3's weights sit
 * far inside that range). NF4/int8 weights go as they are stored, with their quantization
 * state; the backend decodes them inside its matmuls. Does not touch gemma3.c's storage or
 * the host model, which the caller still owns. See gemma3_device.h.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/model/gemma3_device.h"

/* ---- registry of device models ----------------------------------------------------------------
 */

typedef struct dev_entry {
    const gemma3_model *m;
    void *arena; /* backend memory holding every tensor */
} dev_entry;

#define DEV_MAX 64
static dev_entry dev_models[DEV_MAX];
static pthread_mutex_t dev_mu = PTHREAD_MUTEX_INITIALIZER;

static int dev_find(const gemma3_model *m) {
    for (int i = 0; i < DEV_MAX; i++)
        if (dev_models[i].m == m) return i;
    return -1;
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
    void *arena = i >= 0 ? dev_models[i].arena : NULL;
    if (i >= 0) dev_models[i].m = NULL, dev_models[i].arena = NULL;
    pthread_mutex_unlock(&dev_mu);
    if (i < 0) {
        gemma3_model_free(m);
        return;
    }
    if (arena && ctx && ctx->be && ctx->be->release) ctx->be->release(ctx, arena);
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
    int64_t n = lt_tensor_numel(t), out = t->shape[0];
    lt_status rc = LT_OK;
    if (q->kind == LT_QUANT_NF4) {
        int64_t nb = (n + q->blocksize - 1) / q->blocksize;
        void *codes = place_bytes(j, t->data, (size_t)((n + 1) / 2), &rc);
        const float *code = place_bytes(j, q->code, 16 * sizeof(float), &rc);
        if (q->qabsmax) {
            int64_t nb2 = (nb + q->nested_blocksize - 1) / q->nested_blocksize;
            const uint8_t *qa = place_bytes(j, q->qabsmax, (size_t)nb, &rc);
            const float *a2 = place_bytes(j, q->absmax2, (size_t)nb2 * sizeof(float), &rc);
            const float *c2 = place_bytes(j, q->code2, 256 * sizeof(float), &rc);
            if (!j->sizing) q->qabsmax = qa, q->absmax2 = a2, q->code2 = c2;
        } else {
            const float *am = place_bytes(j, q->absmax, (size_t)nb * sizeof(float), &rc);
            if (!j->sizing) q->absmax = am;
        }
        if (!j->sizing) t->data = codes, q->code = code;
    } else {
        void *w8 = place_bytes(j, t->data, (size_t)n, &rc);
        const float *scb = place_bytes(j, q->scb, (size_t)out * sizeof(float), &rc);
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
        if (want != t->dtype && lt_tensor_bytes(t) > j->stage_cap)
            j->stage_cap = lt_tensor_bytes(t);
        return 0;
    }
    lt_ctx *ctx = j->ctx;
    void *dst = j->arena + j->off;
    j->off += align256(bytes);
    lt_status rc;
    if (want == t->dtype) {
        rc = ctx->be->upload(ctx, dst, t->data, bytes);
    } else {
        rc = ctx->be->upload(ctx, j->stage, t->data, lt_tensor_bytes(t));
        if (rc == LT_OK) rc = ctx->be->convert(ctx, dst, want, j->stage, t->dtype, n);
    }
    if (rc != LT_OK) {
        lt_fail(j->err, rc, "placing %.100s on %s: %.800s", name, ctx->be->name, ctx->err);
        return 1;
    }
    t->data = dst;
    t->dtype = want;
    return 0;
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
    if (rc == LT_OK) {
        pthread_mutex_lock(&dev_mu);
        int slot = dev_find(NULL);
        if (slot >= 0) {
            dev_models[slot].m = m;
            dev_models[slot].arena = j.arena;
        }
        pthread_mutex_unlock(&dev_mu);
        if (slot < 0) {
            rc = lt_fail(err, LT_ERR_STATE, "too many models on the device at once (%d)", DEV_MAX);
        }
    } else if (!bad) {
        lt_fail(err, rc, "copying the weights to %s: %.900s", ctx->be->name, ctx->err);
    }
    if (rc != LT_OK) {
        ctx->be->release(ctx, j.arena);
        free(layers);
        free(m);
        return rc;
    }
    m->dtype = dt;
    m->weight_bytes = (int64_t)j.total;
    *out = m;
    return LT_OK;
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
