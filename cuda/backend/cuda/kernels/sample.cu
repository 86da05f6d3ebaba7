/* sample.cu — sample_rows on the GPU: one token id per row of logits, drawn where the logits are.
 *
 * Two ways, one rule. Many rows (SR_FEW_ROWS and more, or a vocabulary too short to split): one
 * block per row. Few rows: each row split into slices, a block each (below), since one block a
 * row left 124 of an H100's 132 SMs idle at 8 rows (1.2 ms a decoding step over 262,144 ids).
 *
 * One block per row: the block finds the row's first maximum, then (when asked) top_k's and
 * top_p's thresholds as radix selections over the logits' order-keeping keys — four passes of
 * eight bits from the top, a 256-bin histogram in shared memory per pass (counts for top_k,
 * 64-bit fixed-point weights for top_p, so the sums do not depend on the order the threads add
 * in) — and last draws: each thread sums the weights of its contiguous slice of ids, an exclusive
 * scan over the threads finds the slice that holds the random point, and that thread walks its
 * slice to the id.
 *
 * Sliced (few rows): each row is split into nb slices, a block each (sr_layout: enough blocks
 * for two a multiprocessor over all rows, at most 64 a row, slices of at least 4,096 ids). A few
 * short launches walk the slices, the stream ordering them; what a row's blocks found meets in
 * global memory as exact integers (counts, 64-bit fixed-point weights), so no sum depends on the
 * order the blocks add in:
 *   sr_max    the first maximum of each slice (and it clears the row's histograms);
 *   sr_hist   one radix-selection pass, eight bits from the top: top_k's four passes count,
 *             top_p's four weigh; each block adds its slice's 256-bin histogram into the row's;
 *   sr_sum    the weight of top_k's candidates (top_p's total), or each slice's weight of the
 *             final candidates;
 *   sr_draw   one block a row: the slice that holds the random point, then within it each
 *             thread's run of ids (an exclusive scan), and that thread walks its run to the id.
 * Every block re-derives the row's state (its maximum, the thresholds so far) from those global
 * results in its prologue, with the same steps in the same order, so no launch sits between the
 * passes to pick a bin. These are branch decode2's kernels, which passed test_ops on an H100 but
 * lost 3-27% at 64 rows and more (BENCHMARKS.md, 2026-12-07): so they run only below 64 rows.
 *
 * Both follow sample_rule.h's arithmetic, the same text the CPU reference (backend_cpu_sample.c)
 * runs, so each picks the CPU's id from the same logits and bits. Only the ids leave the GPU: no
 * [rows, vocabulary] download per token. Must not know the model.
 */
#include <limits.h>
#include <stdint.h>

#include "cuda/backend/cuda/kernels/kernels.h"
#include "cuda/backend/sample_rule.h"

#define SR_THREADS 1024 /* the one-block kernel's and sr_draw's block */
#define SR_WARPS (SR_THREADS / 32)
#define SP_THREADS 256 /* the slice passes' blocks */
#define SR_MAX_BLOCKS 64
#define SR_MIN_SLICE 4096
#define SR_FEW_ROWS 64 /* from this many rows on, one block a row */

/* Block-wide sum of a 64-bit value; every thread gets the total. */
__device__ static uint64_t block_sum_u64(uint64_t v, uint64_t *red) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads(); /* red may still be read by a previous call */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    uint64_t t = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++)
        t += red[w];
    return t;
}

/* One radix-selection pass over the keys of ids [j0, j1) matching (prefix, mask): the histogram
 * of digit `sh` (counts, or weights when weighted) of the keys >= floor_key. A row's logits
 * share their top digits, so most threads of a pass hit one or two bins: the lanes of a warp
 * that share a bin add once (a count of __popc lanes, or their weights summed over the warp when
 * all 32 agree); one shared atomic per lane serialized on those bins and made top_k's passes the
 * slowest part of a decoding step. The sums are integers, so the order of the adds does not
 * matter. */
__device__ static void radix_hist(unsigned long long *hist, const float *x, int j0, int j1,
                                  uint32_t prefix, uint32_t mask, int sh, uint32_t floor_key,
                                  int weighted, float m, float inv_t) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x)
        hist[b] = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    /* whole warps walk the ids together (blockDim is a multiple of 32), so the warp votes see
     * every lane; lanes past the end carry the bin 256, which is never added */
    for (int base = j0 + threadIdx.x - lane; base < j1; base += blockDim.x) {
        int j = base + lane;
        uint32_t bin = 256u;
        unsigned long long add = 0;
        if (j < j1) {
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

/* The first maximum so far (best at id at) meets value v at id j: a larger value, or the same
 * at a smaller id, wins. */
__device__ static inline void first_max(float *best, int *at, float v, int j) {
    if (v > *best || (v == *best && j < *at)) {
        *best = v;
        *at = j;
    }
}

/* ---- one block a row ------------------------------------------------------------------------ */

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
    for (int j = tid; j < V; j += blockDim.x)
        first_max(&best, &at, x[j], j);
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, at, o);
        first_max(&best, &at, ov, oi);
    }
    if (lane == 0) {
        red_v[warp] = best;
        red_i[warp] = at;
    }
    __syncthreads();
    best = -INFINITY;
    at = INT_MAX;
    for (int w = 0; w < SR_WARPS; w++)
        first_max(&best, &at, red_v[w], red_i[w]);
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
            radix_hist(hist, x, 0, V, prefix, mask, sh, 0, 0, m, inv_t);
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
            radix_hist(hist, x, 0, V, prefix, mask, sh, thr, 1, m, inv_t);
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

