/* backend_cpu_grad.c — the fp32 reference backward ops, the fused cross-entropy and AdamW.
 *
 * Each function is the derivative of one forward op of backend_cpu.c, written out by hand
 * (llm.c style) and checked against finite differences in tests/engine/backend/test_grad_ops.c.
 * They follow backend.h's conventions: input gradients are WRITTEN, weight and adapter gradients
 * ACCUMULATED, and a tensor whose data is NULL is not wanted. Matmuls go through CBLAS when
 * the build has it, else through plain loops; 16-bit frozen weights are widened to fp32.
 * This file owns nothing but its functions; backend_cpu.c owns the table that points here.
 * It must not know Gemma.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef HAVE_CBLAS
#include <cblas.h>
#endif

#include "cuda/backend/cpu/grad.h"

/* ---- helpers ---------------------------------------------------------------------------- */

static int f32_ok(const lt_tensor *t) {
    return t->dtype == LT_F32 && t->data != NULL;
}
static int wanted(const lt_tensor *t) {
    return t->data != NULL;
}
static int64_t last_dim(const lt_tensor *t) {
    return t->ndim ? t->shape[t->ndim - 1] : 1;
}

/* C[M,N] = alpha * op(A)·op(B) + beta * C, row-major fp32; op = transpose when ta/tb.
 * A is [M,K] (or [K,M] when ta), B is [K,N] (or [N,K] when tb). */
static void gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                 const float *B, float beta, float *C) {
    if (M <= 0 || N <= 0) return;
#ifdef HAVE_CBLAS
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (int)M, (int)N, (int)K, alpha, A, ta ? (int)M : (int)K, B, tb ? (int)K : (int)N,
                beta, C, (int)N);
#else
    for (int64_t i = 0; i < M; i++) {
        float *c = C + i * N;
        if (beta == 0.0f)
            memset(c, 0, sizeof(float) * (size_t)N);
        else if (beta != 1.0f)
            for (int64_t j = 0; j < N; j++)
                c[j] *= beta;
        for (int64_t k = 0; k < K; k++) {
            float a = alpha * (ta ? A[k * M + i] : A[i * K + k]);
            if (a == 0.0f) continue;
            if (!tb) {
                const float *b = B + k * N;
                for (int64_t j = 0; j < N; j++)
                    c[j] += a * b[j];
            } else {
                for (int64_t j = 0; j < N; j++)
                    c[j] += a * B[j * K + k];
            }
        }
    }
#endif
}

/* The weight as fp32: the data itself when it is F32, else a malloc'd widened copy
 * (*owned set). NULL on out-of-memory. */
/* ---- linear ------------------------------------------------------------------------------
 * Forward: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ.  With u = x·Aᵀ [T, r] and g = dy·B [T, r]:
 *   dx  = dy·W + s·g·A          grad_W += dyᵀ·x
 *   grad_B += s·dyᵀ·u           grad_A += s·gᵀ·x                                        */

