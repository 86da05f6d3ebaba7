/* vision.cu — the CUDA kernels of the image tower's ops and of the image block's attention:
 * LayerNorm with bias, a linear's bias, GELU (tanh), the square-grid average pool, and
 * attention with one extra visible span of key positions per query (backend.h states each;
 * backend_cpu_vision.c and backend_cpu.c are the specification); at the end, the backward of
 * the norm, GELU and the pool (lt_tower_grad_ops), which training adapters on the tower needs.
 *
 * Plain kernels, written for clarity rather than speed: one block per row for the norm, one
 * thread per element for the rest, and for attention_span one block per (query, head) with
 * the scores in shared memory (S at most K_SPAN_MAX_KEYS). Math in fp32 (the norm's backward
 * takes its row statistics in double, as the CPU does). Owns these kernels and their launchers
 * (kernels.h); must not know Gemma or the op table.
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

/* ---- the tower's backward (lt_tower_grad_ops): layernorm, gelu, avg_pool ------------------------
 * backend_cpu_vision.c's cpu_layernorm_backward takes each row's statistics in double; so do
 * these kernels (the row sums of 4096 x 1152 elements are a few MFLOP of double arithmetic, next
 * to the tower's matmuls nothing), so dx agrees with the CPU's to the rounding of its last cast.
 * dw and db are sums over the rows: fixed chunks of rows summed in double by one thread per
 * column, then the chunks summed in order, so the result does not depend on scheduling (no
 * atomics). The kernels run in this order: statistics, dw/db, dx, so dx may alias dy or x. */

/* The sum of v over the block in double (blockDim.x a multiple of 32, at most 1024). */
static __device__ double vis_block_sum_d(double v, double *sm) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sm[w] = v;
    __syncthreads();
    double t = 0.0;
    for (int i = 0; i < nw; i++)
        t += sm[i];
    return t;
}

/* One block per row: st[4r..4r+3] = mean, inv = 1/sqrt(var + eps), mean(g), mean(g·xhat) with
 * g = dy·w, xhat = (x - mean)·inv, as cpu_layernorm_backward computes them. */
static __global__ void layernorm_bwd_stats_kernel(double *st, const float *dy, const float *x,
                                                  const float *w, int64_t D, float eps) {
    __shared__ double sm[32];
    const float *xr = x + blockIdx.x * D, *gr = dy + blockIdx.x * D;
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
        s += xr[i];
    double mean = vis_block_sum_d(s, sm) / (double)D;
    double v = 0.0;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
        double d = xr[i] - mean;
        v += d * d;
    }
    double inv = 1.0 / sqrt(vis_block_sum_d(v, sm) / (double)D + (double)eps);
    double sg = 0.0, sgx = 0.0;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
        double g = (double)gr[i] * w[i];
        sg += g;
        sgx += g * ((xr[i] - mean) * inv);
    }
    sg = vis_block_sum_d(sg, sm);
    sgx = vis_block_sum_d(sgx, sm);
    if (threadIdx.x == 0) {
        double *o = st + 4 * blockIdx.x;
        o[0] = mean;
        o[1] = inv;
        o[2] = sg / (double)D;
        o[3] = sgx / (double)D;
    }
}

/* part[c, i] (c = blockIdx.y, the rows [c·rows, (c+1)·rows)) = Σ dy·xhat and Σ dy of column i,
 * in double, the rows in order; parts: [chunks, D] each (pdw NULL or pdb NULL: not wanted). */
static __global__ void layernorm_bwd_wb_part_kernel(double *pdw, double *pdb, const double *st,
                                                    const float *dy, const float *x, int64_t N,
                                                    int64_t D, int64_t rows) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, c = blockIdx.y;
    if (i >= D) return;
    int64_t r0 = c * rows, r1 = r0 + rows < N ? r0 + rows : N;
    double sw = 0.0, sb = 0.0;
    for (int64_t r = r0; r < r1; r++) {
        double g = dy[r * D + i];
        sw += g * ((x[r * D + i] - st[4 * r]) * st[4 * r + 1]);
        sb += g;
    }
    if (pdw) pdw[c * D + i] = sw;
    if (pdb) pdb[c * D + i] = sb;
}

/* dw[i] += Σ_c pdw[c, i], db likewise, the chunks in order. */
static __global__ void layernorm_bwd_wb_sum_kernel(float *dw, float *db, const double *pdw,
                                                   const double *pdb, int64_t chunks, int64_t D) {
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= D) return;
    double sw = 0.0, sb = 0.0;
    for (int64_t c = 0; c < chunks; c++) {
        if (dw) sw += pdw[c * D + i];
        if (db) sb += pdb[c * D + i];
    }
    if (dw) dw[i] += (float)sw;
    if (db) db[i] += (float)sb;
}

