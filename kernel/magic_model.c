/* magic_model.c — the magics that load and run a model: %load, %status, %generate, %%chat.
 * They translate options into engine calls (cuda/engine.h) and engine callbacks into sink
 * output; the engine does the work and owns the model.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "kernel/display.h"
#include "kernel/magic_handlers.h"

/* ---- engine callbacks -> sink ----------------------------------------------------------- */

typedef struct engine_view {
    magic_ctx *ctx;
    progress_bar bar;
    int bar_open;
    char bar_what[64];
} engine_view;

/* Engine notes ("loading tokenizer", the memory plan) are information, not errors: stdout,
 * which front ends do not paint as an error. */
static void view_message(void *p, const char *text) {
    engine_view *v = p;
    magic_print(v->ctx, "%s\n", text);
}

static void view_progress(void *p, const char *what, int64_t done, int64_t total) {
    engine_view *v = p;
    if (!v->bar_open || strcmp(v->bar_what, what) != 0) {
        if (v->bar_open) progress_end(&v->bar, v->bar.total, NULL, "done");
        snprintf(v->bar_what, sizeof v->bar_what, "%s", what);
        progress_begin(&v->bar, v->ctx->sink, what, total);
        v->bar_open = 1;
    }
    v->bar.total = total;
    progress_update(&v->bar, done, NULL, done == total);
}

static void view_text(void *p, const char *piece) {
    engine_view *v = p;
    if (*piece) magic_print(v->ctx, "%s", piece);
}

static lt_callbacks view_callbacks(engine_view *v, magic_ctx *ctx) {
    memset(v, 0, sizeof *v);
    v->ctx = ctx;
    lt_callbacks cb = {v, view_message, view_progress, view_text};
    return cb;
}

static void view_close(engine_view *v, lt_status st) {
    if (v->bar_open)
        progress_end(&v->bar, v->bar.total, NULL,
                     st == LT_OK          ? "done"
                     : st == LT_CANCELLED ? "interrupted"
                                          : "failed");
}

/* ---- %load / %status -------------------------------------------------------------------- */

/* One row of the summary, in the text and the HTML table. */
static void summary_row(strbuf_t *text, strbuf_t *html, const char *label, const char *value) {
    sb_printf(text, "%-18s %s\n", label, value);
    sb_printf(html, "<tr><td>");
    sb_html(html, label);
    sb_printf(html, "</td><td>");
    sb_html(html, value);
    sb_printf(html, "</td></tr>");
}

static int by_score(const void *a, const void *b) {
    const lt_quant_module *x = a, *y = b;
    return (x->score < y->score) - (x->score > y->score); /* worst first */
}

/* quant=dynamic: what it kept in 16 bits and why (the two errors of each kept linear, worst
 * first, against the median of the quantized ones). */
static void dynamic_rows(magic_ctx *ctx, strbuf_t *text, strbuf_t *html) {
    lt_quant_info qi;
    lt_quant_info_get(ctx->session, &qi, NULL, 0);
    if (!qi.dynamic) return;
    lt_quant_module *mods = calloc((size_t)(qi.n_modules > 0 ? qi.n_modules : 1), sizeof *mods);
    if (!mods) return;
    lt_quant_info_get(ctx->session, &qi, mods, qi.n_modules);
    char line[320];
    snprintf(line, sizeof line,
             "%d of %d linears kept in 16 bits, %.1f%% of the linear parameters (quant_keep=%g), "
             "chosen by their quantization errors on %d calibration tokens",
             qi.n_kept, qi.n_modules,
             qi.linear_params ? 100.0 * (double)qi.kept_params / (double)qi.linear_params : 0.0,
             qi.keep, qi.n_calib);
    summary_row(text, html, "quant=dynamic", line);
    int k = 0;
    for (int i = 0; i < qi.n_modules; i++)
        if (mods[i].kept) mods[k++] = mods[i];
    qsort(mods, (size_t)k, sizeof *mods, by_score);
    for (int i = 0; i < k; i++) {
        snprintf(line, sizeof line, "%s: weight error %.3g, output error %.3g (score %.2f)",
                 mods[i].name, mods[i].weight_error, mods[i].output_error, mods[i].score);
        summary_row(text, html, "  kept in 16 bits", line);
    }
    snprintf(line, sizeof line, "weight error %.3g, output error %.3g (median of %d)",
             qi.median_weight_error, qi.median_output_error, qi.n_modules - qi.n_kept);
    summary_row(text, html, "  quantized", line);
    free(mods);
}

