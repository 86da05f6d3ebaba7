/* test_cpu_ops.c — the CPU reference ops against small hand-computed values (RMSNorm, RoPE,
 * attention with GQA / causal / sliding masks, GeGLU, embedding), attention_rows against the
 * attention op per row, the matmul paths (CBLAS, the threaded C loop, F32/F16/BF16 weights, the
 * LoRA path) against a naive double product, the sampler and sample_rows (against a sort-based
 * reading of its rule), the UTF-8 text stream, and the
 * forward pass: chunked KV-cache decoding with a sliding ring must give the logits of the plain
 * full-sequence forward.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/backend/backend.h"
#include "cuda/backend/sample_rule.h"
#include "cuda/model/model.h"
#include "cuda/model/sample.h"
#include "cuda/text/textstream.h"
#include "tests/engine/st_write.h"
#include "tests/unit/tap.h"

static lt_ctx ctx;
static const lt_backend *be;

static void test_rmsnorm(void) {
    float x[4] = {1, 2, 3, 4}, w[4] = {0, 0.5f, -1, 1}, y[4];
    lt_status rc = be->rmsnorm(&ctx, lt_tensor_2d(LT_F32, y, 1, 4), lt_tensor_2d(LT_F32, x, 1, 4),
                               lt_tensor_1d(LT_F32, w, 4), 1e-6f);
    is_int(rc, LT_OK, "rmsnorm runs");
    double r = 1.0 / sqrt(7.5 + 1e-6); /* mean(x^2) = 30/4 */
    is_close(y[0], 1 * r, 1e-6, "rmsnorm y0 = x0 * r * (1 + 0)");
    is_close(y[1], 2 * r * 1.5, 1e-6, "rmsnorm y1 uses (1 + w) = 1.5");
    is_close(y[2], 0.0, 1e-7, "rmsnorm y2: (1 + w) = 0");
    is_close(y[3], 4 * r * 2, 1e-6, "rmsnorm y3 uses (1 + w) = 2");
    /* two rows of 2 (the per-head q_norm shape), in place */
    float z[4] = {3, 4, -1, 1}, w2[2] = {0, 0};
    be->rmsnorm(&ctx, lt_tensor_2d(LT_F32, z, 2, 2), lt_tensor_2d(LT_F32, z, 2, 2),
                lt_tensor_1d(LT_F32, w2, 2), 0);
    is_close(z[0], 3 / sqrt(12.5), 1e-6, "rmsnorm per row: row 0");
    is_close(z[3], 1.0, 1e-6, "rmsnorm per row: row 1");
    float bad[3];
    rc = be->rmsnorm(&ctx, lt_tensor_2d(LT_F32, bad, 1, 3), lt_tensor_2d(LT_F32, x, 1, 4),
                     lt_tensor_1d(LT_F32, w, 4), 1e-6f);
    ok(rc == LT_ERR_ARG && strstr(ctx.err, "rmsnorm"), "rmsnorm refuses mismatched shapes");
}

static void test_rope(void) {
    /* one token at position 1, one head, hd = 4: pairs (0,2) at angle 1, (1,3) at angle 0.01 */
    float x[4] = {1, 2, 3, 4};
    int32_t pos[1] = {1};
    be->rope(&ctx, lt_tensor_3d(LT_F32, x, 1, 1, 4), lt_tensor_1d(LT_I32, pos, 1), 10000.0f, 1.0f);
    is_close(x[0], 1 * cos(1.0) - 3 * sin(1.0), 1e-5, "rope x0 = x0 cos - x2 sin");
    is_close(x[2], 3 * cos(1.0) + 1 * sin(1.0), 1e-5, "rope x2 = x2 cos + x0 sin (rotate-half)");
    is_close(x[1], 2 * cos(0.01) - 4 * sin(0.01), 1e-5, "rope x1 at theta^(-2/4)");
    is_close(x[3], 4 * cos(0.01) + 2 * sin(0.01), 1e-5, "rope x3");
    /* linear scaling: factor 2 at position 2 == no scaling at position 1 */
    float y[4] = {1, 2, 3, 4};
    int32_t p2[1] = {2};
    be->rope(&ctx, lt_tensor_3d(LT_F32, y, 1, 1, 4), lt_tensor_1d(LT_I32, p2, 1), 10000.0f, 2.0f);
    is_close(y[0], x[0], 1e-5, "linear factor 2 halves the angle");
    float z[4] = {1, 2, 3, 4};
    int32_t p0[1] = {0};
    be->rope(&ctx, lt_tensor_3d(LT_F32, z, 1, 1, 4), lt_tensor_1d(LT_I32, p0, 1), 10000.0f, 1.0f);
    ok(z[0] == 1 && z[1] == 2 && z[2] == 3 && z[3] == 4, "position 0 is the identity");
}

