/* test_load_stream.c — loads that stream each weight into a backend's memory as it is finished
 * (gemma3_sink, gemma3_device_sink), on the CPU (the CPU backend stands in for the GPU).
 *
 * A counting sink wraps the device sink and checks, at every weight it is handed, that the
 * weights come one at a time in the walk's order and that the model's host storage then holds
 * this weight's bytes at most (and nothing once it is placed): the host memory of a streamed
 * quantized load stays at one tensor's worth. The streamed model's logits equal, bit for bit,
 * those of the old path (the whole host model, then gemma3_to_device) for tiny in 16 bits, NF4,
 * int8 and quant=dynamic (the same linears kept), a pre-quantized checkpoint (written by
 * quantized_save), random:270m in NF4, and the tf5 fixture's image tower lands with the same
 * bytes. Errors mid-load (a backend whose allocations fail after N of them, a tensor with a
 * wrong shape in layer 2, a truncated shard) release everything placed (the backend's live
 * allocations are back where they were; under ASan nothing leaks), and the model loaded before
 * still gives the same logits; a session keeps its model when a load fails. TAP.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/engine.h"
#include "cuda/export/quantized.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/model/model.h"
#include "cuda/model/quant_dynamic.h"
#include "cuda/model/siglip.h"
#include "tests/engine/st_write.h"
#include "tests/unit/tap.h"
#include "tests/unit/test_files.h"

#ifndef LATHE_SRCDIR
#define LATHE_SRCDIR "."
#endif

/* ---- a CPU backend that counts its allocations and can fail them -------------------------- */

static lt_backend counting_be;
static long n_allocs, n_live, fail_at = -1; /* fail_at: the allocation number that fails */

static void *count_alloc(lt_ctx *ctx, size_t bytes) {
    if (fail_at >= 0 && n_allocs >= fail_at) {
        lt_fail(ctx->err, LT_ERR_MEMORY, "injected: out of memory at allocation %ld", n_allocs);
        return NULL;
    }
    n_allocs++;
    void *p = lt_backend_cpu.alloc(ctx, bytes);
    if (p) n_live++;
    return p;
}

static void count_release(lt_ctx *ctx, void *p) {
    if (p) n_live--;
    lt_backend_cpu.release(ctx, p);
}

/* ---- the counting sink ------------------------------------------------------------------ */

typedef struct count_sink {
    gemma3_sink sink;
    const gemma3_sink *inner;
    int n_place, n_finish, n_abort;
    int in_order;        /* every name so far was the walk's next one */
    size_t allowance;    /* host bytes that may wait besides the weight (quant=dynamic's norms) */
    size_t worst_extra;  /* max over places of (live storage at entry - the weight's bytes) */
    size_t live_after;   /* max live storage just after a place */
    size_t largest;      /* the largest weight handed over, in its host bytes */
    size_t peak_at_end;  /* the storage's peak, just before finish */
    char names[512][96]; /* the order they came in */
} count_sink;

/* The host bytes of the weight whose slot is t. */
static size_t own_bytes(gemma3_model *m, const lt_tensor *t) {
    if (t->dtype == LT_U8 || t->dtype == LT_I8) {
        const lt_weight *w = gemma3_weight_owner(m, t);
        return w ? lt_weight_bytes(w) : 0;
    }
    return lt_tensor_bytes(t);
}

static lt_status cs_place(void *user, gemma3_model *m, const char *name, lt_tensor *t, char *err) {
    count_sink *c = user;
    size_t live, peak, own = own_bytes(m, t);
    gemma3_host_bytes(m, &live, &peak);
    if (live > own + c->allowance && live - own - c->allowance > c->worst_extra)
        c->worst_extra = live - own - c->allowance;
    if (own > c->largest) c->largest = own;
    if (c->n_place < 512) snprintf(c->names[c->n_place], sizeof c->names[0], "%s", name);
    c->n_place++;
    lt_status rc = c->inner->place(c->inner->user, m, name, t, err);
    gemma3_host_bytes(m, &live, &peak);
    if (live > c->allowance && live - c->allowance > c->live_after)
        c->live_after = live - c->allowance;
    return rc;
}

