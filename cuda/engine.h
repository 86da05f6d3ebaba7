/* engine.h — the public API of lathe's engine: the only header kernel/ may include from cuda/.
 *
 * A session holds at most one loaded model (weights + tokenizer + config), its adapters and
 * the chat history. Every call returns LT_OK or an error code and, on error, fills the
 * session's message (lt_last_error), e.g. "config.json: key 'hidden_size' is not an integer".
 * A failed call leaves the session as it was. Nothing here prints, exits or aborts.
 *
 * Long calls report through lt_callbacks and poll the cancel flag between steps; a cancelled
 * call returns LT_CANCELLED. The engine knows nothing of Jupyter.
 */
#ifndef LATHE_ENGINE_H
#define LATHE_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lt_status {
    LT_OK = 0,
    LT_ERR_ARG = 1,    /* a bad option value or an impossible request */
    LT_ERR_IO = 2,     /* a file could not be read or written */
    LT_ERR_FORMAT = 3, /* a file is not what it claims (config, safetensors, tokenizer, data) */
    LT_ERR_MEMORY = 4, /* out of host or device memory (or the memory plan says it won't fit) */
    LT_ERR_DEVICE = 5, /* a CUDA / cuBLAS failure */
    LT_ERR_STATE = 6,  /* e.g. no model loaded */
    LT_CANCELLED = 7,  /* the cancel flag was raised */
} lt_status;

typedef struct lt_session lt_session;

/* Called from the thread running the engine call. */
typedef struct lt_callbacks {
    void *ctx;
    /* A line of progress for logs ("loading shard 2/4"); may be NULL. */
    void (*message)(void *ctx, const char *text);
    /* Progress of a long call: done of total units (total 0 = unknown), what = short label. */
    void (*progress)(void *ctx, const char *what, int64_t done, int64_t total);
    /* Generated text as it comes: a UTF-8 piece (may be empty when a token ends mid-char). */
    void (*text)(void *ctx, const char *piece);
} lt_callbacks;

lt_session *lt_session_new(void);
void lt_session_free(lt_session *s);
/* The message of the last failed call ("" if none). Valid until the next call. */
const char *lt_last_error(const lt_session *s);
/* Raised from any thread or a signal handler; cleared by the engine when a call starts. */
void lt_cancel(lt_session *s);

/* ---- loading ---------------------------------------------------------------------------- */

typedef struct lt_load_opts {
    const char *dtype;  /* "auto" (as stored), "fp32", "fp16", "bf16"; NULL = auto */
    const char *device; /* "auto", "cpu", "cuda"; NULL = auto */
    int max_seq;        /* 0 = the config's max_position_embeddings, capped at 8192 */
    const char *quant;  /* linears: "none" (NULL), "nf4" (NF4 + double quant, bitsandbytes'
                           layout), "int8" (LLM.int8), "dynamic" (NF4 + double quant, except the
                           linears whose quantization hurts most, measured at load, which stay
                           16-bit); pre-quantized checkpoints load as stored */
    float quant_keep;   /* quant=dynamic: the most it keeps in 16 bits, as a fraction of the
                           linear parameters, in [0, 1] (default 0.1) */
} lt_load_opts;
/* Fills the defaults (dtype and device "auto", max_seq 0, quant "none", quant_keep 0.1) from
 * lt_option_default("load", ...). */
void lt_load_opts_default(lt_load_opts *o);

/* SOURCE: a directory; a Hugging Face id ("google/gemma-3-1b-it[@REVISION]": its snapshot in
 * the Hugging Face cache, $HF_HUB_CACHE or $HF_HOME/hub, with what is missing downloaded from
 * $HF_ENDPOINT as huggingface_hub does; progress per file); "tiny"; "random:gemma-3-1b" (and
 * 270m/4b/12b/27b: real shapes, seeded random weights). Replaces any model already loaded
 * only when the new one loaded completely. */
lt_status lt_load(lt_session *s, const char *source, const lt_load_opts *opts,
                  const lt_callbacks *cb);

