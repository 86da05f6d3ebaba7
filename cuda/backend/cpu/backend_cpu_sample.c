/* backend_cpu_sample.c — the CPU reference of sample_rows (backend.h): one draw per row.
 *
 * Follows backend.h's rule with sample_rule.h's arithmetic, by the same steps as the CUDA
 * kernel (kernels/sample.cu): the row's first maximum, then top_k and top_p as radix selections
 * over the logits' keys (four passes of eight bits from the top, histograms of counts for top_k
 * and of weights for top_p), then one walk in id order to the drawn id. Rows run on all cores
 * (one row per task), each with its own scratch-free passes. Knows nothing of models.
 */
#include <limits.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "cuda/backend/cpu/grad.h"
#include "cuda/backend/sample_rule.h"
#include "cuda/base/threads.h"

/* The first maximum of x[0..V) (NaN never wins; 0 when none is > -inf or equal to it). */
static int first_max(const float *x, int V, float *best_out) {
    float best = -INFINITY;
    int at = INT_MAX;
    for (int j = 0; j < V; j++)
        if (x[j] > best || (x[j] == best && j < at)) {
            best = x[j];
            at = j;
        }
    *best_out = best;
    return at == INT_MAX ? 0 : at;
}

/* The key of the k-th largest logit (1 <= k <= V): a radix selection from the top byte. */
static uint32_t top_k_key(const float *x, int V, int k) {
    uint32_t prefix = 0, mask = 0;
    for (int d = 3; d >= 0; d--) {
        uint32_t hist[256] = {0};
        int sh = 8 * d;
        for (int j = 0; j < V; j++) {
            uint32_t key = lt_sample_key(x[j]);
            if ((key & mask) == prefix) hist[(key >> sh) & 255u]++;
        }
        int b = 255;
        for (; b > 0; b--) { /* from the top bin down, to the bin holding the k-th */
            if ((uint32_t)k <= hist[b]) break;
            k -= (int)hist[b];
        }
        prefix |= (uint32_t)b << sh;
        mask |= 255u << sh;
    }
    return prefix;
}

/* top_p's key: the smallest key v among the candidates (key >= floor_key) whose weight at or
 * below v exceeds cut; a radix selection from the top byte over weight histograms. */
static uint32_t top_p_key(const float *x, int V, float m, float inv_t, uint32_t floor_key,
                          uint64_t cut) {
    uint32_t prefix = 0, mask = 0;
    uint64_t below = 0; /* the candidates' weight under the current bin range */
    for (int d = 3; d >= 0; d--) {
        uint64_t hist[256] = {0};
        int sh = 8 * d;
        for (int j = 0; j < V; j++) {
            uint32_t key = lt_sample_key(x[j]);
            if (key >= floor_key && (key & mask) == prefix)
                hist[(key >> sh) & 255u] += lt_sample_weight(x[j], m, inv_t);
        }
        int b = 0;
        for (; b < 255; b++) { /* from the bottom bin up, to the one that passes the cut */
            if (below + hist[b] > cut) break;
            below += hist[b];
        }
        prefix |= (uint32_t)b << sh;
        mask |= 255u << sh;
    }
    return prefix;
}

static int32_t sample_row(const float *x, int V, uint32_t bits, const lt_sample_opts *o) {
    float m;
    int argmax = first_max(x, V, &m);
    if (!(o->inv_temp > 0)) return argmax;
    float inv_t = o->inv_temp;
    uint32_t thr = 0;
    if (o->top_k > 0 && o->top_k < V) thr = top_k_key(x, V, o->top_k);
    if (o->top_p < 1.0f) {
        uint64_t total = 0;
        for (int j = 0; j < V; j++)
            if (lt_sample_key(x[j]) >= thr) total += lt_sample_weight(x[j], m, inv_t);
        uint32_t kp = top_p_key(x, V, m, inv_t, thr, lt_sample_cut(total, o->top_p));
        if (kp > thr) thr = kp;
    }
    uint64_t floor_w = lt_sample_floor(o->min_p), S = 0;
    for (int j = 0; j < V; j++) {
        if (lt_sample_key(x[j]) < thr) continue;
        uint64_t w = lt_sample_weight(x[j], m, inv_t);
        if (w >= floor_w) S += w;
    }
    if (S == 0) return argmax;
    uint64_t t = lt_sample_target(S, bits), acc = 0;
    for (int j = 0; j < V; j++) {
        if (lt_sample_key(x[j]) < thr) continue;
        uint64_t w = lt_sample_weight(x[j], m, inv_t);
        if (w < floor_w) continue;
        acc += w;
        if (acc > t) return j;
    }
    return argmax; /* not reached: acc ends at S > t */
}

typedef struct sample_job {
    int32_t *ids;
    const float *logits;
    const int32_t *bits;
    int R, V;
    const lt_sample_opts *o;
    atomic_int next;
} sample_job;

static void *sample_worker(void *arg) {
    sample_job *j = arg;
    for (int r; (r = atomic_fetch_add(&j->next, 1)) < j->R;)
        j->ids[r] =
            sample_row(j->logits + (size_t)r * (size_t)j->V, j->V, (uint32_t)j->bits[r], j->o);
    return NULL;
}

lt_status cpu_sample_rows(lt_ctx *ctx, lt_tensor ids, lt_tensor logits, lt_tensor bits,
                          const lt_sample_opts *o) {
    const char *op = "sample_rows";
    REQUIRE(o, op, "options are required");
    REQUIRE(logits.dtype == LT_F32 && logits.ndim == 2 && logits.data, op,
            "logits must be fp32 [R, V]");
    REQUIRE(logits.shape[1] > 0 && logits.shape[1] < INT_MAX && logits.shape[0] < INT_MAX, op,
            "logits' sizes are out of range");
    int R = (int)logits.shape[0], V = (int)logits.shape[1];
    REQUIRE(ids.dtype == LT_I32 && lt_tensor_numel(&ids) == R && (ids.data || !R), op,
            "ids must be I32 [R]");
    REQUIRE(bits.dtype == LT_I32 && lt_tensor_numel(&bits) == R && (bits.data || !R), op,
            "bits must be I32 [R]");
    REQUIRE(o->top_k >= 0 && o->top_p > 0 && o->top_p <= 1 && o->min_p >= 0 && o->min_p <= 1, op,
            "top_k must be >= 0, top_p in (0, 1] and min_p in [0, 1]");
    sample_job j = {
        .ids = ids.data, .logits = logits.data, .bits = bits.data, .R = R, .V = V, .o = o};
    atomic_init(&j.next, 0);
    /* small calls on this thread; large ones on every core, at most one per row */
    lt_run_on_cores(sample_worker, &j, (long)R * V >= (1 << 16) ? R : 1);
    return LT_OK;
}
