/* rollout.c — batched sampling with a KV cache for GRPO (see rollout.h).
 *
 * Owns the rows' KV caches, the batch's activations and logits, and the per-row RNGs of one
 * gemma3_rollout call; nothing outlives the call but rollout_out. Each prompt is prefilled once
 * through gemma3_forward into a single-sequence gemma3_cache, whose slots are then copied into
 * each of its rows (the rows keep gemma3_cache's layout, gemma3_cache_slots, so the copy is
 * slot for slot). Every decode step runs one forward over the rows still running: the layer's
 * norms and linears through gemma3_layer_qkv / gemma3_layer_finish on [rows, H], each row's
 * K/V appended to its own cache and its query attending that cache alone (one attention_rows
 * op per layer; one attention op per row where a backend lacks it), the final norm and the
 * head on [rows, H]; then each row draws its token where the logits are (the sample_rows op,
 * with 32 bits from the row's own RNG), and only the ids come back to the host. Rows that stop
 * leave the batch: the next step's batch is the running rows, in row order.
 *
 * On a backend that records graphs (graph_begin .. graph_free; CUDA), a step's ~470 ops are
 * recorded once and replayed: the step's inputs (ids, positions, cache rows, random bits) go to
 * fixed backend addresses before each replay, one replay runs the forward and the draws, and
 * the drawn ids come down. The first decode step runs unrecorded (it makes whatever the ops make
 * on first use). A graph is recorded for a number of rows, so there a step runs on
 * rollout_step_rows(n) rows: the n running rows, then stopped rows as padding (distinct rows, at
 * position 0, id 0, bits 0; their draws are dropped and their caches are dead anyway). The
 * padding is the same whether the step is replayed or its ops are called one by one (graphs
 * refused, or a recording failed: the call then goes on without graphs), so both give the same
 * ids. The held graph is freed when the rows fall to a smaller size, and at the end of the call
 * (also on errors). Written against the op table only; must not touch the trainer or a session.
 */
#include "cuda/model/rollout.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda/model/gemma3_device.h"
#include "cuda/model/sample.h"

void rollout_out_free(rollout_out *out) {
    if (!out) return;
    free(out->ids);
    free(out->len);
    free(out->stopped);
    memset(out, 0, sizeof *out);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

uint64_t rollout_row_seed(uint64_t seed, int p, int j) {
    return seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(j + 1)) ^
           (0xd1b54a32d192ed03ull * (uint64_t)p);
}

/* ---- the rows' KV caches ------------------------------------------------------------------ */

/* Layer l of every row: [n_rows, slots, nkv, hd] fp32 K and V, position p of a row in slot
 * p % slots (gemma3_cache's layout, and attention_rows'). Without attention_rows, kpos[kind]
 * ([n_rows, kslots[kind]] I32, the position each slot holds or -1) serves the per-row
 * attention op; every layer of a kind shares it. step: a step's I32 inputs, backend [4, n]
 * (ids, positions, cache rows, the draws' random bits), uploaded at once from step_host. */
typedef struct rollout_state {
    const gemma3_model *m;
    lt_ctx *ctx;
    int n_rows, max_len;
    int batched; /* the backend has attention_rows */
    size_t kvo;  /* floats of one token's K (nkv * hd) */
    float **k, **v;
    int *slots;
    int32_t *kpos[2];
    int kslots[2];
    int32_t *kpos_host; /* [max kslots] scratch */
    int32_t *step, *step_host;
    float *logits;  /* backend [n_rows, V] */
    int32_t *drawn; /* backend [n_rows]: sample_rows' ids */
    gemma3_acts b;  /* [n_rows] decode activations (allocated after prefill) */
    int have_acts;
    /* graphs: pad (steps run on rollout_step_rows rows), try (recording not refused or failed
     * yet this call), warm (an unrecorded decode step has run); graph: the one held, recorded
     * for graph_rows rows; step_row: [n_rows] a step's cache rows (running, then padding);
     * running: [n_rows] scratch flags */
    int pad, try_graphs, warm, graph_rows;
    lt_graph *graph;
    int *step_row;
    char *running;
} rollout_state;

static size_t layer_kv_bytes(const gemma3_config *c, int l, int n_rows, int max_len) {
    size_t kvo = (size_t)c->num_key_value_heads * (size_t)c->head_dim;
    return 2 * (size_t)n_rows * (size_t)gemma3_cache_slots(c, l, max_len) * kvo * sizeof(float);
}

