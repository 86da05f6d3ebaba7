/* bench_vision.c — the image tower's forward for one image on lathe's CUDA backend.
 *
 * usage: bench_vision [PRECISION ITERS [backward]]   (bf16 default on sm_80+, 20 iterations)
 * Gemma 3's tower at its real size (the SigLIP of google/gemma-3-4b-it's config.json: width
 * 1152, MLP 4304, 27 layers, 16 heads, 896 x 896 images in 14 x 14 patches = 4,096 patches)
 * and its projector into 4B's text width 2560 (256 soft tokens), with random weights written
 * to a temporary safetensors file and read back through siglip_load, as a checkpoint would
 * be. Times siglip_encode (pixels in host memory -> soft tokens in device memory, the upload
 * included) after 3 warm-up runs, and prints one JSON line: milliseconds an image, images/s,
 * peak device memory of lathe's allocator during the forward. The same work as
 * bench/hf_vision.py (transformers' SiglipVisionModel and Gemma3MultiModalProjector).
 * With `backward`: LoRA adapters (r = 16) on every linear of the tower and on the projector,
 * and siglip_backward of one image timed instead (the forward again from the pixels, then the
 * way back, the adapters' gradients accumulated: what %train does for each image when the
 * tower trains); the JSON line then also holds siglip_backward_bytes (the arena it takes) and
 * the device memory the call took beyond what was in use before it (arena + its ops'
 * temporaries), against which the trainer's memory plan for the tower can be read.
 * Owns nothing else; not a test.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cuda/backend/cuda/backend_cuda.h"
#include "cuda/formats/safetensors_write.h"
#include "cuda/model/siglip.h"

enum { D = 1152, I = 4304, LAYERS = 27, HEADS = 16, S = 896, P = 14, G = S / P, H = 2560 };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* n bf16 values uniform in [-scale, scale) (or all `fill` when scale is 0). */
static uint16_t *random_bf16(int64_t n, float scale, float fill, uint64_t *z) {
    uint16_t *p = malloc(sizeof(uint16_t) * (size_t)n);
    for (int64_t i = 0; p && i < n; i++) {
        *z = *z * 6364136223846793005ull + 1442695040888963407ull;
        float v = scale ? scale * (2.0f * (float)(*z >> 40) / 16777216.0f - 1.0f) : fill;
        uint32_t u;
        memcpy(&u, &v, 4);
        p[i] = (uint16_t)(u >> 16);
    }
    return p;
}

#define MAX_T (7 + 16 * LAYERS) /* 3 embeddings, 16 a layer, 2 post-layernorm, 2 projector */

