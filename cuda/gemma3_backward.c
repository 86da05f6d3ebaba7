/* gemma3_backward.c — one training micro-batch of Gemma 3: forward, fused loss, backward.
 *
 * The samples of a micro-batch are packed into one row of N tokens with no padding: every
 * matmul, norm and activation runs on all N tokens at once, while attention runs per sample
 * (positions restart at 0 for each sample, so a sample never sees another one). The
 * forward keeps only each layer's input (activation checkpointing, DESIGN §5); the backward
 * recomputes one layer at a time from its input, keeping that layer's intermediates, then
 * walks back through it. The layer code follows gemma3.c's layer_forward op for op (same
 * ops, same order), so the loss here equals the inference forward's.
 *
 * LoRA dropout (when > 0) runs the adapter path as separate ops with a mask that is a pure
 * function of a seed, so the recompute and the backward see the forward's mask.
 * This file owns no state: buffers live for one call. It must not change the model.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/grad.h"
#include "cuda/train.h"

#define TRY(x)                                                                                     \
    do {                                                                                           \
        rc = (x);                                                                                  \
        if (rc != LT_OK) goto done;                                                                \
    } while (0)

/* Everything one call needs, in backend memory. */
typedef struct tb_bufs {
    int32_t *ids, *pos, *tg;
    float *layer_in;      /* [L, N, H] checkpoints */
    float *h, *hfin, *hn; /* [N, H] residual, residual after the last layer, final norm */
    /* one layer's intermediates */
    float *a, *qr, *qn, *kr, *kn, *v, *att, *o, *h1, *m, *gate, *up, *act, *f, *tmp;
    /* gradients */
    float *dh, *dx, *da, *dq, *dk, *dv, *datt, *dgate, *dup, *dact;
    /* dropout scratch: [N, max(in, out)] x3 and [N, r] x2 */
    float *s_in, *s_in2, *s_out, *s_r, *s_r2;
} tb_bufs;

typedef struct tb_ctx {
    const gemma3_model *m;
    lt_ctx *ctx;
    const lt_backend *be;
    lt_adapters *ad;
    const train_batch *b;
    tb_bufs *B;
    int64_t N, H, I, nh, nkv, hd, QD, KD, maxdim;
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

static uint64_t module_seed(uint64_t seed, int layer, int k) {
    return seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(layer * 16 + k + 1));
}

static int uses_dropout(const tb_ctx *c, const lt_weight *w) {
    return c->training && w->lora && w->lora->enabled && w->lora->dropout > 0.0f && w->lora->a.data;
}

/* y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ. x: [N, in], y: [N, out]. */
static lt_status lin_fwd(tb_ctx *c, lt_tensor y, lt_tensor x, const lt_weight *w, uint64_t seed) {
    lt_status rc;
    if (!uses_dropout(c, w)) return c->be->linear(c->ctx, y, x, w);
    lt_lora *lo = w->lora;
    int64_t in = w->w.shape[1], out = w->w.shape[0], r = lo->a.shape[0];
    lo->enabled = 0;
    rc = c->be->linear(c->ctx, y, x, w); /* base path */
    lo->enabled = 1;
    if (rc != LT_OK) return rc;
    lt_weight wa = {lo->a, NULL, {0}}, wb = {lo->b, NULL, {0}};
    lt_tensor xd = t2(c->B->s_in, c->N, in), u = t2(c->B->s_r, c->N, r),
              y2 = t2(c->B->s_out, c->N, out);
    if ((rc = c->be->dropout(c->ctx, xd, x, lo->dropout, 1.0f, seed)) != LT_OK) return rc;
    if ((rc = c->be->linear(c->ctx, u, xd, &wa)) != LT_OK) return rc; /* u: [N, r] */
    if ((rc = c->be->linear(c->ctx, y2, u, &wb)) != LT_OK) return rc; /* y2: [N, out] */
    if ((rc = c->be->scale(c->ctx, y2, lo->scale)) != LT_OK) return rc;
    return c->be->add(c->ctx, y, y2);
}