/* ---- sliced: few rows, each over several blocks --------------------------------------------- */

/* The scratch of R rows split into nb slices (sr_layout): global meeting places of the passes. */
typedef struct sr_rows {
    unsigned long long *hist;  /* [R][8][256]: top_k's 4 passes (counts), then top_p's (weights) */
    unsigned long long *total; /* [R]: top_p's total weight of top_k's candidates */
    unsigned long long *bsum;  /* [R][nb]: each slice's weight of the final candidates */
    float *bmax;               /* [R][nb]: each slice's first maximum */
    int *bidx;
    int nb, slice;
} sr_rows;

/* What a row's blocks know at a given pass, derived the same way by every block. */
typedef struct sr_state {
    float m;
    int argmax;
    uint32_t prefix, mask; /* the radix selection so far */
    int k;                 /* top_k's rank left within the prefix */
    uint32_t thr;          /* the candidates' lowest key (top_k's, then top_p's) */
    unsigned long long cut, below;
} sr_state;

/* The row's first maximum from its slices' (a larger value, or the same at a smaller id). */
__device__ static void row_max(const sr_rows *S, int row, float *m, int *argmax) {
    float best = -INFINITY;
    int at = INT_MAX;
    for (int b = 0; b < S->nb; b++)
        first_max(&best, &at, S->bmax[row * S->nb + b], S->bidx[row * S->nb + b]);
    *m = best;
    *argmax = at == INT_MAX ? 0 : at;
}

/* top_k's selection after its passes 0 .. upto-1 (pass p reads digit 3 - p): the one-block
 * kernel's steps. */
__device__ static void topk_steps(const unsigned long long *h, int top_k, int upto, sr_state *s) {
    s->prefix = s->mask = 0;
    s->k = top_k;
    for (int p = 0; p < upto; p++) {
        const unsigned long long *hp = h + p * 256;
        int b = 255, k = s->k;
        for (; b > 0; b--) {
            if ((unsigned long long)k <= hp[b]) break;
            k -= (int)hp[b];
        }
        s->k = k;
        s->prefix |= (uint32_t)b << (8 * (3 - p));
        s->mask |= 255u << (8 * (3 - p));
    }
}

/* top_p's selection after its passes 4 .. 4+upto-1, from s->cut. */
__device__ static void topp_steps(const unsigned long long *h, int upto, sr_state *s) {
    s->prefix = s->mask = 0;
    s->below = 0;
    for (int p = 0; p < upto; p++) {
        const unsigned long long *hp = h + (4 + p) * 256;
        unsigned long long below = s->below;
        int b = 0;
        for (; b < 255; b++) {
            if (below + hp[b] > s->cut) break;
            below += hp[b];
        }
        s->below = below;
        s->prefix |= (uint32_t)b << (8 * (3 - p));
        s->mask |= 255u << (8 * (3 - p));
    }
}

/* The row's state before `stage`: 0..3 top_k's passes, 4 top_p's total, 5..8 top_p's passes,
 * 9 the final candidates. Thread 0 derives it into shared memory; every thread returns a copy. */
__device__ static sr_state row_state(const sr_rows *S, int row, int V, int top_k, float top_p,
                                     int stage) {
    __shared__ sr_state sh;
    if (threadIdx.x == 0) {
        sr_state s = {};
        row_max(S, row, &s.m, &s.argmax);
        const unsigned long long *h = S->hist + (size_t)row * 8 * 256;
        int use_k = top_k > 0 && top_k < V;
        if (use_k) topk_steps(h, top_k, stage < 4 ? stage : 4, &s);
        s.thr = stage >= 4 && use_k ? s.prefix : 0;
        if (stage >= 5 && top_p < 1.0f) {
            s.cut = lt_sample_cut(S->total[row], top_p);
            uint32_t thr = s.thr;
            topp_steps(h, stage - 5 < 4 ? stage - 5 : 4, &s);
            if (stage == 9 && s.prefix > thr) thr = s.prefix;
            s.thr = thr;
        }
        sh = s;
    }
    __syncthreads();
    sr_state s = sh;
    __syncthreads();
    return s;
}

