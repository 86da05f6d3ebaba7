/* gemma3_backward.c — one training micro-batch of Gemma 3: forward, fused loss, backward.
 *
 * The samples of a micro-batch are packed into one row of N tokens with no padding: every
 * matmul, norm and activation runs on all N tokens at once, while attention runs per sample
 * (positions restart at 0 for each sample, so a sample never sees another one). The
 * forward keeps only each layer's input (activation checkpointing); the backward
 * recomputes one layer at a time from its input, keeping that layer's intermediates, then
 * walks back through it. The layer code follows gemma3.c's layer_forward op for op (same
 * ops, same order), so the loss here equals the inference forward's.
 *
 * Memory. The layer inputs are stashed off the device (be->stash_out: page-locked host memory
 * on the GPU), copied while the next layer runs and fetched back one layer ahead of the
 * backward that needs them. The MLP, whose [tokens, intermediate] tensors are the largest, runs
 * a block of rows at a time (exact: it works token by token), and in the backward each block's
 * recompute is followed at once by its backward, so no [N, I] tensor ever exists whole. The
 * attention gradients reuse the MLP blocks' scratch: the two are never alive together, and the
 * whole layer block is lent to the loss, which runs between the last layer and the backward.
 * Where the backend's matmuls read bf16 (be->bf16_activations), the tensors that only feed
 * matmuls (the norms' outputs, the GeGLU product and its gradients) are kept in bf16: the
 * values linear would round them to anyway.
 *
 * LoRA dropout (when > 0) runs the adapter path as separate ops with a mask that is a pure
 * function of a seed and the element's place in the whole [N, in] input, so the recompute, the
 * backward and any row blocking see the forward's mask.
 * This file owns no state: buffers live for one call. It must not change the model.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/model/model.h"

/* Everything one call needs, in backend memory unless noted. */
typedef struct tb_bufs {
    int32_t *ids, *pos, *tg;
    int32_t *span;      /* [N, 2] image blocks' extra visible positions (images only) */
    float *img;         /* [n_image_tokens, H] the image rows (images only) */
    int32_t *span_host; /* host copy of span; NULL without images */
    float *rw, *lp;     /* [N] the targets' loss weights and log-probabilities (when asked for) */
    float *layer_in;    /* [L, N, H] checkpoints: host_alloc memory (device memory if none) */
    int layer_in_on_host;
    /* [N, H] x2, the residual stream: layer l reads res[l & 1] and writes res[(l + 1) & 1],
     * so its input can still be on its way out while the next layer runs; the backward fetches
     * layer l's input back into res[l & 1]. The final norm goes into the buffer not holding
     * the last layer's output. */
    float *res[2];
    /* [N, H]: gradients of the residual stream and a gradient step's output */
    float *dh, *dx;
    /* one layer's working memory, one block (lent to the loss, which runs between layers):
     * the attention block's tensors, then the scratch below */
    float *layer;
    size_t layer_bytes;
    float *a, *qr, *qn, *kr, *kn, *v, *att, *o, *h1;
    /* after them, the scratch, first the MLP block's tensors: [R, H] m, f, dm; [R, I] gate, up,
     * act, dact (R = MLP block rows); the backward writes dL/dgate and dL/dup over gate and up in
     * fp32, or (bf16 activations) over act and into dup16 */
    float *m, *f, *dm, *gate, *up, *act, *dact, *dup16;
    /* in scratch too, after the MLP: [N, QD] dq, datt; [N, KD] dk, dv; [N, H] da */
    float *dq, *dk, *dv, *datt, *da;
    /* dropout scratch: [N, max(in, out)] x3 and [N, r] x2 */
    float *s_in, *s_in2, *s_out, *s_r, *s_r2;
} tb_bufs;

typedef struct tb_ctx {
    const gemma3_model *m;
    lt_ctx *ctx;
    const lt_backend *be;
    const gemma3_trainable *tr;
    const train_batch *b;
    tb_bufs *B;
    int64_t N, H, I, nh, nkv, hd, QD, KD, maxdim;
    int64_t R;    /* rows per MLP block */
    lt_dtype adt; /* a, m, act (they only feed matmuls): BF16 where the matmuls read bf16 */
    int64_t rmax;
    uint64_t drop_seed;
    int training; /* LoRA dropout on (a nonzero seed was given) */
} tb_ctx;

static lt_tensor t2(float *p, int64_t a, int64_t b) {
    return lt_tensor_2d(LT_F32, p, a, b);
}
static lt_tensor t3(float *p, int64_t a, int64_t b, int64_t c) {
    return lt_tensor_3d(LT_F32, p, a, b, c);
}
static lt_tensor none2(int64_t a, int64_t b) {
    return lt_tensor_2d(LT_F32, NULL, a, b);
}
/* A matmul-only activation (a, m, act): [a, b] of c->adt. */
static lt_tensor tact(const tb_ctx *c, float *p, int64_t a, int64_t b) {
    return lt_tensor_2d(c->adt, p, a, b);
}

static uint64_t module_seed(uint64_t seed, int layer, int k) {
    return seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(layer * 16 + k + 1));
}

/* Rows per MLP block: about 320 MiB for its four [rows, I] fp32 tensors, in multiples of 64,
 * all N when that is less (4B at 2 x 2048 tokens: two blocks of 2048; blocks of 1024 took the
 * step from 372 to 395 ms for 0.2 GiB less, bench/results). LATHE_TRAIN_MLP_ROWS overrides it
 * (tests, benchmarks). A function of the shapes only, so every backend blocks the same way. */
