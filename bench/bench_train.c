/* bench_train.c — LoRA training throughput and peak memory of lathe's CUDA backend.
 *
 * usage: bench_train SIZE PRECISION [SEQ BATCH STEPS WARM QUANT RANK]
 *   SIZE: 270m | 1b | 4b | 12b | 27b (random:gemma-3-SIZE shapes); PRECISION: bf16 | fp16 | fp32;
 *   QUANT: none (default) | nf4 (QLoRA: NF4 with double quantization) | int8; RANK: LoRA r (32),
 *   or 0 for full fine-tuning (%lora full=true: every weight trains, fp32 master copies,
 *   gradients and AdamW moments).
 *   LATHE_CUDA_MEMORY_CAP=15G makes the run fit a T4's usable memory or fail cleanly.
 * The same work as bench/hf_baseline.py: random weights, LoRA r=32 alpha=32 on all 7
 * linear layers of every layer, batch x SEQ random tokens (labels = the ids, shifted inside the
 * model), per-layer activation checkpointing (gemma3_train_batch always checkpoints), AdamW.
 * Prints one JSON line: tokens/s over STEPS timed steps after WARM warm-up steps, peak memory
 * of lathe's allocator (what torch.cuda.max_memory_allocated counts) and the device's used
 * memory, then a per-op time breakdown from CUDA events (one extra profiled step). The
 * layer checkpoints live in page-locked host memory (gemma3_backward.c) and are not in the
 * peak; their size is printed with the memory plan's other parts. The weights stream to the GPU
 * as they are drawn and quantized (gemma3_device_sink, as %load device=cuda does); the JSON
 * line's load_host_peak_gib is the process's host peak (VmHWM of /proc/self/status) right after
 * the load, host_peak_gib the same at the end (the layer checkpoints included).
 * LATHE_BENCH_HOST_LOAD=1 loads the old way instead (the whole model in host memory, then
 * gemma3_to_device), to compare.
 * Owns nothing else; not a test.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda/backend/cuda/backend_cuda.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/model/model.h"
#include "cuda/train/train.h"

/* VmHWM (the peak resident set) of this process, in GiB; 0 when /proc cannot say. */
static double host_peak_gib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %lld kB", &kb) == 1) break;
    fclose(f);
    return kb / 1048576.0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr,
                "usage: bench_train SIZE(270m|1b|4b|12b|27b) PRECISION(bf16|fp16|fp32) [SEQ "
                "BATCH STEPS WARM QUANT(none|nf4|int8) RANK]\n");
        return 2;
    }
    const char *size = argv[1], *prec = argv[2];
    int seq = argc > 3 ? atoi(argv[3]) : 2048, batch = argc > 4 ? atoi(argv[4]) : 2;
    int steps = argc > 5 ? atoi(argv[5]) : 8, warm = argc > 6 ? atoi(argv[6]) : 3;
    const char *quant = argc > 7 ? argv[7] : "none";
    int rank = argc > 8 ? atoi(argv[8]) : 32;
    char err[LT_ERRLEN];
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &lt_backend_cuda, 0) != LT_OK) {
        fprintf(stderr, "bench_train: %s\n", ctx.err);
        return 1;
    }
    lt_dtype dt;
    if (lt_cuda_parse_precision(&ctx, prec, &dt) != 0) {
        fprintf(stderr, "bench_train: precision '%s' (accepted: bf16, fp16, fp32)\n", prec);
        return 2;
    }
    lt_cuda_set_precision(&ctx, dt);
    gemma3_model *host = NULL, *m = NULL;
    if (getenv("LATHE_CUDA_MEMORY_CAP"))
        printf("# memory cap LATHE_CUDA_MEMORY_CAP=%s\n", getenv("LATHE_CUDA_MEMORY_CAP"));
    double tl = now_s();
    int host_load = getenv("LATHE_BENCH_HOST_LOAD") && atoi(getenv("LATHE_BENCH_HOST_LOAD"));
    gemma3_device_sink ds;
    gemma3_device_sink_init(&ds, &ctx, dt);
    gemma3_load_spec spec = {.dtype = "bf16", .quant = quant, .sink = host_load ? NULL : &ds.sink};
    lt_status lrc = gemma3_load_random_spec(host_load ? &host : &m, size, 1234, &spec, NULL, err);
    if (lrc == LT_OK && host_load) lrc = gemma3_to_device(&m, host, &ctx, dt, err);
    if (lrc != LT_OK) {
        fprintf(stderr, "bench_train: %s\n", err);
        return 1;
    }
    gemma3_model_free(host);
    double load_peak = host_peak_gib();
    printf("# random weights (%s) drawn and placed in %.1f s (%s), host peak %.2f GiB\n", quant,
           now_s() - tl, host_load ? "whole host model, then copied" : "streamed to the GPU",
           load_peak);
    lt_adapters *ad = NULL;
    lora_opts lo = {.r = rank > 0 ? rank : 8,
                    .alpha = (float)(rank > 0 ? rank : 8),
                    .seed = 7,
                    .full = rank == 0};
    if (lora_attach(&ad, m, &ctx, &lo, err) != LT_OK) {
        fprintf(stderr, "bench_train: lora: %s\n", err);
        return 1;
    }
    if (getenv("LATHE_BENCH_NO_LORA")) /* experiment: the frozen model's cost alone */
        for (int i = 0; i < ad->n_slots; i++)
            ad->slots[i].lora.enabled = 0;
    int N = seq * batch;
    train_batch b = {0};
    b.N = N;
    b.n_seg = batch;
    b.ids = malloc(sizeof(int32_t) * (size_t)N);
    b.targets = malloc(sizeof(int32_t) * (size_t)N);
    b.seg_len = malloc(sizeof(int) * (size_t)batch);
    uint64_t z = 42;
    for (int i = 0; i < N; i++) {
        z = z * 6364136223846793005ull + 1442695040888963407ull;
        b.ids[i] = (int32_t)((z >> 33) % 262144);
    }
    for (int s = 0; s < batch; s++) {
        b.seg_len[s] = seq;
        for (int t = 0; t < seq; t++) {
            int i = s * seq + t;
            b.targets[i] = t + 1 < seq ? b.ids[i + 1] : -100;
        }
    }
    b.n_labels = batch * (seq - 1);
    optim_opts oo = {
        .lr = 1e-4f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.0f};
    double loss = 0, t0 = 0;
    size_t act_bytes, ckpt_bytes;
    gemma3_train_bytes(m, &ctx, lora_trainable(ad), N, 0, &act_bytes, &ckpt_bytes);
    printf("# memory: weights %.2f GiB, trainable + grads + AdamW %.2f GiB, one layer's "
           "activations %.2f GiB (device), layer checkpoints %.2f GiB (page-locked host)\n",
           m->weight_bytes / 1073741824.0, ad->n_trainable * 16.0 / 1073741824.0,
           act_bytes / 1073741824.0, ckpt_bytes / 1073741824.0);
    {
        lt_cuda_mem mem0;
        lt_cuda_memory(&ctx, &mem0);
        printf("# in use before the first step: %.2f GiB\n", mem0.in_use / 1073741824.0);
    }
    lt_cuda_reset_peak(&ctx);
    for (int it = 0; it < warm + steps + 1; it++) {
        if (it == warm) {
            ctx.be->sync(&ctx);
            t0 = now_s();
        }
        if (it == warm + steps) { /* one more step, profiled op by op */
            ctx.be->sync(&ctx);
            lt_cuda_profile(&ctx, 1);
        }
        lt_status rc = lora_zero_grads(ad);
        if (rc == LT_OK)
            rc = gemma3_train_batch(m, &ctx, lora_trainable(ad), &b, 1.0f / (float)b.n_labels, 1, 0,
                                    &loss);
        if (rc == LT_OK)
            rc = optim_step(ad, &oo, oo.lr, it + 1, err) == LT_OK ? LT_OK : LT_ERR_STATE;
        if (rc != LT_OK) {
            fprintf(stderr, "bench_train: step %d: %s %s\n", it, ctx.err, err);
            return 1;
        }
        if (it == warm + steps - 1) {
            ctx.be->sync(&ctx);
            double dt_s = (now_s() - t0) / steps;
            lt_cuda_mem mem;
            lt_cuda_memory(&ctx, &mem);
            printf(
                "{\"engine\": \"lathe\", \"size\": \"%s\", \"dtype\": \"%s\", \"quant\": \"%s\", "
                "\"rank\": %d, \"seq\": %d, \"batch\": %d, \"gc\": true, "
                "\"step_ms\": %.1f, \"tok_s\": %.0f, \"peak_gib\": %.2f, \"device_used_gib\": "
                "%.2f, "
                "\"loss\": %.4f, \"trainable\": %lld, \"peak_op\": \"%s\", "
                "\"load\": \"%s\", \"load_host_peak_gib\": %.2f, \"host_peak_gib\": %.2f}\n",
                size, prec, quant, rank, seq, batch, dt_s * 1e3, N / dt_s, mem.peak / 1073741824.0,
                (mem.total - mem.free) / 1073741824.0, loss / b.n_labels,
                (long long)ad->n_trainable, mem.peak_op, host_load ? "host" : "streamed", load_peak,
                host_peak_gib());
            fflush(stdout);
        }
    }
    char rep[8192];
    if (lt_cuda_peak_report(&ctx, rep, sizeof rep) > 0)
        printf("# device blocks live at the peak (%s):\n%s", size, rep);
    lt_cuda_profile_report(&ctx, rep, sizeof rep);
    printf("# per-op time of one step (%s %s, CUDA events):\n%s", size, prec, rep);
    lora_free(ad);
    gemma3_model_release(m, &ctx);
    lt_ctx_shutdown(&ctx);
    free(b.ids), free(b.targets), free(b.seg_len);
    return 0;
}
