/* gguf_quant.c — fp32 rows to ggml's block formats (and back), and llama.cpp's choice of
 * block format per tensor.
 *
 * Owns: the scalar conversions fp32<->fp16/bf16, the reference quantizers for q8_0, q4_0,
 * q5_0, q4_K and q6_K, their dequantizers, and the per-tensor type policy of each file type
 * (what convert_hf_to_gguf.py writes for f32/f16/bf16/q8_0, what llama-quantize picks for
 * q4_0 and q4_k_m, with its fallbacks for rows that are not a multiple of 256).
 * The quantizers follow ggml's reference ("_ref", no importance matrix) arithmetic step for
 * step, so the bytes equal llama-quantize's; tests/gguf checks this against the libggml that
 * ships with node-llama-cpp. Must not touch: files, threads, the model (pure functions).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

#include "cuda/formats/gguf.h"

/* ---- scalars ---------------------------------------------------------------------------- */

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

uint16_t gguf_fp32_to_fp16(float f) {
    uint32_t x = bits_of(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) /* inf stays inf; NaN becomes a quiet NaN */
        return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (a >= 0x38800000u) {           /* >= 2^-14: a normal fp16 (or overflow to inf) */
        uint32_t r = a - 0x38000000u; /* exponent bias 127 -> 15 */
        uint32_t h = r >> 13, rest = r & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h; /* ties to even */
        return sign | (uint16_t)(h >= 0x7c00u ? 0x7c00u : h);
    }
    if (a < 0x33000000u) return sign; /* below half the smallest subnormal: zero */
    /* fp16 subnormal: count units of 2^-24 with round-to-nearest-even. */
    uint32_t e = a >> 23;                     /* 102..112 */
    uint32_t m = (a & 0x7fffffu) | 0x800000u; /* value = m * 2^(e-150) */
    uint32_t shift = 126u - e;                /* 14..24 */
    uint32_t h = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (h & 1u))) ++h;
    return sign | (uint16_t)h;
}

float gguf_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return float_of(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        if (m == 0) return float_of(sign);
        float v = (float)m * 0x1p-24f; /* exact: m < 2^10 */
        return sign ? -v : v;
    }
    return float_of(sign | ((e + 112u) << 23) | (m << 13));
}

uint16_t gguf_fp32_to_bf16(float f) {
    uint32_t u = bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64u); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);               /* ties to even */
}

float gguf_bf16_to_fp32(uint16_t h) {
    return float_of((uint32_t)h << 16);
}

/* roundf (half away from zero) for |v| < 2^31, inline: the library call dominated q8_0. */
static int round_half_away(float v) {
    int i = (int)v;            /* truncates toward zero */
    float frac = v - (float)i; /* exact for |v| < 2^23 */
    return i + (frac >= 0.5f) - (frac <= -0.5f);
}

/* Round to nearest, ties to even, as ggml's k-quant helper does (|v| < 2^22 here). */
static int nearest_int(float v) {
    /* adding 1.5 * 2^23 leaves round-to-nearest-even(v) in the low mantissa bits */
    float big = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &big, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

static void put_half(uint8_t *p, float v) {
    uint16_t h = gguf_fp32_to_fp16(v);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

static float get_half(const uint8_t *p) {
    return gguf_fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8)));
}

static int imin(int a, int b) {
    return a < b ? a : b;
}

static int imax(int a, int b) {
    return a > b ? a : b;
}

/* ---- type table ------------------------------------------------------------------------- */

int64_t gguf_type_block_len(gguf_type t) {
    switch (t) {
    case GGUF_TYPE_F32:
    case GGUF_TYPE_F16:
    case GGUF_TYPE_BF16:
        return 1;
    case GGUF_TYPE_Q4_0:
    case GGUF_TYPE_Q5_0:
    case GGUF_TYPE_Q8_0:
        return 32;
    case GGUF_TYPE_Q4_K:
    case GGUF_TYPE_Q6_K:
        return 256;
    }
    return 0;
}