static int64_t mlp_block_rows(int64_t N, int64_t I) {
    const char *e = getenv("LATHE_TRAIN_MLP_ROWS");
    int64_t r = e && atoll(e) > 0 ? atoll(e) : ((int64_t)320 << 20) / (16 * (I > 0 ? I : 1));
    if (!(e && atoll(e) > 0)) r = r < 64 ? 64 : r / 64 * 64;
    return r < N ? r : N;
}

static int uses_dropout(const tb_ctx *c, const lt_weight *w) {
    return c->training && w->lora && w->lora->enabled && w->lora->dropout > 0.0f && w->lora->a.data;
}

/* The mask seed for rows starting at r0 of an input of width `in`: the mask of element i of
 * the block is then the mask of element r0·in + i of the whole input (lt_dropout_keep). */
static uint64_t rows_seed(uint64_t seed, int64_t r0, int64_t in) {
    return seed + 0x9e3779b97f4a7c15ull * (uint64_t)(r0 * in);
}

/* y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ. x: [n, in] (rows r0.. of the micro-batch), y: [n, out]. */
static lt_status lin_fwd(tb_ctx *c, lt_tensor y, lt_tensor x, const lt_weight *w, uint64_t seed,
                         int64_t r0) {
    lt_status rc;
    if (!uses_dropout(c, w)) return c->be->linear(c->ctx, y, x, w);
    lt_lora *lo = w->lora;
    int64_t n = x.shape[0], in = w->w.shape[1], out = w->w.shape[0], r = lo->a.shape[0];
    lo->enabled = 0;
    rc = c->be->linear(c->ctx, y, x, w); /* base path */
    lo->enabled = 1;
    if (rc != LT_OK) return rc;
    lt_weight wa = {.w = lo->a}, wb = {.w = lo->b};
    lt_tensor xd = t2(c->B->s_in, n, in), u = t2(c->B->s_r, n, r), y2 = t2(c->B->s_out, n, out);
    seed = rows_seed(seed, r0, in);
    if ((rc = c->be->dropout(c->ctx, xd, x, lo->dropout, 1.0f, seed)) != LT_OK) return rc;
    if ((rc = c->be->linear(c->ctx, u, xd, &wa)) != LT_OK) return rc; /* u: [n, r] */
    if ((rc = c->be->linear(c->ctx, y2, u, &wb)) != LT_OK) return rc; /* y2: [n, out] */
    if ((rc = c->be->scale(c->ctx, y2, lo->scale)) != LT_OK) return rc;
    return c->be->add(c->ctx, y, y2);
}

/* dx = dL/dx (written; data NULL = not needed), adapter/weight grads accumulated. */
static lt_status lin_bwd(tb_ctx *c, lt_tensor dx, lt_tensor dy, lt_tensor x, const lt_weight *w,
                         uint64_t seed, int64_t r0) {
    lt_status rc;
    if (!uses_dropout(c, w)) return c->be->linear_backward(c->ctx, dx, dy, x, w);
    lt_lora *lo = w->lora;
    int64_t n = x.shape[0], in = w->w.shape[1], out = w->w.shape[0], r = lo->a.shape[0];
    lo->enabled = 0;
    rc = c->be->linear_backward(c->ctx, dx, dy, x, w); /* base path: dx = dy·W (+ grad_w) */
    lo->enabled = 1;
    if (rc != LT_OK) return rc;
    lt_weight wa = {.w = lo->a, .grad_w = lo->grad_a}, wb = {.w = lo->b, .grad_w = lo->grad_b};
    lt_tensor xd = t2(c->B->s_in, n, in), u = t2(c->B->s_r, n, r);
    lt_tensor dys = t2(c->B->s_out, n, out), du = t2(c->B->s_r2, n, r),
              dxd = t2(c->B->s_in2, n, in);
    seed = rows_seed(seed, r0, in);
    if ((rc = c->be->dropout(c->ctx, xd, x, lo->dropout, 1.0f, seed)) != LT_OK) return rc;
    if ((rc = c->be->linear(c->ctx, u, xd, &wa)) != LT_OK) return rc;
    if ((rc = c->be->copy(c->ctx, dys.data, dy.data, lt_tensor_bytes(&dys))) != LT_OK) return rc;
    if ((rc = c->be->scale(c->ctx, dys, lo->scale)) != LT_OK) return rc;
    /* through B: du = s·dy·B, grad_B += s·dyᵀ·u; through A: dxd = du·A, grad_A += duᵀ·xd */
    if ((rc = c->be->linear_backward(c->ctx, du, dys, u, &wb)) != LT_OK) return rc;
    if ((rc = c->be->linear_backward(c->ctx, dx.data ? dxd : none2(n, in), du, xd, &wa)) != LT_OK)
        return rc;
    if (!dx.data) return LT_OK;
    if ((rc = c->be->dropout(c->ctx, dxd, dxd, lo->dropout, 1.0f, seed)) != LT_OK) return rc;
    return c->be->add(c->ctx, dx, dxd);
}

