/* quant_tool.c — a command-line door into the engine's bitsandbytes formats for the pytest
 * comparisons in tests/quant (test_bnb.py), which hold the NumPy reference (bnb_ref.py).
 *
 *   quant_tool nf4 IN.f32 PACKED ABSMAX [BLOCKSIZE]   bnb_nf4_quantize
 *   quant_tool blockwise IN.f32 CODE.f32 Q ABSMAX BS  bnb_blockwise_quantize
 *   quant_tool double ABSMAX.f32 Q ABSMAX2 OFFSET     bnb_double_quantize with the dynamic map
 *   quant_tool dmap OUT.f32                           bnb_dynamic_map
 *   quant_tool int8 IN.f32 ROWS COLS W8 SCB           bnb_int8_quantize
 *   quant_tool dequant DIR QUANT OUTDIR               load DIR (quant= QUANT), write every
 *                                                     linear as fp32 (lt_weight_dequantize_rows)
 *                                                     to OUTDIR/NAME.f32; print the summary
 *   quant_tool dynamic DIR KEEP OUTDIR                load DIR with quant=dynamic quant_keep=KEEP
 *                                                     (calibrated with DIR/tokenizer.model), write
 *                                                     every linear as dequant does; print the
 *                                                     summary, the calibration ids and each
 *                                                     linear's errors, score and kept flag
 *   quant_tool grads DIR QUANT OUTDIR IDS             LoRA r=4 (B filled, seeded) on every
 *                                                     linear, one micro-batch with gradients:
 *                                                     prints the loss, writes each adapter's
 *                                                     grad_A / grad_B and the model's logits
 *   quant_tool session SRC[:QUANT[:KEEP]]... -- GOOD[:QUANT[:KEEP]]
 *                                                     one session: each SRC must fail (prints
 *                                                     "ERR<TAB>message"), then GOOD must load
 *                                                     and give logits ("OK"); KEEP is
 *                                                     quant_keep (default 0.1)
 *   quant_tool fit DIR QUANT                          the device arena the fit check
 *                                                     estimates for DIR (gemma3_plan_dir) and the
 *                                                     one gemma3_to_device allocates for it on
 *                                                     the CPU backend, in bf16: "estimate N",
 *                                                     "arena N"
 *   quant_tool pyfloat HEX...                         bnb_py_float of each double (given as
 *                                                     a C99 hex float), one per line
 *   quant_tool script STEP...                         one session, step by step, each printing
 *                                                     "OK<TAB>..." or "ERR<TAB>message":
 *                                                     load=SRC[:QUANT[:KEEP]] (device=cpu),
 *                                                     saveq=DIR (lt_save_quantized), logits
 *                                                     (prints a weighted sum of the logits)
 * Raw files are little-endian arrays with no header. Test tool only: errors go to stderr,
 * exit status 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/engine.h"
#include "cuda/formats/bnb.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/model/model.h"
#include "cuda/model/quant_dynamic.h"
#include "cuda/train/train.h"
#include "tests/unit/test_files.h"

static void *slurp(const char *path, size_t *n) {
    return (void *)test_read_file(path, n);
}

static int spill(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int bad = fwrite(p, 1, n, f) != n;
    return fclose(f) || bad ? -1 : 0;
}

static int die(const char *what, const char *msg) {
    fprintf(stderr, "quant_tool %s: %s\n", what, msg);
    return 1;
}

static int cmd_codec(int argc, char **argv) {
    const char *cmd = argv[1];
    size_t n = 0;
    if (!strcmp(cmd, "dmap")) {
        float map[256];
        bnb_dynamic_map(map);
        return spill(argv[2], map, sizeof map) ? die(cmd, "write") : 0;
    }
    float *x = argc > 2 ? slurp(argv[2], &n) : NULL;
    if (!x) return die(cmd, "cannot read input");
    int64_t count = (int64_t)(n / sizeof(float));
    int rc = 0;
    if (!strcmp(cmd, "nf4") && argc >= 5) {
        int bs = argc > 5 ? atoi(argv[5]) : BNB_NF4_BLOCKSIZE;
        int64_t nb = (count + bs - 1) / bs;
        uint8_t *packed = malloc((size_t)((count + 1) / 2) + 1);
        float *absmax = malloc(sizeof(float) * (size_t)(nb + 1));
        bnb_nf4_quantize(x, count, bs, packed, absmax);
        rc = spill(argv[3], packed, (size_t)((count + 1) / 2)) ||
             spill(argv[4], absmax, sizeof(float) * (size_t)nb);
        free(packed);
        free(absmax);
    } else if (!strcmp(cmd, "blockwise") && argc >= 7) {
        size_t cn = 0;
        float *code = slurp(argv[3], &cn);
        int bs = atoi(argv[6]);
        int64_t nb = (count + bs - 1) / bs;
        uint8_t *q = malloc((size_t)count + 1);
        float *absmax = malloc(sizeof(float) * (size_t)(nb + 1));
        if (!code || cn != 256 * sizeof(float)) return die(cmd, "CODE must hold 256 floats");
        bnb_blockwise_quantize(x, count, code, bs, q, absmax);
        rc = spill(argv[4], q, (size_t)count) || spill(argv[5], absmax, sizeof(float) * (size_t)nb);
        free(q);
        free(absmax);
        free(code);
    } else if (!strcmp(cmd, "double") && argc >= 6) {
        float map[256], offset = 0;
        bnb_dynamic_map(map);
        int64_t nb2 = (count + BNB_NESTED_BLOCKSIZE - 1) / BNB_NESTED_BLOCKSIZE;
        uint8_t *q = malloc((size_t)count + 1);
        float *a2 = malloc(sizeof(float) * (size_t)(nb2 + 1));
        if (bnb_double_quantize(x, count, map, BNB_NESTED_BLOCKSIZE, q, a2, &offset) != LT_OK)
            return die(cmd, "out of memory");
        rc = spill(argv[3], q, (size_t)count) || spill(argv[4], a2, sizeof(float) * (size_t)nb2) ||
             spill(argv[5], &offset, sizeof offset);
        free(q);
        free(a2);
    } else if (!strcmp(cmd, "int8") && argc >= 7) {
        int64_t rows = atoll(argv[3]), cols = atoll(argv[4]);
        if (rows * cols != count) return die(cmd, "ROWS x COLS disagrees with the input");
        int8_t *w8 = malloc((size_t)count + 1);
        float *scb = malloc(sizeof(float) * (size_t)rows + 1);
        bnb_int8_quantize(x, rows, cols, w8, scb);
        rc = spill(argv[5], w8, (size_t)count) || spill(argv[6], scb, sizeof(float) * (size_t)rows);
        free(w8);
        free(scb);
    } else {
        free(x);
        return die(cmd, "bad arguments (see the header of quant_tool.c)");
    }
    free(x);
    return rc ? die(cmd, "cannot write an output") : 0;
}

static const char *quant_arg(const char *q) {
    return !strcmp(q, "-") ? NULL : q;
}

/* Every linear of m as fp32 (dequantized or widened) into outdir/NAME.f32, then the summary. */
static int write_linears(gemma3_model *m, const char *what, const char *outdir) {
    char path[4096], name[192], sum[160];
    int n = gemma3_weight_count(m);
    for (int i = 0; i < n; i++) {
        lt_tensor *t = gemma3_weight_at(m, i, name, sizeof name);
        lt_weight *w = gemma3_weight_owner(m, t);
        if (!w || w == &m->embed_tokens || w == &m->lm_head) continue;
        int64_t rows = t->shape[0], cols = t->shape[1];
        float *f = malloc(sizeof(float) * (size_t)(rows * cols));
        lt_weight_dequantize_rows(w, 0, rows, f);
        snprintf(path, sizeof path, "%s/%s.f32", outdir, name);
        int bad = spill(path, f, sizeof(float) * (size_t)(rows * cols));
        free(f);
        if (bad) return die(what, path);
    }
    printf("summary\t%s\nquantized\t%d\nkept16\t%d\nbytes\t%lld\n",
           gemma3_quant_summary(m, sum, sizeof sum), m->n_quantized, m->n_kept16,
           (long long)m->weight_bytes);
    return 0;
}

