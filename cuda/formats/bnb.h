/* bnb.h — bitsandbytes' weight formats, bit for bit: NF4 (4-bit NormalFloat, with or without
 * double quantization) and LLM.int8 row-wise int8. Engine-private.
 *
 * Three things live here: the quantizers (what bitsandbytes' quantize_4bit, quantize_blockwise
 * and Int8Params compute, following the reference arithmetic of its backends/default/ops.py);
 * the reader of a pre-quantized tensor group in a safetensors checkpoint (the layout
 * QuantState.as_dict(packed=True) writes); and config.json's `quantization_config` as
 * transformers' BitsAndBytesConfig spells it. Dequantization is the backend's
 * (lt_weight_dequantize_rows in backend.h): one implementation of the arithmetic, used to run,
 * merge and export. This file may include only formats/ and base/.
 */
#ifndef LATHE_BNB_H
#define LATHE_BNB_H

#include <stddef.h>
#include <stdint.h>

#include "cuda/base/tensor.h"
#include "cuda/formats/safetensors.h"

#define BNB_NF4_BLOCKSIZE 64     /* quantize_4bit's default blocksize (CUDA and CPU) */
#define BNB_NESTED_BLOCKSIZE 256 /* the absmax of double quantization, quantize_blockwise */

/* The NF4 code, index -> value (bitsandbytes' get_4bit_type("nf4"), as fp32). */
extern const float bnb_nf4_code[16];

/* The signed 256-entry dynamic map: create_dynamic_map(signed=True, max_exponent_bits=7,
 * total_bits=8), computed in fp32 the way torch.linspace and the fp32 means produce it,
 * sorted ascending. */
void bnb_dynamic_map(float map[256]);

/* quantize_4bit(x, blocksize, quant_type="nf4") on n elements of the row-major flattened
 * weight: absmax[b] = max |x| of block b (fp32; a short last block stores max(|x|, 1e-38)),
 * x * (1 / absmax) (x / absmax in a short last block) clamped to [-1, 1] and mapped to the
 * nearest code, a value exactly between two codes taking the lower one (torch.bucketize
 * against the fp32 midpoints, which equal the CUDA kernel's thresholds); element 2i in the
 * HIGH nibble of packed[i]. packed: (n + 1) / 2 bytes; absmax: ceil(n / blocksize) floats. */
void bnb_nf4_quantize(const float *x, int64_t n, int blocksize, uint8_t *packed, float *absmax);

/* quantize_blockwise(x, code, blocksize) with a sorted 256-entry code: the same rules (nearest
 * code by the fp32 midpoints, ties to the lower index). q: n bytes; absmax: ceil(n/blocksize). */
void bnb_blockwise_quantize(const float *x, int64_t n, const float code[256], int blocksize,
                            uint8_t *q, float *absmax);

/* Double quantization of NF4 scales (quantize_4bit with compress_statistics=True):
 * offset = mean(absmax) (accumulated in double, rounded to fp32), then absmax - offset is
 * quantized blockwise with `code` (the dynamic map) in blocks of nested_blocksize.
 * qabsmax: nb bytes; absmax2: ceil(nb / nested_blocksize) floats. */
lt_status bnb_double_quantize(const float *absmax, int64_t nb, const float code[256],
                              int nested_blocksize, uint8_t *qabsmax, float *absmax2,
                              float *offset); /* LT_ERR_MEMORY when scratch is short */

/* LLM.int8 as Int8Params quantizes a weight [out, in]: the values are first rounded to fp16
 * (Int8Params casts to float16), SCB[r] = max |row r| (fp32), w8 = round-half-even(x *
 * ((1 / SCB) * 127)) (int8_vectorwise_quant of backends/default/ops.py); an all-zero row
 * gets zeros. */
void bnb_int8_quantize(const float *w, int64_t out, int64_t in, int8_t *w8, float *scb);

/* ---- pre-quantized checkpoints ----------------------------------------------------------- */

typedef enum bnb_kind {
    BNB_PLAIN = 0, /* a float tensor: not quantized */
    BNB_NF4 = 1,
    BNB_INT8 = 2,
} bnb_kind;

/* What one linear's tensors say, checked (pointers into the mapping, not owned). */
typedef struct bnb_group {
    bnb_kind kind;
    const st_tensor *weight; /* P.weight */
    /* NF4 */
    int blocksize, nested, nested_blocksize;
    double offset;              /* nested_offset */
    char dtype[16];             /* the original dtype ("bfloat16") */
    const st_tensor *absmax;    /* P.weight.absmax: F32 [nb], or U8 [nb] when nested */
    const st_tensor *quant_map; /* P.weight.quant_map F32 [16] */
    const st_tensor *nested_absmax, *nested_quant_map; /* F32 [ceil(nb/256)], F32 [256] */
    /* INT8 */
    const st_tensor *scb; /* P.SCB F32 [out] */
} bnb_group;

