/* rollout.h — batched sampling with a KV cache: many completions at once, for GRPO. Engine-
 * private.
 *
 * gemma3_rollout continues n_prompts prompts with `group` completions each (rows
 * p*group .. p*group+group-1 belong to prompt p). Each prompt is prefilled once and its KV
 * cache shared by its group; then every step decodes one token for every row still running, in
 * one forward over all of them (the linears see [rows, H]), with the adapters the model's
 * weights carry, as they are (enabled or not; never merged). Each row samples with its own RNG,
 * seeded by rollout_row_seed from (opts->seed, its prompt, its index in the group), so a row's
 * tokens depend neither on which other rows run beside it nor on the group size; temperature 0
 * is greedy and then equals gemma3_forward-based generation token for token. A row stops at a stop
 * id of the config (eos, <end_of_turn>), which it keeps as its last token (GRPO's completion mask
 * includes the first EOS), or at max_new tokens (clipped). Written once against the op table: runs
 * on the CPU and on CUDA. Where the backend records graphs (CUDA), each decode step after the
 * first is one replay of a recorded step (LATHE_CUDA_GRAPHS=0: the same ops called one by one).
 */
#ifndef LATHE_ROLLOUT_H
#define LATHE_ROLLOUT_H

#include <stdatomic.h>
#include <stdint.h>

#include "cuda/model/model.h"

typedef struct rollout_out {
    int n_rows;   /* n_prompts * group */
    int max_new;  /* row stride of ids */
    int32_t *ids; /* [n_rows, max_new] completion tokens (malloc'd); row r's first len[r] */
    int *len;     /* [n_rows] tokens of row r, its stop token included */
    int *stopped; /* [n_rows] 1 = ended with a stop id, 0 = reached max_new (clipped) */
    int64_t prefill_tokens;     /* prompt tokens run (each prompt once) */
    int64_t new_tokens;         /* tokens sampled, over every row */
    double prefill_s, decode_s; /* wall time of the two phases */
    /* the decode steps as graphs (a backend with graph ops): steps replayed, graphs recorded,
     * the seconds recording took (in decode_s), and why graphs stopped or never started ("" =
     * they ran to the end, or the backend has none) */
    int graph_steps, graph_records;
    double record_s;
    char graph_note[160];
} rollout_out;

/* Completes prompts[p] (prompt_len[p] ids each, BOS included by the caller) with `group`
 * samples each, under o's temperature, top_k, top_p, min_p, seed and max_new. cancel (may be
 * NULL) is polled between decode steps: a raised flag returns LT_CANCELLED (out freed). A
 * prompt plus max_new tokens must fit max_seq (else LT_ERR_ARG naming the prompt). On failure
 * ctx->err / err (LT_ERRLEN) says why and *out holds nothing. */
lt_status gemma3_rollout(const gemma3_model *m, lt_ctx *ctx, const int32_t *const *prompts,
                         const int *prompt_len, int n_prompts, int group, const lt_gen_opts *o,
                         int max_seq, atomic_int *cancel, rollout_out *out, char *err);
void rollout_out_free(rollout_out *out);

/* The seed of the RNG (rng_seed) that prompt p's j-th row samples with: replaying a row one
 * sequence at a time with it gives the same tokens. */
uint64_t rollout_row_seed(uint64_t seed, int p, int j);

/* The rows a decode step of n running rows (of n_rows) runs on a backend that records graphs:
 * n rounded up to 8, 16, 32, ... (at most n_rows); the extra rows are stopped rows whose
 * results are dropped. A graph is recorded for a number of rows, so this bounds the recordings
 * of a call to one per size the running rows pass through (1 for 8 rows, 4 for 64), while the
 * running rows only fall. Below 8 rows a padded row costs little: every few-row linear reads
 * its weight once for up to 8 rows (gemv.cu). 0 for n <= 0. */
int rollout_step_rows(int n, int n_rows);

/* Backend memory gemma3_rollout allocates for n_rows rows of at most max_len tokens each
 * (prompt + completion), the KV caches included: the GRPO memory plan. */
size_t gemma3_rollout_bytes(const gemma3_model *m, int n_rows, int max_len);

#endif
