/* gguf_export.c — a loaded Gemma 3 (plus its LoRA adapters, merged) to a GGUF llama.cpp runs.
 *
 * Walks the model with gemma3_weights_foreach and declares each tensor under its llama.cpp
 * name (as llama.cpp's convert_hf_to_gguf.py names it), fastest dimension first, with the type
 * llama.cpp's own tools would pick (gguf_choose_type). Rows are produced on demand: read from
 * host or backend memory, widened to fp32, LoRA merged (W + scale·B·A) in fp32, +1 folded into
 * every norm weight, then quantized by the writer. Metadata: the gemma3.* keys with the exact
 * value types llama.cpp's loader checks (counts u32, eps and frequencies f32), the SentencePiece
 * vocabulary as convert_hf_to_gguf.py lists it, special ids, chat template. Where llama.cpp
 * hard-codes a Gemma 3 rule that the model's config breaks (its attention scale ignores
 * query_pre_attn_scalar; the global layer is the last of each period) the exporter compensates
 * when it can (query_pre_attn_scalar, via q_norm) and refuses with a clear message when it
 * cannot (a layer-type layout that is not periodic).
 * Must not touch: the model's weights (read-only here), the session, files other than the
 * output (the writer owns that) — except reading the checkpoint's tokenizer_config.json /
 * chat_template files next to the weights.
 */
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/base/strbuf.h"
#include "cuda/export/gguf_export.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/text/tokenizer.h"

/* Gemma 3's chat template (verbatim: transformers' convert_gemma3_weights.py _CHAT_TEMPLATE,
 * what the Hub's -it checkpoints ship), used when the checkpoint ships none (random:,
 * tiny): lathe trains in this format, so llama.cpp should chat in it too. */
static const char gemma3_chat_template[] =
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n";

/* ---- one tensor's rows ------------------------------------------------------------------ */

typedef struct export_ctx export_ctx;

typedef struct tensor_src {
    export_ctx *ex;
    const lt_tensor *t;  /* [rows, ne0] (1-D tensors: one row) */
    const lt_lora *lora; /* merged when non-NULL and enabled */
    const lt_weight *qw; /* an NF4/int8 weight (host memory): dequantized to fp32 rows */
    float add;           /* +1 for norms */
    float mul;           /* applied after add (q_norm compensation); 1 otherwise */
    float *lora_a;       /* [r, in] fp32 host copy, loaded on first use */
} tensor_src;

struct export_ctx {
    lt_ctx *dev;    /* backend holding the weights; NULL = host memory */
    uint8_t *stage; /* staging for device reads */
    size_t stage_cap;
    tensor_src *srcs;
    int n_srcs, cap_srcs;
    /* vocabulary */
    const lt_tokenizer *tok;
    int n_vocab;
    char **pieces; /* overrides from tokenizer_config.json (NULL = tok_piece) */
    float *scores;
    int32_t *types;
    char pad_buf[32];
};

static lt_status read_bytes(export_ctx *ex, void *dst, const void *src, size_t n, char *err,
                            size_t errlen) {
    if (!ex->dev) {
        memcpy(dst, src, n);
        return LT_OK;
    }
    lt_status st = ex->dev->be->download(ex->dev, dst, src, n);
    if (st != LT_OK)
        snprintf(err, errlen, "reading weights from %s: %s", ex->dev->be->name, ex->dev->err);
    return st;
}

