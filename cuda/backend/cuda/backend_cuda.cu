/* backend_cuda.cu — the CUDA backend: lt_backend_cuda, every op of backend.h on one stream.
 *
 * Owns the device ctx (stream, cuBLAS handle, a caching allocator, device scalars), the GEMM
 * helper (row-major over cuBLAS, fp32 accumulation always) and the op orchestration: linear
 * and its adapter path, attention (fused kernels on the 16-bit paths, cuBLAS chunks otherwise),
 * chunked fused cross-entropy, norms, RoPE, GeGLU, embedding, AdamW, and the recording of op
 * sequences into CUDA graphs that replay with one launch (graph_begin .. graph_free, the
 * batched sampler's decode step). The element kernels live in the cuda/kernels/ folder.
 * backend_cpu.c is the specification; tests/gpu/test_ops.c compares the two. Must not know
 * Gemma.
 *
 * Precision: activations, norms, softmax, RoPE, loss and the residual stream
 * stay fp32. A linear layer computes in its weight's storage dtype: fp32 weights -> fp32 GEMM
 * (no TF32), bf16/fp16 weights -> the fp32 input is cast to that dtype, the GEMM accumulates and
 * writes fp32. On the fp16 path every cast input is first scaled by a power of two chosen from
 * its absolute maximum (so 65504 is never reached and small gradients do not flush to zero);
 * the GEMM's alpha undoes the scale exactly. The scale lives in device memory and alpha is
 * read by cuBLAS from there: no op waits for the host except those that must return a host
 * value (embedding's id check, the loss).
 *
 * Errors are values: every CUDA and cuBLAS call goes through CU_TRY / BLAS_TRY, which fill
 * ctx->err and return LT_ERR_DEVICE (LT_ERR_MEMORY for out-of-memory). Nothing exits.
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "cuda/backend/cpu/grad.h"
#include "cuda/backend/cuda/backend_cuda.h"
}
#include "cuda/backend/cuda/kernels/kernels.h"

/* ---- ctx state --------------------------------------------------------------------------- */

typedef struct cu_block {
    void *p;
    size_t size;
    const char *op; /* the op that took it (NULL: a caller's buffer) */
} cu_block;

typedef struct cu_rope_table {
    float theta, factor;
    int hd;
    float *d; /* [hd/2] */
} cu_rope_table;

#define CU_SLOTS 64
#define CU_PROF_CAP 8192
#define CU_PROF_NAMES 48

typedef struct cu_prof_total {
    const char *name;
    double ms;
    long calls;
} cu_prof_total;

typedef struct cu_impl {
    int device, cc, n_sm;
    int64_t max_rows; /* LATHE_CUDA_CHUNK_ROWS: caps attention / loss chunks (tests), 0 = none */
    int64_t keyrange_rows; /* LATHE_CUDA_KEYRANGE_ROWS: query rows per chunk when key ranges are
                              known; < 0 (the default) turns key ranges off: on the H200 the extra
                              smaller GEMMs cost more than the masked work they skip (1b: 186 vs
                              170 ms a step at 512 rows; bench/results-2026-11-30.txt) */
    int flash;  /* LATHE_CUDA_FLASH=0 turns the fused attention kernels off (the fallback path) */
    int gemv16; /* LATHE_CUDA_GEMV=0 sends few-row linears through cuBLAS like the rest */
    int gemv16_group;  /* LATHE_CUDA_GEMV_GROUP=0: linears of one input launch one by one */
    int norm_add;      /* LATHE_CUDA_NORM_ADD=0: rmsnorm_add as rmsnorm, add, rmsnorm */
    size_t smem_optin; /* shared memory a block may opt in to */
    /* attention calls the fused kernels took (lt_cuda_flash_calls) */
    long flash_calls;
    cudaStream_t stream;
    cublasHandle_t blas;
    /* the stash (checkpoint offload): copies run on their own stream, ordered after the ops
     * queued before them by ev_ops; ev_stash marks the last copy for stash_wait */
    cudaStream_t stash_stream;
    cudaEvent_t ev_ops, ev_stash;
    struct {
        void *p;
        size_t bytes;
        int used;
    } pinned[4]; /* page-locked blocks kept for the next training step (allocating is slow) */
    lt_dtype prec;
    /* caching allocator: one stream, so a block released here may be reused by the next op */
    cu_block *live, *freeb;
    int n_live, cap_live, n_free, cap_free;
    size_t in_use, peak, reserved;
    size_t cap; /* LATHE_CUDA_MEMORY_CAP: the most device memory lathe may take (0 = the card's);
                   "15G" makes an H100 or H200 stand in for a T4's usable 15 GiB */
    const char *peak_op; /* the op during which peak was reached (NULL: outside ops) */
    cu_block *peak_live; /* LATHE_CUDA_PEAK_BLOCKS=1: the live blocks at the peak */
    int n_peak_live, peak_blocks;
    /* per-op temporaries, released at op end */
    void *tmp[32];
    int n_tmp;
    /* memory a caller lent for temporaries (lend): handed out from the start at every op */
    char *lent;
    size_t lent_bytes, lent_used;
    /* device scalars: [0] = 0, [1] = 1, the rest handed out per op */
    float *dscal;
    int next_slot;
    unsigned *dbits; /* absmax bit patterns, one per slot */
    int *dflag;
    cu_rope_table rope[16];
    int n_rope;
    /* profiling */
    int prof;
    cudaEvent_t ev[2 * CU_PROF_CAP];
    const char *prof_name[CU_PROF_CAP];
    int n_prof, n_ev_made;
    cu_prof_total totals[CU_PROF_NAMES];
    int n_totals;
    const char *cur_op;
    int cur_prof; /* profile entry of the op in progress, -1 = none */
    /* host copies of the last small uploads (token positions): lets attention skip masked key
     * ranges without reading positions back (a read-back would stall the stream) */
    struct {
        const char *dev;
        size_t bytes;
        void *host;
    } seen[8];
    int n_seen_next;
    /* graph recording (graph_begin .. graph_end; see "graphs" below): rec_live while the stream
     * captures; recording from graph_begin to graph_end, also after a failed op ended the
     * capture early (rec_rc, rec_err: its error, for graph_end); rec_blocks: the temporaries the
     * recorded ops took, the graph's until graph_free */
    int recording, rec_live;
    lt_status rec_rc;
    char rec_err[LT_ERRLEN];
    struct cu_gblock *rec_blocks;
    int n_rec_blocks, cap_rec_blocks;
    int rec_ops, rec_fail_at; /* LATHE_CUDA_GRAPH_FAIL=N: the N-th recorded op fails (tests) */
} cu_impl;

static cu_impl *impl_of(lt_ctx *ctx) {
    return (cu_impl *)ctx->impl;
}

static lt_status cu_report(lt_ctx *ctx, const char *what, cudaError_t e, const char *file,
                           int line) {
    lt_status rc = (e == cudaErrorMemoryAllocation) ? LT_ERR_MEMORY : LT_ERR_DEVICE;
    lt_fail(ctx->err, rc, "cuda: %s failed: %s (%s:%d)", what, cudaGetErrorString(e), file, line);
    if (e != cudaErrorMemoryAllocation) cudaGetLastError(); /* clear a non-sticky error */
    return rc;
}

static const char *blas_name(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED:
        return "not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED:
        return "allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE:
        return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH:
        return "architecture mismatch";
    case CUBLAS_STATUS_EXECUTION_FAILED:
        return "execution failed";
    case CUBLAS_STATUS_INTERNAL_ERROR:
        return "internal error";
    case CUBLAS_STATUS_NOT_SUPPORTED:
        return "not supported";
    default:
        return "error";
    }
}

static lt_status blas_report(lt_ctx *ctx, const char *what, cublasStatus_t s, const char *file,
                             int line) {
    return lt_fail(ctx->err, s == CUBLAS_STATUS_ALLOC_FAILED ? LT_ERR_MEMORY : LT_ERR_DEVICE,
                   "cublas: %s failed: %s (%d) (%s:%d)", what, blas_name(s), (int)s, file, line);
}

/* The one checking macro per kind: on failure, set rc and jump to the op's `done:` label. */
#define CU_TRY(call)                                                                               \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            rc = cu_report(ctx, #call, e_, __FILE__, __LINE__);                                    \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)
#define BLAS_TRY(call)                                                                             \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                         \
            rc = blas_report(ctx, #call, s_, __FILE__, __LINE__);                                  \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)
/* After a kernel launch. */
#define LAUNCHED() CU_TRY(cudaGetLastError())
/* An op's argument check: ctx->err = "cuda <opname>: <msg>", rc = LT_ERR_ARG, then done:. (An
 * op's other lt_status calls go through base/error.h's LT_TRY.) */
#define CU_REQUIRE(cond, msg)                                                                      \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            lt_fail(ctx->err, LT_ERR_ARG, "cuda %s: %s", opname, msg);                             \
            rc = LT_ERR_ARG; /* seen by the compiler: an op's outputs are set when rc is LT_OK */  \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)

/* An op that reads a value back to the host (a loss, a sum) cannot be recorded into a graph:
 * while recording it fails with LT_ERR_STATE, which ends the recording (op_end). */
