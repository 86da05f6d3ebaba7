/* grpo.c — %grpo: reinforcement learning of the LoRA adapters with GRPO, as TRL's GRPOTrainer
 * (trl/trainer/grpo_trainer.py) does it.
 *
 * One generation: `batch` prompts from the data (shuffled per epoch with the seed), `group`
 * completions each, sampled with the adapters active (model/rollout.c); every completion scored
 * by the reward functions (rewards.c) and the weighted sum turned into advantages within its
 * group (grpo_loss.c). Then `iterations` optimizer steps on that generation: each runs the
 * completions through the model in micro-batches of `micro` completions, and the loss's
 * derivative with respect to each completion token's log-probability becomes that token's
 * weight in the fused cross-entropy (CE = -logp), so one forward and backward per micro-batch
 * gives the adapters' gradient. The log-probabilities are those of logits / temperature, as
 * TRL computes them. A pass without gradients comes first only where the loss needs the
 * current log-probabilities before the backward: the KL term (beta != 0), whose reference
 * policy is the same model with the adapters switched off, and every iteration after the
 * first (the ratio to the sampling policy). With one iteration and beta 0 the ratio is 1, the
 * gradient is -A·∇logp and one pass suffices.
 *
 * Owns the prompt list, the per-step buffers and the log file. The adapters, model, tokenizer
 * and backend are lent by the caller for one call. Must not print; reports through callbacks.
 */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cuda/model/rollout.h"
#include "cuda/text/chat.h"
#include "cuda/train/grpo_loss.h"
#include "cuda/train/rewards.h"
#include "cuda/train/train.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- the prompts ------------------------------------------------------------------------ */

typedef struct grpo_prompt {
    int32_t *ids; /* BOS + prompt tokens (the last max_prompt kept) */
    int n;
    char *text;     /* the prompt as the model sees it (chat template applied) */
    char *row_json; /* the data row, for the rewards */
} grpo_prompt;

typedef struct prompt_list {
    grpo_prompt *p;
    int n, cap;
    int n_truncated;
} prompt_list;

static void prompts_free(prompt_list *l) {
    for (int i = 0; i < l->n; i++) {
        free(l->p[i].ids);
        free(l->p[i].text);
        free(l->p[i].row_json);
    }
    free(l->p);
    memset(l, 0, sizeof *l);
}

/* A list of {"role", "content"} messages rendered with the chat template and the generation
 * prompt, as TRL's maybe_apply_chat_template does for conversational prompts. */
static lt_status render_messages(json_t *list, char **text, const char *where, char *err) {
    size_t n = json_array_size(list);
    if (n == 0)
        return lt_fail(err, LT_ERR_ARG, "%s: \"prompt\" is an empty list of messages", where);
    const char **roles = calloc(n, sizeof *roles), **contents = calloc(n, sizeof *contents);
    if (!roles || !contents) {
        free(roles);
        free(contents);
        return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    }
    lt_status rc = LT_OK;
    for (size_t i = 0; i < n && rc == LT_OK; i++) {
        json_t *m = json_array_get(list, i);
        json_t *r = json_object_get(m, "role"), *c = json_object_get(m, "content");
        if (!json_is_string(r) || !json_is_string(c))
            rc = lt_fail(err, LT_ERR_ARG,
                         "%s: message %zu of \"prompt\" needs text \"role\" and \"content\" "
                         "fields ({\"role\": \"user\", \"content\": \"...\"})",
                         where, i + 1);
        else {
            roles[i] = json_string_value(r);
            contents[i] = json_string_value(c);
        }
    }
    if (rc == LT_OK) {
        char cerr[LT_ERRLEN];
        rc = chat_render(roles, contents, (int)n, 1, text, cerr);
        if (rc != LT_OK) lt_fail(err, rc, "%s: %s", where, cerr);
    }
    free(roles);
    free(contents);
    return rc;
}

static lt_status prompt_add(prompt_list *l, json_t *rec, const lt_tokenizer *tok,
                            const gemma3_config *cfg, int max_prompt, const char *where,
                            char *err) {
    json_t *pr = json_object_get(rec, "prompt");
    char *text = NULL;
    lt_status rc;
    if (json_is_string(pr)) {
        /* a plain prompt: BOS + its tokens, as Gemma's tokenizer adds the BOS */
        text = strdup(json_string_value(pr));
        if (!text) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    } else if (json_is_array(pr)) {
        if ((rc = render_messages(pr, &text, where, err)) != LT_OK) return rc;
    } else {
        return lt_fail(err, LT_ERR_ARG,
                       "%s: each line needs \"prompt\": a text, or a list of chat messages "
                       "[{\"role\": \"user\", \"content\": \"...\"}]",
                       where);
    }
    int32_t *t = NULL;
    int k = 0;
    char terr[LT_ERRLEN];
    if ((rc = tok_encode_special(tok, text, &t, &k, terr)) != LT_OK) {
        free(text);
        return lt_fail(err, rc, "%s: %s", where, terr);
    }
    /* the rendered template starts with <bos>; a plain text gets one */
    int has_bos = k > 0 && t[0] == cfg->bos_id;
    int n = k + !has_bos;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    char *row = json_dumps(rec, JSON_COMPACT);
    if (!ids || !row ||
        (l->n == l->cap &&
         !(l->p = realloc(l->p, sizeof *l->p * (size_t)(l->cap = l->cap * 2 + 16))))) {
        free(t);
        free(text);
        free(ids);
        free(row);
        return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    }
    ids[0] = cfg->bos_id;
    memcpy(ids + 1, t + has_bos, sizeof(int32_t) * (size_t)(k - has_bos));
    free(t);
    if (n > max_prompt) { /* keep the BOS and the last tokens, as TRL keeps the prompt's end */
        memmove(ids + 1, ids + n - (max_prompt - 1), sizeof(int32_t) * (size_t)(max_prompt - 1));
        n = max_prompt;
        l->n_truncated++;
    }
    l->p[l->n++] = (grpo_prompt){ids, n, text, row};
    return LT_OK;
}

