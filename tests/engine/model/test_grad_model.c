/* test_grad_model.c — the model-level backward (gemma3_backward.c) against finite
 * differences, on a micro Gemma 3 built in memory (2 layers: one sliding with a window of
 * 4, one full; GQA 2:1; random norms).
 *
 * Checks: the training loss equals the cross-entropy of gemma3_forward's logits for each
 * packed sample (packing keeps samples apart); LoRA A/B gradients, with and without
 * dropout, and full fine-tuning gradients (matrices, norms, embedding) match central
 * differences of the loss; gradients accumulate across calls; AdamW steps lower the loss.
 * GRPO's weighted pass: per-token log-probabilities against the forward's scaled logits, and
 * the weighted LoRA gradient against the weighted sum of single-token gradients and against
 * central differences. The loss and gradient checks run again with the MLP in blocks of rows
 * (gemma3_backward.c does that for large models) that do not divide the token count. Image
 * rows: the loss against gemma3_forward_images, LoRA gradients against central differences,
 * and a backend lacking attention_span(_backward) refuses them naming the op.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/backend/cpu/grad.h"
#include "cuda/train/train.h"
#include "tests/unit/tap.h"
#include "tests/unit/test_micro_model.h"

static lt_ctx ctx;
static uint64_t rng = 99;

static float frand(void) {
    return test_frand(&rng);
}

/* two packed samples of 7 and 6 tokens (longer than the window of 4) */
static int32_t ids[13] = {2, 5, 9, 11, 3, 30, 7, 2, 8, 8, 21, 39, 4};
static int32_t tgt[13] = {5, 9, 11, 3, 30, 7, -100, 8, 8, -100, 39, 4, -100};
static int seg[2] = {7, 6};
static train_batch batch = {
    .ids = ids, .targets = tgt, .seg_len = seg, .n_seg = 2, .N = 13, .n_labels = 10};

static gemma3_model *M;
static lt_adapters *AD;
static uint64_t SEED;
static const train_batch *CUR = &batch; /* the batch loss_now evaluates */

static double loss_now(void) {
    double L = 0;
    lt_status st = gemma3_train_batch(M, &ctx, lora_trainable(AD), CUR, 1.0f, 0, SEED, &L);
    if (st != LT_OK) diag("loss failed: %s", ctx.err);
    return L;
}

/* Central differences on up to `count` evenly spread entries of p vs the analytic grad. */
static void fd_check(const char *name, float *p, const float *g, int64_t n, int count, double tol) {
    double maxerr = 0, maxg = 1e-6;
    int64_t stride = n / count > 0 ? n / count : 1;
    for (int64_t i = 0; i < n; i += stride) {
        float save = p[i];
        float h = 1e-2f * fmaxf(1.0f, fabsf(save));
        p[i] = save + h;
        double lp = loss_now();
        p[i] = save - h;
        double lm = loss_now();
        p[i] = save;
        double num = (lp - lm) / (2.0 * h);
        maxerr = fmax(maxerr, fabs(num - g[i]));
        maxg = fmax(maxg, fabs(g[i]));
    }
    char label[160];
    snprintf(label, sizeof label, "%s matches finite differences", name);
    if (!ok(maxerr / maxg <= tol, label)) diag("max error %.3g, max |grad| %.3g", maxerr, maxg);
}

static double ce_rows(const float *logits, const int32_t *t, int n, int V) {
    double s = 0;
    for (int i = 0; i < n; i++) {
        if (t[i] == -100) continue;
        const float *z = logits + (size_t)i * V;
        double mx = -1e30, se = 0;
        for (int j = 0; j < V; j++)
            mx = fmax(mx, z[j]);
        for (int j = 0; j < V; j++)
            se += exp(z[j] - mx);
        s += mx + log(se) - z[t[i]];
    }
    return s;
}

