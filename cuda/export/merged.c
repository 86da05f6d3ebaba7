/* merged.c — the merged checkpoint %save merged= writes: a folder transformers loads as a plain
 * model (config.json + model.safetensors + tokenizer.model), every LoRA adapter merged into its
 * weight (W' = W + s·B·A in fp32, then cast to the chosen dtype).
 *
 * The base W of a quantized linear is its original 16-bit weight when the model was quantized
 * at load and still maps that checkpoint (the adapter lands on the weights the user started
 * from, as merging a QLoRA adapter into the 16-bit model does), and its dequantized NF4/int8
 * values otherwise (a pre-quantized checkpoint, random weights); a message says which. config.json
 * is the loaded one when there was one (a text model's folder), else a flat Gemma3TextConfig
 * written from the model's config. The three files are one atomic set: written, then renamed
 * together. With adapters on the image tower, the whole Gemma3ForConditionalGeneration is written
 * instead (the loaded config.json; text under model.language_model., the tower and projector,
 * their adapters merged, under transformers 5's names). Also the dtype, torch-name and config
 * helpers quantized.c shares. Owns nothing after a
 * call returns; reads the model and the adapters and changes neither. A model on a device is read
 * back weight by weight (with its quantization state and adapter) and merged on the host, its
 * image tower too.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda/backend/host_view.h"
#include "cuda/base/atomic_file.h"
#include "cuda/export/merged.h"
#include "cuda/formats/bnb.h"
#include "cuda/formats/safetensors_write.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/model/siglip.h"

const char *merged_torch_dtype(lt_dtype d) {
    return d == LT_BF16 ? "bfloat16" : d == LT_F16 ? "float16" : "float32";
}

lt_status merged_parse_dtype(const gemma3_model *m, const char *dtype, const char *what,
                             lt_dtype *out, char *err) {
    lt_dtype dt = m->dtype;
    if (dtype && strcmp(dtype, "auto") != 0) {
        if (!strcmp(dtype, "fp32"))
            dt = LT_F32;
        else if (!strcmp(dtype, "fp16"))
            dt = LT_F16;
        else if (!strcmp(dtype, "bf16"))
            dt = LT_BF16;
        else
            return lt_fail(err, LT_ERR_ARG, "%s dtype=%s; accepted: auto|fp32|fp16|bf16", what,
                           dtype);
    }
    if (dt != LT_F32 && dt != LT_F16 && dt != LT_BF16) dt = LT_BF16;
    *out = dt;
    return LT_OK;
}

/* A flat Gemma3TextConfig (transformers reads it as Gemma3ForCausalLM). */
char *merged_text_config(const gemma3_model *m, lt_dtype dt) {
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
    json_object_set_new(j, "torch_dtype", json_string(merged_torch_dtype(dt)));
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(j);
    return text;
}

typedef struct merge_walk {
    gemma3_model *m;
    lt_ctx *dev; /* NULL: a host model */
    const lt_adapters *a;
    lt_dtype dt;
    st_out *t;
    char **names;
    void **bufs;
    int n;
    int n_original, n_dequantized; /* quantized linears saved from each base */
    char *err;
    lt_status rc;
} merge_walk;

/* The original 16-bit weight of a linear quantized at load, as fp32 into f32 (out*in), from
 * the checkpoint the model still maps. 0 when there is none (pre-quantized, random, device). */
