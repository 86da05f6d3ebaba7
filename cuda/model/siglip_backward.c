/* siglip_backward.c — the backward of the image tower and projector for one image: what training
 * LoRA adapters on SigLIP's linears (self_attn q/k/v/out_proj, mlp fc1/fc2) and on the
 * projector's matrix needs (siglip.h says what it computes).
 *
 * Activation checkpointing, as the text model's backward: the forward is run again from the
 * pixels, keeping the input of every layer from the lowest trained one up (the layers below
 * run as in siglip_encode and keep nothing); the backward then recomputes one layer at a time
 * from its kept input, with every intermediate apart, and walks back through it:
 *   out = y·Wprojᵀ, y = rmsnorm(pool(post_layernorm(x_L)))       the projector
 *   x_{l+1} = h + fc2(gelu(fc1(ln2(h)))), h = x_l + out_proj(attn(ln1(x_l)))
 * with linear_backward (adapters' gradients accumulated, frozen weights none), rmsnorm_backward,
 * and the tower's avg_pool_backward, layernorm_backward, gelu_backward (lt_tower_grad_ops), and
 * attention_backward with every
 * position 0 (bidirectional, as the forward's attention). Biases only shift activations: they
 * have no part in the input gradients. Nothing goes below the first trained layer: no gradient
 * into the patch embedding, the position embeddings or the lower layers. LoRA dropout (a seed
 * given) runs the adapter paths as separate ops with the masks siglip_encode_train used.
 *
 * Owns no state: buffers live for one call. Written against backend.h; must not change the
 * tower's weights (only the adapters' gradients).
 */
#include <stdlib.h>
#include <string.h>

#include "cuda/model/siglip.h"

static int layer_trained(const siglip_layer *L) {
    const lt_weight *w[6] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
    for (int i = 0; i < 6; i++)
        if (w[i]->lora && w[i]->lora->enabled && w[i]->lora->grad_a.data) return 1;
    return 0;
}

int siglip_first_trained_layer(const siglip_tower *t) {
    for (int l = 0; l < t->cfg.num_hidden_layers; l++)
        if (layer_trained(&t->layers[l])) return l;
    return t->cfg.num_hidden_layers;
}

int siglip_has_adapters(const siglip_tower *t) {
    if (!t) return 0;
    if (t->mm_proj.lora && t->mm_proj.lora->grad_a.data) return 1;
    return siglip_first_trained_layer(t) < t->cfg.num_hidden_layers;
}

/* dx = dL/dx (written; data NULL = not needed), the adapter's gradients accumulated, with the
 * forward's LoRA dropout mask when it ran (gemma3_backward.c's lin_bwd, on the tower). */
static lt_status lin_bwd(lt_ctx *ctx, const siglip_acts *b, lt_tensor dx, lt_tensor dy, lt_tensor x,
                         const lt_weight *w, uint64_t seed) {
    const lt_backend *be = ctx->be;
    if (!siglip_uses_dropout(b, w)) return be->linear_backward(ctx, dx, dy, x, w);
    lt_lora *lo = w->lora;
    int64_t n = x.shape[0], in = w->w.shape[1], out = w->w.shape[0], r = lo->a.shape[0];
    lo->enabled = 0;
    lt_status rc = be->linear_backward(ctx, dx, dy, x, w); /* the base path: dx = dy·W */
    lo->enabled = 1;
    if (rc != LT_OK) return rc;
    lt_weight wa = {.w = lo->a, .grad_w = lo->grad_a}, wb = {.w = lo->b, .grad_w = lo->grad_b};
    siglip_drop_bufs s;
    siglip_drop_carve(b, n, &s);
    lt_tensor xd = lt_tensor_2d(LT_F32, s.xd, n, in), u = lt_tensor_2d(LT_F32, s.u, n, r);
    lt_tensor dys = lt_tensor_2d(LT_F32, s.y2, n, out), du = lt_tensor_2d(LT_F32, s.du, n, r),
              dxd = lt_tensor_2d(LT_F32, dx.data ? s.dx : NULL, n, in);
    if ((rc = be->dropout(ctx, xd, x, lo->dropout, 1.0f, seed)) != LT_OK) return rc;
    if ((rc = be->linear(ctx, u, xd, &wa)) != LT_OK) return rc;
    if ((rc = be->copy(ctx, dys.data, dy.data, lt_tensor_bytes(&dys))) != LT_OK) return rc;
    if ((rc = be->scale(ctx, dys, lo->scale)) != LT_OK) return rc;
    /* through B: du = s·dy·B, grad_B += s·dyᵀ·u; through A: dxd = du·A, grad_A += duᵀ·xd */
    if ((rc = be->linear_backward(ctx, du, dys, u, &wb)) != LT_OK) return rc;
    if ((rc = be->linear_backward(ctx, dxd, du, xd, &wa)) != LT_OK) return rc;
    if (!dx.data) return LT_OK;
    if ((rc = be->dropout(ctx, dxd, dxd, lo->dropout, 1.0f, seed)) != LT_OK) return rc;
    return be->add(ctx, dx, dxd);
}