lt_status cpu_linear_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, lt_tensor x,
                              const lt_weight *w) {
    const char *op = "linear_backward";
    REQUIRE(w && w->w.ndim == 2 && w->w.data, op, "weight must be a 2-D tensor");
    int64_t out = w->w.shape[0], in = w->w.shape[1];
    REQUIRE(x.data && dy.data &&
                (x.dtype == LT_F32 || (x.dtype == LT_BF16 && w->w.dtype == LT_BF16)) &&
                (dy.dtype == LT_F32 || (dy.dtype == LT_BF16 && w->w.dtype == LT_BF16)),
            op, "dy and x must be fp32 (or bf16 with a bf16 weight)");
    int64_t T = lt_tensor_numel(&x) / (in ? in : 1);
    REQUIRE(last_dim(&x) == in && last_dim(&dy) == out && lt_tensor_numel(&dy) == T * out, op,
            "shapes do not agree: dy [T, out], x [T, in], W [out, in]");
    if (wanted(&dx))
        REQUIRE(dx.dtype == LT_F32 && lt_tensor_numel(&dx) == T * in, op,
                "dx must be fp32 [T, in]");
    int quant = w->q.kind != LT_QUANT_NONE;
    REQUIRE(!quant || !w->grad_w.data, op,
            "an NF4 / int8 weight is frozen: it has no grad_w (train LoRA adapters on it, or load "
            "the model without quant= for full fine-tuning)");
    if (w->grad_w.data)
        REQUIRE(w->grad_w.dtype == LT_F32 && lt_tensor_numel(&w->grad_w) == out * in, op,
                "grad_w must be fp32 [out, in]");
    const lt_lora *lo = w->lora;
    int use_lora = lo && lo->enabled && lo->a.data;
    int64_t r = use_lora ? lo->a.shape[0] : 0;
    if (use_lora)
        REQUIRE(lo->a.shape[1] == in && lo->b.shape[0] == out && lo->b.shape[1] == r, op,
                "adapter shapes do not agree");
    float *xown, *dyown, *wbuf = NULL, *u = NULL, *g = NULL;
    const float *xd = cpu_as_f32(&x, &xown), *dyd = cpu_as_f32(&dy, &dyown), *wf = NULL;
    lt_status rc = LT_OK;
    if (!xd || !dyd) {
        rc = lt_fail(ctx ? ctx->err : NULL, LT_ERR_MEMORY, "cpu %s: out of memory", op);
        goto out;
    }
    if (wanted(&dx) && quant) {
        /* dx = Σ over bands of rows: dy[:, band] · W[band, :], W dequantized band by band */
        int64_t band = cpu_band_rows(w);
        wbuf = malloc(sizeof(float) * (size_t)(band * in));
        float *dyb = malloc(sizeof(float) * (size_t)(T * band));
        if (!wbuf || !dyb) {
            free(dyb);
            rc = lt_fail(ctx ? ctx->err : NULL, LT_ERR_MEMORY, "cpu %s: out of memory", op);
            goto out;
        }
        for (int64_t r0 = 0; r0 < out; r0 += band) {
            int64_t nr = r0 + band <= out ? band : out - r0;
            cpu_dequantize_band(ctx, w, r0, nr, wbuf);
            for (int64_t t = 0; t < T; t++) /* dyb: [T, nr] */
                memcpy(dyb + t * nr, dyd + t * out + r0, sizeof(float) * (size_t)nr);
            gemm(0, 0, T, in, nr, 1.0f, dyb, wbuf, r0 ? 1.0f : 0.0f, dx.data);
        }
        free(dyb);
    } else if (wanted(&dx)) {
        if (!(wf = cpu_as_f32(&w->w, &wbuf))) {
            rc = lt_fail(ctx ? ctx->err : NULL, LT_ERR_MEMORY, "cpu %s: out of memory", op);
            goto out;
        }
        gemm(0, 0, T, in, out, 1.0f, dyd, wf, 0.0f, dx.data); /* dx: [T, in] = dy·W */
    }
    if (w->grad_w.data) gemm(1, 0, out, in, T, 1.0f, dyd, xd, 1.0f, w->grad_w.data); /* += dyᵀ·x */
    if (!use_lora) goto out;
    u = malloc(sizeof(float) * (size_t)(T * r + 1));
    g = malloc(sizeof(float) * (size_t)(T * r + 1));
    if (!u || !g) {
        rc = lt_fail(ctx ? ctx->err : NULL, LT_ERR_MEMORY, "cpu %s: out of memory", op);
        goto out;
    }
    const float *A = lo->a.data, *B = lo->b.data;
    gemm(0, 1, T, r, in, 1.0f, xd, A, 0.0f, u);   /* u: [T, r] = x·Aᵀ */
    gemm(0, 0, T, r, out, 1.0f, dyd, B, 0.0f, g); /* g: [T, r] = dy·B */
    if (lo->grad_b.data) gemm(1, 0, out, r, T, lo->scale, dyd, u, 1.0f, lo->grad_b.data);
    if (lo->grad_a.data) gemm(1, 0, r, in, T, lo->scale, g, xd, 1.0f, lo->grad_a.data);
    if (wanted(&dx)) gemm(0, 0, T, in, r, lo->scale, g, A, 1.0f, dx.data); /* dx += s·g·A */
out:
    free(u);
    free(g);
    free(wbuf);
    free(xown);
    free(dyown);
    return rc;
}

