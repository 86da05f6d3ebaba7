/* peft.c — the files training writes and reads: a safetensors writer, PEFT adapters
 * (adapter_config.json + adapter_model.safetensors, REFERENCE §5), merged checkpoints that
 * transformers loads (config.json + model.safetensors + tokenizer.model), and atomic writes.
 *
 * Every file is written as a temp file in the destination folder, fsync'd, then renamed over
 * the old name; a save of several files writes all temps first and renames only when every
 * one was written, so a failed save (disk full, file-size limit, permissions) leaves the
 * previous good copy untouched and no temp behind. Reading reuses safetensors.c.
 * Owns nothing after a call returns. Must not change the model except through the
 * adapters it creates (peft_load_adapter).
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/base/atomic_file.h"
#include "cuda/formats/safetensors.h"
#include "cuda/train/train.h"

/* ---- safetensors writer -----------------------------------------------------------------------
 */

/* Writes the whole file to an open afile. */
static lt_status st_emit(lt_afile *f, const st_out *t, int n, const char *metadata_json,
                         char *err) {
    json_t *hdr = json_object();
    if (!hdr) return LT_ERR_MEMORY;
    if (metadata_json) {
        json_t *md = json_loads(metadata_json, 0, NULL);
        if (md) json_object_set_new(hdr, "__metadata__", md);
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        json_t *shape = json_array();
        int64_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++) {
            json_array_append_new(shape, json_integer(t[i].shape[d]));
            numel *= t[i].shape[d];
        }
        uint64_t bytes = (uint64_t)numel * lt_dtype_size(t[i].dtype);
        json_t *e = json_pack("{s:s, s:o, s:[I, I]}", "dtype", lt_dtype_name(t[i].dtype), "shape",
                              shape, "data_offsets", (json_int_t)off, (json_int_t)(off + bytes));
        if (!e) {
            json_decref(hdr);
            return LT_ERR_MEMORY;
        }
        json_object_set_new(hdr, t[i].name, e);
        off += bytes;
    }
    char *text = json_dumps(hdr, JSON_COMPACT);
    json_decref(hdr);
    if (!text) return LT_ERR_MEMORY;
    size_t hl = strlen(text), padded = (hl + 7) / 8 * 8; /* 8-byte aligned data, space padded */
    char *h = malloc(padded + 8);
    if (!h) {
        free(text);
        return LT_ERR_MEMORY;
    }
    uint64_t n64 = padded;
    memcpy(h, &n64, 8); /* little-endian (configure refuses big-endian machines) */
    memcpy(h + 8, text, hl);
    memset(h + 8 + hl, ' ', padded - hl);
    free(text);
    lt_status rc = lt_afile_write(f, h, padded + 8, err);
    free(h);
    for (int i = 0; i < n && rc == LT_OK; i++) {
        int64_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++)
            numel *= t[i].shape[d];
        rc = lt_afile_write(f, t[i].data, (size_t)numel * lt_dtype_size(t[i].dtype), err);
    }
    return rc;
}

lt_status st_write(const char *path, const st_out *t, int n, const char *metadata_json, char *err) {
    lt_afile f;
    lt_status rc = lt_afile_open(&f, path, err);
    if (rc != LT_OK) return rc;
    rc = st_emit(&f, t, n, metadata_json, err);
    if (rc != LT_OK) {
        if (rc == LT_ERR_MEMORY) lt_fail(err, rc, "%s: out of memory", path);
        lt_afile_abort(&f);
        return rc;
    }
    if ((rc = lt_afile_finish(&f, err)) != LT_OK) return rc;
    return lt_afile_commit(&f, 1, err);
}

/* A member of a set of files: a safetensors file (PEFT's {"format": "pt"} metadata). */
static lt_status set_st(lt_afile_set *s, const char *path, const st_out *t, int n, char *err) {
    lt_afile *f;
    lt_status rc = lt_afile_set_add(s, path, &f, err);
    if (rc != LT_OK) return rc;
    rc = st_emit(f, t, n, "{\"format\":\"pt\"}", err);
    if (rc == LT_ERR_MEMORY) lt_fail(err, rc, "%s: out of memory", path);
    if (rc != LT_OK) return rc;
    return lt_afile_finish(f, err);
}

