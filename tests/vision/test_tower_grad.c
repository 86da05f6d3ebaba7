/* test_tower_grad.c — LoRA on the image tower and the projector (cuda/model/siglip_backward.c,
 * cuda/train/lora.c, cuda/train/peft_adapter.c) on a tiny random multimodal model built in
 * memory: a 2-layer Gemma 3 text model (hidden 16) and a 2-layer SigLIP tower (width 8, MLP 12,
 * 2 heads, 16 x 16 pixels in patches of 4: a 4 x 4 grid pooled 2 x 2 into 4 soft tokens).
 *
 * Checks: the CPU ops layernorm_backward, gelu_backward and avg_pool_backward against central
 * differences of their forward ops; the tower's LoRA A/B gradients (q, k, v, out_proj, fc1, fc2
 * of both layers, the projector) from siglip_backward against central differences of a linear
 * function of siglip_encode's soft tokens, and, through gemma3_train_batch's image-row
 * gradients, of the language model's loss with the image's soft tokens in its rows (the path
 * %train takes); a layer below every adapter gets nothing and costs no kept input; the
 * projector's adapter is PEFT's (its B is PEFT's lora_A transposed); LoRA dropout on the tower's
 * linears (the backward's masks the forward's); bad inputs (tower names on a text-only model, an
 * unknown tower name, a backend without the tower's backward, dropout on the projector)
 * are refused with the accepted form, nothing attached; PEFT save -> load round trips, under
 * transformers 5's module names (base_model.model.model.vision_tower.encoder.layers.N...,
 * multi_modal_projector target_parameters) with adapter_config.json's target_modules keeping
 * each name to its part; a PEFT list of names with tower tensors in the file loads them onto
 * the tower (PEFT's suffix rule). TAP.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda/backend/cpu/grad.h"
#ifdef HAVE_CUDA
#include "cuda/backend/cuda/backend_cuda.h"
#endif
#include "cuda/formats/safetensors.h"
#include "cuda/formats/safetensors_write.h"
#include "cuda/model/siglip.h"
#include "cuda/train/train.h"
#include "tests/unit/tap.h"
#include "tests/unit/test_micro_model.h"

static lt_ctx ctx;
static uint64_t rng = 7;

static float frand(void) {
    return test_frand(&rng);
}

static lt_tensor rand_t(int64_t a, int64_t b, float amp, float base) {
    int64_t n = a * (b ? b : 1);
    float *p = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        p[i] = base + amp * frand();
    return b ? lt_tensor_2d(LT_F32, p, a, b) : lt_tensor_1d(LT_F32, p, a);
}

/* ---- the model -------------------------------------------------------------------------- */

#define TH MICRO_H /* text hidden (the shared micro model's) */
#define TV 40      /* vocab; the image token is 40, past the embedding */
#define VD 8       /* tower width */
#define VI 12
#define VS 16 /* image side */
#define VP 4  /* patch */
#define VL 2  /* tower layers */
#define MM 4  /* soft tokens */

/* Every tensor of the tower is one host block (tower_alloc's list), freed by siglip_free. */
static lt_tensor keep(siglip_tower *t, lt_tensor x) {
    t->blocks = realloc(t->blocks, sizeof(void *) * (size_t)(t->n_blocks + 1));
    t->blocks[t->n_blocks++] = x.data;
    return x;
}