/* Attention of every sample of the packed row, one be->attention call per sample. */
static lt_status attend(tb_ctx *c, int l, int backward) {
    const gemma3_config *cfg = &c->m->cfg;
    gemma3_layer_type kind = gemma3_layer_kind(cfg, l);
    int window = kind == GEMMA3_SLIDING ? cfg->sliding_window : 0;
    float scale = (float)(1.0 / sqrt(cfg->query_pre_attn_scalar));
    tb_bufs *B = c->B;
    int64_t t0 = 0;
    for (int s = 0; s < c->b->n_seg; s++) {
        int64_t n = c->b->seg_len[s];
        lt_tensor q = t3(B->qn + t0 * c->QD, n, c->nh, c->hd);  /* [n, nh, hd] */
        lt_tensor k = t3(B->kn + t0 * c->KD, n, c->nkv, c->hd); /* [n, nkv, hd] */
        lt_tensor v = t3(B->v + t0 * c->KD, n, c->nkv, c->hd);
        lt_tensor pos = lt_tensor_1d(LT_I32, B->pos + t0, n);
        lt_status rc;
        int spans = 0; /* does this sample hold an image block? */
        for (int64_t i = 0; B->span_host && i < n && !spans; i++)
            spans = B->span_host[2 * (t0 + i)] <= B->span_host[2 * (t0 + i) + 1];
        if (spans) {
            lt_tensor sp = lt_tensor_2d(LT_I32, B->span + 2 * t0, n, 2);
            if (!backward)
                rc = c->be->attention_span(c->ctx, t2(B->att + t0 * c->QD, n, c->QD), q, k, v, pos,
                                           pos, sp, window, scale);
            else
                rc = c->be->attention_span_backward(c->ctx, t3(B->dq + t0 * c->QD, n, c->nh, c->hd),
                                                    t3(B->dk + t0 * c->KD, n, c->nkv, c->hd),
                                                    t3(B->dv + t0 * c->KD, n, c->nkv, c->hd),
                                                    t2(B->datt + t0 * c->QD, n, c->QD), q, k, v,
                                                    pos, pos, sp, window, scale);
        } else if (!backward) {
            rc = c->be->attention(c->ctx, t2(B->att + t0 * c->QD, n, c->QD), q, k, v, pos, pos,
                                  window, scale);
        } else {
            rc = c->be->attention_backward(
                c->ctx, t3(B->dq + t0 * c->QD, n, c->nh, c->hd),
                t3(B->dk + t0 * c->KD, n, c->nkv, c->hd), t3(B->dv + t0 * c->KD, n, c->nkv, c->hd),
                t2(B->datt + t0 * c->QD, n, c->QD), q, k, v, pos, pos, window, scale);
        }
        if (rc != LT_OK) return rc;
        t0 += n;
    }
    return LT_OK;
}

/* The attention block of layer l from its input x ([N, H]), keeping every intermediate:
 * h1 = x + post_attention_layernorm(o). The same ops, in the same order, as gemma3.c (whose
 * linears, rmsnorm_add and qk_norm_rope, one launch for several of these, give their values). */
static lt_status attn_block_fwd(tb_ctx *c, int l, float *x) {
    const gemma3_config *cfg = &c->m->cfg;
    const gemma3_layer *w = &c->m->layers[l];
    const lt_backend *be = c->be;
    lt_ctx *ctx = c->ctx;
    tb_bufs *B = c->B;
    int64_t N = c->N, H = c->H;
    float eps = (float)cfg->rms_norm_eps;
    const gemma3_rope *rp = &cfg->rope[gemma3_layer_kind(cfg, l)];
    lt_tensor pos = lt_tensor_1d(LT_I32, B->pos, N);
    lt_status rc = LT_OK;

    lt_tensor a = tact(c, B->a, N, H);
    LT_TRY(be->rmsnorm(ctx, a, t2(x, N, H), w->input_layernorm, eps)); /* a: [N, H] */
    LT_TRY(lin_fwd(c, t2(B->qr, N, c->QD), a, &w->q_proj, module_seed(c->drop_seed, l, 0), 0));
    LT_TRY(lin_fwd(c, t2(B->kr, N, c->KD), a, &w->k_proj, module_seed(c->drop_seed, l, 1), 0));
    LT_TRY(lin_fwd(c, t2(B->v, N, c->KD), a, &w->v_proj, module_seed(c->drop_seed, l, 2), 0));
    /* qk-norm over each head's hd, then rope: qn/kn are what attention sees */
    LT_TRY(
        be->rmsnorm(ctx, t2(B->qn, N * c->nh, c->hd), t2(B->qr, N * c->nh, c->hd), w->q_norm, eps));
    LT_TRY(be->rmsnorm(ctx, t2(B->kn, N * c->nkv, c->hd), t2(B->kr, N * c->nkv, c->hd), w->k_norm,
                       eps));
    LT_TRY(be->rope(ctx, t3(B->qn, N, c->nh, c->hd), pos, (float)rp->theta, (float)rp->factor));
    LT_TRY(be->rope(ctx, t3(B->kn, N, c->nkv, c->hd), pos, (float)rp->theta, (float)rp->factor));
    LT_TRY(attend(c, l, 0)); /* att: [N, nh*hd] */
    LT_TRY(lin_fwd(c, t2(B->o, N, H), t2(B->att, N, c->QD), &w->o_proj,
                   module_seed(c->drop_seed, l, 3), 0));
    /* h1 = post_attention_layernorm(o) + x (fp32 addition commutes: the same bits as x + ...) */
    LT_TRY(be->rmsnorm(ctx, t2(B->h1, N, H), t2(B->o, N, H), w->post_attention_layernorm, eps));
    LT_TRY(be->add(ctx, t2(B->h1, N, H), t2(x, N, H)));
done:
    return rc;
}

/* The MLP on rows [r0, r0 + n) of h1, keeping its intermediates in the block scratch:
 * m = norm(h1), act = gelu(gate(m)) * up(m), f = down(act). */
