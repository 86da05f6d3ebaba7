/* session.c — implements engine.h: a session holds one model, its tokenizer, a KV cache, the
 * chat history (with the soft tokens of its images) and the cancel flag.
 *
 * Owns lt_session and the resolution of a %load SOURCE (directory, Hugging Face id ORG/NAME
 * [@REVISION] through cuda/hub/, "tiny", "random:gemma-3-SIZE"). A call that fails leaves the
 * session as it was: a new model replaces the old one only once it loaded completely. Streams
 * generated text in pieces that never split a UTF-8 character. The cache remembers which image
 * filled each cached position, so equal ids with other images never reuse it. Must not print, exit
 * or know about Jupyter.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/base/atomic_file.h"
#include "cuda/engine.h"
#include "cuda/export/gguf_export.h"
#include "cuda/export/merged.h"
#include "cuda/export/mmproj_export.h"
#include "cuda/export/quantized.h"
#include "cuda/formats/image.h"
#include "cuda/formats/pan_scan.h"
#include "cuda/hub/hub.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/model/model.h"
#include "cuda/model/quant_dynamic.h"
#include "cuda/model/sample.h"
#include "cuda/model/siglip.h"
#include "cuda/text/chat.h"
#include "cuda/text/chat_image.h"
#include "cuda/text/textstream.h"
#include "cuda/text/tokenizer.h"
#include "cuda/train/train.h"
#ifdef HAVE_CUDA
#include "cuda/backend/cuda/backend_cuda.h"
#endif

#ifndef LATHE_DATADIR
#define LATHE_DATADIR "/usr/local/share/lathe"
#endif
#ifndef LATHE_SRCDIR
#define LATHE_SRCDIR "."
#endif

#define RANDOM_SEED 20250312u /* random:* weights are the same on every machine */

/* One image block of the chat: its soft tokens (siglip_encode's output, [mm_tokens_per_image,
 * hidden]) kept in host memory, so later turns put the same rows at its block without reading
 * the file again, and a serial no other block of the session shares: the cache compares
 * serials, so equal ids with a different image never reuse it. A file takes one block, or with
 * pan-and-scan 1 + its crops: the full image's block has crops = their count, each crop's
 * block crops = -1. px: the block's pixels as the tower takes them ([3, side, side] fp32), kept
 * so that the soft tokens are encoded again once the tower's or the projector's adapters have
 * changed (epoch: the session's tower_epoch when emb was made), as transformers encodes
 * pixel_values again on every generate. */
typedef struct chat_img {
    uint64_t serial, epoch;
    float *emb, *px;
    int crops;
} chat_img;

/* The images of a prompt, in the order of its image blocks. */
typedef struct prompt_imgs {
    const chat_img *const *img;
    int n;
} prompt_imgs;

struct lt_session {
    char err[LT_ERRLEN];
    atomic_int cancel;
    int ctx_ready;
    lt_ctx ctx;
    gemma3_model *model;
    lt_tokenizer *tok;
    qdyn_report quant_report; /* quant=dynamic's measures of the loaded model (else empty) */
    qdyn_report quant_next;   /* those of the model lt_load is loading, until it swaps in */
    int max_seq;
    char device[16];
    /* generation cache and the ids whose K/V it holds */
    gemma3_cache cache;
    int cache_ready;
    int32_t *cached;
    uint64_t *cached_src; /* per cached id: 0, or the serial of the image whose row it took */
    int n_cached, cap_cached;
    /* chat: the messages, how many image files each user turn carried (before its text), and
     * their image blocks in the order they appear */
    char *system;
    char **roles, **contents;
    int *msg_imgs;
    int n_msgs, cap_msgs;
    chat_img *imgs;
    int n_imgs, cap_imgs;
    uint64_t img_serial;  /* the last serial given */
    uint64_t tower_epoch; /* counts the changes of the tower's and projector's adapters */
    int tower_adapted;    /* the adapters held at the last change had tower or projector slots */
    /* fine-tuning: adapters and the current run (train.c) */
    lt_trainer *trainer;
};

/* Starts a call: clears the error and the cancel flag. */
static void call_begin(lt_session *s) {
    s->err[0] = 0;
    atomic_store(&s->cancel, 0);
}

lt_session *lt_session_new(void) {
    lt_session *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    atomic_init(&s->cancel, 0);
    snprintf(s->device, sizeof s->device, "cpu");
    return s;
}

static void chat_img_free(chat_img *im) {
    free(im->emb);
    free(im->px);
    im->emb = im->px = NULL;
}

static void cache_drop(lt_session *s) {
    if (s->cache_ready) gemma3_cache_free(&s->cache, &s->ctx);
    s->cache_ready = 0;
    s->n_cached = 0;
}

void lt_chat_reset(lt_session *s) {
    for (int i = 0; i < s->n_msgs; i++) {
        free(s->roles[i]);
        free(s->contents[i]);
    }
    s->n_msgs = 0;
    for (int i = 0; i < s->n_imgs; i++)
        chat_img_free(&s->imgs[i]);
    s->n_imgs = 0;
}

void lt_session_free(lt_session *s) {
    if (!s) return;
    cache_drop(s);
    trainer_free(s->trainer);
    gemma3_model_release(s->model, &s->ctx); /* host or device model */
    tok_free(s->tok);
    qdyn_report_free(&s->quant_report);
    qdyn_report_free(&s->quant_next);
    if (s->ctx_ready) lt_ctx_shutdown(&s->ctx);
    lt_chat_reset(s);
    free(s->roles);
    free(s->contents);
    free(s->msg_imgs);
    free(s->imgs);
    free(s->cached);
    free(s->cached_src);
    free(s->system);
    free(s);
}

const char *lt_last_error(const lt_session *s) {
    return s ? s->err : "no session";
}

void lt_cancel(lt_session *s) {
    atomic_store(&s->cancel, 1);
}

static int cancelled(lt_session *s) {
    return atomic_load(&s->cancel) != 0;
}

/* ---- resolving a source ------------------------------------------------------------------- */

/* out = a + b (b may be ""), truncated to cap; memcpy-based so paths of any length are safe. */
static void path_join(char *out, size_t cap, const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > cap - 1) la = cap - 1;
    memcpy(out, a, la);
    if (lb > cap - 1 - la) lb = cap - 1 - la;
    memcpy(out + la, b, lb);
    out[la + lb] = 0;
}

