/* test_device_fit.c — what a model takes in device memory, and the refusal of a load that
 * cannot fit, on the CPU (no GPU needed).
 *
 * gemma3_device_bytes is checked against numbers worked out by hand for the released 4B, 12B
 * and 27B shapes (config presets, no weights): every tensor rounded up to 256 bytes, norms
 * fp32, NF4 as packed codes + code[16] + double-quantized absmax (u8 per 64 values, fp32 per
 * 256 blocks, code2[256]); a pre-quantized checkpoint's estimate (gemma3_fit_arena) by its own
 * storage: NF4 with a float absmax a block, linears its skip list keeps in 16 bits (the same
 * against a real load: tests/quant's test_fit_estimate_*). Then against gemma3_to_device itself,
 * run on the CPU backend: the arena it allocates for tiny in fp32/fp16/bf16, NF4 and int8 is what
 * gemma3_device_bytes says, gemma3_device_need adds the staging buffer, and a tensor larger than
 * the stage is converted correctly a stage-full at a time. gemma3_fit_check's messages are compared
 * in full for each case (the quantized loads that fit, none fitting, already quantized, a
 * pre-quantized checkpoint, the model loaded now holding memory) and its boundary is exact.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/model/gemma3_device.h"
#include "cuda/model/model.h"
#include "tests/unit/tap.h"

#ifndef LATHE_SRCDIR
#define LATHE_SRCDIR "."
#endif

#define GIB 1073741824.0

static gemma3_config preset(const char *size) {
    gemma3_config c;
    char err[LT_ERRLEN];
    memset(&c, 0, sizeof c);
    if (gemma3_config_preset(&c, size, err) != LT_OK) diag("preset %s: %s", size, err);
    return c;
}

/* ---- gemma3_device_bytes against hand-worked numbers --------------------------------------
 * 12B: H 3840, I 15360, 48 layers, 16 heads x 256 (kv 8), V 262208, tied.
 *   embedding bf16: 262208 * 3840 * 2 = 2013757440; final norm 3840 * 4 = 15360.
 *   per layer, norms: 4 * 15360 + 2 * 1024 = 63488.
 *   per layer, bf16 linears: q 4096x3840 and o 3840x4096: 31457280 each; k, v 2048x3840:
 *   15728640 each; gate, up, down 15360x3840: 117964800 each -> 448266240.
 *   bf16 total: 2013757440 + 15360 + 48 * (63488 + 448266240) = 23533599744.
 *   NF4 q (15728640 values): codes 7864320, code 64 -> 256, qabsmax 245760, absmax2 960 * 4 =
 *   3840, code2 1024: 8115200; k, v (7864320): 3932160 + 256 + 122880 + 1920 -> 2048 + 1024 =
 *   4058368; gate (58982400): 29491200 + 256 + 921600 + 14400 -> 14592 + 1024 = 30428672.
 *   per layer 2 * 8115200 + 2 * 4058368 + 3 * 30428672 = 115633152;
 *   nf4 total 2013772800 + 48 * (63488 + 115633152) = 7567211520.
 *   dynamic: per layer 115633152 + (448266240 - 115633152) / 10 = 148896460 (integer),
 *   total 2013772800 + 48 * (63488 + 148896460) = 9163850304. */
