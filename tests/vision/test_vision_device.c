/* test_vision_device.c — the image tower of a model copied to a backend (gemma3_to_device ->
 * siglip_to_device) against the host model on the CPU reference: the tower's soft tokens and
 * the logits of a sequence with an image block, for the committed tf5 fixture (a one-layer
 * SigLIP under model.vision_tower.), with the copy's matrices in fp32 (equal to 1e-5) and bf16
 * (to 2e-2). Then one training micro-batch with image rows (gemma3_train_batch: the image
 * blocks' attention_span and attention_span_backward) on the copy against the host: the loss
 * and every LoRA gradient (fp32 to 1e-4, bf16 to 5e-2, test_model's bounds); the host's
 * gradients with a span backward that ignores the blocks must miss them by more than that, so
 * a backend that did so fails. Then LoRA on the image tower and the projector (tests/fixtures/
 * vision/hf5, a two-layer tower): the adapted soft tokens, the loss, the image rows' gradients
 * and every adapter gradient of one micro-batch through the tower's backward on the copy equal
 * the host's (fp32 to 1e-5, bf16 to 1e-1); two sessions, one on the copy's backend and one on
 * the CPU: the mmproj files %export_gguf type=f32 writes are the same bytes (no adapter, PEFT's
 * tower adapter), %train through the tower lowers the loss on both alike, and the adapter trained
 * on the copy's backend merges into the same mmproj file there as in the CPU session (see
 * test_tower_sessions). Built as is, it copies onto the CPU backend; test_vision_gpu.c
 * builds it with VISION_TEST_CUDA for the CUDA backend (make check-gpu). TAP.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/engine.h"
#include "cuda/formats/image.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/model/model.h"
#include "cuda/model/siglip.h"
#include "cuda/train/train.h"
#ifdef VISION_TEST_CUDA
#include "cuda/backend/cuda/backend_cuda.h"
#endif
#include "tests/unit/tap.h"
#include "tests/unit/test_files.h"

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

/* ---- one training micro-batch with image rows ---------------------------------------------- */

/* attention_span_backward as a backend that ignored the image blocks would compute it */
static lt_status span_bw_ignoring_blocks(lt_ctx *ctx, lt_tensor dq, lt_tensor dk, lt_tensor dv,
                                         lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                                         lt_tensor qpos, lt_tensor kpos, lt_tensor span, int window,
                                         float scale) {
    (void)span;
    return lt_backend_cpu.attention_backward(ctx, dq, dk, dv, dout, q, k, v, qpos, kpos, window,
                                             scale);
}

/* Two samples: an image block in the middle of the first, two in the second (the first right
 * after <bos>), each longer than tf5's sliding window of 5; ids[], targets, the image rows made
 * from the tower's soft tokens (each block its own rows). */
static int32_t tr_ids[40], tr_tgt[40];
static int tr_seg[2];

static int train_batch_make(train_batch *b, const gemma3_vision_config *vc, int H,
                            const float *soft, float **rows) {
    int T = 0, mm = vc->mm_tokens_per_image, blocks = 0;
    int32_t text0[] = {2, 40, 41}, text1[] = {43, 44, 45, 46, 47, 48};
    memset(b, 0, sizeof *b);
    for (int s = 0; s < 2; s++) {
        int t0 = T;
        for (int part = 0; part < (s == 0 ? 1 : 2); part++) {
            if (part == 0 && s == 0)
                for (int i = 0; i < 3; i++)
                    tr_ids[T++] = text0[i];
            else if (part == 0)
                tr_ids[T++] = 2;
            tr_ids[T++] = vc->boi_token_id;
            for (int i = 0; i < mm; i++)
                tr_ids[T++] = vc->image_token_id;
            tr_ids[T++] = vc->eoi_token_id;
            blocks++;
            for (int i = 0; i < (part == 0 && s == 1 ? 2 : 6); i++)
                tr_ids[T++] = text1[i];
        }
        tr_seg[s] = T - t0;
    }
    for (int s = 0, o = 0; s < 2; o += tr_seg[s], s++)
        for (int t = 0; t < tr_seg[s]; t++) {
            int32_t next = t + 1 < tr_seg[s] ? tr_ids[o + t + 1] : -100;
            tr_tgt[o + t] = next == vc->image_token_id ? -100 : next;
            b->n_labels += tr_tgt[o + t] != -100;
        }
    *rows = malloc(sizeof(float) * (size_t)blocks * mm * H);
    for (int i = 0; i < blocks * mm; i++)
        for (int j = 0; j < H; j++) /* block n: the soft tokens times 1 + n/2 */
            (*rows)[(size_t)i * H + j] = soft[(size_t)(i % mm) * H + j] * (1.0f + 0.5f * (i / mm));
    b->ids = tr_ids;
    b->targets = tr_tgt;
    b->seg_len = tr_seg;
    b->n_seg = 2;
    b->N = T;
    b->image_embeds = *rows;
    b->n_image_tokens = blocks * mm;
    return T;
}

