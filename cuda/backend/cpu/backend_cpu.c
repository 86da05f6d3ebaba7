/* backend_cpu.c — the fp32 reference backend: the specification of every op in backend.h.
 *
 * Owns the CPU op table (lt_backend_cpu) and its thread pool. Every op computes in fp32 on host
 * memory; frozen weights stored as F16/BF16 are widened inside the matmul, NF4/int8 weights are
 * dequantized a band of rows at a time (backend_cpu_quant.c) and multiplied as fp32. Matmuls go
 * through CBLAS when the build has it (HAVE_CBLAS) and through a plain threaded C loop otherwise
 * (the loop is also what decode uses for 16-bit weights: a GEMV is memory-bound, and widening the
 * whole matrix first would double the traffic). Keep it simple and correct: the CUDA backend
 * is tested against this file. Knows nothing of Gemma.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef HAVE_CBLAS
#include <cblas.h>
#endif

#include "cuda/backend/backend.h"
#include "cuda/backend/cpu/grad.h"

/* ---- thread pool ---------------------------------------------------------------------------
 * run(fn, arg, n_tasks): the caller and n-1 workers take task indices under one mutex until
 * none are left; the caller returns when every task has finished. Tasks are coarse (a few per
 * thread), so the mutex costs nothing measurable. */

typedef void (*pool_fn)(void *arg, int task, int n_tasks);

typedef struct cpu_pool {
    int n_threads; /* including the caller */
    pthread_t *th;
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    pool_fn fn;
    void *arg;
    int n_tasks, next, done;
    unsigned gen;
    int stop;
} cpu_pool;

/* Takes the next task of job `gen`; -1 when none. Holds the lock while reading the job. */
static int pool_grab(cpu_pool *p, unsigned gen, pool_fn *fn, void **arg, int *n_tasks) {
    int i = -1;
    pthread_mutex_lock(&p->mu);
    if (p->gen == gen && p->next < p->n_tasks) {
        i = p->next++;
        *fn = p->fn;
        *arg = p->arg;
        *n_tasks = p->n_tasks;
    }
    pthread_mutex_unlock(&p->mu);
    return i;
}

static void pool_finish_one(cpu_pool *p) {
    pthread_mutex_lock(&p->mu);
    if (++p->done == p->n_tasks) pthread_cond_broadcast(&p->cv_done);
    pthread_mutex_unlock(&p->mu);
}

static void *pool_worker(void *vp) {
    cpu_pool *p = vp;
    unsigned seen = 0;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        while (p->gen == seen && !p->stop)
            pthread_cond_wait(&p->cv_work, &p->mu);
        if (p->stop) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = p->gen;
        pthread_mutex_unlock(&p->mu);
        pool_fn fn;
        void *arg;
        int n, i;
        while ((i = pool_grab(p, seen, &fn, &arg, &n)) >= 0) {
            fn(arg, i, n);
            pool_finish_one(p);
        }
    }
}

static void pool_run(cpu_pool *p, pool_fn fn, void *arg, int n_tasks) {
    if (n_tasks <= 0) return;
    if (!p || p->n_threads <= 1 || n_tasks == 1) {
        for (int i = 0; i < n_tasks; i++)
            fn(arg, i, n_tasks);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n_tasks = n_tasks;
    p->next = 0;
    p->done = 0;
    unsigned gen = ++p->gen;
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    pool_fn f;
    void *a;
    int n, i;
    while ((i = pool_grab(p, gen, &f, &a, &n)) >= 0) {
        f(a, i, n);
        pool_finish_one(p);
    }
    pthread_mutex_lock(&p->mu);
    while (p->done < p->n_tasks)
        pthread_cond_wait(&p->cv_done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

static void pool_free(cpu_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_threads - 1; i++)
        pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_work);
    pthread_cond_destroy(&p->cv_done);
    free(p->th);
    free(p);
}

static cpu_pool *pool_new(int n_threads) {
    cpu_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_threads = n_threads < 1 ? 1 : n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_work, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    if (p->n_threads > 1) {
        p->th = calloc((size_t)p->n_threads - 1, sizeof(pthread_t));
        if (!p->th) {
            p->n_threads = 1;
            return p;
        }
        for (int i = 0; i < p->n_threads - 1; i++) {
            if (pthread_create(&p->th[i], NULL, pool_worker, p) != 0) {
                p->n_threads = i + 1; /* run with the workers we got */
                break;
            }
        }
    }
    return p;
}

static cpu_pool *ctx_pool(lt_ctx *ctx) {
    return ctx ? (cpu_pool *)ctx->impl : NULL;
}

static int pool_threads(lt_ctx *ctx) {
    cpu_pool *p = ctx_pool(ctx);
    return p ? p->n_threads : 1;
}

/* ---- argument checks ------------------------------------------------------------------------ */

static int is_f32(const lt_tensor *t) {
    return t->dtype == LT_F32 && t->data;
}
static int is_float(lt_dtype d) {
    return d == LT_F32 || d == LT_F16 || d == LT_BF16;
}
static int64_t last_dim(const lt_tensor *t) {
    return t->ndim ? t->shape[t->ndim - 1] : 1;
}

/* ---- memory ---------------------------------------------------------------------------------- */

static lt_status cpu_init(lt_ctx *ctx) {
    int n = ctx->n_threads;
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    ctx->impl = pool_new(n);
    if (!ctx->impl) {
        return lt_fail(ctx->err, LT_ERR_MEMORY, "cpu: out of memory creating the thread pool");
    }
    ctx->n_threads = ((cpu_pool *)ctx->impl)->n_threads;
    return LT_OK;
}

static void cpu_shutdown(lt_ctx *ctx) {
    pool_free(ctx->impl);
    ctx->impl = NULL;
}

static void *cpu_alloc(lt_ctx *ctx, size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p && ctx)
        lt_fail(ctx->err, LT_ERR_MEMORY, "cpu: out of memory allocating %zu bytes", bytes);
    return p;
}

