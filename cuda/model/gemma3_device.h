/* gemma3_device.h — a Gemma 3 model whose weights live in a backend's memory. Engine-private.
 *
 * gemma3_to_device copies a loaded (host) gemma3_model into the memory of ctx's backend: the
 * matrices in the storage dtype the precision policy picked (bf16 on sm_80+,
 * fp16 on the T4, fp32 on request), the norms in fp32. The copy is an ordinary gemma3_model,
 * so gemma3.c, lora.c and train.c run on it unchanged; free it with gemma3_model_release,
 * which frees either kind. gemma3_forward_host runs a forward whose logits land in host
 * memory whatever the backend. gemma3_device_bytes / gemma3_device_need say how much device
 * memory the copy takes, and gemma3_fit_check refuses a load that cannot fit before anything
 * is allocated, naming the quantized loads that would. Compiled with or without CUDA
 * (without, nothing is ever on a device and release is gemma3_model_free). Must not include
 * kernel/ or protocol/.
 */
#ifndef LATHE_GEMMA3_DEVICE_H
#define LATHE_GEMMA3_DEVICE_H

#include "cuda/model/model.h"

/* *out = a copy of host in ctx's memory, matrices in dtype dt (LT_F32/LT_F16/LT_BF16).
 * On failure *out stays NULL, nothing leaks, err names what failed. */
lt_status gemma3_to_device(gemma3_model **out, const gemma3_model *host, lt_ctx *ctx, lt_dtype dt,
                           char *err);

/* ---- loading straight into a backend's memory -------------------------------------------------
 * gemma3_device_sink is a gemma3_sink (model.h) that uploads each weight the loader finishes
 * into ctx's memory (matrices in dt, norms fp32, NF4/int8 as stored, the same forms as
 * gemma3_to_device) and gives its host bytes back at once, so a load onto a GPU never holds the
 * whole model in host memory. Each weight is one allocation of ctx's backend (its arrays
 * 256-byte aligned inside it); 16-bit conversions go through a staging buffer of at most
 * GEMMA3_STAGE_MAX bytes. On finish the model becomes a device model like gemma3_to_device's
 * (free it with gemma3_model_release; gemma3_on_device says 1), the image tower is copied (or
 * vision_error says why not) and the host storage and checkpoint mapping are dropped. On abort
 * everything it allocated is released. Usage:
 *     gemma3_device_sink ds;
 *     gemma3_device_sink_init(&ds, ctx, dt);
 *     spec.sink = &ds.sink;   then gemma3_load_dir_spec / gemma3_load_random_spec. */
typedef struct gemma3_device_sink {
    gemma3_sink sink; /* what the loader takes (spec.sink) */
    lt_ctx *ctx;
    lt_dtype dt;
    void **blocks; /* backend memory, one block per weight placed */
    int n_blocks, cap_blocks;
    size_t bytes; /* what the blocks take (the model's weight_bytes once finished) */
    void *stage;
    size_t stage_cap;
} gemma3_device_sink;

/* dt: LT_F32/LT_F16/LT_BF16 (another one is refused at the first weight). */
void gemma3_device_sink_init(gemma3_device_sink *ds, lt_ctx *ctx, lt_dtype dt);

/* ---- what a device copy takes ------------------------------------------------------------------
 * gemma3_to_device allocates one arena for every weight (each tensor rounded up to 256 bytes)
 * plus, while it copies, a staging buffer of at most GEMMA3_STAGE_MAX bytes for the tensors it
 * converts to another dtype. */
#define GEMMA3_STAGE_MAX ((size_t)64 << 20)

/* The arena gemma3_to_device allocates for a model of config c with its 16-bit matrices in dt
 * and its 7 linears of every layer as quant says: NULL/"none" (dt), "nf4" (bitsandbytes NF4
 * with double quantization, blocksize 64, as quant=nf4 quantizes), "int8" (LLM.int8), or
 * "dynamic" (an estimate: NF4 with a tenth of the linear parameters kept in dt). The embedding
 * (and an untied head) are in dt, the norms fp32. 0 for another quant or dtype. */
size_t gemma3_device_bytes(const gemma3_config *c, lt_dtype dt, const char *quant);
/* What gemma3_to_device(host, dt) would allocate, exactly: the arena plus the staging buffer.
 * 0 when a weight has no device format (gemma3_to_device then says which). */
size_t gemma3_device_need(const gemma3_model *host, lt_dtype dt);

/* A load about to go to a device, for gemma3_fit_check. */
typedef struct gemma3_fit {
    const char *name;  /* the model as the user named it ("google/gemma-3-12b-it") */
    const char *where; /* the memory, for the message ("GPU memory") */
    lt_dtype dt;       /* the device's 16-bit (or fp32) storage dtype */
    const char *quant; /* how the linears load: "none", "nf4", "int8", "dynamic" */
    int fixed;         /* 1: the checkpoint is stored quantized, quant= cannot change it */
    /* How a fixed (pre-quantized) checkpoint stores its linears, for the estimate: nested 1 when
     * its NF4 has double quantization (quant=nf4's way), 0 when a float absmax a block; kept16:
     * for each of the 7 linears (q, k, v, o, gate, up, down), how many layers its
     * llm_int8_skip_modules keeps in dt (NULL: none). Not fixed: quant= says it all. */
    int nested;
    const int *kept16;
    size_t need; /* bytes the copy takes (gemma3_device_need); 0 = estimated from c */
    size_t held; /* bytes of that memory the model loaded now keeps until this one loads */
    /* quant=dynamic's quant_keep for the estimate of this load (keep_given 1): NF4 plus that
     * fraction of the linears in dt; else the estimate keeps a tenth, as gemma3_device_bytes */
    int keep_given;
    double keep;
} gemma3_fit;

/* The arena the load f of a model of config c will take: quant='s (gemma3_device_bytes; a
 * dynamic load with keep_given counts its keep), or, fixed, the checkpoint's own storage. 0 for
 * an unknown quant or dtype. */
size_t gemma3_fit_arena(const gemma3_config *c, const gemma3_fit *f);
/* LT_OK when f->need bytes (or the estimate for c) fit in free_bytes. Otherwise
 * LT_ERR_MEMORY with err saying what it needs and what is free, and which loads would fit:
 * quant=nf4 and quant=dynamic with their sizes (those smaller than this one that fit), or a
 * smaller model when none does; device=cpu always. LT_ERR_ARG for an unknown quant. Pure:
 * it allocates nothing and reads no device. */
lt_status gemma3_fit_check(const gemma3_config *c, const gemma3_fit *f, size_t free_bytes,
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
