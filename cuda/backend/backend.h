/* backend.h — the table of ops every device implements, forward and backward. Engine-private.
 *
 * Model code (gemma3.c, lora.c, train.c) is written once against this table and never
 * branches on the device. backend_cpu.c is the fp32 reference and the specification of
 * backend_cuda.cu: same op, same name, same test. All tensor data pointers passed to an op are
 * memory of that backend (host memory for "cpu"); move data with upload/download.
 *
 * Conventions for every op:
 *   - activations, norms' weights, positions-derived values, softmax and loss are fp32;
 *     frozen weights (lt_weight.w) may be F32/F16/BF16, or NF4/int8 (lt_quant) for linear and
 *     linear_backward, and are converted inside the op; a backend that cannot compute a
 *     format refuses it with LT_ERR_ARG and a message naming what is missing;
 *   - shapes are row-major, [rows, features]; an op reads its sizes from the tensors' shapes
 *     and checks they agree, returning LT_ERR_ARG with ctx->err filled when they do not;
 *   - a `*_backward` op ACCUMULATES (+=) into weight/adapter gradients and WRITES (=) the
 *     input gradient, like llm.c; a NULL gradient pointer (data == NULL) means "not needed".
 * Both backends fill every slot but the graph ops (recording ops for replay), which only the
 * CUDA backend has. The training ops (backward, loss, optimizer, vector ops)
 * are checked once before training starts (lt_backend_missing_training_op), so a future
 * backend may leave them NULL and still run inference.
 *
 * This file owns the op table, lt_ctx, lt_weight and lt_lora. It must not know Gemma.
 */
#ifndef LATHE_BACKEND_H
#define LATHE_BACKEND_H

#include "cuda/base/tensor.h"

/* A LoRA adapter on one linear layer: y += scale * (x·Aᵀ)·Bᵀ. Owned by lora.c (training code
 * may add fields at the end). */
typedef struct lt_lora {
    lt_tensor a;      /* [r, in]  fp32 */
    lt_tensor b;      /* [out, r] fp32 */
    lt_tensor grad_a; /* [r, in]  fp32, accumulated by linear_backward; data NULL = frozen */
    lt_tensor grad_b; /* [out, r] fp32 */
    float scale;      /* alpha / r, or alpha / sqrt(r) for rsLoRA */
    float dropout;    /* 0 = none */
    int enabled;      /* 0 = skip the adapter (the GRPO reference policy) */
} lt_lora;

/* How a frozen weight's bytes encode its values: plain floats, or one of bitsandbytes' formats
 * (formats/bnb.c writes and reads them; lt_weight_dequantize_rows is the arithmetic).
 *   NF4 (bitsandbytes' quantize_4bit, quant_type "nf4"): w.dtype U8, w.data holds out*in/2
 *   bytes; element e of the row-major flattened weight is the HIGH nibble of byte e/2 when e is
 *   even and the low nibble when odd; its value is code[nibble] * absmax[e / blocksize], where
 *   absmax is fp32, or with double quantization (nested) absmax[b] = code2[qabsmax[b]] *
 *   absmax2[b / nested_blocksize] + offset, each step rounded to fp32.
 *   INT8 (LLM.int8, Linear8bitLt): w.dtype I8 [out, in]; value = (w8 * scb[row]) / 127, computed
 *   as bitsandbytes' int8_vectorwise_dequant does: w8 * scb, then * 7.874015718698502e-3. */
typedef enum lt_quant_kind {
    LT_QUANT_NONE = 0, /* w is F32, F16 or BF16 */
    LT_QUANT_NF4 = 1,
    LT_QUANT_INT8 = 2,
} lt_quant_kind;