static void test_attention(void) {
    /* T = 2, nh = 2, nkv = 1 (both query heads share the kv head), hd = 2, scale 1 */
    float q[8] = {0, 0, 0, 0, /* t0: h0, h1 */ 1, 0, 0, 0 /* t1: h0 = [1,0], h1 = [0,0] */};
    float k[4] = {0, 0, logf(3.0f), 0};
    float v[4] = {4, 0, 0, 8};
    int32_t pos[2] = {0, 1};
    float out[8];
    lt_tensor O = lt_tensor_2d(LT_F32, out, 2, 4), Q = lt_tensor_3d(LT_F32, q, 2, 2, 2),
              K = lt_tensor_3d(LT_F32, k, 2, 1, 2), Vt = lt_tensor_3d(LT_F32, v, 2, 1, 2),
              P = lt_tensor_1d(LT_I32, pos, 2);
    is_int(be->attention(&ctx, O, Q, K, Vt, P, P, 0, 1.0f), LT_OK, "attention runs");
    ok(out[0] == 4 && out[1] == 0, "token 0 sees only key 0 (causal)");
    is_close(out[4], 0.25 * 4, 1e-6, "token 1 head 0: softmax(0, ln3) = (.25, .75) -> 1");
    is_close(out[5], 0.75 * 8, 1e-6, "token 1 head 0: -> 6");
    is_close(out[6], 2, 1e-6, "token 1 head 1 (same kv head, GQA): uniform -> 2");
    is_close(out[7], 4, 1e-6, "token 1 head 1: -> 4");
    be->attention(&ctx, O, Q, K, Vt, P, P, 1, 1.0f);
    ok(out[4] == 0 && out[5] == 8, "sliding window 1: token 1 sees only itself");
    int32_t kp[2] = {-1, -1};
    be->attention(&ctx, O, Q, K, Vt, P, lt_tensor_1d(LT_I32, kp, 2), 0, 1.0f);
    ok(out[4] == 0 && out[5] == 0, "no visible key gives zeros");
    float s2 = 0.5f; /* scale applies to the scores: (0, ln3 * 0.5) */
    be->attention(&ctx, O, Q, K, Vt, P, P, 0, s2);
    double p1 = sqrt(3.0) / (1 + sqrt(3.0));
    is_close(out[5], p1 * 8, 1e-5, "the scale multiplies q.k");
}

/* attention_rows against the attention op called once per row on that row's cache, with the
 * kpos its ring layout implies: N = 5 caches of S = 7 slots, 3 queries (one before the ring
 * wraps, two after), GQA 4:2, full and sliding windows. */
