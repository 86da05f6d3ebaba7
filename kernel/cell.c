/* cell.c — the cell language's parser (syntax in cell.h): text in, a list of magic calls out.
 *
 * It knows the syntax only: which magics exist and what their options mean is magics.c's
 * business. Words keep their byte spans so completion and inspection can find what is
 * under the cursor. All memory of a cell_program is owned by it (cell_program_free).
 */
#include "kernel/cell.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A growable byte buffer for unquoted word text. */
typedef struct strbuf {
    char *data;
    size_t len, cap;
} strbuf;

static int strbuf_put(strbuf *b, char c) {
    if (b->len + 2 > b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 32;
        char *p = realloc(b->data, cap);
        if (!p) return -1;
        b->data = p;
        b->cap = cap;
    }
    b->data[b->len++] = c;
    b->data[b->len] = '\0';
    return 0;
}

static char *strbuf_take(strbuf *b) {
    char *p = b->data ? b->data : strdup("");
    b->data = NULL;
    b->len = b->cap = 0;
    return p;
}

static void parse_fail(cell_parse_error *err, int line, size_t offset, const char *fmt, ...) {
    va_list ap;
    if (!err) return;
    err->line = line;
    err->offset = offset;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
}

static int is_name_char(char c) {
    return isalnum((unsigned char)c) || c == '_';
}

/* A backslash immediately followed by a newline (or \r\n) continues the line. */
static size_t continuation_len(const char *s, size_t len, size_t i) {
    if (i < len && s[i] == '\\') {
        if (i + 1 < len && s[i + 1] == '\n') return 2;
        if (i + 2 < len && s[i + 1] == '\r' && s[i + 2] == '\n') return 3;
    }
    return 0;
}

/* Skips blanks and line continuations on the current logical line; counts newlines. */
static size_t skip_blanks(const char *s, size_t len, size_t i, int *line) {
    for (;;) {
        size_t c = continuation_len(s, len, i);
        if (c) {
            i += c;
            ++*line;
        } else if (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r')) {
            ++i;
        } else {
            return i;
        }
    }
}

/* Reads one word starting at s[i] (not blank, not end of line). Fills *w; returns the
 * offset after it, or (size_t)-1 on a parse error. */
static size_t read_word(const char *s, size_t len, size_t i, int *line, cell_word *w,
                        cell_parse_error *err) {
    strbuf b = {0};
    int quoted_any = 0;
    int key_done = 0;
    size_t start = i;
    w->key = NULL;
    while (i < len && s[i] != '\n' && s[i] != ' ' && s[i] != '\t' && s[i] != '\r' &&
           !continuation_len(s, len, i)) {
        char c = s[i];
        if (c == '"') {
            quoted_any = 1;
            ++i;
            for (;;) {
                if (i >= len || s[i] == '\n') {
                    parse_fail(err, *line, start,
                               "line %d: unterminated quote: close it with \" (inside quotes "
                               "write \\\" for a quote and \\\\ for a backslash)",
                               *line);
                    free(b.data);
                    free(w->key); /* key="unterminated: the key was already taken */
                    w->key = NULL;
                    return (size_t)-1;
                }
                if (s[i] == '"') {
                    ++i;
                    break;
                }
                if (s[i] == '\\' && i + 1 < len && s[i + 1] != '\n') {
                    char e = s[i + 1];
                    char out = e == 'n' ? '\n' : e == 't' ? '\t' : e;
                    if (strbuf_put(&b, out)) goto oom;
                    i += 2;
                    continue;
                }
                if (strbuf_put(&b, s[i])) goto oom;
                ++i;
            }
            continue;
        }
        if (c == '=' && !key_done && !quoted_any && b.len > 0) {
            /* key=value when everything before '=' is a name */
            int name = 1;
            for (size_t k = 0; k < b.len; ++k)
                if (!is_name_char(b.data[k])) name = 0;
            if (name) {
                w->key = strbuf_take(&b);
                key_done = 1;
                ++i;
                continue;
            }
        }
        if (strbuf_put(&b, c)) goto oom;
        ++i;
    }
    w->value = strbuf_take(&b);
    w->start = start;
    w->end = i;
    if (!w->value) goto oom;
    return i;
oom:
    free(b.data);
    free(w->key);
    w->key = NULL;
    parse_fail(err, *line, start, "out of memory while parsing the cell");
    return (size_t)-1;
}

static void call_free(cell_call *c) {
    for (int i = 0; i < c->nwords; ++i) {
        free(c->words[i].key);
        free(c->words[i].value);
    }
    free(c->words);
    free(c->name);
    free(c->body);
}

void cell_program_free(cell_program *prog) {
    if (!prog) return;
    for (int i = 0; i < prog->ncalls; ++i)
        call_free(&prog->calls[i]);
    free(prog->calls);
    prog->calls = NULL;
    prog->ncalls = 0;
}

static int program_push(cell_program *prog, const cell_call *c) {
    cell_call *p = realloc(prog->calls, (size_t)(prog->ncalls + 1) * sizeof *p);
    if (!p) return -1;
    prog->calls = p;
    prog->calls[prog->ncalls++] = *c;
    return 0;
}

