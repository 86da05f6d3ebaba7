/* test_grpo_loss.c — GRPO's arithmetic (cuda/train/grpo_loss.c) against a second, independent
 * implementation written here the way TRL's GRPOTrainer._compute_loss writes it: padded
 * [sequences, max length] arrays with a completion mask, per_token_loss = -min(coef_1·A,
 * coef_2·A) + beta·k3, then each loss type's literal reduction, in double.
 *
 * Checks: the loss of all four types, with and without beta (and beta 0 with a reference, whose
 * KL is still reported), on a micro-batch whose old log-probabilities make some tokens clip
 * low and some high, with a sequence of length 0 and a gap between ranges; coef against
 * central differences of the independent loss for every token (all away from the clip kinks);
 * the clip counts; advantages for group, batch and no scaling against hand-computed values
 * (unbiased std, + 1e-4); the names; and the bad inputs, each LT_ERR_ARG with a message.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/train/grpo_loss.h"
#include "tests/unit/tap.h"

/* ---- the micro-batch ------------------------------------------------------------------- */

enum { NSEQ = 4, NTOK = 15, MAXL = 6 };
static const int OFF[NSEQ] = {0, 6, 9, 9}, LEN[NSEQ] = {5, 3, 0, 6}; /* token 5: no sequence */
static const double ADV[NSEQ] = {0.9, -1.2, 0.3, -0.4};
/* logp - old_logp per token: ratios 0.61 (clips low when A < 0), 0.67, 0.74, 0.90, 1, 1.11,
 * 1.22 and 1.49 (clips high when A > 0), all at least 0.06 from the range [0.8, 1.28] */
static const double DLOG[NTOK] = {-0.5,  -0.1, 0,    0.1,  0.4, 0, -0.5, 0.4,
                                  -0.05, 0.4,  -0.5, -0.4, 0.2, 0, -0.3};
static double LP[NTOK], OLD[NTOK], REF[NTOK];