static int cmd_dequant(char **argv) {
    char err[LT_ERRLEN];
    gemma3_model *m = NULL;
    if (gemma3_load_dir_quant(&m, argv[2], NULL, quant_arg(argv[3]), NULL, err) != LT_OK)
        return die("dequant", err);
    int rc = write_linears(m, "dequant", argv[4]);
    gemma3_model_free(m);
    return rc;
}

static int cmd_dynamic(char **argv) {
    char err[LT_ERRLEN] = "", tokpath[4096];
    snprintf(tokpath, sizeof tokpath, "%s/tokenizer.model", argv[2]);
    int32_t *ids = NULL;
    int n = 0;
    if (qdyn_calibration_ids(tokpath, &ids, &n, err) != LT_OK) return die("dynamic", err);
    qdyn_report rep;
    gemma3_load_spec spec = {.quant = "dynamic",
                             .quant_keep = atof(argv[3]),
                             .calib_ids = ids,
                             .n_calib = n,
                             .n_threads = 2,
                             .report = &rep};
    gemma3_model *m = NULL;
    if (gemma3_load_dir_spec(&m, argv[2], &spec, NULL, err) != LT_OK) return die("dynamic", err);
    int rc = write_linears(m, "dynamic", argv[4]);
    const lt_quant_info *in = &rep.info;
    printf("calib");
    for (int i = 0; i < in->n_calib; i++)
        printf("%c%d", i ? ',' : '\t', ids[i]);
    printf("\nlinear_params\t%lld\nkept_params\t%lld\nn_kept\t%d\nmedian_weight\t%.17g\n"
           "median_output\t%.17g\n",
           (long long)in->linear_params, (long long)in->kept_params, in->n_kept,
           in->median_weight_error, in->median_output_error);
    for (int i = 0; i < in->n_modules; i++) {
        const lt_quant_module *q = &rep.mods[i];
        printf("module\t%s\t%lld\t%.17g\t%.17g\t%.17g\t%d\n", q->name, (long long)q->n_params,
               q->weight_error, q->output_error, q->score, q->kept);
    }
    qdyn_report_free(&rep);
    gemma3_model_free(m);
    free(ids);
    return rc;
}