/* dst[n] fp32 <- n elements of t starting at element `first`. */
static lt_status read_f32(export_ctx *ex, const lt_tensor *t, int64_t first, int64_t n, float *dst,
                          char *err, size_t errlen) {
    size_t es = lt_dtype_size(t->dtype);
    const uint8_t *src = (const uint8_t *)t->data + (size_t)first * es;
    if (t->dtype == LT_F32) return read_bytes(ex, dst, src, (size_t)n * 4, err, errlen);
    if (t->dtype != LT_F16 && t->dtype != LT_BF16) {
        snprintf(err, errlen, "unsupported weight dtype %s", lt_dtype_name(t->dtype));
        return LT_ERR_FORMAT;
    }
    if (!ex->dev) {
        lt_to_f32(dst, src, t->dtype, n);
        return LT_OK;
    }
    size_t bytes = (size_t)n * es;
    if (bytes > ex->stage_cap) {
        uint8_t *p = realloc(ex->stage, bytes);
        if (!p) {
            snprintf(err, errlen, "out of memory staging %zu bytes", bytes);
            return LT_ERR_MEMORY;
        }
        ex->stage = p;
        ex->stage_cap = bytes;
    }
    lt_status st = read_bytes(ex, ex->stage, src, bytes, err, errlen);
    if (st == LT_OK) lt_to_f32(dst, ex->stage, t->dtype, n);
    return st;
}

static lt_status fill_tensor(void *vctx, int64_t row0, int64_t nrows, float *dst, char *err,
                             size_t errlen) {
    tensor_src *s = vctx;
    const lt_tensor *t = s->t;
    const int64_t ne0 = t->shape[t->ndim - 1];
    /* dst: [nrows, ne0] fp32 */
    lt_status st = LT_OK;
    if (s->qw)
        lt_weight_dequantize_rows(s->qw, row0, nrows, dst);
    else
        st = read_f32(s->ex, t, row0 * ne0, nrows * ne0, dst, err, errlen);
    if (st != LT_OK) return st;
    const lt_lora *lo = s->lora;
    if (lo && lo->enabled && lo->a.data && lo->b.data && lo->scale != 0.0f) {
        const int64_t r = lo->a.shape[0]; /* a: [r, in], b: [out, r] */
        if (lo->a.shape[1] != ne0 || lo->b.shape[1] != r || lo->a.dtype != LT_F32 ||
            lo->b.dtype != LT_F32) {
            snprintf(err, errlen, "LoRA adapter shapes do not match the weight");
            return LT_ERR_ARG;
        }
        if (!s->lora_a) {
            s->lora_a = malloc((size_t)(r * ne0) * sizeof(float));
            if (!s->lora_a) {
                snprintf(err, errlen, "out of memory for the LoRA A matrix");
                return LT_ERR_MEMORY;
            }
            st = read_f32(s->ex, &lo->a, 0, r * ne0, s->lora_a, err, errlen);
            if (st != LT_OK) return st;
        }
        float *brows = malloc((size_t)(nrows * r) * sizeof(float));
        if (!brows) {
            snprintf(err, errlen, "out of memory for LoRA B rows");
            return LT_ERR_MEMORY;
        }
        st = read_f32(s->ex, &lo->b, row0 * r, nrows * r, brows, err, errlen);
        if (st == LT_OK) {
            /* W[o, :] += scale * sum_k B[o, k] * A[k, :] */
            for (int64_t o = 0; o < nrows; ++o) {
                float *wrow = dst + o * ne0;
                for (int64_t k = 0; k < r; ++k) {
                    const float c = lo->scale * brows[o * r + k];
                    const float *arow = s->lora_a + k * ne0;
                    for (int64_t j = 0; j < ne0; ++j)
                        wrow[j] += c * arow[j];
                }
            }
        }
        free(brows);
        if (st != LT_OK) return st;
    }
    if (s->add != 0.0f || s->mul != 1.0f)
        for (int64_t i = 0; i < nrows * ne0; ++i)
            dst[i] = (dst[i] + s->add) * s->mul;
    return LT_OK;
}

/* ---- names and roles -------------------------------------------------------------------- */