static lt_status prompts_load(prompt_list *l, const char *path, const lt_tokenizer *tok,
                              const gemma3_config *cfg, int max_prompt, const atomic_int *cancel,
                              char *err) {
    memset(l, 0, sizeof *l);
    /* the trainers' one reader: a regular file only, bounded lines, a BOM skipped, cancellable */
    char what[600];
    snprintf(what, sizeof what, "%%grpo data=%s", path);
    data_reader r;
    lt_status rc = data_reader_open(&r, path, what, 0, 0, cancel, NULL, err);
    if (rc != LT_OK) {
        data_reader_close(&r);
        if (rc == LT_ERR_IO && strstr(err, "cannot open"))
            snprintf(err + strlen(err), LT_ERRLEN - strlen(err),
                     ": give a JSON-lines file with a \"prompt\" on each line");
        return rc;
    }
    for (;;) {
        char *line = NULL;
        size_t len = 0;
        if ((rc = data_reader_line(&r, &line, &len, err)) != LT_OK || !line) break;
        if (cancel && atomic_load(cancel)) {
            rc = lt_fail(err, LT_CANCELLED, "%s: cancelled at line %d", what, r.line);
            break;
        }
        const char *q = line;
        while (*q == ' ' || *q == '\t' || *q == '\r')
            q++;
        if (!*q && (size_t)(q - line) == len) continue;
        char where[600];
        snprintf(where, sizeof where, "%s:%d", path, r.line);
        json_error_t je;
        json_t *rec = json_loadb(line, len, 0, &je);
        if (!rec || !json_is_object(rec))
            rc = lt_fail(err, LT_ERR_ARG, "%s: not a JSON object (%s): one object per line", where,
                         rec ? "another JSON value" : je.text);
        else
            rc = prompt_add(l, rec, tok, cfg, max_prompt, where, err);
        json_decref(rec);
        if (rc != LT_OK) break;
    }
    data_reader_close(&r);
    if (rc == LT_OK && l->n == 0)
        rc = lt_fail(err, LT_ERR_ARG, "%%grpo: data=%s holds no prompts", path);
    if (rc != LT_OK) prompts_free(l);
    return rc;
}

/* ---- options ----------------------------------------------------------------------------- */

static lt_status check_opts(const lt_grpo_opts *o, grpo_loss_opts *lo, grpo_scale *scale,
                            lr_schedule *sched, char *err) {
    if (!o->data || !*o->data)
        return lt_fail(err, LT_ERR_ARG, "%%grpo: data= is missing: a JSON-lines file of prompts");
    if (!o->reward || !*o->reward)
        return lt_fail(err, LT_ERR_ARG,
                       "%%grpo: reward= is missing: format, format_approx, answer, number or "
                       "\"exec:COMMAND\" (several separated by commas)");
    struct {
        const char *name;
        double v, lo;
    } pos[] = {{"group", o->group, 2},
               {"batch", o->batch, 1},
               {"steps", o->steps, 1},
               {"max_prompt", o->max_prompt, 2},
               {"max_completion", o->max_completion, 1},
               {"iterations", o->iterations, 1}};
    for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++)
        if (pos[i].v < pos[i].lo)
            return lt_fail(err, LT_ERR_ARG, "%%grpo: %s=%g; it must be >= %g", pos[i].name,
                           pos[i].v, pos[i].lo);
    if (o->micro < 0)
        return lt_fail(err, LT_ERR_ARG, "%%grpo: micro=%d must be >= 0 (0 = group)", o->micro);
    if (!(o->lr > 0) || !isfinite(o->lr))
        return lt_fail(err, LT_ERR_ARG, "%%grpo: lr=%g; it must be a number > 0", o->lr);
    if (!(o->beta >= 0) || !(o->epsilon >= 0 && o->epsilon < 1) || !(o->epsilon_high >= 0))
        return lt_fail(err, LT_ERR_ARG,
                       "%%grpo: beta=%g epsilon=%g epsilon_high=%g: beta >= 0, 0 <= epsilon < 1, "
                       "epsilon_high >= 0",
                       o->beta, o->epsilon, o->epsilon_high);
    if (!(o->temperature > 0) || !isfinite(o->temperature))
        return lt_fail(err, LT_ERR_ARG,
                       "%%grpo: temperature=%g must be > 0 (GRPO needs varied completions)",
                       o->temperature);
    if (!(o->reward_timeout > 0))
        return lt_fail(err, LT_ERR_ARG, "%%grpo: reward_timeout=%g must be > 0 seconds",
                       o->reward_timeout);
    if (o->warmup < 0 || o->weight_decay < 0 || o->max_grad_norm < 0 || o->show_every < 0)
        return lt_fail(err, LT_ERR_ARG,
                       "%%grpo: warmup, weight_decay, max_grad_norm and show_every must be >= 0");
    int t = grpo_loss_type_parse(o->loss ? o->loss : "dapo");
    if (t < 0)
        return lt_fail(err, LT_ERR_ARG, "%%grpo: loss=%s; accepted: dapo|grpo|bnpo|dr_grpo",
                       o->loss);
    int sc = grpo_scale_parse(o->scale_rewards ? o->scale_rewards : "group");
    if (sc < 0)
        return lt_fail(err, LT_ERR_ARG, "%%grpo: scale_rewards=%s; accepted: group|batch|none",
                       o->scale_rewards);
    if (optim_schedule_parse(o->schedule, sched) != 0)
        return lt_fail(err, LT_ERR_ARG, "%%grpo: schedule=%s; accepted: constant|linear|cosine",
                       o->schedule);
    *lo = (grpo_loss_opts){(grpo_loss_type)t, o->epsilon, o->epsilon_high, o->beta,
                           o->max_completion};
    *scale = (grpo_scale)sc;
    return LT_OK;
}

