/* norm_rope.cu — Gemma RMSNorm (forward, backward) and rotate-half RoPE (forward, inverse), and
 * the decode step's fused forms of them (a sublayer's norm + add + norm; q/k norm + RoPE).
 *
 * Owns these kernels and their launchers (kernels.h). All math fp32, as in backend_cpu.c, whose
 * cpu_rmsnorm / cpu_rope are the specification. The RoPE frequencies come in from the host
 * (computed there with the CPU's expression) so that both backends rotate by the same angles.
 */
#include <cuda_bf16.h>
#include <stdint.h>

#include "cuda/backend/cuda/kernels/kernels.h"

/* The norm's output: fp32, or bf16 (round to nearest even) for a matmul-only activation. */
template <bool BF> struct norm_out;
template <> struct norm_out<false> {
    typedef float T;
    typedef float4 T4;
    static __device__ __forceinline__ float one(float v) {
        return v;
    }
    static __device__ __forceinline__ float4 four(float4 v) {
        return v;
    }
};
template <> struct norm_out<true> {
    typedef __nv_bfloat16 T;
    typedef uint2 T4;
    static __device__ __forceinline__ __nv_bfloat16 one(float v) {
        return __float2bfloat16_rn(v);
    }
    static __device__ __forceinline__ uint2 four(float4 v) {
        __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
        return make_uint2(*(uint32_t *)&a, *(uint32_t *)&b);
    }
};

/* Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result. */
__device__ float block_sum(float v, float *sh /* [33] */) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads(); /* sh may still be read by a previous call */
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

static int threads_for(int64_t D) {
    int t = 32;
    while (t < D && t < 512)
        t <<= 1;
    return t;
}

/* The float4 norm's two steps, shared by every kernel that norms rows of float4s so that
 * their values agree bit for bit: a row's VPT float4s a thread into v (zeros past D4) and
 * r = 1 / sqrt(mean(x²) + eps); then one float4 of the output, (x · r) · (1 + w). */
template <int VPT>
__device__ __forceinline__ static float norm4_load(const float4 *xr, float4 *v, int D4, float D,
                                                   float eps, float *sh) {
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int i = threadIdx.x + k * blockDim.x;
        v[k] = i < D4 ? xr[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
    }
    ss = block_sum(ss, sh);
    return 1.0f / sqrtf(ss / D + eps);
}

__device__ __forceinline__ static float4 norm4_out(float4 v, float r, float4 g) {
    float4 o;
    o.x = (v.x * r) * (1.0f + g.x);
    o.y = (v.y * r) * (1.0f + g.y);
    o.z = (v.z * r) * (1.0f + g.z);
    o.w = (v.w * r) * (1.0f + g.w);
    return o;
}

template <bool BF>
__global__ void rmsnorm_kernel(typename norm_out<BF>::T *y, const float *x, const float *w,
                               int64_t D, float eps) {
    __shared__ float sh[33];
    const float *xr = x + blockIdx.x * D;
    typename norm_out<BF>::T *yr = y + blockIdx.x * D;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
        ss += xr[i] * xr[i];
    ss = block_sum(ss, sh);
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
        yr[i] = norm_out<BF>::one((xr[i] * r) * (1.0f + w[i]));
}

/* The float4 form, for rows of D = 4·D4 floats on 16-byte boundaries (every norm of the
 * Gemma shapes): a thread keeps its VPT float4s of the row in registers, so x is read once
 * (the plain kernel reads it twice), with 16-byte loads and stores. Same arithmetic. */
template <int VPT, bool BF>
__global__ void rmsnorm4_kernel(typename norm_out<BF>::T4 *y, const float4 *x, const float4 *w,
                                int D4, float D, float eps) {
    __shared__ float sh[33];
    float4 v[VPT];
    float r = norm4_load<VPT>(x + (int64_t)blockIdx.x * D4, v, D4, D, eps, sh);
    typename norm_out<BF>::T4 *yr = y + (int64_t)blockIdx.x * D4;
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i >= D4) break;
        yr[i] = norm_out<BF>::four(norm4_out(v[k], r, w[i]));
    }
}