static const struct {
    const char *hf;   /* suffix after "model.layers.N." */
    const char *gguf; /* suffix after "blk.N." */
    gguf_role role;
} layer_names[] = {
    {"input_layernorm.weight", "attn_norm.weight", GGUF_ROLE_NORM},
    {"self_attn.q_proj.weight", "attn_q.weight", GGUF_ROLE_OTHER_2D},
    {"self_attn.k_proj.weight", "attn_k.weight", GGUF_ROLE_OTHER_2D},
    {"self_attn.v_proj.weight", "attn_v.weight", GGUF_ROLE_ATTN_V},
    {"self_attn.o_proj.weight", "attn_output.weight", GGUF_ROLE_OTHER_2D},
    {"self_attn.q_norm.weight", "attn_q_norm.weight", GGUF_ROLE_NORM},
    {"self_attn.k_norm.weight", "attn_k_norm.weight", GGUF_ROLE_NORM},
    {"post_attention_layernorm.weight", "post_attention_norm.weight", GGUF_ROLE_NORM},
    {"pre_feedforward_layernorm.weight", "ffn_norm.weight", GGUF_ROLE_NORM},
    {"mlp.gate_proj.weight", "ffn_gate.weight", GGUF_ROLE_OTHER_2D},
    {"mlp.up_proj.weight", "ffn_up.weight", GGUF_ROLE_OTHER_2D},
    {"mlp.down_proj.weight", "ffn_down.weight", GGUF_ROLE_FFN_DOWN},
    {"post_feedforward_layernorm.weight", "post_ffw_norm.weight", GGUF_ROLE_NORM},
};

int gguf_export_tensor_name(const char *hf, char *out, size_t cap, int *layer, int *role) {
    int l = -1, consumed = 0;
    gguf_role r;
    if (strcmp(hf, "model.embed_tokens.weight") == 0) {
        snprintf(out, cap, "token_embd.weight");
        r = GGUF_ROLE_TOKEN_EMBD;
    } else if (strcmp(hf, "model.norm.weight") == 0) {
        snprintf(out, cap, "output_norm.weight");
        r = GGUF_ROLE_NORM;
    } else if (strcmp(hf, "lm_head.weight") == 0) {
        snprintf(out, cap, "output.weight");
        r = GGUF_ROLE_OUTPUT;
    } else if (sscanf(hf, "model.layers.%d.%n", &l, &consumed) == 1 && consumed > 0 && l >= 0) {
        const char *suffix = hf + consumed;
        size_t i, n = sizeof layer_names / sizeof layer_names[0];
        for (i = 0; i < n; ++i)
            if (strcmp(suffix, layer_names[i].hf) == 0) break;
        if (i == n) return -1;
        snprintf(out, cap, "blk.%d.%s", l, layer_names[i].gguf);
        r = layer_names[i].role;
    } else {
        return -1;
    }
    if (layer) *layer = l;
    if (role) *role = (int)r;
    return 0;
}

/* ---- vocabulary ------------------------------------------------------------------------- */

static const char *vocab_piece(void *vctx, size_t i) {
    export_ctx *ex = vctx;
    if (ex->pieces && ex->pieces[i]) return ex->pieces[i];
    if ((int)i < tok_size(ex->tok)) return tok_piece(ex->tok, (int)i);
    snprintf(ex->pad_buf, sizeof ex->pad_buf, "[PAD%zu]", i); /* rows past the tokenizer */
    return ex->pad_buf;
}

static int looks_special(const char *s) {
    size_t n = strlen(s);
    return (n >= 4 && strncmp(s, "<|", 2) == 0 && strcmp(s + n - 2, "|>") == 0) ||
           strcmp(s, "<pad>") == 0 || strcmp(s, "<mask>") == 0;
}

/* Reads a file next to the weights into a malloc'd string (NULL if absent/unreadable). */
static char *slurp(const char *dir, const char *name) {
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    lt_strbuf b = {0};
    int r = lt_strbuf_read(&b, f, (64u << 20) - 1);
    fclose(f);
    if (r != 0 || b.oom) {
        lt_strbuf_free(&b);
        return NULL;
    }
    return lt_strbuf_take(&b);
}

/* tokenizer_config.json's added_tokens_decoder overrides piece text and type, as the
 * converter does (special -> control, else user-defined; score -1000). Also returns its
 * chat_template (malloc'd) when there is one. Absent file: no change. */
