/* gemv.cu — linear for a few rows (decoding) on 16-bit weights, the adapter folded in.
 *
 * When a step feeds 1..8 tokens through a linear, cuBLAS' GEMM with its casts is launch-bound:
 * the activations' cast to 16 bits, the adapters' casts, two small adapter GEMMs and the base
 * GEMM cost five or six launches and host work each, for a product that reads the weight once.
 * These two kernels do the same linear in two launches, reading fp32 activations and adapters
 * as they are (no casts; fp32 products, fp32 sums — the CPU reference's arithmetic on the same
 * 16-bit weight values):
 *   k_lora_xa:  xa[t, j] = Σ_i x[t, i] · A[j, i]                  (one block per adapter row j)
 *   k_gemv16:   y[t, o] (+)= Σ_i x[t, i] · W[o, i] + s · Σ_j xa[t, j] · B[o, j]
 *               (one block per 4 output rows, its threads splitting i; 8 weights per thread
 *               per load, every t at once)
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "cuda/backend/cuda/kernels/kernels.h"

#define GEMV16_MAX_T 8
#define GEMV16_MAX_R 64

__device__ static inline void w8_to_f32(uint4 raw, lt_dtype dt, float *w) {
    const uint32_t u[4] = {raw.x, raw.y, raw.z, raw.w};
    for (int k = 0; k < 4; k++) {
        if (dt == LT_BF16) {
            w[2 * k] = __uint_as_float(u[k] << 16);
            w[2 * k + 1] = __uint_as_float(u[k] & 0xffff0000u);
        } else {
            __half2 h = *reinterpret_cast<const __half2 *>(&u[k]);
            float2 f = __half22float2(h);
            w[2 * k] = f.x;
            w[2 * k + 1] = f.y;
        }
    }
}

/* One block per GEMV16_ROWS output rows; the block's threads split the input dimension (8
 * weights each per step, every row and every token at once), then reduce: the warps' shuffles,
 * then the warps' partial sums in shared memory, in a fixed order (the sums do not depend on
 * timing). Splitting K across the block keeps each thread's chain of dependent loads short:
 * with a warp per row, down_proj's 6,912 inputs were 27 serial loads a warp on 2 warps an SM,
 * bound by memory latency, not bandwidth; and each 16-byte load of x feeds 4 weight rows. */
#ifndef GEMV16_ROWS /* -DGEMV16_ROWS=8 builds the variant measured beside it */
#define GEMV16_ROWS 4
#endif
#define GEMV16_MAX_WARPS 8

template <int T>
__global__ static void gemv16_kernel(float *y, const float *x, const void *w, lt_dtype dt,
                                     int64_t in, int64_t out, const float *xa, const float *b,
                                     int r, float scale, int accumulate) {
    __shared__ float part[GEMV16_MAX_WARPS][GEMV16_ROWS * GEMV16_MAX_T];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int64_t o0 = (int64_t)blockIdx.x * GEMV16_ROWS;
    const int nr = out - o0 < GEMV16_ROWS ? (int)(out - o0) : GEMV16_ROWS;
    float acc[GEMV16_ROWS][T];
#pragma unroll
    for (int q = 0; q < GEMV16_ROWS; q++)
#pragma unroll
        for (int t = 0; t < T; t++)
            acc[q][t] = 0.0f;
    const uint16_t *rows = (const uint16_t *)w + o0 * in;
    for (int64_t c = (int64_t)threadIdx.x * 8; c < in; c += (int64_t)blockDim.x * 8) {
        float wv[GEMV16_ROWS][8];
#pragma unroll
        for (int q = 0; q < GEMV16_ROWS; q++)
            if (q < nr) w8_to_f32(*(const uint4 *)(rows + q * in + c), dt, wv[q]);
#pragma unroll
        for (int t = 0; t < T; t++) {
            const float4 *xr = (const float4 *)(x + t * in + c);
            float4 a = xr[0], bq = xr[1];
#pragma unroll
            for (int q = 0; q < GEMV16_ROWS; q++)
                acc[q][t] += a.x * wv[q][0] + a.y * wv[q][1] + a.z * wv[q][2] + a.w * wv[q][3] +
                             bq.x * wv[q][4] + bq.y * wv[q][5] + bq.z * wv[q][6] + bq.w * wv[q][7];
        }
    }
#pragma unroll
    for (int q = 0; q < GEMV16_ROWS; q++)
#pragma unroll
        for (int t = 0; t < T; t++) {
            if (q >= nr) continue;
            float s = acc[q][t];
            for (int off = 16; off > 0; off >>= 1)
                s += __shfl_down_sync(0xffffffffu, s, off);
            if (lane == 0) part[warp][q * GEMV16_MAX_T + t] = s;
        }
    __syncthreads();
    const int q = threadIdx.x / GEMV16_MAX_T, t = threadIdx.x % GEMV16_MAX_T;
    if (q >= nr || t >= T) return;
    float s = 0.0f;
    for (int k = 0; k < warps; k++)
        s += part[k][q * GEMV16_MAX_T + t];
    const int64_t o = o0 + q;
    if (xa) /* the adapter: scale * xa[t, :] . B[o, :] */
        for (int j = 0; j < r; j++)
            s += scale * xa[t * r + j] * b[o * r + j];
    y[t * out + o] = accumulate ? y[t * out + o] + s : s;
}