static void test_attention_rows(void) {
    enum { N = 5, S = 7, R = 3, NH = 4, NKV = 2, HD = 8 };
    int32_t rows[R] = {4, 0, 2}, qpos[R] = {3, 12, 20};
    static float kc[N * S * NKV * HD], vc[N * S * NKV * HD], kr[N * S * NKV * HD],
        vr[N * S * NKV * HD];
    float q[R * NH * HD], kn[R * NKV * HD], vn[R * NKV * HD], out[R * NH * HD], ref[R * NH * HD];
    uint64_t x = 5;
    float *all[] = {kc, vc, q, kn, vn};
    size_t sizes[] = {sizeof kc, sizeof vc, sizeof q, sizeof kn, sizeof vn};
    for (int a = 0; a < 5; a++)
        for (size_t i = 0; i < sizes[a] / sizeof(float); i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            all[a][i] = (float)((double)(x >> 11) / 9007199254740992.0 * 2 - 1);
        }
    int windows[2] = {0, 5};
    for (int w = 0; w < 2; w++) {
        memcpy(kr, kc, sizeof kc);
        memcpy(vr, vc, sizeof vc);
        int tok = NKV * HD, row = S * tok;
        for (int i = 0; i < R; i++) { /* the reference: append, then attend with kpos */
            memcpy(kr + rows[i] * row + (qpos[i] % S) * tok, kn + i * tok, sizeof(float) * tok);
            memcpy(vr + rows[i] * row + (qpos[i] % S) * tok, vn + i * tok, sizeof(float) * tok);
            int32_t kp[S];
            for (int sl = 0; sl < S; sl++) {
                int d = ((qpos[i] - sl) % S + S) % S;
                kp[sl] = d <= qpos[i] ? qpos[i] - d : -1;
            }
            be->attention(&ctx, lt_tensor_2d(LT_F32, ref + i * NH * HD, 1, NH * HD),
                          lt_tensor_3d(LT_F32, q + i * NH * HD, 1, NH, HD),
                          lt_tensor_3d(LT_F32, kr + rows[i] * row, S, NKV, HD),
                          lt_tensor_3d(LT_F32, vr + rows[i] * row, S, NKV, HD),
                          lt_tensor_1d(LT_I32, qpos + i, 1), lt_tensor_1d(LT_I32, kp, S),
                          windows[w], 0.35f);
        }
        float k2[N * S * NKV * HD], v2[N * S * NKV * HD];
        memcpy(k2, kc, sizeof kc);
        memcpy(v2, vc, sizeof vc);
        lt_status rc = be->attention_rows(
            &ctx, lt_tensor_2d(LT_F32, out, R, NH * HD), lt_tensor_3d(LT_F32, q, R, NH, HD),
            lt_tensor_3d(LT_F32, kn, R, NKV, HD), lt_tensor_3d(LT_F32, vn, R, NKV, HD),
            lt_tensor_4d(LT_F32, k2, N, S, NKV, HD), lt_tensor_4d(LT_F32, v2, N, S, NKV, HD),
            lt_tensor_1d(LT_I32, rows, R), lt_tensor_1d(LT_I32, qpos, R), windows[w], 0.35f);
        ok(rc == LT_OK && !memcmp(out, ref, sizeof out),
           windows[w] ? "attention_rows = attention per row over its ring (window 5)"
                      : "attention_rows = attention per row over its ring (full)");
        ok(!memcmp(k2, kr, sizeof kc) && !memcmp(v2, vr, sizeof vc),
           "attention_rows appends each row's K/V at slot qpos % S of its row, nothing else");
    }
    int32_t bad[R] = {4, 5, 2};
    ok(be->attention_rows(
           &ctx, lt_tensor_2d(LT_F32, out, R, NH * HD), lt_tensor_3d(LT_F32, q, R, NH, HD),
           lt_tensor_3d(LT_F32, kn, R, NKV, HD), lt_tensor_3d(LT_F32, vn, R, NKV, HD),
           lt_tensor_4d(LT_F32, kc, N, S, NKV, HD), lt_tensor_4d(LT_F32, vc, N, S, NKV, HD),
           lt_tensor_1d(LT_I32, bad, R), lt_tensor_1d(LT_I32, qpos, R), 0, 1.0f) == LT_ERR_ARG &&
           strstr(ctx.err, "attention_rows"),
       "attention_rows refuses a row outside [0, N)");
}

static void test_geglu_embedding(void) {
    float g[2] = {1, -1}, u[2] = {2, 3}, y[2];
    be->geglu(&ctx, lt_tensor_1d(LT_F32, y, 2), lt_tensor_1d(LT_F32, g, 2),
              lt_tensor_1d(LT_F32, u, 2));
    is_close(y[0], 0.8411919906 * 2, 1e-6, "gelu_tanh(1) * 2");
    is_close(y[1], -0.1588080094 * 3, 1e-6, "gelu_tanh(-1) * 3");
    uint16_t tab[6];
    float tv[6] = {1, 2, 3, 4, 5, 6};
    lt_convert(tab, LT_BF16, tv, LT_F32, 6);
    lt_weight W = {.w = lt_tensor_2d(LT_BF16, tab, 3, 2)};
    int32_t ids[2] = {2, 0};
    float h[4];
    is_int(
        be->embedding(&ctx, lt_tensor_2d(LT_F32, h, 2, 2), lt_tensor_1d(LT_I32, ids, 2), &W, 0.5f),
        LT_OK, "embedding runs on a bf16 table");
    ok(h[0] == 2.5f && h[1] == 3.0f && h[2] == 0.5f && h[3] == 1.0f, "embedding = row * scale");
    ids[1] = 3;
    ok(be->embedding(&ctx, lt_tensor_2d(LT_F32, h, 2, 2), lt_tensor_1d(LT_I32, ids, 2), &W, 1) ==
               LT_ERR_ARG &&
           strstr(ctx.err, "token id 3"),
       "an id past the table is an error naming it");
}

