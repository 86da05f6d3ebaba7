/* magics.c — the magic table and everything that reads it: option validation with typed
 * errors, typed accessors, and help rendering (%help, inspection, error hints).
 *
 * Adding a magic = one handler in kernel/magic_*.c + one entry here. Nothing else in the
 * kernel lists magic or option names. An option that sets a field of an engine options struct
 * (lt_train_opts' lr, ...) writes no default here: it names the engine's group
 * (FROM_ENGINE) and %help and validation read the engine's lt_option_default, the same text
 * the engine's lt_*_opts_default parse. Only kernel-only options (%echo stream=, %load
 * precision=, %export_gguf type=) keep their defaults in this table.
 */
#include "kernel/magic.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "kernel/cell.h"
#include "kernel/display.h"
#include "kernel/magic_handlers.h"

/* ---- the table -------------------------------------------------------------------------- */

#define NO_RANGE 1, 0, 0 /* min > max: unbounded */

/* The default of an option (the def and engine fields of opt_spec). An option that sets a field
 * of an engine options struct takes the engine's default, so it is written once, in the engine;
 * only options the kernel alone knows write theirs here. */
#define FROM_ENGINE(group) NULL, group /* lt_option_default(group, the option's name) */
#define DEFAULT(text) text, NULL       /* a kernel-only option's default */
#define NO_DEFAULT NULL, NULL          /* a kernel-only option, unset unless given */

/* Sampling options shared by %generate and %%chat. */
#define SAMPLING_OPTS                                                                              \
    {"max_new", OPT_INT, FROM_ENGINE("gen"), NULL, 1, 32768, 0, "most new tokens to generate"},    \
        {"temperature",                                                                            \
         OPT_FLOAT,                                                                                \
         FROM_ENGINE("gen"),                                                                       \
         NULL,                                                                                     \
         0,                                                                                        \
         100,                                                                                      \
         0,                                                                                        \
         "sampling temperature; 0 = greedy (Gemma default 1.0)"},                                  \
        {"top_k",                                                                                  \
         OPT_INT,                                                                                  \
         FROM_ENGINE("gen"),                                                                       \
         NULL,                                                                                     \
         0,                                                                                        \
         1000000,                                                                                  \
         0,                                                                                        \
         "keep the k most likely tokens; 0 = off"},                                                \
        {"top_p", OPT_FLOAT, FROM_ENGINE("gen"), NULL, 0, 1, 1, "nucleus sampling mass; 1 = off"}, \
        {"min_p",                                                                                  \
         OPT_FLOAT,                                                                                \
         FROM_ENGINE("gen"),                                                                       \
         NULL,                                                                                     \
         0,                                                                                        \
         1,                                                                                        \
         0,                                                                                        \
         "drop tokens below min_p x the top probability"},                                         \
    {                                                                                              \
        "seed", OPT_INT, FROM_ENGINE("gen"), NULL, 0, 9007199254740991.0, 0,                       \
            "random seed for sampling"                                                             \
    }

static const opt_spec no_opts[] = {{NULL}};

static const opt_spec seconds_type = {"SECONDS", OPT_FLOAT, NO_DEFAULT, NULL,
                                      0,         86400,     0,          "how long to wait"};

static const opt_spec echo_opts[] = {
    {"stream", OPT_CHOICE, DEFAULT("stdout"), "stdout|stderr", NO_RANGE,
     "which stream to print on"},
    {"fd", OPT_BOOL, DEFAULT("false"), NULL, NO_RANGE,
     "write to the process's file descriptor 1 or 2, as a library would"},
    {NULL}};

static const opt_spec input_opts[] = {
    {"password", OPT_BOOL, DEFAULT("false"), NULL, NO_RANGE, "hide what is typed"}, {NULL}};

static const opt_spec clear_opts[] = {
    {"wait", OPT_BOOL, DEFAULT("false"), NULL, NO_RANGE, "clear only when the next output arrives"},
    {NULL}};

/* precision= is the kernel's other name for dtype=; %load passes one of them as dtype. */
static const opt_spec load_opts[] = {
    {"dtype", OPT_CHOICE, FROM_ENGINE("load"), "auto|fp32|fp16|bf16", NO_RANGE,
     "storage type of the frozen weights (auto = as stored; computed in fp32 on the CPU)"},
    {"device", OPT_CHOICE, FROM_ENGINE("load"), "auto|cpu|cuda", NO_RANGE,
     "where the model runs (auto: the GPU when there is one)"},
    {"precision", OPT_CHOICE, DEFAULT("auto"), "auto|fp32|bf16|fp16", NO_RANGE,
     "GPU matmul precision (auto: bf16 on sm_80 and newer, fp16 on the T4); the same as dtype="},
    {"max_seq", OPT_INT, FROM_ENGINE("load"), NULL, 0, 1048576, 0,
     "longest sequence (0 = the config's, at most 8192)"},
    {"quant", OPT_CHOICE, FROM_ENGINE("load"), "none|nf4|int8|dynamic", NO_RANGE,
     "quantize the linears as they load, in bitsandbytes' formats: nf4 (NF4 + double quant, "
     "QLoRA's base), int8 (LLM.int8) or dynamic (nf4, except the linears quantization hurts "
     "most, measured at load, which stay 16-bit); embeddings and norms stay 16-bit; a "
     "pre-quantized checkpoint loads as stored"},
    {"quant_keep", OPT_FLOAT, FROM_ENGINE("load"), NULL, 0, 1, 0,
     "quant=dynamic: the most it keeps in 16 bits, as a fraction of the linear parameters"},
    {NULL}};

static const opt_spec generate_opts[] = {SAMPLING_OPTS, {NULL}};

