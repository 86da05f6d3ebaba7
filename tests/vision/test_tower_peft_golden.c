/* test_tower_peft_golden.c — LoRA on the image tower and projector against PEFT's golden
 * (tests/fixtures/vision_peft/, made by tests/fixtures/make_tower_peft_fixture.py on a machine
 * with torch, transformers 5 and peft >= 0.17): PEFT's adapter for the tiny model of
 * tests/fixtures/vision/hf5, adapting text q/o, the tower's q/out_proj/fc1/fc2 and the
 * projector's matrix (target_parameters).
 *
 * Checks: %lora load= reads PEFT's adapter (every module of it); the logits of the fixture's ids
 * with its image equal PEFT's; %save adapter= writes PEFT's tensor names; the loss and every
 * adapter gradient of the fixture's loss (the text after the image block, summed
 * cross-entropies) through the language model, the projector and the tower equal PEFT's
 * autograd. Without the fixture it fails and says how to make it. TAP.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda/engine.h"
#include "cuda/formats/image.h"
#include "cuda/formats/safetensors.h"
#include "cuda/model/siglip.h"
#include "cuda/train/train.h"
#include "tests/unit/tap.h"
#include "tests/unit/test_files.h"

static double rel_max(const float *a, const float *b, size_t n) {
    double e = 0, m = 1e-12;
    for (size_t i = 0; i < n; i++) {
        e = fmax(e, fabs((double)a[i] - b[i]));
        m = fmax(m, fabs((double)b[i]));
    }
    return e / m;
}

/* The adapter's logits and names through the public API. */
static void check_session(const char *vis, const char *fix, json_t *ref) {
    char hf5[4200], adapter[4200], png[4200], path[4300];
    snprintf(hf5, sizeof hf5, "%s/hf5", vis);
    snprintf(adapter, sizeof adapter, "%s/adapter", fix);
    snprintf(png, sizeof png, "%s/image.png", vis);
    lt_session *s = lt_session_new();
    lt_load_opts lo;
    lt_load_opts_default(&lo);
    lo.device = "cpu";
    lo.dtype = "fp32";
    if (lt_load(s, hf5, &lo, NULL) != LT_OK) {
        ok(0, "load vision/hf5");
        diag("%s", lt_last_error(s));
        lt_session_free(s);
        return;
    }
    lt_lora_opts o;
    lt_lora_opts_default(&o);
    o.load = adapter;
    lt_status rc = lt_lora_attach(s, &o, NULL);
    lt_lora_info info;
    lt_lora_info_get(s, &info);
    ok(rc == LT_OK && info.n_modules == json_integer_value(json_object_get(ref, "n_modules")),
       "%lora load= reads PEFT's tower + projector adapter, every module of it");
    if (rc != LT_OK) diag("%s", lt_last_error(s));
    json_t *jids = json_object_get(ref, "ids");
    int n = (int)json_array_size(jids);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(jids, (size_t)i));
    const char *one[1] = {png};
    float *lg = NULL;
    int V = 0;
    size_t cnt = 0;
    snprintf(path, sizeof path, "%s/logits.npy", fix);
    float *want = test_read_npy_f32(path, &cnt);
    rc = rc == LT_OK ? lt_logits_image(s, ids, n, one, 1, NULL, &lg, &V) : rc;
    double r = rc == LT_OK && want && cnt == (size_t)n * V ? rel_max(lg, want, cnt) : 1;
    diag("logits vs PEFT: max abs / max |logit| %.3g", r);
    ok(r < 1e-4, "the logits with PEFT's adapter equal PEFT's");
    char tmp[] = "/tmp/lathe-tower-golden-XXXXXX";
    int same = mkdtemp(tmp) && lt_save_adapter(s, tmp) == LT_OK;
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", tmp);
    st_set st;
    char err[LT_ERRLEN];
    json_t *keys = json_object_get(ref, "adapter_keys");
    if (same && st_open(&st, path, err) == LT_OK) {
        same = (size_t)st.n_tensors == json_array_size(keys);
        for (size_t i = 0; same && i < json_array_size(keys); i++)
            same = st_find(&st, json_string_value(json_array_get(keys, i))) != NULL;
        st_close(&st);
    } else {
        same = 0;
    }
    ok(same, "%save adapter= writes PEFT's tensor names, no more, no fewer");
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    if (system(cmd) != 0) diag("could not remove %s", tmp);
    free(lg);
    free(want);
    free(ids);
    lt_session_free(s);
}