/* ---- the memory plan ------------------------------------------------------------------- */

/* The rollout (KV caches of every completion) and the training pass of one micro-batch run one
 * after the other, so the larger of the two must fit. Refuses with a setting that would. */
static lt_status memory_plan(const trainer_env *env, lt_adapters *a, int rows, int micro,
                             int max_len, const lt_grpo_opts *o, const lt_grpo_callbacks *cb,
                             char *err) {
    const gemma3_model *m = env->model;
    size_t roll = gemma3_rollout_bytes(m, rows, max_len);
    size_t dev = 0, host = 0;
    gemma3_train_bytes(m, env->ctx, lora_trainable(a), (int64_t)micro * max_len, a->dropout > 0,
                       &dev, &host);
    double trainable = (double)a->n_trainable * 4 * 4;
    lt_mem_info mi;
    env->ctx->be->memory(env->ctx, &mi);
    double avail = (double)mi.free + (double)mi.cached;
    double train = (double)dev + trainable + (mi.on_device ? 0 : (double)host);
    double need = fmax((double)roll, train);
    train_say(cb ? cb->message : NULL, cb ? cb->ctx : NULL,
              "memory plan: rollout %.1f MiB (KV cache for %d completions of up to %d tokens), "
              "training %.1f MiB (%d completions per pass), in %s; %.0f MiB free",
              (double)roll / 1048576, rows, max_len, train / 1048576, micro, mi.where,
              avail / 1048576);
    if (avail <= 0 || need <= avail) return LT_OK;
    /* the largest group that fits at this length, then the length at this group */
    int g = o->group;
    while (g > 2 && (double)gemma3_rollout_bytes(m, o->batch * g, max_len) > avail)
        g--;
    int c = o->max_completion;
    while (c > 16 && (double)gemma3_rollout_bytes(m, rows, max_len - o->max_completion + c) > avail)
        c = c * 3 / 4;
    if ((double)roll > avail)
        return lt_fail(err, LT_ERR_MEMORY,
                       "%%grpo: the rollout needs %.0f MiB of %s for %d x %d completions of up "
                       "to %d tokens but %.0f MiB are free: try group=%d, batch=1 or "
                       "max_completion=%d",
                       (double)roll / 1048576, mi.where, o->batch, o->group, max_len,
                       avail / 1048576, g, c);
    return lt_fail(err, LT_ERR_MEMORY,
                   "%%grpo: a training pass over %d completions needs %.0f MiB of %s but %.0f MiB "
                   "are free: lower micro= (completions per pass) or max_completion=",
                   micro, train / 1048576, mi.where, avail / 1048576);
}

/* ---- one generation's buffers ----------------------------------------------------------- */

typedef struct generation {
    int rows;
    const grpo_prompt **prompt; /* [rows] the prompt of each completion */
    rollout_out ro;
    char **text;       /* [rows] completion text (stop token not included) */
    double *scores;    /* [n_rewards * rows] */
    double *total;     /* [rows] weighted sum of the rewards */
    double *adv;       /* [rows] */
    double *group_std; /* [rows] */
    int *tok_off;      /* [rows] where each completion's tokens start in the per-token arrays */
    int64_t n_tok;     /* completion tokens of the whole generation */
    float *old_logp, *ref_logp; /* [n_tok]; NULL when not needed */
} generation;

static void generation_free(generation *g) {
    free(g->prompt);
    rollout_out_free(&g->ro);
    for (int i = 0; g->text && i < g->rows; i++)
        free(g->text[i]);
    free(g->text);
    free(g->scores);
    free(g->total);
    free(g->adv);
    free(g->group_std);
    free(g->tok_off);
    free(g->old_logp);
    free(g->ref_logp);
    memset(g, 0, sizeof *g);
}

/* A micro-batch: completions r0 .. r0+n-1, each packed as prompt + completion, the targets
 * being the completion tokens (each predicted from the token before it). */
typedef struct micro_batch {
    train_batch b;
    int r0, n;
    int *pos;       /* [completion tokens] position of each in the packed row */
    int *off, *len; /* [n] in the micro-batch's own completion-token numbering */
    int n_tok;
    float *logp, *coef; /* [n_tok] */
} micro_batch;

static void micro_free(micro_batch *mb) {
    free(mb->b.ids);
    free(mb->b.targets);
    free(mb->b.seg_len);
    free(mb->b.logp);
    free((void *)mb->b.weights);
    free(mb->pos);
    free(mb->off);
    free(mb->len);
    free(mb->logp);
    free(mb->coef);
    memset(mb, 0, sizeof *mb);
}