/* The buffers of one call, in floats (int32 positions counted as floats). */
typedef struct sb_plan {
    size_t patches, x, ckpt, y, po, pn; /* forward */
    size_t layer_pd, layer_pi;          /* recompute: 10 [P, D] and 2 [P, I] */
    size_t grad_pd, grad_pi, pos;       /* backward: 7 [P, D], 1 [P, I]; pos0 */
    size_t drop;                        /* LoRA dropout's scratch (when it runs) */
    int64_t drop_w, drop_r;
} sb_plan;

static void plan_get(const siglip_tower *t, int first, int dropout, sb_plan *p) {
    siglip_dims d;
    siglip_dims_get(t, &d);
    size_t P = (size_t)d.P, D = (size_t)d.D, I = (size_t)d.I, M = (size_t)d.M;
    size_t L = (size_t)t->cfg.num_hidden_layers, kept = L - (size_t)first;
    p->patches = P * (size_t)d.K;
    p->x = P * D;
    p->ckpt = kept * P * D;
    p->y = P * D;
    p->po = M * D;
    p->pn = M * D;
    p->layer_pd = kept ? 9 * P * D : 0; /* a1 q k v att o h a2 f2 */
    p->layer_pi = kept ? 2 * P * I : 0; /* f1 g */
    p->grad_pd = 7 * P * D;             /* dx dh datt dq dk dv da (tmp over datt) */
    p->grad_pi = P * I;                 /* dg (df1 over it); fc1's output in the forward */
    p->pos = P;
    p->drop = siglip_dropout_floats(t, &p->drop_w, &p->drop_r);
    if (!dropout) p->drop = 0;
}

static size_t plan_floats(const sb_plan *p) {
    return p->patches + p->x + p->ckpt + p->y + p->po + p->pn + p->layer_pd + p->layer_pi +
           p->grad_pd + p->grad_pi + p->pos + p->drop;
}

size_t siglip_backward_bytes(const siglip_tower *t, int dropout) {
    sb_plan p;
    plan_get(t, siglip_first_trained_layer(t), dropout, &p);
    return sizeof(float) * plan_floats(&p);
}