typedef struct lt_quant {
    lt_quant_kind kind;
    int blocksize;          /* NF4: elements per absmax (64) */
    const float *code;      /* NF4: [16] the quant_map (index -> value) */
    const float *absmax;    /* NF4: [n_blocks] fp32; NULL when nested */
    const uint8_t *qabsmax; /* NF4 nested: [n_blocks] dynamic-map codes of absmax - offset */
    const float *absmax2;   /* NF4 nested: [ceil(n_blocks / nested_blocksize)] fp32 */
    const float *code2;     /* NF4 nested: [256] the signed dynamic map (nested_quant_map) */
    int nested_blocksize;   /* NF4 nested: 256 */
    float offset;           /* NF4 nested: mean of the fp32 absmax */
    const float *scb;       /* INT8: [out] fp32 row absmax (SCB) */
} lt_quant;

/* A frozen linear weight, however it is stored, plus its optional adapter. `linear` computes
 * x·Wᵀ (+ the adapter) for every storage format in one place. A quantized weight is frozen:
 * it has no grad_w (LoRA adapters on it train as usual). */
typedef struct lt_weight {
    lt_tensor w;      /* [out, in] logical shape: F32, F16, BF16, or U8/I8 per q.kind */
    lt_lora *lora;    /* NULL = no adapter */
    lt_tensor grad_w; /* [out, in] fp32 for full fine-tuning; data NULL = frozen */
    lt_quant q;       /* kind LT_QUANT_NONE for 16/32-bit weights */
} lt_weight;

/* Bytes a weight's storage takes (packed codes + quantization state for NF4/int8). */
size_t lt_weight_bytes(const lt_weight *w);
/* The arrays a weight of n elements in `rows` rows is stored as, in bytes, in this order:
 * 16/32-bit: the tensor (n * elem); NF4: the packed codes ((n + 1) / 2), code [16] fp32, then
 * absmax [ceil(n / blocksize)] fp32, or with double quantization (nested_blocksize > 0)
 * qabsmax [n_blocks] u8, absmax2 [ceil(n_blocks / nested_blocksize)] fp32, code2 [256] fp32;
 * int8: w8 [n], scb [rows] fp32. Returns how many (at most LT_WEIGHT_MAX_PARTS). The one
 * formula behind lt_weight_bytes, the device placement and the memory estimates. */
#define LT_WEIGHT_MAX_PARTS 5
int lt_weight_parts(lt_quant_kind kind, int64_t n, int64_t rows, size_t elem, int blocksize,
                    int nested_blocksize, size_t parts[LT_WEIGHT_MAX_PARTS]);
/* Rows r0 .. r0+nr-1 of a weight in host memory, as fp32 into dst ([nr, in]), for every storage
 * format: 16-bit widened, NF4 and int8 dequantized exactly as bitsandbytes' dequantize_4bit /
 * int8_vectorwise_dequant compute them in fp32 (backends/default/ops.py). The CPU backend's
 * quantized matmuls, the exporters and the tests all use this one function. */
void lt_weight_dequantize_rows(const lt_weight *w, int64_t r0, int64_t nr, float *dst);

struct lt_backend;
/* A recorded sequence of ops (graph_begin / graph_end), opaque: each backend that records
 * defines it. */
typedef struct lt_graph lt_graph;

/* A backend's memory now. `where` names it for messages ("GPU memory", "memory"). */
typedef struct lt_mem_info {
    const char *where;
    int on_device; /* 1 when buffers live off the host (then checkpoints go to host memory) */
    size_t in_use; /* bytes the backend's allocator hands out now (0 when it does not count) */
    size_t peak;   /* high-water mark of in_use */
    size_t cached; /* bytes it holds from the system but does not use (reusable) */
    size_t free;   /* bytes the system can still give (0 = unknown) */
    size_t total;
} lt_mem_info;

/* sample_rows' settings (the same for every row of a call). */
typedef struct lt_sample_opts {
    float inv_temp; /* 1 / temperature; <= 0 = greedy */
    int top_k;      /* 0 = off */
    float top_p;    /* 1 = off */
    float min_p;    /* 0 = off */
} lt_sample_opts;

/* One per session and device: which backend, its private state (thread pool, CUDA stream,
 * cuBLAS handle), and the message of the last failed op. */
