/* test_gguf_quant.c — lathe's GGUF block formats, type policy and writer, without llama.cpp.
 *
 * Checks: fp16/bf16 rounding on edge values; q8_0/q4_0 bytes of hand-made blocks; q5_0, q4_K, q6_K
 * layouts by decoding hand-packed blocks against the formulas of ggml's ggml-quants.c
 * (dequantize_row_*); round-trip error bounds per type on Gaussian rows; llama.cpp's per-tensor
 * type choice for real Gemma 3 shapes; and the writer: a file parsed back byte by byte, alignment,
 * refusal to overwrite, atomicity (a failing or cancelled write leaves no file and no temp file),
 * and bad inputs reported by name. Writes only under a fresh folder in $TMPDIR (or /tmp).
 */
#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/formats/gguf.h"
#include "tests/unit/tap.h"
#include "tests/unit/test_files.h"

static uint64_t rng = 88172645463325252ull;

static double uniform01(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}

static float gauss(void) {
    double u = uniform01() + 1e-12, v = uniform01();
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

static uint16_t le16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}

/* ---- scalars ---------------------------------------------------------------------------- */

static void test_half(void) {
    is_int(gguf_fp32_to_fp16(1.0f), 0x3c00, "fp16(1) = 0x3c00");
    is_int(gguf_fp32_to_fp16(-2.0f), 0xc000, "fp16(-2) = 0xc000");
    is_int(gguf_fp32_to_fp16(0.1f), 0x2e66, "fp16(0.1) = 0x2e66");
    is_int(gguf_fp32_to_fp16(65504.0f), 0x7bff, "fp16(65504) = max normal");
    is_int(gguf_fp32_to_fp16(65519.0f), 0x7bff, "fp16(65519) rounds down to max");
    is_int(gguf_fp32_to_fp16(65520.0f), 0x7c00, "fp16(65520) ties to even = inf");
    is_int(gguf_fp32_to_fp16(ldexpf(1, -24)), 0x0001, "fp16(2^-24) = smallest subnormal");
    is_int(gguf_fp32_to_fp16(ldexpf(1, -25)), 0x0000, "fp16(2^-25) ties to even = 0");
    is_int(gguf_fp32_to_fp16(ldexpf(3, -25)), 0x0002, "fp16(1.5 * 2^-24) ties to even = 2");
    is_int(gguf_fp32_to_fp16(ldexpf(1, -14)), 0x0400, "fp16(2^-14) = smallest normal");
    is_int(gguf_fp32_to_fp16(1.0f + ldexpf(1, -11)), 0x3c00, "fp16(1 + half ulp) ties to even");
    is_int(gguf_fp32_to_fp16(1.0f + ldexpf(3, -11)), 0x3c02, "fp16(1 + 1.5 ulp) ties to even up");
    is_int(gguf_fp32_to_fp16(-0.0f), 0x8000, "fp16(-0) keeps the sign");
    is_int(gguf_fp32_to_fp16(INFINITY), 0x7c00, "fp16(inf)");
    ok((gguf_fp32_to_fp16(NAN) & 0x7c00) == 0x7c00 && (gguf_fp32_to_fp16(NAN) & 0x3ff),
       "fp16(NaN) is a NaN");
    is_close(gguf_fp16_to_fp32(0x0001), ldexpf(1, -24), 0, "fp16 0x0001 -> 2^-24");
    is_close(gguf_fp16_to_fp32(0x7bff), 65504.0, 0, "fp16 0x7bff -> 65504");
    is_close(gguf_fp16_to_fp32(0xc000), -2.0, 0, "fp16 0xc000 -> -2");
    int all = 1;
    for (uint32_t h = 0; h < 0x10000; ++h) { /* every finite half survives a round trip */
        if ((h & 0x7c00) == 0x7c00) continue;
        if (gguf_fp32_to_fp16(gguf_fp16_to_fp32((uint16_t)h)) != h) all = 0;
    }
    ok(all, "fp16 -> fp32 -> fp16 is the identity on all finite halves");
    is_int(gguf_fp32_to_bf16(1.0f), 0x3f80, "bf16(1) = 0x3f80");
    union {
        uint32_t u;
        float f;
    } v;
    v.u = 0x3f808000u;
    is_int(gguf_fp32_to_bf16(v.f), 0x3f80, "bf16 tie rounds to even (down)");
    v.u = 0x3f818000u;
    is_int(gguf_fp32_to_bf16(v.f), 0x3f82, "bf16 tie rounds to even (up)");
    v.u = 0x7f800001u;
    ok((gguf_fp32_to_bf16(v.f) & 0x7fc0) == 0x7fc0, "bf16(signalling NaN) is a quiet NaN");
}

/* ---- hand-made blocks ------------------------------------------------------------------- */