lt_status siglip_backward(const siglip_tower *t, lt_ctx *ctx, const float *pixels,
                          const float *dout, uint64_t drop_seed) {
    const lt_backend *be = ctx->be;
    const char *missing = lt_backend_missing_tower_training_op(be);
    if (!missing) missing = lt_backend_missing_vision_op(be);
    if (missing)
        return lt_fail(ctx->err, LT_ERR_STATE,
                       "image tower: training its adapters needs the '%s' op, which the %s "
                       "backend lacks (device=cpu and device=cuda have it)",
                       missing, be->name);
    const lt_tower_grad_ops *tg = lt_backend_tower_grad(be);
    siglip_dims d;
    siglip_dims_get(t, &d);
    int64_t P = d.P, D = d.D, I = d.I, M = d.M, K = d.K, H = d.H;
    int L = t->cfg.num_hidden_layers, first = siglip_first_trained_layer(t);
    sb_plan pl;
    plan_get(t, first, drop_seed != 0, &pl);
    size_t fs = sizeof(float), PD = (size_t)(P * D), PI = (size_t)(P * I);
    float *host = malloc(fs * pl.patches);
    int32_t *zeros = calloc((size_t)P, sizeof(int32_t));
    float *arena = be->alloc(ctx, fs * plan_floats(&pl));
    lt_status rc = LT_OK;
    if (!host || !zeros || !arena) {
        rc = lt_fail(ctx->err, LT_ERR_MEMORY,
                     "image tower: out of %s memory for the backward of one image (%.1f MiB)",
                     be->name, (double)(fs * plan_floats(&pl)) / 1048576.0);
        goto done;
    }
    float *p = arena;
    float *patches = p;
    p += pl.patches;
    float *x = p;
    p += pl.x;
    float *ckpt = p;
    p += pl.ckpt;
    float *y = p;
    p += pl.y;
    float *po = p;
    p += pl.po;
    float *pn = p;
    p += pl.pn;
    float *lay = p;
    p += pl.layer_pd + pl.layer_pi;
    float *gr = p;
    p += pl.grad_pd;
    float *dg = p;
    p += pl.grad_pi;
    float *drop = pl.drop ? p : NULL;
    p += pl.drop;
    int32_t *pos0 = (int32_t *)p;

    siglip_patches(t, pixels, host);
    LT_TRY(be->upload(ctx, patches, host, fs * pl.patches));
    LT_TRY(be->upload(ctx, pos0, zeros, sizeof(int32_t) * (size_t)P));

    /* the forward again: layers below `first` as siglip_encode runs them, each later layer's
     * input kept in ckpt (its scratch is the recompute's, idle until the backward) */
    lt_tensor X = lt_tensor_2d(LT_F32, x, P, D);
    LT_TRY(be->linear(ctx, X, lt_tensor_2d(LT_F32, patches, P, K), &t->patch));
    LT_TRY(be->add_bias(ctx, X, t->patch_b));
    LT_TRY(be->add(ctx, X, t->pos));
    float *a = gr, *f = dg; /* the forward's scratch: the gradient buffers, idle until then */
    float *la = lay;        /* the recompute's buffers, apart */
    siglip_acts fw =
        siglip_acts_aliased(x, a, f, gr + 1 * PD, gr + 2 * PD, gr + 3 * PD, gr + 4 * PD, pos0);
    fw.drop_seed = drop_seed;
    fw.drop = drop;
    fw.drop_w = pl.drop_w;
    fw.drop_r = pl.drop_r;
    for (int l = 0; l < L; l++) {
        if (l >= first) LT_TRY(be->copy(ctx, ckpt + (size_t)(l - first) * PD, x, fs * PD));
        LT_TRY(siglip_layer_forward(t, ctx, l, &fw));
    }
    /* post_layernorm and the projector, every result apart */
    int k = (int)(d.g / d.side);
    LT_TRY(be->layernorm(ctx, lt_tensor_2d(LT_F32, y, P, D), X, t->post_w, t->post_b, d.eps));
    LT_TRY(be->avg_pool(ctx, lt_tensor_2d(LT_F32, po, M, D), lt_tensor_2d(LT_F32, y, P, D), k));
    LT_TRY(be->rmsnorm(ctx, lt_tensor_2d(LT_F32, pn, M, D), lt_tensor_2d(LT_F32, po, M, D),
                       t->mm_norm, d.eps));

    /* backward through the projector: dpn into po's place once po is read (dpo into pn's) */
    float *dX = gr, *dh = gr + PD, *datt = gr + 2 * PD, *dq = gr + 3 * PD, *dk = gr + 4 * PD,
          *dv = gr + 5 * PD, *da = gr + 6 * PD, *tmp = datt;
    lt_tensor nd = lt_tensor_1d(LT_F32, NULL, D);
    int below = first < L; /* gradients go on into the layers */
    float *dpn = dX;       /* [M, D] in the [P, D] gradient buffer */
    LT_TRY(be->linear_backward(ctx, lt_tensor_2d(LT_F32, below ? dpn : NULL, M, D),
                               lt_tensor_2d(LT_F32, (void *)dout, M, H),
                               lt_tensor_2d(LT_F32, pn, M, D), &t->mm_proj));
    if (!below) goto done;
    float *dpo = dh;
    LT_TRY(be->rmsnorm_backward(ctx, lt_tensor_2d(LT_F32, dpo, M, D), lt_tensor_1d(LT_F32, NULL, D),
                                lt_tensor_2d(LT_F32, dpn, M, D), lt_tensor_2d(LT_F32, po, M, D),
                                t->mm_norm, d.eps));
    LT_TRY(tg->avg_pool_backward(ctx, lt_tensor_2d(LT_F32, y, P, D),
                                 lt_tensor_2d(LT_F32, dpo, M, D), k)); /* y = dL/dy */
    LT_TRY(tg->layernorm_backward(ctx, lt_tensor_2d(LT_F32, dX, P, D), nd, nd,
                                  lt_tensor_2d(LT_F32, y, P, D), X, t->post_w, d.eps));

    /* the layers, from the top down to `first`; dX = dL/d(layer output) */
    siglip_acts rb = {.a1 = la,
                      .q = la + 1 * PD,
                      .k = la + 2 * PD,
                      .v = la + 3 * PD,
                      .att = la + 4 * PD,
                      .o = la + 5 * PD,
                      .h = la + 6 * PD,
                      .a2 = la + 7 * PD,
                      .f2 = la + 8 * PD,
                      .f1 = la + 9 * PD,
                      .g = la + 9 * PD + PI,
                      .out = NULL,
                      .pos0 = pos0,
                      .drop_seed = drop_seed,
                      .drop = drop,
                      .drop_w = pl.drop_w,
                      .drop_r = pl.drop_r};
    for (int l = L - 1; l >= first; l--) {
        const siglip_layer *Ly = &t->layers[l];
        rb.x = ckpt + (size_t)(l - first) * PD;
        LT_TRY(siglip_layer_forward(t, ctx, l, &rb));
        lt_tensor tdX = lt_tensor_2d(LT_F32, dX, P, D), tdh = lt_tensor_2d(LT_F32, dh, P, D),
                  tda = lt_tensor_2d(LT_F32, da, P, D), ttmp = lt_tensor_2d(LT_F32, tmp, P, D);
        lt_tensor tdg = lt_tensor_2d(LT_F32, dg, P, I);
        /* out = h + fc2(gelu(fc1(ln2(h)))) */
        LT_TRY(lin_bwd(ctx, &rb, tdg, tdX, lt_tensor_2d(LT_F32, rb.g, P, I), &Ly->fc2,
                       siglip_module_seed(drop_seed, l, 5)));
        LT_TRY(tg->gelu_backward(ctx, tdg, tdg, lt_tensor_2d(LT_F32, rb.f1, P, I)));
        LT_TRY(lin_bwd(ctx, &rb, tda, tdg, lt_tensor_2d(LT_F32, rb.a2, P, D), &Ly->fc1,
                       siglip_module_seed(drop_seed, l, 4)));
        LT_TRY(tg->layernorm_backward(ctx, tdh, nd, nd, tda, lt_tensor_2d(LT_F32, rb.h, P, D),
                                      Ly->ln2_w, d.eps));
        LT_TRY(be->add(ctx, tdh, tdX)); /* dh = dL/dh */
        /* h = x + out_proj(attn(ln1(x))) */
        LT_TRY(lin_bwd(ctx, &rb, lt_tensor_2d(LT_F32, datt, P, D), tdh,
                       lt_tensor_2d(LT_F32, rb.att, P, D), &Ly->o,
                       siglip_module_seed(drop_seed, l, 3)));
        LT_TRY(be->attention_backward(
            ctx, lt_tensor_3d(LT_F32, dq, P, d.nh, d.hd), lt_tensor_3d(LT_F32, dk, P, d.nh, d.hd),
            lt_tensor_3d(LT_F32, dv, P, d.nh, d.hd), lt_tensor_2d(LT_F32, datt, P, D),
            lt_tensor_3d(LT_F32, rb.q, P, d.nh, d.hd), lt_tensor_3d(LT_F32, rb.k, P, d.nh, d.hd),
            lt_tensor_3d(LT_F32, rb.v, P, d.nh, d.hd), lt_tensor_1d(LT_I32, pos0, P),
            lt_tensor_1d(LT_I32, pos0, P), 0, d.scale));
        lt_tensor a1 = lt_tensor_2d(LT_F32, rb.a1, P, D);
        int last = l == first; /* nothing flows below it: only the adapters' gradients */
        lt_tensor dxq = last ? lt_tensor_2d(LT_F32, NULL, P, D) : tda,
                  dxo = last ? lt_tensor_2d(LT_F32, NULL, P, D) : ttmp;
        LT_TRY(lin_bwd(ctx, &rb, dxq, lt_tensor_2d(LT_F32, dq, P, D), a1, &Ly->q,
                       siglip_module_seed(drop_seed, l, 0)));
        LT_TRY(lin_bwd(ctx, &rb, dxo, lt_tensor_2d(LT_F32, dk, P, D), a1, &Ly->k,
                       siglip_module_seed(drop_seed, l, 1)));
        if (!last) LT_TRY(be->add(ctx, tda, ttmp));
        LT_TRY(lin_bwd(ctx, &rb, dxo, lt_tensor_2d(LT_F32, dv, P, D), a1, &Ly->v,
                       siglip_module_seed(drop_seed, l, 2)));
        if (last) break;
        LT_TRY(be->add(ctx, tda, ttmp)); /* da = dL/d ln1(x) */
        LT_TRY(tg->layernorm_backward(ctx, tdX, nd, nd, tda, lt_tensor_2d(LT_F32, rb.x, P, D),
                                      Ly->ln1_w, d.eps));
        LT_TRY(be->add(ctx, tdX, tdh)); /* dX = dL/dx */
    }
done:
    free(host);
    free(zeros);
    if (arena) be->release(ctx, arena);
    return rc;
}
