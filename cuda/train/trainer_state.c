/* trainer_state.c — trainer_state.json, a checkpoint's record of its run: the %train options that
 * made it, the optimizer step, the stream position (units consumed), the tokens trained, the
 * number of units the data made and the loss of every step so far.
 *
 * %train save= writes it (trainer_state_text); %train resume= reads it back (trainer_state_read)
 * to continue the run where the checkpoint stopped. A checkpoint folder is ordinary files that a
 * person can edit, copy half or damage, so the reader checks every key before anything trusts
 * it: each a JSON value of the type the writer writes, every count a whole number in its range
 * (a negative position would index the data before its first unit), every real option finite.
 * What is wrong is named by its key, with what to do. The option values themselves (batch >= 1,
 * the AdamW betas in [0, 1) ...) are checked where fresh options are, by train.c.
 */
#include <float.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cuda/train/train.h"

char *trainer_state_text(const trainer_state *s, const lt_train_opts *o, int max_seq) {
    json_t *j = json_object();
    json_t *losses = json_array();
    for (int i = 0; i < s->n_losses; i++)
        json_array_append_new(losses, json_real(s->losses[i]));
    json_t *opts = json_pack(
        "{s:s, s:s, s:i, s:i, s:i, s:f, s:f, s:i, s:s, s:f, s:f, s:f, s:f, s:f, s:i, s:b, s:b, "
        "s:I, s:b}",
        "data", o->data ? o->data : "", "format", o->format ? o->format : "auto", "batch", o->batch,
        "grad_accum", o->grad_accum, "steps", o->steps, "epochs", (double)o->epochs, "lr",
        (double)o->lr, "warmup", o->warmup, "schedule", o->schedule ? o->schedule : "linear",
        "weight_decay", (double)o->weight_decay, "max_grad_norm", (double)o->max_grad_norm, "beta1",
        (double)o->beta1, "beta2", (double)o->beta2, "eps", (double)o->eps, "max_seq", max_seq,
        "responses_only", o->responses_only, "packing", o->packing, "seed", (json_int_t)o->seed,
        "shuffle", o->shuffle);
    if (!j || !losses || !opts) { /* out of memory, or a text option that is not UTF-8 */
        json_decref(j);
        json_decref(losses);
        json_decref(opts);
        return NULL;
    }
    json_object_set_new(j, "format_version", json_integer(1));
    json_object_set_new(j, "step", json_integer(s->step));
    json_object_set_new(j, "total_steps", json_integer(s->total_steps));
    json_object_set_new(j, "position", json_integer(s->position));
    json_object_set_new(j, "tokens", json_integer(s->tokens));
    json_object_set_new(j, "units", json_integer(s->units));
    json_object_set_new(j, "full", json_boolean(s->full));
    json_object_set_new(j, "losses", losses);
    json_object_set_new(j, "options", opts);
    char *text = json_dumps(j, JSON_INDENT(1) | JSON_SORT_KEYS);
    json_decref(j);
    return text;
}

/* What a JSON value is, for the messages. */
static const char *kind_of(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number with a fraction";
    case JSON_TRUE:
    case JSON_FALSE:
        return "true/false";
    default:
        return "null";
    }
}

/* The checks below write their message here and return -1. */
typedef struct reader {
    const char *where; /* the file, for messages */
    char *err;
} reader;

static int bad(const reader *r, const char *key, const json_t *v, const char *want) {
    if (v)
        lt_fail(r->err, LT_ERR_FORMAT, "%s: \"%s\" is %s; it must be %s", r->where, key, kind_of(v),
                want);
    else
        lt_fail(r->err, LT_ERR_FORMAT, "%s: \"%s\" is missing (%s)", r->where, key, want);
    return -1;
}

/* An integer in [lo, hi]. */
static int get_int(const reader *r, const json_t *obj, const char *key, json_int_t lo,
                   json_int_t hi, json_int_t *out) {
    const json_t *v = json_object_get(obj, key);
    if (!json_is_integer(v)) return bad(r, key, v, "a whole number");
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi) {
        lt_fail(r->err, LT_ERR_FORMAT, "%s: \"%s\" is %lld; it must be in [%lld, %lld]", r->where,
                key, (long long)x, (long long)lo, (long long)hi);
        return -1;
    }
    *out = x;
    return 0;
}

