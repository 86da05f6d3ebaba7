/* test_rollout.c — gemma3_rollout (model/rollout.c), the batched sampler GRPO runs, on a micro
 * Gemma 3 built in memory (2 layers: one sliding with a window of 4, one full; GQA 2:1; random
 * norms; fp32 weights) on the CPU backend, wrapped to count its allocations; once with the
 * attention_rows op and once without it (one attention op per row).
 *
 * Checks: at temperature 0 every row equals one-sequence greedy generation (gemma3_forward
 * with a gemma3_cache, argmax) token for token, for 3 prompts of different lengths x group 4,
 * long enough that the sliding layer's ring (window + GEMMA3_CHUNK slots) wraps; sampled rows
 * equal one-sequence sampling replayed with rollout_row_seed (rows stopping at different steps
 * leave the batch), with and without truncation; the same seed gives the same rows, row j of a
 * prompt is the same with group 4 or 2, rows of a group differ; stop ids end a row and are
 * kept, flags and lengths agree; with a vocabulary wide enough that the draws spread over
 * threads, rows are still reproducible and equal their replays; bad input is refused naming the
 * problem; a cancel before or during the call returns LT_CANCELLED with nothing left behind; the
 * backend memory the call takes at its peak is within gemma3_rollout_bytes.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/model/rollout.h"
#include "cuda/model/sample.h"
#include "tests/unit/tap.h"

/* ---- a CPU backend that counts what it hands out ------------------------------------------- */

static lt_backend counting, per_row; /* per_row: no attention_rows (one attention op per row) */
static long live_blocks;
static size_t live_bytes, peak_bytes;
static int downloads, cancel_at_download; /* raise `cancel` at that download (0 = never) */
static atomic_int cancel;

static void *cnt_alloc(lt_ctx *ctx, size_t bytes) {
    (void)ctx;
    size_t *p = calloc(1, bytes + 16);
    if (!p) return NULL;
    p[0] = bytes;
    live_blocks++;
    live_bytes += bytes;
    if (live_bytes > peak_bytes) peak_bytes = live_bytes;
    return (char *)p + 16;
}

static void cnt_release(lt_ctx *ctx, void *q) {
    (void)ctx;
    if (!q) return;
    size_t *p = (size_t *)((char *)q - 16);
    live_blocks--;
    live_bytes -= p[0];
    free(p);
}

static lt_status cnt_download(lt_ctx *ctx, void *dst, const void *src, size_t bytes) {
    if (++downloads == cancel_at_download) atomic_store(&cancel, 1);
    return lt_backend_cpu.download(ctx, dst, src, bytes);
}

static lt_ctx ctx;

/* ---- the micro model -------------------------------------------------------------------- */

static uint64_t rng = 1234;

static float frand(void) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static lt_tensor rand_t(int64_t a, int64_t b, float amp) {
    int64_t n = a * (b ? b : 1);
    float *p = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        p[i] = amp * frand();
    return b ? lt_tensor_2d(LT_F32, p, a, b) : lt_tensor_1d(LT_F32, p, a);
}

enum { H = 16, I = 24, QD = 16, KD = 8, HD = 8, V = 48, NL = 2 };