/* What is loaded, for %status and %load's summary: fills a caller-owned struct. */
typedef struct lt_model_info {
    int loaded;
    char source[512];
    char arch[64];        /* "gemma3_text", or "gemma3 (text + image tower)" when the tower
                             loaded */
    char dtype[16];       /* storage dtype of frozen weights */
    char device[16];      /* "cpu" or "cuda" */
    int64_t n_params;     /* text model parameters */
    int64_t weight_bytes; /* bytes the weights take in memory */
    int n_layers, hidden, n_heads, n_kv_heads, head_dim, intermediate, vocab;
    int sliding_window, max_seq;
    int skipped_vision; /* 1 when the checkpoint has vision tower/projector weights that were
                           not loaded (vision_note says why), 0 when it has none or they loaded */
    int image_tokens;   /* tokens an image takes in a chat (its block: mm_tokens_per_image + 2)
                           when the image tower loaded (lt_chat_images works), else 0 */
    /* The image tower (SigLIP + projector) when it loaded (vision_loaded 1), else all 0 */
    int vision_loaded;
    int vision_image_size, vision_patch_size, vision_layers, vision_hidden, vision_heads;
    int vision_intermediate, vision_mm_tokens; /* mm_tokens_per_image */
    int64_t vision_params;                     /* tower + projector parameters */
    char vision_dtype[16];                     /* storage dtype of its matrices */
    char vision_device[16];                    /* "cpu" or "cuda" */
    char vision_note[256];                     /* why a checkpoint's tower did not load, or "" */
    char quant[128]; /* "nf4 (double quant), 28 linears; ..." or "" when not quantized */
    /* GPU memory (device "cuda" only; 0 otherwise): lathe's allocator now and at its peak,
     * and the card's free and total bytes. */
    int64_t gpu_in_use, gpu_peak, gpu_free, gpu_total;
} lt_model_info;
void lt_model_info_get(const lt_session *s, lt_model_info *info);

/* quant=dynamic: what loading measured for each linear (q, k, v, o, gate, up, down of every
 * layer) and which ones it kept in 16 bits. Both errors are relative Frobenius norms: the
 * weight error |W - dequant(quant(W))| / |W|, and the output error |X·Wᵀ - X·dequant(W)ᵀ| /
 * |X·Wᵀ|, X being the inputs the 16-bit model gives that linear on a fixed calibration text. */
typedef struct lt_quant_module {
    char name[96];       /* "model.layers.3.mlp.down_proj" */
    int64_t n_params;    /* out x in */
    double weight_error; /* as NF4 with double quantization would store it */
    double output_error;
    double score; /* weight_error / median + output_error / median (medians over all linears) */
    int kept;     /* 1 = kept in 16 bits */
} lt_quant_module;

typedef struct lt_quant_info {
    int dynamic;           /* 1 when the loaded model came from quant=dynamic (else all 0) */
    double keep;           /* quant_keep: the budget, a fraction of the linear parameters */
    int64_t linear_params; /* of every linear */
    int64_t kept_params;   /* of the kept ones: at most keep x linear_params */
    int n_modules, n_kept;
    int n_calib;                /* calibration tokens the output errors were measured on */
    double median_weight_error; /* over the linears that were quantized (0 when none) */
    double median_output_error;
} lt_quant_info;
/* Fills info and copies the first cap modules (the model's order: layer by layer, q, k, v, o,
 * gate, up, down) into mods (may be NULL when cap is 0). */
void lt_quant_info_get(const lt_session *s, lt_quant_info *info, lt_quant_module *mods, int cap);

/* ---- tokens ----------------------------------------------------------------------------- */

/* Tokenizes text (no BOS added). *ids is malloc'd; the caller frees it. */
lt_status lt_tokenize(lt_session *s, const char *text, int32_t **ids, int *n);
/* Detokenizes; *text is malloc'd UTF-8. */
lt_status lt_detokenize(lt_session *s, const int32_t *ids, int n, char **text);

/* ---- running ---------------------------------------------------------------------------- */