static int is_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static int is_file(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* The embedded tiny model: $LATHE_TINY_DIR, the installed copy, the build tree. */
static lt_status tiny_dir(lt_session *s, char *out, size_t cap) {
    const char *env = getenv("LATHE_TINY_DIR");
    char tried[3][1024];
    int n = 0;
    if (env && *env) path_join(tried[n++], sizeof tried[0], env, "");
    path_join(tried[n++], sizeof tried[0], LATHE_DATADIR, "/models/tiny");
    path_join(tried[n++], sizeof tried[0], LATHE_SRCDIR, "/models/tiny");
    for (int i = 0; i < n; i++) {
        char cfg[1100];
        path_join(cfg, sizeof cfg, tried[i], "/config.json");
        if (is_file(cfg)) {
            path_join(out, cap, tried[i], "");
            return LT_OK;
        }
    }
    char where[3400] = "";
    for (int i = 0; i < n; i++) {
        strncat(where, i ? ", " : "", sizeof where - strlen(where) - 1);
        strncat(where, tried[i], sizeof where - strlen(where) - 1);
    }
    return lt_fail(s->err, LT_ERR_IO,
                   "tiny: the embedded model was not found (looked in %s; set LATHE_TINY_DIR)",
                   where);
}

/* ---- loading ------------------------------------------------------------------------------- */

static void cb_message(const lt_callbacks *cb, const char *m) {
    if (cb && cb->message) cb->message(cb->ctx, m);
}

/* quant=dynamic's part of the load spec: the budget, the calibration tokens (with the
 * tokenizer the model will use) and where the report goes. *ids is the caller's to free. */
static lt_status dynamic_spec(lt_session *s, gemma3_load_spec *spec, const lt_load_opts *opts,
                              const char *tokpath, int32_t **ids, qdyn_report *report) {
    const char *def = lt_option_default("load", "quant_keep");
    spec->quant_keep = opts ? opts->quant_keep : (def ? strtod(def, NULL) : 0.1);
    if (strcmp(spec->quant, "dynamic") != 0) return LT_OK;
    const char *th = getenv("LATHE_THREADS");
    spec->n_threads = th ? atoi(th) : 0;
    spec->report = report;
    lt_status rc = qdyn_calibration_ids(tokpath, ids, &spec->n_calib, s->err);
    spec->calib_ids = *ids;
    return rc;
}

#ifdef HAVE_CUDA
/* Refuses a device load whose weights cannot fit in what dc's memory has free (its cache
 * counted; LATHE_CUDA_MEMORY_CAP caps it), before anything is allocated there or any weight is
 * read, naming the quantized loads that would fit. The size comes from the plan (config.json
 * and how the linears will be stored: gemma3_device_bytes). shared: dc is the session's ctx
 * (its model stays until this load succeeds). */
static lt_status device_fit_check(lt_session *s, const gemma3_plan *plan, lt_ctx *dc, int shared,
                                  const char *source, lt_dtype pdt, double keep) {
    lt_mem_info mi;
    dc->be->memory(dc, &mi);
    if (!mi.total) return LT_OK; /* unknown room */
    gemma3_fit f = {.name = source,
                    .where = mi.where,
                    .dt = pdt,
                    .quant = plan->quant,
                    .fixed = plan->prequantized,
                    .nested = plan->nested,
                    .kept16 = plan->kept16,
                    .need = 0,
                    .held = shared && s->model && gemma3_on_device(s->model)
                                ? (size_t)s->model->weight_bytes
                                : 0,
                    .keep_given = 1,
                    .keep = keep};
    return gemma3_fit_check(&plan->cfg, &f, mi.free + mi.cached, s->err);
}
#endif

lt_status lt_load(lt_session *s, const char *source, const lt_load_opts *opts,
                  const lt_callbacks *cb) {
    call_begin(s);
    if (!source || !*source)
        return lt_fail(
            s->err, LT_ERR_ARG,
            "load: no source (a directory, a Hugging Face id, tiny, or random:gemma-3-1b)");
    const char *dtype = opts && opts->dtype ? opts->dtype : "auto";
    const char *device = opts && opts->device ? opts->device : "auto";
    const char *quant = opts && opts->quant ? opts->quant : "none";
    /* device=cuda, or auto when a GPU is present, runs on the GPU (the CUDA backend). */
    int want_cuda = 0;
#ifdef HAVE_CUDA
    want_cuda = !strcmp(device, "cuda") || (!strcmp(device, "auto") && lt_cuda_device_count() > 0);
    if (want_cuda && lt_cuda_device_count() == 0)
        return lt_fail(s->err, LT_ERR_DEVICE,
                       "device=cuda: no CUDA device is available (accepted here: auto, cpu)");
#endif
    if (strcmp(device, "auto") && strcmp(device, "cpu") && !want_cuda) {
        if (!strcmp(device, "cuda"))
            return lt_fail(
                s->err, LT_ERR_DEVICE,
                "device=cuda: this build has no CUDA backend (accepted here: auto, cpu)");
        return lt_fail(s->err, LT_ERR_ARG,
                       "device='%s' is not accepted (accepted: auto, cpu, cuda)", device);
    }
    if (opts && !(opts->quant_keep >= 0 && opts->quant_keep <= 1))
        return lt_fail(s->err, LT_ERR_ARG,
                       "quant_keep=%g is outside [0, 1] (the fraction of the linear parameters "
                       "quant=dynamic may keep in 16 bits; 0 keeps none, like quant=nf4)",
                       (double)opts->quant_keep);
    if (opts && opts->max_seq < 0)
        return lt_fail(s->err, LT_ERR_ARG, "max_seq=%d must be >= 0 (0 = the model's)",
                       opts->max_seq);
    if (!s->ctx_ready) {
        const char *th = getenv("LATHE_THREADS");
        if (lt_ctx_init(&s->ctx, &lt_backend_cpu, th ? atoi(th) : 0) != LT_OK)
            return lt_fail(s->err, LT_ERR_MEMORY, "%s", s->ctx.err);
        s->ctx_ready = 1;
    }

    gemma3_model *m = NULL;
    lt_tokenizer *tok = NULL;
    char dir[2048], tokpath[2200], repo[300], rev[300];
    lt_status rc;
    gemma3_load_spec spec = {.dtype = dtype, .quant = quant};
    int32_t *calib = NULL;
    const char *random_size = NULL;
    qdyn_report_free(&s->quant_next);
    if (!strncmp(source, "random:", 7)) {
        random_size = source + 7;
        if (!strncmp(random_size, "gemma-3-", 8)) random_size += 8;
        rc = tiny_dir(s, dir, sizeof dir);
        if (rc != LT_OK) return lt_fail_prefix(s->err, rc, "%s: needs the tiny tokenizer", source);
    } else {
        if (!strcmp(source, "tiny")) {
            rc = tiny_dir(s, dir, sizeof dir);
            if (rc != LT_OK) return rc;
        } else if (is_dir(source)) {
            snprintf(dir, sizeof dir, "%s", source);
        } else if (hub_parse_id(source, repo, sizeof repo, rev, sizeof rev)) {
            /* the Hugging Face cache, downloading what is missing (cuda/hub/) */
            rc = hub_snapshot(source, cb, &s->cancel, dir, sizeof dir, s->err);
            if (rc != LT_OK) return rc;
        } else {
            return lt_fail(s->err, LT_ERR_ARG,
                           "load: '%s' is not a directory (accepted: a model directory, a Hugging "
                           "Face id like "
                           "google/gemma-3-1b-it[@REVISION], tiny, random:gemma-3-1b)",
                           source);
        }
    }
    snprintf(tokpath, sizeof tokpath, "%s/tokenizer.model", dir);
    if (!random_size && !is_file(tokpath))
        return lt_fail(s->err, LT_ERR_IO,
                       "%s: no tokenizer.model (a SentencePiece model) in this directory", dir);
    lt_ctx *mctx = &s->ctx; /* where the new model's weights live */
#ifdef HAVE_CUDA
    /* The CUDA backend: every weight goes to the GPU as soon as it is read, drawn or quantized
     * (gemma3_device_sink: the host holds about one tensor at a time), in the policy dtype
     * (bf16 on sm_80+, fp16 on the T4; dtype= overrides), on a CUDA ctx that replaces the
     * session's below. The fit check runs first, from config.json and the plan. */
    lt_ctx cuctx;
    int new_ctx = 0;
    lt_dtype pdt = LT_BF16;
    gemma3_device_sink dsink;
    if (want_cuda) {
        if (!s->ctx_ready || s->ctx.be != &lt_backend_cuda) {
            if (lt_ctx_init(&cuctx, &lt_backend_cuda, 0) != LT_OK)
                return lt_fail(s->err, LT_ERR_DEVICE, "device=cuda: %s", cuctx.err);
            new_ctx = 1;
        }
        mctx = new_ctx ? &cuctx : &s->ctx;
        if (lt_cuda_parse_precision(mctx, dtype, &pdt) != 0) pdt = lt_cuda_policy_dtype(mctx);
        gemma3_plan plan;
        rc = random_size ? gemma3_plan_random(&plan, random_size, quant, s->err)
                         : gemma3_plan_dir(&plan, dir, quant, s->err);
        const char *kd = lt_option_default("load", "quant_keep");
        double keep = opts ? opts->quant_keep : (kd ? strtod(kd, NULL) : 0.1);
        if (rc == LT_OK) rc = device_fit_check(s, &plan, mctx, !new_ctx, source, pdt, keep);
        if (rc != LT_OK) { /* before set_precision: a shared ctx stays as its model wants */
            if (new_ctx) lt_ctx_shutdown(&cuctx);
            return rc;
        }
        gemma3_device_sink_init(&dsink, mctx, pdt);
        spec.sink = &dsink.sink;
        cb_message(cb, "loading the weights onto the GPU");
    }
#endif
    rc = dynamic_spec(s, &spec, opts, tokpath, &calib, &s->quant_next);
    if (rc == LT_OK && random_size) {
        cb_message(cb, "allocating random weights");
        rc = gemma3_load_random_spec(&m, random_size, RANDOM_SEED, &spec, cb, s->err);
        if (rc == LT_OK) snprintf(m->source, sizeof m->source, "%s", source);
    } else if (rc == LT_OK) {
        rc = gemma3_load_dir_spec(&m, dir, &spec, cb, s->err);
        if (rc == LT_OK && !strcmp(source, "tiny")) snprintf(m->source, sizeof m->source, "tiny");
    }
    free(calib);
    if (rc == LT_OK) {
        cb_message(cb, "loading tokenizer");
        rc = tok_load(&tok, tokpath, s->err);
    }
    if (rc == LT_OK && tok_size(tok) > m->cfg.vocab_size)
        rc = lt_fail(s->err, LT_ERR_FORMAT,
                     "%s: the tokenizer has %d pieces but the model has only %d embedding rows",
                     tokpath, tok_size(tok), m->cfg.vocab_size);
    int max_seq = 0;
    if (rc == LT_OK) {
        gemma3_config_set_tokens(&m->cfg, tok);
        max_seq = opts && opts->max_seq > 0 ? opts->max_seq : m->cfg.max_position_embeddings;
        if (!(opts && opts->max_seq > 0) && max_seq > 8192) max_seq = 8192;
        if (max_seq > m->cfg.max_position_embeddings)
            rc = lt_fail(s->err, LT_ERR_ARG,
                         "max_seq=%d exceeds the model's max_position_embeddings %d", max_seq,
                         m->cfg.max_position_embeddings);
    }
    if (rc != LT_OK) { /* the session's model and ctx are as they were */
        tok_free(tok);
        gemma3_model_release(m, mctx);
#ifdef HAVE_CUDA
        if (new_ctx) lt_ctx_shutdown(&cuctx);
#endif
        return rc;
    }
#ifdef HAVE_CUDA
    if (want_cuda) lt_cuda_set_precision(mctx, pdt);
#endif
    /* success: swap in */
    cache_drop(s);
    trainer_free(s->trainer); /* adapters belong to the old model */
    s->trainer = NULL;
    gemma3_model_release(s->model, &s->ctx); /* host or device model */
#ifdef HAVE_CUDA
    if (new_ctx) { /* the old model is gone: its ctx can go too */
        if (s->ctx_ready) lt_ctx_shutdown(&s->ctx);
        s->ctx = cuctx;
        s->ctx_ready = 1;
    } else if (!want_cuda && s->ctx_ready && s->ctx.be != &lt_backend_cpu) {
        lt_ctx_shutdown(&s->ctx); /* back to the CPU: a fresh CPU ctx */
        s->ctx_ready = 0;
        const char *th2 = getenv("LATHE_THREADS");
        if (lt_ctx_init(&s->ctx, &lt_backend_cpu, th2 ? atoi(th2) : 0) == LT_OK) s->ctx_ready = 1;
    }
#endif
    snprintf(s->device, sizeof s->device, "%s", want_cuda ? "cuda" : "cpu");
    tok_free(s->tok);
    qdyn_report_free(&s->quant_report);
    s->quant_report = s->quant_next; /* empty unless quant=dynamic */
    memset(&s->quant_next, 0, sizeof s->quant_next);
    s->model = m;
    s->tok = tok;
    s->max_seq = max_seq;
    lt_chat_reset(s);
    return LT_OK;
}

void lt_model_info_get(const lt_session *s, lt_model_info *info) {
    memset(info, 0, sizeof *info);
    if (!s || !s->model) return;
    const gemma3_model *m = s->model;
    const gemma3_config *c = &m->cfg;
    info->loaded = 1;
    snprintf(info->source, sizeof info->source, "%s", m->source);
    snprintf(info->arch, sizeof info->arch, "%s",
             m->vision                            ? "gemma3 (text + image tower)"
             : c->model_type[0] && !c->multimodal ? c->model_type
                                                  : "gemma3_text");
    snprintf(info->dtype, sizeof info->dtype, "%s", lt_dtype_user_name(m->dtype));
    snprintf(info->device, sizeof info->device, "%s", s->device);
    info->n_params = m->n_params;
    info->weight_bytes = m->weight_bytes;
    info->n_layers = c->num_hidden_layers;
    info->hidden = c->hidden_size;
    info->n_heads = c->num_attention_heads;
    info->n_kv_heads = c->num_key_value_heads;
    info->head_dim = c->head_dim;
    info->intermediate = c->intermediate_size;
    info->vocab = c->vocab_size;
    info->sliding_window = c->sliding_window;
    info->max_seq = s->max_seq;
    /* gemma3_model.skipped_vision says the checkpoint has vision tensors; the info's says
     * they are there and were not loaded */
    info->skipped_vision = m->skipped_vision && !m->vision;
    info->image_tokens = m->vision ? c->vision.mm_tokens_per_image + 2 : 0;
    if (m->vision) {
        const siglip_tower *t = m->vision;
        const gemma3_vision_config *vc = &t->cfg;
        info->vision_loaded = 1;
        info->vision_image_size = vc->image_size;
        info->vision_patch_size = vc->patch_size;
        info->vision_layers = vc->num_hidden_layers;
        info->vision_hidden = vc->hidden_size;
        info->vision_heads = vc->num_attention_heads;
        info->vision_intermediate = vc->intermediate_size;
        info->vision_mm_tokens = vc->mm_tokens_per_image;
        info->vision_params = t->n_params;
        lt_dtype dt = vc->num_hidden_layers > 0 ? t->layers[0].q.w.dtype : t->patch.w.dtype;
        snprintf(info->vision_dtype, sizeof info->vision_dtype, "%s", lt_dtype_user_name(dt));
        snprintf(info->vision_device, sizeof info->vision_device, "%s", s->device);
    } else if (m->skipped_vision) {
        snprintf(info->vision_note, sizeof info->vision_note, "%.255s",
                 m->vision_error[0] ? m->vision_error : "the image tower was not loaded");
    }
    gemma3_quant_summary(m, info->quant, sizeof info->quant);
#ifdef HAVE_CUDA
    if (s->ctx_ready && s->ctx.be == &lt_backend_cuda) {
        lt_cuda_mem cm;
        lt_cuda_memory((lt_ctx *)&s->ctx, &cm);
        info->gpu_in_use = (int64_t)cm.in_use;
        info->gpu_peak = (int64_t)cm.peak;
        info->gpu_free = (int64_t)cm.free;
        info->gpu_total = (int64_t)cm.total;
    }
#endif
}

void lt_quant_info_get(const lt_session *s, lt_quant_info *info, lt_quant_module *mods, int cap) {
    memset(info, 0, sizeof *info);
    if (!s || !s->model || !s->quant_report.mods) return;
    *info = s->quant_report.info;
    for (int i = 0; mods && i < cap && i < info->n_modules; i++)
        mods[i] = s->quant_report.mods[i];
}

/* ---- tokens -----------------------------------------------------------------------------------
 */

static lt_status need_model(lt_session *s) {
    if (!s->model || !s->tok)
        return lt_fail(s->err, LT_ERR_STATE,
                       "no model loaded (run %%load first, e.g. %%load tiny)");
    return LT_OK;
}

lt_status lt_tokenize(lt_session *s, const char *text, int32_t **ids, int *n) {
    call_begin(s);
    lt_status rc = need_model(s);
    if (rc != LT_OK) return rc;
    if (!text) return lt_fail(s->err, LT_ERR_ARG, "tokenize: no text");
    return tok_encode_special(s->tok, text, ids, n, s->err);
}

lt_status lt_detokenize(lt_session *s, const int32_t *ids, int n, char **text) {
    call_begin(s);
    lt_status rc = need_model(s);
    if (rc != LT_OK) return rc;
    return tok_decode(s->tok, ids, n, text, s->err);
}

/* ---- running ------------------------------------------------------------------------------------
 */

lt_status lt_logits(lt_session *s, const int32_t *ids, int n, float **logits, int *vocab) {
    call_begin(s);
    *logits = NULL;
    lt_status rc = need_model(s);
    if (rc != LT_OK) return rc;
    if (n <= 0) return lt_fail(s->err, LT_ERR_ARG, "logits: no token ids");
    if (n > s->max_seq)
        return lt_fail(s->err, LT_ERR_ARG, "logits: %d tokens exceed max_seq %d", n, s->max_seq);
    int V = s->model->cfg.vocab_size;
    float *out = malloc(sizeof(float) * (size_t)n * (size_t)V);
    if (!out)
        return lt_fail(s->err, LT_ERR_MEMORY, "logits: out of memory for [%d, %d] fp32", n, V);
    gemma3_cache cache;
    rc = gemma3_cache_init(&cache, &s->ctx, &s->model->cfg, n);
    if (rc == LT_OK) {
        rc = gemma3_forward_host(s->model, &s->ctx, ids, n, &cache, out,
                                 NULL); /* logits in host memory */
        gemma3_cache_free(&cache, &s->ctx);
    }
    if (rc != LT_OK) {
        free(out);
        return lt_fail(s->err, rc, "%s", s->ctx.err);
    }
    *logits = out;
    *vocab = V;
    return LT_OK;
}

/* io as pan_scan's options; NULL when io asks for no pan-and-scan. */
static const pan_scan_opts *pan_scan_of(const lt_image_opts *io, pan_scan_opts *po) {
    if (!io || !io->pan_and_scan) return NULL;
    po->min_crop_size = io->pan_and_scan_min_crop_size;
    po->max_crops = io->pan_and_scan_max_num_crops;
    po->min_ratio = io->pan_and_scan_min_ratio_to_activate;
    return po;
}

/* The pixel values of the blocks of the file at path ([1 + *n_crops, 3, side, side], malloc'd):
 * the full image and, with po, its pan-and-scan crops. Errors name the file. */
static lt_status file_pixels(const char *path, int side, const pan_scan_opts *po, float **px,
                             int *n_crops, char *err) {
    img_rgb im;
    lt_status rc = img_load(&im, path, err);
    if (rc != LT_OK) return rc;
    rc = pan_scan_pixels(&im, side, po, px, n_crops, err);
    img_free(&im);
    if (rc != LT_OK) lt_fail_prefix(err, rc, "%s", path);
    return rc;
}

/* The pan-and-scan crops of the file at path under po (0 when po is NULL: nothing read). */
static lt_status file_crops(const char *path, const pan_scan_opts *po, int *n_crops, char *err) {
    *n_crops = 0;
    if (!po) return LT_OK;
    img_rgb im;
    lt_status rc = img_load(&im, path, err);
    if (rc != LT_OK) return rc;
    pan_scan_box boxes[PAN_SCAN_MAX_CROPS];
    rc = pan_scan_boxes(im.width, im.height, po, boxes, n_crops, err);
    img_free(&im);
    if (rc != LT_OK) lt_fail_prefix(err, rc, "%s", path);
    return rc;
}

/* Refuses image options pan_scan cannot use, and pan-and-scan on a model without a tower. */
static lt_status image_opts_check(lt_session *s, const lt_image_opts *io) {
    pan_scan_opts po;
    if (!pan_scan_of(io, &po)) return LT_OK;
    if (!s->model->vision)
        return lt_fail(s->err, LT_ERR_ARG,
                       "pan-and-scan crops images for an image tower, and this model has none "
                       "(%s); load a multimodal Gemma 3 checkpoint (e.g. google/gemma-3-4b-it)",
                       s->model->vision_error[0] ? s->model->vision_error : "text only");
    return pan_scan_opts_check(&po, s->err);
}

lt_status lt_image_blocks(lt_session *s, const char *path, const lt_image_opts *io, int *blocks) {
    call_begin(s);
    *blocks = 0;
    lt_status rc = need_model(s);
    if (rc == LT_OK) rc = image_opts_check(s, io);
    if (rc != LT_OK) return rc;
    if (!path || !*path) return lt_fail(s->err, LT_ERR_ARG, "images: no file name");
    pan_scan_opts po;
    int crops = 0;
    rc = file_crops(path, pan_scan_of(io, &po), &crops, s->err);
    if (rc == LT_OK) *blocks = 1 + crops;
    return rc;
}

lt_status lt_logits_image(lt_session *s, const int32_t *ids, int n, const char *const *images,
                          int n_images, const lt_image_opts *io, float **logits, int *vocab) {
    call_begin(s);
    *logits = NULL;
    lt_status rc = need_model(s);
    if (rc != LT_OK) return rc;
    const gemma3_model *m = s->model;
    if (n <= 0) return lt_fail(s->err, LT_ERR_ARG, "logits: no token ids");
    if (n > s->max_seq)
        return lt_fail(s->err, LT_ERR_ARG, "logits: %d tokens exceed max_seq %d", n, s->max_seq);
    if (n_images <= 0) return lt_fail(s->err, LT_ERR_ARG, "logits: no image given");
    if (!m->vision)
        return lt_fail(s->err, LT_ERR_ARG, "images: %s",
                       m->vision_error[0] ? m->vision_error
                                          : "this model has no image tower (a text-only model)");
    if ((rc = image_opts_check(s, io)) != LT_OK) return rc;
    const siglip_tower *t = m->vision;
    lt_ctx *ctx = &s->ctx;
    const lt_backend *be = ctx->be;
    int side = t->cfg.image_size, mm = t->cfg.mm_tokens_per_image, V = m->cfg.vocab_size;
    size_t H = (size_t)m->cfg.hidden_size;
    pan_scan_opts po;
    const pan_scan_opts *pso = pan_scan_of(io, &po);
    /* the blocks each file takes, so the embeddings can be sized before any is encoded */
    int blocks = 0;
    for (int i = 0; i < n_images && rc == LT_OK; i++) {
        int c = 0;
        rc = file_crops(images[i], pso, &c, s->err);
        blocks += 1 + c;
    }
    if (rc != LT_OK) return rc;
    size_t rows = (size_t)mm * (size_t)blocks;
    float *px = NULL;
    float *emb = be->alloc(ctx, sizeof(float) * rows * H);
    float *dev_logits = be->alloc(ctx, sizeof(float) * (size_t)n * (size_t)V);
    float *out = malloc(sizeof(float) * (size_t)n * (size_t)V);
    if (!emb || !dev_logits || !out) {
        rc = lt_fail(s->err, LT_ERR_MEMORY, "logits: out of memory for %d images and [%d, %d]",
                     n_images, n, V);
        goto done;
    }
    for (int i = 0, b = 0; i < n_images && rc == LT_OK; i++) {
        int c = 0;
        free(px);
        px = NULL;
        rc = file_pixels(images[i], side, pso, &px, &c, s->err);
        if (rc == LT_OK && b + 1 + c > blocks)
            rc = lt_fail(s->err, LT_ERR_IO, "%s: the file changed while it was read", images[i]);
        for (int k = 0; k <= c && rc == LT_OK; k++, b++)
            if ((rc = siglip_encode(t, ctx, px + (size_t)k * 3 * side * side,
                                    emb + (size_t)b * mm * H)) != LT_OK)
                lt_fail(s->err, rc, "%s: %s", images[i], ctx->err);
    }
    if (rc == LT_OK) {
        gemma3_cache cache;
        gemma3_images gi = {emb, (int)rows};
        gemma3_outputs o = {.logits = dev_logits};
        rc = gemma3_cache_init(&cache, ctx, &m->cfg, n);
        if (rc == LT_OK) {
            rc = gemma3_forward_images(m, ctx, ids, n, &cache, &o, &gi);
            gemma3_cache_free(&cache, ctx);
        }
        if (rc == LT_OK)
            rc = be->download(ctx, out, dev_logits, sizeof(float) * (size_t)n * (size_t)V);
        if (rc != LT_OK) lt_fail(s->err, rc, "%s", ctx->err);
    }
done:
    free(px);
    if (emb) be->release(ctx, emb);
    if (dev_logits) be->release(ctx, dev_logits);
    if (rc != LT_OK) {
        free(out);
        return rc;
    }
    *logits = out;
    *vocab = V;
    return LT_OK;
}

/* Appends ids (and the image serial of each, src; NULL = none) to what the cache holds. */
static lt_status cached_push(lt_session *s, const int32_t *ids, const uint64_t *src, int n) {
    if (s->n_cached + n > s->cap_cached) {
        int nc = s->cap_cached ? s->cap_cached : 256;
        while (nc < s->n_cached + n)
            nc *= 2;
        int32_t *np = realloc(s->cached, sizeof(int32_t) * (size_t)nc);
        if (!np) return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
        s->cached = np;
        uint64_t *ns = realloc(s->cached_src, sizeof(uint64_t) * (size_t)nc);
        if (!ns) return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
        s->cached_src = ns;
        s->cap_cached = nc;
    }
    memcpy(s->cached + s->n_cached, ids, sizeof(int32_t) * (size_t)n);
    if (src)
        memcpy(s->cached_src + s->n_cached, src, sizeof(uint64_t) * (size_t)n);
    else
        memset(s->cached_src + s->n_cached, 0, sizeof(uint64_t) * (size_t)n);
    s->n_cached += n;
    return LT_OK;
}

/* 1 when the first n cached ids took their rows from the images src names (NULL: none). */
static int cached_src_equal(const lt_session *s, const uint64_t *src, int n) {
    for (int i = 0; i < n; i++)
        if (s->cached_src[i] != (src ? src[i] : 0)) return 0;
    return 1;
}

/* One chunk of a prompt holding ni image tokens, the j0-th image token of the prompt first:
 * their rows come from pi's soft tokens; the K/V go into the session cache. */
static lt_status forward_chunk_images(lt_session *s, const int32_t *ids, int k,
                                      const prompt_imgs *pi, int j0, int ni, float *last) {
    lt_ctx *ctx = &s->ctx;
    const lt_backend *be = ctx->be;
    size_t H = (size_t)s->model->cfg.hidden_size, V = (size_t)s->model->cfg.vocab_size;
    int mm = s->model->cfg.vision.mm_tokens_per_image;
    float *rows = malloc(sizeof(float) * (size_t)ni * H);
    float *demb = be->alloc(ctx, sizeof(float) * (size_t)ni * H);
    float *dlast = be->alloc(ctx, sizeof(float) * V);
    lt_status rc = LT_OK;
    if (!rows || !demb || !dlast) {
        rc = lt_fail(s->err, LT_ERR_MEMORY, "chat: out of memory for %d image rows", ni);
        goto done;
    }
    for (int r = 0; r < ni; r++) {
        int j = j0 + r;
        memcpy(rows + (size_t)r * H, pi->img[j / mm]->emb + (size_t)(j % mm) * H,
               sizeof(float) * H);
    }
    gemma3_images gi = {demb, ni};
    gemma3_outputs o = {.last_logits = dlast};
    rc = be->upload(ctx, demb, rows, sizeof(float) * (size_t)ni * H);
    if (rc == LT_OK) rc = gemma3_forward_images(s->model, ctx, ids, k, &s->cache, &o, &gi);
    if (rc == LT_OK) rc = be->download(ctx, last, dlast, sizeof(float) * V);
    if (rc != LT_OK) lt_fail(s->err, rc, "%s", ctx->err);
done:
    free(rows);
    if (demb) be->release(ctx, demb);
    if (dlast) be->release(ctx, dlast);
    return rc;
}

/* Feeds ids into the session cache, reusing the cached prefix when the new sequence extends it
 * with the same images at the same places (pi: the prompt's images in block order, NULL or
 * empty for none; a prefix never ends inside an image block); leaves the logits of the last id
 * in last (host [V]). */
static lt_status feed(lt_session *s, const int32_t *ids, int n, const prompt_imgs *pi,
                      float *last) {
    lt_status rc;
    if (n > s->max_seq)
        return lt_fail(s->err, LT_ERR_ARG,
                       "%d tokens exceed max_seq %d (load with a larger max_seq=)", n, s->max_seq);
    uint64_t *src = NULL; /* per id: the serial of the image whose row it takes, or 0 */
    if (pi && pi->n > 0) {
        const gemma3_vision_config *vc = &s->model->cfg.vision;
        int mm = vc->mm_tokens_per_image, j = 0;
        if (!(src = calloc((size_t)n, sizeof *src)))
            return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
        for (int t = 0; t < n; t++)
            if (ids[t] == vc->image_token_id) {
                if (j < pi->n * mm) src[t] = pi->img[j / mm]->serial;
                j++;
            }
        if (j != pi->n * mm) {
            free(src);
            return lt_fail(s->err, LT_ERR_STATE,
                           "internal: %d image tokens in the prompt for %d images of %d", j, pi->n,
                           mm);
        }
    }
    if (!s->cache_ready) {
        rc = gemma3_cache_init(&s->cache, &s->ctx, &s->model->cfg, s->max_seq);
        if (rc != LT_OK) {
            free(src);
            return lt_fail(s->err, rc, "%s", s->ctx.err);
        }
        s->cache_ready = 1;
        s->n_cached = 0;
    }
    int start = 0, c = s->n_cached;
    if (c < n && c > 0 && !memcmp(s->cached, ids, sizeof(int32_t) * (size_t)c) &&
        cached_src_equal(s, src, c) && !(src && src[c - 1] && src[c])) {
        start = c; /* extend */
    } else {
        gemma3_cache_reset(&s->cache, &s->ctx);
        s->n_cached = 0;
    }
    int j = 0; /* image tokens before t */
    for (int t = 0; src && t < start; t++)
        j += src[t] != 0;
    /* chunk the prompt so a cancel is seen between chunks; an image block stays in one */
    rc = LT_OK;
    for (int t = start, k; t < n && rc == LT_OK; t += k) {
        k = n - t < GEMMA3_CHUNK ? n - t : GEMMA3_CHUNK;
        if (src && t + k < n && src[t + k - 1] && src[t + k]) {
            int s0 = t + k - 1;
            while (s0 > t && src[s0 - 1])
                s0--;
            if (s0 == t) {
                rc = lt_fail(s->err, LT_ERR_ARG,
                             "an image block of more than %d image tokens does not fit one chunk",
                             GEMMA3_CHUNK);
                break;
            }
            k = s0 - t;
        }
        if (cancelled(s)) {
            rc = lt_fail(s->err, LT_CANCELLED, "cancelled");
            break;
        }
        int ni = 0;
        for (int i = 0; src && i < k; i++)
            ni += src[t + i] != 0;
        if (ni) {
            rc = forward_chunk_images(s, ids + t, k, pi, j, ni, last);
            j += ni;
        } else {
            rc = gemma3_forward_host(s->model, &s->ctx, ids + t, k, &s->cache, NULL, last);
            if (rc != LT_OK) lt_fail(s->err, rc, "%s", s->ctx.err);
        }
        if (rc == LT_OK) rc = cached_push(s, ids + t, src ? src + t : NULL, k);
    }
    free(src);
    if (rc != LT_OK) {
        gemma3_cache_reset(&s->cache, &s->ctx);
        s->n_cached = 0;
        return rc;
    }
    if (start == n) return lt_fail(s->err, LT_ERR_STATE, "internal: nothing to feed");
    return LT_OK;
}

/* The generation loop shared by generate, generate_ids and chat. Appends generated ids to
 * *gen (malloc'd) and streams text when st is not NULL. */
static lt_status run_generation(lt_session *s, const int32_t *prompt, int n_prompt,
                                const prompt_imgs *pi, const lt_gen_opts *o, textstream *st,
                                int32_t **gen, int *n_gen, int include_stop) {
    *gen = NULL;
    *n_gen = 0;
    lt_status rc = gen_opts_check(o, s->err);
    if (rc != LT_OK) return rc;
    if (n_prompt <= 0) return lt_fail(s->err, LT_ERR_ARG, "generate: empty prompt");
    const gemma3_config *c = &s->model->cfg;
    int V = c->vocab_size;
    float *last = malloc(sizeof(float) * (size_t)V);
    int32_t *out = malloc(sizeof(int32_t) * (size_t)(o->max_new + 1));
    if (!last || !out) {
        free(last);
        free(out);
        return lt_fail(s->err, LT_ERR_MEMORY, "generate: out of memory");
    }
    lt_rng rng;
    rng_seed(&rng, o->seed);
    int n = 0;
    rc = feed(s, prompt, n_prompt, pi, last); /* reuses the cache when the prompt extends it */
    for (int i = 0; rc == LT_OK && i < o->max_new; i++) {
        if (cancelled(s)) {
            rc = lt_fail(s->err, LT_CANCELLED, "cancelled after %d tokens", n);
            break;
        }
        int id = sampler_pick(last, V, o, &rng);
        if (gemma3_is_stop(c, id)) {
            if (include_stop) out[n++] = id;
            break;
        }
        out[n++] = id;
        if (st) {
            char pb[256];
            int k = tok_piece_bytes(s->tok, id, pb, (int)sizeof pb);
            textstream_add(st, pb, k);
        }
        if (i + 1 == o->max_new) break;
        if (s->n_cached + 1 > s->max_seq) break; /* context full: stop quietly */
        rc = gemma3_forward_host(s->model, &s->ctx, &id, 1, &s->cache, NULL, last); /* to host */
        if (rc != LT_OK) {
            rc = lt_fail(s->err, rc, "%s", s->ctx.err);
            gemma3_cache_reset(&s->cache, &s->ctx);
            s->n_cached = 0;
            break;
        }
        lt_status r2 = cached_push(s, &id, NULL, 1);
        if (r2 != LT_OK) rc = r2;
    }
    if (st) textstream_finish(st);
    if (st && st->text.oom && rc == LT_OK)
        rc = lt_fail(s->err, LT_ERR_MEMORY, "generate: out of memory");
    free(last);
    *gen = out;
    *n_gen = n;
    return rc;
}

lt_status lt_generate_ids(lt_session *s, const int32_t *ids, int n, const lt_gen_opts *o,
                          int32_t **out_ids, int *n_out) {
    call_begin(s);
    *out_ids = NULL;
    *n_out = 0;
    lt_status rc = need_model(s);
    if (rc != LT_OK) return rc;
    lt_gen_opts d;
    if (!o) {
        lt_gen_opts_default(&d);
        o = &d;
    }
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= s->model->cfg.vocab_size)
            return lt_fail(s->err, LT_ERR_ARG,
                           "token id %d at position %d is outside the vocabulary [0, %d)", ids[i],
                           i, s->model->cfg.vocab_size);
    rc = run_generation(s, ids, n, NULL, o, NULL, out_ids, n_out, 1);
    if (rc != LT_OK && rc != LT_CANCELLED) {
        free(*out_ids);
        *out_ids = NULL;
        *n_out = 0;
    }
    return rc;
}