static gemma3_model *micro_model(int vocab) {
    gemma3_model *m = calloc(1, sizeof *m);
    gemma3_config *c = &m->cfg;
    gemma3_config_defaults(c);
    c->hidden_size = H;
    c->intermediate_size = I;
    c->num_hidden_layers = NL;
    c->num_attention_heads = 2;
    c->num_key_value_heads = 1;
    c->head_dim = HD;
    c->vocab_size = vocab;
    c->sliding_window = 4;
    c->query_pre_attn_scalar = 8;
    c->rms_norm_eps = 1e-6;
    c->layer_types[0] = GEMMA3_SLIDING;
    c->layer_types[1] = GEMMA3_FULL;
    c->rope[GEMMA3_SLIDING].theta = 10000;
    c->rope[GEMMA3_SLIDING].factor = 1;
    c->rope[GEMMA3_FULL].theta = 1e6;
    c->rope[GEMMA3_FULL].factor = 1;
    c->n_eos_ids = 0; /* no stop ids unless a test sets them */
    m->embed_tokens.w = rand_t(vocab, H, 1.0f);
    m->norm = rand_t(H, 0, 0.3f);
    m->layers = calloc(NL, sizeof(gemma3_layer));
    for (int l = 0; l < NL; l++) {
        gemma3_layer *L = &m->layers[l];
        L->input_layernorm = rand_t(H, 0, 0.3f);
        L->post_attention_layernorm = rand_t(H, 0, 0.3f);
        L->pre_feedforward_layernorm = rand_t(H, 0, 0.3f);
        L->post_feedforward_layernorm = rand_t(H, 0, 0.3f);
        L->q_norm = rand_t(HD, 0, 0.3f);
        L->k_norm = rand_t(HD, 0, 0.3f);
        L->q_proj.w = rand_t(QD, H, 0.5f);
        L->k_proj.w = rand_t(KD, H, 0.5f);
        L->v_proj.w = rand_t(KD, H, 0.5f);
        L->o_proj.w = rand_t(H, QD, 0.5f);
        L->gate_proj.w = rand_t(I, H, 0.5f);
        L->up_proj.w = rand_t(I, H, 0.5f);
        L->down_proj.w = rand_t(H, I, 0.5f);
    }
    m->dtype = LT_F32;
    return m;
}

static void micro_free(gemma3_model *m) {
    free(m->embed_tokens.w.data);
    free(m->norm.data);
    for (int l = 0; l < NL; l++) {
        gemma3_layer *L = &m->layers[l];
        lt_tensor *ts[] = {&L->input_layernorm,
                           &L->post_attention_layernorm,
                           &L->pre_feedforward_layernorm,
                           &L->post_feedforward_layernorm,
                           &L->q_norm,
                           &L->k_norm,
                           &L->q_proj.w,
                           &L->k_proj.w,
                           &L->v_proj.w,
                           &L->o_proj.w,
                           &L->gate_proj.w,
                           &L->up_proj.w,
                           &L->down_proj.w};
        for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
            free(ts[i]->data);
    }
    free(m->layers);
    free(m);
}

static gemma3_model *M;

/* ---- the one-sequence reference ---------------------------------------------------------- */

/* Generates up to o->max_new tokens after prompt, one gemma3_forward per token on a
 * gemma3_cache of max_seq, sampling with an RNG seeded by `seed`, ending at a stop id (kept).
 * Returns the count; *stopped = 1 when it ended at a stop id. */
static int reference(const int32_t *prompt, int P, const lt_gen_opts *o, uint64_t seed, int max_seq,
                     int32_t *out, int *stopped) {
    gemma3_cache c;
    lt_rng r;
    int n = 0, vocab = M->cfg.vocab_size;
    float *last = malloc(sizeof(float) * (size_t)vocab);
    *stopped = 0;
    rng_seed(&r, seed);
    if (gemma3_cache_init(&c, &ctx, &M->cfg, max_seq) != LT_OK) return -1;
    gemma3_outputs fo = {.last_logits = last};
    lt_status rc = gemma3_forward(M, &ctx, prompt, P, &c, &fo);
    while (rc == LT_OK && n < o->max_new) {
        int id = sampler_pick(last, vocab, o, &r);
        out[n++] = id;
        if (gemma3_is_stop(&M->cfg, id)) {
            *stopped = 1;
            break;
        }
        if (n < o->max_new) rc = gemma3_forward(M, &ctx, &id, 1, &c, &fo);
    }
    gemma3_cache_free(&c, &ctx);
    free(last);
    return rc == LT_OK ? n : -1;
}

/* Three prompts of different lengths. */
static int32_t p0[] = {2, 7, 11};
static int32_t p1[] = {2, 30, 4, 4, 19, 8, 1, 44, 45, 3, 12, 9, 27, 6, 33, 21, 17};
static int32_t p2[40];
static const int32_t *prompts[3] = {p0, p1, p2};
static int plen[3] = {3, 17, 40};

