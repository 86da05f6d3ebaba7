/* elementwise.cu — the CUDA kernels that touch each element once: casts with power-of-two
 * scaling (so fp16 never overflows), dtype conversion, residual add, GeGLU and its backward,
 * embedding gather/scatter, AdamW.
 *
 * Owns these kernels and their launchers (declared in kernels.h). Math is fp32; 16-bit values
 * appear only as storage. Must not know Gemma or the op table (backend_cuda.cu does).
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdint.h>

#include "cuda/backend/cuda/kernels/kernels.h"

static inline unsigned grid_for(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    if (b > 65535LL * 16) b = 65535LL * 16; /* grid-stride loops cover the rest */
    if (b < 1) b = 1;
    return (unsigned)b;
}

#define FP16_MAX 65504.0f

__device__ __forceinline__ float clamp_h(float v) {
    return fminf(fmaxf(v, -FP16_MAX), FP16_MAX);
}

__device__ __forceinline__ void store_as(void *dst, lt_dtype dt, int64_t i, float v) {
    if (dt == LT_BF16)
        ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(v);
    else if (dt == LT_F16)
        ((__half *)dst)[i] = __float2half_rn(v == v ? clamp_h(v) : v);
    else
        ((float *)dst)[i] = v;
}

__device__ __forceinline__ float load_as(const void *src, lt_dtype dt, int64_t i) {
    if (dt == LT_BF16) return __bfloat162float(((const __nv_bfloat16 *)src)[i]);
    if (dt == LT_F16) return __half2float(((const __half *)src)[i]);
    return ((const float *)src)[i];
}

/* ---- absmax and scales --------------------------------------------------------------------- */

__global__ void absmax_kernel(const float *x, int64_t n, unsigned *out) {
    float m = 0.0f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float a = fabsf(x[i]);
        if (!(a <= m)) m = a; /* NaN wins, so a NaN input is seen */
    }
    for (int o = 16; o > 0; o >>= 1) {
        float b = __shfl_xor_sync(0xffffffffu, m, o);
        if (!(b <= m)) m = b;
    }
    __shared__ float sm[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) sm[w] = m;
    __syncthreads();
    if (w == 0) {
        m = lane < (int)(blockDim.x >> 5) ? sm[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            float b = __shfl_xor_sync(0xffffffffu, m, o);
            if (!(b <= m)) m = b;
        }
        if (lane == 0) atomicMax(out, __float_as_uint(m)); /* non-negative floats order as ints */
    }
}

void k_absmax(cudaStream_t st, const float *x, int64_t n, unsigned *amax_bits) {
    unsigned g = grid_for(n, 256);
    if (g > 1024) g = 1024;
    absmax_kernel<<<g, 256, 0, st>>>(x, n, amax_bits);
}

__global__ void scale_kernel(const unsigned *bits, float *scale, float *inv) {
    float a = __uint_as_float(*bits);
    float s = 1.0f;
    if (a > 0.0f && isfinite(a)) {
        /* 2^k <= 32768 / a: the largest scaled value stays at or under 2^15, far from 65504 */
        int k = (int)floorf(log2f(32768.0f / a));
        k = max(-100, min(100, k));
        s = ldexpf(1.0f, k);
    }
    if (scale) *scale = s;
    if (inv) *inv = 1.0f / s;
}

void k_scale_from_absmax(cudaStream_t st, const unsigned *amax_bits, float *scale, float *inv) {
    scale_kernel<<<1, 1, 0, st>>>(amax_bits, scale, inv);
}

/* ---- casts ---------------------------------------------------------------------------------- */

__global__ void cast_rows_kernel(void *dst, lt_dtype dt, int64_t ldd, const float *src, int64_t lds,
                                 int64_t rows, int64_t cols, const float *scale) {
    float s = scale ? *scale : 1.0f;
    int64_t n = rows * cols;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / cols, c = i - r * cols;
        store_as(dst, dt, r * ldd + c, src[r * lds + c] * s);
    }
}

void k_cast_rows(cudaStream_t st, void *dst, lt_dtype dt, int64_t ldd, const float *src,
                 int64_t lds, int64_t rows, int64_t cols, const float *scale) {
    int64_t n = rows * cols;
    if (n <= 0) return;
    cast_rows_kernel<<<grid_for(n, 256), 256, 0, st>>>(dst, dt, ldd, src, lds, rows, cols, scale);
}

__global__ void convert_kernel(void *dst, lt_dtype dt, const void *src, lt_dtype sdt, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        store_as(dst, dt, i, load_as(src, sdt, i));
}

void k_convert(cudaStream_t st, void *dst, lt_dtype dt, const void *src, lt_dtype sdt, int64_t n) {
    if (n <= 0) return;
    convert_kernel<<<grid_for(n, 256), 256, 0, st>>>(dst, dt, src, sdt, n);
}

__global__ void make_alpha_kernel(float *out, float c, const float *a, const float *b) {
    *out = c * (a ? *a : 1.0f) * (b ? *b : 1.0f);
}

