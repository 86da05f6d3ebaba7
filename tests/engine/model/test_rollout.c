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
 *
 * Graphs: a third pass runs those checks on a CPU backend that records graphs (graph_begin ..
 * graph_free: it keeps each op's arguments, as a CUDA graph keeps addresses, sizes and options,
 * and runs them again at each launch), so every replayed and padded step is checked against
 * the one-sequence reference too; then: rollout_step_rows' sizes; with graphs the ids equal
 * those of the same backend with graphs refused (the same padded ops called one by one), and of
 * a recording that fails at its first op, a middle one or its last one (the call goes on
 * without graphs); the recordings are one per size the running rows pass through after the
 * first step, and every later step is a replay; every replayed step's cache rows are distinct
 * and inside the batch; no graph and no block outlives the call.
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
#include "tests/unit/test_micro_model.h"

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

/* ---- a CPU backend that records graphs ------------------------------------------------------ */

/* One recorded op: its arguments by value (tensors are shape + address), as a graph keeps them. */
typedef enum rec_kind {
    REC_EMBEDDING,
    REC_LINEAR,
    REC_RMSNORM,
    REC_ROPE,
    REC_ADD,
    REC_GEGLU,
    REC_ATTENTION_ROWS,
    REC_SAMPLE_ROWS
} rec_kind;

typedef struct rec_op {
    rec_kind kind;
    lt_tensor t[8];
    const lt_weight *w;
    float f[2];
    int window;
    lt_sample_opts so;
} rec_op;

typedef struct rec_graph {
    rec_op *ops;
    int n, cap;
} rec_graph;

static lt_backend graphs;        /* counting + the graph ops */
static rec_graph *rec;           /* the recording in progress, or NULL */
static int rec_ended;            /* 1 after a failed op ended the recording (until graph_end) */
static char rec_err[LT_ERRLEN];  /* its message, graph_end's */
static int rec_ops, rec_fail_at; /* fail the rec_fail_at-th op of every recording (0 = never) */
static int refuse_graphs;        /* graph_begin refuses (LATHE_CUDA_GRAPHS=0's stand-in) */
static long live_graphs, launches, bad_rows;

static void rec_drop(void) {
    if (rec) free(rec->ops);
    free(rec);
    rec = NULL;
}

static lt_status rec_push(lt_ctx *c, rec_op op) {
    if (++rec_ops == rec_fail_at || rec->n == 4096) {
        rec_drop();
        rec_ended = 1;
        lt_fail(rec_err, LT_ERR_DEVICE, "test: op %d of the recording fails", rec_ops);
        return lt_fail(c->err, LT_ERR_DEVICE, "%s", rec_err);
    }
    if (rec->n == rec->cap) {
        rec->cap = rec->cap ? 2 * rec->cap : 64;
        rec->ops = realloc(rec->ops, sizeof(rec_op) * (size_t)rec->cap);
    }
    rec->ops[rec->n++] = op;
    return LT_OK;
}

/* Calls that cannot be recorded end the recording, as on CUDA. */
static lt_status rec_refuse(lt_ctx *c, const char *what) {
    rec_drop();
    rec_ended = 1;
    lt_fail(rec_err, LT_ERR_STATE, "test: %s while recording", what);
    return lt_fail(c->err, LT_ERR_STATE, "%s", rec_err);
}

static lt_status g_embedding(lt_ctx *c, lt_tensor h, lt_tensor ids, const lt_weight *table,
                             float scale) {
    if (!rec) return lt_backend_cpu.embedding(c, h, ids, table, scale);
    return rec_push(c, (rec_op){.kind = REC_EMBEDDING, .t = {h, ids}, .w = table, .f = {scale}});
}
static lt_status g_linear(lt_ctx *c, lt_tensor y, lt_tensor x, const lt_weight *w) {
    if (!rec) return lt_backend_cpu.linear(c, y, x, w);
    return rec_push(c, (rec_op){.kind = REC_LINEAR, .t = {y, x}, .w = w});
}
static lt_status g_rmsnorm(lt_ctx *c, lt_tensor y, lt_tensor x, lt_tensor w, float eps) {
    if (!rec) return lt_backend_cpu.rmsnorm(c, y, x, w, eps);
    return rec_push(c, (rec_op){.kind = REC_RMSNORM, .t = {y, x, w}, .f = {eps}});
}
static lt_status g_rope(lt_ctx *c, lt_tensor x, lt_tensor pos, float theta, float factor) {
    if (!rec) return lt_backend_cpu.rope(c, x, pos, theta, factor);
    return rec_push(c, (rec_op){.kind = REC_ROPE, .t = {x, pos}, .f = {theta, factor}});
}
static lt_status g_add(lt_ctx *c, lt_tensor y, lt_tensor x) {
    if (!rec) return lt_backend_cpu.add(c, y, x);
    return rec_push(c, (rec_op){.kind = REC_ADD, .t = {y, x}});
}
static lt_status g_geglu(lt_ctx *c, lt_tensor y, lt_tensor gate, lt_tensor up) {
    if (!rec) return lt_backend_cpu.geglu(c, y, gate, up);
    return rec_push(c, (rec_op){.kind = REC_GEGLU, .t = {y, gate, up}});
}
/* Counts a step's cache rows that repeat or lie outside the batch of kc's N rows. */
static void rows_check(const lt_tensor *rows, const lt_tensor *kc) {
    const int32_t *r = rows->data;
    int64_t R = lt_tensor_numel(rows), N = kc->shape[0];
    for (int64_t a = 0; a < R; a++) {
        bad_rows += r[a] < 0 || r[a] >= N;
        for (int64_t b = 0; b < a; b++)
            bad_rows += r[a] == r[b];
    }
}

