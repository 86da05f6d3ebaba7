/* gemma3.c — Gemma 3 text model: weight assembly (from safetensors or random, with the
 * linears quantized at load when asked, quant=dynamic's layer-by-layer calibration included),
 * the weight walk for exporters, the KV cache, and the forward pass written against backend.h.
 * A load with a sink (spec->sink, model.h) hands each weight over the moment it is finished, so
 * a sink that moves weights off the host keeps host memory at about one tensor.
 *
 * Owns gemma3_model and gemma3_cache. The forward reads like transformers' modeling_gemma3.py
 * (Gemma3TextModel.forward) and never
 * branches on the device: every op goes through ctx->be. It keeps what the backward pass will
 * need (each layer's input, when asked) and nothing else. Config parsing is hfconfig.c; file
 * access is safetensors.c; sampling and sessions live elsewhere.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/base/threads.h"
#include "cuda/formats/bnb.h"
#include "cuda/formats/safetensors.h"
#include "cuda/model/model.h"
#include "cuda/model/quant_dynamic.h"
#include "cuda/model/siglip.h"

/* ---- storage ----------------------------------------------------------------------------------
 */

struct gemma3_storage {
    st_set st; /* mapped checkpoint (may be empty) */
    void **blocks;
    size_t *sizes; /* [n_blocks]: each block's bytes */
    int n_blocks, cap_blocks;
    size_t live, peak; /* bytes of the blocks now, and at most so far */
    /* bitsandbytes' dynamic map of the double-quantized absmax, once per model (not a block:
     * it stays while the storage does, whatever a sink gives back) */
    float code2[256];
    int have_code2;
};

static void *storage_alloc(gemma3_storage *s, size_t bytes) {
    if (s->n_blocks == s->cap_blocks) {
        int nc = s->cap_blocks ? s->cap_blocks * 2 : 64;
        void **nb = realloc(s->blocks, sizeof(void *) * (size_t)nc);
        if (!nb) return NULL;
        s->blocks = nb;
        size_t *ns = realloc(s->sizes, sizeof(size_t) * (size_t)nc);
        if (!ns) return NULL;
        s->sizes = ns;
        s->cap_blocks = nc;
    }
    void *p = malloc(bytes ? bytes : 1);
    if (!p) return NULL;
    s->blocks[s->n_blocks] = p;
    s->sizes[s->n_blocks++] = bytes;
    s->live += bytes;
    if (s->live > s->peak) s->peak = s->live;
    return p;
}

/* Frees one block storage_alloc gave; 1 when p was one (NULL or another pointer: 0). */
static int storage_release(gemma3_storage *s, const void *p) {
    if (!p) return 0;
    for (int i = s->n_blocks - 1; i >= 0; i--) {
        if (s->blocks[i] != p) continue;
        free(s->blocks[i]);
        s->live -= s->sizes[i];
        s->n_blocks--;
        s->blocks[i] = s->blocks[s->n_blocks];
        s->sizes[i] = s->sizes[s->n_blocks];
        return 1;
    }
    return 0;
}

static void storage_free(gemma3_storage *s) {
    if (!s) return;
    for (int i = 0; i < s->n_blocks; i++)
        free(s->blocks[i]);
    free(s->blocks);
    free(s->sizes);
    st_close(&s->st);
    free(s);
}

void gemma3_model_free(gemma3_model *m) {
    if (!m) return;
    storage_free(m->storage);
    siglip_free(m->vision);
    free(m->layers);
    free(m);
}

void gemma3_host_release(gemma3_model *m, const void *p, size_t bytes) {
    if (!p || !m->storage) return;
    if (!storage_release(m->storage, p)) st_release_pages(&m->storage->st, p, bytes);
}

void gemma3_host_bytes(const gemma3_model *m, size_t *live, size_t *peak) {
    *live = m->storage ? m->storage->live : 0;
    *peak = m->storage ? m->storage->peak : 0;
}

const st_set *gemma3_host_checkpoint(const gemma3_model *m) {
    return m->storage && m->storage->st.n_files ? &m->storage->st : NULL;
}

void gemma3_host_drop(gemma3_model *m) {
    storage_free(m->storage);
    m->storage = NULL;
}

static gemma3_model *model_new(const gemma3_config *cfg, char *err) {
    gemma3_model *m = calloc(1, sizeof *m);
    if (m) m->storage = calloc(1, sizeof *m->storage);
    if (m) m->layers = calloc((size_t)cfg->num_hidden_layers, sizeof(gemma3_layer));
    if (!m || !m->storage || !m->layers) {
        gemma3_model_free(m);
        lt_fail(err, LT_ERR_MEMORY, "out of memory creating the model");
        return NULL;
    }
    m->cfg = *cfg;
    return m;
}

/* ---- the weight table: names, shapes, where each lives in the struct ---------------------------
 */

typedef enum { W_MATRIX, W_NORM } wkind;

typedef struct wdesc {
    const char *suffix; /* after "model.layers.{i}." */
    wkind kind;
    size_t off; /* offsetof in gemma3_layer of the lt_weight or lt_tensor */
} wdesc;

#define LOFF(f) offsetof(gemma3_layer, f)
static const wdesc layer_table[] = {
    {"input_layernorm.weight", W_NORM, LOFF(input_layernorm)},
    {"self_attn.q_proj.weight", W_MATRIX, LOFF(q_proj)},
    {"self_attn.k_proj.weight", W_MATRIX, LOFF(k_proj)},
    {"self_attn.v_proj.weight", W_MATRIX, LOFF(v_proj)},
    {"self_attn.o_proj.weight", W_MATRIX, LOFF(o_proj)},
    {"self_attn.q_norm.weight", W_NORM, LOFF(q_norm)},
    {"self_attn.k_norm.weight", W_NORM, LOFF(k_norm)},
    {"post_attention_layernorm.weight", W_NORM, LOFF(post_attention_layernorm)},
    {"pre_feedforward_layernorm.weight", W_NORM, LOFF(pre_feedforward_layernorm)},
    {"mlp.gate_proj.weight", W_MATRIX, LOFF(gate_proj)},
    {"mlp.up_proj.weight", W_MATRIX, LOFF(up_proj)},
    {"mlp.down_proj.weight", W_MATRIX, LOFF(down_proj)},
    {"post_feedforward_layernorm.weight", W_NORM, LOFF(post_feedforward_layernorm)},
};
#define N_LAYER_W ((int)(sizeof layer_table / sizeof layer_table[0]))

/* The seven linears of a layer, in the order q, k, v, o, gate, up, down: their rows of
 * layer_table. */
#define N_LINEAR 7
static const int linear_row[N_LINEAR] = {1, 2, 3, 4, 9, 10, 11};

static lt_weight *layer_linear(gemma3_layer *L, int k) {
    return (lt_weight *)((char *)L + layer_table[linear_row[k]].off);
}

/* The linear index (0..6) of layer_table row r, or -1 for a norm. */
static int linear_of_row(int r) {
    for (int k = 0; k < N_LINEAR; k++)
        if (linear_row[k] == r) return k;
    return -1;
}

/* Expected shape of a layer weight. */
static void layer_shape(const gemma3_config *c, int k, int64_t shape[2], int *ndim) {
    int64_t H = c->hidden_size, I = c->intermediate_size, hd = c->head_dim;
    int64_t qo = (int64_t)c->num_attention_heads * hd, kvo = (int64_t)c->num_key_value_heads * hd;
    const char *s = layer_table[k].suffix;
    *ndim = 2;
    if (layer_table[k].kind == W_NORM) {
        *ndim = 1;
        shape[0] = strstr(s, "q_norm") || strstr(s, "k_norm") ? hd : H;
        shape[1] = 0;
    } else if (strstr(s, "q_proj")) {
        shape[0] = qo;
        shape[1] = H;
    } else if (strstr(s, "k_proj") || strstr(s, "v_proj")) {
        shape[0] = kvo;
        shape[1] = H;
    } else if (strstr(s, "o_proj")) {
        shape[0] = H;
        shape[1] = qo;
    } else if (strstr(s, "down_proj")) {
        shape[0] = H;
        shape[1] = I;
    } else {
        shape[0] = I;
        shape[1] = H;
    } /* gate, up */
}

/* The i-th weight of the stable order: name, kind, tensor slot, expected shape. */
static lt_tensor *weight_slot(gemma3_model *m, int i, char *name, size_t cap, wkind *kind,
                              int64_t shape[2], int *ndim) {
    const gemma3_config *c = &m->cfg;
    int L = c->num_hidden_layers;
    int64_t V = c->vocab_size, H = c->hidden_size;
    if (i == 0) {
        snprintf(name, cap, "model.embed_tokens.weight");
        *kind = W_MATRIX;
        shape[0] = V;
        shape[1] = H;
        *ndim = 2;
        return &m->embed_tokens.w;
    }
    i -= 1;
    if (i < L * N_LAYER_W) {
        int l = i / N_LAYER_W, k = i % N_LAYER_W;
        snprintf(name, cap, "model.layers.%d.%s", l, layer_table[k].suffix);
        *kind = layer_table[k].kind;
        layer_shape(c, k, shape, ndim);
        char *base = (char *)&m->layers[l] + layer_table[k].off;
        /* lt_weight starts with its lt_tensor w, so both kinds point at an lt_tensor */
        return (lt_tensor *)base;
    }
    i -= L * N_LAYER_W;
    if (i == 0) {
        snprintf(name, cap, "model.norm.weight");
        *kind = W_NORM;
        shape[0] = H;
        shape[1] = 0;
        *ndim = 1;
        return &m->norm;
    }
    if (i == 1 && !c->tie_word_embeddings) {
        snprintf(name, cap, "lm_head.weight");
        *kind = W_MATRIX;
        shape[0] = V;
        shape[1] = H;
        *ndim = 2;
        return &m->lm_head.w;
    }
    return NULL;
}

int gemma3_weight_count(const gemma3_model *m) {
    return 1 + m->cfg.num_hidden_layers * N_LAYER_W + 1 + (m->cfg.tie_word_embeddings ? 0 : 1);
}

lt_tensor *gemma3_weight_at(gemma3_model *m, int i, char *name, size_t cap) {
    wkind k;
    int64_t shape[2];
    int nd;
    char tmp[160];
    if (i < 0 || i >= gemma3_weight_count(m)) return NULL;
    lt_tensor *t = weight_slot(m, i, name ? name : tmp, name ? cap : sizeof tmp, &k, shape, &nd);
    return t;
}

int gemma3_weights_foreach(gemma3_model *m, gemma3_weight_visit fn, void *user) {
    char name[160];
    int n = gemma3_weight_count(m);
    for (int i = 0; i < n; i++) {
        lt_tensor *t = gemma3_weight_at(m, i, name, sizeof name);
        int r = fn(user, name, t);
        if (r) return r;
    }
    return 0;
}

/* ---- loading from a checkpoint ------------------------------------------------------------------
 */

static int parse_dtype_opt(const char *s, int *is_auto, lt_dtype *dt) {
    *is_auto = 0;
    if (!s || !*s || !strcmp(s, "auto")) {
        *is_auto = 1;
        return 0;
    }
    if (!strcmp(s, "fp32") || !strcmp(s, "float32") || !strcmp(s, "f32")) {
        *dt = LT_F32;
        return 0;
    }
    if (!strcmp(s, "fp16") || !strcmp(s, "float16") || !strcmp(s, "f16")) {
        *dt = LT_F16;
        return 0;
    }
    if (!strcmp(s, "bf16") || !strcmp(s, "bfloat16")) {
        *dt = LT_BF16;
        return 0;
    }
    return -1;
}

static const char *const text_prefixes[] = {"model.", "language_model.model.",
                                            "model.language_model."};

/* 1 when a quantization_config's llm_int8_skip_modules keeps the linear canon ("model." + rest +
 * ".weight") in 16 bits. The list may spell the text tower as the module tree or as the saved
 * keys do (transformers renames Gemma3ForConditionalGeneration's keys on save): every prefix
 * is tried. */
static int skip_listed(const bnb_config *cfg, const char *canon) {
    int skip = 0;
    for (size_t i = 0; cfg->present && !skip && i < sizeof text_prefixes / sizeof *text_prefixes;
         i++) {
        char mod[256];
        snprintf(mod, sizeof mod, "%s%.*s", text_prefixes[i], (int)(strlen(canon) - 7 - 6),
                 canon + 6);
        skip = bnb_config_skips(cfg, mod);
    }
    return skip;
}

