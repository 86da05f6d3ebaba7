/* hfconfig.c — config.json -> gemma3_config, in every style Gemma 3 has shipped.
 *
 * Styles: flat `gemma3_text` (270M, 1B); nested `gemma3` whose `text_config` may be sparse
 * (4B: missing keys take the defaults of transformers' configuration_gemma3.py Gemma3TextConfig);
 * and the
 * transformers-5 spelling (`layer_types`, `rope_parameters` keyed by layer type). The shape
 * keys hidden_size, intermediate_size and num_hidden_layers are required in every style (the
 * class defaults describe no released size). Also the presets for `random:` models.
 * Owns only the parsing; touches no weights. Errors name config.json and the key.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/base/strbuf.h"
#include "cuda/formats/hfconfig.h"

void gemma3_config_defaults(gemma3_config *c) {
    memset(c, 0, sizeof *c);
    /* transformers Gemma3TextConfig defaults (the shape keys are required, left 0) */
    c->num_attention_heads = 8;
    c->num_key_value_heads = 4;
    c->head_dim = 256;
    c->vocab_size = 262208;
    c->max_position_embeddings = 131072;
    c->sliding_window = 4096;
    c->sliding_window_pattern = 6;
    c->query_pre_attn_scalar = 256;
    c->rms_norm_eps = 1e-6;
    c->final_logit_softcapping = 0;
    c->attn_logit_softcapping = 0;
    snprintf(c->hidden_activation, sizeof c->hidden_activation, "gelu_pytorch_tanh");
    c->tie_word_embeddings = 1;
    c->attention_bias = 0;
    snprintf(c->rope[GEMMA3_FULL].type, sizeof c->rope[0].type, "default");
    c->rope[GEMMA3_FULL].theta = 1e6;
    c->rope[GEMMA3_FULL].factor = 1.0;
    snprintf(c->rope[GEMMA3_SLIDING].type, sizeof c->rope[0].type, "default");
    c->rope[GEMMA3_SLIDING].theta = 1e4;
    c->rope[GEMMA3_SLIDING].factor = 1.0;
    c->bos_id = 2;
    c->eos_id = 1;
    c->pad_id = 0;
    c->eos_ids[0] = 1;
    c->n_eos_ids = 1;
    c->start_of_turn_id = -1;
    c->end_of_turn_id = -1;
    snprintf(c->architecture, sizeof c->architecture, "Gemma3ForCausalLM");
    snprintf(c->model_type, sizeof c->model_type, "gemma3_text");
}

/* ---- typed getters: each names the source and the full key in its error ------------------ */

typedef struct cfg_reader {
    const char *what;   /* "…/config.json" */
    const char *prefix; /* "" or "text_config." */
    char *err;
} cfg_reader;

/* 1 = present and set, 0 = absent (or null when null_ok), -1 = error (err filled). */
static int get_int(cfg_reader *r, json_t *obj, const char *key, int *out, int required) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (required) {
            lt_fail(r->err, LT_ERR_FORMAT, "%s: required key '%s%s' is missing (an integer)",
                    r->what, r->prefix, key);
            return -1;
        }
        return 0;
    }
    if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v))) {
        double d = json_real_value(v); /* 1024.0: a whole number written as a real */
        if (d < -1000000000.0 || d > 1000000000.0) {
            lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s' = %g is out of range", r->what,
                    r->prefix, key, d);
            return -1;
        }
        *out = (int)d;
        return 1;
    }
    if (!json_is_integer(v)) {
        lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s' is not an integer", r->what, r->prefix, key);
        return -1;
    }
    json_int_t x = json_integer_value(v);
    if (x < -1000000000 || x > 1000000000) {
        lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s' = %lld is out of range", r->what, r->prefix,
                key, (long long)x);
        return -1;
    }
    *out = (int)x;
    return 1;
}

static int get_num(cfg_reader *r, json_t *obj, const char *key, double *out, double if_null) {
    json_t *v = json_object_get(obj, key);
    if (!v) return 0;
    if (json_is_null(v)) {
        *out = if_null;
        return 1;
    }
    if (!json_is_number(v)) {
        lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s' is not a number", r->what, r->prefix, key);
        return -1;
    }
    *out = json_number_value(v);
    return 1;
}