static void test_matmul(void) {
    const int64_t in = 37, out = 29;
    const int64_t Ts[] = {1, 3, 17};
    float *w = malloc(sizeof(float) * in * out), *x = malloc(sizeof(float) * 17 * in);
    uint16_t *wb = malloc(2 * in * out), *wh = malloc(2 * in * out);
    for (int64_t i = 0; i < in * out; i++)
        w[i] = tst_randn();
    for (int64_t i = 0; i < 17 * in; i++)
        x[i] = tst_randn();
    lt_convert(wb, LT_BF16, w, LT_F32, in * out);
    lt_convert(wh, LT_F16, w, LT_F32, in * out);
    float *wbf = malloc(sizeof(float) * in * out), *whf = malloc(sizeof(float) * in * out);
    lt_to_f32(wbf, wb, LT_BF16, in * out);
    lt_to_f32(whf, wh, LT_F16, in * out);
    float y[17 * 29];
    for (int ti = 0; ti < 3; ti++) {
        int64_t T = Ts[ti];
        for (int dt = 0; dt < 3; dt++) {
            const void *wp = dt == 0 ? (void *)w : dt == 1 ? (void *)wb : (void *)wh;
            const float *wref = dt == 0 ? w : dt == 1 ? wbf : whf;
            lt_dtype t = dt == 0 ? LT_F32 : dt == 1 ? LT_BF16 : LT_F16;
            for (int blas = 0; blas < 2; blas++) {
                lt_cpu_matmul(&ctx, y, x, wp, t, T, in, out, blas);
                double md = 0;
                for (int64_t r = 0; r < T; r++)
                    for (int64_t o = 0; o < out; o++) {
                        double s = 0;
                        for (int64_t i = 0; i < in; i++)
                            s += (double)x[r * in + i] * wref[o * in + i];
                        double d = fabs(s - y[r * out + o]);
                        if (d > md) md = d;
                    }
                char name[128];
                snprintf(name, sizeof name, "matmul T=%lld %s %s == naive", (long long)T,
                         lt_dtype_name(t), blas && lt_cpu_has_blas() ? "cblas" : "C loop");
                ok(md < 1e-4, name);
                if (md >= 1e-4) diag("max diff %g", md);
            }
        }
    }
    /* LoRA: y = x W^T + s (x A^T) B^T */
    const int64_t r = 3;
    float A[3 * 37], B[29 * 3];
    for (int i = 0; i < 3 * 37; i++)
        A[i] = tst_randn();
    for (int i = 0; i < 29 * 3; i++)
        B[i] = tst_randn();
    lt_lora lo = {.a = lt_tensor_2d(LT_F32, A, r, in),
                  .b = lt_tensor_2d(LT_F32, B, out, r),
                  .scale = 0.5f,
                  .enabled = 1};
    lt_weight W = {.w = lt_tensor_2d(LT_F32, w, out, in), .lora = &lo};
    be->linear(&ctx, lt_tensor_2d(LT_F32, y, 3, out), lt_tensor_2d(LT_F32, x, 3, in), &W);
    double md = 0;
    for (int64_t t = 0; t < 3; t++)
        for (int64_t o = 0; o < out; o++) {
            double s = 0;
            for (int64_t i = 0; i < in; i++)
                s += (double)x[t * in + i] * w[o * in + i];
            for (int64_t j = 0; j < r; j++) {
                double xa = 0;
                for (int64_t i = 0; i < in; i++)
                    xa += (double)x[t * in + i] * A[j * in + i];
                s += 0.5 * xa * B[o * r + j];
            }
            if (fabs(s - y[t * out + o]) > md) md = fabs(s - y[t * out + o]);
        }
    ok(md < 1e-4, "linear with a LoRA adapter == x W^T + s (x A^T) B^T");
    lo.enabled = 0;
    float y2[3 * 29];
    be->linear(&ctx, lt_tensor_2d(LT_F32, y2, 3, out), lt_tensor_2d(LT_F32, x, 3, in), &W);
    lt_cpu_matmul(&ctx, y, x, w, LT_F32, 3, in, out, 1);
    ok(!memcmp(y, y2, sizeof y2), "a disabled adapter is skipped");
    ok(be->linear(&ctx, lt_tensor_2d(LT_F32, y, 3, out), lt_tensor_2d(LT_F32, x, 3, in + 1), &W) ==
               LT_ERR_ARG &&
           strstr(ctx.err, "shapes do not agree"),
       "linear refuses an x of the wrong width");
    free(w);
    free(x);
    free(wb);
    free(wh);
    free(wbf);
    free(whf);
}