static void test_q8_0_block(void) {
    float x[32];
    uint8_t b[34];
    for (int j = 0; j < 32; ++j)
        x[j] = (float)(4 * j - 64);
    x[0] = -127.0f; /* amax 127 -> d = 1 exactly */
    ok(gguf_quantize_row(GGUF_TYPE_Q8_0, x, b, 32) == 0, "q8_0: quantize 32");
    is_int(le16(b), 0x3c00, "q8_0: d = 1.0 as fp16, first two bytes");
    int same = 1;
    for (int j = 0; j < 32; ++j)
        same &= (int8_t)b[2 + j] == (int8_t)x[j];
    ok(same, "q8_0: qs[j] = x[j] / d, one signed byte each, in order");
    x[5] = 2.5f; /* 2.5 rounds half away from zero -> 3 */
    x[6] = -2.5f;
    gguf_quantize_row(GGUF_TYPE_Q8_0, x, b, 32);
    ok((int8_t)b[7] == 3 && (int8_t)b[8] == -3, "q8_0: rounding is half away from zero");
    float z[32] = {0};
    gguf_quantize_row(GGUF_TYPE_Q8_0, z, b, 32);
    int zeros = 1;
    for (int j = 0; j < 34; ++j)
        zeros &= b[j] == 0;
    ok(zeros, "q8_0: an all-zero block is all zero bytes");
}

static void test_q4_0_block(void) {
    float x[32];
    uint8_t b[18];
    for (int j = 0; j < 32; ++j)
        x[j] = (float)(j % 16) - 8.0f; /* -8..7: d = -8/-8 = 1 */
    ok(gguf_quantize_row(GGUF_TYPE_Q4_0, x, b, 32) == 0, "q4_0: quantize 32");
    is_int(le16(b), 0x3c00, "q4_0: d = (signed max)/-8 = 1.0");
    int same = 1;
    for (int j = 0; j < 16; ++j)
        same &= b[2 + j] == (uint8_t)(j | (j << 4));
    ok(same, "q4_0: byte j = code(j) | code(j+16) << 4, code = x/d + 8");
    x[0] = 8.0f; /* positive extreme -> d = -1; 8 maps to code 0 */
    gguf_quantize_row(GGUF_TYPE_Q4_0, x, b, 32);
    is_int(le16(b), 0xbc00, "q4_0: positive extreme gives d = -1.0");
    is_int(b[2] & 0x0f, 0, "q4_0: the extreme itself is code 0");
    float y[32];
    gguf_dequantize_row(GGUF_TYPE_Q4_0, b, y, 32);
    is_close(y[0], 8.0, 0, "q4_0: dequantize (0 - 8) * -1 = 8");
}

static void test_q5_0_block(void) {
    uint8_t b[22] = {0};
    /* d = 0.5; codes: weight j -> j (0..15) low nibble, weight j+16 -> j+16 (needs bit 4) */
    b[0] = 0x00;
    b[1] = 0x38; /* fp16 0.5 = 0x3800 */
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
        int lo = j, hi = j + 16;
        b[6 + j] = (uint8_t)((lo & 15) | ((hi & 15) << 4));
        qh |= (uint32_t)((hi >> 4) & 1) << (j + 16);
    }
    memcpy(b + 2, &qh, 4);
    float y[32];
    ok(gguf_dequantize_row(GGUF_TYPE_Q5_0, b, y, 32) == 0, "q5_0: dequantize 32");
    int good = 1;
    for (int j = 0; j < 32; ++j)
        good &= y[j] == 0.5f * (float)(j - 16);
    ok(good, "q5_0: value = d * (code - 16), 5th bit of weight j in qh bit j");
    float x[32];
    uint8_t c[22];
    memcpy(x, y, sizeof x);
    gguf_quantize_row(GGUF_TYPE_Q5_0, x, c, 32);
    gguf_dequantize_row(GGUF_TYPE_Q5_0, c, y, 32);
    good = 1;
    for (int j = 0; j < 32; ++j)
        good &= y[j] == x[j];
    ok(good, "q5_0: a block on the grid survives a round trip");
}

/* Packs 6-bit scale s[k] and min m[k] the way ggml's get_scale_min_k4 unpacks them. */
static void pack_q4k_scales(uint8_t sc[12], const int s[8], const int m[8]) {
    memset(sc, 0, 12);
    for (int k = 0; k < 4; ++k) {
        sc[k] = (uint8_t)((s[k] & 63) | ((s[k + 4] >> 4) << 6));
        sc[k + 4] = (uint8_t)((m[k] & 63) | ((m[k + 4] >> 4) << 6));
        sc[k + 8] = (uint8_t)((s[k + 4] & 15) | ((m[k + 4] & 15) << 4));
    }
}

