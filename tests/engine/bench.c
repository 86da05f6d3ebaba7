/* bench.c — CPU prefill and decode speed of the engine (not a test: no timing is asserted).
 *
 *   tests/engine/bench SOURCE [PREFILL_TOKENS [DECODE_TOKENS [THREADS [DTYPE]]]]
 *   SOURCE: tiny, a model directory, or random:gemma-3-{270m,1b,4b,...}
 * Prefill: one forward of PREFILL_TOKENS through the KV cache, keeping only the last logits
 * (what generation does). Decode: DECODE_TOKENS single-token forwards after that, each with the
 * full [V] head. Prints one line per phase with tokens/s, plus the build (CBLAS or C loop).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda/model/model.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench SOURCE [PREFILL_TOKENS [DECODE_TOKENS [THREADS [DTYPE]]]]\n");
        return 2;
    }
    const char *src = argv[1];
    int np = argc > 2 ? atoi(argv[2]) : 128, nd = argc > 3 ? atoi(argv[3]) : 32;
    int threads = argc > 4 ? atoi(argv[4]) : 0;
    const char *dtype = argc > 5 ? argv[5] : NULL;
    char err[LT_ERRLEN];
    gemma3_model *m = NULL;
    double t0 = now();
    lt_status rc;
    if (!strncmp(src, "random:", 7)) {
        const char *size = src + 7;
        if (!strncmp(size, "gemma-3-", 8)) size += 8;
        rc = gemma3_load_random(&m, size, 1, dtype, NULL, err);
    } else {
        char dir[1024];
        const char *env = getenv("LATHE_TINY_DIR");
        if (!strcmp(src, "tiny"))
            snprintf(dir, sizeof dir, "%s", env && *env ? env : LATHE_SRCDIR "/models/tiny");
        else
            snprintf(dir, sizeof dir, "%s", src);
        rc = gemma3_load_dir(&m, dir, dtype, NULL, err);
    }
    if (rc != LT_OK) {
        fprintf(stderr, "bench: %s\n", err);
        return 1;
    }
    double t_load = now() - t0;
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &lt_backend_cpu, threads) != LT_OK) return 1;
    gemma3_cache cache;
    if (gemma3_cache_init(&cache, &ctx, &m->cfg, np + nd + 8) != LT_OK) return 1;
    int V = m->cfg.vocab_size;
    float *last = malloc(sizeof(float) * (size_t)V);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)np);
    for (int i = 0; i < np; i++)
        ids[i] = i == 0 ? 2 : 100 + (i * 37) % 3000;
    gemma3_outputs o = {.last_logits = last};
    printf("model %s: %lld params, %s storage, %.2f GB, loaded in %.2f s; %d threads, matmul %s\n",
           src, (long long)m->n_params, lt_dtype_user_name(m->dtype), m->weight_bytes / 1e9, t_load,
           ctx.n_threads,
           lt_cpu_has_blas() ? "CBLAS (OpenBLAS) + threaded C loop for 16-bit GEMV"
                             : "threaded C loop");
    t0 = now();
    if (gemma3_forward(m, &ctx, ids, np, &cache, &o) != LT_OK) {
        fprintf(stderr, "bench: %s\n", ctx.err);
        return 1;
    }
    double tp = now() - t0;
    printf("prefill %d tokens: %.3f s, %.1f tokens/s\n", np, tp, np / tp);
    int tok = 1234 % V;
    t0 = now();
    for (int i = 0; i < nd; i++) {
        if (gemma3_forward(m, &ctx, &tok, 1, &cache, &o) != LT_OK) {
            fprintf(stderr, "bench: %s\n", ctx.err);
            return 1;
        }
        int best = 0;
        for (int v = 1; v < V; v++)
            if (last[v] > last[best]) best = v;
        tok = best;
    }
    double td = now() - t0;
    printf("decode %d tokens: %.3f s, %.2f tokens/s (%.1f ms/token)\n", nd, td, nd / td,
           1000 * td / nd);
    gemma3_cache_free(&cache, &ctx);
    lt_ctx_shutdown(&ctx);
    gemma3_model_free(m);
    free(last);
    free(ids);
    return 0;
}
