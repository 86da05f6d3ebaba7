/* model.h — Gemma 3 inside the engine: config, weights, KV cache and forward. Engine-private.
 *
 * gemma3_config holds every text hyper-parameter of transformers' Gemma3TextConfig, resolved
 * (defaults filled, layer types expanded per layer, RoPE per layer type). gemma3_model holds
 * the text weights under their Hugging Face names (canonical `model.` prefix, the
 * Gemma3ForCausalLM tree) so exporters can walk them with gemma3_weights_foreach in a stable
 * order. The forward is written once against backend.h (gemma3.c); loading lives in
 * hfconfig.c (config.json), safetensors.c (tensors) and gemma3.c (assembly, random weights).
 * This file must not include anything from kernel/ or protocol/.
 */
#ifndef LATHE_MODEL_H
#define LATHE_MODEL_H

#include <stdint.h>

#include "cuda/backend/backend.h"
#include "cuda/base/tensor.h"
#include "cuda/formats/hfconfig.h"
#include "cuda/formats/safetensors.h"
#include "cuda/text/tokenizer.h"

/* Fills bos/eos/pad/turn ids by piece from the tokenizer (keeps config values when the
 * tokenizer lacks a piece) and sets the stop list to {eos, <end_of_turn>}. */
void gemma3_config_set_tokens(gemma3_config *c, const lt_tokenizer *tok);
/* 1 when id is in the config's stop list (generation ends there). */
int gemma3_is_stop(const gemma3_config *c, int id);

/* ---- weights ------------------------------------------------------------------------- */

typedef struct gemma3_layer {
    lt_tensor input_layernorm;            /* [H] fp32 */
    lt_weight q_proj;                     /* [nh*hd, H] */
    lt_weight k_proj;                     /* [nkv*hd, H] */
    lt_weight v_proj;                     /* [nkv*hd, H] */
    lt_weight o_proj;                     /* [H, nh*hd] */
    lt_tensor q_norm;                     /* [hd] fp32 */
    lt_tensor k_norm;                     /* [hd] fp32 */
    lt_tensor post_attention_layernorm;   /* [H] fp32 */
    lt_tensor pre_feedforward_layernorm;  /* [H] fp32 */
    lt_weight gate_proj;                  /* [I, H] */
    lt_weight up_proj;                    /* [I, H] */
    lt_weight down_proj;                  /* [H, I] */
    lt_tensor post_feedforward_layernorm; /* [H] fp32 */
} gemma3_layer;

typedef struct gemma3_storage gemma3_storage; /* mapped files + allocations (gemma3.c) */

typedef struct gemma3_model gemma3_model;
struct gemma3_model {
    gemma3_config cfg;
    lt_weight embed_tokens; /* [V, H]; also the output head (tied) */
    lt_weight lm_head;      /* [V, H] only when a checkpoint is untied; w.data NULL if tied */
    lt_tensor norm;         /* [H] fp32: the final norm */
    gemma3_layer *layers;   /* [L] */
    lt_dtype dtype;         /* storage dtype of the 16-bit matrices; norms are always fp32 */
    int skipped_vision;     /* vision tower / projector tensors were present and skipped */
    /* the image tower + projector (siglip.h), NULL when the checkpoint has none, when it could
     * not be read and on device copies (vision_error then says why; the text model works).
     * skipped_vision keeps meaning "the checkpoint has vision tensors" whether or not the tower
     * was read. */
    struct siglip_tower *vision;
    char vision_error[LT_ERRLEN];
    /* bitsandbytes quantization of the linears (q, k, v, o, gate, up, down; never the
     * embedding, norms or head): kind of the quantized ones, how many, how many were kept in
     * 16 bits (by llm_int8_skip_modules or by quant=dynamic), and whether the checkpoint came
     * quantized */
    lt_quant_kind quant;
    int quant_nested; /* NF4 with double quantization */
    int n_quantized, n_kept16, prequantized;
    int quant_dynamic;    /* quant=dynamic chose the n_kept16 linears kept in 16 bits */
    float quant_keep;     /* its budget (fraction of the linear parameters) */
    int64_t n_params;     /* text parameters */
    int64_t weight_bytes; /* bytes the weights take in memory */
    char source[512];     /* directory or "random:gemma-3-1b" */
    gemma3_storage *storage;
};

