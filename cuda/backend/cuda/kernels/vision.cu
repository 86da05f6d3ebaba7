/* vision.cu — the CUDA kernels of the image tower's ops and of the image block's attention:
 * LayerNorm with bias, a linear's bias, GELU (tanh), the square-grid average pool, and
 * attention with one extra visible span of key positions per query (backend.h states each;
 * backend_cpu_vision.c and backend_cpu.c are the specification).
 *
 * Plain kernels, written for clarity rather than speed: one block per row for the norm, one
 * thread per element for the rest, and for attention_span one block per (query, head) with
 * the scores in shared memory (S at most K_SPAN_MAX_KEYS). Math in fp32. Owns these kernels and
 * their launchers (kernels.h); must not know Gemma or the op table.
 */
#include <math.h>
#include <stdint.h>

#include "cuda/backend/cuda/kernels/kernels.h"

static inline unsigned grid_1d(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    if (b > 65535LL * 16) b = 65535LL * 16; /* grid-stride loops cover the rest */
    if (b < 1) b = 1;
    return (unsigned)b;
}

/* The sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it. */
static __device__ float vis_block_sum(float v, float *sm) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sm[w] = v;
    __syncthreads();
    float t = 0.0f;
    for (int i = 0; i < nw; i++)
        t += sm[i];
    return t;
}

static __device__ float vis_block_max(float v, float *sm) {
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sm[w] = v;
    __syncthreads();
    float t = -INFINITY;
    for (int i = 0; i < nw; i++)
        t = fmaxf(t, sm[i]);
    return t;
}

/* ---- layernorm: one block per row, two passes (mean, then the variance around it) ---------- */

static __global__ void layernorm_kernel(float *y, const float *x, const float *w, const float *b,
                                        int64_t D, float eps) {
    __shared__ float sm[32];
    const float *xr = x + blockIdx.x * D;
    float *yr = y + blockIdx.x * D;
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
        s += xr[i];
    float mean = vis_block_sum(s, sm) / (float)D;
    float v = 0.0f;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
        float d = xr[i] - mean;
        v += d * d;
    }
    float inv = rsqrtf(vis_block_sum(v, sm) / (float)D + eps);
    __syncthreads(); /* y may alias x: every read of the row is done */
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
        yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

void k_layernorm(cudaStream_t st, float *y, const float *x, const float *w, const float *b,
                 int64_t N, int64_t D, float eps) {
    if (N <= 0 || D <= 0) return;
    layernorm_kernel<<<(unsigned)N, 256, 0, st>>>(y, x, w, b, D, eps);
}

/* ---- elementwise --------------------------------------------------------------------------- */

static __global__ void add_bias_kernel(float *y, const float *b, int64_t n, int64_t D) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] += b[i % D];
}

void k_add_bias(cudaStream_t st, float *y, const float *b, int64_t N, int64_t D) {
    if (N <= 0 || D <= 0) return;
    add_bias_kernel<<<grid_1d(N * D, 256), 256, 0, st>>>(y, b, N * D, D);
}

static __global__ void gelu_kernel(float *y, const float *x, int64_t n) {
    const float k0 = 0.7978845608028654f; /* sqrt(2/pi), as geglu */
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float u = x[i];
        y[i] = 0.5f * u * (1.0f + tanhf(k0 * (u + 0.044715f * u * u * u)));
    }
}

void k_gelu(cudaStream_t st, float *y, const float *x, int64_t n) {
    if (n <= 0) return;
    gelu_kernel<<<grid_1d(n, 256), 256, 0, st>>>(y, x, n);
}

/* y[(i*o + j)*D + d] = mean of the k x k block (i, j) of the g x g grid x, o = g / k */
static __global__ void avg_pool_kernel(float *y, const float *x, int64_t g, int64_t k, int64_t D) {
    int64_t o = g / k, n = o * o * D;
    float div = (float)(k * k);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t d = e % D, cell = e / D, i = cell / o, j = cell % o;
        float s = 0.0f;
        for (int64_t r = i * k; r < (i + 1) * k; r++)
            for (int64_t c = j * k; c < (j + 1) * k; c++)
                s += x[(r * g + c) * D + d];
        y[e] = s / div;
    }
}

void k_avg_pool(cudaStream_t st, float *y, const float *x, int64_t g, int64_t k, int64_t D) {
    if (g <= 0 || k <= 0 || D <= 0) return;
    int64_t o = g / k;
    avg_pool_kernel<<<grid_1d(o * o * D, 256), 256, 0, st>>>(y, x, g, k, D);
}

/* ---- attention with a span: one block per (query t, head h) --------------------------------- */

static __global__ void attention_span_kernel(float *out, const float *q, const float *k,
                                             const float *v, const int32_t *qpos,
                                             const int32_t *kpos, const int32_t *span, int64_t S,
                                             int64_t nh, int64_t nkv, int64_t hd, int window,
                                             float scale) {
    extern __shared__ float sc[]; /* [S] scores, then probabilities */
    __shared__ float sm[32];
    int64_t t = blockIdx.x / nh, h = blockIdx.x % nh, kh = h / (nh / nkv);
    const float *qv = q + (t * nh + h) * hd;
    int32_t qp = qpos[t], lo = span[2 * t], hi = span[2 * t + 1];
    float mx = -INFINITY;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
        int32_t kp = kpos[s];
        bool in_span = kp >= 0 && kp >= lo && kp <= hi;
        bool vis = kp >= 0 && (kp <= qp || in_span) && (window <= 0 || qp - kp < window);
        float x = -INFINITY;
        if (vis) {
            const float *kv = k + (s * nkv + kh) * hd;
            float d = 0.0f;
            for (int64_t e = 0; e < hd; e++)
                d += qv[e] * kv[e];
            x = d * scale;
        }
        sc[s] = x;
        mx = fmaxf(mx, x);
    }
    mx = vis_block_max(mx, sm);
    float *o = out + (t * nh + h) * hd;
    if (mx == -INFINITY) { /* nothing visible: zeros, as the CPU */
        for (int64_t e = threadIdx.x; e < hd; e += blockDim.x)
            o[e] = 0.0f;
        return;
    }
    float sum = 0.0f;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
        float p = sc[s] == -INFINITY ? 0.0f : expf(sc[s] - mx);
        sc[s] = p;
        sum += p;
    }
    float inv = 1.0f / vis_block_sum(sum, sm); /* its barriers also publish sc[] */
    for (int64_t e = threadIdx.x; e < hd; e += blockDim.x) {
        float acc = 0.0f;
        for (int64_t s = 0; s < S; s++) {
            float p = sc[s];
            if (p != 0.0f) acc += p * v[(s * nkv + kh) * hd + e];
        }
        o[e] = acc * inv;
    }
}

int k_attention_span_ok(int64_t S) {
    return S > 0 && S <= K_SPAN_MAX_KEYS;
}

void k_attention_span(cudaStream_t st, float *out, const float *q, const float *k, const float *v,
                      const int32_t *qpos, const int32_t *kpos, const int32_t *span, int64_t T,
                      int64_t S, int64_t nh, int64_t nkv, int64_t hd, int window, float scale) {
    if (T <= 0 || !k_attention_span_ok(S)) return;
    attention_span_kernel<<<(unsigned)(T * nh), 128, (size_t)S * sizeof(float), st>>>(
        out, q, k, v, qpos, kpos, span, S, nh, nkv, hd, window, scale);
}