static int is_vision_name(const char *n) {
    return !strncmp(n, "vision_tower.", 13) || !strncmp(n, "model.vision_tower.", 19) ||
           !strncmp(n, "multi_modal_projector.", 22) ||
           !strncmp(n, "model.multi_modal_projector.", 28);
}

/* Places tensor `src` into slot t: converted (or mapped, when dtype and alignment allow). */
static lt_status place_tensor(gemma3_model *m, lt_tensor *t, const st_tensor *src, const char *name,
                              wkind kind, int is_auto, lt_dtype want, const int64_t shape[2],
                              int ndim, char *err) {
    const char *file = m->storage->st.files[src->file].path;
    if (!src->dtype_ok || !lt_dtype_is_float(src->dtype)) {
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s: tensor '%s' has dtype %s (supported: F32, F16, BF16; only the q, k, v, "
                       "o, gate, up and down projections may be stored quantized, never the "
                       "embedding, norms or head)",
                       file, name, src->dtype_name);
    }
    int match = src->ndim == ndim;
    for (int d = 0; match && d < ndim; d++)
        match = src->shape[d] == shape[d];
    if (!match) {
        char got[96], exp[96];
        lt_tensor e = {.ndim = ndim, .shape = {shape[0], shape[1]}};
        st_shape_str(src, got, sizeof got);
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s: tensor '%s' has shape %s but config.json implies %s", file, name, got,
                       lt_shape_str(&e, exp, sizeof exp));
    }
    lt_dtype dt = kind == W_NORM ? LT_F32 : (is_auto ? src->dtype : want);
    t->dtype = dt;
    t->ndim = ndim;
    t->shape[0] = shape[0];
    t->shape[1] = ndim > 1 ? shape[1] : 0;
    int64_t n = lt_tensor_numel(t);
    if (dt == src->dtype && ((uintptr_t)src->data % lt_dtype_size(dt)) == 0) {
        t->data = (void *)src->data; /* zero-copy: private mapping */
    } else {
        t->data = storage_alloc(m->storage, (size_t)n * lt_dtype_size(dt));
        if (!t->data) {
            return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory converting '%s' to %s", file,
                           name, lt_dtype_user_name(dt));
        }
        if (st_convert(src, t->data, dt) != LT_OK)
            return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory reading '%s'", file, name);
    }
    m->weight_bytes += (int64_t)lt_tensor_bytes(t);
    m->n_params += n;
    return LT_OK;
}

/* ---- quantized linears (bitsandbytes NF4 / LLM.int8) ------------------------------------------
 * A linear is placed one of three ways: as stored when the checkpoint holds it quantized (its
 * quant-state floats copied to aligned memory, the packed codes mapped), quantized here from
 * its 16-bit tensor (one fp32 copy of that tensor at a time: never the whole 16-bit model), or
 * as a 16-bit tensor like every other weight. */

typedef struct quant_plan {
    lt_quant_kind kind; /* what 16-bit linears become (NONE: they stay 16-bit) */
    int nested;         /* NF4 with double quantization */
    int dynamic;        /* quant=dynamic: NF4 + double quant, the worst linears kept 16-bit */
    const char *why;    /* "quant=nf4" or "quantization_config" (messages) */
    bnb_config cfg;     /* config.json's quantization_config (present = 0 when none) */
} quant_plan;

static lt_status plan_quant(quant_plan *p, const char *quant, const char *cfg_path, char *err) {
    memset(p, 0, sizeof *p);
    lt_status rc = cfg_path ? bnb_config_load(&p->cfg, cfg_path, err) : LT_OK; /* NULL: random */
    if (rc != LT_OK) return rc;
    const char *q = quant && *quant ? quant : "none";
    lt_quant_kind want = LT_QUANT_NONE;
    if (!strcmp(q, "nf4")) {
        want = LT_QUANT_NF4;
    } else if (!strcmp(q, "int8")) {
        want = LT_QUANT_INT8;
    } else if (!strcmp(q, "dynamic")) {
        want = LT_QUANT_NF4;
        p->dynamic = 1;
    } else if (strcmp(q, "none") != 0) {
        rc = lt_fail(err, LT_ERR_ARG,
                     "quant='%s' is not accepted (accepted: none, nf4, int8, dynamic)", q);
    }
    if (rc == LT_OK && p->cfg.present && p->dynamic) {
        rc = lt_fail(err, LT_ERR_ARG,
                     "%.700s: this checkpoint is already quantized (quantization_config: %s); "
                     "quant=dynamic quantizes a 16-bit checkpoint itself. Load this one without "
                     "quant=: the linears its llm_int8_skip_modules lists stay 16-bit",
                     cfg_path, p->cfg.kind == BNB_NF4 ? "nf4" : "int8");
    } else if (rc == LT_OK && p->cfg.present) {
        lt_quant_kind ck = p->cfg.kind == BNB_NF4 ? LT_QUANT_NF4 : LT_QUANT_INT8;
        if (want != LT_QUANT_NONE && want != ck) {
            rc = lt_fail(
                err, LT_ERR_ARG,
                "%.700s: this checkpoint is quantized to %s (quantization_config); quant=%.20s "
                "cannot re-quantize it: load it with quant=%s or without quant=",
                cfg_path, ck == LT_QUANT_NF4 ? "nf4" : "int8", q,
                ck == LT_QUANT_NF4 ? "nf4" : "int8");
        }
        p->kind = ck;
        p->nested = p->cfg.double_quant;
        p->why = "quantization_config";
    } else {
        p->kind = want;
        p->nested = want == LT_QUANT_NF4;
        p->why = p->dynamic ? "quant=dynamic" : want == LT_QUANT_NF4 ? "quant=nf4" : "quant=int8";
    }
    if (rc != LT_OK) bnb_config_free(&p->cfg);
    return rc;
}

/* out's quant fields from p (out->cfg read already: the skip list is counted over its layers). */
static void plan_fill(gemma3_plan *out, const quant_plan *p) {
    snprintf(out->quant, sizeof out->quant, "%s",
             p->dynamic                 ? "dynamic"
             : p->kind == LT_QUANT_NF4  ? "nf4"
             : p->kind == LT_QUANT_INT8 ? "int8"
                                        : "none");
    out->prequantized = p->cfg.present;
    out->nested = p->nested;
    for (int l = 0; p->cfg.present && l < out->cfg.num_hidden_layers; l++)
        for (int k = 0; k < N_LINEAR; k++) {
            char canon[160];
            snprintf(canon, sizeof canon, "model.layers.%d.%s", l,
                     layer_table[linear_row[k]].suffix);
            out->kept16[k] += skip_listed(&p->cfg, canon);
        }
}

lt_status gemma3_plan_dir(gemma3_plan *p, const char *dir, const char *quant, char *err) {
    memset(p, 0, sizeof *p);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    lt_status rc = gemma3_config_load(&p->cfg, path, err);
    quant_plan qp;
    if (rc == LT_OK) rc = plan_quant(&qp, quant, path, err);
    if (rc != LT_OK) return rc;
    plan_fill(p, &qp);
    bnb_config_free(&qp.cfg);
    return LT_OK;
}

lt_status gemma3_plan_random(gemma3_plan *p, const char *size, const char *quant, char *err) {
    memset(p, 0, sizeof *p);
    quant_plan qp;
    lt_status rc = gemma3_config_preset(&p->cfg, size, err);
    if (rc == LT_OK) rc = plan_quant(&qp, quant, NULL, err);
    if (rc != LT_OK) return rc;
    plan_fill(p, &qp);
    bnb_config_free(&qp.cfg);
    return LT_OK;
}

/* An aligned copy of an F32 quant-state tensor in the model's storage. */
static const float *copy_f32(gemma3_model *m, const st_tensor *t) {
    float *d = storage_alloc(m->storage, t->nbytes);
    if (d) memcpy(d, t->data, t->nbytes);
    return d;
}

static lt_status place_prequantized(gemma3_model *m, lt_weight *w, const bnb_group *g, int64_t out,
                                    int64_t in, const char *name, char *err) {
    lt_quant *q = &w->q;
    memset(q, 0, sizeof *q);
    w->w = lt_tensor_2d(g->kind == BNB_NF4 ? LT_U8 : LT_I8, (void *)g->weight->data, out, in);
    int oom = 0;
    if (g->kind == BNB_NF4) {
        q->kind = LT_QUANT_NF4;
        q->blocksize = g->blocksize;
        oom |= !(q->code = copy_f32(m, g->quant_map));
        if (g->nested) {
            q->qabsmax = g->absmax->data;
            oom |= !(q->absmax2 = copy_f32(m, g->nested_absmax));
            oom |= !(q->code2 = copy_f32(m, g->nested_quant_map));
            q->nested_blocksize = g->nested_blocksize;
            q->offset = (float)g->offset;
        } else {
            oom |= !(q->absmax = copy_f32(m, g->absmax));
        }
    } else {
        q->kind = LT_QUANT_INT8;
        oom |= !(q->scb = copy_f32(m, g->scb));
    }
    if (oom) {
        return lt_fail(err, LT_ERR_MEMORY, "out of memory reading the quantization state of '%s'",
                       name);
    }
    return LT_OK;
}

/* NF4 quantization of n values on every core: blocks are independent, so the work splits at
 * block boundaries (a chunk of whole blocks, the last one ending the tensor) and the bytes are
 * those of one bnb_nf4_quantize call over the whole tensor. */
typedef struct nf4_job {
    const float *x;
    int64_t n, chunk;
    int bs;
    uint8_t *packed;
    float *absmax;
    int64_t next;
    pthread_mutex_t mu;
} nf4_job;

static void *nf4_worker(void *arg) {
    nf4_job *j = arg;
    for (;;) {
        pthread_mutex_lock(&j->mu);
        int64_t off = j->next;
        j->next += j->chunk;
        pthread_mutex_unlock(&j->mu);
        if (off >= j->n) return NULL;
        int64_t len = off + j->chunk <= j->n ? j->chunk : j->n - off;
        bnb_nf4_quantize(j->x + off, len, j->bs, j->packed + off / 2, j->absmax + off / j->bs);
    }
}

static void nf4_quantize_all_cores(const float *x, int64_t n, int bs, uint8_t *packed,
                                   float *absmax) {
    nf4_job j = {
        .x = x, .n = n, .chunk = (int64_t)bs * 4096, .bs = bs, .packed = packed, .absmax = absmax};
    pthread_mutex_init(&j.mu, NULL);
    lt_run_on_cores(nf4_worker, &j, (long)((n + j.chunk - 1) / j.chunk));
    pthread_mutex_destroy(&j.mu);
}

/* Quantizes the fp32 weight x [out, in] into w as plan p says (storage in m). LT_OK, or
 * LT_ERR_MEMORY. */
static lt_status quantize_values(gemma3_model *m, lt_weight *w, const float *x, quant_plan *p,
                                 int64_t out, int64_t in) {
    int64_t n = out * in;
    lt_quant *q = &w->q;
    memset(q, 0, sizeof *q);
    if (p->kind == LT_QUANT_INT8) {
        int8_t *w8 = storage_alloc(m->storage, (size_t)n);
        float *scb = storage_alloc(m->storage, sizeof(float) * (size_t)out);
        if (!w8 || !scb) return LT_ERR_MEMORY;
        bnb_int8_quantize(x, out, in, w8, scb);
        w->w = lt_tensor_2d(LT_I8, w8, out, in);
        q->kind = LT_QUANT_INT8;
        q->scb = scb;
        return LT_OK;
    }
    lt_status rc = LT_OK;
    int64_t bs = BNB_NF4_BLOCKSIZE, nb = (n + bs - 1) / bs;
    uint8_t *packed = storage_alloc(m->storage, (size_t)((n + 1) / 2));
    float *absmax = p->nested ? malloc(sizeof(float) * (size_t)nb)
                              : storage_alloc(m->storage, sizeof(float) * (size_t)nb);
    float *code2 = m->storage->code2;
    if (p->nested && !m->storage->have_code2) {
        bnb_dynamic_map(code2);
        m->storage->have_code2 = 1;
    }
    if (packed && absmax) {
        nf4_quantize_all_cores(x, n, (int)bs, packed, absmax);
        w->w = lt_tensor_2d(LT_U8, packed, out, in);
        q->kind = LT_QUANT_NF4;
        q->blocksize = (int)bs;
        q->code = bnb_nf4_code;
        if (p->nested) {
            int64_t nb2 = (nb + BNB_NESTED_BLOCKSIZE - 1) / BNB_NESTED_BLOCKSIZE;
            uint8_t *qa = storage_alloc(m->storage, (size_t)nb);
            float *a2 = storage_alloc(m->storage, sizeof(float) * (size_t)nb2);
            if (qa && a2)
                rc = bnb_double_quantize(absmax, nb, code2, BNB_NESTED_BLOCKSIZE, qa, a2,
                                         &q->offset);
            else
                rc = LT_ERR_MEMORY;
            q->qabsmax = qa;
            q->absmax2 = a2;
            q->code2 = code2;
            q->nested_blocksize = BNB_NESTED_BLOCKSIZE;
        } else {
            q->absmax = absmax;
        }
    } else {
        rc = LT_ERR_MEMORY;
    }
    if (p->nested) free(absmax);
    return rc;
}