/* The head used for logits: lm_head when untied, else embed_tokens. */
static inline const lt_weight *gemma3_head(const gemma3_model *m) {
    return m->lm_head.w.data ? &m->lm_head : &m->embed_tokens;
}

/* ---- where a load puts each finished weight ------------------------------------------------
 * A loader hands every weight to the sink the moment it is finished (read or drawn, converted,
 * quantized), so a sink that moves weights elsewhere (gemma3_device_sink: a backend's memory)
 * keeps one weight at a time in host memory instead of the whole model. Without a sink
 * (spec->sink NULL) the weights stay where the loader made them, as a host model.
 *
 * place: once per weight present (the walk of gemma3_weights_foreach: not an absent tied head),
 *   name its canonical name, t the model's own slot (a linear's lt_weight.w: its quantization
 *   state is gemma3_weight_owner(m, t)->q), its data in host memory: mapped from the checkpoint
 *   or a block of the model's storage. The sink may point t (and the quantization state) at
 *   other memory and give the host bytes back with gemma3_host_release. Order: the walk's, but
 *   with quant=dynamic the layers' weights come after the final norm and head, once every
 *   layer is measured (layer by layer, in the walk's order within a layer).
 * finish: once, after the last place (and after the image tower, m->vision, was read), when
 *   everything loaded; it may also move the tower and drop the host storage (gemma3_host_drop).
 *   The model the loader then returns is whatever finish made of m.
 * abort: once, when the load fails after it started (places done or not): gives back whatever
 *   place took; the loader then frees m. */
typedef struct gemma3_sink {
    lt_status (*place)(void *user, gemma3_model *m, const char *name, lt_tensor *t, char *err);
    lt_status (*finish)(void *user, gemma3_model *m, char *err);
    void (*abort)(void *user, gemma3_model *m);
    void *user;
} gemma3_sink;

/* Gives back the host memory behind p (bytes long) of a model being loaded: a block of its
 * storage is freed, pages of its mapped checkpoint go back to the system (the file gives them
 * back if they are read again), anything else (static tables) stays. For sinks. */
void gemma3_host_release(gemma3_model *m, const void *p, size_t bytes);
/* The bytes of the model's storage blocks (converted and quantized weights; mapped checkpoint
 * pages are not counted) live now, and at most at any moment so far. */
void gemma3_host_bytes(const gemma3_model *m, size_t *live, size_t *peak);
/* The model's mapped checkpoint (NULL for random weights and once dropped). */
const st_set *gemma3_host_checkpoint(const gemma3_model *m);
/* Frees the model's host storage and closes its checkpoint mapping (m->storage becomes NULL):
 * for a model whose weights a sink has moved elsewhere. */
void gemma3_host_drop(gemma3_model *m);

/* How to load: the options of gemma3_load_dir_spec / gemma3_load_random_spec. */
typedef struct qdyn_report qdyn_report; /* quant_dynamic.h */
typedef struct gemma3_load_spec {
    const char *dtype; /* NULL/"auto", "fp32", "fp16", "bf16": what stays 16-bit */
    const char *quant; /* NULL/"none", "nf4", "int8", "dynamic" */
    /* quant=dynamic: NF4 + double quant for every linear except the worst, measured at load,
     * which stay 16-bit: at most quant_keep (in [0, 1]) of the linear parameters. The output
     * errors are measured on calib_ids (qdyn_calibration_ids: BOS + the calibration text),
     * with n_threads CPU threads (0 = every core); report, when not NULL, receives what was
     * measured and chosen (the caller frees it with qdyn_report_free). */
    double quant_keep;
    const int32_t *calib_ids;
    int n_calib;
    int n_threads;
    qdyn_report *report;
    /* where each finished weight goes (NULL: it stays in host memory, a host model). With a
     * sink, the host memory a load takes at its peak is about one tensor (the largest: the
     * embedding in 16 bits, or a linear's fp32 copy and its quantized form); quant=dynamic's
     * calibration adds one layer's seven linears in fp32 and their inputs and outputs on the
     * calibration tokens. */
    const gemma3_sink *sink;
} gemma3_load_spec;