static siglip_tower *tower(void) {
    siglip_tower *t = calloc(1, sizeof *t);
    gemma3_vision_config *c = &t->cfg;
    c->present = 1;
    c->hidden_size = VD;
    c->intermediate_size = VI;
    c->num_hidden_layers = VL;
    c->num_attention_heads = 2;
    c->num_channels = 3;
    c->image_size = VS;
    c->patch_size = VP;
    c->layer_norm_eps = 1e-6;
    c->mm_tokens_per_image = MM;
    c->image_token_id = TV;
    t->text_hidden = TH;
    int64_t P = (VS / VP) * (VS / VP), K = 3 * VP * VP;
    t->patch.w = keep(t, rand_t(VD, K, 0.3f, 0));
    t->patch_b = keep(t, rand_t(VD, 0, 0.2f, 0));
    t->pos = keep(t, rand_t(P, VD, 0.3f, 0));
    t->layers = calloc(VL, sizeof(siglip_layer));
    for (int l = 0; l < VL; l++) {
        siglip_layer *L = &t->layers[l];
        L->ln1_w = keep(t, rand_t(VD, 0, 0.3f, 1));
        L->ln1_b = keep(t, rand_t(VD, 0, 0.2f, 0));
        L->ln2_w = keep(t, rand_t(VD, 0, 0.3f, 1));
        L->ln2_b = keep(t, rand_t(VD, 0, 0.2f, 0));
        lt_weight *w[6] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
        lt_tensor *b[6] = {&L->q_b, &L->k_b, &L->v_b, &L->o_b, &L->fc1_b, &L->fc2_b};
        for (int i = 0; i < 6; i++) {
            int64_t out = i == 4 ? VI : VD, in = i == 5 ? VI : VD;
            w[i]->w = keep(t, rand_t(out, in, 0.5f, 0));
            *b[i] = keep(t, rand_t(out, 0, 0.2f, 0));
        }
    }
    t->post_w = keep(t, rand_t(VD, 0, 0.3f, 1));
    t->post_b = keep(t, rand_t(VD, 0, 0.2f, 0));
    t->mm_norm = keep(t, rand_t(VD, 0, 0.3f, 0));
    t->mm_proj.w = keep(t, rand_t(TH, VD, 0.5f, 0));
    return t;
}

static void model_free(gemma3_model *m) {
    siglip_free(m->vision);
    test_micro_gemma3_free(m);
}

static gemma3_model *M;
static float pixels[3 * VS * VS];
static float coef[MM * TH]; /* the linear test function of the soft tokens */
static uint64_t DSEED;      /* LoRA dropout's seed (0: none) */

/* ---- the ops against central differences ------------------------------------------------ */

static double fd_rel(const double *num, const float *ana, int n) {
    double e = 0, mx = 1e-9;
    for (int i = 0; i < n; i++) {
        e = fmax(e, fabs(num[i] - ana[i]));
        mx = fmax(mx, fabs(ana[i]));
    }
    return e / mx;
}

