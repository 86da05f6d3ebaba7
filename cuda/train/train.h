/* train.h — the fine-tuning room: adapters, trainable parameters, the optimizer, datasets,
 * the %train loop, and the files the trainer writes and reads. Engine-private. The model's
 * forward and backward passes it drives are cuda/model/ (gemma3_train_batch).
 *
 *   lora.c             lt_adapters: which weights train (LoRA slots or full fine-tuning),
 *                      PEFT initialisation, target matching, merging
 *   optim.c            AdamW state, learning-rate schedules, gradient clipping
 *   data.c             JSONL/JSON datasets -> token ids + label masks; batching and packing
 *   peft_adapter.c     PEFT adapter folders (adapter_config.json + adapter_model.safetensors)
 *   checkpoint.c       training checkpoints (trainable tensors, AdamW state, a PEFT adapter)
 *   grpo_loss.c        GRPO advantages and TRL's per-token losses with dLoss/dlogp (its own
 *                      header, grpo_loss.h)
 *   train.c            lt_trainer: the %train loop (trainer_run), given the model, tokenizer,
 *                      backend and cancel flag it works on for one call
 *   grpo.c             the %grpo loop (grpo_run): rollouts, rewards, TRL's GRPO loss
 *   grpo_loss.c        GRPO's advantages and per-token loss (grpo_loss.h)
 *   rewards.c          GRPO's reward functions, built-in and exec: programs (rewards.h)
 * May include model/, text/, formats/, backend/ and base/; never the session or export/.
 */
#ifndef LATHE_TRAIN_H
#define LATHE_TRAIN_H

#include <stdatomic.h>
#include <stdint.h>

#include "cuda/backend/backend.h"
#include "cuda/base/atomic_file.h"
#include "cuda/model/model.h"
#include "cuda/text/tokenizer.h"

/* ---- trainable parameters (lora.c) ----------------------------------------------------- */

/* One tensor the optimizer updates: value (fp32, in place), its gradient and AdamW state.
 * All data pointers are backend memory owned by lt_adapters (value may be the model's own
 * tensor for full fine-tuning). */
typedef struct train_param {
    char name[192];   /* PEFT / HF name, e.g. "model.layers.0.self_attn.q_proj.lora_A.weight" */
    lt_tensor *value; /* fp32 */
    lt_tensor grad;   /* fp32, same shape */
    lt_tensor m, v;   /* AdamW exp_avg, exp_avg_sq (fp32); data NULL until the first step */
    int decay;        /* 1 = weight decay applies (matrices), 0 = norms */
    /* 1: an image-tower or projector adapter, which a step that runs no image leaves without a
     * gradient (torch: grad None), so AdamW leaves it as it is that step */
    int image_only;
    int steps; /* AdamW's step count of this parameter (torch keeps one per parameter) */
} train_param;

/* Where an adapted linear sits: the language model, the image tower's encoder, or the
 * projector's matrix. */
typedef enum { LORA_TEXT = 0, LORA_TOWER = 1, LORA_PROJECTOR = 2 } lora_part;

/* One adapted linear layer. */
typedef struct lora_slot {
    /* canonical module path: "model.layers.3.mlp.down_proj" (text), transformers 5's path of
     * a tower linear ("model.vision_tower.encoder.layers.0.mlp.fc1"), or
     * "model.multi_modal_projector" for the projector */
    char module[160];
    int layer; /* the text or tower layer; 0 for the projector */
    lora_part part;
    lt_weight *w; /* the model's weight (its ->lora points at .lora below) */
    /* For the projector, w is the transpose [H, D] of the stored mm_input_projection_weight
     * [D, H] (siglip.h), so lora.a [r, D] and lora.b [H, r] are PEFT's lora_B and lora_A
     * transposed (PEFT's ParamWrapper adapts the stored [D, H] matrix as [out, in]). */
    lt_lora lora;
} lora_slot;

typedef struct owned_copy {
    lt_tensor *t; /* the model's tensor, pointing at copy while training */
    void *orig;   /* its own storage */
    lt_dtype orig_dtype;
    void *copy; /* fp32 */
} owned_copy;