/* fp32 logits of one sequence: *logits is malloc'd [n, vocab] row-major. */
lt_status lt_logits(lt_session *s, const int32_t *ids, int n, float **logits, int *vocab);
/* How images are prepared for the image tower, as transformers' Gemma3ImageProcessor and
 * Gemma3Processor options of the same names do. With pan_and_scan, an image whose aspect
 * ratio reaches pan_and_scan_min_ratio_to_activate is also cut into 2 to
 * pan_and_scan_max_num_crops crops along its long side, each at least
 * pan_and_scan_min_crop_size pixels on both sides (else none), and the tower sees the full
 * image and then each crop, each resized to its square: the image takes 1 + crops image
 * blocks, written in the text as the processor writes them ("Here is the original image
 * <block> and here are some crops to help you see better <block> <block>..."). */
typedef struct lt_image_opts {
    int pan_and_scan;                          /* default false (the processor's) */
    int pan_and_scan_min_crop_size;            /* pixels, >= 1 (default 256) */
    int pan_and_scan_max_num_crops;            /* in [1, 64] (default 4) */
    double pan_and_scan_min_ratio_to_activate; /* long side / short side, > 0 (default 1.2) */
} lt_image_opts;
/* Fills the defaults (no pan-and-scan; 256, 4, 1.2) from lt_option_default("image", ...). */
void lt_image_opts_default(lt_image_opts *o);

/* The same for a sequence with images: the ids carry one block per image (<start_of_image>,
 * mm_tokens_per_image image tokens, <end_of_image>, as Gemma 3's processor writes them), and
 * images[i] (a PNG or JPEG file) fills the i-th block's image tokens, read and resized as
 * transformers' Gemma3ImageProcessor does and encoded by the model's image tower. With
 * io->pan_and_scan, image i fills 1 + its crops consecutive blocks (the full image, then its
 * crops). io NULL: the defaults (no pan-and-scan). Refused for a model without a tower, a
 * wrong number of image tokens, bad io options, or an image file that cannot be read. */
lt_status lt_logits_image(lt_session *s, const int32_t *ids, int n, const char *const *images,
                          int n_images, const lt_image_opts *io, float **logits, int *vocab);
/* The image blocks the file at path takes under io (1 + its pan-and-scan crops; 1 without
 * pan-and-scan, the file then not read). Refused: bad io options, a file that cannot be read. */
lt_status lt_image_blocks(lt_session *s, const char *path, const lt_image_opts *io, int *blocks);

typedef struct lt_gen_opts {
    int max_new;       /* default 256 */
    float temperature; /* 0 = greedy; Gemma default 1.0 */
    int top_k;         /* 0 = off; Gemma default 64 */
    float top_p;       /* 1 = off; Gemma default 0.95 */
    float min_p;       /* 0 = off */
    uint64_t seed;
} lt_gen_opts;
/* Fills Gemma's defaults (temperature 1, top_k 64, top_p 0.95, min_p 0, max_new 256) from
 * lt_option_default("gen", ...). */
void lt_gen_opts_default(lt_gen_opts *o);

/* Continues raw text (BOS + tokens of prompt), streaming pieces through cb->text. If out is
 * not NULL, *out receives the whole completion (malloc'd). Stops at eos, <end_of_turn>,
 * max_new or cancel (a cancel keeps what was generated and returns LT_CANCELLED). */
lt_status lt_generate(lt_session *s, const char *prompt, const lt_gen_opts *o,
                      const lt_callbacks *cb, char **out);

/* Greedy/sampled continuation of token ids (no template, no BOS added): for parity tests. */
lt_status lt_generate_ids(lt_session *s, const int32_t *ids, int n, const lt_gen_opts *o,
                          int32_t **out_ids, int *n_out);

/* Chat: adds a user turn to the session's history, renders the Gemma chat template (one
 * BOS), generates the model turn, streams it and appends it to the history. */
lt_status lt_chat(lt_session *s, const char *user_text, const lt_gen_opts *o,
                  const lt_callbacks *cb, char **reply);