/* What a load will make, known before any weight is read: the config and how the linears will
 * be stored, for a memory plan (gemma3_fit_check) made before anything is allocated. */
typedef struct gemma3_plan {
    gemma3_config cfg;
    char quant[8];    /* "none", "nf4", "int8" or "dynamic" (as gemma3_device_bytes takes it) */
    int prequantized; /* 1: config.json's quantization_config says the checkpoint stores them
                         quantized (quant= cannot change that) */
    int nested;       /* NF4 with double quantization (quant=nf4's, or as the checkpoint says) */
    /* a pre-quantized checkpoint's llm_int8_skip_modules: for each of the 7 linears (q, k, v, o,
     * gate, up, down), the layers it keeps 16-bit */
    int kept16[7];
} gemma3_plan;
/* The plan of gemma3_load_dir_spec(dir) with quant (NULL/"none", "nf4", "int8", "dynamic"):
 * reads config.json only; refuses what that load would refuse about quant. */
lt_status gemma3_plan_dir(gemma3_plan *p, const char *dir, const char *quant, char *err);
/* The plan of gemma3_load_random_spec(size) with quant. */
lt_status gemma3_plan_random(gemma3_plan *p, const char *size, const char *quant, char *err);

/* Loads a Hugging Face directory (config.json + model.safetensors or the sharded index).
 * dtype: "auto"/NULL (as stored; mapped, not copied, when aligned), "fp32", "fp16", "bf16".
 * cb may be NULL. On failure *out stays NULL and nothing leaks. */
lt_status gemma3_load_dir(gemma3_model **out, const char *dir, const char *dtype,
                          const lt_callbacks *cb, char *err);
/* The same with quantization of the linears: quant NULL/"none" keeps 16-bit linears 16-bit,
 * "nf4" (NF4 with double quantization, as QLoRA does) or "int8" (LLM.int8) quantizes each one
 * as it is read. Tensors a checkpoint stores quantized (bitsandbytes' layout) load as they
 * are; with a quantization_config in config.json, the linears it does not list in
 * llm_int8_skip_modules are quantized its way and the listed ones stay 16-bit. dtype applies
 * to what stays 16-bit. "dynamic" needs gemma3_load_dir_spec (its calibration tokens). */
lt_status gemma3_load_dir_quant(gemma3_model **out, const char *dir, const char *dtype,
                                const char *quant, const lt_callbacks *cb, char *err);
/* The same with every option, quant=dynamic's included. quant=dynamic streams the layers (one
 * layer's linears in fp32 at a time) and refuses a checkpoint that is already quantized. */
lt_status gemma3_load_dir_spec(gemma3_model **out, const char *dir, const gemma3_load_spec *spec,
                               const lt_callbacks *cb, char *err);
/* The lt_weight whose storage tensor is t (a tensor of the weight walk), or NULL for norms. */
lt_weight *gemma3_weight_owner(gemma3_model *m, const lt_tensor *t);
/* The checkpoint tensor a weight was loaded from, as the model still maps it: the tensor
 * stored under the canonical name `canon` ("model.layers.3.mlp.up_proj.weight",
 * "lm_head.weight") in whichever text prefix the checkpoint uses. For a linear quantized at
 * load it is the original 16-bit weight; for a pre-quantized one, P.weight (read its group
 * with bnb_group_read on *st). NULL for random weights and for models copied to a device
 * (their host mapping is gone). st (may be NULL) receives the set, name (cap bytes, may be
 * NULL) the checkpoint's own name. */
const st_tensor *gemma3_source_tensor(const gemma3_model *m, const char *canon, const st_set **st,
                                      char *name, size_t cap);
/* "nf4 (double quant), 28 linears; 2 kept in 16 bits" into buf ("" when nothing is
 * quantized). */