static void test_ops(void) {
    const lt_tower_grad_ops *g = lt_backend_tower_grad(&lt_backend_cpu);
    ok(g != NULL && lt_backend_missing_tower_training_op(&lt_backend_cpu) == NULL,
       "the CPU backend has the tower's backward ops");
#ifdef HAVE_CUDA
    /* asking needs no GPU: the table is the build's (tests/gpu/test_ops.c checks its results) */
    const lt_tower_grad_ops *cg = lt_backend_tower_grad(&lt_backend_cuda);
    ok(cg && cg != g && cg->layernorm_backward && cg->gelu_backward && cg->avg_pool_backward &&
           lt_backend_missing_tower_training_op(&lt_backend_cuda) == NULL,
       "the CUDA backend has its own tower backward ops: training the tower is not refused there");
#endif
    if (!g) return;
    enum { N = 3, D = 6 };
    float x[N * D], w[D], b[D], dy[N * D], y[N * D], dx[N * D], dw[D] = {0}, db[D] = {0};
    for (int i = 0; i < N * D; i++)
        x[i] = 2 * frand(), dy[i] = frand();
    for (int i = 0; i < D; i++)
        w[i] = 1 + 0.5f * frand(), b[i] = frand();
    lt_tensor X = lt_tensor_2d(LT_F32, x, N, D), W = lt_tensor_1d(LT_F32, w, D),
              Bb = lt_tensor_1d(LT_F32, b, D), Y = lt_tensor_2d(LT_F32, y, N, D);
    g->layernorm_backward(&ctx, lt_tensor_2d(LT_F32, dx, N, D), lt_tensor_1d(LT_F32, dw, D),
                          lt_tensor_1d(LT_F32, db, D), lt_tensor_2d(LT_F32, dy, N, D), X, W, 1e-6f);
    /* f = Σ dy ⊙ layernorm(x): its gradient is what the op computes */
    double num[N * D], numw[D], numb[D];
    float *params[3] = {x, w, b};
    double *nums[3] = {num, numw, numb};
    int sizes[3] = {N * D, D, D};
    for (int pi = 0; pi < 3; pi++)
        for (int i = 0; i < sizes[pi]; i++) {
            float save = params[pi][i];
            double f[2];
            for (int s = 0; s < 2; s++) {
                params[pi][i] = save + (s ? -1e-3f : 1e-3f);
                cpu_layernorm(&ctx, Y, X, W, Bb, 1e-6f);
                f[s] = 0;
                for (int j = 0; j < N * D; j++)
                    f[s] += (double)dy[j] * y[j];
            }
            params[pi][i] = save;
            nums[pi][i] = (f[0] - f[1]) / 2e-3;
        }
    ok(fd_rel(num, dx, N * D) < 2e-3, "layernorm_backward: dx matches finite differences");
    ok(fd_rel(numw, dw, D) < 2e-3 && fd_rel(numb, db, D) < 2e-3,
       "layernorm_backward: dw, db accumulate the finite differences");

    float gx[N * D];
    g->gelu_backward(&ctx, lt_tensor_2d(LT_F32, gx, N, D), lt_tensor_2d(LT_F32, dy, N, D), X);
    for (int i = 0; i < N * D; i++) {
        float save = x[i], yp, ym;
        x[i] = save + 1e-3f;
        cpu_gelu(&ctx, lt_tensor_1d(LT_F32, &yp, 1), lt_tensor_1d(LT_F32, x + i, 1));
        x[i] = save - 1e-3f;
        cpu_gelu(&ctx, lt_tensor_1d(LT_F32, &ym, 1), lt_tensor_1d(LT_F32, x + i, 1));
        x[i] = save;
        num[i] = dy[i] * ((double)yp - ym) / 2e-3;
    }
    ok(fd_rel(num, gx, N * D) < 2e-3, "gelu_backward matches finite differences");

    enum { G = 4, K = 2, O = 2, C = 3 };
    float px[G * G * C], pdy[O * O * C], pdx[G * G * C], py[O * O * C];
    for (int i = 0; i < G * G * C; i++)
        px[i] = frand();
    for (int i = 0; i < O * O * C; i++)
        pdy[i] = frand();
    g->avg_pool_backward(&ctx, lt_tensor_2d(LT_F32, pdx, G * G, C),
                         lt_tensor_2d(LT_F32, pdy, O * O, C), K);
    double pn[G * G * C];
    for (int i = 0; i < G * G * C; i++) {
        float save = px[i];
        double f[2];
        for (int s = 0; s < 2; s++) {
            px[i] = save + (s ? -0.1f : 0.1f);
            cpu_avg_pool(&ctx, lt_tensor_2d(LT_F32, py, O * O, C),
                         lt_tensor_2d(LT_F32, px, G * G, C), K);
            f[s] = 0;
            for (int j = 0; j < O * O * C; j++)
                f[s] += (double)pdy[j] * py[j];
        }
        px[i] = save;
        pn[i] = (f[0] - f[1]) / 0.2;
    }
    ok(fd_rel(pn, pdx, G * G * C) < 1e-4, "avg_pool_backward matches finite differences");
}

/* ---- the tower's adapters ---------------------------------------------------------------- */

static lt_adapters *attach(const char *targets, char *err) {
    lora_opts o = {.r = 2, .alpha = 4, .seed = 5, .targets = targets};
    lt_adapters *a = NULL;
    if (lora_attach(&a, M, &ctx, &o, err) != LT_OK) return NULL;
    return a;
}

/* B (and the projector's A, its zero side) random: every gradient is then nonzero */
static void randomise(lt_adapters *a) {
    for (int i = 0; i < a->n_slots; i++) {
        lt_tensor *ts[2] = {&a->slots[i].lora.a, &a->slots[i].lora.b};
        for (int k = 0; k < 2; k++)
            for (int64_t j = 0; j < lt_tensor_numel(ts[k]); j++)
                ((float *)ts[k]->data)[j] = 0.4f * frand();
    }
}

