/* sample.c — temperature / top_k / top_p / min_p sampling and the seeded RNG (see sample.h).
 *
 * Owns the sampler scratch. Works on host fp32 logits; never touches the model.
 */
#define _GNU_SOURCE /* qsort_r */
#include "cuda/model/sample.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/base/tensor.h"

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void rng_seed(lt_rng *r, uint64_t seed) {
    uint64_t s = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix(&s);
}

static inline uint64_t rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

uint64_t rng_next(lt_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double rng_uniform(lt_rng *r) {
    return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

lt_status sampler_init(sampler *s, int vocab) {
    s->vocab = vocab;
    s->idx = malloc(sizeof(int32_t) * (size_t)vocab);
    s->val = malloc(sizeof(float) * (size_t)vocab);
    s->blk = malloc(sizeof(double) * (size_t)(vocab / SAMPLER_BLOCK + 1));
    if (!s->idx || !s->val || !s->blk) {
        sampler_free(s);
        return LT_ERR_MEMORY;
    }
    return LT_OK;
}

void sampler_free(sampler *s) {
    free(s->idx);
    free(s->val);
    free(s->blk);
    s->idx = NULL;
    s->val = NULL;
    s->blk = NULL;
}

lt_status gen_opts_check(const lt_gen_opts *o, char *err) {
    if (o->max_new < 0) {
        return lt_fail(err, LT_ERR_ARG, "max_new=%d must be >= 0", o->max_new);
    }
    if (!(o->temperature >= 0) || !isfinite(o->temperature)) {
        return lt_fail(err, LT_ERR_ARG, "temperature=%g must be a number >= 0 (0 = greedy)",
                       o->temperature);
    }
    if (o->top_k < 0) {
        return lt_fail(err, LT_ERR_ARG, "top_k=%d must be >= 0 (0 = off)", o->top_k);
    }
    if (!(o->top_p > 0 && o->top_p <= 1)) {
        return lt_fail(err, LT_ERR_ARG, "top_p=%g must be in (0, 1] (1 = off)", o->top_p);
    }
    if (!(o->min_p >= 0 && o->min_p <= 1)) {
        return lt_fail(err, LT_ERR_ARG, "min_p=%g must be in [0, 1] (0 = off)", o->min_p);
    }
    return LT_OK;
}

/* Sorting candidates by value, descending (ties: lower id first, for determinism). */
static int cmp_desc(const void *a, const void *b, void *vals) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    const float *v = vals;
    float vx = v[x], vy = v[y];
    if (vx > vy) return -1;
    if (vx < vy) return 1;
    return (x > y) - (x < y);
}

/* k-th largest value of v[0..n) (1-based k), by quickselect on a copy in tmp. */
static float kth_largest(const float *v, int n, int k, float *tmp) {
    memcpy(tmp, v, sizeof(float) * (size_t)n);
    int lo = 0, hi = n - 1, want = k - 1; /* index in descending order */
    while (lo < hi) {
        float pivot = tmp[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (tmp[i] > pivot)
                i++;
            while (tmp[j] < pivot)
                j--;
            if (i <= j) {
                float t = tmp[i];
                tmp[i] = tmp[j];
                tmp[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            break;
    }
    return tmp[want];
}

/* Four-wide vectors: native on every x86-64 (SSE2) and ARM64 (NEON), so comparisons and
 * conversions stay in vector registers. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4f v4_select(v4i mask, v4f a, v4f b) { /* mask ? a : b, lane by lane */
    return (v4f)(((v4i)a & mask) | ((v4i)b & ~mask));
}

/* e^x for x <= 0, four at a time, as Cephes' expf computes it: n = round(x log2 e),
 * r = x - n ln 2 (in two parts), e^r by its degree-7 polynomial, times 2^n; below -87 gives 0. */
static inline v4f exp4(v4f x) {
    v4i live = x >= -87.0f;
    x = v4_select(live, x, (v4f){0} - 87.0f); /* keep the conversions in range */
    v4f fx = x * 1.44269504088896341f + 0.5f;
    v4i n = __builtin_convertvector(fx, v4i); /* toward zero, then down to the floor */
    n += (v4i)(__builtin_convertvector(n, v4f) > fx);
    v4f nf = __builtin_convertvector(n, v4f);
    v4f r = x - nf * 0.693359375f + nf * 2.12194440e-4f, z = r * r;
    v4f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    v4i bits = (n + 127) << 23;
    v4f scale;
    memcpy(&scale, &bits, sizeof scale);
    return (v4f)((v4i)(p * scale) & live);
}

/* No truncation (top_k 0, top_p 1, min_p 0): a draw from the whole softmax in id order, no sort
 * (GRPO samples 262,144 ids this way every token). val[i] = e^((logit_i - max) / T); blk[b] =
 * the sum of block b (SAMPLER_BLOCK ids); u * total walks the blocks, then the drawn block's
 * ids in order. */
static int pick_full(sampler *s, const float *logits, const lt_gen_opts *o, lt_rng *rng) {
    int V = s->vocab, V16 = V & ~15;
    float inv_t = 1.0f / o->temperature;
    v4f m4[4];
    for (int k = 0; k < 4; k++)
        m4[k] = (v4f){0} - INFINITY;
    for (int i = 0; i < V16; i += 16) /* four independent chains */
        for (int k = 0; k < 4; k++) {
            v4f x;
            memcpy(&x, logits + i + 4 * k, sizeof x);
            m4[k] = v4_select(x > m4[k], x, m4[k]);
        }
    float mx = -INFINITY;
    for (int k = 0; k < 16; k++)
        if (m4[k / 4][k % 4] > mx) mx = m4[k / 4][k % 4];
    for (int i = V16; i < V; i++)
        if (logits[i] > mx) mx = logits[i];
    double total = 0;
    int nb = (V + SAMPLER_BLOCK - 1) / SAMPLER_BLOCK;
    for (int b = 0; b < nb; b++) {
        int i0 = b * SAMPLER_BLOCK, i1 = i0 + SAMPLER_BLOCK < V ? i0 + SAMPLER_BLOCK : V;
        v4f acc0 = {0}, acc1 = {0};
        int i = i0;
        for (; i + 8 <= i1; i += 8) {
            v4f x0, x1;
            memcpy(&x0, logits + i, sizeof x0);
            memcpy(&x1, logits + i + 4, sizeof x1);
            x0 = exp4((x0 - mx) * inv_t);
            x1 = exp4((x1 - mx) * inv_t);
            memcpy(s->val + i, &x0, sizeof x0);
            memcpy(s->val + i + 4, &x1, sizeof x1);
            acc0 += x0;
            acc1 += x1;
        }
        v4f acc = acc0 + acc1;
        double bs = ((double)acc[0] + acc[1]) + ((double)acc[2] + acc[3]);
        for (; i < i1; i++) { /* the vocabulary's last few ids */
            v4f e = exp4((v4f){(logits[i] - mx) * inv_t});
            s->val[i] = e[0];
            bs += e[0];
        }
        s->blk[b] = bs;
        total += bs;
    }
    double u = rng_uniform(rng) * total, acc = 0;
    int b = 0;
    while (b + 1 < nb && acc + s->blk[b] <= u)
        acc += s->blk[b++];
    int last = 0;
    for (int i = b * SAMPLER_BLOCK; i < V; i++) { /* rounding may carry past the block */
        if (s->val[i] == 0.0f) continue;
        acc += s->val[i];
        last = i;
        if (u < acc) return i;
    }
    return last; /* u at the very top: the last id with any mass */
}

int sampler_pick(sampler *s, const float *logits, const lt_gen_opts *o, lt_rng *rng) {
    int V = s->vocab;
    if (o->temperature <= 0) { /* greedy: first maximum, like torch.argmax */
        int best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best]) best = i;
        return best;
    }
    if (o->top_k == 0 && o->top_p >= 1.0f && o->min_p <= 0) return pick_full(s, logits, o, rng);
    /* scaled scores in val (indexed by id) */
    float *val = s->val;
    for (int i = 0; i < V; i++)
        val[i] = logits[i] / o->temperature;
    int n = 0;
    if (o->top_k > 0 && o->top_k < V) {
        /* HF keeps every score >= the k-th largest (ties at the boundary survive) */
        float *tmp = malloc(sizeof(float) * (size_t)V);
        float thr;
        if (tmp) {
            thr = kth_largest(val, V, o->top_k, tmp);
            free(tmp);
        } else { /* no memory for the copy: fall back to a full sort below */
            thr = -INFINITY;
        }
        for (int i = 0; i < V; i++)
            if (val[i] >= thr) s->idx[n++] = i;
    } else {
        for (int i = 0; i < V; i++)
            s->idx[n++] = i;
    }
    qsort_r(s->idx, (size_t)n, sizeof(int32_t), cmp_desc, val);
    /* softmax over the candidates (descending) */
    float mx = val[s->idx[0]];
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += exp((double)val[s->idx[i]] - mx);
    /* top_p: from the smallest, drop while the tail mass is <= 1 - top_p; keep at least one */
    if (o->top_p < 1.0f) {
        double tail = 0, cut = 1.0 - (double)o->top_p;
        int keep = n;
        for (int i = n - 1; i >= 1; i--) {
            tail += exp((double)val[s->idx[i]] - mx) / sum;
            if (tail <= cut)
                keep = i;
            else
                break;
        }
        n = keep;
        sum = 0;
        for (int i = 0; i < n; i++)
            sum += exp((double)val[s->idx[i]] - mx);
    }
    /* min_p: drop probabilities below min_p * the top probability */
    if (o->min_p > 0) {
        double top = 1.0 / sum; /* p of the best = exp(0)/sum */
        int keep = 1;
        while (keep < n && exp((double)val[s->idx[keep]] - mx) / sum >= o->min_p * top)
            keep++;
        n = keep;
        sum = 0;
        for (int i = 0; i < n; i++)
            sum += exp((double)val[s->idx[i]] - mx);
    }
    double u = rng_uniform(rng) * sum, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += exp((double)val[s->idx[i]] - mx);
        if (u < acc) return s->idx[i];
    }
    return s->idx[n - 1];
}