const char *gemma3_quant_summary(const gemma3_model *m, char *buf, size_t cap);
/* Real shapes, seeded random weights (normal-ish, std 0.02; norms 0). size: "1b" etc.
 * dtype NULL/"auto" = bf16. Refuses with a clear message when it would not fit in memory. */
lt_status gemma3_load_random(gemma3_model **out, const char *size, uint64_t seed, const char *dtype,
                             const lt_callbacks *cb, char *err);
/* The same with quant "nf4" (double quantization) or "int8" (NULL/"none": 16-bit): each linear
 * is drawn in fp32 and quantized at once, so the 16-bit model never exists (27B in NF4 needs
 * about 16 GB of host memory, not 54). */
lt_status gemma3_load_random_quant(gemma3_model **out, const char *size, uint64_t seed,
                                   const char *dtype, const char *quant, const lt_callbacks *cb,
                                   char *err);
/* The same with every option (quant=dynamic measures random weights too: their errors are
 * flat, so which linears stay 16-bit matters little). */
lt_status gemma3_load_random_spec(gemma3_model **out, const char *size, uint64_t seed,
                                  const gemma3_load_spec *spec, const lt_callbacks *cb, char *err);
void gemma3_model_free(gemma3_model *m);

/* Every text weight, in a stable order: embed_tokens, then per layer in this order
 * (input_layernorm, q, k, v, o, q_norm, k_norm, post_attention_layernorm,
 * pre_feedforward_layernorm, gate, up, down, post_feedforward_layernorm), then norm, then
 * lm_head only when untied. Names are canonical HF names with the `model.` prefix
 * ("model.layers.3.self_attn.q_proj.weight", "lm_head.weight"). */
int gemma3_weight_count(const gemma3_model *m);
/* i-th weight: writes its name into name (cap >= 96) and returns the tensor (NULL if i is
 * out of range). The tensor is the model's own; exporters read it, mergers may write it. */
lt_tensor *gemma3_weight_at(gemma3_model *m, int i, char *name, size_t cap);
/* Visits every weight in that order; stops at and returns the first nonzero return. */
typedef int (*gemma3_weight_visit)(void *user, const char *hf_name, lt_tensor *t);
int gemma3_weights_foreach(gemma3_model *m, gemma3_weight_visit fn, void *user);

/* ---- KV cache and forward -------------------------------------------------------------- */

/* Per layer K/V in backend memory. Full layers grow up to max_seq; sliding layers are a ring
 * of window + GEMMA3_CHUNK slots (enough for any chunk's queries to see their window). */
#define GEMMA3_CHUNK 256

typedef struct gemma3_cache_layer {
    float *k, *v;  /* [cap, nkv, hd] fp32 */
    int32_t *kpos; /* [cap] position held by each slot, -1 = empty (backend memory) */
    int cap;
    int ring; /* 1 = sliding ring buffer (slot = pos % cap) */
} gemma3_cache_layer;

typedef struct gemma3_cache {
    gemma3_cache_layer *layers; /* [L] */
    int n_layers;
    int len; /* tokens seen so far (next position) */
    int max_seq;
    int32_t *kpos_host; /* scratch */
} gemma3_cache;

lt_status gemma3_cache_init(gemma3_cache *c, lt_ctx *ctx, const gemma3_config *cfg, int max_seq);
void gemma3_cache_reset(gemma3_cache *c, lt_ctx *ctx); /* len = 0, slots emptied */
void gemma3_cache_free(gemma3_cache *c, lt_ctx *ctx);

/* The slots layer l needs to hold any max_len positions the way gemma3_cache lays them out:
 * max_len for full layers, min(window + GEMMA3_CHUNK, max_len) for sliding ones. Position p
 * sits in slot p % slots in a gemma3_cache of any max_seq >= max_len (a batched decoder that
 * keeps this layout can take a cache's slots as they are). */
int gemma3_cache_slots(const gemma3_config *cfg, int l, int max_len);

/* What a forward call returns/keeps. All pointers are backend memory, caller-allocated;
 * any may be NULL.
 *   logits:       [T, V] fp32 for every input token (lt_logits)
 *   last_logits:  [V] fp32 for the last input token only (generation)
 *   hidden:       [T, H] fp32 after the final norm (the fused loss's input)
 *   layer_inputs: [L, T, H] fp32: the residual stream entering each layer (activation
 *                 checkpointing for the backward pass) */