/* Σ coef ⊙ siglip_encode(pixels) */
static double tower_f(void) {
    float out[MM * TH];
    if (siglip_encode_train(M->vision, &ctx, pixels, out, DSEED) != LT_OK)
        diag("encode: %s", ctx.err);
    double f = 0;
    for (int i = 0; i < MM * TH; i++)
        f += (double)coef[i] * out[i];
    return f;
}

/* a micro-batch holding one image block (4 tokens of id 40) and a text sample */
static int32_t ids[14] = {2, 5, 40, 40, 40, 40, 11, 3, 30, 7, 2, 8, 21, 39};
static int32_t tgt[14] = {5, -100, -100, -100, -100, 11, 3, 30, 7, -100, 8, 21, 39, -100};
static int seg[2] = {10, 4};

/* the language model's loss with this image's soft tokens in its rows; with grads, the tower's
 * backward from the rows' gradients too (what %train does with the tower trained) */
static double lm_f(lt_adapters *a, int grads) {
    float rows[MM * TH], drows[MM * TH];
    siglip_encode(M->vision, &ctx, pixels, rows);
    train_batch b = {.ids = ids,
                     .targets = tgt,
                     .seg_len = seg,
                     .n_seg = 2,
                     .N = 14,
                     .n_labels = 8,
                     .image_embeds = rows,
                     .n_image_tokens = MM,
                     .image_grads = grads ? drows : NULL};
    double L = 0;
    lt_status st = gemma3_train_batch(M, &ctx, lora_trainable(a), &b, 1.0f, grads, 0, &L);
    if (st != LT_OK) diag("train_batch: %s", ctx.err);
    if (grads && siglip_backward(M->vision, &ctx, pixels, drows, 0) != LT_OK)
        diag("siglip_backward: %s", ctx.err);
    return L;
}

static double (*F)(void);
static lt_adapters *CUR;
static double f_lm(void) {
    return lm_f(CUR, 0);
}

static void fd_slot(const lora_slot *s, const char *what) {
    const lt_tensor *ps[2] = {&s->lora.a, &s->lora.b}, *gs[2] = {&s->lora.grad_a, &s->lora.grad_b};
    for (int k = 0; k < 2; k++) {
        float *p = ps[k]->data;
        const float *g = gs[k]->data;
        int64_t n = lt_tensor_numel(ps[k]), stride = n / 6 > 0 ? n / 6 : 1;
        double maxerr = 0, maxg = 1e-9;
        for (int64_t i = 0; i < n; i += stride) {
            float save = p[i], h = 1e-2f;
            p[i] = save + h;
            double fp = F();
            p[i] = save - h;
            double fm = F();
            p[i] = save;
            maxerr = fmax(maxerr, fabs((fp - fm) / (2.0 * h) - g[i]));
            maxg = fmax(maxg, fabs(g[i]));
        }
        char label[300];
        snprintf(label, sizeof label, "%s: %s lora_%c matches finite differences", what, s->module,
                 k ? 'B' : 'A');
        if (!ok(maxerr / maxg < 2e-2 && maxg > 1e-6, label))
            diag("max error %.3g, max |grad| %.3g", maxerr, maxg);
    }
}

