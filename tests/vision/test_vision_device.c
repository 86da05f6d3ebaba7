/* test_vision_device.c — the image tower of a model copied to a backend (gemma3_to_device ->
 * siglip_to_device) against the host model on the CPU reference: the tower's soft tokens and
 * the logits of a sequence with an image block, for the committed tf5 fixture (a one-layer
 * SigLIP under model.vision_tower.), with the copy's matrices in fp32 (equal to 1e-5) and bf16
 * (to 2e-2). Built as is, it copies onto the CPU backend; test_vision_gpu.c builds it with
 * VISION_TEST_CUDA for the CUDA backend (make check-gpu). TAP.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/formats/image.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/model/model.h"
#include "cuda/model/siglip.h"
#ifdef VISION_TEST_CUDA
#include "cuda/backend/cuda/backend_cuda.h"
#endif
#include "tests/unit/tap.h"

static const char *srcdir(void) {
    const char *s = getenv("LATHE_SRCDIR");
    return s && *s ? s : LATHE_SRCDIR;
}

static double rel(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* logits [T, V] of ids with the image through model m on ctx, into host memory */
static lt_status run(const gemma3_model *m, lt_ctx *ctx, const float *px, const int32_t *ids, int T,
                     float *feats_host, float *logits_host) {
    const siglip_tower *t = m->vision;
    int mm = t->cfg.mm_tokens_per_image, H = m->cfg.hidden_size, V = m->cfg.vocab_size;
    float *emb = ctx->be->alloc(ctx, sizeof(float) * (size_t)mm * H);
    float *lg = ctx->be->alloc(ctx, sizeof(float) * (size_t)T * V);
    lt_status rc = emb && lg ? LT_OK : LT_ERR_MEMORY;
    if (rc == LT_OK) rc = siglip_encode(t, ctx, px, emb);
    if (rc == LT_OK) rc = ctx->be->download(ctx, feats_host, emb, sizeof(float) * (size_t)mm * H);
    gemma3_images gi = {emb, mm};
    gemma3_outputs o = {.logits = lg};
    if (rc == LT_OK) rc = gemma3_forward_images(m, ctx, ids, T, NULL, &o, &gi);
    if (rc == LT_OK) rc = ctx->be->download(ctx, logits_host, lg, sizeof(float) * (size_t)T * V);
    if (emb) ctx->be->release(ctx, emb);
    if (lg) ctx->be->release(ctx, lg);
    return rc;
}

int main(void) {
    char err[LT_ERRLEN], dir[4096], png[4096];
    const lt_backend *be = &lt_backend_cpu;
#ifdef VISION_TEST_CUDA
    if (lt_cuda_device_count() <= 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    be = &lt_backend_cuda;
#endif
    snprintf(dir, sizeof dir, "%s/tests/fixtures/tf5", srcdir());
    snprintf(png, sizeof png, "%s/tests/vision/data/rgb.png", srcdir());
    lt_ctx cpu, dev;
    if (lt_ctx_init(&cpu, &lt_backend_cpu, 2) != LT_OK || lt_ctx_init(&dev, be, 2) != LT_OK) {
        printf("Bail out! cannot start the backends\n");
        return 1;
    }
    gemma3_model *host = NULL;
    ok(gemma3_load_dir(&host, dir, "fp32", NULL, err) == LT_OK, "load tf5 on the host");
    if (!host) {
        diag("%s", err);
        return tap_done();
    }
    ok(host->vision != NULL, "tf5's image tower is read");
    if (!host->vision) return tap_done();
    /* tf5's projector is zero (transformers' init): give it values, so the soft tokens carry
     * the tower's output (the host copy is the tower's own fp32 memory) */
    lt_tensor *pw = &host->vision->mm_proj.w;
    ok(pw->dtype == LT_F32, "the projector is held in fp32 on the host");
    unsigned s = 12345;
    for (int64_t i = 0; i < lt_tensor_numel(pw); i++) {
        s = s * 1664525u + 1013904223u;
        ((float *)pw->data)[i] = (float)((s >> 8) & 0xffff) / 65536.0f - 0.5f;
    }
    const gemma3_vision_config *vc = &host->cfg.vision;
    int S = vc->image_size, mm = vc->mm_tokens_per_image, H = host->cfg.hidden_size,
        V = host->cfg.vocab_size;
    float *px = malloc(sizeof(float) * 3 * (size_t)S * S);
    ok(img_load_pixels(px, png, S, err) == LT_OK, "the test image");
    int32_t ids[32];
    int T = 0;
    ids[T++] = 2;
    ids[T++] = 40;
    ids[T++] = vc->boi_token_id;
    for (int i = 0; i < mm; i++)
        ids[T++] = vc->image_token_id;
    ids[T++] = vc->eoi_token_id;
    ids[T++] = 41;
    ids[T++] = 42;
    float *f0 = malloc(sizeof(float) * (size_t)mm * H),
          *f1 = malloc(sizeof(float) * (size_t)mm * H);
    float *l0 = malloc(sizeof(float) * (size_t)T * V), *l1 = malloc(sizeof(float) * (size_t)T * V);
    lt_status rc = run(host, &cpu, px, ids, T, f0, l0);
    ok(rc == LT_OK, "the host model's forward with an image");
    if (rc != LT_OK) diag("%s", cpu.err);
    double fnorm = 0;
    for (int i = 0; i < mm * H; i++)
        fnorm += (double)f0[i] * f0[i];
    ok(fnorm > 1e-3, "the soft tokens are not zero");
    static const lt_dtype dts[2] = {LT_F32, LT_BF16};
    static const double tol[2] = {1e-5, 2e-2};
    for (int k = 0; k < 2; k++) {
        gemma3_model *dm = NULL;
        char what[160];
        snprintf(what, sizeof what, "copied to %s in %s", be->name, lt_dtype_user_name(dts[k]));
#ifdef VISION_TEST_CUDA
        /* the computing precision follows the copy, as %load dtype= sets it and test_model
         * does: under the card's bf16 policy the fp32 copy's soft tokens were 1.7e-3 off the
         * CPU's */
        lt_cuda_set_precision(&dev, dts[k]);
#endif
        rc = gemma3_to_device(&dm, host, &dev, dts[k], err);
        ok(rc == LT_OK && dm && dm->vision, what);
        if (rc != LT_OK || !dm || !dm->vision) {
            diag("%s %s", err, dm ? dm->vision_error : "");
            gemma3_model_release(dm, &dev);
            continue;
        }
        rc = run(dm, &dev, px, ids, T, f1, l1);
        ok(rc == LT_OK, "its forward with an image");
        if (rc != LT_OK) diag("%s", dev.err);
        double rf = rel(f1, f0, (size_t)mm * H), rl = rel(l1, l0, (size_t)T * V);
        diag("%s: soft tokens rel %.3g, logits rel %.3g", what, rf, rl);
        snprintf(what, sizeof what, "%s: soft tokens and logits within %g", be->name, tol[k]);
        ok(rc == LT_OK && rf < tol[k] && rl < tol[k], what);
        gemma3_model_release(dm, &dev);
    }
    free(px);
    free(f0);
    free(f1);
    free(l0);
    free(l1);
    gemma3_model_free(host);
    lt_ctx_shutdown(&dev);
    lt_ctx_shutdown(&cpu);
    return tap_done();
}