/* The 16-bit (or fp32) linear src [out, in] as fp32 into x (out x in floats); why names what
 * asks for it in messages. */
static lt_status linear_to_f32(gemma3_model *m, const st_tensor *src, int64_t out, int64_t in,
                               const char *name, const char *why, float *x, char *err) {
    const char *file = m->storage->st.files[src->file].path;
    if (!src->dtype_ok || !lt_dtype_is_float(src->dtype) || src->ndim != 2 ||
        src->shape[0] != out || src->shape[1] != in) {
        char got[96];
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s: tensor '%s' is %s %s; %s needs an F32/F16/BF16 [%lld, %lld] weight",
                       file, name, src->dtype_name, st_shape_str(src, got, sizeof got), why,
                       (long long)out, (long long)in);
    }
    if (st_convert(src, x, LT_F32) != LT_OK)
        return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory reading '%s'", file, name);
    return LT_OK;
}

/* The pages of a mapped checkpoint tensor no longer needed in memory (its fp32 copy is made)
 * go back to the system (st_release_pages), so quantizing at load holds about one tensor of the
 * 16-bit model at a time rather than every page it has read. The mapping stays, and the file
 * gives the bytes back if they are read again (a merged save from the original weights). */

/* Quantizes the 16-bit tensor src into w as plan p says. */
static lt_status quantize_linear(gemma3_model *m, lt_weight *w, const st_tensor *src, quant_plan *p,
                                 int64_t out, int64_t in, const char *name, char *err) {
    const char *file = m->storage->st.files[src->file].path;
    float *x = malloc(sizeof(float) * (size_t)(out * in)); /* one fp32 copy of this tensor */
    if (!x) return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory quantizing '%s'", file, name);
    lt_status rc = linear_to_f32(m, src, out, in, name, p->why, x, err);
    if (rc == LT_OK) {
        st_release_pages(&m->storage->st, src->data, src->nbytes);
        rc = quantize_values(m, w, x, p, out, in);
        if (rc != LT_OK) lt_fail(err, rc, "%s: out of memory quantizing '%s'", file, name);
    }
    free(x);
    return rc;
}

/* One of the seven projections of a layer: as stored, quantized here, or 16-bit. */
static lt_status place_linear(gemma3_model *m, lt_weight *w, const char *name, const char *canon,
                              quant_plan *p, int is_auto, lt_dtype want, const int64_t shape[2],
                              char *err) {
    const st_set *st = &m->storage->st;
    char module[256];
    snprintf(module, sizeof module, "%.*s", (int)(strlen(name) - 7), name); /* - ".weight" */
    int skip = skip_listed(&p->cfg, canon);
    bnb_group g;
    lt_status rc = bnb_group_read(st, name, shape[0], shape[1], &g, err);
    if (rc != LT_OK) return rc;
    if (g.kind != BNB_PLAIN) {
        lt_quant_kind k = g.kind == BNB_NF4 ? LT_QUANT_NF4 : LT_QUANT_INT8;
        if (skip)
            return lt_fail(err, LT_ERR_FORMAT,
                           "%s: '%s' is listed in llm_int8_skip_modules (kept in 16 bits) but "
                           "stored quantized; fix quantization_config or the checkpoint",
                           st->files[g.weight->file].path, module);
        if (p->kind != LT_QUANT_NONE && p->kind != k) {
            return lt_fail(err, LT_ERR_FORMAT, "%s: '%s' is stored %s but %s asks for %s",
                           st->files[g.weight->file].path, name, k == LT_QUANT_NF4 ? "nf4" : "int8",
                           p->why, p->kind == LT_QUANT_NF4 ? "nf4" : "int8");
        }
        rc = place_prequantized(m, w, &g, shape[0], shape[1], name, err);
        m->prequantized = 1;
        if (rc == LT_OK && k == LT_QUANT_NF4 && g.nested) m->quant_nested = 1;
        m->quant = k;
    } else if (skip || p->kind == LT_QUANT_NONE) {
        rc = place_tensor(m, &w->w, g.weight, name, W_MATRIX, is_auto, want, shape, 2, err);
        if (skip) m->n_kept16++;
        return rc;
    } else {
        rc = quantize_linear(m, w, g.weight, p, shape[0], shape[1], name, err);
        m->quant = p->kind;
        if (p->nested) m->quant_nested = 1;
    }
    if (rc != LT_OK) return rc;
    m->n_quantized++;
    m->n_params += shape[0] * shape[1];
    m->weight_bytes += (int64_t)lt_weight_bytes(w);
    return LT_OK;
}

const char *gemma3_quant_summary(const gemma3_model *m, char *buf, size_t cap) {
    if (!m->n_quantized && !m->quant_dynamic) {
        snprintf(buf, cap, "%s", "");
        return buf;
    }
    char kept[64] = "";
    if (m->n_kept16)
        snprintf(kept, sizeof kept, "; %d kept in 16 bits%s", m->n_kept16,
                 m->quant_dynamic ? " by quant=dynamic" : "");
    snprintf(buf, cap, "%s%s, %d linears%s%s", m->quant == LT_QUANT_NF4 ? "nf4" : "int8",
             m->quant_nested ? " (double quant)" : "", m->n_quantized, kept,
             m->prequantized ? " (pre-quantized checkpoint)" : " (quantized at load)");
    return buf;
}

lt_weight *gemma3_weight_owner(gemma3_model *m, const lt_tensor *t) {
    if (t == &m->embed_tokens.w) return &m->embed_tokens;
    if (t == &m->lm_head.w) return &m->lm_head;
    for (int l = 0; l < m->cfg.num_hidden_layers; l++)
        for (int k = 0; k < N_LINEAR; k++)
            if (t == &layer_linear(&m->layers[l], k)->w) return layer_linear(&m->layers[l], k);
    return NULL;
}

/* quant=dynamic's own options, checked before anything loads. */
static lt_status dynamic_check(const quant_plan *p, const gemma3_load_spec *spec, char *err) {
    if (!p->dynamic) return LT_OK;
    double keep = spec->quant_keep;
    if (!(keep >= 0 && keep <= 1))
        return lt_fail(err, LT_ERR_ARG,
                       "quant_keep=%g is outside [0, 1] (the fraction of the linear parameters "
                       "quant=dynamic may keep in 16 bits; 0 keeps none, like quant=nf4)",
                       keep);
    if (!spec->calib_ids || spec->n_calib < 1)
        return lt_fail(err, LT_ERR_ARG,
                       "quant=dynamic needs the calibration tokens (qdyn_calibration_ids)");
    return LT_OK;
}

/* quant=dynamic (defined after the forward, which it runs): where the linears come from.
 * read: linear k (0..6: q, k, v, o, gate, up, down) of layer l as fp32 into x [out, in];
 * keep16: places it in w the way the final model keeps it in 16 bits, adding its parameters
 * and bytes to the model's counts. */
typedef struct dyn_source {
    lt_status (*read)(void *user, gemma3_model *m, int l, int k, float *x, char *err);
    lt_status (*keep16)(void *user, gemma3_model *m, int l, int k, lt_weight *w, char *err);
    void *user;
} dyn_source;

/* quant=dynamic's calibration input (calib_embed). */
typedef struct dyn_calib {
    float *h0; /* [T, H] fp32, host memory */
    int T;
} dyn_calib;

static lt_status calib_embed(const gemma3_model *m, const gemma3_load_spec *spec, dyn_calib *dc,
                             char *err);
static lt_status load_dynamic(gemma3_model *m, quant_plan *p, const gemma3_load_spec *spec,
                              const dyn_source *src, const dyn_calib *dc, const lt_callbacks *cb,
                              char *err);

/* A checkpoint's linears for quant=dynamic: mapped 16-bit tensors. */
typedef struct dir_linears {
    const char *prefix; /* the text prefix the checkpoint uses */
    int is_auto;
    lt_dtype want; /* what kept linears become unless is_auto */
} dir_linears;

static const st_tensor *dir_linear_find(const dir_linears *d, gemma3_model *m, int l, int k,
                                        char *name, size_t cap, int64_t shape[2], char *err) {
    int nd;
    snprintf(name, cap, "%slayers.%d.%s", d->prefix, l, layer_table[linear_row[k]].suffix);
    layer_shape(&m->cfg, linear_row[k], shape, &nd);
    bnb_group g;
    if (bnb_group_read(&m->storage->st, name, shape[0], shape[1], &g, err) != LT_OK) return NULL;
    if (g.kind != BNB_PLAIN) {
        lt_fail(err, LT_ERR_FORMAT,
                "%s: '%s' is stored quantized (bitsandbytes' layout); quant=dynamic quantizes a "
                "16-bit checkpoint itself: load this one without quant=",
                m->storage->st.files[g.weight->file].path, name);
        return NULL;
    }
    return g.weight;
}

static lt_status dir_linear_read(void *user, gemma3_model *m, int l, int k, float *x, char *err) {
    char name[256];
    int64_t shape[2];
    const st_tensor *src = dir_linear_find(user, m, l, k, name, sizeof name, shape, err);
    if (!src) return LT_ERR_FORMAT;
    lt_status rc = linear_to_f32(m, src, shape[0], shape[1], name, "quant=dynamic", x, err);
    if (rc == LT_OK) st_release_pages(&m->storage->st, src->data, src->nbytes);
    return rc;
}

static lt_status dir_linear_keep16(void *user, gemma3_model *m, int l, int k, lt_weight *w,
                                   char *err) {
    const dir_linears *d = user;
    char name[256];
    int64_t shape[2];
    const st_tensor *src = dir_linear_find(d, m, l, k, name, sizeof name, shape, err);
    if (!src) return LT_ERR_FORMAT;
    memset(w, 0, sizeof *w);
    return place_tensor(m, &w->w, src, name, W_MATRIX, d->is_auto, d->want, shape, 2, err);
}

const st_tensor *gemma3_source_tensor(const gemma3_model *m, const char *canon, const st_set **st,
                                      char *name, size_t cap) {
    if (!m->storage || !m->storage->st.n_tensors) return NULL;
    const st_set *set = &m->storage->st;
    static const char *const heads[] = {"lm_head.weight", "language_model.lm_head.weight"};
    char n[256];
    const st_tensor *t = NULL;
    int text = !strncmp(canon, "model.", 6);
    size_t count = text ? sizeof text_prefixes / sizeof *text_prefixes : 2;
    for (size_t i = 0; !t && i < count; i++) {
        if (text)
            snprintf(n, sizeof n, "%s%s", text_prefixes[i], canon + 6);
        else if (!strcmp(canon, "lm_head.weight"))
            snprintf(n, sizeof n, "%s", heads[i]);
        else
            return NULL;
        t = st_find(set, n);
    }
    if (t && st) *st = set;
    if (t && name) snprintf(name, cap, "%s", n);
    return t;
}

/* The image tower, when config.json and the checkpoint both have one. A tower that cannot be
 * read (a quantized one, a shape that disagrees) leaves the text model usable: the reason is
 * kept in vision_error and the tower counts as skipped. */
