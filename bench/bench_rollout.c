/* bench_rollout.c — GRPO's two halves on lathe's CUDA backend: batched sampling (the rollout)
 * and a whole GRPO step.
 *
 * usage: bench_rollout sample SIZE PRECISION PROMPTS GROUP NEW [PROMPT_LEN TOP_K TOP_P]
 *        bench_rollout step SIZE PRECISION GROUP NEW
 * sample: the work of ../shared/bench/hf_generate.py — random:gemma-3-SIZE weights, PROMPTS
 *   random prompts of PROMPT_LEN (128) tokens, GROUP completions each, NEW new tokens at
 *   temperature 1 (top_k 64, top_p 0.95 as that script, or the given ones; GRPO samples with
 *   top_k 0 and top_p 1). Random weights rarely sample a stop id, so rows run to NEW tokens;
 *   the JSON line counts the tokens actually sampled, and the decode steps replayed as CUDA
 *   graphs (LATHE_CUDA_GRAPHS=0: none); then 32 tokens more, profiled op by op (GPU time per op
 *   beside the wall clock; the profiler runs the ops one by one).
 * step: one GRPO generation of GROUP completions of NEW tokens for one prompt and its optimizer
 *   step (LoRA r=16 on all 7 linears, loss dapo, beta 0), through grpo_run with the built-in
 *   format_approx reward; the tokenizer is tiny's (random ids outside its 4096 pieces decode
 *   to nothing), LATHE_SRCDIR/models/tiny/tokenizer.model. Prints sampling and training
 *   tokens/s and the step's time split.
 * Owns nothing else; not a test.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cuda/backend/cuda/backend_cuda.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/model/model.h"
#include "cuda/model/rollout.h"
#include "cuda/train/train.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static gemma3_model *load(lt_ctx *ctx, const char *size, const char *prec) {
    char err[LT_ERRLEN];
    lt_dtype dt;
    if (lt_ctx_init(ctx, &lt_backend_cuda, 0) != LT_OK) {
        fprintf(stderr, "bench_rollout: %s\n", ctx->err);
        return NULL;
    }
    if (lt_cuda_parse_precision(ctx, prec, &dt) != 0) {
        fprintf(stderr, "bench_rollout: precision '%s' (accepted: bf16, fp16, fp32)\n", prec);
        return NULL;
    }
    lt_cuda_set_precision(ctx, dt);
    gemma3_model *host = NULL, *m = NULL;
    if (gemma3_load_random(&host, size, 1234, "bf16", NULL, err) != LT_OK ||
        gemma3_to_device(&m, host, ctx, dt, err) != LT_OK) {
        fprintf(stderr, "bench_rollout: %s\n", err);
        return NULL;
    }
    gemma3_model_free(host);
    return m;
}

static int bench_sample(int argc, char **argv) {
    const char *size = argv[2], *prec = argv[3];
    int P = atoi(argv[4]), G = atoi(argv[5]), NEW = atoi(argv[6]);
    int plen = argc > 7 ? atoi(argv[7]) : 128;
    lt_gen_opts o = {
        NEW,  1.0f, argc > 8 ? atoi(argv[8]) : 64, argc > 9 ? (float)atof(argv[9]) : 0.95f,
        0.0f, 11};
    lt_ctx ctx;
    gemma3_model *m = load(&ctx, size, prec);
    if (!m) return 1;
    int32_t **pr = malloc(sizeof *pr * (size_t)P);
    int *pl = malloc(sizeof(int) * (size_t)P);
    uint64_t z = 42;
    for (int p = 0; p < P; p++) {
        pr[p] = malloc(sizeof(int32_t) * (size_t)plen);
        pl[p] = plen;
        pr[p][0] = m->cfg.bos_id;
        for (int i = 1; i < plen; i++) {
            z = z * 6364136223846793005ull + 1442695040888963407ull;
            pr[p][i] = (int32_t)((z >> 33) % 262144);
        }
    }
    char err[LT_ERRLEN];
    rollout_out out;
    lt_gen_opts warm = o;
    warm.max_new = 8;
    if (gemma3_rollout(m, &ctx, (const int32_t *const *)pr, pl, P, G, &warm, plen + NEW + 8, NULL,
                       &out, err) != LT_OK) {
        fprintf(stderr, "bench_rollout: %s\n", err);
        return 1;
    }
    rollout_out_free(&out);
    lt_cuda_reset_peak(&ctx);
    ctx.be->sync(&ctx);
    double t0 = now_s();
    if (gemma3_rollout(m, &ctx, (const int32_t *const *)pr, pl, P, G, &o, plen + NEW + 8, NULL,
                       &out, err) != LT_OK) {
        fprintf(stderr, "bench_rollout: %s\n", err);
        return 1;
    }
    ctx.be->sync(&ctx);
    double dt = now_s() - t0;
    lt_cuda_mem mem;
    lt_cuda_memory(&ctx, &mem);
    printf("{\"bench\": \"rollout\", \"size\": \"%s\", \"precision\": \"%s\", \"prompts\": %d, "
           "\"group\": %d, \"new\": %d, \"prompt_len\": %d, \"top_k\": %d, \"top_p\": %g, "
           "\"gen_tok_s\": %.0f, \"seconds\": %.2f, \"tokens\": %lld, \"prefill_s\": %.3f, "
           "\"decode_s\": %.3f, \"peak_gib\": %.2f, \"graph_steps\": %d, \"graph_records\": %d, "
           "\"record_s\": %.4f, \"graphs\": \"%s\"}\n",
           size, prec, P, G, NEW, plen, o.top_k, (double)o.top_p, out.new_tokens / dt, dt,
           (long long)out.new_tokens, out.prefill_s, out.decode_s, mem.peak / 1073741824.0,
           out.graph_steps, out.graph_records, out.record_s,
           out.graph_steps ? "on"
                           : (getenv("LATHE_CUDA_GRAPHS") ? "off (LATHE_CUDA_GRAPHS)" : "off"));
    if (out.graph_note[0]) printf("# graphs: %s\n", out.graph_note);
    rollout_out_free(&out);
    /* 32 more tokens, op by op: the GPU's time per op against the wall clock (the rest is the
     * host launching, waiting and drawing). The profiler refuses graphs: these steps run their
     * ops one by one, as LATHE_CUDA_GRAPHS=0 does. */
    lt_gen_opts prof = o;
    prof.max_new = 32;
    lt_cuda_profile(&ctx, 1);
    t0 = now_s();
    if (gemma3_rollout(m, &ctx, (const int32_t *const *)pr, pl, P, G, &prof, plen + NEW + 8, NULL,
                       &out, err) == LT_OK) {
        ctx.be->sync(&ctx);
        printf("# profiled: %lld tokens in %.3f s wall (decode %.3f s)\n",
               (long long)out.new_tokens, now_s() - t0, out.decode_s);
        rollout_out_free(&out);
    }
    lt_cuda_profile(&ctx, 0);
    char rep[8192];
    lt_cuda_profile_report(&ctx, rep, sizeof rep);
    for (char *line = strtok(rep, "\n"); line; line = strtok(NULL, "\n"))
        printf("#   %s\n", line);
    return 0;
}