static lt_status g_attention_rows(lt_ctx *c, lt_tensor out, lt_tensor q, lt_tensor kn, lt_tensor vn,
                                  lt_tensor kc, lt_tensor vc, lt_tensor rows, lt_tensor qpos,
                                  int window, float scale) {
    if (!rec) {
        rows_check(&rows, &kc);
        return lt_backend_cpu.attention_rows(c, out, q, kn, vn, kc, vc, rows, qpos, window, scale);
    }
    return rec_push(c, (rec_op){.kind = REC_ATTENTION_ROWS,
                                .t = {out, q, kn, vn, kc, vc, rows, qpos},
                                .window = window,
                                .f = {scale}});
}
static lt_status g_sample_rows(lt_ctx *c, lt_tensor ids, lt_tensor logits, lt_tensor bits,
                               const lt_sample_opts *o) {
    if (!rec) return lt_backend_cpu.sample_rows(c, ids, logits, bits, o);
    return rec_push(c, (rec_op){.kind = REC_SAMPLE_ROWS, .t = {ids, logits, bits}, .so = *o});
}
static lt_status g_upload(lt_ctx *c, void *dst, const void *src, size_t bytes) {
    if (rec) return rec_refuse(c, "upload");
    return lt_backend_cpu.upload(c, dst, src, bytes);
}
static lt_status g_download(lt_ctx *c, void *dst, const void *src, size_t bytes) {
    if (rec) return rec_refuse(c, "download");
    return cnt_download(c, dst, src, bytes);
}
static void *g_alloc(lt_ctx *c, size_t bytes) {
    if (rec) {
        rec_refuse(c, "alloc");
        return NULL;
    }
    return cnt_alloc(c, bytes);
}

static lt_status g_begin(lt_ctx *c) {
    if (refuse_graphs) return lt_fail(c->err, LT_ERR_STATE, "test: graphs are refused");
    if (rec || rec_ended) return lt_fail(c->err, LT_ERR_STATE, "test: recording already");
    rec = calloc(1, sizeof *rec);
    rec_ops = 0;
    return LT_OK;
}

static lt_status g_end(lt_ctx *c, lt_graph **g) {
    *g = NULL;
    if (rec_ended) { /* as CUDA's: the error of the op that ended it */
        rec_ended = 0;
        return lt_fail(c->err, LT_ERR_DEVICE, "%s", rec_err);
    }
    if (!rec) return lt_fail(c->err, LT_ERR_STATE, "test: graph_end without graph_begin");
    *g = (lt_graph *)rec;
    rec = NULL;
    live_graphs++;
    return LT_OK;
}

static lt_status g_launch(lt_ctx *c, lt_graph *g) {
    const rec_graph *G = (const rec_graph *)g;
    const lt_backend *be = &lt_backend_cpu;
    lt_status rc = LT_OK;
    if (rec) return rec_refuse(c, "graph_launch");
    launches++;
    for (int i = 0; i < G->n && rc == LT_OK; i++) {
        const rec_op *o = &G->ops[i];
        const lt_tensor *t = o->t;
        switch (o->kind) {
        case REC_EMBEDDING:
            rc = be->embedding(c, t[0], t[1], o->w, o->f[0]);
            break;
        case REC_LINEAR:
            rc = be->linear(c, t[0], t[1], o->w);
            break;
        case REC_RMSNORM:
            rc = be->rmsnorm(c, t[0], t[1], t[2], o->f[0]);
            break;
        case REC_ROPE:
            rc = be->rope(c, t[0], t[1], o->f[0], o->f[1]);
            break;
        case REC_ADD:
            rc = be->add(c, t[0], t[1]);
            break;
        case REC_GEGLU:
            rc = be->geglu(c, t[0], t[1], t[2]);
            break;
        case REC_ATTENTION_ROWS:
            rows_check(&t[6], &t[4]);
            rc = be->attention_rows(c, t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], o->window,
                                    o->f[0]);
            break;
        case REC_SAMPLE_ROWS:
            rc = be->sample_rows(c, t[0], t[1], t[2], &o->so);
            break;
        }
    }
    return rc;
}