static int get_str(cfg_reader *r, json_t *obj, const char *key, char *out, size_t cap) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) {
        lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s' is not a string", r->what, r->prefix, key);
        return -1;
    }
    snprintf(out, cap, "%s", json_string_value(v));
    return 1;
}

static int get_bool(cfg_reader *r, json_t *obj, const char *key, int *out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) {
        lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s' is not true/false", r->what, r->prefix, key);
        return -1;
    }
    *out = json_is_true(v);
    return 1;
}

/* eos_token_id: an integer or a list of integers. */
static int get_ids(cfg_reader *r, json_t *obj, const char *key, int *ids, int *n) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return 0;
    if (json_is_integer(v)) {
        ids[0] = (int)json_integer_value(v);
        *n = 1;
        return 1;
    }
    if (json_is_array(v) && json_array_size(v) >= 1 && json_array_size(v) <= 4) {
        for (size_t i = 0; i < json_array_size(v); i++) {
            json_t *e = json_array_get(v, i);
            if (!json_is_integer(e)) goto bad;
            ids[i] = (int)json_integer_value(e);
        }
        *n = (int)json_array_size(v);
        return 1;
    }
bad:
    lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s' is not an integer or a list of 1-4 integers",
            r->what, r->prefix, key);
    return -1;
}

/* One RoPE description: {"rope_type"|"type": "default"|"linear", "factor": f, "rope_theta": t}. */
static int get_rope(cfg_reader *r, json_t *v, const char *key, gemma3_rope *out,
                    int theta_required) {
    if (!json_is_object(v)) {
        lt_fail(r->err, LT_ERR_FORMAT,
                "%s: key '%s%s' is not an object like {\"rope_type\": \"linear\", \"factor\": 8.0}",
                r->what, r->prefix, key);
        return -1;
    }
    char type[32] = "default";
    json_t *t = json_object_get(v, "rope_type");
    if (!t) t = json_object_get(v, "type");
    if (t && !json_is_string(t)) {
        lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s.rope_type' is not a string", r->what,
                r->prefix, key);
        return -1;
    }
    if (t) snprintf(type, sizeof type, "%s", json_string_value(t));
    if (strcmp(type, "default") && strcmp(type, "linear")) {
        lt_fail(r->err, LT_ERR_FORMAT,
                "%s: key '%s%s.rope_type' = '%s' is not supported (accepted: default, linear)",
                r->what, r->prefix, key, type);
        return -1;
    }
    snprintf(out->type, sizeof out->type, "%s", type);
    out->factor = 1.0;
    if (!strcmp(type, "linear")) {
        json_t *f = json_object_get(v, "factor");
        if (!json_is_number(f) || json_number_value(f) <= 0) {
            lt_fail(r->err, LT_ERR_FORMAT,
                    "%s: key '%s%s.factor' must be a positive number for linear RoPE scaling",
                    r->what, r->prefix, key);
            return -1;
        }
        out->factor = json_number_value(f);
    }
    json_t *th = json_object_get(v, "rope_theta");
    if (th) {
        if (!json_is_number(th) || json_number_value(th) <= 0) {
            lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s.rope_theta' is not a positive number",
                    r->what, r->prefix, key);
            return -1;
        }
        out->theta = json_number_value(th);
    } else if (theta_required) {
        lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s.rope_theta' is missing", r->what, r->prefix,
                key);
        return -1;
    }
    return 1;
}

