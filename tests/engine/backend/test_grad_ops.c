/* test_grad_ops.c — every CPU backward op against central finite differences of its forward.
 *
 * For an op y = f(x, θ) and a fixed random r, the scalar L = Σ r·y has dL/dy = r, so the
 * backward op called with dy = r must give dL/dx and dL/dθ. Each is compared with
 * (L(x + h e_i) − L(x − h e_i)) / 2h on small random shapes (GQA, a sliding window, a masked
 * key, a query that sees nothing; 16-bit weights; ignored targets). Also: the cross-entropy's
 * loss value against a direct computation (plain, and with row weights of both signs and a
 * logit scale, with its per-row log-probabilities), and AdamW against the torch formula in
 * double.
 * Last, the BF16 matmul-only tensors backend.h allows: rmsnorm, geglu and geglu_backward
 * writing BF16 give their fp32 results rounded to nearest even; linear and linear_backward
 * given a BF16 x or dy give the same bits as given those values in fp32; a BF16 x with an
 * fp32 weight is refused.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/backend/cpu/grad.h"
#include "tests/unit/tap.h"

static lt_ctx ctx;
static uint64_t rng = 12345;

static float frand(void) { /* uniform in [-1, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static float *rvec(int64_t n, float amp) {
    float *v = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        v[i] = amp * frand();
    return v;
}

static float *zvec(int64_t n) {
    return calloc((size_t)n, sizeof(float));
}

/* L = Σ r·y in double */
static double dotr(const float *r, const float *y, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += (double)r[i] * y[i];
    return s;
}

/* The scalar under test, as a function of the current contents of the perturbed array. */
typedef double (*loss_fn)(void *st);

/* Compares an analytic gradient with central differences on every element of p (n of them).
 * Relative to the largest analytic magnitude. */
static void check_grad(const char *name, loss_fn f, void *st, float *p, const float *g, int64_t n,
                       float h, double tol) {
    double maxerr = 0, maxg = 1e-6;
    for (int64_t i = 0; i < n; i++) {
        float save = p[i];
        p[i] = save + h;
        double lp = f(st);
        p[i] = save - h;
        double lm = f(st);
        p[i] = save;
        double num = (lp - lm) / (2.0 * h);
        double e = fabs(num - g[i]);
        if (e > maxerr) maxerr = e;
        if (fabs(g[i]) > maxg) maxg = fabs(g[i]);
    }
    char label[160];
    snprintf(label, sizeof label, "%s matches finite differences", name);
    if (!ok(maxerr / maxg <= tol, label)) diag("max error %.3g, max |grad| %.3g", maxerr, maxg);
}

/* ---- linear ------------------------------------------------------------------------------ */

typedef struct lin_st {
    int64_t T, in, out;
    float *x, *y, *r;
    lt_weight w;
} lin_st;

static double lin_loss(void *p) {
    lin_st *s = p;
    lt_backend_cpu.linear(&ctx, lt_tensor_2d(LT_F32, s->y, s->T, s->out),
                          lt_tensor_2d(LT_F32, s->x, s->T, s->in), &s->w);
    return dotr(s->r, s->y, s->T * s->out);
}

static void test_linear(int with_lora, lt_dtype wt) {
    lin_st s = {.T = 5, .in = 7, .out = 6};
    s.x = rvec(s.T * s.in, 1);
    s.y = zvec(s.T * s.out);
    s.r = rvec(s.T * s.out, 1);
    float *wf = rvec(s.out * s.in, 0.5f);
    void *wdata = wf;
    uint16_t *w16 = NULL;
    if (wt != LT_F32) {
        w16 = malloc(2 * (size_t)(s.out * s.in));
        lt_convert(w16, wt, wf, LT_F32, s.out * s.in);
        wdata = w16;
    }
    s.w.w = lt_tensor_2d(wt, wdata, s.out, s.in);
    float *gw = wt == LT_F32 ? zvec(s.out * s.in) : NULL;
    s.w.grad_w = lt_tensor_2d(LT_F32, gw, s.out, s.in);
    lt_lora lo = {0};
    int64_t r = 3;
    if (with_lora) {
        lo.a = lt_tensor_2d(LT_F32, rvec(r * s.in, 0.5f), r, s.in);
        lo.b = lt_tensor_2d(LT_F32, rvec(s.out * r, 0.5f), s.out, r);
        lo.grad_a = lt_tensor_2d(LT_F32, zvec(r * s.in), r, s.in);
        lo.grad_b = lt_tensor_2d(LT_F32, zvec(s.out * r), s.out, r);
        lo.scale = 1.7f;
        lo.enabled = 1;
        s.w.lora = &lo;
    }
    float *dx = zvec(s.T * s.in);
    lt_status st = cpu_linear_backward(&ctx, lt_tensor_2d(LT_F32, dx, s.T, s.in),
                                       lt_tensor_2d(LT_F32, s.r, s.T, s.out),
                                       lt_tensor_2d(LT_F32, s.x, s.T, s.in), &s.w);
    is_int(st, LT_OK, "linear_backward runs");
    char name[96];
    const char *tag = wt == LT_F32 ? "f32" : wt == LT_BF16 ? "bf16" : "f16";
    snprintf(name, sizeof name, "linear%s %s dx", with_lora ? "+lora" : "", tag);
    check_grad(name, lin_loss, &s, s.x, dx, s.T * s.in, 1e-2f, 2e-3);
    if (gw) {
        snprintf(name, sizeof name, "linear%s grad_w", with_lora ? "+lora" : "");
        check_grad(name, lin_loss, &s, wf, gw, s.out * s.in, 1e-2f, 2e-3);
    }
    if (with_lora) {
        check_grad("lora grad_a", lin_loss, &s, lo.a.data, lo.grad_a.data, r * s.in, 1e-2f, 2e-3);
        check_grad("lora grad_b", lin_loss, &s, lo.b.data, lo.grad_b.data, s.out * r, 1e-2f, 2e-3);
        /* accumulation: a second call adds the same amount again */
        float before = ((float *)lo.grad_a.data)[0];
        cpu_linear_backward(&ctx, lt_tensor_2d(LT_F32, NULL, s.T, s.in),
                            lt_tensor_2d(LT_F32, s.r, s.T, s.out),
                            lt_tensor_2d(LT_F32, s.x, s.T, s.in), &s.w);
        is_close(((float *)lo.grad_a.data)[0], 2 * before, 1e-4 + 1e-4 * fabs(before),
                 "adapter gradients accumulate (+=)");
        free(lo.a.data);
        free(lo.b.data);
        free(lo.grad_a.data);
        free(lo.grad_b.data);
    }
    free(s.x);
    free(s.y);
    free(s.r);
    free(wf);
    free(w16);
    free(gw);
    free(dx);
}