typedef struct lt_adapters {
    gemma3_model *model; /* not owned */
    lt_ctx *ctx;         /* not owned */
    int full;            /* 1 = full fine-tuning (every weight trains), 0 = LoRA */
    /* LoRA */
    int r;
    float alpha;
    int rslora;
    float dropout;
    char *targets; /* as given: "q_proj,k_proj,..." (a list) or a regex */
    int targets_regex;
    lora_slot *slots;
    int n_slots;
    int n_tower_slots; /* slots on the image tower or the projector (they follow the text's) */
    /* full fine-tuning: fp32 copies made of 16-bit weights (owned) and norm gradients */
    owned_copy *owned;
    int n_owned;
    gemma3_norm_grads ng;
    gemma3_trainable tr; /* what the backward sees of the above (lora_trainable) */
    /* what the optimizer sees */
    train_param *params;
    int n_params;
    int64_t n_trainable;
} lt_adapters;

typedef struct lora_opts {
    int r;       /* > 0 */
    float alpha; /* default 16 */
    int rslora;
    float dropout; /* [0, 1) */
    uint64_t seed;
    const char *targets; /* NULL = q,k,v,o,gate,up,down; short names, *_proj names, or a regex */
    int targets_list;    /* 1: targets is a list of names even where one holds a regex
                          * character (adapter_config.json's target_modules as a JSON list,
                          * which PEFT matches by name) */
    int full;            /* full fine-tuning instead of adapters */
    /* The image tower (a model with one, on a backend with its backward ops): list entries
     * "vision.NAME" (q_proj, k_proj, v_proj, out_proj, fc1, fc2; q, k, v, out for short) adapt
     * that linear of every encoder layer, "vision" all six, "projector" the projector's matrix;
     * a regex is also tried on the tower's module paths. tower_suffix = 1: plain names match
     * the tower's linears too, by PEFT's suffix rule (a PEFT adapter listing target_modules
     * whose file holds tower tensors). projector = 1 adapts the projector's matrix (PEFT's
     * target_parameters "multi_modal_projector.mm_input_projection_weight"). */
    int tower_suffix;
    int projector;
} lora_opts;

/* Attaches fresh adapters (PEFT init: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0), or makes every
 * weight trainable (full). On failure nothing is attached. err: LT_ERRLEN. */
lt_status lora_attach(lt_adapters **out, gemma3_model *m, lt_ctx *ctx, const lora_opts *o,
                      char *err);
/* Detaches (model weights point at no adapter again) and frees. After full fine-tuning the
 * trained values stay in the model (written back into its storage, in its dtype). */
void lora_free(lt_adapters *a);
/* 1 when the adapters' targets select this canonical module ("model.layers.3.mlp.up_proj"):
 * PEFT's list rule (equal, or ends with "." + entry; "q" means "q_proj") or re.fullmatch for a
 * regex (also tried on the multimodal spellings of the name). */
int lora_module_matches(const lt_adapters *a, const char *module);
/* What the model's backward needs to know of these adapters (NULL for NULL): a view kept
 * inside a, valid while a lives. */
const gemma3_trainable *lora_trainable(lt_adapters *a);
/* Sets every gradient to zero. */
lt_status lora_zero_grads(lt_adapters *a);
/* Enables/disables every adapter (GRPO's reference policy; merged export). */
void lora_enable(lt_adapters *a, int on);
/* The "base_model.model." PEFT key prefix's module path for slot i (multimodal aware). */
void lora_peft_module(const lt_adapters *a, const lora_slot *s, char *out, size_t cap);
/* The accepted tower names of %lora targets=, for messages and %help. */
#define LORA_TOWER_NAMES                                                                           \
    "vision (every tower linear), vision.q_proj, vision.k_proj, vision.v_proj, vision.out_proj, "  \
    "vision.fc1, vision.fc2 (vision.q, .k, .v, .out for short), projector"
/* W' = W + s·B·A for every slot, into a caller-provided fp32 buffer of slot->w's shape. */
lt_status lora_merged_weight(const lt_adapters *a, const lora_slot *s, float *out, char *err);
/* w += s·B·A in fp32, w: a caller-provided [out, in] base (lora_merged_weight's second step,
 * for a base read from elsewhere than the model's weight, such as the 16-bit checkpoint a
 * quantized model was made from). */
void lora_add_delta(const lora_slot *s, float *w);

/* ---- optimizer (optim.c) --------------------------------------------------------------- */

typedef enum { SCHED_CONSTANT, SCHED_LINEAR, SCHED_COSINE } lr_schedule;

typedef struct optim_opts {
    float lr, beta1, beta2, eps, weight_decay, max_grad_norm;
    int warmup;
    lr_schedule schedule;
} optim_opts;

/* "constant", "linear" (also for NULL), "cosine" into *s; -1 for another name. */
int optim_schedule_parse(const char *name, lr_schedule *s);
/* transformers' get_{constant,linear,cosine}_schedule_with_warmup multiplier for the
 * optimizer step `step` (0-based: the first update uses step 0) of `total`. */