static void test_tower_grads(void) {
    char err[LT_ERRLEN] = "";
    for (int i = 0; i < 3 * VS * VS; i++)
        pixels[i] = frand();
    for (int i = 0; i < MM * TH; i++)
        coef[i] = frand();
    lt_adapters *a = attach("vision,projector", err);
    ok(a && a->n_slots == VL * 6 + 1 && a->n_tower_slots == VL * 6 + 1,
       "targets=vision,projector: six linears of each tower layer and the projector, no text");
    if (!a) {
        diag("%s", err);
        return;
    }
    ok(siglip_has_adapters(M->vision) && siglip_first_trained_layer(M->vision) == 0,
       "the tower reports its adapters from layer 0");
    const lora_slot *pj = &a->slots[a->n_slots - 1];
    int zero_a = 1, some_b = 0;
    for (int64_t j = 0; j < lt_tensor_numel(&pj->lora.a); j++)
        zero_a &= ((float *)pj->lora.a.data)[j] == 0.0f;
    for (int64_t j = 0; j < lt_tensor_numel(&pj->lora.b); j++)
        some_b |= ((float *)pj->lora.b.data)[j] != 0.0f;
    ok(pj->part == LORA_PROJECTOR && zero_a && some_b && pj->lora.a.shape[1] == VD &&
           pj->lora.b.shape[0] == TH,
       "the projector's adapter starts as PEFT's (lora_B zero: our A [r, D]; lora_A random: our "
       "B [H, r])");
    double f0 = tower_f();
    randomise(a);
    ok(fabs(tower_f() - f0) > 1e-6, "the tower's adapters change its soft tokens");
    /* the isolated tower: dout = coef */
    lora_zero_grads(a);
    float *dout = coef;
    ok(siglip_backward(M->vision, &ctx, pixels, dout, 0) == LT_OK, "siglip_backward runs");
    F = tower_f;
    for (int i = 0; i < a->n_slots; i++)
        fd_slot(&a->slots[i], "tower");
    /* through the language model: the rows' gradients from gemma3_train_batch */
    lora_zero_grads(a);
    CUR = a;
    lm_f(a, 1);
    F = f_lm;
    for (int i = 0; i < a->n_slots; i += 5) /* q of 0, v of 1, projector */
        fd_slot(&a->slots[i], "LM loss");
    lora_free(a);
    ok(M->vision->layers[0].q.lora == NULL && M->vision->mm_proj.lora == NULL,
       "lora_free unhooks the tower's weights");

    /* adapters on the upper layer only: nothing below it; text and tower together */
    a = attach("q,v,vision.fc2,vision.out", err);
    ok(a && a->n_slots == 4 + 2 * VL && a->n_tower_slots == 2 * VL,
       "targets=q,v,vision.fc2,vision.out: text q, v and the tower's fc2 and out_proj");
    lora_free(a);
    a = attach("model\\.vision_tower\\.encoder\\.layers\\.1\\.mlp\\.fc1", err);
    ok(a && a->n_slots == 1 && siglip_first_trained_layer(M->vision) == 1,
       "a regex over transformers 5's tower path adapts that linear (first trained layer 1)");
    if (a) {
        size_t kept1 = siglip_backward_bytes(M->vision, 0);
        randomise(a);
        lora_zero_grads(a);
        siglip_backward(M->vision, &ctx, pixels, coef, 0);
        F = tower_f;
        fd_slot(&a->slots[0], "upper layer only");
        lora_free(a);
        a = attach("vision.fc1", err);
        ok(a && siglip_backward_bytes(M->vision, 0) > kept1,
           "the backward keeps fewer layer inputs when only an upper layer trains");
        lora_free(a);
    }
    /* LoRA dropout on the tower's linears: the backward sees the forward's masks */
    lora_opts od = {.r = 2, .alpha = 4, .seed = 5, .dropout = 0.3f, .targets = "vision"};
    ok(lora_attach(&a, M, &ctx, &od, err) == LT_OK,
       "dropout=0.3 with the tower's linears attaches");
    if (a) {
        randomise(a);
        DSEED = 0;
        double plain = tower_f();
        DSEED = 77;
        ok(fabs(tower_f() - plain) > 1e-6, "... a dropout seed changes the soft tokens (masks)");
        lora_zero_grads(a);
        siglip_backward(M->vision, &ctx, pixels, coef, DSEED);
        F = tower_f;
        for (int i = 0; i < a->n_slots; i += 4) /* q of 0, fc1 of 0, v of 1, fc2 of 1 */
            fd_slot(&a->slots[i], "dropout");
        DSEED = 0;
        lora_free(a);
    }
    a = attach("vision_tower\\.vision_model\\.encoder\\.layers\\.0\\.self_attn\\.k_proj", err);
    ok(a && a->n_slots == 1 && a->slots[0].part == LORA_TOWER,
       "a regex over the older spelling (vision_tower.vision_model.) adapts that linear");
    lora_free(a);
}

/* ---- bad inputs -------------------------------------------------------------------------- */

static int fake_allocs;
static void *fake_alloc(lt_ctx *c, size_t bytes) {
    fake_allocs++;
    return lt_backend_cpu.alloc(c, bytes);
}