static lt_status mlp_block_fwd(tb_ctx *c, int l, int64_t r0, int64_t n) {
    const gemma3_layer *w = &c->m->layers[l];
    tb_bufs *B = c->B;
    int64_t H = c->H, I = c->I;
    float eps = (float)c->m->cfg.rms_norm_eps;
    lt_tensor m = tact(c, B->m, n, H), gate = t2(B->gate, n, I), up = t2(B->up, n, I),
              act = tact(c, B->act, n, I);
    lt_status rc = LT_OK;
    LT_TRY(c->be->rmsnorm(c->ctx, m, t2(B->h1 + r0 * H, n, H), w->pre_feedforward_layernorm, eps));
    LT_TRY(lin_fwd(c, gate, m, &w->gate_proj, module_seed(c->drop_seed, l, 4), r0));
    LT_TRY(lin_fwd(c, up, m, &w->up_proj, module_seed(c->drop_seed, l, 5), r0));
    LT_TRY(c->be->geglu(c->ctx, act, gate, up));
    LT_TRY(lin_fwd(c, t2(B->f, n, H), act, &w->down_proj, module_seed(c->drop_seed, l, 6), r0));
done:
    return rc;
}

/* Layer l's output into out ([N, H]), rows block by block: out = h1 + post_ff_norm(f). */
static lt_status mlp_fwd(tb_ctx *c, int l, float *layer_out) {
    const gemma3_layer *w = &c->m->layers[l];
    int64_t H = c->H;
    lt_status rc = LT_OK;
    for (int64_t r0 = 0; r0 < c->N; r0 += c->R) {
        int64_t n = c->N - r0 < c->R ? c->N - r0 : c->R;
        lt_tensor out = t2(layer_out + r0 * H, n, H);
        LT_TRY(mlp_block_fwd(c, l, r0, n));
        LT_TRY(c->be->rmsnorm(c->ctx, out, t2(c->B->f, n, H), w->post_feedforward_layernorm,
                              (float)c->m->cfg.rms_norm_eps));
        LT_TRY(c->be->add(c->ctx, out, t2(c->B->h1 + r0 * H, n, H)));
    }
done:
    return rc;
}

static lt_tensor norm_grad(tb_ctx *c, int l, int k, int64_t n) {
    if (c->tr && c->tr->full && c->tr->ng && c->tr->ng->layers)
        return c->tr->ng->layers[l * NG_COUNT + k];
    return lt_tensor_1d(LT_F32, NULL, n);
}

/* Backward through layer l's MLP, block by block, each block recomputed just before.
 * In: B->dh = dL/d(layer output), B->h1. Out: B->dh = dL/dh1. */
static lt_status mlp_bwd(tb_ctx *c, int l) {
    const gemma3_config *cfg = &c->m->cfg;
    const gemma3_layer *w = &c->m->layers[l];
    const lt_backend *be = c->be;
    lt_ctx *ctx = c->ctx;
    tb_bufs *B = c->B;
    int64_t H = c->H, I = c->I;
    float eps = (float)cfg->rms_norm_eps;
    lt_status rc = LT_OK;
    for (int64_t r0 = 0; r0 < c->N; r0 += c->R) {
        int64_t n = c->N - r0 < c->R ? c->N - r0 : c->R;
        lt_tensor dh = t2(B->dh + r0 * H, n, H), dx = t2(B->dx + r0 * H, n, H),
                  dm = t2(B->dm, n, H), m = tact(c, B->m, n, H);
        LT_TRY(mlp_block_fwd(c, l, r0, n));
        /* h = h1 + post_ff(f): dh flows to h1 unchanged, plus through the branch */
        LT_TRY(be->rmsnorm_backward(ctx, dx, norm_grad(c, l, NG_POST_FF, H), dh, t2(B->f, n, H),
                                    w->post_feedforward_layernorm, eps)); /* dx = dL/df */
        LT_TRY(lin_bwd(c, t2(B->dact, n, I), dx, tact(c, B->act, n, I), &w->down_proj,
                       module_seed(c->drop_seed, l, 6), r0));
        /* dL/dgate, dL/dup feed only the matmuls: in fp32 in place over gate and up (backend.h
         * allows it), in bf16 over act (read for the last time above) and into dup16 */
        lt_tensor gate = t2(B->gate, n, I), up = t2(B->up, n, I), dgate = gate, dup = up;
        if (c->adt == LT_BF16) dgate = tact(c, B->act, n, I), dup = tact(c, B->dup16, n, I);
        LT_TRY(be->geglu_backward(ctx, dgate, dup, t2(B->dact, n, I), gate, up));
        LT_TRY(lin_bwd(c, dm, dgate, m, &w->gate_proj, module_seed(c->drop_seed, l, 4), r0));
        LT_TRY(lin_bwd(c, dx, dup, m, &w->up_proj, module_seed(c->drop_seed, l, 5), r0));
        LT_TRY(be->add(ctx, dm, dx)); /* dm = dL/dm */
        LT_TRY(be->rmsnorm_backward(ctx, dx, norm_grad(c, l, NG_PRE_FF, H), dm,
                                    t2(B->h1 + r0 * H, n, H), w->pre_feedforward_layernorm, eps));
        LT_TRY(be->add(ctx, dh, dx)); /* dh = dL/dh1 */
    }
done:
    return rc;
}

/* Backward through layer l's attention block (its intermediates must be the recompute from x).
 * In: B->dh = dL/dh1. Out: B->dh = dL/dx. */
