/* quantized.c — %save quantized=: a quantized model written the way transformers'
 * save_pretrained writes a bitsandbytes model, so AutoModelForCausalLM.from_pretrained (with
 * bitsandbytes) and %load read it back without quantizing anything.
 *
 * Each NF4 linear P is what bitsandbytes' Linear4bit._save_to_state_dict puts in the state
 * dict: the packed weight (U8 [(n+1)/2, 1], Params4bit's storage) and the tensors of
 * QuantState.as_dict(packed=True): P.weight.absmax (fp32, or U8 codes when double-quantized),
 * P.weight.quant_map (fp32 [16]), P.weight.nested_absmax / P.weight.nested_quant_map when
 * nested, and P.weight.quant_state.bitsandbytes__nf4, the JSON of the rest as a U8 tensor. An
 * int8 linear is what Linear8bitLt._save_to_state_dict writes: P.weight (I8 [out, in]), P.SCB
 * (fp32 [out]) and P.weight_format (a U8 scalar, 0 = row-major). Everything else (embedding,
 * norms, an untied head, linears kept in 16 bits) is written in the chosen 16-bit dtype under
 * the canonical Gemma3ForCausalLM names; config.json carries quantization_config as
 * BitsAndBytesConfig.to_dict() spells it, with lm_head and the 16-bit linears in
 * llm_int8_skip_modules. Adapters are not merged: a quantized checkpoint holds the base.
 *
 * Owns nothing after a call returns: it reads the model (downloading device tensors through the
 * backend when dev is given), writes one atomic set of files and changes neither the model nor
 * the adapters. Model walking is model.h's; quantization formats are formats/bnb.h's.
 */
#include "cuda/export/quantized.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda/backend/host_view.h"
#include "cuda/export/merged.h"
#include "cuda/formats/bnb.h"
#include "cuda/formats/safetensors_write.h"

typedef struct qsave {
    gemma3_model *m;
    lt_ctx *dev;
    lt_dtype dt;
    st_out *t;
    int n, cap;
    void **own; /* the names and converted copies the tensors point into */
    int n_own, cap_own;
    lt_host_pool hp; /* host copies of a device model's bytes */
    char **skip;     /* module names kept in 16 bits (pointers into own) */
    int n_skip;
    char *err;
    lt_status rc; /* the first failure; err says what */
} qsave;

static void *keep(qsave *q, void *p) {
    if (!p) return NULL;
    if (q->n_own == q->cap_own) {
        int nc = q->cap_own ? 2 * q->cap_own : 256;
        void **np = realloc(q->own, sizeof(void *) * (size_t)nc);
        if (!np) {
            free(p);
            return NULL;
        }
        q->own = np;
        q->cap_own = nc;
    }
    return q->own[q->n_own++] = p;
}

static char *keep_str(qsave *q, const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    char *s = keep(q, malloc(la + lb + 1));
    if (s) {
        memcpy(s, a, la);
        memcpy(s + la, b, lb + 1);
    }
    return s;
}

/* n bytes at p in host memory: p itself for a host model, else a downloaded copy. */
static const void *host_bytes(qsave *q, const void *p, size_t n) {
    const void *h = lt_host_bytes(q->dev, p, n, &q->hp);
    if (!h && p && q->rc == LT_OK)
        q->rc = lt_fail(q->err, LT_ERR_DEVICE, "reading weights from %s: %s", q->dev->be->name,
                        q->dev->err);
    return h;
}

/* One more tensor of the file: name = base + suffix. 0, or -1 when out of memory. */
static int add(qsave *q, const char *base, const char *suffix, lt_dtype dt, int ndim, int64_t d0,
               int64_t d1, const void *data) {
    char *name = keep_str(q, base, suffix);
    if (!name || !data || q->n == q->cap) return -1;
    q->t[q->n++] = (st_out){name, dt, ndim, {d0, d1}, data};
    return 0;
}

/* The failure of tensor `name`: a download that failed already said why; else memory. */
static lt_status fail(qsave *q, const char *name) {
    if (q->rc == LT_OK)
        q->rc = lt_fail(q->err, LT_ERR_MEMORY, "out of memory while saving %s", name);
    return q->rc;
}

/* The torch dtype the weight had before it was quantized, as bitsandbytes records it in the
 * quant state: the 16-bit checkpoint tensor it was quantized from, or the dtype the
 * pre-quantized checkpoint's own quant state names; the model's dtype when neither is at
 * hand (random weights, a model on a device). */