static void test_loss_matches_forward(void) {
    double want = 0;
    int off = 0;
    for (int s = 0; s < 2; s++) {
        float *logits = malloc(sizeof(float) * (size_t)seg[s] * 40);
        gemma3_outputs out = {0};
        out.logits = logits;
        lt_status st = gemma3_forward(M, &ctx, ids + off, seg[s], NULL, &out);
        if (st != LT_OK) diag("forward: %s", ctx.err);
        want += ce_rows(logits, tgt + off, seg[s], 40);
        free(logits);
        off += seg[s];
    }
    double got = loss_now();
    is_close(got, want, 1e-4 * fabs(want),
             "packed training loss = Σ CE of gemma3_forward per sample");
}

static void test_lora(float dropout) {
    lora_opts o = {.r = 3, .alpha = 6, .dropout = dropout, .seed = 5};
    char err[LT_ERRLEN] = "";
    lt_status st = lora_attach(&AD, M, &ctx, &o, err);
    is_int(st, LT_OK, "lora_attach (all seven targets)");
    if (st != LT_OK) {
        diag("%s", err);
        return;
    }
    is_int(AD->n_slots, 14, "14 adapted linears in 2 layers");
    for (int i = 0; i < AD->n_slots; i++) { /* B = 0 makes A's gradient 0: give B values */
        lt_tensor *b = &AD->slots[i].lora.b;
        for (int64_t k = 0; k < lt_tensor_numel(b); k++)
            ((float *)b->data)[k] = 0.3f * frand();
    }
    SEED = dropout > 0 ? 1234 : 0;
    lora_zero_grads(AD);
    double L = 0;
    st = gemma3_train_batch(M, &ctx, lora_trainable(AD), &batch, 1.0f, 1, SEED, &L);
    is_int(st, LT_OK, "train_batch with gradients");
    is_close(L, loss_now(), 1e-9 * fabs(L) + 1e-9, "the loss with and without gradients agree");
    const char *tag = dropout > 0 ? " (dropout 0.3)" : "";
    int pick[4] = {0, 4, 8, 13}; /* q of layer 0, gate of layer 0, o of layer 1, down of layer 1 */
    for (int j = 0; j < 4; j++) {
        lora_slot *s = &AD->slots[pick[j]];
        char name[256];
        snprintf(name, sizeof name, "%s lora_A%s", s->module, tag);
        fd_check(name, s->lora.a.data, s->lora.grad_a.data, lt_tensor_numel(&s->lora.a), 12, 5e-3);
        snprintf(name, sizeof name, "%s lora_B%s", s->module, tag);
        fd_check(name, s->lora.b.data, s->lora.grad_b.data, lt_tensor_numel(&s->lora.b), 12, 5e-3);
    }
    if (dropout == 0) {
        /* accumulation with grad_scale: a second call with 0.5 adds half */
        float g0 = ((float *)AD->slots[0].lora.grad_b.data)[1];
        gemma3_train_batch(M, &ctx, lora_trainable(AD), &batch, 0.5f, 1, 0, &L);
        is_close(((float *)AD->slots[0].lora.grad_b.data)[1], 1.5 * g0, 1e-4 * fabs(g0) + 1e-6,
                 "gradients accumulate, scaled by grad_scale");
        /* clipping (torch clip_grad_norm_): the global norm is scaled down to max_norm */
        double n0 = 0, n1 = 0, n2 = 0, direct = 0;
        for (int i = 0; i < AD->n_params; i++) {
            const float *g = AD->params[i].grad.data;
            for (int64_t k = 0; k < lt_tensor_numel(&AD->params[i].grad); k++)
                direct += (double)g[k] * g[k];
        }
        optim_clip(AD, 0, &n0, err);
        is_close(n0, sqrt(direct), 1e-9 * n0, "optim_clip reports the global L2 norm");
        optim_clip(AD, (float)(n0 / 2), &n1, err);
        optim_clip(AD, 0, &n2, err);
        is_close(n2, n0 / 2, 1e-5 * n0, "max_grad_norm scales the gradient to the limit");
        optim_clip(AD, (float)(n0 * 4), &n1, err);
        optim_clip(AD, 0, &n1, err);
        is_close(n1, n2, 1e-9 * n0, "a norm under the limit is left alone");
        /* a few AdamW steps on this batch lower its loss */
        optim_opts oo = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f};
        double first = loss_now(), last = first;
        for (int step = 1; step <= 5; step++) {
            lora_zero_grads(AD);
            gemma3_train_batch(M, &ctx, lora_trainable(AD), &batch, 1.0f / batch.n_labels, 1, 0,
                               &last);
            optim_step(AD, &oo, oo.lr, 1, err);
        }
        last = loss_now();
        ok(last < first, "five AdamW steps lower the loss");
        diag("loss %.4f -> %.4f", first / batch.n_labels, last / batch.n_labels);
    }
    lora_free(AD);
    AD = NULL;
    int hooked = 0;
    for (int l = 0; l < 2; l++)
        hooked += M->layers[l].q_proj.lora != NULL || M->layers[l].down_proj.lora != NULL;
    ok(hooked == 0, "lora_free detaches every adapter");
}