static void test_preset_sizes(void) {
    struct {
        const char *size, *quant;
        lt_dtype dt;
        size_t want;
    } cases[] = {
        {"12b", "none", LT_BF16, 23533599744u},   {"12b", NULL, LT_F16, 23533599744u},
        {"12b", "none", LT_F32, 47064136704u},    {"12b", "nf4", LT_BF16, 7567211520u},
        {"12b", "dynamic", LT_BF16, 9163850304u}, {"12b", "int8", LT_F16, 12784155648u},
        {"4b", "none", LT_BF16, 7761262592u},     {"4b", "nf4", LT_F16, 2999530496u},
        {"4b", "dynamic", LT_BF16, 3475703692u},  {"27b", "none", LT_BF16, 54021401600u},
        {"27b", "nf4", LT_BF16, 16030690304u},    {"27b", "dynamic", LT_F16, 19829761384u},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        gemma3_config c = preset(cases[i].size);
        char name[96];
        snprintf(name, sizeof name, "device bytes: %s %s in %s", cases[i].size,
                 cases[i].quant ? cases[i].quant : "(NULL)", lt_dtype_user_name(cases[i].dt));
        is_int(gemma3_device_bytes(&c, cases[i].dt, cases[i].quant), cases[i].want, name);
    }
    gemma3_config c = preset("12b");
    c.tie_word_embeddings = 0;
    is_int(gemma3_device_bytes(&c, LT_BF16, "nf4"), 7567211520u + 2013757440u,
           "device bytes: an untied head adds a second 16-bit [V, H]");
    c = preset("12b");
    is_int(gemma3_device_bytes(&c, LT_BF16, "nf8"), 0, "device bytes: unknown quant -> 0");
    is_int(gemma3_device_bytes(&c, LT_I8, "none"), 0, "device bytes: not a float dtype -> 0");
}

/* ---- a pre-quantized checkpoint's own storage ----------------------------------------------
 * 27B, H 5376, I 21504, 62 layers, q/o 4096x5376, k/v 2048x5376. NF4 without double quant: a
 * float absmax a block of 64. q (22020096 values): codes 11010048, code 256, absmax 344064 * 4
 * = 1376256: 12386560 (nested: 11360768); k, v 6193408 (5681152); gate, up, down (115605504):
 * 57802752 + 256 + 7225344 = 65028352 (59638784). Per layer 232244992 (nested 213000192), so
 * the arena is 16030690304 + 62 * 19244800 = 17223867904: 1.19 GB more than double-quantized.
 * Kept in bf16 by a skip list: q of 1 layer (44040192 instead of 11360768) and down of 2
 * (231211008 instead of 59638784): 16030690304 + 32679424 + 2 * 171572224 = 16406514176. */
static void test_fixed_storage(void) {
    gemma3_config c = preset("27b");
    gemma3_fit f = {.name = "unsloth/gemma-3-27b-it-bnb-4bit",
                    .where = "GPU memory",
                    .dt = LT_BF16,
                    .quant = "nf4",
                    .fixed = 1,
                    .nested = 1};
    is_int(gemma3_fit_arena(&c, &f), 16030690304u,
           "fixed: a double-quantized NF4 checkpoint takes quant=nf4's arena");
    f.nested = 0;
    is_int(gemma3_fit_arena(&c, &f), 17223867904u,
           "fixed: NF4 without double quantization counts a float absmax a block");
    f.nested = 1;
    const int kept[7] = {1, 0, 0, 0, 0, 0, 2};
    f.kept16 = kept;
    is_int(gemma3_fit_arena(&c, &f), 16406514176u,
           "fixed: the linears the skip list keeps count in bf16");
    f.kept16 = NULL;
    f.nested = 0;
    f.quant = "int8";
    is_int(gemma3_fit_arena(&c, &f), gemma3_device_bytes(&c, LT_BF16, "int8"),
           "fixed: an int8 checkpoint takes quant=int8's arena");
    /* 16 GiB free: enough for the double-quantized estimate (14.99 GiB with the stage), not for
     * what the plain checkpoint takes (16.10 GiB) */
    f.quant = "nf4";
    char err[LT_ERRLEN];
    is_int(gemma3_fit_check(&c, &f, (size_t)16 << 30, err), LT_ERR_MEMORY,
           "fixed: a plain-NF4 27B is refused where its double-quantized size would pass");
    is_str(err,
           "unsloth/gemma-3-27b-it-bnb-4bit needs 16.1 GiB of GPU memory in nf4 (as the "
           "checkpoint stores it) but 16.0 GiB are free: load a smaller model, or device=cpu",
           "fixed: the message gives the checkpoint's own size");
}