/* ---- rmsnorm ----------------------------------------------------------------------------- */

typedef struct rms_st {
    int64_t N, D;
    float *x, *y, *r, *w;
} rms_st;

static double rms_loss(void *p) {
    rms_st *s = p;
    lt_backend_cpu.rmsnorm(&ctx, lt_tensor_2d(LT_F32, s->y, s->N, s->D),
                           lt_tensor_2d(LT_F32, s->x, s->N, s->D), lt_tensor_1d(LT_F32, s->w, s->D),
                           1e-6f);
    return dotr(s->r, s->y, s->N * s->D);
}

static void test_rmsnorm(void) {
    rms_st s = {.N = 4, .D = 9};
    s.x = rvec(s.N * s.D, 2);
    s.y = zvec(s.N * s.D);
    s.r = rvec(s.N * s.D, 1);
    s.w = rvec(s.D, 0.5f);
    float *dx = zvec(s.N * s.D), *dw = zvec(s.D);
    is_int(cpu_rmsnorm_backward(&ctx, lt_tensor_2d(LT_F32, dx, s.N, s.D),
                                lt_tensor_1d(LT_F32, dw, s.D), lt_tensor_2d(LT_F32, s.r, s.N, s.D),
                                lt_tensor_2d(LT_F32, s.x, s.N, s.D), lt_tensor_1d(LT_F32, s.w, s.D),
                                1e-6f),
           LT_OK, "rmsnorm_backward runs");
    check_grad("rmsnorm dx", rms_loss, &s, s.x, dx, s.N * s.D, 1e-2f, 2e-3);
    check_grad("rmsnorm dw", rms_loss, &s, s.w, dw, s.D, 1e-2f, 2e-3);
    free(s.x), free(s.y), free(s.r), free(s.w), free(dx), free(dw);
}

/* ---- rope -------------------------------------------------------------------------------- */

typedef struct rope_st {
    int64_t T, nh, hd;
    float *x, *y, *r;
    int32_t *pos;
    float theta, factor;
} rope_st;

static double rope_loss(void *p) {
    rope_st *s = p;
    int64_t n = s->T * s->nh * s->hd;
    memcpy(s->y, s->x, sizeof(float) * (size_t)n);
    lt_backend_cpu.rope(&ctx, lt_tensor_3d(LT_F32, s->y, s->T, s->nh, s->hd),
                        lt_tensor_1d(LT_I32, s->pos, s->T), s->theta, s->factor);
    return dotr(s->r, s->y, n);
}

static void test_rope(void) {
    int32_t pos[5] = {0, 1, 7, 3, 100};
    rope_st s = {5, 3, 8, NULL, NULL, NULL, pos, 10000.0f, 8.0f};
    int64_t n = s.T * s.nh * s.hd;
    s.x = rvec(n, 1);
    s.y = zvec(n);
    s.r = rvec(n, 1);
    float *dx = malloc(sizeof(float) * (size_t)n);
    memcpy(dx, s.r, sizeof(float) * (size_t)n);
    is_int(cpu_rope_backward(&ctx, lt_tensor_3d(LT_F32, dx, s.T, s.nh, s.hd),
                             lt_tensor_1d(LT_I32, pos, s.T), s.theta, s.factor),
           LT_OK, "rope_backward runs");
    check_grad("rope dx", rope_loss, &s, s.x, dx, n, 1e-2f, 2e-3);
    free(s.x), free(s.y), free(s.r), free(dx);
}

