/* test_grpo_parity.c — one GRPO step's loss and adapter gradient against transformers + peft.
 *
 * tests/fixtures/grpo/ holds what tests/fixtures/make_grpo_fixture.py computed with torch
 * autograd on models/tiny with the PEFT adapter tests/fixtures/peft/final: 2 prompts x group 4
 * fixed completions with fixed rewards, and for each case (loss type dapo / grpo / bnpo /
 * dr_grpo, beta 0 or not, a temperature, micro-batches of 4 or 8) TRL's loss and the gradient of
 * every lora_A / lora_B. lathe computes the same step with grpo_grads_given — the code %grpo
 * runs after sampling: advantages, the reference pass with the adapters off, the weighted fused
 * cross-entropy and the backward — on the CPU (fp32: loss to 1e-5, gradients to 1e-4) and, when
 * a GPU is present, on CUDA in fp32 (1e-3) and bf16 (3e-2). Without the fixture it prints a skip
 * plan naming the script. Owns nothing else.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <jansson.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/formats/safetensors.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/train/train.h"
#include "tests/unit/tap.h"
#ifdef HAVE_CUDA
#include "cuda/backend/cuda/backend_cuda.h"
#endif

static char root[1024], fix[1200];

typedef struct given_data {
    grpo_given g;
    int group, rows;
    int32_t **prompt, **comp;
    int *plen, *clen;
    double *reward;
} given_data;

static int32_t *ids_of(json_t *arr, int *n) {
    *n = (int)json_array_size(arr);
    int32_t *v = malloc(sizeof(int32_t) * (size_t)(*n + 1));
    for (int i = 0; v && i < *n; i++)
        v[i] = (int32_t)json_integer_value(json_array_get(arr, (size_t)i));
    return v;
}

static int given_load(given_data *d, const char *path) {
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) return -1;
    json_t *pr = json_object_get(j, "prompts"), *co = json_object_get(j, "completions"),
           *rw = json_object_get(j, "rewards");
    memset(d, 0, sizeof *d);
    d->group = (int)json_integer_value(json_object_get(j, "group"));
    int np = (int)json_array_size(pr);
    d->rows = (int)json_array_size(co);
    d->prompt = calloc((size_t)np, sizeof *d->prompt);
    d->plen = calloc((size_t)np, sizeof(int));
    d->comp = calloc((size_t)d->rows, sizeof *d->comp);
    d->clen = calloc((size_t)d->rows, sizeof(int));
    d->reward = calloc((size_t)d->rows, sizeof(double));
    for (int p = 0; p < np; p++)
        d->prompt[p] = ids_of(json_array_get(pr, (size_t)p), &d->plen[p]);
    for (int r = 0; r < d->rows; r++) {
        d->comp[r] = ids_of(json_array_get(co, (size_t)r), &d->clen[r]);
        d->reward[r] = json_number_value(json_array_get(rw, (size_t)r));
    }
    d->g = (grpo_given){np,      (const int32_t *const *)d->prompt,
                        d->plen, (const int32_t *const *)d->comp,
                        d->clen, d->reward};
    json_decref(j);
    return d->group > 0 && np * d->group == d->rows ? 0 : -1;
}

/* ‖lathe − torch‖ / ‖torch‖ over every adapter gradient; the torch ones from grads_file. */
static double grads_rel(lt_adapters *a, lt_ctx *ctx, const char *grads_file) {
    st_set st = {0};
    char err[LT_ERRLEN];
    if (st_open_file(&st, grads_file, err) != LT_OK) {
        diag("%s", err);
        return INFINITY;
    }
    double num = 0, den = 0;
    int missing = 0;
    for (int i = 0; i < a->n_slots; i++)
        for (int k = 0; k < 2; k++) {
            const lt_tensor *g = k ? &a->slots[i].lora.grad_b : &a->slots[i].lora.grad_a;
            char key[240];
            snprintf(key, sizeof key, "%s.lora_%c.weight", a->slots[i].module, k ? 'B' : 'A');
            const st_tensor *t = st_find(&st, key);
            int64_t n = lt_tensor_numel(g);
            float *want = malloc(sizeof(float) * (size_t)n),
                  *got = malloc(sizeof(float) * (size_t)n);
            if (!t || (int64_t)(t->nbytes / lt_dtype_size(t->dtype)) != n ||
                st_convert(t, want, LT_F32) != LT_OK ||
                ctx->be->download(ctx, got, g->data, sizeof(float) * (size_t)n) != LT_OK) {
                if (!missing++) diag("gradient %s: missing or of another size", key);
                free(want), free(got);
                continue;
            }
            for (int64_t e = 0; e < n; e++) {
                double dd = (double)got[e] - want[e];
                num += isfinite(got[e]) ? dd * dd : INFINITY;
                den += (double)want[e] * want[e];
            }
            free(want), free(got);
        }
    st_close(&st);
    if (missing) return INFINITY;
    return den > 0 ? sqrt(num / den) : INFINITY;
}

