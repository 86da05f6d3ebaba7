/* model.h — Gemma 3 inside the engine: config, weights, KV cache and forward. Engine-private.
 *
 * gemma3_config holds every text hyper-parameter of REFERENCE.md §1.1, already resolved
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
#include "cuda/text/tokenizer.h"

#define GEMMA3_MAX_LAYERS 256

/* ---- config -------------------------------------------------------------------------- */

typedef enum gemma3_layer_type {
    GEMMA3_SLIDING = 0, /* "sliding_attention": local window, rope_local_base_freq */
    GEMMA3_FULL = 1,    /* "full_attention": global, rope_theta (+ rope_scaling) */
} gemma3_layer_type;

typedef struct gemma3_rope {
    char type[16]; /* "default" or "linear" */
    double theta;  /* base: 1e4 sliding, 1e6 full */
    double factor; /* linear scaling: positions / factor; 1.0 = none */
} gemma3_rope;

typedef struct gemma3_config {
    char architecture[64]; /* "Gemma3ForCausalLM" / "Gemma3ForConditionalGeneration" */
    char model_type[32];   /* top-level: "gemma3_text" or "gemma3" */
    int multimodal;        /* 1 when config.json is the nested Gemma3Config style */

    int hidden_size;                /* H */
    int intermediate_size;          /* I */
    int num_hidden_layers;          /* L */
    int num_attention_heads;        /* nh */
    int num_key_value_heads;        /* nkv */
    int head_dim;                   /* hd (nh*hd != H in general) */
    int vocab_size;                 /* embedding rows V: 262144 (270M/1B) or 262208 (4B+) */
    int max_position_embeddings;    /* 32768 / 131072 */
    int sliding_window;             /* 512 / 1024 */
    int sliding_window_pattern;     /* 6 (legacy key; layer_types wins when present) */
    double query_pre_attn_scalar;   /* attention scale = query_pre_attn_scalar^-0.5 */
    double rms_norm_eps;            /* 1e-6 */
    double final_logit_softcapping; /* 0 = none (Gemma 3: null) */
    double attn_logit_softcapping;  /* 0 = none (Gemma 3: null) */
    char hidden_activation[32];     /* "gelu_pytorch_tanh" */
    int tie_word_embeddings;        /* 1 for every Gemma 3 */
    int attention_bias;             /* 0 */

    gemma3_rope rope[2];                    /* indexed by gemma3_layer_type */
    uint8_t layer_types[GEMMA3_MAX_LAYERS]; /* gemma3_layer_type per layer */

    /* Special ids: from config.json where given, then confirmed/filled by piece from the
     * tokenizer (gemma3_config_set_tokens). -1 = unknown. */
    int bos_id, eos_id, pad_id;
    int eos_ids[4], n_eos_ids; /* generation stop ids, e.g. [1, 106] */
    int start_of_turn_id;      /* "<start_of_turn>" (105) */
    int end_of_turn_id;        /* "<end_of_turn>" (106) */
} gemma3_config;

/* Transformers' Gemma3TextConfig defaults for keys a sparse text_config leaves out
 * (REFERENCE §1.1). Required shape keys (hidden_size, ...) are left 0. */
void gemma3_config_defaults(gemma3_config *c);
/* Parses config.json (flat gemma3_text, nested gemma3 + text_config, transformers-5
 * layer_types/rope_parameters). err names config.json and the key. */
lt_status gemma3_config_load(gemma3_config *c, const char *path, char *err);
/* The same from JSON text already in memory; `what` names the source in errors. */
lt_status gemma3_config_parse(gemma3_config *c, const char *json, const char *what, char *err);
/* Real shapes of a released size: "270m", "1b", "4b", "12b", "27b". */
lt_status gemma3_config_preset(gemma3_config *c, const char *size, char *err);
/* Fills bos/eos/pad/turn ids by piece from the tokenizer (keeps config values when the
 * tokenizer lacks a piece) and sets the stop list to {eos, <end_of_turn>}. */
void gemma3_config_set_tokens(gemma3_config *c, const lt_tokenizer *tok);
/* Layer l's type. */
static inline gemma3_layer_type gemma3_layer_kind(const gemma3_config *c, int l) {
    return (gemma3_layer_type)c->layer_types[l];
}

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

typedef struct gemma3_model {
    gemma3_config cfg;
    lt_weight embed_tokens; /* [V, H]; also the output head (tied) */
    lt_weight lm_head;      /* [V, H] only when a checkpoint is untied; w.data NULL if tied */
    lt_tensor norm;         /* [H] fp32: the final norm */
    gemma3_layer *layers;   /* [L] */
    lt_dtype dtype;         /* storage dtype of the matrices; norms are always fp32 */
    int skipped_vision;     /* vision tower / projector tensors were present and skipped */
    int64_t n_params;       /* text parameters */
    int64_t weight_bytes;   /* bytes the weights take in memory */
    char source[512];       /* directory or "random:gemma-3-1b" */
    gemma3_storage *storage;
} gemma3_model;

/* The head used for logits: lm_head when untied, else embed_tokens. */
static inline const lt_weight *gemma3_head(const gemma3_model *m) {
    return m->lm_head.w.data ? &m->lm_head : &m->embed_tokens;
}

/* Loads a Hugging Face directory (config.json + model.safetensors or the sharded index).
 * dtype: "auto"/NULL (as stored; mapped, not copied, when aligned), "fp32", "fp16", "bf16".
 * cb may be NULL. On failure *out stays NULL and nothing leaks. */
lt_status gemma3_load_dir(gemma3_model **out, const char *dir, const char *dtype,
                          const lt_callbacks *cb, char *err);
/* Real shapes, seeded random weights (normal-ish, std 0.02; norms 0). size: "1b" etc.
 * dtype NULL/"auto" = bf16. Refuses with a clear message when it would not fit in memory. */
lt_status gemma3_load_random(gemma3_model **out, const char *size, uint64_t seed, const char *dtype,
                             const lt_callbacks *cb, char *err);
void gemma3_model_free(gemma3_model *m);

/* Every text weight, in a stable order: embed_tokens, then per layer in the table order of
 * REFERENCE §1.5 (input_layernorm, q, k, v, o, q_norm, k_norm, post_attention_layernorm,
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

/* Embedding scale: (float)sqrt(H), what HF uses when the model runs in fp32 (the CPU
 * reference always computes in fp32, whatever the storage dtype). HF run in bf16/fp16 rounds
 * it to that dtype (REFERENCE §1.2.1); a 16-bit GPU path may choose to match that. */
float gemma3_embed_scale(const gemma3_model *m);

#endif