/* ---- attention --------------------------------------------------------------------------- */

typedef struct att_st {
    int64_t T, S, nh, nkv, hd;
    float *q, *k, *v, *out, *r;
    int32_t *qpos, *kpos;
    int window;
    float scale;
    int32_t *span; /* attention_span's [T, 2], or NULL */
} att_st;

static double att_loss(void *p) {
    att_st *s = p;
    if (s->span) {
        lt_backend_cpu.attention_span(&ctx, lt_tensor_2d(LT_F32, s->out, s->T, s->nh * s->hd),
                                      lt_tensor_3d(LT_F32, s->q, s->T, s->nh, s->hd),
                                      lt_tensor_3d(LT_F32, s->k, s->S, s->nkv, s->hd),
                                      lt_tensor_3d(LT_F32, s->v, s->S, s->nkv, s->hd),
                                      lt_tensor_1d(LT_I32, s->qpos, s->T),
                                      lt_tensor_1d(LT_I32, s->kpos, s->S),
                                      lt_tensor_2d(LT_I32, s->span, s->T, 2), s->window, s->scale);
        return dotr(s->r, s->out, s->T * s->nh * s->hd);
    }
    lt_backend_cpu.attention(&ctx, lt_tensor_2d(LT_F32, s->out, s->T, s->nh * s->hd),
                             lt_tensor_3d(LT_F32, s->q, s->T, s->nh, s->hd),
                             lt_tensor_3d(LT_F32, s->k, s->S, s->nkv, s->hd),
                             lt_tensor_3d(LT_F32, s->v, s->S, s->nkv, s->hd),
                             lt_tensor_1d(LT_I32, s->qpos, s->T),
                             lt_tensor_1d(LT_I32, s->kpos, s->S), s->window, s->scale);
    return dotr(s->r, s->out, s->T * s->nh * s->hd);
}

/* attention_span_backward: queries 1..3 are an image block (each sees the block's later keys
 * too), under a window that cuts the block's past side for window 2. */
static void test_attention_span(int window) {
    int32_t qpos[6] = {0, 1, 2, 3, 4, 5}, kpos[6] = {0, 1, 2, 3, 4, 5};
    int32_t span[12] = {0, -1, 1, 3, 1, 3, 1, 3, 0, -1, 0, -1};
    att_st s = {.T = 6, .S = 6, .nh = 4, .nkv = 2, .hd = 4};
    s.qpos = qpos;
    s.kpos = kpos;
    s.span = span;
    s.window = window;
    s.scale = 0.7f;
    int64_t nq = s.T * s.nh * s.hd, nk = s.S * s.nkv * s.hd;
    s.q = rvec(nq, 1), s.k = rvec(nk, 1), s.v = rvec(nk, 1);
    s.out = zvec(nq), s.r = rvec(nq, 1);
    float *dq = zvec(nq), *dk = zvec(nk), *dv = zvec(nk);
    is_int(
        lt_backend_cpu.attention_span_backward(
            &ctx, lt_tensor_3d(LT_F32, dq, s.T, s.nh, s.hd),
            lt_tensor_3d(LT_F32, dk, s.S, s.nkv, s.hd), lt_tensor_3d(LT_F32, dv, s.S, s.nkv, s.hd),
            lt_tensor_2d(LT_F32, s.r, s.T, s.nh * s.hd), lt_tensor_3d(LT_F32, s.q, s.T, s.nh, s.hd),
            lt_tensor_3d(LT_F32, s.k, s.S, s.nkv, s.hd),
            lt_tensor_3d(LT_F32, s.v, s.S, s.nkv, s.hd), lt_tensor_1d(LT_I32, qpos, s.T),
            lt_tensor_1d(LT_I32, kpos, s.S), lt_tensor_2d(LT_I32, span, s.T, 2), s.window, s.scale),
        LT_OK, "attention_span_backward runs");
    char name[64];
    snprintf(name, sizeof name, "attention_span (window %d) dq", window);
    check_grad(name, att_loss, &s, s.q, dq, nq, 1e-2f, 3e-3);
    snprintf(name, sizeof name, "attention_span (window %d) dk", window);
    check_grad(name, att_loss, &s, s.k, dk, nk, 1e-2f, 3e-3);
    snprintf(name, sizeof name, "attention_span (window %d) dv", window);
    check_grad(name, att_loss, &s, s.v, dv, nk, 1e-2f, 3e-3);
    free(s.q), free(s.k), free(s.v), free(s.out), free(s.r), free(dq), free(dk), free(dv);
}