static void g_free(lt_ctx *c, lt_graph *g) {
    (void)c;
    rec_graph *G = (rec_graph *)g;
    if (!G) return;
    live_graphs--;
    free(G->ops);
    free(G);
}

/* ---- the micro model -------------------------------------------------------------------- */

static uint64_t rng = 1234;

enum { V = 48 };

/* The shared micro model, the embedding at 1.0, the linears at 0.5, no stop ids unless a test
 * sets them. */
static gemma3_model *micro_model(int vocab) {
    gemma3_model *m = test_micro_gemma3(&rng, vocab, 1.0f, 0.5f);
    m->cfg.n_eos_ids = 0;
    return m;
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
    test_micro_gemma3_free(M);
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

/* rollout_step_rows: n rounded up to 8, 16, 32, ... within n_rows; few sizes per batch. */
static void test_step_rows(void) {
    is_int(rollout_step_rows(1, 8), 8, "step rows: 1 running of 8 -> 8");
    is_int(rollout_step_rows(8, 8), 8, "step rows: 8 of 8 -> 8");
    is_int(rollout_step_rows(3, 3), 3, "step rows: a batch under 8 runs whole");
    is_int(rollout_step_rows(9, 64), 16, "step rows: 9 of 64 -> 16");
    is_int(rollout_step_rows(33, 64), 64, "step rows: 33 of 64 -> 64");
    is_int(rollout_step_rows(9, 12), 12, "step rows: 9 of 12 -> 12 (capped at the batch)");
    is_int(rollout_step_rows(5, 512), 8, "step rows: 5 of 512 -> 8");
    is_int(rollout_step_rows(300, 512), 512, "step rows: 300 of 512 -> 512");
    is_int(rollout_step_rows(0, 8), 0, "step rows: none running -> 0");
    int good = 1, worst = 0;
    for (int N = 1; N <= 600; N++) {
        int sizes = 0, last = 0, lg = 0;
        while ((8 << lg) < N)
            lg++;
        for (int n = 1; n <= N; n++) {
            int b = rollout_step_rows(n, N);
            int pow2 = b >= 8 && !(b & (b - 1));
            good &= b >= n && b <= N && (b == N || pow2) && b >= last;
            good &= n > 8 || b == (N < 8 ? N : 8); /* under 8 running: one size */
            good &= b < 2 * n || b == 8 || b == N; /* at most twice the rows past 8 */
            sizes += b != last;
            last = b;
        }
        good &= sizes <= lg + 1; /* one recording per size: 8, 16, ..., N */
        if (sizes > worst) worst = sizes;
    }
    ok(good, "step rows: for every batch up to 600, n <= size <= batch, 8 * 2^k or the batch, "
             "monotone, under twice n past 8, at most 1 + log2(batch / 8) sizes");
    diag("the most sizes a batch of up to 600 rows passes through: %d", worst);
}

/* Rows of a rollout with the graphs backend, graphs refused, and recordings failing at op `at`:
 * the same ids; the recordings and replays as the running rows' sizes say. */
static void test_graphs(void) {
    char err[LT_ERRLEN] = "";
    gemma3_config keep = M->cfg;
    ctx.be = &graphs;
    lt_gen_opts o = opts(60, 1.2f, 21);
    rollout_out a, b;
    bad_rows = 0;
    /* stop ids that end most rows early, at different steps: a row's tokens up to its first stop
     * id do not depend on the stop ids, so a first run without them shows where each would end
     * a row; take the 4 ids that come before position 40 in the most rows */
    lt_status rc = run(3, 8, &o, 320, &a, err);
    if (rc == LT_OK) {
        int early[V] = {0};
        for (int t = 0; t < V; t++)
            for (int r = 0; r < 24; r++)
                for (int k = 0; k < 40; k++)
                    if (a.ids[r * 60 + k] == t) {
                        early[t]++;
                        break;
                    }
        M->cfg.n_eos_ids = 4;
        for (int e = 0; e < 4; e++) {
            int best = 0;
            for (int t = 1; t < V; t++)
                if (early[t] > early[best]) best = t;
            M->cfg.eos_ids[e] = best;
            early[best] = -1;
        }
        rollout_out_free(&a);
        rc = run(3, 8, &o, 320, &a, err); /* 24 rows: sizes 24, 16, 8 */
    }
    if (!ok(rc == LT_OK, "graphs: a rollout of 3 prompts x group 8 runs")) {
        diag("%s", err);
        M->cfg = keep;
        return;
    }
    is_int(rows_match_reference(&a, 3, 8, &o, 320), 24,
           "graphs: replayed, padded steps give every row its one-sequence replay");
    /* the decode steps: step k (1, 2, ...) runs the rows with len >= k + 1 */
    int steps = 0, expect_records = 0, last = -1, min_run = 24;
    for (int k = 1; k < 60; k++) {
        int n = 0;
        for (int r = 0; r < 24; r++)
            n += a.len[r] >= k + 1;
        if (!n) break;
        if (n < min_run) min_run = n;
        steps++;
        int size = rollout_step_rows(n, 24);
        if (k >= 2 && size != last) expect_records++; /* step 1 runs unrecorded */
        if (k >= 2) last = size;
    }
    diag("%d decode steps, the running rows fell to %d; %d recordings, %d replays", steps, min_run,
         a.graph_records, a.graph_steps);
    ok(min_run <= 8, "graphs: the running rows fall through more than one size");
    is_int(a.graph_records, expect_records,
           "graphs: one recording per size of the running rows after the first step");
    is_int(a.graph_steps, steps - 1, "graphs: every decode step after the first is a replay");
    ok(a.graph_note[0] == 0, "graphs: no note when graphs ran to the end");
    is_int(live_graphs, 0, "graphs: no graph outlives the call");
    is_int(live_blocks, 0, "graphs: nothing of the call is left in backend memory");

    refuse_graphs = 1;
    rc = run(3, 8, &o, 320, &b, err);
    refuse_graphs = 0;
    ok(rc == LT_OK && b.graph_steps == 0 && b.graph_records == 0 && strstr(b.graph_note, "refused"),
       "graphs refused: the rollout runs its ops one by one and says why");
    ok(rc == LT_OK && !memcmp(a.ids, b.ids, sizeof(int32_t) * 24 * 60) &&
           !memcmp(a.len, b.len, sizeof(int) * 24),
       "graphs refused: the same ids as with graphs");
    if (rc == LT_OK) rollout_out_free(&b);

    int n_ops = 0;
    { /* the ops of one recorded step: record once by hand to count them */
        rollout_out c;
        rec_fail_at = 1 << 30;
        rc = run(1, 8, &o, 320, &c, err);
        n_ops = rec_ops;
        rec_fail_at = 0;
        if (rc == LT_OK) rollout_out_free(&c);
    }
    int ats[3] = {1, n_ops / 2, n_ops};
    for (int i = 0; i < 3; i++) {
        char tn[160];
        rec_fail_at = ats[i];
        rc = run(3, 8, &o, 320, &b, err);
        rec_fail_at = 0;
        snprintf(tn, sizeof tn,
                 "a recording failing at op %d of %d: the call goes on without graphs, the same "
                 "ids",
                 ats[i], n_ops);
        ok(rc == LT_OK && b.graph_steps == 0 && strstr(b.graph_note, "fails") &&
               !memcmp(a.ids, b.ids, sizeof(int32_t) * 24 * 60) &&
               !memcmp(a.len, b.len, sizeof(int) * 24),
           tn);
        if (rc == LT_OK)
            rollout_out_free(&b);
        else
            diag("%s", err);
    }
    is_int(bad_rows, 0, "graphs: every step's cache rows are distinct and inside the batch");
    is_int(live_graphs, 0, "failed recordings leave no graph behind");
    is_int(live_blocks, 0, "nothing left in backend memory");
    rollout_out_free(&a);
    M->cfg = keep;
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
    graphs = counting;
    graphs.alloc = g_alloc;
    graphs.upload = g_upload;
    graphs.download = g_download;
    graphs.embedding = g_embedding;
    graphs.linear = g_linear;
    graphs.rmsnorm = g_rmsnorm;
    graphs.rope = g_rope;
    graphs.add = g_add;
    graphs.geglu = g_geglu;
    graphs.attention_rows = g_attention_rows;
    graphs.sample_rows = g_sample_rows;
    graphs.graph_begin = g_begin;
    graphs.graph_end = g_end;
    graphs.graph_launch = g_launch;
    graphs.graph_free = g_free;
    lt_ctx_init(&ctx, &counting, 2);
    M = micro_model(V);
    /* attention_rows; one attention op per row; attention_rows with graphs recorded */
    for (int pass = 0; pass < 3; pass++) {
        const char *names[3] = {"attention_rows", "one attention op per row", "graphs"};
        const lt_backend *bes[3] = {&counting, &per_row, &graphs};
        diag("%s", names[pass]);
        ctx.be = bes[pass];
        test_greedy();
        test_seeded();
        test_stops();
    }
    ctx.be = &graphs;
    is_int(live_graphs, 0, "graphs pass: no graph outlives its call");
    test_step_rows();
    test_graphs();
    ctx.be = &counting;
    test_wide();
    test_bad_input();
    test_cancel();
    test_micro_gemma3_free(M);
    lt_ctx_shutdown(&ctx);
    return tap_done();
}