/* ---- rmsnorm -----------------------------------------------------------------------------
 * y_i = x_i·ρ·(1 + w_i), ρ = (mean(x²) + eps)^-1/2. With c = Σ_j dy_j (1 + w_j) x_j:
 *   dx_i = ρ (1 + w_i) dy_i − x_i ρ³ c / D        dw_i += Σ_rows dy_i x_i ρ              */

lt_status cpu_rmsnorm_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dw, lt_tensor dy, lt_tensor x,
                               lt_tensor w, float eps) {
    const char *op = "rmsnorm_backward";
    REQUIRE(f32_ok(&dy) && f32_ok(&x) && f32_ok(&w), op, "dy, x and w must be fp32");
    int64_t D = lt_tensor_numel(&w), N = lt_tensor_numel(&x) / (D ? D : 1);
    REQUIRE(D > 0 && lt_tensor_numel(&x) == N * D && lt_tensor_numel(&dy) == N * D, op,
            "x and dy must be [N, numel(w)]");
    if (wanted(&dx))
        REQUIRE(dx.dtype == LT_F32 && lt_tensor_numel(&dx) == N * D, op, "dx must be [N, D]");
    if (wanted(&dw))
        REQUIRE(dw.dtype == LT_F32 && lt_tensor_numel(&dw) == D, op, "dw must be fp32 [D]");
    const float *xs = x.data, *ws = w.data, *dys = dy.data;
    float *dxs = dx.data, *dws = dw.data;
    for (int64_t n = 0; n < N; n++) {
        const float *xr = xs + n * D, *dyr = dys + n * D;
        double ss = 0, c = 0;
        for (int64_t i = 0; i < D; i++) {
            ss += (double)xr[i] * xr[i];
            c += (double)dyr[i] * (1.0 + ws[i]) * xr[i];
        }
        double rho = 1.0 / sqrt((double)(float)(ss / (double)D) + eps);
        if (dws)
            for (int64_t i = 0; i < D; i++)
                dws[i] += (float)((double)dyr[i] * xr[i] * rho);
        if (dxs) {
            double k = rho * rho * rho * c / (double)D;
            float *dxr = dxs + n * D; /* may alias dy: each element reads its own dy first */
            for (int64_t i = 0; i < D; i++)
                dxr[i] = (float)(rho * (1.0 + ws[i]) * dyr[i] - xr[i] * k);
        }
    }
    return LT_OK;
}

/* ---- rope --------------------------------------------------------------------------------
 * The forward is a rotation by angle θ of each pair (x_j, x_{j+hd/2}); its transpose is the
 * rotation by −θ. Angles are computed exactly as backend_cpu.c's forward computes them. */

lt_status cpu_rope_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor pos, float theta, float factor) {
    return cpu_rotate(ctx, "rope_backward", dx, pos, theta, factor, -1.0f);
}

/* ---- attention ---------------------------------------------------------------------------
 * Per query t and head h (KV head kh): P = softmax(scale·q·kᵀ) over visible keys,
 * out = P·v. Then dv_s += P_s·dout, dP_s = dout·v_s, dS_s = P_s (dP_s − Σ P·dP),
 * dq = scale Σ dS_s k_s, dk_s += scale dS_s q. Each KV head is one independent task, so the
 * dk/dv accumulation never races. */

/* Both backward ops: span NULL (attention_backward) or [T, 2] extra visible key positions per
 * query (attention_span_backward: backend.h's attention_span rule). */