static lt_status apply_tokenizer_config(export_ctx *ex, const char *dir, char **chat, char *err) {
    char *text = slurp(dir, "tokenizer_config.json");
    if (!text) return LT_OK;
    json_error_t je;
    json_t *root = json_loads(text, 0, &je);
    free(text);
    if (!root || !json_is_object(root)) {
        lt_fail(err, LT_ERR_FORMAT, "%s/tokenizer_config.json: not a JSON object (line %d: %s)",
                dir, je.line, je.text);
        json_decref(root);
        return LT_ERR_FORMAT;
    }
    json_t *added = json_object_get(root, "added_tokens_decoder");
    if (json_is_object(added)) {
        const char *key;
        json_t *val;
        json_object_foreach(added, key, val) {
            char *end;
            long id = strtol(key, &end, 10);
            json_t *content = json_object_get(val, "content");
            if (*end || id < 0 || id >= ex->n_vocab || !json_is_string(content)) continue;
            const char *piece = json_string_value(content);
            int special = json_is_true(json_object_get(val, "special")) || looks_special(piece);
            if (!ex->pieces && !(ex->pieces = calloc((size_t)ex->n_vocab, sizeof(char *)))) {
                json_decref(root);
                return lt_fail(err, LT_ERR_MEMORY, "out of memory");
            }
            free(ex->pieces[id]);
            ex->pieces[id] = strdup(piece);
            ex->types[id] = special ? TOK_CONTROL : TOK_USER_DEFINED;
            ex->scores[id] = -1000.0f;
        }
    }
    json_t *tmpl = json_object_get(root, "chat_template");
    if (json_is_string(tmpl)) {
        *chat = strdup(json_string_value(tmpl));
    } else if (json_is_array(tmpl)) { /* [{name, template}, ...]: take "default" */
        size_t i;
        json_t *item;
        json_array_foreach(tmpl, i, item) {
            json_t *name = json_object_get(item, "name"), *t = json_object_get(item, "template");
            if (json_is_string(name) && json_is_string(t) &&
                strcmp(json_string_value(name), "default") == 0)
                *chat = strdup(json_string_value(t));
        }
    }
    json_decref(root);
    return LT_OK;
}

/* The chat template: chat_template.jinja, chat_template.json, tokenizer_config.json, else
 * Gemma 3's. Returns a malloc'd string (NULL only when out of memory). */
static char *find_chat_template(const char *dir, char *from_config) {
    char *t = dir ? slurp(dir, "chat_template.jinja") : NULL;
    if (t) {
        free(from_config);
        return t;
    }
    char *json = dir ? slurp(dir, "chat_template.json") : NULL;
    if (json) {
        json_t *root = json_loads(json, 0, NULL);
        free(json);
        json_t *v = root ? json_object_get(root, "chat_template") : NULL;
        if (json_is_string(v)) t = strdup(json_string_value(v));
        json_decref(root);
        if (t) {
            free(from_config);
            return t;
        }
    }
    return from_config ? from_config : strdup(gemma3_chat_template);
}

/* ---- the export ------------------------------------------------------------------------- */

typedef struct walk_ctx {
    export_ctx *ex;
    gguf_writer *w;
    gguf_ftype ftype;
    const gemma3_model *m;
    float q_norm_mul;
    int tied;
    int n_fallback;
    char first_fallback[160];
    lt_status st;
    char *err;
} walk_ctx;