typedef struct lt_ctx {
    const struct lt_backend *be;
    void *impl;    /* backend-private */
    int n_threads; /* CPU: worker threads (0 = all cores) */
    char err[LT_ERRLEN];
} lt_ctx;

typedef struct lt_backend {
    const char *name; /* "cpu", "cuda" */

    /* ---- lifetime and memory -------------------------------------------------------- */
    lt_status (*init)(lt_ctx *ctx);            /* fills ctx->impl */
    void (*shutdown)(lt_ctx *ctx);             /* frees ctx->impl */
    void *(*alloc)(lt_ctx *ctx, size_t bytes); /* NULL + ctx->err on failure; zeroed */
    void (*release)(lt_ctx *ctx, void *p);
    lt_status (*upload)(lt_ctx *ctx, void *dst, const void *host_src, size_t bytes);
    lt_status (*download)(lt_ctx *ctx, void *host_dst, const void *src, size_t bytes);
    lt_status (*copy)(lt_ctx *ctx, void *dst, const void *src, size_t bytes); /* device->device */
    lt_status (*sync)(lt_ctx *ctx);
    /* Off-device storage for activation checkpoints (the per-layer inputs the
     * backward recomputes from). host_alloc: host memory the stash copies reach at full speed
     * (page-locked on CUDA, plain on the CPU); NULL + ctx->err on failure. stash_out / stash_in
     * copy between it and backend memory BESIDE the ops: each copy starts once every op queued
     * before it is done, and later ops may run while it runs; stash_wait makes every op queued
     * after it wait until all those copies are done (it does not block the host). A buffer a
     * copy reads or writes is the caller's to keep still until the next stash_wait. */
    void *(*host_alloc)(lt_ctx *ctx, size_t bytes);
    void (*host_release)(lt_ctx *ctx, void *p); /* waits for copies still using p */
    lt_status (*stash_out)(lt_ctx *ctx, void *host_dst, const void *src, size_t bytes);
    lt_status (*stash_in)(lt_ctx *ctx, void *dst, const void *host_src, size_t bytes);
    lt_status (*stash_wait)(lt_ctx *ctx);
    /* Lends the backend `bytes` of the caller's backend memory at p: the temporaries of the
     * ops that follow come from it, as far as it goes, instead of new allocations, until
     * lend(ctx, NULL, 0). The caller leaves that memory alone meanwhile. The trainer lends its
     * idle layer buffers to the loss this way. A backend may ignore the loan (the CPU does). */
    void (*lend)(lt_ctx *ctx, void *p, size_t bytes);
    /* 1 when this ctx's matmuls read their activations as BF16 (the CUDA bf16 path): then the
     * trainer stores the activations and gradients that only feed matmuls (norm outputs, the
     * GeGLU product, its gradients) in BF16, the very values linear / linear_backward would
     * round them to, and skips their casts. 0 on the CPU, whose matmuls read fp32. */
    int (*bf16_activations)(lt_ctx *ctx);
    /* dst = src converted, n elements of F32/F16/BF16, both in backend memory (fp16 results
     * clamped to ±65504 as the last guard): weights placed in the policy's dtype. */
    lt_status (*convert)(lt_ctx *ctx, void *dst, lt_dtype dst_t, const void *src, lt_dtype src_t,
                         int64_t n);
    /* Where this backend's buffers live and how much room is left there, for the memory plan
     * and %status. */
    void (*memory)(lt_ctx *ctx, lt_mem_info *m);
    /* Gives cached buffers and page-locked host blocks back to the system (when %train ends). */
    void (*trim)(lt_ctx *ctx);

    /* ---- forward ops ------------------------------------------------------------------ */
    /* h[t,:] = table[ids[t], :] * scale.  h: [T, H] fp32; ids: [T] I32; table: [V, H] any
     * float dtype. An id outside [0, V) is LT_ERR_ARG. */
    lt_status (*embedding)(lt_ctx *ctx, lt_tensor h, lt_tensor ids, const lt_weight *table,
                           float scale);
    /* y = x·Wᵀ (+ lora.scale·(x·Aᵀ)·Bᵀ when w->lora && enabled).
     * y: [T, out] fp32; x: [T, in] fp32, or BF16 when w->w is BF16 (a matmul-only activation,
     * see bf16_activations); w->w: [out, in]. */
    lt_status (*linear)(lt_ctx *ctx, lt_tensor y, lt_tensor x, const lt_weight *w);
    /* n (1..4) linears of the same x: y[k] = linear(x, w[k]), exactly as n calls of `linear`
     * compute them, in fewer launches where the backend can (q, k and v; gate and up while
     * decoding). NULL: the caller calls `linear` n times (lt_linears_each). */
    lt_status (*linears)(lt_ctx *ctx, int n, const lt_tensor *y, lt_tensor x,
                         const lt_weight *const *w);
    /* Gemma RMSNorm over the last dim D = numel(w):
     * y = x * rsqrt(mean(x²) + eps) * (1 + w), computed in fp32. x, y: [N, D] (y may alias x);
     * y may be BF16 (rounded to nearest even; then it must not alias x).
     * Used for the layer norms ([T, H]) and for q_norm/k_norm ([T*heads, hd]). */
    lt_status (*rmsnorm)(lt_ctx *ctx, lt_tensor y, lt_tensor x, lt_tensor w, float eps);
    /* A sublayer's end: x = rmsnorm(x, w); h += x; then, when a.data, a = rmsnorm(h, w2) (the
     * next sublayer's input norm): the values those ops give, in fewer launches. x, h, a:
     * [N, D] fp32, three distinct buffers; w, w2: [D] fp32. NULL: the caller calls the three
     * (lt_rmsnorm_add_ops). */
    lt_status (*rmsnorm_add)(lt_ctx *ctx, lt_tensor h, lt_tensor x, lt_tensor w, lt_tensor a,
                             lt_tensor w2, float eps);
    /* Rotate-half (NeoX) RoPE, in place. x: [T, heads, hd] fp32; pos: [T] I32.
     * angle_j = (pos / factor) * theta^(-2j/hd); factor = 1 for no scaling. */
    lt_status (*rope)(lt_ctx *ctx, lt_tensor x, lt_tensor pos, float theta, float factor);
    /* Gemma's q_norm and k_norm on every head (rmsnorm over hd with qw / kw), then RoPE, in place:
     * q [T, nh, hd], k [T, nkv, hd] fp32 at positions pos [T] I32 — the values those four ops
     * give, in fewer launches. NULL: the caller calls the four (lt_qk_norm_rope_ops). */
    lt_status (*qk_norm_rope)(lt_ctx *ctx, lt_tensor q, lt_tensor k, lt_tensor qw, lt_tensor kw,
                              lt_tensor pos, float eps, float theta, float factor);
    /* Causal (+ sliding window) GQA attention.
     * out: [T, nh*hd]; q: [T, nh, hd]; k, v: [S, nkv, hd]; qpos: [T] I32; kpos: [S] I32.
     * Key s is visible to query t iff kpos[s] >= 0 && kpos[s] <= qpos[t] &&
     * (window <= 0 || qpos[t] - kpos[s] < window). Query head j uses KV head j / (nh/nkv).
     * scores = q·k * scale, softmax in fp32. A query with no visible key gets zeros. */
    lt_status (*attention)(lt_ctx *ctx, lt_tensor out, lt_tensor q, lt_tensor k, lt_tensor v,
                           lt_tensor qpos, lt_tensor kpos, int window, float scale);
    /* y = gelu_tanh(gate) * up. All [T, I] fp32 (y may alias gate); y may be BF16 (rounded to
     * nearest even; then not aliasing). */
    lt_status (*geglu)(lt_ctx *ctx, lt_tensor y, lt_tensor gate, lt_tensor up);
    /* y += x (same shape, fp32): the residual add. */
    lt_status (*add)(lt_ctx *ctx, lt_tensor y, lt_tensor x);
    /* Decode attention over per-row KV caches: one new token for each of R rows (batched
     * sampling). kc, vc: [N, S, nkv, hd] fp32, N row caches of S slots; rows: [R] I32, the cache
     * row of each query (distinct, in [0, N)); qpos: [R] I32 (>= 0); q: [R, nh, hd]; k_new,
     * v_new: [R, nkv, hd]; out: [R, nh*hd]. First k_new[i], v_new[i] are written into slot
     * qpos[i] % S of row rows[i]. Then query i attends that row alone, which holds its
     * positions 0..qpos[i], position p in slot p % S (a ring once qpos[i] >= S): slot s holds
     * position qpos[i] - d, d = (qpos[i] - s) mod S, and is visible iff d <= qpos[i] and
     * (window <= 0 || d < window). Scores, softmax and GQA as attention (which it equals with
     * kpos[s] = qpos[i] - d, or -1 where that is negative). A backend may leave it NULL: the
     * sampler then calls attention once per row. */
    lt_status (*attention_rows)(lt_ctx *ctx, lt_tensor out, lt_tensor q, lt_tensor k_new,
                                lt_tensor v_new, lt_tensor kc, lt_tensor vc, lt_tensor rows,
                                lt_tensor qpos, int window, float scale);
    /* Batched sampling: one token id per row of logits ([R, V] fp32), written to ids ([R]
     * I32), with bits ([R] I32) the row's 32 random bits. The rule (sample_rule.h has its
     * arithmetic; every backend follows it to the integer):
     *   inv_temp <= 0: the first maximum (greedy). Otherwise m = the row's maximum and
     *   w_j = lt_sample_weight(l_j, m, inv_temp); the candidates start as every id, then
     *   top_k in [1, V): keep key(l_j) >= the key of the top_k-th largest logit (ties kept);
     *   top_p < 1: with W the candidates' weight, keep key(l_j) >= the smallest key v whose
     *     candidates at or below v weigh more than lt_sample_cut(W, top_p);
     *   min_p > 0: keep w_j >= lt_sample_floor(min_p);
     *   S = the candidates' weight, t = lt_sample_target(S, bits); the id is the first
     *   candidate (in id order) at which the running weight exceeds t (S == 0, only with NaN
     *   logits: the first maximum).
     * A backend may leave it NULL: the sampler then draws on the host. */
    lt_status (*sample_rows)(lt_ctx *ctx, lt_tensor ids, lt_tensor logits, lt_tensor bits,
                             const lt_sample_opts *o);

    /* ---- backward ops (NULL until implemented; see conventions above) -------------------- */
    /* dx = dy·W (+ adapter path); accumulates w->grad_w, lora grad_a/grad_b when present.
     * dy: [T, out]; x: [T, in] (the forward input); dx: [T, in] fp32. dy and x are fp32, or
     * BF16 with a BF16 weight (matmul-only activations and gradients, see bf16_activations). */
    lt_status (*linear_backward)(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, lt_tensor x,
                                 const lt_weight *w);
    /* dx from dy, x, w; dw (fp32 [D]) accumulated when dw.data != NULL. */
    lt_status (*rmsnorm_backward)(lt_ctx *ctx, lt_tensor dx, lt_tensor dw, lt_tensor dy,
                                  lt_tensor x, lt_tensor w, float eps);
    /* In place on dx ([T, heads, hd]): the inverse rotation. */
    lt_status (*rope_backward)(lt_ctx *ctx, lt_tensor dx, lt_tensor pos, float theta, float factor);
    /* dq: [T, nh, hd]; dk, dv: [S, nkv, hd] (written); dout: [T, nh*hd]. Recomputes softmax. */
    lt_status (*attention_backward)(lt_ctx *ctx, lt_tensor dq, lt_tensor dk, lt_tensor dv,
                                    lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                                    lt_tensor qpos, lt_tensor kpos, int window, float scale);
    /* dgate, dup from dy and the forward inputs. Elementwise: fp32 dgate may alias gate and
     * dup may alias up. dgate and dup may be BF16 instead (one dtype for both; rounded to
     * nearest even; not aliasing): gradients that only feed matmuls. */
    lt_status (*geglu_backward)(lt_ctx *ctx, lt_tensor dgate, lt_tensor dup, lt_tensor dy,
                                lt_tensor gate, lt_tensor up);
    /* Accumulates dh * scale into table->grad_w rows (only when training the embedding). */
    lt_status (*embedding_backward)(lt_ctx *ctx, const lt_weight *table, lt_tensor dh,
                                    lt_tensor ids, float scale);
    /* Fused, chunked cross-entropy over the tied head: never holds [T, V] logits.
     * h: [T, H] (after the final norm); targets: [T] I32 (-100 = ignored). The logits are
     * z = logit_scale * h·headᵀ (1 = plain; a sampling temperature's 1/T). row_weight: fp32
     * [T] w_t (any sign, 0 allowed), or data NULL = every w_t 1. *loss_sum (host) =
     * Σ w_t·CE_t over non-ignored rows; dh (if data != NULL) = grad_scale * d(Σ w_t·CE_t)/dh,
     * written; head gradients (weighted alike) accumulated when head->grad_w present.
     * row_logp (if data != NULL): fp32 [T], written: log_softmax(z_t)[target_t] = -CE_t,
     * unweighted, 0 for ignored rows. */
    lt_status (*cross_entropy)(lt_ctx *ctx, double *loss_sum, lt_tensor dh, lt_tensor h,
                               const lt_weight *head, lt_tensor targets, lt_tensor row_weight,
                               lt_tensor row_logp, float logit_scale, float grad_scale);
    /* One AdamW step on an fp32 parameter in place (PyTorch semantics, decoupled decay). */
    lt_status (*adamw)(lt_ctx *ctx, lt_tensor param, lt_tensor grad, lt_tensor m, lt_tensor v,
                       float lr, float beta1, float beta2, float eps, float weight_decay, int step);

    /* ---- the small fp32 vector ops the trainer needs ------------------------------------- */
    /* t[:] = value */
    lt_status (*fill)(lt_ctx *ctx, lt_tensor t, float value);
    /* t *= s */
    lt_status (*scale)(lt_ctx *ctx, lt_tensor t, float s);
    /* *out (host) = sum of t^2 in double */
    lt_status (*sumsq)(lt_ctx *ctx, double *out, lt_tensor t);
    /* Inverted dropout with a mask that is a pure function of (seed, index): y = x * keep *
     * mul / (1 - p), keep = lt_dropout_keep(seed, i, p) (below). The same seed gives the same
     * mask, so forward, recompute and backward agree. y may alias x. */
    lt_status (*dropout)(lt_ctx *ctx, lt_tensor y, lt_tensor x, float p, float mul, uint64_t seed);

    /* ---- the image tower's ops and the image block's attention -------------------------
     * NULL where a backend lacks them: the image code then refuses with a message naming the
     * missing op (lt_backend_missing_vision_op), and text-only work is unaffected. */
    /* LayerNorm with bias over the last dim D = numel(w), in fp32:
     * y = (x - mean) * rsqrt(var + eps) * w + b, var the biased variance (torch's layer_norm).
     * x, y: [N, D] fp32 (y may alias x); w, b: [D] fp32. */
    lt_status (*layernorm)(lt_ctx *ctx, lt_tensor y, lt_tensor x, lt_tensor w, lt_tensor b,
                           float eps);
    /* y[n, :] += b for every row n: a linear's bias. y: [N, D] fp32; b: [D] fp32. */
    lt_status (*add_bias)(lt_ctx *ctx, lt_tensor y, lt_tensor b);
    /* y = gelu_tanh(x) elementwise (the tanh approximation, as geglu's), fp32; y may alias x. */
    lt_status (*gelu)(lt_ctx *ctx, lt_tensor y, lt_tensor x);
    /* Average pooling of a square grid: x [g*g, D] holds grid cell (r, c) in row r*g + c;
     * y [(g/k)*(g/k), D] holds the mean of each k x k block, block (i, j) in row i*(g/k) + j,
     * the sum taken in fp32 and divided by k*k (torch's AvgPool2d(kernel=k, stride=k)). g must
     * be a multiple of k. */
    lt_status (*avg_pool)(lt_ctx *ctx, lt_tensor y, lt_tensor x, int k);
    /* attention, plus one extra span of key positions per query, the later ones included:
     * key s is visible to query t iff kpos[s] >= 0, (kpos[s] <= qpos[t] OR span[t, 0] <=
     * kpos[s] <= span[t, 1]), and, with a window, qpos[t] - kpos[s] < window. So causality
     * does not apply inside the span but the sliding window still cuts it on the past side.
     * span: [T, 2] I32; a query with span[t, 0] > span[t, 1] (e.g. 0, -1) has none. This is
     * Gemma 3's image block as transformers 5.17 masks it (token_type_ids; measured against
     * Gemma3ForConditionalGeneration in tests/fixtures/make_vision_fixture.py): an image token
     * sees every later token of its own block, and the earlier ones a sliding layer's window
     * reaches. */
    lt_status (*attention_span)(lt_ctx *ctx, lt_tensor out, lt_tensor q, lt_tensor k, lt_tensor v,
                                lt_tensor qpos, lt_tensor kpos, lt_tensor span, int window,
                                float scale);
    /* attention_backward under attention_span's visibility rule (dq, dk, dv written; softmax
     * recomputed): what training needs for image blocks. span as attention_span's. NULL where
     * a backend lacks it: training on image rows is then refused (both backends have it). */
    lt_status (*attention_span_backward)(lt_ctx *ctx, lt_tensor dq, lt_tensor dk, lt_tensor dv,
                                         lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                                         lt_tensor qpos, lt_tensor kpos, lt_tensor span, int window,
                                         float scale);

    /* The image tower's backward ops (lt_tower_grad_ops below), or NULL where a backend lacks
     * them: training LoRA adapters on the tower is then refused. */
    const struct lt_tower_grad_ops *tower_grad;

    /* ---- graphs: a sequence of ops recorded once and run many times ---------------------
     * NULL where a backend runs every op as it is called (the CPU): callers then just call
     * the ops. Between graph_begin and graph_end the ops called on ctx are recorded, not run:
     * every address, size and option they are given is fixed into the graph, and the values
     * in that memory are read each time the graph runs. So a caller that changes its inputs
     * uploads them to the same addresses before each graph_launch (outside the recording).
     * While recording, only ops and copy may be called: upload, download, sync, alloc, the
     * stash and the ops that return a host value (cross_entropy, sumsq) fail, and so does an
     * op that needs state it would make on first use (a first unrecorded run makes it). An op
     * that fails while recording ends the recording there: the backend frees what the
     * recording took and runs ops directly again, and graph_end returns that error; the caller
     * runs the same ops directly instead. The ops' temporaries belong to the graph until
     * graph_free. Memory a graph reads or writes must stay allocated until graph_free. */
    /* Starts recording. Refused (the caller runs the ops directly) where the backend cannot
     * record now: e.g. its profiler is on, or graphs are turned off (CUDA: LATHE_CUDA_GRAPHS=0). */
    lt_status (*graph_begin)(lt_ctx *ctx);
    /* Ends the recording: *g = the graph, ready to run; on failure *g = NULL, nothing is held
     * and ctx->err says why. Always call it after a graph_begin that succeeded. */
    lt_status (*graph_end)(lt_ctx *ctx, struct lt_graph **g);
    /* Runs g once, in order with the ops called before and after it. */
    lt_status (*graph_launch)(lt_ctx *ctx, struct lt_graph *g);
    /* Frees g and its temporaries (g may be NULL). */
    void (*graph_free)(lt_ctx *ctx, struct lt_graph *g);
} lt_backend;

