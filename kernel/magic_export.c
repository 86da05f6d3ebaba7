/* magic_export.c — %export_gguf: the loaded model (adapters merged) as one GGUF file for
 * llama.cpp, Ollama and LM Studio, and for a model with an image tower the mmproj file that
 * llama.cpp's multimodal tools load beside it. The engine writes the files
 * (cuda/export/gguf_export.c, mmproj_export.c); this handler validates the paths, shows
 * progress and tells the user how to run the result.
 */
#include <stdio.h>
#include <string.h>

#include "kernel/display.h"
#include "kernel/magic_handlers.h"

typedef struct export_view {
    magic_ctx *ctx;
    progress_bar bar;
    int open;
    char what[32]; /* the open bar's label: "export mmproj", then "export" */
    int64_t done;
} export_view;

static void export_message(void *p, const char *text) {
    export_view *v = p;
    magic_print(v->ctx, "%s\n", text);
}

static void export_progress(void *p, const char *what, int64_t done, int64_t total) {
    export_view *v = p;
    char mib[64];
    if (v->open && strcmp(v->what, what) != 0) { /* the mmproj is written: its bar ends */
        display_bytes(mib, sizeof mib, (double)v->done);
        progress_end(&v->bar, v->bar.total, mib, "done");
        v->open = 0;
    }
    if (!v->open) {
        progress_begin(&v->bar, v->ctx->sink, what, total);
        snprintf(v->what, sizeof v->what, "%s", what);
        v->open = 1;
    }
    display_bytes(mib, sizeof mib, (double)done);
    v->bar.total = total;
    v->done = done;
    progress_update(&v->bar, done, mib, 0);
}

/* mmproj=: auto, none, or a path ending in .gguf. */
static int mmproj_ok(const char *mm) {
    size_t n = mm ? strlen(mm) : 0;
    return !mm || strcmp(mm, "auto") == 0 || strcmp(mm, "none") == 0 ||
           (n >= 6 && strcmp(mm + n - 5, ".gguf") == 0);
}

int magic_export_gguf(magic_ctx *ctx, const magic_args *a) {
    const char *path = a->pos[0];
    const char *mm = arg_str(a, "mmproj");
    size_t n = strlen(path);
    if (n < 6 || strcmp(path + n - 5, ".gguf") != 0)
        return magic_fail(ctx, "CellError",
                          "%%export_gguf: PATH should end in .gguf (got '%s'), e.g. "
                          "%%export_gguf model-q8_0.gguf type=q8_0",
                          path);
    if (!mmproj_ok(mm))
        return magic_fail(
            ctx, "CellError",
            "%%export_gguf: mmproj= should be auto, none or a file name ending in .gguf "
            "(got '%s'), e.g. mmproj=mmproj-model.gguf",
            mm);
    export_view v = {ctx, {0}, 0, "", 0};
    lt_callbacks cb = {&v, export_message, export_progress, NULL};
    lt_export_result res = {0};
    lt_status st = lt_export_gguf(ctx->session, path, arg_str(a, "type"), mm,
                                  arg_bool(a, "overwrite"), &cb, &res);
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
    magic_print(ctx, "wrote %s: %s, %d tensors, type %s%s\n", path, size, res.n_tensors,
                arg_str(a, "type"),
                res.n_fallback ? " (some rows in a fallback type, as llama.cpp does)" : "");
    if (res.mmproj_path[0]) {
        display_bytes(size, sizeof size, (double)res.mmproj_bytes);
        magic_print(ctx,
                    "wrote %s: %s, %d tensors (the image tower and projector)\n"
                    "run them with llama.cpp:  llama-mtmd-cli -m %s --mmproj %s --image IMAGE\n"
                    "or serve them:            llama-server -m %s --mmproj %s\n",
                    res.mmproj_path, size, res.mmproj_tensors, path, res.mmproj_path, path,
                    res.mmproj_path);
    } else {
        magic_print(ctx,
                    "no mmproj file: %s\n"
                    "run it with llama.cpp:  llama-cli -m %s -cnv\n"
                    "or serve it:            llama-server -m %s\n",
                    res.mmproj_note[0] ? res.mmproj_note : "the model has no image tower", path,
                    path);
    }
    return 0;
}