static const opt_spec chat_opts[] = {
    SAMPLING_OPTS,
    {"system", OPT_STRING, NO_DEFAULT, NULL, NO_RANGE,
     "system prompt (Gemma folds it into the first user turn); \"\" clears it"},
    {"image", OPT_LIST, NO_DEFAULT, NULL, NO_RANGE,
     "PNG or JPEG files this message shows the model, before its text (a multimodal Gemma 3 "
     "checkpoint)"},
    {"pan_and_scan", OPT_BOOL, FROM_ENGINE("image"), NULL, NO_RANGE,
     "also show each image of image= cut into crops along its long side when it is elongated "
     "(Gemma 3's pan-and-scan, as transformers' Gemma3ImageProcessor does it)"},
    {"pan_and_scan_min_crop_size", OPT_INT, FROM_ENGINE("image"), NULL, 1, 1048576, 0,
     "pan-and-scan: no crops when one would be narrower than this many pixels"},
    {"pan_and_scan_max_num_crops", OPT_INT, FROM_ENGINE("image"), NULL, 1, 64, 0,
     "pan-and-scan: the most crops an image is cut into"},
    {"pan_and_scan_min_ratio_to_activate", OPT_FLOAT, FROM_ENGINE("image"), NULL, 0, 1e6, 1,
     "pan-and-scan: crop only images whose long side is at least this times the short side"},
    {NULL}};

/* type=, mmproj= and overwrite= are arguments of lt_export_gguf, not fields of an options
 * struct. */
static const opt_spec export_opts[] = {
    {"type", OPT_CHOICE, DEFAULT("f16"), "f32|f16|bf16|q8_0|q4_0|q4_k_m", NO_RANGE,
     "tensor type (q4_k_m mixes Q4_K and Q6_K as llama.cpp does)"},
    {"overwrite", OPT_BOOL, DEFAULT("false"), NULL, NO_RANGE, "replace existing files"},
    {"mmproj", OPT_STRING, DEFAULT("auto"), NULL, NO_RANGE,
     "the image tower's mmproj file: auto = mmproj-NAME.gguf beside PATH, a PATH.gguf, or none "
     "(no mmproj file)"},
    {NULL}};

static const opt_spec lora_opts[] = {
    {"r", OPT_INT, FROM_ENGINE("lora"), NULL, 1, 4096, 0, "adapter rank"},
    {"alpha", OPT_FLOAT, FROM_ENGINE("lora"), NULL, 0, 1e6, 1,
     "lora_alpha: the adapter output is scaled by alpha/r"},
    {"dropout", OPT_FLOAT, FROM_ENGINE("lora"), NULL, 0, 0.95, 0,
     "dropout on the adapter input while training"},
    {"targets", OPT_STRING, FROM_ENGINE("lora"), NULL, NO_RANGE,
     "linear layers to adapt: names (q or q_proj, k, v, o, gate, up, down) of the language "
     "model; on a model with an image tower also vision (its six linears), vision.q_proj, "
     "vision.k_proj, vision.v_proj, vision.out_proj, vision.fc1, vision.fc2 (vision.q, .k, .v, "
     ".out) and projector; or a regex over names like "
     "model.layers.0.self_attn.q_proj and model.vision_tower.encoder.layers.0.mlp.fc1"},
    {"rslora", OPT_BOOL, FROM_ENGINE("lora"), NULL, NO_RANGE,
     "rank-stabilised scale alpha/sqrt(r)"},
    {"seed", OPT_INT, FROM_ENGINE("lora"), NULL, 0, 9007199254740991.0, 0, "initialisation seed"},
    {"load", OPT_STRING, FROM_ENGINE("lora"), NULL, NO_RANGE,
     "a PEFT adapter folder to load (and train further)"},
    {"full", OPT_BOOL, FROM_ENGINE("lora"), NULL, NO_RANGE,
     "full fine-tuning: train every weight, no adapters"},
    {NULL}};

static const opt_spec train_opts[] = {
    {"data", OPT_STRING, FROM_ENGINE("train"), NULL, NO_RANGE,
     "the dataset: a .jsonl or .json file"},
    {"format", OPT_CHOICE, FROM_ENGINE("train"), "auto|text|alpaca|sharegpt|messages", NO_RANGE,
     "record format (auto: from the first record's fields)"},
    {"batch", OPT_INT, FROM_ENGINE("train"), NULL, 1, 4096, 0,
     "samples per micro-batch (per-device batch size)"},
    {"grad_accum", OPT_INT, FROM_ENGINE("train"), NULL, 1, 65536, 0,
     "micro-batches per optimizer step"},
    {"steps", OPT_INT, FROM_ENGINE("train"), NULL, 0, 100000000, 0,
     "optimizer steps; 0 = from epochs"},
    {"epochs", OPT_FLOAT, FROM_ENGINE("train"), NULL, 0, 100000, 1,
     "passes over the data (when steps=0)"},
    {"lr", OPT_FLOAT, FROM_ENGINE("train"), NULL, 0, 10, 1, "peak learning rate"},
    {"warmup", OPT_INT, FROM_ENGINE("train"), NULL, 0, 100000000, 0,
     "warmup steps (linear from 0)"},
    {"schedule", OPT_CHOICE, FROM_ENGINE("train"), "constant|linear|cosine", NO_RANGE,
     "learning-rate schedule after warmup"},
    {"optim", OPT_CHOICE, FROM_ENGINE("train"), "adamw", NO_RANGE, "optimizer (AdamW, fp32 state)"},
    {"weight_decay", OPT_FLOAT, FROM_ENGINE("train"), NULL, 0, 10, 0,
     "decoupled weight decay (not on norms)"},
    {"max_grad_norm", OPT_FLOAT, FROM_ENGINE("train"), NULL, 0, 1e9, 0,
     "clip the global gradient norm; 0 = off"},
    {"max_seq", OPT_INT, FROM_ENGINE("train"), NULL, 0, 1048576, 0,
     "cut samples longer than this many tokens (0 = the model's max_seq)"},
    {"responses_only", OPT_BOOL, FROM_ENGINE("train"), NULL, NO_RANGE,
     "chat formats: train on the model turns only"},
    {"packing", OPT_BOOL, FROM_ENGINE("train"), NULL, NO_RANGE,
     "pack several samples into each row of max_seq tokens (attention stays inside each)"},
    {"seed", OPT_INT, FROM_ENGINE("train"), NULL, 0, 9007199254740991.0, 0,
     "data order and dropout seed"},
    {"shuffle", OPT_BOOL, FROM_ENGINE("train"), NULL, NO_RANGE, "shuffle the samples every epoch"},
    {"save", OPT_STRING, FROM_ENGINE("train"), NULL, NO_RANGE,
     "folder for checkpoints (SAVE/checkpoint-STEP, with optimizer state)"},
    {"save_every", OPT_INT, FROM_ENGINE("train"), NULL, 0, 100000000, 0,
     "steps between checkpoints (0 = only at the end)"},
    {"keep", OPT_INT, FROM_ENGINE("train"), NULL, 0, 100000000, 0,
     "checkpoints kept in save= (the newest; an older one goes once a newer is complete; "
     "0 = all)"},
    {"resume", OPT_STRING, FROM_ENGINE("train"), NULL, NO_RANGE,
     "continue from a checkpoint (or the latest one in a save= folder)"},
    {NULL}};