static void test_q4_K_block(void) {
    uint8_t b[144];
    int s[8] = {1, 7, 63, 20, 33, 50, 17, 62}, m[8] = {0, 5, 9, 63, 48, 31, 16, 2};
    b[0] = 0x00, b[1] = 0x3c; /* d = 1 */
    b[2] = 0x00, b[3] = 0x38; /* dmin = 0.5 */
    pack_q4k_scales(b + 4, s, m);
    for (int l = 0; l < 128; ++l)
        b[16 + l] = (uint8_t)((l * 7) & 0xff);
    float y[256];
    ok(gguf_dequantize_row(GGUF_TYPE_Q4_K, b, y, 256) == 0, "q4_K: dequantize 256");
    int good = 1;
    for (int i = 0; i < 256; ++i) {
        int chunk = i / 64, hi = (i % 64) >= 32, l = i % 32, k = 2 * chunk + hi;
        int q = hi ? (b[16 + 32 * chunk + l] >> 4) : (b[16 + 32 * chunk + l] & 15);
        float want = 1.0f * (float)s[k] * (float)q - 0.5f * (float)m[k];
        if (y[i] != want) good = 0;
    }
    ok(good, "q4_K: value = d*sc_k*q - dmin*m_k with the 12-byte 6-bit scale packing and "
             "nibble order of ggml's block_q4_K");
    /* A block on the grid of its own scales quantizes back to itself. */
    float x[256];
    uint8_t c[144];
    memcpy(x, y, sizeof x);
    gguf_quantize_row(GGUF_TYPE_Q4_K, x, c, 256);
    gguf_dequantize_row(GGUF_TYPE_Q4_K, c, y, 256);
    double se = 0, ss = 0;
    for (int i = 0; i < 256; ++i) {
        se += (y[i] - x[i]) * (y[i] - x[i]);
        ss += x[i] * x[i];
    }
    diag("q4_K gridded block: rmse/rms %.4f", sqrt(se / ss));
    ok(sqrt(se / ss) < 0.05, "q4_K: a block on a 4-bit grid round-trips closely");
}

static void test_q6_K_block(void) {
    uint8_t b[210];
    int8_t sc[16];
    for (int k = 0; k < 16; ++k)
        sc[k] = (int8_t)(k * 9 - 70);
    for (int i = 0; i < 128; ++i)
        b[i] = (uint8_t)((i * 37 + 11) & 0xff); /* ql */
    for (int i = 0; i < 64; ++i)
        b[128 + i] = (uint8_t)((i * 73 + 5) & 0xff); /* qh */
    memcpy(b + 192, sc, 16);
    b[208] = 0x00, b[209] = 0x34; /* d = 0.25 */
    float y[256];
    ok(gguf_dequantize_row(GGUF_TYPE_Q6_K, b, y, 256) == 0, "q6_K: dequantize 256");
    int good = 1;
    for (int i = 0; i < 256; ++i) {
        /* weight i: half h = i/128, r = i%128, l = r%32, quarter g = r/32 */
        int h = i / 128, r = i % 128, l = r % 32, g = r / 32;
        const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
        int low = g == 0   ? ql[l] & 15
                  : g == 1 ? ql[l + 32] & 15
                  : g == 2 ? ql[l] >> 4
                           : ql[l + 32] >> 4;
        int high = (qh[l] >> (2 * g)) & 3;
        int q = (low | (high << 4)) - 32;
        float want = 0.25f * (float)sc[i / 16] * (float)q;
        if (y[i] != want) good = 0;
    }
    ok(good, "q6_K: ql/qh/scales/d layout (210 bytes, d last), one int8 scale per 16 weights");
    float x[256];
    uint8_t c[210];
    memcpy(x, y, sizeof x);
    gguf_quantize_row(GGUF_TYPE_Q6_K, x, c, 256);
    gguf_dequantize_row(GGUF_TYPE_Q6_K, c, y, 256);
    double maxerr = 0, amax = 0;
    for (int i = 0; i < 256; ++i) {
        maxerr = fmax(maxerr, fabs(y[i] - x[i]));
        amax = fmax(amax, fabs(x[i]));
    }
    ok(maxerr < 0.02 * amax, "q6_K: a gridded block round-trips closely");
}

/* ---- round trips on Gaussian rows ------------------------------------------------------- */