typedef struct gemma3_outputs {
    float *logits;
    float *last_logits;
    float *hidden;
    float *layer_inputs;
} gemma3_outputs;

/* Runs T tokens at positions cache->len .. cache->len+T-1 (or 0..T-1 when cache is NULL,
 * attention then sees only these T tokens — the training forward). With a cache, K/V are
 * appended and cache->len advances; long inputs are processed in chunks of GEMMA3_CHUNK
 * (layer_inputs/hidden need cache == NULL or T <= GEMMA3_CHUNK). ids: host memory. */
lt_status gemma3_forward(const gemma3_model *m, lt_ctx *ctx, const int32_t *ids, int T,
                         gemma3_cache *cache, const gemma3_outputs *out);

/* Images in a forward: the image tokens of ids (cfg.vision.image_token_id), in order, take the
 * rows of embeds instead of their embedding (not scaled by sqrt(H)), as transformers'
 * Gemma3Model masked_scatter does; and each run of consecutive image tokens (one image's
 * block) also sees the later tokens of its own block, while a sliding layer's window still
 * limits how far back any token sees: attention_span's rule, the mask transformers 5.17 builds
 * from token_type_ids. A run never straddles two chunks. */
typedef struct gemma3_images {
    const float *embeds; /* backend memory [n_tokens, H] fp32 (siglip_encode's output) */
    int n_tokens;        /* must equal the number of image tokens in ids */
} gemma3_images;

/* gemma3_forward with images (img NULL or n_tokens 0: exactly gemma3_forward). An image token
 * id >= V (a config whose image_token_index lies past the embedding) is looked up as id 0,
 * as transformers does, before its row is replaced. */
lt_status gemma3_forward_images(const gemma3_model *m, lt_ctx *ctx, const int32_t *ids, int T,
                                gemma3_cache *cache, const gemma3_outputs *out,
                                const gemma3_images *img);

/* Embedding scale: (float)sqrt(H), what HF uses when the model runs in fp32 (the CPU
 * reference always computes in fp32, whatever the storage dtype). HF run in bf16/fp16 rounds
 * it to that dtype (transformers' Gemma3TextScaledWordEmbedding casts its fp32 scale to the
 * weight dtype: 34.0 for the 1B in bf16); a 16-bit GPU path may choose to match that. */
float gemma3_embed_scale(const gemma3_model *m);

/* ---- the forward in pieces, for a decoder that attends its own way (rollout.c) ---------- */

/* The activations of T rows of one layer, backend memory: h [T, H] the residual stream,
 * a [T, H] normed input, q [T, nh, hd], k and v [T, nkv, hd], att [T, nh*hd] the attention
 * output, o [T, H], gate and up [T, I], ids and pos [T] I32. */
typedef struct gemma3_acts {
    float *h, *a, *q, *k, *v, *att, *o, *gate, *up;
    int32_t *ids, *pos;
} gemma3_acts;

lt_status gemma3_acts_alloc(gemma3_acts *b, lt_ctx *ctx, const gemma3_config *c, int T);
void gemma3_acts_free(gemma3_acts *b, lt_ctx *ctx);
size_t gemma3_acts_bytes(const gemma3_config *c, int T); /* what gemma3_acts_alloc takes */
/* Layer l up to attention, on the T rows of b->h at positions b->pos: a = norm(h), then q, k,
 * v (qk-normed, RoPE'd) into b->q, b->k, b->v. */
lt_status gemma3_layer_qkv(const gemma3_model *m, lt_ctx *ctx, int l, const gemma3_acts *b, int T);
/* The rest of layer l once b->att holds the attention output: o_proj, post-norm, residual, the
 * MLP block. gemma3_forward's layer is gemma3_layer_qkv, attention, gemma3_layer_finish. */
lt_status gemma3_layer_finish(const gemma3_model *m, lt_ctx *ctx, int l, const gemma3_acts *b,
                              int T);
