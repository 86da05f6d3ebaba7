/* attention.cu — the non-GEMM half of attention: head packing (and the cast to the matmul dtype),
 * the masked softmax over one query chunk's scores, and the softmax backward.
 *
 * backend_cuda.cu drives attention as chunks of queries: scores for all heads of one chunk
 * ([heads, Tq, S], never every query's full matrix at once) come from cuBLAS, these kernels
 * mask and normalise them, cuBLAS multiplies by V. Owns only these kernels (kernels.h). The
 * mask rule is backend.h's: key s is visible to query t iff kpos[s] >= 0, kpos[s] <= qpos[t]
 * and (window <= 0 or qpos[t] - kpos[s] < window).
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdlib.h>

#include "cuda/kernels/kernels.h"

__device__ __forceinline__ void put(void *dst, lt_dtype dt, int64_t i, float v) {
    if (dt == LT_BF16)
        ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(v);
    else if (dt == LT_F16)
        ((__half *)dst)[i] = __float2half_rn(v == v ? fminf(fmaxf(v, -65504.0f), 65504.0f) : v);
    else
        ((float *)dst)[i] = v;
}

__global__ void pack_heads_kernel(void *dst, lt_dtype dt, const float *src, int64_t t0, int64_t Tq,
                                  int64_t heads, int64_t hd, const float *scale) {
    float s = scale ? *scale : 1.0f;
    int64_t n = heads * Tq * hd;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t h = i / (Tq * hd), rem = i - h * Tq * hd, t = rem / hd, d = rem - t * hd;
        put(dst, dt, i, src[((t0 + t) * heads + h) * hd + d] * s);
    }
}

static unsigned blocks_for(int64_t n) {
    int64_t b = (n + 255) / 256;
    if (b > 65535LL * 8) b = 65535LL * 8;
    return (unsigned)(b < 1 ? 1 : b);
}

void k_pack_heads(cudaStream_t st, void *dst, lt_dtype dt, const float *src, int64_t t0, int64_t Tq,
                  int64_t heads, int64_t hd, const float *scale) {
    int64_t n = heads * Tq * hd;
    if (n > 0)
        pack_heads_kernel<<<blocks_for(n), 256, 0, st>>>(dst, dt, src, t0, Tq, heads, hd, scale);
}

__global__ void unpack_heads_kernel(float *dst, const float *src, int64_t t0, int64_t Tq,
                                    int64_t heads, int64_t hd) {
    int64_t n = heads * Tq * hd;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t h = i / (Tq * hd), rem = i - h * Tq * hd, t = rem / hd, d = rem - t * hd;
        dst[((t0 + t) * heads + h) * hd + d] = src[i];
    }
}

void k_unpack_heads(cudaStream_t st, float *dst, const float *src, int64_t t0, int64_t Tq,
                    int64_t heads, int64_t hd) {
    int64_t n = heads * Tq * hd;
    if (n > 0) unpack_heads_kernel<<<blocks_for(n), 256, 0, st>>>(dst, src, t0, Tq, heads, hd);
}

__device__ float block_max_f(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < (int)(blockDim.x >> 5) ? sh[lane] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1)
            v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    return sh[32];
}

__device__ float block_sum_f(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    return sh[32];
}

__device__ __forceinline__ bool visible(int32_t qp, int32_t kp, int window) {
    return kp >= 0 && kp <= qp && (window <= 0 || qp - kp < window);
}

/* One block per score row (h, i). */
__global__ void softmax_masked_kernel(float *scores, void *p, lt_dtype dt, int keep_f32,
                                      const int32_t *qpos, const int32_t *kpos, int64_t t0,
                                      int64_t Tq, int64_t S, int window) {
    __shared__ float sh[33];
    int64_t r = blockIdx.x;
    int64_t i = r % Tq;
    int32_t qp = qpos[t0 + i];
    float *row = scores + r * S;
    float mx = -INFINITY;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
        if (visible(qp, kpos[s], window)) mx = fmaxf(mx, row[s]);
    mx = block_max_f(mx, sh);
    float sum = 0.0f;
    if (mx != -INFINITY)
        for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
            if (visible(qp, kpos[s], window)) sum += expf(row[s] - mx);
    sum = block_sum_f(sum, sh);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
        float v =
            (mx != -INFINITY && visible(qp, kpos[s], window)) ? expf(row[s] - mx) * inv : 0.0f;
        if (p) put(p, dt, r * S + s, v);
        if (keep_f32) row[s] = v;
    }
}

/* The same softmax with the row held in registers (PER values per thread of 256): one read of
 * the scores and one exp per element, for rows up to 256 * PER keys. */
