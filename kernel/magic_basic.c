/* magic_basic.c — the magics that need no model: %help, %echo, %input, %version, %clear,
 * %sleep.
 * %sleep is the reference for every long-running magic: a live progress bar updated in
 * place and an interrupt honoured within half a second.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "config.h"
#include "kernel/display.h"
#include "kernel/magic_handlers.h"

int magic_help(magic_ctx *ctx, const magic_args *a) {
    if (a->npos == 0) {
        char *text = magics_table_text(), *html = magics_table_html();
        if (text && html) display_html(ctx->sink, html, text, NULL, 0);
        free(text);
        free(html);
        return 0;
    }
    const char *name = a->pos[0];
    while (*name == '%')
        ++name;
    const magic_spec *m = magics_find(name);
    if (!m)
        return magic_fail(ctx, "CellError", "%%help: no magic named '%s'; %%help lists them", name);
    char *text = magic_help_text(m), *html = magic_help_html(m);
    if (text && html) display_html(ctx->sink, html, text, NULL, 0);
    free(text);
    free(html);
    return 0;
}

int magic_echo(magic_ctx *ctx, const magic_args *a) {
    strbuf_t b;
    sb_init(&b);
    for (int i = 0; i < a->npos; ++i)
        sb_printf(&b, "%s%s", i ? " " : "", a->pos[i]);
    sb_printf(&b, "\n");
    char *text = sb_take(&b);
    if (!text) return magic_fail(ctx, "MemoryError", "out of memory");
    int err = strcmp(arg_str(a, "stream"), "stderr") == 0;
    if (arg_bool(a, "fd")) {
        for (size_t off = 0, len = strlen(text); off < len;) {
            ssize_t w = write(err ? 2 : 1, text + off, len - off);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) {
                int e = errno;
                free(text);
                return magic_fail(ctx, "OSError", "%%echo: cannot write to fd %d: %s", err ? 2 : 1,
                                  strerror(e));
            }
            off += (size_t)w;
        }
    } else if (ctx->sink->stream) {
        ctx->sink->stream(ctx->sink->ctx, err ? "stderr" : "stdout", text);
    }
    free(text);
    return 0;
}

int magic_input(magic_ctx *ctx, const magic_args *a) {
    char *value = NULL;
    const char *prompt = a->npos ? a->pos[0] : "";
    if (!ctx->sink->input ||
        ctx->sink->input(ctx->sink->ctx, prompt, arg_bool(a, "password"), &value) != 0) {
        if (*ctx->interrupted)
            return magic_fail(ctx, "KeyboardInterrupt", "interrupted while waiting for input");
        return magic_fail(ctx, "StdinNotImplementedError",
                          "%%input: this front end does not accept input (allow_stdin is off)");
    }
    magic_print(ctx, "%s\n", value);
    free(value);
    return 0;
}

int magic_version(magic_ctx *ctx, const magic_args *a) {
    (void)a;
    json_t *data = json_pack("{s:s}", "text/plain", PACKAGE_STRING);
    json_t *meta = json_object();
    if (data && meta && ctx->sink->result) ctx->sink->result(ctx->sink->ctx, data, meta);
    json_decref(data);
    json_decref(meta);
    return 0;
}

int magic_clear(magic_ctx *ctx, const magic_args *a) {
    if (ctx->sink->clear) ctx->sink->clear(ctx->sink->ctx, arg_bool(a, "wait"));
    return 0;
}

int magic_sleep(magic_ctx *ctx, const magic_args *a) {
    double seconds = strtod(a->pos[0], NULL); /* range-checked by the table */
    progress_bar bar;
    int64_t total_ms = (int64_t)(seconds * 1000 + 0.5);
    progress_begin(&bar, ctx->sink, "sleep", total_ms);
    double t0 = display_now();
    for (;;) {
        int64_t done = (int64_t)((display_now() - t0) * 1000);
        if (done >= total_ms) break;
        if (*ctx->interrupted) {
            progress_end(&bar, done, NULL, "interrupted");
            return magic_fail(ctx, "KeyboardInterrupt", "%%sleep interrupted after %.1f s",
                              (double)done / 1000);
        }
        progress_update(&bar, done, NULL, 0);
        int64_t left = total_ms - done;
        struct timespec ts = {0, (left < 50 ? left : 50) * 1000000L};
        nanosleep(&ts, NULL);
    }
    progress_end(&bar, total_ms, NULL, "done");
    return 0;
}