/* lt_chat with images: the user turn carries n_images images (PNG or JPEG files) before its
 * text, as Hugging Face's chat messages [{"type": "image"}, ..., {"type": "text", "text":
 * user_text}] do: the template writes "<start_of_image>" per image and each becomes an image
 * block ("\n\n", <start_of_image>, mm_tokens_per_image image tokens, <end_of_image>, "\n\n"),
 * as transformers' processing_gemma3.py expands it; the tower's soft tokens fill the block.
 * The history keeps every image's soft tokens and pixels (in host memory), so later turns
 * re-render the earlier images at their places without reading the files again; once the
 * tower's or the projector's adapters change (lt_lora_attach, lt_train, lt_grpo) the next turn
 * encodes them again through the changed tower. Refused, the history
 * unchanged: a model without an image tower, a file that cannot be read or is not a PNG or
 * JPEG, a conversation longer than max_seq, bad io options. n_images 0 is lt_chat. io
 * (NULL = lt_image_opts_default: no pan-and-scan) applies to this turn's images; with
 * pan_and_scan each image takes its 1 + crops blocks (lt_image_opts), and the history keeps
 * them so later turns render them the same way. io->pan_and_scan on a model without an image
 * tower is refused even with no images. */
lt_status lt_chat_images(lt_session *s, const char *user_text, const char *const *images,
                         int n_images, const lt_image_opts *io, const lt_gen_opts *o,
                         const lt_callbacks *cb, char **reply);
/* The ids the next lt_chat_images(s, user_text, images, n_images, io) prefills: [system], the
 * history, this user turn and "<start_of_turn>model\n", one BOS; runs nothing. Without
 * pan-and-scan the images are only counted (images may be NULL); with it each file is read for
 * its size (not encoded). *ids malloc'd. */
lt_status lt_chat_prompt_ids(lt_session *s, const char *user_text, const char *const *images,
                             int n_images, const lt_image_opts *io, int32_t **ids, int *n);
/* Forgets the conversation: its messages and its images. */
void lt_chat_reset(lt_session *s);
/* Sets or clears (NULL) the system prompt (Gemma folds it into the first user turn). */
lt_status lt_chat_system(lt_session *s, const char *system_text);

/* Renders messages (role "system"|"user"|"model"/"assistant", content) with the Gemma chat
 * template as the Hub's Jinja does; add_generation_prompt appends "<start_of_turn>model\n".
 * *text is malloc'd. The BOS appears once, as the text "<bos>". */
lt_status lt_chat_render(lt_session *s, const char *const *roles, const char *const *contents,
                         int n, int add_generation_prompt, char **text);

/* ---- fine-tuning (cuda/train/, cuda/export/merged.c) ----------------------------------- */

typedef struct lt_lora_opts {
    int r;         /* rank, > 0 (default 16) */
    float alpha;   /* lora_alpha (default 16); scale = alpha / r (or / sqrt(r)) */
    int rslora;    /* 1 = rank-stabilised scale alpha / sqrt(r) */
    float dropout; /* lora_dropout in [0, 1) (default 0) */
    uint64_t seed; /* initialisation seed */
    /* NULL = q,k,v,o,gate,up,down; names (q or q_proj, ...) or a regex; with an image tower
     * also vision, vision.q_proj ... vision.fc2 and projector (the CPU and CUDA backends) */
    const char *targets;
    int full;         /* 1 = full fine-tuning: every weight trains, no adapters */
    const char *load; /* a PEFT adapter folder to continue from (its config wins) */
} lt_lora_opts;
/* Fills the defaults from lt_option_default("lora", ...). */
void lt_lora_opts_default(lt_lora_opts *o);

/* What is attached (for %lora's summary and %status). */
typedef struct lt_lora_info {
    int attached, full;
    int r;
    float alpha, scale, dropout;
    int rslora;
    int n_modules;       /* adapted linear layers */
    int64_t n_trainable; /* trainable parameters */
    int64_t n_total;     /* model parameters */
    char targets[256];
    int steps_done; /* optimizer steps taken in this session's current run */
} lt_lora_info;
void lt_lora_info_get(const lt_session *s, lt_lora_info *info);

/* Attaches adapters to the loaded model (replacing any; a failure keeps the old ones). */
lt_status lt_lora_attach(lt_session *s, const lt_lora_opts *o, const lt_callbacks *cb);