static lt_status cs_finish(void *user, gemma3_model *m, char *err) {
    count_sink *c = user;
    size_t live;
    gemma3_host_bytes(m, &live, &c->peak_at_end);
    c->n_finish++;
    return c->inner->finish(c->inner->user, m, err);
}

static void cs_abort(void *user, gemma3_model *m) {
    count_sink *c = user;
    c->n_abort++;
    c->inner->abort(c->inner->user, m);
}

static void count_sink_init(count_sink *c, const gemma3_sink *inner) {
    memset(c, 0, sizeof *c);
    c->inner = inner;
    c->in_order = 1;
    c->sink = (gemma3_sink){cs_place, cs_finish, cs_abort, c};
}

/* 1 when the names came in the walk's order (quant=dynamic: embedding, norm, head, then the
 * layers). */
static int walk_order(count_sink *c, gemma3_model *host, int dynamic) {
    int n = gemma3_weight_count(host), k = 0;
    if (c->n_place != n) return 0;
    char name[160];
    int L = host->cfg.num_hidden_layers, per = (n - 2 - !host->cfg.tie_word_embeddings) / L;
    for (int pass = 0; pass < (dynamic ? 2 : 1); pass++)
        for (int i = 0; i < n; i++) {
            int in_layer = i >= 1 && i <= L * per;
            if (dynamic && (pass == 0) == in_layer) continue;
            gemma3_weight_at(host, i, name, sizeof name);
            if (strcmp(name, c->names[k++]) != 0) {
                diag("place %d: got '%s', the walk has '%s'", k - 1, c->names[k - 1], name);
                return 0;
            }
        }
    return 1;
}

/* ---- logits ------------------------------------------------------------------------------ */

static const int32_t ids[] = {2, 651, 1203, 77, 3001, 18, 940, 12};
#define N_IDS ((int)(sizeof ids / sizeof ids[0]))

static float *logits_of(const gemma3_model *m, lt_ctx *ctx) {
    size_t V = (size_t)m->cfg.vocab_size;
    float *out = malloc(sizeof(float) * V * N_IDS);
    if (!out) return NULL;
    if (gemma3_forward_host(m, ctx, ids, N_IDS, NULL, out, NULL) != LT_OK) {
        diag("forward: %s", ctx->err);
        free(out);
        return NULL;
    }
    return out;
}

static int same_logits(const gemma3_model *a, lt_ctx *ca, const gemma3_model *b, lt_ctx *cb) {
    float *la = logits_of(a, ca), *lb = logits_of(b, cb);
    size_t n = sizeof(float) * (size_t)a->cfg.vocab_size * N_IDS;
    int same = la && lb && a->cfg.vocab_size == b->cfg.vocab_size && !memcmp(la, lb, n);
    free(la);
    free(lb);
    return same;
}

/* ---- one streamed load against the old path ----------------------------------------------- */

typedef struct load_case {
    const char *what;
    const char *dir;  /* a checkpoint, or NULL for random:size */
    const char *size; /* random:SIZE */
    const char *dtype, *quant;
    lt_dtype dt; /* the device dtype */
} load_case;

static int32_t calib_ids[40];

static lt_status load_any(gemma3_model **m, const load_case *lc, const gemma3_sink *sink,
                          qdyn_report *rep, char *err) {
    gemma3_load_spec spec = {.dtype = lc->dtype, .quant = lc->quant, .sink = sink};
    if (lc->quant && !strcmp(lc->quant, "dynamic")) {
        spec.quant_keep = 0.3;
        spec.calib_ids = calib_ids;
        spec.n_calib = (int)(sizeof calib_ids / sizeof *calib_ids);
        spec.n_threads = 2;
        spec.report = rep;
    }
    return lc->dir ? gemma3_load_dir_spec(m, lc->dir, &spec, NULL, err)
                   : gemma3_load_random_spec(m, lc->size, 1234, &spec, NULL, err);
}

