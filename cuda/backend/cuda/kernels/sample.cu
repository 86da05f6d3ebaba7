/* sample.cu — sample_rows on the GPU: one token id per row of logits, drawn where the logits are.
 *
 * One block per row. The block finds the row's first maximum, then (when asked) top_k's and
 * top_p's thresholds as radix selections over the logits' order-keeping keys — four passes of
 * eight bits from the top, a 256-bin histogram in shared memory per pass (counts for top_k,
 * 64-bit fixed-point weights for top_p, so the sums do not depend on the order the threads add
 * in) — and last draws: each thread sums the weights of its contiguous slice of ids, an exclusive
 * scan over the threads finds the slice that holds the random point, and that thread walks its
 * slice to the id. The arithmetic is sample_rule.h's, the same text the CPU reference
 * (backend_cpu_sample.c) runs, so both pick the same id from the same logits and bits. Only the
 * ids leave the GPU: no [rows, vocabulary] download per token.
 */
#include <limits.h>
#include <stdint.h>

#include "cuda/backend/cuda/kernels/kernels.h"
#include "cuda/backend/sample_rule.h"

#define SR_THREADS 1024
#define SR_WARPS (SR_THREADS / 32)

/* Block-wide sum of a 64-bit value; every thread gets the total. */
__device__ static uint64_t block_sum_u64(uint64_t v, uint64_t *red) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads(); /* red may still be read by a previous call */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    uint64_t t = 0;
    for (int w = 0; w < SR_WARPS; w++)
        t += red[w];
    return t;
}

/* One radix-selection pass over the keys matching (prefix, mask): the histogram of digit `sh`
 * (counts, or weights when weighted) of the keys >= floor_key. A row's logits share their top
 * digits, so most threads of a pass hit one or two bins: the lanes of a warp that share a bin
 * add once (a count of __popc lanes, or their weights summed over the warp when all 32 agree);
 * one shared atomic per lane serialized on those bins and made top_k's passes the slowest part
 * of a decoding step. The sums are integers, so the order of the adds does not matter. */
__device__ static void radix_hist(unsigned long long *hist, const float *x, int V, uint32_t prefix,
                                  uint32_t mask, int sh, uint32_t floor_key, int weighted, float m,
                                  float inv_t) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x)
        hist[b] = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    /* whole warps walk the row together (blockDim is a multiple of 32), so the warp votes see
     * every lane; lanes past the row's end carry the bin 256, which is never added */
    for (int base = threadIdx.x - lane; base < V; base += blockDim.x) {
        int j = base + lane;
        uint32_t bin = 256u;
        unsigned long long add = 0;
        if (j < V) {
            uint32_t key = lt_sample_key(x[j]);
            if (key >= floor_key && (key & mask) == prefix) {
                bin = (key >> sh) & 255u;
                add = weighted ? lt_sample_weight(x[j], m, inv_t) : 1ull;
            }
        }
        unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (!weighted) {
            if (bin < 256u && lane == __ffs(peers) - 1)
                atomicAdd(&hist[bin], (unsigned long long)__popc(peers));
        } else if (peers == 0xffffffffu) {
            for (int o = 16; o > 0; o >>= 1)
                add += __shfl_xor_sync(0xffffffffu, add, o);
            if (bin < 256u && lane == 0 && add) atomicAdd(&hist[bin], add);
        } else if (bin < 256u && add) {
            atomicAdd(&hist[bin], add);
        }
    }
    __syncthreads();
}