static void test_attention(int window) {
    /* 6 queries over 6 keys; key 2 is masked (-1); query 0 at position 0 sees key 0 only;
     * positions reset at query 4 (two packed samples: the second sees positions 0..1 of the
     * first too unless masked, which is fine: the op only knows positions). */
    int32_t qpos[6] = {0, 1, 2, 3, 4, 5}, kpos[6] = {0, 1, -1, 3, 4, 5};
    att_st s = {.T = 6, .S = 6, .nh = 4, .nkv = 2, .hd = 4};
    s.qpos = qpos;
    s.kpos = kpos;
    s.window = window;
    s.scale = 0.7f;
    int64_t nq = s.T * s.nh * s.hd, nk = s.S * s.nkv * s.hd;
    s.q = rvec(nq, 1), s.k = rvec(nk, 1), s.v = rvec(nk, 1);
    s.out = zvec(nq), s.r = rvec(nq, 1);
    float *dq = zvec(nq), *dk = zvec(nk), *dv = zvec(nk);
    is_int(
        cpu_attention_backward(
            &ctx, lt_tensor_3d(LT_F32, dq, s.T, s.nh, s.hd),
            lt_tensor_3d(LT_F32, dk, s.S, s.nkv, s.hd), lt_tensor_3d(LT_F32, dv, s.S, s.nkv, s.hd),
            lt_tensor_2d(LT_F32, s.r, s.T, s.nh * s.hd), lt_tensor_3d(LT_F32, s.q, s.T, s.nh, s.hd),
            lt_tensor_3d(LT_F32, s.k, s.S, s.nkv, s.hd),
            lt_tensor_3d(LT_F32, s.v, s.S, s.nkv, s.hd), lt_tensor_1d(LT_I32, qpos, s.T),
            lt_tensor_1d(LT_I32, kpos, s.S), s.window, s.scale),
        LT_OK, "attention_backward runs");
    char name[64];
    snprintf(name, sizeof name, "attention (window %d) dq", window);
    check_grad(name, att_loss, &s, s.q, dq, nq, 1e-2f, 3e-3);
    snprintf(name, sizeof name, "attention (window %d) dk", window);
    check_grad(name, att_loss, &s, s.k, dk, nk, 1e-2f, 3e-3);
    snprintf(name, sizeof name, "attention (window %d) dv", window);
    check_grad(name, att_loss, &s, s.v, dv, nk, 1e-2f, 3e-3);
    float mk = 0;
    for (int64_t i = 0; i < s.nkv * s.hd; i++)
        mk += fabsf(dk[2 * s.nkv * s.hd + i]) + fabsf(dv[2 * s.nkv * s.hd + i]);
    ok(mk == 0.0f, "a masked key gets no gradient");
    free(s.q), free(s.k), free(s.v), free(s.out), free(s.r), free(dq), free(dk), free(dv);
}

/* ---- geglu ------------------------------------------------------------------------------- */

typedef struct geglu_st {
    int64_t n;
    float *g, *u, *y, *r;
} geglu_st;

static double geglu_loss(void *p) {
    geglu_st *s = p;
    lt_backend_cpu.geglu(&ctx, lt_tensor_1d(LT_F32, s->y, s->n), lt_tensor_1d(LT_F32, s->g, s->n),
                         lt_tensor_1d(LT_F32, s->u, s->n));
    return dotr(s->r, s->y, s->n);
}

static void test_geglu(void) {
    geglu_st s = {.n = 40};
    s.g = rvec(s.n, 3), s.u = rvec(s.n, 2), s.y = zvec(s.n), s.r = rvec(s.n, 1);
    float *dg = zvec(s.n), *du = zvec(s.n);
    is_int(cpu_geglu_backward(&ctx, lt_tensor_1d(LT_F32, dg, s.n), lt_tensor_1d(LT_F32, du, s.n),
                              lt_tensor_1d(LT_F32, s.r, s.n), lt_tensor_1d(LT_F32, s.g, s.n),
                              lt_tensor_1d(LT_F32, s.u, s.n)),
           LT_OK, "geglu_backward runs");
    check_grad("geglu dgate", geglu_loss, &s, s.g, dg, s.n, 1e-3f, 2e-3);
    check_grad("geglu dup", geglu_loss, &s, s.u, du, s.n, 1e-3f, 2e-3);
    free(s.g), free(s.u), free(s.y), free(s.r), free(dg), free(du);
}

/* ---- embedding --------------------------------------------------------------------------- */

typedef struct emb_st {
    int64_t T, V, H;
    int32_t *ids;
    float *table, *h, *r;
    float scale;
} emb_st;

static double emb_loss(void *p) {
    emb_st *s = p;
    lt_weight w = {lt_tensor_2d(LT_F32, s->table, s->V, s->H), NULL, {0}, {0}};
    lt_backend_cpu.embedding(&ctx, lt_tensor_2d(LT_F32, s->h, s->T, s->H),
                             lt_tensor_1d(LT_I32, s->ids, s->T), &w, s->scale);
    return dotr(s->r, s->h, s->T * s->H);
}

static void test_embedding(void) {
    int32_t ids[5] = {3, 1, 3, 0, 6};
    emb_st s = {.T = 5, .V = 7, .H = 4, .ids = ids};
    s.scale = 2.5f;
    s.table = rvec(s.V * s.H, 1), s.h = zvec(s.T * s.H), s.r = rvec(s.T * s.H, 1);
    float *gw = zvec(s.V * s.H);
    lt_weight w = {
        lt_tensor_2d(LT_F32, s.table, s.V, s.H), NULL, lt_tensor_2d(LT_F32, gw, s.V, s.H), {0}};
    is_int(cpu_embedding_backward(&ctx, &w, lt_tensor_2d(LT_F32, s.r, s.T, s.H),
                                  lt_tensor_1d(LT_I32, ids, s.T), s.scale),
           LT_OK, "embedding_backward runs");
    check_grad("embedding grad_w", emb_loss, &s, s.table, gw, s.V * s.H, 1e-2f, 2e-3);
    free(s.table), free(s.h), free(s.r), free(gw);
}