/* dx = inv·(g - mean(g) - xhat·mean(g·xhat)) elementwise (each element read, then written). */
static __global__ void layernorm_bwd_dx_kernel(float *dx, const double *st, const float *dy,
                                               const float *x, const float *w, int64_t n,
                                               int64_t D) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = e / D, i = e % D;
        const double *s = st + 4 * r;
        double xh = (x[e] - s[0]) * s[1], g = (double)dy[e] * w[i];
        dx[e] = (float)(s[1] * (g - s[2] - xh * s[3]));
    }
}

/* Rows per chunk of the dw/db sums: K_LN_BWD_ROWS, more where the chunks would overrun the
 * grid's y dimension (65535). */
static int64_t ln_bwd_rows(int64_t N) {
    int64_t r = (N + 65534) / 65535;
    return r > K_LN_BWD_ROWS ? r : K_LN_BWD_ROWS;
}

static int64_t ln_bwd_chunks(int64_t N) {
    return N <= 0 ? 0 : (N + ln_bwd_rows(N) - 1) / ln_bwd_rows(N);
}

size_t k_layernorm_backward_scratch(int64_t N, int64_t D) {
    if (N <= 0 || D <= 0) return 0;
    return sizeof(double) * (size_t)(4 * N + 2 * ln_bwd_chunks(N) * D);
}

void k_layernorm_backward(cudaStream_t st, float *dx, float *dw, float *db, const float *dy,
                          const float *x, const float *w, int64_t N, int64_t D, float eps,
                          double *scratch) {
    if (N <= 0 || D <= 0) return;
    double *stats = scratch, *pdw = scratch + 4 * N;
    int64_t chunks = ln_bwd_chunks(N);
    double *pdb = pdw + chunks * D;
    layernorm_bwd_stats_kernel<<<(unsigned)N, 256, 0, st>>>(stats, dy, x, w, D, eps);
    if (dw || db) {
        dim3 grid((unsigned)((D + 127) / 128), (unsigned)chunks);
        layernorm_bwd_wb_part_kernel<<<grid, 128, 0, st>>>(dw ? pdw : NULL, db ? pdb : NULL, stats,
                                                           dy, x, N, D, ln_bwd_rows(N));
        layernorm_bwd_wb_sum_kernel<<<(unsigned)((D + 127) / 128), 128, 0, st>>>(dw, db, pdw, pdb,
                                                                                 chunks, D);
    }
    if (dx)
        layernorm_bwd_dx_kernel<<<grid_1d(N * D, 256), 256, 0, st>>>(dx, stats, dy, x, w, N * D, D);
}

/* dx = dy · gelu_tanh'(x), the formula of cpu_gelu_backward (dx may alias dy or x). */
static __global__ void gelu_backward_kernel(float *dx, const float *dy, const float *x, int64_t n) {
    const float k0 = 0.7978845608028654f, c = 0.044715f; /* as geglu_backward */
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float u = x[i];
        float th = tanhf(k0 * (u + c * u * u * u));
        float dg =
            0.5f * (1.0f + th) + 0.5f * u * (1.0f - th * th) * k0 * (1.0f + 3.0f * c * u * u);
        dx[i] = dy[i] * dg;
    }
}

void k_gelu_backward(cudaStream_t st, float *dx, const float *dy, const float *x, int64_t n) {
    if (n <= 0) return;
    gelu_backward_kernel<<<grid_1d(n, 256), 256, 0, st>>>(dx, dy, x, n);
}

/* dx[(r*g + c)*D + d] = dy[((r/k)*o + c/k)*D + d] / (k*k), o = g / k (written). */
static __global__ void avg_pool_backward_kernel(float *dx, const float *dy, int64_t g, int64_t k,
                                                int64_t D) {
    int64_t o = g / k, n = g * g * D;
    float div = (float)(k * k);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t d = e % D, cell = e / D, r = cell / g, c = cell % g;
        dx[e] = dy[((r / k) * o + c / k) * D + d] / div;
    }
}

void k_avg_pool_backward(cudaStream_t st, float *dx, const float *dy, int64_t g, int64_t k,
                         int64_t D) {
    if (g <= 0 || k <= 0 || D <= 0) return;
    avg_pool_backward_kernel<<<grid_1d(g * g * D, 256), 256, 0, st>>>(dx, dy, g, k, D);
}
