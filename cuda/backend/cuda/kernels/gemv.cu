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
 *               (one warp per output row, 8 weights per lane per load, every t at once)
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

__global__ static void gemv16_kernel(float *y, const float *x, const void *w, lt_dtype dt, int T,
                                     int64_t in, int64_t out, const float *xa, const float *b,
                                     int r, float scale, int accumulate) {
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    int64_t o = (int64_t)blockIdx.x * warps + threadIdx.x / 32;
    if (o >= out) return;
    float acc[GEMV16_MAX_T];
    for (int t = 0; t < GEMV16_MAX_T; t++)
        acc[t] = 0.0f;
    const uint16_t *row = (const uint16_t *)w + o * in;
    for (int64_t c = (int64_t)lane * 8; c < in; c += 32 * 8) {
        float wv[8];
        w8_to_f32(*(const uint4 *)(row + c), dt, wv);
        for (int t = 0; t < T; t++) {
            const float4 *xr = (const float4 *)(x + t * in + c);
            float4 a = xr[0], bq = xr[1];
            acc[t] += a.x * wv[0] + a.y * wv[1] + a.z * wv[2] + a.w * wv[3] + bq.x * wv[4] +
                      bq.y * wv[5] + bq.z * wv[6] + bq.w * wv[7];
        }
    }
    for (int t = 0; t < T; t++) {
        float s = acc[t];
        if (xa) /* the adapter: lanes take B's row o two entries apart */
            for (int j = lane; j < r; j += 32)
                s += scale * xa[t * r + j] * b[o * r + j];
        for (int off = 16; off > 0; off >>= 1)
            s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) y[t * out + o] = accumulate ? y[t * out + o] + s : s;
    }
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
    lora_xa_kernel<<<r, 256, 0, st>>>(xa, x, a, (int)T, in, r);
}

void k_gemv16(cudaStream_t st, float *y, const float *x, const void *w, lt_dtype dt, int64_t T,
              int64_t in, int64_t out, const float *xa, const float *b, int r, float scale,
              int accumulate) {
    if (out <= 0 || T <= 0) return;
    const int threads = 256, rows_per_block = threads / 32;
    int64_t blocks = (out + rows_per_block - 1) / rows_per_block;
    gemv16_kernel<<<(unsigned)blocks, threads, 0, st>>>(y, x, w, dt, (int)T, in, out, xa, b, r,
                                                        scale, accumulate);
}