static void test_round_trip(void) {
    static const struct {
        gguf_type t;
        double rel_rmse; /* bound on rmse / std */
    } cases[] = {
        {GGUF_TYPE_F32, 0},     {GGUF_TYPE_F16, 4e-4},  {GGUF_TYPE_BF16, 3e-3},
        {GGUF_TYPE_Q8_0, 0.01}, {GGUF_TYPE_Q6_K, 0.03}, {GGUF_TYPE_Q5_0, 0.06},
        {GGUF_TYPE_Q4_K, 0.10}, {GGUF_TYPE_Q4_0, 0.12},
    };
    const int n = 4096;
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    uint8_t *q = malloc((size_t)n * 4);
    if (!x || !y || !q) {
        ok(0, "round trip: allocate");
        return;
    }
    for (int i = 0; i < n; ++i)
        x[i] = 0.02f * gauss();
    double prev = -1;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
        gguf_type t = cases[c].t;
        char name[128];
        gguf_quantize_row(t, x, q, n);
        gguf_dequantize_row(t, q, y, n);
        double se = 0, ss = 0, worst_block = 0;
        int bl = (int)gguf_type_block_len(t);
        for (int i = 0; i < n; ++i) {
            se += (double)(y[i] - x[i]) * (y[i] - x[i]);
            ss += (double)x[i] * x[i];
        }
        /* per-element bound for the 32-blocks: |err| <= |d| (= amax/127, /8, /16) + fp16 slack */
        if (t == GGUF_TYPE_Q8_0 || t == GGUF_TYPE_Q4_0 || t == GGUF_TYPE_Q5_0) {
            double div = t == GGUF_TYPE_Q8_0 ? 127 * 2 : t == GGUF_TYPE_Q4_0 ? 8 : 16;
            for (int b0 = 0; b0 < n; b0 += bl) {
                double amax = 0, e = 0;
                for (int j = 0; j < bl; ++j) {
                    amax = fmax(amax, fabs(x[b0 + j]));
                    e = fmax(e, fabs(y[b0 + j] - x[b0 + j]));
                }
                /* slack: d itself is stored as fp16 (relative error 2^-11 on up to 127 steps) */
                worst_block = fmax(worst_block, e / (amax / div * 1.13));
            }
            snprintf(name, sizeof name,
                     "%s: every error within its block's step bound (%.3f of it)",
                     gguf_type_name(t), worst_block);
            ok(worst_block <= 1.0, name);
        }
        double rel = sqrt(se / ss);
        snprintf(name, sizeof name, "%s: round trip rmse/std %.5f <= %g", gguf_type_name(t), rel,
                 cases[c].rel_rmse);
        ok(rel <= cases[c].rel_rmse, name);
        if (c > 0) {
            snprintf(name, sizeof name, "%s: fewer bits, more error (%.5f >= %.5f)",
                     gguf_type_name(t), rel, prev);
            ok(rel >= prev, name);
        }
        prev = rel;
    }
    is_int(gguf_quantize_row(GGUF_TYPE_Q4_K, x, q, 300), -1, "q4_K refuses a row of 300");
    is_int((long long)gguf_row_bytes(GGUF_TYPE_Q8_0, 100), 0, "row_bytes(q8_0, 100) = 0");
    is_int((long long)gguf_row_bytes(GGUF_TYPE_Q6_K, 2560), 2100, "row_bytes(q6_K, 2560) = 2100");
    free(x);
    free(y);
    free(q);
}

/* ---- the per-tensor type policy --------------------------------------------------------- */

static void test_policy(void) {
    int fb;
    gguf_ftype f;
    ok(gguf_ftype_parse("Q4_K_M", &f) == 0 && f == GGUF_FTYPE_Q4_K_M, "parse Q4_K_M");
    ok(gguf_ftype_parse("q5_k_s", &f) == -1, "parse rejects q5_k_s");
    /* norms are f32 in every file type */
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_NORM, 2560, 0, 34, 1, &fb), GGUF_TYPE_F32,
           "norms stay f32");
    is_int(gguf_choose_type(GGUF_FTYPE_BF16, GGUF_ROLE_OTHER_2D, 1152, 0, 26, 1, &fb),
           GGUF_TYPE_BF16, "bf16 file: matrices bf16");
    is_int(gguf_choose_type(GGUF_FTYPE_Q8_0, GGUF_ROLE_TOKEN_EMBD, 1152, -1, 26, 1, &fb),
           GGUF_TYPE_Q8_0, "q8_0 file: token_embd q8_0 (converter)");
    is_int(gguf_choose_type(GGUF_FTYPE_Q8_0, GGUF_ROLE_OTHER_2D, 100, 0, 2, 1, &fb), GGUF_TYPE_F16,
           "q8_0 file: a row of 100 falls back to f16");
    ok(fb == 1, "... and says it fell back");
    /* 4B shapes: every row a multiple of 256 */
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_TOKEN_EMBD, 2560, -1, 34, 1, &fb),
           GGUF_TYPE_Q6_K, "q4_k_m 4B: tied token_embd is the output matrix -> q6_K");
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_TOKEN_EMBD, 2560, -1, 34, 0, &fb),
           GGUF_TYPE_Q4_K, "q4_k_m 4B: untied token_embd -> q4_K");
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_OTHER_2D, 2560, 3, 34, 1, &fb),
           GGUF_TYPE_Q4_K, "q4_k_m 4B: attn_q -> q4_K");
    /* use_more_bits(i, 34): i < 4, i >= 29, (i - 4) % 3 == 2 */
    const int more[34] = {1, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0,
                          0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1};
    int agree = 1;
    for (int i = 0; i < 34; ++i) {
        gguf_type want = more[i] ? GGUF_TYPE_Q6_K : GGUF_TYPE_Q4_K;
        agree &= gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_ATTN_V, 2560, i, 34, 1, &fb) == want;
        agree &=
            gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_FFN_DOWN, 10240, i, 34, 1, &fb) == want;
    }
    ok(agree, "q4_k_m 4B: attn_v and ffn_down get q6_K on llama-quantize's 'more bits' layers");
    /* 1B shapes: hidden 1152 is not a multiple of 256 */
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_OTHER_2D, 1152, 3, 26, 1, &fb),
           GGUF_TYPE_Q5_0, "q4_k_m 1B: attn_q (row 1152) falls back q4_K -> q5_0");
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_ATTN_V, 1152, 0, 26, 1, &fb),
           GGUF_TYPE_Q8_0, "q4_k_m 1B: attn_v layer 0 falls back q6_K -> q8_0");
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_TOKEN_EMBD, 1152, -1, 26, 1, &fb),
           GGUF_TYPE_Q8_0, "q4_k_m 1B: tied token_embd -> q8_0");
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_FFN_DOWN, 6912, 4, 26, 1, &fb),
           GGUF_TYPE_Q4_K, "q4_k_m 1B: ffn_down (row 6912 = 27*256) layer 4 -> q4_K");
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_FFN_DOWN, 6912, 5, 26, 1, &fb),
           GGUF_TYPE_Q6_K, "q4_k_m 1B: ffn_down layer 5 ((5 - 26/8) % 3 == 2) -> q6_K");
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_K_M, GGUF_ROLE_OTHER_2D, 48, 0, 2, 1, &fb), GGUF_TYPE_F16,
           "q4_k_m: a row of 48 falls back to f16");
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_0, GGUF_ROLE_TOKEN_EMBD, 2560, -1, 34, 1, &fb),
           GGUF_TYPE_Q6_K, "q4_0 4B: tied token_embd -> q6_K (llama-quantize)");
    is_int(gguf_choose_type(GGUF_FTYPE_Q4_0, GGUF_ROLE_ATTN_V, 2560, 0, 34, 1, &fb), GGUF_TYPE_Q4_0,
           "q4_0: attn_v stays q4_0");
}

