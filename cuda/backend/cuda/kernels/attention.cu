/* attention.cu — the attention kernels: the fused (flash-style) forward and backward that the
 * 16-bit paths use, and for everything else (fp32, other head dims, devices without the shared
 * memory) the non-GEMM half of the chunked path: head packing (and the cast to the matmul dtype),
 * the masked softmax over one query chunk's scores, and the softmax backward.
 *
 * The chunked path: backend_cuda.cu drives attention as chunks of queries: scores for all heads
 * of one chunk ([heads, Tq, S], never every query's full matrix at once) come from cuBLAS, these
 * kernels mask and normalise them, cuBLAS multiplies by V. The fused kernels (second half of the
 * file) keep scores on the chip. Owns only these kernels (kernels.h). The mask rule is
 * backend.h's: key s is visible to query t iff kpos[s] >= 0, kpos[s] <= qpos[t] and
 * (window <= 0 or qpos[t] - kpos[s] < window). The chunked softmax also takes attention_span's
 * [T, 2] table (image blocks): kpos[s] in [span[t, 0], span[t, 1]] is visible past qpos[t] too,
 * which is how attention_span_backward shares attention_backward's chunk loop; the fused
 * kernels know only the plain rule (the span op never takes them).
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/backend/cuda/kernels/flash_plan.h"
#include "cuda/backend/cuda/kernels/kernels.h"

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

/* The same, four values a thread (hd % 4 == 0) with 32-bit index arithmetic (fewer than 2^31
 * groups of four): 16-byte loads and 8-byte stores, a few integer operations per four values.
 * Every attention call packs q, k, v (and dout) this way, so it is on the training path. */
__global__ void pack_heads4_kernel(void *dst, lt_dtype dt, const float *src, int64_t t0, int Tq,
                                   int heads, int hd4, const float *scale) {
    float s = scale ? *scale : 1.0f;
    const int per_head = Tq * hd4, n = heads * per_head;
    const float4 *s4 = (const float4 *)src + t0 * heads * hd4;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        int h = i / per_head, rem = i - h * per_head, t = rem / hd4, d = rem - t * hd4;
        float4 v = s4[((int64_t)t * heads + h) * hd4 + d];
        v.x *= s, v.y *= s, v.z *= s, v.w *= s;
        if (dt == LT_BF16) {
            __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
            ((uint2 *)dst)[i] = make_uint2(*(uint32_t *)&a, *(uint32_t *)&b);
        } else if (dt == LT_F16) {
            float c[4] = {v.x, v.y, v.z, v.w};
            for (int j = 0; j < 4; j++)
                c[j] = c[j] == c[j] ? fminf(fmaxf(c[j], -65504.0f), 65504.0f) : c[j];
            __half2 a = __floats2half2_rn(c[0], c[1]), b = __floats2half2_rn(c[2], c[3]);
            ((uint2 *)dst)[i] = make_uint2(*(uint32_t *)&a, *(uint32_t *)&b);
        } else {
            ((float4 *)dst)[i] = v;
        }
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
    if (n <= 0) return;
    size_t align = dt == LT_F32 ? 15 : 7;
    if (hd % 4 == 0 && n / 4 < INT_MAX && ((uintptr_t)src & 15) == 0 &&
        ((uintptr_t)dst & align) == 0)
        pack_heads4_kernel<<<blocks_for(n / 4), 256, 0, st>>>(dst, dt, src, t0, (int)Tq, (int)heads,
                                                              (int)(hd / 4), scale);
    else
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

/* The chunked path's mask: backend.h's rule, plus attention_span's extra span [lo, hi] of key
 * positions (lo > hi: none), causality waived inside it but not the window. */
__device__ __forceinline__ bool visible(int32_t qp, int32_t kp, int window, int32_t lo,
                                        int32_t hi) {
    return kp >= 0 && (kp <= qp || (kp >= lo && kp <= hi)) && (window <= 0 || qp - kp < window);
}

/* Query t's span from attention_span's [T, 2] table, or none (span NULL). */
__device__ __forceinline__ void span_of(const int32_t *span, int64_t t, int32_t *lo, int32_t *hi) {
    *lo = span ? span[2 * t] : 1;
    *hi = span ? span[2 * t + 1] : 0;
}

/* One block per score row (h, i). */
__global__ void softmax_masked_kernel(float *scores, void *p, lt_dtype dt, int keep_f32,
                                      const int32_t *qpos, const int32_t *kpos, const int32_t *span,
                                      int64_t t0, int64_t Tq, int64_t S, int window) {
    __shared__ float sh[33];
    int64_t r = blockIdx.x;
    int64_t i = r % Tq;
    int32_t qp = qpos[t0 + i], lo, hi;
    span_of(span, t0 + i, &lo, &hi);
    float *row = scores + r * S;
    float mx = -INFINITY;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
        if (visible(qp, kpos[s], window, lo, hi)) mx = fmaxf(mx, row[s]);
    mx = block_max_f(mx, sh);
    float sum = 0.0f;
    if (mx != -INFINITY)
        for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
            if (visible(qp, kpos[s], window, lo, hi)) sum += expf(row[s] - mx);
    sum = block_sum_f(sum, sh);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
        float v = (mx != -INFINITY && visible(qp, kpos[s], window, lo, hi))
                      ? expf(row[s] - mx) * inv
                      : 0.0f;
        if (p) put(p, dt, r * S + s, v);
        if (keep_f32) row[s] = v;
    }
}

/* The same softmax with the row held in registers (PER values per thread of 256): one read of
 * the scores and one exp per element, for rows up to 256 * PER keys. */
template <int PER>
__global__ void softmax_masked_reg_kernel(float *scores, void *p, lt_dtype dt, int keep_f32,
                                          const int32_t *qpos, const int32_t *kpos,
                                          const int32_t *span, int64_t t0, int64_t Tq, int64_t S,
                                          int window) {
    __shared__ float sh[33];
    int64_t r = blockIdx.x;
    int32_t qp = qpos[t0 + r % Tq], lo, hi;
    span_of(span, t0 + r % Tq, &lo, &hi);
    float *row = scores + r * S;
    float v[PER];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int64_t s = threadIdx.x + (int64_t)i * blockDim.x;
        v[i] = (s < S && visible(qp, kpos[s], window, lo, hi)) ? row[s] : -INFINITY;
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
                      const int32_t *qpos, const int32_t *kpos, const int32_t *span, int64_t t0,
                      int64_t Tq, int64_t heads, int64_t S, int window) {
    int64_t rows = heads * Tq;
    if (rows <= 0) return;
    static int generic =
        -1; /* LATHE_CUDA_SOFTMAX_GENERIC=1: the plain kernel (a fallback switch) */
    if (generic < 0) generic = getenv("LATHE_CUDA_SOFTMAX_GENERIC") != NULL;
    unsigned g = (unsigned)rows;
    if (generic)
        softmax_masked_kernel<<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, span, t0, Tq,
                                                 S, window);
    else if (S <= 256)
        softmax_masked_reg_kernel<1>
            <<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, span, t0, Tq, S, window);
    else if (S <= 512)
        softmax_masked_reg_kernel<2>
            <<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, span, t0, Tq, S, window);
    else if (S <= 1024)
        softmax_masked_reg_kernel<4>
            <<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, span, t0, Tq, S, window);
    else if (S <= 2048)
        softmax_masked_reg_kernel<8>
            <<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, span, t0, Tq, S, window);
    else if (S <= 4096)
        softmax_masked_reg_kernel<16>
            <<<g, 256, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, span, t0, Tq, S, window);
    else {
        int th = S >= 1024 ? 512 : (S >= 256 ? 256 : 128);
        softmax_masked_kernel<<<g, th, 0, st>>>(scores, p, dt, keep_f32, qpos, kpos, span, t0, Tq,
                                                S, window);
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

/* ---- fused (flash-style) attention on the 16-bit paths ------------------------------------------
 *
 * Scores never leave the chip: a block owns 64 rows (queries for the forward and dq kernels, keys
 * for the dk/dv kernel), four warps of 16 rows each, and streams tiles of the other side through
 * shared memory. The tile sizes come from flash_plan.h by the device's shared memory: on a T4
 * (64 KiB) at head dim 256 the forward streams 16-key tiles and the split backward's blocks own
 * 32 rows (two warps). Products run on tensor cores (mma.sync m16n8k16, fp32 accumulation; on sm_75
 * as two m16n8k8, fp16 only); the softmax, its running max and sum, the mask and every output stay
 * fp32. Inputs arrive packed in 16 bits by the caller: q, dout as [nh, T, hd] and k, v as
 * [nkv, S, hd], each times a power-of-two scale on the fp16 path (the inv pointers undo it).
 * Tiles with no visible pair are skipped (the test is exact per key / per query, so any position
 * layout works: causal, sliding window, packed sequences whose positions restart).
 * Head dims: 128, 256, and 72 (the SigLIP image tower's). The kernels take the real head dim HD
 * as a template argument: global memory (the packed inputs, the fp32 outputs) is HD wide, shared
 * tiles FLASH_WIDTH(HD) wide (80 at 72) with zeros past HD. Products that sum over the head dim
 * (Q·Kᵀ, dO·Vᵀ) run over the whole width, where the zeros add nothing, so the scores and the
 * caller's scale are exactly HD's; products that produce head-dim columns (P·V, dS·K, Pᵀ·dO,
 * dSᵀ·Q) stop at HD's nine n-tiles of 8 and write no pad column. Nothing is packed wider than
 * HD, so the pad costs no memory traffic, only a tenth more work in the score products.
 */
#define FA_ROWS FLASH_ROWS /* rows a block owns (the split backward may take 32) */
#define FA_THREADS 128     /* four warps */

template <typename T16> struct fa_pack;
template <> struct fa_pack<__half> {
    static __device__ __forceinline__ uint32_t two(float a, float b) {
        __half2 h = __floats2half2_rn(a, b);
        return *(uint32_t *)&h;
    }
};
template <> struct fa_pack<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t two(float a, float b) {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *(uint32_t *)&h;
    }
};