/* BOS + tokens of text (literal special pieces become their ids). */
static lt_status encode_with_bos(lt_session *s, const char *text, int32_t **ids, int *n) {
    int32_t *t = NULL;
    int k = 0;
    lt_status rc = tok_encode_special(s->tok, text, &t, &k, s->err);
    if (rc != LT_OK) return rc;
    int32_t *all = malloc(sizeof(int32_t) * (size_t)(k + 1));
    if (!all) {
        free(t);
        return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
    }
    all[0] = s->model->cfg.bos_id;
    memcpy(all + 1, t, sizeof(int32_t) * (size_t)k);
    free(t);
    *ids = all;
    *n = k + 1;
    return LT_OK;
}

lt_status lt_generate(lt_session *s, const char *prompt, const lt_gen_opts *o,
                      const lt_callbacks *cb, char **out) {
    call_begin(s);
    if (out) *out = NULL;
    lt_status rc = need_model(s);
    if (rc != LT_OK) return rc;
    lt_gen_opts d;
    if (!o) {
        lt_gen_opts_default(&d);
        o = &d;
    }
    int32_t *ids = NULL, *gen = NULL;
    int n = 0, ng = 0;
    rc = encode_with_bos(s, prompt ? prompt : "", &ids, &n);
    if (rc != LT_OK) return rc;
    textstream st = {.emit = cb ? cb->text : NULL, .ctx = cb ? cb->ctx : NULL};
    rc = run_generation(s, ids, n, NULL, o, &st, &gen, &ng, 0);
    free(ids);
    free(gen);
    if (out && (rc == LT_OK || rc == LT_CANCELLED)) {
        *out = lt_strbuf_take(&st.text);
    }
    lt_strbuf_free(&st.text);
    return rc;
}

