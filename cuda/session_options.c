/* session_options.c — the one place the defaults of the engine's options structs are written:
 * a table per struct (lt_load_opts, lt_gen_opts, lt_image_opts, lt_lora_opts, lt_train_opts,
 * lt_grpo_opts) holding
 * each field's default as text, and the lt_*_opts_default functions, which fill a struct by parsing
 * that text. The kernel reads the same texts through lt_option_default for %help and for the
 * options a cell leaves out, so a default cannot differ between the two.
 *
 * Owns the tables and the fill functions only. It checks no option values (lt_load,
 * lt_lora_attach and lt_train do) and includes nothing of the engine but cuda/engine.h.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/engine.h"

typedef enum field_kind {
    FIELD_INT,    /* int, written in decimal */
    FIELD_FLOAT,  /* float, written as strtod reads it ("2e-4") */
    FIELD_DOUBLE, /* double, written as strtod reads it (kept as strtod gives it) */
    FIELD_U64,    /* uint64_t, in decimal */
    FIELD_FLAG,   /* int 0/1, written "false"/"true" */
    FIELD_TEXT,   /* const char *, the text itself */
} field_kind;

typedef struct field_default {
    const char *name; /* the field, and the magic option that sets it */
    field_kind kind;
    size_t offset;    /* where the field lies in its struct */
    const char *text; /* the default as %help shows it; NULL = unset (0 or NULL) */
} field_default;