/* c[16x8] += a[16x16] · b[16x8] (fragments in the PTX m16n8k16 layouts). */
template <typename T16>
__device__ __forceinline__ void fa_mma(float *c, const uint32_t *a, const uint32_t *b);
template <>
__device__ __forceinline__ void fa_mma<__half>(float *c, const uint32_t *a, const uint32_t *b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[2]), "r"(a[3]), "r"(b[1]));
#else
    (void)c, (void)a, (void)b;
#endif
}
template <>
__device__ __forceinline__ void fa_mma<__nv_bfloat16>(float *c, const uint32_t *a,
                                                      const uint32_t *b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)c, (void)a, (void)b; /* never launched below sm_80 (the host checks) */
#endif
}

/* Shared tiles are [rows][FLASH_WIDTH(HD) + FLASH_PAD] 16-bit values, as flash_plan.h sizes
 * them: a row holds the head's HD values, zeros up to the width (HD 72: 80, the next multiple of
 * the k step of 16; fa_zero_pad writes them once, and no load touches them), then the pad, which
 * spreads fragment reads over banks (176 bytes a row at HD 72: eight rows on distinct banks). */
template <int HD> __device__ constexpr int fa_w() {
    return FLASH_WIDTH(HD);
}
template <int HD> __device__ constexpr int fa_ld() {
    return FLASH_WIDTH(HD) + FLASH_PAD;
}
/* How far the k loops over the width unroll: by 4, and HD 72's five steps fully (unrolled by 4
 * they leave a remainder loop, and the dq kernel spills on sm_75). */
template <int HD> __device__ constexpr int fa_kunroll() {
    return fa_w<HD>() / 16 == 5 ? 5 : 4;
}

/* Zeros in columns [HD, FLASH_WIDTH(HD)) of the first rows rows of the tiles at t (nothing
 * where HD is a multiple of 16). Products over the head dim (Q·Kᵀ, dO·Vᵀ) run over the whole
 * width: zero columns add nothing to a score, and zeros in both operands keep whatever else is
 * in shared memory (a NaN pattern) out. Products whose n side is the head dim stop at HD. */
template <int HD, int NT = FA_THREADS>
__device__ __forceinline__ void fa_zero_pad(uint16_t *t, int rows) {
    if constexpr (fa_w<HD>() != HD) {
        constexpr int per = (fa_w<HD>() - HD) / 8;
        for (int i = threadIdx.x; i < rows * per; i += NT) {
            int r = i / per, c = HD + (i - r * per) * 8;
            *(uint4 *)(t + r * fa_ld<HD>() + c) = make_uint4(0, 0, 0, 0);
        }
    }
}

/* dst[r][:] = src[row0 + r][:] for r < rows (zeros past n): src is [n, HD] 16-bit. On sm_80 and
 * newer the copies are asynchronous (cp.async, one commit group per call): fa_wait<N> waits
 * until at most N groups are still in flight. Below sm_80 they are plain loads. */
template <int HD, int NT = FA_THREADS>
__device__ __forceinline__ void fa_load(uint16_t *dst, const uint16_t *src, int row0, int n,
                                        int rows) {
    const int per = HD / 8; /* 16-byte pieces per row */
#pragma unroll 4
    for (int i = threadIdx.x; i < rows * per; i += NT) {
        int r = i / per, c = (i - r * per) * 8;
        uint16_t *d = dst + r * fa_ld<HD>() + c;
        bool in = row0 + r < n;
        const uint16_t *sp = src + (size_t)(in ? row0 + r : 0) * HD + c;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        uint32_t a = (uint32_t)__cvta_generic_to_shared(d);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(sp),
                     "r"(in ? 16 : 0)
                     : "memory");
#else
        *(uint4 *)d = in ? *(const uint4 *)sp : make_uint4(0, 0, 0, 0);
#endif
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void fa_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

/* Fragments come from shared memory through ldmatrix (sm_75 and newer): four 8x8 matrices a
 * call, lane l giving the address of one row of matrix l / 8. */
__device__ __forceinline__ void fa_ldsm(uint32_t *r, const uint16_t *p) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void fa_ldsm_t(uint32_t *r, const uint16_t *p) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

/* A fragment: rows r0..r0+15, columns k0..k0+15 of a row-major tile. */
template <int HD>
__device__ __forceinline__ void fa_frag_a(uint32_t *a, const uint16_t *t, int r0, int k0) {
    const int l = threadIdx.x & 31;
    fa_ldsm(a, t + (r0 + (l & 7) + ((l >> 3) & 1) * 8) * fa_ld<HD>() + k0 + (l >> 4) * 8);
}

/* Two B fragments (k16 x n8, n-tiles n0 and n0 + 8) with B[k][n] = t[n0 + n][k0 + k]: the
 * tile's rows are the n side. b[0..1] is the first n-tile, b[2..3] the second. */
template <int HD>
__device__ __forceinline__ void fa_frag_bt2(uint32_t *b, const uint16_t *t, int n0, int k0) {
    const int l = threadIdx.x & 31;
    fa_ldsm(b, t + (n0 + (l & 7) + (l >> 4) * 8) * fa_ld<HD>() + k0 + ((l >> 3) & 1) * 8);
}

/* Two B fragments with B[k][n] = t[k0 + k][n0 + n]: the tile's rows are the k side. */
template <int HD>
__device__ __forceinline__ void fa_frag_bn2(uint32_t *b, const uint16_t *t, int k0, int n0) {
    const int l = threadIdx.x & 31;
    fa_ldsm_t(b, t + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * fa_ld<HD>() + n0 + (l >> 4) * 8);
}

/* One such fragment (n-tile n0 alone: b[0..1]), two 8x8 matrices; lanes 16..31 repeat the
 * addresses of 0..15, which ldmatrix .x2 does not read. */
template <int HD>
__device__ __forceinline__ void fa_frag_bn1(uint32_t *b, const uint16_t *t, int k0, int n0) {
    const int l = threadIdx.x & 31;
    uint32_t a = (uint32_t)__cvta_generic_to_shared(
        t + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * fa_ld<HD>() + n0);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(a));
}

/* c[n] += a · B_n for the n-tiles n < cnt (cnt <= N, the size of c), B_n[k][j] = t[k0 + k][n0 +
 * 8n + j]: two n-tiles a fragment load, an odd last one alone (HD 72 has nine n-tiles). Where
 * cnt is a constant the branches fold away. */
template <typename T16, int HD, int N>
__device__ __forceinline__ void fa_mma_bn(float (*c)[4], const uint32_t *a, const uint16_t *t,
                                          int k0, int n0, int cnt) {
#pragma unroll
    for (int n = 0; n < N; n += 2) {
        uint32_t b[4];
        if (n + 1 < cnt) {
            fa_frag_bn2<HD>(b, t, k0, n0 + n * 8);
            fa_mma<T16>(c[n], a, b);
            fa_mma<T16>(c[n + 1 < N ? n + 1 : n], a, b + 2);
        } else if (n < cnt) {
            fa_frag_bn1<HD>(b, t, k0, n0 + n * 8);
            fa_mma<T16>(c[n], a, b);
        }
    }
}

/* The same fragments from tiles of any row length ld (the fused backward's [64][BQ + 8] tiles):
 * A with A[m][k] = t[r0 + m][k0 + k], and A read transposed, A[m][k] = t[k0 + k][m0 + m]. */