__device__ static void slice_of(const sr_rows *S, int V, int *j0, int *j1) {
    *j0 = blockIdx.x * S->slice;
    *j1 = min(V, *j0 + S->slice);
}

/* Each slice's first maximum; the blocks also clear the row's histograms and total. */
__global__ static void sr_max(sr_rows S, const float *logits, int V) {
    __shared__ float red_v[SP_THREADS / 32];
    __shared__ int red_i[SP_THREADS / 32];
    const int row = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float *x = logits + (size_t)row * (size_t)V;
    int j0, j1;
    slice_of(&S, V, &j0, &j1);
    float best = -INFINITY;
    int at = INT_MAX;
    for (int j = j0 + tid; j < j1; j += blockDim.x)
        first_max(&best, &at, x[j], j);
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, at, o);
        first_max(&best, &at, ov, oi);
    }
    if (lane == 0) {
        red_v[warp] = best;
        red_i[warp] = at;
    }
    __syncthreads();
    if (tid == 0) {
        best = -INFINITY;
        at = INT_MAX;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++)
            first_max(&best, &at, red_v[w], red_i[w]);
        S.bmax[row * S.nb + blockIdx.x] = best;
        S.bidx[row * S.nb + blockIdx.x] = at;
    }
    unsigned long long *h = S.hist + (size_t)row * 8 * 256;
    for (int i = blockIdx.x * blockDim.x + tid; i < 8 * 256; i += S.nb * blockDim.x)
        h[i] = 0;
    if (blockIdx.x == 0 && tid == 0) S.total[row] = 0;
}

/* One radix pass over each slice (stage 0..3 top_k's, 5..8 top_p's), into the row's histogram. */
__global__ static void sr_hist(sr_rows S, const float *logits, int V, float inv_t, int top_k,
                               float top_p, int stage) {
    __shared__ unsigned long long hist[256];
    const int row = blockIdx.y;
    const float *x = logits + (size_t)row * (size_t)V;
    sr_state s = row_state(&S, row, V, top_k, top_p, stage);
    int j0, j1;
    slice_of(&S, V, &j0, &j1);
    const int weighted = stage >= 5, p = weighted ? stage - 5 : stage;
    radix_hist(hist, x, j0, j1, s.prefix, s.mask, 8 * (3 - p), weighted ? s.thr : 0, weighted, s.m,
               inv_t);
    unsigned long long *h = S.hist + ((size_t)row * 8 + (weighted ? 4 + p : p)) * 256;
    for (int b = threadIdx.x; b < 256; b += blockDim.x)
        if (hist[b]) atomicAdd(&h[b], hist[b]);
}

/* stage 4: the weight of top_k's candidates (top_p's total); stage 9: each slice's weight of
 * the final candidates (min_p's floor applied). */
__global__ static void sr_sum(sr_rows S, const float *logits, int V, float inv_t, int top_k,
                              float top_p, uint64_t floor_w, int stage) {
    __shared__ uint64_t red[SP_THREADS / 32];
    const int row = blockIdx.y;
    const float *x = logits + (size_t)row * (size_t)V;
    sr_state s = row_state(&S, row, V, top_k, top_p, stage);
    int j0, j1;
    slice_of(&S, V, &j0, &j1);
    uint64_t part = 0;
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        if (lt_sample_key(x[j]) < s.thr) continue;
        uint64_t w = lt_sample_weight(x[j], s.m, inv_t);
        if (stage == 4 || w >= floor_w) part += w;
    }
    uint64_t t = block_sum_u64(part, red);
    if (threadIdx.x != 0) return;
    if (stage == 4) {
        if (t) atomicAdd(&S.total[row], (unsigned long long)t);
    } else {
        S.bsum[row * S.nb + blockIdx.x] = t;
    }
}