/* Every %grpo option is a field of lt_grpo_opts: defaults are the engine's. */
static const opt_spec grpo_opts[] = {
    {"data", OPT_STRING, FROM_ENGINE("grpo"), NULL, NO_RANGE,
     "JSON lines: \"prompt\" (a text or chat messages) and any fields the rewards read"},
    {"reward", OPT_STRING, FROM_ENGINE("grpo"), NULL, NO_RANGE,
     "rewards, commas: format, format_approx, answer, number, and last \"exec:COMMAND\""},
    {"weights", OPT_STRING, FROM_ENGINE("grpo"), NULL, NO_RANGE,
     "one weight per reward, commas (default all 1); the total is their weighted sum"},
    {"markers", OPT_STRING, FROM_ENGINE("grpo"), NULL, NO_RANGE,
     "the format rewards' four markers: reasoning start, end, solution start, end"},
    {"group", OPT_INT, FROM_ENGINE("grpo"), NULL, 2, 4096, 0, "completions sampled per prompt"},
    {"batch", OPT_INT, FROM_ENGINE("grpo"), NULL, 1, 4096, 0, "prompts per generation"},
    {"micro", OPT_INT, FROM_ENGINE("grpo"), NULL, 0, 65536, 0,
     "completions per forward/backward pass (0 = group); lower it to save memory"},
    {"steps", OPT_INT, FROM_ENGINE("grpo"), NULL, 1, 100000000, 0, "optimizer steps"},
    {"lr", OPT_FLOAT, FROM_ENGINE("grpo"), NULL, 0, 10, 1, "peak learning rate (AdamW)"},
    {"warmup", OPT_INT, FROM_ENGINE("grpo"), NULL, 0, 100000000, 0, "warmup steps"},
    {"schedule", OPT_CHOICE, FROM_ENGINE("grpo"), "constant|linear|cosine", NO_RANGE,
     "learning-rate schedule after warmup"},
    {"weight_decay", OPT_FLOAT, FROM_ENGINE("grpo"), NULL, 0, 10, 0, "AdamW's decoupled decay"},
    {"max_grad_norm", OPT_FLOAT, FROM_ENGINE("grpo"), NULL, 0, 1e9, 0,
     "clip the gradient's global norm (0 = off)"},
    {"beta", OPT_FLOAT, FROM_ENGINE("grpo"), NULL, 0, 1e6, 0,
     "KL coefficient against the model without adapters (0 = no reference pass)"},
    {"epsilon", OPT_FLOAT, FROM_ENGINE("grpo"), NULL, 0, 1, 0,
     "lower clipping range of the probability ratio"},
    {"epsilon_high", OPT_FLOAT, FROM_ENGINE("grpo"), NULL, 0, 1e6, 0,
     "upper clipping range (default: epsilon)"},
    {"loss", OPT_CHOICE, FROM_ENGINE("grpo"), "dapo|grpo|bnpo|dr_grpo", NO_RANGE,
     "how token losses are summed and divided, as TRL's loss_type"},
    {"scale_rewards", OPT_CHOICE, FROM_ENGINE("grpo"), "group|batch|none", NO_RANGE,
     "divide advantages by the group's reward std, the batch's, or not at all"},
    {"max_prompt", OPT_INT, FROM_ENGINE("grpo"), NULL, 2, 1048576, 0,
     "prompt tokens kept (longer prompts keep their end)"},
    {"max_completion", OPT_INT, FROM_ENGINE("grpo"), NULL, 1, 1048576, 0,
     "new tokens per completion"},
    {"temperature", OPT_FLOAT, FROM_ENGINE("grpo"), NULL, 0, 100, 1,
     "sampling temperature (the log-probabilities use it too)"},
    {"top_p", OPT_FLOAT, FROM_ENGINE("grpo"), NULL, 0, 1, 1, "nucleus sampling (1 = off)"},
    {"top_k", OPT_INT, FROM_ENGINE("grpo"), NULL, 0, 1000000, 0, "top-k sampling (0 = off)"},
    {"iterations", OPT_INT, FROM_ENGINE("grpo"), NULL, 1, 1000, 0,
     "optimizer steps per generation (TRL's num_iterations; > 1 clips the ratio)"},
    {"seed", OPT_INT, FROM_ENGINE("grpo"), NULL, 0, 9007199254740991.0, 0,
     "prompt order and sampling"},
    {"shuffle", OPT_BOOL, FROM_ENGINE("grpo"), NULL, NO_RANGE, "shuffle the prompts every epoch"},
    {"show_every", OPT_INT, FROM_ENGINE("grpo"), NULL, 0, 100000000, 0,
     "print one sampled completion every N steps (0 = never)"},
    {"reward_timeout", OPT_FLOAT, FROM_ENGINE("grpo"), NULL, 0, 1e6, 1,
     "seconds an exec: reward may take to score one step's completions"},
    {"log", OPT_STRING, FROM_ENGINE("grpo"), NULL, NO_RANGE,
     "write one JSON object per step (TRL's metric names) to this file"},
    {NULL}};