/* Every case of the fixture on one backend: loss and gradients within the tolerances. */
static void run_cases(const char *where, gemma3_model *m, lt_ctx *ctx, given_data *d, json_t *cases,
                      double loss_tol, double grad_tol) {
    char err[LT_ERRLEN], adir[1400];
    snprintf(adir, sizeof adir, "%s/tests/fixtures/peft/final", root);
    lt_adapters *a = NULL;
    char name_buf[1400];
    if (peft_load_adapter(&a, m, ctx, adir, err) != LT_OK) {
        snprintf(name_buf, sizeof name_buf, "%s: the PEFT adapter loads (%s)", where, err);
        ok(0, name_buf);
        return;
    }
    atomic_int cancel = 0;
    trainer_env env = {m, NULL, ctx, &cancel, 0};
    for (size_t c = 0; c < json_array_size(cases); c++) {
        json_t *cs = json_array_get(cases, c);
        const char *name = json_string_value(json_object_get(cs, "name"));
        lt_grpo_opts o;
        lt_grpo_opts_default(&o);
        o.data = "given";
        o.reward = "given";
        o.group = d->group;
        o.batch = d->g.n_prompts;
        o.micro = (int)json_integer_value(json_object_get(cs, "micro"));
        o.loss = json_string_value(json_object_get(cs, "loss"));
        o.beta = (float)json_number_value(json_object_get(cs, "beta"));
        o.temperature = (float)json_number_value(json_object_get(cs, "temperature"));
        o.epsilon = (float)json_number_value(json_object_get(cs, "epsilon"));
        o.epsilon_high = (float)json_number_value(json_object_get(cs, "epsilon_high"));
        o.max_completion = (int)json_integer_value(json_object_get(cs, "max_completion"));
        o.scale_rewards = "group";
        double loss = NAN, want = json_number_value(json_object_get(cs, "loss_value"));
        lt_status rc = grpo_grads_given(a, &env, &o, &d->g, &loss, err);
        if (rc != LT_OK) diag("%s %s: %s", where, name, err);
        double lrel = fabs(loss - want) / fmax(fabs(want), 1e-12);
        snprintf(name_buf, sizeof name_buf, "%s %s: loss %.9g vs torch %.9g (rel %.1e <= %.0e)",
                 where, name, loss, want, lrel, loss_tol);
        ok(rc == LT_OK && lrel <= loss_tol, name_buf);
        char gf[1400];
        snprintf(gf, sizeof gf, "%s/%s", fix, json_string_value(json_object_get(cs, "grads")));
        double grel = rc == LT_OK ? grads_rel(a, ctx, gf) : INFINITY;
        snprintf(name_buf, sizeof name_buf,
                 "%s %s: adapter gradients vs torch + peft rel %.1e <= %.0e", where, name, grel,
                 grad_tol);
        ok(grel <= grad_tol, name_buf);
    }
    lora_free(a);
}

int main(void) {
    const char *src = getenv("LATHE_SRCDIR");
#ifdef LATHE_SRCDIR
    if (!src || !*src) src = LATHE_SRCDIR;
#endif
    snprintf(root, sizeof root, "%s", src && *src ? src : ".");
    snprintf(fix, sizeof fix, "%s/tests/fixtures/grpo", root);
    char refp[1300], inp[1300], tiny[1300], err[LT_ERRLEN];
    snprintf(refp, sizeof refp, "%s/reference.json", fix);
    snprintf(inp, sizeof inp, "%s/input.json", fix);
    snprintf(tiny, sizeof tiny, "%s/models/tiny", root);
    json_error_t je;
    json_t *ref = json_load_file(refp, 0, &je);
    given_data d;
    if (!ref) {
        printf("1..0 # SKIP %s is not made yet (python3 tests/fixtures/make_grpo_fixture.py on "
               "the GPU machine, where torch and peft are)\n",
               refp);
        return 0;
    }
    json_t *cases = json_object_get(ref, "cases");
    if (given_load(&d, inp) != 0 || json_array_size(cases) == 0) {
        ok(0, "the fixture's input.json and cases read");
        return tap_done();
    }
    lt_ctx cpu;
    gemma3_model *hm = NULL;
    if (lt_ctx_init(&cpu, &lt_backend_cpu, 0) != LT_OK ||
        gemma3_load_dir(&hm, tiny, "fp32", NULL, err) != LT_OK) {
        diag("%s", err);
        ok(0, "models/tiny loads");
        return tap_done();
    }
    run_cases("cpu", hm, &cpu, &d, cases, 1e-5, 1e-4);
#ifdef HAVE_CUDA
    if (lt_cuda_device_count() > 0) {
        lt_dtype dts[2] = {LT_F32, LT_BF16};
        double lt[2] = {1e-3, 3e-2}, gt[2] = {1e-3, 3e-2};
        for (int i = 0; i < 2; i++) {
            lt_ctx gpu;
            gemma3_model *dm = NULL;
            if (lt_ctx_init(&gpu, &lt_backend_cuda, 0) != LT_OK ||
                lt_cuda_set_precision(&gpu, dts[i]) != LT_OK ||
                gemma3_to_device(&dm, hm, &gpu, dts[i], err) != LT_OK) {
                diag("%s", err);
                ok(0, "models/tiny on cuda");
                continue;
            }
            run_cases(dts[i] == LT_F32 ? "cuda fp32" : "cuda bf16", dm, &gpu, &d, cases, lt[i],
                      gt[i]);
            gemma3_model_release(dm, &gpu);
            lt_ctx_shutdown(&gpu);
        }
    } else {
        diag("no CUDA device: the CUDA half runs on the GPU machine (bench/run-bench.sh checks)");
    }
#endif
    gemma3_model_free(hm);
    lt_ctx_shutdown(&cpu);
    json_decref(ref);
    return tap_done();
}