static void load_vision(gemma3_model *m, const st_set *st) {
    if (!m->cfg.vision.present) {
        snprintf(m->vision_error, sizeof m->vision_error, "%s",
                 m->cfg.vision.error[0] ? m->cfg.vision.error
                                        : "this model has no image tower (a text-only config)");
        return;
    }
    if (!siglip_present(st)) {
        snprintf(m->vision_error, sizeof m->vision_error,
                 "config.json has a vision_config but the checkpoint has no image tower");
        return;
    }
    char err[LT_ERRLEN];
    if (siglip_load(&m->vision, st, &m->cfg, err) != LT_OK)
        snprintf(m->vision_error, sizeof m->vision_error, "%s", err);
}

lt_status gemma3_load_dir(gemma3_model **out, const char *dir, const char *dtype,
                          const lt_callbacks *cb, char *err) {
    return gemma3_load_dir_quant(out, dir, dtype, NULL, cb, err);
}

lt_status gemma3_load_dir_quant(gemma3_model **out, const char *dir, const char *dtype,
                                const char *quant, const lt_callbacks *cb, char *err) {
    gemma3_load_spec spec = {.dtype = dtype, .quant = quant};
    return gemma3_load_dir_spec(out, dir, &spec, cb, err);
}

lt_status gemma3_load_dir_spec(gemma3_model **out, const char *dir, const gemma3_load_spec *spec,
                               const lt_callbacks *cb, char *err) {
    *out = NULL;
    const char *dtype = spec->dtype, *quant = spec->quant;
    int is_auto;
    lt_dtype want = LT_F32;
    if (parse_dtype_opt(dtype, &is_auto, &want)) {
        return lt_fail(err, LT_ERR_ARG,
                       "dtype='%s' is not accepted (accepted: auto, fp32, fp16, bf16)", dtype);
    }
    char path[4096];
    gemma3_config cfg;
    snprintf(path, sizeof path, "%s/config.json", dir);
    lt_status rc = gemma3_config_load(&cfg, path, err);
    if (rc != LT_OK) return rc;
    quant_plan plan;
    rc = plan_quant(&plan, quant, path, err);
    if (rc == LT_OK && (rc = dynamic_check(&plan, spec, err)) != LT_OK) bnb_config_free(&plan.cfg);
    if (rc != LT_OK) return rc;
    gemma3_model *m = model_new(&cfg, err);
    if (!m) {
        bnb_config_free(&plan.cfg);
        return LT_ERR_MEMORY;
    }
    snprintf(m->source, sizeof m->source, "%s", dir);
    if (cb && cb->message) cb->message(cb->ctx, "mapping safetensors");
    rc = st_open(&m->storage->st, dir, err);
    if (rc != LT_OK) {
        bnb_config_free(&plan.cfg);
        gemma3_model_free(m);
        return rc;
    }
    const st_set *st = &m->storage->st;
    /* which text prefix does this checkpoint use? */
    const char *prefix = NULL;
    for (size_t i = 0; i < sizeof text_prefixes / sizeof text_prefixes[0] && !prefix; i++) {
        char n[256];
        snprintf(n, sizeof n, "%sembed_tokens.weight", text_prefixes[i]);
        if (st_find(st, n)) prefix = text_prefixes[i];
    }
    if (!prefix) {
        lt_fail(err, LT_ERR_FORMAT,
                "%s: no embed_tokens.weight under any Gemma 3 prefix (looked for model., "
                "language_model.model., model.language_model.)",
                st->n_files ? st->files[0].path : dir);
        bnb_config_free(&plan.cfg);
        gemma3_model_free(m);
        return LT_ERR_FORMAT;
    }
    for (int i = 0; i < st->n_tensors; i++)
        if (is_vision_name(st->tensors[i].name)) m->skipped_vision = 1;

    const gemma3_sink *sink = spec->sink;
    dyn_calib calib = {0};
    int n = gemma3_weight_count(m);
    for (int i = 0; i < n && rc == LT_OK; i++) {
        char canon[160], name[256];
        wkind kind;
        int64_t shape[2];
        int nd;
        lt_tensor *slot = weight_slot(m, i, canon, sizeof canon, &kind, shape, &nd);
        const st_tensor *src = NULL;
        if (!strncmp(canon, "model.", 6)) {
            snprintf(name, sizeof name, "%s%s", prefix, canon + 6);
            src = st_find(st, name);
        } else { /* lm_head.weight, untied */
            snprintf(name, sizeof name, "lm_head.weight");
            src = st_find(st, name);
            if (!src) {
                snprintf(name, sizeof name, "language_model.lm_head.weight");
                src = st_find(st, name);
            }
        }
        if (!src) {
            rc = lt_fail(err, LT_ERR_FORMAT,
                         "%s: tensor '%s' is missing (config.json says %d layers%s)", dir, name,
                         cfg.num_hidden_layers, cfg.tie_word_embeddings ? "" : ", untied head");
            break;
        }
        int in_layer = i >= 1 && i <= cfg.num_hidden_layers * N_LAYER_W;
        int linear = kind == W_MATRIX && in_layer;
        if (linear && plan.dynamic)
            ; /* measured and placed layer by layer below */
        else if (linear)
            rc = place_linear(m, (lt_weight *)slot, name, canon, &plan, is_auto, want, shape, err);
        else
            rc = place_tensor(m, slot, src, name, kind, is_auto, want, shape, nd, err);
        if (rc == LT_OK && i == 0) m->dtype = slot->dtype;
        if (rc == LT_OK && i == 0 && plan.dynamic) rc = calib_embed(m, spec, &calib, err);
        /* quant=dynamic's layers go to the sink once measured (their norms wait on the host) */
        if (rc == LT_OK && sink && !(plan.dynamic && in_layer))
            rc = sink->place(sink->user, m, canon, slot, err);
        if (cb && cb->progress) cb->progress(cb->ctx, "loading weights", i + 1, n);
    }
    if (rc == LT_OK && plan.dynamic) {
        dir_linears d = {prefix, is_auto, want};
        dyn_source src = {dir_linear_read, dir_linear_keep16, &d};
        rc = load_dynamic(m, &plan, spec, &src, &calib, cb, err);
    }
    free(calib.h0);
    bnb_config_free(&plan.cfg);
    if (rc == LT_OK) {
        load_vision(m, st);
        if (sink) rc = sink->finish(sink->user, m, err);
    }
    if (rc != LT_OK) {
        if (sink) sink->abort(sink->user, m);
        gemma3_model_free(m);
        return rc;
    }
    *out = m;
    return LT_OK;
}

/* ---- random weights
 * ------------------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

typedef struct fill_item {
    void *data;
    lt_dtype dt;
    int64_t n;
    uint64_t seed;
} fill_item;

typedef struct fill_job {
    fill_item *items;
    int n_items;
    int next_chunk_item;
    int64_t next_chunk_off;
    pthread_mutex_t mu;
} fill_job;

#define FILL_CHUNK (1 << 20)

/* Fills chunks of the items; the value of element e of item i depends only on (seed, i, e),
 * so the result does not depend on the number of threads. Uniform with std 0.02. */
static void *fill_worker(void *arg) {
    fill_job *j = arg;
    const float a = 0.02f * 1.7320508f;
    for (;;) {
        pthread_mutex_lock(&j->mu);
        if (j->next_chunk_item >= j->n_items) {
            pthread_mutex_unlock(&j->mu);
            return NULL;
        }
        fill_item *it = &j->items[j->next_chunk_item];
        int64_t off = j->next_chunk_off;
        j->next_chunk_off += FILL_CHUNK;
        if (j->next_chunk_off >= it->n) {
            j->next_chunk_item++;
            j->next_chunk_off = 0;
        }
        pthread_mutex_unlock(&j->mu);
        int64_t end = off + FILL_CHUNK < it->n ? off + FILL_CHUNK : it->n;
        uint64_t s = it->seed ^ ((uint64_t)(off / FILL_CHUNK) * 0xd1b54a32d192ed03ull);
        /* four 16-bit uniforms per 64-bit draw: plenty of resolution for bf16/fp16 weights */
        for (int64_t e = off; e < end; e += 4) {
            uint64_t r = splitmix64(&s);
            for (int q = 0; q < 4 && e + q < end; q++) {
                float u =
                    (float)((r >> (16 * q)) & 0xffffu) * (1.0f / 65536.0f) + (0.5f / 65536.0f);
                float v = (2.0f * u - 1.0f) * a;
                if (it->dt == LT_F32)
                    ((float *)it->data)[e + q] = v;
                else if (it->dt == LT_BF16)
                    ((uint16_t *)it->data)[e + q] = lt_f32_to_bf16(v);
                else
                    ((uint16_t *)it->data)[e + q] = lt_f32_to_f16(v);
            }
        }
    }
}

static int64_t mem_available_bytes(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    long long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1) break;
    fclose(f);
    return kb < 0 ? -1 : (int64_t)kb * 1024;
}

lt_status gemma3_load_random(gemma3_model **out, const char *size, uint64_t seed, const char *dtype,
                             const lt_callbacks *cb, char *err) {
    return gemma3_load_random_quant(out, size, seed, dtype, NULL, cb, err);
}

/* Fills the items on every core. */
static void fill_all_cores(fill_item *items, int n_items) {
    fill_job job = {.items = items, .n_items = n_items};
    pthread_mutex_init(&job.mu, NULL);
    lt_run_on_cores(fill_worker, &job, 0);
    pthread_mutex_destroy(&job.mu);
}

/* Random weights' linears for quant=dynamic: drawn again from their seeds. */
typedef struct random_linears {
    const uint64_t *seeds; /* [L * 7] */
    lt_dtype want;         /* what kept linears become */
} random_linears;

static lt_status random_linear_read(void *user, gemma3_model *m, int l, int k, float *x,
                                    char *err) {
    const random_linears *r = user;
    (void)err;
    int64_t shape[2];
    int nd;
    layer_shape(&m->cfg, linear_row[k], shape, &nd);
    fill_item one = {x, LT_F32, shape[0] * shape[1], r->seeds[l * N_LINEAR + k]};
    fill_all_cores(&one, 1);
    return LT_OK;
}

static lt_status random_linear_keep16(void *user, gemma3_model *m, int l, int k, lt_weight *w,
                                      char *err) {
    const random_linears *r = user;
    int64_t shape[2];
    int nd;
    layer_shape(&m->cfg, linear_row[k], shape, &nd);
    memset(w, 0, sizeof *w);
    w->w = lt_tensor_2d(r->want, NULL, shape[0], shape[1]);
    w->w.data = storage_alloc(m->storage, lt_tensor_bytes(&w->w));
    if (!w->w.data)
        return lt_fail(err, LT_ERR_MEMORY, "out of memory allocating layer %d's linear %d", l, k);
    fill_item one = {w->w.data, r->want, shape[0] * shape[1], r->seeds[l * N_LINEAR + k]};
    fill_all_cores(&one, 1);
    m->n_params += shape[0] * shape[1];
    m->weight_bytes += (int64_t)lt_tensor_bytes(&w->w);
    return LT_OK;
}

lt_status gemma3_load_random_quant(gemma3_model **out, const char *size, uint64_t seed,
                                   const char *dtype, const char *quant, const lt_callbacks *cb,
                                   char *err) {
    gemma3_load_spec spec = {.dtype = dtype, .quant = quant};
    return gemma3_load_random_spec(out, size, seed, &spec, cb, err);
}