void k_make_alpha(cudaStream_t st, float *out, float c, const float *a, const float *b) {
    make_alpha_kernel<<<1, 1, 0, st>>>(out, c, a, b);
}

/* ---- add, scale, GeGLU ------------------------------------------------------------------------
 */

__global__ void add_kernel(float *y, const float *x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

__global__ void add4_kernel(float4 *y, const float4 *x, int64_t n4) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4;
         i += (int64_t)gridDim.x * blockDim.x) {
        float4 a = y[i], b = x[i];
        y[i] = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
    }
}

void k_add(cudaStream_t st, float *y, const float *x, int64_t n) {
    if (n <= 0) return;
    if (k_vec4_ok(n, y, x, NULL, NULL))
        add4_kernel<<<grid_for(n / 4, 256), 256, 0, st>>>((float4 *)y, (const float4 *)x, n / 4);
    else
        add_kernel<<<grid_for(n, 256), 256, 0, st>>>(y, x, n);
}

__global__ void scale_vec_kernel(float *x, int64_t n, float s) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

void k_scale(cudaStream_t st, float *x, int64_t n, float s) {
    if (n > 0) scale_vec_kernel<<<grid_for(n, 256), 256, 0, st>>>(x, n, s);
}

#define GELU_K0 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_K1 0.044715f

__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_K0 * (x + GELU_K1 * x * x * x)));
}

/* y fp32, or bf16 (round to nearest even) for the matmul-only GeGLU product. */
__global__ void geglu_kernel(void *y, lt_dtype ydt, const float *g, const float *u, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = gelu_tanh(g[i]) * u[i];
        if (ydt == LT_BF16)
            ((__nv_bfloat16 *)y)[i] = __float2bfloat16_rn(v);
        else
            ((float *)y)[i] = v;
    }
}

__global__ void geglu4_kernel(void *y, lt_dtype ydt, const float4 *g, const float4 *u, int64_t n4) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4;
         i += (int64_t)gridDim.x * blockDim.x) {
        float4 a = g[i], b = u[i];
        float4 v = make_float4(gelu_tanh(a.x) * b.x, gelu_tanh(a.y) * b.y, gelu_tanh(a.z) * b.z,
                               gelu_tanh(a.w) * b.w);
        if (ydt == LT_BF16) {
            __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y),
                           hi = __floats2bfloat162_rn(v.z, v.w);
            ((uint2 *)y)[i] = make_uint2(*(uint32_t *)&lo, *(uint32_t *)&hi);
        } else {
            ((float4 *)y)[i] = v;
        }
    }
}

void k_geglu(cudaStream_t st, void *y, lt_dtype ydt, const float *g, const float *u, int64_t n) {
    if (n <= 0) return;
    if (k_vec4_ok(n, y, g, u, NULL))
        geglu4_kernel<<<grid_for(n / 4, 256), 256, 0, st>>>(y, ydt, (const float4 *)g,
                                                            (const float4 *)u, n / 4);
    else
        geglu_kernel<<<grid_for(n, 256), 256, 0, st>>>(y, ydt, g, u, n);
}

/* One element of the GeGLU backward. */
__device__ __forceinline__ void geglu_grad1(float x, float d, float uv, float *dg, float *du) {
    float z = GELU_K0 * (x + GELU_K1 * x * x * x);
    float th = tanhf(z);
    float gl = 0.5f * x * (1.0f + th);
    float dgl = 0.5f * (1.0f + th) +
                0.5f * x * (1.0f - th * th) * GELU_K0 * (1.0f + 3.0f * GELU_K1 * x * x);
    *dg = d * uv * dgl;
    *du = d * gl;
}

/* dg, du: fp32, or bf16 (rounded to nearest even) when they only feed matmuls. */
__device__ __forceinline__ void put_grad(void *p, bool bf, int64_t i, float v) {
    if (bf)
        ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    else
        ((float *)p)[i] = v;
}

__global__ void geglu_backward_kernel(void *dg, void *du, bool bf, const float *dy, const float *g,
                                      const float *u, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float a, b;
        geglu_grad1(g[i], dy[i], u[i], &a, &b);
        if (dg) put_grad(dg, bf, i, a);
        if (du) put_grad(du, bf, i, b);
    }
}

__device__ __forceinline__ void put_grad4(void *p, bool bf, int64_t i, float4 v) {
    if (bf) {
        __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
        ((uint2 *)p)[i] = make_uint2(*(uint32_t *)&lo, *(uint32_t *)&hi);
    } else {
        ((float4 *)p)[i] = v;
    }
}

/* float4 form; fp32 dg may alias g and du may alias u (each element is read before it is
 * written; bf16 outputs must not alias: they would overwrite inputs other threads read). */
__global__ void geglu_backward4_kernel(void *dg, void *du, bool bf, const float4 *dy,
                                       const float4 *g, const float4 *u, int64_t n4) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4;
         i += (int64_t)gridDim.x * blockDim.x) {
        float4 x = g[i], d = dy[i], uv = u[i], a, b;
        geglu_grad1(x.x, d.x, uv.x, &a.x, &b.x);
        geglu_grad1(x.y, d.y, uv.y, &a.y, &b.y);
        geglu_grad1(x.z, d.z, uv.z, &a.z, &b.z);
        geglu_grad1(x.w, d.w, uv.w, &a.w, &b.w);
        if (dg) put_grad4(dg, bf, i, a);
        if (du) put_grad4(du, bf, i, b);
    }
}

