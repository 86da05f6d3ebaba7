/* run.c — `lathe run FILE|-`: runs a cell script with the same interpreter as the kernel,
 * through a plain-text sink: streams to stdout/stderr, rich outputs as their text/plain,
 * live displays (progress bars) as lines on stderr (redrawn in place on a terminal,
 * throttled to one line every 2 s otherwise, the final state always printed).
 *
 * A script is one cell, or several separated by lines that start with `# %%` (the jupytext
 * "percent" format, so a notebook exported as a script runs as it is). The first failing
 * cell stops the run with exit status 1. SIGINT interrupts the running cell.
 *
 * Also `lathe logits`, which writes one sequence's fp32 logits as a NumPy .npy file (with
 * --image FILE, the sequence's image blocks take that image through the model's tower).
 */
#include "kernel/run.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "cuda/engine.h"
#include "kernel/display.h"
#include "kernel/interp.h"

/* ---- the plain-text sink ---------------------------------------------------------------- */

typedef struct text_sink {
    int tty;             /* stderr is a terminal: redraw progress in place */
    int stdin_is_script; /* `lathe run -`: input comes from /dev/tty */
    char pending_id[64]; /* a live display whose newest text is not printed yet */
    char *pending_text;
    double last_print;
    int line_open; /* a \r-redrawn line is on the terminal */
} text_sink;

static void sink_close_line(text_sink *t) {
    if (t->line_open) {
        fputc('\n', stderr);
        t->line_open = 0;
    }
}

static void sink_flush_pending(text_sink *t) {
    if (t->pending_text) {
        fprintf(stderr, "%s\n", t->pending_text);
        free(t->pending_text);
        t->pending_text = NULL;
        t->last_print = display_now();
    }
    t->pending_id[0] = '\0';
}

static void text_stream(void *ctx, const char *name, const char *text) {
    text_sink *t = ctx;
    sink_close_line(t);
    sink_flush_pending(t);
    FILE *f = strcmp(name, "stderr") == 0 ? stderr : stdout;
    fputs(text, f);
    fflush(f);
}

static const char *plain_of(json_t *data) {
    const char *s = json_string_value(json_object_get(data, "text/plain"));
    return s ? s : "";
}

static void text_display(void *ctx, json_t *data, json_t *metadata, const char *display_id,
                         int update) {
    (void)metadata;
    text_sink *t = ctx;
    const char *text = plain_of(data);
    if (!display_id) {
        text_stream(ctx, "stdout", text);
        if (*text && text[strlen(text) - 1] != '\n') text_stream(ctx, "stdout", "\n");
        return;
    }
    /* a live display: progress on stderr */
    char line[1024];
    snprintf(line, sizeof line, "%s", text);
    char *nl = strchr(line, '\n');
    if (nl) *nl = '\0';
    if (t->tty) {
        fprintf(stderr, "\r\x1b[K%s", line);
        fflush(stderr);
        t->line_open = 1;
        return;
    }
    if (strcmp(t->pending_id, display_id) != 0) sink_flush_pending(t);
    if (!update || display_now() - t->last_print >= 2.0) {
        free(t->pending_text);
        t->pending_text = NULL;
        fprintf(stderr, "%s\n", line);
        t->last_print = display_now();
        snprintf(t->pending_id, sizeof t->pending_id, "%s", display_id);
        return;
    }
    free(t->pending_text);
    t->pending_text = strdup(line);
    snprintf(t->pending_id, sizeof t->pending_id, "%s", display_id);
}

static void text_result(void *ctx, json_t *data, json_t *metadata) {
    text_display(ctx, data, metadata, NULL, 0);
}

static int text_input(void *ctx, const char *prompt, int password, char **value) {
    (void)password;
    text_sink *t = ctx;
    sink_close_line(t);
    FILE *in = t->stdin_is_script ? fopen("/dev/tty", "r") : stdin;
    if (!in) return -1;
    fprintf(stderr, "%s", prompt);
    fflush(stderr);
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, in);
    if (in != stdin) fclose(in);
    if (n < 0) {
        free(line);
        return -1;
    }
    if (n > 0 && line[n - 1] == '\n') line[n - 1] = '\0';
    *value = line;
    return 0;
}

/* ---- the script ------------------------------------------------------------------------- */

static interp *run_interp; /* for the SIGINT handler */

static void run_on_sigint(int sig) {
    (void)sig;
    if (run_interp) interp_interrupt(run_interp);
}