static void test_sampler(void) {
    float lg[5] = {0.1f, 2.0f, -1.0f, 1.9f, 0.0f};
    lt_gen_opts o;
    lt_gen_opts_default(&o);
    lt_rng rng;
    rng_seed(&rng, 7);
    o.temperature = 0;
    is_int(sampler_pick(lg, 5, &o, &rng), 1, "temperature 0 is argmax");
    o.temperature = 1;
    o.top_k = 1;
    int all1 = 1;
    for (int i = 0; i < 50; i++)
        all1 &= sampler_pick(lg, 5, &o, &rng) == 1;
    ok(all1, "top_k=1 always picks the best");
    o.top_k = 0;
    o.top_p = 0.01f;
    all1 = 1;
    for (int i = 0; i < 50; i++)
        all1 &= sampler_pick(lg, 5, &o, &rng) == 1;
    ok(all1, "a tiny top_p keeps only the best");
    o.top_p = 1;
    o.min_p = 0.99f;
    all1 = 1;
    for (int i = 0; i < 50; i++)
        all1 &= sampler_pick(lg, 5, &o, &rng) == 1;
    ok(all1, "min_p 0.99 keeps only the best");
    /* top_k = 2 never picks outside {1, 3} */
    o.min_p = 0;
    o.top_k = 2;
    int outside = 0, seen3 = 0;
    for (int i = 0; i < 400; i++) {
        int id = sampler_pick(lg, 5, &o, &rng);
        outside |= id != 1 && id != 3;
        seen3 |= id == 3;
    }
    ok(!outside && seen3, "top_k=2 samples both and only the top two");
    /* frequencies: logits (0, ln 3) -> p = (.25, .75) */
    float l2[2] = {0, logf(3)};
    o.top_k = 0;
    int c1 = 0;
    for (int i = 0; i < 4000; i++)
        c1 += sampler_pick(l2, 2, &o, &rng) == 1;
    is_close(c1 / 4000.0, 0.75, 0.03, "sampling follows softmax (p = 0.75)");
    o.temperature = 1e6f;
    c1 = 0;
    for (int i = 0; i < 4000; i++)
        c1 += sampler_pick(l2, 2, &o, &rng) == 1;
    is_close(c1 / 4000.0, 0.5, 0.03, "a huge temperature flattens to uniform");
    /* no truncation (top_k 0, top_p 1, min_p 0) draws without sorting: it still follows the
     * softmax of logits / temperature over every id */
    {
        int cnt[5] = {0};
        o.temperature = 0.7f;
        o.top_p = 1;
        o.min_p = 0;
        for (int i = 0; i < 40000; i++)
            cnt[sampler_pick(lg, 5, &o, &rng)]++;
        double z = 0, worst = 0;
        for (int i = 0; i < 5; i++)
            z += exp(lg[i] / 0.7);
        for (int i = 0; i < 5; i++) {
            double d = fabs(cnt[i] / 40000.0 - exp(lg[i] / 0.7) / z);
            if (d > worst) worst = d;
        }
        is_close(worst, 0, 0.01, "untruncated sampling follows the softmax over every id");
    }
    { /* over several blocks and a ragged tail (1003 ids): mass on blocks 0 and 3 and the tail */
        float *lb = malloc(sizeof(float) * 1003);
        for (int i = 0; i < 1003; i++)
            lb[i] = (i == 7 || i == 800) ? 3.0f : i >= 1000 ? 2.0f : -2.0f;
        o.temperature = 1;
        int hit[4] = {0}; /* 7, 800, 1000..1002, the rest */
        for (int i = 0; i < 40000; i++) {
            int id = sampler_pick(lb, 1003, &o, &rng);
            hit[id == 7 ? 0 : id == 800 ? 1 : id >= 1000 ? 2 : 3]++;
        }
        double e3 = exp(3.0), e2 = exp(2.0), em = exp(-2.0), z = 2 * e3 + 3 * e2 + 998 * em;
        double want[4] = {e3 / z, e3 / z, 3 * e2 / z, 998 * em / z}, worst = 0;
        for (int k = 0; k < 4; k++) {
            double d = fabs(hit[k] / 40000.0 - want[k]);
            if (d > worst) worst = d;
        }
        is_close(worst, 0, 0.012, "untruncated sampling over blocks and a ragged tail");
        free(lb);
    }
    /* the same seed gives the same draws */
    lt_rng a, b;
    rng_seed(&a, 42);
    rng_seed(&b, 42);
    o.temperature = 1;
    int same = 1;
    for (int i = 0; i < 100; i++)
        same &= sampler_pick(lg, 5, &o, &a) == sampler_pick(lg, 5, &o, &b);
    ok(same, "seeded: the same seed gives the same tokens");
    char err[LT_ERRLEN];
    o.top_p = 1.5f;
    ok(gen_opts_check(&o, err) == LT_ERR_ARG && strstr(err, "top_p=1.5"),
       "top_p out of range is named");
    o.top_p = 1;
    o.temperature = -1;
    ok(gen_opts_check(&o, err) == LT_ERR_ARG && strstr(err, "temperature"),
       "negative temperature is named");
}