static void source_dtype(const gemma3_model *m, const char *name, const lt_tensor *t, char *out,
                         size_t cap) {
    const st_set *st = NULL;
    char cname[256], err[LT_ERRLEN];
    const st_tensor *src = gemma3_source_tensor(m, name, &st, cname, sizeof cname);
    snprintf(out, cap, "%s", merged_torch_dtype(m->dtype));
    if (!src || !src->dtype_ok) return;
    if (lt_dtype_is_float(src->dtype)) {
        snprintf(out, cap, "%s", merged_torch_dtype(src->dtype));
        return;
    }
    bnb_group g;
    if (bnb_group_read(st, cname, t->shape[0], t->shape[1], &g, err) == LT_OK &&
        g.kind == BNB_NF4 && g.dtype[0])
        snprintf(out, cap, "%s", g.dtype);
}

static lt_status add_nf4(qsave *q, const char *name, const lt_weight *w) {
    const lt_quant *k = &w->q;
    int64_t out = w->w.shape[0], in = w->w.shape[1], n = out * in;
    int64_t nb = (n + k->blocksize - 1) / k->blocksize;
    int r =
        add(q, name, "", LT_U8, 2, (n + 1) / 2, 1, host_bytes(q, w->w.data, (size_t)(n + 1) / 2));
    r |= add(q, name, ".quant_map", LT_F32, 1, 16, 0, host_bytes(q, k->code, 16 * sizeof(float)));
    if (k->qabsmax) {
        int64_t nb2 = (nb + k->nested_blocksize - 1) / k->nested_blocksize;
        r |= add(q, name, ".absmax", LT_U8, 1, nb, 0, host_bytes(q, k->qabsmax, (size_t)nb));
        r |= add(q, name, ".nested_absmax", LT_F32, 1, nb2, 0,
                 host_bytes(q, k->absmax2, (size_t)nb2 * sizeof(float)));
        r |= add(q, name, ".nested_quant_map", LT_F32, 1, 256, 0,
                 host_bytes(q, k->code2, 256 * sizeof(float)));
    } else {
        r |= add(q, name, ".absmax", LT_F32, 1, nb, 0,
                 host_bytes(q, k->absmax, (size_t)nb * sizeof(float)));
    }
    char dtype[32], json[512];
    source_dtype(q->m, name, &w->w, dtype, sizeof dtype);
    int len = bnb_nf4_state_json(json, sizeof json, k->blocksize, dtype, out, in,
                                 k->qabsmax != NULL, k->nested_blocksize, k->offset);
    char *blob = keep(q, strdup(json));
    r |= add(q, name, ".quant_state.bitsandbytes__nf4", LT_U8, 1, len, 0, blob);
    return r ? fail(q, name) : LT_OK;
}

static lt_status add_int8(qsave *q, const char *name, const lt_weight *w) {
    int64_t out = w->w.shape[0], in = w->w.shape[1];
    char base[256];
    snprintf(base, sizeof base, "%.*s", (int)(strlen(name) - 7), name); /* - ".weight" */
    static const uint8_t row_format = 0; /* bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT "row" */
    int r = add(q, name, "", LT_I8, 2, out, in, host_bytes(q, w->w.data, (size_t)(out * in)));
    r |= add(q, base, ".SCB", LT_F32, 1, out, 0, host_bytes(q, w->q.scb, sizeof(float) * out));
    r |= add(q, name, "_format", LT_U8, 0, 0, 0, &row_format);
    return r ? fail(q, name) : LT_OK;
}

/* A tensor kept in 16 bits, in the file's dtype. */
static lt_status add_plain(qsave *q, const char *name, const lt_tensor *t) {
    int64_t n = lt_tensor_numel(t);
    const void *src = host_bytes(q, t->data, lt_tensor_bytes(t));
    const void *data = src;
    if (src && t->dtype != q->dt) {
        void *buf = keep(q, malloc((size_t)n * lt_dtype_size(q->dt)));
        if (buf) lt_convert(buf, q->dt, src, t->dtype, n);
        data = buf;
    }
    if (add(q, name, "", q->dt, t->ndim, t->shape[0], t->ndim > 1 ? t->shape[1] : 0, data))
        return fail(q, name);
    return LT_OK;
}

static int visit(void *user, const char *name, lt_tensor *t) {
    qsave *q = user;
    const lt_weight *w = gemma3_weight_owner(q->m, t);
    lt_status rc;
    if (w && w->q.kind == LT_QUANT_NF4) {
        rc = add_nf4(q, name, w);
    } else if (w && w->q.kind == LT_QUANT_INT8) {
        rc = add_int8(q, name, w);
    } else {
        rc = add_plain(q, name, t);
        if (rc == LT_OK && w && w != &q->m->embed_tokens && w != &q->m->lm_head) {
            char *mod = keep_str(q, name, ""); /* a linear kept in 16 bits: its module */
            if (!mod) {
                fail(q, name);
                return 1;
            }
            mod[strlen(mod) - 7] = 0; /* - ".weight" */
            q->skip[q->n_skip++] = mod;
        }
    }
    return rc != LT_OK;
}