static void test_bad(void) {
    char err[LT_ERRLEN] = "";
    lt_adapters *a = attach("vision.q,vision.bogus", err);
    diag("%s", err);
    ok(!a && strstr(err, "vision.bogus") && strstr(err, "vision.out_proj") &&
           strstr(err, "projector"),
       "an unknown tower name is refused with the accepted names");
    a = attach("vision.fc1", err);
    ok(a != NULL, "(a valid tower name attaches)");
    lora_free(a);
    lora_opts o = {.r = 2, .alpha = 4, .dropout = 0.1f, .targets = "q,vision.fc1,projector"};
    ok(lora_attach(&a, M, &ctx, &o, err) != LT_OK && strstr(err, "dropout") &&
           strstr(err, "ParamWrapper") && M->layers[0].q_proj.lora == NULL,
       "dropout with the projector is refused (as PEFT's ParamWrapper), nothing attached");
    diag("%s", err);
    /* a backend without the tower's backward (tower_grad NULL): refused before any allocation */
    lt_backend fake = lt_backend_cpu;
    fake.name = "fake";
    fake.tower_grad = NULL;
    fake.alloc = fake_alloc;
    lt_ctx fctx;
    lt_ctx_init(&fctx, &fake, 1);
    fake_allocs = 0;
    lora_opts o2 = {.r = 2, .alpha = 4, .targets = "q,k,vision"};
    ok(lt_backend_tower_grad(&fake) == NULL &&
           !strcmp(lt_backend_missing_tower_training_op(&fake), "layernorm_backward") &&
           lora_attach(&a, M, &fctx, &o2, err) != LT_OK && strstr(err, "the fake backend lacks") &&
           strstr(err, "layernorm_backward") && strstr(err, "device=cuda") && fake_allocs == 0 &&
           M->layers[0].q_proj.lora == NULL && M->vision->layers[0].q.lora == NULL,
       "a tower target on a backend without the tower's backward: refused, nothing allocated");
    diag("%s", err);
    o2.targets = "q,k";
    ok(lora_attach(&a, M, &fctx, &o2, err) == LT_OK, "... the text targets still attach there");
    lora_free(a);
    lt_ctx_shutdown(&fctx);
    /* a text-only model */
    siglip_tower *tw = M->vision;
    M->vision = NULL;
    a = attach("q,vision.q", err);
    ok(!a && strstr(err, "image tower") && strstr(err, "text-only"),
       "tower names on a text-only model are refused");
    diag("%s", err);
    a = attach("projector", err);
    ok(!a && strstr(err, "image tower"), "projector on a text-only model is refused");
    a = attach(".*q_proj", err);
    ok(a && a->n_tower_slots == 0, "a regex on a text-only model adapts the text only");
    lora_free(a);
    M->vision = tw;
    a = attach(".*q_proj", err);
    ok(a && a->n_tower_slots == VL, "a regex on a multimodal model adapts the tower too (PEFT)");
    lora_free(a);
}

/* ---- PEFT save / load -------------------------------------------------------------------- */

static int same_values(const lt_adapters *x, const lt_adapters *y) {
    if (x->n_slots != y->n_slots) return 0;
    for (int i = 0; i < x->n_slots; i++) {
        const lora_slot *s = &x->slots[i], *t = &y->slots[i];
        if (strcmp(s->module, t->module) || s->part != t->part) return 0;
        if (memcmp(s->lora.a.data, t->lora.a.data, lt_tensor_bytes(&s->lora.a)) ||
            memcmp(s->lora.b.data, t->lora.b.data, lt_tensor_bytes(&s->lora.b)))
            return 0;
    }
    return 1;
}