static lt_status attn_block_bwd(tb_ctx *c, int l, const float *x) {
    const gemma3_config *cfg = &c->m->cfg;
    const gemma3_layer *w = &c->m->layers[l];
    const lt_backend *be = c->be;
    lt_ctx *ctx = c->ctx;
    tb_bufs *B = c->B;
    int64_t N = c->N, H = c->H;
    float eps = (float)cfg->rms_norm_eps;
    const gemma3_rope *rp = &cfg->rope[gemma3_layer_kind(cfg, l)];
    lt_tensor pos = lt_tensor_1d(LT_I32, B->pos, N);
    lt_tensor dh = t2(B->dh, N, H), dx = t2(B->dx, N, H), da = t2(B->da, N, H);
    lt_status rc = LT_OK;

    /* h1 = x + post_attn(o) */
    LT_TRY(be->rmsnorm_backward(ctx, dx, norm_grad(c, l, NG_POST_ATTN, H), dh, t2(B->o, N, H),
                                w->post_attention_layernorm, eps)); /* dx = dL/do */
    LT_TRY(lin_bwd(c, t2(B->datt, N, c->QD), dx, t2(B->att, N, c->QD), &w->o_proj,
                   module_seed(c->drop_seed, l, 3), 0));
    LT_TRY(attend(c, l, 1)); /* dq, dk, dv (roped) */
    LT_TRY(be->rope_backward(ctx, t3(B->dq, N, c->nh, c->hd), pos, (float)rp->theta,
                             (float)rp->factor));
    LT_TRY(be->rope_backward(ctx, t3(B->dk, N, c->nkv, c->hd), pos, (float)rp->theta,
                             (float)rp->factor));
    LT_TRY(be->rmsnorm_backward(ctx, t2(B->dq, N * c->nh, c->hd), norm_grad(c, l, NG_QNORM, c->hd),
                                t2(B->dq, N * c->nh, c->hd), t2(B->qr, N * c->nh, c->hd), w->q_norm,
                                eps));
    LT_TRY(be->rmsnorm_backward(ctx, t2(B->dk, N * c->nkv, c->hd), norm_grad(c, l, NG_KNORM, c->hd),
                                t2(B->dk, N * c->nkv, c->hd), t2(B->kr, N * c->nkv, c->hd),
                                w->k_norm, eps));
    lt_tensor a = tact(c, B->a, N, H);
    LT_TRY(lin_bwd(c, da, t2(B->dq, N, c->QD), a, &w->q_proj, module_seed(c->drop_seed, l, 0), 0));
    LT_TRY(lin_bwd(c, dx, t2(B->dk, N, c->KD), a, &w->k_proj, module_seed(c->drop_seed, l, 1), 0));
    LT_TRY(be->add(ctx, da, dx));
    LT_TRY(lin_bwd(c, dx, t2(B->dv, N, c->KD), a, &w->v_proj, module_seed(c->drop_seed, l, 2), 0));
    LT_TRY(be->add(ctx, da, dx)); /* da = dL/da */
    LT_TRY(be->rmsnorm_backward(ctx, dx, norm_grad(c, l, NG_INPUT, H), da, t2((float *)x, N, H),
                                w->input_layernorm, eps));
    LT_TRY(be->add(ctx, dh, dx)); /* dh = dL/dx */
done:
    return rc;
}

/* ---- buffers -------------------------------------------------------------------------------- */

typedef struct tb_want {
    void **p;
    size_t bytes;
} tb_want;

/* Floats rounded up to a multiple of 64 (256 bytes): the carved tensors stay aligned. */
static size_t al(size_t floats) {
    return (floats + 63) / 64 * 64;
}

/* Floats that k matmul-only activations take (two to a float in BF16). */
static size_t act_floats(const tb_ctx *c, size_t k) {
    return c->adt == LT_F32 ? k : (k + 1) / 2;
}

/* The layer block's tensors in order: a, o, h1 [N, H]; qr, qn, att [N, QD]; kr, kn, v [N, KD];
 * then the scratch. Returns its size in floats; with B, points the tensors into it. */
static size_t layer_carve(const tb_ctx *c, int grads, tb_bufs *B) {
    size_t N = (size_t)c->N, H = (size_t)c->H, I = (size_t)c->I, QD = (size_t)c->QD,
           KD = (size_t)c->KD, R = (size_t)c->R;
    float **ts[9] = {B ? &B->a : NULL,  B ? &B->o : NULL,  B ? &B->h1 : NULL,
                     B ? &B->qr : NULL, B ? &B->qn : NULL, B ? &B->att : NULL,
                     B ? &B->kr : NULL, B ? &B->kn : NULL, B ? &B->v : NULL};
    size_t sz[9] = {
        act_floats(c, N * H), N * H, N * H, N * QD, N * QD, N * QD, N * KD, N * KD, N * KD};
    size_t off = 0;
    for (int i = 0; i < 9; i++) {
        if (B) *ts[i] = B->layer + off;
        off += al(sz[i]);
    }
    /* the MLP block (m, f, dm [R, H]; gate, up, act, dact [R, I]) or the attention gradients */
    size_t dup16 = grads && c->adt != LT_F32 ? al(act_floats(c, R * I)) : 0;
    size_t mlp = (grads ? 2 : 1) * al(R * H) + al(act_floats(c, R * H)) +
                 (grads ? 3 : 2) * al(R * I) + al(act_floats(c, R * I)) + dup16;
    size_t attn_grads = grads ? 2 * al(N * QD) + 2 * al(N * KD) + al(N * H) : 0;
    if (B) {
        float *scratch = B->layer + off, *p = scratch;
        B->m = p, p += al(act_floats(c, R * H));
        B->f = p, p += al(R * H);
        B->gate = p, p += al(R * I);
        B->up = p, p += al(R * I);
        B->act = p, p += al(act_floats(c, R * I));
        if (grads) {
            B->dact = p, p += al(R * I);
            B->dup16 = dup16 ? p : NULL, p += dup16;
            B->dm = p;
            p = scratch; /* the attention gradients: alive only after the MLP's backward */
            B->dq = p, p += al(N * QD);
            B->datt = p, p += al(N * QD);
            B->dk = p, p += al(N * KD);
            B->dv = p, p += al(N * KD);
            B->da = p;
        }
    }
    return off + (mlp > attn_grads ? mlp : attn_grads);
}

/* The buffers a call needs, in bytes (layer_carve points into B->layer). Returns the count
 * written to want (at most 32). */