static void model_summary(magic_ctx *ctx, int with_title) {
    lt_model_info info;
    lt_model_info_get(ctx->session, &info);
    strbuf_t text, html;
    sb_init(&text);
    sb_init(&html);
    if (!info.loaded) {
        sb_printf(&text, "%s\nmodel: none loaded (%%load tiny, or %%help load)\n", PACKAGE_STRING);
        sb_printf(&html, "<p>%s &middot; no model loaded (<code>%%load tiny</code>)</p>",
                  PACKAGE_STRING);
    } else {
        char mem[32], params[32];
        display_bytes(mem, sizeof mem, (double)info.weight_bytes);
        if (info.n_params >= 1000000000)
            snprintf(params, sizeof params, "%.2fB", info.n_params / 1e9);
        else
            snprintf(params, sizeof params, "%.2fM", info.n_params / 1e6);
        const char *rows[][2] = {
            {"source", info.source},
            {"architecture", info.arch},
            {"device", info.device},
            {"dtype", info.dtype},
            {"quantization", info.quant[0] ? info.quant : "none"},
            {"parameters", params},
            {"weights in memory", mem},
        };
        char shape[256];
        snprintf(shape, sizeof shape,
                 "%d layers, hidden %d, %d heads x %d (kv %d), mlp %d, vocab %d, window %d, "
                 "max_seq %d",
                 info.n_layers, info.hidden, info.n_heads, info.head_dim, info.n_kv_heads,
                 info.intermediate, info.vocab, info.sliding_window, info.max_seq);
        if (with_title) sb_printf(&text, "%s\n", PACKAGE_STRING);
        sb_printf(&html, "<table>");
        for (size_t i = 0; i < sizeof rows / sizeof rows[0]; ++i) {
            sb_printf(&text, "%-18s %s\n", rows[i][0], rows[i][1]);
            sb_printf(&html, "<tr><td>%s</td><td><code>", rows[i][0]);
            sb_html(&html, rows[i][1]);
            sb_printf(&html, "</code></td></tr>");
        }
        dynamic_rows(ctx, &text, &html);
        sb_printf(&text, "%-18s %s\n", "shape", shape);
        sb_printf(&html, "<tr><td>shape</td><td>");
        sb_html(&html, shape);
        sb_printf(&html, "</td></tr>");
        lt_lora_info lora;
        lt_lora_info_get(ctx->session, &lora);
        char adapters[512] = "none (%lora attaches LoRA adapters)";
        if (lora.attached && lora.full)
            snprintf(adapters, sizeof adapters, "full fine-tuning: %.2fM trainable, %d steps done",
                     lora.n_trainable / 1e6, lora.steps_done);
        else if (lora.attached)
            snprintf(adapters, sizeof adapters,
                     "LoRA r=%d alpha=%g%s dropout=%g on %d modules (%s): %.2fM trainable, "
                     "%d steps done",
                     lora.r, lora.alpha, lora.rslora ? " rslora" : "", lora.dropout, lora.n_modules,
                     lora.targets, lora.n_trainable / 1e6, lora.steps_done);
        sb_printf(&text, "%-18s %s\n", "adapters", adapters);
        sb_printf(&html, "<tr><td>adapters</td><td>");
        sb_html(&html, adapters);
        sb_printf(&html, "</td></tr>");
        if (info.gpu_total > 0) {
            char used[32], peak[32], total[32], gpu[128];
            display_bytes(used, sizeof used, (double)info.gpu_in_use);
            display_bytes(peak, sizeof peak, (double)info.gpu_peak);
            display_bytes(total, sizeof total, (double)info.gpu_total);
            snprintf(gpu, sizeof gpu, "%s in use, %s at peak, of %s", used, peak, total);
            sb_printf(&text, "%-18s %s\n", "GPU memory", gpu);
            sb_printf(&html, "<tr><td>GPU memory</td><td>%s</td></tr>", gpu);
        }
        if (info.vision_loaded) {
            char tower[320];
            snprintf(tower, sizeof tower,
                     "SigLIP %d x %d images, patch %d, %d layer%s, hidden %d, %d heads, MLP %d, "
                     "%d tokens an image (mm_tokens_per_image); %.2fM parameters (with the "
                     "projector), %s on %s",
                     info.vision_image_size, info.vision_image_size, info.vision_patch_size,
                     info.vision_layers, info.vision_layers == 1 ? "" : "s", info.vision_hidden,
                     info.vision_heads, info.vision_intermediate, info.vision_mm_tokens,
                     info.vision_params / 1e6, info.vision_dtype, info.vision_device);
            sb_printf(&text, "%-18s %s\n", "image tower", tower);
            sb_printf(&html, "<tr><td>image tower</td><td>");
            sb_html(&html, tower);
            sb_printf(&html, "</td></tr>");
            char note[200];
            snprintf(note, sizeof note,
                     "images: %%%%chat image=FILE [pan_and_scan=true] (%d tokens an image, and "
                     "as many again per pan-and-scan crop)",
                     info.image_tokens);
            sb_printf(&text, "%-18s %s\n", "note", note);
            sb_printf(&html, "<tr><td>note</td><td>%s</td></tr>", note);
        } else if (info.skipped_vision) {
            char note[320];
            snprintf(note, sizeof note, "text only: the image tower was not loaded (%s)",
                     info.vision_note);
            sb_printf(&text, "%-18s %s\n", "note", note);
            sb_printf(&html, "<tr><td>note</td><td>");
            sb_html(&html, note);
            sb_printf(&html, "</td></tr>");
        }
        sb_printf(&html, "</table>");
    }
    char *t = sb_take(&text), *h = sb_take(&html);
    if (t && h) display_html(ctx->sink, h, t, NULL, 0);
    free(t);
    free(h);
}