/* ---- gemma3_device_bytes against gemma3_to_device on the CPU backend ------------------------ */

static void test_against_to_device(lt_ctx *ctx) {
    const char *dir = LATHE_SRCDIR "/models/tiny";
    struct {
        const char *quant;
        lt_dtype dt;
    } cases[] = {{"none", LT_F32}, {"none", LT_BF16}, {"none", LT_F16},
                 {"nf4", LT_BF16}, {"nf4", LT_F32},   {"int8", LT_F16}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char err[LT_ERRLEN], name[128];
        gemma3_model *hm = NULL, *dm = NULL;
        snprintf(name, sizeof name, "tiny %s in %s", cases[i].quant,
                 lt_dtype_user_name(cases[i].dt));
        if (gemma3_load_dir_quant(&hm, dir, "fp32", cases[i].quant, NULL, err) != LT_OK ||
            gemma3_to_device(&dm, hm, ctx, cases[i].dt, err) != LT_OK) {
            ok(0, name);
            diag("%s", err);
            gemma3_model_free(hm);
            continue;
        }
        char n1[256], n2[256];
        snprintf(n1, sizeof n1, "%s: gemma3_device_bytes = the arena gemma3_to_device allocated",
                 name);
        is_int(gemma3_device_bytes(&hm->cfg, cases[i].dt, cases[i].quant), dm->weight_bytes, n1);
        /* the stage: the largest tensor converted (the fp32 embedding), none without conversion */
        size_t stage = cases[i].dt == LT_F32
                           ? 0
                           : (size_t)hm->cfg.vocab_size * hm->cfg.hidden_size * sizeof(float);
        snprintf(n2, sizeof n2, "%s: gemma3_device_need = arena + stage", name);
        is_int(gemma3_device_need(hm, cases[i].dt), (size_t)dm->weight_bytes + stage, n2);
        gemma3_model_release(dm, ctx);
        gemma3_model_free(hm);
    }
}

/* A tensor larger than the stage goes over in several stage-fulls: a model of one fp32
 * embedding of 17M values (68 MB > GEMMA3_STAGE_MAX), copied to bf16, must equal lt_convert
 * of the whole tensor, the last partial stage-full included. */
static void test_chunked_conversion(lt_ctx *ctx) {
    int64_t V = 66411, H = 256; /* 17001216 values: a stage-full of 16777216, then 224000 */
    float *emb = malloc(sizeof(float) * (size_t)(V * H));
    float *nrm = calloc((size_t)H, sizeof(float));
    uint16_t *want = malloc(sizeof(uint16_t) * (size_t)(V * H));
    gemma3_layer dummy;
    if (!emb || !nrm || !want) {
        ok(0, "chunked conversion: host memory");
        free(emb), free(nrm), free(want);
        return;
    }
    uint64_t z = 88172645463325252ull;
    for (int64_t i = 0; i < V * H; i++) {
        z ^= z << 13, z ^= z >> 7, z ^= z << 17;
        emb[i] = (float)((double)(z >> 11) / 9007199254740992.0 - 0.5) * (1.0f + (float)(i % 7));
    }
    lt_convert(want, LT_BF16, emb, LT_F32, V * H);
    gemma3_model m;
    memset(&m, 0, sizeof m);
    memset(&dummy, 0, sizeof dummy);
    m.cfg.vocab_size = (int)V;
    m.cfg.hidden_size = (int)H;
    m.cfg.num_hidden_layers = 0;
    m.cfg.tie_word_embeddings = 1;
    m.layers = &dummy;
    m.dtype = LT_F32;
    m.embed_tokens.w = lt_tensor_2d(LT_F32, emb, V, H);
    m.norm = lt_tensor_1d(LT_F32, nrm, H);
    is_int(gemma3_device_need(&m, LT_BF16),
           ((size_t)(V * H) * 2 + 255) / 256 * 256 + 1024 + GEMMA3_STAGE_MAX,
           "chunked conversion: need = arena + a stage of GEMMA3_STAGE_MAX");
    gemma3_model *dm = NULL;
    char err[LT_ERRLEN];
    if (gemma3_to_device(&dm, &m, ctx, LT_BF16, err) != LT_OK) {
        ok(0, "chunked conversion: gemma3_to_device");
        diag("%s", err);
    } else {
        ok(dm->embed_tokens.w.dtype == LT_BF16 &&
               !memcmp(dm->embed_tokens.w.data, want, sizeof(uint16_t) * (size_t)(V * H)),
           "chunked conversion: every value converted, the last partial stage-full included");
        gemma3_model_release(dm, ctx);
    }
    free(emb), free(nrm), free(want);
}

