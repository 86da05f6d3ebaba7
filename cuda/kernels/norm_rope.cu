/* norm_rope.cu — Gemma RMSNorm (forward, backward) and rotate-half RoPE (forward, inverse).
 *
 * Owns these kernels and their launchers (kernels.h). All math fp32, as in backend_cpu.c, whose
 * cpu_rmsnorm / cpu_rope are the specification. The RoPE frequencies come in from the host
 * (computed there with the CPU's expression) so that both backends rotate by the same angles.
 */
#include "cuda/kernels/kernels.h"

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

__global__ void rmsnorm_kernel(float *y, const float *x, const float *w, int64_t D, float eps) {
    __shared__ float sh[33];
    const float *xr = x + blockIdx.x * D;
    float *yr = y + blockIdx.x * D;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
        ss += xr[i] * xr[i];
    ss = block_sum(ss, sh);
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
        yr[i] = (xr[i] * r) * (1.0f + w[i]);
}

void k_rmsnorm(cudaStream_t st, float *y, const float *x, const float *w, int64_t N, int64_t D,
               float eps) {
    if (N <= 0) return;
    rmsnorm_kernel<<<(unsigned)N, threads_for(D), 0, st>>>(y, x, w, D, eps);
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

void k_rmsnorm_backward(cudaStream_t st, float *dx, float *dw, const float *dy, const float *x,
                        const float *w, int64_t N, int64_t D, float eps, int n_sm) {
    if (N <= 0) return;
    int64_t blocks = (int64_t)(n_sm > 0 ? n_sm : 80) * 8;
    if (blocks > N) blocks = N;
    int dw_shared = dw && D <= 8192;
    size_t smem = dw_shared ? (size_t)D * sizeof(float) : 0;
    rmsnorm_backward_kernel<<<(unsigned)blocks, threads_for(D), smem, st>>>(dx, dw, dy, x, w, N, D,
                                                                            eps, dw_shared);
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
            float a = v[j], b = v[j + half];
            v[j] = a * c - b * s;
            v[j + half] = b * c + a * s;
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