/* config.json: the loaded text model's own (its quantization_config replaced) or a generated
 * Gemma3TextConfig, with quantization_config and the dtype set. Malloc'd text, or NULL with
 * err set. */
static char *config_text(qsave *q, const char *src_dir, char *err) {
    gemma3_model *m = q->m;
    json_t *root = NULL;
    if (src_dir && *src_dir && !m->cfg.multimodal) {
        char p[4200];
        snprintf(p, sizeof p, "%s/config.json", src_dir);
        if (access(p, R_OK) == 0 && !(root = json_load_file(p, 0, NULL))) {
            lt_fail(err, LT_ERR_FORMAT, "%s: cannot be read back as JSON", p);
            return NULL;
        }
    }
    if (!root) {
        char *gen = merged_text_config(m, q->dt);
        root = gen ? json_loads(gen, 0, NULL) : NULL;
        free(gen);
    }
    const char *head = "lm_head";
    const char **skip = malloc(sizeof(char *) * (size_t)(q->n_skip + 1));
    char *qc = NULL;
    if (skip) {
        skip[0] = head;
        for (int i = 0; i < q->n_skip; i++)
            skip[i + 1] = q->skip[i];
        qc = bnb_config_to_json(m->quant == LT_QUANT_NF4 ? BNB_NF4 : BNB_INT8, m->quant_nested,
                                merged_torch_dtype(q->dt), skip, q->n_skip + 1);
    }
    free(skip);
    json_t *qj = qc ? json_loads(qc, 0, NULL) : NULL;
    free(qc);
    char *text = NULL;
    if (root && qj && json_is_object(root)) {
        json_object_set_new(root, "quantization_config", qj);
        qj = NULL;
        /* transformers 5 writes "dtype", earlier versions "torch_dtype" */
        const char *keys[] = {"torch_dtype", "dtype"};
        for (int i = 0; i < 2; i++)
            if (json_object_get(root, keys[i]))
                json_object_set_new(root, keys[i], json_string(merged_torch_dtype(q->dt)));
        text = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);
    }
    json_decref(qj);
    json_decref(root);
    if (!text) lt_fail(err, LT_ERR_MEMORY, "out of memory writing config.json");
    return text;
}

lt_status quantized_save(const lt_adapters *a, gemma3_model *m, lt_ctx *dev, const char *src_dir,
                         const char *tokenizer_path, const char *dtype, const char *dir,
                         const lt_callbacks *cb, char *err) {
    if (!m->n_quantized)
        return lt_fail(err, LT_ERR_STATE,
                       "%%save quantized=: the model is not quantized (its linears are 16-bit); "
                       "load it with %%load %s quant=nf4 (or quant=int8) to save a bitsandbytes "
                       "checkpoint, or save it as it is with %%save merged=DIR",
                       m->source);
    lt_dtype dt;
    lt_status rc = merged_parse_dtype(m, dtype, "%save", &dt, err);
    if (rc != LT_OK) return rc;
    rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    int nw = gemma3_weight_count(m);
    qsave q = {.m = m, .dev = dev, .dt = dt, .cap = 6 * nw + 8, .err = err, .rc = LT_OK};
    q.t = calloc((size_t)q.cap, sizeof(st_out));
    q.skip = calloc((size_t)nw + 1, sizeof(char *));
    if (!q.t || !q.skip)
        rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
    else if (gemma3_weights_foreach(m, visit, &q))
        rc = q.rc != LT_OK ? q.rc : fail(&q, "the weights");
    char *cfg = rc == LT_OK ? config_text(&q, src_dir, err) : NULL;
    if (rc == LT_OK && !cfg) rc = LT_ERR_MEMORY;
    if (rc == LT_OK) rc = merged_write_folder(dir, q.t, q.n, NULL, cfg, tokenizer_path, err);
    if (rc == LT_OK && cb && cb->message && a && (a->n_slots > 0 || a->full)) {
        char msg[4600];
        snprintf(msg, sizeof msg,
                 "the attached adapters are not in %s: a quantized checkpoint holds the "
                 "quantized base only; save them with %%save adapter=DIR (or merge them into a "
                 "16-bit checkpoint with %%save merged=DIR)",
                 dir);
        cb->message(cb->ctx, msg);
    }
    for (int i = 0; i < q.n_own; i++)
        free(q.own[i]);
    free(q.own);
    lt_host_pool_free(&q.hp);
    free(q.t);
    free(q.skip);
    free(cfg);
    return rc;
}