static int micro_build(micro_batch *mb, const generation *g, int r0, int n, float logit_scale) {
    memset(mb, 0, sizeof *mb);
    mb->r0 = r0;
    mb->n = n;
    int N = 0, T = 0;
    for (int i = 0; i < n; i++) {
        N += g->prompt[r0 + i]->n + g->ro.len[r0 + i];
        T += g->ro.len[r0 + i];
    }
    train_batch *b = &mb->b;
    b->ids = malloc(sizeof(int32_t) * (size_t)N);
    b->targets = malloc(sizeof(int32_t) * (size_t)N);
    b->seg_len = malloc(sizeof(int) * (size_t)n);
    b->logp = calloc((size_t)N, sizeof(float));
    float *w = calloc((size_t)N, sizeof(float));
    b->weights = w;
    mb->pos = malloc(sizeof(int) * (size_t)(T + 1));
    mb->off = malloc(sizeof(int) * (size_t)n);
    mb->len = malloc(sizeof(int) * (size_t)n);
    mb->logp = malloc(sizeof(float) * (size_t)(T + 1));
    mb->coef = malloc(sizeof(float) * (size_t)(T + 1));
    if (!b->ids || !b->targets || !b->seg_len || !b->logp || !w || !mb->pos || !mb->off ||
        !mb->len || !mb->logp || !mb->coef) {
        micro_free(mb);
        return -1;
    }
    int t = 0, k = 0;
    for (int i = 0; i < n; i++) {
        const grpo_prompt *p = g->prompt[r0 + i];
        const int32_t *c = g->ro.ids + (size_t)(r0 + i) * (size_t)g->ro.max_new;
        int C = g->ro.len[r0 + i];
        int base = t;
        memcpy(b->ids + t, p->ids, sizeof(int32_t) * (size_t)p->n);
        memcpy(b->ids + t + p->n, c, sizeof(int32_t) * (size_t)C);
        for (int j = 0; j < p->n + C; j++)
            b->targets[t + j] = -100;
        mb->off[i] = k;
        mb->len[i] = C;
        for (int j = 0; j < C; j++) { /* completion token j is predicted at p->n - 1 + j */
            b->targets[base + p->n - 1 + j] = c[j];
            mb->pos[k++] = base + p->n - 1 + j;
        }
        b->seg_len[i] = p->n + C;
        t += p->n + C;
    }
    b->n_seg = n;
    b->N = N;
    b->n_labels = T;
    b->logit_scale = logit_scale;
    mb->n_tok = T;
    return 0;
}

/* The micro-batch's per-token log-probabilities from the last pass (b.logp) into mb->logp. */
static void micro_gather_logp(micro_batch *mb) {
    for (int k = 0; k < mb->n_tok; k++)
        mb->logp[k] = mb->b.logp[mb->pos[k]];
}

/* ---- the run ----------------------------------------------------------------------------- */

typedef struct run_stats {
    double loss, kl_sum;
    int64_t n_tok, n_clip;
    int64_t train_tokens;
    double train_s;
} run_stats;

/* Forward (and with grads, backward) of one micro-batch: the log-probabilities land in
 * mb->b.logp. With grads the weights mb->b.weights must be set. */
static lt_status micro_pass(const trainer_env *env, lt_adapters *a, micro_batch *mb, int grads,
                            uint64_t dseed, run_stats *rs, char *err) {
    double t0 = now_s(), ls = 0;
    const float *w = mb->b.weights;
    if (!grads) mb->b.weights = NULL;
    lt_status rc = gemma3_train_batch(env->model, env->ctx, grads ? lora_trainable(a) : NULL,
                                      &mb->b, 1.0f, grads, grads ? dseed : 0, &ls);
    mb->b.weights = w;
    rs->train_s += now_s() - t0;
    rs->train_tokens += mb->b.N;
    if (rc != LT_OK) return lt_fail(err, rc, "%s", env->ctx->err);
    return LT_OK;
}

/* The generation's completions, micro completions at a time, into mbs[0..n_micro). */
static lt_status generation_micro_build(const generation *g, micro_batch *mbs, int n_micro,
                                        int micro, float logit_scale, char *err) {
    for (int k = 0; k < n_micro; k++) {
        micro_free(&mbs[k]);
        int r0 = k * micro, n = r0 + micro <= g->rows ? micro : g->rows - r0;
        if (micro_build(&mbs[k], g, r0, n, logit_scale) != 0)
            return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    }
    return LT_OK;
}

/* The reference policy's log-probabilities (the same model with the adapters off) into
 * g->ref_logp. */
static lt_status generation_ref_logp(const trainer_env *env, lt_adapters *a, generation *g,
                                     micro_batch *mbs, int n_micro, run_stats *rs, char *err) {
    if (!(g->ref_logp = malloc(sizeof(float) * (size_t)(g->n_tok + 1))))
        return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    lt_status rc = LT_OK;
    lora_enable(a, 0);
    for (int k = 0; k < n_micro && rc == LT_OK; k++) {
        rc = micro_pass(env, a, &mbs[k], 0, 0, rs, err);
        if (rc == LT_OK) {
            micro_gather_logp(&mbs[k]);
            memcpy(g->ref_logp + g->tok_off[mbs[k].r0], mbs[k].logp,
                   sizeof(float) * (size_t)mbs[k].n_tok);
        }
    }
    lora_enable(a, 1);
    return rc;
}