static int call_push_word(cell_call *c, const cell_word *w) {
    cell_word *p = realloc(c->words, (size_t)(c->nwords + 1) * sizeof *p);
    if (!p) return -1;
    c->words = p;
    c->words[c->nwords++] = *w;
    return 0;
}

/* The text of the offending line, shortened, for messages. */
static void line_excerpt(const char *s, size_t len, size_t i, char *out, size_t outlen) {
    size_t j = i, n = 0;
    while (j < len && s[j] != '\n' && s[j] != '\r' && n + 4 < outlen && n < 40)
        out[n++] = s[j++];
    if (j < len && s[j] != '\n' && s[j] != '\r') {
        out[n++] = '.';
        out[n++] = '.';
        out[n++] = '.';
    }
    out[n] = '\0';
}

int cell_parse(const char *s, size_t len, cell_program *prog, cell_parse_error *err) {
    size_t i = 0;
    int line = 1;
    prog->calls = NULL;
    prog->ncalls = 0;
    while (i < len) {
        i = skip_blanks(s, len, i, &line);
        if (i >= len) break;
        if (s[i] == '\n') {
            ++i;
            ++line;
            continue;
        }
        if (s[i] == '#') { /* comment to the end of the physical line */
            while (i < len && s[i] != '\n')
                ++i;
            continue;
        }
        if (s[i] != '%') {
            char excerpt[64];
            line_excerpt(s, len, i, excerpt, sizeof excerpt);
            parse_fail(err, line, i,
                       "line %d: '%s' is not a magic: each line of a cell is a magic such as "
                       "%%load tiny or %%help, or a # comment",
                       line, excerpt);
            goto fail;
        }
        cell_call call = {0};
        call.start = i;
        call.line = line;
        ++i;
        if (i < len && s[i] == '%') {
            call.is_cell = 1;
            ++i;
        }
        size_t name_start = i;
        while (i < len && is_name_char(s[i]))
            ++i;
        if (i == name_start || (i < len && s[i] != ' ' && s[i] != '\t' && s[i] != '\n' &&
                                s[i] != '\r' && !continuation_len(s, len, i))) {
            char excerpt[64];
            line_excerpt(s, len, call.start, excerpt, sizeof excerpt);
            parse_fail(err, line, call.start,
                       "line %d: '%s' is not a magic name: write %%name (letters, digits, _), "
                       "e.g. %%help",
                       line, excerpt);
            goto fail;
        }
        call.name = strndup(s + name_start, i - name_start);
        if (!call.name) goto oom;
        for (;;) {
            i = skip_blanks(s, len, i, &line);
            if (i >= len || s[i] == '\n' || s[i] == '#') break;
            cell_word w = {0};
            size_t next = read_word(s, len, i, &line, &w, err);
            if (next == (size_t)-1) {
                call_free(&call);
                goto fail;
            }
            if (call_push_word(&call, &w)) {
                free(w.key);
                free(w.value);
                call_free(&call);
                goto oom;
            }
            i = next;
        }
        while (i < len && s[i] != '\n')
            ++i; /* a trailing comment */
        if (call.is_cell) {
            size_t body = i < len ? i + 1 : len;
            call.body = strndup(s + body, len - body);
            if (!call.body || program_push(prog, &call)) {
                call_free(&call);
                goto oom;
            }
            return 0;
        }
        if (program_push(prog, &call)) {
            call_free(&call);
            goto oom;
        }
    }
    return 0;
oom:
    parse_fail(err, line, i, "out of memory while parsing the cell");
fail:
    cell_program_free(prog);
    return -1;
}

int cell_is_incomplete(const char *s, size_t len) {
    /* trailing continuation */
    size_t e = len;
    while (e > 0 && (s[e - 1] == '\n' || s[e - 1] == '\r'))
        --e;
    if (e > 0 && s[e - 1] == '\\' && e < len) return 1;
    if (len > 0 && s[len - 1] == '\\') return 1;
    /* a %%magic whose body has not been ended by an empty line */
    size_t i = 0;
    while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
        ++i;
    if (i + 1 < len && s[i] == '%' && s[i + 1] == '%') {
        if (len < 2) return 1;
        return !(s[len - 1] == '\n' && (len >= 2 && s[len - 2] == '\n'));
    }
    return 0;
}

char *cell_word_at(const char *s, size_t len, size_t pos, size_t *start) {
    if (pos > len) pos = len;
    size_t b = pos;
    while (b > 0 && s[b - 1] != ' ' && s[b - 1] != '\t' && s[b - 1] != '\n' && s[b - 1] != '\r')
        --b;
    *start = b;
    return strndup(s + b, pos - b);
}

char *cell_magic_of_line(const char *s, size_t len, size_t pos) {
    if (pos > len) pos = len;
    size_t b = pos;
    while (b > 0 && s[b - 1] != '\n')
        --b;
    while (b < len && (s[b] == ' ' || s[b] == '\t'))
        ++b;
    if (b >= len || s[b] != '%') return NULL;
    ++b;
    if (b < len && s[b] == '%') ++b;
    size_t e = b;
    while (e < len && is_name_char(s[e]))
        ++e;
    return e > b ? strndup(s + b, e - b) : NULL;
}