/* adapter=, merged=, quantized= and dtype= are arguments of lt_save_adapter, lt_save_merged
 * and lt_save_quantized. */
static const opt_spec save_opts[] = {
    {"adapter", OPT_STRING, NO_DEFAULT, NULL, NO_RANGE, "write a PEFT adapter folder"},
    {"merged", OPT_STRING, NO_DEFAULT, NULL, NO_RANGE,
     "write a transformers checkpoint with the adapters merged"},
    {"quantized", OPT_STRING, NO_DEFAULT, NULL, NO_RANGE,
     "write the quantized base (NF4/int8) as a bitsandbytes checkpoint, adapters left out"},
    {"dtype", OPT_CHOICE, DEFAULT("auto"), "auto|fp32|fp16|bf16", NO_RANGE,
     "dtype of the 16-bit weights written (auto = as loaded)"},
    {NULL}};

static const magic_spec table[] = {
    {"help", 0, "%help [MAGIC]", 0, 1, "MAGIC", NULL, no_opts, "list the magics, or explain one",
     "Without a name, lists every magic with a one-line summary. With a name (with or "
     "without %), shows its usage, every option with type, default and meaning.",
     magic_help},
    {"status", 0, "%status", 0, 0, NULL, NULL, no_opts, "what is loaded: model, memory, adapters",
     "Shows the loaded model (source, architecture, dtype, device, parameters, memory), "
     "what was skipped (a vision tower), which linears quant=dynamic kept in 16 bits and "
     "why (their weight and output errors against the quantized ones' median), and the "
     "engine's state.",
     magic_status},
    {"load", 0,
     "%load SOURCE [dtype=auto|fp32|fp16|bf16] [device=auto|cpu|cuda] "
     "[precision=auto|fp32|bf16|fp16] [max_seq=N] [quant=none|nf4|int8|dynamic] "
     "[quant_keep=0.1]",
     1, 1, "SOURCE", NULL, load_opts, "load a Gemma 3 model and its tokenizer",
     "SOURCE is a directory (config.json, *.safetensors, tokenizer.model), a Hugging Face "
     "Hub id ORG/NAME[@REVISION] such as google/gemma-3-1b-it (taken from huggingface_hub's "
     "cache, $HF_HUB_CACHE or $HF_HOME/hub or ~/.cache/huggingface/hub; what is missing is "
     "downloaded there from $HF_ENDPOINT with $HF_TOKEN, unless HF_HUB_OFFLINE=1), `tiny` "
     "(the small model shipped with "
     "lathe), or random:gemma-3-{270m,1b,4b,12b,27b} (real shapes, seeded random weights). "
     "A failed load keeps the model that was loaded before.",
     magic_load},
    {"generate", 0,
     "%generate PROMPT [max_new=N] [temperature=T] [top_k=K] [top_p=P] "
     "[min_p=M] [seed=S]",
     1, 1, "PROMPT", NULL, generate_opts, "continue a text (no chat template)",
     "Continues PROMPT (quote it: %generate \"Once upon a time\") from <bos>, streaming the "
     "tokens into the cell. Stops at <eos>, <end_of_turn> or max_new. Interrupt keeps what "
     "was generated.",
     magic_generate},
    {"chat", 1,
     "%%chat [reset] [image=FILE[,FILE...]] [pan_and_scan=false] [system=TEXT] [max_new=N] ...", 0,
     1, "reset", NULL, chat_opts, "chat with the model (multi-turn, Gemma chat template, images)",
     "The cell body is your message; the model's reply streams into the cell and both join "
     "the conversation. `%%chat reset` (with or without a body) starts a new conversation, "
     "images included. The prompt is rendered with Gemma 3's chat template, with one <bos>. "
     "image=cat.png,dog.jpg puts those pictures in the message, before its text, for a "
     "multimodal Gemma 3 checkpoint (e.g. google/gemma-3-4b-it): each takes "
     "mm_tokens_per_image + 2 tokens (258 for Gemma 3) of max_seq, and later turns still see "
     "it. Relative paths are read from the kernel's working directory, as %train data= is. "
     "With image= the body may be empty. pan_and_scan=true also cuts each elongated image "
     "(long side at least 1.2 x the short one) into 2 to 4 crops of at least 256 pixels, as "
     "transformers' Gemma3ImageProcessor(do_pan_and_scan=True) does: the image then takes a "
     "block for itself and one per crop, written as Gemma3Processor writes it (\"Here is the "
     "original image ... and here are some crops to help you see better ...\"); a square "
     "image is not cut.",
     magic_chat},
    {"lora", 0,
     "%lora [r=16] [alpha=16] [dropout=0] [targets=q,k,v,o,gate,up,down] "
     "[rslora=false] [seed=S] [load=DIR] [full=false]",
     0, 0, NULL, NULL, lora_opts, "attach LoRA adapters (or full fine-tuning)",
     "Attaches fresh LoRA adapters to the linear layers of the language model, initialised "
     "as PEFT does (A Kaiming-uniform, B zero, so the model is unchanged until trained), or "
     "loads a PEFT adapter folder with load=DIR to continue training or to run it. "
     "On a model with an image tower (Gemma 3 4B and up), targets= may also name the tower's "
     "linears, as PEFT names them in Gemma3ForConditionalGeneration "
     "(model.vision_tower.encoder.layers.N.self_attn.q_proj ... mlp.fc2): vision adds all six "
     "(q_proj, k_proj, v_proj, out_proj, fc1, fc2) of every encoder layer, vision.NAME one of "
     "them, and projector the projector's matrix (multi_modal_projector."
     "mm_input_projection_weight, PEFT's target_parameters), e.g. "
     "targets=q,k,v,o,gate,up,down,vision. %train then trains through the tower, encoding "
     "each step's images anew (device=cpu or cuda; dropout= applies to the tower's "
     "linears, not to the projector, as in PEFT). Without tower names the "
     "tower stays frozen and each image is encoded once. "
     "full=true trains every weight instead. A new %lora replaces the adapters attached "
     "before.",
     magic_lora},
    {"train", 0,
     "%train data=FILE [format=auto] [batch=2] [grad_accum=1] [steps=N|epochs=1] "
     "[lr=2e-4] [warmup=0] [schedule=linear] [max_seq=N] [save=DIR] ...",
     0, 0, NULL, NULL, train_opts, "supervised fine-tuning with a live loss curve",
     "Trains the attached adapters on a JSONL/JSON dataset: text ({\"text\"}), alpaca "
     "({\"instruction\", \"input\", \"output\"}), sharegpt ({\"conversations\"}) or chat "
     "messages ({\"messages\"}), rendered with Gemma's chat template. A user message's "
     "content list may hold images ({\"type\": \"image\", \"image\": PATH}, relative to "
     "the dataset's folder): each is encoded once by the frozen image tower, its "
     "tokens never trained, LoRA training the language model (or, with the tower's linears "
     "in %lora targets=, encoded every step and trained through). AdamW with fp32 "
     "state; the loss of a step is the mean over all its label tokens across grad_accum "
     "micro-batches. Shows a progress bar and the loss curve while it runs. An interrupt "
     "stops at the next micro-batch and keeps the weights of the last complete step; run "
     "the same %train again to continue. save=DIR keeps checkpoints; resume=DIR continues "
     "one.",
     magic_train},
    {"grpo", 0,
     "%grpo data=FILE reward=R[,R...] [weights=LIST] [group=8] [batch=1] [steps=50] "
     "[lr=5e-6] [beta=0.0] [epsilon=0.2] [loss=dapo|grpo|bnpo|dr_grpo] "
     "[max_completion=768] [temperature=1.0] [log=FILE] ...",
     0, 0, NULL, NULL, grpo_opts, "reinforcement learning with reward functions (GRPO)",
     "Trains the attached LoRA adapters with GRPO, as TRL's GRPOTrainer: for each of batch "
     "prompts, samples group completions with the adapters active (batched, with a KV "
     "cache; the prompt is prefilled once per group), scores each with the rewards, turns "
     "the weighted sum into advantages within its group and takes an AdamW step on TRL's "
     "clipped loss (the four loss types), with the model without adapters as the KL "
     "reference when beta > 0. Data: JSON lines with \"prompt\" (a text, or chat messages "
     "rendered with Gemma's template and the generation prompt) and any other fields. "
     "Built-in rewards, with markers R_START,R_END,S_START,S_END (markers=): format (3.0 when "
     "the completion is R_START...R_END...S_START answer S_END), format_approx (+0.5 for each "
     "marker seen exactly once, -1.0 otherwise), answer (the row's \"answer\": 3.0 equal, 1.5 "
     "equal after trimming, 0.5 within 10%, 0.25 within 20%, else -1.0; -0.5 not a number), "
     "number (1.5 when the first number after S_START equals the answer). \"exec:COMMAND\" "
     "runs COMMAND once through /bin/sh in the notebook's folder: it reads one JSON object a "
     "line, {\"prompt\", \"completion\", the row's fields}, and answers one line each, a "
     "number or null (no reward); a crash, a bad line or a timeout stops %grpo with the "
     "program's name and the line. Shows a progress bar, the reward curve and every "
     "show_every steps a sampled completion. An interrupt stops at the next decode step or "
     "micro-batch and keeps the weights of the last complete step.",
     magic_grpo},
    {"save", 0, "%save adapter=DIR | merged=DIR | quantized=DIR [dtype=auto|fp32|fp16|bf16]", 0, 0,
     NULL, NULL, save_opts, "save a PEFT adapter, a merged or a quantized checkpoint",
     "adapter=DIR writes adapter_config.json and adapter_model.safetensors, loadable by "
     "peft.PeftModel.from_pretrained and by %lora load=DIR. merged=DIR writes config.json, "
     "model.safetensors and tokenizer.model with the adapters merged into the weights, "
     "loadable by transformers and by %load DIR (the language model; with adapters on the "
     "image tower the whole multimodal model, the tower's adapters merged too); a model "
     "quantized at load is merged into "
     "the original 16-bit weights of its checkpoint, a pre-quantized one into its dequantized "
     "weights. quantized=DIR writes a model loaded with quant=nf4 or quant=int8 (or from a "
     "bitsandbytes checkpoint) in bitsandbytes' layout, with quantization_config in "
     "config.json, loadable by transformers with bitsandbytes and by %load DIR; adapters are "
     "not in it (save them with adapter=). Files are written atomically: a failed save keeps "
     "the previous copy.",
     magic_save},
    {"export_gguf", 0,
     "%export_gguf PATH.gguf [type=f32|f16|bf16|q8_0|q4_0|q4_k_m] [mmproj=auto|PATH.gguf|none] "
     "[overwrite=false]",
     1, 1, "PATH", NULL, export_opts, "write the model as a GGUF file for llama.cpp",
     "Merges the LoRA adapters into the weights and writes one GGUF file that llama.cpp, "
     "Ollama and LM Studio load: Gemma 3 metadata, the SentencePiece vocabulary and the chat "
     "template included. A model with an image tower (e.g. gemma-3-4b-it) also gets the "
     "mmproj file llama.cpp's multimodal tools load beside it, named as llama.cpp's "
     "convert_hf_to_gguf.py --mmproj names it: mmproj-NAME.gguf in PATH's folder (out/a.gguf "
     "-> out/mmproj-a.gguf), or mmproj=PATH.gguf; mmproj=none skips it. Run the pair with "
     "llama-mtmd-cli -m PATH --mmproj MMPROJ --image FILE, or llama-server -m PATH --mmproj "
     "MMPROJ. The tower's matrices are f32 / bf16 for type=f32 / bf16 and f16 otherwise, its "
     "norms and embeddings f32 (llama.cpp's own policy); a text-only model writes PATH alone. "
     "The files are written atomically and together (nothing is left behind on failure) and "
     "existing files are kept unless overwrite=true. A missing folder is created.",
     magic_export_gguf},
    {"shell", 1, "%%shell", 0, 0, NULL, NULL, no_opts, "run the cell body as a shell script",
     "Runs the cell body with /bin/sh -c in the notebook's folder (like IPython's %%bash), "
     "showing stdout and stderr as they come. Interrupt stops it; a non-zero exit status "
     "fails the cell.",
     magic_shell},
    {"sleep", 0, "%sleep SECONDS", 1, 1, "SECONDS", &seconds_type, no_opts,
     "wait with a live progress bar (tests the plumbing)",
     "Waits SECONDS (0 to 86400) showing a progress bar updated in place. An interrupt "
     "stops it within half a second. It exists to show how every long magic reports.",
     magic_sleep},
    {"echo", 0, "%echo TEXT... [stream=stdout|stderr] [fd=false]", 0, MAGIC_MAX_POS, "TEXT", NULL,
     echo_opts, "print text",
     "Prints its words, separated by spaces, on stdout (or stderr). With fd=true it writes them "
     "to file descriptor 1 (or 2) instead, the way the engine's libraries print.",
     magic_echo},
    {"input", 0, "%input PROMPT [password=false]", 0, 1, "PROMPT", NULL, input_opts,
     "ask the user for a line and print it",
     "Asks the front end for a line of text (Jupyter's input_request) and prints what was "
     "typed. Fails with a clear message when the front end allows no input.",
     magic_input},
    {"clear", 0, "%clear [wait=false]", 0, 0, NULL, NULL, clear_opts, "clear the cell's output",
     "Clears what the cell has shown so far (Jupyter's clear_output); with wait=true the "
     "clearing waits for the next output, so a redraw does not flicker.",
     magic_clear},
    {"version", 0, "%version", 0, 0, NULL, NULL, no_opts, "lathe's version as the cell's result",
     "Returns lathe's version as the cell's result.", magic_version},
};