/* Float4s a thread holds for a row of D4 float4s (1, 2, 4 or 8; 0 = the row is too long or
 * unaligned for the float4 kernels) and the block size that goes with it. */
static int vec_plan(int64_t D, const void *a, const void *b, const void *c, const void *d,
                    int *threads) {
    if (!k_vec4_ok(D, a, b, c, d)) return 0;
    int64_t D4 = D / 4;
    for (int vpt = 1; vpt <= 8; vpt <<= 1) {
        int64_t t = (D4 + vpt - 1) / vpt;
        if (t <= 256) {
            *threads = (int)((t + 31) / 32 * 32);
            return vpt;
        }
    }
    return 0;
}

template <bool BF>
static void rmsnorm_launch(cudaStream_t st, void *y, const float *x, const float *w, int64_t N,
                           int64_t D, float eps) {
    typedef typename norm_out<BF>::T T;
    typedef typename norm_out<BF>::T4 T4;
    int th = 0, vpt = vec_plan(D, y, x, w, NULL, &th);
    T4 *y4 = (T4 *)y;
    const float4 *x4 = (const float4 *)x, *w4 = (const float4 *)w;
    int D4 = (int)(D / 4);
    unsigned g = (unsigned)N;
    switch (vpt) {
    case 1:
        rmsnorm4_kernel<1, BF><<<g, th, 0, st>>>(y4, x4, w4, D4, (float)D, eps);
        break;
    case 2:
        rmsnorm4_kernel<2, BF><<<g, th, 0, st>>>(y4, x4, w4, D4, (float)D, eps);
        break;
    case 4:
        rmsnorm4_kernel<4, BF><<<g, th, 0, st>>>(y4, x4, w4, D4, (float)D, eps);
        break;
    case 8:
        rmsnorm4_kernel<8, BF><<<g, th, 0, st>>>(y4, x4, w4, D4, (float)D, eps);
        break;
    default:
        rmsnorm_kernel<BF><<<g, threads_for(D), 0, st>>>((T *)y, x, w, D, eps);
    }
}

void k_rmsnorm(cudaStream_t st, void *y, lt_dtype ydt, const float *x, const float *w, int64_t N,
               int64_t D, float eps) {
    if (N <= 0) return;
    if (ydt == LT_BF16)
        rmsnorm_launch<true>(st, y, x, w, N, D, eps);
    else
        rmsnorm_launch<false>(st, y, x, w, N, D, eps);
}

/* A sublayer's end in one launch: x = norm(x, w); h += x; then (a non-NULL) a = norm(h, w2).
 * rmsnorm4_kernel's arithmetic in the same order, and add4_kernel's sums, so every value equals
 * the three kernels' bit for bit. */
template <int VPT>
__global__ void rmsnorm_add4_kernel(float4 *h, float4 *x, const float4 *w, float4 *a,
                                    const float4 *w2, int D4, float D, float eps) {
    __shared__ float sh[33];
    float4 *xr = x + (int64_t)blockIdx.x * D4, *hr = h + (int64_t)blockIdx.x * D4;
    float4 v[VPT];
    float r = norm4_load<VPT>(xr, v, D4, D, eps, sh);
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i >= D4) break;
        float4 o = norm4_out(v[k], r, w[i]), b = hr[i];
        xr[i] = o;
        /* __fadd_rn: never contracted with o's product into an fma, as the separate add is not */
        hr[i] = make_float4(__fadd_rn(b.x, o.x), __fadd_rn(b.y, o.y), __fadd_rn(b.z, o.z),
                            __fadd_rn(b.w, o.w));
    }
    if (!a) return; /* the same for the whole grid: no thread leaves a block_sum alone */
    /* the next norm reads h back (this thread's own writes) as rmsnorm4_kernel would */
    float r2 = norm4_load<VPT>(hr, v, D4, D, eps, sh);
    float4 *ar = a + (int64_t)blockIdx.x * D4;
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i >= D4) break;
        ar[i] = norm4_out(v[k], r2, w2[i]);
    }
}

