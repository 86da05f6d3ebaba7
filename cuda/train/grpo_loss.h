/* grpo_loss.h — GRPO's arithmetic: advantages from rewards, and the per-token loss of TRL's
 * GRPOTrainer (trl/trainer/grpo_trainer.py) for its four loss types, with the derivative of the
 * loss with respect to each token's log-probability. Engine-private; pure host arithmetic in
 * double, no model, no backend.
 *
 * Per token t of completion i: ratio = exp(logp - old_logp), clipped = clamp(ratio, 1 - eps_low,
 * 1 + eps_high), loss_t = -min(ratio * A_i, clipped * A_i), plus, when beta != 0, beta * (exp(ref
 * - logp) - (ref - logp) - 1) (the k3 estimator of the KL to the reference policy). Aggregation,
 * as TRL divides a micro-batch's sum (n_accum micro-batches make one optimizer step):
 *   grpo     mean over each sequence's tokens, mean over sequences, / n_accum
 *   bnpo     sum over tokens / tokens in the micro-batch, / n_accum
 *   dr_grpo  sum over tokens / (sequences in the micro-batch * max_completion), / n_accum
 *   dapo     sum over tokens / tokens in the whole optimizer step (n_items)
 * The trainer turns coef (dL/dlogp per token) into the fused cross-entropy's row weights
 * (w = -coef, since CE = -logp), so one backward pass gives the adapters' gradient.
 */
#ifndef LATHE_GRPO_LOSS_H
#define LATHE_GRPO_LOSS_H

#include <stdint.h>

#include "cuda/base/error.h"

typedef enum grpo_loss_type {
    GRPO_LOSS_DAPO = 0,
    GRPO_LOSS_GRPO,
    GRPO_LOSS_BNPO,
    GRPO_LOSS_DR_GRPO,
} grpo_loss_type;

typedef enum grpo_scale {
    GRPO_SCALE_GROUP = 0, /* divide by the group's std (+1e-4), TRL's scale_rewards="group" */
    GRPO_SCALE_BATCH,     /* by the std over the whole batch (+1e-4) */
    GRPO_SCALE_NONE,
} grpo_scale;

/* "dapo" -> GRPO_LOSS_DAPO ...; -1 for an unknown name. */
int grpo_loss_type_parse(const char *name);
const char *grpo_loss_type_name(grpo_loss_type t);
/* "group", "batch", "none" (also "true" = group, "false" = none, as TRL's older bool); -1 for an
 * unknown name. */
int grpo_scale_parse(const char *name);

/* adv[i] = rewards[i] - mean of its group (rows g*group .. g*group+group-1), divided by the
 * unbiased (n - 1) std of the group (GRPO_SCALE_GROUP) or of all n_rows (GRPO_SCALE_BATCH) plus
 * 1e-4, as TRL computes them. A group of one has std 0 (torch gives NaN; TRL's groups are never
 * of one). group_std (may be NULL) receives each row's group std (TRL's reward_std metric is
 * their mean). (A group below 1 makes all rows one group; when group does not divide n_rows
 * the last, shorter group is a group of its own.) */
void grpo_advantages(const double *rewards, int n_rows, int group, grpo_scale scale, double *adv,
                     double *group_std);

typedef struct grpo_loss_opts {
    grpo_loss_type type;
    double eps_low, eps_high; /* clipping range of the ratio (0.2, 0.2) */
    double beta;              /* KL coefficient (0 = no reference policy) */
    int max_completion;       /* dr_grpo's denominator */
} grpo_loss_opts;

/* One micro-batch: n_seq completions whose tokens lie at [off, off + len) of the per-token
 * arrays (only completion tokens; the prompt is not there). */
typedef struct grpo_loss_in {
    int n_seq;
    const int *off, *len;  /* [n_seq] */
    const double *adv;     /* [n_seq] */
    const float *logp;     /* [n_tok] log-probabilities under the current policy */
    const float *old_logp; /* [n_tok] those of the policy that sampled; NULL = logp (ratio 1) */
    const float *ref_logp; /* [n_tok] under the reference policy; needed when beta != 0 */
    int n_accum;           /* micro-batches in the optimizer step (>= 1) */
    int64_t n_items;       /* dapo: completion tokens in the whole optimizer step (>= 1) */
} grpo_loss_in;

/* What TRL logs, summed over the micro-batch's completion tokens (the trainer divides). */
typedef struct grpo_loss_stats {
    double loss;         /* the micro-batch's loss, aggregated as above */
    double kl_sum;       /* Σ per-token k3 KL (0 when beta == 0 and ref_logp NULL) */
    int64_t n_tok;       /* completion tokens */
    int64_t n_clip_low;  /* tokens with ratio < 1 - eps_low and A < 0 */
    int64_t n_clip_high; /* tokens with ratio > 1 + eps_high and A > 0 */
} grpo_loss_stats;

/* The loss of one micro-batch and coef[t] = dLoss/dlogp[t] for every token (n_tok entries,
 * n_tok = the end of the last sequence's range). LT_ERR_ARG (err: LT_ERRLEN) when an option or
 * an input is out of range (beta != 0 without ref_logp, n_accum < 1, ...). (The ranges must be
 * in order and not overlap; a token in no range gets coef 0. coef or st may be NULL.) */
lt_status grpo_loss(const grpo_loss_opts *o, const grpo_loss_in *in, float *coef,
                    grpo_loss_stats *st, char *err);

#endif