size_t gguf_type_block_bytes(gguf_type t) {
    switch (t) {
    case GGUF_TYPE_F32:
        return 4;
    case GGUF_TYPE_F16:
    case GGUF_TYPE_BF16:
        return 2;
    case GGUF_TYPE_Q4_0:
        return 18; /* f16 d; u8 qs[16] */
    case GGUF_TYPE_Q5_0:
        return 22; /* f16 d; u8 qh[4]; u8 qs[16] */
    case GGUF_TYPE_Q8_0:
        return 34; /* f16 d; i8 qs[32] */
    case GGUF_TYPE_Q4_K:
        return 144; /* f16 d, dmin; u8 scales[12]; u8 qs[128] */
    case GGUF_TYPE_Q6_K:
        return 210; /* u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d */
    }
    return 0;
}

const char *gguf_type_name(gguf_type t) {
    switch (t) {
    case GGUF_TYPE_F32:
        return "f32";
    case GGUF_TYPE_F16:
        return "f16";
    case GGUF_TYPE_BF16:
        return "bf16";
    case GGUF_TYPE_Q4_0:
        return "q4_0";
    case GGUF_TYPE_Q5_0:
        return "q5_0";
    case GGUF_TYPE_Q8_0:
        return "q8_0";
    case GGUF_TYPE_Q4_K:
        return "q4_K";
    case GGUF_TYPE_Q6_K:
        return "q6_K";
    }
    return "?";
}

size_t gguf_row_bytes(gguf_type t, int64_t n) {
    int64_t bl = gguf_type_block_len(t);
    if (bl <= 0 || n <= 0 || n % bl != 0) return 0;
    return (size_t)(n / bl) * gguf_type_block_bytes(t);
}

/* ---- q8_0, q4_0, q5_0: one scale per 32 weights ------------------------------------------ */

static void quantize_q8_0(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; ++b, x += 32, y += 34) {
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        put_half(y, d);
        for (int j = 0; j < 32; ++j)
            y[2 + j] = (uint8_t)(int8_t)round_half_away(x[j] * id);
    }
}

static void dequantize_q8_0(const uint8_t *s, float *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; ++b, s += 34, y += 32) {
        const float d = get_half(s);
        for (int j = 0; j < 32; ++j)
            y[j] = d * (float)(int8_t)s[2 + j];
    }
}

/* The value of largest magnitude, with its sign (the first one on ties). */
static float signed_absmax(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; ++j) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    return max;
}

static void quantize_q4_0(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; ++b, x += 32, y += 18) {
        /* d is negative for a positive extreme so that the extreme maps to code 0 (-8). */
        const float d = signed_absmax(x, 32) / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        put_half(y, d);
        for (int j = 0; j < 16; ++j) {
            uint8_t lo = (uint8_t)imin(15, (int8_t)(x[j] * id + 8.5f));
            uint8_t hi = (uint8_t)imin(15, (int8_t)(x[j + 16] * id + 8.5f));
            y[2 + j] = (uint8_t)(lo | (hi << 4)); /* low nibble: j, high nibble: j+16 */
        }
    }
}

static void dequantize_q4_0(const uint8_t *s, float *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; ++b, s += 18, y += 32) {
        const float d = get_half(s);
        for (int j = 0; j < 16; ++j) {
            y[j] = (float)((s[2 + j] & 0x0f) - 8) * d;
            y[j + 16] = (float)((s[2 + j] >> 4) - 8) * d;
        }
    }
}

static void quantize_q5_0(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; ++b, x += 32, y += 22) {
        const float d = signed_absmax(x, 32) / -16.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint32_t qh = 0; /* bit j: 5th bit of weight j */
        put_half(y, d);
        for (int j = 0; j < 16; ++j) {
            uint8_t lo = (uint8_t)imin(31, (int8_t)(x[j] * id + 16.5f));
            uint8_t hi = (uint8_t)imin(31, (int8_t)(x[j + 16] * id + 16.5f));
            y[6 + j] = (uint8_t)((lo & 0x0f) | ((hi & 0x0f) << 4));
            qh |= (uint32_t)((lo >> 4) & 1u) << j;
            qh |= (uint32_t)((hi >> 4) & 1u) << (j + 16);
        }
        for (int k = 0; k < 4; ++k)
            y[2 + k] = (uint8_t)(qh >> (8 * k));
    }
}