int k_rmsnorm_add(cudaStream_t st, float *h, float *x, const float *w, float *a, const float *w2,
                  int64_t N, int64_t D, float eps) {
    int th = 0, vpt = vec_plan(D, h, x, w, a, &th);
    if (!vpt || ((uintptr_t)w2 & 15)) return 0;
    if (N <= 0) return 1;
    float4 *h4 = (float4 *)h, *x4 = (float4 *)x, *a4 = (float4 *)a;
    const float4 *w4 = (const float4 *)w, *v4 = (const float4 *)w2;
    int D4 = (int)(D / 4);
    unsigned g = (unsigned)N;
    switch (vpt) {
    case 1:
        rmsnorm_add4_kernel<1><<<g, th, 0, st>>>(h4, x4, w4, a4, v4, D4, (float)D, eps);
        break;
    case 2:
        rmsnorm_add4_kernel<2><<<g, th, 0, st>>>(h4, x4, w4, a4, v4, D4, (float)D, eps);
        break;
    case 4:
        rmsnorm_add4_kernel<4><<<g, th, 0, st>>>(h4, x4, w4, a4, v4, D4, (float)D, eps);
        break;
    default:
        rmsnorm_add4_kernel<8><<<g, th, 0, st>>>(h4, x4, w4, a4, v4, D4, (float)D, eps);
    }
    return 1;
}

/* y = x r (1+w), r = (mean x² + eps)^-1/2:
 * dx_i = r (1+w_i) dy_i - x_i r³/D Σ_j dy_j (1+w_j) x_j;  dw_i += dy_i x_i r. */
__global__ void rmsnorm_backward_kernel(float *dx, float *dw, const float *dy, const float *x,
                                        const float *w, int64_t N, int64_t D, float eps,
                                        int dw_shared) {
    extern __shared__ float sdw[]; /* [D] when dw_shared */
    __shared__ float sh[33];
    if (dw && dw_shared)
        for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
            sdw[i] = 0.0f;
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        const float *xr = x + n * D, *dyr = dy + n * D;
        float ss = 0.0f, dot = 0.0f;
        for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
            ss += xr[i] * xr[i];
            dot += dyr[i] * (1.0f + w[i]) * xr[i];
        }
        ss = block_sum(ss, sh);
        dot = block_sum(dot, sh);
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        float c = r * r * r / (float)D * dot;
        for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
            float xi = xr[i], di = dyr[i];
            if (dx) dx[n * D + i] = r * (1.0f + w[i]) * di - xi * c;
            if (dw) {
                if (dw_shared)
                    sdw[i] += di * xi * r;
                else
                    atomicAdd(&dw[i], di * xi * r);
            }
        }
    }
    if (dw && dw_shared) {
        __syncthreads();
        for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
            atomicAdd(&dw[i], sdw[i]);
    }
}

/* The float4 form (see rmsnorm4_kernel): a thread owns the same VPT float4 columns of every row
 * it visits, so it keeps (1 + w) and its share of dw in registers and adds dw once at the end.
 * dx may alias dy (each thread reads its elements before it writes them). */
