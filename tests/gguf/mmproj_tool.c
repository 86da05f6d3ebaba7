/* mmproj_tool.c — lathe's side of the mmproj test (tests/gguf/test_mmproj.py): what the engine
 * computes for a prompt with one image, to compare with llama.cpp's mtmd on the exported files.
 *
 *   mmproj_tool DIR IMAGE --ids 2,17,... --n N
 *
 * ids hold one image block (<start_of_image>, mm_tokens_per_image image tokens,
 * <end_of_image>). Prints JSON: "embd" (the image's soft tokens, siglip_encode's [mm, H]),
 * "steps" (N + 1 logit vectors of the last position, through gemma3_forward_images: the path
 * %%chat image= and lt_logits_image take; after the prompt, then after each greedy token, the
 * whole sequence run again each time), "greedy" (the N argmax tokens) and "margins" (each
 * step's top-2 logit gap: a near-tie may flip on another implementation).
 * Drives the engine's internals on the CPU backend. A test tool: it prints errors to stderr and
 * exits non-zero; library code never does.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/backend/backend.h"
#include "cuda/formats/image.h"
#include "cuda/model/model.h"
#include "cuda/model/siglip.h"

static int parse_ids(const char *s, int32_t **ids, int *n) {
    int cap = 16;
    *n = 0;
    *ids = malloc((size_t)cap * sizeof **ids);
    while (*ids && *s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) return -1;
        if (*n == cap && !(*ids = realloc(*ids, (size_t)(cap *= 2) * sizeof **ids))) return -1;
        (*ids)[(*n)++] = (int32_t)v;
        s = *end == ',' ? end + 1 : end;
    }
    return *ids && *n > 0 ? 0 : -1;
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; ++i)
        if (x[i] > x[b]) b = i;
    return b;
}

/* The gap between the largest and the second largest of x[n]. */
static float top2_gap(const float *x, int n) {
    int b = argmax(x, n);
    float second = -3.0e38f;
    for (int i = 0; i < n; ++i)
        if (i != b && x[i] > second) second = x[i];
    return x[b] - second;
}

static void put_floats(const float *x, size_t n) {
    putchar('[');
    for (size_t i = 0; i < n; i++)
        printf("%s%.9g", i ? "," : "", (double)x[i]);
    putchar(']');
}

/* The last position's logits [V] for ids with the soft tokens emb (backend memory). */
static lt_status last_logits(const gemma3_model *m, lt_ctx *ctx, const int32_t *ids, int n,
                             const float *emb, float *out) {
    int V = m->cfg.vocab_size, mm = m->vision->cfg.mm_tokens_per_image;
    float *dev = ctx->be->alloc(ctx, sizeof(float) * (size_t)n * (size_t)V);
    if (!dev) return LT_ERR_MEMORY;
    gemma3_cache cache;
    gemma3_images gi = {emb, mm};
    gemma3_outputs o = {.logits = dev};
    lt_status st = gemma3_cache_init(&cache, ctx, &m->cfg, n);
    if (st == LT_OK) {
        st = gemma3_forward_images(m, ctx, ids, n, &cache, &o, &gi);
        gemma3_cache_free(&cache, ctx);
    }
    if (st == LT_OK)
        st = ctx->be->download(ctx, out, dev + (size_t)(n - 1) * V, sizeof(float) * (size_t)V);
    ctx->be->release(ctx, dev);
    return st;
}

int main(int argc, char **argv) {
    char err[LT_ERRLEN] = "";
    if (argc != 7 || strcmp(argv[3], "--ids") || strcmp(argv[5], "--n")) {
        fprintf(stderr, "usage: mmproj_tool DIR IMAGE --ids 2,17,... --n N\n");
        return 2;
    }
    int32_t *ids = NULL;
    int n = 0, steps = atoi(argv[6]);
    if (parse_ids(argv[4], &ids, &n)) {
        fprintf(stderr, "mmproj_tool: --ids: give comma-separated integers\n");
        return 2;
    }
    gemma3_model *m = NULL;
    if (gemma3_load_dir(&m, argv[1], NULL, NULL, err) != LT_OK || !m->vision) {
        fprintf(stderr, "mmproj_tool: %s: %s\n", argv[1],
                err[0]               ? err
                : m->vision_error[0] ? m->vision_error
                                     : "no image tower");
        return 1;
    }
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &lt_backend_cpu, 0) != LT_OK) {
        fprintf(stderr, "mmproj_tool: cpu backend: %s\n", ctx.err);
        return 1;
    }
    const siglip_tower *t = m->vision;
    int side = t->cfg.image_size, mm = t->cfg.mm_tokens_per_image, V = m->cfg.vocab_size;
    size_t H = (size_t)m->cfg.hidden_size;
    float *px = malloc(sizeof(float) * 3 * (size_t)side * (size_t)side);
    float *soft = malloc(sizeof(float) * (size_t)mm * H), *logits = malloc(sizeof(float) * V);
    float *emb = ctx.be->alloc(&ctx, sizeof(float) * (size_t)mm * H);
    int32_t *seq = malloc(sizeof(int32_t) * (size_t)(n + steps));
    float *gaps = malloc(sizeof(float) * (size_t)(steps + 1));
    if (!px || !soft || !logits || !emb || !seq || !gaps) {
        fprintf(stderr, "mmproj_tool: out of memory\n");
        return 1;
    }
    if (img_load_pixels(px, argv[2], side, err) != LT_OK) {
        fprintf(stderr, "mmproj_tool: %s: %s\n", argv[2], err);
        return 1;
    }
    lt_status st = siglip_encode(t, &ctx, px, emb);
    if (st == LT_OK) st = ctx.be->download(&ctx, soft, emb, sizeof(float) * (size_t)mm * H);
    if (st != LT_OK) {
        fprintf(stderr, "mmproj_tool: the image tower: %s\n", ctx.err);
        return 1;
    }
    printf("{\"embd\": ");
    put_floats(soft, (size_t)mm * H);
    memcpy(seq, ids, sizeof(int32_t) * (size_t)n);
    printf(", \"steps\": [");
    for (int i = 0; i <= steps; i++) {
        if ((st = last_logits(m, &ctx, seq, n + i, emb, logits)) != LT_OK) {
            fprintf(stderr, "mmproj_tool: forward: %s\n", ctx.err);
            return 1;
        }
        printf("%s", i ? "," : "");
        put_floats(logits, (size_t)V);
        if (i == steps) break;
        gaps[i] = top2_gap(logits, V);
        seq[n + i] = argmax(logits, V);
    }
    printf("], \"greedy\": [");
    for (int i = 0; i < steps; i++)
        printf("%s%d", i ? "," : "", seq[n + i]);
    printf("], \"margins\": ");
    put_floats(gaps, (size_t)steps);
    printf("}\n");
    ctx.be->release(&ctx, emb);
    lt_ctx_shutdown(&ctx);
    free(px);
    free(soft);
    free(logits);
    free(seq);
    free(gaps);
    free(ids);
    gemma3_model_free(m);
    return 0;
}