const magic_spec *magics_all(int *n) {
    *n = (int)(sizeof table / sizeof table[0]);
    return table;
}

const magic_spec *magics_find(const char *name) {
    for (size_t i = 0; i < sizeof table / sizeof table[0]; ++i)
        if (strcmp(table[i].name, name) == 0) return &table[i];
    return NULL;
}

const opt_spec *magic_opt_find(const magic_spec *m, const char *name) {
    for (const opt_spec *o = m->opts; o->name; ++o)
        if (strcmp(o->name, name) == 0) return o;
    return NULL;
}

const char *opt_default(const opt_spec *o) {
    return o->engine ? lt_option_default(o->engine, o->name) : o->def;
}

/* ---- typed values ----------------------------------------------------------------------- */

static int parse_bool(const char *s, int *out) {
    if (!strcasecmp(s, "true") || !strcmp(s, "1") || !strcasecmp(s, "yes")) {
        *out = 1;
        return 0;
    }
    if (!strcasecmp(s, "false") || !strcmp(s, "0") || !strcasecmp(s, "no")) {
        *out = 0;
        return 0;
    }
    return -1;
}

static int parse_number(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno == ERANGE || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

static int parse_integer(const char *s, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end != '\0' || errno == ERANGE) return -1;
    *out = v;
    return 0;
}

