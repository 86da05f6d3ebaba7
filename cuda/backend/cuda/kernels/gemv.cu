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
 *               (one warp per output row, or per 4 rows when several tokens share the weight
 *               loads; 8 weights per lane per load, every t at once)
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

/* ROWS output rows per warp: each 16-byte load of x (from L1) feeds ROWS weight rows, so with
 * 8 tokens the activations' reads no longer outweigh the weight's (one row per warp read 16 bytes
 * of x for every byte of weight and stalled on L1 long before HBM). */
template <int ROWS>
__global__ static void gemv16_kernel(float *y, const float *x, const void *w, lt_dtype dt, int T,
                                     int64_t in, int64_t out, const float *xa, const float *b,
                                     int r, float scale, int accumulate) {
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    int64_t o0 = ((int64_t)blockIdx.x * warps + threadIdx.x / 32) * ROWS;
    if (o0 >= out) return;
    int nr = out - o0 < ROWS ? (int)(out - o0) : ROWS;
    float acc[ROWS][GEMV16_MAX_T];
    for (int q = 0; q < ROWS; q++)
        for (int t = 0; t < GEMV16_MAX_T; t++)
            acc[q][t] = 0.0f;
    const uint16_t *rows = (const uint16_t *)w + o0 * in;
    for (int64_t c = (int64_t)lane * 8; c < in; c += 32 * 8) {
        float wv[ROWS][8];
        for (int q = 0; q < ROWS; q++)
            if (q < nr) w8_to_f32(*(const uint4 *)(rows + q * in + c), dt, wv[q]);
        for (int t = 0; t < T; t++) {
            const float4 *xr = (const float4 *)(x + t * in + c);
            float4 a = xr[0], bq = xr[1];
            for (int q = 0; q < ROWS; q++)
                acc[q][t] += a.x * wv[q][0] + a.y * wv[q][1] + a.z * wv[q][2] + a.w * wv[q][3] +
                             bq.x * wv[q][4] + bq.y * wv[q][5] + bq.z * wv[q][6] + bq.w * wv[q][7];
        }
    }
    for (int q = 0; q < nr; q++) {
        int64_t o = o0 + q;
        for (int t = 0; t < T; t++) {
            float s = acc[q][t];
            if (xa) /* the adapter: lanes take B's row o 32 entries apart */
                for (int j = lane; j < r; j += 32)
                    s += scale * xa[t * r + j] * b[o * r + j];
            for (int off = 16; off > 0; off >>= 1)
                s += __shfl_down_sync(0xffffffffu, s, off);
            if (lane == 0) y[t * out + o] = accumulate ? y[t * out + o] + s : s;
        }
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
    const int threads = 256, warps = threads / 32;
    if (T ==
        1) { /* one token: x costs twice the weight's bytes; a row per warp keeps the SMs busy */
        int64_t blocks = (out + warps - 1) / warps;
        gemv16_kernel<1><<<(unsigned)blocks, threads, 0, st>>>(y, x, w, dt, (int)T, in, out, xa, b,
                                                               r, scale, accumulate);
    } else {
        int64_t blocks = (out + 4 * warps - 1) / (4 * warps);
        gemv16_kernel<4><<<(unsigned)blocks, threads, 0, st>>>(y, x, w, dt, (int)T, in, out, xa, b,
                                                               r, scale, accumulate);
    }
}