/* every adapter gradient of a (on ctx) into one host array of n floats */
static float *grads_of(lt_adapters *a, lt_ctx *ctx, int64_t *n) {
    int64_t total = 0;
    for (int i = 0; i < a->n_params; i++)
        total += lt_tensor_numel(&a->params[i].grad);
    float *g = malloc(sizeof(float) * (size_t)(total ? total : 1));
    int64_t o = 0;
    for (int i = 0; i < a->n_params; i++) {
        int64_t k = lt_tensor_numel(&a->params[i].grad);
        if (ctx->be->download(ctx, g + o, a->params[i].grad.data, sizeof(float) * (size_t)k) !=
            LT_OK)
            for (int64_t j = 0; j < k; j++)
                g[o + j] = NAN;
        o += k;
    }
    *n = total;
    return g;
}

static double rel_or_inf(const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(a[i])) return INFINITY;
    return rel(a, b, (size_t)n);
}

/* One micro-batch on the host (cpu) and on the copy dm (dev): loss and gradients within tol. */
static void test_train_images(gemma3_model *host, lt_ctx *cpu, gemma3_model *dm, lt_ctx *dev,
                              const float *soft, lt_dtype dt, double tol) {
    char err[LT_ERRLEN] = "", what[200];
    const char *dn = lt_dtype_user_name(dt);
    train_batch b;
    float *rows = NULL;
    train_batch_make(&b, &host->cfg.vision, host->cfg.hidden_size, soft, &rows);
    lora_opts lo = {.r = 4, .alpha = 8.0f, .seed = 5};
    lt_adapters *ha = NULL, *da = NULL;
    if (!ok(lora_attach(&ha, host, cpu, &lo, err) == LT_OK &&
                lora_attach(&da, dm, dev, &lo, err) == LT_OK && ha->n_slots == da->n_slots,
            "train with images: LoRA on the host and on the copy")) {
        diag("%s", err);
        goto out;
    }
    uint64_t z = 99; /* every B the same random values on both (zero at PEFT's init) */
    for (int i = 0; i < ha->n_slots; i++) {
        lt_tensor *hb = &ha->slots[i].lora.b, *db = &da->slots[i].lora.b;
        float *v = hb->data;
        for (int64_t k = 0; k < lt_tensor_numel(hb); k++) {
            z = z * 6364136223846793005ull + 1442695040888963407ull;
            v[k] = ((float)((z >> 40) & 0xffff) / 65536.0f - 0.5f) * 0.2f;
        }
        dev->be->upload(dev, db->data, v, sizeof(float) * (size_t)lt_tensor_numel(hb));
    }
    float gs = 1.0f / (float)b.n_labels;
    double lc = 0, ld = 0;
    lt_status r1 = gemma3_train_batch(host, cpu, lora_trainable(ha), &b, gs, 1, 0, &lc);
    lt_status r2 = gemma3_train_batch(dm, dev, lora_trainable(da), &b, gs, 1, 0, &ld);
    snprintf(what, sizeof what, "train with images (%s): one micro-batch runs on both", dn);
    if (!ok(r1 == LT_OK && r2 == LT_OK, what)) {
        diag("%s | %s", cpu->err, dev->err);
        goto out;
    }
    int64_t n = 0, n2 = 0;
    float *gc = grads_of(ha, cpu, &n), *gd = grads_of(da, dev, &n2);
    double e = n == n2 ? rel_or_inf(gd, gc, n) : INFINITY, norm = 0;
    for (int64_t i = 0; i < n; i++)
        norm += (double)gc[i] * gc[i];
    snprintf(what, sizeof what, "train with images (%s): loss %.6f vs the host's %.6f", dn, ld, lc);
    ok(lc > 0 && fabs(ld - lc) <= tol * fabs(lc), what);
    snprintf(what, sizeof what,
             "train with images (%s): every LoRA gradient, rel %.2e <= %.0e (norm %.3g)", dn, e,
             tol, sqrt(norm));
    ok(norm > 0 && e <= tol, what);
    /* what a span backward that ignored the blocks would give: more than tol away */
    lt_backend stub = lt_backend_cpu;
    stub.attention_span_backward = span_bw_ignoring_blocks;
    lt_ctx sctx;
    double es = 0;
    lt_status r3 = lt_ctx_init(&sctx, &stub, 2);
    if (r3 == LT_OK) r3 = lora_zero_grads(ha);
    double ls = 0;
    if (r3 == LT_OK) r3 = gemma3_train_batch(host, &sctx, lora_trainable(ha), &b, gs, 1, 0, &ls);
    if (r3 == LT_OK) {
        int64_t n3 = 0;
        float *gs3 = grads_of(ha, cpu, &n3);
        es = rel_or_inf(gs3, gc, n3);
        free(gs3);
    } else {
        diag("%s", sctx.err);
    }
    lt_ctx_shutdown(&sctx);
    snprintf(what, sizeof what,
             "train with images (%s): ignoring the blocks in the backward moves the gradients "
             "by %.2e > %.0e",
             dn, es, tol);
    ok(r3 == LT_OK && ls == lc && es > tol, what);
    free(gc);
    free(gd);
out:
    lora_free(ha);
    lora_free(da);
    free(rows);
}

