/* gemma3_device.h — a Gemma 3 model whose weights live in a backend's memory. Engine-private.
 *
 * gemma3_to_device copies a loaded (host) gemma3_model into the memory of ctx's backend: the
 * matrices in the storage dtype the precision policy picked (bf16 on sm_80+,
 * fp16 on the T4, fp32 on request), the norms in fp32. The copy is an ordinary gemma3_model,
 * so gemma3.c, lora.c and train.c run on it unchanged; free it with gemma3_model_release,
 * which frees either kind. gemma3_forward_host runs a forward whose logits land in host
 * memory whatever the backend. Compiled with or without CUDA (without, nothing is ever on a
 * device and release is gemma3_model_free). Must not include kernel/ or protocol/.
 */
#ifndef LATHE_GEMMA3_DEVICE_H
#define LATHE_GEMMA3_DEVICE_H

#include "cuda/model/model.h"

/* *out = a copy of host in ctx's memory, matrices in dtype dt (LT_F32/LT_F16/LT_BF16).
 * On failure *out stays NULL, nothing leaks, err names what failed. */
lt_status gemma3_to_device(gemma3_model **out, const gemma3_model *host, lt_ctx *ctx, lt_dtype dt,
                           char *err);
/* 1 when m was made by gemma3_to_device. */
int gemma3_on_device(const gemma3_model *m);
/* Frees a model of either kind (ctx: the one a device model was made with; unused for host
 * models). NULL is fine. */
void gemma3_model_release(gemma3_model *m, lt_ctx *ctx);
/* gemma3_forward with HOST output buffers (logits [T, V], last_logits [V]; either may be NULL):
 * on a device backend the forward writes device buffers that are then downloaded. */
lt_status gemma3_forward_host(const gemma3_model *m, lt_ctx *ctx, const int32_t *ids, int T,
                              gemma3_cache *cache, float *logits, float *last_logits);

#endif