/* dx = dL/dx (written; data NULL = not needed), adapter/weight grads accumulated. */
static lt_status lin_bwd(tb_ctx *c, lt_tensor dx, lt_tensor dy, lt_tensor x, const lt_weight *w,
                         uint64_t seed) {
    lt_status rc;
    if (!uses_dropout(c, w)) return c->be->linear_backward(c->ctx, dx, dy, x, w);
    lt_lora *lo = w->lora;
    int64_t in = w->w.shape[1], out = w->w.shape[0], r = lo->a.shape[0];
    lo->enabled = 0;
    rc = c->be->linear_backward(c->ctx, dx, dy, x, w); /* base path: dx = dy·W (+ grad_w) */
    lo->enabled = 1;
    if (rc != LT_OK) return rc;
    lt_weight wa = {lo->a, NULL, lo->grad_a}, wb = {lo->b, NULL, lo->grad_b};
    lt_tensor xd = t2(c->B->s_in, c->N, in), u = t2(c->B->s_r, c->N, r);
    lt_tensor dys = t2(c->B->s_out, c->N, out), du = t2(c->B->s_r2, c->N, r),
              dxd = t2(c->B->s_in2, c->N, in);
    if ((rc = c->be->dropout(c->ctx, xd, x, lo->dropout, 1.0f, seed)) != LT_OK) return rc;
    if ((rc = c->be->linear(c->ctx, u, xd, &wa)) != LT_OK) return rc;
    if ((rc = c->be->copy(c->ctx, dys.data, dy.data, lt_tensor_bytes(&dys))) != LT_OK) return rc;
    if ((rc = c->be->scale(c->ctx, dys, lo->scale)) != LT_OK) return rc;
    /* through B: du = s·dy·B, grad_B += s·dyᵀ·u; through A: dxd = du·A, grad_A += duᵀ·xd */
    if ((rc = c->be->linear_backward(c->ctx, du, dys, u, &wb)) != LT_OK) return rc;
    if ((rc = c->be->linear_backward(c->ctx, dx.data ? dxd : none2(c->N, in), du, xd, &wa)) !=
        LT_OK)
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
        if (!backward) {
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

/* One decoder layer from x = B->h ([N, H]) keeping every intermediate; B->h becomes the
 * layer's output. The same ops, in the same order, as gemma3.c's layer_forward. */
static lt_status layer_fwd(tb_ctx *c, int l) {
    const gemma3_config *cfg = &c->m->cfg;
    const gemma3_layer *w = &c->m->layers[l];
    const lt_backend *be = c->be;
    lt_ctx *ctx = c->ctx;
    tb_bufs *B = c->B;
    int64_t N = c->N, H = c->H, I = c->I;
    float eps = (float)cfg->rms_norm_eps;
    const gemma3_rope *rp = &cfg->rope[gemma3_layer_kind(cfg, l)];
    lt_tensor pos = lt_tensor_1d(LT_I32, B->pos, N);
    lt_status rc = LT_OK;

    lt_tensor h = t2(B->h, N, H), a = t2(B->a, N, H);
    TRY(be->rmsnorm(ctx, a, h, w->input_layernorm, eps)); /* a: [N, H] */
    TRY(lin_fwd(c, t2(B->qr, N, c->QD), a, &w->q_proj, module_seed(c->drop_seed, l, 0)));
    TRY(lin_fwd(c, t2(B->kr, N, c->KD), a, &w->k_proj, module_seed(c->drop_seed, l, 1)));
    TRY(lin_fwd(c, t2(B->v, N, c->KD), a, &w->v_proj, module_seed(c->drop_seed, l, 2)));
    /* qk-norm over each head's hd, then rope: qn/kn are what attention sees */
    TRY(be->rmsnorm(ctx, t2(B->qn, N * c->nh, c->hd), t2(B->qr, N * c->nh, c->hd), w->q_norm, eps));
    TRY(be->rmsnorm(ctx, t2(B->kn, N * c->nkv, c->hd), t2(B->kr, N * c->nkv, c->hd), w->k_norm,
                    eps));
    TRY(be->rope(ctx, t3(B->qn, N, c->nh, c->hd), pos, (float)rp->theta, (float)rp->factor));
    TRY(be->rope(ctx, t3(B->kn, N, c->nkv, c->hd), pos, (float)rp->theta, (float)rp->factor));
    TRY(attend(c, l, 0)); /* att: [N, nh*hd] */
    TRY(lin_fwd(c, t2(B->o, N, H), t2(B->att, N, c->QD), &w->o_proj,
                module_seed(c->drop_seed, l, 3)));
    /* h1 = h + post_attention_layernorm(o) */
    TRY(be->rmsnorm(ctx, t2(B->tmp, N, H), t2(B->o, N, H), w->post_attention_layernorm, eps));
    TRY(be->copy(ctx, B->h1, B->h, sizeof(float) * (size_t)(N * H)));
    TRY(be->add(ctx, t2(B->h1, N, H), t2(B->tmp, N, H)));
    /* MLP: m = norm(h1); act = gelu(gate(m)) * up(m); f = down(act) */
    TRY(be->rmsnorm(ctx, t2(B->m, N, H), t2(B->h1, N, H), w->pre_feedforward_layernorm, eps));
    TRY(lin_fwd(c, t2(B->gate, N, I), t2(B->m, N, H), &w->gate_proj,
                module_seed(c->drop_seed, l, 4)));
    TRY(lin_fwd(c, t2(B->up, N, I), t2(B->m, N, H), &w->up_proj, module_seed(c->drop_seed, l, 5)));
    TRY(be->geglu(ctx, t2(B->act, N, I), t2(B->gate, N, I), t2(B->up, N, I)));
    TRY(lin_fwd(c, t2(B->f, N, H), t2(B->act, N, I), &w->down_proj,
                module_seed(c->drop_seed, l, 6)));
    /* h = h1 + post_feedforward_layernorm(f) */
    TRY(be->rmsnorm(ctx, t2(B->tmp, N, H), t2(B->f, N, H), w->post_feedforward_layernorm, eps));
    TRY(be->copy(ctx, B->h, B->h1, sizeof(float) * (size_t)(N * H)));
    TRY(be->add(ctx, h, t2(B->tmp, N, H)));
done:
    return rc;
}

static lt_tensor norm_grad(tb_ctx *c, int l, int k, int64_t n) {
    if (c->ad && c->ad->full && c->ad->ng.layers) return c->ad->ng.layers[l * NG_COUNT + k];
    return lt_tensor_1d(LT_F32, NULL, n);
}

/* Backward through layer l (its intermediates must be the recompute from its input).
 * In: B->dh = dL/d(layer output). Out: B->dh = dL/d(layer input). */
static lt_status layer_bwd(tb_ctx *c, int l, const float *x_in) {
    const gemma3_config *cfg = &c->m->cfg;
    const gemma3_layer *w = &c->m->layers[l];
    const lt_backend *be = c->be;
    lt_ctx *ctx = c->ctx;
    tb_bufs *B = c->B;
    int64_t N = c->N, H = c->H, I = c->I;
    float eps = (float)cfg->rms_norm_eps;
    const gemma3_rope *rp = &cfg->rope[gemma3_layer_kind(cfg, l)];
    lt_tensor pos = lt_tensor_1d(LT_I32, B->pos, N);
    lt_tensor dh = t2(B->dh, N, H), dx = t2(B->dx, N, H), da = t2(B->da, N, H);
    lt_status rc = LT_OK;

    /* MLP block: h = h1 + post_ff(f). dh flows to h1 unchanged, plus through the branch. */
    TRY(be->rmsnorm_backward(ctx, dx, norm_grad(c, l, NG_POST_FF, H), dh, t2(B->f, N, H),
                             w->post_feedforward_layernorm, eps)); /* dx = dL/df */
    TRY(lin_bwd(c, t2(B->dact, N, I), dx, t2(B->act, N, I), &w->down_proj,
                module_seed(c->drop_seed, l, 6)));
    TRY(be->geglu_backward(ctx, t2(B->dgate, N, I), t2(B->dup, N, I), t2(B->dact, N, I),
                           t2(B->gate, N, I), t2(B->up, N, I)));
    TRY(lin_bwd(c, da, t2(B->dgate, N, I), t2(B->m, N, H), &w->gate_proj,
                module_seed(c->drop_seed, l, 4)));
    TRY(lin_bwd(c, dx, t2(B->dup, N, I), t2(B->m, N, H), &w->up_proj,
                module_seed(c->drop_seed, l, 5)));
    TRY(be->add(ctx, da, dx)); /* da = dL/dm */
    TRY(be->rmsnorm_backward(ctx, dx, norm_grad(c, l, NG_PRE_FF, H), da, t2(B->h1, N, H),
                             w->pre_feedforward_layernorm, eps));
    TRY(be->add(ctx, dh, dx)); /* dh = dL/dh1 */

    /* attention block: h1 = h + post_attn(o) */
    TRY(be->rmsnorm_backward(ctx, dx, norm_grad(c, l, NG_POST_ATTN, H), dh, t2(B->o, N, H),
                             w->post_attention_layernorm, eps)); /* dx = dL/do */
    TRY(lin_bwd(c, t2(B->datt, N, c->QD), dx, t2(B->att, N, c->QD), &w->o_proj,
                module_seed(c->drop_seed, l, 3)));
    TRY(attend(c, l, 1)); /* dq, dk, dv (roped) */
    TRY(be->rope_backward(ctx, t3(B->dq, N, c->nh, c->hd), pos, (float)rp->theta,
                          (float)rp->factor));
    TRY(be->rope_backward(ctx, t3(B->dk, N, c->nkv, c->hd), pos, (float)rp->theta,
                          (float)rp->factor));
    TRY(be->rmsnorm_backward(ctx, t2(B->dq, N * c->nh, c->hd), norm_grad(c, l, NG_QNORM, c->hd),
                             t2(B->dq, N * c->nh, c->hd), t2(B->qr, N * c->nh, c->hd), w->q_norm,
                             eps));
    TRY(be->rmsnorm_backward(ctx, t2(B->dk, N * c->nkv, c->hd), norm_grad(c, l, NG_KNORM, c->hd),
                             t2(B->dk, N * c->nkv, c->hd), t2(B->kr, N * c->nkv, c->hd), w->k_norm,
                             eps));
    lt_tensor a = t2(B->a, N, H);
    TRY(lin_bwd(c, da, t2(B->dq, N, c->QD), a, &w->q_proj, module_seed(c->drop_seed, l, 0)));
    TRY(lin_bwd(c, dx, t2(B->dk, N, c->KD), a, &w->k_proj, module_seed(c->drop_seed, l, 1)));
    TRY(be->add(ctx, da, dx));
    TRY(lin_bwd(c, dx, t2(B->dv, N, c->KD), a, &w->v_proj, module_seed(c->drop_seed, l, 2)));
    TRY(be->add(ctx, da, dx)); /* da = dL/da */
    TRY(be->rmsnorm_backward(ctx, dx, norm_grad(c, l, NG_INPUT, H), da, t2((float *)x_in, N, H),
                             w->input_layernorm, eps));
    TRY(be->add(ctx, dh, dx)); /* dh = dL/dx_in */
done:
    return rc;
}

static void bufs_release(lt_ctx *ctx, tb_bufs *B) {
    void **p = (void **)B;
    for (size_t i = 0; i < sizeof *B / sizeof(void *); i++)
        ctx->be->release(ctx, p[i]);
    memset(B, 0, sizeof *B);
}

static lt_status bufs_get(tb_ctx *c, int grads) {
    tb_bufs *B = c->B;
    lt_ctx *ctx = c->ctx;
    size_t N = (size_t)c->N, H = (size_t)c->H, I = (size_t)c->I, QD = (size_t)c->QD,
           KD = (size_t)c->KD;
    size_t L = (size_t)c->m->cfg.num_hidden_layers, f = sizeof(float);
    memset(B, 0, sizeof *B);
    struct {
        void **p;
        size_t bytes;
        int need;
    } want[] = {
        {(void **)&B->ids, N * 4, 1},
        {(void **)&B->pos, N * 4, 1},
        {(void **)&B->tg, N * 4, 1},
        {(void **)&B->layer_in, L * N * H * f, grads},
        {(void **)&B->h, N * H * f, 1},
        {(void **)&B->hfin, N * H * f, grads},
        {(void **)&B->hn, N * H * f, 1},
        {(void **)&B->a, N * H * f, 1},
        {(void **)&B->qr, N * QD * f, 1},
        {(void **)&B->qn, N * QD * f, 1},
        {(void **)&B->kr, N * KD * f, 1},
        {(void **)&B->kn, N * KD * f, 1},
        {(void **)&B->v, N * KD * f, 1},
        {(void **)&B->att, N * QD * f, 1},
        {(void **)&B->o, N * H * f, 1},
        {(void **)&B->h1, N * H * f, 1},
        {(void **)&B->m, N * H * f, 1},
        {(void **)&B->gate, N * I * f, 1},
        {(void **)&B->up, N * I * f, 1},
        {(void **)&B->act, N * I * f, 1},
        {(void **)&B->f, N * H * f, 1},
        {(void **)&B->tmp, N * H * f, 1},
        {(void **)&B->dh, N * H * f, grads},
        {(void **)&B->dx, N * H * f, grads},
        {(void **)&B->da, N * H * f, grads},
        {(void **)&B->dq, N * QD * f, grads},
        {(void **)&B->dk, N * KD * f, grads},
        {(void **)&B->dv, N * KD * f, grads},
        {(void **)&B->datt, N * QD * f, grads},
        {(void **)&B->dgate, N * I * f, grads},
        {(void **)&B->dup, N * I * f, grads},
        {(void **)&B->dact, N * I * f, grads},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        if (!want[i].need) continue;
        *want[i].p = ctx->be->alloc(ctx, want[i].bytes);
        if (!*want[i].p) return LT_ERR_MEMORY;
    }
    int drop = c->ad && !c->ad->full && c->ad->dropout > 0.0f && c->training;
    if (drop) {
        size_t md = (size_t)c->maxdim, r = (size_t)(c->rmax > 0 ? c->rmax : 1);
        B->s_in = ctx->be->alloc(ctx, N * md * f);
        B->s_in2 = ctx->be->alloc(ctx, N * md * f);
        B->s_out = ctx->be->alloc(ctx, N * md * f);
        B->s_r = ctx->be->alloc(ctx, N * r * f);
        B->s_r2 = ctx->be->alloc(ctx, N * r * f);
        if (!B->s_in || !B->s_in2 || !B->s_out || !B->s_r || !B->s_r2) return LT_ERR_MEMORY;
    }
    return LT_OK;
}

lt_status gemma3_train_batch(const gemma3_model *m, lt_ctx *ctx, lt_adapters *ad,
                             const train_batch *b, float grad_scale, int grads,
                             uint64_t dropout_seed, double *loss_sum) {
    const gemma3_config *cfg = &m->cfg;
    const lt_backend *be = ctx->be;
    if (b->N <= 0 || b->n_seg <= 0) {
        snprintf(ctx->err, LT_ERRLEN, "train: empty micro-batch");
        return LT_ERR_ARG;
    }
    const char *missing = lt_backend_missing_training_op(be);
    if (missing) {
        snprintf(ctx->err, LT_ERRLEN, "training: the %s backend has no %s op", be->name, missing);
        return LT_ERR_STATE;
    }
    tb_bufs B;
    tb_ctx c = {0};
    c.m = m;
    c.ctx = ctx;
    c.be = be;
    c.ad = ad;
    c.b = b;
    c.B = &B;
    c.N = b->N;
    c.H = cfg->hidden_size;
    c.I = cfg->intermediate_size;
    c.nh = cfg->num_attention_heads;
    c.nkv = cfg->num_key_value_heads;
    c.hd = cfg->head_dim;
    c.QD = c.nh * c.hd;
    c.KD = c.nkv * c.hd;
    c.maxdim = c.I > c.H ? c.I : c.H;
    if (c.QD > c.maxdim) c.maxdim = c.QD;
    c.rmax = ad ? ad->r : 0;
    c.drop_seed = dropout_seed;
    c.training = dropout_seed != 0; /* LoRA dropout on only when the caller gives a seed */
    int64_t N = c.N, H = c.H, L = cfg->num_hidden_layers;
    lt_status rc = bufs_get(&c, grads);
    if (rc != LT_OK) {
        bufs_release(ctx, &B);
        snprintf(ctx->err, LT_ERRLEN,
                 "out of memory for the activations of a micro-batch of %lld tokens "
                 "(lower batch= or max_seq=)",
                 (long long)N);
        return LT_ERR_MEMORY;
    }
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)N);
    if (!pos) {
        bufs_release(ctx, &B);
        snprintf(ctx->err, LT_ERRLEN, "out of memory");
        return LT_ERR_MEMORY;
    }
    /* positions restart at 0 for every packed sample */
    for (int s = 0, t = 0; s < b->n_seg; s++)
        for (int i = 0; i < b->seg_len[s]; i++)
            pos[t++] = i;
    const lt_weight *head = gemma3_head(m);
    float eps = (float)cfg->rms_norm_eps;
    TRY(be->upload(ctx, B.ids, b->ids, sizeof(int32_t) * (size_t)N));
    TRY(be->upload(ctx, B.pos, pos, sizeof(int32_t) * (size_t)N));
    TRY(be->upload(ctx, B.tg, b->targets, sizeof(int32_t) * (size_t)N));
    lt_tensor ids = lt_tensor_1d(LT_I32, B.ids, N);
    float escale = gemma3_embed_scale(m);

    /* forward: h = E[ids]·sqrt(H); each layer, keeping its input */
    TRY(be->embedding(ctx, t2(B.h, N, H), ids, &m->embed_tokens, escale));
    for (int l = 0; l < L; l++) {
        if (grads)
            TRY(be->copy(ctx, B.layer_in + (size_t)l * (size_t)(N * H), B.h,
                         sizeof(float) * (size_t)(N * H)));
        TRY(layer_fwd(&c, l));
    }
    if (grads) TRY(be->copy(ctx, B.hfin, B.h, sizeof(float) * (size_t)(N * H)));
    TRY(be->rmsnorm(ctx, t2(B.hn, N, H), t2(B.h, N, H), m->norm, eps)); /* hn: [N, H] */
    /* fused loss: Σ CE and dhn = grad_scale·dΣCE/dhn (into B.dx) */
    TRY(be->cross_entropy(ctx, loss_sum, grads ? t2(B.dx, N, H) : none2(N, H), t2(B.hn, N, H), head,
                          lt_tensor_1d(LT_I32, B.tg, N), grad_scale));
    if (!grads) goto done;

    /* backward: final norm, then each layer from the top, recomputed from its input */
    {
        lt_tensor fin = (ad && ad->full) ? ad->ng.final : lt_tensor_1d(LT_F32, NULL, H);
        TRY(be->rmsnorm_backward(ctx, t2(B.dh, N, H), fin, t2(B.dx, N, H), t2(B.hfin, N, H),
                                 m->norm, eps));
    }
    for (int l = (int)L - 1; l >= 0; l--) {
        const float *x_in = B.layer_in + (size_t)l * (size_t)(N * H);
        TRY(be->copy(ctx, B.h, x_in, sizeof(float) * (size_t)(N * H)));
        TRY(layer_fwd(&c, l));
        TRY(layer_bwd(&c, l, x_in));
    }
    if (m->embed_tokens.grad_w.data && be->embedding_backward)
        TRY(be->embedding_backward(ctx, &m->embed_tokens, t2(B.dh, N, H), ids, escale));
done:
    free(pos);
    bufs_release(ctx, &B);
    return rc;
}