template <int PER>
__global__ void softmax_masked_reg_kernel(float *scores, void *p, lt_dtype dt, int keep_f32,
                                          const int32_t *qpos, const int32_t *kpos, int64_t t0,
                                          int64_t Tq, int64_t S, int window) {
    __shared__ float sh[33];
    int64_t r = blockIdx.x;
    int32_t qp = qpos[t0 + r % Tq];
    float *row = scores + r * S;
    float v[PER];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int64_t s = threadIdx.x + (int64_t)i * blockDim.x;
        v[i] = (s < S && visible(qp, kpos[s], window)) ? row[s] : -INFINITY;
        mx = fmaxf(mx, v[i]);
    }
    mx = block_max_f(mx, sh);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        v[i] = (mx == -INFINITY || v[i] == -INFINITY) ? 0.0f : expf(v[i] - mx);
        sum += v[i];
    }
    sum = block_sum_f(sum, sh);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int64_t s = threadIdx.x + (int64_t)i * blockDim.x;
        if (s >= S) break;
        float pv = v[i] * inv;
        if (p) put(p, dt, r * S + s, pv);
        if (keep_f32) row[s] = pv;
    }
}

void k_softmax_masked(cudaStream_t st, float *scores, void *p, lt_dtype dt, int keep_f32,
                      const int32_t *qpos, const int32_t *kpos, int64_t t0, int64_t Tq,
                      int64_t heads, int64_t S, int window) {
    int64_t rows = heads * Tq;
    if (rows <= 0) return;
    static int generic =
        -1; /* LATHE_CUDA_SOFTMAX_GENERIC=1: the plain kernel (a fallback switch) */
    if (generic < 0) generic = getenv("LATHE_CUDA_SOFTMAX_GENERIC") != NULL;
    unsigned g = (unsigned)rows;
    if (generic)
        softmax_masked_kernel<<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, t0, Tq, S,
                                                 window);
    else if (S <= 256)
        softmax_masked_reg_kernel<1>
            <<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, t0, Tq, S, window);
    else if (S <= 512)
        softmax_masked_reg_kernel<2>
            <<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, t0, Tq, S, window);
    else if (S <= 1024)
        softmax_masked_reg_kernel<4>
            <<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, t0, Tq, S, window);
    else if (S <= 2048)
        softmax_masked_reg_kernel<8>
            <<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, t0, Tq, S, window);
    else if (S <= 4096)
        softmax_masked_reg_kernel<16>
            <<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, t0, Tq, S, window);
    else {
        int th = S >= 1024 ? 512 : (S >= 256 ? 256 : 128);
        softmax_masked_kernel<<<g, th, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, t0, Tq, S,
                                                window);
    }
}

__global__ void softmax_backward_kernel(float *dp, const float *p, int64_t S) {
    __shared__ float sh[33];
    int64_t r = blockIdx.x;
    float *dr = dp + r * S;
    const float *pr = p + r * S;
    float d = 0.0f;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
        d += pr[s] * dr[s];
    d = block_sum_f(d, sh);
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
        dr[s] = pr[s] * (dr[s] - d);
}

template <int PER>
__global__ void softmax_backward_reg_kernel(float *dp, const float *p, int64_t S) {
    __shared__ float sh[33];
    int64_t r = blockIdx.x;
    float *dr = dp + r * S;
    const float *pr = p + r * S;
    float pv[PER], dv[PER];
    float d = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int64_t s = threadIdx.x + (int64_t)i * blockDim.x;
        pv[i] = s < S ? pr[s] : 0.0f;
        dv[i] = s < S ? dr[s] : 0.0f;
        d += pv[i] * dv[i];
    }
    d = block_sum_f(d, sh);
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int64_t s = threadIdx.x + (int64_t)i * blockDim.x;
        if (s < S) dr[s] = pv[i] * (dv[i] - d);
    }
}

void k_softmax_backward(cudaStream_t st, float *dp, const float *p, int64_t rows, int64_t S) {
    if (rows <= 0) return;
    static int generic = -1;
    if (generic < 0) generic = getenv("LATHE_CUDA_SOFTMAX_GENERIC") != NULL;
    unsigned g = (unsigned)rows;
    if (generic)
        softmax_backward_kernel<<<g, 256, 0, st>>>(dp, p, S);
    else if (S <= 256)
        softmax_backward_reg_kernel<1><<<g, 256, 0, st>>>(dp, p, S);
    else if (S <= 512)
        softmax_backward_reg_kernel<2><<<g, 256, 0, st>>>(dp, p, S);
    else if (S <= 1024)
        softmax_backward_reg_kernel<4><<<g, 256, 0, st>>>(dp, p, S);
    else if (S <= 2048)
        softmax_backward_reg_kernel<8><<<g, 256, 0, st>>>(dp, p, S);
    else if (S <= 4096)
        softmax_backward_reg_kernel<16><<<g, 256, 0, st>>>(dp, p, S);
    else {
        int th = S >= 1024 ? 512 : (S >= 256 ? 256 : 128);
        softmax_backward_kernel<<<g, th, 0, st>>>(dp, p, S);
    }
}