/* ---- gemma3_fit_check's refusals --------------------------------------------------------------
 * Estimates add a stage of GEMMA3_STAGE_MAX (64 MiB) to the arenas above: 12B bf16
 * 23533599744 + 67108864 = 21.98 GiB, nf4 7.11 GiB, dynamic 8.60 GiB, int8 11.97 GiB;
 * 27B nf4 16030690304 + 67108864 = 14.99 GiB. */

static lt_status fit(const char *size, const char *name, lt_dtype dt, const char *quant, int fixed,
                     size_t need, size_t held, double free_gib, char *err) {
    gemma3_config c = preset(size);
    gemma3_fit f = {.name = name,
                    .where = "GPU memory",
                    .dt = dt,
                    .quant = quant,
                    .fixed = fixed,
                    .need = need,
                    .held = held};
    err[0] = 0;
    return gemma3_fit_check(&c, &f, (size_t)(free_gib * GIB), err);
}

static void test_fit_messages(void) {
    char err[LT_ERRLEN];
    lt_status rc;

    rc = fit("12b", "google/gemma-3-12b-it", LT_BF16, "none", 0, 0, 0, 14.7, err);
    is_int(rc, LT_ERR_MEMORY, "fit: 12B in bf16 does not fit 14.7 GiB");
    is_str(err,
           "google/gemma-3-12b-it needs 22.0 GiB of GPU memory in bf16 but 14.7 GiB are free: "
           "load it with quant=nf4 (7.1 GiB) or quant=dynamic (8.6 GiB), or device=cpu",
           "fit: both quantized loads named, with their sizes");

    rc = fit("12b", "google/gemma-3-12b-it", LT_F16, "none", 0, 0, 0, 8.0, err);
    is_str(err,
           "google/gemma-3-12b-it needs 22.0 GiB of GPU memory in fp16 but 8.0 GiB are free: "
           "load it with quant=nf4 (7.1 GiB), or device=cpu",
           "fit: only the quantized load that fits is named");

    rc = fit("27b", "google/gemma-3-27b-it", LT_F16, "none", 0, 0, 0, 14.7, err);
    is_int(rc, LT_ERR_MEMORY, "fit: 27B does not fit a T4");
    is_str(err,
           "google/gemma-3-27b-it needs 50.4 GiB of GPU memory in fp16 but 14.7 GiB are free; "
           "even quant=nf4 would need 15.0 GiB: load a smaller model, or device=cpu",
           "fit: no quantized load fits: a smaller model");

    rc = fit("27b", "google/gemma-3-27b-it", LT_F16, "nf4", 0, 16030690304u, 0, 14.7, err);
    is_str(err,
           "google/gemma-3-27b-it needs 14.9 GiB of GPU memory in nf4 but 14.7 GiB are free: "
           "load a smaller model, or device=cpu",
           "fit: already nf4 (exact need given): no quant= suggested");

    rc =
        fit("27b", "unsloth/gemma-3-27b-it-bnb-4bit", LT_F16, "nf4", 1, 17179869184u, 0, 14.7, err);
    is_str(err,
           "unsloth/gemma-3-27b-it-bnb-4bit needs 16.0 GiB of GPU memory in nf4 (as the "
           "checkpoint stores it) but 14.7 GiB are free: load a smaller model, or device=cpu",
           "fit: a pre-quantized checkpoint: quant= cannot change it");

    rc = fit("12b", "google/gemma-3-12b-it", LT_BF16, "int8", 0, 0, 0, 10.0, err);
    is_str(err,
           "google/gemma-3-12b-it needs 12.0 GiB of GPU memory in int8 but 10.0 GiB are free: "
           "load it with quant=nf4 (7.1 GiB) or quant=dynamic (8.6 GiB), or device=cpu",
           "fit: int8 too large: nf4 and dynamic named");

    rc = fit("12b", "google/gemma-3-12b-it", LT_BF16, "dynamic", 0, 0, 0, 8.0, err);
    is_str(err,
           "google/gemma-3-12b-it needs 8.6 GiB of GPU memory in dynamic 4-bit but 8.0 GiB are "
           "free: load it with quant=nf4 (7.1 GiB), or device=cpu",
           "fit: dynamic too large: nf4 named");

    rc = fit("12b", "google/gemma-3-12b-it", LT_BF16, "none", 0, 0, (size_t)(2 * GIB), 14.7, err);
    is_str(err,
           "google/gemma-3-12b-it needs 22.0 GiB of GPU memory in bf16 but 14.7 GiB are free "
           "(the model loaded now holds 2.0 GiB of it until another load succeeds): load it "
           "with quant=nf4 (7.1 GiB) or quant=dynamic (8.6 GiB), or device=cpu",
           "fit: the model loaded now is named as holding memory");

    /* the boundary is exact: need == free loads, one byte less does not */
    gemma3_config c = preset("4b");
    gemma3_fit f = {
        .name = "m", .where = "GPU memory", .dt = LT_BF16, .quant = "nf4", .need = 3000000000u};
    strcpy(err, "untouched");
    is_int(gemma3_fit_check(&c, &f, 3000000000u, err), LT_OK, "fit: need == free loads");
    is_str(err, "untouched", "fit: a load that fits writes no message");
    is_int(gemma3_fit_check(&c, &f, 2999999999u, err), LT_ERR_MEMORY,
           "fit: one byte short refuses");
    f.need = 0; /* the estimate: 4B nf4 arena + 64 MiB stage */
    is_int(gemma3_fit_check(&c, &f, 2999530496u + GEMMA3_STAGE_MAX, err), LT_OK,
           "fit: the estimate is the arena plus the stage (fits exactly)");
    is_int(gemma3_fit_check(&c, &f, 2999530496u + GEMMA3_STAGE_MAX - 1, err), LT_ERR_MEMORY,
           "fit: the estimate is the arena plus the stage (one byte short)");

    f.quant = "fp4";
    is_int(gemma3_fit_check(&c, &f, 1u << 30, err), LT_ERR_ARG, "fit: unknown quant refused");

    /* small sizes read in MiB / KiB */
    rc = fit("12b", "tiny", LT_BF16, "nf4", 0, 3u << 20, 0, 512.0 / 1048576.0, err);
    is_str(err,
           "tiny needs 3.0 MiB of GPU memory in nf4 but 512.0 KiB are free: load a smaller model, "
           "or device=cpu",
           "fit: small sizes in MiB and KiB");
    (void)rc;
}

int main(void) {
    test_preset_sizes();
    test_fixed_storage();
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &lt_backend_cpu, 1) != LT_OK) {
        ok(0, "cpu ctx");
        return tap_done();
    }
    test_against_to_device(&ctx);
    test_chunked_conversion(&ctx);
    lt_ctx_shutdown(&ctx);
    test_fit_messages();
    return tap_done();
}
