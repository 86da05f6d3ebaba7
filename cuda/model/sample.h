/* sample.h — next-token choice from fp32 logits on the host, and the seeded RNG. Engine-private.
 *
 * One sampling rule serves %generate, %%chat and GRPO's rollouts: backend.h's sample_rows
 * (temperature, then top_k, top_p, min_p, then a draw in id order from what is left; temperature
 * 0 = greedy, the first maximum). sampler_pick applies it to host logits through the CPU
 * backend's op, so a draw on the host and a draw on the GPU agree given the same 32 random
 * bits. The RNG is xoshiro256** seeded through splitmix64: the same seed gives the same tokens
 * here (it does not reproduce torch's generator).
 */
#ifndef LATHE_SAMPLE_H
#define LATHE_SAMPLE_H

#include <stdint.h>

#include "cuda/backend/backend.h"
#include "cuda/engine.h"

typedef struct lt_rng {
    uint64_t s[4];
} lt_rng;

void rng_seed(lt_rng *r, uint64_t seed);
uint64_t rng_next(lt_rng *r);
/* The 32 random bits of one draw (sample_rows' bits). */
uint32_t rng_bits(lt_rng *r);

/* sample_rows' settings for generation options (checked by gen_opts_check). */
lt_sample_opts gen_sample_opts(const lt_gen_opts *o);

/* Picks the next id from host logits [vocab] with the next bits of rng; returns it (>= 0).
 * The logits are not modified; safe to call from several threads with distinct RNGs. */
int sampler_pick(const float *logits, int vocab, const lt_gen_opts *o, lt_rng *rng);

/* Checks option ranges; err names the option and the accepted range. */
lt_status gen_opts_check(const lt_gen_opts *o, char *err);

#endif