#define CU_NOT_RECORDING()                                                                         \
    do {                                                                                           \
        if (impl_of(ctx)->rec_live) {                                                              \
            rc = lt_fail(ctx->err, LT_ERR_STATE,                                                   \
                         "cuda %s: returns a host value, so it cannot be recorded into a graph",   \
                         opname);                                                                  \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)

static int is_f32(const lt_tensor *t) {
    return t->dtype == LT_F32 && t->data;
}
static int is_float(lt_dtype d) {
    return d == LT_F32 || d == LT_F16 || d == LT_BF16;
}
static int64_t last_dim(const lt_tensor *t) {
    return t->ndim ? t->shape[t->ndim - 1] : 1;
}

/* ---- allocator ---------------------------------------------------------------------------- */

/* Sizes are rounded to 512 bytes below 1 MiB and to 128 KiB above: a coarser step wastes
 * real memory on the hundreds of small adapter tensors (2 MiB steps cost 0.3 GiB at 4B). */
static size_t round_size(size_t b) {
    if (b == 0) b = 1;
    if (b < (1u << 20)) return (b + 511) & ~(size_t)511;
    return (b + (128u << 10) - 1) & ~((size_t)(128u << 10) - 1);
}

static int push_block(cu_block **arr, int *n, int *cap, cu_block b) {
    if (*n == *cap) {
        int nc = *cap ? *cap * 2 : 64;
        cu_block *na = (cu_block *)realloc(*arr, sizeof(cu_block) * (size_t)nc);
        if (!na) return -1;
        *arr = na;
        *cap = nc;
    }
    (*arr)[(*n)++] = b;
    return 0;
}

static void free_cached(cu_impl *I) {
    for (int i = 0; i < I->n_free; i++) {
        cudaFree(I->freeb[i].p);
        I->reserved -= I->freeb[i].size;
    }
    I->n_free = 0;
}

/* cudaMalloc, also while the stream records a graph: the recording's thread-local capture mode
 * counts cudaMalloc as unsafe (it is not captured), but a block taken then belongs to the graph
 * and is not freed before graph_free, so it is safe; PyTorch's CUDACachingAllocator.cpp
 * (cudaMallocMaybeCapturing) relaxes the mode around its cudaMalloc the same way. */
static cudaError_t dev_malloc(cu_impl *I, void **p, size_t bytes) {
    if (!I->rec_live) return cudaMalloc(p, bytes);
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    cudaError_t e = cudaMalloc(p, bytes);
    cudaThreadExchangeStreamCaptureMode(&mode);
    return e;
}

/* A block of at least `bytes` from the cache or from cudaMalloc; NULL + ctx->err on failure.
 * While a graph records, cached blocks are not given back to make room (cudaFree waits for the
 * device, which a capture forbids): the allocation fails instead, and so does the recording. */
static void *pool_get(lt_ctx *ctx, size_t bytes) {
    cu_impl *I = impl_of(ctx);
    size_t need = round_size(bytes);
    int best = -1;
    for (int i = 0; i < I->n_free; i++) {
        size_t s = I->freeb[i].size;
        if (s >= need && s <= need + need / 16 + (2u << 20) &&
            (best < 0 || s < I->freeb[best].size))
            best = i;
    }
    cu_block b = {NULL, need, NULL};
    if (best >= 0) {
        b = I->freeb[best];
        I->freeb[best] = I->freeb[--I->n_free];
    } else {
        if (I->cap && I->reserved + need > I->cap && !I->rec_live) free_cached(I);
        if (I->cap && I->reserved + need > I->cap) {
            lt_fail(ctx->err, LT_ERR_MEMORY,
                    "cuda: out of device memory allocating %.1f MiB: lathe holds %.1f MiB of its "
                    "%.1f MiB cap (LATHE_CUDA_MEMORY_CAP); try a smaller batch or max_seq",
                    need / 1048576.0, I->reserved / 1048576.0, I->cap / 1048576.0);
            return NULL;
        }
        cudaError_t e = dev_malloc(I, &b.p, need);
        if (e != cudaSuccess && !I->rec_live) {
            cudaGetLastError();
            free_cached(I);
            e = cudaMalloc(&b.p, need);
        }
        if (e != cudaSuccess) {
            cudaGetLastError();
            size_t fr = 0, tot = 0;
            cudaMemGetInfo(&fr, &tot);
            lt_fail(ctx->err, LT_ERR_MEMORY,
                    "cuda: out of device memory allocating %.1f MiB (in use by lathe %.1f MiB, "
                    "free %.1f of %.1f MiB);"
                    " try a smaller batch or max_seq",
                    need / 1048576.0, I->in_use / 1048576.0, fr / 1048576.0, tot / 1048576.0);
            return NULL;
        }
        I->reserved += need;
    }
    if (push_block(&I->live, &I->n_live, &I->cap_live, b) != 0) {
        cudaFree(b.p);
        I->reserved -= b.size;
        lt_fail(ctx->err, LT_ERR_MEMORY, "cuda: out of host memory tracking an allocation");
        return NULL;
    }
    I->in_use += b.size;
    I->live[I->n_live - 1].op = I->cur_op;
    if (I->in_use > I->peak) {
        I->peak = I->in_use;
        I->peak_op = I->cur_op;
        if (I->peak_blocks) { /* a snapshot for lt_cuda_peak_report (a measuring aid) */
            cu_block *s = (cu_block *)realloc(I->peak_live, sizeof(cu_block) * (size_t)I->n_live);
            if (s) {
                memcpy(s, I->live, sizeof(cu_block) * (size_t)I->n_live);
                I->peak_live = s;
                I->n_peak_live = I->n_live;
            }
        }
    }
    return b.p;
}

static void seen_forget(cu_impl *I, const void *p, size_t bytes);

static void pool_put(lt_ctx *ctx, void *p) {
    cu_impl *I = impl_of(ctx);
    if (!p || !I) return;
    for (int i = I->n_live - 1; i >= 0; i--) {
        if (I->live[i].p == p) {
            cu_block b = I->live[i];
            seen_forget(I, b.p, b.size);
            I->live[i] = I->live[--I->n_live];
            I->in_use -= b.size;
            if (push_block(&I->freeb, &I->n_free, &I->cap_free, b) != 0) {
                cudaFree(b.p); /* could not cache it: give it back */
                I->reserved -= b.size;
            }
            return;
        }
    }
}

/* ---- host copies of small uploads ------------------------------------------------------------ */

/* Forgets every remembered upload overlapping [p, p + bytes) (written by something else now). */
static void seen_forget(cu_impl *I, const void *p, size_t bytes) {
    const char *a = (const char *)p, *b = a + bytes;
    for (int i = 0; i < 8; i++) {
        if (!I->seen[i].dev) continue;
        const char *c = I->seen[i].dev, *d = c + I->seen[i].bytes;
        if (c < b && a < d) {
            free(I->seen[i].host);
            I->seen[i].dev = NULL;
            I->seen[i].host = NULL;
        }
    }
}

static void seen_remember(cu_impl *I, const void *dev, const void *host, size_t bytes) {
    seen_forget(I, dev, bytes);
    if (bytes == 0 || bytes > (256u << 10) || bytes % 4) return;
    void *h = malloc(bytes);
    if (!h) return;
    memcpy(h, host, bytes);
    int k = I->n_seen_next++ & 7;
    free(I->seen[k].host);
    I->seen[k].dev = (const char *)dev;
    I->seen[k].bytes = bytes;
    I->seen[k].host = h;
}

/* The host copy of n int32 at device address p, if an upload put them there; else NULL. */
static const int32_t *seen_lookup(cu_impl *I, const void *p, int64_t n) {
    const char *a = (const char *)p;
    for (int i = 0; i < 8; i++) {
        const char *c = I->seen[i].dev;
        if (c && a >= c && a + n * 4 <= c + I->seen[i].bytes && (a - c) % 4 == 0)
            return (const int32_t *)((const char *)I->seen[i].host + (a - c));
    }
    return NULL;
}

/* ---- op bracket: temporaries, scalar slots, profiling -------------------------------------- */

static void prof_flush(cu_impl *I);

/* Opens a timed region (an op, or a GEMM inside one): returns its entry or -1. */
static int prof_open(cu_impl *I, const char *name) {
    if (!I->prof || I->rec_live || I->n_prof >= CU_PROF_CAP) return -1;
    int k = I->n_prof;
    while (I->n_ev_made < 2 * (k + 1)) {
        if (cudaEventCreate(&I->ev[I->n_ev_made]) != cudaSuccess) {
            cudaGetLastError();
            I->prof = 0;
            return -1;
        }
        I->n_ev_made++;
    }
    cudaEventRecord(I->ev[2 * k], I->stream);
    I->prof_name[k] = name;
    I->n_prof++;
    return k;
}

static void prof_close(cu_impl *I, int k) {
    if (k >= 0) cudaEventRecord(I->ev[2 * k + 1], I->stream);
}

static void op_begin(lt_ctx *ctx, const char *name) {
    cu_impl *I = impl_of(ctx);
    I->n_tmp = 0;
    I->lent_used = 0;
    I->next_slot = 2;
    I->cur_op = name;
    I->cur_prof = -1;
    if (I->prof && !I->rec_live) {
        if (I->n_prof > CU_PROF_CAP - 256) prof_flush(I); /* nothing is open between ops */
        I->cur_prof = prof_open(I, name);
    }
}

static void prof_flush(cu_impl *I) {
    if (!I->n_prof) return;
    cudaEventSynchronize(I->ev[2 * I->n_prof - 1]);
    for (int k = 0; k < I->n_prof; k++) {
        float ms = 0;
        if (cudaEventElapsedTime(&ms, I->ev[2 * k], I->ev[2 * k + 1]) != cudaSuccess) {
            cudaGetLastError();
            continue;
        }
        int j = 0;
        while (j < I->n_totals && strcmp(I->totals[j].name, I->prof_name[k]) != 0)
            j++;
        if (j == I->n_totals) {
            if (I->n_totals == CU_PROF_NAMES) continue;
            I->totals[I->n_totals].name = I->prof_name[k];
            I->totals[I->n_totals].ms = 0;
            I->totals[I->n_totals].calls = 0;
            I->n_totals++;
        }
        I->totals[j].ms += ms;
        I->totals[j].calls++;
    }
    I->n_prof = 0;
}

static void rec_release_tmps(cu_impl *I);
static lt_status rec_op_end(lt_ctx *ctx, lt_status rc);

static lt_status op_end(lt_ctx *ctx, lt_status rc) {
    cu_impl *I = impl_of(ctx);
    if (I->rec_live) { /* the graph keeps them (for the ops recorded after this one, too) */
        rec_release_tmps(I);
        rc = rec_op_end(ctx, rc);
    } else {
        for (int i = 0; i < I->n_tmp; i++)
            pool_put(ctx, I->tmp[i]);
    }
    I->n_tmp = 0;
    prof_close(I, I->cur_prof);
    I->cur_prof = -1;
    I->cur_op = NULL;
    return rc;
}

static void *rec_tmp_get(lt_ctx *ctx, size_t bytes);

/* A temporary for the current op (released by op_end; while a graph records, the graph's). */
static void *tmp_get(lt_ctx *ctx, size_t bytes) {
    cu_impl *I = impl_of(ctx);
    size_t need = (bytes + 255) & ~(size_t)255;
    if (I->lent && !I->rec_live && I->lent_bytes - I->lent_used >= need) { /* the loan first */
        void *p = I->lent + I->lent_used;
        I->lent_used += need;
        return p;
    }
    if (I->n_tmp == (int)(sizeof I->tmp / sizeof I->tmp[0])) {
        lt_fail(ctx->err, LT_ERR_MEMORY, "cuda %s: too many temporaries (internal)", I->cur_op);
        return NULL;
    }
    void *p = I->rec_live ? rec_tmp_get(ctx, bytes) : pool_get(ctx, bytes);
    if (p) I->tmp[I->n_tmp++] = p;
    return p;
}

static float *slot(lt_ctx *ctx, unsigned **bits) {
    cu_impl *I = impl_of(ctx);
    int k = I->next_slot++;
    if (k >= CU_SLOTS) k = 2 + (k - 2) % (CU_SLOTS - 2); /* never reached: an op uses a handful */
    if (bits) *bits = I->dbits + k;
    return I->dscal + k;
}

/* ---- graphs: ops recorded once, replayed many times (backend.h's graph ops) ------------------
 * graph_begin starts a capture of the stream (cudaStreamBeginCapture); the ops called until
 * graph_end enqueue as they always do, and the capture records their kernels, copies and cuBLAS
 * calls into a CUDA graph instead of running them; graph_end instantiates it, graph_launch runs
 * it with one call. The decode step of the batched sampler is ~470 ops of host work a token;
 * replayed, it is one launch.
 *
 * Capture mode: thread-local. The ops never need an unsafe call of their own while recording
 * (what would is refused below), so any that slips through is made an error that ends the
 * recording, rather than run outside the graph as the relaxed mode would let it; and unlike the
 * global mode, another thread's capture-unsafe calls (another ctx, another session) are not
 * made to fail. The one unsafe call allowed is the allocator's cudaMalloc (dev_malloc).
 *
 * Temporaries: an op's temporaries are baked into the graph by address, so while recording they
 * come from the recording's own blocks (rec_blocks), never back to the shared pool: op_end
 * marks them free for the ops recorded after it (the capture of one stream is a chain, so a
 * later op of the same graph runs after the earlier one has finished, as on the stream), and
 * graph_end hands them to the graph, which gives them back to the pool in graph_free. Memory lent
 * with `lend` is not used while recording (the loan may end before the graph does).
 *
 * Refused while recording (the recording ends there and graph_end returns the error, so the
 * caller runs the ops directly): upload, download, sync, alloc, the stash, cross_entropy and
 * sumsq (they return host values), graph_launch, and a RoPE table not made yet (a first
 * unrecorded run makes it). embedding skips its id check (it reads a flag back): a caller that
 * records it feeds ids it checked on the host, or that sample_rows drew on the device, always in
 * [0, V). Attention takes every key (key ranges come from host copies of positions, which a
 * replay does not update). graph_begin is refused while the profiler is on (it times ops by
 * events read on the host) and under LATHE_CUDA_GRAPHS=0. LATHE_CUDA_GRAPH_FAIL=N makes the
 * N-th op of every recording fail, to test the callers' fallback. */

typedef struct cu_gblock {
    void *p;
    size_t size;
    int busy; /* taken by the op being recorded */
} cu_gblock;

struct lt_graph {
    cudaGraphExec_t exec;
    cu_gblock *blocks; /* the recorded ops' temporaries */
    int n_blocks;
};

static void *rec_tmp_get(lt_ctx *ctx, size_t bytes) {
    cu_impl *I = impl_of(ctx);
    size_t need = round_size(bytes);
    int best = -1;
    for (int i = 0; i < I->n_rec_blocks; i++) {
        const cu_gblock *b = &I->rec_blocks[i];
        if (!b->busy && b->size >= need && b->size <= need + need / 16 + (2u << 20) &&
            (best < 0 || b->size < I->rec_blocks[best].size))
            best = i;
    }
    if (best >= 0) {
        I->rec_blocks[best].busy = 1;
        return I->rec_blocks[best].p;
    }
    if (I->n_rec_blocks == I->cap_rec_blocks) {
        int nc = I->cap_rec_blocks ? 2 * I->cap_rec_blocks : 32;
        cu_gblock *na = (cu_gblock *)realloc(I->rec_blocks, sizeof(cu_gblock) * (size_t)nc);
        if (!na) {
            lt_fail(ctx->err, LT_ERR_MEMORY, "cuda %s: out of host memory recording a graph",
                    I->cur_op);
            return NULL;
        }
        I->rec_blocks = na;
        I->cap_rec_blocks = nc;
    }
    void *p = pool_get(ctx, bytes);
    if (p) I->rec_blocks[I->n_rec_blocks++] = (cu_gblock){p, need, 1};
    return p;
}

static void rec_release_tmps(cu_impl *I) {
    for (int i = 0; i < I->n_rec_blocks; i++)
        I->rec_blocks[i].busy = 0;
}

/* The recording's blocks back to the pool (nothing ran on them, or the graph is gone). */
static void rec_blocks_put(lt_ctx *ctx) {
    cu_impl *I = impl_of(ctx);
    for (int i = 0; i < I->n_rec_blocks; i++)
        pool_put(ctx, I->rec_blocks[i].p);
    I->n_rec_blocks = 0;
}

/* Ends a recording early, on the error rc (ctx->err says why): the capture ends, what was
 * recorded is dropped, its blocks go back; the stream runs ops directly again. graph_end
 * returns rc. */
static void rec_abort(lt_ctx *ctx, lt_status rc) {
    cu_impl *I = impl_of(ctx);
    cudaGraph_t g = NULL;
    I->rec_live = 0;
    if (cudaStreamEndCapture(I->stream, &g) != cudaSuccess) cudaGetLastError();
    if (g) cudaGraphDestroy(g);
    rec_blocks_put(ctx);
    I->rec_rc = rc;
    snprintf(I->rec_err, sizeof I->rec_err, "%.*s (the graph recording ended here)", LT_ERRLEN - 40,
             ctx->err);
}

/* op_end's part while recording: counts the op, forces a failure where LATHE_CUDA_GRAPH_FAIL
 * asks, and ends the recording on any failure. */
static lt_status rec_op_end(lt_ctx *ctx, lt_status rc) {
    cu_impl *I = impl_of(ctx);
    I->rec_ops++;
    if (rc == LT_OK && I->rec_fail_at > 0 && I->rec_ops == I->rec_fail_at)
        rc = lt_fail(ctx->err, LT_ERR_DEVICE,
                     "cuda %s: op %d of the recording failed on purpose "
                     "(LATHE_CUDA_GRAPH_FAIL)",
                     I->cur_op, I->rec_ops);
    if (rc != LT_OK) rec_abort(ctx, rc);
    return rc;
}

/* A call that cannot be recorded, made while recording: LT_ERR_STATE, and the recording ends. */
static lt_status rec_refuse(lt_ctx *ctx, const char *what) {
    lt_fail(ctx->err, LT_ERR_STATE, "cuda: %s cannot be recorded into a graph", what);
    rec_abort(ctx, LT_ERR_STATE);
    return LT_ERR_STATE;
}

/* A non-op call (copy, convert) that failed while recording ends the recording too. */
static lt_status rec_check(lt_ctx *ctx, lt_status rc) {
    if (rc != LT_OK && impl_of(ctx)->rec_live) rec_abort(ctx, rc);
    return rc;
}

static lt_status cu_graph_begin(lt_ctx *ctx) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    const char *off = getenv("LATHE_CUDA_GRAPHS");
    if (off && strcmp(off, "0") == 0)
        return lt_fail(ctx->err, LT_ERR_STATE, "cuda: graphs are turned off (LATHE_CUDA_GRAPHS=0)");
    if (I->recording)
        return lt_fail(ctx->err, LT_ERR_STATE, "cuda: a graph is being recorded already");
    if (I->prof)
        return lt_fail(ctx->err, LT_ERR_STATE,
                       "cuda: the profiler is on (it times each op on its own): no graphs");
    {
        const char *f = getenv("LATHE_CUDA_GRAPH_FAIL");
        I->rec_fail_at = f ? atoi(f) : 0;
        I->rec_ops = 0;
        I->rec_rc = LT_OK;
        I->rec_err[0] = 0;
        I->n_rec_blocks = 0;
        CU_TRY(cudaStreamBeginCapture(I->stream, cudaStreamCaptureModeThreadLocal));
        I->recording = I->rec_live = 1;
    }
done:
    return rc;
}

static lt_status cu_graph_end(lt_ctx *ctx, lt_graph **out) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    cudaGraph_t g = NULL;
    cudaGraphExec_t ex = NULL;
    *out = NULL;
    if (!I->recording)
        return lt_fail(ctx->err, LT_ERR_STATE, "cuda: graph_end without a graph_begin");
    I->recording = 0;
    if (!I->rec_live) { /* an op failed and ended the recording */
        snprintf(ctx->err, sizeof ctx->err, "%s", I->rec_err);
        return I->rec_rc;
    }
    I->rec_live = 0;
    {
        cudaError_t e = cudaStreamEndCapture(I->stream, &g);
        if (e == cudaSuccess && !g) e = cudaErrorStreamCaptureInvalidated;
        CU_TRY(e);
        /* auto-free: a stream-ordered allocation a library made inside the capture (cuBLAS'
         * workspace since CUDA 12.2) and left unfreed would otherwise refuse the relaunch */
        CU_TRY(cudaGraphInstantiateWithFlags(&ex, g, cudaGraphInstantiateFlagAutoFreeOnLaunch));
        lt_graph *G = (lt_graph *)calloc(1, sizeof *G);
        if (!G) {
            rc = lt_fail(ctx->err, LT_ERR_MEMORY, "cuda: out of host memory for a graph");
            goto done;
        }
        G->exec = ex;
        ex = NULL;
        G->blocks = I->rec_blocks;
        G->n_blocks = I->n_rec_blocks;
        I->rec_blocks = NULL;
        I->n_rec_blocks = I->cap_rec_blocks = 0;
        *out = G;
    }
done:
    if (g) cudaGraphDestroy(g);
    if (ex) cudaGraphExecDestroy(ex);
    if (rc != LT_OK) rec_blocks_put(ctx);
    return rc;
}

static lt_status cu_graph_launch(lt_ctx *ctx, lt_graph *g) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    if (!g) return lt_fail(ctx->err, LT_ERR_ARG, "cuda: graph_launch without a graph");
    if (I->rec_live) return rec_refuse(ctx, "graph_launch");
    CU_TRY(cudaGraphLaunch(g->exec, I->stream));
done:
    return rc;
}

static void cu_graph_free(lt_ctx *ctx, lt_graph *g) {
    cu_impl *I = impl_of(ctx);
    if (!g) return;
    /* a launch may still run: let it finish before its exec and temporaries go */
    if (!I->rec_live && cudaStreamSynchronize(I->stream) != cudaSuccess) cudaGetLastError();
    if (cudaGraphExecDestroy(g->exec) != cudaSuccess) cudaGetLastError();
    for (int i = 0; i < g->n_blocks; i++)
        pool_put(ctx, g->blocks[i].p);
    free(g->blocks);
    free(g);
}

/* ---- operands in the matmul dtype ---------------------------------------------------------- */

typedef struct opnd {
    const void *p;
    lt_dtype dt;
    const float *inv; /* device 1/scale, or NULL for 1 */
} opnd;

/* Scale for an fp32 tensor about to be cast to fp16: *scale, *inv (device). */
static lt_status fp16_scale(lt_ctx *ctx, const float *x, int64_t n, float **scale, float **inv) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    unsigned *bits;
    float *s = slot(ctx, &bits), *iv = slot(ctx, NULL);
    CU_TRY(cudaMemsetAsync(bits, 0, sizeof(unsigned), I->stream));
    k_absmax(I->stream, x, n, bits);
    LAUNCHED();
    k_scale_from_absmax(I->stream, bits, s, iv);
    LAUNCHED();
    *scale = s;
    *inv = iv;
done:
    return rc;
}

/* x [rows, cols] fp32 (row stride cols) as a matmul operand of dtype cdt. */
static lt_status to_cdt(lt_ctx *ctx, const float *x, int64_t rows, int64_t cols, lt_dtype cdt,
                        opnd *o) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    o->p = x;
    o->dt = LT_F32;
    o->inv = NULL;
    if (cdt == LT_F32) return LT_OK;
    {
        void *d = tmp_get(ctx, (size_t)(rows * cols) * 2);
        float *s = NULL, *iv = NULL;
        if (!d) return LT_ERR_MEMORY;
        if (cdt == LT_F16) LT_TRY(fp16_scale(ctx, x, rows * cols, &s, &iv));
        k_cast_rows(I->stream, d, cdt, cols, x, cols, rows, cols, s);
        LAUNCHED();
        o->p = d;
        o->dt = cdt;
        o->inv = iv;
    }
done:
    return rc;
}