static void dequantize_q5_0(const uint8_t *s, float *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; ++b, s += 22, y += 32) {
        const float d = get_half(s);
        uint32_t qh = (uint32_t)s[2] | ((uint32_t)s[3] << 8) | ((uint32_t)s[4] << 16) |
                      ((uint32_t)s[5] << 24);
        for (int j = 0; j < 16; ++j) {
            int lo = (s[6 + j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
            int hi = (s[6 + j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            y[j] = (float)(lo - 16) * d;
            y[j + 16] = (float)(hi - 16) * d;
        }
    }
}

/* ---- k-quants: 256 weights per super-block ----------------------------------------------- */

/* Asymmetric fit of x[n] to codes 0..nmax: x ~ scale*L - min, weighted least squares over a
 * small sweep of candidate scales (ggml's make_qkx2_quants with use_mad = false).
 * Returns the scale; *neg_min receives the (non-negative) offset; L receives the codes. */
static float fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L,
                           float *neg_min, uint8_t *Laux, float rmin, float rdelta, int nstep) {
    float min = x[0], max = x[0];
    float sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i)
            L[i] = 0;
        *neg_min = -min;
        return 0.0f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1.0f / iscale;
    float best = 0.0f;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)imax(0, imin(nmax, l));
        float diff = scale * L[i] + min - x[i];
        best += w[i] * (diff * diff);
    }
    /* Note: as in ggml, a better fit found during the sweep moves `min`, and later candidates
     * are measured from the moved offset; the bytes depend on keeping this order. */
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = imax(0, imin(nmax, nearest_int(iscale * (x[i] - min))));
            Laux[i] = (uint8_t)l;
            sum_l += w[i] * (float)l;
            sum_l2 += w[i] * (float)l * (float)l;
            sum_xl += w[i] * (float)l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) { /* the offset may only lower values: refit scale alone */
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float err = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if (err < best) {
                memcpy(L, Laux, (size_t)n);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *neg_min = -min;
    return scale;
}

/* 6-bit sub-block scale k and min k of a q4_K block, packed as ggml's ggml-quants.c
 * get_scale_min_k4 unpacks them. */
static void q4k_scale_min(int k, const uint8_t *sc, uint8_t *d, uint8_t *m) {
    if (k < 4) {
        *d = sc[k] & 63;
        *m = sc[k + 4] & 63;
    } else {
        *d = (uint8_t)((sc[k + 4] & 0x0f) | ((sc[k - 4] >> 6) << 4));
        *m = (uint8_t)((sc[k + 4] >> 4) | ((sc[k] >> 6) << 4));
    }
}

static void quantize_q4_K(const float *x, uint8_t *y, int64_t n) {
    uint8_t L[256], Laux[32];
    float w[32], scales[8], mins[8];
    for (int64_t b = 0; b < n / 256; ++b, x += 256, y += 144) {
        uint8_t *sc = y + 4, *qs = y + 16;
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; ++j) { /* sub-block j: x[32j .. 32j+31] */
            const float *xs = x + 32 * j;
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l)
                sum_x2 += xs[l] * xs[l];
            const float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; ++l)
                w[l] = av_x + fabsf(xs[l]);
            scales[j] = fit_scale_min(32, 15, xs, w, L + 32 * j, &mins[j], Laux, -1.0f, 0.1f, 20);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
        const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
        memset(sc, 0, 12);
        for (int j = 0; j < 8; ++j) {
            uint8_t ls = (uint8_t)imin(63, nearest_int(inv_scale * scales[j]));
            uint8_t lm = (uint8_t)imin(63, nearest_int(inv_min * mins[j]));
            if (j < 4) {
                sc[j] = ls;
                sc[j + 4] = lm;
            } else { /* low 4 bits in bytes 8..11, high 2 bits in the top of bytes 0..7 */
                sc[j + 4] = (uint8_t)((ls & 0x0f) | ((lm & 0x0f) << 4));
                sc[j - 4] |= (uint8_t)((ls >> 4) << 6);
                sc[j] |= (uint8_t)((lm >> 4) << 6);
            }
        }
        put_half(y, max_scale / 63.0f);
        put_half(y + 2, max_min / 63.0f);
        const float dall = get_half(y), dmin = get_half(y + 2);
        for (int j = 0; j < 8; ++j) { /* re-quantize against the rounded scales */
            uint8_t s6, m6;
            q4k_scale_min(j, sc, &s6, &m6);
            const float d = dall * s6;
            if (d == 0.0f) continue;
            const float dm = dmin * m6;
            for (int l = 0; l < 32; ++l) {
                int q = nearest_int((x[32 * j + l] + dm) / d);
                L[32 * j + l] = (uint8_t)imax(0, imin(15, q));
            }
        }
        for (int c = 0; c < 4; ++c) /* 64 weights per chunk: sub-blocks 2c (low), 2c+1 (high) */
            for (int l = 0; l < 32; ++l)
                qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
    }
}