static int visit_weight(void *user, const char *hf, lt_tensor *t) {
    walk_ctx *wc = user;
    export_ctx *ex = wc->ex;
    char name[96];
    int layer = -1, role = 0;
    if (gguf_export_tensor_name(hf, name, sizeof name, &layer, &role) != 0) {
        wc->st =
            lt_fail(wc->err, LT_ERR_FORMAT, "gguf export: no llama.cpp name for weight '%s'", hf);
        return 1;
    }
    if (t->ndim < 1 || t->ndim > 2 || !t->data) {
        wc->st = lt_fail(wc->err, LT_ERR_FORMAT, "gguf export: weight '%s' has %d dims or no data",
                         hf, t->ndim);
        return 1;
    }
    int64_t ne[2] = {t->shape[t->ndim - 1], t->ndim == 2 ? t->shape[0] : 1};
    int is_norm = role == GGUF_ROLE_NORM || t->ndim == 1;
    int fb = 0;
    gguf_type type = gguf_choose_type(wc->ftype, is_norm ? GGUF_ROLE_NORM : (gguf_role)role, ne[0],
                                      layer, wc->m->cfg.num_hidden_layers, wc->tied, &fb);
    if (fb && wc->n_fallback++ == 0)
        snprintf(wc->first_fallback, sizeof wc->first_fallback, "%s (row %lld) -> %s", name,
                 (long long)ne[0], gguf_type_name(type));
    if (ex->n_srcs == ex->cap_srcs) {
        /* the writer keeps pointers to the sources: grow before any is handed out */
        wc->st = lt_fail(wc->err, LT_ERR_STATE, "gguf export: more weights than counted");
        return 1;
    }
    tensor_src *s = &ex->srcs[ex->n_srcs++];
    memset(s, 0, sizeof *s);
    s->ex = ex;
    s->t = t;
    s->mul = 1.0f;
    if (is_norm && strstr(hf, "norm")) s->add = 1.0f; /* Gemma's (1 + w), folded */
    if (strstr(name, "attn_q_norm")) s->mul = wc->q_norm_mul;
    if (!is_norm) {
        /* the adapter, when this weight is an lt_weight with one */
        const gemma3_model *m = wc->m;
        const lt_weight *lw = NULL;
        if (t == &m->embed_tokens.w)
            lw = &m->embed_tokens;
        else if (t == &m->lm_head.w)
            lw = &m->lm_head;
        else if (layer >= 0 && layer < m->cfg.num_hidden_layers) {
            const gemma3_layer *L = &m->layers[layer];
            const lt_weight *all[] = {&L->q_proj,    &L->k_proj,  &L->v_proj,   &L->o_proj,
                                      &L->gate_proj, &L->up_proj, &L->down_proj};
            for (size_t i = 0; i < sizeof all / sizeof all[0]; ++i)
                if (t == &all[i]->w) lw = all[i];
        }
        if (lw) s->lora = lw->lora;
        if (lw && lw->q.kind != LT_QUANT_NONE) s->qw = lw;
    }
    lt_status st = gguf_add_tensor(wc->w, name, t->ndim, ne, type, fill_tensor, s);
    if (st != LT_OK) {
        wc->st = lt_fail(wc->err, st, "%s", gguf_writer_error(wc->w));
        return 1;
    }
    return 0;
}

/* The period p when layer i is full iff (i+1) % p == 0 for every layer; 0 otherwise.
 * p = 1: all layers full; p = L + 1: all sliding (llama.cpp's rule, il % p < p - 1, then
 * makes every layer sliding too). */
static int layer_period(const gemma3_config *c) {
    for (int p = 1; p <= c->num_hidden_layers + 1; ++p) {
        int okp = 1;
        for (int i = 0; i < c->num_hidden_layers && okp; ++i)
            okp = (c->layer_types[i] == GEMMA3_FULL) == ((i + 1) % p == 0);
        if (okp) return p;
    }
    return 0;
}