static cudaDataType_t cuda_type(lt_dtype d) {
    return d == LT_F16 ? CUDA_R_16F : d == LT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* Row-major C[M,N] (fp32, ldc) = alpha · op(A)[M,K] · op(B)[K,N] + beta · C, batched by strides.
 * op(A) = A ([M,K], lda) or Aᵀ (A stored [K,M]); same for B. alpha = c * (*ia) * (*ib) (the
 * operands' inverse scales; device) or plain c. beta is 0 or 1. fp32 accumulation always;
 * fp32 operands run as true fp32 (no TF32). */
static lt_status gemm_as(lt_ctx *ctx, int ta, int tb, int64_t M, int64_t N, int64_t K, float c,
                         const opnd *A, int64_t lda, int64_t sA, const opnd *B, int64_t ldb,
                         int64_t sB, int beta1, void *C, lt_dtype ct, int64_t ldc, int64_t sC,
                         int batch) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    size_t csz = ct == LT_F32 ? 4 : 2;
    if (M <= 0 || N <= 0 || batch <= 0) return LT_OK;
    if (K <= 0) { /* empty inner dimension: C = beta C */
        if (!beta1) {
            for (int b = 0; b < batch; b++)
                CU_TRY(cudaMemset2DAsync((char *)C + (size_t)(b * sC) * csz, (size_t)ldc * csz, 0,
                                         (size_t)N * csz, (size_t)M, I->stream));
        }
        return LT_OK;
    }
    {
        const float *ia = A->inv, *ib = B->inv;
        float hal = c, hbe = beta1 ? 1.0f : 0.0f;
        const void *alpha = &hal, *beta = &hbe;
        cublasPointerMode_t pm = CUBLAS_POINTER_MODE_HOST;
        if (ia || ib) {
            float *a = slot(ctx, NULL);
            k_make_alpha(I->stream, a, c, ia, ib);
            LAUNCHED();
            alpha = a;
            beta = I->dscal + (beta1 ? 1 : 0);
            pm = CUBLAS_POINTER_MODE_DEVICE;
        }
        BLAS_TRY(cublasSetPointerMode(I->blas, pm));
        int pk = prof_open(I, "  (cuBLAS GEMMs in the ops above)");
        cublasOperation_t opA = ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                          opB = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
        /* column-major view: Cᵀ[N,M] = op(B)ᵀ · op(A)ᵀ */
        if (batch == 1) {
            BLAS_TRY(cublasGemmEx(I->blas, opB, opA, (int)N, (int)M, (int)K, alpha, B->p,
                                  cuda_type(B->dt), (int)ldb, A->p, cuda_type(A->dt), (int)lda,
                                  beta, C, cuda_type(ct), (int)ldc, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
        } else {
            BLAS_TRY(cublasGemmStridedBatchedEx(
                I->blas, opB, opA, (int)N, (int)M, (int)K, alpha, B->p, cuda_type(B->dt), (int)ldb,
                sB, A->p, cuda_type(A->dt), (int)lda, sA, beta, C, cuda_type(ct), (int)ldc, sC,
                batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
        prof_close(I, pk);
    }
done:
    return rc;
}

/* gemm_as with an fp32 C: what every op but the adapters' small products uses. */
static lt_status gemm(lt_ctx *ctx, int ta, int tb, int64_t M, int64_t N, int64_t K, float c,
                      const opnd *A, int64_t lda, int64_t sA, const opnd *B, int64_t ldb,
                      int64_t sB, int beta1, float *C, int64_t ldc, int64_t sC, int batch) {
    return gemm_as(ctx, ta, tb, M, N, K, c, A, lda, sA, B, ldb, sB, beta1, C, LT_F32, ldc, sC,
                   batch);
}

/* P [rows, r] = X · Aᵀ-style adapter products as a bf16 operand, straight from the GEMM (fp32
 * accumulation, one rounding: what a cast of the fp32 result gives) — on the bf16 path, where
 * no scale is needed. Other paths compute the fp32 product and cast it (scaled on fp16). */
static lt_status small_product(lt_ctx *ctx, int ta, int tb, int64_t M, int64_t N, int64_t K,
                               const opnd *A, int64_t lda, const opnd *B, int64_t ldb, lt_dtype cdt,
                               opnd *P) {
    lt_status rc = LT_OK;
    if (cdt == LT_BF16) {
        void *p = tmp_get(ctx, (size_t)(M * N) * 2);
        if (!p) return LT_ERR_MEMORY;
        LT_TRY(gemm_as(ctx, ta, tb, M, N, K, 1.0f, A, lda, 0, B, ldb, 0, 0, p, LT_BF16, N, 0, 1));
        *P = (opnd){p, LT_BF16, NULL};
        return LT_OK;
    }
    {
        float *p = (float *)tmp_get(ctx, (size_t)(M * N) * 4);
        if (!p) return LT_ERR_MEMORY;
        LT_TRY(gemm(ctx, ta, tb, M, N, K, 1.0f, A, lda, 0, B, ldb, 0, 0, p, N, 0, 1));
        LT_TRY(to_cdt(ctx, p, M, N, cdt, P));
    }
done:
    return rc;
}

/* ---- lifetime and memory ops ---------------------------------------------------------------- */

extern "C" int lt_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

static int parse_prec(const char *w, lt_dtype *out) {
    if (!strcmp(w, "fp16") || !strcmp(w, "f16") || !strcmp(w, "float16"))
        *out = LT_F16;
    else if (!strcmp(w, "bf16") || !strcmp(w, "bfloat16"))
        *out = LT_BF16;
    else if (!strcmp(w, "fp32") || !strcmp(w, "f32") || !strcmp(w, "float32"))
        *out = LT_F32;
    else
        return -1;
    return 0;
}

static void cu_shutdown(lt_ctx *ctx);

static lt_status cu_init(lt_ctx *ctx) {
    lt_status rc = LT_OK;
    cu_impl *I = (cu_impl *)calloc(1, sizeof(cu_impl));
    if (!I) {
        return lt_fail(ctx->err, LT_ERR_MEMORY, "cuda: out of host memory");
    }
    ctx->impl = I;
    {
        int n = 0;
        cudaError_t e = cudaGetDeviceCount(&n);
        if (e != cudaSuccess || n == 0) {
            cudaGetLastError();
            lt_fail(ctx->err, LT_ERR_DEVICE, "cuda: no CUDA device available%s%s",
                    e != cudaSuccess ? ": " : "", e != cudaSuccess ? cudaGetErrorString(e) : "");
            free(I);
            ctx->impl = NULL;
            return LT_ERR_DEVICE;
        }
        const char *dv = getenv("LATHE_CUDA_DEVICE");
        I->device = dv ? atoi(dv) : 0;
        if (I->device < 0 || I->device >= n) I->device = 0;
        CU_TRY(cudaSetDevice(I->device));
        cudaDeviceProp prop;
        CU_TRY(cudaGetDeviceProperties(&prop, I->device));
        I->cc = prop.major * 10 + prop.minor;
        I->n_sm = prop.multiProcessorCount;
        I->prec = I->cc >= 80 ? LT_BF16 : LT_F16;
        I->smem_optin = prop.sharedMemPerBlockOptin;
        /* LATHE_CUDA_SMEM_OPTIN=BYTES plans the fused attention for a device with less shared
         * memory a block (65536: a T4's), so a larger card runs the small devices' tiles */
        const char *so = getenv("LATHE_CUDA_SMEM_OPTIN");
        if (so && *so) {
            long long v = atoll(so);
            if (v > 0 && (size_t)v < I->smem_optin) I->smem_optin = (size_t)v;
        }
        const char *fl = getenv("LATHE_CUDA_FLASH");
        I->flash = !(fl && strcmp(fl, "0") == 0);
        const char *gv = getenv("LATHE_CUDA_GEMV");
        I->gemv16 = !(gv && strcmp(gv, "0") == 0);
        const char *gg = getenv("LATHE_CUDA_GEMV_GROUP");
        I->gemv16_group = !(gg && strcmp(gg, "0") == 0);
        const char *na = getenv("LATHE_CUDA_NORM_ADD");
        I->norm_add = !(na && strcmp(na, "0") == 0);
        const char *mc = getenv("LATHE_CUDA_MEMORY_CAP"); /* bytes, or with a K/M/G suffix */
        if (mc && *mc) {
            char *end;
            double v = strtod(mc, &end);
            double mul = *end == 'G' || *end == 'g'   ? 1073741824.0
                         : *end == 'M' || *end == 'm' ? 1048576.0
                         : *end == 'K' || *end == 'k' ? 1024.0
                                                      : 1.0;
            if (v > 0) I->cap = (size_t)(v * mul);
        }
        const char *cr = getenv("LATHE_CUDA_CHUNK_ROWS");
        I->max_rows = cr ? atoll(cr) : 0;
        const char *pb = getenv("LATHE_CUDA_PEAK_BLOCKS");
        I->peak_blocks = pb && strcmp(pb, "1") == 0;
        const char *kr = getenv("LATHE_CUDA_KEYRANGE_ROWS");
        I->keyrange_rows = kr ? atoll(kr) : -1; /* off: measured slower on the H200 (bench/) */
        const char *pe = getenv("LATHE_PRECISION");
        lt_dtype d;
        if (pe && *pe && strcmp(pe, "auto") != 0 && parse_prec(pe, &d) == 0) I->prec = d;
        CU_TRY(cudaStreamCreateWithFlags(&I->stream, cudaStreamNonBlocking));
        CU_TRY(cudaStreamCreateWithFlags(&I->stash_stream, cudaStreamNonBlocking));
        CU_TRY(cudaEventCreateWithFlags(&I->ev_ops, cudaEventDisableTiming));
        CU_TRY(cudaEventCreateWithFlags(&I->ev_stash, cudaEventDisableTiming));
        BLAS_TRY(cublasCreate(&I->blas));
        BLAS_TRY(cublasSetStream(I->blas, I->stream));
        BLAS_TRY(cublasSetMathMode(I->blas, CUBLAS_DEFAULT_MATH));
        CU_TRY(cudaMalloc((void **)&I->dscal, sizeof(float) * CU_SLOTS));
        CU_TRY(cudaMalloc((void **)&I->dbits, sizeof(unsigned) * CU_SLOTS));
        CU_TRY(cudaMalloc((void **)&I->dflag, sizeof(int) * 4));
        float init[2] = {0.0f, 1.0f};
        CU_TRY(cudaMemcpy(I->dscal, init, sizeof init, cudaMemcpyHostToDevice));
    }
done:
    if (rc != LT_OK) {
        char keep[LT_ERRLEN];
        memcpy(keep, ctx->err, LT_ERRLEN);
        cu_shutdown(ctx);
        memcpy(ctx->err, keep, LT_ERRLEN);
    }
    return rc;
}

static void cu_shutdown(lt_ctx *ctx) {
    cu_impl *I = impl_of(ctx);
    if (!I) return;
    if (I->rec_live) rec_abort(ctx, LT_ERR_STATE); /* a recording left open: end the capture */
    free(I->rec_blocks);
    if (I->stream) cudaStreamSynchronize(I->stream);
    if (I->stash_stream) cudaStreamSynchronize(I->stash_stream);
    for (int i = 0; i < 4; i++)
        if (I->pinned[i].p) cudaFreeHost(I->pinned[i].p);
    if (I->ev_ops) cudaEventDestroy(I->ev_ops);
    if (I->ev_stash) cudaEventDestroy(I->ev_stash);
    if (I->stash_stream) cudaStreamDestroy(I->stash_stream);
    for (int i = 0; i < I->n_live; i++)
        cudaFree(I->live[i].p);
    free_cached(I);
    free(I->live);
    free(I->freeb);
    free(I->peak_live);
    for (int i = 0; i < I->n_rope; i++)
        cudaFree(I->rope[i].d);
    for (int i = 0; i < 8; i++)
        free(I->seen[i].host);
    for (int i = 0; i < I->n_ev_made; i++)
        cudaEventDestroy(I->ev[i]);
    if (I->dscal) cudaFree(I->dscal);
    if (I->dbits) cudaFree(I->dbits);
    if (I->dflag) cudaFree(I->dflag);
    if (I->blas) cublasDestroy(I->blas);
    if (I->stream) cudaStreamDestroy(I->stream);
    cudaGetLastError();
    free(I);
    ctx->impl = NULL;
}

static void *cu_alloc(lt_ctx *ctx, size_t bytes) {
    cu_impl *I = impl_of(ctx);
    if (I->rec_live) {
        rec_refuse(ctx, "alloc");
        return NULL;
    }
    void *p = pool_get(ctx, bytes);
    if (p && cudaMemsetAsync(p, 0, bytes ? bytes : 1, I->stream) != cudaSuccess) {
        cudaGetLastError();
        pool_put(ctx, p);
        lt_fail(ctx->err, LT_ERR_DEVICE, "cuda: clearing a new buffer failed");
        return NULL;
    }
    return p;
}

static void cu_release(lt_ctx *ctx, void *p) {
    pool_put(ctx, p);
}

static lt_status cu_upload(lt_ctx *ctx, void *dst, const void *src, size_t bytes) {
    lt_status rc = LT_OK;
    if (impl_of(ctx)->rec_live) return rec_refuse(ctx, "upload");
    if (!bytes) return LT_OK;
    seen_remember(impl_of(ctx), dst, src, bytes);
    CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, impl_of(ctx)->stream));
    CU_TRY(cudaStreamSynchronize(impl_of(ctx)->stream)); /* the caller may free src at once */
done:
    return rc;
}

static lt_status cu_download(lt_ctx *ctx, void *dst, const void *src, size_t bytes) {
    lt_status rc = LT_OK;
    if (impl_of(ctx)->rec_live) return rec_refuse(ctx, "download");
    if (!bytes) return LT_OK;
    CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, impl_of(ctx)->stream));
    CU_TRY(cudaStreamSynchronize(impl_of(ctx)->stream));
done:
    return rc;
}

static lt_status cu_copy(lt_ctx *ctx, void *dst, const void *src, size_t bytes) {
    lt_status rc = LT_OK;
    if (!bytes) return LT_OK;
    seen_forget(impl_of(ctx), dst, bytes);
    CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, impl_of(ctx)->stream));
done:
    return rec_check(ctx, rc);
}

static lt_status cu_sync(lt_ctx *ctx) {
    lt_status rc = LT_OK;
    if (impl_of(ctx)->rec_live) return rec_refuse(ctx, "sync");
    CU_TRY(cudaStreamSynchronize(impl_of(ctx)->stream));
done:
    return rc;
}

/* ---- the stash: checkpoints in page-locked host memory ------------------------------------------
 * A training step keeps each layer's input for the backward; on the GPU those inputs go to host
 * memory while the next layers run, and come back one layer ahead of the backward that needs
 * them (gemma3_backward.c). Page-locked memory lets the copies run beside the kernels; its
 * blocks are kept for the next step because allocating them takes a while. */
static void *cu_host_alloc(lt_ctx *ctx, size_t bytes) {
    cu_impl *I = impl_of(ctx);
    int best = -1;
    if (I->rec_live) {
        rec_refuse(ctx, "host_alloc");
        return NULL;
    }
    for (int i = 0; i < 4; i++) /* the smallest kept block that is big enough */
        if (I->pinned[i].p && !I->pinned[i].used && I->pinned[i].bytes >= bytes &&
            (best < 0 || I->pinned[i].bytes < I->pinned[best].bytes))
            best = i;
    if (best >= 0) {
        I->pinned[best].used = 1;
        return I->pinned[best].p;
    }
    int slot_i = -1;
    for (int i = 0; i < 4 && slot_i < 0; i++)
        if (!I->pinned[i].p) slot_i = i;
    for (int i = 0; i < 4 && slot_i < 0; i++) /* all four kept: drop an unused one */
        if (!I->pinned[i].used) {
            cudaFreeHost(I->pinned[i].p);
            I->pinned[i].p = NULL;
            slot_i = i;
        }
    void *p = NULL;
    cudaError_t e =
        slot_i < 0 ? cudaErrorMemoryAllocation : cudaHostAlloc(&p, bytes ? bytes : 1, 0);
    if (e != cudaSuccess) {
        cudaGetLastError();
        lt_fail(ctx->err, LT_ERR_MEMORY,
                "cuda: could not lock %.1f MiB of host memory for checkpoints",
                (double)bytes / 1048576.0);
        return NULL;
    }
    I->pinned[slot_i].p = p;
    I->pinned[slot_i].bytes = bytes;
    I->pinned[slot_i].used = 1;
    return p;
}

static void cu_host_release(lt_ctx *ctx, void *p) {
    cu_impl *I = impl_of(ctx);
    if (!p) return;
    cudaStreamSynchronize(I->stash_stream); /* no copy may still be using it */
    for (int i = 0; i < 4; i++)
        if (I->pinned[i].p == p) I->pinned[i].used = 0;
}

static lt_status stash_copy(lt_ctx *ctx, void *dst, const void *src, size_t bytes) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    if (I->rec_live) return rec_refuse(ctx, "the stash");
    if (!bytes) return LT_OK;
    CU_TRY(cudaEventRecord(I->ev_ops, I->stream));
    CU_TRY(cudaStreamWaitEvent(I->stash_stream, I->ev_ops, 0));
    /* host or device memory on either side (a checkpoint buffer may be device memory when no
     * page-locked memory was had): the direction comes from the addresses */
    CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, I->stash_stream));
    CU_TRY(cudaEventRecord(I->ev_stash, I->stash_stream));
done:
    return rc;
}

static lt_status cu_stash_out(lt_ctx *ctx, void *host_dst, const void *src, size_t bytes) {
    return stash_copy(ctx, host_dst, src, bytes);
}

static lt_status cu_stash_in(lt_ctx *ctx, void *dst, const void *host_src, size_t bytes) {
    seen_forget(impl_of(ctx), dst, bytes);
    return stash_copy(ctx, dst, host_src, bytes);
}

static int cu_bf16_activations(lt_ctx *ctx) {
    return impl_of(ctx)->prec == LT_BF16;
}

static void cu_lend(lt_ctx *ctx, void *p, size_t bytes) {
    cu_impl *I = impl_of(ctx);
    I->lent = p ? (char *)p : NULL;
    I->lent_bytes = p ? bytes : 0;
    I->lent_used = 0;
}

static lt_status cu_stash_wait(lt_ctx *ctx) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    if (I->rec_live) return rec_refuse(ctx, "stash_wait");
    CU_TRY(cudaStreamWaitEvent(I->stream, I->ev_stash, 0));
done:
    return rc;
}

/* ---- forward ops --------------------------------------------------------------------------------
 */

static lt_status cu_embedding(lt_ctx *ctx, lt_tensor h, lt_tensor ids, const lt_weight *table,
                              float scale) {
    const char *opname = "embedding";
    op_begin(ctx, opname);
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    int bad = 0;
    CU_REQUIRE(is_f32(&h) && ids.dtype == LT_I32 && ids.data, "h must be fp32 and ids I32");
    CU_REQUIRE(table && table->w.ndim == 2 && table->w.data && is_float(table->w.dtype),
               "table must be a 2-D float tensor");
    {
        int64_t V = table->w.shape[0], H = table->w.shape[1], T = lt_tensor_numel(&ids);
        CU_REQUIRE(last_dim(&h) == H && lt_tensor_numel(&h) == T * H, "h must be [T, H]");
        /* recording a graph: no check (it reads the flag back, which a graph cannot). The
         * caller's ids were checked on the host or drawn by sample_rows, in [0, V); a bad one
         * would still give a zero row, never a read outside the table. */
        if (!I->rec_live) CU_TRY(cudaMemsetAsync(I->dflag, 0, sizeof(int), I->stream));
        k_embedding(I->stream, (float *)h.data, (const int32_t *)ids.data, T, table->w.data,
                    table->w.dtype, V, H, scale, I->dflag);
        LAUNCHED();
        if (I->rec_live) goto done;
        CU_TRY(cudaMemcpyAsync(&bad, I->dflag, sizeof(int), cudaMemcpyDeviceToHost, I->stream));
        CU_TRY(cudaStreamSynchronize(I->stream));
        if (bad) {
            rc = lt_fail(ctx->err, LT_ERR_ARG, "a token id is outside the vocabulary [0, %lld)",
                         (long long)V);
        }
    }
done:
    return op_end(ctx, rc);
}