static void check_case(const load_case *lc, lt_ctx *ctx) {
    char err[LT_ERRLEN], nm[256];
    int dynamic = lc->quant && !strcmp(lc->quant, "dynamic");
    qdyn_report r_old = {0}, r_new = {0};
    gemma3_model *host = NULL, *old = NULL, *neu = NULL;
    lt_status rc = load_any(&host, lc, NULL, &r_old, err);
    if (rc == LT_OK) rc = gemma3_to_device(&old, host, ctx, lc->dt, err);
    snprintf(nm, sizeof nm, "%s: the old path (host model, then gemma3_to_device)", lc->what);
    if (!ok(rc == LT_OK, nm)) diag("%s", err);
    long live0 = n_live;
    gemma3_device_sink ds;
    gemma3_device_sink_init(&ds, ctx, lc->dt);
    count_sink cs;
    count_sink_init(&cs, &ds.sink);
    if (dynamic && host) /* the layers' norms wait on the host until their layer is placed */
        for (int l = 0; l < host->cfg.num_hidden_layers; l++)
            cs.allowance += (4 * (size_t)host->cfg.hidden_size + 2 * (size_t)host->cfg.head_dim) *
                            sizeof(float);
    rc = load_any(&neu, lc, &cs.sink, &r_new, err);
    snprintf(nm, sizeof nm, "%s: streamed into the backend", lc->what);
    if (!ok(rc == LT_OK && neu && gemma3_on_device(neu), nm)) diag("%s", err);
    if (rc == LT_OK && host && old) {
        snprintf(nm, sizeof nm, "%s: %d weights placed one at a time in the walk's order", lc->what,
                 cs.n_place);
        ok(walk_order(&cs, host, dynamic) && cs.n_finish == 1 && cs.n_abort == 0, nm);
        snprintf(nm, sizeof nm,
                 "%s: at each place the host storage holds that weight at most (%zu bytes over)",
                 lc->what, cs.worst_extra);
        ok(cs.worst_extra == 0, nm);
        snprintf(nm, sizeof nm, "%s: and nothing once it is placed (%zu bytes left)", lc->what,
                 cs.live_after);
        ok(cs.live_after == 0, nm);
        snprintf(nm, sizeof nm,
                 "%s: the storage's peak (%zu) is at most the largest weight (%zu) "
                 "(+ waiting norms %zu)",
                 lc->what, cs.peak_at_end, cs.largest, cs.allowance);
        ok(cs.peak_at_end <= cs.largest + cs.allowance, nm);
        snprintf(nm, sizeof nm, "%s: logits equal the old path's bit for bit", lc->what);
        ok(same_logits(old, ctx, neu, ctx), nm);
        snprintf(nm, sizeof nm, "%s: the same counts and summary", lc->what);
        char q1[128], q2[128];
        gemma3_quant_summary(old, q1, sizeof q1);
        gemma3_quant_summary(neu, q2, sizeof q2);
        ok(!strcmp(q1, q2) && old->n_params == neu->n_params && old->dtype == neu->dtype &&
               neu->storage == NULL,
           nm);
        if (strcmp(q1, q2)) diag("'%s' vs '%s'", q1, q2);
        if (dynamic) {
            int same = r_old.mods && r_new.mods && r_old.info.n_modules == r_new.info.n_modules;
            int n_kept = 0;
            for (int i = 0; same && i < r_old.info.n_modules; i++) {
                same = r_old.mods[i].kept == r_new.mods[i].kept &&
                       r_old.mods[i].output_error == r_new.mods[i].output_error;
                n_kept += r_old.mods[i].kept;
            }
            snprintf(nm, sizeof nm, "%s: the same measures and the same %d linears kept", lc->what,
                     n_kept);
            ok(same && n_kept > 0, nm);
        }
    }
    gemma3_model_release(neu, ctx);
    snprintf(nm, sizeof nm, "%s: releasing it gives every allocation back", lc->what);
    is_int(n_live, live0, nm);
    gemma3_model_release(old, ctx);
    gemma3_model_free(host);
    qdyn_report_free(&r_old);
    qdyn_report_free(&r_new);
}