double optim_lr_factor(lr_schedule s, int step, int warmup, int total);
/* torch.nn.utils.clip_grad_norm_ over every parameter: returns the total norm before
 * clipping in *norm; scales when max_norm > 0 and the norm exceeds it. */
lt_status optim_clip(lt_adapters *a, float max_norm, double *norm, char *err);
/* One AdamW update (allocates m/v on first use) of every parameter that has a gradient this
 * step: all of them when images_ran, else all but the image_only ones, which torch.optim.AdamW
 * skips (grad None: no update, no decay, their step count stays). Each parameter's bias
 * correction uses its own step count, as torch's per-parameter state['step']. */
lt_status optim_step(lt_adapters *a, const optim_opts *o, float lr, int images_ran, char *err);
/* Frees the AdamW state (a new %lora or a fresh optimizer). */
void optim_reset(lt_adapters *a);

/* ---- data (data.c) --------------------------------------------------------------------- */

typedef struct train_sample {
    int32_t *ids;  /* [n] */
    uint8_t *mask; /* [n]: 1 = token is a label (trained), 0 = context only */
    int n;
    int line;    /* 1-based line (JSONL) or record (JSON array) in the file, for messages */
    int *images; /* [n_images]: the image of each image block, in order (train_data.images) */
    int n_images;
} train_sample;

/* One distinct image file of a dataset (a messages content part {"type": "image", ...}). */
typedef struct train_image {
    char *path; /* as it is opened: a relative path resolved against the dataset's folder */
    int line;   /* the first line (record) naming it, for messages */
} train_image;

typedef struct train_data {
    train_sample *s;
    int n;
    char path[512];
    char format[16]; /* the detected/forced format */
    int n_truncated;
    int64_t n_tokens, n_labels;
    train_image *images; /* [n_images] distinct image files, in order of first use */
    int n_images;
    int64_t n_image_blocks; /* image blocks over every sample */
    char file[256];         /* the dataset's file name and "line" / "record": for messages */
    const char *unit;
} train_data;

/* What a dataset file may hold, by default: a file of at most 4 GiB (LATHE_DATA_MAX_BYTES
 * overrides it, in bytes), read line by line, each JSON line (one record) at most 64 MiB
 * (LATHE_DATA_MAX_ROW); a JSON array file is parsed whole, so it may be at most 1 GiB (and
 * never more than the file limit). */
#define DATA_MAX_FILE_BYTES (4ull << 30)
#define DATA_MAX_ROW_BYTES ((size_t)64 << 20)
#define DATA_MAX_ARRAY_BYTES (1ull << 30)

typedef struct data_opts {
    const char *path;
    const char *format; /* "auto", "text", "alpaca", "sharegpt", "messages" */
    int max_seq;
    int responses_only;       /* chat formats: train on model turns only */
    const atomic_int *cancel; /* polled while reading and between records; NULL = none */
    uint64_t max_file_bytes;  /* 0 = LATHE_DATA_MAX_BYTES or DATA_MAX_FILE_BYTES */
    size_t max_row_bytes;     /* 0 = LATHE_DATA_MAX_ROW or DATA_MAX_ROW_BYTES */
    /* Image parts of messages content lists: NULL accepts them (the model has an image tower;
     * data_load's cfg gives their tokens), else why the model cannot take them. */
    const char *image_refusal;
} data_opts;

/* Reads and tokenizes the whole dataset; errors name file:line and the field. A user message's
 * content list may hold image parts ({"type": "image", "image": PATH}; "path" and a local "url"
 * are read too), each rendered as the chat template and Gemma 3's processor render it
 * (chat_image.h): an image block whose tokens are never labels. The files are checked
 * (present, a readable regular file) and listed once each in d->images; decoding and encoding
 * them is left to the trainer. A sample whose image blocks do not all fit max_seq is
 * refused (the text after its last block is cut as for any sample). Only a regular
 * file is read (a directory, FIFO, device or socket is refused by name, before any blocking
 * read); a UTF-8 byte order mark is skipped; the limits above are named when exceeded; a
 * record is tokenized only as far as max_seq can use. A raised cancel flag stops it with
 * LT_CANCELLED; cb->progress (when set) hears "reading" bytes of the file's size. */
lt_status data_load(train_data *d, const data_opts *o, const lt_tokenizer *tok,
                    const gemma3_config *cfg, const lt_callbacks *cb, char *err);
void data_free(train_data *d);