size_t gemma3_rollout_bytes(const gemma3_model *m, int n_rows, int max_len) {
    const gemma3_config *c = &m->cfg;
    size_t rows = 0, prefill = 0, kp = 0, grow = 0;
    int ks[2] = {0, 0};
    for (int l = 0; l < c->num_hidden_layers; l++) {
        rows += layer_kv_bytes(c, l, n_rows, max_len);
        /* the prefill cache: at most the same slots for one sequence, with their kpos; a layer
         * that grows holds its old slots too for a moment (one layer at a time) */
        int s = gemma3_cache_slots(c, l, max_len);
        size_t one = layer_kv_bytes(c, l, 1, max_len) + (size_t)s * sizeof(int32_t);
        prefill += one;
        if (s == max_len && one > grow) grow = one;
        ks[gemma3_layer_kind(c, l)] = s;
    }
    prefill += grow;
    kp = (size_t)n_rows * (size_t)(ks[0] + ks[1] + 5) * sizeof(int32_t); /* + the step's I32s */
    size_t logits = (size_t)n_rows * (size_t)c->vocab_size * sizeof(float);
    int chunk = max_len < GEMMA3_CHUNK ? max_len : GEMMA3_CHUNK;
    size_t prefill_acts = gemma3_acts_bytes(c, chunk) + (size_t)chunk * sizeof(int32_t);
    size_t during_prefill = prefill + prefill_acts, during_decode = gemma3_acts_bytes(c, n_rows);
    return rows + kp + logits + (during_prefill > during_decode ? during_prefill : during_decode);
}

static void state_free(rollout_state *st) {
    lt_ctx *ctx = st->ctx;
    int L = st->m->cfg.num_hidden_layers;
    if (st->graph) ctx->be->graph_free(ctx, st->graph); /* before the buffers it uses */
    for (int l = 0; l < L; l++) {
        if (st->k) ctx->be->release(ctx, st->k[l]);
        if (st->v) ctx->be->release(ctx, st->v[l]);
    }
    for (int i = 0; i < 2; i++)
        ctx->be->release(ctx, st->kpos[i]);
    ctx->be->release(ctx, st->logits);
    ctx->be->release(ctx, st->step);
    ctx->be->release(ctx, st->drawn);
    if (st->have_acts) gemma3_acts_free(&st->b, ctx);
    free(st->k);
    free(st->v);
    free(st->slots);
    free(st->kpos_host);
    free(st->step_host);
    free(st->step_row);
    free(st->running);
    memset(st, 0, sizeof *st);
}

static lt_status state_alloc(rollout_state *st, const gemma3_model *m, lt_ctx *ctx, int n_rows,
                             int max_len, char *err) {
    const gemma3_config *c = &m->cfg;
    int L = c->num_hidden_layers;
    size_t V = (size_t)c->vocab_size;
    memset(st, 0, sizeof *st);
    st->m = m;
    st->ctx = ctx;
    st->n_rows = n_rows;
    st->max_len = max_len;
    st->kvo = (size_t)c->num_key_value_heads * (size_t)c->head_dim;
    st->batched = ctx->be->attention_rows != NULL;
    /* graphs need the whole step on the backend: attention_rows (the per-row path uploads each
     * row's key positions inside the step) */
    st->pad = st->try_graphs = st->batched && ctx->be->graph_begin && ctx->be->graph_end &&
                               ctx->be->graph_launch && ctx->be->graph_free;
    st->k = calloc((size_t)L, sizeof *st->k);
    st->v = calloc((size_t)L, sizeof *st->v);
    st->slots = calloc((size_t)L, sizeof *st->slots);
    if (!st->k || !st->v || !st->slots) goto oom;
    for (int l = 0; l < L; l++) {
        int s = gemma3_cache_slots(c, l, max_len);
        size_t half = layer_kv_bytes(c, l, n_rows, max_len) / 2;
        st->slots[l] = s;
        st->kslots[gemma3_layer_kind(c, l)] = s;
        st->k[l] = ctx->be->alloc(ctx, half);
        st->v[l] = ctx->be->alloc(ctx, half);
        if (!st->k[l] || !st->v[l]) goto oom;
    }
    int most = 1;
    for (int i = 0; i < 2; i++) {
        if (!st->kslots[i] || st->batched) continue;
        if (st->kslots[i] > most) most = st->kslots[i];
        st->kpos[i] = ctx->be->alloc(ctx, sizeof(int32_t) * (size_t)n_rows * (size_t)st->kslots[i]);
        if (!st->kpos[i]) goto oom;
    }
    st->kpos_host = malloc(sizeof(int32_t) * (size_t)most);
    st->logits = ctx->be->alloc(ctx, sizeof(float) * V * (size_t)n_rows);
    st->step = ctx->be->alloc(ctx, sizeof(int32_t) * 4 * (size_t)n_rows);
    st->step_host = malloc(sizeof(int32_t) * 4 * (size_t)n_rows);
    st->drawn = ctx->be->alloc(ctx, sizeof(int32_t) * (size_t)n_rows);
    st->step_row = malloc(sizeof(int) * (size_t)n_rows);
    st->running = malloc((size_t)n_rows);
    if (!st->kpos_host || !st->logits || !st->step || !st->step_host || !st->drawn ||
        !st->step_row || !st->running)
        goto oom;
    return LT_OK;
oom:
    state_free(st);
    return lt_fail(err, LT_ERR_MEMORY,
                   "rollout: out of memory for the KV caches of %d rows of %d tokens (%zu bytes)",
                   n_rows, max_len, gemma3_rollout_bytes(m, n_rows, max_len));
}