/* ---- chat ------------------------------------------------------------------------------------ */

static lt_status history_push(lt_session *s, const char *role, const char *content, int n_img) {
    if (s->n_msgs == s->cap_msgs) {
        int nc = s->cap_msgs ? s->cap_msgs * 2 : 16;
        char **r = realloc(s->roles, sizeof(char *) * (size_t)nc);
        if (!r) return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
        s->roles = r;
        char **c = realloc(s->contents, sizeof(char *) * (size_t)nc);
        if (!c) return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
        s->contents = c;
        int *mi = realloc(s->msg_imgs, sizeof(int) * (size_t)nc);
        if (!mi) return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
        s->msg_imgs = mi;
        s->cap_msgs = nc;
    }
    char *rr = strdup(role), *cc = strdup(content);
    if (!rr || !cc) {
        free(rr);
        free(cc);
        return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
    }
    s->roles[s->n_msgs] = rr;
    s->contents[s->n_msgs] = cc;
    s->msg_imgs[s->n_msgs] = n_img;
    s->n_msgs++;
    return LT_OK;
}

lt_status lt_chat_system(lt_session *s, const char *system_text) {
    call_begin(s);
    char *copy = NULL;
    if (system_text && !(copy = strdup(system_text)))
        return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
    free(s->system);
    s->system = copy;
    return LT_OK;
}

