/* train.c — supervised fine-tuning (%train) and the session glue of %lora and %save.
 *
 * One optimizer step = grad_accum micro-batches of `batch` units (a unit is one sample, or
 * with packing one row of samples packed up to max_seq). Gradients of the step are summed
 * and normalised by the label tokens of the whole step (as transformers' ForCausalLMLoss does given
 * num_items_in_batch; not a mean of micro-batch means), clipped by global
 * norm, then AdamW updates with the scheduled learning rate. The data stream runs through
 * the units epoch after epoch, shuffled per epoch with the seed (or in file order).
 *
 * Owns lt_trainer: the adapters of the session and the current run (options, position,
 * losses), so that an interrupted %train continues where it stopped, and checkpoints
 * (save=, save_every=) can be resumed (resume=). A cancel is honoured between
 * micro-batches; weights change only in the optimizer update, so an interrupted step leaves
 * the weights of the last complete step. Must not print; reports through callbacks.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <dirent.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cuda/base/atomic_file.h"
#include "cuda/formats/image.h"
#include "cuda/model/siglip.h"
#include "cuda/train/train.h"

struct lt_trainer {
    lt_adapters *ad;
    /* the current run */
    int active; /* a run exists */
    int finished;
    char key[4096];  /* its options, canonical, to recognise "the same %train again" */
    int step, total; /* optimizer steps done / planned */
    int64_t pos;     /* units consumed (global stream position) */
    int64_t tokens;
    float *losses;
    int n_losses, cap_losses;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void run_reset(lt_trainer *t) {
    t->active = t->finished = 0;
    t->key[0] = 0;
    t->step = t->total = 0;
    t->pos = t->tokens = 0;
    t->n_losses = 0;
    if (t->ad) optim_reset(t->ad);
}

void trainer_free(lt_trainer *t) {
    if (!t) return;
    lora_free(t->ad);
    free(t->losses);
    free(t);
}

lt_trainer *trainer_new(void) {
    return calloc(1, sizeof(lt_trainer));
}

void trainer_forget_run(lt_trainer *t) {
    if (t) run_reset(t);
}

lt_adapters *trainer_adapters(const lt_trainer *t) {
    return t ? t->ad : NULL;
}

int trainer_steps_done(const lt_trainer *t) {
    return t ? t->step : 0;
}

static int push_loss(lt_trainer *t, float l) {
    if (t->n_losses == t->cap_losses) {
        int nc = t->cap_losses ? t->cap_losses * 2 : 64;
        float *nl = realloc(t->losses, sizeof(float) * (size_t)nc);
        if (!nl) return -1;
        t->losses = nl;
        t->cap_losses = nc;
    }
    t->losses[t->n_losses++] = l;
    return 0;
}

/* ---- %lora ----------------------------------------------------------------------------------- */

/* Replacing adapters: the old ones are unhooked first (so a failed attach can hook them back),
 * except full fine-tuning, which is freed first (its trained weights stay in the model). */
static void hooks_set(lt_adapters *a, int on) {
    for (int i = 0; a && i < a->n_slots; i++) {
        lora_slot *sl = &a->slots[i];
        if (on)
            sl->w->lora = &sl->lora;
        else if (sl->w->lora == &sl->lora)
            sl->w->lora = NULL;
    }
}

static void swap_begin(lt_trainer *t) {
    if (!t || !t->ad) return;
    if (t->ad->full) {
        lora_free(t->ad);
        t->ad = NULL;
        return;
    }
    hooks_set(t->ad, 0);
}

static void swap_end(lt_trainer *t, lt_adapters *fresh) {
    if (!fresh) { /* failed: the old adapters come back */
        if (t && t->ad) hooks_set(t->ad, 1);
        return;
    }
    if (t->ad) lora_free(t->ad); /* unhooked: frees only its own tensors */
    t->ad = fresh;
    run_reset(t);
}

lt_status trainer_attach(lt_trainer *t, const trainer_env *env, const lt_lora_opts *o, char *err) {
    lt_adapters *a = NULL;
    lt_status rc;
    swap_begin(t);
    if (o->load && *o->load) {
        rc = peft_load_adapter(&a, env->model, env->ctx, o->load, err);
    } else {
        lora_opts lo = {.r = o->r,
                        .alpha = o->alpha,
                        .rslora = o->rslora,
                        .dropout = o->dropout,
                        .seed = o->seed,
                        .targets = o->targets,
                        .full = o->full};
        rc = lora_attach(&a, env->model, env->ctx, &lo, err);
    }
    swap_end(t, rc == LT_OK ? a : NULL);
    return rc;
}

/* ---- options --------------------------------------------------------------------------------- */