/* ---- cross-entropy ----------------------------------------------------------------------- */

typedef struct ce_st {
    int64_t T, V, H;
    float *h, *E;
    int32_t *tg;
    float *w;    /* row weights (NULL = 1) */
    float scale; /* logit scale */
} ce_st;

static double ce_loss(void *p) {
    ce_st *s = p;
    lt_weight w = {lt_tensor_2d(LT_F32, s->E, s->V, s->H), NULL, {0}, {0}};
    double L = 0;
    lt_tensor none = lt_tensor_2d(LT_F32, NULL, s->T, s->H);
    cpu_cross_entropy(&ctx, &L, none, lt_tensor_2d(LT_F32, s->h, s->T, s->H), &w,
                      lt_tensor_1d(LT_I32, s->tg, s->T), lt_tensor_1d(LT_F32, s->w, s->T),
                      lt_tensor_1d(LT_F32, NULL, s->T), s->scale, 1.0f);
    return L * 0.5; /* grad_scale 0.5 below */
}

/* log_softmax(scale·h_t·Eᵀ)[target_t] in double, straight from the definition */
static double ce_direct_logp(const ce_st *s, int64_t t) {
    double z[64], mx = -1e300, se = 0;
    for (int64_t j = 0; j < s->V; j++) {
        z[j] = 0;
        for (int64_t i = 0; i < s->H; i++)
            z[j] += (double)s->h[t * s->H + i] * s->E[j * s->H + i];
        z[j] *= s->scale;
        mx = z[j] > mx ? z[j] : mx;
    }
    for (int64_t j = 0; j < s->V; j++)
        se += exp(z[j] - mx);
    return z[s->tg[t]] - mx - log(se);
}

static void test_cross_entropy(void) {
    int32_t tg[5] = {2, -100, 10, 0, 2};
    ce_st s = {5, 11, 6, NULL, NULL, tg, NULL, 1.0f};
    s.h = rvec(s.T * s.H, 1.5f), s.E = rvec(s.V * s.H, 1);
    /* the loss value against a direct log-softmax */
    double want = 0;
    for (int64_t t = 0; t < s.T; t++)
        if (tg[t] != -100) want -= ce_direct_logp(&s, t);
    double got = 2 * ce_loss(&s);
    is_close(got, want, 1e-4 * want, "cross_entropy loss_sum = Σ CE over non-ignored rows");
    float *dh = zvec(s.T * s.H), *gw = zvec(s.V * s.H);
    lt_weight w = {
        lt_tensor_2d(LT_F32, s.E, s.V, s.H), NULL, lt_tensor_2d(LT_F32, gw, s.V, s.H), {0}};
    lt_tensor nov = lt_tensor_1d(LT_F32, NULL, s.T);
    double L = 0;
    is_int(cpu_cross_entropy(&ctx, &L, lt_tensor_2d(LT_F32, dh, s.T, s.H),
                             lt_tensor_2d(LT_F32, s.h, s.T, s.H), &w, lt_tensor_1d(LT_I32, tg, s.T),
                             nov, nov, 1.0f, 0.5f),
           LT_OK, "cross_entropy with gradients runs");
    check_grad("cross_entropy dh", ce_loss, &s, s.h, dh, s.T * s.H, 1e-2f, 2e-3);
    check_grad("cross_entropy head grad", ce_loss, &s, s.E, gw, s.V * s.H, 1e-2f, 2e-3);
    float ign = 0;
    for (int64_t i = 0; i < s.H; i++)
        ign += fabsf(dh[1 * s.H + i]);
    ok(ign == 0.0f, "an ignored target (-100) gets no gradient");
    /* explicit weights of 1 give the very bits of no weights (the SFT call) */
    float ones[5] = {1, 1, 1, 1, 1}, lp[5];
    float *dh1 = zvec(s.T * s.H), *gw1 = zvec(s.V * s.H);
    lt_weight w1 = {
        lt_tensor_2d(LT_F32, s.E, s.V, s.H), NULL, lt_tensor_2d(LT_F32, gw1, s.V, s.H), {0}};
    double L1 = 0;
    is_int(cpu_cross_entropy(&ctx, &L1, lt_tensor_2d(LT_F32, dh1, s.T, s.H),
                             lt_tensor_2d(LT_F32, s.h, s.T, s.H), &w1,
                             lt_tensor_1d(LT_I32, tg, s.T), lt_tensor_1d(LT_F32, ones, s.T),
                             lt_tensor_1d(LT_F32, lp, s.T), 1.0f, 0.5f),
           LT_OK, "cross_entropy with weights of 1 and row_logp runs");
    ok(L1 == L && !memcmp(dh1, dh, sizeof(float) * (size_t)(s.T * s.H)) &&
           !memcmp(gw1, gw, sizeof(float) * (size_t)(s.V * s.H)),
       "weights of 1 give the same loss, dh and head gradient bits as no weights");
    double lps = 0;
    for (int t = 0; t < 5; t++)
        lps += lp[t];
    ok(lp[1] == 0.0f && fabs(lps + L) <= 1e-5 * L, "row_logp sums to -loss; 0 for an ignored row");
    int32_t bad[5] = {2, 11, 0, 0, 0};
    lt_status st = cpu_cross_entropy(&ctx, &L, lt_tensor_2d(LT_F32, NULL, s.T, s.H),
                                     lt_tensor_2d(LT_F32, s.h, s.T, s.H), &w,
                                     lt_tensor_1d(LT_I32, bad, s.T), nov, nov, 1.0f, 1);
    ok(st == LT_ERR_ARG && strstr(ctx.err, "target 11"),
       "a target outside the vocabulary is an error");
    free(s.h), free(s.E), free(dh), free(gw), free(dh1), free(gw1);
}