/* The tower's tensors under transformers' names, random, written to dir/model.safetensors. */
static int write_tower(const char *path, char *err) {
    static char names[MAX_T][128];
    st_out t[MAX_T];
    int n = 0;
    uint64_t z = 7;
#define ADD(NAME, ND, S0, S1, S2, S3, SCALE, FILL)                                                 \
    do {                                                                                           \
        int64_t sh[4] = {S0, S1, S2, S3}, cnt = 1;                                                 \
        for (int d_ = 0; d_ < ND; d_++)                                                            \
            cnt *= sh[d_];                                                                         \
        if (n == MAX_T) {                                                                          \
            lt_fail(err, LT_ERR_ARG, "more than %d tensors", MAX_T);                               \
            return -1;                                                                             \
        }                                                                                          \
        snprintf(names[n], sizeof names[n], "%s", NAME);                                           \
        t[n] =                                                                                     \
            (st_out){names[n], LT_BF16, ND, {S0, S1, S2, S3}, random_bf16(cnt, SCALE, FILL, &z)};  \
        n++;                                                                                       \
    } while (0)
    const char *v = "vision_tower.vision_model.";
    char nm[128];
    snprintf(nm, sizeof nm, "%sembeddings.patch_embedding.weight", v);
    ADD(nm, 4, D, 3, P, P, 0.02f, 0);
    snprintf(nm, sizeof nm, "%sembeddings.patch_embedding.bias", v);
    ADD(nm, 1, D, 0, 0, 0, 0.02f, 0);
    snprintf(nm, sizeof nm, "%sembeddings.position_embedding.weight", v);
    ADD(nm, 2, G * G, D, 0, 0, 0.02f, 0);
    for (int l = 0; l < LAYERS; l++) {
        static const char *const vec[] = {
            "layer_norm1.weight",    "layer_norm1.bias",      "self_attn.q_proj.bias",
            "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.out_proj.bias",
            "layer_norm2.weight",    "layer_norm2.bias",      "mlp.fc2.bias"};
        for (int k = 0; k < 9; k++) {
            snprintf(nm, sizeof nm, "%sencoder.layers.%d.%s", v, l, vec[k]);
            int norm_w = strstr(vec[k], "norm") && strstr(vec[k], "weight");
            ADD(nm, 1, D, 0, 0, 0, norm_w ? 0.0f : 0.02f, 1.0f);
        }
        static const char *const sq[] = {"q_proj", "k_proj", "v_proj", "out_proj"};
        for (int k = 0; k < 4; k++) {
            snprintf(nm, sizeof nm, "%sencoder.layers.%d.self_attn.%s.weight", v, l, sq[k]);
            ADD(nm, 2, D, D, 0, 0, 0.03f, 0);
        }
        snprintf(nm, sizeof nm, "%sencoder.layers.%d.mlp.fc1.weight", v, l);
        ADD(nm, 2, I, D, 0, 0, 0.03f, 0);
        snprintf(nm, sizeof nm, "%sencoder.layers.%d.mlp.fc1.bias", v, l);
        ADD(nm, 1, I, 0, 0, 0, 0.02f, 0);
        snprintf(nm, sizeof nm, "%sencoder.layers.%d.mlp.fc2.weight", v, l);
        ADD(nm, 2, D, I, 0, 0, 0.015f, 0);
    }
    snprintf(nm, sizeof nm, "%spost_layernorm.weight", v);
    ADD(nm, 1, D, 0, 0, 0, 0.0f, 1.0f);
    snprintf(nm, sizeof nm, "%spost_layernorm.bias", v);
    ADD(nm, 1, D, 0, 0, 0, 0.02f, 0);
    ADD("multi_modal_projector.mm_soft_emb_norm.weight", 1, D, 0, 0, 0, 0.02f, 0);
    ADD("multi_modal_projector.mm_input_projection_weight", 2, D, H, 0, 0, 0.03f, 0);
#undef ADD
    int bad = 0;
    for (int i = 0; i < n; i++)
        bad |= !t[i].data;
    lt_status rc = bad ? lt_fail(err, LT_ERR_MEMORY, "out of memory")
                       : st_write(path, t, n, ST_METADATA_PT, err);
    for (int i = 0; i < n; i++)
        free((void *)t[i].data);
    return rc == LT_OK ? 0 : -1;
}

/* Adapters of rank r on every linear of the tower and the projector, A and B small and random
 * (so that every gradient flows), their gradients zero; lora[] holds them (6 * LAYERS + 1). */