static void dequantize_q4_K(const uint8_t *s, float *y, int64_t n) {
    for (int64_t b = 0; b < n / 256; ++b, s += 144) {
        const float d = get_half(s), dmin = get_half(s + 2);
        const uint8_t *sc = s + 4, *qs = s + 16;
        for (int c = 0; c < 4; ++c, qs += 32) {
            uint8_t s1, m1, s2, m2;
            q4k_scale_min(2 * c, sc, &s1, &m1);
            q4k_scale_min(2 * c + 1, sc, &s2, &m2);
            for (int l = 0; l < 32; ++l)
                *y++ = d * s1 * (float)(qs[l] & 0x0f) - dmin * m1;
            for (int l = 0; l < 32; ++l)
                *y++ = d * s2 * (float)(qs[l] >> 4) - dmin * m2;
        }
    }
}

/* Symmetric fit of x[n] to codes -nmax..nmax-1 with weights x^2 (ggml's make_qx_quants,
 * rmse_type 1): a sweep of 18 scales around nmax/max keeps the best weighted fit. */
static float fit_scale_symmetric(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < 1e-15f) {
        for (int i = 0; i < n; ++i)
            L[i] = 0;
        return 0.0f;
    }
    float iscale = -(float)nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
            float w = x[i] * x[i];
            sumlx += w * x[i] * (float)l;
            suml2 += w * (float)l * (float)l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
                L[i] = (int8_t)(nmax + l);
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static void quantize_q6_K(const float *x, uint8_t *y, int64_t n) {
    int8_t L[256];
    float scales[16];
    for (int64_t b = 0; b < n / 256; ++b, x += 256, y += 210) {
        uint8_t *ql = y, *qh = y + 128;
        int8_t *sc = (int8_t *)(y + 192);
        float max_scale = 0, max_abs_scale = 0;
        for (int j = 0; j < 16; ++j) { /* sub-block j: x[16j .. 16j+15] */
            scales[j] = fit_scale_symmetric(16, 32, x + 16 * j, L + 16 * j);
            if (fabsf(scales[j]) > max_abs_scale) {
                max_abs_scale = fabsf(scales[j]);
                max_scale = scales[j];
            }
        }
        if (max_abs_scale < 1e-15f) { /* an all-zero block */
            memset(y, 0, 210);
            continue;
        }
        const float iscale = -128.0f / max_scale;
        put_half(y + 208, 1.0f / iscale);
        for (int j = 0; j < 16; ++j)
            sc[j] = (int8_t)imin(127, nearest_int(iscale * scales[j]));
        const float dall = get_half(y + 208);
        for (int j = 0; j < 16; ++j) {
            const float d = dall * (float)sc[j];
            if (d == 0.0f) continue;
            for (int l = 0; l < 16; ++l) {
                int q = imax(-32, imin(31, nearest_int(x[16 * j + l] / d)));
                L[16 * j + l] = (int8_t)(q + 32);
            }
        }
        /* 128 weights per half: low nibbles of weights l, l+32 in ql[l], ql[l+32]; of l+64,
         * l+96 in their high nibbles; the 2 high bits of all four in qh[l]. */
        for (int h = 0; h < 2; ++h, ql += 64, qh += 32) {
            const int8_t *Lh = L + 128 * h;
            for (int l = 0; l < 32; ++l) {
                uint8_t q1 = (uint8_t)Lh[l], q2 = (uint8_t)Lh[l + 32];
                uint8_t q3 = (uint8_t)Lh[l + 64], q4 = (uint8_t)Lh[l + 96];
                ql[l] = (uint8_t)((q1 & 0x0f) | ((q3 & 0x0f) << 4));
                ql[l + 32] = (uint8_t)((q2 & 0x0f) | ((q4 & 0x0f) << 4));
                qh[l] =
                    (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
            }
        }
    }
}

static void dequantize_q6_K(const uint8_t *s, float *y, int64_t n) {
    for (int64_t b = 0; b < n / 256; ++b, s += 210) {
        const float d = get_half(s + 208);
        const uint8_t *ql = s, *qh = s + 128;
        const int8_t *sc = (const int8_t *)(s + 192);
        for (int h = 0; h < 2; ++h, ql += 64, qh += 32, sc += 8, y += 128) {
            for (int l = 0; l < 32; ++l) {
                int is = l / 16;
                int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is + 0] * (float)q1;
                y[l + 32] = d * sc[is + 2] * (float)q2;
                y[l + 64] = d * sc[is + 4] * (float)q3;
                y[l + 96] = d * sc[is + 6] * (float)q4;
            }
        }
    }
}