static lt_status attn_backward(lt_ctx *ctx, const char *op, lt_tensor dq, lt_tensor dk,
                               lt_tensor dv, lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                               lt_tensor qpos, lt_tensor kpos, const int32_t *span, int window,
                               float scale) {
    cpu_attn_dims dims;
    lt_status rc = cpu_attention_dims(ctx, op, q, k, v, qpos, kpos, &dims);
    if (rc != LT_OK) return rc;
    int64_t T = dims.T, nh = dims.nh, hd = dims.hd, S = dims.S, nkv = dims.nkv;
    REQUIRE(f32_ok(&dout) && lt_tensor_numel(&dout) == T * nh * hd, op,
            "dout must be fp32 [T, nh*hd]");
    REQUIRE(f32_ok(&dq) && lt_tensor_numel(&dq) == T * nh * hd, op, "dq must be fp32 [T, nh, hd]");
    REQUIRE(f32_ok(&dk) && lt_tensor_numel(&dk) == S * nkv * hd, op,
            "dk must be fp32 [S, nkv, hd]");
    REQUIRE(f32_ok(&dv) && lt_tensor_numel(&dv) == S * nkv * hd, op,
            "dv must be fp32 [S, nkv, hd]");
    const float *Q = q.data, *K = k.data, *V = v.data, *dO = dout.data;
    const int32_t *qp = qpos.data, *kp = kpos.data;
    float *dQ = dq.data, *dK = dk.data, *dV = dv.data;
    memset(dQ, 0, sizeof(float) * (size_t)(T * nh * hd));
    memset(dK, 0, sizeof(float) * (size_t)(S * nkv * hd));
    memset(dV, 0, sizeof(float) * (size_t)(S * nkv * hd));
    float *P = malloc(sizeof(float) * (size_t)(2 * S + 1));
    if (!P) return lt_fail(ctx ? ctx->err : NULL, LT_ERR_MEMORY, "cpu %s: out of memory", op);
    float *dP = P + S;
    int64_t group = nh / nkv;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < nh; h++) {
            int64_t kh = h / group;
            const float *qv = Q + (t * nh + h) * hd, *dov = dO + (t * nh + h) * hd;
            float mx = -INFINITY;
            for (int64_t s = 0; s < S; s++) {
                int in_span =
                    span && kp[s] >= 0 && kp[s] >= span[2 * t] && kp[s] <= span[2 * t + 1];
                if (kp[s] < 0 || (kp[s] > qp[t] && !in_span) ||
                    (window > 0 && qp[t] - kp[s] >= window)) {
                    P[s] = -INFINITY;
                    continue;
                }
                const float *kv = K + (s * nkv + kh) * hd;
                float d = 0;
                for (int64_t i = 0; i < hd; i++)
                    d += qv[i] * kv[i];
                P[s] = d * scale;
                if (P[s] > mx) mx = P[s];
            }
            if (mx == -INFINITY) continue; /* no visible key: the output was 0, so is the grad */
            double sum = 0;
            for (int64_t s = 0; s < S; s++) {
                P[s] = P[s] == -INFINITY ? 0.0f : expf(P[s] - mx);
                sum += P[s];
            }
            double dot = 0;
            for (int64_t s = 0; s < S; s++) {
                P[s] = (float)(P[s] / sum);
                dP[s] = 0;
                if (P[s] == 0.0f) continue;
                const float *vv = V + (s * nkv + kh) * hd;
                float acc = 0;
                for (int64_t i = 0; i < hd; i++)
                    acc += dov[i] * vv[i];
                dP[s] = acc;
                dot += (double)P[s] * acc;
            }
            float *dqv = dQ + (t * nh + h) * hd;
            for (int64_t s = 0; s < S; s++) {
                if (P[s] == 0.0f) continue;
                float ds = P[s] * (dP[s] - (float)dot) * scale;
                const float *kv = K + (s * nkv + kh) * hd;
                float *dkv = dK + (s * nkv + kh) * hd, *dvv = dV + (s * nkv + kh) * hd;
                for (int64_t i = 0; i < hd; i++) {
                    dqv[i] += ds * kv[i];
                    dkv[i] += ds * qv[i];
                    dvv[i] += P[s] * dov[i];
                }
            }
        }
    }
    free(P);
    return LT_OK;
}