static lt_status check_opts(const lt_train_opts *o, lr_schedule *sched, char *err) {
    if (!(o->lr > 0) || !isfinite(o->lr))
        return lt_fail(err, LT_ERR_ARG, "%%train: lr=%g; it must be a number > 0", o->lr);
    if (o->batch < 1)
        return lt_fail(err, LT_ERR_ARG, "%%train: batch=%d; it must be >= 1", o->batch);
    if (o->grad_accum < 1)
        return lt_fail(err, LT_ERR_ARG, "%%train: grad_accum=%d; it must be >= 1", o->grad_accum);
    if (o->steps < 0)
        return lt_fail(err, LT_ERR_ARG, "%%train: steps=%d; it must be >= 0 (0 = from epochs)",
                       o->steps);
    if (o->steps == 0 && !(o->epochs > 0))
        return lt_fail(err, LT_ERR_ARG, "%%train: epochs=%g; give epochs > 0 or steps >= 1",
                       o->epochs);
    if (o->warmup < 0)
        return lt_fail(err, LT_ERR_ARG, "%%train: warmup=%d; it must be >= 0 steps", o->warmup);
    if (o->weight_decay < 0)
        return lt_fail(err, LT_ERR_ARG, "%%train: weight_decay=%g must be >= 0", o->weight_decay);
    if (o->max_grad_norm < 0)
        return lt_fail(err, LT_ERR_ARG, "%%train: max_grad_norm=%g must be >= 0 (0 = off)",
                       o->max_grad_norm);
    if (o->save_every < 0)
        return lt_fail(err, LT_ERR_ARG, "%%train: save_every=%d must be >= 0", o->save_every);
    if (o->keep < 0) return lt_fail(err, LT_ERR_ARG, "%%train: keep=%d must be >= 0", o->keep);
    if (o->max_seq < 0)
        return lt_fail(err, LT_ERR_ARG, "%%train: max_seq=%d must be >= 0", o->max_seq);
    /* torch.optim.AdamW's own checks (0 <= beta < 1, eps >= 0): beta2 = 1 would divide the
     * bias correction by zero. No magic sets them; a resumed checkpoint carries them. */
    if (!(o->beta1 >= 0 && o->beta1 < 1) || !(o->beta2 >= 0 && o->beta2 < 1))
        return lt_fail(err, LT_ERR_ARG,
                       "%%train: AdamW betas (%g, %g); each must be in [0, 1), as "
                       "torch.optim.AdamW requires (no magic sets them: they come from "
                       "resume='s trainer_state.json)",
                       o->beta1, o->beta2);
    if (!(o->eps >= 0) || !isfinite(o->eps))
        return lt_fail(err, LT_ERR_ARG, "%%train: AdamW eps=%g; it must be a number >= 0", o->eps);
    if (optim_schedule_parse(o->schedule, sched) != 0)
        return lt_fail(err, LT_ERR_ARG, "%%train: schedule=%s; accepted: constant|linear|cosine",
                       o->schedule);
    if (o->optim && strcmp(o->optim, "adamw") != 0)
        return lt_fail(err, LT_ERR_ARG, "%%train: optim=%s; accepted: adamw", o->optim);
    return LT_OK;
}

/* The options that define a run, as one canonical string. */
static void opts_key(const lt_train_opts *o, int max_seq, char *out, size_t cap) {
    snprintf(out, cap,
             "data=%s|format=%s|batch=%d|grad_accum=%d|steps=%d|epochs=%.9g|lr=%.9g|warmup=%d|"
             "schedule=%s|"
             "wd=%.9g|clip=%.9g|b1=%.9g|b2=%.9g|eps=%.9g|max_seq=%d|ro=%d|packing=%d|seed=%llu|"
             "shuffle=%d",
             o->data ? o->data : "", o->format ? o->format : "auto", o->batch, o->grad_accum,
             o->steps, (double)o->epochs, (double)o->lr, o->warmup,
             o->schedule ? o->schedule : "linear", (double)o->weight_decay,
             (double)o->max_grad_norm, (double)o->beta1, (double)o->beta2, (double)o->eps, max_seq,
             o->responses_only, o->packing, (unsigned long long)o->seed, o->shuffle);
}

/* ---- units and the data stream ------------------------------------------------------------------
 */

typedef struct unit_list {
    int *start, *count; /* unit u = samples idx[start[u] .. start[u]+count[u]) */
    int *idx;
    int n;
} unit_list;

static void units_free(unit_list *u) {
    free(u->start);
    free(u->count);
    free(u->idx);
    memset(u, 0, sizeof *u);
}

/* One unit per sample, or (packing) rows filled in file order up to max_seq tokens. */
static int units_build(unit_list *u, const train_data *d, int packing, int max_seq) {
    memset(u, 0, sizeof *u);
    u->start = malloc(sizeof(int) * (size_t)d->n);
    u->count = malloc(sizeof(int) * (size_t)d->n);
    u->idx = malloc(sizeof(int) * (size_t)d->n);
    if (!u->start || !u->count || !u->idx) return -1;
    int fill = 0;
    for (int i = 0; i < d->n; i++) {
        u->idx[i] = i;
        if (packing && u->n > 0 && fill + d->s[i].n <= max_seq) {
            u->count[u->n - 1]++;
            fill += d->s[i].n;
            continue;
        }
        u->start[u->n] = i;
        u->count[u->n] = 1;
        u->n++;
        fill = d->s[i].n;
    }
    return 0;
}

/* The units in stream order (epoch_order over the units). */
typedef struct stream {
    const unit_list *u;
    epoch_order order;
} stream;

/* Packs the samples of `nu` units starting at stream position pos into one micro-batch; the
 * image rows come from soft (each distinct image's soft tokens), or are left for tower_rows
 * when soft is NULL (the tower trains). */
static int batch_build(train_batch *b, stream *st, const train_data *d, int64_t pos, int nu,
                       const float *soft, int mm, int64_t H) {
    memset(b, 0, sizeof *b);
    int N = 0, nseg = 0, nimg = 0;
    for (int k = 0; k < nu; k++) {
        int u = epoch_order_at(&st->order, pos + k);
        for (int j = 0; j < st->u->count[u]; j++) {
            N += d->s[st->u->idx[st->u->start[u] + j]].n;
            nimg += d->s[st->u->idx[st->u->start[u] + j]].n_images;
        }
        nseg += st->u->count[u];
    }
    float *rows = NULL; /* the image rows, block after block */
    if (nimg > 0 && !(rows = malloc(sizeof(float) * (size_t)nimg * (size_t)mm * (size_t)H)))
        return -1;
    b->image_embeds = rows;
    b->n_image_tokens = nimg * mm;
    b->ids = malloc(sizeof(int32_t) * (size_t)N);
    b->targets = malloc(sizeof(int32_t) * (size_t)N);
    b->seg_len = malloc(sizeof(int) * (size_t)nseg);
    if (!b->ids || !b->targets || !b->seg_len) return -1;
    int t = 0;
    for (int k = 0; k < nu; k++) {
        int u = epoch_order_at(&st->order, pos + k);
        for (int j = 0; j < st->u->count[u]; j++) {
            const train_sample *s = &d->s[st->u->idx[st->u->start[u] + j]];
            b->seg_len[b->n_seg++] = s->n;
            for (int k2 = 0; k2 < s->n_images && soft; k2++, rows += (size_t)mm * (size_t)H)
                memcpy(rows, soft + (size_t)s->images[k2] * (size_t)mm * (size_t)H,
                       sizeof(float) * (size_t)mm * (size_t)H);
            for (int i = 0; i < s->n; i++) {
                b->ids[t + i] = s->ids[i];
                /* token i predicts token i+1 when that one is a label */
                int lab = i + 1 < s->n && s->mask[i + 1];
                b->targets[t + i] = lab ? s->ids[i + 1] : -100;
                b->n_labels += lab;
            }
            t += s->n;
        }
    }
    b->N = N;
    return 0;
}