static void cpu_release(lt_ctx *ctx, void *p) {
    free(p);
}

static lt_status cpu_memcpy(lt_ctx *ctx, void *dst, const void *src, size_t bytes) {
    if (bytes) memmove(dst, src, bytes);
    return LT_OK;
}

static lt_status cpu_sync(lt_ctx *ctx) {
    return LT_OK;
}

/* The CPU's "off-device" memory is its own: the stash copies are plain copies, done when they
 * return, so there is nothing to wait for. */
static void *cpu_host_alloc(lt_ctx *ctx, size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p && ctx)
        lt_fail(ctx->err, LT_ERR_MEMORY, "cpu: out of memory allocating %zu bytes for checkpoints",
                bytes);
    return p;
}

static lt_status cpu_stash_wait(lt_ctx *ctx) {
    return LT_OK;
}

static int cpu_no_bf16_activations(lt_ctx *ctx) {
    (void)ctx;
    return 0; /* the reference reads fp32 activations */
}

static void cpu_lend(lt_ctx *ctx, void *p, size_t bytes) {
    (void)ctx, (void)p, (void)bytes; /* temporaries come from malloc, one op at a time */
}

/* ---- matmul ------------------------------------------------------------------------------------
 * y[T, out] = x[T, in] · W[out, in]ᵀ. The C loop widens ROWS weight rows at a time into a
 * per-task fp32 buffer and dots each with every x row; 8 independent partial sums per dot let
 * the compiler use vector registers without -ffast-math. */

typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

/* The hot loops are compiled twice on x86-64 with GCC, for AVX2+FMA machines and for the
 * baseline, and picked at load time (ifunc): the build stays portable, the kernel is fast. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LT_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LT_HOT
#endif

static inline float hsum8(v8f a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

LT_HOT static float dot_f32(const float *a, const float *b, int64_t n) {
    v8f acc = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f va, vb;
        memcpy(&va, a + i, sizeof va);
        memcpy(&vb, b + i, sizeof vb);
        acc += va * vb;
    }
    float s = hsum8(acc);
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* out[k] = x · w[k] for nr (<= 4) fp32 rows: x is loaded once for all rows. */
LT_HOT static void dot4_f32(const float *x, const float *const *w, int nr, int64_t n, float *out) {
    v8f acc[4] = {{0}, {0}, {0}, {0}};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f vx;
        memcpy(&vx, x + i, sizeof vx);
        for (int k = 0; k < nr; k++) {
            v8f vw;
            memcpy(&vw, w[k] + i, sizeof vw);
            acc[k] += vx * vw;
        }
    }
    for (int k = 0; k < nr; k++) {
        float s = hsum8(acc[k]);
        for (int64_t j = i; j < n; j++)
            s += x[j] * w[k][j];
        out[k] = s;
    }
}

/* The same for bf16 rows, widened in registers (bf16 = the top half of an fp32). */
LT_HOT static void dot4_bf16(const float *x, const uint16_t *const *w, int nr, int64_t n,
                             float *out) {
    v8f acc[4] = {{0}, {0}, {0}, {0}};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f vx;
        memcpy(&vx, x + i, sizeof vx);
        for (int k = 0; k < nr; k++) {
            v8h vh;
            memcpy(&vh, w[k] + i, sizeof vh);
            v8u u = __builtin_convertvector(vh, v8u) << 16;
            v8f vw;
            memcpy(&vw, &u, sizeof vw);
            acc[k] += vx * vw;
        }
    }
    for (int k = 0; k < nr; k++) {
        float s = hsum8(acc[k]);
        for (int64_t j = i; j < n; j++)
            s += x[j] * lt_bf16_to_f32(w[k][j]);
        out[k] = s;
    }
}

LT_HOT static void widen_bf16(float *dst, const uint16_t *s, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8h vh;
        memcpy(&vh, s + i, sizeof vh);
        v8u u = __builtin_convertvector(vh, v8u) << 16;
        memcpy(dst + i, &u, sizeof u);
    }
    for (; i < n; i++)
        dst[i] = lt_bf16_to_f32(s[i]);
}

static inline void widen_row(float *dst, const void *w, lt_dtype wt, int64_t row, int64_t in) {
    if (wt == LT_BF16) {
        widen_bf16(dst, (const uint16_t *)w + row * in, in);
    } else if (wt == LT_F16) {
        const uint16_t *s = (const uint16_t *)w + row * in;
        for (int64_t i = 0; i < in; i++)
            dst[i] = lt_f16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)w + row * in, (size_t)in * 4);
    }
}

typedef struct mm_job {
    float *y;
    const float *x;
    const void *w;
    lt_dtype wt;
    int64_t T, in, out;
    int oom;
} mm_job;

#define MM_ROWS 4