static void test_peft(void) {
    char err[LT_ERRLEN] = "", dir[] = "/tmp/lathe-tower-peft-XXXXXX", path[4200];
    if (!mkdtemp(dir)) {
        ok(0, "mkdtemp");
        return;
    }
    M->cfg.multimodal = 1;
    lt_adapters *a = attach("q,o,vision.q,vision.fc2,projector", err);
    if (!a) {
        ok(0, "attach");
        diag("%s", err);
        return;
    }
    randomise(a);
    ok(peft_save_adapter(a, dir, err) == LT_OK, "peft_save_adapter with tower adapters");
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    json_error_t je;
    json_t *c = json_load_file(path, 0, &je);
    const char *tm = json_string_value(json_object_get(c, "target_modules"));
    json_t *tp = json_object_get(c, "target_parameters");
    diag("target_modules %s", tm ? tm : "(not a string)");
    ok(tm && !strcmp(tm, ".*language_model.*\\.(q_proj|o_proj)|.*vision_tower.*\\.(q_proj|fc2)"),
       "adapter_config.json: target_modules keeps each name to its part");
    ok(json_array_size(tp) == 1 && !strcmp(json_string_value(json_array_get(tp, 0)),
                                           "multi_modal_projector.mm_input_projection_weight"),
       "adapter_config.json: target_parameters names the projector's matrix");
    json_decref(c);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_set st;
    int opened = st_open(&st, path, err) == LT_OK;
    const st_tensor *q = opened ? st_find(&st, "base_model.model.model.vision_tower.encoder.layers."
                                               "1.self_attn.q_proj.lora_A.weight")
                                : NULL;
    const st_tensor *pa =
        opened ? st_find(&st, "base_model.model.model.multi_modal_projector.lora_A.weight") : NULL;
    const st_tensor *pb =
        opened ? st_find(&st, "base_model.model.model.multi_modal_projector.lora_B.weight") : NULL;
    const st_tensor *tq = opened ? st_find(&st, "base_model.model.model.language_model.layers.0."
                                                "self_attn.q_proj.lora_A.weight")
                                 : NULL;
    ok(q && q->shape[0] == 2 && q->shape[1] == VD && tq,
       "tower tensors under base_model.model.model.vision_tower.encoder.layers.N (transformers "
       "5), text under model.language_model");
    const lora_slot *pj = &a->slots[a->n_slots - 1];
    int tr = pa && pb && pa->shape[0] == 2 && pa->shape[1] == TH && pb->shape[0] == VD &&
             pb->shape[1] == 2;
    /* PEFT's lora_A [r, H] is our B [H, r] transposed */
    for (int i = 0; tr && i < 2; i++)
        for (int j = 0; j < TH; j++)
            tr &= ((const float *)pa->data)[i * TH + j] == ((float *)pj->lora.b.data)[j * 2 + i];
    ok(tr, "the projector: lora_A [r, H], lora_B [D, r], PEFT's orientation of the [D, H] matrix");
    if (opened) st_close(&st);
    lt_adapters *b = NULL;
    ok(peft_load_adapter(&b, M, &ctx, dir, err) == LT_OK && b && same_values(a, b),
       "PEFT save -> load round trip: the same slots and values");
    if (!b) diag("%s", err);
    lora_free(b);
    b = NULL;

    /* a PEFT list of names (as PEFT writes target_modules=["q_proj", "fc2"]) whose file holds
     * the tower's tensors: PEFT adapted every module of those names, the tower's too */
    lora_free(a);
    a = attach("q,vision.q,vision.fc2", err);
    randomise(a);
    peft_save_adapter(a, dir, err);
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    c = json_load_file(path, 0, &je);
    json_object_set_new(c, "target_modules", json_pack("[s, s]", "q_proj", "fc2"));
    json_dump_file(c, path, 0);
    json_decref(c);
    ok(peft_load_adapter(&b, M, &ctx, dir, err) == LT_OK && b && same_values(a, b),
       "a PEFT list with tower tensors in the file loads onto the tower too");
    if (!b) diag("%s", err);
    lora_free(b);
    lora_free(a);
    M->cfg.multimodal = 0;
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) diag("could not remove %s", dir);
}

int main(void) {
    lt_ctx_init(&ctx, &lt_backend_cpu, 2);
    M = test_micro_gemma3(&rng, TV, 0.5f, 0.4f);
    M->cfg.vision.present = 1;
    M->cfg.vision.image_token_id = TV;
    M->cfg.vision.mm_tokens_per_image = MM;
    M->vision = tower();
    test_ops();
    test_tower_grads();
    test_bad();
    test_peft();
    model_free(M);
    lt_ctx_shutdown(&ctx);
    return tap_done();
}
