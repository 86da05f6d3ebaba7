/* magic_export.c — %export_gguf: the loaded model (adapters merged) as one GGUF file for
 * llama.cpp, Ollama and LM Studio. The engine writes the file (cuda/gguf_export.c); this
 * handler validates the path, shows progress and tells the user how to run the result.
 */
#include <stdio.h>
#include <string.h>

#include "kernel/display.h"
#include "kernel/magic_handlers.h"

typedef struct export_view {
    magic_ctx *ctx;
    progress_bar bar;
    int open;
} export_view;

static void export_message(void *p, const char *text) {
    export_view *v = p;
    magic_print(v->ctx, "%s\n", text);
}

static void export_progress(void *p, const char *what, int64_t done, int64_t total) {
    export_view *v = p;
    if (!v->open) {
        progress_begin(&v->bar, v->ctx->sink, what, total);
        v->open = 1;
    }
    char mib[64];
    display_bytes(mib, sizeof mib, (double)done);
    v->bar.total = total;
    progress_update(&v->bar, done, mib, 0);
}

int magic_export_gguf(magic_ctx *ctx, const magic_args *a) {
    const char *path = a->pos[0];
    size_t n = strlen(path);
    if (n < 6 || strcmp(path + n - 5, ".gguf") != 0)
        return magic_fail(ctx, "CellError",
                          "%%export_gguf: PATH should end in .gguf (got '%s'), e.g. "
                          "%%export_gguf model-q8_0.gguf type=q8_0",
                          path);
    export_view v = {ctx, {0}, 0};
    lt_callbacks cb = {&v, export_message, export_progress, NULL};
    lt_export_result res = {0};
    lt_status st =
        lt_export_gguf(ctx->session, path, arg_str(a, "type"), arg_bool(a, "overwrite"), &cb, &res);
    if (v.open) {
        char size[64];
        display_bytes(size, sizeof size, (double)res.bytes);
        progress_end(&v.bar, st == LT_OK ? v.bar.total : 0, st == LT_OK ? size : NULL,
                     st == LT_OK          ? "done"
                     : st == LT_CANCELLED ? "interrupted"
                                          : "failed");
    }
    if (st != LT_OK) return magic_fail_engine(ctx, st);
    char size[64];
    display_bytes(size, sizeof size, (double)res.bytes);
    magic_print(ctx,
                "wrote %s: %s, %d tensors, type %s%s\n"
                "run it with llama.cpp:  llama-cli -m %s -cnv\n"
                "or serve it:            llama-server -m %s\n",
                path, size, res.n_tensors, arg_str(a, "type"),
                res.n_fallback ? " (some rows in a fallback type, as llama.cpp does)" : "", path,
                path);
    return 0;
}