/* ---- the image tower ----------------------------------------------------------------------- */

static int same_tensor(const lt_tensor *a, const lt_tensor *b) {
    return a->dtype == b->dtype && lt_tensor_numel(a) == lt_tensor_numel(b) &&
           !memcmp(a->data, b->data, lt_tensor_bytes(a));
}

static void check_vision(lt_ctx *ctx) {
    char err[LT_ERRLEN], dir[4096];
    snprintf(dir, sizeof dir, "%s/tests/fixtures/tf5", test_srcdir());
    gemma3_model *host = NULL, *old = NULL, *neu = NULL;
    lt_status rc = gemma3_load_dir_quant(&host, dir, "auto", "nf4", NULL, err);
    if (rc == LT_OK) rc = gemma3_to_device(&old, host, ctx, LT_BF16, err);
    gemma3_device_sink ds;
    gemma3_device_sink_init(&ds, ctx, LT_BF16);
    gemma3_load_spec spec = {.dtype = "auto", .quant = "nf4", .sink = &ds.sink};
    if (rc == LT_OK) rc = gemma3_load_dir_spec(&neu, dir, &spec, NULL, err);
    ok(rc == LT_OK && old && old->vision && neu && neu->vision,
       "tf5 streamed (3 shards, nf4, bf16): its image tower is on the backend");
    if (rc != LT_OK || !old->vision || !neu || !neu->vision) {
        diag("%s", err);
    } else {
        const siglip_tower *a = old->vision, *b = neu->vision;
        int same = a->cfg.num_hidden_layers == b->cfg.num_hidden_layers &&
                   same_tensor(&a->patch.w, &b->patch.w) && same_tensor(&a->pos, &b->pos) &&
                   same_tensor(&a->post_w, &b->post_w) && same_tensor(&a->mm_norm, &b->mm_norm) &&
                   same_tensor(&a->mm_proj.w, &b->mm_proj.w);
        for (int l = 0; same && l < a->cfg.num_hidden_layers; l++) {
            const siglip_layer *x = &a->layers[l], *y = &b->layers[l];
            same = same_tensor(&x->q.w, &y->q.w) && same_tensor(&x->k.w, &y->k.w) &&
                   same_tensor(&x->v.w, &y->v.w) && same_tensor(&x->o.w, &y->o.w) &&
                   same_tensor(&x->fc1.w, &y->fc1.w) && same_tensor(&x->fc2.w, &y->fc2.w) &&
                   same_tensor(&x->ln1_w, &y->ln1_w) && same_tensor(&x->fc1_b, &y->fc1_b);
        }
        ok(same, "the streamed tower's tensors equal gemma3_to_device's");
        ok(same_logits(old, ctx, neu, ctx), "tf5: logits equal the old path's bit for bit");
    }
    gemma3_model_release(neu, ctx);
    gemma3_model_release(old, ctx);
    gemma3_model_free(host);
}

/* ---- errors mid-load ------------------------------------------------------------------------ */

static int copy_file(const char *from, const char *to, long truncate_to) {
    FILE *f = fopen(from, "rb"), *g = fopen(to, "wb");
    int rc = f && g ? 0 : -1;
    char buf[65536];
    long done = 0;
    size_t k;
    while (rc == 0 && (k = fread(buf, 1, sizeof buf, f)) > 0) {
        if (truncate_to >= 0 && done + (long)k > truncate_to) k = (size_t)(truncate_to - done);
        if (fwrite(buf, 1, k, g) != k) rc = -1;
        done += (long)k;
        if (truncate_to >= 0 && done >= truncate_to) break;
    }
    if (f) fclose(f);
    if (g && fclose(g) != 0) rc = -1;
    return rc;
}

