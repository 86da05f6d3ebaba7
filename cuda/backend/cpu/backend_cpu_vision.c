/* backend_cpu_vision.c — the CPU reference of the image tower's ops: LayerNorm with bias, a
 * linear's bias, GELU (tanh approximation) and the square-grid average pool (backend.h states
 * each), and the backward of LayerNorm, GELU and the pool, which training LoRA adapters on the
 * tower needs (lt_tower_grad_ops: lt_cpu_tower_grad, which lt_backend_cpu points at). The image
 * block's attention (attention_span) shares the attention kernel in backend_cpu.c, which points the
 * table at these.
 *
 * Owns nothing but these functions; fp32 on host memory, single-threaded (next to the tower's
 * matmuls they are cheap). Knows nothing of SigLIP or Gemma.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/backend/backend.h"
#include "cuda/backend/cpu/grad.h"

static int f32_ok(const lt_tensor *t) {
    return t->dtype == LT_F32 && t->data != NULL;
}

lt_status cpu_layernorm(lt_ctx *ctx, lt_tensor y, lt_tensor x, lt_tensor w, lt_tensor b,
                        float eps) {
    const char *op = "layernorm";
    REQUIRE(f32_ok(&y) && f32_ok(&x) && f32_ok(&w) && f32_ok(&b), op, "x, y, w, b must be fp32");
    int64_t D = lt_tensor_numel(&w), n = lt_tensor_numel(&x);
    REQUIRE(D > 0 && lt_tensor_numel(&b) == D && n % D == 0 && lt_tensor_numel(&y) == n, op,
            "x, y must be [N, D] with w, b [D]");
    const float *xs = x.data, *ws = w.data, *bs = b.data;
    float *ys = y.data;
    for (int64_t r = 0; r < n / D; r++) {
        const float *xr = xs + r * D;
        float *yr = ys + r * D;
        /* two passes in double: the mean, then the biased variance around it */
        double mean = 0, var = 0;
        for (int64_t i = 0; i < D; i++)
            mean += xr[i];
        mean /= (double)D;
        for (int64_t i = 0; i < D; i++) {
            double d = xr[i] - mean;
            var += d * d;
        }
        var /= (double)D;
        float m = (float)mean, inv = (float)(1.0 / sqrt(var + (double)eps));
        for (int64_t i = 0; i < D; i++)
            yr[i] = (xr[i] - m) * inv * ws[i] + bs[i];
    }
    return LT_OK;
}

lt_status cpu_add_bias(lt_ctx *ctx, lt_tensor y, lt_tensor b) {
    const char *op = "add_bias";
    REQUIRE(f32_ok(&y) && f32_ok(&b), op, "y, b must be fp32");
    int64_t D = lt_tensor_numel(&b), n = lt_tensor_numel(&y);
    REQUIRE(D > 0 && n % D == 0, op, "y must be [N, D] with b [D]");
    float *ys = y.data;
    const float *bs = b.data;
    for (int64_t i = 0; i < n; i++)
        ys[i] += bs[i % D];
    return LT_OK;
}

lt_status cpu_gelu(lt_ctx *ctx, lt_tensor y, lt_tensor x) {
    const char *op = "gelu";
    REQUIRE(f32_ok(&y) && f32_ok(&x) && lt_tensor_numel(&y) == lt_tensor_numel(&x), op,
            "y, x must be fp32, one shape");
    const float k0 = 0.7978845608028654f; /* sqrt(2/pi), as geglu */
    const float *xs = x.data;
    float *ys = y.data;
    int64_t n = lt_tensor_numel(&x);
    for (int64_t i = 0; i < n; i++) {
        float u = xs[i];
        ys[i] = 0.5f * u * (1.0f + tanhf(k0 * (u + 0.044715f * u * u * u)));
    }
    return LT_OK;
}

lt_status cpu_avg_pool(lt_ctx *ctx, lt_tensor y, lt_tensor x, int k) {
    const char *op = "avg_pool";
    REQUIRE(f32_ok(&y) && f32_ok(&x) && x.ndim == 2 && y.ndim == 2, op,
            "x, y must be fp32 [rows, D]");
    int64_t D = x.shape[1], g = lt_pool_grid(x.shape[0], k);
    REQUIRE(g > 0, op, "x must be a square grid g*g of rows with g a multiple of k");
    int64_t o = g / k;
    REQUIRE(y.shape[0] == o * o && y.shape[1] == D, op, "y must be [(g/k)^2, D]");
    float *ys = y.data;
    const float *xs = x.data;
    float div = (float)(k * k);
    for (int64_t i = 0; i < o; i++)
        for (int64_t j = 0; j < o; j++) {
            float *yr = ys + (i * o + j) * D;
            memset(yr, 0, sizeof(float) * (size_t)D);
            for (int64_t r = i * k; r < (i + 1) * k; r++)
                for (int64_t c = j * k; c < (j + 1) * k; c++) {
                    const float *xr = xs + (r * g + c) * D;
                    for (int64_t d = 0; d < D; d++)
                        yr[d] += xr[d];
                }
            for (int64_t d = 0; d < D; d++)
                yr[d] /= div;
        }
    return LT_OK;
}