/* Row r's caches take the prompt's: prefill cache pc holds positions 0..P-1, slot for slot. */
static lt_status row_take_prompt(rollout_state *st, const gemma3_cache *pc, int r, int P) {
    lt_ctx *ctx = st->ctx;
    size_t row = st->kvo * sizeof(float);
    lt_status rc = LT_OK;
    for (int l = 0; l < st->m->cfg.num_hidden_layers; l++) {
        int s = st->slots[l], n = P < s ? P : s;
        size_t at = (size_t)r * (size_t)s * row;
        LT_TRY(ctx->be->copy(ctx, (char *)st->k[l] + at, pc->layers[l].k, row * (size_t)n));
        LT_TRY(ctx->be->copy(ctx, (char *)st->v[l] + at, pc->layers[l].v, row * (size_t)n));
    }
    for (int i = 0; i < 2; i++) {
        int ks = st->kslots[i];
        if (!ks || st->batched) continue;
        for (int s = 0; s < ks; s++) /* the latest position < P that lands in slot s */
            st->kpos_host[s] = P <= ks ? (s < P ? s : -1) : s + ks * ((P - 1 - s) / ks);
        LT_TRY(ctx->be->upload(ctx, st->kpos[i] + (size_t)r * (size_t)ks, st->kpos_host,
                               sizeof(int32_t) * (size_t)ks));
    }
done:
    return rc;
}

/* Layer l's attention for the n active rows (row[i], query at pos[i] in b->q): each row's new
 * K/V go into its own cache, then its query attends that cache alone. rows_dev: row[] in
 * backend memory. */
static lt_status attend_rows(rollout_state *st, const gemma3_acts *b, int l, const int *row,
                             const int32_t *pos, const int32_t *rows_dev, int n) {
    const gemma3_config *c = &st->m->cfg;
    lt_ctx *ctx = st->ctx;
    int64_t nh = c->num_attention_heads, nkv = c->num_key_value_heads, hd = c->head_dim;
    size_t kvo = st->kvo, qo = (size_t)(nh * hd);
    int s = st->slots[l], kind = gemma3_layer_kind(c, l), window = gemma3_layer_window(c, l);
    float scale = gemma3_attn_scale(c);
    lt_status rc = LT_OK;
    if (st->batched) {
        lt_tensor out = lt_tensor_2d(LT_F32, b->att, n, (int64_t)qo);
        lt_tensor q = lt_tensor_3d(LT_F32, b->q, n, nh, hd);
        lt_tensor kn = lt_tensor_3d(LT_F32, b->k, n, nkv, hd),
                  vn = lt_tensor_3d(LT_F32, b->v, n, nkv, hd);
        lt_tensor kc = lt_tensor_4d(LT_F32, st->k[l], st->n_rows, s, nkv, hd);
        lt_tensor vc = lt_tensor_4d(LT_F32, st->v[l], st->n_rows, s, nkv, hd);
        return ctx->be->attention_rows(ctx, out, q, kn, vn, kc, vc,
                                       lt_tensor_1d(LT_I32, (void *)rows_dev, n),
                                       lt_tensor_1d(LT_I32, b->pos, n), window, scale);
    }
    for (int i = 0; i < n; i++) {
        size_t base = (size_t)row[i] * (size_t)s, slot = (size_t)(pos[i] % s);
        float *kr = st->k[l] + base * kvo, *vr = st->v[l] + base * kvo;
        LT_TRY(ctx->be->copy(ctx, kr + slot * kvo, b->k + (size_t)i * kvo, kvo * sizeof(float)));
        LT_TRY(ctx->be->copy(ctx, vr + slot * kvo, b->v + (size_t)i * kvo, kvo * sizeof(float)));
        lt_tensor out = lt_tensor_2d(LT_F32, b->att + (size_t)i * qo, 1, (int64_t)qo);
        lt_tensor q = lt_tensor_3d(LT_F32, b->q + (size_t)i * qo, 1, nh, hd);
        lt_tensor kc = lt_tensor_3d(LT_F32, kr, s, nkv, hd),
                  vc = lt_tensor_3d(LT_F32, vr, s, nkv, hd);
        lt_tensor qp = lt_tensor_1d(LT_I32, b->pos + i, 1);
        lt_tensor kp = lt_tensor_1d(LT_I32, st->kpos[kind] + base, s);
        LT_TRY(ctx->be->attention(ctx, out, q, kc, vc, qp, kp, window, scale));
    }
done:
    return rc;
}