static void mm_task(void *arg, int task, int n_tasks) {
    mm_job *j = arg;
    int64_t per = (j->out + n_tasks - 1) / n_tasks;
    per = (per + MM_ROWS - 1) / MM_ROWS * MM_ROWS;
    int64_t r0 = (int64_t)task * per, r1 = r0 + per < j->out ? r0 + per : j->out;
    if (r0 >= r1) return;
    float *buf = NULL;
    if (j->wt == LT_F16) { /* f16 rows are widened into a buffer first (rare on the CPU) */
        buf = malloc(sizeof(float) * (size_t)(MM_ROWS * j->in));
        if (!buf) {
            j->oom = 1;
            return;
        }
    }
    for (int64_t r = r0; r < r1; r += MM_ROWS) {
        int nr = r + MM_ROWS <= r1 ? MM_ROWS : (int)(r1 - r);
        const float *rows[MM_ROWS];
        const uint16_t *hrows[MM_ROWS];
        for (int k = 0; k < nr; k++) {
            if (j->wt == LT_BF16) {
                hrows[k] = (const uint16_t *)j->w + (r + k) * j->in;
            } else if (buf) {
                widen_row(buf + k * j->in, j->w, j->wt, r + k, j->in);
                rows[k] = buf + k * j->in;
            } else {
                rows[k] = (const float *)j->w + (r + k) * j->in;
            }
        }
        for (int64_t t = 0; t < j->T; t++) {
            const float *xt = j->x + t * j->in;
            float *yt = j->y + t * j->out + r;
            if (j->wt == LT_BF16)
                dot4_bf16(xt, hrows, nr, j->in, yt);
            else
                dot4_f32(xt, rows, nr, j->in, yt);
        }
    }
    free(buf);
}

int lt_cpu_has_blas(void) {
#ifdef HAVE_CBLAS
    return 1;
#else
    return 0;
#endif
}

#ifdef HAVE_CBLAS
/* Widens a band of weight rows in parallel (the pool), for the BLAS path. */
typedef struct widen_job {
    float *dst;
    const void *w;
    lt_dtype wt;
    int64_t r0, nrows, in;
} widen_job;

static void widen_task(void *arg, int task, int n_tasks) {
    widen_job *j = arg;
    int64_t per = (j->nrows + n_tasks - 1) / n_tasks;
    int64_t a = (int64_t)task * per, b = a + per < j->nrows ? a + per : j->nrows;
    for (int64_t r = a; r < b; r++)
        widen_row(j->dst + r * j->in, j->w, j->wt, j->r0 + r, j->in);
}
#endif

lt_status lt_cpu_matmul(lt_ctx *ctx, float *y, const float *x, const void *w, lt_dtype wt,
                        int64_t T, int64_t in, int64_t out, int use_blas) {
    if (T <= 0 || out <= 0) return LT_OK;
#ifdef HAVE_CBLAS
    if (use_blas && (wt == LT_F32 || T >= 8)) {
        if (wt == LT_F32) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)out, (int)in, 1.0f, x,
                        (int)in, (const float *)w, (int)in, 0.0f, y, (int)out);
            return LT_OK;
        }
        /* 16-bit weights: widen a band of rows (about 16 MB), multiply it, move on. */
        int64_t band = (int64_t)(4u << 20) / (in > 0 ? in : 1);
        if (band < 16) band = 16;
        if (band > out) band = out;
        float *wf = malloc(sizeof(float) * (size_t)(band * in));
        if (!wf) {
            return lt_fail(ctx ? ctx->err : NULL, LT_ERR_MEMORY,
                           "cpu matmul: out of memory (%lld x %lld band)", (long long)band,
                           (long long)in);
        }
        for (int64_t r0 = 0; r0 < out; r0 += band) {
            int64_t nr = r0 + band <= out ? band : out - r0;
            widen_job wj = {wf, w, wt, r0, nr, in};
            pool_run(ctx_pool(ctx), widen_task, &wj, pool_threads(ctx) * 2);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)nr, (int)in, 1.0f, x,
                        (int)in, wf, (int)in, 0.0f, y + r0, (int)out);
        }
        free(wf);
        return LT_OK;
    }
#else
    (void)use_blas;
#endif
    mm_job j = {y, x, w, wt, T, in, out, 0};
    int nt = pool_threads(ctx) * 4;
    if (nt > out / MM_ROWS) nt = (int)(out / MM_ROWS) > 0 ? (int)(out / MM_ROWS) : 1;
    pool_run(ctx_pool(ctx), mm_task, &j, nt);
    if (j.oom) {
        return lt_fail(ctx ? ctx->err : NULL, LT_ERR_MEMORY, "cpu matmul: out of memory");
    }
    return LT_OK;
}

const float *cpu_as_f32(const lt_tensor *x, float **owned) {
    *owned = NULL;
    if (x->dtype == LT_F32) return x->data;
    int64_t n = lt_tensor_numel(x);
    float *f = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    if (!f) return NULL;
    lt_convert(f, LT_F32, x->data, x->dtype, n);
    return *owned = f;
}

/* ---- quantized weights (NF4, int8): dequantized a band of rows at a time ---------------------
 * A band of about 16 MB of fp32 rows is dequantized by the pool (lt_weight_dequantize_rows),
 * then multiplied like an fp32 weight: never the whole matrix in fp32 at once. */

typedef struct band_job {
    const lt_weight *w;
    int64_t r0, nr;
    float *dst;
} band_job;

static void band_task(void *arg, int task, int n_tasks) {
    band_job *j = arg;
    int64_t per = (j->nr + n_tasks - 1) / n_tasks;
    int64_t a = (int64_t)task * per, b = a + per < j->nr ? a + per : j->nr;
    if (a < b) lt_weight_dequantize_rows(j->w, j->r0 + a, b - a, j->dst + a * j->w->w.shape[1]);
}

int64_t cpu_band_rows(const lt_weight *w) {
    int64_t in = w->w.shape[1] > 0 ? w->w.shape[1] : 1;
    int64_t band = (int64_t)(4u << 20) / in;
    if (band < 16) band = 16;
    return band < w->w.shape[0] ? band : w->w.shape[0];
}

