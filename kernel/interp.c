/* interp.c — the cell interpreter behind interp.h: parse the whole cell, validate every
 * call against the magic table before any work starts, then run the calls in order.
 * Completion and inspection read the same table. Owns the engine session.
 */
#include "kernel/interp.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "cuda/engine.h"
#include "kernel/cell.h"
#include "kernel/display.h"
#include "kernel/magic.h"

struct interp {
    lt_session *session;
    volatile sig_atomic_t interrupted;
    int exec_index;
};

interp *interp_new(void) {
    interp *in = calloc(1, sizeof *in);
    if (!in) return NULL;
    in->session = lt_session_new();
    if (!in->session) {
        free(in);
        return NULL;
    }
    return in;
}

void interp_free(interp *in) {
    if (!in) return;
    lt_session_free(in->session);
    free(in);
}

void interp_interrupt(interp *in) {
    in->interrupted = 1;
    lt_cancel(in->session);
}

void interp_error_clear(interp_error *err) {
    free(err->ename);
    free(err->evalue);
    json_decref(err->traceback);
    memset(err, 0, sizeof *err);
}

/* The traceback frontends show: the error line in red, then the hint. */
static void error_finish(interp_error *err, const char *where) {
    if (!err->ename) err->ename = strdup("CellError");
    if (!err->evalue) err->evalue = strdup("the cell failed");
    err->traceback = json_array();
    strbuf_t b;
    sb_init(&b);
    sb_printf(&b, "\x1b[0;31m%s\x1b[0m: %s", err->ename ? err->ename : "CellError",
              err->evalue ? err->evalue : "");
    char *line = sb_take(&b);
    if (err->traceback && line) json_array_append_new(err->traceback, json_string(line));
    if (err->traceback && where) json_array_append_new(err->traceback, json_string(where));
    free(line);
}

int interp_execute(interp *in, const char *code, size_t len, const lt_sink *sink,
                   interp_error *err) {
    memset(err, 0, sizeof *err);
    in->interrupted = 0;
    ++in->exec_index;

    cell_program prog;
    cell_parse_error perr;
    if (cell_parse(code, len, &prog, &perr)) {
        err->ename = strdup("CellError");
        err->evalue = strdup(perr.message);
        error_finish(err, NULL);
        return -1;
    }
    /* Validate everything first: a typo on line 3 must not let line 1 start a long run. */
    magic_args *args = calloc((size_t)(prog.ncalls ? prog.ncalls : 1), sizeof *args);
    if (!args) {
        cell_program_free(&prog);
        err->ename = strdup("MemoryError");
        err->evalue = strdup("out of memory");
        error_finish(err, NULL);
        return -1;
    }
    char msg[1024];
    for (int i = 0; i < prog.ncalls; ++i) {
        if (magic_validate(&prog.calls[i], &args[i], msg, sizeof msg)) {
            err->ename = strdup("CellError");
            err->evalue = strdup(msg);
            error_finish(err, "nothing in this cell ran; fix it and run it again");
            free(args);
            cell_program_free(&prog);
            return -1;
        }
    }
    magic_ctx ctx = {sink, in->session, &in->interrupted, err, in->exec_index};
    int rc = 0;
    for (int i = 0; i < prog.ncalls && rc == 0; ++i) {
        if (in->interrupted) {
            magic_fail(&ctx, "KeyboardInterrupt", "interrupted before %%%s", prog.calls[i].name);
            rc = -1;
            break;
        }
        rc = args[i].spec->fn(&ctx, &args[i]);
        if (rc) {
            char where[128];
            snprintf(where, sizeof where, "in %s%s on line %d", prog.calls[i].is_cell ? "%%" : "%",
                     prog.calls[i].name, prog.calls[i].line);
            if (!err->ename) magic_fail(&ctx, "CellError", "%%%s failed", prog.calls[i].name);
            error_finish(err, where);
        }
    }
    free(args);
    cell_program_free(&prog);
    return rc;
}

/* ---- code points <-> bytes -------------------------------------------------------------- */

static size_t cp_to_byte(const char *s, size_t len, int cp) {
    size_t i = 0;
    for (int n = 0; i < len && n < cp; ++n) {
        ++i;
        while (i < len && ((unsigned char)s[i] & 0xC0) == 0x80)
            ++i;
    }
    return i;
}

static int byte_to_cp(const char *s, size_t len, size_t b) {
    int n = 0;
    for (size_t i = 0; i < b && i < len; ++i)
        if (((unsigned char)s[i] & 0xC0) != 0x80) ++n;
    return n;
}

/* ---- completion ------------------------------------------------------------------------- */