/* A 2-D fp32 adapter matrix as an operand of dtype cdt. */
static lt_status adapter_opnd(lt_ctx *ctx, const lt_tensor *t, lt_dtype cdt, opnd *o) {
    return to_cdt(ctx, (const float *)t->data, t->shape[0], t->shape[1], cdt, o);
}

/* ---- NF4 / int8 weights (bitsandbytes' layouts, see backend.h) ----------------------------- */

/* The dtype a weight's matmuls run in: its own storage, or for NF4/int8 the precision the loader
 * set from the policy (bf16 on sm_80 and newer, fp16 on the T4). */
static lt_dtype weight_cdt(lt_ctx *ctx, const lt_weight *w) {
    return w->q.kind == LT_QUANT_NONE ? w->w.dtype : impl_of(ctx)->prec;
}

static int weight_ok(const lt_weight *w) {
    if (!w || w->w.ndim != 2 || !w->w.data) return 0;
    if (w->q.kind == LT_QUANT_NF4)
        return w->w.dtype == LT_U8 && w->q.code && w->q.blocksize > 0 &&
               (w->q.absmax || (w->q.qabsmax && w->q.absmax2 && w->q.code2));
    if (w->q.kind == LT_QUANT_INT8) return w->w.dtype == LT_I8 && w->q.scb;
    return is_float(w->w.dtype);
}

/* The fp32 absmax of every NF4 block: the stored one, or decoded from double quantization into
 * op scratch. */
static lt_status nf4_absmax(lt_ctx *ctx, const lt_weight *w, const float **out) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    const lt_quant *q = &w->q;
    *out = q->absmax;
    if (!q->qabsmax) return LT_OK;
    {
        int64_t n = lt_tensor_numel(&w->w), nb = (n + q->blocksize - 1) / q->blocksize;
        float *a = (float *)tmp_get(ctx, (size_t)nb * 4);
        if (!a) return LT_ERR_MEMORY;
        k_nested_absmax(I->stream, a, q->qabsmax, q->code2, q->absmax2, q->offset, nb,
                        q->nested_blocksize);
        LAUNCHED();
        *out = a;
    }
done:
    return rc;
}

/* W as a GEMM operand in cdt: its own data, or an NF4/int8 weight decoded into op scratch (one
 * layer's weight at a time: the largest Gemma 3 linear is 115M weights, 231 MB in 16 bits). */
static lt_status weight_opnd(lt_ctx *ctx, const lt_weight *w, lt_dtype cdt, opnd *o) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    o->p = w->w.data;
    o->dt = cdt;
    o->inv = NULL;
    if (w->q.kind == LT_QUANT_NONE) return LT_OK;
    {
        int64_t out = w->w.shape[0], in = w->w.shape[1], n = out * in;
        void *d = tmp_get(ctx, (size_t)n * lt_dtype_size(cdt));
        if (!d) return LT_ERR_MEMORY;
        if (w->q.kind == LT_QUANT_NF4) {
            const float *am;
            LT_TRY(nf4_absmax(ctx, w, &am));
            k_nf4_dequant(I->stream, d, cdt, (const uint8_t *)w->w.data, w->q.code, am, n,
                          w->q.blocksize);
        } else {
            k_int8_dequant(I->stream, d, cdt, (const int8_t *)w->w.data, w->q.scb, out, in);
        }
        LAUNCHED();
        o->p = d;
    }
done:
    return rc;
}

/* Whether a linear of T rows of x through w takes gemv.cu: a 16-bit weight computing in 16
 * bits, fp32 x, few rows (k_gemv16_ok). */
static int gemv16_takes(lt_ctx *ctx, const lt_weight *w, int64_t T, int64_t in, lt_tensor x) {
    const lt_lora *lo = w->lora;
    int r = lo && lo->enabled && lo->a.data ? (int)lo->a.shape[0] : 0;
    lt_dtype cdt = weight_cdt(ctx, w);
    return w->q.kind == LT_QUANT_NONE && (cdt == LT_BF16 || cdt == LT_F16) && x.dtype == LT_F32 &&
           impl_of(ctx)->gemv16 && k_gemv16_ok(T, in, r, x.data, w->w.data);
}

/* w with its enabled adapter as a part of k_gemv16, writing y. */
static k_gemv16_part gemv16_part(lt_ctx *ctx, float *y, const lt_weight *w) {
    const lt_lora *lo = w->lora;
    int use_lora = lo && lo->enabled && lo->a.data;
    k_gemv16_part p = {y, w->w.data, weight_cdt(ctx, w), w->w.shape[0], NULL, NULL, 0, 0.0f};
    if (use_lora) {
        p.a = (const float *)lo->a.data;
        p.b = (const float *)lo->b.data;
        p.r = (int)lo->a.shape[0];
        p.scale = lo->scale;
    }
    return p;
}

/* k_gemv16 over n parts, with the adapters' x·Aᵀ in scratch. */
static lt_status gemv16_launch(lt_ctx *ctx, const float *x, int64_t T, int64_t in,
                               const k_gemv16_part *p, int n) {
    lt_status rc = LT_OK;
    int64_t rs = 0;
    for (int k = 0; k < n; k++)
        rs += p[k].a ? p[k].r : 0;
    float *xa = NULL;
    if (rs && !(xa = (float *)tmp_get(ctx, sizeof(float) * (size_t)(T * rs)))) return LT_ERR_MEMORY;
    k_gemv16(impl_of(ctx)->stream, x, T, in, p, n, xa);
    LAUNCHED();
done:
    return rc;
}

static lt_status cu_linear(lt_ctx *ctx, lt_tensor y, lt_tensor x, const lt_weight *w) {
    const char *opname = "linear";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(weight_ok(w), "weight must be a 2-D float tensor, or NF4 / int8 with its state");
    CU_REQUIRE(is_f32(&y) && x.data &&
                   (x.dtype == LT_F32 || (x.dtype == LT_BF16 && weight_cdt(ctx, w) == LT_BF16)),
               "y must be fp32, x fp32 (or bf16 where the weight computes in bf16)");
    {
        int64_t out = w->w.shape[0], in = w->w.shape[1];
        int64_t T = lt_tensor_numel(&x) / (in ? in : 1);
        if (last_dim(&x) != in || last_dim(&y) != out || lt_tensor_numel(&y) != T * out) {
            char a[64], b[64], c[64];
            rc = lt_fail(
                ctx->err, LT_ERR_ARG, "cuda linear: shapes do not agree: y %s = x %s · W%s^T",
                lt_shape_str(&y, a, 64), lt_shape_str(&x, b, 64), lt_shape_str(&w->w, c, 64));
            goto done;
        }
        lt_dtype cdt = weight_cdt(ctx, w);
        const lt_lora *lo = w->lora;
        int use_lora = lo && lo->enabled && lo->a.data;
        /* decoding a few tokens through a 16-bit weight: two launches, no casts (gemv.cu) */
        int r = use_lora ? (int)lo->a.shape[0] : 0;
        if (gemv16_takes(ctx, w, T, in, x)) {
            CU_REQUIRE(!use_lora ||
                           (lo->a.shape[1] == in && lo->b.shape[0] == out && lo->b.shape[1] == r),
                       "adapter shapes do not agree");
            k_gemv16_part part = gemv16_part(ctx, (float *)y.data, w);
            LT_TRY(gemv16_launch(ctx, (const float *)x.data, T, in, &part, 1));
            goto done;
        }
        /* decoding a few tokens through an NF4 weight: read its packed bytes once, in fp32 */
        int gemv = w->q.kind == LT_QUANT_NF4 && x.dtype == LT_F32 &&
                   k_nf4_gemv_ok(T, in, w->w.data) && !getenv("LATHE_CUDA_NO_GEMV");
        opnd X = {x.data, LT_BF16, NULL}, W = {w->w.data, cdt, NULL};
        if (x.dtype == LT_F32 && (!gemv || use_lora))
            LT_TRY(to_cdt(ctx, (const float *)x.data, T, in, cdt, &X));
        if (!gemv) LT_TRY(weight_opnd(ctx, w, cdt, &W));
        /* The adapter path goes first and writes y; the main GEMM then adds into it (beta 1),
         * where reading y hides under its arithmetic, instead of a second pass over y. */
        if (use_lora) {
            int64_t r = lo->a.shape[0];
            CU_REQUIRE(lo->a.shape[1] == in && lo->b.shape[0] == out && lo->b.shape[1] == r,
                       "adapter shapes do not agree");
            opnd A, B, XA;
            LT_TRY(adapter_opnd(ctx, &lo->a, cdt, &A));
            LT_TRY(adapter_opnd(ctx, &lo->b, cdt, &B));
            LT_TRY(small_product(ctx, 0, 1, T, r, in, &X, in, &A, in, cdt, &XA)); /* [T, r] */
            /* y = scale · XA [T, r] · B [out, r]ᵀ */
            LT_TRY(gemm(ctx, 0, 1, T, out, r, lo->scale, &XA, r, 0, &B, r, 0, 0, (float *)y.data,
                        out, 0, 1));
        }
        if (gemv) {
            const float *am;
            LT_TRY(nf4_absmax(ctx, w, &am));
            k_nf4_gemv(impl_of(ctx)->stream, (float *)y.data, (const float *)x.data,
                       (const uint8_t *)w->w.data, w->q.code, am, T, in, out, w->q.blocksize,
                       use_lora);
            LAUNCHED();
        } else { /* y [T, out] (+)= X [T, in] · W [out, in]ᵀ */
            LT_TRY(gemm(ctx, 0, 1, T, out, in, 1.0f, &X, in, 0, &W, in, 0, use_lora,
                        (float *)y.data, out, 0, 1));
        }
    }
done:
    return op_end(ctx, rc);
}

/* n linears of one x: when every one takes gemv.cu (decoding), all of them in k_gemv16's two
 * launches; otherwise linear on each (lt_linears_each). */
static lt_status cu_linears(lt_ctx *ctx, int n, const lt_tensor *y, lt_tensor x,
                            const lt_weight *const *w) {
    int group =
        impl_of(ctx)->gemv16_group && n >= 1 && n <= K_GEMV16_MAX_PARTS && is_f32(&x) && x.data;
    int64_t in = 0, T = 0;
    for (int k = 0; group && k < n; k++) {
        if (!w[k] || !y[k].data) {
            group = 0; /* cu_linear names what is missing */
            break;
        }
        const lt_lora *lo = w[k]->lora;
        int r = lo && lo->enabled && lo->a.data ? (int)lo->a.shape[0] : 0;
        in = w[k]->w.shape[1];
        T = lt_tensor_numel(&x) / (in ? in : 1);
        group =
            weight_ok(w[k]) && is_f32(&y[k]) && y[k].data && last_dim(&x) == in &&
            last_dim(&y[k]) == w[k]->w.shape[0] && lt_tensor_numel(&y[k]) == T * w[k]->w.shape[0] &&
            gemv16_takes(ctx, w[k], T, in, x) &&
            (!r ||
             (lo->a.shape[1] == in && lo->b.shape[0] == w[k]->w.shape[0] && lo->b.shape[1] == r)) &&
            (k == 0 || in == w[0]->w.shape[1]);
    }
    if (!group) return lt_linears_each(ctx, n, y, x, w);
    op_begin(ctx, "linear");
    k_gemv16_part parts[K_GEMV16_MAX_PARTS];
    for (int k = 0; k < n; k++)
        parts[k] = gemv16_part(ctx, (float *)y[k].data, w[k]);
    return op_end(ctx, gemv16_launch(ctx, (const float *)x.data, T, in, parts, n));
}

static lt_status cu_rmsnorm(lt_ctx *ctx, lt_tensor y, lt_tensor x, lt_tensor w, float eps) {
    const char *opname = "rmsnorm";
    op_begin(ctx, opname);
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&x) && is_f32(&w) && y.data && (y.dtype == LT_F32 || y.dtype == LT_BF16),
               "x and w must be fp32, y fp32 or bf16");
    {
        int64_t D = lt_tensor_numel(&w), N = lt_tensor_numel(&x) / (D ? D : 1);
        CU_REQUIRE(D > 0 && lt_tensor_numel(&x) == N * D && lt_tensor_numel(&y) == N * D,
                   "x, y must be [N, numel(w)]");
        k_rmsnorm(I->stream, y.data, y.dtype, (const float *)x.data, (const float *)w.data, N, D,
                  eps);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

/* norm_rope.cu's one launch of rmsnorm_add; *took 0 where its float4 form cannot take the rows. */
static lt_status rmsnorm_add_launch(lt_ctx *ctx, lt_tensor h, lt_tensor x, lt_tensor w, lt_tensor a,
                                    lt_tensor w2, float eps, int64_t N, int64_t D, int *took) {
    lt_status rc = LT_OK;
    *took =
        k_rmsnorm_add(impl_of(ctx)->stream, (float *)h.data, (float *)x.data, (const float *)w.data,
                      (float *)a.data, a.data ? (const float *)w2.data : NULL, N, D, eps);
    if (*took) LAUNCHED();
done:
    return rc;
}

/* x = norm(x, w); h += x; a = norm(h, w2) (a.data NULL: not): one launch where the rows take
 * the float4 form, else the three ops. */
static lt_status cu_rmsnorm_add(lt_ctx *ctx, lt_tensor h, lt_tensor x, lt_tensor w, lt_tensor a,
                                lt_tensor w2, float eps) {
    int64_t D = lt_tensor_numel(&w), N = lt_tensor_numel(&x) / (D ? D : 1);
    int fused = impl_of(ctx)->norm_add && is_f32(&x) && is_f32(&h) && is_f32(&w) && D > 0 &&
                lt_tensor_numel(&x) == N * D && lt_tensor_numel(&h) == N * D && x.data && h.data &&
                w.data &&
                (!a.data || (is_f32(&a) && is_f32(&w2) && w2.data && lt_tensor_numel(&a) == N * D &&
                             lt_tensor_numel(&w2) == D));
    if (fused) {
        int took = 0;
        op_begin(ctx, "rmsnorm_add");
        lt_status rc = op_end(ctx, rmsnorm_add_launch(ctx, h, x, w, a, w2, eps, N, D, &took));
        if (took || rc != LT_OK) return rc;
    }
    return lt_rmsnorm_add_ops(ctx, h, x, w, a, w2, eps);
}

/* The [hd/2] inverse frequencies, computed on the host with backend_cpu.c's expression. */
static lt_status rope_table(lt_ctx *ctx, float theta, float factor, int hd, const float **out) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    for (int i = 0; i < I->n_rope; i++)
        if (I->rope[i].theta == theta && I->rope[i].factor == factor && I->rope[i].hd == hd) {
            *out = I->rope[i].d;
            return LT_OK;
        }
    if (I->rec_live) /* it uploads synchronously: made by a first unrecorded run */
        return lt_fail(ctx->err, LT_ERR_STATE,
                       "cuda rope: no table for theta %g, factor %g, head dim %d yet, and it "
                       "cannot be made while recording a graph",
                       (double)theta, (double)factor, hd);
    {
        float inv[512];
        int half = hd / 2;
        for (int j = 0; j < half; j++)
            inv[j] = (1.0f / powf(theta, (float)(2 * j) / (float)hd)) / factor;
        int k = I->n_rope < 16 ? I->n_rope++ : 15;
        if (k == 15 && I->rope[15].d) {
            cudaFree(I->rope[15].d);
            I->rope[15].d = NULL;
        }
        CU_TRY(cudaMalloc((void **)&I->rope[k].d, sizeof(float) * (size_t)half));
        CU_TRY(cudaMemcpy(I->rope[k].d, inv, sizeof(float) * (size_t)half, cudaMemcpyHostToDevice));
        I->rope[k].theta = theta;
        I->rope[k].factor = factor;
        I->rope[k].hd = hd;
        *out = I->rope[k].d;
    }
done:
    return rc;
}

static lt_status rope_common(lt_ctx *ctx, const char *opname, lt_tensor x, lt_tensor pos,
                             float theta, float factor, int dir) {
    op_begin(ctx, opname);
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&x) && x.ndim == 3 && pos.dtype == LT_I32 && pos.data,
               "x must be fp32 [T, heads, hd], pos I32");
    {
        int64_t T = x.shape[0], nh = x.shape[1], hd = x.shape[2];
        CU_REQUIRE(lt_tensor_numel(&pos) == T && hd % 2 == 0, "pos must be [T] and hd even");
        CU_REQUIRE(hd <= 1024, "head_dim above 1024");
        const float *inv = NULL;
        LT_TRY(rope_table(ctx, theta, factor, (int)hd, &inv));
        k_rope(I->stream, (float *)x.data, (const int32_t *)pos.data, inv, T, nh, hd, dir);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

static lt_status cu_rope(lt_ctx *ctx, lt_tensor x, lt_tensor pos, float theta, float factor) {
    return rope_common(ctx, "rope", x, pos, theta, factor, +1);
}

static lt_status cu_rope_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor pos, float theta,
                                  float factor) {
    return rope_common(ctx, "rope_backward", dx, pos, theta, factor, -1);
}