/* ---- entry points ----------------------------------------------------------------------- */

int gguf_quantize_row(gguf_type t, const float *x, void *dst, int64_t n) {
    uint8_t *y = dst;
    if (gguf_row_bytes(t, n) == 0) return -1;
    switch (t) {
    case GGUF_TYPE_F32:
        memcpy(y, x, (size_t)n * 4);
        return 0;
    case GGUF_TYPE_F16:
        for (int64_t i = 0; i < n; ++i) {
            uint16_t h = gguf_fp32_to_fp16(x[i]);
            memcpy(y + 2 * i, &h, 2);
        }
        return 0;
    case GGUF_TYPE_BF16:
        for (int64_t i = 0; i < n; ++i) {
            uint16_t h = gguf_fp32_to_bf16(x[i]);
            memcpy(y + 2 * i, &h, 2);
        }
        return 0;
    case GGUF_TYPE_Q8_0:
        quantize_q8_0(x, y, n);
        return 0;
    case GGUF_TYPE_Q4_0:
        quantize_q4_0(x, y, n);
        return 0;
    case GGUF_TYPE_Q5_0:
        quantize_q5_0(x, y, n);
        return 0;
    case GGUF_TYPE_Q4_K:
        quantize_q4_K(x, y, n);
        return 0;
    case GGUF_TYPE_Q6_K:
        quantize_q6_K(x, y, n);
        return 0;
    }
    return -1;
}

int gguf_dequantize_row(gguf_type t, const void *src, float *y, int64_t n) {
    const uint8_t *s = src;
    if (gguf_row_bytes(t, n) == 0) return -1;
    switch (t) {
    case GGUF_TYPE_F32:
        memcpy(y, s, (size_t)n * 4);
        return 0;
    case GGUF_TYPE_F16:
        for (int64_t i = 0; i < n; ++i) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            y[i] = gguf_fp16_to_fp32(h);
        }
        return 0;
    case GGUF_TYPE_BF16:
        for (int64_t i = 0; i < n; ++i) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            y[i] = gguf_bf16_to_fp32(h);
        }
        return 0;
    case GGUF_TYPE_Q8_0:
        dequantize_q8_0(s, y, n);
        return 0;
    case GGUF_TYPE_Q4_0:
        dequantize_q4_0(s, y, n);
        return 0;
    case GGUF_TYPE_Q5_0:
        dequantize_q5_0(s, y, n);
        return 0;
    case GGUF_TYPE_Q4_K:
        dequantize_q4_K(s, y, n);
        return 0;
    case GGUF_TYPE_Q6_K:
        dequantize_q6_K(s, y, n);
        return 0;
    }
    return -1;
}

