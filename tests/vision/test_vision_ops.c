/* test_vision_ops.c — the CPU backend's image ops (backend.h): layernorm with bias against a
 * direct double-precision computation, add_bias, gelu against geglu with up = 1, avg_pool on a
 * grid worked by hand, and attention_span: an empty span is exactly attention, a span over
 * every position is attention with every position equal (bidirectional), and a span opens
 * exactly its keys. TAP.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/backend/backend.h"
#include "tests/unit/tap.h"

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return (float)((*s >> 8) & 0xffff) / 32768.0f - 1.0f;
}

static double maxdiff(const float *a, const float *b, int n) {
    double m = 0;
    for (int i = 0; i < n; i++)
        m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

/* Key s visible to query t under a span over every key and window 3 (backend.h's rule). */
static int window_span_visible(int t, int s) {
    return t - s < 3;
}

/* Plain softmax attention with an explicit visibility rule: out [T, nh*hd]. */
static void masked_attention(float *out, const float *q, const float *k, const float *v, int T,
                             int nh, int nkv, int hd, float scale, int (*visible)(int, int)) {
    for (int t = 0; t < T; t++)
        for (int h = 0; h < nh; h++) {
            int kh = h / (nh / nkv);
            double w[64], mx = -1e300, sum = 0;
            for (int s = 0; s < T; s++) {
                double d = 0;
                for (int e = 0; e < hd; e++)
                    d += (double)q[(t * nh + h) * hd + e] * k[(s * nkv + kh) * hd + e];
                w[s] = visible(t, s) ? d * scale : -1e300;
                if (w[s] > mx) mx = w[s];
            }
            for (int s = 0; s < T; s++) {
                w[s] = w[s] <= -1e299 ? 0 : exp(w[s] - mx);
                sum += w[s];
            }
            for (int e = 0; e < hd; e++) {
                double acc = 0;
                for (int s = 0; s < T; s++)
                    acc += w[s] * v[(s * nkv + kh) * hd + e];
                out[(t * nh + h) * hd + e] = (float)(acc / sum);
            }
        }
}