void cpu_dequantize_band(lt_ctx *ctx, const lt_weight *w, int64_t r0, int64_t nr, float *dst) {
    band_job j = {w, r0, nr, dst};
    int nt = pool_threads(ctx) * 2;
    if (nt > nr) nt = (int)nr;
    pool_run(ctx_pool(ctx), band_task, &j, nt > 0 ? nt : 1);
}

/* y [T, out] = x [T, in] · Wᵀ for an NF4 / int8 weight. */
static lt_status quant_matmul(lt_ctx *ctx, float *y, const float *x, const lt_weight *w,
                              int64_t T) {
    int64_t out = w->w.shape[0], in = w->w.shape[1], band = cpu_band_rows(w);
    float *wf = malloc(sizeof(float) * (size_t)(band * in));
    float *yb = band < out ? malloc(sizeof(float) * (size_t)(T * band)) : NULL;
    lt_status rc = LT_OK;
    if (!wf || (band < out && !yb)) {
        snprintf(ctx->err, LT_ERRLEN, "cpu linear: out of memory dequantizing a %lld x %lld band",
                 (long long)band, (long long)in);
        rc = LT_ERR_MEMORY;
    }
    for (int64_t r0 = 0; rc == LT_OK && r0 < out; r0 += band) {
        int64_t nr = r0 + band <= out ? band : out - r0;
        cpu_dequantize_band(ctx, w, r0, nr, wf);
        if (!yb) { /* one band: the whole output */
            rc = lt_cpu_matmul(ctx, y, x, wf, LT_F32, T, in, nr, 1);
            break;
        }
        rc = lt_cpu_matmul(ctx, yb, x, wf, LT_F32, T, in, nr, 1); /* yb: [T, nr] */
        for (int64_t t = 0; rc == LT_OK && t < T; t++)
            memcpy(y + t * out + r0, yb + t * nr, sizeof(float) * (size_t)nr);
    }
    free(wf);
    free(yb);
    return rc;
}

static lt_status cpu_linear(lt_ctx *ctx, lt_tensor y, lt_tensor x, const lt_weight *w) {
    const char *op = "linear";
    int quant = w && w->q.kind != LT_QUANT_NONE;
    REQUIRE(w && w->w.ndim == 2 && w->w.data && (quant || is_float(w->w.dtype)), op,
            "weight must be a 2-D float, NF4 or int8 tensor");
    REQUIRE(is_f32(&y) && x.data &&
                (x.dtype == LT_F32 || (x.dtype == LT_BF16 && w->w.dtype == LT_BF16)),
            op, "y must be fp32, x fp32 (or bf16 with a bf16 weight)");
    int64_t out = w->w.shape[0], in = w->w.shape[1];
    int64_t T = lt_tensor_numel(&x) / (in ? in : 1);
    if (last_dim(&x) != in || last_dim(&y) != out || lt_tensor_numel(&y) != T * out) {
        char a[64], b[64], c[64];
        return lt_fail(ctx->err, LT_ERR_ARG, "cpu linear: shapes do not agree: y %s = x %s · W%s^T",
                       lt_shape_str(&y, a, 64), lt_shape_str(&x, b, 64),
                       lt_shape_str(&w->w, c, 64));
    }
    float *xown;
    const float *xf = cpu_as_f32(&x, &xown);
    if (!xf) {
        return lt_fail(ctx->err, LT_ERR_MEMORY, "cpu linear: out of memory widening a bf16 input");
    }
    lt_status rc = quant ? quant_matmul(ctx, y.data, xf, w, T)
                         : lt_cpu_matmul(ctx, y.data, xf, w->w.data, w->w.dtype, T, in, out, 1);
    if (rc != LT_OK || !w->lora || !w->lora->enabled || !w->lora->a.data) {
        free(xown);
        return rc;
    }
    /* adapter: y += scale * (x·Aᵀ)·Bᵀ;  A: [r, in], B: [out, r] fp32 */
    const lt_lora *lo = w->lora;
    int64_t r = lo->a.shape[0];
    float *xa = NULL, *d = NULL;
    if (lo->a.shape[1] != in || lo->b.shape[0] != out || lo->b.shape[1] != r) {
        rc = lt_fail(ctx->err, LT_ERR_ARG, "cpu %s: adapter shapes do not agree", op);
        goto out;
    }
    xa = malloc(sizeof(float) * (size_t)(T * r));
    d = malloc(sizeof(float) * (size_t)(T * out));
    if (!xa || !d) {
        rc = lt_fail(ctx->err, LT_ERR_MEMORY, "cpu linear: out of memory for the adapter path");
        goto out;
    }
    rc = lt_cpu_matmul(ctx, xa, xf, lo->a.data, LT_F32, T, in, r, 1); /* xa: [T, r] */
    if (rc == LT_OK)
        rc = lt_cpu_matmul(ctx, d, xa, lo->b.data, LT_F32, T, r, out, 1); /* d: [T, out] */
    if (rc == LT_OK) {
        float *yy = y.data;
        for (int64_t i = 0; i < T * out; i++)
            yy[i] += lo->scale * d[i];
    }
out:
    free(xa);
    free(d);
    free(xown);
    return rc;
}

/* ---- elementwise and row ops -------------------------------------------------------------------
 */

