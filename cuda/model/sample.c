/* sample.c — the seeded RNG and host-side next-token choice (see sample.h).
 *
 * The draw itself is the CPU backend's sample_rows (backend_cpu_sample.c): this file only turns
 * generation options into its settings and an RNG into its bits. Never touches the model.
 */
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

uint32_t rng_bits(lt_rng *r) {
    return (uint32_t)(rng_next(r) >> 32);
}

lt_sample_opts gen_sample_opts(const lt_gen_opts *o) {
    lt_sample_opts so = {.inv_temp = o->temperature > 0 ? 1.0f / o->temperature : 0.0f,
                         .top_k = o->top_k,
                         .top_p = o->top_p,
                         .min_p = o->min_p};
    return so;
}

int sampler_pick(const float *logits, int vocab, const lt_gen_opts *o, lt_rng *rng) {
    int32_t id = 0, bits = (int32_t)rng_bits(rng);
    lt_sample_opts so = gen_sample_opts(o);
    if (lt_backend_cpu.sample_rows(NULL, lt_tensor_1d(LT_I32, &id, 1),
                                   lt_tensor_2d(LT_F32, (void *)logits, 1, vocab),
                                   lt_tensor_1d(LT_I32, &bits, 1), &so) != LT_OK)
        return 0; /* only for options gen_opts_check refuses */
    return id;
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