/* The dropout keep-test, shared by every backend: 1 when element i survives. */
static inline int lt_dropout_keep(uint64_t seed, uint64_t i, float p) {
    uint64_t z = seed + 0x9e3779b97f4a7c15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0) >= (double)p;
}

/* avg_pool's grid, shared by every backend's shape checks: the side g of the square grid of
 * `cells` rows when cells is a square and g a multiple of k > 0, else 0. */
static inline int64_t lt_pool_grid(int64_t cells, int k) {
    int64_t g = 0;
    while ((g + 1) * (g + 1) <= cells)
        g++;
    return g > 0 && g * g == cells && k > 0 && g % k == 0 ? g : 0;
}

/* The name of the first training op (backward ops, loss, optimizer, vector ops) a backend
 * lacks, or NULL when it has them all: the trainer checks once, up front. */
const char *lt_backend_missing_training_op(const lt_backend *be);
/* The name of the first image op (layernorm, add_bias, gelu, avg_pool, attention_span) a
 * backend lacks, or NULL when it has them all. */
const char *lt_backend_missing_vision_op(const lt_backend *be);
/* The image tower's backward, which training LoRA adapters on the tower needs: a table of its
 * own that lt_backend points at (tower_grad), so that a backend without them leaves it NULL.
 * Conventions as the backward ops above. */