lt_status cpu_attention_backward(lt_ctx *ctx, lt_tensor dq, lt_tensor dk, lt_tensor dv,
                                 lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                                 lt_tensor qpos, lt_tensor kpos, int window, float scale) {
    return attn_backward(ctx, "attention_backward", dq, dk, dv, dout, q, k, v, qpos, kpos, NULL,
                         window, scale);
}

lt_status cpu_attention_span_backward(lt_ctx *ctx, lt_tensor dq, lt_tensor dk, lt_tensor dv,
                                      lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                                      lt_tensor qpos, lt_tensor kpos, lt_tensor span, int window,
                                      float scale) {
    const char *op = "attention_span_backward";
    REQUIRE(span.dtype == LT_I32 && span.data && lt_tensor_numel(&span) == 2 * q.shape[0], op,
            "span must be I32 [T, 2]");
    return attn_backward(ctx, op, dq, dk, dv, dout, q, k, v, qpos, kpos, span.data, window, scale);
}

/* ---- geglu -------------------------------------------------------------------------------
 * y = gelu(g)·u, gelu(g) = ½g(1 + tanh κ(g + c g³)), κ = √(2/π), c = 0.044715.
 * gelu'(g) = ½(1 + t) + ½ g (1 − t²) κ (1 + 3c g²). */

lt_status cpu_geglu_backward(lt_ctx *ctx, lt_tensor dgate, lt_tensor dup, lt_tensor dy,
                             lt_tensor gate, lt_tensor up) {
    const char *op = "geglu_backward";
    REQUIRE(f32_ok(&dy) && f32_ok(&gate) && f32_ok(&up), op, "dy, gate, up must be fp32");
    int64_t n = lt_tensor_numel(&gate);
    REQUIRE(lt_tensor_numel(&up) == n && lt_tensor_numel(&dy) == n, op, "dy, gate, up: one shape");
    /* fp32, or bf16 for gradients that only feed matmuls (backend.h) */
    if (wanted(&dgate))
        REQUIRE((dgate.dtype == LT_F32 || dgate.dtype == LT_BF16) && lt_tensor_numel(&dgate) == n,
                op, "dgate must be fp32 or bf16, gate's shape");
    if (wanted(&dup))
        REQUIRE((dup.dtype == LT_F32 || dup.dtype == LT_BF16) && lt_tensor_numel(&dup) == n, op,
                "dup must be fp32 or bf16, up's shape");
    const float k0 = 0.7978845608028654f, c = 0.044715f;
    const float *g = gate.data, *u = up.data, *d = dy.data;
    for (int64_t i = 0; i < n; i++) {
        float x = g[i], di = d[i];
        float th = tanhf(k0 * (x + c * x * x * x));
        float gl = 0.5f * x * (1.0f + th);
        float dgl =
            0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * k0 * (1.0f + 3.0f * c * x * x);
        float ui = u[i];
        if (wanted(&dup)) cpu_store(&dup, i, di * gl);
        if (wanted(&dgate)) cpu_store(&dgate, i, di * ui * dgl);
    }
    return LT_OK;
}

/* ---- embedding ---------------------------------------------------------------------------- */