static void check_errors(lt_ctx *ctx, const char *tmp) {
    char err[LT_ERRLEN], tiny[4096], nm[256];
    snprintf(tiny, sizeof tiny, "%s/models/tiny", test_srcdir());
    /* the model loaded before: streamed, nf4 */
    gemma3_device_sink ds;
    gemma3_device_sink_init(&ds, ctx, LT_BF16);
    gemma3_load_spec spec = {.dtype = "auto", .quant = "nf4", .sink = &ds.sink};
    gemma3_model *a = NULL;
    if (gemma3_load_dir_spec(&a, tiny, &spec, NULL, err) != LT_OK) {
        ok(0, "errors: the first model loads");
        diag("%s", err);
        return;
    }
    float *la = logits_of(a, ctx);
    long live0 = n_live, start = n_allocs;
    /* a full streamed load of tiny int8 takes this many allocations */
    gemma3_model *b = NULL;
    gemma3_device_sink_init(&ds, ctx, LT_F16);
    gemma3_load_spec sb = {.dtype = "auto", .quant = "int8", .sink = &ds.sink};
    ok(gemma3_load_dir_spec(&b, tiny, &sb, NULL, err) == LT_OK, "errors: tiny int8 streams");
    long per_load = n_allocs - start;
    gemma3_model_release(b, ctx);
    long at[] = {0, 1, per_load / 2, per_load - 1};
    for (size_t i = 0; i < sizeof at / sizeof *at; i++) {
        b = NULL;
        fail_at = n_allocs + at[i];
        gemma3_device_sink_init(&ds, ctx, LT_F16);
        lt_status rc = gemma3_load_dir_spec(&b, tiny, &sb, NULL, err);
        fail_at = -1;
        snprintf(nm, sizeof nm,
                 "errors: allocation %ld of %ld fails: the load fails, every allocation is back",
                 at[i] + 1, per_load);
        ok(rc == LT_ERR_MEMORY && !b && n_live == live0 && strstr(err, "injected"), nm);
        if (rc == LT_OK) gemma3_model_release(b, ctx);
        diag("%s", err);
    }
    /* a tensor with a wrong shape in layer 2: found once layers 0 and 1 are placed */
    char bad[900];
    snprintf(bad, sizeof bad, "%s/bad", tmp);
    tiny_spec ts = {.V = 256,
                    .H = 64,
                    .I = 128,
                    .L = 4,
                    .nh = 2,
                    .nkv = 1,
                    .hd = 32,
                    .window = 16,
                    .qpas = 32,
                    .prefix = "model.",
                    .bad_shape = "layers.2.mlp.up_proj"};
    int wrote = mkdir(bad, 0755) == 0 && tiny_ckpt_write(bad, &ts) == 0;
    count_sink cs;
    gemma3_device_sink_init(&ds, ctx, LT_BF16);
    count_sink_init(&cs, &ds.sink);
    gemma3_load_spec sc = {.dtype = "auto", .quant = "nf4", .sink = &cs.sink};
    b = NULL;
    lt_status rc = wrote ? gemma3_load_dir_spec(&b, bad, &sc, NULL, err) : LT_ERR_IO;
    ok(rc == LT_ERR_FORMAT && !b && cs.n_place > 13 && cs.n_abort == 1 && n_live == live0 &&
           strstr(err, "layers.2.mlp.up_proj"),
       "errors: a bad shape in layer 2 fails after layers 0 and 1 were placed; all given back");
    diag("%d placed; %s", cs.n_place, err);
    /* a truncated shard (tf5's second of three) */
    char tdir[4096], from[4200], to[4200];
    snprintf(tdir, sizeof tdir, "%s/tf5", tmp);
    int ok_copy = mkdir(tdir, 0755) == 0;
    const char *files[] = {"config.json",
                           "model.safetensors.index.json",
                           "model-00001-of-00003.safetensors",
                           "model-00002-of-00003.safetensors",
                           "model-00003-of-00003.safetensors",
                           "tokenizer.model"};
    for (size_t i = 0; ok_copy && i < sizeof files / sizeof *files; i++) {
        snprintf(from, sizeof from, "%s/tests/fixtures/tf5/%s", test_srcdir(), files[i]);
        snprintf(to, sizeof to, "%s/%s", tdir, files[i]);
        ok_copy = copy_file(from, to, i == 3 ? 4000 : -1) == 0;
    }
    gemma3_device_sink_init(&ds, ctx, LT_BF16);
    gemma3_load_spec st = {.dtype = "auto", .quant = "nf4", .sink = &ds.sink};
    b = NULL;
    rc = ok_copy ? gemma3_load_dir_spec(&b, tdir, &st, NULL, err) : LT_ERR_IO;
    ok(rc != LT_OK && !b && n_live == live0, "errors: a truncated shard fails, nothing is held");
    diag("%s", err);
    float *la2 = logits_of(a, ctx);
    ok(la && la2 && !memcmp(la, la2, sizeof(float) * (size_t)a->cfg.vocab_size * (size_t)N_IDS),
       "errors: the model loaded before gives the same logits after every failed load");
    free(la);
    free(la2);
    gemma3_model_release(a, ctx);

    /* a session keeps its model when a load fails (the swap-in happens only on success) */
    lt_session *s = lt_session_new();
    lt_load_opts o;
    lt_load_opts_default(&o);
    o.device = "cpu";
    float *l1 = NULL, *l2 = NULL;
    int v1 = 0, v2 = 0;
    int okl =
        s && lt_load(s, "tiny", &o, NULL) == LT_OK && lt_logits(s, ids, N_IDS, &l1, &v1) == LT_OK;
    o.quant = "nf4";
    lt_status frc = okl ? lt_load(s, tdir, &o, NULL) : LT_OK;
    int okr = okl && frc != LT_OK && lt_logits(s, ids, N_IDS, &l2, &v2) == LT_OK && v1 == v2 &&
              !memcmp(l1, l2, sizeof(float) * (size_t)v1 * N_IDS);
    ok(okr, "session: a load of the truncated checkpoint fails and the model before still runs");
    free(l1);
    free(l2);
    lt_session_free(s);
}