static int cmd_grads(char **argv) {
    char err[LT_ERRLEN], path[4096];
    gemma3_model *m = NULL;
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &lt_backend_cpu, 2) != LT_OK) return die("grads", ctx.err);
    if (gemma3_load_dir_quant(&m, argv[2], NULL, quant_arg(argv[3]), NULL, err) != LT_OK)
        return die("grads", err);
    lora_opts lo = {.r = 4, .alpha = 8, .seed = 5};
    lt_adapters *a = NULL;
    if (lora_attach(&a, m, &ctx, &lo, err) != LT_OK) return die("grads", err);
    /* B starts at zero (PEFT's init), which would zero grad_A: fill it, seeded */
    uint64_t s = 12345;
    for (int i = 0; i < a->n_slots; i++) {
        float *b = a->slots[i].lora.b.data;
        for (int64_t k = 0; k < lt_tensor_numel(&a->slots[i].lora.b); k++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            b[k] = (float)((double)(s >> 11) / 9007199254740992.0 - 0.5) * 0.2f;
        }
    }
    int32_t ids[64], targets[64];
    int N = 0;
    for (const char *p = argv[5]; *p && N < 64;) {
        char *end;
        ids[N++] = (int32_t)strtol(p, &end, 10);
        p = *end ? end + 1 : end;
    }
    for (int t = 0; t < N; t++)
        targets[t] = t + 1 < N ? ids[t + 1] : -100;
    int seg = N;
    train_batch b = {
        .ids = ids, .targets = targets, .seg_len = &seg, .n_seg = 1, .N = N, .n_labels = N - 1};
    double loss = 0;
    if (gemma3_train_batch(m, &ctx, lora_trainable(a), &b, 1.0f, 1, 0, &loss) != LT_OK)
        return die("grads", ctx.err);
    printf("loss\t%.9g\n", loss);
    for (int i = 0; i < a->n_slots; i++) {
        const lora_slot *sl = &a->slots[i];
        snprintf(path, sizeof path, "%s/%s.grad_a.f32", argv[4], sl->module);
        if (spill(path, sl->lora.grad_a.data, lt_tensor_bytes(&sl->lora.grad_a)))
            return die("grads", path);
        snprintf(path, sizeof path, "%s/%s.grad_b.f32", argv[4], sl->module);
        if (spill(path, sl->lora.grad_b.data, lt_tensor_bytes(&sl->lora.grad_b)))
            return die("grads", path);
    }
    lora_free(a);
    gemma3_model_free(m);
    lt_ctx_shutdown(&ctx);
    return 0;
}

/* "DIR[:QUANT[:KEEP]]" -> dir, o->quant, o->quant_keep (0.1 when not given) */
static void split_src(char *arg, lt_load_opts *o) {
    char *slash = strrchr(arg, '/'), *c = strchr(slash ? slash : arg, ':');
    o->quant = NULL;
    o->quant_keep = 0.1f;
    if (!c) return;
    *c = 0;
    o->quant = c + 1;
    char *k = strchr(c + 1, ':');
    if (k) {
        *k = 0;
        o->quant_keep = (float)atof(k + 1);
    }
}