/* Row weights of both signs and zero, and a logit scale (GRPO's 1/temperature): the loss is
 * Σ w_t·CE_t of the scaled logits, the gradients are its derivatives, row_logp the unweighted
 * log-probabilities. */
static void test_cross_entropy_weighted(void) {
    enum { T = 7, V = 13, H = 5 };
    int32_t tg[T] = {4, 12, -100, 0, 7, 4, 9};
    float wt[T] = {1.3f, -0.7f, 5.0f, 0.0f, 2.1f, -1.6f, 0.45f};
    ce_st s = {T, V, H, NULL, NULL, tg, wt, 1.0f / 0.7f};
    s.h = rvec(T * H, 1.5f), s.E = rvec(V * H, 1);
    double want = 0;
    for (int64_t t = 0; t < T; t++)
        if (tg[t] != -100) want -= wt[t] * ce_direct_logp(&s, t);
    float *dh = zvec(T * H), *gw = zvec(V * H), lp[T];
    for (int t = 0; t < T; t++)
        lp[t] = 99.0f; /* every row must be written */
    lt_weight w = {lt_tensor_2d(LT_F32, s.E, V, H), NULL, lt_tensor_2d(LT_F32, gw, V, H), {0}};
    double L = 0;
    is_int(cpu_cross_entropy(&ctx, &L, lt_tensor_2d(LT_F32, dh, T, H),
                             lt_tensor_2d(LT_F32, s.h, T, H), &w, lt_tensor_1d(LT_I32, tg, T),
                             lt_tensor_1d(LT_F32, wt, T), lt_tensor_1d(LT_F32, lp, T), s.scale,
                             0.5f),
           LT_OK, "weighted, scaled cross_entropy runs");
    is_close(L, want, 1e-5 * fabs(want), "weighted loss_sum = Σ w·CE of the scaled logits");
    double lerr = 0;
    for (int64_t t = 0; t < T; t++) {
        double d = tg[t] == -100 ? fabs(lp[t]) : fabs(lp[t] - ce_direct_logp(&s, t));
        lerr = d > lerr ? d : lerr;
    }
    if (!ok(lerr <= 1e-5, "row_logp = log_softmax(scaled logits)[target], 0 where ignored"))
        diag("max error %.3g", lerr);
    check_grad("weighted cross_entropy dh", ce_loss, &s, s.h, dh, T * H, 1e-2f, 2e-3);
    check_grad("weighted cross_entropy head grad", ce_loss, &s, s.E, gw, V * H, 1e-2f, 2e-3);
    float zr = 0;
    for (int64_t i = 0; i < H; i++)
        zr += fabsf(dh[3 * H + i]) + fabsf(dh[2 * H + i]);
    ok(zr == 0.0f, "a row of weight 0, and an ignored row of weight 5, get no gradient");
    lt_tensor nov = lt_tensor_1d(LT_F32, NULL, T);
    lt_status st = cpu_cross_entropy(
        &ctx, &L, lt_tensor_2d(LT_F32, NULL, T, H), lt_tensor_2d(LT_F32, s.h, T, H), &w,
        lt_tensor_1d(LT_I32, tg, T), lt_tensor_1d(LT_F32, wt, T - 1), nov, 1.0f, 1.0f);
    ok(st == LT_ERR_ARG && strstr(ctx.err, "row_weight"),
       "a row_weight of the wrong size is refused");
    st = cpu_cross_entropy(&ctx, &L, lt_tensor_2d(LT_F32, NULL, T, H),
                           lt_tensor_2d(LT_F32, s.h, T, H), &w, lt_tensor_1d(LT_I32, tg, T), nov,
                           nov, 0.0f, 1.0f);
    ok(st == LT_ERR_ARG && strstr(ctx.err, "logit_scale"), "a logit_scale of 0 is refused");
    free(s.h), free(s.E), free(dh), free(gw);
}

/* ---- AdamW ------------------------------------------------------------------------------- */

