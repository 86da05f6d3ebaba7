/* kernels.h — launchers of lathe's own CUDA kernels (cuda/kernels/ *.cu files). Engine-private,
 * C++.
 *
 * Every launcher enqueues on the given stream and returns at once; errors of the launch are
 * read by the caller (backend_cuda.cu) through cudaGetLastError in its one checking macro.
 * Activations are fp32; "16-bit" buffers are __half or __nv_bfloat16 chosen by an lt_dtype.
 * A `scale` pointer is DEVICE memory holding one float (the power of two chosen by
 * k_scale_from_absmax), so no launch ever waits for the host. This file owns only launch
 * signatures; the op semantics live in backend.h and backend_cpu.c.
 */
#ifndef LATHE_KERNELS_H
#define LATHE_KERNELS_H

#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "cuda/base/tensor.h"
}

/* ---- elementwise.cu ------------------------------------------------------------------------ */

/* *amax_bits = max |x| over n (as the bit pattern of a non-negative float; caller zeroes it). */
void k_absmax(cudaStream_t st, const float *x, int64_t n, unsigned *amax_bits);
/* From *amax_bits: scale = 2^k with amax*scale <= 2^15 (1 when amax is 0 or not finite),
 * inv = 1/scale. Either output may be NULL. */
void k_scale_from_absmax(cudaStream_t st, const unsigned *amax_bits, float *scale, float *inv);
/* dst[r, c] (dst dtype dt, row stride ldd) = src[r, c] * (*scale or 1) for r < rows, c < cols,
 * src row stride lds. fp16 results are clamped to ±65504 (the last guard; with a scale from
 * k_scale_from_absmax nothing reaches it). dt may be F32 (a strided copy). */
void k_cast_rows(cudaStream_t st, void *dst, lt_dtype dt, int64_t ldd, const float *src,
                 int64_t lds, int64_t rows, int64_t cols, const float *scale);
/* Any float dtype -> any float dtype, n elements (fp16 results clamped). */
void k_convert(cudaStream_t st, void *dst, lt_dtype dt, const void *src, lt_dtype sdt, int64_t n);
/* out = c * (a ? *a : 1) * (b ? *b : 1): a device scalar for cuBLAS alpha. */
void k_make_alpha(cudaStream_t st, float *out, float c, const float *a, const float *b);
/* y += x */
void k_add(cudaStream_t st, float *y, const float *x, int64_t n);
/* Whether the float4 kernel forms may take n elements (or rows of n): n a multiple of 4 and every
 * pointer (NULL counts as aligned) on a 16-byte boundary. */
