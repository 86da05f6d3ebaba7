/* host_view.h — host-readable bytes of backend tensors, for code that writes them to files
 * (adapters, checkpoints, merged and quantized saves). Engine-private.
 *
 * On the CPU backend a tensor's data is host memory and is used as it is; a device backend's
 * tensor is downloaded into a malloc'd copy kept in a pool, which the caller frees once the
 * bytes were written. Owns only the pool's copies.
 */
#ifndef LATHE_HOST_VIEW_H
#define LATHE_HOST_VIEW_H

#include "cuda/backend/backend.h"

typedef struct lt_host_pool {
    void **p;
    int n;
} lt_host_pool; /* = {0} to start */

/* t's bytes in host memory (t->data itself on the CPU backend, else a copy in hp); NULL when
 * out of memory or when the download failed (ctx->err says which). NULL data stays NULL. */
const void *lt_host_view(lt_ctx *ctx, const lt_tensor *t, lt_host_pool *hp);
/* The same for `bytes` bytes of backend memory at p (quantization state, not a tensor); a NULL
 * ctx means p is host memory. */
const void *lt_host_bytes(lt_ctx *ctx, const void *p, size_t bytes, lt_host_pool *hp);
/* *out = w with its bytes and quantization state in host memory (copies in hp on a device
 * backend; w itself on the CPU), no adapter; -1 when a download failed (ctx->err says why). */
int lt_host_weight(lt_ctx *ctx, const lt_weight *w, lt_weight *out, lt_host_pool *hp);
/* Frees every copy and empties the pool. */
void lt_host_pool_free(lt_host_pool *hp);

#endif