/* ---- the plan: what the fit check knows before a weight is read ------------------------------ */

static void check_plan(const char *tiny, const char *pq) {
    char err[LT_ERRLEN];
    gemma3_plan p;
    ok(gemma3_plan_dir(&p, tiny, "nf4", err) == LT_OK && !strcmp(p.quant, "nf4") &&
           !p.prequantized && p.cfg.hidden_size == 128,
       "plan: tiny quant=nf4 (config.json only)");
    ok(gemma3_plan_dir(&p, tiny, NULL, err) == LT_OK && !strcmp(p.quant, "none"),
       "plan: tiny without quant= is 16-bit");
    ok(gemma3_plan_dir(&p, pq, NULL, err) == LT_OK && !strcmp(p.quant, "nf4") && p.prequantized,
       "plan: a pre-quantized checkpoint says nf4, fixed");
    ok(gemma3_plan_dir(&p, pq, "dynamic", err) == LT_ERR_ARG && strstr(err, "already quantized"),
       "plan: quant=dynamic on a pre-quantized checkpoint is refused as the load refuses it");
    ok(gemma3_plan_dir(&p, tiny, "nf5", err) == LT_ERR_ARG, "plan: an unknown quant is refused");
    ok(gemma3_plan_random(&p, "27b", "dynamic", err) == LT_OK && !strcmp(p.quant, "dynamic") &&
           p.cfg.hidden_size == 5376 && p.cfg.num_hidden_layers == 62,
       "plan: random:27b quant=dynamic");
    /* quant=dynamic's estimate follows quant_keep: NF4 + keep of the 16-bit linears + stage */
    size_t nf4 = gemma3_device_bytes(&p.cfg, LT_BF16, "nf4"),
           all16 = gemma3_device_bytes(&p.cfg, LT_BF16, "none"), stage = (size_t)64 << 20;
    size_t need = nf4 + (size_t)(0.5 * (double)(all16 - nf4)) + stage;
    gemma3_fit f = {
        .name = "random:27b", .dt = LT_BF16, .quant = "dynamic", .keep_given = 1, .keep = 0.5};
    ok(gemma3_fit_check(&p.cfg, &f, need, err) == LT_OK &&
           gemma3_fit_check(&p.cfg, &f, need - 1, err) == LT_ERR_MEMORY,
       "fit: quant=dynamic quant_keep=0.5 needs NF4 + half the 16-bit linears, exactly");
    f.keep = 0;
    ok(gemma3_fit_check(&p.cfg, &f, nf4 + stage, err) == LT_OK, "fit: quant_keep=0 is nf4's size");
}