/* Fills c from one text-config object (flat root or text_config). */
static lt_status read_text(cfg_reader *r, json_t *o, gemma3_config *c) {
#define CHECK(x)                                                                                   \
    do {                                                                                           \
        if ((x) < 0) return LT_ERR_FORMAT;                                                         \
    } while (0)
    CHECK(get_int(r, o, "hidden_size", &c->hidden_size, 1));
    CHECK(get_int(r, o, "intermediate_size", &c->intermediate_size, 1));
    CHECK(get_int(r, o, "num_hidden_layers", &c->num_hidden_layers, 1));
    CHECK(get_int(r, o, "num_attention_heads", &c->num_attention_heads, 0));
    CHECK(get_int(r, o, "num_key_value_heads", &c->num_key_value_heads, 0));
    CHECK(get_int(r, o, "head_dim", &c->head_dim, 0));
    CHECK(get_int(r, o, "vocab_size", &c->vocab_size, 0));
    CHECK(get_int(r, o, "max_position_embeddings", &c->max_position_embeddings, 0));
    CHECK(get_int(r, o, "sliding_window", &c->sliding_window, 0));
    CHECK(get_int(r, o, "sliding_window_pattern", &c->sliding_window_pattern, 0));
    CHECK(get_num(r, o, "query_pre_attn_scalar", &c->query_pre_attn_scalar, 256));
    CHECK(get_num(r, o, "rms_norm_eps", &c->rms_norm_eps, 1e-6));
    CHECK(get_num(r, o, "final_logit_softcapping", &c->final_logit_softcapping, 0));
    CHECK(get_num(r, o, "attn_logit_softcapping", &c->attn_logit_softcapping, 0));
    CHECK(get_str(r, o, "hidden_activation", c->hidden_activation, sizeof c->hidden_activation));
    CHECK(get_bool(r, o, "tie_word_embeddings", &c->tie_word_embeddings));
    CHECK(get_bool(r, o, "attention_bias", &c->attention_bias));
    CHECK(get_int(r, o, "bos_token_id", &c->bos_id, 0));
    CHECK(get_int(r, o, "pad_token_id", &c->pad_id, 0));
    int ids[4], n = 0;
    int got = get_ids(r, o, "eos_token_id", ids, &n);
    CHECK(got);
    if (got) {
        memcpy(c->eos_ids, ids, sizeof ids);
        c->n_eos_ids = n;
        c->eos_id = ids[0];
    }

    /* RoPE, legacy spelling */
    CHECK(get_num(r, o, "rope_theta", &c->rope[GEMMA3_FULL].theta, 1e6));
    CHECK(get_num(r, o, "rope_local_base_freq", &c->rope[GEMMA3_SLIDING].theta, 1e4));
    json_t *rs = json_object_get(o, "rope_scaling");
    if (rs && !json_is_null(rs)) CHECK(get_rope(r, rs, "rope_scaling", &c->rope[GEMMA3_FULL], 0));
    /* RoPE, transformers-5 spelling: keyed by layer type, or one dict for full attention */
    json_t *rp = json_object_get(o, "rope_parameters");
    if (rp && !json_is_null(rp)) {
        if (!json_is_object(rp)) {
            return lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%srope_parameters' is not an object",
                           r->what, r->prefix);
        }
        json_t *full = json_object_get(rp, "full_attention"),
               *slide = json_object_get(rp, "sliding_attention");
        if (full || slide) {
            if (full)
                CHECK(
                    get_rope(r, full, "rope_parameters.full_attention", &c->rope[GEMMA3_FULL], 0));
            if (slide)
                CHECK(get_rope(r, slide, "rope_parameters.sliding_attention",
                               &c->rope[GEMMA3_SLIDING], 0));
        } else {
            CHECK(get_rope(r, rp, "rope_parameters", &c->rope[GEMMA3_FULL], 0));
        }
    }

    /* sanity of what we read */
    struct {
        const char *k;
        int v;
    } pos[] = {
        {"hidden_size", c->hidden_size},
        {"intermediate_size", c->intermediate_size},
        {"num_hidden_layers", c->num_hidden_layers},
        {"num_attention_heads", c->num_attention_heads},
        {"num_key_value_heads", c->num_key_value_heads},
        {"head_dim", c->head_dim},
        {"vocab_size", c->vocab_size},
        {"max_position_embeddings", c->max_position_embeddings},
        {"sliding_window", c->sliding_window},
        {"sliding_window_pattern", c->sliding_window_pattern},
    };
    for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++)
        if (pos[i].v <= 0) {
            return lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s' = %d must be a positive integer",
                           r->what, r->prefix, pos[i].k, pos[i].v);
        }
    if (c->num_hidden_layers > GEMMA3_MAX_LAYERS) {
        return lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%snum_hidden_layers' = %d exceeds %d",
                       r->what, r->prefix, c->num_hidden_layers, GEMMA3_MAX_LAYERS);
    }
    if (c->num_attention_heads % c->num_key_value_heads) {
        return lt_fail(
            r->err, LT_ERR_FORMAT,
            "%s: key '%snum_attention_heads' = %d is not a multiple of num_key_value_heads = %d",
            r->what, r->prefix, c->num_attention_heads, c->num_key_value_heads);
    }
    if (c->head_dim % 2) {
        return lt_fail(r->err, LT_ERR_FORMAT,
                       "%s: key '%shead_dim' = %d must be even (RoPE rotates pairs)", r->what,
                       r->prefix, c->head_dim);
    }
    if (c->query_pre_attn_scalar <= 0 || c->rms_norm_eps <= 0) {
        return lt_fail(r->err, LT_ERR_FORMAT, "%s: key '%s%s' must be positive", r->what, r->prefix,
                       c->query_pre_attn_scalar <= 0 ? "query_pre_attn_scalar" : "rms_norm_eps");
    }
    if (strcmp(c->hidden_activation, "gelu_pytorch_tanh") &&
        strcmp(c->hidden_activation, "gelu_tanh")) {
        return lt_fail(
            r->err, LT_ERR_FORMAT,
            "%s: key '%shidden_activation' = '%s' is not supported (accepted: gelu_pytorch_tanh)",
            r->what, r->prefix, c->hidden_activation);
    }
    if (c->attention_bias) {
        return lt_fail(r->err, LT_ERR_FORMAT,
                       "%s: key '%sattention_bias' = true is not supported (Gemma 3 has no biases)",
                       r->what, r->prefix);
    }
    if (c->attn_logit_softcapping != 0) {
        return lt_fail(r->err, LT_ERR_FORMAT,
                       "%s: key '%sattn_logit_softcapping' is not supported (Gemma 3 uses null)",
                       r->what, r->prefix);
    }

    /* layer types: explicit list wins; else the legacy pattern */
    json_t *lt = json_object_get(o, "layer_types");
    if (lt && !json_is_null(lt)) {
        if (!json_is_array(lt) || (int)json_array_size(lt) != c->num_hidden_layers) {
            return lt_fail(r->err, LT_ERR_FORMAT,
                           "%s: key '%slayer_types' must be a list of %d strings (one per layer)",
                           r->what, r->prefix, c->num_hidden_layers);
        }
        for (int l = 0; l < c->num_hidden_layers; l++) {
            json_t *e = json_array_get(lt, (size_t)l);
            const char *s = json_is_string(e) ? json_string_value(e) : "";
            if (!strcmp(s, "full_attention"))
                c->layer_types[l] = GEMMA3_FULL;
            else if (!strcmp(s, "sliding_attention"))
                c->layer_types[l] = GEMMA3_SLIDING;
            else {
                return lt_fail(r->err, LT_ERR_FORMAT,
                               "%s: key '%slayer_types[%d]' must be \"full_attention\" or "
                               "\"sliding_attention\"",
                               r->what, r->prefix, l);
            }
        }
    } else {
        for (int l = 0; l < c->num_hidden_layers; l++)
            c->layer_types[l] =
                ((l + 1) % c->sliding_window_pattern == 0) ? GEMMA3_FULL : GEMMA3_SLIDING;
    }
    return LT_OK;