/* The draws of n rows from st->logits [n, V], with their bits at bits_dev (backend [n]), into
 * st->drawn. */
static lt_status draw_rows(rollout_state *st, const lt_sample_opts *so, const int32_t *bits_dev,
                           int n) {
    lt_ctx *ctx = st->ctx;
    int64_t V = st->m->cfg.vocab_size;
    return ctx->be->sample_rows(ctx, lt_tensor_1d(LT_I32, st->drawn, n),
                                lt_tensor_2d(LT_F32, st->logits, n, V),
                                lt_tensor_1d(LT_I32, (void *)bits_dev, n), so);
}

int rollout_step_rows(int n, int n_rows) {
    if (n <= 0) return 0;
    int b = 8;
    while (b < n && b < n_rows)
        b *= 2;
    return b < n_rows ? b : n_rows;
}

/* The ops of one decode step over nb rows whose inputs are in st->step ([4, nb]: ids,
 * positions, cache rows, bits): the forward, the head and the draws into st->drawn. row, pos:
 * the same rows and positions on the host (the per-row attention path reads them; it never
 * pads, so there nb is the running rows). What a graph records. */
static lt_status step_ops(rollout_state *st, const int *row, const int32_t *pos, int nb,
                          const lt_sample_opts *so) {
    const gemma3_model *m = st->m;
    const gemma3_config *c = &m->cfg;
    lt_ctx *ctx = st->ctx;
    const lt_backend *be = ctx->be;
    int64_t H = c->hidden_size, V = c->vocab_size;
    lt_status rc = LT_OK;
    gemma3_acts b = st->b; /* this step's ids and positions */
    b.ids = st->step;
    b.pos = st->step + nb;
    for (int i = 0; i < nb && !st->batched; i++) /* the slot each row's new token takes */
        for (int k = 0; k < 2; k++) {
            int ks = st->kslots[k];
            if (!ks) continue;
            LT_TRY(be->upload(ctx, st->kpos[k] + (size_t)row[i] * (size_t)ks + pos[i] % ks, &pos[i],
                              sizeof(int32_t)));
        }
    lt_tensor h = lt_tensor_2d(LT_F32, b.h, nb, H);
    LT_TRY(be->embedding(ctx, h, lt_tensor_1d(LT_I32, b.ids, nb), &m->embed_tokens,
                         gemma3_embed_scale(m)));
    for (int l = 0; l < c->num_hidden_layers; l++) {
        LT_TRY(gemma3_layer_qkv(m, ctx, l, &b, nb));
        LT_TRY(attend_rows(st, &b, l, row, pos, st->step + 2 * nb, nb));
        LT_TRY(gemma3_layer_finish(m, ctx, l, &b, nb));
    }
    lt_tensor hn = lt_tensor_2d(LT_F32, b.a, nb, H);
    LT_TRY(be->rmsnorm(ctx, hn, h, m->norm, (float)c->rms_norm_eps));
    LT_TRY(be->linear(ctx, lt_tensor_2d(LT_F32, st->logits, nb, V), hn, gemma3_head(m)));
    LT_TRY(draw_rows(st, so, st->step + 3 * nb, nb));
done:
    return rc;
}