static inline bool k_vec4_ok(int64_t n, const void *a, const void *b, const void *c,
                             const void *d) {
    uintptr_t m = (uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d;
    return n % 4 == 0 && (m & 15) == 0;
}
/* y = gelu_tanh(g) * u */
/* y: fp32, or BF16 (the matmul-only activation, rounded to nearest even). */
void k_geglu(cudaStream_t st, void *y, lt_dtype ydt, const float *g, const float *u, int64_t n);
/* dg = dy * u * gelu'(g), du = dy * gelu(g) (either may be NULL), of dtype odt: fp32, or BF16
 * for gradients that only feed matmuls (then not aliasing g or u). */
void k_geglu_backward(cudaStream_t st, void *dg, void *du, lt_dtype odt, const float *dy,
                      const float *g, const float *u, int64_t n);
/* h[t, :] = table[ids[t], :] * scale; ids out of range set *bad (and write zeros). */
void k_embedding(cudaStream_t st, float *h, const int32_t *ids, int64_t T, const void *table,
                 lt_dtype dt, int64_t V, int64_t H, float scale, int *bad);
/* grad[ids[t], :] += dh[t, :] * scale (atomics). */
void k_embedding_backward(cudaStream_t st, float *grad, const float *dh, const int32_t *ids,
                          int64_t T, int64_t V, int64_t H, float scale);
/* PyTorch AdamW (decoupled decay): step_size = lr / (1 - beta1^step), bc2_sqrt =
 * sqrt(1 - beta2^step), both computed in double on the host as backend_cpu_grad.c does. */
void k_adamw(cudaStream_t st, float *p, const float *g, float *m, float *v, int64_t n, float lr,
             float b1, float b2, float eps, float wd, float step_size, float bc2_sqrt);
/* x[:] = v */
void k_fill(cudaStream_t st, float *x, int64_t n, float v);
/* *out += Σ x² (double; caller zeroes it) */
void k_sumsq(cudaStream_t st, const float *x, int64_t n, double *out);
/* y = keep(seed, i, p) ? x * keep_mul : 0 (grad.h's mask) */
void k_dropout(cudaStream_t st, float *y, const float *x, int64_t n, float p, float keep_mul,
               uint64_t seed);
/* x *= s */
void k_scale(cudaStream_t st, float *x, int64_t n, float s);

/* ---- norm_rope.cu ---------------------------------------------------------------------------- */

/* y = x * rsqrt(mean(x^2) + eps) * (1 + w) per row; x, y: [N, D] (may alias). */
/* y: fp32, or BF16 (the matmul-only activation, rounded to nearest even). */
void k_rmsnorm(cudaStream_t st, void *y, lt_dtype ydt, const float *x, const float *w, int64_t N,
               int64_t D, float eps);
/* x = rmsnorm(x, w); h += x; then, a non-NULL, a = rmsnorm(h, w2): rows of D fp32, in one
 * launch with k_rmsnorm's and k_add's values. Returns 0 (and launches nothing) where the float4
 * form cannot take the rows (D % 4, alignment). */
int k_rmsnorm_add(cudaStream_t st, float *h, float *x, const float *w, float *a, const float *w2,
                  int64_t N, int64_t D, float eps);
/* dx written (may be NULL), dw accumulated (may be NULL). */
void k_rmsnorm_backward(cudaStream_t st, float *dx, float *dw, const float *dy, const float *x,
                        const float *w, int64_t N, int64_t D, float eps, int n_sm);
/* In place; x: [T, heads, hd]; inv_freq: [hd/2] device; dir +1 forward, -1 inverse. */
void k_rope(cudaStream_t st, float *x, const int32_t *pos, const float *inv_freq, int64_t T,
            int64_t heads, int64_t hd, int dir);
/* q [T, nh, hd] and k [T, nkv, hd] in place: each head row normed (k_rmsnorm with qw / kw)
 * then rotated (k_rope, dir +1), in one launch with those kernels' values. Returns 0 (and
 * launches nothing) for rows k_rmsnorm would not take one float4 a thread of, or hd > 1024. */
int k_qk_norm_rope(cudaStream_t st, float *q, float *k, const float *qw, const float *kw,
                   const int32_t *pos, const float *inv_freq, int64_t T, int64_t nh, int64_t nkv,
                   int64_t hd, float eps);

/* ---- attention.cu ---------------------------------------------------------------------------- */

/* dst [heads, Tq, hd] (dtype dt) <- src rows t0..t0+Tq of [Tsrc, heads, hd] fp32, times *scale. */
void k_pack_heads(cudaStream_t st, void *dst, lt_dtype dt, const float *src, int64_t t0, int64_t Tq,
                  int64_t heads, int64_t hd, const float *scale);
/* dst rows t0..t0+Tq of [*, heads, hd] fp32 <- src [heads, Tq, hd] fp32 (written, not added). */
void k_unpack_heads(cudaStream_t st, float *dst, const float *src, int64_t t0, int64_t Tq,
                    int64_t heads, int64_t hd);
/* Masked softmax of scores [heads, Tq, S] (already scaled) rows; query row (h, i) has position
 * qpos[t0 + i]. span: NULL (the plain causal / sliding-window mask) or attention_span's [T, 2]
 * I32 table on the device, indexed like qpos (row t0 + i), whose [lo, hi] key positions are
 * visible to that query even past its own position (lo > hi: none). Writes P in dtype dt to p
 * (may be NULL) and fp32 P in place into scores when keep_f32. A row with no visible key
 * becomes zeros. */
void k_softmax_masked(cudaStream_t st, float *scores, void *p, lt_dtype dt, int keep_f32,
                      const int32_t *qpos, const int32_t *kpos, const int32_t *span, int64_t t0,
                      int64_t Tq, int64_t heads, int64_t S, int window);
/* dS = P * (dP - sum(P * dP)) per row, in place into dp (fp32); rows [rows, S]. */
void k_softmax_backward(cudaStream_t st, float *dp, const float *p, int64_t rows, int64_t S);

/* Fused (flash-style) attention on the 16-bit paths, backend.h's attention contract. Inputs are
 * packed 16-bit (dt = LT_BF16 or LT_F16): Qp, dOp [nh, T, hd], Kp, Vp [nkv, S, hd], each times a
 * power-of-two scale whose inverse is the matching *inv device scalar (NULL = 1). Only hd 72, 128
 * and 256 (flash_plan.h); k_flash_supported says whether this device and shape can run them
 * (backward: also the backward kernels). smem_optin (the device's opt-in shared memory a block)
 * picks the tiles (flash_plan.h). */
int k_flash_supported(lt_dtype dt, int hd, int cc, size_t smem_optin, int backward);
/* lse == NULL: out [T, nh*hd] fp32 (written). Otherwise (the backward's first pass) out is not
 * touched and lse, dd [nh, T] fp32 get the row log-sum-exp (of the scaled scores) and
 * Σ_d dout·out, with dout [T, nh*hd] fp32. */
void k_flash_forward(cudaStream_t st, lt_dtype dt, int hd, const void *Qp, const void *Kp,
                     const void *Vp, float *out, float *lse, float *dd, const float *dout,
                     const int32_t *qpos, const int32_t *kpos, int T, int S, int nh, int nkv,
                     int window, float scale, const float *qinv, const float *kinv,
                     const float *vinv, size_t smem_optin);
/* dq [T, nh, hd], dk, dv [S, nkv, hd] ACCUMULATED (zero them first; any may be NULL), from
 * k_flash_forward's lse and dd. smem_optin picks the one-pass kernel where it fits, else the
 * split passes (dq, then dk and dv) with the plan's tiles. */
void k_flash_backward(cudaStream_t st, lt_dtype dt, int hd, const void *Qp, const void *Kp,
                      const void *Vp, const void *dOp, const float *lse, const float *dd, float *dq,
                      float *dk, float *dv, const int32_t *qpos, const int32_t *kpos, int T, int S,
                      int nh, int nkv, int window, float scale, const float *qinv,
                      const float *kinv, const float *vinv, const float *dinv, size_t smem_optin);

/* backend.h's attention_rows: the new K/V kn, vn [R, nkv, hd] appended into the row caches kc,
 * vc [N, S, nkv, hd] at slot qpos[i] % S of row rows[i], then out [R, nh*hd] (written) from
 * q [R, nh, hd] over each row's ring. hd <= 256. part: device scratch of
 * k_attention_rows_scratch(R, S, nh, hd) bytes. */
size_t k_attention_rows_scratch(int R, int S, int nh, int hd);
void k_attention_rows(cudaStream_t st, float *out, const float *q, const float *kn, const float *vn,
                      float *kc, float *vc, const int32_t *rows, const int32_t *qpos, int R, int N,
                      int S, int nh, int nkv, int hd, int window, float scale, float *part);

/* ---- cross_entropy.cu ------------------------------------------------------------------------ */

/* For each row of logits [Tc, V] (fp32): loss[t] = lse - logit[target] (0 when target is -100);
 * when logp != NULL also logp[t] = -loss[t]; when dlog != NULL also dlog[t, :] = (softmax -
 * onehot) * weight[t] * gmul in dtype dt (weight NULL = 1; zeros for ignored rows). A target
 * outside [0, V) sets *bad. */
void k_xent_rows(cudaStream_t st, const float *logits, const int32_t *targets, int64_t Tc,
                 int64_t V, float *loss, float *logp, const float *weight, void *dlog, lt_dtype dt,
                 float gmul, int *bad);

/* ---- quant.cu ---------------------------------------------------------------------------------
 */

/* Double quantization's absmax: absmax[b] = table[q[b]] * absmax2[b / nested_blocksize] +
 * offset, for b < nblocks (fp32 out; table is the 256-entry map). */
void k_nested_absmax(cudaStream_t st, float *absmax, const uint8_t *q, const float *table,
                     const float *absmax2, float offset, int64_t nblocks, int nested_blocksize);
/* dst[i] (dtype dt) = code[index i] * absmax[i / blocksize], i < n; packed holds two indices a
 * byte, the even element in the high nibble; code: the [16] quant_map. */
void k_nf4_dequant(cudaStream_t st, void *dst, lt_dtype dt, const uint8_t *packed,
                   const float *code, const float *absmax, int64_t n, int blocksize);
/* dst[r, c] (dtype dt) = w[r, c] * scb[r] * (1/127), in that order. */
void k_int8_dequant(cudaStream_t st, void *dst, lt_dtype dt, const int8_t *w, const float *scb,
                    int64_t rows, int64_t cols);
/* y[T, out] (+)= x[T, in] · Wᵀ with W NF4 [out, in], read once for all T rows (decoding). Only
 * where k_nf4_gemv_ok: 1 <= T <= 8, in a multiple of 8, packed 4-byte aligned. */
int k_nf4_gemv_ok(int64_t T, int64_t in, const void *packed);
void k_nf4_gemv(cudaStream_t st, float *y, const float *x, const uint8_t *packed, const float *code,
                const float *absmax, int64_t T, int64_t in, int64_t out, int blocksize,
                int accumulate);

/* ---- gemv.cu ------------------------------------------------------------------------------- */

/* Whether the few-row linear takes T rows of in (T <= 8, in % 8 == 0, rank r <= 64, x and w on
 * 16-byte boundaries). */
int k_gemv16_ok(int64_t T, int64_t in, int r, const void *x, const void *w);
/* One of up to K_GEMV16_MAX_PARTS linears of the same x [T, in] that k_gemv16 computes at once:
 * y [T, out] = x · W [out, in]ᵀ (W bf16 or fp16) + scale · (x · A [r, in]ᵀ) · B [out, r]ᵀ
 * (a NULL or r 0: no adapter), fp32 products and sums. */
#define K_GEMV16_MAX_PARTS 4
typedef struct k_gemv16_part {
    float *y;
    const void *w;
    lt_dtype dt;
    int64_t out;
    const float *a, *b; /* the adapter, fp32 */
    int r;
    float scale;
} k_gemv16_part;
/* Every part's adapter product in one launch (when any has one; xa: scratch of T · Σ r floats),
 * then every part's rows in one more. */
void k_gemv16(cudaStream_t st, const float *x, int64_t T, int64_t in, const k_gemv16_part *p, int n,
              float *xa);

/* ---- sample.cu ----------------------------------------------------------------------------- */

/* backend.h's sample_rows: ids[r] drawn from logits [R, V] with bits[r] (sample_rule.h). Few
 * rows are split over several blocks each on a device of n_sm multiprocessors, meeting in
 * `scratch` (k_sample_rows_scratch(R, V, n_sm) bytes; 0 = one block a row, scratch unused; a
 * NULL scratch also makes it one block a row). */
size_t k_sample_rows_scratch(int R, int V, int n_sm);
void k_sample_rows(cudaStream_t st, int32_t *ids, const float *logits, const int32_t *bits, int R,
                   int V, float inv_temp, int top_k, float top_p, float min_p, void *scratch,
                   int n_sm);

/* ---- vision.cu: the image tower's ops and the image block's attention (backend.h) ----------- */
void k_layernorm(cudaStream_t st, float *y, const float *x, const float *w, const float *b,
                 int64_t N, int64_t D, float eps);
void k_add_bias(cudaStream_t st, float *y, const float *b, int64_t N, int64_t D);
void k_gelu(cudaStream_t st, float *y, const float *x, int64_t n);
void k_avg_pool(cudaStream_t st, float *y, const float *x, int64_t g, int64_t k, int64_t D);
/* attention_span keeps a query's S scores in shared memory: S at most this many keys. */
#define K_SPAN_MAX_KEYS 12000
int k_attention_span_ok(int64_t S);
void k_attention_span(cudaStream_t st, float *out, const float *q, const float *k, const float *v,
                      const int32_t *qpos, const int32_t *kpos, const int32_t *span, int64_t T,
                      int64_t S, int64_t nh, int64_t nkv, int64_t hd, int window, float scale);

/* ---- vision.cu: the tower's backward (lt_tower_grad_ops) ---------------------------------------
 */
/* layernorm's backward (backend.h): dx written (NULL: not wanted; may alias dy or x), dw and db
 * [D] accumulated (either NULL: not wanted), the row statistics in double; the sums over rows of
 * dw and db in a fixed order (chunks of K_LN_BWD_ROWS rows or more, then the chunks in turn), so
 * the result does not depend on scheduling. scratch: device memory of k_layernorm_backward_scratch
 * bytes. */
#define K_LN_BWD_ROWS 64
size_t k_layernorm_backward_scratch(int64_t N, int64_t D);
void k_layernorm_backward(cudaStream_t st, float *dx, float *dw, float *db, const float *dy,
                          const float *x, const float *w, int64_t N, int64_t D, float eps,
                          double *scratch);
/* dx = dy * gelu_tanh'(x) elementwise (dx may alias dy or x). */
void k_gelu_backward(cudaStream_t st, float *dx, const float *dy, const float *x, int64_t n);
/* dx [g*g, D] (written) = dy [(g/k)^2, D] of each cell's k x k block / (k*k). */
void k_avg_pool_backward(cudaStream_t st, float *dx, const float *dy, int64_t g, int64_t k,
                         int64_t D);

#endif
