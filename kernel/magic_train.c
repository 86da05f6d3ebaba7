/* magic_train.c — the fine-tuning magics: %lora (attach adapters), %train (supervised
 * fine-tuning with a live progress bar and loss curve) and %save (PEFT adapter, merged
 * checkpoint, or the quantized base as a bitsandbytes checkpoint). They translate options into
 * engine calls (lt_lora_attach, lt_train, lt_save_*) and engine reports into sink output; the
 * engine does the work.
 *
 * %train shows two displays updated in place: a progress bar (step/total, loss, lr,
 * tokens/s, elapsed, ETA) and an SVG loss curve, each with a text/plain fallback, then a
 * summary. Must not reach past the sink.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernel/display.h"
#include "kernel/magic_handlers.h"

static void say_line(void *p, const char *text) {
    magic_ctx *ctx = p;
    magic_print(ctx, "%s\n", text);
}

static void fmt_count(char *out, size_t n, int64_t v) {
    if (v >= 1000000000)
        snprintf(out, n, "%.2fB", v / 1e9);
    else if (v >= 1000000)
        snprintf(out, n, "%.2fM", v / 1e6);
    else if (v >= 1000)
        snprintf(out, n, "%.1fK", v / 1e3);
    else
        snprintf(out, n, "%lld", (long long)v);
}

/* ---- %lora ------------------------------------------------------------------------------------
 */

int magic_lora(magic_ctx *ctx, const magic_args *a) {
    lt_lora_opts o;
    lt_lora_opts_default(&o);
    o.r = (int)arg_int(a, "r");
    o.alpha = (float)arg_float(a, "alpha");
    o.dropout = (float)arg_float(a, "dropout");
    o.rslora = arg_bool(a, "rslora");
    o.seed = (uint64_t)arg_int(a, "seed");
    o.targets = arg_str(a, "targets");
    o.full = arg_bool(a, "full");
    o.load = arg_str(a, "load");
    if (o.full && o.load && *o.load)
        return magic_fail(ctx, "CellError",
                          "%%lora: full=true and load= exclude each other (load= reads a "
                          "PEFT adapter; full=true trains every weight)");
    lt_callbacks cb = {ctx, say_line, NULL, NULL};
    lt_status st = lt_lora_attach(ctx->session, &o, &cb);
    if (st != LT_OK) return magic_fail_engine(ctx, st);
    lt_lora_info info;
    lt_lora_info_get(ctx->session, &info);
    char tr[32], tot[32];
    fmt_count(tr, sizeof tr, info.n_trainable);
    fmt_count(tot, sizeof tot, info.n_total);
    double pct = info.n_total ? 100.0 * (double)info.n_trainable / (double)info.n_total : 0;
    strbuf_t text, html;
    sb_init(&text);
    sb_init(&html);
    if (info.full) {
        sb_printf(&text, "full fine-tuning: every weight trains (%s parameters)\n", tr);
        sb_printf(&html, "<p>full fine-tuning: every weight trains (<b>%s</b> parameters)</p>", tr);
    } else {
        sb_printf(&text,
                  "LoRA attached: r=%d alpha=%g (scale %g%s) dropout=%g on %d modules (%s)\n"
                  "trainable parameters: %s of %s (%.3f%%)\n",
                  info.r, (double)info.alpha, (double)info.scale, info.rslora ? ", rsLoRA" : "",
                  (double)info.dropout, info.n_modules, info.targets, tr, tot, pct);
        sb_printf(&html,
                  "<p>LoRA attached: r=%d, alpha=%g (scale %g%s), dropout %g on <b>%d</b> modules "
                  "(<code>",
                  info.r, (double)info.alpha, (double)info.scale, info.rslora ? ", rsLoRA" : "",
                  (double)info.dropout, info.n_modules);
        sb_html(&html, info.targets);
        sb_printf(&html, "</code>)<br>trainable parameters: <b>%s</b> of %s (%.3f%%)</p>", tr, tot,
                  pct);
    }
    char *t = sb_take(&text), *h = sb_take(&html);
    if (t && h) display_html(ctx->sink, h, t, NULL, 0);
    free(t);
    free(h);
    return 0;
}

/* ---- %train -----------------------------------------------------------------------------------
 */

typedef struct train_view {
    magic_ctx *ctx;
    run_view view;
} train_view;

static void train_step(void *pv, const lt_train_progress *p) {
    train_view *v = pv;
    char extra[160], title[160], text[256];
    snprintf(extra, sizeof extra, "loss %.4f  lr %.2e  %.0f tok/s  epoch %.2f", p->loss, p->lr,
             p->tokens_per_s, (double)p->epoch);
    snprintf(title, sizeof title, "training loss (step %d/%d: %.4f)", p->step, p->total_steps,
             p->loss);
    float lo = INFINITY;
    for (int i = 0; i < p->n_losses; i++)
        lo = fminf(lo, p->losses[i]);
    snprintf(text, sizeof text, "loss curve: %d steps, first %.4f, last %.4f, lowest %.4f",
             p->n_losses, p->n_losses ? (double)p->losses[0] : 0.0, p->loss, (double)lo);
    run_view_step(&v->view, v->ctx->sink, "train", p->step, p->total_steps, p->losses, p->n_losses,
                  extra, title, text);
}

static void train_message(void *pv, const char *text) {
    train_view *v = pv;
    magic_print(v->ctx, "%s\n", text);
}