/* Records step_ops over nb rows into st->graph. On failure nothing is held; the note says why. */
static lt_status step_record(rollout_state *st, const int *row, const int32_t *pos, int nb,
                             const lt_sample_opts *so, rollout_out *out) {
    lt_ctx *ctx = st->ctx;
    const lt_backend *be = ctx->be;
    lt_graph *g = NULL;
    double t0 = now_s();
    lt_status rc = be->graph_begin(ctx);
    if (rc == LT_OK) {
        lt_status r1 = step_ops(st, row, pos, nb, so);
        lt_status r2 = be->graph_end(ctx, &g); /* its message is the recording's (or ours) */
        rc = r1 != LT_OK ? r1 : r2;
    }
    if (rc != LT_OK) {
        if (g) be->graph_free(ctx, g);
        snprintf(out->graph_note, sizeof out->graph_note, "%.*s", (int)sizeof out->graph_note - 1,
                 ctx->err);
        return rc;
    }
    st->graph = g;
    st->graph_rows = nb;
    out->graph_records++;
    out->record_s += now_s() - t0;
    return LT_OK;
}

/* One token for each of the n running rows: ids[i] at position pos[i] of row row[i], then each
 * row's draw with the next bits of its RNG (rng[row[i]]): the new ids into picked. The step runs
 * on rollout_step_rows(n) rows where the backend records graphs (the running rows, then stopped
 * ones), as a replay once a graph of that size is held. */
static lt_status decode_step(rollout_state *st, const int *row, const int32_t *ids,
                             const int32_t *pos, int n, lt_rng *rng, const lt_sample_opts *so,
                             int32_t *picked, rollout_out *out) {
    lt_ctx *ctx = st->ctx;
    const lt_backend *be = ctx->be;
    lt_status rc = LT_OK;
    int nb = st->pad ? rollout_step_rows(n, st->n_rows) : n;
    int32_t *sh = st->step_host;
    memset(st->running, 0, (size_t)st->n_rows);
    for (int i = 0; i < n; i++) {
        st->step_row[i] = row[i];
        st->running[row[i]] = 1;
    }
    for (int i = n, r = 0; i < nb; i++) { /* padding: stopped rows, distinct */
        while (st->running[r])
            r++;
        st->step_row[i] = r++;
    }
    for (int i = 0; i < nb; i++) {
        int pad = i >= n;
        sh[i] = pad ? 0 : ids[i];
        sh[nb + i] = pad ? 0 : pos[i];
        sh[2 * nb + i] = st->step_row[i];
        sh[3 * nb + i] = pad ? 0 : (int32_t)rng_bits(&rng[row[i]]);
    }
    LT_TRY(be->upload(ctx, st->step, sh, sizeof(int32_t) * 4 * (size_t)nb));
    if (st->try_graphs && st->warm && (!st->graph || st->graph_rows != nb)) {
        if (st->graph) be->graph_free(ctx, st->graph); /* the rows fell to a smaller size */
        st->graph = NULL;
        if (step_record(st, row, pos, nb, so, out) != LT_OK) st->try_graphs = 0;
    }
    if (st->try_graphs && st->graph) {
        LT_TRY(be->graph_launch(ctx, st->graph));
        out->graph_steps++;
    } else {
        LT_TRY(step_ops(st, row, pos, nb, so));
        st->warm = 1;
    }
    LT_TRY(be->download(ctx, picked, st->drawn, sizeof(int32_t) * (size_t)n));
done:
    return rc;
}

/* ---- the call ----------------------------------------------------------------------------- */