static char *read_all(FILE *f, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    if (!buf) return NULL;
    for (;;) {
        if (n == cap) {
            char *p = realloc(buf, cap *= 2);
            if (!p) {
                free(buf);
                return NULL;
            }
            buf = p;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
    }
    if (ferror(f)) {
        free(buf);
        return NULL;
    }
    *len = n;
    return buf;
}

/* Offset of the next "# %%" line at or after pos (a line start), or len. */
static size_t next_cell_mark(const char *s, size_t len, size_t pos) {
    for (size_t i = pos; i < len;) {
        if (len - i >= 4 && strncmp(s + i, "# %%", 4) == 0) return i;
        const char *nl = memchr(s + i, '\n', len - i);
        if (!nl) break;
        i = (size_t)(nl - s) + 1;
    }
    return len;
}

static int print_error(interp_error *err) {
    size_t n = json_array_size(err->traceback);
    for (size_t i = 0; i < n; ++i)
        fprintf(stderr, "%s\n", json_string_value(json_array_get(err->traceback, i)));
    if (n == 0) fprintf(stderr, "%s: %s\n", err->ename, err->evalue);
    return 1;
}

int run_main(int argc, char **argv) {
    if (argc != 1) {
        fprintf(stderr,
                "usage: lathe run FILE|-   (cells separated by lines starting with # %%%%)\n");
        return 2;
    }
    int from_stdin = strcmp(argv[0], "-") == 0;
    FILE *f = from_stdin ? stdin : fopen(argv[0], "rb");
    if (!f) {
        fprintf(stderr, "lathe run: cannot open %s: %s\n", argv[0], strerror(errno));
        return 1;
    }
    size_t len = 0;
    char *script = read_all(f, &len);
    if (!from_stdin) fclose(f);
    if (!script) {
        fprintf(stderr, "lathe run: cannot read %s\n", argv[0]);
        return 1;
    }
    interp *in = interp_new();
    if (!in) {
        fprintf(stderr, "lathe run: out of memory\n");
        free(script);
        return 1;
    }
    run_interp = in;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = run_on_sigint;
    sigaction(SIGINT, &sa, NULL);

    text_sink t = {0};
    t.tty = isatty(2);
    t.stdin_is_script = from_stdin;
    lt_sink sink = {&t, text_stream, text_display, text_result, text_input, NULL};
    int status = 0;
    size_t pos = 0;
    while (pos < len && status == 0) {
        size_t start = pos;
        if (len - pos >= 4 && strncmp(script + pos, "# %%", 4) == 0) {
            const char *nl = memchr(script + pos, '\n', len - pos);
            start = nl ? (size_t)(nl - script) + 1 : len;
        }
        size_t end = next_cell_mark(script, len, start);
        interp_error err;
        if (interp_execute(in, script + start, end - start, &sink, &err)) {
            sink_close_line(&t);
            sink_flush_pending(&t);
            status = print_error(&err);
        }
        interp_error_clear(&err);
        sink_close_line(&t);
        sink_flush_pending(&t);
        pos = end;
    }
    run_interp = NULL;
    interp_free(in);
    free(script);
    return status;
}

/* ---- lathe logits ----------------------------------------------------------------------- */

/* Writes a float32 [rows, cols] array as NumPy .npy (format 1.0). */
static int write_npy(const char *path, const float *x, int rows, int cols) {
    char header[128];
    int n = snprintf(header, sizeof header,
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }", rows, cols);
    int total = 10 + n + 1;
    int pad = (64 - total % 64) % 64;
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    unsigned short hlen = (unsigned short)(n + pad + 1);
    fwrite("\x93NUMPY\x01\x00", 1, 8, f);
    fputc(hlen & 0xff, f);
    fputc(hlen >> 8, f);
    fwrite(header, 1, (size_t)n, f);
    for (int i = 0; i < pad; ++i)
        fputc(' ', f);
    fputc('\n', f);
    size_t count = (size_t)rows * (size_t)cols;
    int bad = fwrite(x, sizeof(float), count, f) != count;
    if (fclose(f) || bad) return -1;
    return 0;
}

/* One of %load's options given as key=value after MODEL: 0 when it is one, 1 when it is one
 * with a value that is not a number, -1 when it is none. */
static int logits_option(const char *arg, lt_load_opts *o) {
    const char *eq = strchr(arg, '=');
    size_t k = eq ? (size_t)(eq - arg) : 0;
    if (!eq) return -1;
    if (k == 5 && !strncmp(arg, "dtype", k))
        o->dtype = eq + 1;
    else if (k == 6 && !strncmp(arg, "device", k))
        o->device = eq + 1;
    else if (k == 5 && !strncmp(arg, "quant", k))
        o->quant = eq + 1;
    else if (k == 10 && !strncmp(arg, "quant_keep", k)) {
        char *end;
        errno = 0;
        double v = strtod(eq + 1, &end);
        if (end == eq + 1 || *end || errno) return 1; /* a bad value */
        o->quant_keep = (float)v;
    } else if (k == 7 && !strncmp(arg, "max_seq", k))
        o->max_seq = atoi(eq + 1);
    else
        return -1;
    return 0;
}

int logits_main(int argc, char **argv) {
    const char *model = NULL, *ids_text = NULL, *out = NULL;
    const char *images[16];
    int n_images = 0;
    lt_load_opts opts;
    lt_load_opts_default(&opts);
    for (int i = 0; i < argc; ++i) {
        if (!strcmp(argv[i], "--ids") && i + 1 < argc)
            ids_text = argv[++i];
        else if (!strcmp(argv[i], "--out") && i + 1 < argc)
            out = argv[++i];
        else if (!strcmp(argv[i], "--image") && i + 1 < argc) {
            if (n_images == (int)(sizeof images / sizeof *images)) {
                fprintf(stderr, "lathe logits: at most %d --image files\n", n_images);
                return 2;
            }
            images[n_images++] = argv[++i];
        } else if (!strcmp(argv[i], "--dtype") && i + 1 < argc)
            opts.dtype = argv[++i];
        else if (argv[i][0] != '-' && model && strchr(argv[i], '=')) {
            int bad = logits_option(argv[i], &opts);
            if (bad > 0) {
                fprintf(stderr, "lathe logits: '%s': the value is not a number\n", argv[i]);
                return 2;
            }
            if (bad) {
                fprintf(stderr,
                        "lathe logits: unknown option '%s' (accepted: dtype=, device=, "
                        "quant=, quant_keep=NUMBER, max_seq=, as %%load takes them)\n",
                        argv[i]);
                return 2;
            }
        } else if (argv[i][0] != '-' && !model)
            model = argv[i];
        else {
            fprintf(stderr, "lathe logits: unexpected argument '%s'\n", argv[i]);
            model = NULL;
            break;
        }
    }
    if (!model || !ids_text || !out) {
        fprintf(stderr, "usage: lathe logits MODEL [dtype=auto|fp32|fp16|bf16] "
                        "[device=auto|cpu|cuda] [quant=none|nf4|int8|dynamic] [quant_keep=0.1] "
                        "[--image FILE.png|FILE.jpg ...] --ids 2,17,... --out FILE.npy\n"
                        "  (with --image, the ids carry one image block per image: "
                        "<start_of_image>, mm_tokens_per_image image tokens, <end_of_image>)\n");
        return 2;
    }
    int cap = 16, n = 0;
    int32_t *ids = malloc(sizeof *ids * (size_t)cap);
    for (const char *p = ids_text; ids && *p;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX || (*end && *end != ',')) {
            fprintf(stderr, "lathe logits: --ids must be comma-separated token ids, got '%s'\n",
                    ids_text);
            free(ids);
            return 2;
        }
        if (n == cap) {
            int32_t *q = realloc(ids, sizeof *ids * (size_t)(cap *= 2));
            if (!q) break;
            ids = q;
        }
        ids[n++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (!ids || n == 0) {
        fprintf(stderr, "lathe logits: no ids given\n");
        free(ids);
        return 2;
    }
    lt_session *s = lt_session_new();
    lt_status st = s ? lt_load(s, model, &opts, NULL) : LT_ERR_MEMORY;
    float *logits = NULL;
    int vocab = 0;
    if (st == LT_OK && n_images)
        st = lt_logits_image(s, ids, n, images, n_images, NULL, &logits, &vocab);
    else if (st == LT_OK)
        st = lt_logits(s, ids, n, &logits, &vocab);
    int rc = 0;
    if (st != LT_OK) {
        fprintf(stderr, "lathe logits: %s\n", s ? lt_last_error(s) : "out of memory");
        rc = 1;
    } else if (write_npy(out, logits, n, vocab)) {
        fprintf(stderr, "lathe logits: cannot write %s: %s\n", out, strerror(errno));
        rc = 1;
    }
    free(logits);
    free(ids);
    lt_session_free(s);
    return rc;
}