static int original_weight(const gemma3_model *m, const char *name, const lt_tensor *t,
                           float *f32) {
    const st_tensor *src = gemma3_source_tensor(m, name, NULL, NULL, 0);
    if (!src || !src->dtype_ok || !lt_dtype_is_float(src->dtype) || src->ndim != 2 ||
        src->shape[0] != t->shape[0] || src->shape[1] != t->shape[1])
        return 0;
    return st_convert(src, f32, LT_F32) == LT_OK;
}

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
    const lt_weight *owner = gemma3_weight_owner(w->m, t);
    const void *data = t->data;
    lt_host_pool hp = {0};
    lt_weight host_w;
    lora_slot host_s;
    if (w->dev) { /* the weight, its state and its adapter, read back into host memory */
        int bad = 0;
        if (owner) {
            bad = lt_host_weight(w->dev, owner, &host_w, &hp);
            owner = &host_w;
            data = host_w.w.data;
        } else {
            bad = !(data = lt_host_view(w->dev, t, &hp)) && t->data;
        }
        if (!bad && s) {
            host_s = *s;
            host_s.w = &host_w;
            host_s.lora.a.data = (void *)lt_host_view(w->dev, &s->lora.a, &hp);
            host_s.lora.b.data = (void *)lt_host_view(w->dev, &s->lora.b, &hp);
            bad = !owner || !host_s.lora.a.data || !host_s.lora.b.data;
            s = &host_s;
        }
        if (bad) {
            lt_host_pool_free(&hp);
            w->rc = lt_fail(w->err, LT_ERR_DEVICE, "reading %s back from %s: %s", name,
                            w->dev->be->name, w->dev->err);
            return 1;
        }
    }
    float *f32 = NULL;
    int quantized = owner && owner->q.kind != LT_QUANT_NONE;
    if (quantized) { /* the base: the original 16-bit weight, else NF4/int8 dequantized */
        f32 = malloc(sizeof(float) * (size_t)n);
        if (!f32) goto oom;
        if (original_weight(w->m, name, t, f32)) {
            w->n_original++;
        } else {
            lt_weight_dequantize_rows(owner, 0, t->shape[0], f32);
            w->n_dequantized++;
        }
        if (s) lora_add_delta(s, f32); /* W' = W + s·B·A in fp32, then cast */
    } else if (s) {
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
        lt_convert(buf, w->dt, data, t->dtype, n);
    free(f32);
    lt_host_pool_free(&hp);
    w->bufs[w->n] = buf;
    w->names[w->n] = nm;
    st_out *o = &w->t[w->n++];
    *o = (st_out){nm, w->dt, t->ndim, {0}, buf};
    for (int d = 0; d < t->ndim; d++)
        o->shape[d] = t->shape[d];
    return 0;
oom:
    free(f32);
    lt_host_pool_free(&hp);
    w->rc = lt_fail(w->err, LT_ERR_MEMORY, "out of memory while merging %s", name);
    return 1;
}

/* ---- the image tower, for adapters on it ---------------------------------------------------- */

/* Tensors the tower and projector take in the checkpoint. */
static int tower_count(const siglip_tower *t) {
    return 3 + 16 * t->cfg.num_hidden_layers + 2 + 2;
}

/* Adds tensor `name` from fp32 values (shape[ndim]) in w->dt; takes f32 (freed). */
static void put_f32(merge_walk *w, const char *name, float *f32, int ndim, const int64_t *shape) {
    if (w->rc != LT_OK) {
        free(f32);
        return;
    }
    int64_t n = 1;
    for (int d = 0; d < ndim; d++)
        n *= shape[d];
    void *buf = f32 ? malloc((size_t)n * lt_dtype_size(w->dt)) : NULL;
    char *nm = strdup(name);
    if (!buf || !nm) {
        free(buf);
        free(nm);
        free(f32);
        w->rc = lt_fail(w->err, LT_ERR_MEMORY, "out of memory while merging %s", name);
        return;
    }
    lt_convert(buf, w->dt, f32, LT_F32, n);
    free(f32);
    w->bufs[w->n] = buf;
    w->names[w->n] = nm;
    st_out *o = &w->t[w->n++];
    *o = (st_out){nm, w->dt, ndim, {0}, buf};
    for (int d = 0; d < ndim; d++)
        o->shape[d] = shape[d];
}

/* Fails the walk for a tower tensor that could not be read back from the device. */
static void read_failed(merge_walk *w, const char *name) {
    if (w->rc == LT_OK)
        w->rc = lt_fail(w->err, LT_ERR_DEVICE, "reading %s back from %s: %s", name,
                        w->dev->be->name, w->dev->err);
}