static lt_status check_args(const gemma3_model *m, const int32_t *const *prompts,
                            const int *prompt_len, int n_prompts, int group, const lt_gen_opts *o,
                            int max_seq, char *err) {
    int V = m->cfg.vocab_size;
    if (n_prompts <= 0)
        return lt_fail(err, LT_ERR_ARG, "rollout: n_prompts=%d must be >= 1", n_prompts);
    if (group <= 0) return lt_fail(err, LT_ERR_ARG, "rollout: group=%d must be >= 1", group);
    if ((int64_t)n_prompts * group > INT_MAX / 2)
        return lt_fail(err, LT_ERR_ARG, "rollout: %d prompts x group %d is too many rows",
                       n_prompts, group);
    if (!prompts || !prompt_len || !o)
        return lt_fail(err, LT_ERR_ARG, "rollout: prompts, prompt_len and options are required");
    lt_status rc = gen_opts_check(o, err);
    if (rc != LT_OK) return rc;
    for (int p = 0; p < n_prompts; p++) {
        int P = prompt_len[p];
        if (P <= 0 || !prompts[p])
            return lt_fail(err, LT_ERR_ARG, "rollout: prompt %d is empty", p);
        if ((int64_t)P + o->max_new > max_seq)
            return lt_fail(err, LT_ERR_ARG,
                           "rollout: prompt %d has %d tokens; with max_new=%d that is %lld, more "
                           "than max_seq %d",
                           p, P, o->max_new, (long long)P + o->max_new, max_seq);
        for (int t = 0; t < P; t++)
            if (prompts[p][t] < 0 || prompts[p][t] >= V)
                return lt_fail(err, LT_ERR_ARG,
                               "rollout: prompt %d: token id %d at position %d is outside the "
                               "vocabulary [0, %d)",
                               p, prompts[p][t], t, V);
    }
    return LT_OK;
}

/* err = "rollout: <what><the op's message>" (err may be ctx->err itself). */
static lt_status fail_op(char *err, const lt_ctx *ctx, lt_status rc, const char *what) {
    char why[LT_ERRLEN];
    snprintf(why, sizeof why, "%s", ctx->err);
    return lt_fail(err, rc, "rollout: %s%s", what, why);
}

static int is_cancelled(atomic_int *cancel) {
    return cancel && atomic_load(cancel);
}

/* The n ids a backend drew are in [0, V): what lets the next step's embedding go unchecked on
 * the device (a recorded embedding cannot read its check back). */
static lt_status drawn_check(const int32_t *ids, int n, int V, char *err) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V)
            return lt_fail(err, LT_ERR_DEVICE,
                           "rollout: sample_rows drew id %d, outside the vocabulary [0, %d)",
                           ids[i], V);
    return LT_OK;
}

/* Row r takes token id; returns 1 while it keeps running. */
static int row_push(rollout_out *out, const gemma3_config *c, int r, int id) {
    out->ids[(size_t)r * (size_t)out->max_new + (size_t)out->len[r]++] = id;
    out->new_tokens++;
    if (gemma3_is_stop(c, id)) {
        out->stopped[r] = 1;
        return 0;
    }
    return out->len[r] < out->max_new;
}