__device__ __forceinline__ void fa_frag_a_ld(uint32_t *a, const uint16_t *t, int ld, int r0,
                                             int k0) {
    const int l = threadIdx.x & 31;
    fa_ldsm(a, t + (r0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + k0 + (l >> 4) * 8);
}
__device__ __forceinline__ void fa_frag_at(uint32_t *a, const uint16_t *t, int ld, int m0, int k0) {
    const int l = threadIdx.x & 31;
    fa_ldsm_t(a, t + (k0 + (l & 7) + (l >> 4) * 8) * ld + m0 + ((l >> 3) & 1) * 8);
}

/* p[0] += a, p[1] += b in global fp32 (one vector atomic on sm_90 and newer; built with CUDA 13
 * only, since the float2 overload is recent: Colab's CUDA 12 takes the two scalar atomics). */
__device__ __forceinline__ void fa_add2(float *p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && __CUDACC_VER_MAJOR__ >= 13
    atomicAdd((float2 *)p, make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

__device__ __forceinline__ float fa_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float fa_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/* The scale factors of the fp16 path (NULL pointers = 1). dS is carried as dS * F in 16 bits;
 * F brings the scaled dO·Vᵀ (up to hd · 2^30) back near 1. */
struct fa_scales {
    float qk;  /* softmax-domain factor: scale · qinv · kinv · log2(e) (exp2 everywhere) */
    float cp;  /* dS' = P · (dP_raw · cp - D · F) */
    float f;   /* F */
    float vin; /* vinv */
    float din; /* dinv */
    float qin, kin;
};
__device__ __forceinline__ fa_scales fa_scales_make(float scale, const float *qinv,
                                                    const float *kinv, const float *vinv,
                                                    const float *dinv) {
    fa_scales s;
    s.qin = qinv ? *qinv : 1.0f;
    s.kin = kinv ? *kinv : 1.0f;
    s.vin = vinv ? *vinv : 1.0f;
    s.din = dinv ? *dinv : 1.0f;
    s.qk = scale * s.qin * s.kin * 1.4426950408889634f;
    s.f = dinv ? ldexpf(1.0f, -30) / (s.din * s.vin) : 1.0f;
    s.cp = s.din * s.vin * s.f;
    return s;
}

/* Positions of the block's own rows into pos_s (INT_MIN past n) and their min/max into mm. */
template <int ROWS = FA_ROWS>
__device__ __forceinline__ void fa_own_positions(int *pos_s, int *mm, const int32_t *pos, int row0,
                                                 int n, int invalid) {
    if (threadIdx.x == 0) {
        mm[0] = INT_MAX;
        mm[1] = INT_MIN;
    }
    __syncthreads();
    if (threadIdx.x < ROWS) {
        int r = row0 + threadIdx.x;
        int p = r < n ? pos[r] : invalid;
        pos_s[threadIdx.x] = p;
        if (r < n && p >= 0) {
            atomicMin(&mm[0], p);
            atomicMax(&mm[1], p);
        }
    }
    __syncthreads();
}

__device__ __forceinline__ bool fa_visible(int qp, int kp, int window) {
    return kp >= 0 && kp <= qp && (window <= 0 || qp - kp < window);
}

/* Forward. MODE 0: out [T, nh, HD] fp32 = softmax(q·kᵀ)·v. MODE 1 (for the backward): instead
 * lse[h, t] (base 2, in the scaled-score domain; +inf for a row with nothing visible) and
 * dd[h, t] = Σ_d dout · out. Grid (ceil(T/64), nh). */
template <typename T16, int HD, int BN, int MODE>
__global__ void __launch_bounds__(FA_THREADS)
    flash_fwd_kernel(const uint16_t *Qp, const uint16_t *Kp, const uint16_t *Vp, float *out,
                     float *lse, float *dd, const float *dout, const int32_t *qpos,
                     const int32_t *kpos, int T, int S, int nh, int g, int window, float scale,
                     const float *qinv, const float *kinv, const float *vinv) {
    extern __shared__ __align__(16) unsigned char fa_smem[];
    constexpr int LD = fa_ld<HD>();
    uint16_t *Qs = (uint16_t *)fa_smem; /* [64][LD] */
    uint16_t *Ks = Qs + FA_ROWS * LD;   /* [BN][LD] */
    uint16_t *Vs = Ks + BN * LD;        /* [BN][LD] */
    int *qp_s = (int *)(Vs + BN * LD);  /* [64] */
    int *kp_s = qp_s + FA_ROWS;         /* [BN] */
    int *mm = kp_s + BN;                /* [2] */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
    const int h = blockIdx.y, kvh = h / g;
    const int t0 = (gridDim.x - 1 - blockIdx.x) * FA_ROWS; /* the longest rows first */
    const fa_scales sc = fa_scales_make(scale, qinv, kinv, vinv, NULL);
    const uint16_t *Kh = Kp + (size_t)kvh * S * HD, *Vh = Vp + (size_t)kvh * S * HD;
    fa_zero_pad<HD>(Qs, FA_ROWS + 2 * BN);
    fa_load<HD>(Qs, Qp + (size_t)h * T * HD, t0, T, FA_ROWS);
    fa_wait<0>();
    fa_own_positions(qp_s, mm, qpos, t0, T, INT_MIN);
    const int qmin = mm[0], qmax = mm[1];
    const int r0 = warp * 16 + gq;
    const int qp0 = qp_s[r0], qp1 = qp_s[r0 + 8];
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++)
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    int kpre = -1; /* the key tile whose K is in Ks or on its way there */
    for (int s0 = 0; s0 < S; s0 += BN) {
        __syncthreads(); /* the previous tile's V and positions are no longer read */
        int any = 0;
        if (threadIdx.x < BN) {
            int s = s0 + threadIdx.x;
            int p = s < S ? kpos[s] : -1;
            kp_s[threadIdx.x] = p;
            any = p >= 0 && p <= qmax && (window <= 0 || (long long)qmin - p < window);
        }
        if (!__syncthreads_or(any)) continue;
        if (kpre != s0) {
            fa_wait<0>(); /* a prefetch for a skipped tile lands before Ks is written again */
            fa_load<HD>(Ks, Kh, s0, S, BN);
        }
        fa_load<HD>(Vs, Vh, s0, S, BN); /* lands while the scores are computed */
        fa_wait<1>();
        __syncthreads();
        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll(fa_kunroll <HD>())
        for (int kk = 0; kk < fa_w<HD>(); kk += 16) {
            uint32_t a[4];
            fa_frag_a<HD>(a, Qs, warp * 16, kk);
#pragma unroll
            for (int j = 0; j < BN / 8; j += 2) {
                uint32_t b[4];
                fa_frag_bt2<HD>(b, Ks, j * 8, kk);
                fa_mma<T16>(s[j], a, b);
                fa_mma<T16>(s[j + 1], a, b + 2);
            }
        }
        __syncthreads(); /* every warp is done with Ks: the next tile's K lands during the rest */
        kpre = s0 + BN < S ? s0 + BN : -1;
        if (kpre >= 0) fa_load<HD>(Ks, Kh, kpre, S, BN);
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int kp = kp_s[j * 8 + tq * 2 + e];
                s[j][e] = fa_visible(qp0, kp, window) ? s[j][e] * sc.qk : -INFINITY;
                s[j][2 + e] = fa_visible(qp1, kp, window) ? s[j][2 + e] * sc.qk : -INFINITY;
                mx0 = fmaxf(mx0, s[j][e]);
                mx1 = fmaxf(mx1, s[j][2 + e]);
            }
        mx0 = fmaxf(m0, fa_quad_max(mx0));
        mx1 = fmaxf(m1, fa_quad_max(mx1));
        float al0 = mx0 == -INFINITY ? 1.0f : exp2f(m0 - mx0);
        float al1 = mx1 == -INFINITY ? 1.0f : exp2f(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                s[j][e] = s[j][e] == -INFINITY ? 0.0f : exp2f(s[j][e] - m0);
                s[j][2 + e] = s[j][2 + e] == -INFINITY ? 0.0f : exp2f(s[j][2 + e] - m1);
                ps0 += s[j][e];
                ps1 += s[j][2 + e];
            }
        l0 = l0 * al0 + ps0;
        l1 = l1 * al1 + ps1;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            o[n][0] *= al0;
            o[n][1] *= al0;
            o[n][2] *= al1;
            o[n][3] *= al1;
        }
        if (kpre >= 0)
            fa_wait<1>();
        else
            fa_wait<0>();
        __syncthreads(); /* V is in */
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t a[4];
            a[0] = fa_pack<T16>::two(s[2 * kk][0], s[2 * kk][1]);
            a[1] = fa_pack<T16>::two(s[2 * kk][2], s[2 * kk][3]);
            a[2] = fa_pack<T16>::two(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = fa_pack<T16>::two(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            fa_mma_bn<T16, HD, HD / 8>(o, a, Vs, kk * 16, 0, HD / 8);
        }
    }
    fa_wait<0>();
    l0 = fa_quad_sum(l0);
    l1 = fa_quad_sum(l1);
    const float i0 = l0 > 0.0f ? sc.vin / l0 : 0.0f, i1 = l1 > 0.0f ? sc.vin / l1 : 0.0f;
    const int ta = t0 + r0, tb = ta + 8;
    if (MODE == 0) {
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            int d = n * 8 + tq * 2;
            if (ta < T)
                *(float2 *)(out + ((size_t)ta * nh + h) * HD + d) =
                    make_float2(o[n][0] * i0, o[n][1] * i0);
            if (tb < T)
                *(float2 *)(out + ((size_t)tb * nh + h) * HD + d) =
                    make_float2(o[n][2] * i1, o[n][3] * i1);
        }
    } else {
        float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            int d = n * 8 + tq * 2;
            if (ta < T) {
                float2 v = *(const float2 *)(dout + ((size_t)ta * nh + h) * HD + d);
                d0 += v.x * o[n][0] * i0 + v.y * o[n][1] * i0;
            }
            if (tb < T) {
                float2 v = *(const float2 *)(dout + ((size_t)tb * nh + h) * HD + d);
                d1 += v.x * o[n][2] * i1 + v.y * o[n][3] * i1;
            }
        }
        d0 = fa_quad_sum(d0);
        d1 = fa_quad_sum(d1);
        if (tq == 0) {
            if (ta < T) {
                lse[(size_t)h * T + ta] = l0 > 0.0f ? m0 + log2f(l0) : INFINITY;
                dd[(size_t)h * T + ta] = d0;
            }
            if (tb < T) {
                lse[(size_t)h * T + tb] = l1 > 0.0f ? m1 + log2f(l1) : INFINITY;
                dd[(size_t)h * T + tb] = d1;
            }
        }
    }
}

/* Backward, query side: dq [T, nh, HD] fp32 (written). A block owns ROWS queries (64, or 32
 * where shared memory is small: a warp per 16 rows). Grid (ceil(T/ROWS), nh). */