/* ---- the tower's adapters trained on the copy (tests/fixtures/vision/hf5) -------------------
 * The tiny multimodal golden model (a two-layer SigLIP: width 32, 4 heads of 8, an 8 x 8 patch
 * grid pooled 2 x 2 into 16 soft tokens) with LoRA on the text q, v, every tower linear and the
 * projector: the soft tokens, then one micro-batch with its image block as %train runs it
 * (gemma3_train_batch for the loss and the image rows' gradients, siglip_backward from those),
 * on the copy against the host. */

/* every slot's gradients (A then B) of one part (LORA_TEXT, or the tower with the projector)
 * into one host array */
static float *part_grads(const lt_adapters *a, lt_ctx *ctx, int tower, int64_t *n) {
    int64_t total = 0, o = 0;
    for (int i = 0; i < a->n_slots; i++)
        if ((a->slots[i].part != LORA_TEXT) == tower)
            total += lt_tensor_numel(&a->slots[i].lora.grad_a) +
                     lt_tensor_numel(&a->slots[i].lora.grad_b);
    float *g = malloc(sizeof(float) * (size_t)(total ? total : 1));
    for (int i = 0; i < a->n_slots; i++) {
        const lt_lora *l = &a->slots[i].lora;
        if ((a->slots[i].part != LORA_TEXT) != tower) continue;
        const lt_tensor *ts[2] = {&l->grad_a, &l->grad_b};
        for (int k = 0; k < 2; k++) {
            int64_t m = lt_tensor_numel(ts[k]);
            if (ctx->be->download(ctx, g + o, ts[k]->data, sizeof(float) * (size_t)m) != LT_OK)
                for (int64_t j = 0; j < m; j++)
                    g[o + j] = NAN;
            o += m;
        }
    }
    *n = total;
    return g;
}