lt_status gemma3_load_random_spec(gemma3_model **out, const char *size, uint64_t seed,
                                  const gemma3_load_spec *spec, const lt_callbacks *cb, char *err) {
    *out = NULL;
    const char *dtype = spec->dtype, *quant = spec->quant;
    int is_auto;
    lt_dtype want = LT_BF16;
    if (parse_dtype_opt(dtype, &is_auto, &want)) {
        return lt_fail(err, LT_ERR_ARG,
                       "dtype='%s' is not accepted (accepted: auto, fp32, fp16, bf16)", dtype);
    }
    if (is_auto) want = LT_BF16;
    quant_plan qp;
    lt_status rc = plan_quant(&qp, quant, NULL, err);
    if (rc == LT_OK) rc = dynamic_check(&qp, spec, err);
    if (rc != LT_OK) return rc;
    gemma3_config cfg;
    rc = gemma3_config_preset(&cfg, size, err);
    if (rc != LT_OK) return rc;
    gemma3_model *m = model_new(&cfg, err);
    if (!m) return LT_ERR_MEMORY;
    snprintf(m->source, sizeof m->source, "random:gemma-3-%s", size);

    /* plan: sizes first, refuse before allocating when it cannot fit */
    const gemma3_sink *sink = spec->sink;
    int n = gemma3_weight_count(m);
    int64_t bytes = 0, largest = 0, linear_params = 0, layer_linears = 0, largest16 = 0;
    for (int i = 0; i < n; i++) {
        char name[160];
        wkind kind;
        int64_t shape[2];
        int nd;
        lt_tensor *t = weight_slot(m, i, name, sizeof name, &kind, shape, &nd);
        int64_t numel = nd == 2 ? shape[0] * shape[1] : shape[0];
        lt_weight *w = gemma3_weight_owner(m, t);
        int quantized = qp.kind != LT_QUANT_NONE && w && w != &m->embed_tokens && w != &m->lm_head;
        if (quantized && numel > largest) largest = numel;
        if (quantized) linear_params += numel;
        if (quantized && i <= N_LAYER_W) layer_linears += numel; /* layer 0's seven */
        int64_t tb = quantized        ? numel * (qp.kind == LT_QUANT_NF4 ? 9 : 16) / 16
                     : kind == W_NORM ? numel * 4
                                      : numel * (int64_t)lt_dtype_size(want);
        if (!quantized && tb > largest16) largest16 = tb;
        bytes += tb;
    }
    double keep = spec->quant_keep;
    int64_t draw_bytes = largest * 4 + largest * (qp.kind == LT_QUANT_NF4 ? 9 : 16) / 16;
    if (sink) /* one tensor at a time: the largest 16-bit one, or a linear's draw + its form */
        bytes = (largest16 > draw_bytes ? largest16 : draw_bytes) +
                (qp.dynamic ? layer_linears * 4 : 0);
    else if (qp.dynamic) /* one layer's linears in fp32, and the kept ones in 16 bits */
        bytes += layer_linears * 4 +
                 (int64_t)(keep * (double)linear_params) * (int64_t)lt_dtype_size(want);
    else
        bytes += largest * 4; /* the fp32 draw of one linear */
    int64_t avail = mem_available_bytes();
    if (avail > 0 && bytes > avail - ((int64_t)1 << 30) && sink) {
        lt_fail(err, LT_ERR_MEMORY,
                "random:gemma-3-%s needs %.1f GB of host memory while its weights go to the "
                "device one at a time (+1 GB headroom) but only %.1f GB is available",
                size, bytes / 1e9, avail / 1e9);
        gemma3_model_free(m);
        bnb_config_free(&qp.cfg);
        return LT_ERR_MEMORY;
    } else if (avail > 0 && bytes > avail - ((int64_t)1 << 30)) {
        lt_fail(err, LT_ERR_MEMORY,
                "random:gemma-3-%s needs %.1f GB for its %s weights (+1 GB headroom) but only "
                "%.1f GB of memory is available (%s)",
                size, bytes / 1e9,
                qp.kind == LT_QUANT_NONE  ? lt_dtype_user_name(want)
                : qp.kind == LT_QUANT_NF4 ? "nf4"
                                          : "int8",
                avail / 1e9,
                qp.kind == LT_QUANT_NF4 ? "try a smaller size"
                : want == LT_BF16       ? "try quant=nf4 or a smaller size, e.g. random:gemma-3-1b"
                                        : "try dtype=bf16, quant=nf4 or a smaller size");
        gemma3_model_free(m);
        bnb_config_free(&qp.cfg);
        return LT_ERR_MEMORY;
    }
    fill_item *items = calloc((size_t)n, sizeof *items);
    float *draw = largest && !qp.dynamic ? malloc(sizeof(float) * (size_t)largest) : NULL;
    uint64_t *seeds = qp.dynamic ? calloc((size_t)cfg.num_hidden_layers * N_LINEAR, 8) : NULL;
    if (!items || (largest && !qp.dynamic && !draw) || (qp.dynamic && !seeds)) {
        free(items), free(draw), free(seeds);
        gemma3_model_free(m);
        bnb_config_free(&qp.cfg);
        return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    }
    if (cb && cb->message)
        cb->message(cb->ctx, qp.kind != LT_QUANT_NONE ? "drawing and quantizing random weights"
                                                      : "filling random weights");
    int n_items = 0;
    uint64_t sm = seed;
    dyn_calib calib = {0};
    for (int i = 0; i < n && rc == LT_OK; i++) {
        char name[160];
        wkind kind;
        int64_t shape[2];
        int nd;
        lt_tensor *t = weight_slot(m, i, name, sizeof name, &kind, shape, &nd);
        t->ndim = nd;
        t->shape[0] = shape[0];
        t->shape[1] = nd == 2 ? shape[1] : 0;
        t->dtype = kind == W_NORM ? LT_F32 : want;
        int64_t numel = lt_tensor_numel(t);
        uint64_t ts = splitmix64(&sm);
        lt_weight *w = gemma3_weight_owner(m, t);
        int linear = w && w != &m->embed_tokens && w != &m->lm_head;
        int in_layer = i >= 1 && i <= cfg.num_hidden_layers * N_LAYER_W;
        if (linear && qp.dynamic) { /* drawn, measured and placed layer by layer below */
            seeds[(i - 1) / N_LAYER_W * N_LINEAR + linear_of_row((i - 1) % N_LAYER_W)] = ts;
            continue;
        }
        m->n_params += numel;
        if (qp.kind != LT_QUANT_NONE && linear) {
            fill_item one = {draw, LT_F32, numel, ts};
            fill_all_cores(&one, 1);
            rc = quantize_values(m, w, draw, &qp, shape[0], shape[1]);
            if (rc != LT_OK) {
                lt_fail(err, rc, "out of memory quantizing '%s'", name);
                break;
            }
            m->n_quantized++;
            m->weight_bytes += (int64_t)lt_weight_bytes(w);
        } else {
            t->data = storage_alloc(m->storage, lt_tensor_bytes(t));
            if (!t->data) {
                rc = lt_fail(err, LT_ERR_MEMORY, "out of memory allocating '%s' (%s)", name,
                             lt_dtype_user_name(t->dtype));
                break;
            }
            if (kind == W_NORM) {
                memset(t->data, 0, lt_tensor_bytes(t)); /* Gemma's (1 + w) norms start at w = 0 */
            } else if (sink) {                          /* drawn now: it leaves the host next */
                fill_item one = {t->data, t->dtype, numel, ts};
                fill_all_cores(&one, 1);
            } else {
                items[n_items++] = (fill_item){t->data, t->dtype, numel, ts};
            }
            m->weight_bytes += (int64_t)lt_tensor_bytes(t);
        }
        if (sink && i == 0 && qp.dynamic) rc = calib_embed(m, spec, &calib, err);
        /* quant=dynamic's layers go to the sink once measured (their norms wait on the host) */
        if (rc == LT_OK && sink && !(qp.dynamic && in_layer))
            rc = sink->place(sink->user, m, name, t, err);
    }
    free(draw);
    if (rc == LT_OK) fill_all_cores(items, n_items);
    free(items);
    if (rc == LT_OK && qp.dynamic && !sink) rc = calib_embed(m, spec, &calib, err);
    if (rc == LT_OK && qp.dynamic) {
        random_linears r = {seeds, want};
        dyn_source src = {random_linear_read, random_linear_keep16, &r};
        rc = load_dynamic(m, &qp, spec, &src, &calib, cb, err);
    }
    free(seeds);
    free(calib.h0);
    if (rc == LT_OK && qp.kind != LT_QUANT_NONE && !qp.dynamic) {
        m->quant = qp.kind;
        m->quant_nested = qp.nested;
    }
    bnb_config_free(&qp.cfg);
    m->dtype = want;
    if (rc == LT_OK && sink) rc = sink->finish(sink->user, m, err);
    if (rc != LT_OK) {
        if (sink) sink->abort(sink->user, m);
        gemma3_model_free(m);
        return rc;
    }
    *out = m;
    return LT_OK;
}

/* ---- KV cache -----------------------------------------------------------------------------------
 */

static int cache_cap_for(const gemma3_config *cfg, int l, int max_seq, int *ring) {
    if (gemma3_layer_kind(cfg, l) == GEMMA3_SLIDING &&
        cfg->sliding_window + GEMMA3_CHUNK < max_seq) {
        *ring = 1;
        return cfg->sliding_window + GEMMA3_CHUNK;
    }
    *ring = 0;
    return 0; /* full layers grow on demand */
}

int gemma3_cache_slots(const gemma3_config *cfg, int l, int max_len) {
    int ring, cap = cache_cap_for(cfg, l, max_len, &ring);
    return ring ? cap : max_len;
}

lt_status gemma3_cache_init(gemma3_cache *c, lt_ctx *ctx, const gemma3_config *cfg, int max_seq) {
    memset(c, 0, sizeof *c);
    c->n_layers = cfg->num_hidden_layers;
    c->max_seq = max_seq;
    c->layers = calloc((size_t)c->n_layers, sizeof *c->layers);
    c->kpos_host = malloc(sizeof(int32_t) * (GEMMA3_CHUNK + 1));
    if (!c->layers || !c->kpos_host) {
        free(c->layers);
        free(c->kpos_host);
        memset(c, 0, sizeof *c);
        return lt_fail(ctx->err, LT_ERR_MEMORY, "out of memory creating the KV cache");
    }
    size_t row = (size_t)cfg->num_key_value_heads * (size_t)cfg->head_dim * sizeof(float);
    for (int l = 0; l < c->n_layers; l++) {
        gemma3_cache_layer *cl = &c->layers[l];
        int cap = cache_cap_for(cfg, l, max_seq, &cl->ring);
        if (!cap) continue;
        cl->k = ctx->be->alloc(ctx, row * (size_t)cap);
        cl->v = ctx->be->alloc(ctx, row * (size_t)cap);
        cl->kpos = ctx->be->alloc(ctx, sizeof(int32_t) * (size_t)cap);
        if (!cl->k || !cl->v || !cl->kpos) {
            gemma3_cache_free(c, ctx);
            return LT_ERR_MEMORY;
        }
        cl->cap = cap;
    }
    gemma3_cache_reset(c, ctx);
    return LT_OK;
}

/* Marks every slot of layer l empty (kpos = -1). */
static lt_status cache_clear_layer(gemma3_cache_layer *cl, lt_ctx *ctx, int from) {
    int32_t neg[256];
    for (int i = 0; i < 256; i++)
        neg[i] = -1;
    for (int s = from; s < cl->cap; s += 256) {
        int k = cl->cap - s < 256 ? cl->cap - s : 256;
        lt_status rc = ctx->be->upload(ctx, cl->kpos + s, neg, sizeof(int32_t) * (size_t)k);
        if (rc != LT_OK) return rc;
    }
    return LT_OK;
}

void gemma3_cache_reset(gemma3_cache *c, lt_ctx *ctx) {
    c->len = 0;
    for (int l = 0; l < c->n_layers; l++)
        if (c->layers[l].cap) cache_clear_layer(&c->layers[l], ctx, 0);
}

void gemma3_cache_free(gemma3_cache *c, lt_ctx *ctx) {
    for (int l = 0; c->layers && l < c->n_layers; l++) {
        ctx->be->release(ctx, c->layers[l].k);
        ctx->be->release(ctx, c->layers[l].v);
        ctx->be->release(ctx, c->layers[l].kpos);
    }
    free(c->layers);
    free(c->kpos_host);
    memset(c, 0, sizeof *c);
}