static int choice_has(const char *choices, const char *v) {
    size_t n = strlen(v);
    const char *p = choices;
    while (p && *p) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, v, n) == 0) return 1;
        p = bar ? bar + 1 : NULL;
    }
    return 0;
}

static int has_range(const opt_spec *o) {
    return o->min <= o->max;
}

void opt_accepted_form(const opt_spec *o, char *out, size_t outlen) {
    switch (o->type) {
    case OPT_STRING:
        snprintf(out, outlen, "%s=TEXT (quote it if it has spaces)", o->name);
        break;
    case OPT_BOOL:
        snprintf(out, outlen, "%s=true|false", o->name);
        break;
    case OPT_CHOICE:
        snprintf(out, outlen, "%s=%s", o->name, o->choices);
        break;
    case OPT_LIST:
        snprintf(out, outlen, "%s=A,B,C", o->name);
        break;
    case OPT_INT:
        if (has_range(o))
            snprintf(out, outlen, "%s=INTEGER from %.0f to %.0f", o->name, o->min, o->max);
        else
            snprintf(out, outlen, "%s=INTEGER", o->name);
        break;
    case OPT_FLOAT:
        if (has_range(o))
            snprintf(out, outlen, "%s=NUMBER %s %g and <= %g", o->name,
                     o->min_open ? ">" : ">=", o->min, o->max);
        else
            snprintf(out, outlen, "%s=NUMBER", o->name);
        break;
    }
}

