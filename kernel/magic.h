/* magic.h — what a magic is: its spec (name, positional words, typed options, help) and
 * the context its handler runs in. The one table (magics.c) is read by execution,
 * completion, inspection and %help alike, so they can never disagree.
 *
 * Handlers live in kernel/magic_*.c, one file per concern; they report only through the
 * sink in their context (never a socket, never stdout).
 */
#ifndef LATHE_MAGIC_H
#define LATHE_MAGIC_H

#include <signal.h>
#include <stdint.h>

#include "cuda/engine.h"
#include "kernel/interp.h"

typedef enum opt_type {
    OPT_STRING, /* any text */
    OPT_INT,    /* integer within [min, max] */
    OPT_FLOAT,  /* number within [min, max] (min_open: strictly above min) */
    OPT_BOOL,   /* true|false|1|0|yes|no */
    OPT_CHOICE, /* one of choices, "a|b|c" */
    OPT_LIST,   /* comma-separated words */
} opt_type;

typedef struct opt_spec {
    const char *name;
    opt_type type;
    const char *def;     /* default as text (kernel-only options); NULL = unset */
    const char *engine;  /* engine options group ("train", ...) whose field `name` this option
                          * sets: its default is lt_option_default(engine, name), def is NULL */
    const char *choices; /* OPT_CHOICE: "a|b|c" */
    double min, max;     /* OPT_INT / OPT_FLOAT bounds (ignored when min > max) */
    int min_open;        /* 1: the value must be strictly greater than min */
    const char *help;    /* one line */
} opt_spec;

#define MAGIC_MAX_OPTS 32
#define MAGIC_MAX_POS 8

struct magic_spec;

/* A validated call: option values as text (defaults filled), positionals, body. */
typedef struct magic_args {
    const struct magic_spec *spec;
    const char *pos[MAGIC_MAX_POS];
    int npos;
    const char *value[MAGIC_MAX_OPTS]; /* by index in spec->opts; NULL = unset, no default */
    int given[MAGIC_MAX_OPTS];         /* 1 when the user wrote it */
    const char *body;                  /* %%magic body, or NULL */
} magic_args;

/* The state a handler may use. */
typedef struct magic_ctx {
    const lt_sink *sink;
    lt_session *session;                /* the engine session (created on first use) */
    volatile sig_atomic_t *interrupted; /* raised by interp_interrupt */
    interp_error *err;                  /* fill through magic_fail */
    int exec_index;                     /* counts cells run in this process */
} magic_ctx;

typedef int (*magic_fn)(magic_ctx *ctx, const magic_args *a);

typedef struct magic_spec {
    const char *name;         /* without % */
    int cell;                 /* 1: a %%cell magic (takes a body) */
    const char *usage;        /* "%load SOURCE [dtype=...] ..." */
    int min_pos, max_pos;     /* positional words accepted */
    const char *pos_name;     /* "SOURCE", for messages */
    const opt_spec *pos_type; /* the type every positional must have; NULL = any text */
    const opt_spec *opts;     /* terminated by {NULL} */
    const char *summary;      /* one line for the %help table */
    const char *help;         /* paragraphs for %help NAME and inspection */
    magic_fn fn;
} magic_spec;

/* The table. */
const magic_spec *magics_find(const char *name);
const magic_spec *magics_all(int *n);
const opt_spec *magic_opt_find(const magic_spec *m, const char *name);
/* An option's default as text (the engine's for an option with `engine`); NULL = unset. What
 * %help shows and what validation fills in for an option left out. */
const char *opt_default(const opt_spec *o);

/* Option accessors (by name; the name must be in the spec: a typo is a bug, caught by
 * tests). Values were range-checked during validation. */
const char *arg_str(const magic_args *a, const char *name);
long long arg_int(const magic_args *a, const char *name);
double arg_float(const magic_args *a, const char *name);
int arg_bool(const magic_args *a, const char *name);
int arg_given(const magic_args *a, const char *name);

/* Fails the cell: sets ename/evalue (printf-style) and returns -1 for `return magic_fail(...)`. */
int magic_fail(magic_ctx *ctx, const char *ename, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Fails with the engine's last error message (ename "EngineError", or KeyboardInterrupt
 * when the engine was cancelled). */
int magic_fail_engine(magic_ctx *ctx, lt_status st);

/* Output helpers over the sink. */
void magic_print(magic_ctx *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Renders help: the %help table, or one magic's full help (text and HTML). */
char *magic_help_text(const magic_spec *m);
char *magic_help_html(const magic_spec *m);
char *opt_help_text(const magic_spec *m, const opt_spec *o);
char *magics_table_text(void);
char *magics_table_html(void);

/* The accepted form of an option, e.g. "lr=FLOAT > 0" or "schedule=constant|linear|cosine". */
void opt_accepted_form(const opt_spec *o, char *out, size_t outlen);

/* Validates a parsed call against the table: unknown magic/option, wrong type, out of range,
 * missing/extra positionals. Returns 0 or -1 with a message naming the problem and the
 * accepted form. Values point into `words` (which must outlive args). */
struct cell_call;
int magic_validate(const struct cell_call *call, magic_args *args, char *msg, size_t msglen);

#endif