/* The smallest gradient norm over the tower's and the projector's slots (host adapters). */
static double least_tower_grad(const lt_adapters *a) {
    double least = INFINITY;
    for (int i = 0; i < a->n_slots; i++) {
        const lt_lora *l = &a->slots[i].lora;
        if (a->slots[i].part == LORA_TEXT) continue;
        const lt_tensor *ts[2] = {&l->grad_a, &l->grad_b};
        for (int k = 0; k < 2; k++) {
            double s = 0;
            for (int64_t j = 0; j < lt_tensor_numel(ts[k]); j++)
                s += (double)((float *)ts[k]->data)[j] * ((float *)ts[k]->data)[j];
            least = fmin(least, sqrt(s));
        }
    }
    return least;
}

static void test_tower_train(gemma3_model *host, lt_ctx *cpu, lt_ctx *dev, const float *px,
                             lt_dtype dt, double tol) {
    char err[LT_ERRLEN] = "", what[240];
    const char *dn = lt_dtype_user_name(dt);
    const gemma3_vision_config *vc = &host->cfg.vision;
    int mm = vc->mm_tokens_per_image, H = host->cfg.hidden_size, L = vc->num_hidden_layers;
    size_t rows = (size_t)mm * H;
    gemma3_model *dm = NULL;
    lt_adapters *ha = NULL, *da = NULL;
    float *soft_h = malloc(sizeof(float) * rows), *soft_d = malloc(sizeof(float) * rows),
          *gh = malloc(sizeof(float) * rows), *gd = malloc(sizeof(float) * rows);
    float *dbuf = NULL;
#ifdef VISION_TEST_CUDA
    lt_cuda_set_precision(dev, dt);
#endif
    snprintf(what, sizeof what, "tower training (%s): vision/hf5 copied to %s", dn, dev->be->name);
    if (!ok(gemma3_to_device(&dm, host, dev, dt, err) == LT_OK && dm->vision, what)) {
        diag("%s %s", err, dm ? dm->vision_error : "");
        goto out;
    }
    lora_opts lo = {.r = 4, .alpha = 8.0f, .seed = 5, .targets = "q,v,vision,projector"};
    snprintf(what, sizeof what,
             "tower training (%s): LoRA on text q, v, the tower's %d linears and the projector, "
             "on both",
             dn, 6 * L);
    if (!ok(lora_attach(&ha, host, cpu, &lo, err) == LT_OK &&
                lora_attach(&da, dm, dev, &lo, err) == LT_OK && ha->n_slots == da->n_slots &&
                ha->n_tower_slots == 6 * L + 1 && da->n_tower_slots == 6 * L + 1,
            what)) {
        diag("%s", err);
        goto out;
    }
    uint64_t z = 77; /* every A and B random, the same on both (every gradient then nonzero) */
    for (int i = 0; i < ha->n_slots; i++) {
        lt_lora *hl = &ha->slots[i].lora, *dl = &da->slots[i].lora;
        lt_tensor *hs[2] = {&hl->a, &hl->b}, *ds[2] = {&dl->a, &dl->b};
        for (int k = 0; k < 2; k++) {
            float *v = hs[k]->data;
            for (int64_t j = 0; j < lt_tensor_numel(hs[k]); j++) {
                z = z * 6364136223846793005ull + 1442695040888963407ull;
                v[j] = ((float)((z >> 40) & 0xffff) / 65536.0f - 0.5f) * 0.4f;
            }
            dev->be->upload(dev, ds[k]->data, v, sizeof(float) * (size_t)lt_tensor_numel(hs[k]));
        }
    }
    /* the soft tokens through the adapted tower */
    dbuf = dev->be->alloc(dev, sizeof(float) * rows);
    lt_status r1 = siglip_encode_train(host->vision, cpu, px, soft_h, 0);
    lt_status r2 = dbuf ? siglip_encode_train(dm->vision, dev, px, dbuf, 0) : LT_ERR_MEMORY;
    if (r2 == LT_OK) r2 = dev->be->download(dev, soft_d, dbuf, sizeof(float) * rows);
    double es = r1 == LT_OK && r2 == LT_OK ? rel_or_inf(soft_d, soft_h, (int64_t)rows) : INFINITY;
    snprintf(what, sizeof what,
             "tower training (%s): the adapted tower's soft tokens, rel %.2e <= %.0e", dn, es, tol);
    if (!ok(es <= tol, what)) diag("%s | %s", cpu->err, dev->err);
    /* one micro-batch: text, the image block, text; the loss over the text after the block */
    int32_t ids[64], tgt[64];
    int T = 0, n_labels = 0;
    ids[T++] = 2, ids[T++] = 300, ids[T++] = 301, ids[T++] = vc->boi_token_id;
    for (int i = 0; i < mm; i++)
        ids[T++] = vc->image_token_id;
    ids[T++] = vc->eoi_token_id;
    for (int i = 0; i < 6; i++)
        ids[T++] = 302 + i;
    for (int t = 0; t < T; t++) {
        int32_t next = t + 1 < T ? ids[t + 1] : -100;
        tgt[t] = next == vc->image_token_id ? -100 : next;
        n_labels += tgt[t] != -100;
    }
    int seg[1] = {T};
    train_batch bh = {.ids = ids,
                      .targets = tgt,
                      .seg_len = seg,
                      .n_seg = 1,
                      .N = T,
                      .n_labels = n_labels,
                      .image_embeds = soft_h,
                      .n_image_tokens = mm,
                      .image_grads = gh},
                bd = bh;
    bd.image_embeds = soft_d;
    bd.image_grads = gd;
    float gs = 1.0f / (float)n_labels;
    double lc = 0, ld = 0;
    lora_zero_grads(ha);
    lora_zero_grads(da);
    r1 = gemma3_train_batch(host, cpu, lora_trainable(ha), &bh, gs, 1, 0, &lc);
    r2 = gemma3_train_batch(dm, dev, lora_trainable(da), &bd, gs, 1, 0, &ld);
    snprintf(what, sizeof what, "tower training (%s): the micro-batch's loss %.7f vs %.7f", dn, ld,
             lc);
    if (!ok(r1 == LT_OK && r2 == LT_OK && lc > 0 && fabs(ld - lc) <= tol * lc, what))
        diag("%s | %s", cpu->err, dev->err);
    double eg = rel_or_inf(gd, gh, (int64_t)rows);
    snprintf(what, sizeof what, "tower training (%s): the image rows' gradients, rel %.2e <= %.0e",
             dn, eg, tol);
    ok(eg <= tol, what);
    /* the tower's backward from the rows' gradients, as %train runs it (tower_rows) */
    r1 = siglip_backward(host->vision, cpu, px, gh, 0);
    r2 = dev->be->upload(dev, dbuf, gd, sizeof(float) * rows);
    if (r2 == LT_OK) r2 = siglip_backward(dm->vision, dev, px, dbuf, 0);
    snprintf(what, sizeof what, "tower training (%s): siglip_backward runs on %s", dn,
             dev->be->name);
    if (!ok(r1 == LT_OK && r2 == LT_OK, what)) diag("%s | %s", cpu->err, dev->err);
    for (int tower = 0; tower < 2; tower++) {
        int64_t n = 0, n2 = 0;
        float *gc = part_grads(ha, cpu, tower, &n), *gg = part_grads(da, dev, tower, &n2);
        double e = n == n2 ? rel_or_inf(gg, gc, n) : INFINITY, norm = 0;
        for (int64_t i = 0; i < n; i++)
            norm += (double)gc[i] * gc[i];
        snprintf(what, sizeof what,
                 "tower training (%s): the %s adapters' gradients, rel %.2e <= %.0e (norm %.3g)",
                 dn, tower ? "tower's and projector's" : "text", e, tol, sqrt(norm));
        ok(n > 0 && norm > 0 && e <= tol, what);
        free(gc);
        free(gg);
    }
    /* every tower slot moved: each of the tower's backward ops carries gradient (a zero from
     * a stub op would leave the slots below it at zero) */
    double least = least_tower_grad(ha);
    snprintf(what, sizeof what,
             "tower training (%s): every tower and projector adapter gets a gradient (least "
             "norm %.3g)",
             dn, least);
    ok(least > 1e-6, what);
out:
    lora_free(ha);
    lora_free(da);
    gemma3_model_release(dm, dev);
    if (dbuf) dev->be->release(dev, dbuf);
    free(soft_h), free(soft_d), free(gh), free(gd);
}