/* A finite number a float holds (an integer counts). */
static int get_real(const reader *r, const json_t *obj, const char *key, float *out) {
    const json_t *v = json_object_get(obj, key);
    if (!json_is_number(v)) return bad(r, key, v, "a number");
    double x = json_number_value(v);
    if (!isfinite(x) || fabs(x) > FLT_MAX) {
        lt_fail(r->err, LT_ERR_FORMAT, "%s: \"%s\" is %g, beyond a float's range", r->where, key,
                x);
        return -1;
    }
    *out = (float)x;
    return 0;
}

static int get_flag(const reader *r, const json_t *obj, const char *key, int *out) {
    const json_t *v = json_object_get(obj, key);
    if (!json_is_boolean(v)) return bad(r, key, v, "true or false");
    *out = json_is_true(v);
    return 0;
}

/* A string that fits dst (cap bytes with its terminator). */
static int get_text(const reader *r, const json_t *obj, const char *key, char *dst, size_t cap) {
    const json_t *v = json_object_get(obj, key);
    if (!json_is_string(v)) return bad(r, key, v, "a string");
    size_t n = json_string_length(v);
    if (n >= cap || strlen(json_string_value(v)) != n) {
        lt_fail(r->err, LT_ERR_FORMAT,
                "%s: \"%s\" is %zu bytes%s; at most %zu without NUL bytes are read back", r->where,
                key, n, strlen(json_string_value(v)) != n ? " with a NUL byte" : "", cap - 1);
        return -1;
    }
    memcpy(dst, json_string_value(v), n + 1);
    return 0;
}