static int attach_adapters(lt_ctx *ctx, siglip_tower *t, lt_lora *lora, int r) {
    uint64_t z = 5;
    int n = 0;
    for (int l = 0; l <= LAYERS; l++) {
        siglip_layer *L = l < LAYERS ? &t->layers[l] : NULL;
        lt_weight *ws[6] = {NULL};
        int nw = 1;
        if (L) {
            lt_weight *lw[6] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
            memcpy(ws, lw, sizeof lw);
            nw = 6;
        } else {
            ws[0] = &t->mm_proj;
        }
        for (int k = 0; k < nw; k++) {
            int64_t out = ws[k]->w.shape[0], in = ws[k]->w.shape[1];
            lt_lora *lo = &lora[n++];
            size_t na = (size_t)(r * in), nb = (size_t)(out * r);
            float *h = malloc(sizeof(float) * (na > nb ? na : nb));
            void *a = ctx->be->alloc(ctx, na * 4), *b = ctx->be->alloc(ctx, nb * 4);
            void *ga = ctx->be->alloc(ctx, na * 4), *gb = ctx->be->alloc(ctx, nb * 4);
            if (!h || !a || !b || !ga || !gb) return -1;
            for (int part = 0; part < 2; part++) {
                size_t cnt = part ? nb : na;
                for (size_t i = 0; i < cnt; i++) {
                    z = z * 6364136223846793005ull + 1442695040888963407ull;
                    h[i] = 0.01f * (2.0f * (float)(z >> 40) / 16777216.0f - 1.0f);
                }
                if (ctx->be->upload(ctx, part ? b : a, h, cnt * 4) != LT_OK) return -1;
            }
            free(h);
            *lo = (lt_lora){.a = lt_tensor_2d(LT_F32, a, r, in),
                            .b = lt_tensor_2d(LT_F32, b, out, r),
                            .grad_a = lt_tensor_2d(LT_F32, ga, r, in),
                            .grad_b = lt_tensor_2d(LT_F32, gb, out, r),
                            .scale = 2.0f,
                            .enabled = 1};
            ws[k]->lora = lo;
        }
    }
    return n;
}