lt_status lt_chat_render(lt_session *s, const char *const *roles, const char *const *contents,
                         int n, int add_generation_prompt, char **text) {
    call_begin(s);
    return chat_render(roles, contents, n, add_generation_prompt, text, s->err);
}

/* The ids of [system] + history + a user turn with user_text after n_images images (new_crops:
 * each one's pan-and-scan crops, NULL = none), and the generation prompt, with one BOS. A
 * conversation without images is tokenized as text (a literal "<start_of_image>" stays that
 * token); one with images has each user turn's images rendered as the Hub template renders
 * image content parts, an image with crops written as Gemma3Processor writes it, and every
 * marker expanded into an image block as Gemma 3's processor expands them (chat_image.h).
 * *total_blocks: the image blocks of the prompt. */
static lt_status chat_prompt(lt_session *s, const char *user_text, int n_images,
                             const int *new_crops, int32_t **ids, int *nid, int *total_blocks) {
    *ids = NULL;
    *nid = 0;
    int files = n_images, total = n_images;
    for (int i = 0; i < s->n_msgs; i++)
        files += s->msg_imgs[i];
    /* every file's crops, in order: the history's from its blocks, then this turn's */
    int *crops = files ? malloc(sizeof(int) * (size_t)files) : NULL, any = 0;
    if (files && !crops) return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
    int f = 0;
    for (int b = 0; b < s->n_imgs; b++)
        if (s->imgs[b].crops >= 0 && f < files - n_images) crops[f++] = s->imgs[b].crops;
    total = s->n_imgs;
    for (int i = 0; i < n_images; i++) {
        crops[f++] = new_crops ? new_crops[i] : 0;
        total += 1 + crops[f - 1];
    }
    for (int i = 0; i < files; i++)
        any |= crops[i] > 0;
    *total_blocks = total;
    int n = s->n_msgs + 1 + (s->system ? 1 : 0), k = 0;
    const char **roles = malloc(sizeof(char *) * (size_t)n),
               **contents = malloc(sizeof(char *) * (size_t)n);
    char **owned = calloc((size_t)n, sizeof(char *)); /* contents built here */
    lt_status rc = LT_OK;
    if (!roles || !contents || !owned) {
        rc = lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
        goto done;
    }
    if (s->system) {
        roles[k] = "system";
        contents[k++] = s->system;
    }
    for (int i = 0; i <= s->n_msgs && rc == LT_OK; i++) {
        int last = i == s->n_msgs, ni = last ? n_images : s->msg_imgs[i];
        roles[k] = last ? "user" : s->roles[i];
        contents[k] = last ? user_text : s->contents[i];
        if (ni > 0 && (rc = chat_user_content(contents[k], ni, &owned[k], s->err)) == LT_OK)
            contents[k] = owned[k];
        k++;
    }
    char *text = NULL;
    if (rc == LT_OK) rc = chat_render(roles, contents, k, 1, &text, s->err);
    if (rc != LT_OK) goto done;
    /* the template's "<bos>" text becomes the BOS id; the rest is tokenized with specials */
    const char *body = !strncmp(text, "<bos>", 5) ? text + 5 : text;
    if (total == 0) {
        rc = encode_with_bos(s, body, ids, nid);
    } else {
        const gemma3_vision_config *vc = &s->model->cfg.vision;
        chat_image_tokens it = {vc->boi_token_id, vc->image_token_id, vc->eoi_token_id,
                                vc->mm_tokens_per_image};
        int32_t *t = NULL, *all = NULL;
        int m = 0;
        char *pas = NULL;
        if (any) rc = chat_image_pan_scan_text(body, crops, files, &pas, s->err);
        if (rc == LT_OK) rc = chat_image_ids(s->tok, pas ? pas : body, &it, total, &t, &m, s->err);
        free(pas);
        if (rc == LT_OK && !(all = malloc(sizeof(int32_t) * (size_t)(m + 1))))
            rc = lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
        if (rc == LT_OK) {
            all[0] = s->model->cfg.bos_id;
            memcpy(all + 1, t, sizeof(int32_t) * (size_t)m);
            *ids = all;
            *nid = m + 1;
        }
        free(t);
    }
    free(text);
done:
    free(crops);
    for (int i = 0; owned && i < n; i++)
        free(owned[i]);
    free(owned);
    free(roles);
    free(contents);
    return rc;
}