static void batch_free(train_batch *b) {
    free(b->ids);
    free(b->targets);
    free(b->seg_len);
    free((float *)b->image_embeds);
    free(b->image_grads);
    memset(b, 0, sizeof *b);
}

/* ---- checkpoints ------------------------------------------------------------------------------
 */

/* The checkpoint folder to resume: DIR itself when it has trainer_state.json, else its
 * checkpoint-N with the largest N. */
static int resolve_checkpoint(const char *dir, char *out, size_t cap) {
    char p[4200];
    snprintf(p, sizeof p, "%s/trainer_state.json", dir);
    if (access(p, R_OK) == 0) {
        snprintf(out, cap, "%s", dir);
        return 0;
    }
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *e;
    long best = -1;
    while ((e = readdir(d))) {
        char *end;
        if (strncmp(e->d_name, "checkpoint-", 11) != 0) continue;
        long n = strtol(e->d_name + 11, &end, 10);
        if (*end || n <= best) continue;
        snprintf(p, sizeof p, "%s/%s/trainer_state.json", dir, e->d_name);
        if (access(p, R_OK) == 0) best = n;
    }
    closedir(d);
    if (best < 0) return -1;
    snprintf(out, cap, "%s/checkpoint-%ld", dir, best);
    return 0;
}

/* ---- resume= with other options ------------------------------------------------------------ */

/* The options a resumed run may be given anew: APPLY ones replace the checkpoint's (the length
 * of the run, the optimizer), SAME ones must equal it (they decide the batches: another value
 * would not continue the run but make another one). */
typedef enum resume_rule { RESUME_APPLY, RESUME_SAME } resume_rule;
typedef struct resume_field {
    const char *name;
    char kind; /* i int, f float, u uint64, b flag, s text */
    size_t off;
    resume_rule rule;
} resume_field;