__global__ static void lora_xa_kernel(float *xa, const float *x, const float *a, int T, int64_t in,
                                      int r) {
    __shared__ float part[GEMV16_MAX_T][32];
    int j = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float acc[GEMV16_MAX_T];
    for (int t = 0; t < GEMV16_MAX_T; t++)
        acc[t] = 0.0f;
    const float *arow = a + (int64_t)j * in;
    for (int64_t i = threadIdx.x; i < in; i += blockDim.x) {
        float av = arow[i];
        for (int t = 0; t < T; t++)
            acc[t] += x[t * in + i] * av;
    }
    for (int t = 0; t < T; t++) {
        float s = acc[t];
        for (int off = 16; off > 0; off >>= 1)
            s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) part[t][warp] = s;
    }
    __syncthreads();
    if (threadIdx.x < T) {
        float s = 0.0f;
        for (int k = 0; k < (int)(blockDim.x / 32); k++)
            s += part[threadIdx.x][k];
        xa[threadIdx.x * r + j] = s;
    }
}

int k_gemv16_ok(int64_t T, int64_t in, int r, const void *x, const void *w) {
    return T >= 1 && T <= GEMV16_MAX_T && in % 8 == 0 && r >= 0 && r <= GEMV16_MAX_R &&
           ((uintptr_t)x & 15) == 0 && ((uintptr_t)w & 15) == 0;
}

void k_lora_xa(cudaStream_t st, float *xa, const float *x, const float *a, int64_t T, int64_t in,
               int r) {
    if (r <= 0 || T <= 0) return;
    /* r blocks only: 32 warps each keep every thread's chain of loads short */
    lora_xa_kernel<<<r, 1024, 0, st>>>(xa, x, a, (int)T, in, r);
}

void k_gemv16(cudaStream_t st, float *y, const float *x, const void *w, lt_dtype dt, int64_t T,
              int64_t in, int64_t out, const float *xa, const float *b, int r, float scale,
              int accumulate) {
    if (out <= 0 || T <= 0) return;
    /* enough threads for one step over the input (8 weights a thread), 1 to 8 warps; the
     * final sums take one thread per (row, token): 32 threads at least */
    int64_t warps = (in / 8 + 31) / 32;
    if (warps < GEMV16_ROWS * GEMV16_MAX_T / 32) warps = GEMV16_ROWS * GEMV16_MAX_T / 32;
    if (warps > GEMV16_MAX_WARPS) warps = GEMV16_MAX_WARPS;
    int64_t blocks = (out + GEMV16_ROWS - 1) / GEMV16_ROWS;
    dim3 g((unsigned)blocks), th((unsigned)(warps * 32));
    switch (T) { /* T a template argument: the accumulators stay in registers */
#define GEMV16_T(n)                                                                                \
    case n:                                                                                        \
        gemv16_kernel<n><<<g, th, 0, st>>>(y, x, w, dt, in, out, xa, b, r, scale, accumulate);     \
        break;
        GEMV16_T(1)
        GEMV16_T(2) GEMV16_T(3) GEMV16_T(4) GEMV16_T(5) GEMV16_T(6) GEMV16_T(7) GEMV16_T(8)
#undef GEMV16_T
    }
}