static void test_adamw(void) {
    float p[3] = {1.0f, -2.0f, 0.5f}, m[3] = {0}, v[3] = {0};
    double pd[3] = {1.0, -2.0, 0.5}, md[3] = {0}, vd[3] = {0};
    const float g1[3] = {0.5f, -1e-3f, 0.0f}, g2[3] = {-0.25f, 0.3f, 2.0f};
    float p0_step1 = 0;
    const double lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
    for (int step = 1; step <= 2; step++) {
        const float *g = step == 1 ? g1 : g2;
        cpu_adamw(&ctx, lt_tensor_1d(LT_F32, p, 3), lt_tensor_1d(LT_F32, (void *)g, 3),
                  lt_tensor_1d(LT_F32, m, 3), lt_tensor_1d(LT_F32, v, 3), (float)lr, (float)b1,
                  (float)b2, (float)eps, (float)wd, step);
        if (step == 1) p0_step1 = p[0];
        for (int i = 0; i < 3; i++) {
            pd[i] *= 1 - lr * wd;
            md[i] = b1 * md[i] + (1 - b1) * g[i];
            vd[i] = b2 * vd[i] + (1 - b2) * (double)g[i] * g[i];
            double denom = sqrt(vd[i]) / sqrt(1 - pow(b2, step)) + eps;
            pd[i] -= lr / (1 - pow(b1, step)) * md[i] / denom;
        }
    }
    double err = 0;
    for (int i = 0; i < 3; i++)
        err = fmax(err, fabs(p[i] - pd[i]));
    if (!ok(err < 1e-6, "adamw: two steps match torch.optim.AdamW's formula"))
        diag("max error %g", err);
    is_close(p0_step1, 0.89, 1e-6, "adamw step 1 by hand: 1*(1-0.01) - 0.1*0.5/0.5 = 0.89");
}

/* ---- extra ops --------------------------------------------------------------------------- */

static void test_extra_ops(void) {
    const lt_backend *g = &lt_backend_cpu;
    ok(lt_backend_missing_training_op(g) == NULL, "the CPU backend has every training op");
    float x[1000], y[1000];
    for (int i = 0; i < 1000; i++)
        x[i] = 1.0f;
    g->dropout(&ctx, lt_tensor_1d(LT_F32, y, 1000), lt_tensor_1d(LT_F32, x, 1000), 0.25f, 1.0f, 77);
    int kept = 0, same = 1;
    for (int i = 0; i < 1000; i++) {
        kept += y[i] != 0;
        if (y[i] != 0 && fabsf(y[i] - 1.0f / 0.75f) > 1e-6f) same = 0;
    }
    ok(kept > 700 && kept < 800 && same, "dropout keeps about 1-p and scales by 1/(1-p)");
    float y2[1000];
    g->dropout(&ctx, lt_tensor_1d(LT_F32, y2, 1000), lt_tensor_1d(LT_F32, x, 1000), 0.25f, 1.0f,
               77);
    ok(memcmp(y, y2, sizeof y) == 0, "dropout with the same seed gives the same mask");
    double ss = 0;
    g->sumsq(&ctx, &ss, lt_tensor_1d(LT_F32, y, 1000));
    is_close(ss, kept / (0.75 * 0.75), 1e-3, "sumsq");
}

/* ---- BF16 matmul-only tensors --------------------------------------------------------------- */

static int rounded_equal(const uint16_t *got, const float *f, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (got[i] != lt_f32_to_bf16(f[i])) return 0;
    return 1;
}

static int bits_equal(const float *a, const float *b, int64_t n) {
    return memcmp(a, b, sizeof(float) * (size_t)n) == 0;
}