static lt_status cpu_embedding(lt_ctx *ctx, lt_tensor h, lt_tensor ids, const lt_weight *table,
                               float scale) {
    const char *op = "embedding";
    REQUIRE(is_f32(&h) && ids.dtype == LT_I32 && ids.data, op, "h must be fp32 and ids I32");
    REQUIRE(table && table->w.ndim == 2 && is_float(table->w.dtype), op,
            "table must be a 2-D float tensor");
    int64_t V = table->w.shape[0], H = table->w.shape[1], T = lt_tensor_numel(&ids);
    REQUIRE(last_dim(&h) == H && lt_tensor_numel(&h) == T * H, op, "h must be [T, H]");
    const int32_t *id = ids.data;
    float *out = h.data;
    for (int64_t t = 0; t < T; t++) {
        if (id[t] < 0 || id[t] >= V) {
            return lt_fail(ctx->err, LT_ERR_ARG,
                           "token id %d at position %lld is outside the vocabulary [0, %lld)",
                           id[t], (long long)t, (long long)V);
        }
        widen_row(out + t * H, table->w.data, table->w.dtype, id[t], H);
        for (int64_t i = 0; i < H; i++)
            out[t * H + i] *= scale;
    }
    return LT_OK;
}

static lt_status cpu_rmsnorm(lt_ctx *ctx, lt_tensor y, lt_tensor x, lt_tensor w, float eps) {
    const char *op = "rmsnorm";
    REQUIRE(is_f32(&x) && is_f32(&w) && y.data && (y.dtype == LT_F32 || y.dtype == LT_BF16), op,
            "x and w must be fp32, y fp32 or bf16");
    int64_t D = lt_tensor_numel(&w), N = lt_tensor_numel(&x) / (D ? D : 1);
    REQUIRE(D > 0 && lt_tensor_numel(&x) == N * D && lt_tensor_numel(&y) == N * D, op,
            "x, y must be [N, numel(w)]");
    const float *xs = x.data, *ws = w.data;
    for (int64_t n = 0; n < N; n++) {
        const float *xr = xs + n * D;
        double ss = 0;
        for (int64_t i = 0; i < D; i++)
            ss += (double)xr[i] * xr[i];
        float r = 1.0f / sqrtf((float)(ss / (double)D) + eps);
        for (int64_t i = 0; i < D; i++)
            cpu_store(&y, n * D + i, (xr[i] * r) * (1.0f + ws[i]));
    }
    return LT_OK;
}

lt_status cpu_rotate(lt_ctx *ctx, const char *op, lt_tensor x, lt_tensor pos, float theta,
                     float factor, float dir) {
    REQUIRE(is_f32(&x) && x.ndim == 3 && pos.dtype == LT_I32 && pos.data, op,
            "x must be fp32 [T, heads, hd], pos I32");
    int64_t T = x.shape[0], nh = x.shape[1], hd = x.shape[2], half = hd / 2;
    REQUIRE(lt_tensor_numel(&pos) == T && hd % 2 == 0, op, "pos must be [T] and hd even");
    float inv[512];
    REQUIRE(half <= 512, op, "head_dim above 1024");
    for (int64_t j = 0; j < half; j++)
        inv[j] = (1.0f / powf(theta, (float)(2 * j) / (float)hd)) / factor;
    const int32_t *p = pos.data;
    float *xs = x.data;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < half; j++) {
            float ang = (float)p[t] * inv[j];
            float c = cosf(ang), s = sinf(ang) * dir;
            for (int64_t h = 0; h < nh; h++) {
                float *v = xs + (t * nh + h) * hd;
                float a = v[j], b = v[j + half];
                v[j] = a * c - b * s;
                v[j + half] = b * c + a * s;
            }
        }
    }
    return LT_OK;
}

static lt_status cpu_rope(lt_ctx *ctx, lt_tensor x, lt_tensor pos, float theta, float factor) {
    return cpu_rotate(ctx, "rope", x, pos, theta, factor, 1.0f);
}

typedef struct attn_job {
    float *out;
    const float *q, *k, *v;
    const int32_t *qpos, *kpos;
    int64_t T, S, nh, nkv, hd;
    int window;
    float scale;
    int oom;
    const int32_t *span; /* attention_span: [T, 2] extra visible key positions; NULL = none */
} attn_job;

/* One query head over S keys (kpos/qp mask, backend.h's rule, plus the query's span [2] of
 * attention_span when not NULL); sc: [S] scratch. */
static void attn_head(const attn_job *j, const float *qv, float *o, const float *k, const float *v,
                      const int32_t *kpos, int32_t qp, int64_t kh, float *sc, const int32_t *span) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < j->S; s++) {
        int32_t kp = kpos[s];
        int in_span = span && kp >= 0 && kp >= span[0] && kp <= span[1];
        if (kp < 0 || (kp > qp && !in_span) || (j->window > 0 && qp - kp >= j->window)) {
            sc[s] = -INFINITY;
            continue;
        }
        sc[s] = dot_f32(qv, k + (s * j->nkv + kh) * j->hd, j->hd) * j->scale;
        if (sc[s] > mx) mx = sc[s];
    }
    memset(o, 0, sizeof(float) * (size_t)j->hd);
    if (mx == -INFINITY) return; /* nothing visible */
    double sum = 0;
    for (int64_t s = 0; s < j->S; s++) {
        float e = sc[s] == -INFINITY ? 0.0f : expf(sc[s] - mx);
        sc[s] = e;
        sum += e;
    }
    float inv = (float)(1.0 / sum);
    for (int64_t s = 0; s < j->S; s++) {
        if (sc[s] == 0.0f) continue;
        float p = sc[s] * inv;
        const float *vv = v + (s * j->nkv + kh) * j->hd;
        for (int64_t d = 0; d < j->hd; d++)
            o[d] += p * vv[d];
    }
}

