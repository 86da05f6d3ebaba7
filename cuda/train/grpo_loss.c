/* grpo_loss.c — GRPO's arithmetic (grpo_loss.h): group-relative advantages, and one
 * micro-batch's loss with its derivative with respect to each token's log-probability, for TRL's
 * GRPOTrainer loss types dapo, grpo, bnpo and dr_grpo (trl/trainer/grpo_trainer.py,
 * _compute_loss and _generate_and_score_completions).
 *
 * The per-token loss is -min(ratio·A, clamp(ratio, 1 - eps_low, 1 + eps_high)·A) + beta·k3.
 * Its derivative: d ratio / d logp = ratio, so the unclipped branch gives -A·ratio and the
 * clipped branch (a constant once clamped) gives 0; the k3 term gives beta·(1 - exp(ref - logp)).
 * A tie (ratio·A == clipped·A: ratio inside the range, at one of its ends, or A = 0) takes the
 * unclipped branch's full gradient, which is what torch gives TRL: torch.min of two tensors
 * (minimum) sends half the gradient to each side on a tie, and torch.clamp passes its gradient
 * through for min <= x <= max (ends included), so both halves reach ratio. Each token's
 * derivative is then multiplied by its aggregation weight (1 / (len · n_seq · n_accum) for grpo,
 * ...).
 *
 * Pure host arithmetic in double; owns nothing; knows no model, no backend, no trainer state.
 */
#include "cuda/train/grpo_loss.h"

#include <math.h>
#include <string.h>

static const char *const loss_names[] = {"dapo", "grpo", "bnpo", "dr_grpo"};

int grpo_loss_type_parse(const char *name) {
    if (!name) return -1;
    for (int i = 0; i < (int)(sizeof loss_names / sizeof loss_names[0]); i++)
        if (strcmp(name, loss_names[i]) == 0) return i;
    return -1;
}

const char *grpo_loss_type_name(grpo_loss_type t) {
    if ((int)t < 0 || (int)t >= (int)(sizeof loss_names / sizeof loss_names[0])) return "?";
    return loss_names[t];
}

int grpo_scale_parse(const char *name) {
    if (!name) return -1;
    if (strcmp(name, "group") == 0 || strcmp(name, "true") == 0) return GRPO_SCALE_GROUP;
    if (strcmp(name, "batch") == 0) return GRPO_SCALE_BATCH;
    if (strcmp(name, "none") == 0 || strcmp(name, "false") == 0) return GRPO_SCALE_NONE;
    return -1;
}

/* mean and unbiased (n - 1) standard deviation of x[0..n); std 0 when n < 2 */
static void mean_std(const double *x, int n, double *mean, double *std) {
    double m = 0, ss = 0;
    for (int i = 0; i < n; i++)
        m += x[i];
    m = n > 0 ? m / n : 0;
    for (int i = 0; i < n; i++)
        ss += (x[i] - m) * (x[i] - m);
    *mean = m;
    *std = n > 1 ? sqrt(ss / (n - 1)) : 0;
}

/* As TRL: the mean is always the group's; the std is the group's or the batch's. A group size
 * below 1 makes all rows one group; a last group shorter than `group` is a group of its own. */
void grpo_advantages(const double *rewards, int n_rows, int group, grpo_scale scale, double *adv,
                     double *group_std) {
    if (n_rows <= 0) return;
    if (group < 1) group = n_rows;
    double bmean, bstd;
    mean_std(rewards, n_rows, &bmean, &bstd);
    for (int g0 = 0; g0 < n_rows; g0 += group) {
        int n = n_rows - g0 < group ? n_rows - g0 : group;
        double gmean, gstd;
        mean_std(rewards + g0, n, &gmean, &gstd);
        double div = scale == GRPO_SCALE_GROUP   ? gstd + 1e-4
                     : scale == GRPO_SCALE_BATCH ? bstd + 1e-4
                                                 : 1.0;
        for (int i = g0; i < g0 + n; i++) {
            adv[i] = (rewards[i] - gmean) / div;
            if (group_std) group_std[i] = gstd;
        }
    }
}

