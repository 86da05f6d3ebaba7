/* host_view.c — host copies of backend tensors (see host_view.h). Owns the pool's copies;
 * reads backend memory through the backend's download op only.
 */
#include "cuda/backend/host_view.h"

#include <stdlib.h>

const void *lt_host_bytes(lt_ctx *ctx, const void *p, size_t bytes, lt_host_pool *hp) {
    if (!p || !ctx || ctx->be == &lt_backend_cpu) return p;
    void *buf = malloc(bytes ? bytes : 1);
    void **np = realloc(hp->p, sizeof(void *) * (size_t)(hp->n + 1));
    if (np) hp->p = np;
    if (!buf || !np) {
        free(buf);
        lt_fail(ctx->err, LT_ERR_MEMORY, "%s: out of host memory for a %zu-byte copy",
                ctx->be->name, bytes);
        return NULL;
    }
    if (ctx->be->download(ctx, buf, p, bytes) != LT_OK) {
        free(buf);
        return NULL;
    }
    hp->p[hp->n++] = buf;
    return buf;
}

const void *lt_host_view(lt_ctx *ctx, const lt_tensor *t, lt_host_pool *hp) {
    return lt_host_bytes(ctx, t->data, lt_tensor_bytes(t), hp);
}

int lt_host_weight(lt_ctx *ctx, const lt_weight *w, lt_weight *out, lt_host_pool *hp) {
    *out = *w;
    out->lora = NULL;
    if (!ctx || ctx->be == &lt_backend_cpu) return 0;
    const lt_quant *q = &w->q;
    size_t parts[LT_WEIGHT_MAX_PARTS];
    int64_t n = lt_tensor_numel(&w->w);
    lt_weight_parts(q->kind, n, w->w.shape[0], lt_dtype_size(w->w.dtype), q->blocksize,
                    q->qabsmax ? q->nested_blocksize : 0, parts);
    /* parts: the codes, then NF4's code, absmax or (qabsmax, absmax2, code2); int8's scb */
    out->w.data = (void *)lt_host_bytes(ctx, w->w.data, parts[0], hp);
    int bad = w->w.data && !out->w.data;
    if (q->kind == LT_QUANT_NF4) {
        out->q.code = lt_host_bytes(ctx, q->code, parts[1], hp);
        if (q->qabsmax) {
            out->q.qabsmax = lt_host_bytes(ctx, q->qabsmax, parts[2], hp);
            out->q.absmax2 = lt_host_bytes(ctx, q->absmax2, parts[3], hp);
            out->q.code2 = lt_host_bytes(ctx, q->code2, parts[4], hp);
            bad |= !out->q.code || !out->q.qabsmax || !out->q.absmax2 || !out->q.code2;
        } else {
            out->q.absmax = lt_host_bytes(ctx, q->absmax, parts[2], hp);
            bad |= !out->q.code || !out->q.absmax;
        }
    } else if (q->kind == LT_QUANT_INT8) {
        out->q.scb = lt_host_bytes(ctx, q->scb, parts[1], hp);
        bad |= !out->q.scb;
    }
    return bad ? -1 : 0;
}

void lt_host_pool_free(lt_host_pool *hp) {
    for (int i = 0; i < hp->n; i++)
        free(hp->p[i]);
    free(hp->p);
    *hp = (lt_host_pool){0};
}