/* The loss and the adapters' gradients against PEFT's autograd (engine-private API). */
static void check_grads(const char *vis, const char *fix, json_t *ref) {
    char hf5[4200], adapter[4200], png[4200], path[4300], err[LT_ERRLEN] = "";
    snprintf(hf5, sizeof hf5, "%s/hf5", vis);
    snprintf(adapter, sizeof adapter, "%s/adapter", fix);
    snprintf(png, sizeof png, "%s/image.png", vis);
    lt_ctx ctx;
    lt_ctx_init(&ctx, &lt_backend_cpu, 2);
    gemma3_model *m = NULL;
    lt_adapters *a = NULL;
    if (gemma3_load_dir(&m, hf5, "fp32", NULL, err) != LT_OK || !m->vision ||
        peft_load_adapter(&a, m, &ctx, adapter, err) != LT_OK) {
        ok(0, "load vision/hf5 and PEFT's adapter (engine)");
        diag("%s", err);
        lora_free(a);
        gemma3_model_free(m);
        lt_ctx_shutdown(&ctx);
        return;
    }
    json_t *jids = json_object_get(ref, "ids");
    int n = (int)json_array_size(jids),
        from = (int)json_integer_value(json_object_get(ref, "loss_from"));
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n), *tg = malloc(sizeof(int32_t) * (size_t)n);
    int labels = 0, nimg = 0;
    for (int i = 0; i < n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(jids, (size_t)i));
    for (int i = 0; i < n; i++) {
        tg[i] = i >= from && i + 1 < n ? ids[i + 1] : -100;
        labels += tg[i] != -100;
        nimg += ids[i] == m->cfg.vision.image_token_id;
    }
    const siglip_tower *tw = m->vision;
    int S = tw->cfg.image_size, H = m->cfg.hidden_size;
    float *px = malloc(sizeof(float) * 3 * (size_t)S * (size_t)S);
    float *rows = malloc(sizeof(float) * (size_t)nimg * (size_t)H),
          *drows = malloc(sizeof(float) * (size_t)nimg * (size_t)H);
    lt_status rc = img_load_pixels(px, png, S, err);
    if (rc == LT_OK) rc = siglip_encode(tw, &ctx, px, rows);
    int seg[1] = {n};
    train_batch b = {.ids = ids,
                     .targets = tg,
                     .seg_len = seg,
                     .n_seg = 1,
                     .N = n,
                     .n_labels = labels,
                     .image_embeds = rows,
                     .n_image_tokens = nimg,
                     .image_grads = drows};
    double loss = 0;
    lora_zero_grads(a);
    if (rc == LT_OK) rc = gemma3_train_batch(m, &ctx, lora_trainable(a), &b, 1.0f, 1, 0, &loss);
    if (rc == LT_OK) rc = siglip_backward(tw, &ctx, px, drows, 0);
    if (rc != LT_OK) diag("%s %s", err, ctx.err);
    double want = json_real_value(json_object_get(ref, "loss"));
    diag("loss %.7f, PEFT's %.7f", loss, want);
    ok(rc == LT_OK && fabs(loss - want) <= 1e-4 * fabs(want), "the loss equals PEFT's");
    snprintf(path, sizeof path, "%s/grads.safetensors", fix);
    st_set st;
    int all = rc == LT_OK && st_open(&st, path, err) == LT_OK, matched = 0;
    double worst = 0;
    for (int i = 0; all && i < a->n_slots; i++) {
        const lora_slot *s = &a->slots[i];
        char mod[256], key[300];
        lora_peft_module(a, s, mod, sizeof mod);
        int proj = s->part == LORA_PROJECTOR; /* PEFT's A is our B transposed, its B our A */
        for (int k = 0; k < 2 && all; k++) {
            snprintf(key, sizeof key, "%s.lora_%c.weight", mod, k ? 'B' : 'A');
            const st_tensor *t = st_find(&st, key);
            const lt_tensor *g = (k == 0) != proj ? &s->lora.grad_a : &s->lora.grad_b;
            int64_t r0 = g->shape[0], r1 = g->shape[1];
            if (!t || t->dtype != LT_F32 || (int64_t)(t->shape[0] * t->shape[1]) != r0 * r1) {
                all = 0;
                diag("%s: missing or mis-shaped in grads.safetensors", key);
                break;
            }
            const float *pg = t->data, *lg = g->data;
            double e = 0, mx = 1e-12;
            for (int64_t x = 0; x < r0; x++)
                for (int64_t y = 0; y < r1; y++) {
                    double p = proj ? pg[y * r0 + x] : pg[x * r1 + y];
                    e = fmax(e, fabs(p - lg[x * r1 + y]));
                    mx = fmax(mx, fabs(p));
                }
            worst = fmax(worst, e / mx);
            matched++;
        }
    }
    if (rc == LT_OK && all) st_close(&st);
    diag("%d gradients, worst max abs / max |grad| %.3g", matched, worst);
    ok(all && matched == 2 * a->n_slots && worst < 1e-3,
       "every adapter gradient (text, tower, projector) equals PEFT's autograd");
    free(px);
    free(rows);
    free(drows);
    free(ids);
    free(tg);
    lora_free(a);
    gemma3_model_free(m);
    lt_ctx_shutdown(&ctx);
}

int main(void) {
    char vis[4096], fix[4096], path[4200];
    snprintf(vis, sizeof vis, "%s/tests/fixtures/vision", test_srcdir());
    snprintf(fix, sizeof fix, "%s/tests/fixtures/vision_peft", test_srcdir());
    snprintf(path, sizeof path, "%s/reference.json", fix);
    json_error_t je;
    json_t *ref = json_load_file(path, 0, &je);
    if (!ref) {
        printf("Bail out! no %s: make it with python3 tests/fixtures/make_tower_peft_fixture.py "
               "(torch, transformers 5, peft >= 0.17) and commit tests/fixtures/vision_peft/\n",
               path);
        return 1;
    }
    check_session(vis, fix, ref);
    check_grads(vis, fix, ref);
    json_decref(ref);
    return tap_done();
}