/* ---- %train through the tower and the mmproj export, two sessions --------------------------
 * A session on the copy's backend (device=cpu when built as test_vision_device) and one on the
 * CPU, both vision/hf5 in fp32: %export_gguf type=f32 writes the same mmproj file from both,
 * byte for byte, where the weights are the same (no adapters; PEFT's tower + projector adapter
 * loaded into both, merged on the host from the same values); %train through the tower lowers
 * the loss on the copy's backend as on the CPU (the same first loss, curves within 1e-3), and
 * the adapter trained there, loaded into the CPU session, exports the same mmproj file as the
 * training session does (the merge of adapters trained on the device), and %save merged= writes
 * the same checkpoint from both (the tower read back from the device). Files trained apart are
 * not compared byte for byte: gradients that agree to ~1e-6 give adapters that differ in their
 * last bits. */

static lt_session *session_load(const char *dir, const char *device) {
    lt_session *s = lt_session_new();
    lt_load_opts lo;
    lt_load_opts_default(&lo);
    lo.device = device;
    lo.dtype = "fp32";
    if (lt_load(s, dir, &lo, NULL) != LT_OK) {
        diag("load %s on %s: %s", dir, device, lt_last_error(s));
        lt_session_free(s);
        return NULL;
    }
    return s;
}