/* Checks one value against its spec; on failure writes why into msg. */
static int opt_check(const magic_spec *m, const opt_spec *o, const char *v, char *msg,
                     size_t msglen) {
    char form[160];
    opt_accepted_form(o, form, sizeof form);
    int ok = 1;
    switch (o->type) {
    case OPT_STRING:
    case OPT_LIST:
        break;
    case OPT_BOOL: {
        int b;
        ok = parse_bool(v, &b) == 0;
        break;
    }
    case OPT_CHOICE:
        ok = choice_has(o->choices, v);
        break;
    case OPT_INT: {
        long long x;
        ok = parse_integer(v, &x) == 0 && (!has_range(o) || (x >= o->min && x <= o->max));
        if (ok && o->min_open && has_range(o) && x <= o->min) ok = 0;
        break;
    }
    case OPT_FLOAT: {
        double x;
        ok = parse_number(v, &x) == 0 && (!has_range(o) || (x >= o->min && x <= o->max));
        if (ok && o->min_open && has_range(o) && x <= o->min) ok = 0;
        break;
    }
    }
    if (!ok)
        snprintf(msg, msglen, "%%%s: bad value '%s' for option '%s'; accepted: %s", m->name, v,
                 o->name, form);
    return ok ? 0 : -1;
}

/* The option names of a magic, for "unknown option" messages. */
static void opt_names(const magic_spec *m, char *out, size_t outlen) {
    size_t n = 0;
    out[0] = '\0';
    for (const opt_spec *o = m->opts; o->name; ++o) {
        int w = snprintf(out + n, outlen - n, "%s%s", n ? ", " : "", o->name);
        if (w < 0 || (size_t)w >= outlen - n) break;
        n += (size_t)w;
    }
}

int magic_validate(const cell_call *call, magic_args *args, char *msg, size_t msglen) {
    const magic_spec *m = magics_find(call->name);
    memset(args, 0, sizeof *args);
    if (!m) {
        snprintf(msg, msglen, "line %d: unknown magic %s%s; %%help lists the magics", call->line,
                 call->is_cell ? "%%" : "%", call->name);
        return -1;
    }
    if (m->cell != call->is_cell) {
        snprintf(msg, msglen, "line %d: %s%s is a %s magic; write it as: %s", call->line,
                 call->is_cell ? "%%" : "%", call->name, m->cell ? "cell" : "line", m->usage);
        return -1;
    }
    args->spec = m;
    args->body = call->body;
    for (int i = 0; i < call->nwords; ++i) {
        const cell_word *w = &call->words[i];
        if (!w->key) {
            if (args->npos >= m->max_pos) {
                if (m->max_pos == 0)
                    snprintf(msg, msglen, "line %d: %%%s takes no words, got '%s'; usage: %s",
                             call->line, m->name, w->value, m->usage);
                else
                    snprintf(msg, msglen,
                             "line %d: %%%s: unexpected word '%s' (quote text with spaces: "
                             "\"...\"); usage: %s",
                             call->line, m->name, w->value, m->usage);
                return -1;
            }
            if (m->pos_type) {
                char why[400];
                if (opt_check(m, m->pos_type, w->value, why, sizeof why)) {
                    char form[160];
                    opt_accepted_form(m->pos_type, form, sizeof form);
                    snprintf(msg, msglen, "line %d: %%%s: bad %s '%s'; accepted: %s", call->line,
                             m->name, m->pos_type->name, w->value, strchr(form, '=') + 1);
                    return -1;
                }
            }
            args->pos[args->npos++] = w->value;
            continue;
        }
        const opt_spec *o = magic_opt_find(m, w->key);
        if (!o) {
            char names[512];
            opt_names(m, names, sizeof names);
            if (names[0])
                snprintf(msg, msglen, "line %d: %%%s has no option '%s'; its options are: %s",
                         call->line, m->name, w->key, names);
            else
                snprintf(msg, msglen, "line %d: %%%s takes no options (got '%s'); usage: %s",
                         call->line, m->name, w->key, m->usage);
            return -1;
        }
        int idx = (int)(o - m->opts);
        if (args->given[idx]) {
            snprintf(msg, msglen, "line %d: %%%s: option '%s' is given twice", call->line, m->name,
                     o->name);
            return -1;
        }
        char why[400];
        if (opt_check(m, o, w->value, why, sizeof why)) {
            snprintf(msg, msglen, "line %d: %s", call->line, why);
            return -1;
        }
        args->value[idx] = w->value;
        args->given[idx] = 1;
    }
    if (args->npos < m->min_pos) {
        snprintf(msg, msglen, "line %d: %%%s needs %s; usage: %s", call->line, m->name,
                 m->pos_name ? m->pos_name : "an argument", m->usage);
        return -1;
    }
    for (int i = 0; m->opts[i].name; ++i)
        if (!args->given[i]) args->value[i] = opt_default(&m->opts[i]);
    return 0;
}

/* ---- accessors -------------------------------------------------------------------------- */

static int opt_index(const magic_args *a, const char *name) {
    const opt_spec *o = magic_opt_find(a->spec, name);
    return o ? (int)(o - a->spec->opts) : -1;
}

const char *arg_str(const magic_args *a, const char *name) {
    int i = opt_index(a, name);
    return i < 0 ? NULL : a->value[i];
}

long long arg_int(const magic_args *a, const char *name) {
    const char *v = arg_str(a, name);
    return v ? strtoll(v, NULL, 10) : 0;
}

double arg_float(const magic_args *a, const char *name) {
    const char *v = arg_str(a, name);
    return v ? strtod(v, NULL) : 0.0;
}