template <int VPT>
__global__ void rmsnorm_backward4_kernel(float4 *dx, float *dw, const float4 *dy, const float4 *x,
                                         const float4 *w, int64_t N, int D4, float D, float eps) {
    __shared__ float sh[33];
    float4 w1[VPT], dwa[VPT];
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int i = threadIdx.x + k * blockDim.x;
        float4 g = i < D4 ? w[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        w1[k] = make_float4(1.0f + g.x, 1.0f + g.y, 1.0f + g.z, 1.0f + g.w);
        dwa[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        const float4 *xr = x + n * D4, *dyr = dy + n * D4;
        float4 xv[VPT], dv[VPT];
        float ss = 0.0f, dot = 0.0f;
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            int i = threadIdx.x + k * blockDim.x;
            xv[k] = i < D4 ? xr[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            dv[k] = i < D4 ? dyr[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            ss += xv[k].x * xv[k].x + xv[k].y * xv[k].y + xv[k].z * xv[k].z + xv[k].w * xv[k].w;
            dot += dv[k].x * w1[k].x * xv[k].x + dv[k].y * w1[k].y * xv[k].y +
                   dv[k].z * w1[k].z * xv[k].z + dv[k].w * w1[k].w * xv[k].w;
        }
        ss = block_sum(ss, sh);
        dot = block_sum(dot, sh);
        float r = 1.0f / sqrtf(ss / D + eps);
        float c = r * r * r / D * dot;
#pragma unroll
        for (int k = 0; k < VPT; k++) {
            int i = threadIdx.x + k * blockDim.x;
            if (i >= D4) break;
            if (dx) {
                float4 o;
                o.x = r * w1[k].x * dv[k].x - xv[k].x * c;
                o.y = r * w1[k].y * dv[k].y - xv[k].y * c;
                o.z = r * w1[k].z * dv[k].z - xv[k].z * c;
                o.w = r * w1[k].w * dv[k].w - xv[k].w * c;
                dx[n * D4 + i] = o;
            }
            dwa[k].x += dv[k].x * xv[k].x * r;
            dwa[k].y += dv[k].y * xv[k].y * r;
            dwa[k].z += dv[k].z * xv[k].z * r;
            dwa[k].w += dv[k].w * xv[k].w * r;
        }
    }
    if (!dw) return;
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i >= D4) break;
        atomicAdd(&dw[4 * i], dwa[k].x);
        atomicAdd(&dw[4 * i + 1], dwa[k].y);
        atomicAdd(&dw[4 * i + 2], dwa[k].z);
        atomicAdd(&dw[4 * i + 3], dwa[k].w);
    }
}

void k_rmsnorm_backward(cudaStream_t st, float *dx, float *dw, const float *dy, const float *x,
                        const float *w, int64_t N, int64_t D, float eps, int n_sm) {
    if (N <= 0) return;
    int64_t blocks = (int64_t)(n_sm > 0 ? n_sm : 80) * 8;
    if (blocks > N) blocks = N;
    int th = 0, vpt = vec_plan(D, dx ? (const void *)dx : (const void *)dy, dy, x, w, &th);
    float4 *dx4 = (float4 *)dx;
    const float4 *dy4 = (const float4 *)dy, *x4 = (const float4 *)x, *w4 = (const float4 *)w;
    int D4 = (int)(D / 4);
    unsigned g = (unsigned)blocks;
    switch (vpt) {
    case 1:
        rmsnorm_backward4_kernel<1><<<g, th, 0, st>>>(dx4, dw, dy4, x4, w4, N, D4, (float)D, eps);
        return;
    case 2:
        rmsnorm_backward4_kernel<2><<<g, th, 0, st>>>(dx4, dw, dy4, x4, w4, N, D4, (float)D, eps);
        return;
    case 4:
        rmsnorm_backward4_kernel<4><<<g, th, 0, st>>>(dx4, dw, dy4, x4, w4, N, D4, (float)D, eps);
        return;
    case 8:
        rmsnorm_backward4_kernel<8><<<g, th, 0, st>>>(dx4, dw, dy4, x4, w4, N, D4, (float)D, eps);
        return;
    default:
        break;
    }
    int dw_shared = dw && D <= 8192;
    size_t smem = dw_shared ? (size_t)D * sizeof(float) : 0;
    rmsnorm_backward_kernel<<<(unsigned)blocks, threads_for(D), smem, st>>>(dx, dw, dy, x, w, N, D,
                                                                            eps, dw_shared);
}