void k_geglu_backward(cudaStream_t st, void *dg, void *du, lt_dtype odt, const float *dy,
                      const float *g, const float *u, int64_t n) {
    if (n <= 0) return;
    bool bf = odt == LT_BF16;
    if (k_vec4_ok(n, dg, du, dy, g) && k_vec4_ok(n, u, NULL, NULL, NULL))
        geglu_backward4_kernel<<<grid_for(n / 4, 256), 256, 0, st>>>(
            dg, du, bf, (const float4 *)dy, (const float4 *)g, (const float4 *)u, n / 4);
    else
        geglu_backward_kernel<<<grid_for(n, 256), 256, 0, st>>>(dg, du, bf, dy, g, u, n);
}

/* ---- embedding ---------------------------------------------------------------------------------
 */

__global__ void embedding_kernel(float *h, const int32_t *ids, const void *table, lt_dtype dt,
                                 int64_t V, int64_t H, float scale, int *bad) {
    int64_t t = blockIdx.x;
    int32_t id = ids[t];
    float *o = h + t * H;
    if (id < 0 || id >= V) {
        if (threadIdx.x == 0) atomicExch(bad, 1);
        for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
            o[i] = 0.0f;
        return;
    }
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
        o[i] = load_as(table, dt, (int64_t)id * H + i) * scale;
}

void k_embedding(cudaStream_t st, float *h, const int32_t *ids, int64_t T, const void *table,
                 lt_dtype dt, int64_t V, int64_t H, float scale, int *bad) {
    if (T > 0) embedding_kernel<<<(unsigned)T, 256, 0, st>>>(h, ids, table, dt, V, H, scale, bad);
}

__global__ void embedding_backward_kernel(float *grad, const float *dh, const int32_t *ids,
                                          int64_t V, int64_t H, float scale) {
    int64_t t = blockIdx.x;
    int32_t id = ids[t];
    if (id < 0 || id >= V) return;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
        atomicAdd(&grad[(int64_t)id * H + i], dh[t * H + i] * scale);
}

void k_embedding_backward(cudaStream_t st, float *grad, const float *dh, const int32_t *ids,
                          int64_t T, int64_t V, int64_t H, float scale) {
    if (T > 0) embedding_backward_kernel<<<(unsigned)T, 256, 0, st>>>(grad, dh, ids, V, H, scale);
}

/* ---- AdamW
 * --------------------------------------------------------------------------------------- */

__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, int64_t n, float lr,
                             float b1, float b2, float eps, float wd, float step_size,
                             float bc2_sqrt) {
    float decay = 1.0f - lr * wd;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float gi = g[i];
        float pi = wd != 0.0f ? p[i] * decay : p[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

void k_adamw(cudaStream_t st, float *p, const float *g, float *m, float *v, int64_t n, float lr,
             float b1, float b2, float eps, float wd, float step_size, float bc2_sqrt) {
    if (n > 0)
        adamw_kernel<<<grid_for(n, 256), 256, 0, st>>>(p, g, m, v, n, lr, b1, b2, eps, wd,
                                                       step_size, bc2_sqrt);
}

/* ---- the trainer's extra ops (grad.h): fill, sum of squares, dropout ----------------------------
 */

__global__ void fill_kernel(float *x, int64_t n, float v) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = v;
}

void k_fill(cudaStream_t st, float *x, int64_t n, float v) {
    if (n > 0) fill_kernel<<<grid_for(n, 256), 256, 0, st>>>(x, n, v);
}

__global__ void sumsq_kernel(const float *x, int64_t n, double *out) {
    double s = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    __shared__ double sh[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) sh[w] = s;
    __syncthreads();
    if (w == 0) {
        s = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) atomicAdd(out, s);
    }
}

void k_sumsq(cudaStream_t st, const float *x, int64_t n, double *out) {
    unsigned g = grid_for(n, 256);
    if (g > 1024) g = 1024;
    if (n > 0) sumsq_kernel<<<g, 256, 0, st>>>(x, n, out);
}

/* The same keep-test as grad.h's lt_dropout_keep, so both backends drop the same elements. */
__device__ __forceinline__ bool dropout_keep(uint64_t seed, uint64_t i, float p) {
    uint64_t z = seed + 0x9e3779b97f4a7c15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0) >= (double)p;
}

__global__ void dropout_kernel(float *y, const float *x, int64_t n, float p, float keep,
                               uint64_t seed) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = dropout_keep(seed, (uint64_t)i, p) ? x[i] * keep : 0.0f;
}

void k_dropout(cudaStream_t st, float *y, const float *x, int64_t n, float p, float keep,
               uint64_t seed) {
    if (n > 0) dropout_kernel<<<grid_for(n, 256), 256, 0, st>>>(y, x, n, p, keep, seed);
}