/* The argument checks; n_tok (the token arrays' length) and n_comp (completion tokens) out. */
static lt_status loss_check(const grpo_loss_opts *o, const grpo_loss_in *in, int64_t *n_tok,
                            int64_t *n_comp, char *err) {
    if (!o || !in) return lt_fail(err, LT_ERR_ARG, "grpo loss: no options or no input");
    if ((int)o->type < GRPO_LOSS_DAPO || (int)o->type > GRPO_LOSS_DR_GRPO)
        return lt_fail(err, LT_ERR_ARG, "grpo loss: unknown loss type %d", (int)o->type);
    if (!(o->eps_low >= 0 && o->eps_low < 1) || !(o->eps_high >= 0) || !isfinite(o->eps_high))
        return lt_fail(err, LT_ERR_ARG,
                       "grpo loss: the clipping range (epsilon %g, epsilon_high %g) must have "
                       "0 <= epsilon < 1 and epsilon_high >= 0",
                       o->eps_low, o->eps_high);
    if (!isfinite(o->beta) || o->beta < 0)
        return lt_fail(err, LT_ERR_ARG, "grpo loss: beta %g must be finite and >= 0", o->beta);
    if (o->beta != 0 && !in->ref_logp)
        return lt_fail(err, LT_ERR_ARG,
                       "grpo loss: beta = %g needs the reference policy's log-probabilities",
                       o->beta);
    if (o->type == GRPO_LOSS_DR_GRPO && o->max_completion < 1)
        return lt_fail(err, LT_ERR_ARG, "grpo loss: dr_grpo needs max_completion >= 1 (got %d)",
                       o->max_completion);
    if (in->n_accum < 1)
        return lt_fail(err, LT_ERR_ARG, "grpo loss: n_accum must be >= 1 (got %d)", in->n_accum);
    if (in->n_seq < 1 || !in->off || !in->len || !in->adv || !in->logp)
        return lt_fail(err, LT_ERR_ARG,
                       "grpo loss: a micro-batch needs n_seq >= 1, off, len, adv and logp");
    int64_t end = 0, sum = 0;
    for (int i = 0; i < in->n_seq; i++) {
        if (in->len[i] < 0 || in->off[i] < end)
            return lt_fail(err, LT_ERR_ARG,
                           "grpo loss: sequence %d's tokens [%d, +%d) overlap the previous one "
                           "or are out of order",
                           i, in->off[i], in->len[i]);
        if (!isfinite(in->adv[i]))
            return lt_fail(err, LT_ERR_ARG, "grpo loss: sequence %d's advantage is not finite", i);
        end = (int64_t)in->off[i] + in->len[i];
        sum += in->len[i];
    }
    if (o->type == GRPO_LOSS_DAPO && in->n_items < 1)
        return lt_fail(err, LT_ERR_ARG,
                       "grpo loss: dapo needs n_items >= 1, the completion tokens of the "
                       "optimizer step (got %lld)",
                       (long long)in->n_items);
    if (o->type == GRPO_LOSS_DAPO && in->n_items < sum)
        return lt_fail(err, LT_ERR_ARG,
                       "grpo loss: n_items %lld is less than this micro-batch's %lld completion "
                       "tokens",
                       (long long)in->n_items, (long long)sum);
    *n_tok = end;
    *n_comp = sum;
    return LT_OK;
}

lt_status grpo_loss(const grpo_loss_opts *o, const grpo_loss_in *in, float *coef,
                    grpo_loss_stats *st, char *err) {
    int64_t n_tok = 0, n_comp = 0;
    lt_status rc = loss_check(o, in, &n_tok, &n_comp, err);
    if (rc != LT_OK) return rc;
    grpo_loss_stats s = {0};
    s.n_tok = n_comp;
    if (coef) memset(coef, 0, sizeof(float) * (size_t)n_tok);
    /* the aggregation weight of every token of a sequence; grpo's also divides by its length */
    double agg;
    switch (o->type) {
    case GRPO_LOSS_GRPO:
        agg = 1.0 / ((double)in->n_seq * in->n_accum);
        break;
    case GRPO_LOSS_BNPO:
        agg = 1.0 / ((double)(n_comp > 0 ? n_comp : 1) * in->n_accum);
        break;
    case GRPO_LOSS_DR_GRPO:
        agg = 1.0 / ((double)in->n_seq * o->max_completion * in->n_accum);
        break;
    default: /* dapo */
        agg = 1.0 / (double)in->n_items;
        break;
    }
    double lo = 1.0 - o->eps_low, hi = 1.0 + o->eps_high;
    for (int i = 0; i < in->n_seq; i++) {
        double A = in->adv[i];
        double w = o->type == GRPO_LOSS_GRPO ? agg / (in->len[i] > 0 ? in->len[i] : 1) : agg;
        double seq = 0;
        for (int64_t t = in->off[i]; t < (int64_t)in->off[i] + in->len[i]; t++) {
            double lp = in->logp[t], old = in->old_logp ? in->old_logp[t] : lp;
            double ratio = exp(lp - old);
            double clipped = ratio < lo ? lo : ratio > hi ? hi : ratio;
            double l1 = ratio * A, l2 = clipped * A;
            /* the smaller one is the loss's term; a tie takes the unclipped branch */
            int clip_branch = l2 < l1;
            double lt = -(clip_branch ? l2 : l1);
            double d = clip_branch ? 0.0 : -A * ratio;
            if (ratio < lo && A < 0) s.n_clip_low++;
            if (ratio > hi && A > 0) s.n_clip_high++;
            if (in->ref_logp) {
                double x = (double)in->ref_logp[t] - lp, ex = exp(x);
                double kl = ex - x - 1.0;
                s.kl_sum += kl;
                if (o->beta != 0) {
                    lt += o->beta * kl;
                    d += o->beta * (1.0 - ex);
                }
            }
            seq += lt;
            if (coef) coef[t] = (float)(d * w);
        }
        s.loss += seq * w;
    }
    if (st) *st = s;
    return LT_OK;
}
