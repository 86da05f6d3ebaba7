/* tensor.c — dtype names and sizes, tensor builders, fp16/bf16 <-> fp32 conversion.
 *
 * Owns nothing but these helpers (see tensor.h). Conversions follow IEEE/PyTorch rounding:
 * round to nearest even, overflow to inf, subnormals kept.
 */
#include "cuda/base/tensor.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

size_t lt_dtype_size(lt_dtype t) {
    switch (t) {
    case LT_F32:
        return 4;
    case LT_F16:
        return 2;
    case LT_BF16:
        return 2;
    case LT_I32:
        return 4;
    case LT_U8:
    case LT_I8:
        return 1;
    }
    return 0;
}

const char *lt_dtype_name(lt_dtype t) {
    switch (t) {
    case LT_F32:
        return "F32";
    case LT_F16:
        return "F16";
    case LT_BF16:
        return "BF16";
    case LT_I32:
        return "I32";
    case LT_U8:
        return "U8";
    case LT_I8:
        return "I8";
    }
    return "?";
}

const char *lt_dtype_user_name(lt_dtype t) {
    switch (t) {
    case LT_F32:
        return "fp32";
    case LT_F16:
        return "fp16";
    case LT_BF16:
        return "bf16";
    case LT_I32:
        return "i32";
    case LT_U8:
        return "u8";
    case LT_I8:
        return "i8";
    }
    return "?";
}

int lt_dtype_parse(const char *name, lt_dtype *out) {
    if (!strcmp(name, "F32"))
        *out = LT_F32;
    else if (!strcmp(name, "F16"))
        *out = LT_F16;
    else if (!strcmp(name, "BF16"))
        *out = LT_BF16;
    else if (!strcmp(name, "I32"))
        *out = LT_I32;
    else if (!strcmp(name, "U8"))
        *out = LT_U8;
    else if (!strcmp(name, "I8"))
        *out = LT_I8;
    else
        return -1;
    return 0;
}

int64_t lt_tensor_numel(const lt_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

size_t lt_tensor_bytes(const lt_tensor *t) {
    return (size_t)lt_tensor_numel(t) * lt_dtype_size(t->dtype);
}

lt_tensor lt_tensor_1d(lt_dtype dt, void *data, int64_t d0) {
    lt_tensor t = {.dtype = dt, .ndim = 1, .shape = {d0}, .data = data};
    return t;
}

lt_tensor lt_tensor_2d(lt_dtype dt, void *data, int64_t d0, int64_t d1) {
    lt_tensor t = {.dtype = dt, .ndim = 2, .shape = {d0, d1}, .data = data};
    return t;
}

lt_tensor lt_tensor_3d(lt_dtype dt, void *data, int64_t d0, int64_t d1, int64_t d2) {
    lt_tensor t = {.dtype = dt, .ndim = 3, .shape = {d0, d1, d2}, .data = data};
    return t;
}

lt_tensor lt_tensor_4d(lt_dtype dt, void *data, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    lt_tensor t = {.dtype = dt, .ndim = 4, .shape = {d0, d1, d2, d3}, .data = data};
    return t;
}

const char *lt_shape_str(const lt_tensor *t, char *buf, size_t cap) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, cap - k, "[");
    for (int i = 0; i < t->ndim && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
    return buf;
}

uint16_t lt_f32_to_bf16(float f) {
    union {
        uint32_t u;
        float f;
    } v = {.f = f};
    if ((v.u & 0x7f800000u) == 0x7f800000u && (v.u & 0x007fffffu)) /* NaN: keep it quiet */
        return (uint16_t)((v.u >> 16) | 0x0040u);
    uint32_t round = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + round) >> 16);
}

float lt_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    union {
        uint32_t u;
        float f;
    } v;
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24 */
        float f = (float)man * 5.9604644775390625e-08f;
        return sign ? -f : f;
    } else if (exp == 31) {
        v.u = sign | 0x7f800000u | (man << 13);
    } else {
        v.u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    return v.f;
}

uint16_t lt_f32_to_f16(float f) {
    union {
        uint32_t u;
        float f;
    } v = {.f = f};
    uint16_t sign = (uint16_t)((v.u >> 16) & 0x8000u);
    uint32_t a = v.u & 0x7fffffffu;
    if (a >= 0x7f800000u) /* inf or NaN */
        return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    if (a >= 0x477ff000u) /* rounds to >= 65520: overflow */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below the smallest normal 2^-14: subnormal or zero */
        float af;
        union {
            uint32_t u;
            float f;
        } w = {.u = a};
        af = w.f;
        /* value / 2^-24, rounded to nearest even by the FPU */
        float q = af * 16777216.0f;
        return (uint16_t)(sign | (uint16_t)lrintf(q));
    }
    /* normal: rebias exponent, round mantissa from 23 to 10 bits (nearest even) */
    uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | (uint16_t)((rounded - 0x38000000u) >> 13));
}

/* Element i of a 16-bit array that may sit at any address (tensors mapped from a file need not
 * be aligned to their element size): memcpy is the defined unaligned load, one instruction. */
static inline uint16_t load_u16(const void *p, int64_t i) {
    uint16_t v;
    memcpy(&v, (const char *)p + 2 * i, sizeof v);
    return v;
}

static inline float load_f32(const void *p, int64_t i) {
    float v;
    memcpy(&v, (const char *)p + 4 * i, sizeof v);
    return v;
}

void lt_to_f32(float *dst, const void *src, lt_dtype src_t, int64_t n) {
    if (src_t == LT_F32) {
        memmove(dst, src, (size_t)n * 4);
    } else if (src_t == LT_BF16) {
        for (int64_t i = 0; i < n; i++)
            dst[i] = lt_bf16_to_f32(load_u16(src, i));
    } else if (src_t == LT_F16) {
        for (int64_t i = 0; i < n; i++)
            dst[i] = lt_f16_to_f32(load_u16(src, i));
    }
}

void lt_convert(void *dst, lt_dtype dst_t, const void *src, lt_dtype src_t, int64_t n) {
    if (dst_t == src_t) {
        memmove(dst, src, (size_t)n * lt_dtype_size(src_t));
        return;
    }
    if (dst_t == LT_F32) {
        lt_to_f32(dst, src, src_t, n);
        return;
    }
    uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++) {
        float f;
        if (src_t == LT_F32)
            f = load_f32(src, i);
        else if (src_t == LT_BF16)
            f = lt_bf16_to_f32(load_u16(src, i));
        else
            f = lt_f16_to_f32(load_u16(src, i));
        d[i] = dst_t == LT_BF16 ? lt_f32_to_bf16(f) : lt_f32_to_f16(f);
    }
}