typedef struct lt_tower_grad_ops {
    /* layernorm's backward: dx (written) from dy, the forward input x and w; dw, db (fp32 [D])
     * accumulated when their data != NULL. x, dy, dx: [N, D] fp32 (dx may alias dy or x). */
    lt_status (*layernorm_backward)(lt_ctx *ctx, lt_tensor dx, lt_tensor dw, lt_tensor db,
                                    lt_tensor dy, lt_tensor x, lt_tensor w, float eps);
    /* gelu's backward: dx = dy * gelu_tanh'(x) elementwise, fp32 (dx may alias dy or x). */
    lt_status (*gelu_backward)(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, lt_tensor x);
    /* avg_pool's backward: dx [g*g, D] (written) gets dy [(g/k)^2, D] of its block / (k*k). */
    lt_status (*avg_pool_backward)(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, int k);
} lt_tower_grad_ops;
/* be's tower backward ops (be->tower_grad), or NULL where it has none. */
const lt_tower_grad_ops *lt_backend_tower_grad(const lt_backend *be);
/* The name of the first op training LoRA adapters on the image tower needs beyond the training
 * and image ops (layernorm_backward, gelu_backward, avg_pool_backward, attention_backward), or
 * NULL when the backend has them all. */
const char *lt_backend_missing_tower_training_op(const lt_backend *be);