lt_status cpu_embedding_backward(lt_ctx *ctx, const lt_weight *table, lt_tensor dh, lt_tensor ids,
                                 float scale) {
    const char *op = "embedding_backward";
    REQUIRE(table && table->w.ndim == 2, op, "table must be a 2-D tensor");
    if (!table->grad_w.data) return LT_OK; /* the embedding is frozen */
    int64_t V = table->w.shape[0], H = table->w.shape[1], T = lt_tensor_numel(&ids);
    REQUIRE(f32_ok(&dh) && ids.dtype == LT_I32 && ids.data && lt_tensor_numel(&dh) == T * H, op,
            "dh must be fp32 [T, H] and ids I32 [T]");
    REQUIRE(table->grad_w.dtype == LT_F32 && lt_tensor_numel(&table->grad_w) == V * H, op,
            "grad_w must be fp32 [V, H]");
    const int32_t *id = ids.data;
    const float *d = dh.data;
    float *gw = table->grad_w.data;
    for (int64_t t = 0; t < T; t++) {
        if (id[t] < 0 || id[t] >= V)
            return lt_fail(ctx ? ctx->err : NULL, LT_ERR_ARG,
                           "cpu %s: token id outside the vocabulary", op);
        float *row = gw + (int64_t)id[t] * H;
        for (int64_t i = 0; i < H; i++)
            row[i] += scale * d[t * H + i];
    }
    return LT_OK;
}

/* ---- fused cross-entropy -----------------------------------------------------------------
 * Rows are processed in chunks so that only [chunk, V] logits exist at a time. For a row with
 * target y, logits z = s·h·Eᵀ (s = logit_scale) and weight w: CE = logsumexp(z) − z_y,
 * dz = softmax(z) − onehot(y), and with g = grad_scale·w·s: dh = g·dz·E, grad_E += g·dzᵀ·h.
 * A call without dh is a loss-only call: it accumulates no head gradient either. */