int main(void) {
    char err[LT_ERRLEN], tiny[4096], pq[4096], tmp[] = "/tmp/lathe-stream-XXXXXX";
    counting_be = lt_backend_cpu;
    counting_be.alloc = count_alloc;
    counting_be.release = count_release;
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &counting_be, 2) != LT_OK || !mkdtemp(tmp)) {
        printf("Bail out! cannot start the backend\n");
        return 1;
    }
    for (int i = 0; i < (int)(sizeof calib_ids / sizeof *calib_ids); i++)
        calib_ids[i] = i ? 5 + (i * 97) % 4000 : 2;
    snprintf(tiny, sizeof tiny, "%s/models/tiny", test_srcdir());

    /* a pre-quantized checkpoint (bitsandbytes' layout, nf4 with double quantization) */
    snprintf(pq, sizeof pq, "%s/pq", tmp);
    char tokp[4200];
    snprintf(tokp, sizeof tokp, "%s/tokenizer.model", tiny);
    gemma3_model *hq = NULL;
    lt_status rc = gemma3_load_dir_quant(&hq, tiny, "auto", "nf4", NULL, err);
    if (rc == LT_OK) rc = quantized_save(NULL, hq, NULL, tiny, tokp, "auto", pq, NULL, err);
    if (!ok(rc == LT_OK, "a pre-quantized tiny written by quantized_save")) diag("%s", err);
    gemma3_model_free(hq);

    const load_case cases[] = {
        {"tiny fp32", tiny, NULL, "auto", NULL, LT_F32},
        {"tiny auto -> bf16 on the backend", tiny, NULL, "auto", NULL, LT_BF16},
        {"tiny dtype=bf16", tiny, NULL, "bf16", "none", LT_BF16},
        {"tiny nf4", tiny, NULL, "auto", "nf4", LT_BF16},
        {"tiny nf4 dtype=fp16", tiny, NULL, "fp16", "nf4", LT_F16},
        {"tiny int8", tiny, NULL, "bf16", "int8", LT_BF16},
        {"tiny dynamic", tiny, NULL, "bf16", "dynamic", LT_BF16},
        {"pre-quantized tiny", pq, NULL, "auto", NULL, LT_BF16},
        {"random:270m nf4", NULL, "270m", "bf16", "nf4", LT_BF16},
    };
    check_plan(tiny, pq);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        check_case(&cases[i], &ctx);
    check_vision(&ctx);
    check_errors(&ctx, tmp);
    is_int(n_live, 0, "every backend allocation was released");
    lt_ctx_shutdown(&ctx);
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0) diag("could not remove %s", tmp);
    return tap_done();
}
