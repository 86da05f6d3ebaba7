/* interp.h — the cell interpreter: cell text in, reports out through a display sink.
 *
 * The interpreter parses a cell (cell.c), validates and runs its magics (magics.c) and
 * reports everything it shows through an lt_sink. It knows nothing of ZeroMQ or Jupyter
 * messages: the kernel server (server.c) is one sink, `lathe run` (run.c) is another (plain
 * text), tests are a third. No magic reaches past the sink.
 *
 * Threads: interp_execute/complete/inspect/is_complete are called from one thread (the
 * shell thread). interp_interrupt may be called from any thread or a signal handler.
 */
#ifndef LATHE_INTERP_H
#define LATHE_INTERP_H

#include <jansson.h>
#include <stddef.h>

/* Where a running cell sends what it shows. Every pointer may be NULL except ctx's owner's. */
typedef struct lt_sink {
    void *ctx;
    /* Text on "stdout" or "stderr". `text` is valid UTF-8. */
    void (*stream)(void *ctx, const char *name, const char *text);
    /* A rich output. `data` maps MIME type -> string (always has "text/plain"); `metadata`
     * is an object (may be empty). display_id: NULL for none. update != 0 means
     * update_display_data of an earlier display with the same id. The sink does not
     * take ownership of data/metadata (it may json_incref them). */
    void (*display)(void *ctx, json_t *data, json_t *metadata, const char *display_id, int update);
    /* The cell's result value (execute_result); same ownership rule. */
    void (*result)(void *ctx, json_t *data, json_t *metadata);
    /* Ask the user for a line of text. Returns 0 and a malloc'd *value, or -1 when input
     * is not allowed (allow_stdin=false, no terminal) or was interrupted. */
    int (*input)(void *ctx, const char *prompt, int password, char **value);
    /* Clears the cell's output so far (clear_output); wait != 0 defers the clearing until
     * the next output arrives (no flicker). */
    void (*clear)(void *ctx, int wait);
} lt_sink;

/* A failed cell: ename ("CellError", "KeyboardInterrupt", "EngineError", ...), evalue (one
 * line that names the problem and the accepted form), traceback (lines; may hold ANSI
 * colour). Owned by the caller after interp_execute; release with interp_error_clear. */
typedef struct interp_error {
    char *ename;
    char *evalue;
    json_t *traceback; /* array of strings */
} interp_error;

typedef struct interp interp;

interp *interp_new(void);
void interp_free(interp *in);

/* Runs one cell. Returns 0 on success, -1 on failure with *err filled. */
int interp_execute(interp *in, const char *code, size_t len, const lt_sink *sink,
                   interp_error *err);
void interp_error_clear(interp_error *err);

/* Asks the running cell to stop at its next check (async-signal-safe, any thread). The
 * flag is cleared when the next cell starts. */
void interp_interrupt(interp *in);

/* Completion at cursor_pos (a code-point offset). Returns a new array of matches and sets
 * *cursor_start / *cursor_end (code points) to the span a match replaces. */
json_t *interp_complete(interp *in, const char *code, size_t len, int cursor_pos, int *cursor_start,
                        int *cursor_end);

/* Help for the magic or option under cursor_pos: a new MIME bundle object, or NULL when
 * nothing is there. detail_level 0 or 1. */
json_t *interp_inspect(interp *in, const char *code, size_t len, int cursor_pos, int detail_level);

/* "complete", "incomplete" (sets *indent to a static string) or "invalid". */
const char *interp_is_complete(interp *in, const char *code, size_t len, const char **indent);

/* The language's facts for kernel_info_reply (a new object: name, version, mimetype,
 * file_extension, pygments_lexer, codemirror_mode). */
json_t *interp_language_info(void);
const char *interp_banner(void);

#endif
