/* tensor.h — the engine's plain tensor: a dtype, a shape and a pointer. Engine-private.
 *
 * A tensor does not own its data; whoever allocated the pointer frees it (the model's
 * storage, a backend buffer, a mapped file). Shapes are row-major, PyTorch order: a weight is
 * [out, in]; activations are [T, H] (tokens, features). This file also holds the small
 * helpers every module needs: dtype names and sizes, fp16/bf16 <-> fp32 conversion; it brings
 * the engine's error convention (error.h) along. It knows nothing of models or devices.
 */
#ifndef LATHE_TENSOR_H
#define LATHE_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "cuda/base/error.h"
#include "cuda/engine.h"

typedef enum lt_dtype {
    LT_F32 = 0,
    LT_F16 = 1,
    LT_BF16 = 2,
    LT_I32 = 3, /* token ids, positions */
    LT_U8 = 4,  /* bytes: packed NF4 codes, absmax codes, JSON blobs (bitsandbytes checkpoints) */
    LT_I8 = 5,  /* LLM.int8 weights */
} lt_dtype;

#define LT_MAX_DIMS 4

typedef struct lt_tensor {
    lt_dtype dtype;
    int ndim;
    int64_t shape[LT_MAX_DIMS];
    void *data; /* host or device memory, per the backend that holds it; not owned */
} lt_tensor;

/* Bytes per element (4, 2, 2, 4, 1, 1). */
size_t lt_dtype_size(lt_dtype t);
/* safetensors spelling: "F32", "F16", "BF16", "I32", "U8", "I8". */
const char *lt_dtype_name(lt_dtype t);
/* Lower-case user spelling: "fp32", "fp16", "bf16", "i32", "u8", "i8". */
const char *lt_dtype_user_name(lt_dtype t);
/* Parses "F32"/"F16"/"BF16"/"I32"/"U8"/"I8" (safetensors) -> 0, or -1 if unknown. */
int lt_dtype_parse(const char *name, lt_dtype *out);
/* 1 for F32, F16 and BF16: the dtypes lt_convert and lt_to_f32 read and write. */
static inline int lt_dtype_is_float(lt_dtype t) {
    return t == LT_F32 || t == LT_F16 || t == LT_BF16;
}

int64_t lt_tensor_numel(const lt_tensor *t);
size_t lt_tensor_bytes(const lt_tensor *t);
/* Builders (data may be NULL). */
lt_tensor lt_tensor_1d(lt_dtype dt, void *data, int64_t d0);
lt_tensor lt_tensor_2d(lt_dtype dt, void *data, int64_t d0, int64_t d1);
lt_tensor lt_tensor_3d(lt_dtype dt, void *data, int64_t d0, int64_t d1, int64_t d2);
lt_tensor lt_tensor_4d(lt_dtype dt, void *data, int64_t d0, int64_t d1, int64_t d2, int64_t d3);
/* "[262144, 1152]" into buf. */
const char *lt_shape_str(const lt_tensor *t, char *buf, size_t cap);

/* Scalar conversions. bf16 from fp32 rounds to nearest even (as torch does); NaN stays NaN. */
static inline float lt_bf16_to_f32(uint16_t h) {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}
uint16_t lt_f32_to_bf16(float f);
float lt_f16_to_f32(uint16_t h);
uint16_t lt_f32_to_f16(float f);

/* Converts n elements between F32/F16/BF16 (same dtype = memcpy; other dtypes: callers check
 * lt_dtype_is_float first). */
void lt_convert(void *dst, lt_dtype dst_t, const void *src, lt_dtype src_t, int64_t n);
/* Reads n elements of any float dtype into fp32. */
void lt_to_f32(float *dst, const void *src, lt_dtype src_t, int64_t n);

#endif