static void test_full(void) {
    lora_opts o = {.full = 1};
    char err[LT_ERRLEN] = "";
    lt_status st = lora_attach(&AD, M, &ctx, &o, err);
    is_int(st, LT_OK, "full fine-tuning attaches");
    if (st != LT_OK) return;
    SEED = 0;
    double L;
    lora_zero_grads(AD);
    st = gemma3_train_batch(M, &ctx, lora_trainable(AD), &batch, 1.0f, 1, 0, &L);
    is_int(st, LT_OK, "full backward runs");
    for (int i = 0; i < AD->n_params; i++) {
        train_param *p = &AD->params[i];
        if (!strstr(p->name, "embed") && !strstr(p->name, "layers.0.self_attn.k_proj") &&
            !strstr(p->name, "layers.1.mlp.up") && !strstr(p->name, "layers.0.input_layernorm") &&
            !strstr(p->name, "layers.1.self_attn.q_norm") && !strstr(p->name, "post_feedforward") &&
            strcmp(p->name, "model.norm.weight") != 0)
            continue;
        fd_check(p->name, p->value->data, p->grad.data, lt_tensor_numel(p->value), 16, 5e-3);
    }
    lora_free(AD);
    AD = NULL;
    ok(M->embed_tokens.grad_w.data == NULL, "lora_free unhooks full fine-tuning gradients");
}

/* GRPO's pass: per-token loss weights of both signs (and 0), a logit scale of 1/0.7 and the
 * per-token log-probabilities. logp must be log_softmax(gemma3_forward's logits / 0.7) at the
 * target; the loss Σ w·CE; the LoRA gradient Σ_t w_t × (the gradient of token t's loss alone,
 * a batch whose only weight is 1 at t), and the weighted loss's central differences. */
