/* optim.c — the optimizer side of training: AdamW over every trainable parameter (fp32
 * state, torch.optim.AdamW semantics through the backend's adamw op), transformers'
 * learning-rate schedules with warmup, and torch's global-norm gradient clipping.
 *
 * Owns each train_param's m/v buffers (allocated on the first step, released by
 * optim_reset). It must not touch the parameters' gradients except to scale them (clip).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/train/train.h"

int optim_schedule_parse(const char *name, lr_schedule *s) {
    if (!name || !strcmp(name, "linear"))
        *s = SCHED_LINEAR;
    else if (!strcmp(name, "constant"))
        *s = SCHED_CONSTANT;
    else if (!strcmp(name, "cosine"))
        *s = SCHED_COSINE;
    else
        return -1;
    return 0;
}

double optim_lr_factor(lr_schedule s, int step, int warmup, int total) {
    if (step < warmup) return (double)step / (double)(warmup > 1 ? warmup : 1);
    double rest = (double)(total - warmup > 1 ? total - warmup : 1);
    switch (s) {
    case SCHED_LINEAR: {
        double f = (double)(total - step) / rest;
        return f > 0 ? f : 0;
    }
    case SCHED_COSINE: {
        /* num_cycles = 0.5: one half cosine from 1 to 0 */
        double progress = (double)(step - warmup) / rest;
        double f = 0.5 * (1.0 + cos(M_PI * 0.5 * 2.0 * progress));
        return f > 0 ? f : 0;
    }
    case SCHED_CONSTANT:
    default:
        return 1.0;
    }
}

lt_status optim_clip(lt_adapters *a, float max_norm, double *norm, char *err) {
    const lt_backend *be = a->ctx->be;
    double total = 0;
    for (int i = 0; i < a->n_params; i++) {
        double s = 0;
        lt_status rc = be->sumsq(a->ctx, &s, a->params[i].grad);
        if (rc != LT_OK) {
            return lt_fail(err, rc, "%s", a->ctx->err);
        }
        total += s;
    }
    double n = sqrt(total);
    *norm = n;
    if (!isfinite(n)) {
        return lt_fail(err, LT_ERR_ARG,
                       "the gradient is not finite (norm %g): the loss diverged; lower lr= "
                       "or set max_grad_norm=",
                       n);
    }
    if (max_norm > 0) {
        /* torch: clip_coef = max_norm / (total_norm + 1e-6), applied when < 1 */
        double coef = (double)max_norm / (n + 1e-6);
        if (coef < 1.0)
            for (int i = 0; i < a->n_params; i++) {
                lt_status rc = be->scale(a->ctx, a->params[i].grad, (float)coef);
                if (rc != LT_OK) return rc;
            }
    }
    return LT_OK;
}

lt_status optim_step(lt_adapters *a, const optim_opts *o, float lr, int images_ran, char *err) {
    lt_ctx *ctx = a->ctx; /* lt_train checked that the backend has every training op */
    for (int i = 0; i < a->n_params; i++) {
        train_param *p = &a->params[i];
        if (p->image_only && !images_ran) continue;
        if (!p->m.data) {
            size_t bytes = lt_tensor_bytes(&p->grad);
            p->m = p->grad;
            p->v = p->grad;
            p->m.data = ctx->be->alloc(ctx, bytes);
            p->v.data = ctx->be->alloc(ctx, bytes);
            if (!p->m.data || !p->v.data) {
                return lt_fail(err, LT_ERR_MEMORY, "out of memory for the AdamW state of %s",
                               p->name);
            }
        }
        lt_status rc = ctx->be->adamw(ctx, *p->value, p->grad, p->m, p->v, lr, o->beta1, o->beta2,
                                      o->eps, p->decay ? o->weight_decay : 0.0f, ++p->steps);
        if (rc != LT_OK) {
            return lt_fail(err, rc, "%s", ctx->err);
        }
    }
    return LT_OK;
}

void optim_reset(lt_adapters *a) {
    for (int i = 0; i < a->n_params; i++) {
        train_param *p = &a->params[i];
        a->ctx->be->release(a->ctx, p->m.data);
        a->ctx->be->release(a->ctx, p->v.data);
        p->m.data = p->v.data = NULL;
        p->steps = 0;
    }
}