/* norm_rope.cu's one launch of qk_norm_rope; *took 0 where it does not take the rows. */
static lt_status qk_norm_rope_launch(lt_ctx *ctx, lt_tensor q, lt_tensor k, lt_tensor qw,
                                     lt_tensor kw, lt_tensor pos, float eps, float theta,
                                     float factor, int *took) {
    lt_status rc = LT_OK;
    int64_t T = q.shape[0], hd = q.shape[2];
    const float *inv = NULL;
    *took = 0;
    LT_TRY(rope_table(ctx, theta, factor, (int)hd, &inv));
    *took = k_qk_norm_rope(impl_of(ctx)->stream, (float *)q.data, (float *)k.data,
                           (const float *)qw.data, (const float *)kw.data,
                           (const int32_t *)pos.data, inv, T, q.shape[1], k.shape[1], hd, eps);
    if (*took) LAUNCHED();
done:
    return rc;
}

/* q/k norm and RoPE: one launch where the head rows take it, else rmsnorm twice and rope twice. */
static lt_status cu_qk_norm_rope(lt_ctx *ctx, lt_tensor q, lt_tensor k, lt_tensor qw, lt_tensor kw,
                                 lt_tensor pos, float eps, float theta, float factor) {
    int fused = impl_of(ctx)->norm_add && is_f32(&q) && is_f32(&k) && is_f32(&qw) && is_f32(&kw) &&
                q.ndim == 3 && k.ndim == 3 && q.data && k.data && qw.data && kw.data &&
                pos.dtype == LT_I32 && pos.data && k.shape[0] == q.shape[0] &&
                k.shape[2] == q.shape[2] && lt_tensor_numel(&qw) == q.shape[2] &&
                lt_tensor_numel(&kw) == q.shape[2] && lt_tensor_numel(&pos) == q.shape[0] &&
                q.shape[2] % 2 == 0;
    if (fused) {
        int took = 0;
        op_begin(ctx, "qk_norm_rope");
        lt_status rc =
            op_end(ctx, qk_norm_rope_launch(ctx, q, k, qw, kw, pos, eps, theta, factor, &took));
        if (took || rc != LT_OK) return rc;
    }
    return lt_qk_norm_rope_ops(ctx, q, k, qw, kw, pos, eps, theta, factor);
}

/* Query rows per attention chunk: the chunk's [nh, Tq, S] buffers stay under ~256 MiB. */
static int64_t attn_chunk(lt_ctx *ctx, int64_t T, int64_t nh, int64_t S, int backward) {
    int64_t per_row = nh * S * (backward ? 12 : 6);
    int64_t tq = (256ll << 20) / (per_row ? per_row : 1);
    if (tq > 64) tq &= ~(int64_t)63;
    if (impl_of(ctx)->max_rows > 0 && tq > impl_of(ctx)->max_rows) tq = impl_of(ctx)->max_rows;
    if (tq < 1) tq = 1;
    if (tq > T) tq = T;
    return tq;
}

typedef struct attn_dims {
    int64_t T, S, nh, nkv, hd, g;
} attn_dims;

static lt_status attn_check(lt_ctx *ctx, const char *opname, lt_tensor q, lt_tensor k, lt_tensor v,
                            lt_tensor qpos, lt_tensor kpos, attn_dims *d) {
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&q) && is_f32(&k) && is_f32(&v), "q, k, v must be fp32");
    CU_REQUIRE(q.ndim == 3 && k.ndim == 3 && v.ndim == 3,
               "q must be [T, nh, hd], k and v [S, nkv, hd]");
    CU_REQUIRE(qpos.dtype == LT_I32 && kpos.dtype == LT_I32 && qpos.data && kpos.data,
               "positions must be I32");
    d->T = q.shape[0];
    d->nh = q.shape[1];
    d->hd = q.shape[2];
    d->S = k.shape[0];
    d->nkv = k.shape[1];
    CU_REQUIRE(k.shape[2] == d->hd && v.shape[0] == d->S && v.shape[1] == d->nkv &&
                   v.shape[2] == d->hd,
               "k, v shapes disagree");
    CU_REQUIRE(d->nkv > 0 && d->nh % d->nkv == 0, "nh must be a multiple of nkv");
    CU_REQUIRE(lt_tensor_numel(&qpos) == d->T && lt_tensor_numel(&kpos) == d->S,
               "qpos must be [T] and kpos [S]");
    d->g = d->nh / d->nkv;
done:
    return rc;
}

/* Key ranges per query chunk: [smin, smin + slen) holds every key visible to any query of the
 * chunk (causal and sliding-window masks cut the rest), so each chunk multiplies only by those.
 * Positions always reach the device through upload (model code never computes them on the
 * device; every op writes fp32, positions are I32), so the backend keeps a host copy of recent
 * small uploads and reads positions from there; a read-back would stall the stream. Copies are
 * forgotten when their memory is released, copied over or uploaded again. Without a copy every
 * chunk takes all S keys (still right: the mask decides). With attention_span's table (span,
 * device [T, 2]) a chunk's range also reaches the last key of its queries' spans; without a host
 * copy of the table, every key. */
typedef struct key_plan {
    const int32_t *qp, *kp; /* host views of the positions (from remembered uploads), or NULL */
    const int32_t *sp;      /* host view of the span table, or NULL (none, or qp NULL) */
} key_plan;

static lt_status key_plan_make(lt_ctx *ctx, key_plan *kpn, const lt_tensor *qpos,
                               const lt_tensor *kpos, const int32_t *span, int64_t T, int64_t S) {
    kpn->qp = kpn->kp = kpn->sp = NULL;
    cu_impl *I = impl_of(ctx);
    if (T < 64 || S < 128 || I->keyrange_rows < 0 || I->rec_live)
        return LT_OK; /* decode, small inputs, a graph (replays get new positions): every key */
    kpn->qp = seen_lookup(I, qpos->data, T);
    kpn->kp = seen_lookup(I, kpos->data, S);
    if (span) kpn->sp = seen_lookup(I, span, 2 * T);
    if (!kpn->qp || !kpn->kp || (span && !kpn->sp)) kpn->qp = kpn->kp = kpn->sp = NULL;
    return LT_OK;
}

static void key_plan_free(key_plan *kpn) {
    kpn->qp = kpn->kp = kpn->sp = NULL;
}

static void key_range(const key_plan *kpn, int64_t t0, int64_t tq, int64_t S, int window,
                      int64_t *smin, int64_t *slen) {
    *smin = 0;
    *slen = S;
    if (!kpn->qp) return;
    int32_t qmin = kpn->qp[t0], qmax = kpn->qp[t0], reach;
    for (int64_t t = t0; t < t0 + tq; t++) {
        if (kpn->qp[t] < qmin) qmin = kpn->qp[t];
        if (kpn->qp[t] > qmax) qmax = kpn->qp[t];
    }
    reach = qmax; /* the latest visible position: a query's own, or the end of its span */
    for (int64_t t = t0; kpn->sp && t < t0 + tq; t++)
        if (kpn->sp[2 * t] <= kpn->sp[2 * t + 1] && kpn->sp[2 * t + 1] > reach)
            reach = kpn->sp[2 * t + 1];
    int64_t lo = -1, hi = -1;
    for (int64_t s = 0; s < S; s++) {
        int32_t k = kpn->kp[s];
        if (k < 0 || k > reach || (window > 0 && (int64_t)qmin - k >= window)) continue;
        if (lo < 0) lo = s;
        hi = s;
    }
    if (lo < 0) { /* nothing visible: one key, which the mask hides (rows become zeros) */
        *smin = 0;
        *slen = 1;
        return;
    }
    *smin = lo;
    *slen = hi - lo + 1;
}

static opnd opnd_at(const opnd *o, int64_t elems) {
    opnd r = *o;
    r.p = (const char *)o->p + elems * (o->dt == LT_F32 ? 4 : 2);
    return r;
}

/* Whole-tensor packing of k or v ([S, nkv, hd] fp32) into [nkv, S, hd] of dtype cdt. */
static lt_status pack_all(lt_ctx *ctx, const lt_tensor *t, lt_dtype cdt, opnd *o) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    int64_t S = t->shape[0], H = t->shape[1], hd = t->shape[2];
    float *s = NULL, *iv = NULL;
    void *d = tmp_get(ctx, (size_t)(S * H * hd) * (cdt == LT_F32 ? 4 : 2));
    if (!d) return LT_ERR_MEMORY;
    if (cdt == LT_F16) LT_TRY(fp16_scale(ctx, (const float *)t->data, S * H * hd, &s, &iv));
    k_pack_heads(I->stream, d, cdt, (const float *)t->data, 0, S, H, hd, s);
    LAUNCHED();
    o->p = d;
    o->dt = cdt;
    o->inv = iv;
done:
    return rc;
}

/* Whether the fused kernels (kernels/attention.cu) take this call: a 16-bit path, head dim
 * 72, 128 or 256, a device with the tensor-core instructions and shared memory they need, sizes
 * that fit int. Anything else (fp32 above all) runs the chunked cuBLAS path. */
static int flash_ok(lt_ctx *ctx, const attn_dims *D, lt_dtype cdt, int backward) {
    cu_impl *I = impl_of(ctx);
    if (!I->flash || cdt == LT_F32) return 0;
    if (D->T > INT32_MAX / 2 || D->S > INT32_MAX / 2 || D->nh > 65535) return 0; /* grid dims */
    return k_flash_supported(cdt, (int)D->hd, I->cc, I->smem_optin, backward);
}

static lt_status cu_attention(lt_ctx *ctx, lt_tensor out, lt_tensor q, lt_tensor k, lt_tensor v,
                              lt_tensor qpos, lt_tensor kpos, int window, float scale) {
    const char *opname = "attention";
    op_begin(ctx, opname);
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    key_plan kpn = {NULL, NULL, NULL};
    attn_dims D;
    LT_TRY(attn_check(ctx, opname, q, k, v, qpos, kpos, &D));
    CU_REQUIRE(is_f32(&out) && lt_tensor_numel(&out) == D.T * D.nh * D.hd,
               "out must be fp32 [T, nh*hd]");
    if (D.T == 0) goto done;
    {
        lt_dtype cdt = I->prec;
        size_t esz = cdt == LT_F32 ? 4 : 2;
        int64_t T = D.T, S = D.S, nh = D.nh, nkv = D.nkv, hd = D.hd, g = D.g;
        if (S == 0) {
            CU_TRY(cudaMemsetAsync(out.data, 0, (size_t)(T * nh * hd) * 4, I->stream));
            goto done;
        }
        opnd K, V;
        LT_TRY(pack_all(ctx, &k, cdt, &K));
        LT_TRY(pack_all(ctx, &v, cdt, &V));
        if (flash_ok(ctx, &D, cdt, 0)) {
            opnd Q;
            LT_TRY(pack_all(ctx, &q, cdt, &Q));
            k_flash_forward(I->stream, cdt, (int)hd, Q.p, K.p, V.p, (float *)out.data, NULL, NULL,
                            NULL, (const int32_t *)qpos.data, (const int32_t *)kpos.data, (int)T,
                            (int)S, (int)nh, (int)nkv, window, scale, Q.inv, K.inv, V.inv,
                            I->smem_optin);
            LAUNCHED();
            I->flash_calls++;
            goto done;
        }
        float *qs = NULL, *qinv = NULL;
        if (cdt == LT_F16) LT_TRY(fp16_scale(ctx, (const float *)q.data, T * nh * hd, &qs, &qinv));
        int64_t Tq = attn_chunk(ctx, T, nh, S, 0);
        LT_TRY(key_plan_make(ctx, &kpn, &qpos, &kpos, NULL, T, S));
        if (kpn.qp && I->keyrange_rows > 0 && Tq > I->keyrange_rows)
            Tq = I->keyrange_rows; /* smaller chunks skip more masked keys */
        void *qc = tmp_get(ctx, (size_t)(nh * Tq * hd) * esz);
        float *sc = (float *)tmp_get(ctx, (size_t)(nh * Tq * S) * 4);
        void *p16 = cdt == LT_F32 ? NULL : tmp_get(ctx, (size_t)(nh * Tq * S) * 2);
        float *oc = (float *)tmp_get(ctx, (size_t)(nh * Tq * hd) * 4);
        if (!qc || !sc || (cdt != LT_F32 && !p16) || !oc) {
            rc = LT_ERR_MEMORY;
            goto done;
        }
        int mark = I->next_slot; /* a chunk's device scalars are dead once its GEMMs are queued */
        for (int64_t t0 = 0; t0 < T; t0 += Tq) {
            int64_t tq = T - t0 < Tq ? T - t0 : Tq, s0, sl;
            I->next_slot = mark;
            key_range(&kpn, t0, tq, S, window, &s0, &sl);
            k_pack_heads(I->stream, qc, cdt, (const float *)q.data, t0, tq, nh, hd, qs);
            LAUNCHED();
            opnd Q = {qc, cdt, qinv}, Ks = opnd_at(&K, s0 * hd), Vs = opnd_at(&V, s0 * hd);
            /* per KV head: scores [g*tq, sl] = Q_group [g*tq, hd] · K_kv[s0:s0+sl]ᵀ * scale */
            LT_TRY(gemm(ctx, 0, 1, g * tq, sl, hd, scale, &Q, hd, g * tq * hd, &Ks, hd, S * hd, 0,
                        sc, sl, g * tq * sl, (int)nkv));
            k_softmax_masked(I->stream, sc, p16, cdt, cdt == LT_F32, (const int32_t *)qpos.data,
                             (const int32_t *)kpos.data + s0, NULL, t0, tq, nh, sl, window);
            LAUNCHED();
            opnd P = {cdt == LT_F32 ? (const void *)sc : p16, cdt, NULL};
            /* o [g*tq, hd] = P [g*tq, sl] · V_kv [s0:s0+sl, hd] */
            LT_TRY(gemm(ctx, 0, 0, g * tq, hd, sl, 1.0f, &P, sl, g * tq * sl, &Vs, hd, S * hd, 0,
                        oc, hd, g * tq * hd, (int)nkv));
            k_unpack_heads(I->stream, (float *)out.data, oc, t0, tq, nh, hd);
            LAUNCHED();
        }
    }
done:
    key_plan_free(&kpn);
    return op_end(ctx, rc);
}

static lt_status cu_geglu(lt_ctx *ctx, lt_tensor y, lt_tensor gate, lt_tensor up) {
    const char *opname = "geglu";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&gate) && is_f32(&up) && y.data && (y.dtype == LT_F32 || y.dtype == LT_BF16),
               "gate, up must be fp32, y fp32 or bf16");
    {
        int64_t n = lt_tensor_numel(&gate);
        CU_REQUIRE(lt_tensor_numel(&up) == n && lt_tensor_numel(&y) == n,
                   "y, gate, up must have one shape");
        k_geglu(impl_of(ctx)->stream, y.data, y.dtype, (const float *)gate.data,
                (const float *)up.data, n);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

static lt_status cu_add(lt_ctx *ctx, lt_tensor y, lt_tensor x) {
    const char *opname = "add";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&y) && is_f32(&x) && lt_tensor_numel(&y) == lt_tensor_numel(&x),
               "y, x must be fp32, one shape");
    k_add(impl_of(ctx)->stream, (float *)y.data, (const float *)x.data, lt_tensor_numel(&y));
    LAUNCHED();
done:
    return op_end(ctx, rc);
}

/* ---- the image tower's ops and the image block's attention (backend.h; kernels/vision.cu) */

static lt_status cu_layernorm(lt_ctx *ctx, lt_tensor y, lt_tensor x, lt_tensor w, lt_tensor b,
                              float eps) {
    const char *opname = "layernorm";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&y) && is_f32(&x) && is_f32(&w) && is_f32(&b), "x, y, w, b must be fp32");
    {
        int64_t D = lt_tensor_numel(&w), N = lt_tensor_numel(&x) / (D ? D : 1);
        CU_REQUIRE(D > 0 && lt_tensor_numel(&b) == D && lt_tensor_numel(&x) == N * D &&
                       lt_tensor_numel(&y) == N * D,
                   "x, y must be [N, D] with w, b [D]");
        k_layernorm(impl_of(ctx)->stream, (float *)y.data, (const float *)x.data,
                    (const float *)w.data, (const float *)b.data, N, D, eps);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

static lt_status cu_add_bias(lt_ctx *ctx, lt_tensor y, lt_tensor b) {
    const char *opname = "add_bias";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&y) && is_f32(&b), "y, b must be fp32");
    {
        int64_t D = lt_tensor_numel(&b), n = lt_tensor_numel(&y);
        CU_REQUIRE(D > 0 && n % D == 0, "y must be [N, D] with b [D]");
        k_add_bias(impl_of(ctx)->stream, (float *)y.data, (const float *)b.data, n / D, D);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

static lt_status cu_gelu(lt_ctx *ctx, lt_tensor y, lt_tensor x) {
    const char *opname = "gelu";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&y) && is_f32(&x) && lt_tensor_numel(&y) == lt_tensor_numel(&x),
               "y, x must be fp32, one shape");
    k_gelu(impl_of(ctx)->stream, (float *)y.data, (const float *)x.data, lt_tensor_numel(&x));
    LAUNCHED();
done:
    return op_end(ctx, rc);
}