/* Iteration `it` of a generation's optimizer steps, up to the gradient: for each micro-batch
 * the current log-probabilities when the loss needs them first (it > 0, or a KL term), TRL's
 * loss and its per-token derivative, then one weighted backward; the adapters' gradients
 * accumulate (the caller zeroes them), tot sums the micro-batches' statistics. The first
 * iteration keeps the log-probabilities as old_logp when later iterations need them. */
static lt_status generation_grads(const trainer_env *env, lt_adapters *a, const lt_grpo_opts *o,
                                  const grpo_loss_opts *lo, generation *g, micro_batch *mbs,
                                  int n_micro, int it, int step, run_stats *rs,
                                  grpo_loss_stats *tot, char *err) {
    int need_old = o->iterations > 1;
    lt_status rc = LT_OK;
    memset(tot, 0, sizeof *tot);
    if (need_old && !g->old_logp && !(g->old_logp = malloc(sizeof(float) * (size_t)(g->n_tok + 1))))
        return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    for (int k = 0; k < n_micro; k++) {
        micro_batch *mb = &mbs[k];
        if (atomic_load(env->cancel)) return LT_CANCELLED;
        /* the current log-probabilities, when the loss needs them before the backward */
        int pre = it > 0 || o->beta != 0;
        if (pre) {
            if ((rc = micro_pass(env, a, mb, 0, 0, rs, err)) != LT_OK) return rc;
            micro_gather_logp(mb);
            if (it == 0 && need_old)
                memcpy(g->old_logp + g->tok_off[mb->r0], mb->logp,
                       sizeof(float) * (size_t)mb->n_tok);
        } else {
            for (int t = 0; t < mb->n_tok; t++)
                mb->logp[t] = 0; /* unused: old = current, so the ratio is 1 */
        }
        grpo_loss_in in = {mb->n,
                           mb->off,
                           mb->len,
                           g->adv + mb->r0,
                           mb->logp,
                           (it > 0 && need_old) ? g->old_logp + g->tok_off[mb->r0] : NULL,
                           g->ref_logp ? g->ref_logp + g->tok_off[mb->r0] : NULL,
                           n_micro,
                           g->n_tok > 0 ? g->n_tok : 1};
        grpo_loss_stats st;
        char lerr[LT_ERRLEN];
        if ((rc = grpo_loss(lo, &in, mb->coef, &st, lerr)) != LT_OK)
            return lt_fail(err, rc, "%%grpo: %s", lerr);
        float *w = (float *)mb->b.weights;
        for (int t = 0; t < mb->n_tok; t++)
            w[mb->pos[t]] = -mb->coef[t];
        uint64_t dseed =
            train_mix64(o->seed ^ train_mix64((uint64_t)step * 1024u + (uint64_t)k + 7)) | 1u;
        if ((rc = micro_pass(env, a, mb, 1, a->dropout > 0 ? dseed : 0, rs, err)) != LT_OK)
            return rc;
        if (!pre) {
            micro_gather_logp(mb);
            if (need_old)
                memcpy(g->old_logp + g->tok_off[mb->r0], mb->logp,
                       sizeof(float) * (size_t)mb->n_tok);
        }
        tot->loss += st.loss;
        tot->kl_sum += st.kl_sum;
        tot->n_tok += st.n_tok;
        tot->n_clip_low += st.n_clip_low;
        tot->n_clip_high += st.n_clip_high;
    }
    return LT_OK;
}

static lt_status log_line(FILE *f, const lt_grpo_progress *p) {
    if (!f) return LT_OK;
    fprintf(f, "{\"step\": %d, \"loss\": %.9g, \"reward\": %.9g, \"reward_std\": %.9g", p->step,
            p->loss, p->reward, p->reward_std);
    for (int i = 0; i < p->n_rewards; i++) {
        json_t *name = json_string(p->reward_names[i]);
        char *q = name ? json_dumps(name, JSON_ENCODE_ANY) : NULL;
        /* "rewards/<name>/mean": the name inside the JSON string */
        if (q) {
            size_t L = strlen(q);
            fprintf(f, ", \"rewards/%.*s/mean\": %.9g, \"rewards/%.*s/std\": %.9g", (int)(L - 2),
                    q + 1, p->reward_mean[i], (int)(L - 2), q + 1, p->reward_func_std[i]);
        }
        free(q);
        json_decref(name);
    }
    fprintf(f,
            ", \"kl\": %.9g, \"completion_length\": %.9g, \"completions/clipped_ratio\": %.9g, "
            "\"clip_ratio\": %.9g, \"learning_rate\": %.9g, \"grad_norm\": %.9g, "
            "\"sampling_tokens_per_s\": %.6g, \"training_tokens_per_s\": %.6g}\n",
            p->kl, p->completion_length, p->clipped_ratio, p->clip_ratio, p->lr, p->grad_norm,
            p->sample_tok_s, p->train_tok_s);
    return fflush(f) == 0 && !ferror(f) ? LT_OK : LT_ERR_IO;
}

/* nan-aware mean and unbiased std (torch.nanmean, TRL's nanstd) */
static void nan_mean_std(const double *x, int n, double *mean, double *std) {
    double s = 0;
    int k = 0;
    for (int i = 0; i < n; i++)
        if (!isnan(x[i])) s += x[i], k++;
    *mean = k ? s / k : NAN;
    double v = 0;
    for (int i = 0; i < n; i++)
        if (!isnan(x[i])) v += (x[i] - *mean) * (x[i] - *mean);
    *std = k > 1 ? sqrt(v / (k - 1)) : (k == 1 ? 0 : NAN);
}