template <typename T16, int HD, int BN, int ROWS>
__global__ void __launch_bounds__(ROWS * 2)
    flash_bwd_dq_kernel(const uint16_t *Qp, const uint16_t *Kp, const uint16_t *Vp,
                        const uint16_t *dOp, const float *lse, const float *dd, float *dq,
                        const int32_t *qpos, const int32_t *kpos, int T, int S, int nh, int g,
                        int window, float scale, const float *qinv, const float *kinv,
                        const float *vinv, const float *dinv) {
    extern __shared__ __align__(16) unsigned char fa_smem[];
    constexpr int LD = fa_ld<HD>();
    uint16_t *Qs = (uint16_t *)fa_smem; /* [ROWS][LD] */
    uint16_t *dOs = Qs + ROWS * LD;     /* [ROWS][LD] */
    uint16_t *Ks = dOs + ROWS * LD;     /* [BN][LD] */
    uint16_t *Vs = Ks + BN * LD;        /* [BN][LD] */
    int *qp_s = (int *)(Vs + BN * LD);  /* [ROWS] */
    int *kp_s = qp_s + ROWS;            /* [BN] */
    int *mm = kp_s + BN;                /* [2] */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
    const int h = blockIdx.y, kvh = h / g;
    const int t0 = (gridDim.x - 1 - blockIdx.x) * ROWS; /* the longest rows first */
    const fa_scales sc = fa_scales_make(scale, qinv, kinv, vinv, dinv);
    const uint16_t *Kh = Kp + (size_t)kvh * S * HD, *Vh = Vp + (size_t)kvh * S * HD;
    fa_zero_pad<HD, ROWS * 2>(Qs, 2 * ROWS + 2 * BN);
    fa_load<HD, ROWS * 2>(Qs, Qp + (size_t)h * T * HD, t0, T, ROWS);
    fa_load<HD, ROWS * 2>(dOs, dOp + (size_t)h * T * HD, t0, T, ROWS);
    fa_wait<0>();
    fa_own_positions<ROWS>(qp_s, mm, qpos, t0, T, INT_MIN);
    const int qmin = mm[0], qmax = mm[1];
    const int r0 = warp * 16 + gq, ta = t0 + r0, tb = ta + 8;
    const int qp0 = qp_s[r0], qp1 = qp_s[r0 + 8];
    const float lse0 = ta < T ? lse[(size_t)h * T + ta] : INFINITY;
    const float lse1 = tb < T ? lse[(size_t)h * T + tb] : INFINITY;
    const float dd0 = ta < T ? dd[(size_t)h * T + ta] * sc.f : 0.0f;
    const float dd1 = tb < T ? dd[(size_t)h * T + tb] * sc.f : 0.0f;
    float acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++)
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    for (int s0 = 0; s0 < S; s0 += BN) {
        __syncthreads();
        int any = 0;
        if (threadIdx.x < BN) {
            int s = s0 + threadIdx.x;
            int p = s < S ? kpos[s] : -1;
            kp_s[threadIdx.x] = p;
            any = p >= 0 && p <= qmax && (window <= 0 || (long long)qmin - p < window);
        }
        if (!__syncthreads_or(any)) continue;
        fa_load<HD, ROWS * 2>(Ks, Kh, s0, S, BN);
        fa_load<HD, ROWS * 2>(Vs, Vh, s0, S, BN); /* lands while the scores are computed */
        fa_wait<1>();
        __syncthreads();
        float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                s[j][e] = dp[j][e] = 0.0f;
#pragma unroll(fa_kunroll <HD>())
        for (int kk = 0; kk < fa_w<HD>(); kk += 16) {
            uint32_t a[4];
            fa_frag_a<HD>(a, Qs, warp * 16, kk);
#pragma unroll
            for (int j = 0; j < BN / 8; j += 2) {
                uint32_t b[4];
                fa_frag_bt2<HD>(b, Ks, j * 8, kk);
                fa_mma<T16>(s[j], a, b);
                fa_mma<T16>(s[j + 1], a, b + 2);
            }
        }
        fa_wait<0>();
        __syncthreads(); /* V is in */
#pragma unroll(fa_kunroll <HD>())
        for (int kk = 0; kk < fa_w<HD>(); kk += 16) {
            uint32_t a[4];
            fa_frag_a<HD>(a, dOs, warp * 16, kk);
#pragma unroll
            for (int j = 0; j < BN / 8; j += 2) {
                uint32_t b[4];
                fa_frag_bt2<HD>(b, Vs, j * 8, kk);
                fa_mma<T16>(dp[j], a, b);
                fa_mma<T16>(dp[j + 1], a, b + 2);
            }
        }
        /* dS' = P · (dP · cp - D · F), P = exp(s · qk - lse) on visible pairs */
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int kp = kp_s[j * 8 + tq * 2 + e];
                float p0 = fa_visible(qp0, kp, window) ? exp2f(s[j][e] * sc.qk - lse0) : 0.0f;
                float p1 = fa_visible(qp1, kp, window) ? exp2f(s[j][2 + e] * sc.qk - lse1) : 0.0f;
                s[j][e] = p0 * (dp[j][e] * sc.cp - dd0);
                s[j][2 + e] = p1 * (dp[j][2 + e] * sc.cp - dd1);
            }
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t a[4];
            a[0] = fa_pack<T16>::two(s[2 * kk][0], s[2 * kk][1]);
            a[1] = fa_pack<T16>::two(s[2 * kk][2], s[2 * kk][3]);
            a[2] = fa_pack<T16>::two(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = fa_pack<T16>::two(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            fa_mma_bn<T16, HD, HD / 8>(acc, a, Ks, kk * 16, 0, HD / 8);
        }
    }
    const float post = scale * sc.kin / sc.f;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        int d = n * 8 + tq * 2;
        if (ta < T)
            *(float2 *)(dq + ((size_t)ta * nh + h) * HD + d) =
                make_float2(acc[n][0] * post, acc[n][1] * post);
        if (tb < T)
            *(float2 *)(dq + ((size_t)tb * nh + h) * HD + d) =
                make_float2(acc[n][2] * post, acc[n][3] * post);
    }
}

/* Backward, key side: dk, dv [S, nkv, HD] fp32, ACCUMULATED with atomics (the caller zeroes
 * them): query head h = blockIdx.z + g · kvh adds its share. DK / DV pick the outputs (one
 * launch each at HD 256, where both accumulators would not fit in registers).
 * A block owns ROWS keys (64, or 32 where shared memory is small). Grid (ceil(S/ROWS), nkv, g). */