static lt_status cu_avg_pool(lt_ctx *ctx, lt_tensor y, lt_tensor x, int k) {
    const char *opname = "avg_pool";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&y) && is_f32(&x) && x.ndim == 2 && y.ndim == 2,
               "x, y must be fp32 [rows, D]");
    {
        int64_t D = x.shape[1], g = lt_pool_grid(x.shape[0], k);
        CU_REQUIRE(g > 0, "x must be a square grid g*g of rows with g a multiple of k");
        CU_REQUIRE(y.shape[0] == (g / k) * (g / k) && y.shape[1] == D, "y must be [(g/k)^2, D]");
        k_avg_pool(impl_of(ctx)->stream, (float *)y.data, (const float *)x.data, g, k, D);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

static lt_status cu_attention_span(lt_ctx *ctx, lt_tensor out, lt_tensor q, lt_tensor k,
                                   lt_tensor v, lt_tensor qpos, lt_tensor kpos, lt_tensor span,
                                   int window, float scale) {
    const char *opname = "attention_span";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&q) && is_f32(&k) && is_f32(&v) && is_f32(&out),
               "q, k, v and out must be fp32");
    CU_REQUIRE(q.ndim == 3 && k.ndim == 3 && v.ndim == 3,
               "q must be [T, nh, hd], k and v [S, nkv, hd]");
    {
        int64_t T = q.shape[0], nh = q.shape[1], hd = q.shape[2], S = k.shape[0], nkv = k.shape[1];
        CU_REQUIRE(k.shape[2] == hd && v.shape[0] == S && v.shape[1] == nkv && v.shape[2] == hd,
                   "k, v shapes disagree");
        CU_REQUIRE(nkv > 0 && nh % nkv == 0, "nh must be a multiple of nkv");
        CU_REQUIRE(qpos.dtype == LT_I32 && kpos.dtype == LT_I32 && span.dtype == LT_I32 &&
                       lt_tensor_numel(&qpos) == T && lt_tensor_numel(&kpos) == S &&
                       lt_tensor_numel(&span) == 2 * T,
                   "qpos must be I32 [T], kpos [S], span [T, 2]");
        CU_REQUIRE(lt_tensor_numel(&out) == T * nh * hd, "out must be [T, nh*hd]");
        CU_REQUIRE(k_attention_span_ok(S), "more keys than the kernel holds (12000)");
        k_attention_span(impl_of(ctx)->stream, (float *)out.data, (const float *)q.data,
                         (const float *)k.data, (const float *)v.data, (const int32_t *)qpos.data,
                         (const int32_t *)kpos.data, (const int32_t *)span.data, T, S, nh, nkv, hd,
                         window, scale);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

/* Decode attention of R rows over their own ring caches (backend.h; kernels/attention.cu). The
 * rows' values are not checked here (that would read them back): a row outside [0, N) or a
 * negative position writes nothing and gives zeros. */
static lt_status cu_attention_rows(lt_ctx *ctx, lt_tensor out, lt_tensor q, lt_tensor k_new,
                                   lt_tensor v_new, lt_tensor kc, lt_tensor vc, lt_tensor rows,
                                   lt_tensor qpos, int window, float scale) {
    const char *opname = "attention_rows";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&q) && is_f32(&k_new) && is_f32(&v_new) && is_f32(&kc) && is_f32(&vc) &&
                   is_f32(&out),
               "q, k_new, v_new, kc, vc and out must be fp32");
    CU_REQUIRE(q.ndim == 3 && k_new.ndim == 3 && v_new.ndim == 3 && kc.ndim == 4 && vc.ndim == 4,
               "q must be [R, nh, hd], k_new and v_new [R, nkv, hd], kc and vc [N, S, nkv, hd]");
    {
        int64_t R = q.shape[0], nh = q.shape[1], hd = q.shape[2], N = kc.shape[0], S = kc.shape[1],
                nkv = kc.shape[2];
        CU_REQUIRE(kc.shape[3] == hd && !memcmp(kc.shape, vc.shape, sizeof(int64_t) * 4),
                   "kc, vc must be [N, S, nkv, hd] alike");
        CU_REQUIRE(k_new.shape[0] == R && k_new.shape[1] == nkv && k_new.shape[2] == hd &&
                       !memcmp(k_new.shape, v_new.shape, sizeof(int64_t) * 3),
                   "k_new, v_new must be [R, nkv, hd]");
        CU_REQUIRE(nkv > 0 && nh % nkv == 0 && S > 0, "nh must be a multiple of nkv, S > 0");
        CU_REQUIRE(lt_tensor_numel(&out) == R * nh * hd, "out must be [R, nh*hd]");
        CU_REQUIRE(rows.dtype == LT_I32 && qpos.dtype == LT_I32 && rows.data && qpos.data &&
                       lt_tensor_numel(&rows) == R && lt_tensor_numel(&qpos) == R,
                   "rows and qpos must be I32 [R]");
        CU_REQUIRE(hd <= 256, "head dim must be at most 256");
        CU_REQUIRE(R < 65536 && nh < 65536 && N < INT32_MAX && S < INT32_MAX / 2,
                   "sizes beyond the kernel's grid");
        if (R == 0) goto done;
        float *part =
            (float *)tmp_get(ctx, k_attention_rows_scratch((int)R, (int)S, (int)nh, (int)hd));
        if (!part) {
            rc = LT_ERR_MEMORY;
            goto done;
        }
        k_attention_rows(impl_of(ctx)->stream, (float *)out.data, (const float *)q.data,
                         (const float *)k_new.data, (const float *)v_new.data, (float *)kc.data,
                         (float *)vc.data, (const int32_t *)rows.data, (const int32_t *)qpos.data,
                         (int)R, (int)N, (int)S, (int)nh, (int)nkv, (int)hd, window, scale, part);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

static lt_status cu_sample_rows(lt_ctx *ctx, lt_tensor ids, lt_tensor logits, lt_tensor bits,
                                const lt_sample_opts *o) {
    const char *opname = "sample_rows";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(o, "options are required");
    CU_REQUIRE(is_f32(&logits) && logits.ndim == 2, "logits must be fp32 [R, V]");
    CU_REQUIRE(logits.shape[1] > 0 && logits.shape[1] < INT32_MAX && logits.shape[0] < INT32_MAX,
               "logits' sizes are out of range");
    {
        int64_t R = logits.shape[0], V = logits.shape[1];
        CU_REQUIRE(ids.dtype == LT_I32 && lt_tensor_numel(&ids) == R && (ids.data || !R),
                   "ids must be I32 [R]");
        CU_REQUIRE(bits.dtype == LT_I32 && lt_tensor_numel(&bits) == R && (bits.data || !R),
                   "bits must be I32 [R]");
        CU_REQUIRE(o->top_k >= 0 && o->top_p > 0 && o->top_p <= 1 && o->min_p >= 0 && o->min_p <= 1,
                   "top_k must be >= 0, top_p in (0, 1] and min_p in [0, 1]");
        if (R == 0) goto done;
        cu_impl *I = impl_of(ctx);
        void *scratch = NULL; /* few rows: the slices' meeting place (sample.cu) */
        size_t sb = k_sample_rows_scratch((int)R, (int)V, I->n_sm);
        if (sb && !(scratch = tmp_get(ctx, sb))) {
            rc = LT_ERR_MEMORY;
            goto done;
        }
        k_sample_rows(I->stream, (int32_t *)ids.data, (const float *)logits.data,
                      (const int32_t *)bits.data, (int)R, (int)V, o->inv_temp, o->top_k, o->top_p,
                      o->min_p, scratch, I->n_sm);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

/* ---- backward ops -------------------------------------------------------------------------------
 */

static lt_status cu_linear_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, lt_tensor x,
                                    const lt_weight *w) {
    const char *opname = "linear_backward";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(!dx.data || dx.dtype == LT_F32, "dx must be fp32");
    CU_REQUIRE(weight_ok(w), "weight must be a 2-D float tensor, or NF4 / int8 with its state");
    CU_REQUIRE(w->q.kind == LT_QUANT_NONE || !w->grad_w.data,
               "an NF4 / int8 weight is frozen: it has no grad_w (train LoRA adapters on it)");
    CU_REQUIRE(x.data && dy.data &&
                   (x.dtype == LT_F32 || (x.dtype == LT_BF16 && weight_cdt(ctx, w) == LT_BF16)) &&
                   (dy.dtype == LT_F32 || (dy.dtype == LT_BF16 && weight_cdt(ctx, w) == LT_BF16)),
               "dy and x must be fp32 (or bf16 where the weight computes in bf16)");
    {
        int64_t out = w->w.shape[0], in = w->w.shape[1];
        int64_t T = lt_tensor_numel(&x) / (in ? in : 1);
        CU_REQUIRE(last_dim(&x) == in && lt_tensor_numel(&dy) == T * out && last_dim(&dy) == out,
                   "dy must be [T, out], x [T, in]");
        CU_REQUIRE(!dx.data || lt_tensor_numel(&dx) == T * in, "dx must be [T, in]");
        CU_REQUIRE(!w->grad_w.data ||
                       (w->grad_w.dtype == LT_F32 && lt_tensor_numel(&w->grad_w) == out * in),
                   "grad_w must be fp32 [out, in]");
        lt_dtype cdt = weight_cdt(ctx, w);
        const lt_lora *lo = w->lora;
        int use_lora = lo && lo->enabled && lo->a.data;
        opnd DY = {dy.data, LT_BF16, NULL}, X = {x.data, LT_BF16, NULL}, W = {w->w.data, cdt, NULL};
        if (dy.dtype == LT_F32) LT_TRY(to_cdt(ctx, (const float *)dy.data, T, out, cdt, &DY));
        if ((w->grad_w.data || use_lora) && x.dtype == LT_F32)
            LT_TRY(to_cdt(ctx, (const float *)x.data, T, in, cdt, &X));
        if (w->grad_w.data) /* grad_w [out, in] += DYᵀ · X */
            LT_TRY(gemm(ctx, 1, 0, out, in, T, 1.0f, &DY, out, 0, &X, in, 0, 1,
                        (float *)w->grad_w.data, in, 0, 1));
        if (use_lora) {
            int64_t r = lo->a.shape[0];
            CU_REQUIRE(lo->a.shape[1] == in && lo->b.shape[0] == out && lo->b.shape[1] == r,
                       "adapter shapes do not agree");
            opnd A, B, XA, G;
            LT_TRY(adapter_opnd(ctx, &lo->a, cdt, &A));
            LT_TRY(adapter_opnd(ctx, &lo->b, cdt, &B));
            if (lo->grad_b.data) { /* grad_b [out, r] += scale · DYᵀ · XA, XA = x·Aᵀ [T, r] */
                LT_TRY(small_product(ctx, 0, 1, T, r, in, &X, in, &A, in, cdt, &XA));
                LT_TRY(gemm(ctx, 1, 0, out, r, T, lo->scale, &DY, out, 0, &XA, r, 0, 1,
                            (float *)lo->grad_b.data, r, 0, 1));
            }
            LT_TRY(small_product(ctx, 0, 0, T, r, out, &DY, out, &B, r, cdt, &G)); /* dy·B */
            if (lo->grad_a.data) /* grad_a [r, in] += scale · Gᵀ · X */
                LT_TRY(gemm(ctx, 1, 0, r, in, T, lo->scale, &G, r, 0, &X, in, 0, 1,
                            (float *)lo->grad_a.data, in, 0, 1));
            if (dx.data) /* dx = scale · G [T, r] · A [r, in]  (the main GEMM adds to it below) */
                LT_TRY(gemm(ctx, 0, 0, T, in, r, lo->scale, &G, r, 0, &A, in, 0, 0,
                            (float *)dx.data, in, 0, 1));
        }
        if (dx.data) LT_TRY(weight_opnd(ctx, w, cdt, &W));
        if (dx.data) /* dx [T, in] (+)= DY [T, out] · W [out, in] */
            LT_TRY(gemm(ctx, 0, 0, T, in, out, 1.0f, &DY, out, 0, &W, in, 0, use_lora,
                        (float *)dx.data, in, 0, 1));
    }
done:
    return op_end(ctx, rc);
}

static lt_status cu_rmsnorm_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dw, lt_tensor dy,
                                     lt_tensor x, lt_tensor w, float eps) {
    const char *opname = "rmsnorm_backward";
    op_begin(ctx, opname);
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&dy) && is_f32(&x) && is_f32(&w), "dy, x and w must be fp32");
    {
        int64_t D = lt_tensor_numel(&w), N = lt_tensor_numel(&x) / (D ? D : 1);
        CU_REQUIRE(D > 0 && lt_tensor_numel(&x) == N * D && lt_tensor_numel(&dy) == N * D,
                   "x, dy must be [N, numel(w)]");
        CU_REQUIRE(!dx.data || (dx.dtype == LT_F32 && lt_tensor_numel(&dx) == N * D),
                   "dx must be fp32 [N, D]");
        CU_REQUIRE(!dw.data || (dw.dtype == LT_F32 && lt_tensor_numel(&dw) == D),
                   "dw must be fp32 [D]");
        k_rmsnorm_backward(I->stream, (float *)dx.data, (float *)dw.data, (const float *)dy.data,
                           (const float *)x.data, (const float *)w.data, N, D, eps, I->n_sm);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

/* The chunk loop of attention_backward and attention_span_backward (see attn_backward): span
 * NULL (plain) or the device [T, 2] table, which only the masked softmax and the key ranges
 * (kpn) read. */
static lt_status attn_bwd_chunks(lt_ctx *ctx, const key_plan *kpn, int64_t Tq, const attn_dims *D,
                                 lt_dtype cdt, const opnd *K, const opnd *V, float *qs, float *qinv,
                                 float *ds, float *dinv, void *qc, void *doc, float *sc, float *dp,
                                 void *p16, void *ds16, float *dqc, int64_t ldkv, lt_tensor dq,
                                 lt_tensor dk, lt_tensor dv, lt_tensor dout, lt_tensor q,
                                 lt_tensor qpos, lt_tensor kpos, const int32_t *span, int window,
                                 float scale) {
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    int64_t T = D->T, S = D->S, nh = D->nh, nkv = D->nkv, hd = D->hd, g = D->g;
    int mark = I->next_slot; /* a chunk's device scalars are dead once its GEMMs are queued */
    for (int64_t t0 = 0; t0 < T; t0 += Tq) {
        int64_t tq = T - t0 < Tq ? T - t0 : Tq, s0, sl;
        I->next_slot = mark;
        key_range(kpn, t0, tq, S, window, &s0, &sl);
        k_pack_heads(I->stream, qc, cdt, (const float *)q.data, t0, tq, nh, hd, qs);
        LAUNCHED();
        k_pack_heads(I->stream, doc, cdt, (const float *)dout.data, t0, tq, nh, hd, ds);
        LAUNCHED();
        opnd Q = {qc, cdt, qinv}, DO = {doc, cdt, dinv}, Ks = opnd_at(K, s0 * hd),
             Vs = opnd_at(V, s0 * hd);
        LT_TRY(gemm(ctx, 0, 1, g * tq, sl, hd, scale, &Q, hd, g * tq * hd, &Ks, hd, S * hd, 0, sc,
                    sl, g * tq * sl, (int)nkv));
        /* sc <- P (fp32), p16 <- P in cdt */
        k_softmax_masked(I->stream, sc, p16, cdt, 1, (const int32_t *)qpos.data,
                         (const int32_t *)kpos.data + s0, span, t0, tq, nh, sl, window);
        LAUNCHED();
        opnd P = {cdt == LT_F32 ? (const void *)sc : p16, cdt, NULL};
        /* dP [g*tq, sl] = dO [g*tq, hd] · V_kv [s0:s0+sl, hd]ᵀ */
        LT_TRY(gemm(ctx, 0, 1, g * tq, sl, hd, 1.0f, &DO, hd, g * tq * hd, &Vs, hd, S * hd, 0, dp,
                    sl, g * tq * sl, (int)nkv));
        /* dv_kv [s0:s0+sl, hd] += P_groupᵀ [sl, g*tq] · dO_group [g*tq, hd] */
        if (dv.data)
            LT_TRY(gemm(ctx, 1, 0, sl, hd, g * tq, 1.0f, &P, sl, g * tq * sl, &DO, hd, g * tq * hd,
                        1, (float *)dv.data + s0 * ldkv, ldkv, hd, (int)nkv));
        /* dS = P ⊙ (dP - rowsum(P ⊙ dP)), in place in dp */
        k_softmax_backward(I->stream, dp, sc, nh * tq, sl);
        LAUNCHED();
        opnd DS = {dp, LT_F32, NULL};
        if (cdt != LT_F32) {
            float *s2 = NULL, *i2 = NULL;
            if (cdt == LT_F16) LT_TRY(fp16_scale(ctx, dp, nh * tq * sl, &s2, &i2));
            k_cast_rows(I->stream, ds16, cdt, sl, dp, sl, nh * tq, sl, s2);
            LAUNCHED();
            DS.p = ds16;
            DS.dt = cdt;
            DS.inv = i2;
        }
        /* dk_kv [s0:s0+sl, hd] += scale · dS_groupᵀ · Q_group */
        if (dk.data)
            LT_TRY(gemm(ctx, 1, 0, sl, hd, g * tq, scale, &DS, sl, g * tq * sl, &Q, hd, g * tq * hd,
                        1, (float *)dk.data + s0 * ldkv, ldkv, hd, (int)nkv));
        /* dq_group [g*tq, hd] = scale · dS_group · K_kv[s0:s0+sl] */
        if (dq.data) {
            LT_TRY(gemm(ctx, 0, 0, g * tq, hd, sl, scale, &DS, sl, g * tq * sl, &Ks, hd, S * hd, 0,
                        dqc, hd, g * tq * hd, (int)nkv));
            k_unpack_heads(I->stream, (float *)dq.data, dqc, t0, tq, nh, hd);
            LAUNCHED();
        }
    }
done:
    return rc;
}

/* Both backward ops, as the CPU backend's attn_backward: span NULL (attention_backward) or
 * attention_span's [T, 2] table (attention_span_backward: backend.h's rule). The span op runs
 * the chunked path whatever the precision (the fused kernels know only the plain mask). */
static lt_status attn_backward(lt_ctx *ctx, const char *opname, lt_tensor dq, lt_tensor dk,
                               lt_tensor dv, lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                               lt_tensor qpos, lt_tensor kpos, const lt_tensor *span, int window,
                               float scale) {
    op_begin(ctx, opname);
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    key_plan kpn = {NULL, NULL, NULL};
    attn_dims D;
    const int32_t *sp = span ? (const int32_t *)span->data : NULL;
    CU_REQUIRE(!span ||
                   (span->dtype == LT_I32 && span->data && lt_tensor_numel(span) == 2 * q.shape[0]),
               "span must be I32 [T, 2]");
    LT_TRY(attn_check(ctx, opname, q, k, v, qpos, kpos, &D));
    CU_REQUIRE(is_f32(&dout) && lt_tensor_numel(&dout) == D.T * D.nh * D.hd,
               "dout must be fp32 [T, nh*hd]");
    CU_REQUIRE(!dq.data || (dq.dtype == LT_F32 && lt_tensor_numel(&dq) == D.T * D.nh * D.hd),
               "dq must be fp32 [T, nh, hd]");
    CU_REQUIRE(!dk.data || (dk.dtype == LT_F32 && lt_tensor_numel(&dk) == D.S * D.nkv * D.hd),
               "dk must be fp32 [S, nkv, hd]");
    CU_REQUIRE(!dv.data || (dv.dtype == LT_F32 && lt_tensor_numel(&dv) == D.S * D.nkv * D.hd),
               "dv must be fp32 [S, nkv, hd]");
    {
        lt_dtype cdt = I->prec;
        size_t esz = cdt == LT_F32 ? 4 : 2;
        int64_t T = D.T, S = D.S, nh = D.nh, nkv = D.nkv, hd = D.hd;
        if (dk.data) CU_TRY(cudaMemsetAsync(dk.data, 0, (size_t)(S * nkv * hd) * 4, I->stream));
        if (dv.data) CU_TRY(cudaMemsetAsync(dv.data, 0, (size_t)(S * nkv * hd) * 4, I->stream));
        if (dq.data) CU_TRY(cudaMemsetAsync(dq.data, 0, (size_t)(T * nh * hd) * 4, I->stream));
        if (T == 0 || S == 0) goto done;
        opnd K, V;
        LT_TRY(pack_all(ctx, &k, cdt, &K));
        LT_TRY(pack_all(ctx, &v, cdt, &V));
        if (!sp && flash_ok(ctx, &D, cdt, 1)) {
            /* pass 1: the forward again for each row's log-sum-exp and D = Σ dout·out; pass 2:
             * dq, dk and dv, accumulated into the zeroes above (one kernel where it fits) */
            opnd Q, DO;
            LT_TRY(pack_all(ctx, &q, cdt, &Q));
            lt_tensor d3 = dout;
            d3.ndim = 3;
            d3.shape[0] = T;
            d3.shape[1] = nh;
            d3.shape[2] = hd;
            LT_TRY(pack_all(ctx, &d3, cdt, &DO));
            float *lse = (float *)tmp_get(ctx, (size_t)(nh * T) * 4);
            float *dd = (float *)tmp_get(ctx, (size_t)(nh * T) * 4);
            if (!lse || !dd) {
                rc = LT_ERR_MEMORY;
                goto done;
            }
            const int32_t *qp = (const int32_t *)qpos.data, *kp = (const int32_t *)kpos.data;
            k_flash_forward(I->stream, cdt, (int)hd, Q.p, K.p, V.p, NULL, lse, dd,
                            (const float *)dout.data, qp, kp, (int)T, (int)S, (int)nh, (int)nkv,
                            window, scale, Q.inv, K.inv, V.inv, I->smem_optin);
            LAUNCHED();
            k_flash_backward(I->stream, cdt, (int)hd, Q.p, K.p, V.p, DO.p, lse, dd,
                             (float *)dq.data, (float *)dk.data, (float *)dv.data, qp, kp, (int)T,
                             (int)S, (int)nh, (int)nkv, window, scale, Q.inv, K.inv, V.inv, DO.inv,
                             I->smem_optin);
            LAUNCHED();
            I->flash_calls++;
            goto done;
        }
        float *qs = NULL, *qinv = NULL, *ds = NULL, *dinv = NULL;
        if (cdt == LT_F16) {
            LT_TRY(fp16_scale(ctx, (const float *)q.data, T * nh * hd, &qs, &qinv));
            LT_TRY(fp16_scale(ctx, (const float *)dout.data, T * nh * hd, &ds, &dinv));
        }
        int64_t Tq = attn_chunk(ctx, T, nh, S, 1);
        LT_TRY(key_plan_make(ctx, &kpn, &qpos, &kpos, sp, T, S));
        if (kpn.qp && I->keyrange_rows > 0 && Tq > I->keyrange_rows) Tq = I->keyrange_rows;
        void *qc = tmp_get(ctx, (size_t)(nh * Tq * hd) * esz);
        void *doc = tmp_get(ctx, (size_t)(nh * Tq * hd) * esz);
        float *sc = (float *)tmp_get(ctx, (size_t)(nh * Tq * S) * 4);
        float *dp = (float *)tmp_get(ctx, (size_t)(nh * Tq * S) * 4);
        void *p16 = cdt == LT_F32 ? NULL : tmp_get(ctx, (size_t)(nh * Tq * S) * 2);
        void *ds16 = cdt == LT_F32 ? NULL : tmp_get(ctx, (size_t)(nh * Tq * S) * 2);
        float *dqc = (float *)tmp_get(ctx, (size_t)(nh * Tq * hd) * 4);
        if (!qc || !doc || !sc || !dp || !dqc || (cdt != LT_F32 && (!p16 || !ds16))) {
            rc = LT_ERR_MEMORY;
            goto done;
        }
        int64_t ldkv = nkv * hd; /* row stride of dk, dv: [S, nkv, hd] */
        rc = attn_bwd_chunks(ctx, &kpn, Tq, &D, cdt, &K, &V, qs, qinv, ds, dinv, qc, doc, sc, dp,
                             p16, ds16, dqc, ldkv, dq, dk, dv, dout, q, qpos, kpos, sp, window,
                             scale);
    }
done:
    key_plan_free(&kpn);
    return op_end(ctx, rc);
}

static lt_status cu_attention_backward(lt_ctx *ctx, lt_tensor dq, lt_tensor dk, lt_tensor dv,
                                       lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                                       lt_tensor qpos, lt_tensor kpos, int window, float scale) {
    return attn_backward(ctx, "attention_backward", dq, dk, dv, dout, q, k, v, qpos, kpos, NULL,
                         window, scale);
}

static lt_status cu_attention_span_backward(lt_ctx *ctx, lt_tensor dq, lt_tensor dk, lt_tensor dv,
                                            lt_tensor dout, lt_tensor q, lt_tensor k, lt_tensor v,
                                            lt_tensor qpos, lt_tensor kpos, lt_tensor span,
                                            int window, float scale) {
    return attn_backward(ctx, "attention_span_backward", dq, dk, dv, dout, q, k, v, qpos, kpos,
                         &span, window, scale);
}

static lt_status cu_geglu_backward(lt_ctx *ctx, lt_tensor dgate, lt_tensor dup, lt_tensor dy,
                                   lt_tensor gate, lt_tensor up) {
    const char *opname = "geglu_backward";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&dy) && is_f32(&gate) && is_f32(&up), "dy, gate, up must be fp32");
    {
        int64_t n = lt_tensor_numel(&gate);
        CU_REQUIRE(lt_tensor_numel(&up) == n && lt_tensor_numel(&dy) == n,
                   "dy, gate, up must have one shape");
        CU_REQUIRE(!dgate.data || lt_tensor_numel(&dgate) == n, "dgate must match gate");
        CU_REQUIRE(!dup.data || lt_tensor_numel(&dup) == n, "dup must match up");
        lt_dtype odt = dgate.data ? dgate.dtype : dup.dtype;
        CU_REQUIRE((odt == LT_F32 || odt == LT_BF16) && (!dgate.data || dgate.dtype == odt) &&
                       (!dup.data || dup.dtype == odt),
                   "dgate and dup must be fp32 or bf16, one dtype");
        k_geglu_backward(impl_of(ctx)->stream, dgate.data, dup.data, odt, (const float *)dy.data,
                         (const float *)gate.data, (const float *)up.data, n);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

static lt_status cu_embedding_backward(lt_ctx *ctx, const lt_weight *table, lt_tensor dh,
                                       lt_tensor ids, float scale) {
    const char *opname = "embedding_backward";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(table && table->w.ndim == 2, "table must be 2-D");
    if (!table->grad_w.data) goto done; /* frozen embedding: nothing to accumulate */
    CU_REQUIRE(is_f32(&dh) && ids.dtype == LT_I32 && ids.data && table->grad_w.dtype == LT_F32,
               "dh, grad fp32 and ids I32");
    {
        int64_t V = table->w.shape[0], H = table->w.shape[1], T = lt_tensor_numel(&ids);
        CU_REQUIRE(lt_tensor_numel(&dh) == T * H, "dh must be [T, H]");
        k_embedding_backward(impl_of(ctx)->stream, (float *)table->grad_w.data,
                             (const float *)dh.data, (const int32_t *)ids.data, T, V, H, scale);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

/* The logit scale s goes into the logits GEMM's alpha and into the gradient GEMMs' alpha
 * (dz/dh carries s); the row weight goes into the row kernel's (softmax - onehot), so no pass
 * over [T, V] is added. */
static lt_status cu_cross_entropy(lt_ctx *ctx, double *loss_sum, lt_tensor dh, lt_tensor h,
                                  const lt_weight *head, lt_tensor targets, lt_tensor row_weight,
                                  lt_tensor row_logp, float logit_scale, float grad_scale) {
    const char *opname = "cross_entropy";
    op_begin(ctx, opname);
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    float *loss = NULL, *wh = NULL;
    int bad = 0;
    CU_NOT_RECORDING();
    CU_REQUIRE(loss_sum, "loss_sum is NULL");
    CU_REQUIRE(is_f32(&h) && targets.dtype == LT_I32 && targets.data,
               "h must be fp32 and targets I32");
    CU_REQUIRE(head && head->w.ndim == 2 && head->w.data && is_float(head->w.dtype),
               "head must be a 2-D float tensor");
    CU_REQUIRE(!(head->lora && head->lora->enabled && head->lora->a.data),
               "an adapter on the output head is not supported");
    {
        int64_t V = head->w.shape[0], H = head->w.shape[1], T = lt_tensor_numel(&targets);
        CU_REQUIRE(last_dim(&h) == H && lt_tensor_numel(&h) == T * H, "h must be [T, H]");
        CU_REQUIRE(!dh.data || (dh.dtype == LT_F32 && lt_tensor_numel(&dh) == T * H),
                   "dh must be fp32 [T, H]");
        CU_REQUIRE(!row_weight.data || (is_f32(&row_weight) && lt_tensor_numel(&row_weight) == T),
                   "row_weight must be fp32 [T]");
        CU_REQUIRE(!row_logp.data || (is_f32(&row_logp) && lt_tensor_numel(&row_logp) == T),
                   "row_logp must be fp32 [T]");
        CU_REQUIRE(isfinite(logit_scale) && logit_scale > 0.0f,
                   "logit_scale must be finite and positive");
        int want_grad = dh.data != NULL; /* a loss-only call leaves the head's gradient alone */
        const float *rw = (const float *)row_weight.data;
        lt_dtype cdt = head->w.dtype;
        *loss_sum = 0;
        if (T == 0) goto done;
        loss = (float *)malloc(sizeof(float) * (size_t)T);
        if (rw) wh = (float *)malloc(sizeof(float) * (size_t)T);
        float *dloss = (float *)tmp_get(ctx, sizeof(float) * (size_t)T);
        if (!loss || (rw && !wh) || !dloss) {
            rc = LT_ERR_MEMORY;
            if (!loss || (rw && !wh))
                lt_fail(ctx->err, rc, "cuda cross_entropy: out of host memory");
            goto done;
        }
        /* the weights on the host: the loss sums w·CE in double, and fp16 sizes each chunk's
         * gradient multiplier by the chunk's largest |w| */
        if (rw) {
            CU_TRY(cudaMemcpyAsync(wh, rw, sizeof(float) * (size_t)T, cudaMemcpyDeviceToHost,
                                   I->stream));
            if (cdt == LT_F16 && want_grad) CU_TRY(cudaStreamSynchronize(I->stream));
        }
        /* rows per chunk: logits [Tc, V] fp32 plus their gradient in cdt stay near 256 MiB
         * (fewer rows made the step slower on the H200: 64 rows of Gemma's vocabulary took
         * the 4B loss from 26 to 62 ms); the trainer lends its idle layer memory for them */
        int64_t per_row = V * (4 + (cdt == LT_F32 ? 0 : 2));
        int64_t Tc = (256ll << 20) / per_row;
        if (I->max_rows > 0 && Tc > I->max_rows) Tc = I->max_rows;
        if (Tc < 1) Tc = 1;
        if (Tc > T) Tc = T;
        float *logits = (float *)tmp_get(ctx, (size_t)(Tc * V) * 4);
        void *dlog = cdt == LT_F32 ? (void *)logits
                                   : (want_grad ? tmp_get(ctx, (size_t)(Tc * V) * 2) : NULL);
        if (!logits || (want_grad && !dlog)) {
            rc = LT_ERR_MEMORY;
            goto done;
        }
        /* |softmax - onehot| <= 1: on fp16 multiply by 2^12 (over the chunk's largest |w|) so that
         * tiny probabilities keep their bits; alpha of the gradient GEMMs divides it out again. */
        float gmul = cdt == LT_F16 ? 4096.0f : 1.0f;
        float *hs = NULL, *hinv = NULL;
        if (cdt == LT_F16) LT_TRY(fp16_scale(ctx, (const float *)h.data, T * H, &hs, &hinv));
        void *hc = cdt == LT_F32 ? NULL : tmp_get(ctx, (size_t)(Tc * H) * 2);
        if (cdt != LT_F32 && !hc) {
            rc = LT_ERR_MEMORY;
            goto done;
        }
        CU_TRY(cudaMemsetAsync(I->dflag, 0, sizeof(int), I->stream));
        opnd W = {head->w.data, cdt, NULL};
        int mark = I->next_slot;
        for (int64_t t0 = 0; t0 < T; t0 += Tc) {
            int64_t tc = T - t0 < Tc ? T - t0 : Tc;
            I->next_slot = mark;
            const float *hrow = (const float *)h.data + t0 * H;
            opnd Hc = {hrow, LT_F32, NULL};
            if (cdt != LT_F32) {
                k_cast_rows(I->stream, hc, cdt, H, hrow, H, tc, H, hs);
                LAUNCHED();
                Hc.p = hc;
                Hc.dt = cdt;
                Hc.inv = hinv;
            }
            /* logits [tc, V] = s · Hc [tc, H] · W [V, H]ᵀ */
            LT_TRY(gemm(ctx, 0, 1, tc, V, H, logit_scale, &Hc, H, 0, &W, H, 0, 0, logits, V, 0, 1));
            if (cdt == LT_F16 && want_grad && rw) {
                float wmax = 0.0f;
                for (int64_t t = t0; t < t0 + tc; t++)
                    wmax = fabsf(wh[t]) > wmax ? fabsf(wh[t]) : wmax;
                gmul = wmax > 0.0f && isfinite(wmax) ? 4096.0f / wmax : 4096.0f;
            }
            k_xent_rows(I->stream, logits, (const int32_t *)targets.data + t0, tc, V, dloss + t0,
                        row_logp.data ? (float *)row_logp.data + t0 : NULL, rw ? rw + t0 : NULL,
                        want_grad ? dlog : NULL, cdt, gmul, I->dflag);
            LAUNCHED();
            if (!want_grad) continue;
            opnd DL = {dlog, cdt, NULL};
            float ga = grad_scale * logit_scale / gmul;
            if (dh.data) /* dh [tc, H] = grad_scale · s · dlog [tc, V] · W [V, H] */
                LT_TRY(gemm(ctx, 0, 0, tc, H, V, ga, &DL, V, 0, &W, H, 0, 0,
                            (float *)dh.data + t0 * H, H, 0, 1));
            if (head->grad_w.data && dh.data) /* grad_w [V, H] += grad_scale · s · dlogᵀ · Hc */
                LT_TRY(gemm(ctx, 1, 0, V, H, tc, ga, &DL, V, 0, &Hc, H, 0, 1,
                            (float *)head->grad_w.data, H, 0, 1));
        }
        CU_TRY(cudaMemcpyAsync(loss, dloss, sizeof(float) * (size_t)T, cudaMemcpyDeviceToHost,
                               I->stream));
        CU_TRY(cudaMemcpyAsync(&bad, I->dflag, sizeof(int), cudaMemcpyDeviceToHost, I->stream));
        CU_TRY(cudaStreamSynchronize(I->stream));
        if (bad) {
            rc = lt_fail(ctx->err, LT_ERR_ARG,
                         "cuda cross_entropy: a target is outside [0, %lld) and is not -100",
                         (long long)V);
            goto done;
        }
        double s = 0;
        if (wh)
            for (int64_t t = 0; t < T; t++)
                s += (double)wh[t] * (double)loss[t];
        else
            for (int64_t t = 0; t < T; t++)
                s += loss[t];
        *loss_sum = s;
    }
done:
    free(loss);
    free(wh);
    return op_end(ctx, rc);
}

static lt_status cu_adamw(lt_ctx *ctx, lt_tensor param, lt_tensor grad, lt_tensor m, lt_tensor v,
                          float lr, float beta1, float beta2, float eps, float weight_decay,
                          int step) {
    const char *opname = "adamw";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&param) && is_f32(&grad) && is_f32(&m) && is_f32(&v),
               "param, grad, m, v must be fp32");
    CU_REQUIRE(step >= 1, "step counts from 1");
    {
        int64_t n = lt_tensor_numel(&param);
        CU_REQUIRE(lt_tensor_numel(&grad) == n && lt_tensor_numel(&m) == n &&
                       lt_tensor_numel(&v) == n,
                   "param, grad, m, v must have one shape");
        double bc1 = 1.0 - pow((double)beta1, step), bc2 = 1.0 - pow((double)beta2, step);
        k_adamw(impl_of(ctx)->stream, (float *)param.data, (const float *)grad.data,
                (float *)m.data, (float *)v.data, n, lr, beta1, beta2, eps, weight_decay,
                (float)(lr / bc1), (float)sqrt(bc2));
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

/* ---- the trainer's vector ops (backend.h) ---------------------------------------------------- */

static lt_status cu_fill(lt_ctx *ctx, lt_tensor t, float value) {
    const char *opname = "fill";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&t), "t must be fp32");
    if (value == 0.0f)
        CU_TRY(cudaMemsetAsync(t.data, 0, lt_tensor_bytes(&t), impl_of(ctx)->stream));
    else {
        k_fill(impl_of(ctx)->stream, (float *)t.data, lt_tensor_numel(&t), value);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

static lt_status cu_scale_op(lt_ctx *ctx, lt_tensor t, float s) {
    const char *opname = "scale";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&t), "t must be fp32");
    k_scale(impl_of(ctx)->stream, (float *)t.data, lt_tensor_numel(&t), s);
    LAUNCHED();
done:
    return op_end(ctx, rc);
}

static lt_status cu_sumsq(lt_ctx *ctx, double *out, lt_tensor t) {
    const char *opname = "sumsq";
    op_begin(ctx, opname);
    cu_impl *I = impl_of(ctx);
    lt_status rc = LT_OK;
    double *d = NULL;
    CU_NOT_RECORDING();
    CU_REQUIRE(is_f32(&t) && out, "t must be fp32");
    d = (double *)tmp_get(ctx, sizeof(double));
    if (!d) {
        rc = LT_ERR_MEMORY;
        goto done;
    }
    CU_TRY(cudaMemsetAsync(d, 0, sizeof(double), I->stream));
    k_sumsq(I->stream, (const float *)t.data, lt_tensor_numel(&t), d);
    LAUNCHED();
    CU_TRY(cudaMemcpyAsync(out, d, sizeof(double), cudaMemcpyDeviceToHost, I->stream));
    CU_TRY(cudaStreamSynchronize(I->stream));
done:
    return op_end(ctx, rc);
}

static lt_status cu_dropout(lt_ctx *ctx, lt_tensor y, lt_tensor x, float p, float mul,
                            uint64_t seed) {
    const char *opname = "dropout";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&y) && is_f32(&x) && lt_tensor_numel(&y) == lt_tensor_numel(&x),
               "y, x must be fp32 of one shape");
    CU_REQUIRE(p >= 0.0f && p < 1.0f, "p must be in [0, 1)");
    k_dropout(impl_of(ctx)->stream, (float *)y.data, (const float *)x.data, lt_tensor_numel(&x), p,
              mul / (1.0f - p), seed);
    LAUNCHED();