static void test_weighted(void) {
    lora_opts o = {.r = 3, .alpha = 6, .seed = 7};
    char err[LT_ERRLEN] = "";
    if (lora_attach(&AD, M, &ctx, &o, err) != LT_OK) {
        diag("lora_attach: %s", err);
        ok(0, "lora_attach for the weighted pass");
        return;
    }
    for (int i = 0; i < AD->n_slots; i++) {
        lt_tensor *b = &AD->slots[i].lora.b;
        for (int64_t k = 0; k < lt_tensor_numel(b); k++)
            ((float *)b->data)[k] = 0.3f * frand();
    }
    SEED = 0;
    const float scale = 1.0f / 0.7f;
    float w[13] = {0.8f,  -1.3f, 0.0f, 2.2f, -0.4f, 1.1f, 3.0f,
                   -2.0f, 0.6f,  9.0f, 1.7f, -0.9f, 4.0f};
    float logp[13];
    for (int t = 0; t < 13; t++)
        logp[t] = 77.0f; /* every token must be written */
    train_batch wb = batch;
    wb.weights = w;
    wb.logp = logp;
    wb.logit_scale = scale;
    /* direct: log_softmax of the forward's logits, scaled */
    double want_lp[13] = {0}, want_loss = 0;
    for (int s = 0, off = 0; s < 2; off += seg[s], s++) {
        float *logits = malloc(sizeof(float) * (size_t)seg[s] * 40);
        gemma3_outputs out = {0};
        out.logits = logits;
        if (gemma3_forward(M, &ctx, ids + off, seg[s], NULL, &out) != LT_OK)
            diag("forward: %s", ctx.err);
        for (int i = 0; i < seg[s]; i++) {
            int32_t y = tgt[off + i];
            if (y == -100) continue;
            const float *z = logits + (size_t)i * 40;
            double mx = -1e30, se = 0;
            for (int j = 0; j < 40; j++)
                mx = fmax(mx, scale * (double)z[j]);
            for (int j = 0; j < 40; j++)
                se += exp(scale * (double)z[j] - mx);
            want_lp[off + i] = scale * (double)z[y] - mx - log(se);
            want_loss -= w[off + i] * want_lp[off + i];
        }
        free(logits);
    }
    lora_zero_grads(AD);
    double L = 0;
    lt_status st = gemma3_train_batch(M, &ctx, lora_trainable(AD), &wb, 1.0f, 1, 0, &L);
    is_int(st, LT_OK, "train_batch with weights, logp and a logit scale");
    double e = 0;
    for (int t = 0; t < 13; t++)
        e = fmax(e, fabs(logp[t] - want_lp[t]));
    if (!ok(e <= 1e-5, "logp = log_softmax(forward logits / 0.7) at the target, 0 where -100"))
        diag("max error %.3g", e);
    is_close(L, want_loss, 1e-5 * fabs(want_loss), "the weighted loss is Σ w·CE");
    /* the gradient, against Σ_t w_t × the gradient of token t alone */
    int64_t n = 0;
    for (int i = 0; i < AD->n_params; i++)
        n += lt_tensor_numel(&AD->params[i].grad);
    double *got = calloc((size_t)n, sizeof(double)), *sum = calloc((size_t)n, sizeof(double));
    for (int i = 0, k = 0; i < AD->n_params; i++)
        for (int64_t j = 0; j < lt_tensor_numel(&AD->params[i].grad); j++)
            got[k++] = ((float *)AD->params[i].grad.data)[j];
    for (int t = 0; t < 13; t++) {
        if (tgt[t] == -100 || w[t] == 0.0f) continue;
        float one[13] = {0};
        one[t] = 1.0f;
        train_batch ob = batch;
        ob.weights = one;
        ob.logit_scale = scale;
        lora_zero_grads(AD);
        gemma3_train_batch(M, &ctx, lora_trainable(AD), &ob, 1.0f, 1, 0, &L);
        for (int i = 0, k = 0; i < AD->n_params; i++)
            for (int64_t j = 0; j < lt_tensor_numel(&AD->params[i].grad); j++)
                sum[k++] += (double)w[t] * ((float *)AD->params[i].grad.data)[j];
    }
    double maxerr = 0, maxg = 1e-9;
    for (int64_t k = 0; k < n; k++) {
        maxerr = fmax(maxerr, fabs(got[k] - sum[k]));
        maxg = fmax(maxg, fabs(sum[k]));
    }
    if (!ok(maxerr / maxg <= 1e-4, "LoRA gradient with weights = Σ w_t × token t's own gradient"))
        diag("max error %.3g, max |grad| %.3g", maxerr, maxg);
    /* and central differences of the weighted loss */
    lora_zero_grads(AD);
    gemma3_train_batch(M, &ctx, lora_trainable(AD), &wb, 1.0f, 1, 0, &L);
    CUR = &wb;
    lora_slot *s = &AD->slots[8];
    fd_check("weighted, scaled loss: o_proj lora_B", s->lora.b.data, s->lora.grad_b.data,
             lt_tensor_numel(&s->lora.b), 12, 5e-3);
    fd_check("weighted, scaled loss: o_proj lora_A", s->lora.a.data, s->lora.grad_a.data,
             lt_tensor_numel(&s->lora.a), 12, 5e-3);
    CUR = &batch;
    wb.logit_scale = -1.0f;
    st = gemma3_train_batch(M, &ctx, lora_trainable(AD), &wb, 1.0f, 0, 0, &L);
    ok(st == LT_ERR_ARG && strstr(ctx.err, "logit_scale"), "a negative logit_scale is refused");
    free(got), free(sum);
    lora_free(AD);
    AD = NULL;
}