__global__ static void sample_rows_kernel(int32_t *ids, const float *logits, const int32_t *bits,
                                          int V, float inv_t, int top_k, float top_p,
                                          uint64_t floor_w) {
    __shared__ unsigned long long hist[256];
    __shared__ uint64_t red[SR_WARPS];
    __shared__ float red_v[SR_WARPS];
    __shared__ int red_i[SR_WARPS];
    __shared__ uint32_t sel;
    __shared__ uint64_t below_s;
    __shared__ int k_s;
    const float *x = logits + (size_t)blockIdx.x * (size_t)V;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    /* the first maximum */
    float best = -INFINITY;
    int at = INT_MAX;
    for (int j = tid; j < V; j += blockDim.x) {
        float v = x[j];
        if (v > best || (v == best && j < at)) {
            best = v;
            at = j;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, at, o);
        if (ov > best || (ov == best && oi < at)) {
            best = ov;
            at = oi;
        }
    }
    if (lane == 0) {
        red_v[warp] = best;
        red_i[warp] = at;
    }
    __syncthreads();
    best = -INFINITY;
    at = INT_MAX;
    for (int w = 0; w < SR_WARPS; w++) {
        float ov = red_v[w];
        int oi = red_i[w];
        if (ov > best || (ov == best && oi < at)) {
            best = ov;
            at = oi;
        }
    }
    int argmax = at == INT_MAX ? 0 : at;
    if (!(inv_t > 0)) {
        if (tid == 0) ids[blockIdx.x] = argmax;
        return;
    }
    float m = best;

    /* top_k: the key of the top_k-th largest logit */
    uint32_t thr = 0;
    if (top_k > 0 && top_k < V) {
        uint32_t prefix = 0, mask = 0;
        int k = top_k;
        for (int d = 3; d >= 0; d--) {
            int sh = 8 * d;
            radix_hist(hist, x, V, prefix, mask, sh, 0, 0, m, inv_t);
            if (tid == 0) {
                int b = 255;
                for (; b > 0; b--) {
                    if ((unsigned long long)k <= hist[b]) break;
                    k -= (int)hist[b];
                }
                sel = (uint32_t)b;
                k_s = k;
            }
            __syncthreads();
            prefix |= sel << sh;
            mask |= 255u << sh;
            k = k_s;
            __syncthreads();
        }
        thr = prefix;
    }

    /* top_p: the smallest key whose candidates at or below it weigh more than the cut */
    if (top_p < 1.0f) {
        uint64_t part = 0;
        for (int j = tid; j < V; j += blockDim.x)
            if (lt_sample_key(x[j]) >= thr) part += lt_sample_weight(x[j], m, inv_t);
        uint64_t cut = lt_sample_cut(block_sum_u64(part, red), top_p);
        uint32_t prefix = 0, mask = 0;
        if (tid == 0) below_s = 0;
        for (int d = 3; d >= 0; d--) {
            int sh = 8 * d;
            radix_hist(hist, x, V, prefix, mask, sh, thr, 1, m, inv_t);
            if (tid == 0) {
                uint64_t below = below_s;
                int b = 0;
                for (; b < 255; b++) {
                    if (below + hist[b] > cut) break;
                    below += hist[b];
                }
                below_s = below;
                sel = (uint32_t)b;
            }
            __syncthreads();
            prefix |= sel << sh;
            mask |= 255u << sh;
            __syncthreads();
        }
        if (prefix > thr) thr = prefix;
    }

    /* the draw: thread tid owns ids [tid * per, (tid + 1) * per) */
    int per = (V + SR_THREADS - 1) / SR_THREADS, j0 = tid * per, j1 = min(V, j0 + per);
    uint64_t own = 0;
    for (int j = j0; j < j1; j++) {
        if (lt_sample_key(x[j]) < thr) continue;
        uint64_t w = lt_sample_weight(x[j], m, inv_t);
        if (w >= floor_w) own += w;
    }
    uint64_t incl = own; /* inclusive scan within the warp */
    for (int o = 1; o < 32; o <<= 1) {
        uint64_t y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) red[warp] = incl;
    __syncthreads();
    uint64_t before = 0, total = 0;
    for (int w = 0; w < SR_WARPS; w++) {
        if (w < warp) before += red[w];
        total += red[w];
    }
    uint64_t excl = before + incl - own;
    if (total == 0) {
        if (tid == 0) ids[blockIdx.x] = argmax;
        return;
    }
    uint64_t t = lt_sample_target(total, (uint32_t)bits[blockIdx.x]);
    if (own == 0 || t < excl || t >= excl + own) return;
    uint64_t acc = excl;
    for (int j = j0; j < j1; j++) {
        if (lt_sample_key(x[j]) < thr) continue;
        uint64_t w = lt_sample_weight(x[j], m, inv_t);
        if (w < floor_w) continue;
        acc += w;
        if (acc > t) {
            ids[blockIdx.x] = j;
            return;
        }
    }
}

void k_sample_rows(cudaStream_t st, int32_t *ids, const float *logits, const int32_t *bits, int R,
                   int V, float inv_temp, int top_k, float top_p, float min_p) {
    if (R <= 0) return;
    sample_rows_kernel<<<R, SR_THREADS, 0, st>>>(ids, logits, bits, V, inv_temp, top_k, top_p,
                                                 lt_sample_floor(min_p));
}