typedef struct lt_train_opts {
    const char *data;        /* .jsonl / .json file */
    const char *format;      /* "auto", "text", "alpaca", "sharegpt", "messages" */
    int batch;               /* samples (or packed rows) per micro-batch (default 2) */
    int grad_accum;          /* micro-batches per optimizer step (default 1) */
    int steps;               /* optimizer steps; 0 = from epochs */
    float epochs;            /* used when steps = 0 (default 1) */
    float lr;                /* > 0 (default 2e-4) */
    int warmup;              /* warmup steps (default 0) */
    const char *schedule;    /* "constant", "linear" (default), "cosine" */
    const char *optim;       /* "adamw" */
    float weight_decay;      /* decoupled, matrices only (default 0) */
    float max_grad_norm;     /* 0 = off (default 1.0) */
    float beta1, beta2, eps; /* AdamW (0.9, 0.999, 1e-8) */
    int max_seq;             /* 0 = the session's max_seq (default 1024 cap) */
    int responses_only;      /* chat formats: labels only on model turns (default 1) */
    int packing;             /* pack samples into rows of max_seq (default 0) */
    uint64_t seed;           /* data order and dropout (default 3407) */
    int shuffle;             /* shuffle the samples every epoch (default 1) */
    const char *save;        /* checkpoint folder (DIR/checkpoint-STEP); NULL = none */
    int save_every;          /* steps between checkpoints; 0 = only at the end when save is set */
    int keep; /* checkpoints kept in save (the newest; older ones go once a new one is complete);
                 0 = all */
    const char *resume; /* a checkpoint (or a save= folder: its latest) to continue */
    /* With resume=: the comma-separated names of the options the caller set ("steps,lr").
     * Those that change only the run's length or the optimizer (steps, epochs, lr, warmup,
     * schedule, weight_decay, max_grad_norm) replace the checkpoint's, and the run says so;
     * one that changes the batches (format, batch, grad_accum, max_seq, responses_only,
     * packing, seed, shuffle) and differs from the checkpoint's is refused. NULL: the
     * checkpoint's options, all of them (data=, save= and save_every= still apply). */
    const char *given;
} lt_train_opts;
/* Fills the defaults from lt_option_default("train", ...). */
void lt_train_opts_default(lt_train_opts *o);

/* ---- option defaults (cuda/session_options.c) ------------------------------------------- */

/* Every default of the options structs above is written once, as text, in a table per struct:
 * group "load" (lt_load_opts), "gen" (lt_gen_opts), "image" (lt_image_opts), "lora"
 * (lt_lora_opts), "train" (lt_train_opts), "grpo" (lt_grpo_opts). Each field has one entry,
 * named as the field (and as the magic option that sets it). The text is what %help shows and
 * what the kernel parses for an option left out: integers in decimal, numbers as strtod reads
 * them ("2e-4"; a float field holds it rounded to float, a double field as strtod gives it),
 * flags "true"/"false", text as is. The lt_*_opts_default functions fill their struct by
 * parsing the same texts. */

/* group.name's default; NULL when the field is unset by default (NULL / 0, e.g. train's data)
 * or when the group or the name is unknown. The text lives as long as the program. */
const char *lt_option_default(const char *group, const char *name);
/* The name of group's i-th field (i = 0, 1, ...); NULL past the last or for an unknown group. */
const char *lt_option_name(const char *group, int i);

/* One optimizer step's report. losses: every step's loss so far (for the live plot). */
typedef struct lt_train_progress {
    int step, total_steps;
    float epoch;         /* fractional epoch */
    double loss;         /* mean CE over the step's label tokens */
    double lr;           /* learning rate used for this step */
    double grad_norm;    /* before clipping */
    double tokens_per_s; /* input tokens per second, this run */
    double elapsed_s, eta_s;
    int64_t tokens; /* input tokens seen in this run */
    const float *losses;
    int n_losses;
} lt_train_progress;

typedef struct lt_train_callbacks {
    void *ctx;
    void (*message)(void *ctx, const char *text);        /* plan, notes, warnings; may be NULL */
    void (*step)(void *ctx, const lt_train_progress *p); /* after every optimizer step */
} lt_train_callbacks;

