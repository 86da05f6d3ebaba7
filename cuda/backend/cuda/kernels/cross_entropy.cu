/* cross_entropy.cu — the row kernel of the fused, chunked cross-entropy: for one chunk of rows'
 * logits ([Tc, V] fp32, computed by cuBLAS from the final hidden state, the logit scale already
 * applied), the log-sum-exp, the loss of each row, its log-probability of the target and, for
 * the backward, (softmax - onehot) times the row's weight in the matmul dtype.
 *
 * backend_cuda.cu owns the chunking (full [T, V] logits are never held). This file owns only
 * this kernel (kernels.h). Rows whose target is -100 are ignored (loss 0, log-probability 0,
 * gradient 0).
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/backend/cuda/kernels/kernels.h"

__device__ __forceinline__ void put_x(void *dst, lt_dtype dt, int64_t i, float v) {
    if (dt == LT_BF16)
        ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(v);
    else if (dt == LT_F16)
        ((__half *)dst)[i] = __float2half_rn(fminf(fmaxf(v, -65504.0f), 65504.0f));
    else
        ((float *)dst)[i] = v;
}

__global__ void xent_rows_kernel(const float *logits, const int32_t *targets, int64_t V,
                                 float *loss, float *logp, const float *weight, void *dlog,
                                 lt_dtype dt, float gmul, int *bad) {
    __shared__ float shm[32], shs[32];
    __shared__ float lse_sh;
    int64_t r = blockIdx.x;
    int32_t tg = targets[r];
    const float *row = logits + r * V;
    if (tg == -100 || tg < 0 || tg >= V) {
        if (tg != -100 && threadIdx.x == 0) atomicExch(bad, 1);
        if (threadIdx.x == 0) {
            loss[r] = 0.0f;
            if (logp) logp[r] = 0.0f;
        }
        if (dlog)
            for (int64_t s = threadIdx.x; s < V; s += blockDim.x)
                put_x(dlog, dt, r * V + s, 0.0f);
        return;
    }
    /* online max / sum per thread, then combined across the block */
    float m = -INFINITY, sum = 0.0f;
    for (int64_t s = threadIdx.x; s < V; s += blockDim.x) {
        float v = row[s];
        if (v > m) {
            sum = sum * expf(m - v) + 1.0f;
            m = v;
        } else {
            sum += expf(v - m);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, sum, o);
        float mm = fmaxf(m, m2);
        sum = (m == -INFINITY ? 0.0f : sum * expf(m - mm)) +
              (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mm));
        m = mm;
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) {
        shm[w] = m;
        shs[w] = sum;
    }
    __syncthreads();
    if (w == 0) {
        int nw = blockDim.x >> 5;
        m = lane < nw ? shm[lane] : -INFINITY;
        sum = lane < nw ? shs[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o),
                  s2 = __shfl_xor_sync(0xffffffffu, sum, o);
            float mm = fmaxf(m, m2);
            sum = (m == -INFINITY ? 0.0f : sum * expf(m - mm)) +
                  (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mm));
            m = mm;
        }
        if (lane == 0) {
            lse_sh = m + logf(sum);
            loss[r] = lse_sh - row[tg];
            if (logp) logp[r] = row[tg] - lse_sh;
        }
    }
    __syncthreads();
    if (!dlog) return;
    float lse = lse_sh, g = weight ? weight[r] * gmul : gmul;
    for (int64_t s = threadIdx.x; s < V; s += blockDim.x) {
        float p = expf(row[s] - lse) - (s == tg ? 1.0f : 0.0f);
        put_x(dlog, dt, r * V + s, p * g);
    }
}

void k_xent_rows(cudaStream_t st, const float *logits, const int32_t *targets, int64_t Tc,
                 int64_t V, float *loss, float *logp, const float *weight, void *dlog, lt_dtype dt,
                 float gmul, int *bad) {
    if (Tc > 0)
        xent_rows_kernel<<<(unsigned)Tc, 1024, 0, st>>>(logits, targets, V, loss, logp, weight,
                                                        dlog, dt, gmul, bad);
}