/* Samples and scores one generation: batch prompts from the stream at *pos. */
static lt_status generate(const trainer_env *env, const lt_grpo_opts *o, const prompt_list *pl,
                          epoch_order *ord, int64_t *pos, reward_set *rw, int step, int max_seq,
                          generation *g, char *err) {
    int R = o->batch * o->group, F = reward_count(rw);
    memset(g, 0, sizeof *g);
    g->rows = R;
    const int32_t **pp = malloc(sizeof *pp * (size_t)o->batch);
    int *pn = malloc(sizeof(int) * (size_t)o->batch);
    g->prompt = malloc(sizeof *g->prompt * (size_t)R);
    if (!pp || !pn || !g->prompt) {
        free(pp);
        free(pn);
        return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    }
    for (int b = 0; b < o->batch; b++) {
        const grpo_prompt *p = &pl->p[epoch_order_at(ord, *pos + b)];
        pp[b] = p->ids;
        pn[b] = p->n;
        for (int k = 0; k < o->group; k++)
            g->prompt[b * o->group + k] = p;
    }
    *pos += o->batch;
    lt_gen_opts go = {
        o->max_completion, o->temperature, o->top_k,
        o->top_p,          0.0f,           train_mix64(o->seed ^ train_mix64((uint64_t)step + 1))};
    lt_status rc = gemma3_rollout(env->model, env->ctx, pp, pn, o->batch, o->group, &go, max_seq,
                                  env->cancel, &g->ro, err);
    free(pp);
    free(pn);
    if (rc != LT_OK) return rc;
    g->text = calloc((size_t)R, sizeof(char *));
    g->scores = malloc(sizeof(double) * (size_t)(F * R + 1));
    g->total = calloc((size_t)R, sizeof(double));
    g->adv = malloc(sizeof(double) * (size_t)R);
    g->group_std = malloc(sizeof(double) * (size_t)R);
    g->tok_off = malloc(sizeof(int) * (size_t)R);
    reward_item *items = malloc(sizeof *items * (size_t)R);
    if (!g->text || !g->scores || !g->total || !g->adv || !g->group_std || !g->tok_off || !items) {
        free(items);
        return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    }
    for (int r = 0; r < R; r++) {
        const int32_t *c = g->ro.ids + (size_t)r * (size_t)g->ro.max_new;
        int C = g->ro.len[r] - (g->ro.stopped[r] ? 1 : 0);
        char terr[LT_ERRLEN];
        if ((rc = tok_decode(env->tok, c, C, &g->text[r], terr)) != LT_OK) {
            free(items);
            return lt_fail(err, rc, "%s", terr);
        }
        items[r] = (reward_item){g->prompt[r]->text, g->text[r], g->prompt[r]->row_json};
        g->tok_off[r] = (int)g->n_tok;
        g->n_tok += g->ro.len[r];
    }
    char rerr[LT_ERRLEN];
    rc = reward_score(rw, items, R, g->scores, rerr);
    free(items);
    if (rc != LT_OK) return lt_fail(err, rc, "%%grpo step %d: %s", step + 1, rerr);
    /* TRL: rewards = nansum over functions of weight * reward */
    for (int f = 0; f < F; f++)
        for (int r = 0; r < R; r++) {
            double v = g->scores[(size_t)f * R + r];
            if (!isnan(v)) g->total[r] += reward_weight(rw, f) * v;
        }
    return LT_OK;
}