static int cmd_session(int argc, char **argv) {
    lt_session *s = lt_session_new();
    int i = 2;
    for (; i < argc && strcmp(argv[i], "--"); i++) {
        lt_load_opts o = {.device = "cpu"};
        split_src(argv[i], &o);
        if (lt_load(s, argv[i], &o, NULL) == LT_OK) return die("session", "a bad load succeeded");
        printf("ERR\t%s\n", lt_last_error(s));
    }
    if (i + 1 >= argc) return die("session", "no GOOD source after --");
    lt_load_opts o = {.device = "cpu"};
    split_src(argv[i + 1], &o);
    if (lt_load(s, argv[i + 1], &o, NULL) != LT_OK) return die("session", lt_last_error(s));
    int32_t ids[4] = {2, 10, 20, 30};
    float *logits = NULL;
    int vocab = 0;
    if (lt_logits(s, ids, 4, &logits, &vocab) != LT_OK) return die("session", lt_last_error(s));
    lt_model_info info;
    lt_model_info_get(s, &info);
    printf("OK\t%s\n", info.quant);
    free(logits);
    lt_session_free(s);
    return 0;
}

static int cmd_script(int argc, char **argv) {
    lt_session *s = lt_session_new();
    for (int i = 2; i < argc; i++) {
        lt_status rc;
        char *arg = argv[i], note[64] = "";
        if (!strncmp(arg, "load=", 5)) {
            lt_load_opts o = {.device = "cpu"};
            split_src(arg + 5, &o);
            rc = lt_load(s, arg + 5, &o, NULL);
        } else if (!strncmp(arg, "saveq=", 6)) {
            rc = lt_save_quantized(s, arg + 6, "auto", NULL);
        } else if (!strcmp(arg, "logits")) {
            int32_t ids[4] = {2, 10, 20, 30};
            float *logits = NULL;
            int vocab = 0;
            rc = lt_logits(s, ids, 4, &logits, &vocab);
            double sum = 0; /* a checksum of every logit */
            for (int k = 0; rc == LT_OK && k < 4 * vocab; k++)
                sum += logits[k] * (double)(k % 97 + 1);
            if (rc == LT_OK) snprintf(note, sizeof note, "%.17g", sum);
            free(logits);
        } else {
            return die("script", "steps are load=SRC[:QUANT], saveq=DIR and logits");
        }
        if (rc == LT_OK)
            printf("OK\t%s\n", note);
        else
            printf("ERR\t%s\n", lt_last_error(s));
    }
    lt_session_free(s);
    return 0;
}

static int cmd_fit(char **argv) {
    char err[LT_ERRLEN];
    gemma3_plan plan;
    if (gemma3_plan_dir(&plan, argv[2], quant_arg(argv[3]), err) != LT_OK) return die("fit", err);
    gemma3_fit f = {.dt = LT_BF16,
                    .quant = plan.quant,
                    .fixed = plan.prequantized,
                    .nested = plan.nested,
                    .kept16 = plan.kept16};
    lt_ctx ctx;
    gemma3_model *hm = NULL, *dm = NULL;
    if (lt_ctx_init(&ctx, &lt_backend_cpu, 1) != LT_OK ||
        gemma3_load_dir_quant(&hm, argv[2], NULL, quant_arg(argv[3]), NULL, err) != LT_OK ||
        gemma3_to_device(&dm, hm, &ctx, LT_BF16, err) != LT_OK) {
        gemma3_model_free(hm);
        return die("fit", err);
    }
    printf("estimate\t%zu\narena\t%lld\n", gemma3_fit_arena(&plan.cfg, &f),
           (long long)dm->weight_bytes);
    gemma3_model_release(dm, &ctx);
    gemma3_model_free(hm);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) return die("usage", "see the header of quant_tool.c");
    if (!strcmp(argv[1], "dequant") && argc >= 5) return cmd_dequant(argv);
    if (!strcmp(argv[1], "grads") && argc >= 6) return cmd_grads(argv);
    if (!strcmp(argv[1], "dynamic") && argc >= 5) return cmd_dynamic(argv);
    if (!strcmp(argv[1], "session")) return cmd_session(argc, argv);
    if (!strcmp(argv[1], "script")) return cmd_script(argc, argv);
    if (!strcmp(argv[1], "fit") && argc >= 4) return cmd_fit(argv);
    if (!strcmp(argv[1], "pyfloat")) {
        for (int i = 2; i < argc; i++) {
            char buf[64];
            bnb_py_float(strtod(argv[i], NULL), buf, sizeof buf);
            printf("%s\n", buf);
        }
        return 0;
    }
    return cmd_codec(argc, argv);
}