static lt_gen_opts opts(int max_new, float temperature, uint64_t seed) {
    lt_gen_opts o;
    lt_gen_opts_default(&o);
    o.max_new = max_new;
    o.temperature = temperature;
    o.top_k = 0;
    o.top_p = 1;
    o.min_p = 0;
    o.seed = seed;
    return o;
}

/* Every row of out equals the reference replay of its (prompt, j); returns the rows that do. */
static int rows_match_reference(const rollout_out *out, int n_prompts, int group,
                                const lt_gen_opts *o, int max_seq) {
    int good = 0;
    int32_t *ref = malloc(sizeof(int32_t) * (size_t)o->max_new);
    for (int r = 0; r < n_prompts * group; r++) {
        int p = r / group, j = r % group, stopped;
        int n = reference(prompts[p], plen[p], o, rollout_row_seed(o->seed, p, j), max_seq, ref,
                          &stopped);
        int same =
            n == out->len[r] && stopped == out->stopped[r] &&
            !memcmp(ref, out->ids + (size_t)r * (size_t)out->max_new, sizeof(int32_t) * (size_t)n);
        if (!same)
            diag("row %d: reference %d tokens (stopped %d), rollout %d (stopped %d)", r, n, stopped,
                 out->len[r], out->stopped[r]);
        good += same;
    }
    free(ref);
    return good;
}

static lt_status run(int n_prompts, int group, const lt_gen_opts *o, int max_seq, rollout_out *out,
                     char *err) {
    return gemma3_rollout(M, &ctx, prompts, plen, n_prompts, group, o, max_seq, &cancel, out, err);
}

/* ---- the checks ------------------------------------------------------------------------- */

static void test_greedy(void) {
    char err[LT_ERRLEN] = "";
    int max_new = 300, max_seq = 400; /* 40 + 300 > 4 + 256: the sliding ring wraps */
    lt_gen_opts o = opts(max_new, 0, 1);
    rollout_out out;
    peak_bytes = live_bytes;
    size_t before = live_bytes;
    lt_status rc = run(3, 4, &o, max_seq, &out, err);
    if (!ok(rc == LT_OK, "greedy rollout of 3 prompts x group 4 runs")) diag("%s", err);
    if (rc != LT_OK) return;
    is_int(out.n_rows, 12, "n_rows = n_prompts * group");
    is_int(out.new_tokens, 12 * max_new, "every row runs to max_new (no stop ids)");
    is_int(out.prefill_tokens, 3 + 17 + 40, "each prompt is prefilled once");
    int clipped = 1;
    for (int r = 0; r < 12; r++)
        clipped &= out.len[r] == max_new && out.stopped[r] == 0;
    ok(clipped, "rows that reach max_new: len = max_new, stopped = 0");
    is_int(rows_match_reference(&out, 3, 4, &o, 512), 12,
           "temperature 0: every row equals one-sequence greedy generation token for token");
    size_t need = gemma3_rollout_bytes(M, 12, 40 + max_new);
    if (!ok(peak_bytes - before <= need && peak_bytes - before >= need / 2,
            "peak backend memory is within gemma3_rollout_bytes (and not far below)"))
        diag("peak %zu, gemma3_rollout_bytes %zu", peak_bytes - before, need);
    rollout_out_free(&out);
    ok(out.ids == NULL && out.len == NULL, "rollout_out_free clears out");
    is_int(live_blocks, 0, "nothing of the call is left in backend memory");
}