typedef struct lt_train_result {
    int steps_done, total_steps, first_step;
    double first_loss, last_loss, seconds;
    int64_t tokens;
    int interrupted; /* stopped by lt_cancel: weights are those of step steps_done */
    int n_samples, n_truncated;
    char format[16];
    char saved[1024]; /* last checkpoint written, "" if none */
} lt_train_result;

/* Supervised fine-tuning of the attached adapters (or full weights) on a dataset. Polls the
 * cancel flag between micro-batches: a cancel keeps the weights of the last complete step
 * and returns LT_CANCELLED with res->interrupted; the next lt_train with the same options
 * (or with resume=) continues from there. res may be NULL. */
lt_status lt_train(lt_session *s, const lt_train_opts *o, const lt_train_callbacks *cb,
                   lt_train_result *res);

/* ---- reinforcement learning: %grpo (cuda/train/grpo.c) -------------------------------- */

typedef struct lt_grpo_opts {
    const char *data;          /* JSONL: "prompt" (text, or a list of chat messages) + fields */
    const char *reward;        /* reward functions: built-in names and/or "exec:COMMAND" */
    const char *weights;       /* one weight per reward, commas; NULL = all 1 */
    const char *markers;       /* the format rewards' four markers, commas; NULL = defaults */
    int group;                 /* completions per prompt (default 8) */
    int batch;                 /* prompts per generation (default 1) */
    int micro;                 /* completions per forward/backward pass; 0 = group */
    int steps;                 /* optimizer steps (default 50) */
    float lr;                  /* default 5e-6 */
    int warmup;                /* warmup steps (default 0) */
    const char *schedule;      /* "constant", "linear" (default), "cosine" */
    float weight_decay;        /* default 0 */
    float max_grad_norm;       /* default 1.0; 0 = off */
    float beta;                /* KL coefficient (default 0: no reference pass) */
    float epsilon;             /* lower clipping range (0.2) */
    float epsilon_high;        /* upper clipping range (0.2) */
    const char *loss;          /* "dapo" (default), "grpo", "bnpo", "dr_grpo" */
    const char *scale_rewards; /* "group" (default), "batch", "none" */
    int max_prompt;            /* prompt tokens kept (the last ones; default 256) */
    int max_completion;        /* new tokens per completion (default 256) */
    float temperature;         /* sampling temperature, also in the log-probabilities (1.0) */
    float top_p;               /* 1 = off */
    int top_k;                 /* 0 = off */
    int iterations;            /* optimizer steps per generation (TRL's num_iterations; 1) */
    uint64_t seed;             /* prompt order and sampling (default 3407) */
    int shuffle;               /* shuffle the prompts every epoch (default true) */
    int show_every;            /* print one sampled completion every N steps (0 = never; 5) */
    float reward_timeout;      /* seconds an exec: reward may take per step (default 120) */
    const char *log;           /* JSON lines, one per step; NULL = none */
} lt_grpo_opts;
/* Fills the defaults from lt_option_default("grpo", ...). */
void lt_grpo_opts_default(lt_grpo_opts *o);

/* One optimizer step's report, with TRL's metrics. */
typedef struct lt_grpo_progress {
    int step, total_steps;
    double loss, lr, grad_norm;
    double reward, reward_std; /* mean total reward; mean of the groups' std */
    int n_rewards;             /* reward functions */
    const char *const *reward_names;
    const double *reward_mean, *reward_func_std; /* [n_rewards] */
    double kl;                                   /* mean per-token k3 KL (0 when beta = 0) */
    double completion_length;                    /* mean tokens per completion */
    double clipped_ratio;                        /* completions that reached max_completion */
    double clip_ratio;                           /* tokens whose ratio was clipped */
    double sample_tok_s, train_tok_s, elapsed_s, eta_s;
    const float *rewards; /* every step's mean reward so far (the live curve) */
    int n_steps_logged;
    /* one completion to show this step, or NULL: its prompt, text and total reward */
    const char *show_prompt, *show_completion;
    double show_reward;
} lt_grpo_progress;