int magic_load(magic_ctx *ctx, const magic_args *a) {
    /* precision= is the GPU's name for dtype= (the frozen weights' type is the matmul type) */
    const char *dtype = arg_str(a, "dtype"), *precision = arg_str(a, "precision");
    if (arg_given(a, "precision") && arg_given(a, "dtype") && strcmp(dtype, precision) != 0)
        return magic_fail(ctx, "CellError",
                          "%%load: dtype=%s and precision=%s disagree; give one of them", dtype,
                          precision);
    if (arg_given(a, "precision")) dtype = precision;
    lt_load_opts opts;
    lt_load_opts_default(&opts);
    opts.dtype = dtype;
    opts.device = arg_str(a, "device");
    opts.max_seq = (int)arg_int(a, "max_seq");
    opts.quant = arg_str(a, "quant");
    opts.quant_keep = (float)arg_float(a, "quant_keep");
    if (arg_given(a, "quant_keep") && strcmp(opts.quant, "dynamic") != 0)
        return magic_fail(ctx, "CellError",
                          "%%load: quant_keep= applies to quant=dynamic only (it is the most "
                          "quant=dynamic keeps in 16 bits); add quant=dynamic or leave it out");
    engine_view v;
    lt_callbacks cb = view_callbacks(&v, ctx);
    lt_status st = lt_load(ctx->session, a->pos[0], &opts, &cb);
    view_close(&v, st);
    if (st != LT_OK) return magic_fail_engine(ctx, st);
    model_summary(ctx, 0);
    return 0;
}

int magic_status(magic_ctx *ctx, const magic_args *a) {
    (void)a;
    model_summary(ctx, 1);
    return 0;
}

/* ---- %generate / %%chat ----------------------------------------------------------------- */

static void gen_opts_from(const magic_args *a, lt_gen_opts *o) {
    lt_gen_opts_default(o);
    o->max_new = (int)arg_int(a, "max_new");
    o->temperature = (float)arg_float(a, "temperature");
    o->top_k = (int)arg_int(a, "top_k");
    o->top_p = (float)arg_float(a, "top_p");
    o->min_p = (float)arg_float(a, "min_p");
    o->seed = (uint64_t)arg_int(a, "seed");
}