static void test_seeded(void) {
    char err[LT_ERRLEN] = "";
    lt_gen_opts o = opts(40, 1, 77);
    rollout_out a, b, g2, other;
    int ok_all = run(2, 4, &o, 256, &a, err) == LT_OK && run(2, 4, &o, 256, &b, err) == LT_OK &&
                 run(2, 2, &o, 256, &g2, err) == LT_OK;
    lt_gen_opts o2 = opts(40, 1, 78);
    ok_all = ok_all && run(2, 4, &o2, 256, &other, err) == LT_OK;
    if (!ok(ok_all, "sampled rollouts run")) {
        diag("%s", err);
        return;
    }
    ok(!memcmp(a.ids, b.ids, sizeof(int32_t) * 8 * 40) && !memcmp(a.len, b.len, sizeof(int) * 8),
       "temperature 1: the same seed gives the same rows");
    int same = 1;
    for (int p = 0; p < 2; p++)
        for (int j = 0; j < 2; j++)
            same &= !memcmp(a.ids + (p * 4 + j) * 40, g2.ids + (p * 2 + j) * 40,
                            sizeof(int32_t) * 40) &&
                    a.len[p * 4 + j] == g2.len[p * 2 + j];
    ok(same, "row j of a prompt is the same with group 4 and group 2");
    int differ = 0;
    for (int j = 1; j < 4; j++)
        differ |= memcmp(a.ids, a.ids + j * 40, sizeof(int32_t) * 40) != 0;
    ok(differ, "rows of one group sample differently");
    ok(memcmp(a.ids, other.ids, sizeof(int32_t) * 8 * 40) != 0, "another seed gives other rows");
    is_int(rows_match_reference(&a, 2, 4, &o, 256), 8,
           "temperature 1: every row equals one-sequence sampling with rollout_row_seed");
    rollout_out_free(&a);
    rollout_out_free(&b);
    rollout_out_free(&g2);
    rollout_out_free(&other);
    is_int(live_blocks, 0, "nothing left in backend memory");
}

static void test_stops(void) {
    char err[LT_ERRLEN] = "";
    gemma3_config keep = M->cfg;
    M->cfg.n_eos_ids = 2;
    M->cfg.eos_ids[0] = 5;
    M->cfg.eos_ids[1] = 9;
    lt_gen_opts o = opts(60, 1.5f, 3);
    rollout_out out;
    lt_status rc = run(3, 4, &o, 320, &out, err);
    if (!ok(rc == LT_OK, "rollout with stop ids runs")) diag("%s", err);
    if (rc == LT_OK) {
        int consistent = 1, n_stopped = 0, n_clipped = 0;
        int64_t total = 0;
        for (int r = 0; r < 12; r++) {
            const int32_t *ids = out.ids + r * 60;
            int n = out.len[r], early = 0;
            for (int t = 0; t + 1 < n; t++)
                early |= gemma3_is_stop(&M->cfg, ids[t]);
            total += n;
            if (out.stopped[r]) {
                n_stopped++;
                consistent &= n >= 1 && gemma3_is_stop(&M->cfg, ids[n - 1]) && !early;
            } else {
                n_clipped++;
                consistent &= n == 60 && !early && !gemma3_is_stop(&M->cfg, ids[n - 1]);
            }
        }
        ok(consistent, "a stopped row ends with its first stop id (kept); others reach max_new");
        if (!ok(n_stopped >= 2 && n_clipped >= 1, "some rows stop early and some are clipped"))
            diag("%d stopped, %d clipped", n_stopped, n_clipped);
        is_int(out.new_tokens, total, "new_tokens = sum of the rows' lengths");
        is_int(rows_match_reference(&out, 3, 4, &o, 320), 12,
               "rows leaving the batch at different steps: each equals its one-sequence replay");
        rollout_out_free(&out);
    }
    /* truncation (the sorting sampler path) gives replayable rows too */
    o.top_k = 6;
    o.top_p = 0.9f;
    o.min_p = 0.02f;
    rc = run(3, 2, &o, 320, &out, err);
    ok(rc == LT_OK && rows_match_reference(&out, 3, 2, &o, 320) == 6,
       "top_k/top_p/min_p rows equal their one-sequence replay");
    if (rc == LT_OK) rollout_out_free(&out);
    M->cfg = keep;
    is_int(live_blocks, 0, "nothing left in backend memory");
}

/* A vocabulary of 8192 ids x 8 rows: the draws spread over threads (rollout.c's PICK_SPREAD). */
static void test_wide(void) {
    char err[LT_ERRLEN] = "";
    gemma3_model *keep = M;
    M = micro_model(8192);
    lt_gen_opts o = opts(30, 1, 11);
    rollout_out a, b;
    int ran = run(2, 4, &o, 256, &a, err) == LT_OK && run(2, 4, &o, 256, &b, err) == LT_OK;
    if (ok(ran, "a rollout over 8192 ids runs")) {
        ok(!memcmp(a.ids, b.ids, sizeof(int32_t) * 8 * 30),
           "draws spread over threads: the same seed gives the same rows");
        is_int(rows_match_reference(&a, 2, 4, &o, 256), 8,
               "draws spread over threads: every row equals its one-sequence replay");
        rollout_out_free(&a);
        rollout_out_free(&b);
    } else {
        diag("%s", err);
    }
    micro_free(M);
    M = keep;
}