typedef struct lt_grpo_callbacks {
    void *ctx;
    void (*message)(void *ctx, const char *text);       /* plan and notes; may be NULL */
    void (*step)(void *ctx, const lt_grpo_progress *p); /* after every optimizer step */
} lt_grpo_callbacks;

typedef struct lt_grpo_result {
    int steps_done, total_steps;
    double first_reward, last_reward, seconds;
    int interrupted; /* weights are those of step steps_done */
    int n_prompts;
} lt_grpo_result;

/* GRPO on the attached LoRA adapters: each generation samples group completions for each of
 * batch prompts (the adapters active), scores them with the rewards, and takes `iterations`
 * optimizer steps on TRL's loss; the reference policy of the KL term is the model with the
 * adapters switched off. A cancel (polled between decode steps and micro-batches) keeps the
 * weights of the last complete step and returns LT_CANCELLED with res->interrupted. Each call
 * starts a fresh optimizer (a following %train does too). res may be NULL. */
lt_status lt_grpo(lt_session *s, const lt_grpo_opts *o, const lt_grpo_callbacks *cb,
                  lt_grpo_result *res);

/* A PEFT adapter folder (adapter_config.json + adapter_model.safetensors). */
lt_status lt_save_adapter(lt_session *s, const char *dir);
/* A merged checkpoint transformers loads: config.json + model.safetensors + tokenizer.model.
 * dtype: "auto" (as loaded), "fp32", "fp16", "bf16". A quantized (NF4/int8) base is saved in
 * 16 bits: a model quantized at load merges into the original 16-bit weights of the checkpoint
 * it still maps, a pre-quantized one into its dequantized weights; cb->message (cb may be
 * NULL) says which. */
lt_status lt_save_merged(lt_session *s, const char *dir, const char *dtype, const lt_callbacks *cb);
/* A bitsandbytes checkpoint of a quantized model (NF4 or int8), as transformers saves one and
 * loads with bitsandbytes: config.json (with quantization_config) + model.safetensors +
 * tokenizer.model. The 16-bit parts (embedding, norms, linears kept in 16 bits) are written in
 * dtype ("auto" = as loaded, "fp32", "fp16", "bf16"). Attached adapters are not in it (it
 * holds the quantized base; cb->message says so). A 16-bit model is refused (LT_ERR_STATE). */
lt_status lt_save_quantized(lt_session *s, const char *dir, const char *dtype,
                            const lt_callbacks *cb);

/* ---- export (cuda/gguf_export.c) -------------------------------------------------------- */

typedef struct lt_export_result {
    uint64_t bytes; /* size of the file written */
    int n_tensors;
    int n_fallback; /* tensors stored in a fallback type: rows not a multiple of the block */
    /* the mmproj file (the image tower and projector) written with it; "" when none was */
    char mmproj_path[4096];
    uint64_t mmproj_bytes;
    int mmproj_tensors;
    char mmproj_note[320]; /* when none was: why ("mmproj=none", "the model has no image tower") */
} lt_export_result;

/* Writes the loaded model, enabled LoRA adapters merged (in fp32), as a GGUF file llama.cpp
 * loads. type: "f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m" (per-tensor types as llama.cpp's
 * converter / llama-quantize choose them). A model with an image tower also gets its mmproj
 * file, the one llama.cpp's multimodal tools load with --mmproj (llama-mtmd-cli,
 * llama-server): mmproj NULL, "" or "auto" puts it beside path as "mmproj-<file name of path>", a
 * path puts it there, "none" writes none; a text-only model writes only path (cb->message says so;
 * an explicit mmproj path is then refused). The tower's matrices follow type for f32 / bf16
 * and are f16 otherwise. Refuses to replace an existing file unless overwrite; written
 * atomically (the files appear together, nothing appears on failure or cancel); a missing
 * folder is created. Progress goes to cb->progress("export" / "export mmproj", bytes done,
 * bytes total), notes to cb->message. res may be NULL. */
lt_status lt_export_gguf(lt_session *s, const char *path, const char *type, const char *mmproj,
                         int overwrite, const lt_callbacks *cb, lt_export_result *res);

#ifdef __cplusplus
}
#endif
#endif