static int bufs_plan(const tb_ctx *c, int grads, tb_want *want) {
    tb_bufs *B = c->B;
    size_t N = (size_t)c->N, H = (size_t)c->H, f = sizeof(float);
    B->layer_bytes = layer_carve(c, grads, NULL) * f;
    int n = 0;
#define WANT(ptr, b) want[n++] = (tb_want){(void **)&(ptr), (b)}
    WANT(B->ids, N * 4);
    WANT(B->pos, N * 4);
    WANT(B->tg, N * 4);
    if (c->b && c->b->n_image_tokens > 0) {
        WANT(B->span, N * 2 * 4);
        WANT(B->img, (size_t)c->b->n_image_tokens * H * f);
    }
    /* the loss weights and log-probabilities: counted by gemma3_train_bytes (no batch), held
     * only by a batch that gives or asks for them */
    if (!c->b || c->b->weights) WANT(B->rw, N * f);
    if (!c->b || c->b->logp) WANT(B->lp, N * f);
    WANT(B->res[0], N * H * f);
    WANT(B->res[1], N * H * f);
    WANT(B->layer, B->layer_bytes);
    if (grads) {
        WANT(B->dh, N * H * f);
        WANT(B->dx, N * H * f);
    }
    int drop = c->tr && !c->tr->full && c->tr->dropout > 0.0f && c->training;
    if (drop) {
        size_t md = (size_t)c->maxdim, r = (size_t)(c->rmax > 0 ? c->rmax : 1);
        WANT(B->s_in, N * md * f);
        WANT(B->s_in2, N * md * f);
        WANT(B->s_out, N * md * f);
        WANT(B->s_r, N * r * f);
        WANT(B->s_r2, N * r * f);
    }
#undef WANT
    return n;
}

static void bufs_release(lt_ctx *ctx, tb_bufs *B) {
    /* every copy still reading or writing these buffers must be done first */
    if (ctx->be->stash_wait) ctx->be->stash_wait(ctx);
    if (B->layer_in) {
        if (B->layer_in_on_host)
            ctx->be->host_release(ctx, B->layer_in);
        else
            ctx->be->release(ctx, B->layer_in);
    }
    void *owned[] = {B->ids,    B->pos,   B->tg,   B->rw,   B->lp,   B->res[0],
                     B->res[1], B->layer, B->dh,   B->dx,   B->s_in, B->s_in2,
                     B->s_out,  B->s_r,   B->s_r2, B->span, B->img};
    free(B->span_host);
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++)
        ctx->be->release(ctx, owned[i]);
    memset(B, 0, sizeof *B);
}

static lt_status bufs_get(tb_ctx *c, int grads) {
    tb_bufs *B = c->B;
    lt_ctx *ctx = c->ctx;
    memset(B, 0, sizeof *B);
    tb_want want[32];
    int n = bufs_plan(c, grads, want);
    for (int i = 0; i < n; i++) {
        *want[i].p = ctx->be->alloc(ctx, want[i].bytes);
        if (!*want[i].p) return LT_ERR_MEMORY;
    }
    layer_carve(c, grads, B);
    if (grads) {
        size_t bytes = (size_t)c->m->cfg.num_hidden_layers * (size_t)(c->N * c->H) * sizeof(float);
        B->layer_in = ctx->be->host_alloc(ctx, bytes);
        B->layer_in_on_host = B->layer_in != NULL;
        if (!B->layer_in) B->layer_in = ctx->be->alloc(ctx, bytes); /* no host memory: device */
        if (!B->layer_in) return LT_ERR_MEMORY;
    }
    return LT_OK;
}

/* The dtype of the matmul-only activations: BF16 when the backend's matmuls read bf16 from
 * bf16 weights (linear would round them to that anyway: the same bits, no cast, half the
 * memory) and no LoRA dropout runs (dropout reads them as fp32); F32 otherwise. Full
 * fine-tuning trains fp32 copies of the weights, whose matmuls read fp32: F32 then. */
static lt_dtype act_dtype(lt_ctx *ctx, const gemma3_model *m, const gemma3_trainable *tr,
                          int training) {
    int drop = training && tr && !tr->full && tr->dropout > 0.0f;
    int full = tr && tr->full;
    int bf16 = ctx && ctx->be->bf16_activations && ctx->be->bf16_activations(ctx);
    return bf16 && !drop && !full && m->dtype == LT_BF16 ? LT_BF16 : LT_F32;
}

/* Sizes and blocking of one call (no allocation). */
static void tb_dims(tb_ctx *c, const gemma3_config *cfg, int64_t N, const gemma3_trainable *tr) {
    c->N = N;
    c->H = cfg->hidden_size;
    c->I = cfg->intermediate_size;
    c->nh = cfg->num_attention_heads;
    c->nkv = cfg->num_key_value_heads;
    c->hd = cfg->head_dim;
    c->QD = c->nh * c->hd;
    c->KD = c->nkv * c->hd;
    c->maxdim = c->I > c->H ? c->I : c->H;
    if (c->QD > c->maxdim) c->maxdim = c->QD;
    c->rmax = tr ? tr->max_rank : 0;
    c->R = mlp_block_rows(N, c->I);
}

/* A batch with images: checks the image tokens against b->n_image_tokens and the backend's
 * ops, fills B->span_host (per sample positions: each run of image tokens sees its whole run,
 * the rule gemma3_forward_images applies) and *ids_host (b->ids with image tokens past the
 * embedding as 0). */