/* ---- sample_rows against a sort-based reading of backend.h's rule --------------------------
 * The reference sorts the ids by logit, applies top_k at the k-th value (ties kept), top_p by
 * walking the values from the smallest up with their cumulative weight, min_p by weight, then
 * walks the survivors in id order: the same rule as the op's radix selections, another way. */
static const float *sort_vals;
static int by_logit_desc(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    float vx = sort_vals[x], vy = sort_vals[y];
    return vx > vy ? -1 : vx < vy ? 1 : (x > y) - (x < y);
}

static int ref_sample(const float *x, int V, uint32_t bits, const lt_sample_opts *o) {
    int *ord = malloc(sizeof(int) * (size_t)V);
    char *keep = calloc((size_t)V, 1);
    for (int j = 0; j < V; j++)
        ord[j] = j;
    sort_vals = x;
    qsort(ord, (size_t)V, sizeof(int), by_logit_desc);
    int best = ord[0], id = best;
    if (o->inv_temp > 0) {
        float m = x[best];
        int n = V; /* candidates: ord[0..n) */
        if (o->top_k > 0 && o->top_k < V)
            while (n > o->top_k && x[ord[n - 1]] < x[ord[o->top_k - 1]])
                n--;
        if (o->top_p < 1) {
            uint64_t total = 0;
            for (int i = 0; i < n; i++)
                total += lt_sample_weight(x[ord[i]], m, o->inv_temp);
            uint64_t cut = lt_sample_cut(total, o->top_p), at_or_below = total;
            int keep_n = n;
            for (int i = 0; i < n;) { /* from the top: the weight at or below value x[ord[i]] */
                int e = i;
                uint64_t group = 0;
                while (e < n && x[ord[e]] == x[ord[i]])
                    group += lt_sample_weight(x[ord[e++]], m, o->inv_temp);
                if (at_or_below <= cut) {
                    keep_n = i;
                    break;
                }
                at_or_below -= group;
                i = e;
            }
            n = keep_n;
        }
        uint64_t fl = lt_sample_floor(o->min_p), S = 0;
        for (int i = 0; i < n; i++)
            if (lt_sample_weight(x[ord[i]], m, o->inv_temp) >= fl) keep[ord[i]] = 1;
        for (int j = 0; j < V; j++)
            if (keep[j]) S += lt_sample_weight(x[j], m, o->inv_temp);
        uint64_t t = lt_sample_target(S, bits), acc = 0;
        for (int j = 0; S && j < V; j++) {
            if (!keep[j]) continue;
            acc += lt_sample_weight(x[j], m, o->inv_temp);
            if (acc > t) {
                id = j;
                break;
            }
        }
    }
    free(ord);
    free(keep);
    return id;
}