lt_status cpu_cross_entropy(lt_ctx *ctx, double *loss_sum, lt_tensor dh, lt_tensor h,
                            const lt_weight *head, lt_tensor targets, lt_tensor row_weight,
                            lt_tensor row_logp, float logit_scale, float grad_scale) {
    const char *op = "cross_entropy";
    REQUIRE(head && head->w.ndim == 2 && head->w.data, op, "head must be a 2-D tensor");
    int64_t V = head->w.shape[0], H = head->w.shape[1];
    REQUIRE(f32_ok(&h) && last_dim(&h) == H, op, "h must be fp32 [T, H]");
    int64_t T = lt_tensor_numel(&h) / H;
    REQUIRE(targets.dtype == LT_I32 && targets.data && lt_tensor_numel(&targets) == T, op,
            "targets must be I32 [T]");
    if (wanted(&dh))
        REQUIRE(dh.dtype == LT_F32 && lt_tensor_numel(&dh) == T * H, op, "dh must be [T, H]");
    if (wanted(&row_weight))
        REQUIRE(row_weight.dtype == LT_F32 && lt_tensor_numel(&row_weight) == T, op,
                "row_weight must be fp32 [T]");
    if (wanted(&row_logp))
        REQUIRE(row_logp.dtype == LT_F32 && lt_tensor_numel(&row_logp) == T, op,
                "row_logp must be fp32 [T]");
    REQUIRE(isfinite(logit_scale) && logit_scale > 0.0f, op,
            "logit_scale must be finite and positive");
    int want_gw =
        head->grad_w.data != NULL && wanted(&dh); /* a loss-only call leaves grads alone */
    if (want_gw)
        REQUIRE(head->grad_w.dtype == LT_F32 && lt_tensor_numel(&head->grad_w) == V * H, op,
                "head grad_w must be fp32 [V, H]");
    const int32_t *tg = targets.data;
    for (int64_t t = 0; t < T; t++)
        if (tg[t] != -100 && (tg[t] < 0 || tg[t] >= V)) {
            return lt_fail(ctx->err, LT_ERR_ARG,
                           "cpu cross_entropy: target %d at row %lld is outside "
                           "[0, %lld) and is not -100",
                           tg[t], (long long)t, (long long)V);
        }
    const float *rw = row_weight.data;
    float *lp = row_logp.data;
    int64_t chunk = (int64_t)(8u << 20) / V;
    if (chunk < 1) chunk = 1;
    if (chunk > T) chunk = T;
    float *z = malloc(sizeof(float) * (size_t)(chunk * V + 1));
    if (!z) return lt_fail(ctx ? ctx->err : NULL, LT_ERR_MEMORY, "cpu %s: out of memory", op);
    float *wbuf = NULL;
    const float *wf = NULL;
    if (wanted(&dh) || want_gw) {
        wf = cpu_as_f32(&head->w, &wbuf);
        if (!wf) {
            free(z);
            return lt_fail(ctx ? ctx->err : NULL, LT_ERR_MEMORY, "cpu %s: out of memory", op);
        }
    }
    const float *hs = h.data;
    double total = 0;
    lt_status rc = LT_OK;
    for (int64_t t0 = 0; t0 < T && rc == LT_OK; t0 += chunk) {
        int64_t c = t0 + chunk <= T ? chunk : T - t0;
        /* z: [c, V] = s·h[t0:t0+c]·Eᵀ */
        rc = lt_cpu_matmul(ctx, z, hs + t0 * H, head->w.data, head->w.dtype, c, H, V, 1);
        if (rc != LT_OK) break;
        int any = 0;
        for (int64_t i = 0; i < c; i++) {
            float *zr = z + i * V;
            int32_t y = tg[t0 + i];
            if (y == -100) {
                memset(zr, 0, sizeof(float) * (size_t)V);
                if (lp) lp[t0 + i] = 0.0f;
                continue;
            }
            any = 1;
            if (logit_scale != 1.0f)
                for (int64_t j = 0; j < V; j++)
                    zr[j] *= logit_scale;
            float mx = -INFINITY;
            for (int64_t j = 0; j < V; j++)
                mx = zr[j] > mx ? zr[j] : mx;
            double se = 0;
            for (int64_t j = 0; j < V; j++)
                se += exp((double)(zr[j] - mx));
            double lse = (double)mx + log(se);
            double ce = lse - (double)zr[y];
            double w = rw ? (double)rw[t0 + i] : 1.0;
            total += w * ce;
            if (lp) lp[t0 + i] = (float)-ce;
            float g = (float)(w * (double)grad_scale * (double)logit_scale);
            for (int64_t j = 0; j < V; j++)
                zr[j] = (float)exp((double)zr[j] - lse) * g;
            zr[y] -= g;
        }
        /* z now holds grad_scale·w·s·dz (zero rows for ignored targets) */
        if (wanted(&dh)) {
            float *dhs = (float *)dh.data + t0 * H;
            if (any)
                gemm(0, 0, c, H, V, 1.0f, z, wf, 0.0f, dhs); /* dh: [c, H] = dz·E */
            else
                memset(dhs, 0, sizeof(float) * (size_t)(c * H));
        }
        if (want_gw && any) gemm(1, 0, V, H, c, 1.0f, z, hs + t0 * H, 1.0f, head->grad_w.data);
    }
    free(z);
    free(wbuf);
    if (rc == LT_OK && loss_sum) *loss_sum = total;
    return rc;
}

/* ---- AdamW (torch.optim.AdamW, decoupled weight decay) ------------------------------------
 *   p -= lr·wd·p;  m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²;
 *   p -= (lr / (1−β1^t)) · m / (sqrt(v) / sqrt(1−β2^t) + eps)                               */