static void test_bf16_tensors(void) {
    const int64_t T = 5, in = 8, out = 6, r = 3;
    float *x = rvec(T * in, 2), *w = rvec(in, 0.5f), *u = rvec(T * in, 1), *d = rvec(T * in, 1);
    float *yf = zvec(T * in), *gf = zvec(T * in), *uf = zvec(T * in);
    uint16_t *yb = calloc((size_t)(T * in), 2), *gb = calloc((size_t)(T * in), 2),
             *ub = calloc((size_t)(T * in), 2);
    const lt_backend *be = &lt_backend_cpu;
    be->rmsnorm(&ctx, lt_tensor_2d(LT_F32, yf, T, in), lt_tensor_2d(LT_F32, x, T, in),
                lt_tensor_1d(LT_F32, w, in), 1e-6f);
    lt_status rc = be->rmsnorm(&ctx, lt_tensor_2d(LT_BF16, yb, T, in),
                               lt_tensor_2d(LT_F32, x, T, in), lt_tensor_1d(LT_F32, w, in), 1e-6f);
    ok(rc == LT_OK && rounded_equal(yb, yf, T * in), "rmsnorm to bf16 = its fp32 output rounded");
    be->geglu(&ctx, lt_tensor_2d(LT_F32, yf, T, in), lt_tensor_2d(LT_F32, x, T, in),
              lt_tensor_2d(LT_F32, u, T, in));
    rc = be->geglu(&ctx, lt_tensor_2d(LT_BF16, yb, T, in), lt_tensor_2d(LT_F32, x, T, in),
                   lt_tensor_2d(LT_F32, u, T, in));
    ok(rc == LT_OK && rounded_equal(yb, yf, T * in), "geglu to bf16 = its fp32 output rounded");
    be->geglu_backward(&ctx, lt_tensor_1d(LT_F32, gf, T * in), lt_tensor_1d(LT_F32, uf, T * in),
                       lt_tensor_1d(LT_F32, d, T * in), lt_tensor_1d(LT_F32, x, T * in),
                       lt_tensor_1d(LT_F32, u, T * in));
    rc = be->geglu_backward(&ctx, lt_tensor_1d(LT_BF16, gb, T * in),
                            lt_tensor_1d(LT_BF16, ub, T * in), lt_tensor_1d(LT_F32, d, T * in),
                            lt_tensor_1d(LT_F32, x, T * in), lt_tensor_1d(LT_F32, u, T * in));
    ok(rc == LT_OK && rounded_equal(gb, gf, T * in) && rounded_equal(ub, uf, T * in),
       "geglu_backward to bf16 = its fp32 gradients rounded");

    /* linear / linear_backward: bf16 x and dy vs their values widened to fp32 */
    float *wf = rvec(out * in, 0.3f), *dy = rvec(T * out, 1), *a = rvec(r * in, 0.3f),
          *b = rvec(out * r, 0.3f);
    uint16_t *wb = malloc(sizeof(uint16_t) * (size_t)(out * in)),
             *xb = malloc(sizeof(uint16_t) * (size_t)(T * in)),
             *dyb = malloc(sizeof(uint16_t) * (size_t)(T * out));
    lt_convert(wb, LT_BF16, wf, LT_F32, out * in);
    lt_convert(xb, LT_BF16, x, LT_F32, T * in);
    lt_convert(x, LT_F32, xb, LT_BF16, T * in); /* x: the bf16 values */
    lt_convert(dyb, LT_BF16, dy, LT_F32, T * out);
    lt_convert(dy, LT_F32, dyb, LT_BF16, T * out);
    float *y[2], *dx[2], *ga[2], *gb2[2];
    for (int k = 0; k < 2; k++) {
        y[k] = zvec(T * out), dx[k] = zvec(T * in), ga[k] = zvec(r * in), gb2[k] = zvec(out * r);
        lt_lora lo = {lt_tensor_2d(LT_F32, a, r, in),
                      lt_tensor_2d(LT_F32, b, out, r),
                      lt_tensor_2d(LT_F32, ga[k], r, in),
                      lt_tensor_2d(LT_F32, gb2[k], out, r),
                      2.0f,
                      0.0f,
                      1};
        lt_weight wt = {lt_tensor_2d(LT_BF16, wb, out, in), &lo, {0}, {0}};
        lt_tensor xt = k ? lt_tensor_2d(LT_F32, x, T, in) : lt_tensor_2d(LT_BF16, xb, T, in);
        lt_tensor dyt = k ? lt_tensor_2d(LT_F32, dy, T, out) : lt_tensor_2d(LT_BF16, dyb, T, out);
        be->linear(&ctx, lt_tensor_2d(LT_F32, y[k], T, out), xt, &wt);
        be->linear_backward(&ctx, lt_tensor_2d(LT_F32, dx[k], T, in), dyt, xt, &wt);
    }
    ok(bits_equal(y[0], y[1], T * out) && bits_equal(dx[0], dx[1], T * in) &&
           bits_equal(ga[0], ga[1], r * in) && bits_equal(gb2[0], gb2[1], out * r),
       "linear and linear_backward with bf16 x and dy: the bits of their fp32 values");
    /* bad input: a bf16 x with an fp32 weight */
    lt_weight wf32 = {lt_tensor_2d(LT_F32, wf, out, in), NULL, {0}, {0}};
    rc = be->linear(&ctx, lt_tensor_2d(LT_F32, y[0], T, out), lt_tensor_2d(LT_BF16, xb, T, in),
                    &wf32);
    ok(rc == LT_ERR_ARG && strstr(ctx.err, "bf16"), "a bf16 x with an fp32 weight is refused");
    diag("%s", ctx.err);
    for (int k = 0; k < 2; k++)
        free(y[k]), free(dx[k]), free(ga[k]), free(gb2[k]);
    free(x), free(w), free(u), free(d), free(yf), free(gf), free(uf), free(yb), free(gb), free(ub),
        free(wf), free(dy), free(a), free(b), free(wb), free(xb), free(dyb);
}

int main(void) {
    lt_ctx_init(&ctx, &lt_backend_cpu, 2);
    test_linear(0, LT_F32);
    test_linear(1, LT_F32);
    test_linear(1, LT_BF16);
    test_bf16_tensors();
    test_rmsnorm();
    test_rope();
    test_attention(0);
    test_attention(3);
    test_attention_span(0);
    test_attention_span(2);
    test_geglu();
    test_embedding();
    test_cross_entropy();
    test_cross_entropy_weighted();
    test_adamw();
    test_extra_ops();
    lt_ctx_shutdown(&ctx);
    return tap_done();
}