template <typename T16, int HD, int BQ, bool DK, bool DV, int ROWS>
__global__ void __launch_bounds__(ROWS * 2)
    flash_bwd_dkv_kernel(const uint16_t *Qp, const uint16_t *Kp, const uint16_t *Vp,
                         const uint16_t *dOp, const float *lse, const float *dd, float *dk,
                         float *dv, const int32_t *qpos, const int32_t *kpos, int T, int S, int nkv,
                         int g, int window, float scale, const float *qinv, const float *kinv,
                         const float *vinv, const float *dinv) {
    extern __shared__ __align__(16) unsigned char fa_smem[];
    constexpr int LD = fa_ld<HD>();
    uint16_t *Ks = (uint16_t *)fa_smem;       /* [ROWS][LD] */
    uint16_t *Vs = Ks + ROWS * LD;            /* [ROWS][LD], DK only */
    uint16_t *Qs = Vs + (DK ? ROWS * LD : 0); /* [BQ][LD] */
    uint16_t *dOs = Qs + BQ * LD;             /* [BQ][LD] */
    float *lse_s = (float *)(dOs + BQ * LD);  /* [BQ] */
    float *dd_s = lse_s + BQ;                 /* [BQ] */
    int *qp_s = (int *)(dd_s + BQ);           /* [BQ] */
    int *kp_s = qp_s + BQ;                    /* [ROWS] */
    int *mm = kp_s + ROWS;                    /* [2] */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
    const int kvh = blockIdx.y, h = kvh * g + blockIdx.z, s0 = blockIdx.x * ROWS;
    const fa_scales sc = fa_scales_make(scale, qinv, kinv, vinv, dinv);
    fa_zero_pad<HD, ROWS * 2>(Ks, ROWS + (DK ? ROWS : 0) + 2 * BQ);
    fa_load<HD, ROWS * 2>(Ks, Kp + (size_t)kvh * S * HD, s0, S, ROWS);
    if (DK) fa_load<HD, ROWS * 2>(Vs, Vp + (size_t)kvh * S * HD, s0, S, ROWS);
    fa_wait<0>();
    fa_own_positions<ROWS>(kp_s, mm, kpos, s0, S, -1);
    const int kmin = mm[0], kmax = mm[1];
    if (kmin == INT_MAX) return; /* no visible key in this block: nothing to add */
    const int r0 = warp * 16 + gq, sa = s0 + r0, sb = sa + 8;
    const int kp0 = kp_s[r0], kp1 = kp_s[r0 + 8];
    const uint16_t *Qh = Qp + (size_t)h * T * HD, *dOh = dOp + (size_t)h * T * HD;
    float ak[DK ? HD / 8 : 1][4], av[DV ? HD / 8 : 1][4];
#pragma unroll
    for (int n = 0; n < (DK ? HD / 8 : 1); n++)
        ak[n][0] = ak[n][1] = ak[n][2] = ak[n][3] = 0.0f;
#pragma unroll
    for (int n = 0; n < (DV ? HD / 8 : 1); n++)
        av[n][0] = av[n][1] = av[n][2] = av[n][3] = 0.0f;
    for (int t0 = 0; t0 < T; t0 += BQ) {
        __syncthreads();
        int any = 0;
        if (threadIdx.x < BQ) {
            int t = t0 + threadIdx.x;
            int p = t < T ? qpos[t] : INT_MIN;
            qp_s[threadIdx.x] = p;
            lse_s[threadIdx.x] = t < T ? lse[(size_t)h * T + t] : INFINITY;
            dd_s[threadIdx.x] = t < T ? dd[(size_t)h * T + t] * sc.f : 0.0f;
            any = t < T && p >= kmin && (window <= 0 || (long long)p - kmax < window);
        }
        if (!__syncthreads_or(any)) continue;
        fa_load<HD, ROWS * 2>(Qs, Qh, t0, T, BQ);
        fa_load<HD, ROWS * 2>(dOs, dOh, t0, T, BQ); /* lands while the scores are computed */
        fa_wait<1>();
        __syncthreads();
        /* transposed scores: rows = this warp's 16 keys, columns = BQ queries */
        float s[BQ / 8][4], dp[DK ? BQ / 8 : 1][4];
#pragma unroll
        for (int j = 0; j < BQ / 8; j++)
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int j = 0; j < (DK ? BQ / 8 : 1); j++)
            dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.0f;
#pragma unroll(fa_kunroll <HD>())
        for (int kk = 0; kk < fa_w<HD>(); kk += 16) {
            uint32_t a[4];
            fa_frag_a<HD>(a, Ks, warp * 16, kk);
#pragma unroll
            for (int j = 0; j < BQ / 8; j += 2) {
                uint32_t b[4];
                fa_frag_bt2<HD>(b, Qs, j * 8, kk);
                fa_mma<T16>(s[j], a, b);
                fa_mma<T16>(s[j + 1], a, b + 2);
            }
        }
        fa_wait<0>();
        __syncthreads(); /* dO is in */
        if (DK) {
#pragma unroll(fa_kunroll <HD>())
            for (int kk = 0; kk < fa_w<HD>(); kk += 16) {
                uint32_t a[4];
                fa_frag_a<HD>(a, Vs, warp * 16, kk);
#pragma unroll
                for (int j = 0; j < BQ / 8; j += 2) {
                    uint32_t b[4];
                    fa_frag_bt2<HD>(b, dOs, j * 8, kk);
                    fa_mma<T16>(dp[DK ? j : 0], a, b);
                    fa_mma<T16>(dp[DK ? j + 1 : 0], a, b + 2);
                }
            }
        }
        /* Pᵀ, then (DK) dSᵀ' = Pᵀ · (dPᵀ · cp - D · F) */
#pragma unroll
        for (int j = 0; j < BQ / 8; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int c = j * 8 + tq * 2 + e, qp = qp_s[c];
                float ls = lse_s[c];
                float p0 = fa_visible(qp, kp0, window) ? exp2f(s[j][e] * sc.qk - ls) : 0.0f;
                float p1 = fa_visible(qp, kp1, window) ? exp2f(s[j][2 + e] * sc.qk - ls) : 0.0f;
                s[j][e] = p0;
                s[j][2 + e] = p1;
                if (DK) {
                    float d = dd_s[c];
                    dp[DK ? j : 0][e] = p0 * (dp[DK ? j : 0][e] * sc.cp - d);
                    dp[DK ? j : 0][2 + e] = p1 * (dp[DK ? j : 0][2 + e] * sc.cp - d);
                }
            }
#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++) {
            if (DV) {
                uint32_t a[4];
                a[0] = fa_pack<T16>::two(s[2 * kk][0], s[2 * kk][1]);
                a[1] = fa_pack<T16>::two(s[2 * kk][2], s[2 * kk][3]);
                a[2] = fa_pack<T16>::two(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                a[3] = fa_pack<T16>::two(s[2 * kk + 1][2], s[2 * kk + 1][3]);
                fa_mma_bn<T16, HD, DV ? HD / 8 : 1>(av, a, dOs, kk * 16, 0, DV ? HD / 8 : 0);
            }
            if (DK) {
                uint32_t a[4];
                const int j0 = DK ? 2 * kk : 0, j1 = DK ? 2 * kk + 1 : 0;
                a[0] = fa_pack<T16>::two(dp[j0][0], dp[j0][1]);
                a[1] = fa_pack<T16>::two(dp[j0][2], dp[j0][3]);
                a[2] = fa_pack<T16>::two(dp[j1][0], dp[j1][1]);
                a[3] = fa_pack<T16>::two(dp[j1][2], dp[j1][3]);
                fa_mma_bn<T16, HD, DK ? HD / 8 : 1>(ak, a, Qs, kk * 16, 0, DK ? HD / 8 : 0);
            }
        }
    }
    const float pk = scale * sc.qin / sc.f, pv = sc.din;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        int d = n * 8 + tq * 2;
        if (DK) {
            if (sa < S) {
                float *p = dk + ((size_t)sa * nkv + kvh) * HD + d;
                atomicAdd(p, ak[DK ? n : 0][0] * pk);
                atomicAdd(p + 1, ak[DK ? n : 0][1] * pk);
            }
            if (sb < S) {
                float *p = dk + ((size_t)sb * nkv + kvh) * HD + d;
                atomicAdd(p, ak[DK ? n : 0][2] * pk);
                atomicAdd(p + 1, ak[DK ? n : 0][3] * pk);
            }
        }
        if (DV) {
            if (sa < S) {
                float *p = dv + ((size_t)sa * nkv + kvh) * HD + d;
                atomicAdd(p, av[DV ? n : 0][0] * pv);
                atomicAdd(p + 1, av[DV ? n : 0][1] * pv);
            }
            if (sb < S) {
                float *p = dv + ((size_t)sb * nkv + kvh) * HD + d;
                atomicAdd(p, av[DV ? n : 0][2] * pv);
                atomicAdd(p + 1, av[DV ? n : 0][3] * pv);
            }
        }
    }
}

/* Backward in one pass over key blocks (FlashAttention-2's order), where shared memory allows
 * (about 155 KiB a block at hd 256, 88 KiB at hd 128, 63 KiB at hd 72, which a T4 takes too): a
 * block owns 64 keys of kv head kvh for query head h = g · kvh + blockIdx.z, keeps their K and V
 * on the chip and streams the visible query tiles (BQ = 64 rows): Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ give Pᵀ
 * and dSᵀ, staged in shared memory in 16 bits; then dV += Pᵀ·dO and dK += dSᵀ·Q stay in registers,
 * and dQ += dS·K leaves through fp32 atomics. Five products per tile pair where the split kernels
 * above need eight. Eight warps: warp w takes key rows 16 · (w % 4) (query rows for dQ) and half of
 * the columns (w / 4) of every product (of HD 72's nine head-dim n-tiles, five and four). The next
 * tile's dO and Q load while dK and dQ are computed. dq, dk, dv are ACCUMULATED (the caller zeroes
 * them). Grid (ceil(S/64), nkv, g). */
#define FB_THREADS 256
#define FB_BQ FLASH_FB_BQ

/* The first query tile at or after t0 with a row that can see a key in [kmin, kmax] (T if
 * none). A block-wide barrier. */
__device__ __forceinline__ int fb_next_tile(int t0, int T, const int32_t *qpos, int kmin, int kmax,
                                            int window) {
    for (; t0 < T; t0 += FB_BQ) {
        int any = 0;
        if (threadIdx.x < FB_BQ && t0 + (int)threadIdx.x < T) {
            int p = qpos[t0 + threadIdx.x];
            any = p >= kmin && (window <= 0 || (long long)p - kmax < window);
        }
        if (__syncthreads_or(any)) break;
    }
    return t0 < T ? t0 : T;
}