static int starts_with(const char *s, const char *prefix) {
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static void add_match(json_t *matches, const char *m) {
    json_array_append_new(matches, json_string(m));
}

/* Sources %load offers before the user has typed a path. */
static const char *const load_sources[] = {"tiny",
                                           "random:gemma-3-270m",
                                           "random:gemma-3-1b",
                                           "random:gemma-3-4b",
                                           "random:gemma-3-12b",
                                           "random:gemma-3-27b",
                                           NULL};

json_t *interp_complete(interp *in, const char *code, size_t len, int cursor_pos, int *cursor_start,
                        int *cursor_end) {
    (void)in;
    json_t *matches = json_array();
    size_t pos = cp_to_byte(code, len, cursor_pos < 0 ? 0 : cursor_pos);
    size_t start;
    char *word = cell_word_at(code, len, pos, &start);
    char *magic = cell_magic_of_line(code, len, pos);
    *cursor_start = byte_to_cp(code, len, start);
    *cursor_end = byte_to_cp(code, len, pos);
    if (!word || !matches) goto done;

    int n;
    const magic_spec *all = magics_all(&n);
    if (word[0] == '%') { /* a magic name */
        for (int i = 0; i < n; ++i) {
            char full[64];
            snprintf(full, sizeof full, "%s%s", all[i].cell ? "%%" : "%", all[i].name);
            if (starts_with(full, word)) add_match(matches, full);
        }
        goto done;
    }
    const magic_spec *m = magic ? magics_find(magic) : NULL;
    if (!m) goto done;
    char *eq = strchr(word, '=');
    if (eq) { /* a value: complete choices and booleans */
        *eq = '\0';
        const opt_spec *o = magic_opt_find(m, word);
        const char *choices = o && o->type == OPT_CHOICE ? o->choices
                              : o && o->type == OPT_BOOL ? "true|false"
                                                         : NULL;
        const char *typed = eq + 1;
        for (const char *p = choices; p && *p;) {
            const char *bar = strchr(p, '|');
            size_t l = bar ? (size_t)(bar - p) : strlen(p);
            char full[192];
            snprintf(full, sizeof full, "%s=%.*s", word, (int)l, p);
            if (strncmp(p, typed, strlen(typed)) == 0 && strlen(typed) <= l)
                add_match(matches, full);
            p = bar ? bar + 1 : NULL;
        }
        goto done;
    }
    for (const opt_spec *o = m->opts; o->name; ++o) {
        char full[96];
        snprintf(full, sizeof full, "%s=", o->name);
        if (starts_with(full, word)) add_match(matches, full);
    }
    if (strcmp(m->name, "help") == 0)
        for (int i = 0; i < n; ++i)
            if (starts_with(all[i].name, word)) add_match(matches, all[i].name);
    if (strcmp(m->name, "load") == 0)
        for (int i = 0; load_sources[i]; ++i)
            if (starts_with(load_sources[i], word)) add_match(matches, load_sources[i]);
done:
    free(word);
    free(magic);
    return matches;
}

/* ---- inspection ------------------------------------------------------------------------- */

json_t *interp_inspect(interp *in, const char *code, size_t len, int cursor_pos, int detail_level) {
    (void)in;
    (void)detail_level;
    size_t pos = cp_to_byte(code, len, cursor_pos < 0 ? 0 : cursor_pos);
    /* the whole word around the cursor */
    size_t b = pos, e = pos;
    while (b > 0 && code[b - 1] != ' ' && code[b - 1] != '\t' && code[b - 1] != '\n')
        --b;
    while (e < len && code[e] != ' ' && code[e] != '\t' && code[e] != '\n' && code[e] != '\r')
        ++e;
    char *word = strndup(code + b, e - b);
    char *magic = cell_magic_of_line(code, len, pos);
    const magic_spec *m = magic ? magics_find(magic) : NULL;
    char *text = NULL, *html = NULL;
    if (m && word && word[0] != '%') {
        char *eq = strchr(word, '=');
        if (eq) *eq = '\0';
        const opt_spec *o = magic_opt_find(m, word);
        if (o) text = opt_help_text(m, o);
    }
    if (!text && m) {
        text = magic_help_text(m);
        html = magic_help_html(m);
    }
    free(word);
    free(magic);
    if (!text) return NULL;
    json_t *data = html ? json_pack("{s:s, s:s}", "text/plain", text, "text/html", html)
                        : json_pack("{s:s}", "text/plain", text);
    free(text);
    free(html);
    return data;
}

const char *interp_is_complete(interp *in, const char *code, size_t len, const char **indent) {
    (void)in;
    *indent = "";
    if (cell_is_incomplete(code, len)) return "incomplete";
    cell_program prog;
    cell_parse_error perr;
    if (cell_parse(code, len, &prog, &perr)) return "invalid";
    int bad = 0;
    for (int i = 0; i < prog.ncalls && !bad; ++i) {
        magic_args args;
        char msg[512];
        if (magic_validate(&prog.calls[i], &args, msg, sizeof msg)) bad = 1;
    }
    cell_program_free(&prog);
    return bad ? "invalid" : "complete";
}

json_t *interp_language_info(void) {
    /* No codemirror_mode: the classic Notebook would try to fetch a mode file for any name
     * it does not ship, and "text" highlighting is what a magics language wants anyway. */
    return json_pack("{s:s, s:s, s:s, s:s, s:s}", "name", "lathe", "version", PACKAGE_VERSION,
                     "mimetype", "text/x-lathe", "file_extension", ".lathe", "pygments_lexer",
                     "text");
}

const char *interp_banner(void) {
    return "lathe " PACKAGE_VERSION " - fine-tune and run Gemma 3 from Jupyter cells.\n"
           "Type %help for the magics.";
}