/* Images need a model with an image tower. */
static lt_status need_tower(lt_session *s) {
    if (s->model->vision) return LT_OK;
    return lt_fail(s->err, LT_ERR_ARG,
                   "chat: images need a Gemma 3 checkpoint with an image tower (e.g. "
                   "google/gemma-3-4b-it); %s",
                   s->model->vision_error[0] ? s->model->vision_error
                                             : "this model is text-only (no vision tower)");
}

/* The checks of a chat turn with n_images images that need no file read. */
static lt_status chat_check(lt_session *s, const char *user_text, const char *const *images,
                            int n_images) {
    lt_status rc = need_model(s);
    if (rc != LT_OK) return rc;
    if (!user_text) return lt_fail(s->err, LT_ERR_ARG, "chat: no message");
    if (n_images < 0 || (n_images > 0 && !images))
        return lt_fail(s->err, LT_ERR_ARG, "chat: %d images and no list of files", n_images);
    for (int i = 0; images && i < n_images; i++)
        if (!images[i] || !*images[i])
            return lt_fail(s->err, LT_ERR_ARG, "chat: image %d of %d has no file name", i + 1,
                           n_images);
    return n_images > 0 ? need_tower(s) : LT_OK;
}

/* Refuses a prompt longer than max_seq, counting what its image blocks take. */
static lt_status chat_fits(lt_session *s, int nid, int total_blocks) {
    if (nid <= s->max_seq || total_blocks == 0) return LT_OK;
    int mm = s->model->cfg.vision.mm_tokens_per_image;
    return lt_fail(s->err, LT_ERR_ARG,
                   "chat: the conversation takes %d tokens, more than max_seq %d (its %d image "
                   "block(s) take %d each: <start_of_image>, %d image tokens, <end_of_image>; "
                   "pan-and-scan adds a block per crop); start a new conversation (%%chat "
                   "reset), send fewer images, or load with a larger max_seq=",
                   nid, s->max_seq, total_blocks, mm + 2, mm);
}

/* The bytes of one image block's soft tokens ([mm_tokens_per_image, hidden] fp32). */
static size_t soft_token_bytes(const lt_session *s) {
    return sizeof(float) * (size_t)s->model->vision->cfg.mm_tokens_per_image *
           (size_t)s->model->cfg.hidden_size;
}

/* im's soft tokens from its pixels through the tower as it is now (dev: backend scratch of one
 * block's soft tokens): emb (made or overwritten), a fresh serial, the current epoch. */
static lt_status encode_block(lt_session *s, float *dev, chat_img *im) {
    const siglip_tower *t = s->model->vision;
    lt_ctx *ctx = &s->ctx;
    size_t bytes = soft_token_bytes(s);
    lt_status rc = siglip_encode(t, ctx, im->px, dev);
    if (rc != LT_OK) return lt_fail(s->err, rc, "%s", ctx->err);
    if (!im->emb && !(im->emb = malloc(bytes)))
        return lt_fail(s->err, LT_ERR_MEMORY, "out of memory for the images");
    if ((rc = ctx->be->download(ctx, im->emb, dev, bytes)) != LT_OK)
        return lt_fail(s->err, rc, "%s", ctx->err);
    im->serial = ++s->img_serial;
    im->epoch = s->tower_epoch;
    return LT_OK;
}

/* Reads and encodes n image files into their blocks, out[0..sum of 1 + crops[i]) (soft tokens
 * in host memory, fresh serials); po: pan-and-scan (NULL = none), crops: what each file was
 * counted to take. On failure nothing is left allocated. */
static lt_status encode_images(lt_session *s, const char *const *paths, int n,
                               const pan_scan_opts *po, const int *crops, chat_img *out) {
    const siglip_tower *t = s->model->vision;
    lt_ctx *ctx = &s->ctx;
    const lt_backend *be = ctx->be;
    int side = t->cfg.image_size;
    size_t bytes = soft_token_bytes(s);
    int blocks = 0;
    for (int i = 0; i < n; i++)
        blocks += 1 + crops[i];
    memset(out, 0, sizeof *out * (size_t)blocks);
    float *px = NULL;
    float *dev = be->alloc(ctx, bytes);
    lt_status rc = LT_OK;
    if (!dev) rc = lt_fail(s->err, LT_ERR_MEMORY, "chat: out of memory for the images");
    for (int i = 0, b = 0; i < n && rc == LT_OK; i++) {
        if (cancelled(s)) {
            rc = lt_fail(s->err, LT_CANCELLED, "cancelled");
            break;
        }
        int c = 0;
        free(px);
        px = NULL;
        rc = file_pixels(paths[i], side, po, &px, &c, s->err);
        if (rc != LT_OK) {
            lt_fail_prefix(s->err, rc, "chat: image %d of %d (PNG or JPEG files are read)", i + 1,
                           n);
            break;
        }
        if (c != crops[i]) {
            rc = lt_fail(s->err, LT_ERR_IO, "chat: %s changed while it was read", paths[i]);
            break;
        }
        for (int k = 0; k <= c && rc == LT_OK; k++, b++) {
            size_t pxb = sizeof(float) * 3 * (size_t)side * (size_t)side;
            if (!(out[b].px = malloc(pxb))) {
                rc = lt_fail(s->err, LT_ERR_MEMORY, "chat: out of memory for the images");
                break;
            }
            memcpy(out[b].px, px + (size_t)k * 3 * side * side, pxb);
            out[b].crops = k == 0 ? c : -1;
            if ((rc = encode_block(s, dev, &out[b])) != LT_OK) {
                lt_fail_prefix(s->err, rc, "chat: %s", paths[i]);
                break;
            }
        }
    }
    free(px);
    if (dev) be->release(ctx, dev);
    if (rc != LT_OK)
        for (int i = 0; i < blocks; i++)
            chat_img_free(&out[i]);
    return rc;
}