static void attn_task(void *arg, int task, int n_tasks) {
    attn_job *j = arg;
    int64_t total = j->T * j->nh, per = (total + n_tasks - 1) / n_tasks;
    int64_t a = (int64_t)task * per, b = a + per < total ? a + per : total;
    if (a >= b) return;
    float *sc = malloc(sizeof(float) * (size_t)(j->S ? j->S : 1));
    if (!sc) {
        j->oom = 1;
        return;
    }
    int64_t group = j->nh / j->nkv;
    for (int64_t th = a; th < b; th++) {
        int64_t t = th / j->nh, h = th % j->nh;
        attn_head(j, j->q + (t * j->nh + h) * j->hd, j->out + (t * j->nh + h) * j->hd, j->k, j->v,
                  j->kpos, j->qpos[t], h / group, sc, j->span ? j->span + 2 * t : NULL);
    }
    free(sc);
}

/* attention_rows: query t (head h) over cache row rows[t] ([S, nkv, hd] at k + rows[t]*S*nkv*hd),
 * with the positions that row's ring layout implies in place of kpos. */
typedef struct attn_rows_job {
    attn_job a;
    const int32_t *rows;
} attn_rows_job;

static void attn_rows_task(void *arg, int task, int n_tasks) {
    attn_rows_job *rj = arg;
    attn_job *j = &rj->a;
    int64_t total = j->T * j->nh, per = (total + n_tasks - 1) / n_tasks;
    int64_t a = (int64_t)task * per, b = a + per < total ? a + per : total;
    if (a >= b) return;
    float *sc = malloc(sizeof(float) * (size_t)j->S);
    int32_t *kp = malloc(sizeof(int32_t) * (size_t)j->S);
    if (!sc || !kp) {
        free(sc);
        free(kp);
        j->oom = 1;
        return;
    }
    int64_t group = j->nh / j->nkv, row = j->S * j->nkv * j->hd;
    for (int64_t th = a; th < b; th++) {
        int64_t t = th / j->nh, h = th % j->nh;
        int32_t qp = j->qpos[t];
        for (int64_t s = 0; s < j->S; s++) {
            int64_t d = ((qp - s) % j->S + j->S) % j->S;
            kp[s] = d <= qp ? (int32_t)(qp - d) : -1;
        }
        attn_head(j, j->q + (t * j->nh + h) * j->hd, j->out + (t * j->nh + h) * j->hd,
                  j->k + rj->rows[t] * row, j->v + rj->rows[t] * row, kp, qp, h / group, sc, NULL);
    }
    free(sc);
    free(kp);
}

lt_status cpu_attention_dims(lt_ctx *ctx, const char *op, lt_tensor q, lt_tensor k, lt_tensor v,
                             lt_tensor qpos, lt_tensor kpos, cpu_attn_dims *d) {
    REQUIRE(is_f32(&q) && is_f32(&k) && is_f32(&v), op, "q, k, v must be fp32");
    REQUIRE(q.ndim == 3 && k.ndim == 3 && v.ndim == 3, op,
            "q must be [T, nh, hd], k and v [S, nkv, hd]");
    REQUIRE(qpos.dtype == LT_I32 && kpos.dtype == LT_I32 && qpos.data && kpos.data, op,
            "positions must be I32");
    int64_t T = q.shape[0], nh = q.shape[1], hd = q.shape[2], S = k.shape[0], nkv = k.shape[1];
    REQUIRE(k.shape[2] == hd && v.shape[0] == S && v.shape[1] == nkv && v.shape[2] == hd, op,
            "k, v shapes disagree");
    REQUIRE(nkv > 0 && nh % nkv == 0, op, "nh must be a multiple of nkv");
    REQUIRE(lt_tensor_numel(&qpos) == T && lt_tensor_numel(&kpos) == S, op,
            "qpos must be [T] and kpos [S]");
    *d = (cpu_attn_dims){T, nh, hd, S, nkv};
    return LT_OK;
}

static lt_status cpu_attention(lt_ctx *ctx, lt_tensor out, lt_tensor q, lt_tensor k, lt_tensor v,
                               lt_tensor qpos, lt_tensor kpos, int window, float scale) {
    const char *op = "attention";
    cpu_attn_dims d;
    lt_status rc = cpu_attention_dims(ctx, op, q, k, v, qpos, kpos, &d);
    if (rc != LT_OK) return rc;
    int64_t T = d.T, nh = d.nh, hd = d.hd, S = d.S, nkv = d.nkv;
    REQUIRE(is_f32(&out) && lt_tensor_numel(&out) == T * nh * hd, op,
            "out must be fp32 [T, nh*hd]");
    attn_job j = {out.data, q.data, k.data, v.data, qpos.data, kpos.data, T,   S,
                  nh,       nkv,    hd,     window, scale,     0,         NULL};
    int nt = pool_threads(ctx) * 4;
    if (nt > T * nh) nt = (int)(T * nh);
    pool_run(ctx_pool(ctx), attn_task, &j, nt);
    if (j.oom) {
        return lt_fail(ctx->err, LT_ERR_MEMORY, "cpu attention: out of memory");
    }
    return LT_OK;
}