static void test_sample_rows(void) {
    enum { R = 40, V = 3001 };
    float *lg = malloc(sizeof(float) * R * V);
    int32_t bits[R], ids[R];
    uint64_t st = 12345;
    for (int i = 0; i < R * V; i++) { /* values on a grid of 1/8: many ties */
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        lg[i] = (float)((int)(st >> 40) % 64 - 40) / 8.0f;
        if (i % 997 == 5) lg[i] = -INFINITY;
    }
    lt_sample_opts cases[] = {{0, 0, 1, 0},         {1, 0, 1, 0},        {1, 64, 1, 0},
                              {0.7f, 64, 0.95f, 0}, {1.3f, 0, 0.9f, 0},  {1, 0, 1, 0.05f},
                              {2, 5, 0.5f, 0.2f},   {1, 1, 1, 0},        {1, 0, 1e-6f, 0},
                              {1, V - 1, 1, 0},     {1e-6f, 0, 0.99f, 0}};
    int n_cases = (int)(sizeof cases / sizeof cases[0]), all_same = 1, valid = 1;
    for (int c = 0; c < n_cases; c++)
        for (int rep = 0; rep < 3; rep++) {
            for (int r = 0; r < R; r++) {
                st = st * 6364136223846793005ull + 1442695040888963407ull;
                bits[r] = (int32_t)(st >> 32);
            }
            lt_status rc =
                be->sample_rows(&ctx, lt_tensor_1d(LT_I32, ids, R), lt_tensor_2d(LT_F32, lg, R, V),
                                lt_tensor_1d(LT_I32, bits, R), &cases[c]);
            if (rc != LT_OK) {
                diag("%s", ctx.err);
                all_same = 0;
            }
            for (int r = 0; r < R; r++) {
                int want = ref_sample(lg + (size_t)r * V, V, (uint32_t)bits[r], &cases[c]);
                if (ids[r] != want) {
                    if (all_same) diag("case %d row %d: op %d, reference %d", c, r, ids[r], want);
                    all_same = 0;
                }
                valid &= ids[r] >= 0 && ids[r] < V && lg[(size_t)r * V + ids[r]] > -INFINITY;
            }
        }
    ok(all_same, "sample_rows = the sort-based reading of the rule (ties, -inf, every option)");
    ok(valid, "sample_rows never draws an id of probability 0");
    /* extremes of the bits: the first and the last candidate of the walk */
    float two[2] = {0, 0};
    int32_t b0 = 0, b1 = -1, id = -1;
    lt_sample_opts plain = {1, 0, 1, 0};
    be->sample_rows(&ctx, lt_tensor_1d(LT_I32, &id, 1), lt_tensor_2d(LT_F32, two, 1, 2),
                    lt_tensor_1d(LT_I32, &b0, 1), &plain);
    is_int(id, 0, "bits 0 draw the first candidate");
    be->sample_rows(&ctx, lt_tensor_1d(LT_I32, &id, 1), lt_tensor_2d(LT_F32, two, 1, 2),
                    lt_tensor_1d(LT_I32, &b1, 1), &plain);
    is_int(id, 1, "bits 2^32-1 draw the last candidate");
    lt_sample_opts bad = {1, -1, 1, 0};
    ok(be->sample_rows(&ctx, lt_tensor_1d(LT_I32, &id, 1), lt_tensor_2d(LT_F32, two, 1, 2),
                       lt_tensor_1d(LT_I32, &b0, 1), &bad) == LT_ERR_ARG &&
           strstr(ctx.err, "top_k"),
       "sample_rows refuses a negative top_k, naming it");
    free(lg);
}

static char pieces[16][64];
static int n_pieces;
static void on_piece(void *c, const char *p) {
    (void)c;
    if (n_pieces < 16) snprintf(pieces[n_pieces++], 64, "%s", p);
}

static void test_textstream(void) {
    textstream st = {.emit = on_piece};
    n_pieces = 0;
    textstream_add(&st, "a", 1);
    textstream_add(&st, "\xC3", 1); /* first byte of é */
    is_int(n_pieces, 1, "half a character is held back");
    textstream_add(&st, "\xA9", 1);
    is_str(pieces[1], "\xC3\xA9", "the character goes out once complete");
    const char *emoji = "\xF0\x9F\x99\x82"; /* 🙂 byte by byte */
    for (int i = 0; i < 4; i++)
        textstream_add(&st, emoji + i, 1);
    is_str(pieces[2], emoji, "a 4-byte emoji arrives whole");
    is_int(n_pieces, 3, "and only once");
    textstream_add(&st, "\xE4\xB8", 2); /* unfinished 世 */
    textstream_finish(&st);
    is_str(pieces[3], "\xEF\xBF\xBD", "an unfinished character ends as U+FFFD");
    is_str(st.text.p, "a\xC3\xA9\xF0\x9F\x99\x82\xEF\xBF\xBD", "the whole text is kept");
    lt_strbuf_free(&st.text);
    textstream bad = {0};
    textstream_add(&bad, "\x80x", 2);        /* a stray continuation byte */
    textstream_add(&bad, "\xC3(", 2);        /* a lead byte without its continuation */
    textstream_add(&bad, "\xED\xA0\x80", 3); /* a UTF-16 surrogate, not valid UTF-8 */
    textstream_add(&bad, "\xC0\xAF", 2);     /* an overlong '/' */
    textstream_finish(&bad);
    is_str(bad.text.p,
           "\xEF\xBF\xBDx\xEF\xBF\xBD(\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD",
           "invalid bytes become U+FFFD: the stream is always valid UTF-8");
    lt_strbuf_free(&bad.text);
}