lt_status cpu_adamw(lt_ctx *ctx, lt_tensor param, lt_tensor grad, lt_tensor m, lt_tensor v,
                    float lr, float beta1, float beta2, float eps, float weight_decay, int step) {
    const char *op = "adamw";
    REQUIRE(f32_ok(&param) && f32_ok(&grad) && f32_ok(&m) && f32_ok(&v), op,
            "param, grad, m, v must be fp32");
    int64_t n = lt_tensor_numel(&param);
    REQUIRE(lt_tensor_numel(&grad) == n && lt_tensor_numel(&m) == n && lt_tensor_numel(&v) == n, op,
            "param, grad, m, v must have one shape");
    REQUIRE(step >= 1, op, "step counts from 1");
    float *p = param.data, *mm = m.data, *vv = v.data;
    const float *g = grad.data;
    double bc1 = 1.0 - pow((double)beta1, step), bc2 = 1.0 - pow((double)beta2, step);
    float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2);
    float decay = 1.0f - lr * weight_decay;
    for (int64_t i = 0; i < n; i++) {
        if (weight_decay != 0.0f) p[i] *= decay;
        mm[i] = beta1 * mm[i] + (1.0f - beta1) * g[i];
        vv[i] = beta2 * vv[i] + (1.0f - beta2) * g[i] * g[i];
        float denom = sqrtf(vv[i]) / bc2_sqrt + eps;
        p[i] -= step_size * mm[i] / denom;
    }
    return LT_OK;
}

/* ---- the extra ops ------------------------------------------------------------------------ */

lt_status cpu_fill(lt_ctx *ctx, lt_tensor t, float value) {
    REQUIRE(f32_ok(&t), "fill", "t must be fp32");
    float *p = t.data;
    int64_t n = lt_tensor_numel(&t);
    if (value == 0.0f)
        memset(p, 0, sizeof(float) * (size_t)n);
    else
        for (int64_t i = 0; i < n; i++)
            p[i] = value;
    return LT_OK;
}

lt_status cpu_scale(lt_ctx *ctx, lt_tensor t, float s) {
    REQUIRE(f32_ok(&t), "scale", "t must be fp32");
    float *p = t.data;
    int64_t n = lt_tensor_numel(&t);
    for (int64_t i = 0; i < n; i++)
        p[i] *= s;
    return LT_OK;
}

lt_status cpu_sumsq(lt_ctx *ctx, double *out, lt_tensor t) {
    REQUIRE(f32_ok(&t), "sumsq", "t must be fp32");
    const float *p = t.data;
    int64_t n = lt_tensor_numel(&t);
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += (double)p[i] * p[i];
    *out = s;
    return LT_OK;
}

lt_status cpu_dropout(lt_ctx *ctx, lt_tensor y, lt_tensor x, float p, float mul, uint64_t seed) {
    REQUIRE(f32_ok(&y) && f32_ok(&x) && lt_tensor_numel(&y) == lt_tensor_numel(&x), "dropout",
            "y, x must be fp32 of one shape");
    REQUIRE(p >= 0.0f && p < 1.0f, "dropout", "p must be in [0, 1)");
    const float *xs = x.data;
    float *ys = y.data;
    float keep = mul / (1.0f - p);
    int64_t n = lt_tensor_numel(&x);
    for (int64_t i = 0; i < n; i++)
        ys[i] = lt_dropout_keep(seed, (uint64_t)i, p) ? xs[i] * keep : 0.0f;
    return LT_OK;
}

const char *lt_backend_missing_training_op(const lt_backend *be) {
    const struct {
        const char *name;
        int present;
    } ops[] = {
        {"linear_backward", be->linear_backward != NULL},
        {"rmsnorm_backward", be->rmsnorm_backward != NULL},
        {"rope_backward", be->rope_backward != NULL},
        {"attention_backward", be->attention_backward != NULL},
        {"geglu_backward", be->geglu_backward != NULL},
        {"cross_entropy", be->cross_entropy != NULL},
        {"adamw", be->adamw != NULL},
        {"fill", be->fill != NULL},
        {"scale", be->scale != NULL},
        {"sumsq", be->sumsq != NULL},
        {"dropout", be->dropout != NULL},
        {"host_alloc", be->host_alloc != NULL && be->host_release != NULL},
        {"stash_out", be->stash_out != NULL && be->stash_in != NULL && be->stash_wait != NULL},
        {"lend", be->lend != NULL},
    };
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        if (!ops[i].present) return ops[i].name;
    return NULL;
}