template <typename T16, int HD>
__global__ void __launch_bounds__(FB_THREADS)
    flash_bwd_kernel(const uint16_t *Qp, const uint16_t *Kp, const uint16_t *Vp,
                     const uint16_t *dOp, const float *lse, const float *dd, float *dq, float *dk,
                     float *dv, const int32_t *qpos, const int32_t *kpos, int T, int S, int nh,
                     int nkv, int g, int window, float scale, const float *qinv, const float *kinv,
                     const float *vinv, const float *dinv) {
    extern __shared__ __align__(16) unsigned char fa_smem[];
    constexpr int BQ = FB_BQ, LD = fa_ld<HD>(), LP = BQ + FLASH_PAD, QH = BQ / 2;
    /* where the head dim is the n side, warp column wc takes n-tiles [wc · NH, wc · NH + cnt):
     * halves at HD 128 and 256, five and four of HD 72's nine (EVEN: halves of even counts,
     * every count a constant) */
    constexpr int NT = HD / 8, NH = (NT + 1) / 2;
    constexpr bool EVEN = NT % 4 == 0;
    uint16_t *Ks = (uint16_t *)fa_smem;           /* [64][LD] */
    uint16_t *Vs = Ks + FA_ROWS * LD;             /* [64][LD] */
    uint16_t *Qs = Vs + FA_ROWS * LD;             /* [BQ][LD] */
    uint16_t *dOs = Qs + BQ * LD;                 /* [BQ][LD] */
    uint16_t *Ps = dOs + BQ * LD;                 /* [64][LP]: Pᵀ, keys x queries */
    uint16_t *dSs = Ps + FA_ROWS * LP;            /* [64][LP]: dSᵀ (times F) */
    float *lse_s = (float *)(dSs + FA_ROWS * LP); /* [BQ] */
    float *dd_s = lse_s + BQ;                     /* [BQ] */
    int *qp_s = (int *)(dd_s + BQ);               /* [BQ] */
    int *kp_s = qp_s + BQ;                        /* [64] */
    int *mm = kp_s + FA_ROWS;                     /* [2] */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
    const int wr = warp & 3, wc = warp >> 2;
    const int cnt = EVEN ? NH : (wc ? NT - NH : NH), cb = wc * NH * 8;
    const int kvh = blockIdx.y, h = kvh * g + blockIdx.z, s0 = blockIdx.x * FA_ROWS;
    const fa_scales sc = fa_scales_make(scale, qinv, kinv, vinv, dinv);
    fa_zero_pad<HD, FB_THREADS>(Ks, 2 * FA_ROWS + 2 * BQ);
    fa_load<HD, FB_THREADS>(Ks, Kp + (size_t)kvh * S * HD, s0, S, FA_ROWS);
    fa_load<HD, FB_THREADS>(Vs, Vp + (size_t)kvh * S * HD, s0, S, FA_ROWS);
    fa_own_positions(kp_s, mm, kpos, s0, S, -1);
    const int kmin = mm[0], kmax = mm[1];
    const uint16_t *Qh = Qp + (size_t)h * T * HD, *dOh = dOp + (size_t)h * T * HD;
    int t0 = kmin == INT_MAX ? T : fb_next_tile(0, T, qpos, kmin, kmax, window);
    if (t0 >= T) { /* no visible pair: nothing to add */
        fa_wait<0>();
        return;
    }
    /* tile metadata (positions, lse, D) into shared memory; read after the next barrier */
    auto meta = [&](int tt) {
        if (threadIdx.x < BQ) {
            int t = tt + threadIdx.x;
            qp_s[threadIdx.x] = t < T ? qpos[t] : INT_MIN;
            lse_s[threadIdx.x] = t < T ? lse[(size_t)h * T + t] : INFINITY;
            dd_s[threadIdx.x] = t < T ? dd[(size_t)h * T + t] * sc.f : 0.0f;
        }
    };
    meta(t0);
    fa_load<HD, FB_THREADS>(dOs, dOh, t0, T, BQ);
    fa_load<HD, FB_THREADS>(Qs, Qh, t0, T, BQ);
    const int r0 = wr * 16 + gq; /* this thread's key rows r0, r0 + 8 (query rows in dQ) */
    const int kp0 = kp_s[r0], kp1 = kp_s[r0 + 8];
    float ak[NH][4], av[NH][4];
#pragma unroll
    for (int n = 0; n < NH; n++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            ak[n][e] = av[n][e] = 0.0f;
    const float pq = scale * sc.kin / sc.f;
    while (t0 < T) {
        fa_wait<0>();
        __syncthreads(); /* Q, dO and the metadata are in; the last tile's dS is read */
        float s[QH / 8][4], dp[QH / 8][4];
#pragma unroll
        for (int j = 0; j < QH / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                s[j][e] = dp[j][e] = 0.0f;
#pragma unroll(fa_kunroll <HD>())
        for (int kk = 0; kk < fa_w<HD>(); kk += 16) {
            uint32_t a[4], b[4];
            fa_frag_a<HD>(a, Ks, wr * 16, kk);
#pragma unroll
            for (int j = 0; j < QH / 8; j += 2) {
                fa_frag_bt2<HD>(b, Qs, wc * QH + j * 8, kk);
                fa_mma<T16>(s[j], a, b);
                fa_mma<T16>(s[j + 1], a, b + 2);
            }
            fa_frag_a<HD>(a, Vs, wr * 16, kk);
#pragma unroll
            for (int j = 0; j < QH / 8; j += 2) {
                fa_frag_bt2<HD>(b, dOs, wc * QH + j * 8, kk);
                fa_mma<T16>(dp[j], a, b);
                fa_mma<T16>(dp[j + 1], a, b + 2);
            }
        }
        /* Pᵀ and dSᵀ' = Pᵀ · (dPᵀ · cp - D · F), to shared memory */
#pragma unroll
        for (int j = 0; j < QH / 8; j++) {
            const int c = wc * QH + j * 8 + tq * 2;
            float p[4], d[4];
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int qp = qp_s[c + e];
                const float ls = lse_s[c + e], dc = dd_s[c + e];
                p[e] = fa_visible(qp, kp0, window) ? exp2f(s[j][e] * sc.qk - ls) : 0.0f;
                p[2 + e] = fa_visible(qp, kp1, window) ? exp2f(s[j][2 + e] * sc.qk - ls) : 0.0f;
                d[e] = p[e] * (dp[j][e] * sc.cp - dc);
                d[2 + e] = p[2 + e] * (dp[j][2 + e] * sc.cp - dc);
            }
            *(uint32_t *)(Ps + r0 * LP + c) = fa_pack<T16>::two(p[0], p[1]);
            *(uint32_t *)(Ps + (r0 + 8) * LP + c) = fa_pack<T16>::two(p[2], p[3]);
            *(uint32_t *)(dSs + r0 * LP + c) = fa_pack<T16>::two(d[0], d[1]);
            *(uint32_t *)(dSs + (r0 + 8) * LP + c) = fa_pack<T16>::two(d[2], d[3]);
        }
        __syncthreads();
        /* dV += Pᵀ · dO */
#pragma unroll
        for (int kk = 0; kk < BQ; kk += 16) {
            uint32_t a[4];
            fa_frag_a_ld(a, Ps, LP, wr * 16, kk);
            fa_mma_bn<T16, HD, NH>(av, a, dOs, kk, cb, cnt);
        }
        const int tn = fb_next_tile(t0 + BQ, T, qpos, kmin, kmax, window); /* a barrier: dO free */
        if (tn < T) fa_load<HD, FB_THREADS>(dOs, dOh, tn, T, BQ);
            /* dK += dSᵀ · Q */
#pragma unroll
        for (int kk = 0; kk < BQ; kk += 16) {
            uint32_t a[4];
            fa_frag_a_ld(a, dSs, LP, wr * 16, kk);
            fa_mma_bn<T16, HD, NH>(ak, a, Qs, kk, cb, cnt);
        }
        __syncthreads(); /* Q and the metadata are free */
        if (tn < T) {
            meta(tn);
            fa_load<HD, FB_THREADS>(Qs, Qh, tn, T, BQ);
        }
        /* dQ += dS · K: query rows r0, r0 + 8 of the tile, 16 columns at a time */
        uint32_t a[FA_ROWS / 16][4];
#pragma unroll
        for (int kk = 0; kk < FA_ROWS / 16; kk++)
            fa_frag_at(a[kk], dSs, LP, wr * 16, kk * 16);
        const int ta = t0 + r0, tb = ta + 8;
        float *qa = dq + ((size_t)ta * nh + h) * HD, *qb = dq + ((size_t)tb * nh + h) * HD;
#pragma unroll 2
        for (int n = 0; n < NH; n += 2) {
            if (!EVEN && n >= cnt) break;
            const int m = EVEN ? 2 : min(2, cnt - n); /* n-tiles this step: two, or one */
            float c[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int kk = 0; kk < FA_ROWS / 16; kk++)
                fa_mma_bn<T16, HD, 2>(c, a[kk], Ks, kk * 16, cb + n * 8, m);
#pragma unroll
            for (int i = 0; i < 2; i++) {
                if (i >= m) break;
                const int d = cb + (n + i) * 8 + tq * 2;
                if (ta < T) fa_add2(qa + d, c[i][0] * pq, c[i][1] * pq);
                if (tb < T) fa_add2(qb + d, c[i][2] * pq, c[i][3] * pq);
            }
        }
        t0 = tn;
    }
    const float pk = scale * sc.qin / sc.f, pv = sc.din;
    const int sa = s0 + r0, sb = sa + 8;
#pragma unroll
    for (int n = 0; n < NH; n++) {
        if (!EVEN && n >= cnt) break;
        const int d = cb + n * 8 + tq * 2;
        if (sa < S) {
            fa_add2(dk + ((size_t)sa * nkv + kvh) * HD + d, ak[n][0] * pk, ak[n][1] * pk);
            fa_add2(dv + ((size_t)sa * nkv + kvh) * HD + d, av[n][0] * pv, av[n][1] * pv);
        }
        if (sb < S) {
            fa_add2(dk + ((size_t)sb * nkv + kvh) * HD + d, ak[n][2] * pk, ak[n][3] * pk);
            fa_add2(dv + ((size_t)sb * nkv + kvh) * HD + d, av[n][2] * pv, av[n][3] * pv);
        }
    }
}

/* ---- launchers ---- */

int k_flash_supported(lt_dtype dt, int hd, int cc, size_t smem_optin, int backward) {
    if (dt == LT_BF16 ? cc < 80 : (dt != LT_F16 || cc < 75)) return 0;
    flash_plan p;
    return flash_plan_make(hd, smem_optin, &p) && flash_plan_fits(&p, backward);
}

template <typename K> static void fa_smem_attr(K kernel, size_t bytes) {
    if (bytes > 48 * 1024)
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

template <typename T16, int HD, int BN>
static void fa_forward_bn(cudaStream_t st, const void *Qp, const void *Kp, const void *Vp,
                          float *out, float *lse, float *dd, const float *dout, const int32_t *qpos,
                          const int32_t *kpos, int T, int S, int nh, int nkv, int window,
                          float scale, const float *qinv, const float *kinv, const float *vinv) {
    size_t sm = flash_fwd_smem(HD, FA_ROWS, BN);
    dim3 grid((unsigned)((T + FA_ROWS - 1) / FA_ROWS), (unsigned)nh);
    auto k = lse ? flash_fwd_kernel<T16, HD, BN, 1> : flash_fwd_kernel<T16, HD, BN, 0>;
    fa_smem_attr(k, sm);
    k<<<grid, FA_THREADS, sm, st>>>((const uint16_t *)Qp, (const uint16_t *)Kp,
                                    (const uint16_t *)Vp, out, lse, dd, dout, qpos, kpos, T, S, nh,
                                    nh / nkv, window, scale, qinv, kinv, vinv);
}

/* The forward with the plan's key tile: 64 wherever it fits (always at hd 72 and 128); at hd 256,
 * 32 on 99 KiB devices (sm_86, sm_89) and 16 on a T4. */
template <typename T16, int HD>
static void fa_forward_t(cudaStream_t st, const void *Qp, const void *Kp, const void *Vp,
                         float *out, float *lse, float *dd, const float *dout, const int32_t *qpos,
                         const int32_t *kpos, int T, int S, int nh, int nkv, int window,
                         float scale, const float *qinv, const float *kinv, const float *vinv,
                         const flash_plan *p) {
#define FA_FWD_ARGS                                                                                \
    st, Qp, Kp, Vp, out, lse, dd, dout, qpos, kpos, T, S, nh, nkv, window, scale, qinv, kinv, vinv
    if constexpr (HD <= 128)
        fa_forward_bn<T16, HD, 64>(FA_FWD_ARGS);
    else if (p->fwd_bn == 64)
        fa_forward_bn<T16, HD, 64>(FA_FWD_ARGS);
    else if (p->fwd_bn == 32)
        fa_forward_bn<T16, HD, 32>(FA_FWD_ARGS);
    else
        fa_forward_bn<T16, HD, 16>(FA_FWD_ARGS);
#undef FA_FWD_ARGS
}

void k_flash_forward(cudaStream_t st, lt_dtype dt, int hd, const void *Qp, const void *Kp,
                     const void *Vp, float *out, float *lse, float *dd, const float *dout,
                     const int32_t *qpos, const int32_t *kpos, int T, int S, int nh, int nkv,
                     int window, float scale, const float *qinv, const float *kinv,
                     const float *vinv, size_t smem_optin) {
    flash_plan p;
    if (T <= 0 || !flash_plan_make(hd, smem_optin, &p)) return;
#define FA_FWD(T16, HD)                                                                            \
    fa_forward_t<T16, HD>(st, Qp, Kp, Vp, out, lse, dd, dout, qpos, kpos, T, S, nh, nkv, window,   \
                          scale, qinv, kinv, vinv, &p)
    if (dt == LT_BF16) {
        if (hd == 72)
            FA_FWD(__nv_bfloat16, 72);
        else if (hd == 128)
            FA_FWD(__nv_bfloat16, 128);
        else
            FA_FWD(__nv_bfloat16, 256);
    } else {
        if (hd == 72)
            FA_FWD(__half, 72);
        else if (hd == 128)
            FA_FWD(__half, 128);
        else
            FA_FWD(__half, 256);
    }
#undef FA_FWD
}

template <typename T16, int HD, int BN, int ROWS>
static void fa_dq_launch(cudaStream_t st, const uint16_t *Qp, const uint16_t *Kp,
                         const uint16_t *Vp, const uint16_t *dOp, const float *lse, const float *dd,
                         float *dq, const int32_t *qpos, const int32_t *kpos, int T, int S, int nh,
                         int nkv, int window, float scale, const float *qinv, const float *kinv,
                         const float *vinv, const float *dinv) {
    size_t sm = flash_dq_smem(HD, ROWS, BN);
    auto k = flash_bwd_dq_kernel<T16, HD, BN, ROWS>;
    fa_smem_attr(k, sm);
    dim3 grid((unsigned)((T + ROWS - 1) / ROWS), (unsigned)nh);
    k<<<grid, ROWS * 2, sm, st>>>(Qp, Kp, Vp, dOp, lse, dd, dq, qpos, kpos, T, S, nh, nh / nkv,
                                  window, scale, qinv, kinv, vinv, dinv);
}

template <typename T16, int HD, int BQ, bool DK, bool DV, int ROWS>
static void fa_dkv_launch(cudaStream_t st, const uint16_t *Qp, const uint16_t *Kp,
                          const uint16_t *Vp, const uint16_t *dOp, const float *lse,
                          const float *dd, float *dk, float *dv, const int32_t *qpos,
                          const int32_t *kpos, int T, int S, int nh, int nkv, int window,
                          float scale, const float *qinv, const float *kinv, const float *vinv,
                          const float *dinv) {
    size_t sm = flash_dkv_smem(HD, ROWS, BQ, DK);
    auto k = flash_bwd_dkv_kernel<T16, HD, BQ, DK, DV, ROWS>;
    fa_smem_attr(k, sm);
    dim3 grid((unsigned)((S + ROWS - 1) / ROWS), (unsigned)nkv, (unsigned)(nh / nkv));
    k<<<grid, ROWS * 2, sm, st>>>(Qp, Kp, Vp, dOp, lse, dd, dk, dv, qpos, kpos, T, S, nkv, nh / nkv,
                                  window, scale, qinv, kinv, vinv, dinv);
}

/* Whether the backward takes the one-pass kernel (flash_bwd_kernel): where the plan says it fits.
 * LATHE_CUDA_FLASH_BWD=split keeps the three-kernel one (a fallback switch, and for A/B runs). */
static int fa_bwd_fused(const flash_plan *p) {
    static int split = -1;
    if (split < 0) {
        const char *e = getenv("LATHE_CUDA_FLASH_BWD");
        split = e && strcmp(e, "split") == 0;
    }
    return !split && p->bwd_fused;
}

/* The split backward's tiles, from the plan (flash_plan.h): hd 72 and 128 take 64-row blocks
 * with 64- or 32-row tiles; hd 256 takes 64-row blocks with 32- or 16-row tiles, or on a T4
 * 32-row blocks with 16-row tiles. dK and dV in one launch up to hd 128, one launch each at hd
 * 256. */
#define FA_SPLIT_ARGS                                                                              \
    st, Qp, Kp, Vp, dOp, lse, dd, dq, qpos, kpos, T, S, nh, nkv, window, scale, qinv, kinv, vinv,  \
        dinv
#define FA_KV_ARGS                                                                                 \
    st, Qp, Kp, Vp, dOp, lse, dd, dk, dv, qpos, kpos, T, S, nh, nkv, window, scale, qinv, kinv,    \
        vinv, dinv
template <typename T16, int HD, int BQ, int ROWS>
static void fa_dkv_split(cudaStream_t st, const uint16_t *Qp, const uint16_t *Kp,
                         const uint16_t *Vp, const uint16_t *dOp, const float *lse, const float *dd,
                         float *dk, float *dv, const int32_t *qpos, const int32_t *kpos, int T,
                         int S, int nh, int nkv, int window, float scale, const float *qinv,
                         const float *kinv, const float *vinv, const float *dinv) {
    if constexpr (HD <= 128) {
        if (dk && dv) {
            fa_dkv_launch<T16, HD, BQ, true, true, ROWS>(FA_KV_ARGS);
            return;
        }
    }
    if (dv) fa_dkv_launch<T16, HD, BQ, false, true, ROWS>(FA_KV_ARGS);
    if (dk) fa_dkv_launch<T16, HD, BQ, true, false, ROWS>(FA_KV_ARGS);
}

template <typename T16, int HD>
static void fa_backward_t(cudaStream_t st, const void *Qv, const void *Kv, const void *Vv,
                          const void *dOv, const float *lse, const float *dd, float *dq, float *dk,
                          float *dv, const int32_t *qpos, const int32_t *kpos, int T, int S, int nh,
                          int nkv, int window, float scale, const float *qinv, const float *kinv,
                          const float *vinv, const float *dinv, const flash_plan *p) {
    const uint16_t *Qp = (const uint16_t *)Qv, *Kp = (const uint16_t *)Kv,
                   *Vp = (const uint16_t *)Vv, *dOp = (const uint16_t *)dOv;
    if (dq && dk && dv && fa_bwd_fused(p)) {
        size_t sm = flash_bwd_smem(HD);
        auto k = flash_bwd_kernel<T16, HD>;
        fa_smem_attr(k, sm);
        dim3 grid((unsigned)((S + FA_ROWS - 1) / FA_ROWS), (unsigned)nkv, (unsigned)(nh / nkv));
        k<<<grid, FB_THREADS, sm, st>>>(Qp, Kp, Vp, dOp, lse, dd, dq, dk, dv, qpos, kpos, T, S, nh,
                                        nkv, nh / nkv, window, scale, qinv, kinv, vinv, dinv);
        return;
    }
    if constexpr (HD <= 128) {
        if (dq) {
            if (p->dq_bn == 64)
                fa_dq_launch<T16, HD, 64, 64>(FA_SPLIT_ARGS);
            else
                fa_dq_launch<T16, HD, 32, 64>(FA_SPLIT_ARGS);
        }
        if (p->dkv_bq == 64)
            fa_dkv_split<T16, HD, 64, 64>(FA_KV_ARGS);
        else
            fa_dkv_split<T16, HD, 32, 64>(FA_KV_ARGS);
    } else {
        if (dq) {
            if (p->dq_rows == 64 && p->dq_bn == 32)
                fa_dq_launch<T16, HD, 32, 64>(FA_SPLIT_ARGS);
            else if (p->dq_rows == 64)
                fa_dq_launch<T16, HD, 16, 64>(FA_SPLIT_ARGS);
            else
                fa_dq_launch<T16, HD, 16, 32>(FA_SPLIT_ARGS);
        }
        if (p->dkv_rows == 64 && p->dkv_bq == 32)
            fa_dkv_split<T16, HD, 32, 64>(FA_KV_ARGS);
        else if (p->dkv_rows == 64)
            fa_dkv_split<T16, HD, 16, 64>(FA_KV_ARGS);
        else
            fa_dkv_split<T16, HD, 16, 32>(FA_KV_ARGS);
    }
}
#undef FA_SPLIT_ARGS
#undef FA_KV_ARGS

void k_flash_backward(cudaStream_t st, lt_dtype dt, int hd, const void *Qp, const void *Kp,
                      const void *Vp, const void *dOp, const float *lse, const float *dd, float *dq,
                      float *dk, float *dv, const int32_t *qpos, const int32_t *kpos, int T, int S,
                      int nh, int nkv, int window, float scale, const float *qinv,
                      const float *kinv, const float *vinv, const float *dinv, size_t smem_optin) {
    flash_plan p;
    if (T <= 0 || S <= 0 || !flash_plan_make(hd, smem_optin, &p)) return;
#define FA_BWD(T16, HD)                                                                            \
    fa_backward_t<T16, HD>(st, Qp, Kp, Vp, dOp, lse, dd, dq, dk, dv, qpos, kpos, T, S, nh, nkv,    \
                           window, scale, qinv, kinv, vinv, dinv, &p)
    if (dt == LT_BF16) {
        if (hd == 72)
            FA_BWD(__nv_bfloat16, 72);
        else if (hd == 128)
            FA_BWD(__nv_bfloat16, 128);
        else
            FA_BWD(__nv_bfloat16, 256);
    } else {
        if (hd == 72)
            FA_BWD(__half, 72);
        else if (hd == 128)
            FA_BWD(__half, 128);
        else
            FA_BWD(__half, 256);
    }
#undef FA_BWD
}

/* ---- attention_rows: one decode query per row, each over its own ring cache -------------------
 * backend.h's contract: row rows[i] of kc, vc ([N, S, nkv, hd] fp32) holds positions 0..qpos[i],
 * position p in slot p % S; slot s is visible iff d = (qpos[i] - s) mod S satisfies d <= qpos[i]
 * and (window <= 0 || d < window). The append writes the rows' new K/V first (same stream).
 * Then flash-decoding: block (b, h, i) takes keys [b*kpb, (b+1)*kpb) for query i's head h (kpb
 * from 32 keys, doubled while the grid would pass AR_BLOCKS blocks: short chains per warp, the
 * whole GPU busy at 8 rows), each warp a strided share of them with an online softmax in fp32 (q
 * and the output row spread over the lanes, hd / 32 values each); the warps merge in shared memory
 * into a partial (max, sum, unnormalised output) and a second kernel merges the partials of every
 * block. A row outside [0, N) or a negative position (the CPU refuses them) writes nothing and
 * reads zeros. */

#define AR_WARPS 4
#define AR_BLOCKS 2048
#define AR_MAXV 8 /* values per lane: hd <= 256 */

__global__ void rows_append_kernel(float *kc, float *vc, const float *kn, const float *vn,
                                   const int32_t *rows, const int32_t *qpos, int R, int N, int S,
                                   int tok) {
    int64_t n = (int64_t)R * tok;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int r = (int)(i / tok), e = (int)(i - (int64_t)r * tok), row = rows[r], qp = qpos[r];
        if (row < 0 || row >= N || qp < 0) continue;
        int64_t at = ((int64_t)row * S + qp % S) * tok + e;
        kc[at] = kn[i];
        vc[at] = vn[i];
    }
}

__global__ void __launch_bounds__(AR_WARPS * 32)
    rows_attend_kernel(float *part, const float *q, const float *kc, const float *vc,
                       const int32_t *rows, const int32_t *qpos, int N, int S, int nh, int nkv,
                       int hd, int window, float scale, int kpb) {
    __shared__ float sm[AR_WARPS][2 + AR_MAXV * 32];
    const int b = blockIdx.x, h = blockIdx.y, i = blockIdx.z, n_split = gridDim.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = rows[i], qp = qpos[i], kh = h / (nh / nkv);
    const bool valid = row >= 0 && row < N && qp >= 0;
    const float *qr = q + ((int64_t)i * nh + h) * hd;
    float qv[AR_MAXV], acc[AR_MAXV];
#pragma unroll
    for (int j = 0; j < AR_MAXV; j++) {
        int d = lane + 32 * j;
        qv[j] = d < hd ? qr[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int64_t kvs = (int64_t)nkv * hd;
    const int s0 = b * kpb, s1 = min(S, s0 + kpb);
    const float *kb = kc + (valid ? (int64_t)row : 0) * S * kvs + (int64_t)kh * hd;
    const float *vb = vc + (valid ? (int64_t)row : 0) * S * kvs + (int64_t)kh * hd;
    for (int s = s0 + warp; valid && s < s1; s += AR_WARPS) { /* s is the same across a warp */
        int d = ((qp - s) % S + S) % S;
        if (d > qp || (window > 0 && d >= window)) continue;
        const float *kr = kb + (int64_t)s * kvs, *vr = vb + (int64_t)s * kvs;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < AR_MAXV; j++)
            if (lane + 32 * j < hd) dot += qv[j] * kr[lane + 32 * j];
#pragma unroll
        for (int off = 16; off; off >>= 1)
            dot += __shfl_xor_sync(0xffffffffu, dot, off);
        float sc = dot * scale, mn = fmaxf(m, sc), corr = expf(m - mn), p = expf(sc - mn);
        l = l * corr + p;
#pragma unroll
        for (int j = 0; j < AR_MAXV; j++)
            if (lane + 32 * j < hd) acc[j] = acc[j] * corr + p * vr[lane + 32 * j];
        m = mn;
    }
    if (lane == 0) {
        sm[warp][0] = m;
        sm[warp][1] = l;
    }
#pragma unroll
    for (int j = 0; j < AR_MAXV; j++)
        if (lane + 32 * j < hd) sm[warp][2 + lane + 32 * j] = acc[j];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < AR_WARPS; w++)
        M = fmaxf(M, sm[w][0]);
    float *dst = part + (((int64_t)i * nh + h) * n_split + b) * (hd + 2);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < AR_WARPS; w++)
            if (sm[w][0] != -INFINITY) o += sm[w][2 + d] * expf(sm[w][0] - M);
        dst[2 + d] = o;
    }
    if (threadIdx.x == 0) {
        float L = 0.0f;
        for (int w = 0; w < AR_WARPS; w++)
            if (sm[w][0] != -INFINITY) L += sm[w][1] * expf(sm[w][0] - M);
        dst[0] = M;
        dst[1] = L;
    }
}