int arg_bool(const magic_args *a, const char *name) {
    const char *v = arg_str(a, name);
    int b = 0;
    return v && parse_bool(v, &b) == 0 ? b : 0;
}

int arg_given(const magic_args *a, const char *name) {
    int i = opt_index(a, name);
    return i >= 0 && a->given[i];
}

/* ---- failing and printing --------------------------------------------------------------- */

int magic_fail(magic_ctx *ctx, const char *ename, const char *fmt, ...) {
    va_list ap;
    char buf[2048];
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (ctx->err && !ctx->err->ename) {
        ctx->err->ename = strdup(ename);
        ctx->err->evalue = strdup(buf);
    }
    return -1;
}

int magic_fail_engine(magic_ctx *ctx, lt_status st) {
    if (st == LT_CANCELLED)
        return magic_fail(ctx, "KeyboardInterrupt", "interrupted: %s",
                          lt_last_error(ctx->session)[0] ? lt_last_error(ctx->session)
                                                         : "stopped by the user");
    return magic_fail(ctx, "EngineError", "%s", lt_last_error(ctx->session));
}

static void vprint(magic_ctx *ctx, const char *stream, const char *fmt, va_list ap) {
    char small[1024];
    va_list copy;
    va_copy(copy, ap);
    int n = vsnprintf(small, sizeof small, fmt, copy);
    va_end(copy);
    if (n < 0 || !ctx->sink->stream) return;
    if ((size_t)n < sizeof small) {
        ctx->sink->stream(ctx->sink->ctx, stream, small);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (!big) return;
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    ctx->sink->stream(ctx->sink->ctx, stream, big);
    free(big);
}

void magic_print(magic_ctx *ctx, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprint(ctx, "stdout", fmt, ap);
    va_end(ap);
}

/* ---- help ------------------------------------------------------------------------------- */

static const char *type_name(opt_type t) {
    switch (t) {
    case OPT_STRING:
        return "text";
    case OPT_INT:
        return "integer";
    case OPT_FLOAT:
        return "number";
    case OPT_BOOL:
        return "true|false";
    case OPT_CHOICE:
        return "choice";
    case OPT_LIST:
        return "list";
    }
    return "?";
}

char *opt_help_text(const magic_spec *m, const opt_spec *o) {
    char form[160];
    opt_accepted_form(o, form, sizeof form);
    const char *def = opt_default(o);
    strbuf_t b;
    sb_init(&b);
    sb_printf(&b, "%%%s option %s (%s)\n  %s\n  accepted: %s\n  default: %s\n", m->name, o->name,
              type_name(o->type), o->help, form, def ? def : "(none)");
    return sb_take(&b);
}

char *magic_help_text(const magic_spec *m) {
    strbuf_t b;
    sb_init(&b);
    sb_printf(&b, "%s\n\n%s\n", m->usage, m->help);
    if (m->opts[0].name) {
        sb_printf(&b, "\nOptions:\n");
        for (const opt_spec *o = m->opts; o->name; ++o) {
            char form[160];
            opt_accepted_form(o, form, sizeof form);
            const char *def = opt_default(o);
            sb_printf(&b, "  %-13s %s (default %s)\n                accepted: %s\n", o->name,
                      o->help, def ? def : "none", form);
        }
    }
    return sb_take(&b);
}

char *magic_help_html(const magic_spec *m) {
    strbuf_t b;
    sb_init(&b);
    sb_printf(&b, "<div><p><code>");
    sb_html(&b, m->usage);
    sb_printf(&b, "</code></p><p>");
    sb_html(&b, m->help);
    sb_printf(&b, "</p>");
    if (m->opts[0].name) {
        sb_printf(&b, "<table><tr><th>option</th><th>accepted</th><th>default</th>"
                      "<th>meaning</th></tr>");
        for (const opt_spec *o = m->opts; o->name; ++o) {
            char form[160];
            opt_accepted_form(o, form, sizeof form);
            sb_printf(&b, "<tr><td><code>%s</code></td><td><code>", o->name);
            sb_html(&b, form);
            sb_printf(&b, "</code></td><td>");
            const char *def = opt_default(o);
            sb_html(&b, def ? def : "");
            sb_printf(&b, "</td><td>");
            sb_html(&b, o->help);
            sb_printf(&b, "</td></tr>");
        }
        sb_printf(&b, "</table>");
    }
    sb_printf(&b, "</div>");
    return sb_take(&b);
}

char *magics_table_text(void) {
    strbuf_t b;
    sb_init(&b);
    sb_printf(&b, "lathe magics (%%help NAME for details):\n");
    for (size_t i = 0; i < sizeof table / sizeof table[0]; ++i) {
        char name[64];
        snprintf(name, sizeof name, "%s%s", table[i].cell ? "%%" : "%", table[i].name);
        sb_printf(&b, "  %-13s %s\n", name, table[i].summary);
    }
    return sb_take(&b);
}

char *magics_table_html(void) {
    strbuf_t b;
    sb_init(&b);
    sb_printf(&b,
              "<table style=\"text-align:left\"><tr><th style=\"text-align:left\">magic</th><th "
              "style=\"text-align:left\">what it does</th></tr>");
    for (size_t i = 0; i < sizeof table / sizeof table[0]; ++i) {
        sb_printf(&b,
                  "<tr><td style=\"text-align:left\"><code>%s%s</code></td><td "
                  "style=\"text-align:left\">",
                  table[i].cell ? "%%" : "%", table[i].name);
        sb_html(&b, table[i].summary);
        sb_printf(&b, "</td></tr>");
    }
    sb_printf(&b, "</table><p><code>%%help NAME</code> explains a magic and its options.</p>");
    return sb_take(&b);
}