/* Layer l's attention window (0 = full) and the score scale 1/sqrt(query_pre_attn_scalar). */
int gemma3_layer_window(const gemma3_config *c, int l);
float gemma3_attn_scale(const gemma3_config *c);

/* ---- training passes (gemma3_backward.c) ------------------------------------------------ */

/* Norm-weight gradients for full fine-tuning, per layer in gemma3_layer's order. */
typedef struct gemma3_norm_grads {
    lt_tensor *layers; /* [L][6]: input, q_norm, k_norm, post_attention, pre_ff, post_ff */
    lt_tensor final;   /* [H] */
} gemma3_norm_grads;
enum { NG_INPUT, NG_QNORM, NG_KNORM, NG_POST_ATTN, NG_PRE_FF, NG_POST_FF, NG_COUNT };

/* What trains, as far as the backward needs to know: the trainer fills it from its adapters.
 * The LoRA gradients themselves hang on the weights (lt_weight.lora). */
typedef struct gemma3_trainable {
    int full;                    /* every weight trains: norm gradients go to *ng */
    const gemma3_norm_grads *ng; /* full fine-tuning only */
    float dropout;               /* LoRA dropout probability (0 = none) */
    int max_rank;                /* the adapters' rank (scratch sizes); 0 = no adapters */
} gemma3_trainable;

/* One micro-batch: n_seg samples packed into one row of N tokens (no padding); attention
 * stays inside each sample (positions restart at 0 per sample). targets[t] is the id token
 * t must predict, or -100. The last three fields zero (SFT) give the plain loss Σ CE. */
typedef struct train_batch {
    int32_t *ids;     /* [N] host */
    int32_t *targets; /* [N] host */
    int *seg_len;     /* [n_seg] */
    int n_seg;
    int N;
    int n_labels;         /* targets != -100 */
    const float *weights; /* [N] host: each target token's loss weight (any sign); NULL = 1 */
    float *logp;          /* [N] host out: each target token's log-probability (0 where -100);
                             NULL = not wanted */
    float logit_scale;    /* 0 or 1 = plain logits; GRPO: 1/temperature */
    /* images (gemma3_images' rule, per sample): the rows of the image tokens of ids
     * (cfg.vision.image_token_id), in order, host memory [n_image_tokens, H] fp32; NULL = none.
     * They replace those tokens' embeddings, each block sees itself (attention_span and
     * attention_span_backward). */
    const float *image_embeds;
    int n_image_tokens;
    /* host out [n_image_tokens, H] fp32, or NULL: dL/d(image rows) (scaled by grad_scale as
     * every gradient), written by a call with grads, for a tower whose adapters train; NULL
     * when the tower is frozen (then nothing flows into the rows). */
    float *image_grads;
} train_batch;

/* Forward, fused loss and (when grads) backward of one micro-batch. Gradients are
 * ACCUMULATED into the adapters' (or full weights') gradients, scaled by grad_scale
 * (1 / label tokens of the whole optimizer step, as transformers does since its gradient
 * accumulation fix). *loss_sum = Σ w·CE (w = b->weights, or 1), over logits times
 * b->logit_scale; b->logp, when given, receives each token's log-probability. tr may
 * be NULL (no trainable weights: loss only). dropout_seed != 0 turns LoRA dropout on, with
 * masks derived from it (0 = no dropout: evaluation). */
lt_status gemma3_train_batch(const gemma3_model *m, lt_ctx *ctx, const gemma3_trainable *tr,
                             const train_batch *b, float grad_scale, int grads,
                             uint64_t dropout_seed, double *loss_sum);
/* What gemma3_train_batch with grads allocates for N tokens: *device in backend memory (one
 * layer's activations and gradients, the residual stream, the loss's input, its per-token
 * weights and log-probabilities; not the temporaries inside ops), *host off the device (the
 * layer checkpoints, be->host_alloc). dropout: LoRA dropout on (its scratch counts). */
void gemma3_train_bytes(const gemma3_model *m, lt_ctx *ctx, const gemma3_trainable *tr, int64_t N,
                        int dropout, size_t *device, size_t *host);

#endif