/* One block a row: the slice holding the random point, then the id within it. */
__global__ static void sr_draw(sr_rows S, int32_t *ids, const float *logits, const int32_t *bits,
                               int V, float inv_t, int top_k, float top_p, uint64_t floor_w) {
    __shared__ uint64_t red[SR_WARPS];
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float *x = logits + (size_t)row * (size_t)V;
    if (!(inv_t > 0)) {
        if (tid == 0) {
            float m;
            int argmax;
            row_max(&S, row, &m, &argmax);
            ids[row] = argmax;
        }
        return;
    }
    sr_state s = row_state(&S, row, V, top_k, top_p, 9);
    uint64_t total = 0;
    for (int b = 0; b < S.nb; b++)
        total += S.bsum[row * S.nb + b];
    if (total == 0) {
        if (tid == 0) ids[row] = s.argmax;
        return;
    }
    uint64_t t = lt_sample_target(total, (uint32_t)bits[row]);
    uint64_t before = 0;
    int sb = 0;
    for (; sb < S.nb - 1; sb++) {
        uint64_t w = S.bsum[row * S.nb + sb];
        if (t < before + w) break;
        before += w;
    }
    int lo = sb * S.slice, hi = min(V, lo + S.slice);
    /* thread tid owns ids [j0, j1) of the slice */
    int per = (hi - lo + SR_THREADS - 1) / SR_THREADS, j0 = min(hi, lo + tid * per),
        j1 = min(hi, j0 + per);
    uint64_t own = 0;
    for (int j = j0; j < j1; j++) {
        if (lt_sample_key(x[j]) < s.thr) continue;
        uint64_t w = lt_sample_weight(x[j], s.m, inv_t);
        if (w >= floor_w) own += w;
    }
    uint64_t incl = own; /* inclusive scan within the warp */
    for (int o = 1; o < 32; o <<= 1) {
        uint64_t y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) red[warp] = incl;
    __syncthreads();
    uint64_t wb = 0;
    for (int w = 0; w < warp; w++)
        wb += red[w];
    uint64_t excl = before + wb + incl - own;
    if (own == 0 || t < excl || t >= excl + own) return;
    uint64_t acc = excl;
    for (int j = j0; j < j1; j++) {
        if (lt_sample_key(x[j]) < s.thr) continue;
        uint64_t w = lt_sample_weight(x[j], s.m, inv_t);
        if (w < floor_w) continue;
        acc += w;
        if (acc > t) {
            ids[row] = j;
            return;
        }
    }
}

/* Slices a row: enough blocks for two a multiprocessor over all rows, at most 64 a row, each
 * slice at least 4,096 ids; *nb = 1 (one block a row) from SR_FEW_ROWS rows on. */
static void sr_layout(int R, int V, int n_sm, int *nb, int *slice) {
    int want = (2 * (n_sm > 0 ? n_sm : 1) + R - 1) / R;
    int most = (V + SR_MIN_SLICE - 1) / SR_MIN_SLICE;
    int b = want < most ? want : most;
    if (b > SR_MAX_BLOCKS) b = SR_MAX_BLOCKS;
    if (b < 1 || R >= SR_FEW_ROWS) b = 1;
    *slice = (V + b - 1) / b;
    *nb = (V + *slice - 1) / *slice;
}

size_t k_sample_rows_scratch(int R, int V, int n_sm) {
    int nb, slice;
    if (R <= 0 || V <= 0) return 0;
    sr_layout(R, V, n_sm, &nb, &slice);
    if (nb < 2) return 0;
    return (size_t)R * (8 * 256 + 1 + nb) * sizeof(unsigned long long) +
           (size_t)R * nb * (sizeof(float) + sizeof(int));
}

void k_sample_rows(cudaStream_t st, int32_t *ids, const float *logits, const int32_t *bits, int R,
                   int V, float inv_temp, int top_k, float top_p, float min_p, void *scratch,
                   int n_sm) {
    if (R <= 0) return;
    const uint64_t floor_w = lt_sample_floor(min_p);
    sr_rows S;
    sr_layout(R, V, n_sm, &S.nb, &S.slice);
    if (S.nb < 2 || !scratch) {
        sample_rows_kernel<<<R, SR_THREADS, 0, st>>>(ids, logits, bits, V, inv_temp, top_k, top_p,
                                                     floor_w);
        return;
    }
    S.hist = (unsigned long long *)scratch;
    S.total = S.hist + (size_t)R * 8 * 256;
    S.bsum = S.total + R;
    S.bmax = (float *)(S.bsum + (size_t)R * S.nb);
    S.bidx = (int *)(S.bmax + (size_t)R * S.nb);
    const dim3 grid((unsigned)S.nb, (unsigned)R);
    sr_max<<<grid, SP_THREADS, 0, st>>>(S, logits, V);
    if (inv_temp > 0) {
        if (top_k > 0 && top_k < V)
            for (int p = 0; p < 4; p++)
                sr_hist<<<grid, SP_THREADS, 0, st>>>(S, logits, V, inv_temp, top_k, top_p, p);
        if (top_p < 1.0f) {
            sr_sum<<<grid, SP_THREADS, 0, st>>>(S, logits, V, inv_temp, top_k, top_p, floor_w, 4);
            for (int p = 5; p < 9; p++)
                sr_hist<<<grid, SP_THREADS, 0, st>>>(S, logits, V, inv_temp, top_k, top_p, p);
        }
        sr_sum<<<grid, SP_THREADS, 0, st>>>(S, logits, V, inv_temp, top_k, top_p, floor_w, 9);
    }
    sr_draw<<<R, SR_THREADS, 0, st>>>(S, ids, logits, bits, V, inv_temp, top_k, top_p, floor_w);
}