/* Blocking the MLP's rows changes nothing but the order of sums: the dropout loss (its masks
 * placed by the element's index in the whole input) is the same with and without blocks. */
static void test_blocks_keep_masks(void) {
    lora_opts o = {.r = 3, .alpha = 6, .dropout = 0.3f, .seed = 5};
    char err[LT_ERRLEN] = "";
    if (lora_attach(&AD, M, &ctx, &o, err) != LT_OK) {
        diag("lora_attach: %s", err);
        ok(0, "lora_attach for the blocking check");
        return;
    }
    for (int i = 0; i < AD->n_slots; i++) {
        lt_tensor *b = &AD->slots[i].lora.b;
        for (int64_t k = 0; k < lt_tensor_numel(b); k++)
            ((float *)b->data)[k] = 0.3f * frand();
    }
    SEED = 99;
    double whole = loss_now();
    setenv("LATHE_TRAIN_MLP_ROWS", "4", 1);
    double blocked = loss_now();
    unsetenv("LATHE_TRAIN_MLP_ROWS");
    SEED = 100;
    double other = loss_now();
    is_close(blocked, whole, 1e-6 * fabs(whole), "dropout loss in MLP blocks of 4 rows = whole");
    diag("dropout loss %.6f (seed 99), %.6f (seed 100)", whole, other);
    ok(fabs(other - whole) > 1e-4 * fabs(whole), "another seed gives another loss");
    lora_free(AD);
    AD = NULL;
    SEED = 0;
}

/* ---- images: an image block of 3 tokens (id 40, past the embedding) in the first sample ---- */

static int32_t img_ids[15] = {2, 5, 9, 40, 40, 40, 11, 3, 30, 7, 2, 8, 8, 21, 39};
static int32_t img_tgt[15] = {5, 9, -100, -100, -100, -100, 3, 30, 7, -100, 8, 8, 21, 39, -100};
static int img_seg[2] = {10, 5};
static float img_rows[3 * 16];