/* ---- host views of backend tensors ---------------------------------------------------------- */

/* Tensors of a device backend are downloaded into malloc'd copies kept in a pool (freed by
 * pool_free); on the CPU backend the data is used as it is. */
typedef struct host_pool {
    void **p;
    int n;
} host_pool;

static const void *host_of(lt_ctx *ctx, const lt_tensor *t, host_pool *hp) {
    if (!t->data || ctx->be == &lt_backend_cpu) return t->data;
    size_t bytes = lt_tensor_bytes(t);
    void *buf = malloc(bytes ? bytes : 1);
    void **np = realloc(hp->p, sizeof(void *) * (size_t)(hp->n + 1));
    if (!buf || !np) {
        free(buf);
        if (np) hp->p = np;
        return NULL;
    }
    hp->p = np;
    if (ctx->be->download(ctx, buf, t->data, bytes) != LT_OK) {
        free(buf);
        return NULL;
    }
    hp->p[hp->n++] = buf;
    return buf;
}

static void pool_free(host_pool *hp) {
    for (int i = 0; i < hp->n; i++)
        free(hp->p[i]);
    free(hp->p);
    hp->p = NULL;
    hp->n = 0;
}

/* ---- PEFT adapters --------------------------------------------------------------------------- */

static char *adapter_config_json(const lt_adapters *a) {
    json_t *c = json_object();
    json_t *targets;
    if (a->targets_regex) {
        targets = json_string(a->targets);
    } else if (a->model->cfg.multimodal) {
        /* a plain list would also match the vision tower's q/k/v/o in PEFT (REFERENCE §5.4):
         * a regex keeps the adapter on the language model */
        char re[700], alts[512] = "";
        snprintf(re, sizeof re, "%s", a->targets);
        size_t n = 0;
        char *save = NULL;
        for (char *w = strtok_r(re, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
            snprintf(alts + n, sizeof alts - n, "%s%s", n ? "|" : "", w);
            n = strlen(alts);
        }
        snprintf(re, sizeof re, ".*language_model.*\\.(%s)", alts);
        targets = json_string(re);
    } else {
        targets = json_array();
        char buf[512];
        snprintf(buf, sizeof buf, "%s", a->targets);
        char *save = NULL;
        for (char *w = strtok_r(buf, ",", &save); w; w = strtok_r(NULL, ",", &save))
            json_array_append_new(targets, json_string(w));
    }
    const char *src = a->model->source[0] ? a->model->source : "google/gemma-3-1b-it";
    json_object_set_new(c, "peft_type", json_string("LORA"));
    json_object_set_new(c, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(c, "base_model_name_or_path", json_string(src));
    json_object_set_new(c, "revision", json_null());
    json_object_set_new(c, "r", json_integer(a->r));
    json_object_set_new(c, "lora_alpha", json_real(a->alpha));
    json_object_set_new(c, "lora_dropout", json_real(a->dropout));
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "use_rslora", json_boolean(a->rslora));
    json_object_set_new(c, "use_dora", json_false());
    json_object_set_new(c, "fan_in_fan_out", json_false());
    json_object_set_new(c, "init_lora_weights", json_true());
    json_object_set_new(c, "inference_mode", json_true());
    json_object_set_new(c, "target_modules", targets);
    json_object_set_new(c, "modules_to_save", json_null());
    json_object_set_new(c, "layers_to_transform", json_null());
    json_object_set_new(c, "layers_pattern", json_null());
    json_object_set_new(c, "rank_pattern", json_object());
    json_object_set_new(c, "alpha_pattern", json_object());
    json_object_set_new(c, "exclude_modules", json_null());
    char *text = json_dumps(c, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(c);
    if (!text) return NULL;
    size_t n = strlen(text);
    char *out = realloc(text, n + 2);
    if (!out) {
        free(text);
        return NULL;
    }
    out[n] = '\n';
    out[n + 1] = 0;
    return out;
}

/* The adapter tensors as st_out entries with PEFT names; names are malloc'd in *names. */
static lt_status adapter_tensors(const lt_adapters *a, st_out **out, char ***names, host_pool *hp) {
    int n = a->n_slots * 2;
    st_out *t = calloc((size_t)n + 1, sizeof *t);
    char **nm = calloc((size_t)n + 1, sizeof *nm);
    if (!t || !nm) {
        free(t);
        free(nm);
        return LT_ERR_MEMORY;
    }
    for (int i = 0; i < a->n_slots; i++) {
        const lora_slot *s = &a->slots[i];
        char mod[256];
        lora_peft_module(a, s, mod, sizeof mod);
        for (int k = 0; k < 2; k++) {
            const lt_tensor *x = k == 0 ? &s->lora.a : &s->lora.b;
            size_t len = strlen(mod) + 24;
            char *name = malloc(len);
            if (!name) goto oom;
            snprintf(name, len, "%s.lora_%c.weight", mod, k == 0 ? 'A' : 'B');
            nm[2 * i + k] = name;
            const void *data = host_of(a->ctx, x, hp);
            if (!data) goto oom;
            t[2 * i + k] = (st_out){name, LT_F32, 2, {x->shape[0], x->shape[1]}, data};
        }
    }
    *out = t;
    *names = nm;
    return LT_OK;
oom:
    for (int i = 0; i < n; i++)
        free(nm[i]);
    free(nm);
    free(t);
    return LT_ERR_MEMORY;
}

static void free_names(char **nm, int n) {
    if (!nm) return;
    for (int i = 0; i < n; i++)
        free(nm[i]);
    free(nm);
}

lt_status peft_save_adapter(const lt_adapters *a, const char *dir, char *err) {
    if (!a) {
        return lt_fail(err, LT_ERR_STATE, "%%save adapter=: no adapters attached (%%lora first)");
    }
    if (a->full) {
        return lt_fail(err, LT_ERR_STATE,
                       "%%save adapter=: full fine-tuning has no adapter; use %%save merged=DIR");
    }
    lt_status rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    char *cfg = adapter_config_json(a);
    st_out *t = NULL;
    char **nm = NULL;
    host_pool hp = {0};
    if (!cfg || adapter_tensors(a, &t, &nm, &hp) != LT_OK) {
        free(cfg);
        pool_free(&hp);
        return lt_fail(err, LT_ERR_MEMORY, "%%save adapter=%s: out of memory", dir);
    }
    char p1[4200], p2[4200];
    snprintf(p1, sizeof p1, "%s/adapter_model.safetensors", dir);
    snprintf(p2, sizeof p2, "%s/adapter_config.json", dir);
    lt_afile_set fs = {0};
    rc = set_st(&fs, p1, t, a->n_slots * 2, err);
    if (rc == LT_OK) rc = lt_afile_set_text(&fs, p2, cfg, err);
    if (rc == LT_OK) rc = lt_afile_set_commit(&fs, err);
    if (rc != LT_OK) lt_afile_set_abort(&fs);
    free(cfg);
    free(t);
    free_names(nm, a->n_slots * 2);
    pool_free(&hp);
    return rc;
}

/* Finds the tensor of a slot under any PEFT key spelling. */
static const st_tensor *find_lora(const st_set *st, const lora_slot *s, char ab) {
    const char *rest = s->module + strlen("model.");
    static const char *const PRE[] = {"base_model.model.model.",
                                      "base_model.model.model.language_model.",
                                      "base_model.model.language_model.model."};
    char key[512];
    for (int i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "%s%s.lora_%c.weight", PRE[i], rest, ab);
        const st_tensor *t = st_find(st, key);
        if (t) return t;
        snprintf(key, sizeof key, "%s%s.lora_%c.default.weight", PRE[i], rest, ab);
        if ((t = st_find(st, key))) return t;
    }
    return NULL;
}

lt_status peft_load_adapter(lt_adapters **out, gemma3_model *m, lt_ctx *ctx, const char *dir,
                            char *err) {
    *out = NULL;
    char path[4200];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    json_error_t je;
    json_t *c = json_load_file(path, 0, &je);
    if (!c) {
        return lt_fail(err, LT_ERR_IO, "%%lora load=%s: cannot read adapter_config.json (%s)", dir,
                       je.text);
    }
    lt_status rc = LT_OK;
    json_t *pt = json_object_get(c, "peft_type");
    json_t *r = json_object_get(c, "r"), *alpha = json_object_get(c, "lora_alpha");
    json_t *tm = json_object_get(c, "target_modules");
    char targets[1024] = "";
    if (!json_is_string(pt) || strcmp(json_string_value(pt), "LORA") != 0) {
        rc = lt_fail(err, LT_ERR_FORMAT, "%s: peft_type is not \"LORA\"", path);
    } else if (json_is_true(json_object_get(c, "use_dora"))) {
        rc = lt_fail(err, LT_ERR_FORMAT, "%s: use_dora=true (DoRA) is not supported", path);
    } else if (json_object_size(json_object_get(c, "rank_pattern")) ||
               json_object_size(json_object_get(c, "alpha_pattern"))) {
        rc = lt_fail(err, LT_ERR_FORMAT,
                     "%s: rank_pattern/alpha_pattern (per-module ranks) are not supported", path);
    } else if (r && !json_is_integer(r)) {
        rc = lt_fail(err, LT_ERR_FORMAT, "%s: key 'r' is not an integer", path);
    } else if (json_is_string(tm)) {
        snprintf(targets, sizeof targets, "%s", json_string_value(tm));
    } else if (json_is_array(tm)) {
        size_t i;
        json_t *v;
        json_array_foreach(tm, i, v) {
            if (!json_is_string(v)) continue;
            size_t n = strlen(targets);
            snprintf(targets + n, sizeof targets - n, "%s%s", n ? "," : "", json_string_value(v));
        }
    } else {
        rc = lt_fail(err, LT_ERR_FORMAT, "%s: key 'target_modules' is missing (a list or a regex)",
                     path);
    }
    lora_opts o = {0};
    if (rc == LT_OK) {
        o.r = r ? (int)json_integer_value(r) : 8;
        o.alpha = alpha && json_is_number(alpha) ? (float)json_number_value(alpha) : 8.0f;
        o.rslora = json_is_true(json_object_get(c, "use_rslora"));
        json_t *dr = json_object_get(c, "lora_dropout");
        o.dropout = dr && json_is_number(dr) ? (float)json_number_value(dr) : 0.0f;
        o.targets = targets;
    }
    json_decref(c);
    if (rc != LT_OK) return rc;
    /* PEFT's targets for a multimodal model may name vision modules too; we only hold text */
    lt_adapters *a = NULL;
    rc = lora_attach(&a, m, ctx, &o, err);
    if (rc != LT_OK) {
        return lt_fail_prefix(err, rc, "%%lora load=%s", dir);
    }
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_set st;
    rc = st_open(&st, path, err);
    if (rc != LT_OK) {
        lora_free(a);
        return rc;
    }
    int used = 0;
    for (int i = 0; i < a->n_slots && rc == LT_OK; i++) {
        lora_slot *s = &a->slots[i];
        for (int k = 0; k < 2 && rc == LT_OK; k++) {
            const st_tensor *t = find_lora(&st, s, k == 0 ? 'A' : 'B');
            lt_tensor *dst = k == 0 ? &s->lora.a : &s->lora.b;
            if (!t) {
                rc = lt_fail(err, LT_ERR_FORMAT,
                             "%s: no lora_%c tensor for %s (the config targets it)", path,
                             k ? 'B' : 'A', s->module);
            } else if (!t->dtype_ok || t->dtype == LT_I32 || t->ndim != 2 ||
                       t->shape[0] != dst->shape[0] || t->shape[1] != dst->shape[1]) {
                char sh[64];
                rc = lt_fail(err, LT_ERR_FORMAT,
                             "%s: %s is %s %s; expected F32/F16/BF16 [%lld, %lld]", path, t->name,
                             t->dtype_name, st_shape_str(t, sh, sizeof sh),
                             (long long)dst->shape[0], (long long)dst->shape[1]);
            } else {
                int64_t n = lt_tensor_numel(dst);
                float *host = malloc(sizeof(float) * (size_t)n);
                if (!host) {
                    rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
                } else {
                    lt_to_f32(host, t->data, t->dtype, n);
                    rc = ctx->be->upload(ctx, dst->data, host, sizeof(float) * (size_t)n);
                    free(host);
                    used++;
                }
            }
        }
    }
    int lora_tensors = 0;
    for (int i = 0; i < st.n_tensors; i++)
        lora_tensors += strstr(st.tensors[i].name, ".lora_") != NULL;
    if (rc == LT_OK && lora_tensors > used) {
        lt_fail(err, LT_ERR_FORMAT,
                "%s: holds %d LoRA tensors but only %d belong to the text model's targeted layers",
                path, lora_tensors, used);
        /* vision-tower adapters of a multimodal checkpoint are the one acceptable case */
        if (!m->cfg.multimodal)
            rc = LT_ERR_FORMAT;
        else
            err[0] = 0;
    }
    st_close(&st);
    if (rc != LT_OK) {
        lora_free(a);
        return rc;
    }
    *out = a;
    return LT_OK;
}

/* ---- merged checkpoints ---------------------------------------------------------------------- */

static const char *torch_dtype(lt_dtype d) {
    return d == LT_BF16 ? "bfloat16" : d == LT_F16 ? "float16" : "float32";
}

/* A flat Gemma3TextConfig (transformers reads it as Gemma3ForCausalLM). */
static char *text_config_json(const gemma3_model *m, lt_dtype dt) {
    const gemma3_config *c = &m->cfg;
    json_t *j = json_object();
    json_object_set_new(j, "architectures", json_pack("[s]", "Gemma3ForCausalLM"));
    json_object_set_new(j, "model_type", json_string("gemma3_text"));
    json_object_set_new(j, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(j, "intermediate_size", json_integer(c->intermediate_size));
    json_object_set_new(j, "num_hidden_layers", json_integer(c->num_hidden_layers));
    json_object_set_new(j, "num_attention_heads", json_integer(c->num_attention_heads));
    json_object_set_new(j, "num_key_value_heads", json_integer(c->num_key_value_heads));
    json_object_set_new(j, "head_dim", json_integer(c->head_dim));
    json_object_set_new(j, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(j, "max_position_embeddings", json_integer(c->max_position_embeddings));
    json_object_set_new(j, "sliding_window", json_integer(c->sliding_window));
    json_object_set_new(j, "query_pre_attn_scalar", json_real(c->query_pre_attn_scalar));
    json_object_set_new(j, "rms_norm_eps", json_real(c->rms_norm_eps));
    json_object_set_new(j, "hidden_activation", json_string("gelu_pytorch_tanh"));
    json_object_set_new(j, "final_logit_softcapping", json_null());
    json_object_set_new(j, "attn_logit_softcapping", json_null());
    json_object_set_new(j, "attention_bias", json_false());
    json_object_set_new(j, "attention_dropout", json_real(0));
    json_object_set_new(j, "tie_word_embeddings", json_boolean(!m->lm_head.w.data));
    json_object_set_new(j, "rope_theta", json_real(c->rope[GEMMA3_FULL].theta));
    json_object_set_new(j, "rope_local_base_freq", json_real(c->rope[GEMMA3_SLIDING].theta));
    if (c->rope[GEMMA3_FULL].factor != 1.0)
        json_object_set_new(
            j, "rope_scaling",
            json_pack("{s:s, s:f}", "rope_type", "linear", "factor", c->rope[GEMMA3_FULL].factor));
    else
        json_object_set_new(j, "rope_scaling", json_null());
    json_t *lt = json_array();
    for (int l = 0; l < c->num_hidden_layers; l++)
        json_array_append_new(
            lt,
            json_string(c->layer_types[l] == GEMMA3_FULL ? "full_attention" : "sliding_attention"));
    json_object_set_new(j, "layer_types", lt);
    if (c->bos_id >= 0) json_object_set_new(j, "bos_token_id", json_integer(c->bos_id));
    if (c->pad_id >= 0) json_object_set_new(j, "pad_token_id", json_integer(c->pad_id));
    json_t *eos = json_array();
    for (int i = 0; i < c->n_eos_ids; i++)
        json_array_append_new(eos, json_integer(c->eos_ids[i]));
    json_object_set_new(j, "eos_token_id", eos);
    json_object_set_new(j, "torch_dtype", json_string(torch_dtype(dt)));
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(j);
    return text;
}

typedef struct merge_walk {
    const lt_adapters *a;
    lt_dtype dt;
    st_out *t;
    char **names;
    void **bufs;
    int n;
    char *err;
    lt_status rc;
} merge_walk;

static const lora_slot *slot_of(const lt_adapters *a, const lt_tensor *t) {
    if (!a) return NULL;
    for (int i = 0; i < a->n_slots; i++)
        if (&a->slots[i].w->w == t) return &a->slots[i];
    return NULL;
}

static int merge_visit(void *user, const char *name, lt_tensor *t) {
    merge_walk *w = user;
    int64_t n = lt_tensor_numel(t);
    const lora_slot *s = slot_of(w->a, t);
    float *f32 = NULL;
    if (s) { /* W' = W + s·B·A in fp32, then cast */
        f32 = malloc(sizeof(float) * (size_t)n);
        if (!f32 || lora_merged_weight(w->a, s, f32, w->err) != LT_OK) goto oom;
    }
    void *buf = malloc((size_t)n * lt_dtype_size(w->dt));
    char *nm = strdup(name);
    if (!buf || !nm) {
        free(buf);
        free(nm);
        goto oom;
    }
    if (f32)
        lt_convert(buf, w->dt, f32, LT_F32, n);
    else
        lt_convert(buf, w->dt, t->data, t->dtype, n);
    free(f32);
    w->bufs[w->n] = buf;
    w->names[w->n] = nm;
    st_out *o = &w->t[w->n++];
    *o = (st_out){nm, w->dt, t->ndim, {0}, buf};
    for (int d = 0; d < t->ndim; d++)
        o->shape[d] = t->shape[d];
    return 0;
oom:
    free(f32);
    w->rc = lt_fail(w->err, LT_ERR_MEMORY, "out of memory while merging %s", name);
    return 1;
}

lt_status peft_save_merged(const lt_adapters *a, gemma3_model *m, const char *src_dir,
                           const char *tokenizer_path, const char *dtype, const char *dir,
                           char *err) {
    lt_dtype dt = m->dtype;
    if (dtype && strcmp(dtype, "auto") != 0) {
        if (!strcmp(dtype, "fp32"))
            dt = LT_F32;
        else if (!strcmp(dtype, "fp16"))
            dt = LT_F16;
        else if (!strcmp(dtype, "bf16"))
            dt = LT_BF16;
        else {
            return lt_fail(err, LT_ERR_ARG, "%%save dtype=%s; accepted: auto|fp32|fp16|bf16",
                           dtype);
        }
    }
    if (dt != LT_F32 && dt != LT_F16 && dt != LT_BF16) dt = LT_BF16;
    if (a && a->ctx->be != &lt_backend_cpu) {
        return lt_fail(
            err, LT_ERR_STATE,
            "%%save merged=: not available on the %s backend yet; save the adapter (%%save "
            "adapter=DIR), "
            "then %%load the model with device=cpu, %%lora load=DIR and %%save merged=",
            a->ctx->be->name);
    }
    lt_status rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    int nw = gemma3_weight_count(m);
    merge_walk w = {a,
                    dt,
                    calloc((size_t)nw + 1, sizeof(st_out)),
                    calloc((size_t)nw + 1, sizeof(char *)),
                    calloc((size_t)nw + 1, sizeof(void *)),
                    0,
                    err,
                    LT_OK};
    if (!w.t || !w.names || !w.bufs) {
        w.rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
    } else {
        gemma3_weights_foreach(m, merge_visit, &w);
    }
    rc = w.rc;
    char *cfg = NULL;
    char src_cfg[4200] = "";
    if (rc == LT_OK) {
        /* keep the loaded config.json when there is one (text models); else write one */
        if (src_dir && *src_dir && !m->cfg.multimodal) {
            snprintf(src_cfg, sizeof src_cfg, "%s/config.json", src_dir);
            if (access(src_cfg, R_OK) != 0) src_cfg[0] = 0;
        }
        if (!src_cfg[0] && !(cfg = text_config_json(m, dt))) {
            rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
        }
    }
    lt_afile_set fs = {0};
    char p[4200];
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/model.safetensors", dir);
        rc = set_st(&fs, p, w.t, w.n, err);
    }
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/config.json", dir);
        rc = src_cfg[0] ? lt_afile_set_copy(&fs, p, src_cfg, err)
                        : lt_afile_set_text(&fs, p, cfg, err);
    }
    if (rc == LT_OK && tokenizer_path) {
        snprintf(p, sizeof p, "%s/tokenizer.model", dir);
        rc = lt_afile_set_copy(&fs, p, tokenizer_path, err);
    }
    if (rc == LT_OK) rc = lt_afile_set_commit(&fs, err);
    if (rc != LT_OK) lt_afile_set_abort(&fs);
    for (int i = 0; i < w.n; i++) {
        free(w.bufs[i]);
        free(w.names[i]);
    }
    free(w.t);
    free(w.names);
    free(w.bufs);
    free(cfg);
    return rc;
}

/* ---- training checkpoints -------------------------------------------------------------------- */

/* DIR/params.safetensors (every trainable tensor by its train_param name), optimizer.safetensors
 * (NAME.exp_avg, NAME.exp_avg_sq), trainer_state.json, and for LoRA the PEFT adapter files (so a
 * checkpoint is also a loadable adapter). One set: all written, then all renamed. */
lt_status ckpt_save(const lt_adapters *a, const char *dir, const char *state_json, char *err) {
    lt_status rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    int n = a->n_params;
    st_out *pv = calloc((size_t)n + 1, sizeof *pv), *ov = calloc((size_t)n * 2 + 1, sizeof *ov);
    char **on = calloc((size_t)n * 2 + 1, sizeof *on);
    st_out *at = NULL;
    char **an = NULL;
    char *cfg = NULL;
    host_pool hp = {0};
    if (!pv || !ov || !on) goto oom;
    int no = 0;
    for (int i = 0; i < n; i++) {
        const train_param *p = &a->params[i];
        const void *val = host_of(a->ctx, p->value, &hp);
        if (!val) goto oom;
        pv[i] = (st_out){p->name, LT_F32, p->value->ndim, {0}, val};
        memcpy(pv[i].shape, p->value->shape, sizeof pv[i].shape);
        if (!p->m.data) continue;
        for (int k = 0; k < 2; k++) {
            size_t len = strlen(p->name) + 16;
            if (!(on[no] = malloc(len))) goto oom;
            snprintf(on[no], len, "%s.%s", p->name, k ? "exp_avg_sq" : "exp_avg");
            const void *st = host_of(a->ctx, k ? &p->v : &p->m, &hp);
            if (!st) goto oom;
            ov[no] = (st_out){on[no], LT_F32, p->value->ndim, {0}, st};
            memcpy(ov[no].shape, p->value->shape, sizeof ov[no].shape);
            no++;
        }
    }
    if (!a->full) {
        if (!(cfg = adapter_config_json(a)) || adapter_tensors(a, &at, &an, &hp) != LT_OK) goto oom;
    }
    lt_afile_set fs = {0};
    char p[4200];
    snprintf(p, sizeof p, "%s/params.safetensors", dir);
    rc = set_st(&fs, p, pv, n, err);
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/optimizer.safetensors", dir);
        rc = set_st(&fs, p, ov, no, err);
    }
    if (rc == LT_OK && !a->full) {
        snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
        rc = set_st(&fs, p, at, a->n_slots * 2, err);
        if (rc == LT_OK) {
            snprintf(p, sizeof p, "%s/adapter_config.json", dir);
            rc = lt_afile_set_text(&fs, p, cfg, err);
        }
    }
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/trainer_state.json", dir);
        rc = lt_afile_set_text(&fs, p, state_json, err);
    }
    if (rc == LT_OK) rc = lt_afile_set_commit(&fs, err);
    if (rc != LT_OK) lt_afile_set_abort(&fs);
    goto out;
