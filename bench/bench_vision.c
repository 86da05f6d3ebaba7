/* bench_vision.c — the image tower's forward for one image on lathe's CUDA backend.
 *
 * usage: bench_vision [PRECISION ITERS]   (bf16 default on sm_80+, 20 iterations)
 * Gemma 3's tower at its real size (the SigLIP of google/gemma-3-4b-it's config.json: width
 * 1152, MLP 4304, 27 layers, 16 heads, 896 x 896 images in 14 x 14 patches = 4,096 patches)
 * and its projector into 4B's text width 2560 (256 soft tokens), with random weights written
 * to a temporary safetensors file and read back through siglip_load, as a checkpoint would
 * be. Times siglip_encode (pixels in host memory -> soft tokens in device memory, the upload
 * included) after 3 warm-up runs, and prints one JSON line: milliseconds an image, images/s,
 * peak device memory of lathe's allocator during the forward. The same work as
 * bench/hf_vision.py (transformers' SiglipVisionModel and Gemma3MultiModalProjector).
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

int main(int argc, char **argv) {
    const char *prec = argc > 1 ? argv[1] : NULL;
    int iters = argc > 2 ? atoi(argv[2]) : 20;
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