/* Encodes the history's image blocks again where the tower's adapters changed since. */
static lt_status refresh_images(lt_session *s) {
    lt_ctx *ctx = &s->ctx;
    int stale = 0;
    for (int i = 0; i < s->n_imgs; i++)
        stale += s->imgs[i].epoch != s->tower_epoch;
    if (!stale) return LT_OK;
    size_t bytes = soft_token_bytes(s);
    float *dev = ctx->be->alloc(ctx, bytes);
    if (!dev) return lt_fail(s->err, LT_ERR_MEMORY, "chat: out of memory for the images");
    lt_status rc = LT_OK;
    for (int i = 0; i < s->n_imgs && rc == LT_OK; i++)
        if (s->imgs[i].epoch != s->tower_epoch) {
            rc = encode_block(s, dev, &s->imgs[i]);
            if (rc != LT_OK)
                lt_fail_prefix(s->err, rc,
                               "chat: encoding an earlier image again after its adapters changed");
        }
    ctx->be->release(ctx, dev);
    return rc;
}

/* The pan-and-scan crops of each of n files under po into crops[] (all 0 when po is NULL). */
static lt_status count_crops(lt_session *s, const char *const *paths, int n,
                             const pan_scan_opts *po, int *crops) {
    for (int i = 0; i < n; i++) {
        lt_status rc = file_crops(paths[i], po, &crops[i], s->err);
        if (rc != LT_OK)
            return lt_fail_prefix(s->err, rc, "chat: image %d of %d (PNG or JPEG files are read)",
                                  i + 1, n);
    }
    return LT_OK;
}

lt_status lt_chat_prompt_ids(lt_session *s, const char *user_text, const char *const *images,
                             int n_images, const lt_image_opts *io, int32_t **ids, int *n) {
    call_begin(s);
    *ids = NULL;
    *n = 0;
    lt_status rc = chat_check(s, user_text, NULL, 0);
    if (rc == LT_OK && n_images < 0) rc = lt_fail(s->err, LT_ERR_ARG, "chat: %d images", n_images);
    if (rc == LT_OK && n_images > 0) rc = need_tower(s);
    if (rc == LT_OK) rc = image_opts_check(s, io);
    if (rc != LT_OK) return rc;
    pan_scan_opts po;
    const pan_scan_opts *pso = pan_scan_of(io, &po);
    if (pso && n_images > 0 && !images)
        return lt_fail(s->err, LT_ERR_ARG, "chat: pan-and-scan reads the image files: give them");
    int *crops = n_images > 0 ? calloc((size_t)n_images, sizeof(int)) : NULL;
    if (n_images > 0 && !crops) return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
    if (pso) rc = count_crops(s, images, n_images, pso, crops);
    int total = 0;
    if (rc == LT_OK) rc = chat_prompt(s, user_text, n_images, crops, ids, n, &total);
    free(crops);
    return rc;
}

lt_status lt_chat_images(lt_session *s, const char *user_text, const char *const *images,
                         int n_images, const lt_image_opts *io, const lt_gen_opts *o,
                         const lt_callbacks *cb, char **reply) {
    call_begin(s);
    if (reply) *reply = NULL;
    lt_status rc = chat_check(s, user_text, images, n_images);
    if (rc == LT_OK) rc = image_opts_check(s, io);
    if (rc != LT_OK) return rc;
    lt_gen_opts d;
    if (!o) {
        lt_gen_opts_default(&d);
        o = &d;
    }
    if ((rc = gen_opts_check(o, s->err)) != LT_OK) return rc;
    pan_scan_opts po;
    const pan_scan_opts *pso = pan_scan_of(io, &po);
    int32_t *ids = NULL, *gen = NULL;
    int nid = 0, ng = 0, total = 0, nb = n_images; /* nb: this turn's image blocks */
    int *crops = n_images > 0 ? calloc((size_t)n_images, sizeof(int)) : NULL;
    if (n_images > 0 && !crops) return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
    if (pso) rc = count_crops(s, images, n_images, pso, crops);
    for (int i = 0; i < n_images; i++)
        nb += crops[i];
    if (rc == LT_OK) rc = chat_prompt(s, user_text, n_images, crops, &ids, &nid, &total);
    if (rc == LT_OK) rc = chat_fits(s, nid, total);
    /* room for this turn in the history, so that a finished turn is always recorded */
    if (rc == LT_OK && s->n_imgs + nb > s->cap_imgs) {
        int nc = s->cap_imgs ? s->cap_imgs : 8;
        while (nc < s->n_imgs + nb)
            nc *= 2;
        chat_img *ni = realloc(s->imgs, sizeof(chat_img) * (size_t)nc);
        if (ni) {
            s->imgs = ni;
            s->cap_imgs = nc;
        } else {
            rc = lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
        }
    }
    /* the new blocks go after the history's, where they are kept once the turn is done */
    chat_img *fresh = rc == LT_OK && nb > 0 ? s->imgs + s->n_imgs : NULL;
    if (rc == LT_OK) rc = refresh_images(s);
    if (rc == LT_OK && nb > 0) rc = encode_images(s, images, n_images, pso, crops, fresh);
    free(crops);
    const chat_img **all = NULL;
    if (rc == LT_OK && total > 0 && !(all = malloc(sizeof(chat_img *) * (size_t)total)))
        rc = lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
    for (int i = 0; all && i < total; i++)
        all[i] = &s->imgs[i];
    if (rc != LT_OK) {
        if (fresh)
            for (int i = 0; i < nb; i++)
                chat_img_free(&fresh[i]);
        free(ids);
        return rc;
    }
    prompt_imgs pi = {all, total};
    textstream st = {.emit = cb ? cb->text : NULL, .ctx = cb ? cb->ctx : NULL};
    rc = run_generation(s, ids, nid, &pi, o, &st, &gen, &ng, 0);
    free(ids);
    free(gen);
    free(all);
    int kept = 0;
    if (rc == LT_OK || rc == LT_CANCELLED) {
        const char *ans = lt_strbuf_str(&st.text);
        lt_status r1 = history_push(s, "user", user_text, n_images);
        lt_status r2 = r1 == LT_OK ? history_push(s, "model", ans, 0) : r1;
        if (r1 == LT_OK && r2 != LT_OK) { /* a user turn without its reply: take it back */
            s->n_msgs--;
            free(s->roles[s->n_msgs]);
            free(s->contents[s->n_msgs]);
        }
        if (r2 == LT_OK) {
            s->n_imgs += nb; /* the turn is in the history: so are its image blocks */
            kept = 1;
        } else {
            rc = r2;
        }
        if (reply && rc != LT_ERR_MEMORY) {
            *reply = lt_strbuf_take(&st.text);
        }
    }
    if (!kept)
        for (int i = 0; i < nb; i++)
            chat_img_free(&fresh[i]);
    lt_strbuf_free(&st.text);
    return rc;
}

lt_status lt_chat(lt_session *s, const char *user_text, const lt_gen_opts *o,
                  const lt_callbacks *cb, char **reply) {
    return lt_chat_images(s, user_text, NULL, 0, NULL, o, cb, reply);
}

/* ---- fine-tuning and export: the trainer and the exporters get what they work on ---------- */

static trainer_env session_env(lt_session *s) {
    trainer_env e = {s->model, s->tok, &s->ctx, &s->cancel, s->max_seq};
    return e;
}

/* The adapters were attached, trained or loaded: the cache is stale, and so are the history's
 * image blocks where the tower or the projector carries adapters (or carried them before an
 * attach replaced them). */
static void adapters_changed(lt_session *s) {
    const lt_adapters *a = trainer_adapters(s->trainer);
    cache_drop(s);
    if (s->n_imgs && ((a && a->n_tower_slots > 0) || s->tower_adapted)) s->tower_epoch++;
    s->tower_adapted = a && a->n_tower_slots > 0;
}

lt_status lt_lora_attach(lt_session *s, const lt_lora_opts *o, const lt_callbacks *cb) {
    call_begin(s);
    if (!s->model)
        return lt_fail(s->err, LT_ERR_STATE,
                       "%%lora: no model loaded (%%load tiny, or a checkpoint)");
    if (!s->trainer && !(s->trainer = trainer_new()))
        return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
    trainer_env env = session_env(s);
    lt_status rc = trainer_attach(s->trainer, &env, o, s->err);
    adapters_changed(s);
    if (rc != LT_OK) return rc;
    if (cb && cb->message && o->load && *o->load) {
        char m[1200];
        snprintf(m, sizeof m, "loaded the adapter in %s", o->load);
        cb->message(cb->ctx, m);
    }
    return LT_OK;
}

void lt_lora_info_get(const lt_session *s, lt_lora_info *info) {
    memset(info, 0, sizeof *info);
    const lt_adapters *a = trainer_adapters(s->trainer);
    if (!s->model || !a) return;
    info->attached = 1;
    info->full = a->full;
    info->r = a->r;
    info->alpha = a->alpha;
    info->rslora = a->rslora;
    info->dropout = a->dropout;
    info->scale = a->n_slots ? a->slots[0].lora.scale : 0;
    info->n_modules = a->n_slots;
    info->n_trainable = a->n_trainable;
    info->n_total = s->model->n_params;
    snprintf(info->targets, sizeof info->targets, "%s", a->full ? "all weights" : a->targets);
    info->steps_done = trainer_steps_done(s->trainer);
}

