/* peft_adapter.c — the trainer's adapter files, in PEFT's format: adapter_config.json (the
 * LoRA options, target_modules) and adapter_model.safetensors (every lora_A / lora_B in fp32
 * under PEFT's "base_model.model." names), written as one atomic set; and their reading into
 * fresh adapters (PEFT's key spellings of text and multimodal Gemma 3 checkpoints accepted).
 *
 * The adapter is the trainer's own file format: %save adapter= writes it, %lora load= and a
 * resumed %train read it, and every LoRA checkpoint holds one (checkpoint.c), so it lives in
 * train/, below the exporters. Owns nothing after a call returns; must not change the model
 * except through the adapters it creates.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/backend/host_view.h"
#include "cuda/base/atomic_file.h"
#include "cuda/base/strbuf.h"
#include "cuda/formats/safetensors.h"
#include "cuda/formats/safetensors_write.h"
#include "cuda/train/train.h"

/* adapter_config.json as PEFT's LoraConfig.save_pretrained writes it (sorted keys, a 2-space
 * indent, a final newline); NULL when out of memory. */
static char *adapter_config_json(const lt_adapters *a) {
    json_t *c = json_object();
    json_t *targets;
    int projector = 0;
    for (int i = 0; i < a->n_slots; i++)
        projector |= a->slots[i].part == LORA_PROJECTOR;
    if (a->targets_regex) {
        targets = json_string(a->targets);
    } else if (a->model->cfg.multimodal) {
        /* a plain list would also match the vision tower's q/k/v in PEFT (its suffix match
         * sees every module of that name): a regex keeps each name to its part, the language
         * model's ".*language_model.*\.(q_proj|...)", the tower's "vision." names as
         * ".*vision_tower.*\.(fc1|...)", joined by "|" (PEFT fullmatches the regex) */
        char re[1400] = "", text[512] = "", tower[512] = "", buf[512];
        snprintf(buf, sizeof buf, "%s", a->targets);
        char *save = NULL;
        for (char *w = strtok_r(buf, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
            if (strcmp(w, "projector") == 0) continue; /* target_parameters, below */
            int tw = strncmp(w, "vision.", 7) == 0;
            char *dst = tw ? tower : text;
            size_t n = strlen(dst);
            snprintf(dst + n, 512 - n, "%s%s", n ? "|" : "", tw ? w + 7 : w);
        }
        if (text[0]) snprintf(re, sizeof re, ".*language_model.*\\.(%s)", text);
        if (tower[0]) {
            size_t n = strlen(re);
            snprintf(re + n, sizeof re - n, "%s.*vision_tower.*\\.(%s)", n ? "|" : "", tower);
        }
        /* the projector alone: no module, as PEFT's LoraConfig asks (target_modules=[]) */
        targets = re[0] ? json_string(re) : json_array();
    } else {
        targets = json_array();
        char buf[512];
        snprintf(buf, sizeof buf, "%s", a->targets);
        char *save = NULL;
        for (char *w = strtok_r(buf, ",", &save); w; w = strtok_r(NULL, ",", &save))
            json_array_append_new(targets, json_string(w));
    }
    /* the projector's matrix is an nn.Parameter, not a module: PEFT's target_parameters */
    json_object_set_new(c, "target_parameters",
                        projector
                            ? json_pack("[s]", "multi_modal_projector.mm_input_projection_weight")
                            : json_null());
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
    lt_strbuf b = {0}; /* PEFT ends the file with a newline */
    lt_strbuf_puts(&b, text);
    lt_strbuf_puts(&b, "\n");
    free(text);
    if (b.oom) {
        lt_strbuf_free(&b);
        return NULL;
    }
    return lt_strbuf_take(&b);
}

/* [rows, cols] -> [cols, rows], malloc'd (NULL when out of memory). */
static float *transposed(const float *x, int64_t rows, int64_t cols) {
    float *t = malloc(sizeof(float) * (size_t)(rows * cols));
    if (!t) return NULL;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++)
            t[j * rows + i] = x[i * cols + j];
    return t;
}

/* The adapter tensors as st_out entries with PEFT names; names are malloc'd in *names, the
 * projector's transposed copies in *owned (PEFT's lora_A = our B transposed, lora_B = A). */