/* The options object into o (its text options into texts). */
static int read_options(const reader *r, const json_t *op, lt_train_opts *o,
                        trainer_state_texts *texts) {
    json_int_t v;
#define INT_OPT(k)                                                                                 \
    if (get_int(r, op, #k, INT_MIN, INT_MAX, &v) != 0) return -1;                                  \
    o->k = (int)v
    INT_OPT(batch);
    INT_OPT(grad_accum);
    INT_OPT(steps);
    INT_OPT(warmup);
    INT_OPT(max_seq);
#undef INT_OPT
#define REAL_OPT(k)                                                                                \
    if (get_real(r, op, #k, &o->k) != 0) return -1
    REAL_OPT(epochs);
    REAL_OPT(lr);
    REAL_OPT(weight_decay);
    REAL_OPT(max_grad_norm);
    REAL_OPT(beta1);
    REAL_OPT(beta2);
    REAL_OPT(eps);
#undef REAL_OPT
    if (get_flag(r, op, "responses_only", &o->responses_only) != 0 ||
        get_flag(r, op, "packing", &o->packing) != 0 ||
        get_flag(r, op, "shuffle", &o->shuffle) != 0)
        return -1;
    /* a seed of 2^63 or more is written as the negative integer of the same 64 bits */
    const json_t *seed = json_object_get(op, "seed");
    if (!json_is_integer(seed)) return bad(r, "seed", seed, "a whole number");
    o->seed = (uint64_t)json_integer_value(seed);
    if (get_text(r, op, "data", texts->data, sizeof texts->data) != 0 ||
        get_text(r, op, "format", texts->format, sizeof texts->format) != 0 ||
        get_text(r, op, "schedule", texts->schedule, sizeof texts->schedule) != 0)
        return -1;
    o->data = texts->data;
    o->format = texts->format;
    o->schedule = texts->schedule;
    return 0;
}

static int read_state(const reader *r, const json_t *j, trainer_state *s) {
    json_int_t v;
    const json_t *fv = json_object_get(j, "format_version");
    if (fv && (!json_is_integer(fv) || json_integer_value(fv) != 1)) {
        if (!json_is_integer(fv)) return bad(r, "format_version", fv, "the integer 1");
        lt_fail(r->err, LT_ERR_FORMAT,
                "%s: format_version %lld; this lathe reads 1 (a checkpoint of a newer lathe?)",
                r->where, (long long)json_integer_value(fv));
        return -1;
    }
    if (get_int(r, j, "step", 0, INT_MAX, &v) != 0) return -1;
    s->step = (int)v;
    if (get_int(r, j, "units", 1, INT_MAX, &v) != 0) return -1;
    s->units = (int)v;
    if (get_int(r, j, "position", 0, LLONG_MAX, &v) != 0) return -1;
    s->position = (int64_t)v;
    if (get_int(r, j, "tokens", 0, LLONG_MAX, &v) != 0) return -1;
    s->tokens = (int64_t)v;
    s->total_steps = 0;
    if (json_object_get(j, "total_steps")) {
        if (get_int(r, j, "total_steps", 0, INT_MAX, &v) != 0) return -1;
        s->total_steps = (int)v;
    }
    s->full = 0;
    if (json_object_get(j, "full") && get_flag(r, j, "full", &s->full) != 0) return -1;
    const json_t *ls = json_object_get(j, "losses");
    if (!ls) return 0;
    if (!json_is_array(ls)) return bad(r, "losses", ls, "an array of numbers");
    size_t n = json_array_size(ls);
    if (n > (size_t)INT_MAX / 2) return bad(r, "losses", ls, "an array of fewer numbers");
    if (n && !(s->losses = malloc(sizeof(float) * n))) {
        lt_fail(r->err, LT_ERR_MEMORY, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        const json_t *x = json_array_get(ls, i);
        char key[48];
        snprintf(key, sizeof key, "losses[%zu]", i);
        if (!json_is_number(x) || fabs(json_number_value(x)) > FLT_MAX)
            return bad(r, key, x, "a number a float holds");
        s->losses[s->n_losses++] = (float)json_number_value(x);
    }
    return 0;
}

/* The checks over j, which it takes (NULL: not JSON, as je says). */
static lt_status from_json(json_t *j, const json_error_t *je, const char *where, trainer_state *s,
                           lt_train_opts *o, trainer_state_texts *texts, char *err) {
    memset(s, 0, sizeof *s);
    if (!j)
        return lt_fail(err, LT_ERR_FORMAT, "%s: not JSON (%s, line %d)", where, je->text, je->line);
    reader r = {where, err};
    int fail = 0;
    if (!json_is_object(j)) {
        fail = bad(&r, "(the whole file)", j, "an object");
    } else {
        const json_t *op = json_object_get(j, "options");
        fail = !json_is_object(op) ? bad(&r, "options", op, "an object of %train's options")
                                   : read_options(&r, op, o, texts) != 0 || read_state(&r, j, s);
    }
    json_decref(j);
    if (fail) {
        char why[LT_ERRLEN];
        snprintf(why, sizeof why, "%s", err);
        trainer_state_free(s);
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s. Resume from another checkpoint, or start the run again without "
                       "resume=",
                       why);
    }
    return LT_OK;
}

lt_status trainer_state_parse(const char *text, size_t len, const char *where, trainer_state *s,
                              lt_train_opts *o, trainer_state_texts *texts, char *err) {
    json_error_t je;
    json_t *j = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    return from_json(j, &je, where, s, o, texts, err);
}

lt_status trainer_state_read(const char *dir, trainer_state *s, lt_train_opts *o,
                             trainer_state_texts *texts, char *err) {
    char p[4200];
    snprintf(p, sizeof p, "%s/trainer_state.json", dir);
    memset(s, 0, sizeof *s);
    struct stat sb;
    if (stat(p, &sb) != 0) return lt_fail(err, LT_ERR_IO, "%s: cannot open it", p);
    /* the writer's files are a few kilobytes plus 20 bytes a step */
    if (sb.st_size > ((off_t)64 << 20))
        return lt_fail(err, LT_ERR_FORMAT, "%s: larger than 64 MiB; not a trainer state", p);
    json_error_t je;
    json_t *j = json_load_file(p, JSON_REJECT_DUPLICATES, &je);
    return from_json(j, &je, p, s, o, texts, err);
}

void trainer_state_free(trainer_state *s) {
    free(s->losses);
    s->losses = NULL;
    s->n_losses = 0;
}
