/* gemv.cu — linears for a few rows (decoding) on 16-bit weights, the adapters folded in.
 *
 * When a step feeds 1..8 tokens through a linear, cuBLAS' GEMM with its casts is launch-bound:
 * the activations' cast to 16 bits, the adapters' casts, two small adapter GEMMs and the base
 * GEMM cost five or six launches and host work each, for a product that reads the weight once.
 * These two kernels do the same in two launches for up to K_GEMV16_MAX_PARTS linears that read
 * the same x (q, k and v; gate and up), reading fp32 activations and adapters as they are (no
 * casts; fp32 products, fp32 sums — the CPU reference's arithmetic on the same 16-bit weight
 * values):
 *   lora_xa:  xa_k[t, j] = Σ_i x[t, i] · A_k[j, i]          (one block per adapter row j of each k)
 *   gemv16:   y_k[t, o] = Σ_i x[t, i] · W_k[o, i] + s_k · Σ_j xa_k[t, j] · B_k[o, j]
 *             (one block per 4 output rows of each k, its threads splitting i; 8 weights per
 *             thread per load, every t at once)
 * One grid over every part's rows: k_proj's and v_proj's 256 rows alone fill 64 blocks of a
 * 132-SM card, and each launch has a fixed cost of a few microseconds at these sizes.
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

/* Every part of one launch, by value (kernel parameters): block b belongs to the first part k
 * with b < block_end[k]. */
struct gemv16_args {
    float *y[K_GEMV16_MAX_PARTS];
    const void *w[K_GEMV16_MAX_PARTS];
    const float *xa[K_GEMV16_MAX_PARTS]; /* [T, r] of part k, or NULL: no adapter */
    const float *b[K_GEMV16_MAX_PARTS];
    int64_t out[K_GEMV16_MAX_PARTS];
    int64_t block_end[K_GEMV16_MAX_PARTS];
    int r[K_GEMV16_MAX_PARTS];
    float scale[K_GEMV16_MAX_PARTS];
    lt_dtype dt[K_GEMV16_MAX_PARTS];
    int n;
};

template <int T>
__global__ static void gemv16_kernel(const float *x, int64_t in, const gemv16_args args) {
    __shared__ float part[GEMV16_MAX_WARPS][GEMV16_ROWS * GEMV16_MAX_T];
    int k = 0;
    while (k + 1 < args.n && (int64_t)blockIdx.x >= args.block_end[k])
        k++;
    float *y = args.y[k];
    const lt_dtype dt = args.dt[k];
    const int64_t out = args.out[k];
    const int64_t blk = (int64_t)blockIdx.x - (k ? args.block_end[k - 1] : 0);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int64_t o0 = blk * GEMV16_ROWS;
    const int nr = out - o0 < GEMV16_ROWS ? (int)(out - o0) : GEMV16_ROWS;
    float acc[GEMV16_ROWS][T];
#pragma unroll
    for (int q = 0; q < GEMV16_ROWS; q++)
#pragma unroll
        for (int t = 0; t < T; t++)
            acc[q][t] = 0.0f;
    const uint16_t *rows = (const uint16_t *)args.w[k] + o0 * in;
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
    for (int j = 0; j < warps; j++)
        s += part[j][q * GEMV16_MAX_T + t];
    const int64_t o = o0 + q;
    const float *xa = args.xa[k];
    if (xa) { /* the adapter: scale * xa[t, :] . B[o, :] */
        const int r = args.r[k];
        const float *b = args.b[k], scale = args.scale[k];
        for (int j = 0; j < r; j++)
            s += scale * xa[t * r + j] * b[o * r + j];
    }
    y[t * out + o] = s;
}

/* The adapters' x·Aᵀ of every part with one: block b is row b - start of the part it falls in. */
struct lora_xa_args {
    float *xa[K_GEMV16_MAX_PARTS];
    const float *a[K_GEMV16_MAX_PARTS];
    int r[K_GEMV16_MAX_PARTS];
    int block_end[K_GEMV16_MAX_PARTS];
    int n;
};