static lt_status images_prepare(tb_ctx *c, const int32_t *pos, int32_t **ids_host) {
    const gemma3_config *cfg = &c->m->cfg;
    const train_batch *b = c->b;
    lt_ctx *ctx = c->ctx;
    int64_t N = c->N;
    int image = cfg->vision.image_token_id;
    if (!cfg->vision.present || !b->image_embeds)
        return lt_fail(ctx->err, LT_ERR_ARG, "train: image rows given to a model without images");
    if (!c->be->attention_span || !c->be->attention_span_backward)
        return lt_fail(ctx->err, LT_ERR_STATE,
                       "train: the %s backend has no attention_span%s op, which training on "
                       "image blocks needs (load the model with device=cpu)",
                       c->be->name, c->be->attention_span ? "_backward" : "");
    int64_t k = 0;
    for (int64_t t = 0; t < N; t++)
        k += b->ids[t] == image;
    if (k != b->n_image_tokens)
        return lt_fail(ctx->err, LT_ERR_ARG,
                       "train: the batch holds %lld image tokens (id %d) but %d image rows",
                       (long long)k, image, b->n_image_tokens);
    c->B->span_host = malloc(sizeof(int32_t) * 2 * (size_t)N);
    *ids_host = malloc(sizeof(int32_t) * (size_t)N);
    if (!c->B->span_host || !*ids_host) return lt_fail(ctx->err, LT_ERR_MEMORY, "out of memory");
    int32_t *sp = c->B->span_host;
    for (int64_t t = 0; t < N;) {
        if (b->ids[t] != image) {
            (*ids_host)[t] = b->ids[t];
            sp[2 * t] = 0, sp[2 * t + 1] = -1;
            t++;
            continue;
        }
        int64_t e = t; /* a run inside one sample (positions restart at 0 per sample) */
        while (e < N && b->ids[e] == image && (e == t || pos[e] == pos[e - 1] + 1))
            e++;
        for (int64_t u = t; u < e; u++) {
            (*ids_host)[u] = image >= cfg->vocab_size ? 0 : image;
            sp[2 * u] = pos[t];
            sp[2 * u + 1] = pos[e - 1];
        }
        t = e;
    }
    return LT_OK;
}

void gemma3_train_bytes(const gemma3_model *m, lt_ctx *ctx, const gemma3_trainable *tr, int64_t N,
                        int dropout, size_t *device, size_t *host) {
    tb_bufs B;
    tb_ctx c = {0};
    c.m = m;
    c.tr = tr;
    c.B = &B;
    c.training = dropout;
    tb_dims(&c, &m->cfg, N, tr);
    c.adt = act_dtype(ctx, m, tr, dropout);
    tb_want want[32];
    int n = bufs_plan(&c, 1, want);
    *device = 0;
    for (int i = 0; i < n; i++)
        *device += want[i].bytes;
    *host = (size_t)m->cfg.num_hidden_layers * (size_t)(N * c.H) * sizeof(float);
}