int magic_train(magic_ctx *ctx, const magic_args *a) {
    lt_train_opts o;
    lt_train_opts_default(&o);
    o.data = arg_str(a, "data");
    o.format = arg_str(a, "format");
    o.batch = (int)arg_int(a, "batch");
    o.grad_accum = (int)arg_int(a, "grad_accum");
    o.steps = (int)arg_int(a, "steps");
    o.epochs = (float)arg_float(a, "epochs");
    o.lr = (float)arg_float(a, "lr");
    o.warmup = (int)arg_int(a, "warmup");
    o.schedule = arg_str(a, "schedule");
    o.optim = arg_str(a, "optim");
    o.weight_decay = (float)arg_float(a, "weight_decay");
    o.max_grad_norm = (float)arg_float(a, "max_grad_norm");
    o.max_seq = (int)arg_int(a, "max_seq");
    o.responses_only = arg_bool(a, "responses_only");
    o.packing = arg_bool(a, "packing");
    o.seed = (uint64_t)arg_int(a, "seed");
    o.shuffle = arg_bool(a, "shuffle");
    o.save = arg_str(a, "save");
    o.save_every = (int)arg_int(a, "save_every");
    o.keep = (int)arg_int(a, "keep");
    o.resume = arg_str(a, "resume");
    /* which options the cell wrote: with resume= they replace the checkpoint's, or are refused */
    char given[1024] = "";
    for (int i = 0; lt_option_name("train", i); i++) {
        const char *name = lt_option_name("train", i);
        size_t used = strlen(given);
        if (arg_given(a, name) && used + strlen(name) + 2 < sizeof given)
            snprintf(given + used, sizeof given - used, "%s%s", used ? "," : "", name);
    }
    o.given = given;
    if ((!o.data || !*o.data) && !(o.resume && *o.resume))
        return magic_fail(ctx, "CellError",
                          "%%train needs data=FILE (a .jsonl or .json dataset), or resume=DIR; "
                          "%%help train lists the options");
    if (o.save_every > 0 && !(o.save && *o.save))
        return magic_fail(ctx, "CellError",
                          "%%train: save_every=%d needs save=DIR (where checkpoints go)",
                          o.save_every);
    if (o.keep > 0 && !(o.save && *o.save))
        return magic_fail(ctx, "CellError",
                          "%%train: keep=%d needs save=DIR (the checkpoints it keeps)", o.keep);
    train_view v;
    memset(&v, 0, sizeof v);
    v.ctx = ctx;
    lt_train_callbacks cb = {&v, train_message, train_step};
    lt_train_result r;
    lt_status st = lt_train(ctx->session, &o, &cb, &r);
    run_view_end(&v.view, r.steps_done,
                 st == LT_OK          ? "done"
                 : st == LT_CANCELLED ? "interrupted"
                                      : "failed");
    if (st == LT_CANCELLED) {
        magic_print(
            ctx,
            "interrupted: the weights are those of step %d of %d; run the same %%train again "
            "to continue from there\n",
            r.steps_done, r.total_steps);
        return magic_fail_engine(ctx, st);
    }
    if (st != LT_OK) return magic_fail_engine(ctx, st);
    char el[32];
    display_duration(el, sizeof el, r.seconds);
    int done = r.steps_done - r.first_step;
    magic_print(ctx, "trained %d step%s in %s (%.0f tokens/s): loss %.4f -> %.4f%s%s\n", done,
                done == 1 ? "" : "s", el, r.seconds > 0 ? r.tokens / r.seconds : 0.0, r.first_loss,
                r.last_loss, r.saved[0] ? "; last checkpoint " : "", r.saved);
    return 0;
}

/* ---- %save ------------------------------------------------------------------------------------
 */

int magic_save(magic_ctx *ctx, const magic_args *a) {
    const char *ad = arg_str(a, "adapter"), *mg = arg_str(a, "merged"),
               *qd = arg_str(a, "quantized");
    int has_a = ad && *ad, has_m = mg && *mg, has_q = qd && *qd;
    if (has_a + has_m + has_q != 1)
        return magic_fail(ctx, "CellError",
                          "%%save takes one of adapter=DIR (a PEFT adapter), merged=DIR (a full "
                          "checkpoint with the adapters merged) or quantized=DIR (the NF4/int8 "
                          "base as a bitsandbytes checkpoint)");
    lt_callbacks cb = {ctx, say_line, NULL, NULL};
    lt_status st = has_a   ? lt_save_adapter(ctx->session, ad)
                   : has_m ? lt_save_merged(ctx->session, mg, arg_str(a, "dtype"), &cb)
                           : lt_save_quantized(ctx->session, qd, arg_str(a, "dtype"), &cb);
    if (st != LT_OK) return magic_fail_engine(ctx, st);
    if (has_a) {
        magic_print(ctx,
                    "saved the adapter to %s (adapter_config.json + adapter_model.safetensors)\n"
                    "load it here with %%lora load=%s, or in Python with "
                    "peft.PeftModel.from_pretrained(model, \"%s\")\n",
                    ad, ad, ad);
    } else if (has_m) {
        magic_print(
            ctx,
            "saved the merged model to %s (config.json + model.safetensors + tokenizer.model)\n"
            "load it here with %%load %s, or with transformers' "
            "AutoModelForCausalLM.from_pretrained(\"%s\")\n",
            mg, mg, mg);
    } else {
        lt_model_info info;
        lt_model_info_get(ctx->session, &info);
        magic_print(ctx,
                    "saved the quantized model to %s (config.json with quantization_config + "
                    "model.safetensors + tokenizer.model): %s\n"
                    "load it here with %%load %s, or with transformers and bitsandbytes: "
                    "AutoModelForCausalLM.from_pretrained(\"%s\")\n",
                    qd, info.quant, qd, qd);
    }
    return 0;
}