static uint64_t rng = 2024;
static double urand(void) { /* [0, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng >> 11) / 9007199254740992.0;
}

/* The arrays grpo_loss reads are float: the double copies hold the float-rounded values, so
 * both implementations see the same inputs. */
static void make_batch(void) {
    for (int t = 0; t < NTOK; t++) {
        LP[t] = (float)(-0.1 - 2.9 * urand());
        OLD[t] = (float)(LP[t] - DLOG[t]);
        REF[t] = (float)(LP[t] + 0.6 * urand() - 0.3);
    }
}

/* ---- the independent implementation ---------------------------------------------------- */

typedef struct ref_opts {
    const char *loss_type;
    double eps, eps_high, beta;
    int max_completion_length, grad_accum;
    double num_items_in_batch;
} ref_opts;

/* TRL's _compute_loss on padded [NSEQ, MAXL] tensors; lp may be perturbed by the caller. */
static double ref_loss(const ref_opts *o, const double *lp, const double *old, const double *ref) {
    double per_token_loss[NSEQ][MAXL] = {{0}}, mask[NSEQ][MAXL] = {{0}};
    for (int i = 0; i < NSEQ; i++)
        for (int j = 0; j < LEN[i]; j++) {
            int t = OFF[i] + j;
            double coef_1 = exp(lp[t] - old[t]);
            double coef_2 = fmin(fmax(coef_1, 1 - o->eps), 1 + o->eps_high);
            double per_token_loss1 = coef_1 * ADV[i], per_token_loss2 = coef_2 * ADV[i];
            per_token_loss[i][j] = -fmin(per_token_loss1, per_token_loss2);
            if (o->beta != 0.0) {
                double per_token_kl = exp(ref[t] - lp[t]) - (ref[t] - lp[t]) - 1;
                per_token_loss[i][j] += o->beta * per_token_kl;
            }
            mask[i][j] = 1;
        }
    double loss = 0;
    if (!strcmp(o->loss_type, "grpo")) {
        for (int i = 0; i < NSEQ; i++) {
            double s = 0, m = 0;
            for (int j = 0; j < MAXL; j++)
                s += per_token_loss[i][j] * mask[i][j], m += mask[i][j];
            loss += s / fmax(m, 1.0);
        }
        loss = loss / NSEQ / o->grad_accum;
    } else if (!strcmp(o->loss_type, "bnpo")) {
        double s = 0, m = 0;
        for (int i = 0; i < NSEQ; i++)
            for (int j = 0; j < MAXL; j++)
                s += per_token_loss[i][j] * mask[i][j], m += mask[i][j];
        loss = s / fmax(m, 1.0) / o->grad_accum;
    } else if (!strcmp(o->loss_type, "dr_grpo")) {
        double s = 0;
        for (int i = 0; i < NSEQ; i++)
            for (int j = 0; j < MAXL; j++)
                s += per_token_loss[i][j] * mask[i][j];
        loss = s / (NSEQ * o->max_completion_length) / o->grad_accum;
    } else { /* dapo */
        double s = 0;
        for (int i = 0; i < NSEQ; i++)
            for (int j = 0; j < MAXL; j++)
                s += per_token_loss[i][j] * mask[i][j];
        loss = s / o->num_items_in_batch;
    }
    return loss;
}

/* ---- loss, coef, clip counts ------------------------------------------------------------ */

static float LPF[NTOK], OLDF[NTOK], REFF[NTOK];

static grpo_loss_in batch_in(int with_ref) {
    grpo_loss_in in = {.n_seq = NSEQ,
                       .off = OFF,
                       .len = LEN,
                       .adv = ADV,
                       .logp = LPF,
                       .old_logp = OLDF,
                       .ref_logp = with_ref ? REFF : NULL,
                       .n_accum = 3,
                       .n_items = 40};
    return in;
}

static void test_loss(const char *type, double beta, int with_ref) {
    char name[200];
    ref_opts ro = {type, 0.2, 0.28, beta, 8, 3, 40};
    grpo_loss_opts o = {.type = (grpo_loss_type)grpo_loss_type_parse(type),
                        .eps_low = 0.2,
                        .eps_high = 0.28,
                        .beta = beta,
                        .max_completion = 8};
    grpo_loss_in in = batch_in(with_ref);
    float coef[NTOK];
    for (int t = 0; t < NTOK; t++)
        coef[t] = NAN; /* every token, the gap included, must be written */
    grpo_loss_stats st;
    char err[LT_ERRLEN] = "";
    lt_status rc = grpo_loss(&o, &in, coef, &st, err);
    snprintf(name, sizeof name, "%s beta=%g%s: grpo_loss runs", type, beta,
             with_ref ? " (reference given)" : "");
    if (!ok(rc == LT_OK, name)) {
        diag("%s", err);
        return;
    }
    double want = ref_loss(&ro, LP, OLD, REF);
    snprintf(name, sizeof name, "%s beta=%g: loss %.9f = TRL's formula %.9f", type, beta, st.loss,
             want);
    ok(fabs(st.loss - want) <= 1e-12 * fmax(1.0, fabs(want)), name);
    /* coef[t] against central differences of the independent loss */
    double lp[NTOK], maxerr = 0, maxg = 1e-12;
    memcpy(lp, LP, sizeof lp);
    for (int t = 0; t < NTOK; t++) {
        const double h = 1e-6;
        lp[t] = LP[t] + h;
        double up = ref_loss(&ro, lp, OLD, REF);
        lp[t] = LP[t] - h;
        double dn = ref_loss(&ro, lp, OLD, REF);
        lp[t] = LP[t];
        double num = (up - dn) / (2 * h);
        maxerr = fmax(maxerr, fabs(num - coef[t]));
        maxg = fmax(maxg, fabs(num));
    }
    snprintf(name, sizeof name, "%s beta=%g: coef = dLoss/dlogp by central differences", type,
             beta);
    if (!ok(maxerr <= 1e-6 * maxg, name)) diag("max error %.3g, max |grad| %.3g", maxerr, maxg);
    ok(coef[5] == 0.0f, "a token in no sequence gets coef 0");
    /* the stats */
    double kl = 0;
    int64_t low = 0, high = 0;
    for (int i = 0; i < NSEQ; i++)
        for (int t = OFF[i]; t < OFF[i] + LEN[i]; t++) {
            kl += exp(REF[t] - LP[t]) - (REF[t] - LP[t]) - 1;
            double r = exp(LP[t] - OLD[t]);
            low += r < 0.8 && ADV[i] < 0;
            high += r > 1.28 && ADV[i] > 0;
        }
    if (!with_ref) kl = 0;
    snprintf(name, sizeof name, "%s beta=%g: kl_sum, n_tok 14, clips 4 low and 1 high", type, beta);
    ok(fabs(st.kl_sum - kl) <= 1e-12 && st.n_tok == 14 && st.n_clip_low == 4 &&
           st.n_clip_high == 1 && low == 4 && high == 1,
       name);
}

/* With no old log-probabilities the ratio is 1: no clipping, coef = -A·weight + the KL term's. */
static void test_on_policy(void) {
    grpo_loss_opts o = {.type = GRPO_LOSS_BNPO, .eps_low = 0.2, .eps_high = 0.2};
    grpo_loss_in in = batch_in(0);
    in.old_logp = NULL;
    in.n_accum = 1;
    float coef[NTOK];
    grpo_loss_stats st;
    char err[LT_ERRLEN];
    lt_status rc = grpo_loss(&o, &in, coef, &st, err);
    double e = 0, want_loss = 0;
    for (int i = 0; i < NSEQ; i++)
        for (int t = OFF[i]; t < OFF[i] + LEN[i]; t++) {
            e = fmax(e, fabs(coef[t] - (-ADV[i] / 14.0)));
            want_loss += -ADV[i] / 14.0;
        }
    ok(rc == LT_OK && e <= 1e-7 && st.n_clip_low == 0 && st.n_clip_high == 0 &&
           fabs(st.loss - want_loss) <= 1e-12,
       "old_logp NULL: ratio 1, no clipping, coef = -A / tokens (bnpo)");
    /* coef and stats are optional */
    ok(grpo_loss(&o, &in, NULL, NULL, err) == LT_OK, "coef and st may be NULL");
}

/* ---- advantages ------------------------------------------------------------------------ */

static void check_vec(const char *name, const double *got, const double *want, int n) {
    double e = 0;
    for (int i = 0; i < n; i++)
        e = fmax(e, fabs(got[i] - want[i]));
    if (!ok(e <= 1e-12, name)) diag("max error %.3g", e);
}

static void test_advantages(void) {
    /* two groups of four: {1, 0, 0.5, 1} (mean 0.625, Σ dev² = 0.6875, unbiased std
     * sqrt(0.6875 / 3)) and {2, 2, 3, 5} (mean 3, Σ dev² = 6, std sqrt(2)); the whole batch
     * (mean 1.8125, Σ dev² = 17.96875, std sqrt(17.96875 / 7)) */
    const double r[8] = {1, 0, 0.5, 1, 2, 2, 3, 5};
    double adv[8], gs[8], want[8];
    double s1 = sqrt(0.6875 / 3), s2 = sqrt(2.0), sb = sqrt(17.96875 / 7);
    const double dev[8] = {0.375, -0.625, -0.125, 0.375, -1, -1, 0, 2};
    grpo_advantages(r, 8, 4, GRPO_SCALE_GROUP, adv, gs);
    for (int i = 0; i < 8; i++)
        want[i] = dev[i] / ((i < 4 ? s1 : s2) + 1e-4);
    check_vec("advantages, group std: (r - group mean) / (group std + 1e-4)", adv, want, 8);
    for (int i = 0; i < 8; i++)
        want[i] = i < 4 ? s1 : s2;
    check_vec("group_std: each row's unbiased group std", gs, want, 8);
    grpo_advantages(r, 8, 4, GRPO_SCALE_BATCH, adv, NULL);
    for (int i = 0; i < 8; i++)
        want[i] = dev[i] / (sb + 1e-4);
    check_vec("advantages, batch std: (r - group mean) / (batch std + 1e-4)", adv, want, 8);
    grpo_advantages(r, 8, 4, GRPO_SCALE_NONE, adv, gs);
    check_vec("advantages, no scaling: r - group mean", adv, dev, 8);
    /* groups of one: std 0, advantage 0 */
    grpo_advantages(r, 3, 1, GRPO_SCALE_GROUP, adv, gs);
    ok(adv[0] == 0 && adv[1] == 0 && adv[2] == 0 && gs[0] == 0 && gs[2] == 0,
       "a group of one has std 0 and advantage 0");
    /* equal rewards: advantage 0, not NaN */
    const double same[4] = {0.7, 0.7, 0.7, 0.7};
    grpo_advantages(same, 4, 4, GRPO_SCALE_GROUP, adv, NULL);
    ok(adv[0] == 0 && adv[3] == 0, "a group of equal rewards gives advantage 0");
}

/* ---- names and bad inputs ---------------------------------------------------------------- */

static void test_names(void) {
    ok(grpo_loss_type_parse("dapo") == GRPO_LOSS_DAPO &&
           grpo_loss_type_parse("grpo") == GRPO_LOSS_GRPO &&
           grpo_loss_type_parse("bnpo") == GRPO_LOSS_BNPO &&
           grpo_loss_type_parse("dr_grpo") == GRPO_LOSS_DR_GRPO,
       "the four loss type names parse");
    ok(grpo_loss_type_parse("ppo") == -1 && grpo_loss_type_parse("DAPO") == -1 &&
           grpo_loss_type_parse("") == -1 && grpo_loss_type_parse(NULL) == -1,
       "unknown loss type names are -1");
    ok(!strcmp(grpo_loss_type_name(GRPO_LOSS_DR_GRPO), "dr_grpo") &&
           !strcmp(grpo_loss_type_name(GRPO_LOSS_DAPO), "dapo"),
       "grpo_loss_type_name names them back");
    ok(grpo_scale_parse("group") == GRPO_SCALE_GROUP &&
           grpo_scale_parse("true") == GRPO_SCALE_GROUP &&
           grpo_scale_parse("batch") == GRPO_SCALE_BATCH &&
           grpo_scale_parse("none") == GRPO_SCALE_NONE &&
           grpo_scale_parse("false") == GRPO_SCALE_NONE && grpo_scale_parse("yes") == -1,
       "scale_rewards names parse (and the old true/false)");
}

static void bad(const char *name, const grpo_loss_opts *o, const grpo_loss_in *in,
                const char *needle) {
    char err[LT_ERRLEN] = "";
    float coef[NTOK];
    grpo_loss_stats st;
    lt_status rc = grpo_loss(o, in, coef, &st, err);
    if (!ok(rc == LT_ERR_ARG && strstr(err, needle), name)) diag("rc %d, err \"%s\"", rc, err);
}

static void test_bad_inputs(void) {
    grpo_loss_opts o = {.type = GRPO_LOSS_DAPO, .eps_low = 0.2, .eps_high = 0.2, .beta = 0.04};
    grpo_loss_in in = batch_in(0);
    bad("beta != 0 without ref_logp is LT_ERR_ARG", &o, &in, "reference");
    o.beta = 0;
    in.n_accum = 0;
    bad("n_accum 0 is LT_ERR_ARG", &o, &in, "n_accum");
    in = batch_in(0);
    in.n_items = 0;
    bad("dapo with n_items 0 is LT_ERR_ARG", &o, &in, "n_items");
    in.n_items = 10;
    bad("dapo with n_items below the micro-batch's tokens is LT_ERR_ARG", &o, &in, "n_items");
    in = batch_in(0);
    o.type = (grpo_loss_type)grpo_loss_type_parse("ppo");
    bad("an unknown loss type is LT_ERR_ARG", &o, &in, "loss type");
    o.type = (grpo_loss_type)17;
    bad("an out-of-range loss type is LT_ERR_ARG", &o, &in, "loss type");
    o.type = GRPO_LOSS_DR_GRPO;
    o.max_completion = 0;
    bad("dr_grpo without max_completion is LT_ERR_ARG", &o, &in, "max_completion");
    o.type = GRPO_LOSS_GRPO;
    o.eps_low = 1.5;
    bad("epsilon >= 1 is LT_ERR_ARG", &o, &in, "clipping");
    o.eps_low = 0.2;
    int off2[NSEQ] = {0, 3, 9, 9};
    in.off = off2;
    bad("overlapping sequences are LT_ERR_ARG", &o, &in, "overlap");
    in = batch_in(0);
    in.n_seq = 0;
    bad("an empty micro-batch is LT_ERR_ARG", &o, &in, "n_seq");
    char err[LT_ERRLEN];
    ok(grpo_loss(NULL, &in, NULL, NULL, err) == LT_ERR_ARG, "no options is LT_ERR_ARG");
}

int main(void) {
    make_batch();
    for (int t = 0; t < NTOK; t++)
        LPF[t] = (float)LP[t], OLDF[t] = (float)OLD[t], REFF[t] = (float)REF[t];
    const char *types[4] = {"dapo", "grpo", "bnpo", "dr_grpo"};
    for (int k = 0; k < 4; k++) {
        test_loss(types[k], 0.0, 0);
        test_loss(types[k], 0.04, 1);
    }
    test_loss("bnpo", 0.0, 1); /* beta 0 with a reference: the KL is reported, not added */
    test_on_policy();
    test_advantages();
    test_names();
    test_bad_inputs();
    return tap_done();
}