/* Reads the tensors stored for the linear whose weight is `weight_name` ("...q_proj.weight")
 * and whose logical shape is [out, in]. A float weight gives kind BNB_PLAIN (nothing checked
 * beyond presence). A bitsandbytes 4-bit weight needs its quant_state JSON, an nf4 quant_type,
 * a shape [out, in] that matches the packed byte count, absmax / quant_map (and nested_*) of
 * the right dtype and length; an int8 weight needs P.SCB. Every refusal names the tensor and
 * says what to change. err: LT_ERRLEN bytes. */
lt_status bnb_group_read(const st_set *st, const char *weight_name, int64_t out, int64_t in,
                         bnb_group *g, char *err);

/* ---- writing a checkpoint ------------------------------------------------------------------ */

/* Python's repr(float(v)) (what json.dumps writes for a float): the shortest digits that read
 * back as v, fixed notation for a decimal exponent in -4 < e <= 16 with ".0" added to whole
 * numbers ("6.0", "0.0001"), else d.ddde+XX with a signed exponent of at least two digits
 * ("1e-05", "1e+16"); "NaN", "Infinity". Returns the length, as snprintf does. */
int bnb_py_float(double v, char *buf, size_t cap);

/* The text QuantState.as_dict(packed=True) packs into P.weight.quant_state.bitsandbytes__nf4
 * (bitsandbytes' utils.py pack_dict_to_tensor: json.dumps of the non-tensor entries, in
 * as_dict's order, with Python's default ", " and ": " separators), byte for byte:
 * {"quant_type": "nf4", "blocksize": B, "dtype": D, "shape": [OUT, IN]} and, double-quantized,
 * "nested_blocksize": NB, "nested_dtype": "float32", "nested_offset": repr(offset) before the
 * closing brace. dtype: the weight's torch dtype name before quantization ("bfloat16").
 * Returns the length, as snprintf does. */
int bnb_nf4_state_json(char *buf, size_t cap, int blocksize, const char *dtype, int64_t out,
                       int64_t in, int nested, int nested_blocksize, float offset);

/* config.json's quantization_config as transformers' BitsAndBytesConfig(...).to_dict() writes
 * it, every key of it: quant_method "bitsandbytes", _load_in_4bit / _load_in_8bit and
 * load_in_4bit / load_in_8bit, llm_int8_threshold 6.0, llm_int8_skip_modules (the n_skip names,
 * or null when skip is NULL), llm_int8_enable_fp32_cpu_offload and llm_int8_has_fp16_weight
 * false, bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype and
 * bnb_4bit_quant_storage "uint8". kind BNB_NF4: quant type "nf4", double_quant and
 * compute_dtype ("bfloat16") as given; BNB_INT8: the 4-bit keys at BitsAndBytesConfig's
 * defaults ("fp4", false, "float32"). Compact JSON text of the object, sorted keys (malloc'd;
 * NULL when out of memory). */
char *bnb_config_to_json(bnb_kind kind, int double_quant, const char *compute_dtype,
                         const char *const *skip, int n_skip);

/* ---- config.json's quantization_config --------------------------------------------------- */

typedef struct bnb_config {
    int present;   /* config.json has a quantization_config */
    bnb_kind kind; /* BNB_NF4 (load_in_4bit) or BNB_INT8 (load_in_8bit) */
    int double_quant;
    char compute_dtype[16];
    char **skip; /* llm_int8_skip_modules; NULL entries end it */
    int n_skip;
} bnb_config;

/* Reads quantization_config from config.json text (top level, where transformers writes it
 * for Gemma3ForCausalLM and Gemma3ForConditionalGeneration alike). No quantization_config:
 * present = 0. quant_method other than "bitsandbytes", a 4-bit quant_type other than nf4,
 * or neither load_in_4bit nor load_in_8bit: LT_ERR_FORMAT naming the key. */
lt_status bnb_config_parse(bnb_config *c, const char *json, const char *what, char *err);
/* The same, reading the file at path (config.json). */
lt_status bnb_config_load(bnb_config *c, const char *path, char *err);
void bnb_config_free(bnb_config *c);

/* 1 when the module `module` (a dotted name such as "model.layers.3.mlp.down_proj") is listed
 * in llm_int8_skip_modules: an entry K matches when K + "." occurs in module + "." (the
 * module itself or a parent, as transformers' replace_with_bnb_linear compares names). */
int bnb_config_skips(const bnb_config *c, const char *module);

#endif