done:
    return op_end(ctx, rc);
}

/* ---- the image tower's backward (lt_tower_grad_ops; kernels/vision.cu) --------------------------
 * backend_cpu_vision.c's cpu_layernorm_backward, cpu_gelu_backward and cpu_avg_pool_backward are
 * the specification: the same argument checks, the same results (the row statistics in double,
 * as the CPU takes them). training LoRA adapters on the tower reaches them through
 * lt_backend_tower_grad (backend_cpu_vision.c), which returns this table for lt_backend_cuda. */

static lt_status cu_layernorm_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dw, lt_tensor db,
                                       lt_tensor dy, lt_tensor x, lt_tensor w, float eps) {
    const char *opname = "layernorm_backward";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&dx) && is_f32(&dy) && is_f32(&x) && is_f32(&w), "dx, dy, x, w must be fp32");
    {
        int64_t D = lt_tensor_numel(&w), n = lt_tensor_numel(&x);
        CU_REQUIRE(D > 0 && n % D == 0 && lt_tensor_numel(&dy) == n && lt_tensor_numel(&dx) == n,
                   "x, dy, dx must be [N, D] with w [D]");
        CU_REQUIRE((!dw.data || (dw.dtype == LT_F32 && lt_tensor_numel(&dw) == D)) &&
                       (!db.data || (db.dtype == LT_F32 && lt_tensor_numel(&db) == D)),
                   "dw, db must be fp32 [D]");
        int64_t N = n / D;
        if (N == 0) goto done;
        double *scratch = (double *)tmp_get(ctx, k_layernorm_backward_scratch(N, D));
        if (!scratch) {
            rc = LT_ERR_MEMORY;
            goto done;
        }
        k_layernorm_backward(impl_of(ctx)->stream, (float *)dx.data, (float *)dw.data,
                             (float *)db.data, (const float *)dy.data, (const float *)x.data,
                             (const float *)w.data, N, D, eps, scratch);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

static lt_status cu_gelu_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, lt_tensor x) {
    const char *opname = "gelu_backward";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    int64_t n = lt_tensor_numel(&x);
    CU_REQUIRE(is_f32(&dx) && is_f32(&dy) && is_f32(&x) && lt_tensor_numel(&dy) == n &&
                   lt_tensor_numel(&dx) == n,
               "dx, dy, x must be fp32, one shape");
    k_gelu_backward(impl_of(ctx)->stream, (float *)dx.data, (const float *)dy.data,
                    (const float *)x.data, n);
    LAUNCHED();
done:
    return op_end(ctx, rc);
}