/* The mmproj file %export_gguf type=f32 writes from s (under tmp, named after tag). */
static char *export_mmproj(lt_session *s, const char *tmp, const char *tag, size_t *n) {
    char text[4200], mm[4200];
    snprintf(text, sizeof text, "%s/%s.gguf", tmp, tag);
    snprintf(mm, sizeof mm, "%s/%s-mmproj.gguf", tmp, tag);
    lt_export_result res;
    if (lt_export_gguf(s, text, "f32", mm, 1, NULL, &res) != LT_OK) {
        diag("export %s: %s", tag, lt_last_error(s));
        *n = 0;
        return NULL;
    }
    return test_read_file(mm, n);
}

static int same_file(const char *a, size_t na, const char *b, size_t nb) {
    return a && b && na == nb && na > 0 && memcmp(a, b, na) == 0;
}

static double train_steps(lt_session *s, const char *data, int steps, double *last) {
    lt_train_opts o;
    lt_train_opts_default(&o);
    o.data = data;
    o.steps = steps;
    o.lr = 3e-2f;
    o.batch = 1;
    o.responses_only = 1;
    o.shuffle = 0;
    lt_train_result res;
    memset(&res, 0, sizeof res);
    lt_status rc = lt_train(s, &o, NULL, &res);
    if (rc != LT_OK) diag("lt_train: %s", lt_last_error(s));
    *last = res.last_loss;
    return rc == LT_OK ? res.first_loss : -1;
}