/* The forward: full-sequence (no cache) vs chunked KV cache with a sliding ring vs one token
 * at a time. Window 4 and 600 tokens make the ring wrap many times and cross chunk borders. */
static void test_forward_cache(void) {
    char dir[] = "/tmp/lathe-fwd-XXXXXX";
    if (!mkdtemp(dir)) return;
    tiny_spec sp = {.V = 50,
                    .H = 16,
                    .I = 24,
                    .L = 7,
                    .nh = 4,
                    .nkv = 2,
                    .hd = 8,
                    .window = 4,
                    .qpas = 10,
                    .prefix = "model."};
    tiny_ckpt_write(dir, &sp);
    gemma3_model *m;
    char err[LT_ERRLEN];
    if (gemma3_load_dir(&m, dir, NULL, NULL, err) != LT_OK) {
        ok(0, "tiny checkpoint loads");
        diag("%s", err);
        return;
    }
    const int T = 600, V = 50;
    int32_t *ids = malloc(sizeof(int32_t) * T);
    for (int i = 0; i < T; i++)
        ids[i] = (i * 7 + 3) % V;
    float *a = malloc(sizeof(float) * T * V), *b = malloc(sizeof(float) * T * V);
    gemma3_outputs oa = {.logits = a};
    is_int(gemma3_forward(m, &ctx, ids, T, NULL, &oa), LT_OK, "full-sequence forward runs");
    gemma3_cache c;
    is_int(gemma3_cache_init(&c, &ctx, &m->cfg, 2048), LT_OK, "cache with a sliding ring");
    ok(c.layers[0].ring && !c.layers[5].ring, "sliding layers ring, the full layer grows");
    gemma3_outputs ob = {.logits = b};
    is_int(gemma3_forward(m, &ctx, ids, T - 10, &c, &ob), LT_OK,
           "chunked prefill through the cache");
    for (int t = T - 10; t < T; t++) {
        gemma3_outputs o1 = {.logits = b + (size_t)t * V};
        gemma3_forward(m, &ctx, ids + t, 1, &c, &o1);
    }
    is_int(c.len, T, "cache length counts every token");
    double md = 0, mx = 0;
    for (int i = 0; i < T * V; i++) {
        if (fabs(a[i] - b[i]) > md) md = fabs(a[i] - b[i]);
        if (fabs(a[i]) > mx) mx = fabs(a[i]);
    }
    ok(md <= 1e-5 * mx, "KV-cache logits (chunks + single tokens) == full-sequence logits");
    diag("max |diff| %g, max |logit| %g", md, mx);
    /* window matters: a model with a wider window gives different late logits */
    float last[50];
    gemma3_cache_reset(&c, &ctx);
    m->cfg.sliding_window = 5;
    gemma3_outputs ol = {.last_logits = last};
    gemma3_forward(m, &ctx, ids, T, &c, &ol);
    double dl = 0;
    for (int v = 0; v < V; v++)
        dl += fabs(last[v] - a[(size_t)(T - 1) * V + v]);
    ok(dl > 1e-3, "the sliding window changes the result (the mask is not a no-op)");
    gemma3_cache_free(&c, &ctx);
    gemma3_model_free(m);
    free(ids);
    free(a);
    free(b);
    char cmd[100];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) diag("rm failed");
}

int main(void) {
    if (lt_ctx_init(&ctx, &lt_backend_cpu, 2) != LT_OK) return 1;
    be = ctx.be;
    test_rmsnorm();
    test_rope();
    test_attention();
    test_attention_rows();
    test_geglu_embedding();
    test_matmul();
    test_sampler();
    test_sample_rows();
    test_textstream();
    test_forward_cache();
    lt_ctx_shutdown(&ctx);
    return tap_done();
}