/* out[(i*nh + h)*hd + d] from the n_split partials of query i, head h (block i*nh + h). */
__global__ void rows_combine_kernel(float *out, const float *part, int n_split, int hd) {
    const int64_t ih = blockIdx.x;
    const float *p = part + ih * n_split * (hd + 2);
    float M = -INFINITY, L = 0.0f;
    for (int b = 0; b < n_split; b++)
        M = fmaxf(M, p[(int64_t)b * (hd + 2)]);
    for (int b = 0; b < n_split; b++) {
        float mb = p[(int64_t)b * (hd + 2)];
        if (mb != -INFINITY) L += p[(int64_t)b * (hd + 2) + 1] * expf(mb - M);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int b = 0; b < n_split; b++) {
            float mb = p[(int64_t)b * (hd + 2)];
            if (mb != -INFINITY) o += p[(int64_t)b * (hd + 2) + 2 + d] * expf(mb - M);
        }
        out[ih * hd + d] = L > 0.0f ? o / L : 0.0f;
    }
}

/* Keys per block of rows_attend_kernel, and how many blocks a query head takes. */
static int rows_keys_per_block(int R, int S, int nh, int *n_split) {
    int kpb = 32;
    while (kpb < 4096 && (int64_t)R * nh * ((S + kpb - 1) / kpb) > AR_BLOCKS)
        kpb *= 2;
    *n_split = (S + kpb - 1) / kpb;
    return kpb;
}