int main(int argc, char **argv) {
    const char *prec = argc > 1 ? argv[1] : NULL;
    int iters = argc > 2 ? atoi(argv[2]) : 20;
    int backward = argc > 3 && strcmp(argv[3], "backward") == 0;
    char err[LT_ERRLEN], dir[] = "/tmp/lathe-bench-vision-XXXXXX", path[256];
    if (!mkdtemp(dir)) {
        perror("bench_vision: mkdtemp");
        return 1;
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (write_tower(path, err) != 0) {
        fprintf(stderr, "bench_vision: %s\n", err);
        return 1;
    }
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &lt_backend_cuda, 0) != LT_OK) {
        fprintf(stderr, "bench_vision: %s\n", ctx.err);
        return 1;
    }
    lt_dtype dt = lt_cuda_policy_dtype(&ctx);
    if (prec && lt_cuda_parse_precision(&ctx, prec, &dt) != 0) {
        fprintf(stderr, "bench_vision: precision '%s' (accepted: bf16, fp16, fp32)\n", prec);
        return 2;
    }
    lt_cuda_set_precision(&ctx, dt);
    gemma3_config c;
    memset(&c, 0, sizeof c);
    c.hidden_size = H;
    gemma3_vision_config *vc = &c.vision;
    *vc = (gemma3_vision_config){.present = 1,
                                 .hidden_size = D,
                                 .intermediate_size = I,
                                 .num_hidden_layers = LAYERS,
                                 .num_attention_heads = HEADS,
                                 .num_channels = 3,
                                 .image_size = S,
                                 .patch_size = P,
                                 .layer_norm_eps = 1e-6,
                                 .mm_tokens_per_image = 256,
                                 .image_token_id = 262144,
                                 .boi_token_id = 255999,
                                 .eoi_token_id = 256000};
    snprintf(vc->hidden_act, sizeof vc->hidden_act, "gelu_pytorch_tanh");
    st_set st;
    siglip_tower *host = NULL, *tower = NULL;
    if (st_open(&st, dir, err) != LT_OK || siglip_load(&host, &st, &c, err) != LT_OK ||
        siglip_to_device(&tower, host, &ctx, dt, err) != LT_OK) {
        fprintf(stderr, "bench_vision: %s\n", err);
        return 1;
    }
    long long n_params = (long long)host->n_params;
    siglip_free(host);
    st_close(&st);
    unlink(path);
    rmdir(dir);
    float *pixels = malloc(sizeof(float) * 3 * S * S);
    uint64_t z = 11;
    for (int i = 0; i < 3 * S * S; i++) {
        z = z * 6364136223846793005ull + 1442695040888963407ull;
        pixels[i] = 2.0f * (float)(z >> 40) / 16777216.0f - 1.0f;
    }
    float *out = ctx.be->alloc(&ctx, sizeof(float) * 256 * H);
    if (!pixels || !out) {
        fprintf(stderr, "bench_vision: out of memory\n");
        return 1;
    }
    if (backward) {
        static lt_lora lora[6 * LAYERS + 1];
        float *dh = malloc(sizeof(float) * 256 * H);
        for (int i = 0; dh && i < 256 * H; i++) {
            z = z * 6364136223846793005ull + 1442695040888963407ull;
            dh[i] = 1e-3f * (2.0f * (float)(z >> 40) / 16777216.0f - 1.0f);
        }
        if (!dh || attach_adapters(&ctx, tower, lora, 16) < 0 ||
            ctx.be->upload(&ctx, out, dh, sizeof(float) * 256 * H) != LT_OK) {
            fprintf(stderr, "bench_vision: adapters: %s\n", ctx.err);
            return 1;
        }
        free(dh);
        double b0 = 0;
        size_t before = 0;
        for (int i = 0; i < 3 + iters; i++) {
            if (i == 3) {
                ctx.be->sync(&ctx);
                lt_cuda_mem m0;
                lt_cuda_memory(&ctx, &m0);
                before = m0.in_use;
                lt_cuda_reset_peak(&ctx);
                b0 = now_s();
            }
            if (siglip_backward(tower, &ctx, pixels, out, 0) != LT_OK) {
                fprintf(stderr, "bench_vision: %s\n", ctx.err);
                return 1;
            }
        }
        ctx.be->sync(&ctx);
        double bms = (now_s() - b0) * 1e3 / iters;
        lt_cuda_mem bm;
        lt_cuda_memory(&ctx, &bm);
        printf("{\"engine\": \"lathe\", \"bench\": \"vision_tower_backward\", \"precision\": "
               "\"%s\", \"image\": %d, \"patches\": %d, \"layers\": %d, \"adapters\": %d, "
               "\"ms_per_image\": %.2f, \"backward_bytes_mib\": %.1f, \"took_mib\": %.1f, "
               "\"peak_gib\": %.3f, \"peak_op\": \"%s\"}\n",
               dt == LT_BF16  ? "bf16"
               : dt == LT_F16 ? "fp16"
                              : "fp32",
               S, G * G, LAYERS, 6 * LAYERS + 1, bms, siglip_backward_bytes(tower, 0) / 1048576.0,
               (bm.peak - before) / 1048576.0, bm.peak / 1073741824.0,
               bm.peak_op ? bm.peak_op : "");
        free(pixels);
        siglip_free(tower); /* its arena and the adapters go with the ctx */
        lt_ctx_shutdown(&ctx);
        return 0;
    }
    double t0 = 0;
    for (int i = 0; i < 3 + iters; i++) {
        if (i == 3) {
            ctx.be->sync(&ctx);
            lt_cuda_reset_peak(&ctx);
            t0 = now_s();
        }
        if (siglip_encode(tower, &ctx, pixels, out) != LT_OK) {
            fprintf(stderr, "bench_vision: %s\n", ctx.err);
            return 1;
        }
    }
    ctx.be->sync(&ctx);
    double ms = (now_s() - t0) * 1e3 / iters;
    lt_cuda_mem mem;
    lt_cuda_memory(&ctx, &mem);
    printf("{\"engine\": \"lathe\", \"bench\": \"vision_tower\", \"precision\": \"%s\", "
           "\"image\": %d, \"patches\": %d, \"layers\": %d, \"ms_per_image\": %.2f, "
           "\"images_s\": %.1f, \"forward_peak_gib\": %.3f, \"tower_params\": %lld}\n",
           dt == LT_BF16  ? "bf16"
           : dt == LT_F16 ? "fp16"
                          : "fp32",
           S, G * G, LAYERS, ms, 1e3 / ms, mem.peak / 1073741824.0, n_params);
    ctx.be->release(&ctx, out);
    siglip_release(tower, &ctx);
    free(pixels);
    lt_ctx_shutdown(&ctx);
    return 0;
}