static void step_report(void *u, const lt_grpo_progress *p) {
    (void)u;
    printf("{\"bench\": \"grpo_step\", \"step\": %d, \"seconds\": %.2f, \"sampling_tok_s\": %.0f, "
           "\"training_tok_s\": %.0f, \"completion_length\": %.1f, \"loss\": %.6g}\n",
           p->step, p->elapsed_s, p->sample_tok_s, p->train_tok_s, p->completion_length, p->loss);
}

static void step_message(void *u, const char *text) {
    (void)u;
    printf("# %s\n", text);
}

static int bench_step(char **argv) {
    const char *size = argv[2], *prec = argv[3];
    int G = atoi(argv[4]), NEW = atoi(argv[5]);
    lt_ctx ctx;
    gemma3_model *m = load(&ctx, size, prec);
    if (!m) return 1;
    char err[LT_ERRLEN], path[4096];
    const char *src = getenv("LATHE_SRCDIR");
    snprintf(path, sizeof path, "%s/models/tiny/tokenizer.model", src ? src : ".");
    lt_tokenizer *tok = NULL;
    if (tok_load(&tok, path, err) != LT_OK) {
        fprintf(stderr, "bench_rollout: %s\n", err);
        return 1;
    }
    const char *data = "/tmp/bench_rollout_prompts.jsonl";
    FILE *f = fopen(data, "w");
    if (!f) return 1;
    for (int i = 0; i < 4; i++)
        fprintf(f,
                "{\"prompt\": \"Problem %d: Ana has %d apples and buys %d more. How many "
                "apples does she have? Show your working out, then the answer.\", "
                "\"answer\": \"%d\"}\n",
                i, 10 + i, 3 + i, 13 + 2 * i);
    fclose(f);
    lt_adapters *ad = NULL;
    lora_opts lo = {.r = 16, .alpha = 16, .seed = 7};
    if (lora_attach(&ad, m, &ctx, &lo, err) != LT_OK) {
        fprintf(stderr, "bench_rollout: lora: %s\n", err);
        return 1;
    }
    atomic_int cancel = 0;
    trainer_env env = {m, tok, &ctx, &cancel, 0};
    lt_grpo_opts o;
    lt_grpo_opts_default(&o);
    o.data = data;
    o.reward = "format_approx";
    o.group = G;
    o.steps = 2; /* the first warms up */
    o.max_completion = NEW;
    o.max_prompt = 128;
    o.show_every = 0;
    lt_grpo_callbacks cb = {NULL, step_message, step_report};
    lt_grpo_result res;
    lt_cuda_reset_peak(&ctx);
    if (grpo_run(ad, &env, &o, &cb, &res, err) != LT_OK) {
        fprintf(stderr, "bench_rollout: grpo: %s\n", err);
        return 1;
    }
    lt_cuda_mem mem;
    lt_cuda_memory(&ctx, &mem);
    printf("{\"bench\": \"grpo\", \"size\": \"%s\", \"precision\": \"%s\", \"group\": %d, \"new\": "
           "%d, \"steps\": %d, \"seconds\": %.2f, \"peak_gib\": %.2f}\n",
           size, prec, G, NEW, res.steps_done, res.seconds, mem.peak / 1073741824.0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 7 && !strcmp(argv[1], "sample")) return bench_sample(argc, argv);
    if (argc >= 6 && !strcmp(argv[1], "step")) return bench_step(argv);
    fprintf(stderr, "usage: bench_rollout sample SIZE PRECISION PROMPTS GROUP NEW [PROMPT_LEN "
                    "TOP_K TOP_P]\n       bench_rollout step SIZE PRECISION GROUP NEW\n");
    return 2;
}
