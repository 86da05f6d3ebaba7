/* quant_dynamic.h — the parts of quant=dynamic that are arithmetic and choice, not loading:
 * the calibration text, the two error measures, the score and the budgeted choice of the
 * linears that stay 16-bit (quant_dynamic.c). gemma3.c streams the layers, runs the calibration
 * forward and calls these. Engine-private; must not include anything from kernel/.
 *
 * The idea is Unsloth's "dynamic 4-bit" (unsloth-bnb-4bit uploads): bitsandbytes NF4 with
 * double quantization for most linears, the ones whose quantization hurts most left in 16 bits,
 * judged by the activation (output) error AWQ-style and by the weight error.
 */
#ifndef LATHE_QUANT_DYNAMIC_H
#define LATHE_QUANT_DYNAMIC_H

#include <stdint.h>

#include "cuda/backend/backend.h"
#include "cuda/text/tokenizer.h"

/* What quant=dynamic measured and chose: info as lt_quant_info_get returns it, and one entry
 * per linear in the model's order (layer by layer: q, k, v, o, gate, up, down). */
typedef struct qdyn_report {
    lt_quant_info info;
    lt_quant_module *mods; /* [info.n_modules], malloc'd */
} qdyn_report;

/* The fixed calibration text: a few hundred tokens of ordinary English prose. */
const char *qdyn_calibration_text(void);

/* BOS + the tokens of the calibration text, with the tokenizer at tokenizer_path (a
 * SentencePiece tokenizer.model). *ids is malloc'd; the caller frees it. */
lt_status qdyn_calibration_ids(const char *tokenizer_path, int32_t **ids, int *n, char *err);

/* The weight error's parts for one linear: x [out, in] holds the fp32 weight W and q its
 * quantized form. On return x holds W - dequant(q) (the residual, which the caller multiplies
 * by the captured inputs for the output error), *sq_w = |W|^2 and *sq_d = |W - dequant(q)|^2,
 * summed in double. Runs on every core. LT_OK or LT_ERR_MEMORY (err filled). */
lt_status qdyn_residual(const lt_weight *q, float *x, int64_t out, int64_t in, double *sq_w,
                        double *sq_d, char *err);

/* Sum of squares of n floats, in double. */
double qdyn_sumsq(const float *x, int64_t n);

/* |a| / |b| from squared norms; 0 when both are 0 (an all-zero weight quantizes exactly). */
double qdyn_ratio(double sq_a, double sq_b);

/* An empty report for n modules (names, sizes and errors filled by the caller). LT_OK or
 * LT_ERR_MEMORY. */
lt_status qdyn_report_init(qdyn_report *r, int n_modules);

/* Scores every module (weight_error / its median + output_error / its median, the medians
 * over all modules) and keeps, worst score first, every module that still fits in the budget
 * floor(keep x linear_params); a module too large for what is left is passed over and the
 * next ones are tried. Fills info's totals and the quantized modules' medians. LT_OK or
 * LT_ERR_MEMORY. */
lt_status qdyn_report_choose(qdyn_report *r, double keep);

void qdyn_report_free(qdyn_report *r);

#endif