static void test_bad_input(void) {
    char err[LT_ERRLEN] = "";
    lt_gen_opts o = opts(20, 0, 1);
    rollout_out out;
    lt_status rc = run(3, 2, &o, 50, &out, err); /* prompt 2: 40 + 20 > 50 */
    ok(rc == LT_ERR_ARG && strstr(err, "prompt 2 has 40 tokens") && strstr(err, "max_seq 50") &&
           out.ids == NULL,
       "a prompt longer than max_seq - max_new is refused, naming it");
    diag("%s", err);
    rc = run(3, 0, &o, 512, &out, err);
    ok(rc == LT_ERR_ARG && strstr(err, "group=0"), "group 0 is refused");
    rc = run(0, 2, &o, 512, &out, err);
    ok(rc == LT_ERR_ARG && strstr(err, "n_prompts=0"), "n_prompts 0 is refused");
    int32_t bad[] = {2, 3, V};
    const int32_t *bp[1] = {bad};
    int bl[1] = {3};
    rc = gemma3_rollout(M, &ctx, bp, bl, 1, 2, &o, 512, NULL, &out, err);
    ok(rc == LT_ERR_ARG && strstr(err, "token id 48 at position 2") && strstr(err, "vocabulary"),
       "an id outside the vocabulary is refused, naming it");
    diag("%s", err);
    o.temperature = -1;
    rc = run(1, 1, &o, 512, &out, err);
    ok(rc == LT_ERR_ARG && strstr(err, "temperature"), "bad sampling options are refused");
    is_int(live_blocks, 0, "refusals allocate nothing");
    o = opts(0, 0, 1);
    rc = run(2, 3, &o, 512, &out, err);
    ok(rc == LT_OK && out.n_rows == 6 && out.new_tokens == 0 && out.len[5] == 0,
       "max_new 0: empty rows");
    if (rc == LT_OK) rollout_out_free(&out);
}

static void test_cancel(void) {
    char err[LT_ERRLEN] = "";
    lt_gen_opts o = opts(50, 1, 5);
    rollout_out out;
    atomic_store(&cancel, 1);
    lt_status rc = run(3, 4, &o, 256, &out, err);
    ok(rc == LT_CANCELLED && out.ids == NULL && out.len == NULL && out.stopped == NULL,
       "a cancel raised before the call: LT_CANCELLED, out freed");
    is_int(live_blocks, 0, "a cancelled call leaves nothing in backend memory");
    atomic_store(&cancel, 0);
    downloads = 0;
    cancel_at_download = 6; /* 3 prefills, then the third decode step */
    rc = run(3, 4, &o, 256, &out, err);
    ok(rc == LT_CANCELLED && out.ids == NULL, "a cancel raised while decoding: LT_CANCELLED");
    is_int(live_blocks, 0, "nothing left in backend memory");
    cancel_at_download = 0;
    atomic_store(&cancel, 0);
}

int main(void) {
    for (int i = 0; i < 40; i++)
        p2[i] = (i * 7 + 3) % V;
    counting = lt_backend_cpu;
    counting.alloc = cnt_alloc;
    counting.release = cnt_release;
    counting.download = cnt_download;
    per_row = counting;
    per_row.attention_rows = NULL;
    lt_ctx_init(&ctx, &counting, 2);
    M = micro_model(V);
    for (int pass = 0; pass < 2; pass++) { /* attention_rows, then one attention op per row */
        diag("%s", pass ? "one attention op per row" : "attention_rows");
        ctx.be = pass ? &per_row : &counting;
        test_greedy();
        test_seeded();
        test_stops();
    }
    ctx.be = &counting;
    test_wide();
    test_bad_input();
    test_cancel();
    micro_free(M);
    lt_ctx_shutdown(&ctx);
    return tap_done();
}