static lt_status cpu_attention_span(lt_ctx *ctx, lt_tensor out, lt_tensor q, lt_tensor k,
                                    lt_tensor v, lt_tensor qpos, lt_tensor kpos, lt_tensor span,
                                    int window, float scale) {
    const char *op = "attention_span";
    cpu_attn_dims d;
    lt_status rc = cpu_attention_dims(ctx, op, q, k, v, qpos, kpos, &d);
    if (rc != LT_OK) return rc;
    REQUIRE(is_f32(&out) && lt_tensor_numel(&out) == d.T * d.nh * d.hd, op,
            "out must be fp32 [T, nh*hd]");
    REQUIRE(span.dtype == LT_I32 && span.data && lt_tensor_numel(&span) == 2 * d.T, op,
            "span must be I32 [T, 2]");
    attn_job j = {out.data, q.data, k.data, v.data, qpos.data, kpos.data, d.T,      d.S,
                  d.nh,     d.nkv,  d.hd,   window, scale,     0,         span.data};
    int nt = pool_threads(ctx) * 4;
    if (nt > d.T * d.nh) nt = (int)(d.T * d.nh);
    if (nt < 1) return LT_OK;
    pool_run(ctx_pool(ctx), attn_task, &j, nt);
    if (j.oom) return lt_fail(ctx->err, LT_ERR_MEMORY, "cpu attention_span: out of memory");
    return LT_OK;
}

static lt_status cpu_attention_rows(lt_ctx *ctx, lt_tensor out, lt_tensor q, lt_tensor k_new,
                                    lt_tensor v_new, lt_tensor kc, lt_tensor vc, lt_tensor rows,
                                    lt_tensor qpos, int window, float scale) {
    const char *op = "attention_rows";
    REQUIRE(is_f32(&q) && is_f32(&k_new) && is_f32(&v_new) && is_f32(&kc) && is_f32(&vc) &&
                is_f32(&out),
            op, "q, k_new, v_new, kc, vc and out must be fp32");
    REQUIRE(q.ndim == 3 && k_new.ndim == 3 && v_new.ndim == 3 && kc.ndim == 4 && vc.ndim == 4, op,
            "q must be [R, nh, hd], k_new and v_new [R, nkv, hd], kc and vc [N, S, nkv, hd]");
    int64_t R = q.shape[0], nh = q.shape[1], hd = q.shape[2], N = kc.shape[0], S = kc.shape[1],
            nkv = kc.shape[2];
    REQUIRE(kc.shape[3] == hd && !memcmp(kc.shape, vc.shape, sizeof(int64_t) * 4), op,
            "kc, vc must be [N, S, nkv, hd] alike");
    REQUIRE(k_new.shape[0] == R && k_new.shape[1] == nkv && k_new.shape[2] == hd &&
                !memcmp(k_new.shape, v_new.shape, sizeof(int64_t) * 3),
            op, "k_new, v_new must be [R, nkv, hd]");
    REQUIRE(nkv > 0 && nh % nkv == 0 && S > 0, op, "nh must be a multiple of nkv, S > 0");
    REQUIRE(lt_tensor_numel(&out) == R * nh * hd, op, "out must be [R, nh*hd]");
    REQUIRE(rows.dtype == LT_I32 && qpos.dtype == LT_I32 && rows.data && qpos.data &&
                lt_tensor_numel(&rows) == R && lt_tensor_numel(&qpos) == R,
            op, "rows and qpos must be I32 [R]");
    const int32_t *rw = rows.data, *qp = qpos.data;
    for (int64_t i = 0; i < R; i++)
        REQUIRE(rw[i] >= 0 && rw[i] < N && qp[i] >= 0, op, "a row is outside [0, N) or a qpos < 0");
    size_t tok = (size_t)(nkv * hd), row = (size_t)S * tok;
    for (int64_t i = 0; i < R; i++) { /* append each row's new K/V */
        size_t at = (size_t)rw[i] * row + (size_t)(qp[i] % S) * tok;
        memcpy((float *)kc.data + at, (const float *)k_new.data + (size_t)i * tok, tok * 4);
        memcpy((float *)vc.data + at, (const float *)v_new.data + (size_t)i * tok, tok * 4);
    }
    if (R == 0) return LT_OK;
    attn_rows_job j = {
        {out.data, q.data, kc.data, vc.data, qp, NULL, R, S, nh, nkv, hd, window, scale, 0, NULL},
        rw};
    int nt = pool_threads(ctx) * 4;
    if (nt > R * nh) nt = (int)(R * nh);
    pool_run(ctx_pool(ctx), attn_rows_task, &j, nt);
    if (j.a.oom) return lt_fail(ctx->err, LT_ERR_MEMORY, "cpu attention_rows: out of memory");
    return LT_OK;
}

static lt_status cpu_geglu(lt_ctx *ctx, lt_tensor y, lt_tensor gate, lt_tensor up) {
    const char *op = "geglu";
    REQUIRE(is_f32(&gate) && is_f32(&up) && y.data && (y.dtype == LT_F32 || y.dtype == LT_BF16), op,
            "gate, up must be fp32, y fp32 or bf16");
    int64_t n = lt_tensor_numel(&gate);
    REQUIRE(lt_tensor_numel(&up) == n && lt_tensor_numel(&y) == n, op,
            "y, gate, up must have one shape");
    const float k0 = 0.7978845608028654f; /* sqrt(2/pi) */
    const float *g = gate.data, *u = up.data;
    for (int64_t i = 0; i < n; i++) {
        float x = g[i];
        float gl = 0.5f * x * (1.0f + tanhf(k0 * (x + 0.044715f * x * x * x)));
        cpu_store(&y, i, gl * u[i]);
    }
    return LT_OK;
}

static lt_status cpu_add(lt_ctx *ctx, lt_tensor y, lt_tensor x) {
    const char *op = "add";
    REQUIRE(is_f32(&y) && is_f32(&x) && lt_tensor_numel(&y) == lt_tensor_numel(&x), op,
            "y, x must be fp32, one shape");
    float *a = y.data;
    const float *b = x.data;
    int64_t n = lt_tensor_numel(&y);
    for (int64_t i = 0; i < n; i++)
        a[i] += b[i];
    return LT_OK;
}