#define RF(n, k, r)                                                                                \
    { #n, k, offsetof(lt_train_opts, n), r }
static const resume_field resume_fields[] = {
    RF(steps, 'i', RESUME_APPLY),
    RF(epochs, 'f', RESUME_APPLY),
    RF(lr, 'f', RESUME_APPLY),
    RF(warmup, 'i', RESUME_APPLY),
    RF(schedule, 's', RESUME_APPLY),
    RF(weight_decay, 'f', RESUME_APPLY),
    RF(max_grad_norm, 'f', RESUME_APPLY),
    RF(format, 's', RESUME_SAME),
    RF(batch, 'i', RESUME_SAME),
    RF(grad_accum, 'i', RESUME_SAME),
    RF(max_seq, 'i', RESUME_SAME),
    RF(responses_only, 'b', RESUME_SAME),
    RF(packing, 'b', RESUME_SAME),
    RF(seed, 'u', RESUME_SAME),
    RF(shuffle, 'b', RESUME_SAME),
};
#undef RF

/* Whether name is one of the comma-separated names in list. */
static int name_listed(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list; p && *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0) return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

static void field_text(const lt_train_opts *o, const resume_field *f, char *out, size_t cap) {
    const char *at = (const char *)o + f->off;
    switch (f->kind) {
    case 'i':
        snprintf(out, cap, "%d", *(const int *)at);
        break;
    case 'b':
        snprintf(out, cap, "%s", *(const int *)at ? "true" : "false");
        break;
    case 'f':
        snprintf(out, cap, "%g", (double)*(const float *)at);
        break;
    case 'u':
        snprintf(out, cap, "%llu", (unsigned long long)*(const uint64_t *)at);
        break;
    default: {
        const char *v = *(const char *const *)at;
        snprintf(out, cap, "%s", v ? v : "");
    }
    }
}

/* o holds the checkpoint's options; the ones given in o_in (o_in->given) replace them or are
 * refused, per resume_fields. `applied` lists what changed, for the resume message. */
static lt_status resume_merge(lt_train_opts *o, const lt_train_opts *o_in, const char *ck,
                              int ck_step, char *applied, size_t cap, char *err) {
    applied[0] = 0;
    if (!o_in->given) return LT_OK;
    size_t used = 0;
    for (size_t i = 0; i < sizeof resume_fields / sizeof resume_fields[0]; i++) {
        const resume_field *f = &resume_fields[i];
        if (!name_listed(o_in->given, f->name)) continue;
        char was[2100], now[2100];
        field_text(o, f, was, sizeof was);
        field_text(o_in, f, now, sizeof now);
        if (strcmp(was, now) == 0) continue;
        if (f->rule == RESUME_SAME)
            return lt_fail(err, LT_ERR_ARG,
                           "%%train resume=%s: %s=%s differs from the checkpoint's %s=%s, and a "
                           "resumed run needs the batches of the run it continues: leave %s= out "
                           "(the checkpoint's is used), or train anew without resume=",
                           ck, f->name, now, f->name, was, f->name);
        size_t sz = f->kind == 's'   ? sizeof(const char *)
                    : f->kind == 'f' ? sizeof(float)
                    : f->kind == 'u' ? sizeof(uint64_t)
                                     : sizeof(int);
        memcpy((char *)o + f->off, (const char *)o_in + f->off, sz);
        int n = snprintf(applied + used, cap - used, "%s%s=%s (the checkpoint's: %s)",
                         used ? ", " : "", f->name, now, was);
        if (n > 0 && (size_t)n < cap - used) used += (size_t)n;
    }
    /* epochs= alone measures the run in epochs, as without resume= */
    if (name_listed(o_in->given, "epochs") && !name_listed(o_in->given, "steps")) o->steps = 0;
    if (name_listed(o_in->given, "steps") && o->steps > 0 && o->steps <= ck_step)
        return lt_fail(err, LT_ERR_ARG,
                       "%%train resume=%s: the checkpoint is at step %d already, so steps=%d "
                       "leaves nothing to do: give more steps (the total of the run)",
                       ck, ck_step, o->steps);
    return LT_OK;
}

/* ---- the memory plan ------------------------------------------------------------------------ */

/* Bytes free where the training buffers will live: the backend's free memory plus the blocks
 * its allocator holds but does not use. 0 = unknown. */
static double memory_available(lt_ctx *ctx, lt_mem_info *mi) {
    ctx->be->memory(ctx, mi);
    return (double)mi->free + (double)mi->cached;
}

/* The temporaries inside the tower's ops for one image, the largest op's: attention's, whose
 * score chunks the CUDA backend keeps under 256 MiB ([heads, rows, patches] fp32 scores plus
 * their 16-bit copy, twice that in the backward: P and dP) beside its packed K and V, larger at
 * 4B (P = 4096: 256 MiB + 36 MiB) than the 16-bit copies of the MLP's inputs (fc1's backward:
 * [P, I] and [P, D], 43 MiB). */
static double tower_work(const siglip_tower *t, int backward) {
    siglip_dims d;
    siglip_dims_get(t, &d);
    double P = (double)d.P, scores = (double)d.nh * P * P * (backward ? 12 : 6);
    double chunk = scores < 256.0 * 1048576 ? scores : 256.0 * 1048576;
    double attn = chunk + 2.0 * P * (double)d.D * 4, mlp = P * (double)(d.I + d.D) * 2;
    return attn > mlp ? attn : mlp;
}

static lt_status memory_plan(const gemma3_model *m, const lt_adapters *a, lt_ctx *ctx,
                             int64_t max_tokens, const train_data *d, int64_t max_img_tokens,
                             const lt_train_callbacks *cb, char *err) {
    const gemma3_config *c = &m->cfg;
    double H = c->hidden_size, N = (double)max_tokens;
    double QD = (double)c->num_attention_heads * c->head_dim,
           KD = (double)c->num_key_value_heads * c->head_dim;
    double weights = (double)m->weight_bytes;
    double trainable = (double)a->n_trainable * 4 * 4; /* value (LoRA) + grad + m + v */
    size_t dev_bytes, host_bytes;
    gemma3_train_bytes(m, ctx, lora_trainable((lt_adapters *)a), max_tokens,
                       a->dropout > 0.0f && !a->full, &dev_bytes, &host_bytes);
    double layer = (double)dev_bytes;
    /* inside the ops: 16-bit copies of matmul and attention inputs, the loss's logits chunk */
    double work = N * (H + 2 * QD + 2 * KD) * 2 + 8.0 * 1024 * 1024 * 4;
    /* images: the tower's activations for one image (encoding runs before step 1, so the
     * larger of the two phases counts), each distinct image's soft tokens (host) and a
     * micro-batch's image rows (the device copy) */
    double tower = 0, soft = 0;
    int trained = m->vision && a->n_tower_slots > 0;
    if (d->n_images > 0 && m->vision) {
        double per = (double)m->cfg.vision.mm_tokens_per_image * H * 4;
        tower = (double)siglip_encode_bytes(m->vision) + tower_work(m->vision, 0) + per;
        soft = per * d->n_images;
        layer += (double)max_img_tokens * H * 4;
        if (trained) { /* each image's backward after the step's language-model pass */
            double bw = (double)siglip_backward_bytes(m->vision, a->dropout > 0.0f) +
                        tower_work(m->vision, 1) + per;
            tower = bw > tower ? bw : tower;
            soft = (double)max_img_tokens * H * 4; /* the rows' gradients; no soft-token cache */
        }
    }
    double total = trainable + (layer + work > tower ? layer + work : tower);
    lt_mem_info mi;
    double avail = memory_available(ctx, &mi);
    const char *where = mi.where;
    int on_device = mi.on_device;
    if (cb && cb->message) {
        char msg[1200], img[400] = "";
        if (tower > 0 && trained)
            snprintf(img, sizeof img,
                     "; image tower trained (%d adapters, from its layer %d of %d): %.1f MiB for "
                     "one image's backward (the inputs of the layers it goes through kept, one "
                     "layer's activations and gradients, its ops' temporaries), image-row "
                     "gradients %.1f MiB in %s",
                     a->n_tower_slots, siglip_first_trained_layer(m->vision),
                     m->vision->cfg.num_hidden_layers, tower / 1048576, soft / 1048576,
                     on_device ? "host memory" : "memory");
        else if (tower > 0)
            snprintf(img, sizeof img,
                     "; image tower %.1f MiB for one image (before step 1), soft tokens of %d "
                     "image(s) %.1f MiB in %s",
                     tower / 1048576, d->n_images, soft / 1048576,
                     on_device ? "host memory" : "memory");
        snprintf(msg, sizeof msg,
                 "memory plan: weights %.1f MiB (loaded), trainable + grads + AdamW %.1f MiB, "
                 "activations of one layer %.1f MiB, workspace %.1f MiB: %.1f MiB more %s; layer "
                 "checkpoints %.1f MiB in %s (%lld tokens per micro-batch)%s",
                 weights / 1048576, trainable / 1048576, layer / 1048576, work / 1048576,
                 total / 1048576, where, (double)host_bytes / 1048576,
                 on_device ? "host memory" : "memory", (long long)max_tokens, img);
        cb->message(cb->ctx, msg);
    }
    if (!on_device) total += (double)host_bytes + soft;
    if (avail > 0 && total > avail)
        return lt_fail(err, LT_ERR_MEMORY,
                       "%%train needs about %.0f MiB more %s but %.0f MiB are free: lower batch= "
                       "or max_seq=, or use grad_accum= for the same effective batch",
                       total / 1048576, where, avail / 1048576);
    return LT_OK;
}

/* ---- %train -----------------------------------------------------------------------------------
 */

void train_say(void (*message)(void *ctx, const char *text), void *ctx, const char *fmt, ...) {
    if (!message) return;
    char buf[1500];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    message(ctx, buf);
}

static void data_message(void *ctx, const char *text) {
    const lt_train_callbacks *cb = ctx;
    if (cb && cb->message) cb->message(cb->ctx, text);
}

/* Reading a large dataset (64 MiB or more) shows as a line per tenth of the file. */
static void data_progress(void *ctx, const char *what, int64_t done, int64_t total) {
    const lt_train_callbacks *cb = ctx;
    if (!cb || !cb->message || total < ((int64_t)64 << 20) || done <= 0) return;
    int64_t step = total / 10, chunk = (int64_t)1 << 20;
    if (done < total && done / step == (done - chunk) / step) return; /* reads are 1 MiB chunks */
    char msg[160];
    snprintf(msg, sizeof msg, "%s the dataset: %lld of %lld MiB", what, (long long)(done >> 20),
             (long long)(total >> 20));
    cb->message(cb->ctx, msg);
}

/* The soft tokens of every distinct image of d, made once by the frozen image tower (no
 * gradient goes through it), into *soft (host memory, [n_images, mm, H]). An image that cannot
 * be read or is not a PNG or JPEG is refused naming the first row that uses it. With the
 * tower's adapters training (tower_trained), only the checks run and *soft stays NULL: the
 * soft tokens change with every step, so each micro-batch makes its own (tower_rows). */
static lt_status encode_images(const trainer_env *env, const train_data *d,
                               const lt_train_callbacks *cb, int tower_trained, float **soft,
                               char *err) {
    const gemma3_model *m = env->model;
    const siglip_tower *tw = m->vision;
    lt_ctx *ctx = env->ctx;
    const lt_backend *be = ctx->be;
    *soft = NULL;
    if (!tw)
        return lt_fail(err, LT_ERR_ARG, "%%train: %s %s %d has images, but %s", d->file, d->unit,
                       d->images[0].line,
                       m->vision_error[0] ? m->vision_error : "this model has no image tower");
    if (!be->attention_span_backward)
        return lt_fail(err, LT_ERR_STATE,
                       "%%train: %s %s %d has images, and the %s backend has no "
                       "attention_span_backward op, which training on image blocks needs: "
                       "%%load the model with device=cpu",
                       d->file, d->unit, d->images[0].line, be->name);
    if (tower_trained) {
        train_say(cb ? cb->message : NULL, cb ? cb->ctx : NULL,
                  "%d image(s): the image tower's adapters train, so each step encodes its "
                  "images anew and trains through the tower",
                  d->n_images);
        return LT_OK;
    }
    int side = tw->cfg.image_size;
    size_t per = (size_t)tw->cfg.mm_tokens_per_image * (size_t)m->cfg.hidden_size;
    float *px = malloc(sizeof(float) * 3 * (size_t)side * (size_t)side);
    float *out = malloc(sizeof(float) * per * (size_t)d->n_images);
    float *dev = be->alloc(ctx, sizeof(float) * per);
    lt_status rc = LT_OK;
    if (!px || !out || !dev) rc = lt_fail(err, LT_ERR_MEMORY, "%%train: out of memory for images");
    train_say(cb ? cb->message : NULL, cb ? cb->ctx : NULL,
              "encoding %d image(s) with the image tower (once each)", d->n_images);
    for (int i = 0; i < d->n_images && rc == LT_OK; i++) {
        const train_image *im = &d->images[i];
        if (atomic_load(env->cancel)) {
            rc = lt_fail(err, LT_CANCELLED, "%%train: cancelled while encoding the images");
            break;
        }
        char ierr[LT_ERRLEN];
        if ((rc = img_load_pixels(px, im->path, side, ierr)) != LT_OK) {
            lt_fail(err, rc, "%%train: %s %s %d: %s (give a PNG or JPEG file)", d->file, d->unit,
                    im->line, ierr);
            break;
        }
        if ((rc = siglip_encode(tw, ctx, px, dev)) != LT_OK ||
            (rc = be->download(ctx, out + per * (size_t)i, dev, sizeof(float) * per)) != LT_OK) {
            lt_fail(err, rc, "%%train: %s %s %d: %s: %s", d->file, d->unit, im->line, im->path,
                    ctx->err);
            break;
        }
    }
    free(px);
    if (dev) be->release(ctx, dev);
    if (rc != LT_OK) {
        free(out);
        return rc;
    }
    *soft = out;
    return LT_OK;
}

/* The images of a micro-batch's blocks, in order (the data's image indices), into *out
 * (malloc'd; NULL when none): batch_build's walk over the same units. */
static int batch_images(stream *st, const train_data *d, int64_t pos, int nu, int **out, int *n) {
    *out = NULL;
    *n = 0;
    int cap = 0;
    for (int k = 0; k < nu; k++) {
        int u = epoch_order_at(&st->order, pos + k);
        for (int j = 0; j < st->u->count[u]; j++) {
            const train_sample *s = &d->s[st->u->idx[st->u->start[u] + j]];
            for (int k2 = 0; k2 < s->n_images; k2++) {
                if (*n == cap) {
                    cap = cap ? 2 * cap : 8;
                    int *ni = realloc(*out, sizeof(int) * (size_t)cap);
                    if (!ni) return -1;
                    *out = ni;
                }
                (*out)[(*n)++] = s->images[k2];
            }
        }
    }
    return 0;
}

/* With the tower's adapters training: encodes the n images of a micro-batch with the current
 * adapters into b's image rows (host), or (backward) runs the tower's backward of each image
 * from b->image_grads, accumulating the tower adapters' gradients. */
static lt_status tower_rows(const trainer_env *env, const train_data *d, const int *images, int n,
                            train_batch *b, int backward, uint64_t drop_seed, char *err) {
    const gemma3_model *m = env->model;
    const siglip_tower *tw = m->vision;
    lt_ctx *ctx = env->ctx;
    const lt_backend *be = ctx->be;
    int side = tw->cfg.image_size;
    size_t per = (size_t)tw->cfg.mm_tokens_per_image * (size_t)m->cfg.hidden_size;
    float *px = malloc(sizeof(float) * 3 * (size_t)side * (size_t)side);
    float *dev = be->alloc(ctx, sizeof(float) * per);
    lt_status rc = LT_OK;
    if (!px || !dev) rc = lt_fail(err, LT_ERR_MEMORY, "%%train: out of memory for images");
    for (int i = 0; i < n && rc == LT_OK; i++) {
        const train_image *im = &d->images[images[i]];
        char ierr[LT_ERRLEN];
        if ((rc = img_load_pixels(px, im->path, side, ierr)) != LT_OK) {
            lt_fail(err, rc, "%%train: %s %s %d: %s (give a PNG or JPEG file)", d->file, d->unit,
                    im->line, ierr);
            break;
        }
        float *rows = (backward ? b->image_grads : (float *)b->image_embeds) + per * (size_t)i;
        /* LoRA dropout: one mask seed per image block, the same for its forward and backward */
        uint64_t seed =
            drop_seed ? train_mix64(drop_seed ^ (0x51ed2701ull * (uint64_t)(i + 1))) | 1u : 0;
        if (backward) {
            if ((rc = be->upload(ctx, dev, rows, sizeof(float) * per)) == LT_OK)
                rc = siglip_backward(tw, ctx, px, dev, seed);
        } else if ((rc = siglip_encode_train(tw, ctx, px, dev, seed)) == LT_OK) {
            rc = be->download(ctx, rows, dev, sizeof(float) * per);
        }
        if (rc != LT_OK)
            lt_fail(err, rc, "%%train: %s %s %d: %s: %s", d->file, d->unit, im->line, im->path,
                    ctx->err);
    }
    free(px);
    if (dev) be->release(ctx, dev);
    return rc;
}

lt_status trainer_run(lt_trainer *t, const trainer_env *env, const lt_train_opts *o_in,
                      const lt_train_callbacks *cb, lt_train_result *res, int *weights_changed,
                      char *err) {
    lt_train_result dummy;
    if (!res) res = &dummy;
    memset(res, 0, sizeof *res);
    *weights_changed = 0;
    const char *missing = lt_backend_missing_training_op(env->ctx->be);
    if (missing)
        return lt_fail(err, LT_ERR_STATE,
                       "%%train: the %s backend has no %s op; %%load the model "
                       "with device=cpu",
                       env->ctx->be->name, missing);
    lt_train_opts o = *o_in;
    trainer_state_texts rs;
    trainer_state state = {0};
    const int resuming = o_in->resume && *o_in->resume;
    char ck[4096] = "", applied[1200] = "";
    lt_status rc = LT_OK;

    if (resuming) {
        if (resolve_checkpoint(o_in->resume, ck, sizeof ck) != 0)
            return lt_fail(
                err, LT_ERR_IO,
                "%%train resume=%s: no checkpoint there (a folder with trainer_state.json, "
                "or a save= folder holding checkpoint-N folders)",
                o_in->resume);
        if ((rc = trainer_state_read(ck, &state, &o, &rs, err)) != LT_OK) {
            lt_fail_prefix(err, rc, "%%train resume");
            return rc;
        }
        if ((rc = resume_merge(&o, o_in, ck, state.step, applied, sizeof applied, err)) != LT_OK) {
            trainer_state_free(&state);
            return rc;
        }
        o.save = o_in->save;
        o.save_every = o_in->save_every;
        o.keep = o_in->keep;
        o.resume = NULL;
        if (o_in->data && *o_in->data) o.data = o_in->data; /* the same data, moved */
        /* the adapters of the checkpoint replace the ones attached */
        lt_adapters *a = NULL;
        if (state.full) {
            if (!t->ad || !t->ad->full) {
                lora_opts lo = {.full = 1};
                swap_begin(t);
                rc = lora_attach(&a, env->model, env->ctx, &lo, err);
                swap_end(t, rc == LT_OK ? a : NULL);
            }
        } else {
            swap_begin(t);
            rc = peft_load_adapter(&a, env->model, env->ctx, ck, err);
            swap_end(t, rc == LT_OK ? a : NULL);
        }
        if (rc != LT_OK) {
            trainer_state_free(&state);
            return rc;
        }
        run_reset(t);
        if ((rc = ckpt_load(t->ad, ck, state.step, err)) != LT_OK) {
            trainer_state_free(&state);
            return rc;
        }
        *weights_changed = 1;
    }
    if (!t->ad) {
        trainer_state_free(&state);
        return lt_fail(
            err, LT_ERR_STATE,
            "%%train: nothing to train: attach adapters first (%%lora, or %%lora full=true)");
    }
    lt_adapters *ad = t->ad;
    lr_schedule sched = SCHED_LINEAR;
    if ((rc = check_opts(&o, &sched, err)) != LT_OK) goto out_state;
    int max_seq = o.max_seq > 0 ? o.max_seq : env->max_seq;
    if (max_seq <= 0 || max_seq > env->model->cfg.max_position_embeddings)
        max_seq = env->model->cfg.max_position_embeddings;
    if (o.save && *o.save && (rc = lt_dir_prepare(o.save, err)) != LT_OK) {
        lt_fail_prefix(err, rc, "%%train save=");
        goto out_state;
    }

    /* data */
    train_data d;
    float *soft = NULL; /* [d.n_images, mm, H] host: each distinct image's soft tokens */
    const gemma3_model *gm = env->model;
    const char *no_tower = gm->vision ? NULL
                           : gm->vision_error[0]
                               ? gm->vision_error
                               : "this model has no image tower (a text-only model)";
    data_opts dopt = {o.data, o.format, max_seq, o.responses_only, env->cancel, 0, 0, no_tower};
    lt_callbacks dcb = {(void *)cb, data_message, data_progress, NULL};
    if ((rc = data_load(&d, &dopt, env->tok, &env->model->cfg, &dcb, err)) != LT_OK) goto out_state;
    int tower_trained = gm->vision && ad->n_tower_slots > 0;
    if (d.n_images > 0 && (rc = encode_images(env, &d, cb, tower_trained, &soft, err)) != LT_OK)
        goto out_data;
    unit_list u;
    if (units_build(&u, &d, o.packing, max_seq) != 0) {
        rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
        goto out_data;
    }
    int per_step = o.batch * o.grad_accum;
    int steps_per_epoch = (u.n + per_step - 1) / per_step;
    int total = o.steps > 0 ? o.steps : (int)ceil((double)o.epochs * u.n / per_step);
    if (total < 1) total = 1;

    /* continue the same run, or start a new one */
    char key[4096];
    opts_key(&o, max_seq, key, sizeof key);
    if (resuming) {
        if (state.units != u.n) {
            rc = lt_fail(err, LT_ERR_ARG,
                         "resume=%s: the data now makes %d units but the checkpoint was made with "
                         "%d; resume needs the same data and options",
                         ck, u.n, state.units);
            goto out_units;
        }
        /* every step consumes batch x grad_accum units from the start of the stream */
        if (state.position != (int64_t)state.step * per_step) {
            rc = lt_fail(err, LT_ERR_FORMAT,
                         "resume=%s: trainer_state.json says position %lld at step %d, but with "
                         "batch=%d x grad_accum=%d step %d ends at %lld; the file was changed by "
                         "hand or damaged: resume from another checkpoint",
                         ck, (long long)state.position, state.step, o.batch, o.grad_accum,
                         state.step, (long long)state.step * per_step);
            goto out_units;
        }
        t->active = 1;
        t->finished = 0;
        snprintf(t->key, sizeof t->key, "%s", key);
        t->step = state.step;
        t->pos = state.position;
        t->tokens = state.tokens;
        t->total = total;
        for (int i = 0; i < state.n_losses; i++)
            if (push_loss(t, state.losses[i]) != 0) {
                rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
                goto out_units;
            }
        train_say(cb ? cb->message : NULL, cb ? cb->ctx : NULL,
                  "resuming %s at step %d/%d with its options%s%s; save=%s", ck, t->step, total,
                  applied[0] ? " but " : "", applied, o.save ? o.save : "none");
    } else if (t->active && !t->finished && strcmp(t->key, key) == 0) {
        train_say(cb ? cb->message : NULL, cb ? cb->ctx : NULL,
                  "continuing the interrupted run at step %d/%d", t->step, t->total);
    } else {
        run_reset(t);
        t->active = 1;
        snprintf(t->key, sizeof t->key, "%s", key);
        t->total = total;
    }
    if (t->step >= t->total) {
        rc = lt_fail(
            err, LT_ERR_ARG,
            "%%train: this run already did its %d steps; change an option (steps=, data=, ...) "
            "to start a new one",
            t->total);
        goto out_units;
    }
    train_say(cb ? cb->message : NULL, cb ? cb->ctx : NULL,
              "%d samples (%s, %lld tokens, %lld trained), %d %s, %d steps (%d per epoch), %lld "
              "trainable parameters",
              d.n, d.format, (long long)d.n_tokens, (long long)d.n_labels, u.n,
              o.packing ? "packed rows" : "units", t->total, steps_per_epoch,
              (long long)ad->n_trainable);
    {
        int64_t maxtok = 0;
        for (int i = 0; i < d.n; i++)
            maxtok = d.s[i].n > maxtok ? d.s[i].n : maxtok;
        maxtok = (o.packing ? max_seq : maxtok) * (int64_t)o.batch;
        int64_t maximg = 0; /* image tokens of the largest unit, times batch (a bound) */
        for (int i = 0; i < u.n; i++) {
            int64_t k = 0;
            for (int j = 0; j < u.count[i]; j++)
                k += d.s[u.idx[u.start[i] + j]].n_images;
            maximg = k > maximg ? k : maximg;
        }
        maximg *= (int64_t)o.batch * env->model->cfg.vision.mm_tokens_per_image;
        if ((rc = memory_plan(env->model, ad, env->ctx, maxtok, &d, maximg, cb, err)) != LT_OK)
            goto out_units;
    }
    res->n_samples = d.n;
    res->n_truncated = d.n_truncated;
    snprintf(res->format, sizeof res->format, "%s", d.format);
    res->first_step = t->step;
    res->total_steps = t->total;

    stream st = {&u, {0}};
    int order_failed = epoch_order_init(&st.order, u.n, o.shuffle, o.seed);
    train_batch *mb = calloc((size_t)o.grad_accum, sizeof(train_batch));
    if (order_failed || !mb) {
        rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
        goto out_stream;
    }
    optim_opts oo = {o.lr,           o.beta1,         o.beta2,  o.eps,
                     o.weight_decay, o.max_grad_norm, o.warmup, sched};
    double t0 = now_s();
    int64_t run_tokens = 0;
    int first = 1;
    while (t->step < t->total) {
        /* the step's micro-batches, its label count (the loss normaliser), and whether any
         * runs an image (a step without leaves the tower's adapters alone) */
        int64_t labels = 0, step_tokens = 0;
        int images_ran = 0;
        for (int k = 0; k < o.grad_accum; k++) {
            if (batch_build(&mb[k], &st, &d, t->pos + (int64_t)k * o.batch, o.batch, soft,
                            env->model->cfg.vision.mm_tokens_per_image,
                            env->model->cfg.hidden_size) != 0) {
                rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
                goto out_loop;
            }
            labels += mb[k].n_labels;
            step_tokens += mb[k].N;
            images_ran |= tower_trained && mb[k].n_image_tokens > 0;
        }
        if ((rc = lora_zero_grads(ad)) != LT_OK) {
            lt_fail(err, rc, "%s", env->ctx->err);
            goto out_loop;
        }
        double loss_sum = 0;
        for (int k = 0; k < o.grad_accum; k++) {
            if (atomic_load(env->cancel)) {
                rc = LT_CANCELLED;
                goto out_loop;
            }
            double ls = 0;
            uint64_t dseed =
                train_mix64(o.seed ^ train_mix64((uint64_t)t->step * 1024u + (uint64_t)k + 7)) | 1u;
            /* a trained tower: this step's soft tokens, and the gradients of its rows */
            int *imgs = NULL, nimg = 0;
            if (tower_trained && mb[k].n_image_tokens > 0) {
                size_t rows = (size_t)mb[k].n_image_tokens * (size_t)env->model->cfg.hidden_size;
                if (batch_images(&st, &d, t->pos + (int64_t)k * o.batch, o.batch, &imgs, &nimg) !=
                        0 ||
                    !(mb[k].image_grads = malloc(sizeof(float) * rows))) {
                    free(imgs);
                    rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
                    goto out_loop;
                }
                if ((rc = tower_rows(env, &d, imgs, nimg, &mb[k], 0, ad->dropout > 0 ? dseed : 0,
                                     err)) != LT_OK) {
                    free(imgs);
                    goto out_loop;
                }
            }
            rc = gemma3_train_batch(env->model, env->ctx, lora_trainable(ad), &mb[k],
                                    1.0f / (float)(labels > 0 ? labels : 1), 1,
                                    ad->dropout > 0 ? dseed : 0, &ls);
            if (rc != LT_OK) {
                free(imgs);
                lt_fail(err, rc, "%%train step %d: %s", t->step + 1, env->ctx->err);
                goto out_loop;
            }
            if (imgs)
                rc = tower_rows(env, &d, imgs, nimg, &mb[k], 1, ad->dropout > 0 ? dseed : 0, err);
            free(imgs);
            if (rc != LT_OK) goto out_loop;
            loss_sum += ls;
        }
        if (atomic_load(env->cancel)) {
            rc = LT_CANCELLED;
            goto out_loop;
        }
        double gnorm = 0;
        if ((rc = optim_clip(ad, o.max_grad_norm, &gnorm, err)) != LT_OK) goto out_loop;
        double lr = (double)o.lr * optim_lr_factor(sched, t->step, o.warmup, t->total);
        if ((rc = optim_step(ad, &oo, (float)lr, images_ran, err)) != LT_OK) goto out_loop;
        /* the step is complete */
        double loss = loss_sum / (double)(labels > 0 ? labels : 1);
        t->step++;
        t->pos += per_step;
        t->tokens += step_tokens;
        run_tokens += step_tokens;
        push_loss(t, (float)loss);
        if (first) res->first_loss = loss;
        first = 0;
        res->last_loss = loss;
        res->steps_done = t->step;
        for (int k = 0; k < o.grad_accum; k++)
            batch_free(&mb[k]);
        if (cb && cb->step) {
            double el = now_s() - t0;
            int done_here = t->step - res->first_step, left = t->total - t->step;
            lt_train_progress p = {t->step,
                                   t->total,
                                   (float)((double)t->pos / u.n),
                                   loss,
                                   lr,
                                   gnorm,
                                   el > 0 ? run_tokens / el : 0,
                                   el,
                                   done_here > 0 ? el / done_here * left : 0,
                                   t->tokens,
                                   t->losses,
                                   t->n_losses};
            cb->step(cb->ctx, &p);
        }
        int last = t->step == t->total;
        if (o.save && *o.save && ((o.save_every > 0 && t->step % o.save_every == 0) || last)) {
            char dir[4200];
            snprintf(dir, sizeof dir, "%s/checkpoint-%d", o.save, t->step);
            trainer_state ts = {.step = t->step,
                                .total_steps = t->total,
                                .units = u.n,
                                .full = t->ad->full,
                                .position = t->pos,
                                .tokens = t->tokens,
                                .losses = t->losses,
                                .n_losses = t->n_losses};
            char *sj = trainer_state_text(&ts, &o, max_seq);
            if (!sj) {
                rc = lt_fail(err, LT_ERR_MEMORY,
                             "checkpoint at step %d: cannot write trainer_state.json (out of "
                             "memory, or data= is a path that is not UTF-8)",
                             t->step);
                goto out_loop;
            }
            rc = ckpt_save(ad, dir, sj, err);
            free(sj);
            if (rc != LT_OK) {
                char tmp[LT_ERRLEN];
                snprintf(tmp, sizeof tmp, "%s", err);
                lt_fail(
                    err, rc,
                    "checkpoint at step %d failed: %s (training stopped; the weights of step %d "
                    "are kept "
                    "in memory)",
                    t->step, tmp, t->step);
                goto out_loop;
            }
            memcpy(res->saved, dir, strnlen(dir, sizeof res->saved - 1));
            res->saved[strnlen(dir, sizeof res->saved - 1)] = 0;
            /* only now that the new one is complete may older ones go */
            char gone[1200];
            ckpt_prune(o.save, t->step, o.keep, gone, sizeof gone);
            if (gone[0])
                train_say(cb ? cb->message : NULL, cb ? cb->ctx : NULL, "keep=%d: removed %s",
                          o.keep, gone);
        }
    }
    t->finished = 1;
out_loop:
    for (int k = 0; k < o.grad_accum && mb; k++)
        batch_free(&mb[k]);
    res->seconds = now_s() - t0;
    res->tokens = run_tokens;
    res->steps_done = t->step;
    if (rc == LT_CANCELLED) {
        res->interrupted = 1;
        lt_fail(err, LT_CANCELLED,
                "training stopped at step %d of %d; the weights are those of step %d. Run the same "
                "%%train again to continue",
                t->step, t->total, t->step);
    }
    if (t->step > res->first_step) *weights_changed = 1;
    env->ctx->be->trim(
        env->ctx); /* the step's cached blocks and its page-locked checkpoint memory */
out_stream:
    free(mb);
    epoch_order_free(&st.order);
out_units:
    units_free(&u);
out_data:
    free(soft);
    data_free(&d);
out_state:
    trainer_state_free(&state);
    return rc;
}