size_t k_attention_rows_scratch(int R, int S, int nh, int hd) {
    int n_split;
    rows_keys_per_block(R, S, nh, &n_split);
    return sizeof(float) * (size_t)R * (size_t)nh * (size_t)n_split * (size_t)(hd + 2);
}

void k_attention_rows(cudaStream_t st, float *out, const float *q, const float *kn, const float *vn,
                      float *kc, float *vc, const int32_t *rows, const int32_t *qpos, int R, int N,
                      int S, int nh, int nkv, int hd, int window, float scale, float *part) {
    if (R <= 0 || S <= 0) return;
    int tok = nkv * hd;
    rows_append_kernel<<<blocks_for((int64_t)R * tok), 256, 0, st>>>(kc, vc, kn, vn, rows, qpos, R,
                                                                     N, S, tok);
    int n_split, kpb = rows_keys_per_block(R, S, nh, &n_split);
    rows_attend_kernel<<<dim3((unsigned)n_split, (unsigned)nh, (unsigned)R), AR_WARPS * 32, 0,
                         st>>>(part, q, kc, vc, rows, qpos, N, S, nh, nkv, hd, window, scale, kpb);
    unsigned threads = hd < 256 ? (unsigned)((hd + 31) / 32) * 32 : 256;
    rows_combine_kernel<<<(unsigned)(R * nh), threads, 0, st>>>(out, part, n_split, hd);
}
