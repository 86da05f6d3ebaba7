/* test_quant_golden.c — lathe's quantizers against llama.cpp's own, byte for byte.
 *
 * Loads libggml-base.so (argv[1]: the file shipped in node-llama-cpp's prebuilt linux-x64
 * package) with dlopen and compares, for each type lathe writes, ggml_quantize_chunk's bytes
 * with gguf_quantize_row's on awkward data (Gaussian, heavy outliers, all zero, constant, one
 * spike, subnormal-sized, mixed signs per block), and ggml's dequantizers with ours.
 * Prints TAP; skips (1..0) when the library is absent. Touches nothing but memory.
 */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/formats/gguf.h"
#include "tests/unit/tap.h"

typedef size_t (*quantize_chunk_fn)(int type, const float *src, void *dst, int64_t start,
                                    int64_t nrows, int64_t n_per_row, const float *imatrix);
typedef void (*dequant_fn)(const void *x, float *y, int64_t k);

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double rand_uniform(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

static float rand_normal(void) {
    double u = rand_uniform() + 1e-12, v = rand_uniform();
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* Fills x[n] with pattern p (0..7). */
static void fill_pattern(float *x, int64_t n, int p) {
    for (int64_t i = 0; i < n; ++i) {
        switch (p) {
        case 0:
            x[i] = 0.02f * rand_normal();
            break; /* like weights */
        case 1:
            x[i] = rand_uniform() < 0.01 ? 40.0f * rand_normal() : rand_normal();
            break;
        case 2:
            x[i] = 0.0f;
            break;
        case 3:
            x[i] = 0.37f;
            break;
        case 4:
            x[i] = (i % 97 == 5) ? -3.0f : 1e-3f * rand_normal();
            break;
        case 5:
            x[i] = 1e-30f * rand_normal();
            break; /* tiny scales */
        case 6:
            x[i] = (float)((i / 32) % 2 ? 1 : -1) * fabsf(rand_normal());
            break;
        default:
            x[i] = 1.0f + 0.1f * rand_normal();
            break; /* like norms+1 */
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        printf("1..0 # SKIP usage: test_quant_golden PATH/libggml-base.so\n");
        return 0;
    }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        printf("1..0 # SKIP cannot load %s: %s\n", argv[1], dlerror());
        return 0;
    }
    quantize_chunk_fn quantize_chunk = (quantize_chunk_fn)dlsym(lib, "ggml_quantize_chunk");
    ok(quantize_chunk != NULL, "libggml-base exports ggml_quantize_chunk");
    if (!quantize_chunk) return tap_done();

    static const struct {
        gguf_type t;
        const char *dequant;
    } types[] = {
        {GGUF_TYPE_F16, NULL},
        {GGUF_TYPE_BF16, NULL},
        {GGUF_TYPE_Q8_0, "dequantize_row_q8_0"},
        {GGUF_TYPE_Q4_0, "dequantize_row_q4_0"},
        {GGUF_TYPE_Q5_0, "dequantize_row_q5_0"},
        {GGUF_TYPE_Q4_K, "dequantize_row_q4_K"},
        {GGUF_TYPE_Q6_K, "dequantize_row_q6_K"},
    };
    const int64_t n_per_row = 1024, nrows = 8, n = n_per_row * nrows;
    float *x = malloc((size_t)n * sizeof *x);
    float *ya = malloc((size_t)n * sizeof *ya), *yb = malloc((size_t)n * sizeof *yb);
    uint8_t *qa = malloc((size_t)n * 4), *qb = malloc((size_t)n * 4);
    if (!x || !ya || !yb || !qa || !qb) {
        ok(0, "allocate buffers");
        return tap_done();
    }
    for (size_t k = 0; k < sizeof types / sizeof types[0]; ++k) {
        gguf_type t = types[k].t;
        size_t row = gguf_row_bytes(t, n_per_row);
        dequant_fn dq = types[k].dequant ? (dequant_fn)dlsym(lib, types[k].dequant) : NULL;
        for (int p = 0; p < 8; ++p) {
            char name[128];
            fill_pattern(x, n, p);
            memset(qa, 0xA5, (size_t)n * 4);
            memset(qb, 0x5A, (size_t)n * 4);
            size_t got = quantize_chunk((int)t, x, qa, 0, nrows, n_per_row, NULL);
            int rc = 0;
            for (int64_t r = 0; r < nrows && rc == 0; ++r)
                rc = gguf_quantize_row(t, x + r * n_per_row, qb + r * row, n_per_row);
            snprintf(name, sizeof name, "%s pattern %d: same size as ggml (%zu bytes)",
                     gguf_type_name(t), p, got);
            ok(rc == 0 && got == row * nrows, name);
            size_t first = (size_t)-1;
            for (size_t i = 0; i < row * nrows; ++i)
                if (qa[i] != qb[i]) {
                    first = i;
                    break;
                }
            snprintf(name, sizeof name, "%s pattern %d: bytes equal ggml_quantize_chunk",
                     gguf_type_name(t), p);
            if (!ok(first == (size_t)-1, name))
                diag("first difference at byte %zu (block %zu): ggml %02x, lathe %02x", first,
                     first / gguf_type_block_bytes(t), qa[first], qb[first]);
            if (dq) {
                dq(qa, ya, n);
                gguf_dequantize_row(t, qa, yb, n);
                snprintf(name, sizeof name, "%s pattern %d: dequantize equals ggml's",
                         gguf_type_name(t), p);
                ok(memcmp(ya, yb, (size_t)n * sizeof *ya) == 0, name);
            }
        }
    }
    free(x);
    free(ya);
    free(yb);
    free(qa);
    free(qb);
    dlclose(lib);
    return tap_done();
}