lt_status grpo_run(lt_adapters *a, const trainer_env *env, const lt_grpo_opts *o,
                   const lt_grpo_callbacks *cb, lt_grpo_result *res, char *err) {
    lt_grpo_result dummy;
    if (!res) res = &dummy;
    memset(res, 0, sizeof *res);
    const char *missing = lt_backend_missing_training_op(env->ctx->be);
    if (missing)
        return lt_fail(err, LT_ERR_STATE, "%%grpo: the %s backend lacks the training op %s",
                       env->ctx->be->name, missing);
    if (!a || a->full)
        return lt_fail(err, LT_ERR_STATE,
                       "%%grpo trains LoRA adapters (its reference policy is the model with them "
                       "switched off): attach them with %%lora first");
    grpo_loss_opts lo;
    grpo_scale scale = GRPO_SCALE_GROUP;
    lr_schedule sched;
    lt_status rc = check_opts(o, &lo, &scale, &sched, err);
    if (rc != LT_OK) return rc;
    const gemma3_model *m = env->model;
    int max_seq = env->max_seq > 0 ? env->max_seq : m->cfg.max_position_embeddings;
    if (o->max_prompt + o->max_completion > max_seq)
        return lt_fail(err, LT_ERR_ARG,
                       "%%grpo: max_prompt=%d + max_completion=%d exceed the model's max_seq %d: "
                       "lower them, or %%load with a larger max_seq=",
                       o->max_prompt, o->max_completion, max_seq);
    int micro = o->micro > 0 ? o->micro : o->group;
    int R = o->batch * o->group;
    if (micro > R) micro = R;

    prompt_list pl;
    if ((rc = prompts_load(&pl, o->data, env->tok, &m->cfg, o->max_prompt, env->cancel, err)) !=
        LT_OK)
        return rc;
    int longest = 0;
    for (int i = 0; i < pl.n; i++)
        longest = pl.p[i].n > longest ? pl.p[i].n : longest;
    res->n_prompts = pl.n;
    res->total_steps = o->steps;
    reward_set *rw = NULL;
    char cwd[4096];
    reward_opts ro = {o->reward, o->weights, o->markers, getcwd(cwd, sizeof cwd) ? cwd : NULL,
                      o->reward_timeout};
    FILE *logf = NULL;
    epoch_order ord = {0};
    double t_start = now_s();
    float *curve = NULL;
    const char **names = NULL;
    double *rmean = NULL, *rstd = NULL;
    generation g = {0};
    micro_batch *mbs = NULL;
    int n_micro = (R + micro - 1) / micro;
    char rerr[LT_ERRLEN];
    if ((rc = reward_set_new(&rw, &ro, rerr)) != LT_OK) {
        lt_fail(err, rc, "%%grpo: %s", rerr);
        goto out;
    }
    if ((rc = memory_plan(env, a, R, micro, longest + o->max_completion, o, cb, err)) != LT_OK)
        goto out;
    int F = reward_count(rw);
    names = malloc(sizeof *names * (size_t)(F + 1));
    rmean = malloc(sizeof(double) * (size_t)(F + 1));
    rstd = malloc(sizeof(double) * (size_t)(F + 1));
    curve = malloc(sizeof(float) * (size_t)o->steps);
    mbs = calloc((size_t)n_micro, sizeof *mbs);
    int order_failed = epoch_order_init(&ord, pl.n, o->shuffle, o->seed);
    if (!names || !rmean || !rstd || !curve || !mbs || order_failed) {
        rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
        goto out;
    }
    for (int f = 0; f < F; f++)
        names[f] = reward_name(rw, f);
    if (o->log && *o->log && !(logf = fopen(o->log, "w"))) {
        rc = lt_fail(err, LT_ERR_IO, "%%grpo: cannot write log=%s (%s)", o->log, strerror(errno));
        goto out;
    }
    train_say(cb ? cb->message : NULL, cb ? cb->ctx : NULL,
              "GRPO: %d prompts%s, %d per generation x %d completions, up to %d new tokens each; "
              "loss %s, beta %g, %d iteration%s per generation; rewards: %s",
              pl.n, pl.n_truncated ? " (some cut to max_prompt)" : "", o->batch, o->group,
              o->max_completion, grpo_loss_type_name(lo.type), (double)o->beta, o->iterations,
              o->iterations == 1 ? "" : "s", o->reward);
    optim_reset(a);
    optim_opts oo = {o->lr,     0.9f, 0.999f, 1e-8f, o->weight_decay, o->max_grad_norm,
                     o->warmup, sched};
    float logit_scale = 1.0f / o->temperature;
    double sample_s = 0;
    int64_t sampled = 0, pos = 0;
    run_stats rs = {0};
    int step = 0;
    while (step < o->steps) {
        /* ---- a generation ---- */
        generation_free(&g);
        rc = generate(env, o, &pl, &ord, &pos, rw, step, max_seq, &g, err);
        if (rc != LT_OK) goto out;
        sample_s += g.ro.prefill_s + g.ro.decode_s;
        sampled += g.ro.new_tokens;
        grpo_advantages(g.total, R, o->group, scale, g.adv, g.group_std);
        if ((rc = generation_micro_build(&g, mbs, n_micro, micro, logit_scale, err)) != LT_OK)
            goto out;
        if (o->beta != 0 && /* the reference policy: the same model, adapters off */
            (rc = generation_ref_logp(env, a, &g, mbs, n_micro, &rs, err)) != LT_OK)
            goto out;
        /* ---- its optimizer steps ---- */
        for (int it = 0; it < o->iterations && step < o->steps; it++) {
            if ((rc = lora_zero_grads(a)) != LT_OK) {
                lt_fail(err, rc, "%s", env->ctx->err);
                goto out;
            }
            grpo_loss_stats tot;
            if ((rc = generation_grads(env, a, o, &lo, &g, mbs, n_micro, it, step, &rs, &tot,
                                       err)) != LT_OK)
                goto out;
            if (atomic_load(env->cancel)) {
                rc = LT_CANCELLED;
                goto out;
            }
            double gnorm = 0;
            if ((rc = optim_clip(a, o->max_grad_norm, &gnorm, err)) != LT_OK) goto out;
            double lr = (double)o->lr * optim_lr_factor(sched, step, o->warmup, o->steps);
            /* prompts are text: the tower's adapters, if any, get no gradient */
            if ((rc = optim_step(a, &oo, (float)lr, 0, err)) != LT_OK) goto out;
            step++;
            /* ---- the step's report ---- */
            lt_grpo_progress p = {0};
            p.step = step;
            p.total_steps = o->steps;
            p.loss = tot.loss;
            p.lr = lr;
            p.grad_norm = gnorm;
            double sd_unused;
            nan_mean_std(g.total, R, &p.reward, &sd_unused);
            double gs = 0;
            for (int r = 0; r < R; r++)
                gs += g.group_std[r];
            p.reward_std = gs / R;
            for (int f = 0; f < F; f++)
                nan_mean_std(g.scores + (size_t)f * R, R, &rmean[f], &rstd[f]);
            p.n_rewards = F;
            p.reward_names = names;
            p.reward_mean = rmean;
            p.reward_func_std = rstd;
            p.kl = tot.n_tok ? tot.kl_sum / (double)tot.n_tok : 0;
            int clipped = 0;
            for (int r = 0; r < R; r++)
                clipped += !g.ro.stopped[r];
            p.completion_length = (double)g.n_tok / R;
            p.clipped_ratio = (double)clipped / R;
            p.clip_ratio =
                tot.n_tok ? (double)(tot.n_clip_low + tot.n_clip_high) / (double)tot.n_tok : 0;
            p.sample_tok_s = sample_s > 0 ? (double)sampled / sample_s : 0;
            p.train_tok_s = rs.train_s > 0 ? (double)rs.train_tokens / rs.train_s : 0;
            p.elapsed_s = now_s() - t_start;
            p.eta_s = p.elapsed_s / step * (o->steps - step);
            curve[step - 1] = (float)p.reward;
            p.rewards = curve;
            p.n_steps_logged = step;
            if (o->show_every > 0 && (step % o->show_every == 0 || step == 1) && it == 0) {
                p.show_prompt = g.prompt[0]->text;
                p.show_completion = g.text[0];
                p.show_reward = g.total[0];
            }
            if (step == 1) res->first_reward = p.reward;
            res->last_reward = p.reward;
            res->steps_done = step;
            if (log_line(logf, &p) != LT_OK) {
                rc = lt_fail(err, LT_ERR_IO, "%%grpo: writing log=%s failed (%s)", o->log,
                             strerror(errno));
                goto out;
            }
            if (cb && cb->step) cb->step(cb->ctx, &p);
        }
    }
out:
    res->seconds = now_s() - t_start;
    if (rc == LT_CANCELLED) {
        res->interrupted = 1;
        lora_zero_grads(a);
        lt_fail(err, LT_CANCELLED,
                "%%grpo interrupted after step %d of %d (the adapters hold "
                "step %d's weights)",
                res->steps_done, o->steps, res->steps_done);
    }
    for (int k = 0; mbs && k < n_micro; k++)
        micro_free(&mbs[k]);
    free(mbs);
    generation_free(&g);
    if (logf) fclose(logf);
    reward_set_free(rw);
    epoch_order_free(&ord);
    free(curve);
    free(names);
    free(rmean);
    free(rstd);
    prompts_free(&pl);
    return rc;
}