/* Grows a full-attention layer so that it holds `need` positions. */
static lt_status cache_grow(gemma3_cache_layer *cl, lt_ctx *ctx, size_t row, int need,
                            int max_seq) {
    if (need <= cl->cap) return LT_OK;
    int cap = cl->cap ? cl->cap : 256;
    while (cap < need)
        cap *= 2;
    if (cap > max_seq) cap = max_seq;
    float *k = ctx->be->alloc(ctx, row * (size_t)cap), *v = ctx->be->alloc(ctx, row * (size_t)cap);
    int32_t *kp = ctx->be->alloc(ctx, sizeof(int32_t) * (size_t)cap);
    if (!k || !v || !kp) {
        ctx->be->release(ctx, k);
        ctx->be->release(ctx, v);
        ctx->be->release(ctx, kp);
        return LT_ERR_MEMORY;
    }
    lt_status rc = LT_OK;
    if (cl->cap) {
        rc = ctx->be->copy(ctx, k, cl->k, row * (size_t)cl->cap);
        if (rc == LT_OK) rc = ctx->be->copy(ctx, v, cl->v, row * (size_t)cl->cap);
        if (rc == LT_OK) rc = ctx->be->copy(ctx, kp, cl->kpos, sizeof(int32_t) * (size_t)cl->cap);
    }
    ctx->be->release(ctx, cl->k);
    ctx->be->release(ctx, cl->v);
    ctx->be->release(ctx, cl->kpos);
    int old = cl->cap;
    cl->k = k;
    cl->v = v;
    cl->kpos = kp;
    cl->cap = cap;
    if (rc == LT_OK) rc = cache_clear_layer(cl, ctx, old);
    return rc;
}

/* Writes T rows of k/v (positions p0..p0+T-1) into layer l's slots. */
static lt_status cache_write(gemma3_cache *c, lt_ctx *ctx, int l, const float *k, const float *v,
                             int p0, int T, size_t row) {
    gemma3_cache_layer *cl = &c->layers[l];
    for (int t = 0; t < T;) {
        int slot = cl->ring ? (p0 + t) % cl->cap : p0 + t;
        int run = cl->cap - slot < T - t ? cl->cap - slot : T - t; /* contiguous slots */
        lt_status rc = ctx->be->copy(ctx, (char *)cl->k + row * (size_t)slot,
                                     (const char *)k + row * (size_t)t, row * (size_t)run);
        if (rc == LT_OK)
            rc = ctx->be->copy(ctx, (char *)cl->v + row * (size_t)slot,
                               (const char *)v + row * (size_t)t, row * (size_t)run);
        for (int i = 0; i < run; i++)
            c->kpos_host[i] = p0 + t + i;
        if (rc == LT_OK)
            rc = ctx->be->upload(ctx, cl->kpos + slot, c->kpos_host, sizeof(int32_t) * (size_t)run);
        if (rc != LT_OK) return rc;
        t += run;
    }
    return LT_OK;
}

/* ---- forward
 * -------------------------------------------------------------------------------------- */

float gemma3_embed_scale(const gemma3_model *m) {
    return (float)sqrt((double)m->cfg.hidden_size);
}

void gemma3_acts_free(gemma3_acts *b, lt_ctx *ctx) {
    void *all[] = {b->h, b->a, b->q, b->k, b->v, b->att, b->o, b->gate, b->up, b->ids, b->pos};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        ctx->be->release(ctx, all[i]);
    memset(b, 0, sizeof *b);
}

/* The bytes of each buffer of gemma3_acts for T rows, in the struct's order. */
static void acts_sizes(const gemma3_config *c, int T, size_t sz[11]) {
    size_t H = (size_t)c->hidden_size, I = (size_t)c->intermediate_size;
    size_t qo = (size_t)c->num_attention_heads * (size_t)c->head_dim;
    size_t kvo = (size_t)c->num_key_value_heads * (size_t)c->head_dim, t = (size_t)T,
           f = sizeof(float);
    size_t all[11] = {t * H * f,   t * H * f,           t * qo * f,         t * kvo * f,
                      t * kvo * f, t * qo * f,          t * H * f,          t * I * f,
                      t * I * f,   t * sizeof(int32_t), t * sizeof(int32_t)};
    memcpy(sz, all, sizeof all);
}

size_t gemma3_acts_bytes(const gemma3_config *c, int T) {
    size_t sz[11], n = 0;
    acts_sizes(c, T, sz);
    for (int i = 0; i < 11; i++)
        n += sz[i];
    return n;
}

lt_status gemma3_acts_alloc(gemma3_acts *b, lt_ctx *ctx, const gemma3_config *c, int T) {
    size_t sz[11];
    acts_sizes(c, T, sz);
    memset(b, 0, sizeof *b);
    void **all[] = {(void **)&b->h,  (void **)&b->a,   (void **)&b->q,  (void **)&b->k,
                    (void **)&b->v,  (void **)&b->att, (void **)&b->o,  (void **)&b->gate,
                    (void **)&b->up, (void **)&b->ids, (void **)&b->pos};
    for (int i = 0; i < 11; i++) {
        *all[i] = ctx->be->alloc(ctx, sz[i]);
        if (!*all[i]) {
            gemma3_acts_free(b, ctx);
            return LT_ERR_MEMORY;
        }
    }
    return LT_OK;
}

/* What quant=dynamic's calibration keeps of a layer's forward: for each linear k (q, k, v, o,
 * gate, up, down), its input x[k] [T, in] and its output y[k] [T, out], backend memory. */
typedef struct layer_capture {
    float *x[N_LINEAR], *y[N_LINEAR];
} layer_capture;

/* Copies linear k's input and output into cap (NULL: nothing to keep). */
static lt_status capture_io(lt_ctx *ctx, const layer_capture *cap, int k, lt_tensor x,
                            lt_tensor y) {
    if (!cap) return LT_OK;
    lt_status rc = ctx->be->copy(ctx, cap->x[k], x.data, lt_tensor_bytes(&x));
    if (rc == LT_OK) rc = ctx->be->copy(ctx, cap->y[k], y.data, lt_tensor_bytes(&y));
    return rc;
}

/* The attention input of layer l on the T rows of b->h at positions b->pos: a = norm(h); q, k,
 * v; qk-norm; RoPE. cap (NULL in every forward but quant=dynamic's calibration) keeps each
 * linear's input and output. */
static lt_status layer_qkv(const gemma3_model *m, lt_ctx *ctx, int l, const gemma3_acts *b, int T,
                           const layer_capture *cap) {
    const gemma3_config *c = &m->cfg;
    const gemma3_layer *w = &m->layers[l];
    const lt_backend *be = ctx->be;
    int64_t H = c->hidden_size, nh = c->num_attention_heads, nkv = c->num_key_value_heads,
            hd = c->head_dim;
    float eps = (float)c->rms_norm_eps;
    const gemma3_rope *rp = &c->rope[gemma3_layer_kind(c, l)];
    lt_status rc = LT_OK;

    lt_tensor h = lt_tensor_2d(LT_F32, b->h, T, H);         /* residual stream [T, H] */
    lt_tensor a = lt_tensor_2d(LT_F32, b->a, T, H);         /* normed input [T, H] */
    lt_tensor q2 = lt_tensor_2d(LT_F32, b->q, T, nh * hd);  /* [T, nh*hd] */
    lt_tensor k2 = lt_tensor_2d(LT_F32, b->k, T, nkv * hd); /* [T, nkv*hd] */
    lt_tensor v2 = lt_tensor_2d(LT_F32, b->v, T, nkv * hd);
    lt_tensor q3 = lt_tensor_3d(LT_F32, b->q, T, nh, hd);  /* [T, nh, hd] */
    lt_tensor k3 = lt_tensor_3d(LT_F32, b->k, T, nkv, hd); /* [T, nkv, hd] */
    lt_tensor pos = lt_tensor_1d(LT_I32, b->pos, T);

    LT_TRY(be->rmsnorm(ctx, a, h, w->input_layernorm, eps));
    {
        const lt_tensor ys[3] = {q2, k2, v2};
        const lt_weight *ws[3] = {&w->q_proj, &w->k_proj, &w->v_proj};
        LT_TRY((be->linears ? be->linears : lt_linears_each)(ctx, 3, ys, a, ws));
        for (int k = 0; k < 3; k++)
            LT_TRY(capture_io(ctx, cap, k, a, ys[k]));
    }
    LT_TRY((be->qk_norm_rope ? be->qk_norm_rope : lt_qk_norm_rope_ops)(
        ctx, q3, k3, w->q_norm, w->k_norm, pos, eps, (float)rp->theta, (float)rp->factor));
done:
    return rc;
}

/* The rest of layer l once b->att holds the attention output: h += post_norm(o_proj(att));
 * then the MLP block, m = norm(h); f = down(gelu(gate(m)) * up(m)); h += post_norm(f). */
static lt_status layer_finish(const gemma3_model *m, lt_ctx *ctx, int l, const gemma3_acts *b,
                              int T, const layer_capture *cap) {
    const gemma3_config *c = &m->cfg;
    const gemma3_layer *w = &m->layers[l];
    const lt_backend *be = ctx->be;
    int64_t H = c->hidden_size, I = c->intermediate_size,
            qo = (int64_t)c->num_attention_heads * c->head_dim;
    float eps = (float)c->rms_norm_eps;
    lt_status rc = LT_OK;

    lt_tensor h = lt_tensor_2d(LT_F32, b->h, T, H);
    lt_tensor a = lt_tensor_2d(LT_F32, b->a, T, H);
    lt_tensor att = lt_tensor_2d(LT_F32, b->att, T, qo);
    lt_tensor o = lt_tensor_2d(LT_F32, b->o, T, H);
    lt_tensor gate = lt_tensor_2d(LT_F32, b->gate, T, I);
    lt_tensor up = lt_tensor_2d(LT_F32, b->up, T, I);

    LT_TRY(be->linear(ctx, o, att, &w->o_proj));
    LT_TRY(capture_io(ctx, cap, 3, att, o));
    LT_TRY((be->rmsnorm_add ? be->rmsnorm_add : lt_rmsnorm_add_ops)(
        ctx, h, o, w->post_attention_layernorm, a, w->pre_feedforward_layernorm, eps));
    {
        const lt_tensor ys[2] = {gate, up};
        const lt_weight *ws[2] = {&w->gate_proj, &w->up_proj};
        LT_TRY((be->linears ? be->linears : lt_linears_each)(ctx, 2, ys, a, ws));
        LT_TRY(capture_io(ctx, cap, 4, a, gate));
        LT_TRY(capture_io(ctx, cap, 5, a, up));
    }
    LT_TRY(be->geglu(ctx, gate, gate, up));
    LT_TRY(be->linear(ctx, o, gate, &w->down_proj));
    LT_TRY(capture_io(ctx, cap, 6, gate, o));
    LT_TRY((be->rmsnorm_add ? be->rmsnorm_add : lt_rmsnorm_add_ops)(
        ctx, h, o, w->post_feedforward_layernorm, (lt_tensor){0}, (lt_tensor){0}, eps));
done:
    return rc;
}

lt_status gemma3_layer_qkv(const gemma3_model *m, lt_ctx *ctx, int l, const gemma3_acts *b, int T) {
    return layer_qkv(m, ctx, l, b, T, NULL);
}

lt_status gemma3_layer_finish(const gemma3_model *m, lt_ctx *ctx, int l, const gemma3_acts *b,
                              int T) {
    return layer_finish(m, ctx, l, b, T, NULL);
}

/* One decoder layer on the chunk held in b->h ([T, H], updated in place) at positions
 * p0 .. p0+T-1 (b->pos); with a cache, K/V are appended to it and attention sees it all.
 * span (backend memory [T, 2] I32, or NULL): the image blocks' extra visible positions
 * (attention_span). */