lt_status lt_train(lt_session *s, const lt_train_opts *o, const lt_train_callbacks *cb,
                   lt_train_result *res) {
    call_begin(s);
    if (res) memset(res, 0, sizeof *res);
    if (!s->model)
        return lt_fail(s->err, LT_ERR_STATE, "%%train: no model loaded (%%load tiny, then %%lora)");
    int resuming = o->resume && *o->resume;
    if (!resuming && !trainer_adapters(s->trainer))
        return lt_fail(s->err, LT_ERR_STATE,
                       "%%train: nothing to train: attach adapters first (%%lora, or %%lora "
                       "full=true)");
    if (!s->trainer && !(s->trainer = trainer_new()))
        return lt_fail(s->err, LT_ERR_MEMORY, "out of memory");
    trainer_env env = session_env(s);
    int changed = 0;
    lt_status rc = trainer_run(s->trainer, &env, o, cb, res, &changed, s->err);
    if (changed) adapters_changed(s);
    return rc;
}

lt_status lt_grpo(lt_session *s, const lt_grpo_opts *o, const lt_grpo_callbacks *cb,
                  lt_grpo_result *res) {
    call_begin(s);
    if (res) memset(res, 0, sizeof *res);
    if (!s->model)
        return lt_fail(s->err, LT_ERR_STATE, "%%grpo: no model loaded (%%load tiny, then %%lora)");
    if (!trainer_adapters(s->trainer))
        return lt_fail(s->err, LT_ERR_STATE,
                       "%%grpo: nothing to train: attach LoRA adapters first (%%lora)");
    trainer_env env = session_env(s);
    trainer_forget_run(s->trainer); /* a later %train starts a fresh run */
    cache_drop(s);                  /* the rollout and the updates change what the cache holds */
    lt_status rc = grpo_run(trainer_adapters(s->trainer), &env, o, cb, res, s->err);
    adapters_changed(s);
    return rc;
}

lt_status lt_save_adapter(lt_session *s, const char *dir) {
    call_begin(s);
    if (!s->model) return lt_fail(s->err, LT_ERR_STATE, "%%save: no model loaded");
    return peft_save_adapter(trainer_adapters(s->trainer), dir, s->err);
}

/* The folder the model was loaded from (where its config.json is), "" for random weights. */
static void source_dir(const lt_session *s, char *src, size_t cap) {
    const char *tp = s->tok ? tok_path(s->tok) : NULL;
    src[0] = 0;
    if (tp && strncmp(s->model->source, "random:", 7) != 0) {
        snprintf(src, cap, "%s", tp);
        char *slash = strrchr(src, '/');
        if (slash)
            *slash = 0;
        else
            snprintf(src, cap, ".");
    }
}

/* A checkpoint written from the model as it is now (writer: merged_save or quantized_save),
 * beside what it keeps of the checkpoint's own folder and tokenizer. */
typedef lt_status (*checkpoint_writer)(const lt_adapters *a, gemma3_model *m, lt_ctx *dev,
                                       const char *src_dir, const char *tokenizer_path,
                                       const char *dtype, const char *dir, const lt_callbacks *cb,
                                       char *err);

static lt_status save_checkpoint(lt_session *s, checkpoint_writer write, const char *dir,
                                 const char *dtype, const lt_callbacks *cb) {
    call_begin(s);
    if (!s->model) return lt_fail(s->err, LT_ERR_STATE, "%%save: no model loaded");
    char src[4096];
    source_dir(s, src, sizeof src);
    const char *tp = s->tok ? tok_path(s->tok) : NULL;
    lt_ctx *dev = gemma3_on_device(s->model) ? &s->ctx : NULL; /* read back through it */
    return write(trainer_adapters(s->trainer), s->model, dev, src, tp, dtype, dir, cb, s->err);
}

lt_status lt_save_merged(lt_session *s, const char *dir, const char *dtype,
                         const lt_callbacks *cb) {
    return save_checkpoint(s, merged_save, dir, dtype, cb);
}

lt_status lt_save_quantized(lt_session *s, const char *dir, const char *dtype,
                            const lt_callbacks *cb) {
    return save_checkpoint(s, quantized_save, dir, dtype, cb);
}

/* Refuses a target that exists (unless overwrite) or is a folder, before anything is written;
 * creates its missing folder. */
static lt_status export_target(lt_session *s, const char *path, int overwrite) {
    struct stat sb;
    if (stat(path, &sb) == 0) {
        if (S_ISDIR(sb.st_mode))
            return lt_fail(s->err, LT_ERR_ARG,
                           "%s: is a directory; give a file name ending in .gguf", path);
        if (!overwrite)
            return lt_fail(s->err, LT_ERR_IO, "%s: file exists; pass overwrite=true to replace it",
                           path);
    }
    const char *slash = strrchr(path, '/');
    if (slash && slash != path) { /* the folder is created when missing, as %save does */
        char parent[4096];
        snprintf(parent, sizeof parent, "%.*s", (int)(slash - path), path);
        return lt_dir_prepare(parent, s->err);
    }
    return LT_OK;
}

lt_status lt_export_gguf(lt_session *s, const char *path, const char *type, const char *mmproj,
                         int overwrite, const lt_callbacks *cb, lt_export_result *res) {
    if (res) memset(res, 0, sizeof *res);
    if (!s) return LT_ERR_ARG;
    call_begin(s);
    if (!s->model || !s->tok)
        return lt_fail(s->err, LT_ERR_STATE,
                       "%%export_gguf: no model loaded (run %%load first, e.g. %%load tiny)");
    if (!path || !*path) return lt_fail(s->err, LT_ERR_ARG, "%%export_gguf: no output path");
    gguf_export_opts o = {.overwrite = overwrite, .cancel = &s->cancel, .cb = cb};
    if (gguf_ftype_parse(type ? type : "f16", &o.ftype) != 0)
        return lt_fail(s->err, LT_ERR_ARG, "type=%s: not a GGUF type lathe writes; use one of %s",
                       type, GGUF_FTYPE_CHOICES);
    /* the mmproj file: beside the text file unless named; none for a text-only model */
    const gemma3_model *m = s->model;
    char mm_path[4096] = "";
    int want_mm = !(mmproj && strcmp(mmproj, "none") == 0);
    if (mmproj && strcmp(mmproj, "auto") == 0) mmproj = NULL; /* beside the text file */
    if (want_mm && mmproj && *mmproj && !m->vision)
        return lt_fail(s->err, LT_ERR_ARG,
                       "mmproj=%s: this model has no image tower (%s), so there is no mmproj "
                       "file to write; leave mmproj= out to export the text model alone",
                       mmproj, m->vision_error[0] ? m->vision_error : "text only");
    if (want_mm && m->vision) {
        if (mmproj && *mmproj)
            snprintf(mm_path, sizeof mm_path, "%s", mmproj);
        else if (mmproj_default_path(path, mm_path, sizeof mm_path) != 0)
            return lt_fail(s->err, LT_ERR_ARG, "%s: path too long for its mmproj file", path);
        if (strcmp(mm_path, path) == 0)
            return lt_fail(s->err, LT_ERR_ARG,
                           "mmproj=%s: the same path as the text file; give it its own name "
                           "(e.g. mmproj-%s)",
                           mmproj, path);
    }
    lt_status st = export_target(s, path, overwrite);
    if (st == LT_OK && mm_path[0]) st = export_target(s, mm_path, overwrite);
    if (st != LT_OK) return st;

    /* a model copied to the GPU is read back through its backend; a host model in place */
    lt_ctx *dev = gemma3_on_device(s->model) ? &s->ctx : NULL;
    gguf_export_result r = {0}, mr = {0};
    lt_afile_set set = {0};
    if (mm_path[0]) { /* both files appear together or neither does */
        o.set = &set;
        st = mmproj_export_gemma3(m, dev, mm_path, &o, &mr, s->err);
    }
    if (st == LT_OK) st = gguf_export_gemma3(s->model, s->tok, dev, path, &o, &r, s->err);
    if (st == LT_OK && o.set) st = lt_afile_set_commit(&set, s->err);
    lt_afile_set_abort(&set);
    if (st == LT_OK && res) {
        res->bytes = r.bytes;
        res->n_tensors = r.n_tensors;
        res->n_fallback = r.n_fallback;
        if (mm_path[0]) {
            snprintf(res->mmproj_path, sizeof res->mmproj_path, "%s", mm_path);
            res->mmproj_bytes = mr.bytes;
            res->mmproj_tensors = mr.n_tensors;
        } else if (!want_mm) {
            snprintf(res->mmproj_note, sizeof res->mmproj_note, "mmproj=none");
        } else if (m->skipped_vision) {
            snprintf(res->mmproj_note, sizeof res->mmproj_note,
                     "the image tower is not loaded (%.280s)",
                     m->vision_error[0] ? m->vision_error : "it could not be read");
        } else {
            snprintf(res->mmproj_note, sizeof res->mmproj_note, "the model has no image tower");
        }
    }
    return st;
}