lt_status grpo_grads_given(lt_adapters *a, const trainer_env *env, const lt_grpo_opts *o,
                           const grpo_given *in, double *loss, char *err) {
    grpo_loss_opts lo;
    grpo_scale scale;
    lr_schedule sched;
    lt_status rc = check_opts(o, &lo, &scale, &sched, err);
    if (rc != LT_OK) return rc;
    if (!a || a->full || !in || in->n_prompts < 1)
        return lt_fail(err, LT_ERR_ARG, "grpo_grads_given: LoRA adapters and prompts are needed");
    int R = in->n_prompts * o->group, micro = o->micro > 0 ? o->micro : o->group, longest = 0;
    if (micro > R) micro = R;
    int n_micro = (R + micro - 1) / micro;
    for (int r = 0; r < R; r++)
        if (in->completion_len[r] > longest) longest = in->completion_len[r];
    generation g = {0};
    grpo_prompt *pr = calloc((size_t)in->n_prompts, sizeof *pr);
    micro_batch *mbs = calloc((size_t)n_micro, sizeof *mbs);
    g.rows = R;
    g.prompt = malloc(sizeof *g.prompt * (size_t)R);
    g.ro.n_rows = R;
    g.ro.max_new = longest > 0 ? longest : 1;
    g.ro.ids = calloc((size_t)R * (size_t)g.ro.max_new, sizeof(int32_t));
    g.ro.len = calloc((size_t)R, sizeof(int));
    g.ro.stopped = calloc((size_t)R, sizeof(int));
    g.total = malloc(sizeof(double) * (size_t)R);
    g.adv = malloc(sizeof(double) * (size_t)R);
    g.group_std = malloc(sizeof(double) * (size_t)R);
    g.tok_off = malloc(sizeof(int) * (size_t)R);
    if (!pr || !mbs || !g.prompt || !g.ro.ids || !g.ro.len || !g.ro.stopped || !g.total || !g.adv ||
        !g.group_std || !g.tok_off) {
        rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
        goto out;
    }
    for (int p = 0; p < in->n_prompts; p++) {
        pr[p].ids = (int32_t *)in->prompt[p];
        pr[p].n = in->prompt_len[p];
    }
    for (int r = 0; r < R; r++) {
        g.prompt[r] = &pr[r / o->group];
        g.ro.len[r] = in->completion_len[r];
        memcpy(g.ro.ids + (size_t)r * (size_t)g.ro.max_new, in->completion[r],
               sizeof(int32_t) * (size_t)in->completion_len[r]);
        g.total[r] = in->reward[r];
        g.tok_off[r] = (int)g.n_tok;
        g.n_tok += in->completion_len[r];
    }
    grpo_advantages(g.total, R, o->group, scale, g.adv, g.group_std);
    run_stats rs = {0};
    grpo_loss_stats tot;
    if ((rc = generation_micro_build(&g, mbs, n_micro, micro, 1.0f / o->temperature, err)) != LT_OK)
        goto out;
    if (o->beta != 0 && (rc = generation_ref_logp(env, a, &g, mbs, n_micro, &rs, err)) != LT_OK)
        goto out;
    if ((rc = lora_zero_grads(a)) != LT_OK) {
        lt_fail(err, rc, "%s", env->ctx->err);
        goto out;
    }
    if ((rc = generation_grads(env, a, o, &lo, &g, mbs, n_micro, 0, 0, &rs, &tot, err)) != LT_OK)
        goto out;
    if (loss) *loss = tot.loss;
out:
    for (int k = 0; mbs && k < n_micro; k++)
        micro_free(&mbs[k]);
    free(mbs);
    generation_free(&g);
    free(pr);
    return rc;
}