/* A tower tensor [n] (a vector, or the position embeddings) as fp32, read back from the device
 * when the tower lives there (w->dev), under name with shape[ndim]. */
static void put_tensor(merge_walk *w, const char *name, const lt_tensor *v, int ndim,
                       const int64_t *shape) {
    int64_t n = lt_tensor_numel(v);
    lt_host_pool hp = {0};
    const void *data = lt_host_view(w->dev, v, &hp);
    float *f = data ? malloc(sizeof(float) * (size_t)n) : NULL;
    if (f) lt_convert(f, LT_F32, data, v->dtype, n);
    lt_host_pool_free(&hp);
    if (!data && v->data) {
        read_failed(w, name);
        return;
    }
    put_f32(w, name, f, ndim, shape);
}

/* A tower vector under prefix + suffix. */
static void put_vec(merge_walk *w, const char *pfx, const char *suffix, const lt_tensor *v) {
    char name[256];
    snprintf(name, sizeof name, "%s%s", pfx, suffix);
    int64_t n = lt_tensor_numel(v);
    put_tensor(w, name, v, 1, &n);
}

/* A tower matrix with its adapter merged (W' = W + s·B·A in fp32), as merge_visit does it: a
 * tower on the device is read back (its weight, the adapter's A and B) and merged on the host.
 * NULL when out of memory or when a read failed (then w->rc says so). */
static float *merged_mat(merge_walk *w, const char *name, const lt_weight *mw) {
    int64_t n = lt_tensor_numel(&mw->w);
    const lora_slot *s = slot_of(w->a, &mw->w);
    lt_host_pool hp = {0};
    lt_weight host_w;
    lora_slot host_s;
    int bad = lt_host_weight(w->dev, mw, &host_w, &hp) != 0;
    if (!bad && s && w->dev) {
        host_s = *s;
        host_s.w = &host_w;
        host_s.lora.a.data = (void *)lt_host_view(w->dev, &s->lora.a, &hp);
        host_s.lora.b.data = (void *)lt_host_view(w->dev, &s->lora.b, &hp);
        bad = !host_s.lora.a.data || !host_s.lora.b.data;
        s = &host_s;
    }
    float *f = bad ? NULL : malloc(sizeof(float) * (size_t)n);
    if (f && s)
        lora_merged_weight(w->a, s, f, w->err);
    else if (f)
        lt_weight_dequantize_rows(&host_w, 0, mw->w.shape[0], f);
    lt_host_pool_free(&hp);
    if (bad) read_failed(w, name);
    return f;
}

static void put_mat(merge_walk *w, const char *pfx, const char *suffix, const lt_weight *mw,
                    int ndim, const int64_t *shape) {
    char name[256];
    snprintf(name, sizeof name, "%s%s", pfx, suffix);
    put_f32(w, name, merged_mat(w, name, mw), ndim, shape);
}

/* The tower and the projector under transformers 5's names (model.vision_tower.embeddings...,
 * model.multi_modal_projector.*, the tree lathe and transformers both load), their adapters
 * merged; the text weights move under model.language_model. (lm_head stays). */