/* The rotation of one pair (a, b) by the angle whose cosine and sine are c and s: rope_kernel's
 * and qk_norm_rope_kernel's one expression. */
__device__ __forceinline__ static void rope_pair(float *ya, float *yb, float a, float b, float c,
                                                 float s) {
    *ya = a * c - b * s;
    *yb = b * c + a * s;
}

/* One thread per (t, j): rotates pair (j, j+hd/2) of every head of token t. */
__global__ void rope_kernel(float *x, const int32_t *pos, const float *inv_freq, int64_t T,
                            int64_t heads, int64_t hd, int dir) {
    int64_t half = hd / 2;
    int64_t n = T * half;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / half, j = i - t * half;
        float ang = (float)pos[t] * inv_freq[j];
        float c = cosf(ang), s = sinf(ang) * (float)dir;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (t * heads + h) * hd;
            rope_pair(v + j, v + j + half, v[j], v[j + half], c, s);
        }
    }
}

void k_rope(cudaStream_t st, float *x, const int32_t *pos, const float *inv_freq, int64_t T,
            int64_t heads, int64_t hd, int dir) {
    int64_t n = T * (hd / 2);
    if (n <= 0) return;
    int64_t b = (n + 255) / 256;
    if (b > 65535) b = 65535;
    rope_kernel<<<(unsigned)b, 256, 0, st>>>(x, pos, inv_freq, T, heads, hd, dir);
}

/* q_norm / k_norm and RoPE in one launch: one block per head row (q's T·nh rows, then k's
 * T·nkv), hd/4 threads of a float4 each, rounded up to a warp. The norm's sums are
 * rmsnorm4_kernel's with one float4 a thread (what k_rmsnorm takes for these rows), the rotation
 * rope_kernel's, so the values equal the four kernels'. */
#define QK_NORM_ROPE_MAX_HD 1024
__global__ void qk_norm_rope_kernel(float *q, float *k, const float *qw, const float *kw,
                                    const int32_t *pos, const float *inv_freq, int64_t T, int nh,
                                    int nkv, int hd, float eps) {
    __shared__ float sh[33];
    __shared__ float row[QK_NORM_ROPE_MAX_HD];
    int64_t b = blockIdx.x, nq = T * nh, t;
    float *x;
    const float *w;
    if (b < nq) {
        x = q + b * hd;
        w = qw;
        t = b / nh;
    } else {
        b -= nq;
        x = k + b * hd;
        w = kw;
        t = b / nkv;
    }
    const int D4 = hd / 4, i = threadIdx.x;
    float4 v;
    float r = norm4_load<1>((const float4 *)x, &v, D4, (float)hd, eps, sh);
    if (i < D4) ((float4 *)row)[i] = norm4_out(v, r, ((const float4 *)w)[i]);
    __syncthreads();
    const int half = hd / 2;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float ang = (float)pos[t] * inv_freq[j];
        float c = cosf(ang), s = sinf(ang);
        rope_pair(x + j, x + j + half, row[j], row[j + half], c, s);
    }
}

int k_qk_norm_rope(cudaStream_t st, float *q, float *k, const float *qw, const float *kw,
                   const int32_t *pos, const float *inv_freq, int64_t T, int64_t nh, int64_t nkv,
                   int64_t hd, float eps) {
    int th = 0;
    /* the rows k_rmsnorm takes in its float4 form with one float4 a thread */
    if (hd > QK_NORM_ROPE_MAX_HD || hd % 4 || vec_plan(hd, q, k, qw, kw, &th) != 1) return 0;
    int64_t blocks = T * (nh + nkv);
    if (blocks <= 0) return 1;
    qk_norm_rope_kernel<<<(unsigned)blocks, th, 0, st>>>(q, k, qw, kw, pos, inv_freq, T, (int)nh,
                                                         (int)nkv, (int)hd, eps);
    return 1;
}