static lt_status layer_forward(const gemma3_model *m, lt_ctx *ctx, int l, gemma3_acts *b, int T,
                               int p0, gemma3_cache *cache, const layer_capture *cap,
                               int32_t *span) {
    const gemma3_config *c = &m->cfg;
    int64_t nh = c->num_attention_heads, nkv = c->num_key_value_heads, hd = c->head_dim;
    lt_status rc = LT_OK;
    lt_tensor q3 = lt_tensor_3d(LT_F32, b->q, T, nh, hd);  /* [T, nh, hd] */
    lt_tensor k3 = lt_tensor_3d(LT_F32, b->k, T, nkv, hd); /* [T, nkv, hd] */
    lt_tensor v3 = lt_tensor_3d(LT_F32, b->v, T, nkv, hd);
    lt_tensor att = lt_tensor_2d(LT_F32, b->att, T, nh * hd);
    lt_tensor pos = lt_tensor_1d(LT_I32, b->pos, T);

    LT_TRY(layer_qkv(m, ctx, l, b, T, cap));
    int window = gemma3_layer_window(c, l);
    float scale = gemma3_attn_scale(c);
    if (cache) {
        size_t row = (size_t)(nkv * hd) * sizeof(float);
        gemma3_cache_layer *cl = &cache->layers[l];
        if (!cl->ring && cl->cap < p0 + T) {
            rc = cache_grow(cl, ctx, row, p0 + T, cache->max_seq);
            if (rc != LT_OK) goto done;
        }
        LT_TRY(cache_write(cache, ctx, l, b->k, b->v, p0, T, row));
        lt_tensor kc = lt_tensor_3d(LT_F32, cl->k, cl->cap, nkv, hd); /* [cap, nkv, hd] */
        lt_tensor vc = lt_tensor_3d(LT_F32, cl->v, cl->cap, nkv, hd);
        lt_tensor kp = lt_tensor_1d(LT_I32, cl->kpos, cl->cap);
        if (span)
            LT_TRY(ctx->be->attention_span(ctx, att, q3, kc, vc, pos, kp,
                                           lt_tensor_2d(LT_I32, span, T, 2), window, scale));
        else
            LT_TRY(ctx->be->attention(ctx, att, q3, kc, vc, pos, kp, window, scale));
    } else if (span) {
        LT_TRY(ctx->be->attention_span(ctx, att, q3, k3, v3, pos, pos,
                                       lt_tensor_2d(LT_I32, span, T, 2), window, scale));
    } else {
        LT_TRY(ctx->be->attention(ctx, att, q3, k3, v3, pos, pos, window, scale));
    }
    LT_TRY(layer_finish(m, ctx, l, b, T, cap));
done:
    return rc;
}

int gemma3_layer_window(const gemma3_config *c, int l) {
    return gemma3_layer_kind(c, l) == GEMMA3_SLIDING ? c->sliding_window : 0;
}

float gemma3_attn_scale(const gemma3_config *c) {
    return (float)(1.0 / sqrt(c->query_pre_attn_scalar));
}

lt_status gemma3_forward(const gemma3_model *m, lt_ctx *ctx, const int32_t *ids, int T,
                         gemma3_cache *cache, const gemma3_outputs *out) {
    return gemma3_forward_images(m, ctx, ids, T, cache, out, NULL);
}

/* Checks the image tokens of ids against img: their count, and that the backend has the
 * image block's attention. */
static lt_status images_check(const gemma3_model *m, lt_ctx *ctx, const int32_t *ids, int T,
                              const gemma3_images *img) {
    const gemma3_vision_config *vc = &m->cfg.vision;
    if (!vc->present)
        return lt_fail(ctx->err, LT_ERR_ARG, "image embeddings given to a model without images");
    if (!ctx->be->attention_span)
        return lt_fail(ctx->err, LT_ERR_ARG,
                       "the %s backend has no 'attention_span' op, which image blocks need (load "
                       "the model with device=cpu to use images)",
                       ctx->be->name);
    int n = 0;
    for (int t = 0; t < T; t++)
        n += ids[t] == vc->image_token_id;
    if (n != img->n_tokens)
        return lt_fail(ctx->err, LT_ERR_ARG,
                       "the ids hold %d image tokens (id %d) but %d image embeddings were given "
                       "(each image takes %d: <start_of_image>, %d image tokens, <end_of_image>)",
                       n, vc->image_token_id, img->n_tokens, vc->mm_tokens_per_image,
                       vc->mm_tokens_per_image);
    return LT_OK;
}

lt_status gemma3_forward_images(const gemma3_model *m, lt_ctx *ctx, const int32_t *ids, int T,
                                gemma3_cache *cache, const gemma3_outputs *out,
                                const gemma3_images *img) {
    const gemma3_config *c = &m->cfg;
    const lt_backend *be = ctx->be;
    int64_t H = c->hidden_size, V = c->vocab_size, L = c->num_hidden_layers;
    lt_status rc = LT_OK;
    if (img && img->n_tokens == 0) img = NULL;
    if (T <= 0) {
        return lt_fail(ctx->err, LT_ERR_ARG, "forward: no tokens");
    }
    int base = cache ? cache->len : 0;
    if (cache && base + T > cache->max_seq) {
        return lt_fail(ctx->err, LT_ERR_ARG,
                       "sequence of %d tokens exceeds max_seq %d (load with a larger max_seq=)",
                       base + T, cache->max_seq);
    }
    int image_id = img ? c->vision.image_token_id : -1;
    for (int t = 0; t < T; t++)
        if ((ids[t] < 0 || ids[t] >= V) && ids[t] != image_id) {
            return lt_fail(ctx->err, LT_ERR_ARG,
                           "token id %d at position %d is outside the vocabulary [0, %lld)", ids[t],
                           t, (long long)V);
        }
    if (img && (rc = images_check(m, ctx, ids, T, img)) != LT_OK) return rc;
    int chunk = cache ? (T < GEMMA3_CHUNK ? T : GEMMA3_CHUNK) : T;
    gemma3_acts b;
    if (gemma3_acts_alloc(&b, ctx, c, chunk) != LT_OK) {
        return lt_fail(ctx->err, LT_ERR_MEMORY, "out of memory for the activations of %d tokens",
                       chunk);
    }
    int32_t *pos_host = malloc(sizeof(int32_t) * (size_t)chunk * (img ? 3 : 1));
    int32_t *span_host = img ? pos_host + chunk : NULL; /* [chunk, 2] */
    int32_t *span = img ? be->alloc(ctx, sizeof(int32_t) * 2 * (size_t)chunk) : NULL;
    int32_t *ids_host = img ? malloc(sizeof(int32_t) * (size_t)chunk) : NULL;
    if (!pos_host || (img && (!span || !ids_host))) {
        free(pos_host);
        free(ids_host);
        if (span) be->release(ctx, span);
        gemma3_acts_free(&b, ctx);
        return lt_fail(ctx->err, LT_ERR_MEMORY, "out of memory");
    }
    const lt_weight *head = gemma3_head(m);
    float escale = gemma3_embed_scale(m);
    int next_image = 0; /* the embeds row of the next image token */
    for (int t0 = 0, n = 0; t0 < T; t0 += n) {
        n = T - t0 < chunk ? T - t0 : chunk;
        if (img && t0 + n < T && ids[t0 + n - 1] == image_id && ids[t0 + n] == image_id) {
            int s0 = t0 + n - 1; /* an image block would straddle two chunks: end before it */
            while (s0 > t0 && ids[s0 - 1] == image_id)
                s0--;
            if (s0 == t0) {
                rc = lt_fail(ctx->err, LT_ERR_ARG,
                             "an image block of more than %d image tokens does not fit one "
                             "chunk",
                             chunk);
                goto done;
            }
            n = s0 - t0;
        }
        int p0 = base + t0;
        for (int i = 0; i < n; i++)
            pos_host[i] = p0 + i;
        LT_TRY(be->upload(ctx, b.pos, pos_host, sizeof(int32_t) * (size_t)n));
        const int32_t *chunk_ids = ids + t0;
        if (img) { /* image tokens look up row 0 when their id lies past the embedding */
            for (int i = 0; i < n; i++)
                ids_host[i] = ids[t0 + i] == image_id && image_id >= V ? 0 : ids[t0 + i];
            chunk_ids = ids_host;
        }
        LT_TRY(be->upload(ctx, b.ids, chunk_ids, sizeof(int32_t) * (size_t)n));
        lt_tensor h = lt_tensor_2d(LT_F32, b.h, n, H);
        /* h = E[ids] * sqrt(H)   [n, H] */
        LT_TRY(be->embedding(ctx, h, lt_tensor_1d(LT_I32, b.ids, n), &m->embed_tokens, escale));
        if (img) { /* image rows take the projected image embeddings; each block sees itself */
            for (int i = 0; i < n;) {
                if (ids[t0 + i] != image_id) {
                    span_host[2 * i] = 0;
                    span_host[2 * i + 1] = -1;
                    i++;
                    continue;
                }
                int j = i;
                while (j < n && ids[t0 + j] == image_id)
                    j++;
                LT_TRY(be->copy(ctx, b.h + (size_t)i * (size_t)H,
                                img->embeds + (size_t)next_image * (size_t)H,
                                sizeof(float) * (size_t)(j - i) * (size_t)H));
                next_image += j - i;
                for (int u = i; u < j; u++) {
                    span_host[2 * u] = p0 + i;
                    span_host[2 * u + 1] = p0 + j - 1;
                }
                i = j;
            }
            LT_TRY(be->upload(ctx, span, span_host, sizeof(int32_t) * 2 * (size_t)n));
        }
        for (int l = 0; l < L; l++) {
            if (out && out->layer_inputs) /* checkpoint: the residual entering layer l, [L, T, H] */
                LT_TRY(be->copy(
                    ctx, out->layer_inputs + ((size_t)l * (size_t)T + (size_t)t0) * (size_t)H, b.h,
                    sizeof(float) * (size_t)(n * H)));
            LT_TRY(layer_forward(m, ctx, l, &b, n, p0, cache, NULL, span));
        }
        if (cache) cache->len = p0 + n;
        /* final norm, then the tied head */
        lt_tensor hn = lt_tensor_2d(LT_F32, b.a, n, H);
        LT_TRY(be->rmsnorm(ctx, hn, h, m->norm, (float)c->rms_norm_eps));
        if (out && out->hidden)
            LT_TRY(be->copy(ctx, out->hidden + (size_t)t0 * (size_t)H, b.a,
                            sizeof(float) * (size_t)(n * H)));
        if (out && out->logits)
            LT_TRY(be->linear(ctx, lt_tensor_2d(LT_F32, out->logits + (size_t)t0 * (size_t)V, n, V),
                              hn, head));
        if (out && out->last_logits && t0 + n == T)
            LT_TRY(be->linear(ctx, lt_tensor_2d(LT_F32, out->last_logits, 1, V),
                              lt_tensor_2d(LT_F32, b.a + (size_t)(n - 1) * (size_t)H, 1, H), head));
    }
done:
    free(pos_host);
    free(ids_host);
    if (span) be->release(ctx, span);
    gemma3_acts_free(&b, ctx);
    return rc;
}

/* ---- quant=dynamic ------------------------------------------------------------------------
 * Streams the layers. Layer l's seven linears are read in fp32 (one layer at a time: the whole
 * 16-bit model never sits in memory) and the calibration hidden states run through the layer
 * with them: the 16-bit model's forward, each linear's input X and output X·Wᵀ kept. Then each
 * linear is quantized as quant=nf4 does (NF4 + double quant), its weight error taken from the
 * residual W - dequant(W), its output error from X·(W - dequant(W))ᵀ (one product instead of
 * two, and no cancellation), and its fp32 copy dropped. The forward runs on a CPU context of its
 * own (the weights are host memory, whatever device the model goes to afterwards). Once every
 * layer is measured, qdyn_report_choose picks the linears kept in 16 bits within the budget;
 * those give their quantized bytes back and are placed again from the source.
 * With a sink the quantized linears are not kept while the others are measured (that would be
 * the whole quantized model in host memory): each is dropped once measured, and after the
 * choice every layer is placed again, a linear at a time (read, quantized again or kept in 16
 * bits, handed to the sink; quantizing is deterministic, so the bytes are the same). The host
 * memory at the peak is then one layer's seven linears in fp32 and one quantized linear, plus
 * the captured inputs and outputs (T x the seven linears' in + out floats). */

static void weight_release_host(gemma3_model *m, lt_weight *w) {
    size_t parts[LT_WEIGHT_MAX_PARTS];
    const lt_quant *q = &w->q;
    int nested = q->kind == LT_QUANT_NF4 && q->qabsmax;
    lt_weight_parts(q->kind, lt_tensor_numel(&w->w), w->w.shape[0], lt_dtype_size(w->w.dtype),
                    q->blocksize, nested ? q->nested_blocksize : 0, parts);
    gemma3_host_release(m, w->w.data, parts[0]);
    if (q->kind == LT_QUANT_NF4 && nested) {
        gemma3_host_release(m, q->qabsmax, parts[2]);
        gemma3_host_release(m, q->absmax2, parts[3]);
    } else if (q->kind == LT_QUANT_NF4) {
        gemma3_host_release(m, q->absmax, parts[2]);
    } else if (q->kind == LT_QUANT_INT8) {
        gemma3_host_release(m, q->scb, parts[1]);
    }
    memset(w, 0, sizeof *w);
}