static lt_status cu_avg_pool_backward(lt_ctx *ctx, lt_tensor dx, lt_tensor dy, int k) {
    const char *opname = "avg_pool_backward";
    op_begin(ctx, opname);
    lt_status rc = LT_OK;
    CU_REQUIRE(is_f32(&dx) && is_f32(&dy) && dx.ndim == 2 && dy.ndim == 2,
               "dx, dy must be fp32 [rows, D]");
    {
        int64_t D = dx.shape[1], g = lt_pool_grid(dx.shape[0], k);
        CU_REQUIRE(g > 0, "dx must be a square grid g*g of rows with g a multiple of k");
        CU_REQUIRE(dy.shape[0] == (g / k) * (g / k) && dy.shape[1] == D, "dy must be [(g/k)^2, D]");
        k_avg_pool_backward(impl_of(ctx)->stream, (float *)dx.data, (const float *)dy.data, g, k,
                            D);
        LAUNCHED();
    }
done:
    return op_end(ctx, rc);
}

static const lt_tower_grad_ops cu_tower_grad = {
    .layernorm_backward = cu_layernorm_backward,
    .gelu_backward = cu_gelu_backward,
    .avg_pool_backward = cu_avg_pool_backward,
};

/* ---- the op table ------------------------------------------------------------------------------
 */

static lt_status cu_convert_op(lt_ctx *ctx, void *dst, lt_dtype dt, const void *src, lt_dtype sdt,
                               int64_t n) {
    return lt_cuda_convert(ctx, dst, dt, src, sdt, n);
}

static void cu_memory_op(lt_ctx *ctx, lt_mem_info *m) {
    lt_cuda_mem cm;
    lt_cuda_memory(ctx, &cm);
    memset(m, 0, sizeof *m);
    m->where = "GPU memory";
    m->on_device = 1;
    m->in_use = cm.in_use;
    m->peak = cm.peak;
    m->cached = cm.reserved > cm.in_use ? cm.reserved - cm.in_use : 0;
    m->free = cm.free;
    m->total = cm.total;
}

extern "C" const lt_backend lt_backend_cuda = {
    .name = "cuda",
    .init = cu_init,
    .shutdown = cu_shutdown,
    .alloc = cu_alloc,
    .release = cu_release,
    .upload = cu_upload,
    .download = cu_download,
    .copy = cu_copy,
    .sync = cu_sync,
    .host_alloc = cu_host_alloc,
    .host_release = cu_host_release,
    .stash_out = cu_stash_out,
    .stash_in = cu_stash_in,
    .stash_wait = cu_stash_wait,
    .lend = cu_lend,
    .bf16_activations = cu_bf16_activations,
    .convert = cu_convert_op,
    .memory = cu_memory_op,
    .trim = lt_cuda_trim,
    .embedding = cu_embedding,
    .linear = cu_linear,
    .linears = cu_linears,
    .rmsnorm = cu_rmsnorm,
    .rmsnorm_add = cu_rmsnorm_add,
    .rope = cu_rope,
    .qk_norm_rope = cu_qk_norm_rope,
    .attention = cu_attention,
    .geglu = cu_geglu,
    .add = cu_add,
    .attention_rows = cu_attention_rows,
    .sample_rows = cu_sample_rows,
    .linear_backward = cu_linear_backward,
    .rmsnorm_backward = cu_rmsnorm_backward,
    .rope_backward = cu_rope_backward,
    .attention_backward = cu_attention_backward,
    .geglu_backward = cu_geglu_backward,
    .embedding_backward = cu_embedding_backward,
    .cross_entropy = cu_cross_entropy,
    .adamw = cu_adamw,
    .fill = cu_fill,
    .scale = cu_scale_op,
    .sumsq = cu_sumsq,
    .dropout = cu_dropout,
    /* the image tower's ops and the image block's attention (kernels/vision.cu) */
    .layernorm = cu_layernorm,
    .add_bias = cu_add_bias,
    .gelu = cu_gelu,
    .avg_pool = cu_avg_pool,
    .attention_span = cu_attention_span,
    .attention_span_backward = cu_attention_span_backward,
    .tower_grad = &cu_tower_grad,
    /* graphs: record a sequence of ops, replay it (the batched sampler's decode step) */
    .graph_begin = cu_graph_begin,
    .graph_end = cu_graph_end,
    .graph_launch = cu_graph_launch,
    .graph_free = cu_graph_free,
};

/* ---- extras (backend_cuda.h) -------------------------------------------------------------------
 */

static int is_cuda_ctx(lt_ctx *ctx) {
    return ctx && ctx->be == &lt_backend_cuda && ctx->impl;
}

extern "C" lt_dtype lt_cuda_policy_dtype(lt_ctx *ctx) {
    lt_dtype d = LT_BF16;
    if (is_cuda_ctx(ctx)) d = impl_of(ctx)->cc >= 80 ? LT_BF16 : LT_F16;
    const char *pe = getenv("LATHE_PRECISION");
    lt_dtype e;
    if (pe && *pe && strcmp(pe, "auto") != 0 && parse_prec(pe, &e) == 0) d = e;
    return d;
}

extern "C" int lt_cuda_compute_capability(lt_ctx *ctx) {
    return is_cuda_ctx(ctx) ? impl_of(ctx)->cc : 0;
}

extern "C" long lt_cuda_flash_calls(lt_ctx *ctx) {
    return is_cuda_ctx(ctx) ? impl_of(ctx)->flash_calls : 0;
}

extern "C" lt_status lt_cuda_set_precision(lt_ctx *ctx, lt_dtype dt) {
    if (!is_cuda_ctx(ctx)) return LT_ERR_STATE;
    if (dt != LT_F32 && dt != LT_F16 && dt != LT_BF16) {
        return lt_fail(ctx->err, LT_ERR_ARG, "cuda: precision must be fp16, bf16 or fp32");
    }
    impl_of(ctx)->prec = dt;
    return LT_OK;
}

extern "C" lt_dtype lt_cuda_precision(lt_ctx *ctx) {
    return is_cuda_ctx(ctx) ? impl_of(ctx)->prec : LT_F32;
}

extern "C" int lt_cuda_parse_precision(lt_ctx *ctx, const char *word, lt_dtype *out) {
    if (!word || !strcmp(word, "auto") || !*word) {
        *out = lt_cuda_policy_dtype(ctx);
        return 0;
    }
    return parse_prec(word, out);
}

extern "C" void lt_cuda_memory(lt_ctx *ctx, lt_cuda_mem *m) {
    memset(m, 0, sizeof *m);
    if (!is_cuda_ctx(ctx)) return;
    cu_impl *I = impl_of(ctx);
    m->in_use = I->in_use;
    m->peak = I->peak;
    m->peak_op = I->peak_op ? I->peak_op : "";
    m->reserved = I->reserved;
    if (cudaMemGetInfo(&m->free, &m->total) != cudaSuccess) cudaGetLastError();
    if (I->cap) { /* what the cap leaves, as a card of that size would */
        size_t left = I->cap > I->reserved ? I->cap - I->reserved : 0;
        if (left < m->free) m->free = left;
        if (I->cap < m->total) m->total = I->cap;
    }
}

extern "C" void lt_cuda_reset_peak(lt_ctx *ctx) {
    if (is_cuda_ctx(ctx)) {
        impl_of(ctx)->peak = impl_of(ctx)->in_use;
        impl_of(ctx)->peak_op = NULL;
    }
}

extern "C" void lt_cuda_trim(lt_ctx *ctx) {
    if (!is_cuda_ctx(ctx)) return;
    cu_impl *I = impl_of(ctx);
    if (I->rec_live) return; /* it would wait for the stream: not while recording */
    cudaStreamSynchronize(I->stream);
    cudaStreamSynchronize(I->stash_stream);
    free_cached(I);
    for (int i = 0; i < 4; i++) /* page-locked blocks no step holds now */
        if (I->pinned[i].p && !I->pinned[i].used) {
            cudaFreeHost(I->pinned[i].p);
            I->pinned[i].p = NULL;
        }
}

extern "C" lt_status lt_cuda_convert(lt_ctx *ctx, void *dst, lt_dtype dt, const void *src,
                                     lt_dtype sdt, int64_t n) {
    lt_status rc = LT_OK;
    if (!is_cuda_ctx(ctx)) return LT_ERR_STATE;
    k_convert(impl_of(ctx)->stream, dst, dt, src, sdt, n);
    LAUNCHED();
done:
    return rec_check(ctx, rc);
}

extern "C" void lt_cuda_profile(lt_ctx *ctx, int on) {
    if (!is_cuda_ctx(ctx)) return;
    cu_impl *I = impl_of(ctx);
    if (I->rec_live) return; /* ops being recorded are not timed; graph_begin refuses it on */
    if (!on) prof_flush(I);
    I->prof = on;
}

static int cmp_total(const void *a, const void *b) {
    double x = ((const cu_prof_total *)a)->ms, y = ((const cu_prof_total *)b)->ms;
    return x < y ? 1 : x > y ? -1 : 0;
}

extern "C" int lt_cuda_profile_report(lt_ctx *ctx, char *buf, size_t cap) {
    if (!is_cuda_ctx(ctx) || !cap) return 0;
    cu_impl *I = impl_of(ctx);
    prof_flush(I);
    qsort(I->totals, (size_t)I->n_totals, sizeof I->totals[0], cmp_total);
    double all = 0;
    for (int i = 0; i < I->n_totals; i++)
        if (I->totals[i].name[0] != ' ')
            all += I->totals[i].ms; /* nested entries are not added twice */
    size_t k = 0;
    buf[0] = 0;
    for (int i = 0; i < I->n_totals && k < cap; i++) {
        int w = snprintf(buf + k, cap - k, "%-34s %8ld calls %10.2f ms %5.1f%%\n",
                         I->totals[i].name, I->totals[i].calls, I->totals[i].ms,
                         all > 0 ? 100.0 * I->totals[i].ms / all : 0.0);
        if (w < 0) break;
        k += (size_t)w;
    }
    I->n_totals = 0;
    return (int)(k < cap ? k : cap - 1);
}

extern "C" int lt_cuda_peak_report(lt_ctx *ctx, char *buf, size_t cap) {
    size_t k = 0;
    if (!is_cuda_ctx(ctx) || !cap) return 0;
    cu_impl *I = impl_of(ctx);
    buf[0] = 0;
    /* blocks of one size taken by one op, grouped, biggest groups first */
    int n = I->n_peak_live;
    char *done_mark = (char *)calloc((size_t)n + 1, 1);
    if (!done_mark) return 0;
    for (;;) {
        int best = -1;
        double best_total = 0;
        for (int i = 0; i < n; i++) {
            if (done_mark[i]) continue;
            double tot = 0;
            for (int j = i; j < n; j++)
                if (!done_mark[j] && I->peak_live[j].size == I->peak_live[i].size &&
                    I->peak_live[j].op == I->peak_live[i].op)
                    tot += (double)I->peak_live[j].size;
            if (tot > best_total) best_total = tot, best = i;
        }
        if (best < 0) break;
        int count = 0;
        for (int j = best; j < n; j++)
            if (!done_mark[j] && I->peak_live[j].size == I->peak_live[best].size &&
                I->peak_live[j].op == I->peak_live[best].op)
                done_mark[j] = 1, count++;
        if (k < cap)
            k += (size_t)snprintf(buf + k, cap - k, "  %4d x %9.2f MiB = %9.2f MiB  %s\n", count,
                                  I->peak_live[best].size / 1048576.0, best_total / 1048576.0,
                                  I->peak_live[best].op ? I->peak_live[best].op : "(buffers)");
    }
    free(done_mark);
    return (int)(k < cap ? k : cap);
}