oom:
    rc = lt_fail(err, LT_ERR_MEMORY, "checkpoint %s: out of memory", dir);
out:
    for (int i = 0; on && i < n * 2; i++)
        free(on[i]);
    free(on);
    free(ov);
    free(pv);
    free(at);
    free_names(an, a ? a->n_slots * 2 : 0);
    free(cfg);
    pool_free(&hp);
    return rc;
}

/* Loads params.safetensors and optimizer.safetensors of DIR into a (names must match). */
lt_status ckpt_load(lt_adapters *a, const char *dir, char *err) {
    char path[4200];
    st_set ps, os;
    snprintf(path, sizeof path, "%s/params.safetensors", dir);
    lt_status rc = st_open(&ps, path, err);
    if (rc != LT_OK) return rc;
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    rc = st_open(&os, path, err);
    if (rc != LT_OK) {
        st_close(&ps);
        return rc;
    }
    lt_ctx *ctx = a->ctx;
    for (int i = 0; i < a->n_params && rc == LT_OK; i++) {
        train_param *p = &a->params[i];
        size_t bytes = lt_tensor_bytes(p->value);
        const st_tensor *t = st_find(&ps, p->name);
        if (!t || t->dtype != LT_F32 || t->nbytes != bytes) {
            rc = lt_fail(err, LT_ERR_FORMAT,
                         "%s/params.safetensors: no F32 tensor %s of the right shape (was the "
                         "checkpoint made with other %%lora options?)",
                         dir, p->name);
            break;
        }
        rc = ctx->be->upload(ctx, p->value->data, t->data, bytes);
        char key[256];
        for (int k = 0; k < 2 && rc == LT_OK; k++) {
            snprintf(key, sizeof key, "%s.%s", p->name, k ? "exp_avg_sq" : "exp_avg");
            const st_tensor *o = st_find(&os, key);
            if (!o) continue; /* no step taken yet */
            if (o->dtype != LT_F32 || o->nbytes != bytes) {
                rc = lt_fail(err, LT_ERR_FORMAT, "%s/optimizer.safetensors: %s has the wrong shape",
                             dir, key);
                break;
            }
            lt_tensor *dst = k ? &p->v : &p->m;
            if (!dst->data) {
                *dst = p->grad;
                dst->data = ctx->be->alloc(ctx, bytes);
                if (!dst->data) {
                    rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
                    break;
                }
            }
            rc = ctx->be->upload(ctx, dst->data, o->data, bytes);
        }
    }
    st_close(&ps);
    st_close(&os);
    return rc;
}