static void test_images(void) {
    M->cfg.vision.present = 1;
    M->cfg.vision.image_token_id = 40;
    M->cfg.vision.mm_tokens_per_image = 3;
    for (int i = 0; i < 3 * 16; i++)
        img_rows[i] = frand();
    train_batch ib = {.ids = img_ids,
                      .targets = img_tgt,
                      .seg_len = img_seg,
                      .n_seg = 2,
                      .N = 15,
                      .n_labels = 10,
                      .image_embeds = img_rows,
                      .n_image_tokens = 3};
    /* the loss = Σ CE of gemma3_forward_images per sample (its block sees itself) */
    double want = 0;
    int off = 0;
    for (int s = 0; s < 2; s++) {
        float *logits = malloc(sizeof(float) * (size_t)img_seg[s] * 40);
        gemma3_outputs out = {0};
        out.logits = logits;
        gemma3_images gi = {img_rows, 3};
        lt_status st = gemma3_forward_images(M, &ctx, img_ids + off, img_seg[s], NULL, &out,
                                             s == 0 ? &gi : NULL);
        if (st != LT_OK) diag("forward: %s", ctx.err);
        want += ce_rows(logits, img_tgt + off, img_seg[s], 40);
        free(logits);
        off += img_seg[s];
    }
    CUR = &ib;
    SEED = 0;
    double got = loss_now();
    is_close(got, want, 1e-4 * fabs(want),
             "images: the training loss = Σ CE of gemma3_forward_images (image rows, block mask)");
    lora_opts o = {.r = 2, .alpha = 4, .seed = 9};
    char err[LT_ERRLEN] = "";
    if (lora_attach(&AD, M, &ctx, &o, err) != LT_OK) {
        ok(0, "lora_attach");
        diag("%s", err);
        CUR = &batch;
        return;
    }
    for (int i = 0; i < AD->n_slots; i++) {
        lt_tensor *bt = &AD->slots[i].lora.b;
        for (int64_t k = 0; k < lt_tensor_numel(bt); k++)
            ((float *)bt->data)[k] = 0.3f * frand();
    }
    lora_zero_grads(AD);
    double L = 0;
    lt_status st = gemma3_train_batch(M, &ctx, lora_trainable(AD), &ib, 1.0f, 1, 0, &L);
    is_int(st, LT_OK, "images: a backward with an image block runs");
    if (st != LT_OK) diag("%s", ctx.err);
    for (int i = 0; i < AD->n_slots; i += 5) { /* q of layer 0, up of 0, o of 1 */
        lora_slot *sl = &AD->slots[i];
        char name[200];
        snprintf(name, sizeof name, "images: %s lora_A", sl->module);
        fd_check(name, sl->lora.a.data, sl->lora.grad_a.data, lt_tensor_numel(&sl->lora.a), 12,
                 2e-2);
        snprintf(name, sizeof name, "images: %s lora_B", sl->module);
        fd_check(name, sl->lora.b.data, sl->lora.grad_b.data, lt_tensor_numel(&sl->lora.b), 12,
                 2e-2);
    }
    { /* a backend without attention_span_backward refuses image rows, naming the op (the
       * CPU and CUDA backends both have it: a copy of the CPU's table without it) */
        lt_backend lacking = lt_backend_cpu;
        lacking.attention_span_backward = NULL;
        lt_ctx lc;
        double L2 = 0;
        lt_status r = lt_ctx_init(&lc, &lacking, 1);
        if (r == LT_OK) r = gemma3_train_batch(M, &lc, lora_trainable(AD), &ib, 1.0f, 1, 0, &L2);
        ok(r == LT_ERR_STATE && strstr(lc.err, "no attention_span_backward op") &&
               strstr(lc.err, "image blocks"),
           "images: a backend without attention_span_backward refuses image rows");
        diag("%s", lc.err);
        lacking.attention_span = NULL;
        r = gemma3_train_batch(M, &lc, lora_trainable(AD), &ib, 1.0f, 1, 0, &L2);
        ok(r == LT_ERR_STATE && strstr(lc.err, "no attention_span op"),
           "images: ... and one without attention_span names that op");
        lt_ctx_shutdown(&lc);
        r = gemma3_train_batch(M, &ctx, NULL, &ib, 1.0f, 1, 0, &L2);
        ok(r == LT_OK, "images: ... and the CPU backend still trains on them");
    }
    img_rows[0] += 0.5f; /* the rows are the image: another one changes the loss */
    double other = loss_now();
    ok(fabs(other - loss_now()) == 0 && fabs(other - got) > 1e-6 * fabs(got),
       "images: other image rows change the loss");
    lora_free(AD);
    AD = NULL;
    M->cfg.vision.present = 0;
    CUR = &batch;
}

int main(void) {
    lt_ctx_init(&ctx, &lt_backend_cpu, 2);
    M = test_micro_gemma3(&rng, 40, 0.5f, 0.4f);
    test_loss_matches_forward();
    test_lora(0.0f);
    test_lora(0.3f);
    test_full();
    test_blocks_keep_masks();
    test_weighted();
    test_images();
    /* the MLP in blocks of 5 rows (13 tokens: 5 + 5 + 3), as large models run it: the same
     * checks must hold, dropout masks included */
    setenv("LATHE_TRAIN_MLP_ROWS", "5", 1);
    diag("MLP blocks of 5 rows");
    test_loss_matches_forward();
    test_lora(0.3f);
    test_full();
    unsetenv("LATHE_TRAIN_MLP_ROWS");
    test_micro_gemma3_free(M);
    lt_ctx_shutdown(&ctx);
    return tap_done();
}