static void test_tower_sessions(const char *vis, const char *peft, const char *device) {
    char hf5[4200], png[4200], tmp[] = "/tmp/lathe-vision-dev-XXXXXX", data[4300], ad[4300];
    char what[240];
    snprintf(hf5, sizeof hf5, "%s/hf5", vis);
    snprintf(png, sizeof png, "%s/image.png", vis);
    if (!mkdtemp(tmp)) {
        ok(0, "sessions: a temporary folder");
        return;
    }
    lt_session *sc = session_load(hf5, "cpu"), *sd = session_load(hf5, device);
    snprintf(what, sizeof what, "sessions: vision/hf5 loads on cpu and on %s (fp32)", device);
    if (!ok(sc && sd, what)) goto out;
    size_t n0c = 0, n0d = 0, n1c = 0, n1d = 0, n2c = 0, n2d = 0;
    char *f0c = export_mmproj(sc, tmp, "base-cpu", &n0c),
         *f0d = export_mmproj(sd, tmp, "base-dev", &n0d);
    snprintf(what, sizeof what,
             "mmproj type=f32 from a %s session equals the CPU session's, byte for byte (%zu "
             "bytes)",
             device, n0c);
    ok(same_file(f0d, n0d, f0c, n0c), what);
    /* PEFT's adapter on the tower's q, out_proj, fc1, fc2 and the projector, on both */
    lt_lora_opts lo;
    lt_lora_opts_default(&lo);
    lo.load = peft;
    lt_status r1 = lt_lora_attach(sc, &lo, NULL), r2 = lt_lora_attach(sd, &lo, NULL);
    if (r1 != LT_OK || r2 != LT_OK) diag("%s | %s", lt_last_error(sc), lt_last_error(sd));
    char *f1c = export_mmproj(sc, tmp, "peft-cpu", &n1c),
         *f1d = export_mmproj(sd, tmp, "peft-dev", &n1d);
    snprintf(what, sizeof what,
             "mmproj with PEFT's tower adapter merged: the %s session's equals the CPU's, byte "
             "for byte",
             device);
    ok(r1 == LT_OK && r2 == LT_OK && same_file(f1d, n1d, f1c, n1c), what);
    ok(f1c && n1c == n0c && !same_file(f1c, n1c, f0c, n0c),
       "... and differs from the file without it (the adapter is merged)");
    /* %train through the tower on both */
    snprintf(data, sizeof data, "%s/rows.jsonl", tmp);
    {
        char row[8800];
        snprintf(row, sizeof row,
                 "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", "
                 "\"image\": \"%s\"}, {\"type\": \"text\", \"text\": \"Colour?\"}]}, {\"role\": "
                 "\"assistant\", \"content\": \"Red and blue.\"}]}\n",
                 png);
        FILE *f = fopen(data, "w");
        if (f) {
            fputs(row, f);
            fclose(f);
        }
    }
    lt_lora_opts_default(&lo);
    lo.r = 2;
    lo.seed = 11;
    lo.targets = "q,v,vision,projector";
    r1 = lt_lora_attach(sc, &lo, NULL);
    r2 = lt_lora_attach(sd, &lo, NULL);
    snprintf(what, sizeof what, "%%lora targets=q,v,vision,projector attaches on %s", device);
    if (!ok(r1 == LT_OK && r2 == LT_OK, what)) {
        diag("%s | %s", lt_last_error(sc), lt_last_error(sd));
        goto files;
    }
    double lastc = 0, lastd = 0, firstc = train_steps(sc, data, 4, &lastc),
           firstd = train_steps(sd, data, 4, &lastd);
    diag("%%train 4 steps through the tower: cpu %.6f -> %.6f, %s %.6f -> %.6f", firstc, lastc,
         device, firstd, lastd);
    snprintf(what, sizeof what, "%%train through the tower on %s lowers the loss", device);
    ok(firstd > 0 && lastd < firstd - 0.05, what);
    snprintf(what, sizeof what,
             "... from the CPU's first loss (1e-5), to its last within 1e-3 (%.2e, %.2e)",
             fabs(firstd - firstc) / firstc, fabs(lastd - lastc) / lastc);
    ok(firstc > 0 && fabs(firstd - firstc) <= 1e-5 * firstc && fabs(lastd - lastc) <= 1e-3 * lastc,
       what);
    /* the adapter trained there, saved and loaded into the CPU session: the same mmproj */
    snprintf(ad, sizeof ad, "%s/trained", tmp);
    lt_lora_opts ld;
    lt_lora_opts_default(&ld);
    ld.load = ad;
    r1 = lt_save_adapter(sd, ad);
    if (r1 == LT_OK) r1 = lt_lora_attach(sc, &ld, NULL);
    if (r1 != LT_OK) diag("%s | %s", lt_last_error(sd), lt_last_error(sc));
    char *f2c = export_mmproj(sc, tmp, "trained-cpu", &n2c),
         *f2d = export_mmproj(sd, tmp, "trained-dev", &n2d);
    snprintf(what, sizeof what,
             "mmproj with the tower adapters trained on %s: that session's equals the CPU "
             "session's with the same adapter loaded, byte for byte",
             device);
    ok(r1 == LT_OK && same_file(f2d, n2d, f2c, n2c), what);
    ok(f2d && !same_file(f2d, n2d, f0d, n0d) && !same_file(f2d, n2d, f1d, n1d),
       "... and differs from the base's and PEFT's (training moved the tower)");
    /* %save merged= with those adapters: the whole multimodal checkpoint, the tower read back */
    {
        char mc[4300], md[4300];
        size_t nc = 0, nd = 0;
        snprintf(mc, sizeof mc, "%s/merged-cpu", tmp);
        snprintf(md, sizeof md, "%s/merged-dev", tmp);
        r1 = lt_save_merged(sc, mc, "fp32", NULL);
        r2 = lt_save_merged(sd, md, "fp32", NULL);
        if (r1 != LT_OK || r2 != LT_OK) diag("%s | %s", lt_last_error(sc), lt_last_error(sd));
        snprintf(mc, sizeof mc, "%s/merged-cpu/model.safetensors", tmp);
        snprintf(md, sizeof md, "%s/merged-dev/model.safetensors", tmp);
        char *sfc = test_read_file(mc, &nc), *sfd = test_read_file(md, &nd);
        snprintf(what, sizeof what,
                 "%%save merged= fp32 with the tower adapters from the %s session: the CPU "
                 "session's checkpoint, byte for byte (%zu bytes)",
                 device, nc);
        ok(r1 == LT_OK && r2 == LT_OK && same_file(sfd, nd, sfc, nc), what);
        free(sfc);
        free(sfd);
    }
    free(f2c);
    free(f2d);
files:
    free(f0c), free(f0d), free(f1c), free(f1d);
out:
    lt_session_free(sc);
    lt_session_free(sd);
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0) diag("could not remove %s", tmp);
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
    snprintf(dir, sizeof dir, "%s/tests/fixtures/tf5", test_srcdir());
    snprintf(png, sizeof png, "%s/tests/vision/data/rgb.png", test_srcdir());
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
    static const double tol[2] = {1e-5, 2e-2}, train_tol[2] = {1e-4, 5e-2};
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
        test_train_images(host, &cpu, dm, &dev, f0, dts[k], train_tol[k]);
        gemma3_model_release(dm, &dev);
    }
    /* the tower's adapters trained on the copy, then two sessions (tests/fixtures/vision) */
    char vis[4096], hf5[4200], vpng[4200], peft[4200];
    snprintf(vis, sizeof vis, "%s/tests/fixtures/vision", test_srcdir());
    snprintf(hf5, sizeof hf5, "%s/hf5", vis);
    snprintf(vpng, sizeof vpng, "%s/image.png", vis);
    snprintf(peft, sizeof peft, "%s/tests/fixtures/vision_peft/adapter", test_srcdir());
    gemma3_model *vh = NULL;
    rc = gemma3_load_dir(&vh, hf5, "fp32", NULL, err);
    ok(rc == LT_OK && vh && vh->vision, "load vision/hf5 (a two-layer tower) on the host");
    if (rc != LT_OK) diag("%s", err);
    if (vh && vh->vision) {
        int S2 = vh->cfg.vision.image_size;
        float *px2 = malloc(sizeof(float) * 3 * (size_t)S2 * S2);
        ok(img_load_pixels(px2, vpng, S2, err) == LT_OK, "vision/image.png");
        /* fp32: the same ops in fp32 on both; bf16: the copy's matrices and every matmul input
         * rounded to 8 bits through two tower and four text layers (a wrong op moves the
         * gradients by O(1)) */
        static const double tower_tol[2] = {1e-5, 1e-1};
        for (int k = 0; k < 2; k++)
            test_tower_train(vh, &cpu, &dev, px2, dts[k], tower_tol[k]);
        free(px2);
    }
    gemma3_model_free(vh);
    test_tower_sessions(vis, peft, be->name);
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