/* ---- the writer ------------------------------------------------------------------------- */

typedef struct src {
    int64_t ne0, nrows;
    int fail_at; /* row at which fill fails; -1 never */
    atomic_int *cancel_at_call;
} src;

static lt_status fill_pattern(void *ctx, int64_t row0, int64_t nrows, float *dst, char *err,
                              size_t errlen) {
    src *s = ctx;
    if (s->fail_at >= 0 && row0 + nrows > s->fail_at) {
        snprintf(err, errlen, "synthetic read error at row %d", s->fail_at);
        return LT_ERR_IO;
    }
    if (s->cancel_at_call) atomic_store(s->cancel_at_call, 1);
    for (int64_t r = 0; r < nrows; ++r)
        for (int64_t j = 0; j < s->ne0; ++j)
            dst[r * s->ne0 + j] = sinf((float)((row0 + r) * 131 + j) * 0.01f);
    return LT_OK;
}

/* A tiny GGUF reader for checking what the writer wrote. */
typedef struct reader {
    const uint8_t *p, *end;
    int bad;
} reader;

static uint64_t rd(reader *r, int n) {
    uint64_t v = 0;
    if (r->p + n > r->end) {
        r->bad = 1;
        return 0;
    }
    for (int i = 0; i < n; ++i)
        v |= (uint64_t)r->p[i] << (8 * i);
    r->p += n;
    return v;
}

static int rd_str(reader *r, char *out, size_t cap) {
    uint64_t n = rd(r, 8);
    if (r->bad || n >= cap || r->p + n > r->end) {
        r->bad = 1;
        return -1;
    }
    memcpy(out, r->p, n);
    out[n] = 0;
    r->p += n;
    return 0;
}

static uint8_t *slurp(const char *path, size_t *n) {
    return (uint8_t *)test_read_file(path, n);
}