__global__ static void lora_xa_kernel(const float *x, int T, int64_t in, const lora_xa_args args) {
    __shared__ float part[GEMV16_MAX_T][32];
    /* the part and its fields by constant index: a run-time index into the parameters would
     * copy them to local memory */
    int k = 0;
#pragma unroll
    for (int q = 0; q + 1 < K_GEMV16_MAX_PARTS; q++)
        if (q + 1 < args.n && (int)blockIdx.x >= args.block_end[q]) k = q + 1;
    const float *a = args.a[0];
    float *xa = args.xa[0];
    int r = args.r[0], start = 0;
#pragma unroll
    for (int q = 1; q < K_GEMV16_MAX_PARTS; q++)
        if (q == k) {
            a = args.a[q];
            xa = args.xa[q];
            r = args.r[q];
            start = args.block_end[q - 1];
        }
    const int j = (int)blockIdx.x - start;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float acc[GEMV16_MAX_T];
#pragma unroll
    for (int t = 0; t < GEMV16_MAX_T; t++)
        acc[t] = 0.0f;
    const float *arow = a + (int64_t)j * in;
    for (int64_t i = threadIdx.x; i < in; i += blockDim.x) {
        float av = arow[i];
        /* t < T a guard, not the bound: acc stays in registers */
#pragma unroll
        for (int t = 0; t < GEMV16_MAX_T; t++)
            if (t < T) acc[t] += x[t * in + i] * av;
    }
#pragma unroll
    for (int t = 0; t < GEMV16_MAX_T; t++) {
        if (t >= T) break;
        float s = acc[t];
        for (int off = 16; off > 0; off >>= 1)
            s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) part[t][warp] = s;
    }
    __syncthreads();
    if (threadIdx.x < T) {
        float s = 0.0f;
        for (int w = 0; w < (int)(blockDim.x / 32); w++)
            s += part[threadIdx.x][w];
        xa[threadIdx.x * r + j] = s;
    }
}

int k_gemv16_ok(int64_t T, int64_t in, int r, const void *x, const void *w) {
    return T >= 1 && T <= GEMV16_MAX_T && in % 8 == 0 && r >= 0 && r <= GEMV16_MAX_R &&
           ((uintptr_t)x & 15) == 0 && ((uintptr_t)w & 15) == 0;
}

void k_gemv16(cudaStream_t st, const float *x, int64_t T, int64_t in, const k_gemv16_part *p, int n,
              float *xa) {
    if (T <= 0 || n <= 0 || n > K_GEMV16_MAX_PARTS) return;
    gemv16_args g = {};
    lora_xa_args la = {};
    int64_t blocks = 0;
    int xa_blocks = 0;
    float *xa_next = xa;
    for (int k = 0; k < n; k++) {
        g.y[k] = p[k].y;
        g.w[k] = p[k].w;
        g.dt[k] = p[k].dt;
        g.out[k] = p[k].out;
        blocks += (p[k].out + GEMV16_ROWS - 1) / GEMV16_ROWS;
        g.block_end[k] = blocks;
        int r = p[k].a && p[k].r > 0 ? p[k].r : 0;
        if (r) {
            g.xa[k] = la.xa[la.n] = xa_next;
            g.b[k] = p[k].b;
            g.r[k] = r;
            g.scale[k] = p[k].scale;
            la.a[la.n] = p[k].a;
            la.r[la.n] = r;
            xa_blocks += r;
            la.block_end[la.n++] = xa_blocks;
            xa_next += T * r;
        }
    }
    g.n = n;
    if (blocks <= 0) return;
    /* r blocks an adapter only: 32 warps each keep every thread's chain of loads short */
    if (la.n) lora_xa_kernel<<<xa_blocks, 1024, 0, st>>>(x, (int)T, in, la);
    /* enough threads for one step over the input (8 weights a thread), 1 to 8 warps; the
     * final sums take one thread per (row, token): 32 threads at least */
    int64_t warps = (in / 8 + 31) / 32;
    if (warps < GEMV16_ROWS * GEMV16_MAX_T / 32) warps = GEMV16_ROWS * GEMV16_MAX_T / 32;
    if (warps > GEMV16_MAX_WARPS) warps = GEMV16_MAX_WARPS;
    dim3 grid((unsigned)blocks), th((unsigned)(warps * 32));
    switch (T) { /* T a template argument: the accumulators stay in registers */
#define GEMV16_T(n)                                                                                \
    case n:                                                                                        \
        gemv16_kernel<n><<<grid, th, 0, st>>>(x, in, g);                                           \
        break;
        GEMV16_T(1)
        GEMV16_T(2) GEMV16_T(3) GEMV16_T(4) GEMV16_T(5) GEMV16_T(6) GEMV16_T(7) GEMV16_T(8)
#undef GEMV16_T
    }
}
