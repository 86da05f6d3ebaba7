/* grad.h — the CPU backward ops and the few extra ops training needs. Engine-private.
 *
 * backend_cpu_grad.c implements the backward slots of backend.h (linear_backward,
 * rmsnorm_backward, rope_backward, attention_backward (and attention_span_backward),
 * geglu_backward, embedding_backward,
 * cross_entropy, adamw) for the fp32 reference backend; backend_cpu.c points its table at
 * them. The conventions are backend.h's: a backward op WRITES the input gradient and
 * ACCUMULATES (+=) weight/adapter gradients; a NULL data pointer means "not needed".
 *
 * It also implements the table's small vector ops for the trainer on the CPU (fill, scale,
 * sum of squares, dropout).
 * cross_entropy accumulates the head's gradient only when dh is wanted (a call without dh is
 * a loss-only evaluation). This file must not know Gemma.
 */
#ifndef LATHE_GRAD_H
#define LATHE_GRAD_H

#include <stdint.h>

#include "cuda/backend/backend.h"

/* The argument check of every CPU op (backend_cpu.c and backend_cpu_grad.c): on failure
 * ctx->err = "cpu <op>: <msg>" (ctx may be NULL) and the op returns LT_ERR_ARG at once. */
#define REQUIRE(cond, op, msg)                                                                     \
    do {                                                                                           \
        if (!(cond)) return lt_fail(ctx ? ctx->err : NULL, LT_ERR_ARG, "cpu %s: %s", op, msg);     \
    } while (0)

lt_status cpu_linear_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, lt_tensor x,
                              const lt_weight *w);
lt_status cpu_rmsnorm_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dw, lt_tensor dy, lt_tensor x,
                               lt_tensor w, float eps);
lt_status cpu_rope_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor pos, float theta, float factor);
lt_status cpu_attention_backward(lt_ctx *ctx, lt_tensor dq, lt_tensor dk, lt_tensor dv,
                                 lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                                 lt_tensor qpos, lt_tensor kpos, int window, float scale);
lt_status cpu_attention_span_backward(lt_ctx *ctx, lt_tensor dq, lt_tensor dk, lt_tensor dv,
                                      lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                                      lt_tensor qpos, lt_tensor kpos, lt_tensor span, int window,
                                      float scale);
lt_status cpu_geglu_backward(lt_ctx *ctx, lt_tensor dgate, lt_tensor dup, lt_tensor dy,
                             lt_tensor gate, lt_tensor up);
lt_status cpu_embedding_backward(lt_ctx *ctx, const lt_weight *table, lt_tensor dh, lt_tensor ids,
                                 float scale);
lt_status cpu_cross_entropy(lt_ctx *ctx, double *loss_sum, lt_tensor dh, lt_tensor h,
                            const lt_weight *head, lt_tensor targets, lt_tensor row_weight,
                            lt_tensor row_logp, float logit_scale, float grad_scale);
lt_status cpu_adamw(lt_ctx *ctx, lt_tensor param, lt_tensor grad, lt_tensor m, lt_tensor v,
                    float lr, float beta1, float beta2, float eps, float weight_decay, int step);

/* Rotate-half RoPE in place on x ([T, heads, hd] fp32) by the angles of backend.h's rope, times
 * dir: +1 is the rope op, -1 its inverse (rope_backward). op names the caller in errors. */
lt_status cpu_rotate(lt_ctx *ctx, const char *op, lt_tensor x, lt_tensor pos, float theta,
                     float factor, float dir);

/* Stores v at element i of an fp32 tensor, or of a BF16 one (rounded to nearest even): the
 * outputs backend.h lets be BF16 (matmul-only activations and gradients). */
static inline void cpu_store(lt_tensor *t, int64_t i, float v) {
    if (t->dtype == LT_BF16)
        ((uint16_t *)t->data)[i] = lt_f32_to_bf16(v);
    else
        ((float *)t->data)[i] = v;
}

/* A tensor's values as fp32: its own data when it is fp32, else (a 16-bit weight, or a BF16
 * matmul-only activation) a widened copy in *owned, which the caller frees (*owned is NULL
 * otherwise). NULL when out of memory. */
const float *cpu_as_f32(const lt_tensor *x, float **owned);

/* Quantized (NF4 / int8) weights on the CPU: rows per dequantized band (about 16 MB of fp32),
 * and rows r0 .. r0+nr-1 dequantized into dst ([nr, in] fp32) by the thread pool. */
int64_t cpu_band_rows(const lt_weight *w);
void cpu_dequantize_band(lt_ctx *ctx, const lt_weight *w, int64_t r0, int64_t nr, float *dst);

/* The attention contract of backend.h, checked once for the forward and the backward: q, k,
 * v fp32 [T, nh, hd] / [S, nkv, hd], I32 positions [T] and [S], nh a multiple of nkv.
 * Fills the sizes; LT_ERR_ARG with ctx->err naming op otherwise. */
typedef struct cpu_attn_dims {
    int64_t T, nh, hd, S, nkv;
} cpu_attn_dims;
lt_status cpu_attention_dims(lt_ctx *ctx, const char *op, lt_tensor q, lt_tensor k, lt_tensor v,
                             lt_tensor qpos, lt_tensor kpos, cpu_attn_dims *d);

/* The CPU side of the table's small vector ops for the trainer (backend.h). */
lt_status cpu_fill(lt_ctx *ctx, lt_tensor t, float value);
lt_status cpu_scale(lt_ctx *ctx, lt_tensor t, float s);
lt_status cpu_sumsq(lt_ctx *ctx, double *out, lt_tensor t);
lt_status cpu_dropout(lt_ctx *ctx, lt_tensor y, lt_tensor x, float p, float mul, uint64_t seed);

/* sample_rows (backend_cpu_sample.c): backend.h's sampling rule on the host. */
lt_status cpu_sample_rows(lt_ctx *ctx, lt_tensor ids, lt_tensor logits, lt_tensor bits,
                          const lt_sample_opts *o);
/* The image tower's ops on the CPU (backend_cpu_vision.c; backend.h states them). */
lt_status cpu_layernorm(lt_ctx *ctx, lt_tensor y, lt_tensor x, lt_tensor w, lt_tensor b, float eps);
lt_status cpu_add_bias(lt_ctx *ctx, lt_tensor y, lt_tensor b);
lt_status cpu_gelu(lt_ctx *ctx, lt_tensor y, lt_tensor x);
lt_status cpu_avg_pool(lt_ctx *ctx, lt_tensor y, lt_tensor x, int k);
lt_status cpu_layernorm_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dw, lt_tensor db,
                                 lt_tensor dy, lt_tensor x, lt_tensor w, float eps);
lt_status cpu_gelu_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, lt_tensor x);
lt_status cpu_avg_pool_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, int k);
/* Those three backward ops as lt_backend_cpu's tower_grad table. */
extern const lt_tower_grad_ops lt_cpu_tower_grad;

#endif
