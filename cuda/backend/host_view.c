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

void lt_host_pool_free(lt_host_pool *hp) {
    for (int i = 0; i < hp->n; i++)
        free(hp->p[i]);
    free(hp->p);
    *hp = (lt_host_pool){0};
}
