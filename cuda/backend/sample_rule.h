/* sample_rule.h — the arithmetic of the sample_rows op (backend.h), one text for every backend.
 *
 * sample_rows draws a token per row with temperature, top_k, top_p and min_p. So that the CPU
 * reference and the CUDA kernel pick the same id from the same logits and the same random bits,
 * the rule works on integers wherever an order of summation could differ: a logit's weight is
 * its unnormalised probability e^((logit - max) / T) in fixed point (2^40 = probability of the
 * maximum), sums of weights are exact 64-bit integer sums, and thresholds compare order-keeping
 * integer keys of the logits. Only expf may round differently on two devices (by an ulp), which
 * moves a draw only when its random point falls on that ulp. Included by C (backend_cpu_sample.c)
 * and by CUDA (kernels/sample.cu); holds no state and knows nothing of models.
 */
#ifndef LATHE_SAMPLE_RULE_H
#define LATHE_SAMPLE_RULE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define LT_SAMPLE_FN static __host__ __device__ __forceinline__
#else
#define LT_SAMPLE_FN static inline
#endif

#define LT_SAMPLE_ONE 1099511627776.0 /* 2^40: the weight of the row's maximum */

/* An unsigned key that orders as the floats do (-inf lowest; NaN above +inf). */
LT_SAMPLE_FN uint32_t lt_sample_key(float x) {
    uint32_t b;
#ifdef __CUDA_ARCH__
    b = __float_as_uint(x);
#else
    memcpy(&b, &x, sizeof b);
#endif
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* The weight of a logit: floor(e^((logit - max) * inv_temp) * 2^40); 0 for NaN. */
LT_SAMPLE_FN uint64_t lt_sample_weight(float logit, float max, float inv_temp) {
    float q = expf((logit - max) * inv_temp);
    return q > 0.0f ? (uint64_t)((double)q * LT_SAMPLE_ONE) : 0;
}

/* top_p's cut: a value is kept when the weight of the candidates at or below it exceeds this. */
LT_SAMPLE_FN uint64_t lt_sample_cut(uint64_t total, float top_p) {
    return (uint64_t)((1.0 - (double)top_p) * (double)total);
}

/* min_p's floor: a candidate is kept when its weight is at least this (the maximum's is 2^40). */
LT_SAMPLE_FN uint64_t lt_sample_floor(float min_p) {
    return min_p > 0.0f ? (uint64_t)((double)min_p * LT_SAMPLE_ONE) : 0;
}

/* The draw's point in [0, total): floor(total * bits / 2^32), exactly. */
LT_SAMPLE_FN uint64_t lt_sample_target(uint64_t total, uint32_t bits) {
    return (total >> 32) * bits + (((total & 0xffffffffull) * bits) >> 32);
}

#endif