lt_status gemma3_train_batch(const gemma3_model *m, lt_ctx *ctx, const gemma3_trainable *tr,
                             const train_batch *b, float grad_scale, int grads,
                             uint64_t dropout_seed, double *loss_sum) {
    const gemma3_config *cfg = &m->cfg;
    const lt_backend *be = ctx->be;
    if (b->N <= 0 || b->n_seg <= 0) {
        return lt_fail(ctx->err, LT_ERR_ARG, "train: empty micro-batch");
    }
    float lscale = b->logit_scale == 0.0f ? 1.0f : b->logit_scale;
    if (!(lscale > 0.0f) || !isfinite(lscale)) {
        return lt_fail(ctx->err, LT_ERR_ARG, "train: logit_scale must be finite and positive");
    }
    const char *missing = lt_backend_missing_training_op(be);
    if (missing) {
        return lt_fail(ctx->err, LT_ERR_STATE, "training: the %s backend has no %s op", be->name,
                       missing);
    }
    tb_bufs B;
    tb_ctx c = {0};
    c.m = m;
    c.ctx = ctx;
    c.be = be;
    c.tr = tr;
    c.b = b;
    c.B = &B;
    c.drop_seed = dropout_seed;
    c.training = dropout_seed != 0; /* LoRA dropout on only when the caller gives a seed */
    tb_dims(&c, cfg, b->N, tr);
    c.adt = act_dtype(ctx, m, tr, c.training);
    int64_t N = c.N, H = c.H, L = cfg->num_hidden_layers;
    size_t row_bytes = sizeof(float) * (size_t)(N * H);
    lt_status rc = bufs_get(&c, grads);
    if (rc != LT_OK) {
        bufs_release(ctx, &B);
        return lt_fail(ctx->err, LT_ERR_MEMORY,
                       "out of memory for the activations of a micro-batch of %lld tokens "
                       "(lower batch= or max_seq=)",
                       (long long)N);
    }
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)N);
    if (!pos) {
        bufs_release(ctx, &B);
        return lt_fail(ctx->err, LT_ERR_MEMORY, "out of memory");
    }
    /* positions restart at 0 for every packed sample */
    for (int s = 0, t = 0; s < b->n_seg; s++)
        for (int i = 0; i < b->seg_len[s]; i++)
            pos[t++] = i;
    const lt_weight *head = gemma3_head(m);
    float eps = (float)cfg->rms_norm_eps;
    int32_t *ids_host = NULL; /* images: image tokens past the embedding look up row 0 */
    if (b->n_image_tokens > 0) {
        rc = images_prepare(&c, pos, &ids_host);
        if (rc != LT_OK) goto done;
    }
    LT_TRY(be->upload(ctx, B.ids, ids_host ? ids_host : b->ids, sizeof(int32_t) * (size_t)N));
    if (b->n_image_tokens > 0) {
        LT_TRY(be->upload(ctx, B.span, B.span_host, sizeof(int32_t) * 2 * (size_t)N));
        LT_TRY(be->upload(ctx, B.img, b->image_embeds,
                          sizeof(float) * (size_t)b->n_image_tokens * (size_t)H));
    }
    LT_TRY(be->upload(ctx, B.pos, pos, sizeof(int32_t) * (size_t)N));
    LT_TRY(be->upload(ctx, B.tg, b->targets, sizeof(int32_t) * (size_t)N));
    if (b->weights) LT_TRY(be->upload(ctx, B.rw, b->weights, sizeof(float) * (size_t)N));
    lt_tensor ids = lt_tensor_1d(LT_I32, B.ids, N);
    float escale = gemma3_embed_scale(m);

    /* forward: the residual stream starts as E[ids]·sqrt(H); each layer's input is stashed on
     * the way out while the layer's MLP and the next layer's attention run (its output goes to
     * the other buffer). stash_wait waits for every copy issued, so each copy is issued after
     * the wait that its layer's MLP needs, not before it. */
    float **res = B.res;
    LT_TRY(be->embedding(ctx, t2(res[0], N, H), ids, &m->embed_tokens, escale));
    for (int64_t t = 0, j = 0; b->n_image_tokens > 0 && t < N;) { /* image rows replace them */
        if (b->ids[t] != cfg->vision.image_token_id) {
            t++;
            continue;
        }
        int64_t e = t;
        while (e < N && b->ids[e] == cfg->vision.image_token_id)
            e++;
        LT_TRY(be->copy(ctx, res[0] + t * H, B.img + j * H, sizeof(float) * (size_t)((e - t) * H)));
        j += e - t;
        t = e;
    }
    for (int l = 0; l < L; l++) {
        float *x = res[l & 1], *out = res[(l + 1) & 1];
        LT_TRY(attn_block_fwd(&c, l, x));
        if (grads) {
            LT_TRY(be->stash_wait(ctx)); /* out was layer l - 1's input: its copy must be done */
            LT_TRY(be->stash_out(ctx, B.layer_in + (size_t)l * (size_t)(N * H), x, row_bytes));
        }
        LT_TRY(mlp_fwd(&c, l, out));
    }
    float *hfin = res[L & 1], *hn = res[(L + 1) & 1];
    LT_TRY(be->stash_wait(ctx)); /* hn was the last layer's input */
    LT_TRY(be->rmsnorm(ctx, t2(hn, N, H), t2(hfin, N, H), m->norm, eps)); /* hn: [N, H] */
    /* fused loss: Σ w·CE and dhn = grad_scale·dΣw·CE/dhn (into B.dx), its logits chunks in the
     * layer block, idle until the backward */
    be->lend(ctx, B.layer, B.layer_bytes);
    rc = be->cross_entropy(ctx, loss_sum, grads ? t2(B.dx, N, H) : none2(N, H), t2(hn, N, H), head,
                           lt_tensor_1d(LT_I32, B.tg, N), lt_tensor_1d(LT_F32, B.rw, N),
                           lt_tensor_1d(LT_F32, B.lp, N), lscale, grad_scale);
    be->lend(ctx, NULL, 0);
    if (rc == LT_OK && b->logp) rc = be->download(ctx, b->logp, B.lp, sizeof(float) * (size_t)N);
    if (rc != LT_OK || !grads) goto done;

    /* backward: final norm, then each layer from the top, recomputed from its input, which
     * comes back into res[l & 1] while layer l + 1 runs (hn, then hfin, are free by then) */
    {
        lt_tensor fin = (tr && tr->full && tr->ng) ? tr->ng->final : lt_tensor_1d(LT_F32, NULL, H);
        LT_TRY(be->rmsnorm_backward(ctx, t2(B.dh, N, H), fin, t2(B.dx, N, H), t2(hfin, N, H),
                                    m->norm, eps));
    }
    LT_TRY(be->stash_in(ctx, res[(L - 1) & 1], B.layer_in + (size_t)(L - 1) * (size_t)(N * H),
                        row_bytes));
    for (int l = (int)L - 1; l >= 0; l--) {
        float *x_in = res[l & 1];
        LT_TRY(be->stash_wait(ctx)); /* layer l's input has arrived */
        if (l > 0) /* the other buffer's last reader (layer l + 1, or the final norm) is queued */
            LT_TRY(be->stash_in(ctx, res[(l - 1) & 1],
                                B.layer_in + (size_t)(l - 1) * (size_t)(N * H), row_bytes));
        LT_TRY(attn_block_fwd(&c, l, x_in));
        LT_TRY(mlp_bwd(&c, l));
        LT_TRY(attn_block_bwd(&c, l, x_in));
    }
    for (int64_t t = 0, j = 0; b->image_grads && b->n_image_tokens > 0 && t < N;) {
        if (b->ids[t] != cfg->vision.image_token_id) { /* dh = dL/d(the embedded rows) */
            t++;
            continue;
        }
        int64_t e = t;
        while (e < N && b->ids[e] == cfg->vision.image_token_id)
            e++;
        LT_TRY(be->download(ctx, b->image_grads + j * H, B.dh + t * H,
                            sizeof(float) * (size_t)((e - t) * H)));
        j += e - t;
        t = e;
    }
    if (m->embed_tokens.grad_w.data && be->embedding_backward) {
        for (int64_t t = 0; b->n_image_tokens > 0 && t < N; t++) /* image rows: no embedding */
            if (b->ids[t] == cfg->vision.image_token_id)
                LT_TRY(be->fill(ctx, t2(B.dh + t * H, 1, H), 0.0f));
        LT_TRY(be->embedding_backward(ctx, &m->embed_tokens, t2(B.dh, N, H), ids, escale));
    }
done:
    free(ids_host);
    free(pos);
    bufs_release(ctx, &B);
    return rc;
}