static lt_status adapter_tensors(const lt_adapters *a, st_out **out, char ***names,
                                 lt_host_pool *hp, float **owned) {
    int n = a->n_slots * 2;
    st_out *t = calloc((size_t)n + 1, sizeof *t);
    char **nm = calloc((size_t)n + 1, sizeof *nm);
    owned[0] = owned[1] = NULL;
    if (!t || !nm) {
        free(t);
        free(nm);
        return LT_ERR_MEMORY;
    }
    for (int i = 0; i < a->n_slots; i++) {
        const lora_slot *s = &a->slots[i];
        char mod[256];
        lora_peft_module(a, s, mod, sizeof mod);
        int proj = s->part == LORA_PROJECTOR;
        for (int k = 0; k < 2; k++) {
            const lt_tensor *x = k == 0 ? &s->lora.a : &s->lora.b;
            if (proj) x = k == 0 ? &s->lora.b : &s->lora.a;
            size_t len = strlen(mod) + 24;
            char *name = malloc(len);
            if (!name) goto oom;
            snprintf(name, len, "%s.lora_%c.weight", mod, k == 0 ? 'A' : 'B');
            nm[2 * i + k] = name;
            const void *data = lt_host_view(a->ctx, x, hp);
            if (!data) goto oom;
            if (proj) {
                if (!(owned[k] = transposed(data, x->shape[0], x->shape[1]))) goto oom;
                t[2 * i + k] = (st_out){name, LT_F32, 2, {x->shape[1], x->shape[0]}, owned[k]};
            } else {
                t[2 * i + k] = (st_out){name, LT_F32, 2, {x->shape[0], x->shape[1]}, data};
            }
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
    free(owned[0]);
    free(owned[1]);
    owned[0] = owned[1] = NULL;
    return LT_ERR_MEMORY;
}

static void free_names(char **nm, int n) {
    if (!nm) return;
    for (int i = 0; i < n; i++)
        free(nm[i]);
    free(nm);
}

lt_status peft_adapter_write(lt_afile_set *s, const lt_adapters *a, const char *dir,
                             const char *what, char *err) {
    char *cfg = adapter_config_json(a);
    st_out *t = NULL;
    char **nm = NULL;
    lt_host_pool hp = {0};
    float *owned[2] = {NULL, NULL};
    lt_status rc = LT_OK;
    if (!cfg || adapter_tensors(a, &t, &nm, &hp, owned) != LT_OK)
        rc = lt_fail(err, LT_ERR_MEMORY, "%s: out of memory", what);
    char p[4200];
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
        rc = st_write_member(s, p, t, a->n_slots * 2, ST_METADATA_PT, err);
    }
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/adapter_config.json", dir);
        rc = lt_afile_set_text(s, p, cfg, err);
    }
    free(cfg);
    free(t);
    free_names(nm, a->n_slots * 2);
    free(owned[0]);
    free(owned[1]);
    lt_host_pool_free(&hp);
    return rc;
}

lt_status peft_save_adapter(const lt_adapters *a, const char *dir, char *err) {
    if (!a)
        return lt_fail(err, LT_ERR_STATE, "%%save adapter=: no adapters attached (%%lora first)");
    if (a->full)
        return lt_fail(err, LT_ERR_STATE,
                       "%%save adapter=: full fine-tuning has no adapter; use %%save merged=DIR");
    lt_status rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    char what[4200];
    snprintf(what, sizeof what, "%%save adapter=%s", dir);
    lt_afile_set fs = {0};
    rc = peft_adapter_write(&fs, a, dir, what, err);
    if (rc == LT_OK) rc = lt_afile_set_commit(&fs, err);
    if (rc != LT_OK) lt_afile_set_abort(&fs);
    return rc;
}

/* Finds the tensor of a slot under any PEFT key spelling (for the projector: PEFT's lora_A
 * when ab is 'A'; the caller transposes). */