/* The CPU reference backend (backend_cpu.c). */
extern const lt_backend lt_backend_cpu;

/* Helpers over the table (backend_cpu.c): create a ctx for a backend (init called). */
lt_status lt_ctx_init(lt_ctx *ctx, const lt_backend *be, int n_threads);
void lt_ctx_shutdown(lt_ctx *ctx);
/* The plain ops that linears, rmsnorm_add and qk_norm_rope stand for, through ctx->be: what a
 * caller runs where the backend has no such op, and what a backend's op falls back to. */
lt_status lt_linears_each(lt_ctx *ctx, int n, const lt_tensor *y, lt_tensor x,
                          const lt_weight *const *w);
lt_status lt_rmsnorm_add_ops(lt_ctx *ctx, lt_tensor h, lt_tensor x, lt_tensor w, lt_tensor a,
                             lt_tensor w2, float eps);
lt_status lt_qk_norm_rope_ops(lt_ctx *ctx, lt_tensor q, lt_tensor k, lt_tensor qw, lt_tensor kw,
                              lt_tensor pos, float eps, float theta, float factor);

/* The CPU matmul kernel, exposed for tests and benches: y[T,out] = x[T,in]·W[out,in]ᵀ with W
 * of any float dtype. use_blas 0 forces the plain threaded C loop even when CBLAS is built. */
lt_status lt_cpu_matmul(lt_ctx *ctx, float *y, const float *x, const void *w, lt_dtype wt,
                        int64_t T, int64_t in, int64_t out, int use_blas);
/* 1 when this build has CBLAS. */
int lt_cpu_has_blas(void);

#endif