static void tower_put(merge_walk *w) {
    for (int i = 0; i < w->n;
         i++) { /* the text weights so far: model.X -> model.language_model.X */
        if (strncmp(w->names[i], "model.", 6) != 0) continue;
        size_t len = strlen(w->names[i]) + 16;
        char *nm = malloc(len);
        if (!nm) {
            w->rc = lt_fail(w->err, LT_ERR_MEMORY, "out of memory");
            return;
        }
        snprintf(nm, len, "model.language_model.%s", w->names[i] + 6);
        free(w->names[i]);
        w->names[i] = nm;
        w->t[i].name = nm;
    }
    const siglip_tower *t = w->m->vision;
    const gemma3_vision_config *c = &t->cfg;
    const char *pfx = "model.vision_tower.";
    int64_t D = c->hidden_size, p = c->patch_size, g = c->image_size / c->patch_size,
            H = t->text_hidden;
    int64_t conv[4] = {D, c->num_channels, p, p}, pos[2] = {g * g, D};
    put_mat(w, pfx, "embeddings.patch_embedding.weight", &t->patch, 4, conv);
    put_vec(w, pfx, "embeddings.patch_embedding.bias", &t->patch_b);
    {
        char name[256];
        snprintf(name, sizeof name, "%sembeddings.position_embedding.weight", pfx);
        put_tensor(w, name, &t->pos, 2, pos);
    }
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const siglip_layer *L = &t->layers[l];
        char lp[160];
        snprintf(lp, sizeof lp, "%sencoder.layers.%d.", pfx, l);
        for (int i = 0; i < SIGLIP_LAYER_TENSORS; i++) {
            const siglip_layer_tensor *e = &siglip_layer_tensors[i];
            const char *f = (const char *)L + e->offset;
            int64_t shape[2] = {siglip_dim(c, e->rows), siglip_dim(c, e->cols)};
            if (e->cols)
                put_mat(w, lp, e->name, (const lt_weight *)f, 2, shape);
            else
                put_vec(w, lp, e->name, (const lt_tensor *)f);
        }
    }
    put_vec(w, pfx, "post_layernorm.weight", &t->post_w);
    put_vec(w, pfx, "post_layernorm.bias", &t->post_b);
    const char *pp = "model.multi_modal_projector.";
    put_vec(w, pp, "mm_soft_emb_norm.weight", &t->mm_norm);
    /* held transposed [H, D] (siglip.h): stored input-major [D, H] again */
    const char *proj = "model.multi_modal_projector.mm_input_projection_weight";
    float *hd = merged_mat(w, proj, &t->mm_proj),
          *dh = hd ? malloc(sizeof(float) * (size_t)(D * H)) : NULL;
    for (int64_t i = 0; dh && i < H; i++)
        for (int64_t j = 0; j < D; j++)
            dh[j * H + i] = hd[i * D + j];
    free(hd);
    int64_t dhs[2] = {D, H};
    put_f32(w, proj, dh, 2, dhs);
}

/* What the merge did with a quantized base, for the caller's log. */
static void merge_report(const gemma3_model *m, const lt_adapters *a, const merge_walk *w,
                         const char *src_dir, const lt_callbacks *cb) {
    if (!cb || !cb->message || !m->n_quantized) return;
    char q[160], msg[4800];
    gemma3_quant_summary(m, q, sizeof q);
    const char *kind = m->quant == LT_QUANT_NF4 ? "NF4" : "int8";
    int adapters = a && a->n_slots > 0;
    const char *what = adapters ? "the adapters were merged into" : "saved";
    const char *from = src_dir && *src_dir ? src_dir : m->source;
    if (w->n_original && !w->n_dequantized) {
        snprintf(msg, sizeof msg, "%s the original 16-bit weights of %s (the base was %s)", what,
                 from, q);
    } else if (w->n_original) { /* a checkpoint storing some linears quantized, some not */
        snprintf(msg, sizeof msg,
                 "%s the original 16-bit weights of %s for the %d linears it stores in 16 bits, "
                 "and into the dequantized %s base for the %d it stores pre-quantized (%s)",
                 what, from, w->n_original, kind, w->n_dequantized, q);
    } else {
        const char *why = m->prequantized ? "the checkpoint is pre-quantized"
                          : !strncmp(m->source, "random:", 7)
                              ? "random weights were quantized as they were drawn"
                              : "the 16-bit checkpoint is no longer at hand";
        snprintf(msg, sizeof msg,
                 "%s the dequantized %s base: %s (%s); written unquantized (%%load ... quant=%s "
                 "quantizes it again)",
                 what, kind, why, q, m->quant == LT_QUANT_NF4 ? "nf4" : "int8");
    }
    cb->message(cb->ctx, msg);
}