static void say(const lt_callbacks *cb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(const lt_callbacks *cb, const char *fmt, ...) {
    if (!cb || !cb->message) return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    cb->message(cb->ctx, line);
}

typedef struct progress_bridge {
    const lt_callbacks *cb;
    const char *label;
} progress_bridge;

static void on_progress(void *bridge, const char *tensor, int64_t done, int64_t total) {
    const progress_bridge *pb = bridge;
    (void)tensor;
    if (pb->cb && pb->cb->progress) pb->cb->progress(pb->cb->ctx, pb->label, done, total);
}

lt_status gguf_export_write(gguf_writer *w, const char *path, const gguf_export_opts *o,
                            const char *label, uint64_t *bytes, char *err) {
    progress_bridge pb = {o->cb, label};
    gguf_write_opts wo = {
        .overwrite = o->overwrite,
        .n_threads = o->n_threads,
        .cancel = o->cancel,
        .progress = on_progress,
        .progress_ctx = &pb,
    };
    *bytes = 0;
    lt_status st = o->set ? gguf_writer_write_member(w, o->set, path, &wo, bytes)
                          : gguf_writer_write(w, path, &wo, bytes);
    if (st != LT_OK) lt_fail(err, st, "%s", gguf_writer_error(w));
    return st;
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        st = (call);                                                                               \
        if (st != LT_OK) {                                                                         \
            lt_fail(err, st, "%s", gguf_writer_error(w));                                          \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)

lt_status gguf_export_gemma3(gemma3_model *m, const lt_tokenizer *tok, lt_ctx *dev,
                             const char *path, const gguf_export_opts *o, gguf_export_result *res,
                             char *err) {
    const gemma3_config *c = &m->cfg;
    export_ctx ex = {0};
    walk_ctx wc = {0};
    gguf_writer *w = NULL;
    char *chat = NULL;
    lt_status st = LT_OK;
    err[0] = '\0';
    if (res) memset(res, 0, sizeof *res);
    if (!o) {
        return lt_fail(err, LT_ERR_ARG, "gguf export: no options");
    }
    if (!tok) {
        return lt_fail(err, LT_ERR_STATE,
                       "gguf export: the model has no tokenizer; llama.cpp needs one");
    }

    /* Rules llama.cpp hard-codes for gemma3 (not read from the file): attention scale
     * 1/sqrt(head_dim), or 1/sqrt(hidden/heads) at 62 layers; the global layer ends a period. */
    const int L = c->num_hidden_layers;
    int period = layer_period(c);
    if (period == 0) {
        return lt_fail(
            err, LT_ERR_ARG,
            "gguf export: layer_types is not periodic (full attention every p-th layer); "
            "llama.cpp's gemma3 cannot express it");
    }
    if (c->rope[GEMMA3_SLIDING].factor != 1.0 ||
        strcmp(c->rope[GEMMA3_SLIDING].type, "linear") == 0) {
        return lt_fail(
            err, LT_ERR_ARG,
            "gguf export: RoPE scaling on sliding layers is not supported by llama.cpp's gemma3");
    }
    if (c->attn_logit_softcapping != 0.0) {
        return lt_fail(
            err, LT_ERR_ARG,
            "gguf export: attn_logit_softcapping is set; llama.cpp's gemma3 has no attention "
            "softcap");
    }
    /* llama.cpp scales scores by 1/sqrt(hd) (1/sqrt(H/nh) when block_count is 62); the model
     * wants query_pre_attn_scalar^-1/2. q_norm's output feeds q linearly (RoPE is linear),
     * so scaling the stored q_norm weight by the ratio reproduces the model exactly. */
    double rule = L == 62 ? (double)c->hidden_size / c->num_attention_heads : (double)c->head_dim;
    double qpas = c->query_pre_attn_scalar > 0 ? c->query_pre_attn_scalar : (double)c->head_dim;
    wc.q_norm_mul = (float)sqrt(rule / qpas);
    if (fabs(wc.q_norm_mul - 1.0f) > 1e-7)
        say(o->cb,
            "query_pre_attn_scalar %g differs from llama.cpp's fixed %g: q_norm scaled by %.6f",
            qpas, rule, (double)wc.q_norm_mul);

    if (m->n_quantized) {
        char qs[128];
        say(o->cb,
            "the %s base is dequantized to fp32 for the export (as bitsandbytes' "
            "dequantize does), then written as the chosen type",
            gemma3_quant_summary(m, qs, sizeof qs));
    }
    int n_weights = gemma3_weight_count(m);
    ex.dev = dev;
    ex.tok = tok;
    ex.n_vocab = (int)m->embed_tokens.w.shape[0]; /* token list = embedding rows */
    ex.cap_srcs = n_weights;
    ex.srcs = calloc((size_t)n_weights + 1, sizeof *ex.srcs);
    ex.scores = malloc((size_t)ex.n_vocab * sizeof *ex.scores);
    ex.types = malloc((size_t)ex.n_vocab * sizeof *ex.types);
    w = gguf_writer_new();
    if (!ex.srcs || !ex.scores || !ex.types || !w) {
        st = lt_fail(err, LT_ERR_MEMORY, "gguf export: out of memory");
        goto done;
    }
    for (int i = 0; i < ex.n_vocab; ++i) {
        if (i < tok_size(tok)) {
            ex.scores[i] = tok_score(tok, i);
            ex.types[i] = tok_type(tok, i);
        } else {
            ex.scores[i] = -10000.0f;
            ex.types[i] = TOK_UNUSED;
        }
    }
    char src_dir[600] = "";
    if (m->source[0] && strncmp(m->source, "random:", 7) != 0 && strcmp(m->source, "tiny") != 0)
        snprintf(src_dir, sizeof src_dir, "%s", m->source);
    char *from_config = NULL;
    if (src_dir[0]) {
        st = apply_tokenizer_config(&ex, src_dir, &from_config, err);
        if (st != LT_OK) goto done;
    }
    chat = find_chat_template(src_dir[0] ? src_dir : NULL, from_config);
    if (!chat) {
        st = lt_fail(err, LT_ERR_MEMORY, "gguf export: out of memory");
        goto done;
    }

    /* general.* */
    const char *base = strrchr(m->source, '/');
    base = base && base[1] ? base + 1 : m->source;
    CHECK(gguf_set_str(w, "general.architecture", "gemma3"));
    CHECK(gguf_set_str(w, "general.type", "model"));
    CHECK(gguf_set_str(w, "general.name", o && o->name ? o->name : base[0] ? base : "gemma3"));
    CHECK(gguf_set_u32(w, "general.file_type", (uint32_t)o->ftype));
    CHECK(gguf_set_u32(w, "general.quantization_version", 2));
    CHECK(gguf_set_u32(w, "general.alignment", 32));

    /* gemma3.* as convert_hf_to_gguf.py writes them: counts u32, eps and frequencies f32 */
    CHECK(gguf_set_u32(w, "gemma3.context_length", (uint32_t)c->max_position_embeddings));
    CHECK(gguf_set_u32(w, "gemma3.embedding_length", (uint32_t)c->hidden_size));
    CHECK(gguf_set_u32(w, "gemma3.block_count", (uint32_t)L));
    CHECK(gguf_set_u32(w, "gemma3.feed_forward_length", (uint32_t)c->intermediate_size));
    CHECK(gguf_set_u32(w, "gemma3.attention.head_count", (uint32_t)c->num_attention_heads));
    CHECK(gguf_set_u32(w, "gemma3.attention.head_count_kv", (uint32_t)c->num_key_value_heads));
    CHECK(gguf_set_u32(w, "gemma3.attention.key_length", (uint32_t)c->head_dim));
    CHECK(gguf_set_u32(w, "gemma3.attention.value_length", (uint32_t)c->head_dim));
    CHECK(gguf_set_f32(w, "gemma3.attention.layer_norm_rms_epsilon", (float)c->rms_norm_eps));
    CHECK(gguf_set_f32(w, "gemma3.rope.freq_base", (float)c->rope[GEMMA3_FULL].theta));
    /* period 1: every layer is global; period > L: every layer slides */
    if (period > 1) {
        CHECK(gguf_set_u32(w, "gemma3.attention.sliding_window", (uint32_t)c->sliding_window));
        if (period != 6)
            CHECK(gguf_set_u32(w, "gemma3.attention.sliding_window_pattern", (uint32_t)period));
        if (c->rope[GEMMA3_SLIDING].theta != 10000.0)
            CHECK(
                gguf_set_f32(w, "gemma3.rope.freq_base_swa", (float)c->rope[GEMMA3_SLIDING].theta));
    } else {
        CHECK(gguf_set_u32(w, "gemma3.attention.sliding_window", 0)); /* all layers global */
    }
    if (strcmp(c->rope[GEMMA3_FULL].type, "linear") == 0 && c->rope[GEMMA3_FULL].factor != 1.0) {
        CHECK(gguf_set_str(w, "gemma3.rope.scaling.type", "linear"));
        CHECK(gguf_set_f32(w, "gemma3.rope.scaling.factor", (float)c->rope[GEMMA3_FULL].factor));
    }
    if (c->final_logit_softcapping != 0.0)
        CHECK(gguf_set_f32(w, "gemma3.final_logit_softcapping", (float)c->final_logit_softcapping));

    /* tokenizer.* (the SentencePiece path of convert_hf_to_gguf.py) */
    CHECK(gguf_set_str(w, "tokenizer.ggml.model", "llama"));
    CHECK(gguf_set_str(w, "tokenizer.ggml.pre", "default"));
    CHECK(gguf_set_arr_str(w, "tokenizer.ggml.tokens", (size_t)ex.n_vocab, vocab_piece, &ex));
    CHECK(gguf_set_arr_f32(w, "tokenizer.ggml.scores", ex.scores, (size_t)ex.n_vocab));
    CHECK(gguf_set_arr_i32(w, "tokenizer.ggml.token_type", ex.types, (size_t)ex.n_vocab));
    int bos = c->bos_id >= 0 ? c->bos_id : tok_bos_id(tok);
    int eos = c->eos_id >= 0 ? c->eos_id : tok_eos_id(tok);
    int unk = tok_unk_id(tok), pad = c->pad_id >= 0 ? c->pad_id : tok_pad_id(tok);
    if (bos >= 0) CHECK(gguf_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)bos));
    if (eos >= 0) CHECK(gguf_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)eos));
    if (unk >= 0) CHECK(gguf_set_u32(w, "tokenizer.ggml.unknown_token_id", (uint32_t)unk));
    if (pad >= 0) CHECK(gguf_set_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)pad));
    CHECK(gguf_set_bool(w, "tokenizer.ggml.add_bos_token", 1));
    CHECK(gguf_set_bool(w, "tokenizer.ggml.add_eos_token", 0));
    CHECK(gguf_set_bool(w, "tokenizer.ggml.add_space_prefix", 0));
    CHECK(gguf_set_str(w, "tokenizer.chat_template", chat));

    /* tensors, in the model's stable order */
    wc.ex = &ex;
    wc.w = w;
    wc.ftype = o->ftype;
    wc.m = m;
    wc.tied = gemma3_head(m) == &m->embed_tokens;
    wc.err = err;
    gemma3_weights_foreach(m, visit_weight, &wc);
    if (wc.st != LT_OK) {
        st = wc.st;
        goto done;
    }
    if (wc.n_fallback)
        say(o->cb,
            "%d tensor(s) have rows that are not a multiple of their type's block and use "
            "llama-quantize's fallback type; e.g. %s",
            wc.n_fallback, wc.first_fallback);

    uint64_t bytes;
    if ((st = gguf_export_write(w, path, o, "export", &bytes, err)) != LT_OK) goto done;
    if (res) {
        res->bytes = bytes;
        res->n_tensors = ex.n_srcs;
        res->n_fallback = wc.n_fallback;
    }

done:
    for (int i = 0; i < ex.n_srcs; ++i)
        free(ex.srcs[i].lora_a);
    free(ex.srcs);
    if (ex.pieces)
        for (int i = 0; i < ex.n_vocab; ++i)
            free(ex.pieces[i]);
    free(ex.pieces);
    free(ex.scores);
    free(ex.types);
    free(ex.stage);
    free(chat);
    gguf_writer_free(w);
    return st;
}
