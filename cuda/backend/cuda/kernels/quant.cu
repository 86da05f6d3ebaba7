/* quant.cu — dequantization of bitsandbytes' 4-bit (NF4) and 8-bit (LLM.int8) weights on the GPU.
 *
 * The byte layouts are bitsandbytes' own (functional.py quantize_4bit / Int8Params), so a
 * pre-quantized checkpoint's tensors are uploaded as they are and decoded here:
 *   - NF4: the row-major flattened weight in blocks (64 elements by default), one fp32 absmax per
 *     block, two 4-bit code indices per byte with the EVEN element in the HIGH nibble;
 *     w = NF4[idx] * absmax[i / blocksize].
 *   - double quantization: the block absmax values are themselves 8-bit codes into a 256-entry
 *     table (bitsandbytes' signed dynamic map), in blocks of 256 with one fp32 scale each, plus
 *     one offset: absmax[b] = table[q[b]] * absmax2[b / 256] + offset.
 *   - int8: w[r, c] = W8[r, c] * SCB[r] / 127 (row-wise absmax).
 * The linear op decodes a weight into 16-bit scratch and hands it to cuBLAS (training and
 * prefill); k_nf4_gemv computes a few rows (decoding) straight from the packed bytes. The code
 * table is the checkpoint's own quant_map (device memory). Every product and sum is one fp32
 * operation in the order the CPU reference (backend_cpu_quant.c) performs it, with explicit
 * _rn intrinsics so nvcc cannot contract them into an FMA: into fp32 the two decodes agree bit
 * for bit. This file owns no memory.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/backend/cuda/kernels/kernels.h"

static int grid_for_n(int64_t n, int threads) {
    int64_t g = (n + threads - 1) / threads;
    return (int)(g < 65535 ? (g > 0 ? g : 1) : 65535);
}

__device__ __forceinline__ void store_out(void *dst, lt_dtype dt, int64_t i, float v) {
    if (dt == LT_F16)
        ((__half *)dst)[i] = __float2half_rn(v);
    else if (dt == LT_BF16)
        ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(v);
    else
        ((float *)dst)[i] = v;
}

__global__ void nested_absmax_kernel(float *absmax, const uint8_t *q, const float *table,
                                     const float *absmax2, float offset, int64_t nblocks,
                                     int nested_blocksize) {
    for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nblocks;
         b += (int64_t)gridDim.x * blockDim.x)
        absmax[b] = __fadd_rn(__fmul_rn(table[q[b]], absmax2[b / nested_blocksize]), offset);
}

void k_nested_absmax(cudaStream_t st, float *absmax, const uint8_t *q, const float *table,
                     const float *absmax2, float offset, int64_t nblocks, int nested_blocksize) {
    if (nblocks <= 0) return;
    nested_absmax_kernel<<<grid_for_n(nblocks, 256), 256, 0, st>>>(
        absmax, q, table, absmax2, offset, nblocks, nested_blocksize);
}

/* One thread per packed byte: two outputs. */
__global__ void nf4_dequant_kernel(void *dst, lt_dtype dt, const uint8_t *packed, const float *code,
                                   const float *absmax, int64_t n, int blocksize) {
    int64_t nbytes = (n + 1) / 2;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < nbytes;
         j += (int64_t)gridDim.x * blockDim.x) {
        uint8_t b = packed[j];
        int64_t i = 2 * j;
        store_out(dst, dt, i, __fmul_rn(code[b >> 4], absmax[i / blocksize]));
        if (i + 1 < n)
            store_out(dst, dt, i + 1, __fmul_rn(code[b & 15], absmax[(i + 1) / blocksize]));
    }
}

/* The same decode, 32 weights a thread into 16-bit dst: one 16-byte load of packed bytes, one
 * absmax (blocksize % 32 == 0, so a thread's 32 weights share a block), the 16 codes from
 * shared memory, four 16-byte stores; 32-bit indices inside a thread's run, one division a
 * thread. The products are the same __fmul_rn, so the values equal nf4_dequant_kernel's bit for
 * bit. The one-byte-a-thread kernel above spent its time on 64-bit divisions and 2-byte stores,
 * far from the bandwidth the decode needs (12B QLoRA decodes each linear three times a step). */
template <typename T16>
__global__ void nf4_dequant32_kernel(T16 *dst, const uint4 *packed, const float *code,
                                     const float *absmax, int64_t runs, int blocksize) {
    __shared__ float cs[16];
    if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < runs;
         j += (int64_t)gridDim.x * blockDim.x) {
        const uint4 raw = packed[j];
        const float a = absmax[(j * 32) / blocksize];
        const uint32_t u[4] = {raw.x, raw.y, raw.z, raw.w};
        uint4 outv[4];
        uint32_t *o = (uint32_t *)outv;
#pragma unroll
        for (int k = 0; k < 16; k++) {
            const uint32_t byte = (u[k >> 2] >> ((k & 3) * 8)) & 0xffu;
            const float hi = __fmul_rn(cs[byte >> 4], a), lo = __fmul_rn(cs[byte & 15], a);
            T16 h, l;
            if constexpr (std::is_same<T16, __half>::value) {
                h = __float2half_rn(hi);
                l = __float2half_rn(lo);
            } else {
                h = __float2bfloat16_rn(hi);
                l = __float2bfloat16_rn(lo);
            }
            /* element 2k (the high nibble) first in memory */
            o[k] = (uint32_t)(*(uint16_t *)&h) | ((uint32_t)(*(uint16_t *)&l) << 16);
        }
        uint4 *d = (uint4 *)(dst + j * 32);
        d[0] = outv[0];
        d[1] = outv[1];
        d[2] = outv[2];
        d[3] = outv[3];
    }
}

