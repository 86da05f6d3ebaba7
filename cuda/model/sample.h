/* sample.h — next-token choice from fp32 logits, and the seeded RNG. Engine-private.
 *
 * Follows Hugging Face's generate order: temperature, then top_k, top_p, min_p, then a draw
 * from the softmax of what is left. temperature 0 = greedy (argmax, first index on ties).
 * The RNG is xoshiro256** seeded through splitmix64: the same seed gives the same tokens here
 * (it does not reproduce torch's generator).
 */
#ifndef LATHE_SAMPLE_H
#define LATHE_SAMPLE_H

#include <stdint.h>

#include "cuda/engine.h"

typedef struct lt_rng {
    uint64_t s[4];
} lt_rng;

void rng_seed(lt_rng *r, uint64_t seed);
uint64_t rng_next(lt_rng *r);
/* Uniform in [0, 1). */
double rng_uniform(lt_rng *r);

typedef struct sampler {
    int vocab;
    int32_t *idx; /* [vocab] scratch */
    float *val;   /* [vocab] scratch */
    double *blk;  /* [vocab / SAMPLER_BLOCK + 1] scratch: block sums of the untruncated draw */
} sampler;
#define SAMPLER_BLOCK 256

lt_status sampler_init(sampler *s, int vocab);
void sampler_free(sampler *s);
/* Picks the next id from logits [vocab]; returns it (>= 0). The logits are not modified. With no
 * truncation (top_k 0, top_p 1, min_p 0) it draws from the whole softmax in id order with no
 * sort: e^x four at a time (Cephes' expf polynomial, relative error below 2e-7), block sums,
 * then a walk to the drawn block. One sampler per thread; distinct samplers may run at once. */
int sampler_pick(sampler *s, const float *logits, const lt_gen_opts *o, lt_rng *rng);

/* Checks option ranges; err names the option and the accepted range. */
lt_status gen_opts_check(const lt_gen_opts *o, char *err);

#endif