lt_status cpu_layernorm_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dw, lt_tensor db,
                                 lt_tensor dy, lt_tensor x, lt_tensor w, float eps) {
    const char *op = "layernorm_backward";
    REQUIRE(f32_ok(&dx) && f32_ok(&dy) && f32_ok(&x) && f32_ok(&w), op,
            "dx, dy, x, w must be fp32");
    int64_t D = lt_tensor_numel(&w), n = lt_tensor_numel(&x);
    REQUIRE(D > 0 && n % D == 0 && lt_tensor_numel(&dy) == n && lt_tensor_numel(&dx) == n, op,
            "x, dy, dx must be [N, D] with w [D]");
    REQUIRE((!dw.data || (dw.dtype == LT_F32 && lt_tensor_numel(&dw) == D)) &&
                (!db.data || (db.dtype == LT_F32 && lt_tensor_numel(&db) == D)),
            op, "dw, db must be fp32 [D]");
    const float *xs = x.data, *ws = w.data, *dys = dy.data;
    float *dxs = dx.data, *dws = dw.data, *dbs = db.data;
    for (int64_t r = 0; r < n / D; r++) {
        const float *xr = xs + r * D, *gr = dys + r * D;
        float *out = dxs + r * D;
        /* the forward's statistics, in double as the forward takes them */
        double mean = 0, var = 0;
        for (int64_t i = 0; i < D; i++)
            mean += xr[i];
        mean /= (double)D;
        for (int64_t i = 0; i < D; i++) {
            double d = xr[i] - mean;
            var += d * d;
        }
        var /= (double)D;
        double inv = 1.0 / sqrt(var + (double)eps);
        /* xhat = (x - mean)·inv, g = dy·w: dx = inv·(g - mean(g) - xhat·mean(g·xhat)) */
        double sg = 0, sgx = 0;
        for (int64_t i = 0; i < D; i++) {
            double xh = (xr[i] - mean) * inv, g = (double)gr[i] * ws[i];
            sg += g;
            sgx += g * xh;
            if (dws) dws[i] += (float)((double)gr[i] * xh);
            if (dbs) dbs[i] += gr[i];
        }
        sg /= (double)D;
        sgx /= (double)D;
        for (int64_t i = 0; i < D; i++) {
            double xh = (xr[i] - mean) * inv, g = (double)gr[i] * ws[i];
            out[i] = (float)(inv * (g - sg - xh * sgx));
        }
    }
    return LT_OK;
}

lt_status cpu_gelu_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, lt_tensor x) {
    const char *op = "gelu_backward";
    int64_t n = lt_tensor_numel(&x);
    REQUIRE(f32_ok(&dx) && f32_ok(&dy) && f32_ok(&x) && lt_tensor_numel(&dy) == n &&
                lt_tensor_numel(&dx) == n,
            op, "dx, dy, x must be fp32, one shape");
    const float k0 = 0.7978845608028654f, c = 0.044715f; /* as geglu_backward */
    const float *xs = x.data, *d = dy.data;
    float *o = dx.data;
    for (int64_t i = 0; i < n; i++) {
        float u = xs[i];
        float th = tanhf(k0 * (u + c * u * u * u));
        float dg =
            0.5f * (1.0f + th) + 0.5f * u * (1.0f - th * th) * k0 * (1.0f + 3.0f * c * u * u);
        o[i] = d[i] * dg;
    }
    return LT_OK;
}

lt_status cpu_avg_pool_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, int k) {
    const char *op = "avg_pool_backward";
    REQUIRE(f32_ok(&dx) && f32_ok(&dy) && dx.ndim == 2 && dy.ndim == 2, op,
            "dx, dy must be fp32 [rows, D]");
    int64_t D = dx.shape[1], g = lt_pool_grid(dx.shape[0], k);
    REQUIRE(g > 0, op, "dx must be a square grid g*g of rows with g a multiple of k");
    int64_t o = g / k;
    REQUIRE(dy.shape[0] == o * o && dy.shape[1] == D, op, "dy must be [(g/k)^2, D]");
    const float *ys = dy.data;
    float *xs = dx.data;
    float div = (float)(k * k);
    for (int64_t r = 0; r < g; r++)
        for (int64_t c = 0; c < g; c++) {
            const float *yr = ys + ((r / k) * o + c / k) * D;
            float *xr = xs + (r * g + c) * D;
            for (int64_t d = 0; d < D; d++)
                xr[d] = yr[d] / div;
        }
    return LT_OK;
}

const lt_tower_grad_ops lt_cpu_tower_grad = {
    .layernorm_backward = cpu_layernorm_backward,
    .gelu_backward = cpu_gelu_backward,
    .avg_pool_backward = cpu_avg_pool_backward,
};

const lt_tower_grad_ops *lt_backend_tower_grad(const lt_backend *be) {
    return be ? be->tower_grad : NULL;
}

const char *lt_backend_missing_tower_training_op(const lt_backend *be) {
    const lt_tower_grad_ops *g = lt_backend_tower_grad(be);
    if (!g || !g->layernorm_backward) return "layernorm_backward";
    if (!g->gelu_backward) return "gelu_backward";
    if (!g->avg_pool_backward) return "avg_pool_backward";
    if (!be->attention_backward) return "attention_backward";
    return NULL;
}

const char *lt_backend_missing_vision_op(const lt_backend *be) {
    if (!be->layernorm) return "layernorm";
    if (!be->add_bias) return "add_bias";
    if (!be->gelu) return "gelu";
    if (!be->avg_pool) return "avg_pool";
    if (!be->attention_span) return "attention_span";
    return NULL;
}