void k_nf4_dequant(cudaStream_t st, void *dst, lt_dtype dt, const uint8_t *packed,
                   const float *code, const float *absmax, int64_t n, int blocksize) {
    if (n <= 0) return;
    if ((dt == LT_F16 || dt == LT_BF16) && n % 32 == 0 && blocksize % 32 == 0 &&
        ((uintptr_t)packed & 15) == 0 && ((uintptr_t)dst & 15) == 0) {
        int64_t runs = n / 32;
        if (dt == LT_F16)
            nf4_dequant32_kernel<__half><<<grid_for_n(runs, 256), 256, 0, st>>>(
                (__half *)dst, (const uint4 *)packed, code, absmax, runs, blocksize);
        else
            nf4_dequant32_kernel<__nv_bfloat16><<<grid_for_n(runs, 256), 256, 0, st>>>(
                (__nv_bfloat16 *)dst, (const uint4 *)packed, code, absmax, runs, blocksize);
        return;
    }
    nf4_dequant_kernel<<<grid_for_n((n + 1) / 2, 256), 256, 0, st>>>(dst, dt, packed, code, absmax,
                                                                     n, blocksize);
}

__global__ void int8_dequant_kernel(void *dst, lt_dtype dt, const int8_t *w, const float *scb,
                                    int64_t rows, int64_t cols) {
    int64_t n = rows * cols;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        /* as bitsandbytes' int8_vectorwise_dequant: w8 * SCB, then * (1/127) in fp32 */
        store_out(dst, dt, i,
                  __fmul_rn(__fmul_rn((float)w[i], scb[i / cols]), 7.874015718698502e-3f));
}

void k_int8_dequant(cudaStream_t st, void *dst, lt_dtype dt, const int8_t *w, const float *scb,
                    int64_t rows, int64_t cols) {
    if (rows <= 0 || cols <= 0) return;
    int8_dequant_kernel<<<grid_for_n(rows * cols, 256), 256, 0, st>>>(dst, dt, w, scb, rows, cols);
}

/* y[t, o] = Σ_i x[t, i] · w[o, i] for t < T (T <= 8), w NF4. One warp per output row: the lanes
 * walk the row's packed bytes 4 at a time (8 weights), so a row is read once for all T inputs.
 * accumulate: y += instead of =. */
#define GEMV_MAX_T 8
template <int T>
__global__ void nf4_gemv_kernel(float *y, const float *x, const uint8_t *packed,
                                const float *code_g, const float *absmax, int64_t in, int64_t out,
                                int blocksize, int accumulate) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = code_g[threadIdx.x];
    __syncthreads();
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    int64_t o = (int64_t)blockIdx.x * warps + threadIdx.x / 32;
    if (o >= out) return;
    float acc[T]; /* T a template argument: the accumulators stay in registers */
#pragma unroll
    for (int t = 0; t < T; t++)
        acc[t] = 0.0f;
    const int64_t row0 = o * in; /* element index of the row's first weight */
    for (int64_t c = (int64_t)lane * 8; c < in; c += 32 * 8) {
        /* 8 weights from 4 bytes; in is a multiple of 8 (checked by the caller) */
        uint32_t word = *(const uint32_t *)(packed + (row0 + c) / 2);
        float wv[8];
        for (int k = 0; k < 4; k++) {
            uint8_t b = (uint8_t)(word >> (8 * k));
            int64_t e = row0 + c + 2 * k;
            wv[2 * k] = __fmul_rn(code[b >> 4], absmax[e / blocksize]);
            wv[2 * k + 1] = __fmul_rn(code[b & 15], absmax[(e + 1) / blocksize]);
        }
#pragma unroll
        for (int t = 0; t < T; t++) {
            const float *xr = x + t * in + c;
            float s = 0.0f;
            for (int k = 0; k < 8; k++)
                s += xr[k] * wv[k];
            acc[t] += s;
        }
    }
#pragma unroll
    for (int t = 0; t < T; t++) {
        float s = acc[t];
        for (int off = 16; off > 0; off >>= 1)
            s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) y[t * out + o] = accumulate ? y[t * out + o] + s : s;
    }
}

int k_nf4_gemv_ok(int64_t T, int64_t in, const void *packed) {
    return T >= 1 && T <= GEMV_MAX_T && in % 8 == 0 && ((uintptr_t)packed & 3) == 0;
}

void k_nf4_gemv(cudaStream_t st, float *y, const float *x, const uint8_t *packed, const float *code,
                const float *absmax, int64_t T, int64_t in, int64_t out, int blocksize,
                int accumulate) {
    if (out <= 0) return;
    const int threads = 256, rows_per_block = threads / 32;
    int64_t blocks = (out + rows_per_block - 1) / rows_per_block;
    dim3 g((unsigned)blocks), th(threads);
    switch (T) {
#define NF4_GEMV_T(n)                                                                              \
    case n:                                                                                        \
        nf4_gemv_kernel<n>                                                                         \
            <<<g, th, 0, st>>>(y, x, packed, code, absmax, in, out, blocksize, accumulate);        \
        break;
        NF4_GEMV_T(1)
        NF4_GEMV_T(2)
        NF4_GEMV_T(3) NF4_GEMV_T(4) NF4_GEMV_T(5) NF4_GEMV_T(6) NF4_GEMV_T(7) NF4_GEMV_T(8)
#undef NF4_GEMV_T
    }
}