#undef CHECK
}

/* The vision side of a nested gemma3 config: vision_config (SiglipVisionConfig's class defaults
 * for what it leaves out) and Gemma3Config's top-level image fields (their defaults too). */
static lt_status read_vision(cfg_reader *r, json_t *root, gemma3_vision_config *v) {
    memset(v, 0, sizeof *v);
    json_t *vc = json_object_get(root, "vision_config");
    if (!vc || json_is_null(vc)) return LT_OK;
    if (!json_is_object(vc))
        return lt_fail(r->err, LT_ERR_FORMAT, "%s: key 'vision_config' is not an object", r->what);
    /* transformers' SiglipVisionConfig defaults */
    v->hidden_size = 768;
    v->intermediate_size = 3072;
    v->num_hidden_layers = 12;
    v->num_attention_heads = 12;
    v->num_channels = 3;
    v->image_size = 224;
    v->patch_size = 16;
    v->layer_norm_eps = 1e-6;
    snprintf(v->hidden_act, sizeof v->hidden_act, "gelu_pytorch_tanh");
    /* transformers' Gemma3Config defaults */
    v->mm_tokens_per_image = 256;
    v->image_token_id = 262144;
    v->boi_token_id = 255999;
    v->eoi_token_id = 256000;
    cfg_reader vr = {.what = r->what, .prefix = "vision_config.", .err = r->err};
    char vmt[48] = "";
    if (get_str(&vr, vc, "model_type", vmt, sizeof vmt) < 0) return LT_ERR_FORMAT;
    if (vmt[0] && strcmp(vmt, "siglip_vision_model"))
        return lt_fail(r->err, LT_ERR_FORMAT,
                       "%s: key 'vision_config.model_type' = '%s' is not siglip_vision_model",
                       r->what, vmt);
    if (get_int(&vr, vc, "hidden_size", &v->hidden_size, 0) < 0 ||
        get_int(&vr, vc, "intermediate_size", &v->intermediate_size, 0) < 0 ||
        get_int(&vr, vc, "num_hidden_layers", &v->num_hidden_layers, 0) < 0 ||
        get_int(&vr, vc, "num_attention_heads", &v->num_attention_heads, 0) < 0 ||
        get_int(&vr, vc, "num_channels", &v->num_channels, 0) < 0 ||
        get_int(&vr, vc, "image_size", &v->image_size, 0) < 0 ||
        get_int(&vr, vc, "patch_size", &v->patch_size, 0) < 0 ||
        get_num(&vr, vc, "layer_norm_eps", &v->layer_norm_eps, 1e-6) < 0 ||
        get_str(&vr, vc, "hidden_act", v->hidden_act, sizeof v->hidden_act) < 0)
        return LT_ERR_FORMAT;
    int head = 0;
    if (get_bool(&vr, vc, "vision_use_head", &head) < 0) return LT_ERR_FORMAT;
    /* the top level: either spelling (Gemma3Config's attribute_map maps *_id to *_index) */
    static const char *const keys[4][2] = {{"mm_tokens_per_image", NULL},
                                           {"image_token_index", "image_token_id"},
                                           {"boi_token_index", "boi_token_id"},
                                           {"eoi_token_index", "eoi_token_id"}};
    int *dst[4] = {&v->mm_tokens_per_image, &v->image_token_id, &v->boi_token_id, &v->eoi_token_id};
    for (int i = 0; i < 4; i++) {
        int got = get_int(r, root, keys[i][0], dst[i], 0);
        if (got == 0 && keys[i][1]) got = get_int(r, root, keys[i][1], dst[i], 0);
        if (got < 0) return LT_ERR_FORMAT;
    }
    const char *bad = NULL;
    if (v->hidden_size <= 0 || v->intermediate_size <= 0 || v->num_hidden_layers <= 0 ||
        v->num_attention_heads <= 0 || v->image_size <= 0 || v->patch_size <= 0)
        bad = "its sizes must be positive";
    else if (v->num_channels != 3)
        bad = "num_channels must be 3 (RGB)";
    else if (v->hidden_size % v->num_attention_heads)
        bad = "hidden_size must be a multiple of num_attention_heads";
    else if (v->image_size % v->patch_size)
        bad = "image_size must be a multiple of patch_size";
    else if (strcmp(v->hidden_act, "gelu_pytorch_tanh"))
        bad = "hidden_act must be gelu_pytorch_tanh (the only activation Gemma 3's tower uses)";
    if (bad) return lt_fail(r->err, LT_ERR_FORMAT, "%s: vision_config: %s", r->what, bad);
    int grid = v->image_size / v->patch_size, side = 0;
    while ((side + 1) * (side + 1) <= v->mm_tokens_per_image)
        side++;
    if (v->mm_tokens_per_image <= 0 || side * side != v->mm_tokens_per_image || grid % side)
        return lt_fail(r->err, LT_ERR_FORMAT,
                       "%s: mm_tokens_per_image %d must be a square whose side divides the %d x %d "
                       "patch grid (image_size %d / patch_size %d)",
                       r->what, v->mm_tokens_per_image, grid, grid, v->image_size, v->patch_size);
    (void)head; /* Gemma 3 never uses SigLIP's pooling head; its weights, if any, are ignored */
    v->present = 1;
    return LT_OK;
}