static lt_status cpu_convert(lt_ctx *ctx, void *dst, lt_dtype dt, const void *src, lt_dtype sdt,
                             int64_t n) {
    (void)ctx;
    lt_convert(dst, dt, src, sdt, n);
    return LT_OK;
}

/* Host memory: what the system reports as available (the planner's limit on the CPU). */
static void cpu_memory(lt_ctx *ctx, lt_mem_info *m) {
    (void)ctx;
    memset(m, 0, sizeof *m);
    m->where = "memory";
    long avail = sysconf(_SC_AVPHYS_PAGES), all = sysconf(_SC_PHYS_PAGES),
         psz = sysconf(_SC_PAGESIZE);
    if (avail > 0 && psz > 0) m->free = (size_t)avail * (size_t)psz;
    if (all > 0 && psz > 0) m->total = (size_t)all * (size_t)psz;
}

static void cpu_trim(lt_ctx *ctx) {
    (void)ctx; /* malloc'd buffers are freed as they go */
}

const lt_backend lt_backend_cpu = {
    .name = "cpu",
    .init = cpu_init,
    .shutdown = cpu_shutdown,
    .alloc = cpu_alloc,
    .release = cpu_release,
    .upload = cpu_memcpy,
    .download = cpu_memcpy,
    .copy = cpu_memcpy,
    .sync = cpu_sync,
    .host_alloc = cpu_host_alloc,
    .host_release = cpu_release,
    .stash_out = cpu_memcpy,
    .stash_in = cpu_memcpy,
    .stash_wait = cpu_stash_wait,
    .lend = cpu_lend,
    .bf16_activations = cpu_no_bf16_activations,
    .convert = cpu_convert,
    .memory = cpu_memory,
    .trim = cpu_trim,
    .embedding = cpu_embedding,
    .linear = cpu_linear,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .geglu = cpu_geglu,
    .add = cpu_add,
    .attention_rows = cpu_attention_rows,
    .sample_rows = cpu_sample_rows,
    /* backward ops and the training ops: backend_cpu_grad.c (grad.h) */
    .linear_backward = cpu_linear_backward,
    .rmsnorm_backward = cpu_rmsnorm_backward,
    .rope_backward = cpu_rope_backward,
    .attention_backward = cpu_attention_backward,
    .geglu_backward = cpu_geglu_backward,
    .embedding_backward = cpu_embedding_backward,
    .cross_entropy = cpu_cross_entropy,
    .adamw = cpu_adamw,
    .fill = cpu_fill,
    .scale = cpu_scale,
    .sumsq = cpu_sumsq,
    .dropout = cpu_dropout,
    /* the image tower (backend_cpu_vision.c) and the image block's attention */
    .layernorm = cpu_layernorm,
    .add_bias = cpu_add_bias,
    .gelu = cpu_gelu,
    .avg_pool = cpu_avg_pool,
    .attention_span = cpu_attention_span,
    .attention_span_backward = cpu_attention_span_backward,
    .tower_grad = &lt_cpu_tower_grad,
};

lt_status lt_ctx_init(lt_ctx *ctx, const lt_backend *be, int n_threads) {
    memset(ctx, 0, sizeof *ctx);
    ctx->be = be;
    ctx->n_threads = n_threads;
    return be->init ? be->init(ctx) : LT_OK;
}

void lt_ctx_shutdown(lt_ctx *ctx) {
    if (ctx->be && ctx->be->shutdown) ctx->be->shutdown(ctx);
    ctx->impl = NULL;
}

lt_status lt_linears_each(lt_ctx *ctx, int n, const lt_tensor *y, lt_tensor x,
                          const lt_weight *const *w) {
    lt_status rc = LT_OK;
    for (int k = 0; k < n && rc == LT_OK; k++)
        rc = ctx->be->linear(ctx, y[k], x, w[k]);
    return rc;
}

lt_status lt_rmsnorm_add_ops(lt_ctx *ctx, lt_tensor h, lt_tensor x, lt_tensor w, lt_tensor a,
                             lt_tensor w2, float eps) {
    const lt_backend *be = ctx->be;
    lt_status rc = be->rmsnorm(ctx, x, x, w, eps);
    if (rc == LT_OK) rc = be->add(ctx, h, x);
    if (rc == LT_OK && a.data) rc = be->rmsnorm(ctx, a, h, w2, eps);
    return rc;
}

lt_status lt_qk_norm_rope_ops(lt_ctx *ctx, lt_tensor q, lt_tensor k, lt_tensor qw, lt_tensor kw,
                              lt_tensor pos, float eps, float theta, float factor) {
    const lt_backend *be = ctx->be;
    if (q.ndim != 3 || k.ndim != 3)
        return lt_fail(ctx->err, LT_ERR_ARG, "qk_norm_rope: q and k must be [T, heads, hd]");
    lt_tensor qh = lt_tensor_2d(LT_F32, q.data, q.shape[0] * q.shape[1], q.shape[2]),
              kh = lt_tensor_2d(LT_F32, k.data, k.shape[0] * k.shape[1], k.shape[2]);
    lt_status rc = be->rmsnorm(ctx, qh, qh, qw, eps);
    if (rc == LT_OK) rc = be->rmsnorm(ctx, kh, kh, kw, eps);
    if (rc == LT_OK) rc = be->rope(ctx, q, pos, theta, factor);
    if (rc == LT_OK) rc = be->rope(ctx, k, pos, theta, factor);
    return rc;
}