int magic_generate(magic_ctx *ctx, const magic_args *a) {
    lt_gen_opts o;
    gen_opts_from(a, &o);
    engine_view v;
    lt_callbacks cb = view_callbacks(&v, ctx);
    lt_status st = lt_generate(ctx->session, a->pos[0], &o, &cb, NULL);
    magic_print(ctx, "\n");
    if (st != LT_OK) return magic_fail_engine(ctx, st);
    return 0;
}

#define MAX_CHAT_IMAGES 64 /* image= files in one message */

int magic_chat(magic_ctx *ctx, const magic_args *a) {
    if (a->npos == 1) {
        if (strcmp(a->pos[0], "reset") != 0)
            return magic_fail(ctx, "CellError",
                              "%%%%chat: unexpected word '%s'; the only word it takes is reset",
                              a->pos[0]);
        lt_chat_reset(ctx->session);
    }
    if (arg_given(a, "system")) {
        const char *sys = arg_str(a, "system");
        lt_status st = lt_chat_system(ctx->session, *sys ? sys : NULL);
        if (st != LT_OK) return magic_fail_engine(ctx, st);
    }
    /* the body, trimmed */
    const char *body = a->body ? a->body : "";
    while (*body == '\n' || *body == ' ' || *body == '\t' || *body == '\r')
        ++body;
    size_t n = strlen(body);
    while (n > 0 && (body[n - 1] == '\n' || body[n - 1] == ' ' || body[n - 1] == '\r'))
        --n;
    const char *image = arg_given(a, "image") ? arg_str(a, "image") : NULL;
    if (n == 0 && !(image && *image)) {
        if (a->npos == 1) {
            magic_print(ctx, "conversation reset\n");
            return 0;
        }
        return magic_fail(ctx, "CellError",
                          "%%%%chat: the cell body is your message and it is empty; write it "
                          "on the lines after %%%%chat");
    }
    /* image=A,B: the files, split at the commas */
    char *list = image ? strdup(image) : NULL;
    const char *files[MAX_CHAT_IMAGES];
    int n_files = 0;
    if (image && !list) return magic_fail(ctx, "MemoryError", "out of memory");
    for (char *p = list, *e; p; p = e ? e + 1 : NULL) {
        e = strchr(p, ',');
        if (e) *e = 0;
        if (!*p) {
            free(list);
            return magic_fail(ctx, "CellError",
                              "%%%%chat: image= has an empty file name; write "
                              "image=FILE or image=FILE,FILE");
        }
        if (n_files == MAX_CHAT_IMAGES) {
            free(list);
            return magic_fail(ctx, "CellError", "%%%%chat: image= takes at most %d files",
                              MAX_CHAT_IMAGES);
        }
        files[n_files++] = p;
    }
    char *msg = strndup(body, n);
    if (!msg) {
        free(list);
        return magic_fail(ctx, "MemoryError", "out of memory");
    }
    lt_gen_opts o;
    gen_opts_from(a, &o);
    lt_image_opts io;
    lt_image_opts_default(&io);
    io.pan_and_scan = arg_bool(a, "pan_and_scan");
    io.pan_and_scan_min_crop_size = (int)arg_int(a, "pan_and_scan_min_crop_size");
    io.pan_and_scan_max_num_crops = (int)arg_int(a, "pan_and_scan_max_num_crops");
    io.pan_and_scan_min_ratio_to_activate = arg_float(a, "pan_and_scan_min_ratio_to_activate");
    if (io.pan_and_scan && n_files == 0) {
        free(msg);
        free(list);
        return magic_fail(ctx, "CellError",
                          "%%%%chat: pan_and_scan=true crops the images of image=, and this "
                          "message has none; add image=FILE or leave pan_and_scan out");
    }
    engine_view v;
    lt_callbacks cb = view_callbacks(&v, ctx);
    lt_status st = lt_chat_images(ctx->session, msg, files, n_files, &io, &o, &cb, NULL);
    free(msg);
    free(list);
    magic_print(ctx, "\n");
    if (st != LT_OK) return magic_fail_engine(ctx, st);
    return 0;
}