lt_status gemma3_config_parse(gemma3_config *c, const char *json, const char *what, char *err) {
    gemma3_config_defaults(c);
    json_error_t je;
    json_t *root = json_loads(json, 0, &je);
    if (!root) {
        return lt_fail(err, LT_ERR_FORMAT, "%s: garbled JSON (line %d, column %d: %s)", what,
                       je.line, je.column, je.text);
    }
    lt_status rc = LT_ERR_FORMAT;
    cfg_reader r = {.what = what, .prefix = "", .err = err};
    if (!json_is_object(root)) {
        lt_fail(err, LT_ERR_FORMAT, "%s: not a JSON object", what);
        goto done;
    }
    char mt[32] = "";
    if (get_str(&r, root, "model_type", mt, sizeof mt) < 0) goto done;
    if (!mt[0]) {
        lt_fail(err, LT_ERR_FORMAT,
                "%s: required key 'model_type' is missing (expected \"gemma3_text\" or \"gemma3\")",
                what);
        goto done;
    }
    json_t *arch = json_object_get(root, "architectures");
    if (json_is_array(arch) && json_is_string(json_array_get(arch, 0)))
        snprintf(c->architecture, sizeof c->architecture, "%s",
                 json_string_value(json_array_get(arch, 0)));
    snprintf(c->model_type, sizeof c->model_type, "%s", mt);
    if (!strcmp(mt, "gemma3")) {
        json_t *tc = json_object_get(root, "text_config");
        if (!json_is_object(tc)) {
            lt_fail(
                err, LT_ERR_FORMAT,
                "%s: key 'text_config' is missing or not an object (model_type gemma3 needs it)",
                what);
            goto done;
        }
        c->multimodal = 1;
        r.prefix = "text_config.";
        char tmt[32] = "";
        if (get_str(&r, tc, "model_type", tmt, sizeof tmt) < 0) goto done;
        if (tmt[0] && strcmp(tmt, "gemma3_text")) {
            lt_fail(err, LT_ERR_FORMAT,
                    "%s: key 'text_config.model_type' = '%s' is not gemma3_text", what, tmt);
            goto done;
        }
        if (read_text(&r, tc, c) != LT_OK) goto done;
        c->final_logit_softcapping = 0; /* Gemma3ForConditionalGeneration never applies it */
        /* top-level ids (eos [1, 106]) are what generation uses */
        r.prefix = "";
        /* a vision_config lathe cannot use leaves the text model loadable: the reason is kept
         * and the image tower is not read */
        if (read_vision(&r, root, &c->vision) != LT_OK) {
            memset(&c->vision, 0, sizeof c->vision);
            snprintf(c->vision.error, sizeof c->vision.error, "%s", err);
        }
        int ids[4], n = 0, got = get_ids(&r, root, "eos_token_id", ids, &n);
        if (got < 0) goto done;
        if (got) {
            memcpy(c->eos_ids, ids, sizeof ids);
            c->n_eos_ids = n;
            c->eos_id = ids[0];
        }
        if (get_int(&r, root, "bos_token_id", &c->bos_id, 0) < 0) goto done;
        if (get_int(&r, root, "pad_token_id", &c->pad_id, 0) < 0) goto done;
        int tie = c->tie_word_embeddings;
        if (get_bool(&r, root, "tie_word_embeddings", &tie) < 0) goto done;
        c->tie_word_embeddings = tie;
    } else if (!strcmp(mt, "gemma3_text")) {
        if (read_text(&r, root, c) != LT_OK) goto done;
        if (c->final_logit_softcapping != 0) {
            lt_fail(err, LT_ERR_FORMAT,
                    "%s: key 'final_logit_softcapping' is not supported (Gemma 3 uses null)", what);
            goto done;
        }
    } else {
        lt_fail(err, LT_ERR_FORMAT,
                "%s: model_type '%s' is not Gemma 3 (accepted: gemma3_text, gemma3)", what, mt);
        goto done;
    }
    rc = LT_OK;
done:
    json_decref(root);
    return rc;
}