/* The reader under data_load, for every file of records a trainer reads (%grpo's prompts
 * too): a regular file only, read in chunks with the cancel flag polled between them, lines
 * of at most max_row bytes, the whole file at most max_file bytes, a leading UTF-8 BOM
 * skipped. `what` starts every message ("%train data=x.jsonl"). */
typedef struct data_reader {
    int fd;
    char *buf;
    size_t cap, pos, len, scan;
    uint64_t size, done, max_file;
    size_t max_row;
    int eof, line; /* line: the number of the line last returned (1-based) */
    const atomic_int *cancel;
    const lt_callbacks *cb;
    char what[600];
} data_reader;

/* Opens path after checking what it is; 0 limits take the defaults (and the environment). */
lt_status data_reader_open(data_reader *r, const char *path, const char *what, uint64_t max_file,
                           size_t max_row, const atomic_int *cancel, const lt_callbacks *cb,
                           char *err);
/* The next line without its "\n" (NUL-terminated in the reader's buffer, valid until the next
 * call; it may hold NUL bytes, *len counts them): LT_OK with *line NULL at the end of the file. */
lt_status data_reader_line(data_reader *r, char **line, size_t *len, char *err);
/* The rest of the file as one NUL-terminated text (in the reader's buffer), for a JSON array:
 * at most max_bytes of it. */
lt_status data_reader_rest(data_reader *r, uint64_t max_bytes, char **text, size_t *len, char *err);
void data_reader_close(data_reader *r);

/* The order a trainer visits n items in: epoch after epoch (epoch = pos / n), each shuffled with
 * the seed and the epoch (Fisher-Yates drawing from train_mix64), or in file order. Positions
 * only grow, so one epoch's order is kept. */
typedef struct epoch_order {
    int n, shuffle;
    uint64_t seed;
    int64_t epoch; /* the epoch perm holds (-1: none yet) */
    int *perm;     /* [n] */
} epoch_order;

/* 0, or -1 when out of memory. */
int epoch_order_init(epoch_order *o, int n, int shuffle, uint64_t seed);
/* The item at stream position pos. */
int epoch_order_at(epoch_order *o, int64_t pos);
void epoch_order_free(epoch_order *o);
/* splitmix64's finaliser: the trainers' seeds for data order, dropout and sampling. */
uint64_t train_mix64(uint64_t x);

/* ---- PEFT adapters (peft_adapter.c) ----------------------------------------------------- */

/* PEFT adapter: adapter_config.json + adapter_model.safetensors (fp32) under dir. */
lt_status peft_save_adapter(const lt_adapters *a, const char *dir, char *err);
/* Reads a PEFT adapter into new adapters on m. */
lt_status peft_load_adapter(lt_adapters **out, gemma3_model *m, lt_ctx *ctx, const char *dir,
                            char *err);
/* Adds the two adapter files under dir to the set s (the LoRA adapters a; not full fine-tuning).
 * what names the save in an out-of-memory message ("checkpoint DIR"). */
lt_status peft_adapter_write(lt_afile_set *s, const lt_adapters *a, const char *dir,
                             const char *what, char *err);

/* ---- the trainer (train.c) ----------------------------------------------------------- */

/* The adapters attached to a model and the current %train run (options, position, losses),
 * so that an interrupted run continues where it stopped. */
typedef struct lt_trainer lt_trainer;

/* What the trainer works on, lent for one call and never kept. */
typedef struct trainer_env {
    gemma3_model *model;
    const lt_tokenizer *tok;
    lt_ctx *ctx;
    atomic_int *cancel; /* raised from another thread: the run stops between micro-batches */
    int max_seq;        /* the model's max_seq as loaded (0 = the config's) */
} trainer_env;

lt_trainer *trainer_new(void); /* NULL when out of memory */
/* Detaches and frees the adapters and the run state (NULL is fine). Call it before the model
 * the adapters hang on is freed or replaced. */
void trainer_free(lt_trainer *t);
/* The attached adapters (NULL: none), and the optimizer steps of the current run. */
lt_adapters *trainer_adapters(const lt_trainer *t);
int trainer_steps_done(const lt_trainer *t);
/* Attaches fresh adapters (or a PEFT adapter folder, o->load) to env->model, replacing the
 * attached ones; on failure the old ones stay attached. */
lt_status trainer_attach(lt_trainer *t, const trainer_env *env, const lt_lora_opts *o, char *err);
/* One %train call: runs (or continues, or resumes from a checkpoint) supervised fine-tuning
 * of the attached adapters. *weights_changed = 1 when the model's effective weights changed
 * (the caller's generation cache is stale). A cancel keeps the last complete step. */