#define FIELD(type, field, kind, text)                                                             \
    { #field, kind, offsetof(type, field), text }

static const field_default load_defaults[] = {FIELD(lt_load_opts, dtype, FIELD_TEXT, "auto"),
                                              FIELD(lt_load_opts, device, FIELD_TEXT, "auto"),
                                              FIELD(lt_load_opts, max_seq, FIELD_INT, "0"),
                                              FIELD(lt_load_opts, quant, FIELD_TEXT, "none"),
                                              FIELD(lt_load_opts, quant_keep, FIELD_FLOAT, "0.1"),
                                              {NULL}};

/* Gemma 3's sampling defaults: temperature 1.0, top_k 64, top_p 0.95. */
static const field_default gen_defaults[] = {FIELD(lt_gen_opts, max_new, FIELD_INT, "256"),
                                             FIELD(lt_gen_opts, temperature, FIELD_FLOAT, "1.0"),
                                             FIELD(lt_gen_opts, top_k, FIELD_INT, "64"),
                                             FIELD(lt_gen_opts, top_p, FIELD_FLOAT, "0.95"),
                                             FIELD(lt_gen_opts, min_p, FIELD_FLOAT, "0"),
                                             FIELD(lt_gen_opts, seed, FIELD_U64, "0"),
                                             {NULL}};

/* Gemma3Processor's images_kwargs defaults (transformers' processing_gemma3.py): pan-and-scan
 * off, min crop 256 pixels, at most 4 crops, from an aspect ratio of 1.2. */
static const field_default image_defaults[] = {
    FIELD(lt_image_opts, pan_and_scan, FIELD_FLAG, "false"),
    FIELD(lt_image_opts, pan_and_scan_min_crop_size, FIELD_INT, "256"),
    FIELD(lt_image_opts, pan_and_scan_max_num_crops, FIELD_INT, "4"),
    FIELD(lt_image_opts, pan_and_scan_min_ratio_to_activate, FIELD_DOUBLE, "1.2"),
    {NULL}};

/* r 16, alpha 16, dropout 0 and seed 3407, the defaults of Unsloth's get_peft_model. */
static const field_default lora_defaults[] = {
    FIELD(lt_lora_opts, r, FIELD_INT, "16"),
    FIELD(lt_lora_opts, alpha, FIELD_FLOAT, "16"),
    FIELD(lt_lora_opts, rslora, FIELD_FLAG, "false"),
    FIELD(lt_lora_opts, dropout, FIELD_FLOAT, "0"),
    FIELD(lt_lora_opts, seed, FIELD_U64, "3407"),
    FIELD(lt_lora_opts, targets, FIELD_TEXT, "q,k,v,o,gate,up,down"),
    FIELD(lt_lora_opts, full, FIELD_FLAG, "false"),
    FIELD(lt_lora_opts, load, FIELD_TEXT, NULL),
    {NULL}};

/* beta1, beta2 and eps are torch.optim.AdamW's defaults (betas (0.9, 0.999), eps 1e-8); no
 * magic sets them. */
static const field_default train_defaults[] = {
    FIELD(lt_train_opts, data, FIELD_TEXT, NULL),
    FIELD(lt_train_opts, format, FIELD_TEXT, "auto"),
    FIELD(lt_train_opts, batch, FIELD_INT, "2"),
    FIELD(lt_train_opts, grad_accum, FIELD_INT, "1"),
    FIELD(lt_train_opts, steps, FIELD_INT, "0"),
    FIELD(lt_train_opts, epochs, FIELD_FLOAT, "1"),
    FIELD(lt_train_opts, lr, FIELD_FLOAT, "2e-4"),
    FIELD(lt_train_opts, warmup, FIELD_INT, "0"),
    FIELD(lt_train_opts, schedule, FIELD_TEXT, "linear"),
    FIELD(lt_train_opts, optim, FIELD_TEXT, "adamw"),
    FIELD(lt_train_opts, weight_decay, FIELD_FLOAT, "0"),
    FIELD(lt_train_opts, max_grad_norm, FIELD_FLOAT, "1.0"),
    FIELD(lt_train_opts, beta1, FIELD_FLOAT, "0.9"),
    FIELD(lt_train_opts, beta2, FIELD_FLOAT, "0.999"),
    FIELD(lt_train_opts, eps, FIELD_FLOAT, "1e-8"),
    FIELD(lt_train_opts, max_seq, FIELD_INT, "0"),
    FIELD(lt_train_opts, responses_only, FIELD_FLAG, "true"),
    FIELD(lt_train_opts, packing, FIELD_FLAG, "false"),
    FIELD(lt_train_opts, seed, FIELD_U64, "3407"),
    FIELD(lt_train_opts, shuffle, FIELD_FLAG, "true"),
    FIELD(lt_train_opts, save, FIELD_TEXT, NULL),
    FIELD(lt_train_opts, save_every, FIELD_INT, "0"),
    FIELD(lt_train_opts, keep, FIELD_INT, "0"),
    FIELD(lt_train_opts, resume, FIELD_TEXT, NULL),
    FIELD(lt_train_opts, given, FIELD_TEXT, NULL),
    {NULL}};

/* GRPO: lr 5e-6, group 8, epsilon 0.2 both sides, beta 0 and loss "dapo" are TRL's
 * GRPOConfig defaults (trl/trainer/grpo_config.py: learning_rate 1e-6 there, 5e-6 in Unsloth's
 * Gemma 3 GRPO notebook); scale_rewards "group" is TRL's default normalisation. */
static const field_default grpo_defaults[] = {
    FIELD(lt_grpo_opts, data, FIELD_TEXT, NULL),
    FIELD(lt_grpo_opts, reward, FIELD_TEXT, NULL),
    FIELD(lt_grpo_opts, weights, FIELD_TEXT, NULL),
    FIELD(lt_grpo_opts, markers, FIELD_TEXT,
          "<start_working_out>,<end_working_out>,<SOLUTION>,</SOLUTION>"),
    FIELD(lt_grpo_opts, group, FIELD_INT, "8"),
    FIELD(lt_grpo_opts, batch, FIELD_INT, "1"),
    FIELD(lt_grpo_opts, micro, FIELD_INT, "0"),
    FIELD(lt_grpo_opts, steps, FIELD_INT, "50"),
    FIELD(lt_grpo_opts, lr, FIELD_FLOAT, "5e-6"),
    FIELD(lt_grpo_opts, warmup, FIELD_INT, "0"),
    FIELD(lt_grpo_opts, schedule, FIELD_TEXT, "linear"),
    FIELD(lt_grpo_opts, weight_decay, FIELD_FLOAT, "0"),
    FIELD(lt_grpo_opts, max_grad_norm, FIELD_FLOAT, "1.0"),
    FIELD(lt_grpo_opts, beta, FIELD_FLOAT, "0.0"),
    FIELD(lt_grpo_opts, epsilon, FIELD_FLOAT, "0.2"),
    FIELD(lt_grpo_opts, epsilon_high, FIELD_FLOAT, "0.2"),
    FIELD(lt_grpo_opts, loss, FIELD_TEXT, "dapo"),
    FIELD(lt_grpo_opts, scale_rewards, FIELD_TEXT, "group"),
    FIELD(lt_grpo_opts, max_prompt, FIELD_INT, "256"),
    FIELD(lt_grpo_opts, max_completion, FIELD_INT, "768"),
    FIELD(lt_grpo_opts, temperature, FIELD_FLOAT, "1.0"),
    FIELD(lt_grpo_opts, top_p, FIELD_FLOAT, "1.0"),
    FIELD(lt_grpo_opts, top_k, FIELD_INT, "0"),
    FIELD(lt_grpo_opts, iterations, FIELD_INT, "1"),
    FIELD(lt_grpo_opts, seed, FIELD_U64, "3407"),
    FIELD(lt_grpo_opts, shuffle, FIELD_FLAG, "true"),
    FIELD(lt_grpo_opts, show_every, FIELD_INT, "5"),
    FIELD(lt_grpo_opts, reward_timeout, FIELD_FLOAT, "120"),
    FIELD(lt_grpo_opts, log, FIELD_TEXT, NULL),
    {NULL}};

static const struct {
    const char *group;
    const field_default *fields;
} groups[] = {
    {"load", load_defaults}, {"gen", gen_defaults},     {"image", image_defaults},
    {"lora", lora_defaults}, {"train", train_defaults}, {"grpo", grpo_defaults},
};

static const field_default *group_find(const char *group) {
    for (size_t i = 0; group && i < sizeof groups / sizeof groups[0]; ++i)
        if (strcmp(groups[i].group, group) == 0) return groups[i].fields;
    return NULL;
}

const char *lt_option_default(const char *group, const char *name) {
    const field_default *f = group_find(group);
    for (; f && name && f->name; ++f)
        if (strcmp(f->name, name) == 0) return f->text;
    return NULL;
}

const char *lt_option_name(const char *group, int i) {
    const field_default *f = group_find(group);
    for (int k = 0; f && f->name; ++k, ++f)
        if (k == i) return f->name;
    return NULL;
}

/* Zeroes the struct, then stores every default the table writes. */
static void fields_fill(void *opts, size_t size, const field_default *f) {
    memset(opts, 0, size);
    for (; f->name; ++f) {
        if (!f->text) continue;
        char *at = (char *)opts + f->offset;
        switch (f->kind) {
        case FIELD_INT:
            *(int *)at = (int)strtol(f->text, NULL, 10);
            break;
        case FIELD_FLOAT:
            *(float *)at = (float)strtod(f->text, NULL);
            break;
        case FIELD_DOUBLE:
            *(double *)at = strtod(f->text, NULL);
            break;
        case FIELD_U64:
            *(uint64_t *)at = (uint64_t)strtoull(f->text, NULL, 10);
            break;
        case FIELD_FLAG:
            *(int *)at = strcmp(f->text, "true") == 0;
            break;
        case FIELD_TEXT:
            *(const char **)at = f->text;
            break;
        }
    }
}

void lt_load_opts_default(lt_load_opts *o) {
    fields_fill(o, sizeof *o, load_defaults);
}

void lt_gen_opts_default(lt_gen_opts *o) {
    fields_fill(o, sizeof *o, gen_defaults);
}

void lt_image_opts_default(lt_image_opts *o) {
    fields_fill(o, sizeof *o, image_defaults);
}

void lt_lora_opts_default(lt_lora_opts *o) {
    fields_fill(o, sizeof *o, lora_defaults);
}

void lt_train_opts_default(lt_train_opts *o) {
    fields_fill(o, sizeof *o, train_defaults);
}

void lt_grpo_opts_default(lt_grpo_opts *o) {
    fields_fill(o, sizeof *o, grpo_defaults);
}