/* ---- file types and the per-tensor policy ------------------------------------------------ */

static const struct {
    const char *name;
    gguf_ftype ftype;
} ftype_names[] = {
    {"f32", GGUF_FTYPE_F32},   {"f16", GGUF_FTYPE_F16},   {"bf16", GGUF_FTYPE_BF16},
    {"q8_0", GGUF_FTYPE_Q8_0}, {"q4_0", GGUF_FTYPE_Q4_0}, {"q4_k_m", GGUF_FTYPE_Q4_K_M},
};

int gguf_ftype_parse(const char *s, gguf_ftype *out) {
    if (!s) return -1;
    for (size_t i = 0; i < sizeof ftype_names / sizeof ftype_names[0]; ++i) {
        if (strcasecmp(s, ftype_names[i].name) == 0) {
            *out = ftype_names[i].ftype;
            return 0;
        }
    }
    return -1;
}

const char *gguf_ftype_name(gguf_ftype f) {
    for (size_t i = 0; i < sizeof ftype_names / sizeof ftype_names[0]; ++i)
        if (ftype_names[i].ftype == f) return ftype_names[i].name;
    return "?";
}

/* llama-quantize's "more bits" layers: the first and last eighth, and every third between. */
static int layer_wants_more_bits(int layer, int n_layers) {
    return layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2;
}

gguf_type gguf_choose_type(gguf_ftype f, gguf_role role, int64_t ne0, int layer, int n_layers,
                           int tied, int *fallback) {
    gguf_type t;
    if (fallback) *fallback = 0;
    if (role == GGUF_ROLE_NORM) return GGUF_TYPE_F32;
    switch (f) {
    case GGUF_FTYPE_F32:
        return GGUF_TYPE_F32;
    case GGUF_FTYPE_F16:
        return GGUF_TYPE_F16;
    case GGUF_FTYPE_BF16:
        return GGUF_TYPE_BF16;
    case GGUF_FTYPE_Q8_0:
        t = GGUF_TYPE_Q8_0;
        break; /* the converter: every matrix */
    case GGUF_FTYPE_Q4_0:
    case GGUF_FTYPE_Q4_K_M:
        t = f == GGUF_FTYPE_Q4_0 ? GGUF_TYPE_Q4_0 : GGUF_TYPE_Q4_K;
        /* The output matrix (token_embd when tied) is kept at 6 bits, 8 when its rows
         * do not split into 256-weight super-blocks. */
        if (role == GGUF_ROLE_OUTPUT || (role == GGUF_ROLE_TOKEN_EMBD && tied))
            t = ne0 % gguf_type_block_len(t) != 0 ? GGUF_TYPE_Q8_0 : GGUF_TYPE_Q6_K;
        else if (f == GGUF_FTYPE_Q4_K_M &&
                 (role == GGUF_ROLE_ATTN_V || role == GGUF_ROLE_FFN_DOWN) &&
                 layer_wants_more_bits(layer, n_layers))
            t = GGUF_TYPE_Q6_K;
        break;
    default:
        return GGUF_TYPE_F32;
    }
    if (ne0 % gguf_type_block_len(t) != 0) { /* llama-quantize's fallbacks */
        if (fallback) *fallback = 1;
        if (t == GGUF_TYPE_Q4_K)
            t = GGUF_TYPE_Q5_0;
        else if (t == GGUF_TYPE_Q6_K)
            t = GGUF_TYPE_Q8_0;
        if (ne0 % gguf_type_block_len(t) != 0) t = GGUF_TYPE_F16;
    }
    return t;
}