lt_status merged_write_folder(const char *dir, const st_out *t, int n, const char *config_path,
                              const char *config, const char *tokenizer_path, char *err) {
    lt_afile_set fs = {0};
    char p[4200];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    lt_status rc = st_write_member(&fs, p, t, n, ST_METADATA_PT, err);
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/config.json", dir);
        rc = config_path ? lt_afile_set_copy(&fs, p, config_path, err)
                         : lt_afile_set_text(&fs, p, config, err);
    }
    if (rc == LT_OK && tokenizer_path) {
        snprintf(p, sizeof p, "%s/tokenizer.model", dir);
        rc = lt_afile_set_copy(&fs, p, tokenizer_path, err);
    }
    if (rc == LT_OK) rc = lt_afile_set_commit(&fs, err);
    if (rc != LT_OK) lt_afile_set_abort(&fs);
    return rc;
}

lt_status merged_save(const lt_adapters *a, gemma3_model *m, lt_ctx *dev, const char *src_dir,
                      const char *tokenizer_path, const char *dtype, const char *dir,
                      const lt_callbacks *cb, char *err) {
    lt_dtype dt;
    lt_status rc = merged_parse_dtype(m, dtype, "%save", &dt, err);
    if (rc != LT_OK) return rc;
    /* adapters on the image tower: the whole Gemma3ForConditionalGeneration is written, under
     * transformers 5's names, with the loaded config.json */
    int with_tower = a && a->n_tower_slots > 0 && m->vision;
    char mm_cfg[4200] = "";
    if (with_tower) {
        if (src_dir && *src_dir) snprintf(mm_cfg, sizeof mm_cfg, "%s/config.json", src_dir);
        if (!mm_cfg[0] || access(mm_cfg, R_OK) != 0)
            return lt_fail(err, LT_ERR_STATE,
                           "%%save merged=: the %d image-tower adapter(s) merge into a copy of "
                           "the whole multimodal checkpoint, which needs its config.json (the "
                           "model was not loaded from a folder with one); save them with %%save "
                           "adapter=DIR",
                           a->n_tower_slots);
    }
    if (gemma3_on_device(m) && !dev)
        return lt_fail(err, LT_ERR_ARG,
                       "%%save merged=: the model is on a device, and no backend "
                       "to read it back through was given");
    rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    int nw = gemma3_weight_count(m) + (with_tower ? tower_count(m->vision) : 0);
    merge_walk w = {m,
                    gemma3_on_device(m) ? dev : NULL,
                    a,
                    dt,
                    calloc((size_t)nw + 1, sizeof(st_out)),
                    calloc((size_t)nw + 1, sizeof(char *)),
                    calloc((size_t)nw + 1, sizeof(void *)),
                    0,
                    0,
                    0,
                    err,
                    LT_OK};
    if (!w.t || !w.names || !w.bufs) {
        w.rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
    } else {
        gemma3_weights_foreach(m, merge_visit, &w);
        if (w.rc == LT_OK && with_tower) tower_put(&w);
    }
    rc = w.rc;
    char *cfg = NULL;
    char src_cfg[4200] = "";
    if (rc == LT_OK) {
        /* keep the loaded config.json when there is one (text models); else write one; a
         * pre-quantized checkpoint's config.json describes its quantization: not copied */
        if (with_tower) {
            snprintf(src_cfg, sizeof src_cfg, "%s", mm_cfg);
        } else if (src_dir && *src_dir && !m->cfg.multimodal && !m->prequantized) {
            snprintf(src_cfg, sizeof src_cfg, "%s/config.json", src_dir);
            if (access(src_cfg, R_OK) != 0) src_cfg[0] = 0;
        }
        bnb_config qc = {0}; /* a quantization_config there would claim the 16-bit copy is not */
        char qerr[LT_ERRLEN];
        if (src_cfg[0] && bnb_config_load(&qc, src_cfg, qerr) == LT_OK && qc.present)
            src_cfg[0] = 0;
        bnb_config_free(&qc);
        if (!src_cfg[0] && !(cfg = merged_text_config(m, dt))) {
            rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
        }
    }
    if (rc == LT_OK)
        rc = merged_write_folder(dir, w.t, w.n, src_cfg[0] ? src_cfg : NULL, cfg, tokenizer_path,
                                 err);
    if (rc == LT_OK) merge_report(m, a, &w, src_dir, cb);
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
