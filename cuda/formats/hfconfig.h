/* hfconfig.h — a Gemma 3 config.json, parsed and resolved. Engine-private.
 *
 * gemma3_config holds every text hyper-parameter transformers' Gemma3TextConfig has, already
 * resolved: defaults filled, layer types expanded per layer, RoPE per layer type. Parsed from
 * every config.json style Gemma 3 has shipped: flat gemma3_text, the nested multimodal
 * Gemma3Config with its text_config, and transformers 5's layer_types / rope_parameters.
 * Knows JSON and nothing of weights or tokenizers (cuda/model/ fills the special ids from the
 * tokenizer).
 */
#ifndef LATHE_HFCONFIG_H
#define LATHE_HFCONFIG_H

#include <stdint.h>

#include "cuda/base/tensor.h"

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

/* The image side of a multimodal (Gemma3ForConditionalGeneration) config.json: its
 * vision_config (transformers' SiglipVisionConfig, class defaults for the keys it leaves out)
 * and the top-level image fields of Gemma3Config. present = 0 for a text-only config, and for
 * a vision_config lathe cannot use (error says why; the text model still loads). */
typedef struct gemma3_vision_config {
    int present;
    int hidden_size;         /* SigLIP width D (768 default; 1152 in Gemma 3) */
    int intermediate_size;   /* its MLP width (3072; 4304) */
    int num_hidden_layers;   /* encoder layers (12; 27) */
    int num_attention_heads; /* (12; 16) */
    int num_channels;        /* 3 */
    int image_size;          /* side of the square input (224; 896) */
    int patch_size;          /* conv kernel = stride (16; 14) */
    double layer_norm_eps;   /* 1e-6 */
    char hidden_act[32];     /* "gelu_pytorch_tanh" */
    int mm_tokens_per_image; /* soft tokens per image after pooling (256) */
    int image_token_id;      /* image_token_index (262144) */
    int boi_token_id;        /* boi_token_index, <start_of_image> (255999) */
    int eoi_token_id;        /* eoi_token_index, <end_of_image> (256000) */
    char error[LT_ERRLEN];   /* present = 0 although a vision_config exists: why */
} gemma3_vision_config;

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

    gemma3_vision_config vision; /* the image tower's config (present = 0: text only) */
} gemma3_config;

/* Transformers' Gemma3TextConfig defaults for keys a sparse text_config leaves out
 * (transformers' configuration_gemma3.py). Required shape keys (hidden_size, ...) are left 0. */
void gemma3_config_defaults(gemma3_config *c);
/* Parses config.json (flat gemma3_text, nested gemma3 + text_config, transformers-5
 * layer_types/rope_parameters). err names config.json and the key. */
lt_status gemma3_config_load(gemma3_config *c, const char *path, char *err);
/* The same from JSON text already in memory; `what` names the source in errors. */
lt_status gemma3_config_parse(gemma3_config *c, const char *json, const char *what, char *err);
/* Real shapes of a released size: "270m", "1b", "4b", "12b", "27b". */
lt_status gemma3_config_preset(gemma3_config *c, const char *size, char *err);
/* Layer l's type. */
static inline gemma3_layer_type gemma3_layer_kind(const gemma3_config *c, int l) {
    return (gemma3_layer_type)c->layer_types[l];
}

#endif