static const st_tensor *find_lora(const st_set *st, const lora_slot *s, char ab) {
    static const char *const PRE[] = {"base_model.model.model.",
                                      "base_model.model.model.language_model.",
                                      "base_model.model.language_model.model."};
    /* the tower: transformers 5's tree, then 4.52-4.5x's and the older one (vision_model.) */
    static const char *const TPRE[] = {
        "base_model.model.model.vision_tower.", "base_model.model.model.vision_tower.vision_model.",
        "base_model.model.vision_tower.vision_model.", "base_model.model.vision_tower."};
    static const char *const PPRE[] = {"base_model.model.model.", "base_model.model."};
    const char *const *pre = PRE;
    int np = 3;
    const char *rest = s->module + strlen("model.");
    if (s->part == LORA_TOWER) {
        pre = TPRE, np = 4;
        rest = s->module + strlen("model.vision_tower."); /* "encoder.layers.N..." */
    } else if (s->part == LORA_PROJECTOR) {
        pre = PPRE, np = 2;
    }
    char key[512];
    for (int i = 0; i < np; i++) {
        snprintf(key, sizeof key, "%s%s.lora_%c.weight", pre[i], rest, ab);
        const st_tensor *t = st_find(st, key);
        if (t) return t;
        snprintf(key, sizeof key, "%s%s.lora_%c.default.weight", pre[i], rest, ab);
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
    } else if (r && (json_integer_value(r) < 1 || json_integer_value(r) > 65536)) {
        rc = lt_fail(err, LT_ERR_FORMAT,
                     "%s: key 'r' = %lld is out of range (a rank from 1 to 65536)", path,
                     (long long)json_integer_value(r));
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
        o.targets_list = json_is_array(tm);
        /* target_parameters: the projector's matrix is the one lathe adapts */
        json_t *tp = json_object_get(c, "target_parameters"), *v;
        size_t i;
        json_array_foreach(tp, i, v) {
            const char *n = json_is_string(v) ? json_string_value(v) : "";
            size_t ln = strlen(n), lw = strlen("multi_modal_projector.mm_input_projection_weight");
            if (ln >= lw &&
                strcmp(n + ln - lw, "multi_modal_projector.mm_input_projection_weight") == 0 &&
                (ln == lw || n[ln - lw - 1] == '.'))
                o.projector = 1;
            else if (rc == LT_OK)
                rc = lt_fail(err, LT_ERR_FORMAT,
                             "%s: target_parameters names '%.200s'; lathe adapts only "
                             "multi_modal_projector.mm_input_projection_weight",
                             path, n);
        }
    }
    json_decref(c);
    if (rc != LT_OK) return rc;
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_set st;
    char st_err[LT_ERRLEN] = "";
    lt_status st_rc = st_open(&st, path, st_err); /* its failure is told after the config's */
    /* a PEFT list of names matches the tower's linears of those names too (PEFT's suffix
     * rule): when the file holds tower tensors, the list is read that way */
    for (int i = 0; st_rc == LT_OK && i < st.n_tensors && o.targets_list; i++)
        if (strstr(st.tensors[i].name, "vision_tower.") && strstr(st.tensors[i].name, ".lora_"))
            o.tower_suffix = 1;
    lt_adapters *a = NULL;
    rc = lora_attach(&a, m, ctx, &o, err);
    if (rc != LT_OK) {
        if (st_rc == LT_OK) st_close(&st);
        return lt_fail_prefix(err, rc, "%%lora load=%s", dir);
    }
    if (st_rc != LT_OK) {
        lora_free(a);
        return lt_fail(err, st_rc, "%s", st_err);
    }
    int used = 0;
    for (int i = 0; i < a->n_slots && rc == LT_OK; i++) {
        lora_slot *s = &a->slots[i];
        for (int k = 0; k < 2 && rc == LT_OK; k++) {
            const st_tensor *t = find_lora(&st, s, k == 0 ? 'A' : 'B');
            int proj = s->part == LORA_PROJECTOR; /* PEFT's A is our B transposed, B our A */
            lt_tensor *dst = (k == 0) != proj ? &s->lora.a : &s->lora.b;
            int64_t r0 = dst->shape[proj ? 1 : 0], r1 = dst->shape[proj ? 0 : 1];
            if (!t) {
                rc = lt_fail(err, LT_ERR_FORMAT,
                             "%s: no lora_%c tensor for %s (the config targets it)", path,
                             k ? 'B' : 'A', s->module);
            } else if (!t->dtype_ok || !lt_dtype_is_float(t->dtype) || t->ndim != 2 ||
                       t->shape[0] != r0 || t->shape[1] != r1) {
                char sh[64];
                rc = lt_fail(err, LT_ERR_FORMAT,
                             "%s: %s is %s %s; expected F32/F16/BF16 [%lld, %lld]", path, t->name,
                             t->dtype_name, st_shape_str(t, sh, sizeof sh), (long long)r0,
                             (long long)r1);
            } else {
                int64_t n = lt_tensor_numel(dst);
                float *host = malloc(sizeof(float) * (size_t)n);
                if (!host) {
                    rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
                } else {
                    lt_to_f32(host, t->data, t->dtype, n);
                    float *tr = proj ? transposed(host, r0, r1) : NULL;
                    if (tr) {
                        free(host);
                        host = tr;
                    }
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
    if (rc == LT_OK && lora_tensors > used)
        rc = lt_fail(err, LT_ERR_FORMAT,
                     "%s: holds %d LoRA tensors but only %d belong to the layers its "
                     "adapter_config.json targets (target_modules, target_parameters)",
                     path, lora_tensors, used);
    st_close(&st);
    if (rc != LT_OK) {
        lora_free(a);
        return rc;
    }
    *out = a;
    return LT_OK;
}