/* The calibration tokens embedded (E[ids] * sqrt(H), as the forward starts), [T, H] fp32 in
 * host memory: taken as soon as the embedding is read, since a sink may move it off the host
 * next. T: the calibration tokens, at most max_position_embeddings. */
static lt_status calib_embed(const gemma3_model *m, const gemma3_load_spec *spec, dyn_calib *dc,
                             char *err) {
    const gemma3_config *c = &m->cfg;
    int T = spec->n_calib;
    if (T > c->max_position_embeddings) T = c->max_position_embeddings;
    for (int t = 0; t < T; t++)
        if (spec->calib_ids[t] < 0 || spec->calib_ids[t] >= c->vocab_size)
            return lt_fail(err, LT_ERR_ARG,
                           "quant=dynamic: calibration token %d at position %d is outside the "
                           "vocabulary [0, %d)",
                           spec->calib_ids[t], t, c->vocab_size);
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &lt_backend_cpu, spec->n_threads) != LT_OK)
        return lt_fail(err, LT_ERR_MEMORY, "quant=dynamic: %s", ctx.err);
    lt_status rc = LT_OK;
    dc->T = T;
    dc->h0 = malloc(sizeof(float) * (size_t)T * (size_t)c->hidden_size);
    if (!dc->h0)
        rc = lt_fail(err, LT_ERR_MEMORY,
                     "out of memory for quant=dynamic's calibration (%d tokens)", T);
    else if ((rc = ctx.be->embedding(&ctx, lt_tensor_2d(LT_F32, dc->h0, T, c->hidden_size),
                                     lt_tensor_1d(LT_I32, (void *)spec->calib_ids, T),
                                     &m->embed_tokens, gemma3_embed_scale(m))) != LT_OK)
        lt_fail(err, rc, "quant=dynamic: %s", ctx.err);
    lt_ctx_shutdown(&ctx);
    if (rc != LT_OK) {
        free(dc->h0);
        dc->h0 = NULL;
    }
    return rc;
}

/* Layer l's 13 weights to the sink, in the walk's order (quant=dynamic with a sink), each
 * linear made final first: kept in 16 bits, or (dropped after measuring) read and quantized
 * again. */
static lt_status dynamic_place_layer(gemma3_model *m, quant_plan *p, const dyn_source *src,
                                     const qdyn_report *rep, int l, const gemma3_sink *sink,
                                     char *err) {
    lt_status rc = LT_OK;
    for (int r = 0; r < N_LAYER_W && rc == LT_OK; r++) {
        int k = linear_of_row(r);
        lt_tensor *t = (lt_tensor *)((char *)&m->layers[l] + layer_table[r].off);
        char name[160];
        snprintf(name, sizeof name, "model.layers.%d.%s", l, layer_table[r].suffix);
        if (k >= 0 && rep->mods[l * N_LINEAR + k].kept) {
            rc = src->keep16(src->user, m, l, k, layer_linear(&m->layers[l], k), err);
            if (rc != LT_OK) return rc;
        } else if (k >= 0) {
            lt_weight *w = layer_linear(&m->layers[l], k);
            int64_t shape[2];
            int nd;
            layer_shape(&m->cfg, r, shape, &nd);
            float *x = malloc(sizeof(float) * (size_t)(shape[0] * shape[1]));
            if (!x) return lt_fail(err, LT_ERR_MEMORY, "out of memory reading '%s'", name);
            rc = src->read(src->user, m, l, k, x, err);
            if (rc == LT_OK && (rc = quantize_values(m, w, x, p, shape[0], shape[1])) != LT_OK)
                lt_fail(err, rc, "out of memory quantizing '%s'", name);
            free(x);
            if (rc != LT_OK) return rc;
            m->weight_bytes += (int64_t)lt_weight_bytes(w);
        }
        rc = sink->place(sink->user, m, name, t, err);
    }
    return rc;
}

static lt_status load_dynamic(gemma3_model *m, quant_plan *p, const gemma3_load_spec *spec,
                              const dyn_source *src, const dyn_calib *dc, const lt_callbacks *cb,
                              char *err) {
    const gemma3_config *c = &m->cfg;
    const gemma3_sink *sink = spec->sink;
    int L = c->num_hidden_layers, T = dc->T;
    double keep = spec->quant_keep;
    err[0] = 0;
    qdyn_report rep;
    if (qdyn_report_init(&rep, L * N_LINEAR) != LT_OK)
        return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &lt_backend_cpu, spec->n_threads) != LT_OK) {
        qdyn_report_free(&rep);
        return lt_fail(err, LT_ERR_MEMORY, "quant=dynamic: %s", ctx.err);
    }
    const lt_backend *be = ctx.be;
    layer_capture cap = {{0}, {0}};
    float *wf[N_LINEAR] = {0}, *dy = NULL;
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)T);
    gemma3_acts b;
    int have_bufs = gemma3_acts_alloc(&b, &ctx, c, T) == LT_OK;
    int64_t max_out = 0, shape[N_LINEAR][2];
    int oom = !pos || !have_bufs;
    for (int k = 0; k < N_LINEAR; k++) {
        int nd;
        layer_shape(c, linear_row[k], shape[k], &nd);
        if (shape[k][0] > max_out) max_out = shape[k][0];
        cap.x[k] = be->alloc(&ctx, sizeof(float) * (size_t)(T * shape[k][1]));
        cap.y[k] = be->alloc(&ctx, sizeof(float) * (size_t)(T * shape[k][0]));
        oom |= !cap.x[k] || !cap.y[k];
    }
    dy = be->alloc(&ctx, sizeof(float) * (size_t)(T * max_out));
    lt_status rc = LT_OK;
    if (oom || !dy) {
        rc = lt_fail(err, LT_ERR_MEMORY,
                     "out of memory for quant=dynamic's calibration (%d tokens)", T);
        goto done;
    }
    for (int t = 0; t < T; t++)
        pos[t] = t;
    LT_TRY(be->upload(&ctx, b.pos, pos, sizeof(int32_t) * (size_t)T));
    LT_TRY(be->upload(&ctx, b.h, dc->h0, sizeof(float) * (size_t)T * (size_t)c->hidden_size));
    if (cb && cb->message) {
        char msg[160];
        snprintf(msg, sizeof msg,
                 "quant=dynamic: measuring each linear's quantization error on %d calibration "
                 "tokens",
                 T);
        cb->message(cb->ctx, msg);
    }
    for (int l = 0; l < L; l++) {
        gemma3_layer *ly = &m->layers[l];
        for (int k = 0; k < N_LINEAR; k++) {
            int64_t out = shape[k][0], in = shape[k][1];
            wf[k] = malloc(sizeof(float) * (size_t)(out * in));
            if (!wf[k]) {
                rc = lt_fail(err, LT_ERR_MEMORY, "out of memory reading layer %d's linears", l);
                goto done;
            }
            LT_TRY(src->read(src->user, m, l, k, wf[k], err));
            *layer_linear(ly, k) = (lt_weight){.w = lt_tensor_2d(LT_F32, wf[k], out, in)};
        }
        rc = layer_forward(m, &ctx, l, &b, T, 0, NULL, &cap, NULL);
        if (rc != LT_OK) {
            lt_fail(err, rc, "quant=dynamic: the calibration forward of layer %d: %s", l, ctx.err);
            goto done;
        }
        for (int k = 0; k < N_LINEAR; k++) {
            int64_t out = shape[k][0], in = shape[k][1];
            lt_weight *w = layer_linear(ly, k);
            lt_quant_module *mod = &rep.mods[l * N_LINEAR + k];
            const char *suffix = layer_table[linear_row[k]].suffix;
            snprintf(mod->name, sizeof mod->name, "model.layers.%d.%.*s", l,
                     (int)strlen(suffix) - 7, suffix); /* - ".weight" */
            mod->n_params = out * in;
            rc = quantize_values(m, w, wf[k], p, out, in);
            if (rc != LT_OK) {
                lt_fail(err, rc, "out of memory quantizing '%s'", mod->name);
                goto done;
            }
            double sq_w, sq_d;
            LT_TRY(qdyn_residual(w, wf[k], out, in, &sq_w, &sq_d, err)); /* wf[k] = W - deq */
            lt_weight resid = {.w = lt_tensor_2d(LT_F32, wf[k], out, in)};
            rc = be->linear(&ctx, lt_tensor_2d(LT_F32, dy, T, out),
                            lt_tensor_2d(LT_F32, cap.x[k], T, in), &resid);
            if (rc != LT_OK) {
                lt_fail(err, rc, "quant=dynamic: measuring '%s': %s", mod->name, ctx.err);
                goto done;
            }
            mod->weight_error = qdyn_ratio(sq_d, sq_w);
            mod->output_error = qdyn_ratio(qdyn_sumsq(dy, T * out), qdyn_sumsq(cap.y[k], T * out));
            free(wf[k]);
            wf[k] = NULL;
            if (sink) weight_release_host(m, w); /* placed again after the choice */
        }
        if (cb && cb->progress) cb->progress(cb->ctx, "measuring and quantizing", l + 1, L);
    }
    if (qdyn_report_choose(&rep, keep) != LT_OK) {
        rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
        goto done;
    }
    for (int i = 0; i < L * N_LINEAR; i++) {
        lt_weight *w = layer_linear(&m->layers[i / N_LINEAR], i % N_LINEAR);
        if (rep.mods[i].kept) {
            if (!sink) { /* (with a sink, dynamic_place_layer reads it) */
                storage_release(m->storage, w->w.data); /* the quantized bytes it will not use */
                storage_release(m->storage, w->q.qabsmax);
                storage_release(m->storage, w->q.absmax2);
                LT_TRY(src->keep16(src->user, m, i / N_LINEAR, i % N_LINEAR, w, err));
            }
            m->n_kept16++;
        } else {
            m->n_quantized++;
            m->n_params += rep.mods[i].n_params;
            if (!sink) m->weight_bytes += (int64_t)lt_weight_bytes(w);
        }
        if (sink && i % N_LINEAR == N_LINEAR - 1) {
            LT_TRY(dynamic_place_layer(m, p, src, &rep, i / N_LINEAR, sink, err));
            if (cb && cb->progress) cb->progress(cb->ctx, "placing layers", i / N_LINEAR + 1, L);
        }
    }
    m->quant = LT_QUANT_NF4;
    m->quant_nested = 1;
    m->quant_dynamic = 1;
    m->quant_keep = (float)keep;
    rep.info.n_calib = T;
    if (spec->report) {
        *spec->report = rep; /* moved: the caller frees it */
        memset(&rep, 0, sizeof rep);
    }
done:
    if (rc != LT_OK && !err[0]) lt_fail(err, rc, "quant=dynamic: %s", ctx.err);
    for (int k = 0; k < N_LINEAR; k++) {
        free(wf[k]);
        be->release(&ctx, cap.x[k]);
        be->release(&ctx, cap.y[k]);
    }
    be->release(&ctx, dy);
    if (have_bufs) gemma3_acts_free(&b, &ctx);
    free(pos);
    lt_ctx_shutdown(&ctx);
    qdyn_report_free(&rep);
    return rc;
}

int gemma3_is_stop(const gemma3_config *c, int id) {
    for (int i = 0; i < c->n_eos_ids; i++)
        if (c->eos_ids[i] == id) return 1;
    return 0;
}

void gemma3_config_set_tokens(gemma3_config *c, const lt_tokenizer *tok) {
    int id;
    if ((id = tok_piece_to_id(tok, "<bos>")) >= 0) c->bos_id = id;
    if ((id = tok_piece_to_id(tok, "<eos>")) >= 0) c->eos_id = id;
    if ((id = tok_piece_to_id(tok, "<pad>")) >= 0) c->pad_id = id;
    c->start_of_turn_id = tok_piece_to_id(tok, "<start_of_turn>");
    c->end_of_turn_id = tok_piece_to_id(tok, "<end_of_turn>");
    /* stop list: config's list plus eos and <end_of_turn>, without duplicates */
    int add[2] = {c->eos_id, c->end_of_turn_id};
    for (int i = 0; i < 2; i++) {
        if (add[i] < 0) continue;
        int dup = 0;
        for (int j = 0; j < c->n_eos_ids; j++)
            dup |= c->eos_ids[j] == add[i];
        if (!dup && c->n_eos_ids < 4) c->eos_ids[c->n_eos_ids++] = add[i];
    }
}