lt_status gemma3_config_load(gemma3_config *c, const char *path, char *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        return lt_fail(err, LT_ERR_IO, "%s: cannot open (a model directory needs config.json)",
                       path);
    }
    lt_strbuf b = {0};
    int r = lt_strbuf_read(&b, f, 64u << 20);
    fclose(f);
    lt_status rc;
    if (b.oom)
        rc = lt_fail(err, LT_ERR_MEMORY, "%s: out of memory", path);
    else if (r > 0)
        rc = lt_fail(err, LT_ERR_FORMAT, "%s: larger than 64 MB, not a config.json", path);
    else if (r < 0)
        rc = lt_fail(err, LT_ERR_IO, "%s: read error", path);
    else
        rc = gemma3_config_parse(c, lt_strbuf_str(&b), path, err);
    lt_strbuf_free(&b);
    return rc;
}

lt_status gemma3_config_preset(gemma3_config *c, const char *size, char *err) {
    static const struct {
        const char *size;
        int H, I, L, nh, nkv, hd, V, maxpos, window;
        double qpas, factor;
    } presets[] = {
        {"270m", 640, 2048, 18, 4, 1, 256, 262144, 32768, 512, 256, 1.0},
        {"1b", 1152, 6912, 26, 4, 1, 256, 262144, 32768, 512, 256, 1.0},
        {"4b", 2560, 10240, 34, 8, 4, 256, 262208, 131072, 1024, 256, 8.0},
        {"12b", 3840, 15360, 48, 16, 8, 256, 262208, 131072, 1024, 256, 8.0},
        {"27b", 5376, 21504, 62, 32, 16, 128, 262208, 131072, 1024, 168, 8.0},
    };
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        if (strcmp(size, presets[i].size)) continue;
        gemma3_config_defaults(c);
        c->hidden_size = presets[i].H;
        c->intermediate_size = presets[i].I;
        c->num_hidden_layers = presets[i].L;
        c->num_attention_heads = presets[i].nh;
        c->num_key_value_heads = presets[i].nkv;
        c->head_dim = presets[i].hd;
        c->vocab_size = presets[i].V;
        c->max_position_embeddings = presets[i].maxpos;
        c->sliding_window = presets[i].window;
        c->query_pre_attn_scalar = presets[i].qpas;
        if (presets[i].factor != 1.0) {
            snprintf(c->rope[GEMMA3_FULL].type, sizeof c->rope[0].type, "linear");
            c->rope[GEMMA3_FULL].factor = presets[i].factor;
        }
        if (presets[i].V == 262208) {
            c->multimodal = 1;
            snprintf(c->architecture, sizeof c->architecture, "Gemma3ForConditionalGeneration");
        }
        c->eos_ids[0] = 1;
        c->eos_ids[1] = 106;
        c->n_eos_ids = 2;
        for (int l = 0; l < c->num_hidden_layers; l++)
            c->layer_types[l] = ((l + 1) % 6 == 0) ? GEMMA3_FULL : GEMMA3_SLIDING;
        return LT_OK;
    }
    return lt_fail(err, LT_ERR_ARG,
                   "random:gemma-3-%s: unknown size (accepted: 270m, 1b, 4b, 12b, 27b)", size);
}