static int count_entries(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    if (!d) return -1;
    for (struct dirent *e; (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) ++n;
    closedir(d);
    return n;
}

static const char *str_at(void *ctx, size_t i) {
    static const char *v[] = {"<pad>", "\xe2\x96\x81hello", "<0x0A>"};
    (void)ctx;
    return v[i];
}

static gguf_writer *make_writer(src *a, src *b, src *c) {
    gguf_writer *w = gguf_writer_new();
    float scores[3] = {0.0f, -1.5f, -1000.0f};
    int32_t types[3] = {3, 1, 6};
    gguf_set_str(w, "general.architecture", "gemma3");
    gguf_set_u32(w, "gemma3.block_count", 2);
    gguf_set_f32(w, "gemma3.attention.layer_norm_rms_epsilon", 1e-6f);
    gguf_set_bool(w, "tokenizer.ggml.add_bos_token", 1);
    gguf_set_i32(w, "test.i32", -7);
    gguf_set_u64(w, "test.u64", 1ull << 40);
    gguf_set_arr_str(w, "tokenizer.ggml.tokens", 3, str_at, NULL);
    gguf_set_arr_f32(w, "tokenizer.ggml.scores", scores, 3);
    gguf_set_arr_i32(w, "tokenizer.ggml.token_type", types, 3);
    int64_t ne_a[2] = {256, 3}, ne_b[1] = {40}, ne_c[2] = {64, 5};
    gguf_add_tensor(w, "blk.0.attn_q.weight", 2, ne_a, GGUF_TYPE_Q4_K, fill_pattern, a);
    gguf_add_tensor(w, "blk.0.attn_norm.weight", 1, ne_b, GGUF_TYPE_F32, fill_pattern, b);
    gguf_add_tensor(w, "token_embd.weight", 2, ne_c, GGUF_TYPE_Q8_0, fill_pattern, c);
    return w;
}

static void test_writer(const char *dir) {
    char path[600], name[256];
    snprintf(path, sizeof path, "%s/model.gguf", dir);
    src a = {256, 3, -1, NULL}, b = {40, 1, -1, NULL}, c = {64, 5, -1, NULL};
    gguf_writer *w = make_writer(&a, &b, &c);
    uint64_t bytes = 0;
    gguf_write_opts wo = {0};
    lt_status st = gguf_writer_write(w, path, &wo, &bytes);
    if (!ok(st == LT_OK, "writer: writes a file")) diag("%s", gguf_writer_error(w));
    gguf_writer_free(w);
    size_t n = 0;
    uint8_t *file = slurp(path, &n);
    if (!ok(file != NULL, "writer: file exists")) return;
    is_int((long long)n, (long long)bytes, "writer: reported size = file size");
    is_int((long long)(n % 32), 0, "writer: file length is a multiple of 32");
    reader r = {file, file + n, 0};
    is_int((long long)rd(&r, 4), 0x46554747, "header: magic GGUF");
    is_int((long long)rd(&r, 4), 3, "header: version 3");
    is_int((long long)rd(&r, 8), 3, "header: 3 tensors");
    is_int((long long)rd(&r, 8), 10, "header: 10 kv pairs (9 + general.alignment)");
    /* kv pairs in order */
    char key[128], sval[128];
    rd_str(&r, key, sizeof key);
    is_str(key, "general.architecture", "kv 0: key");
    is_int((long long)rd(&r, 4), 8, "kv 0: type string (8)");
    rd_str(&r, sval, sizeof sval);
    is_str(sval, "gemma3", "kv 0: value");
    rd_str(&r, key, sizeof key);
    is_int((long long)rd(&r, 4), 4, "kv 1: gemma3.block_count is u32 (4)");
    is_int((long long)rd(&r, 4), 2, "kv 1: value 2");
    rd_str(&r, key, sizeof key);
    is_int((long long)rd(&r, 4), 6, "kv 2: rms eps is f32 (6)");
    uint32_t fb32 = (uint32_t)rd(&r, 4);
    float fv;
    memcpy(&fv, &fb32, 4);
    is_close(fv, 1e-6, 1e-12, "kv 2: value 1e-6");
    rd_str(&r, key, sizeof key);
    is_int((long long)rd(&r, 4), 7, "kv 3: add_bos is bool (7)");
    is_int((long long)rd(&r, 1), 1, "kv 3: one byte, 1");
    rd_str(&r, key, sizeof key);
    is_int((long long)rd(&r, 4), 5, "kv 4: i32 (5)");
    is_int((long long)(int32_t)rd(&r, 4), -7, "kv 4: -7");
    rd_str(&r, key, sizeof key);
    is_int((long long)rd(&r, 4), 10, "kv 5: u64 (10)");
    is_int((long long)rd(&r, 8), 1ll << 40, "kv 5: 2^40");
    rd_str(&r, key, sizeof key);
    is_str(key, "tokenizer.ggml.tokens", "kv 6: key");
    is_int((long long)rd(&r, 4), 9, "kv 6: array (9)");
    is_int((long long)rd(&r, 4), 8, "kv 6: of strings");
    is_int((long long)rd(&r, 8), 3, "kv 6: 3 entries");
    rd_str(&r, sval, sizeof sval);
    rd_str(&r, sval, sizeof sval);
    is_str(sval, "\xe2\x96\x81hello", "kv 6: entry 1, UTF-8 as given");
    rd_str(&r, sval, sizeof sval);
    rd_str(&r, key, sizeof key);
    ok(rd(&r, 4) == 9 && rd(&r, 4) == 6 && rd(&r, 8) == 3, "kv 7: array of 3 f32");
    r.p += 12;
    rd_str(&r, key, sizeof key);
    ok(rd(&r, 4) == 9 && rd(&r, 4) == 5 && rd(&r, 8) == 3, "kv 8: array of 3 i32");
    r.p += 4;
    is_int((int32_t)rd(&r, 4), 1, "kv 8: entry 1");
    r.p += 4;
    rd_str(&r, key, sizeof key);
    is_str(key, "general.alignment", "kv 9: general.alignment added");
    ok(rd(&r, 4) == 4 && rd(&r, 4) == 32, "kv 9: u32 32");
    /* tensor infos */
    const char *names[3] = {"blk.0.attn_q.weight", "blk.0.attn_norm.weight", "token_embd.weight"};
    const int types[3] = {GGUF_TYPE_Q4_K, GGUF_TYPE_F32, GGUF_TYPE_Q8_0};
    const int64_t ne[3][2] = {{256, 3}, {40, 1}, {64, 5}};
    const int nd[3] = {2, 1, 2};
    uint64_t offs[3];
    for (int i = 0; i < 3; ++i) {
        char tn[128];
        rd_str(&r, tn, sizeof tn);
        snprintf(name, sizeof name, "tensor %d: name %s", i, names[i]);
        is_str(tn, names[i], name);
        int dims = (int)rd(&r, 4), good = dims == nd[i];
        for (int d = 0; d < dims && d < 2; ++d)
            good &= (int64_t)rd(&r, 8) == ne[i][d];
        snprintf(name, sizeof name, "tensor %d: dims and ne (fastest first)", i);
        ok(good, name);
        snprintf(name, sizeof name, "tensor %d: type %s", i, gguf_type_name((gguf_type)types[i]));
        is_int((long long)rd(&r, 4), types[i], name);
        offs[i] = rd(&r, 8);
        snprintf(name, sizeof name, "tensor %d: offset %% 32 == 0", i);
        ok(offs[i] % 32 == 0, name);
    }
    ok(!r.bad, "reader stayed inside the file");
    size_t data = ((size_t)(r.p - file) + 31) / 32 * 32;
    int pad_zero = 1;
    for (const uint8_t *q = r.p; q < file + data; ++q)
        pad_zero &= *q == 0;
    ok(pad_zero, "header padded with zeros to 32");
    is_int((long long)offs[0], 0, "first tensor at data offset 0");
    is_int((long long)offs[1], 448, "second after 3*144 = 432 bytes, aligned to 448");
    is_int((long long)offs[2], 608, "third after 40*4 = 160 bytes: 608");
    /* data bytes equal the quantizer's */
    src *srcs[3] = {&a, &b, &c};
    for (int i = 0; i < 3; ++i) {
        int64_t ne0 = srcs[i]->ne0, nr = srcs[i]->nrows;
        float *x = malloc((size_t)(ne0 * nr) * sizeof *x);
        size_t rb = gguf_row_bytes((gguf_type)types[i], ne0);
        uint8_t *want = malloc(rb * (size_t)nr);
        char e[64];
        fill_pattern(srcs[i], 0, nr, x, e, sizeof e);
        for (int64_t rr = 0; rr < nr; ++rr)
            gguf_quantize_row((gguf_type)types[i], x + rr * ne0, want + rr * rb, ne0);
        snprintf(name, sizeof name, "tensor %d: data bytes equal gguf_quantize_row's", i);
        ok(data + offs[i] + rb * (size_t)nr <= n &&
               memcmp(file + data + offs[i], want, rb * (size_t)nr) == 0,
           name);
        free(x);
        free(want);
    }
    free(file);

    /* refuse to overwrite; overwrite when asked */
    w = make_writer(&a, &b, &c);
    st = gguf_writer_write(w, path, &wo, NULL);
    is_int(st, LT_ERR_IO, "writer: refuses to overwrite by default");
    ok(strstr(gguf_writer_error(w), "overwrite") != NULL, "... and says how to allow it");
    gguf_writer_free(w);
    w = make_writer(&a, &b, &c);
    gguf_write_opts wo_over = {.overwrite = 1, .n_threads = 3};
    is_int(gguf_writer_write(w, path, &wo_over, NULL), LT_OK, "writer: overwrite=1 replaces");
    gguf_writer_free(w);
    is_int(count_entries(dir), 1, "writer: no temp files left after success");

    /* a failing source: nothing appears, the old file is untouched, no temp file remains */
    size_t n_before = 0;
    uint8_t *before = slurp(path, &n_before);
    src bad = {64, 5, 3, NULL};
    w = make_writer(&a, &b, &bad);
    st = gguf_writer_write(w, path, &wo_over, NULL);
    is_int(st, LT_ERR_IO, "writer: a failing fill is an error");
    ok(strstr(gguf_writer_error(w), "token_embd.weight") && strstr(gguf_writer_error(w), "row 3"),
       "... naming the tensor and the source's message");
    gguf_writer_free(w);
    size_t n_after = 0;
    uint8_t *after = slurp(path, &n_after);
    ok(before && after && n_before == n_after && memcmp(before, after, n_after) == 0,
       "writer: the previous file is intact after a failed overwrite");
    free(before);
    free(after);
    is_int(count_entries(dir), 1, "writer: the temp file was removed");

    /* disk full half-way (RLIMIT_FSIZE makes write() fail with EFBIG, as a full disk fails
     * with ENOSPC): an error naming the file, the previous file intact, no temp file left */
    {
        size_t n_old = 0;
        uint8_t *old = slurp(path, &n_old);
        struct rlimit saved, small;
        getrlimit(RLIMIT_FSIZE, &saved);
        small = saved;
        small.rlim_cur = 700; /* past the header, inside the tensor data */
        signal(SIGXFSZ, SIG_IGN);
        setrlimit(RLIMIT_FSIZE, &small);
        w = make_writer(&a, &b, &c);
        st = gguf_writer_write(w, path, &wo_over, NULL);
        setrlimit(RLIMIT_FSIZE, &saved);
        is_int(st, LT_ERR_IO, "writer: a write that fails half-way (disk full) is an I/O error");
        ok(strstr(gguf_writer_error(w), path) != NULL, "... naming the file");
        gguf_writer_free(w);
        size_t n_new = 0;
        uint8_t *now = slurp(path, &n_new);
        ok(old && now && n_old == n_new && memcmp(old, now, n_new) == 0,
           "writer: the previous file is intact after the failed write");
        is_int(count_entries(dir), 1, "writer: no partial temp file left behind");
        free(old);
        free(now);
    }

    /* cancel */
    char path2[1200];
    snprintf(path2, sizeof path2, "%s/cancelled.gguf", dir);
    atomic_int cancel = 0;
    src a2 = {256, 3, -1, &cancel};
    w = make_writer(&a2, &b, &c);
    gguf_write_opts wo_c = {.cancel = &cancel};
    is_int(gguf_writer_write(w, path2, &wo_c, NULL), LT_CANCELLED,
           "writer: cancel -> LT_CANCELLED");
    gguf_writer_free(w);
    ok(access(path2, F_OK) != 0 && count_entries(dir) == 1, "writer: nothing left after cancel");

    /* bad inputs */
    w = gguf_writer_new();
    int64_t ne_bad[2] = {100, 2}, ne_ok[2] = {64, 2};
    is_int(gguf_add_tensor(w, "x.weight", 2, ne_bad, GGUF_TYPE_Q8_0, fill_pattern, &a), LT_ERR_ARG,
           "add_tensor: row 100 for q8_0 refused");
    ok(strstr(gguf_writer_error(w), "x.weight") && strstr(gguf_writer_error(w), "32"),
       "... naming the tensor and the block length");
    is_int(gguf_add_tensor(w, "a-name-that-is-much-longer-than-sixty-three-bytes-for-sure.weight",
                           2, ne_ok, GGUF_TYPE_F32, fill_pattern, &a),
           LT_ERR_ARG, "add_tensor: name over 63 bytes refused");
    is_int(gguf_add_tensor(w, "y", 5, ne_ok, GGUF_TYPE_F32, fill_pattern, &a), LT_ERR_ARG,
           "add_tensor: 5 dims refused");
    is_int(gguf_add_tensor(w, "y", 2, ne_ok, GGUF_TYPE_F32, fill_pattern, &a), LT_OK,
           "add_tensor y");
    is_int(gguf_add_tensor(w, "y", 2, ne_ok, GGUF_TYPE_F32, fill_pattern, &a), LT_ERR_ARG,
           "add_tensor: duplicate name refused");
    is_int(gguf_set_u32(w, "a.b", 1), LT_OK, "set a.b");
    is_int(gguf_set_str(w, "a.b", "x"), LT_ERR_ARG, "duplicate key refused");
    is_int(gguf_set_u32(w, "Bad Key", 1), LT_ERR_ARG, "key with capitals/space refused");
    is_int(gguf_set_u32(w, "general.alignment", 64), LT_ERR_ARG, "alignment other than 32 refused");
    char dirpath[600];
    snprintf(dirpath, sizeof dirpath, "%s/", dir);
    is_int(gguf_writer_write(w, dir, &wo_over, NULL), LT_ERR_ARG, "writing onto a folder refused");
    snprintf(path2, sizeof path2, "%s/x.gguf", path); /* a file used as a folder: unwritable */
    is_int(gguf_writer_write(w, path2, &wo, NULL), LT_ERR_IO, "unwritable path is an I/O error");
    snprintf(path2, sizeof path2, "%s/no/such/folder/x.gguf", dir);
    is_int(gguf_writer_write(w, path2, &wo, NULL), LT_ERR_IO, "missing folder is an I/O error");
    ok(strstr(gguf_writer_error(w), path2) != NULL, "... naming the path");
    gguf_writer_free(w);
    unlink(path);
}

int main(void) {
    test_half();
    test_q8_0_block();
    test_q4_0_block();
    test_q5_0_block();
    test_q4_K_block();
    test_q6_K_block();
    test_round_trip();
    test_policy();
    const char *tmp = getenv("TMPDIR");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/lathe-gguf-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (ok(mkdtemp(dir) != NULL, "make a scratch folder")) {
        test_writer(dir);
        rmdir(dir);
    }
    return tap_done();
}