int main(void) {
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &lt_backend_cpu, 2) != LT_OK) return 1;
    const lt_backend *be = ctx.be;
    ok(lt_backend_missing_vision_op(be) == NULL, "the CPU backend has every image op");
    unsigned seed = 7;

    /* layernorm */
    enum { N = 3, D = 10 };
    float x[N * D], y[N * D], w[D], b[D];
    for (int i = 0; i < N * D; i++)
        x[i] = 3.0f * frand(&seed) + 1.5f;
    for (int i = 0; i < D; i++) {
        w[i] = 1.0f + 0.5f * frand(&seed);
        b[i] = frand(&seed);
    }
    ok(be->layernorm(&ctx, lt_tensor_2d(LT_F32, y, N, D), lt_tensor_2d(LT_F32, x, N, D),
                     lt_tensor_1d(LT_F32, w, D), lt_tensor_1d(LT_F32, b, D), 1e-6f) == LT_OK,
       "layernorm runs");
    double worst = 0;
    for (int r = 0; r < N; r++) {
        double m = 0, v = 0;
        for (int i = 0; i < D; i++)
            m += x[r * D + i] / (double)D;
        for (int i = 0; i < D; i++)
            v += (x[r * D + i] - m) * (x[r * D + i] - m) / D;
        for (int i = 0; i < D; i++)
            worst =
                fmax(worst, fabs((x[r * D + i] - m) / sqrt(v + 1e-6) * w[i] + b[i] - y[r * D + i]));
    }
    ok(worst < 1e-5, "layernorm = (x - mean) / sqrt(var + eps) * w + b (biased variance)");
    ok(be->layernorm(&ctx, lt_tensor_2d(LT_F32, y, N, D), lt_tensor_2d(LT_F32, x, N, D),
                     lt_tensor_1d(LT_F32, w, D), lt_tensor_1d(LT_F32, b, D - 1),
                     1e-6f) == LT_ERR_ARG,
       "layernorm refuses a bias of the wrong size");

    /* add_bias */
    memcpy(y, x, sizeof x);
    be->add_bias(&ctx, lt_tensor_2d(LT_F32, y, N, D), lt_tensor_1d(LT_F32, b, D));
    int good = 1;
    for (int i = 0; i < N * D; i++)
        good &= y[i] == x[i] + b[i % D];
    ok(good, "add_bias adds b to every row");

    /* gelu = geglu with up = 1 */
    float ones[N * D], g2[N * D];
    for (int i = 0; i < N * D; i++)
        ones[i] = 1.0f;
    be->gelu(&ctx, lt_tensor_2d(LT_F32, y, N, D), lt_tensor_2d(LT_F32, x, N, D));
    be->geglu(&ctx, lt_tensor_2d(LT_F32, g2, N, D), lt_tensor_2d(LT_F32, x, N, D),
              lt_tensor_2d(LT_F32, ones, N, D));
    ok(maxdiff(y, g2, N * D) == 0, "gelu equals geglu's gelu_tanh");

    /* avg_pool: a 4x4 grid of 2 features, cell (r, c) = (10r + c, -r) */
    float grid[16 * 2], pooled[4 * 2];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) {
            grid[(r * 4 + c) * 2] = (float)(10 * r + c);
            grid[(r * 4 + c) * 2 + 1] = (float)-r;
        }
    ok(be->avg_pool(&ctx, lt_tensor_2d(LT_F32, pooled, 4, 2), lt_tensor_2d(LT_F32, grid, 16, 2),
                    2) == LT_OK,
       "avg_pool runs");
    /* block (i, j) averages rows 2i, 2i+1 and columns 2j, 2j+1: 10(2i + .5) + 2j + .5 */
    ok(pooled[0] == 5.5f && pooled[2] == 7.5f && pooled[4] == 25.5f && pooled[6] == 27.5f &&
           pooled[1] == -0.5f && pooled[5] == -2.5f,
       "avg_pool: 2x2 blocks in row-major order");
    ok(be->avg_pool(&ctx, lt_tensor_2d(LT_F32, pooled, 4, 2), lt_tensor_2d(LT_F32, grid, 15, 2),
                    2) == LT_ERR_ARG,
       "avg_pool refuses a grid that is not square");

    /* attention_span */
    enum { T = 7, NH = 4, NKV = 2, HD = 8 };
    float q[T * NH * HD], k[T * NKV * HD], v[T * NKV * HD], o1[T * NH * HD], o2[T * NH * HD];
    for (int i = 0; i < T * NH * HD; i++)
        q[i] = frand(&seed);
    for (int i = 0; i < T * NKV * HD; i++) {
        k[i] = frand(&seed);
        v[i] = frand(&seed);
    }
    int32_t pos[T], zero[T], span[T * 2];
    for (int t = 0; t < T; t++) {
        pos[t] = t;
        zero[t] = 0;
        span[2 * t] = 0;
        span[2 * t + 1] = -1;
    }
    lt_tensor Q = lt_tensor_3d(LT_F32, q, T, NH, HD), K = lt_tensor_3d(LT_F32, k, T, NKV, HD),
              V = lt_tensor_3d(LT_F32, v, T, NKV, HD), P = lt_tensor_1d(LT_I32, pos, T),
              Z = lt_tensor_1d(LT_I32, zero, T), S = lt_tensor_2d(LT_I32, span, T, 2);
    lt_tensor O1 = lt_tensor_2d(LT_F32, o1, T, NH * HD), O2 = lt_tensor_2d(LT_F32, o2, T, NH * HD);
    float sc = 0.35f;
    be->attention(&ctx, O1, Q, K, V, P, P, 3, sc);
    be->attention_span(&ctx, O2, Q, K, V, P, P, S, 3, sc);
    ok(maxdiff(o1, o2, T * NH * HD) == 0, "an empty span is exactly attention (window 3)");
    for (int t = 0; t < T; t++) {
        span[2 * t] = 0;
        span[2 * t + 1] = T - 1;
    }
    be->attention(&ctx, O1, Q, K, V, Z, Z, 0, sc);
    be->attention_span(&ctx, O2, Q, K, V, P, P, S, 0, sc);
    ok(maxdiff(o1, o2, T * NH * HD) < 1e-6,
       "a span over every key, no window: bidirectional attention");
    /* with a window the span still loses the keys the window has passed (query - key >= 3),
     * as transformers 5.17 masks an image block in a sliding layer; every later key stays */
    be->attention_span(&ctx, O2, Q, K, V, P, P, S, 3, sc);
    masked_attention(o1, q, k, v, T, NH, NKV, HD, sc, window_span_visible);
    ok(maxdiff(o1, o2, T * NH * HD) < 1e-6,
       "a span over every key, window 3: every later key, and the earlier ones within 3");
    /* block 2..4: query 2 sees 0..4 with window 0; query 5 (outside) stays causal */
    for (int t = 0; t < T; t++) {
        span[2 * t] = (t >= 2 && t <= 4) ? 2 : 0;
        span[2 * t + 1] = (t >= 2 && t <= 4) ? 4 : -1;
    }
    be->attention_span(&ctx, O2, Q, K, V, P, P, S, 0, sc);
    int32_t p2[T];
    for (int t = 0; t < T; t++)
        p2[t] = t;
    p2[2] = p2[3] = p2[4] = 4; /* the block's queries as if at position 4: see keys 0..4 */
    be->attention(&ctx, O1, Q, K, V, lt_tensor_1d(LT_I32, p2, T), P, 0, sc);
    ok(maxdiff(o1, o2, T * NH * HD) < 1e-6,
       "a block's queries see the whole block and what precedes it; the rest is causal");
    ok(be->attention_span(&ctx, O2, Q, K, V, P, P, lt_tensor_2d(LT_I32, span, T - 1, 2), 0, sc) ==
           LT_ERR_ARG,
       "attention_span refuses a span tensor of the wrong size");
    lt_ctx_shutdown(&ctx);
    return tap_done();
}
