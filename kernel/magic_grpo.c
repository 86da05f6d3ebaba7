/* magic_grpo.c — %grpo: reinforcement learning of the attached LoRA adapters with reward
 * functions (GRPO). Translates the options into an lt_grpo_opts and the engine's reports into
 * sink output; the engine does the work.
 *
 * Shows a progress bar (step/total, reward, loss, KL, completion length, sampling and
 * training tokens/s, ETA) and an SVG reward curve, both updated in place with text/plain
 * fallbacks, every show_every steps one sampled completion with its reward, then a summary.
 * Must not reach past the sink.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernel/display.h"
#include "kernel/magic_handlers.h"

typedef struct grpo_view {
    magic_ctx *ctx;
    run_view view;
} grpo_view;

static void grpo_step(void *pv, const lt_grpo_progress *p) {
    grpo_view *v = pv;
    if (p->show_completion) {
        magic_print(v->ctx, "--- step %d: reward %.3f", p->step, p->show_reward);
        for (int i = 0; i < p->n_rewards; i++)
            magic_print(v->ctx, "%s %s %.3f", i ? "," : " (mean:", p->reward_names[i],
                        p->reward_mean[i]);
        magic_print(v->ctx, "%s ---\n%s\n", p->n_rewards ? ")" : "", p->show_completion);
    }
    char extra[200], title[160], text[256];
    snprintf(extra, sizeof extra,
             "reward %.3f ± %.3f  loss %.4f  kl %.4f  len %.0f  %.0f/%.0f tok/s", p->reward,
             p->reward_std, p->loss, p->kl, p->completion_length, p->sample_tok_s, p->train_tok_s);
    snprintf(title, sizeof title, "mean reward (step %d/%d: %.4f)", p->step, p->total_steps,
             p->reward);
    float hi = -INFINITY;
    for (int i = 0; i < p->n_steps_logged; i++)
        hi = fmaxf(hi, p->rewards[i]);
    snprintf(text, sizeof text, "reward curve: %d steps, first %.4f, last %.4f, highest %.4f",
             p->n_steps_logged, p->n_steps_logged ? (double)p->rewards[0] : 0.0, p->reward,
             (double)hi);
    run_view_step(&v->view, v->ctx->sink, "grpo", p->step, p->total_steps, p->rewards,
                  p->n_steps_logged, extra, title, text);
}

static void grpo_message(void *pv, const char *text) {
    grpo_view *v = pv;
    magic_print(v->ctx, "%s\n", text);
}

int magic_grpo(magic_ctx *ctx, const magic_args *a) {
    lt_grpo_opts o;
    lt_grpo_opts_default(&o);
    o.data = arg_str(a, "data");
    o.reward = arg_str(a, "reward");
    o.weights = arg_str(a, "weights");
    o.markers = arg_str(a, "markers");
    o.group = (int)arg_int(a, "group");
    o.batch = (int)arg_int(a, "batch");
    o.micro = (int)arg_int(a, "micro");
    o.steps = (int)arg_int(a, "steps");
    o.lr = (float)arg_float(a, "lr");
    o.warmup = (int)arg_int(a, "warmup");
    o.schedule = arg_str(a, "schedule");
    o.weight_decay = (float)arg_float(a, "weight_decay");
    o.max_grad_norm = (float)arg_float(a, "max_grad_norm");
    o.beta = (float)arg_float(a, "beta");
    o.epsilon = (float)arg_float(a, "epsilon");
    o.epsilon_high = arg_given(a, "epsilon_high") ? (float)arg_float(a, "epsilon_high")
                                                  : o.epsilon; /* TRL: defaults to epsilon */
    o.loss = arg_str(a, "loss");
    o.scale_rewards = arg_str(a, "scale_rewards");
    o.max_prompt = (int)arg_int(a, "max_prompt");
    o.max_completion = (int)arg_int(a, "max_completion");
    o.temperature = (float)arg_float(a, "temperature");
    o.top_p = (float)arg_float(a, "top_p");
    o.top_k = (int)arg_int(a, "top_k");
    o.iterations = (int)arg_int(a, "iterations");
    o.seed = (uint64_t)arg_int(a, "seed");
    o.shuffle = arg_bool(a, "shuffle");
    o.show_every = (int)arg_int(a, "show_every");
    o.reward_timeout = (float)arg_float(a, "reward_timeout");
    o.log = arg_str(a, "log");
    if (!o.data || !*o.data || !o.reward || !*o.reward)
        return magic_fail(ctx, "CellError",
                          "%%grpo needs data=FILE (JSON lines with a \"prompt\") and reward=R "
                          "(format, format_approx, answer, number or \"exec:COMMAND\"); %%help "
                          "grpo lists the options");
    grpo_view v;
    memset(&v, 0, sizeof v);
    v.ctx = ctx;
    lt_grpo_callbacks cb = {&v, grpo_message, grpo_step};
    lt_grpo_result r;
    lt_status st = lt_grpo(ctx->session, &o, &cb, &r);
    run_view_end(&v.view, r.steps_done,
                 st == LT_OK          ? "done"
                 : st == LT_CANCELLED ? "interrupted"
                                      : "failed");
    if (st == LT_CANCELLED) {
        magic_print(ctx,
                    "interrupted: the adapters hold the weights of step %d of %d; %%save "
                    "keeps them, and %%grpo can run again (a new run, fresh optimizer)\n",
                    r.steps_done, r.total_steps);
        return magic_fail_engine(ctx, st);
    }
    if (st != LT_OK) return magic_fail_engine(ctx, st);
    char el[32];
    display_duration(el, sizeof el, r.seconds);
    magic_print(ctx, "GRPO: %d step%s in %s on %d prompts: mean reward %.4f -> %.4f\n",
                r.steps_done, r.steps_done == 1 ? "" : "s", el, r.n_prompts, r.first_reward,
                r.last_reward);
    return 0;
}