lt_status gemma3_rollout(const gemma3_model *m, lt_ctx *ctx, const int32_t *const *prompts,
                         const int *prompt_len, int n_prompts, int group, const lt_gen_opts *o,
                         int max_seq, atomic_int *cancel, rollout_out *out, char *err) {
    memset(out, 0, sizeof *out);
    lt_status rc = check_args(m, prompts, prompt_len, n_prompts, group, o, max_seq, err);
    if (rc != LT_OK) {
        if (ctx->err != err) snprintf(ctx->err, sizeof ctx->err, "%s", err);
        return rc;
    }
    if (!ctx->be->sample_rows) {
        rc = lt_fail(err, LT_ERR_ARG, "rollout: the %s backend has no sample_rows op",
                     ctx->be->name);
        if (ctx->err != err) snprintf(ctx->err, sizeof ctx->err, "%s", err);
        return rc;
    }
    const gemma3_config *c = &m->cfg;
    int N = n_prompts * group, max_new = o->max_new, V = c->vocab_size, longest = 0;
    for (int p = 0; p < n_prompts; p++)
        if (prompt_len[p] > longest) longest = prompt_len[p];
    int max_len = longest + max_new;
    out->n_rows = N;
    out->max_new = max_new;
    out->ids = calloc((size_t)N * (size_t)(max_new ? max_new : 1), sizeof(int32_t));
    out->len = calloc((size_t)N, sizeof(int));
    out->stopped = calloc((size_t)N, sizeof(int));
    lt_rng *rng = malloc(sizeof(lt_rng) * (size_t)N);
    int *active = malloc(sizeof(int) * (size_t)N);
    int32_t *next = malloc(sizeof(int32_t) * (size_t)N), *pos = malloc(sizeof(int32_t) * (size_t)N);
    int32_t *picked = malloc(sizeof(int32_t) * (size_t)N);
    lt_sample_opts so = gen_sample_opts(o);
    rollout_state st = {0};
    gemma3_cache pc = {0};
    int have_st = 0, have_pc = 0, n_act = 0;
    double t0 = now_s(), t1 = t0;
    char what[64];
    if (!out->ids || !out->len || !out->stopped || !rng || !active || !next || !pos || !picked) {
        rc = lt_fail(err, LT_ERR_MEMORY, "rollout: out of memory for %d rows", N);
        goto done;
    }
    if (max_new == 0) goto done; /* nothing to sample */
    for (int r = 0; r < N; r++)
        rng_seed(&rng[r], rollout_row_seed(o->seed, r / group, r % group));
    LT_TRY(state_alloc(&st, m, ctx, N, max_len, err));
    have_st = 1;
    if ((rc = gemma3_cache_init(&pc, ctx, c, max_len)) != LT_OK) {
        rc = fail_op(err, ctx, rc, "");
        goto done;
    }
    have_pc = 1;

    /* prefill: each prompt once, its first token sampled by each of its rows */
    for (int p = 0; p < n_prompts; p++) {
        if (is_cancelled(cancel)) {
            rc = lt_fail(err, LT_CANCELLED, "rollout: cancelled");
            goto done;
        }
        gemma3_cache_reset(&pc, ctx);
        gemma3_outputs fo = {.last_logits = st.logits};
        rc = gemma3_forward(m, ctx, prompts[p], prompt_len[p], &pc, &fo);
        for (int j = 0; rc == LT_OK && j < group; j++) { /* row j: the caches, logits, bits */
            rc = row_take_prompt(&st, &pc, p * group + j, prompt_len[p]);
            if (rc == LT_OK && j > 0)
                rc = ctx->be->copy(ctx, st.logits + (size_t)j * (size_t)V, st.logits,
                                   sizeof(float) * (size_t)V);
            st.step_host[j] = (int32_t)rng_bits(&rng[p * group + j]);
        }
        if (rc == LT_OK)
            rc = ctx->be->upload(ctx, st.step, st.step_host, sizeof(int32_t) * (size_t)group);
        if (rc == LT_OK) rc = draw_rows(&st, &so, st.step, group);
        if (rc == LT_OK)
            rc = ctx->be->download(ctx, picked, st.drawn, sizeof(int32_t) * (size_t)group);
        if (rc != LT_OK) {
            snprintf(what, sizeof what, "prompt %d: ", p);
            rc = fail_op(err, ctx, rc, what);
            goto done;
        }
        if ((rc = drawn_check(picked, group, V, err)) != LT_OK) goto done;
        out->prefill_tokens += prompt_len[p];
        for (int j = 0; j < group; j++) {
            int r = p * group + j, id = picked[j];
            if (row_push(out, c, r, id)) {
                active[n_act] = r;
                next[n_act] = id;
                pos[n_act++] = prompt_len[p];
            }
        }
    }
    gemma3_cache_free(&pc, ctx);
    have_pc = 0;
    t1 = now_s();
    out->prefill_s = t1 - t0;

    /* decode: one forward over the running rows per token; stopped rows leave the batch */
    if ((rc = gemma3_acts_alloc(&st.b, ctx, c, N)) != LT_OK) {
        rc = lt_fail(err, rc, "rollout: out of memory for the activations of %d rows", N);
        goto done;
    }
    st.have_acts = 1;
    while (n_act > 0) {
        if (is_cancelled(cancel)) {
            rc = lt_fail(err, LT_CANCELLED, "rollout: cancelled");
            goto done;
        }
        if ((rc = decode_step(&st, active, next, pos, n_act, rng, &so, picked, out)) != LT_OK) {
            rc = fail_op(err, ctx, rc, "");
            goto done;
        }
        if ((rc = drawn_check(picked, n_act, V, err)) != LT_OK) goto done;
        int kept = 0;
        for (int i = 0; i < n_act; i++) {
            int r = active[i], id = picked[i];
            if (row_push(out, c, r, id)) {
                active[kept] = r;
                next[kept] = id;
                pos[kept++] = pos[i] + 1;
            }
        }
        n_act = kept;
    }
    out->decode_s = now_s() - t1;
done:
    if (have_pc) gemma3_cache_free(&pc, ctx);
    if (have_st) state_free(&st);
    free(picked);
    free(rng);
    free(active);
    free(next);
    free(pos);
    if (rc != LT_OK) {
        if (ctx->err != err) snprintf(ctx->err, sizeof ctx->err, "%s", err);
        rollout_out_free(out);
    }
    return rc;
}