lt_status trainer_run(lt_trainer *t, const trainer_env *env, const lt_train_opts *o,
                      const lt_train_callbacks *cb, lt_train_result *res, int *weights_changed,
                      char *err);

/* Formats a message and hands it to message(ctx, text), when message is not NULL: how the
 * trainers (%train, %grpo) report through their callbacks. */
void train_say(void (*message)(void *ctx, const char *text), void *ctx, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Forgets the current %train run (its position, losses and AdamW state), keeping the adapters:
 * another trainer (%grpo) is about to change them. */
void trainer_forget_run(lt_trainer *t);

/* ---- GRPO (grpo.c) ---------------------------------------------------------------------- */

/* One %grpo call on the LoRA adapters a (fresh AdamW state), with the model, tokenizer,
 * backend and cancel flag of env. Sampling, rewards and the loss are described in grpo.c. */
lt_status grpo_run(lt_adapters *a, const trainer_env *env, const lt_grpo_opts *o,
                   const lt_grpo_callbacks *cb, lt_grpo_result *res, char *err);

/* GRPO's gradient on given completions, without sampling or reward programs: row r of the
 * n_prompts * o->group rows is completion[r] (its stop token included, as a rollout leaves it)
 * of prompt r / group, with reward[r]. Advantages, the reference pass (o->beta != 0) and the
 * first iteration's weighted backward run as in grpo_run, micro-batch for micro-batch; the
 * adapters' gradients are zeroed, then left holding the step's gradient (no optimizer step),
 * *loss its loss. For parity checks against another implementation of TRL's formulas. */
typedef struct grpo_given {
    int n_prompts;
    const int32_t *const *prompt; /* [n_prompts] BOS + prompt tokens */
    const int *prompt_len;
    const int32_t *const *completion; /* [rows] */
    const int *completion_len;
    const double *reward; /* [rows] */
} grpo_given;
lt_status grpo_grads_given(lt_adapters *a, const trainer_env *env, const lt_grpo_opts *o,
                           const grpo_given *in, double *loss, char *err);

/* ---- a checkpoint's trainer_state.json (trainer_state.c) -------------------------------- */

/* The run a checkpoint continues: its optimizer step, units consumed, tokens trained, the units
 * its data made, whether it trained every weight, and each step's loss. */
typedef struct trainer_state {
    int step, total_steps, units, full;
    int64_t position, tokens;
    float *losses; /* n_losses; owned after a read (trainer_state_free), borrowed to write */
    int n_losses;
} trainer_state;
/* The text options read back live here: lt_train_opts' data, format and schedule point in. */
typedef struct trainer_state_texts {
    char data[2048], format[16], schedule[16];
} trainer_state_texts;
/* The JSON text of s and the run's options o (max_seq: the one the run used); NULL when out
 * of memory or a text option is not UTF-8 (JSON holds only UTF-8). Free with free(). */
char *trainer_state_text(const trainer_state *s, const lt_train_opts *o, int max_seq);
/* Reads dir/trainer_state.json: the state into s and the options it records into o (only
 * those; o's other fields stay). Every key is checked (type and range); a wrong one is an
 * LT_ERR_FORMAT naming it, and s holds nothing. */
lt_status trainer_state_read(const char *dir, trainer_state *s, lt_train_opts *o,
                             trainer_state_texts *texts, char *err);
/* The same over len bytes of text; where names them in messages. */
lt_status trainer_state_parse(const char *text, size_t len, const char *where, trainer_state *s,
                              lt_train_opts *o, trainer_state_texts *texts, char *err);
void trainer_state_free(trainer_state *s);

/* ---- training checkpoints (checkpoint.c) ---------------------------------------------- */

/* The trainable tensors, AdamW state and a trainer_state.json text, written as one atomic set
 * under dir; for LoRA also a PEFT adapter. */
lt_status ckpt_save(const lt_adapters *a, const char *dir, const char *state_json, char *err);
/* Loads the tensors and AdamW state of a checkpoint into matching adapters; step: the
 * checkpoint's, the step count of a parameter with state whose own it does not hold. */
lt_status ckpt_load(lt_adapters *a, const char *dir, int step, char *err);
/* keep= of %train: with the checkpoint of `step` complete in save/checkpoint-STEP, removes the
 * folders save/checkpoint-N with N < step but the keep - 1 newest of them (keep > 0). Folders
 * of later steps (another run's) and anything that is not a checkpoint stay. Writes the names
 * removed, or what could not be removed, into note (cap bytes; "" when nothing). */
void ckpt_prune(const char *save, int step, int keep, char *note, size_t cap);

#endif
