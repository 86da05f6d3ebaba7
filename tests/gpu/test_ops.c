/* test_ops.c — every op of the CUDA backend against the CPU reference, on fresh random inputs.
 *
 * For each op: random inputs (a new seed per run unless LATHE_TEST_SEED is set), the CPU backend's
 * result (backend_cpu.c / backend_cpu_grad.c: the specification) and the CUDA backend's, compared
 * by ‖gpu − cpu‖ / ‖cpu‖. Outputs on the GPU are poisoned with NaN first, so an element the kernel
 * forgot to write fails the check. Tolerances: 1e-5 when the op runs in fp32 (fp32 weights,
 * precision fp32), 1e-2 for bf16 and fp16. Also checks the fp16 rule (a matmul input is scaled by a
 * power of two before the cast, so it never becomes inf): inputs far beyond 65504 go through a
 * linear layer on fp16 weights and come out finite and right, where a plain cast to fp16 overflows.
 * attention and attention_backward also check which path ran (lt_cuda_flash_calls): the fused
 * kernels on the 16-bit paths at head dims 72 (the image tower's, bidirectional as it calls it),
 * 128 and 256, the chunked one otherwise; hd 72's split backward runs on a second ctx planned
 * for less shared memory (the one-pass kernel fits every device at hd 72).
 * attention_span_backward (image blocks) is checked on block layouts against the CPU's, and with
 * no block against attention_backward. attention_rows (decode over per-row ring caches) also
 * checks the caches after its append;
 * sample_rows must draw the CPU's ids exactly, one block a row (64 rows and more) and split over
 * several blocks a row (fewer rows, vocabularies from 4,099 to 262,144 ids).
 * Graphs (graph_begin .. graph_free): a recorded embedding, bf16 linear with an adapter (its
 * temporaries), rmsnorm, sample_rows and copy, replayed on new inputs, give the ops' own results
 * bit for bit; the recorded temporaries stay the graph's (buffers allocated after the recording
 * are not written by a replay) until graph_free gives them back; recorded attention takes the
 * positions of each replay (no key ranges from the recording's); what cannot be recorded
 * (upload, download, sync, alloc, sumsq, a RoPE table not made yet, a nested graph_begin or a
 * launch) and a forced failure (LATHE_CUDA_GRAPH_FAIL) end the recording with an error and leave
 * the stream working and no memory held; graph_begin is refused under the profiler and under
 * LATHE_CUDA_GRAPHS=0.
 * The image tower's ops and their backward
 * (lt_tower_grad_ops) are checked at the tower's widths, and its bidirectional attention at head
 * dim 72 over 1024 and 4096 patches (tolerances at test_tower_ops).
 * Prints TAP; needs a GPU (it prints a skip plan without one). Owns nothing else.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda/backend/cpu/grad.h"
#include "cuda/backend/cuda/backend_cuda.h"
#include "cuda/formats/bnb.h"
#include "tests/unit/tap.h"

static lt_ctx cpu, gpu;
static uint64_t rng_state;

static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float urand(void) {
    return (float)((rng_next() >> 11) * (1.0 / 9007199254740992.0));
}
static float nrand(void) { /* roughly normal */
    return (urand() + urand() + urand() + urand() - 2.0f) * 1.7320508f;
}

static float *rand_f32(int64_t n, float sd) {
    float *p = malloc(sizeof(float) * (size_t)(n ? n : 1));
    for (int64_t i = 0; i < n; i++)
        p[i] = nrand() * sd;
    return p;
}

/* Host copy of a float array in dtype dt (rounded the way the device will hold it). */
static void *as_dtype(const float *x, int64_t n, lt_dtype dt) {
    void *p = malloc((size_t)(n ? n : 1) * lt_dtype_size(dt));
    lt_convert(p, dt, x, LT_F32, n);
    return p;
}

static void *dev_put(const void *h, size_t bytes) {
    void *d = gpu.be->alloc(&gpu, bytes);
    if (d && h) gpu.be->upload(&gpu, d, h, bytes);
    return d;
}

/* A device fp32 buffer of n elements filled with NaN (poison). */
static float *dev_poison(int64_t n) {
    float *h = malloc(sizeof(float) * (size_t)(n ? n : 1));
    for (int64_t i = 0; i < n; i++)
        h[i] = NAN;
    float *d = dev_put(h, sizeof(float) * (size_t)(n ? n : 1));
    free(h);
    return d;
}

static float *dev_get(const void *d, int64_t n) {
    float *h = malloc(sizeof(float) * (size_t)(n ? n : 1));
    if (gpu.be->download(&gpu, h, d, sizeof(float) * (size_t)n) != LT_OK) {
        for (int64_t i = 0; i < n; i++)
            h[i] = NAN;
    }
    return h;
}

static double rel_err(const float *got, const float *ref, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(got[i]) && isfinite(ref[i])) return INFINITY;
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void check_close(const char *name, const float *got_dev, const float *ref, int64_t n,
                        double tol) {
    float *got = dev_get(got_dev, n);
    double e = rel_err(got, ref, n);
    char buf[256];
    snprintf(buf, sizeof buf, "%s: rel err %.2e <= %.0e", name, e, tol);
    ok(e <= tol, buf);
    free(got);
}

static double tol_for(lt_dtype dt) {
    return dt == LT_F32 ? 1e-5 : 1e-2;
}

static lt_tensor t2(lt_dtype dt, void *p, int64_t a, int64_t b) {
    return lt_tensor_2d(dt, p, a, b);
}
static lt_tensor t3(lt_dtype dt, void *p, int64_t a, int64_t b, int64_t c) {
    return lt_tensor_3d(dt, p, a, b, c);
}
static lt_tensor t1(lt_dtype dt, void *p, int64_t a) {
    return lt_tensor_1d(dt, p, a);
}

/* ---- forward + backward of linear with an adapter -------------------------------------------- */

static void test_linear(lt_dtype wdt, int with_lora, int64_t T, int64_t in, int64_t out,
                        float xsd) {
    char name[128];
    double tol = tol_for(wdt);
    /* a few rows on 16-bit weights take gemv.cu's fp32 arithmetic: as close as fp32 */
    double fwd_tol = wdt != LT_F32 && T <= 8 && in % 8 == 0 ? 1e-4 : tol;
    int64_t r = 8;
    float *x = rand_f32(T * in, xsd), *wf = rand_f32(out * in, 0.05f),
          *dy = rand_f32(T * out, 1.0f);
    void *wh = as_dtype(wf, out * in, wdt);
    float *a = rand_f32(r * in, 0.1f), *b = rand_f32(out * r, 0.1f);
    lt_lora lo_c = {0}, lo_g = {0};
    float *ga_c = calloc((size_t)(r * in), 4), *gb_c = calloc((size_t)(out * r), 4);
    float *gw_c = calloc((size_t)(out * in), 4);
    lo_c.a = t2(LT_F32, a, r, in);
    lo_c.b = t2(LT_F32, b, out, r);
    lo_c.grad_a = t2(LT_F32, ga_c, r, in);
    lo_c.grad_b = t2(LT_F32, gb_c, out, r);
    lo_c.scale = 2.0f;
    lo_c.enabled = 1;
    lt_weight w_c = {
        t2(wdt, wh, out, in), with_lora ? &lo_c : NULL, t2(LT_F32, gw_c, out, in), {0}};
    float *y_c = malloc(sizeof(float) * (size_t)(T * out)),
          *dx_c = malloc(sizeof(float) * (size_t)(T * in));
    lt_status rc = cpu.be->linear(&cpu, t2(LT_F32, y_c, T, out), t2(LT_F32, x, T, in), &w_c);
    if (rc == LT_OK)
        rc = cpu_linear_backward(&cpu, t2(LT_F32, dx_c, T, in), t2(LT_F32, dy, T, out),
                                 t2(LT_F32, x, T, in), &w_c);
    if (rc != LT_OK) diag("cpu linear: %s", cpu.err);

    float *xg = dev_put(x, (size_t)(T * in) * 4), *dyg = dev_put(dy, (size_t)(T * out) * 4);
    void *wg = dev_put(wh, (size_t)(out * in) * lt_dtype_size(wdt));
    lo_g = lo_c;
    lo_g.a = t2(LT_F32, dev_put(a, (size_t)(r * in) * 4), r, in);
    lo_g.b = t2(LT_F32, dev_put(b, (size_t)(out * r) * 4), out, r);
    lo_g.grad_a = t2(LT_F32, dev_put(NULL, (size_t)(r * in) * 4), r, in);
    lo_g.grad_b = t2(LT_F32, dev_put(NULL, (size_t)(out * r) * 4), out, r);
    lt_weight w_g = {t2(wdt, wg, out, in),
                     with_lora ? &lo_g : NULL,
                     t2(LT_F32, dev_put(NULL, (size_t)(out * in) * 4), out, in),
                     {0}};
    float *yg = dev_poison(T * out), *dxg = dev_poison(T * in);
    rc = gpu.be->linear(&gpu, t2(LT_F32, yg, T, out), t2(LT_F32, xg, T, in), &w_g);
    snprintf(name, sizeof name, "linear %s%s [%lld,%lld]x[%lld,%lld] runs", lt_dtype_user_name(wdt),
             with_lora ? "+lora" : "", (long long)T, (long long)in, (long long)out, (long long)in);
    if (!ok(rc == LT_OK, name)) diag("%s", gpu.err);
    snprintf(name, sizeof name, "linear %s%s y", lt_dtype_user_name(wdt), with_lora ? "+lora" : "");
    check_close(name, yg, y_c, T * out, fwd_tol);
    rc = gpu.be->linear_backward(&gpu, t2(LT_F32, dxg, T, in), t2(LT_F32, dyg, T, out),
                                 t2(LT_F32, xg, T, in), &w_g);
    if (rc != LT_OK) diag("%s", gpu.err);
    snprintf(name, sizeof name, "linear_backward %s%s dx", lt_dtype_user_name(wdt),
             with_lora ? "+lora" : "");
    check_close(name, dxg, dx_c, T * in, tol);
    snprintf(name, sizeof name, "linear_backward %s%s grad_w", lt_dtype_user_name(wdt),
             with_lora ? "+lora" : "");
    check_close(name, w_g.grad_w.data, gw_c, out * in, tol);
    if (with_lora) {
        snprintf(name, sizeof name, "linear_backward %s+lora grad_a", lt_dtype_user_name(wdt));
        check_close(name, lo_g.grad_a.data, ga_c, r * in, tol);
        snprintf(name, sizeof name, "linear_backward %s+lora grad_b", lt_dtype_user_name(wdt));
        check_close(name, lo_g.grad_b.data, gb_c, out * r, tol);
    }
    free(x), free(wf), free(dy), free(wh), free(a), free(b), free(ga_c), free(gb_c), free(gw_c),
        free(y_c), free(dx_c);
}

/* ---- NF4 / int8 weights (bitsandbytes' layouts) ------------------------------------------------
 */

/* A weight quantized on the host as bitsandbytes does (formats/bnb.c), and its device copy. */
typedef struct qweight {
    lt_weight host, dev;
    void *bufs[8];
    int n;
} qweight;

static void *keep(qweight *q, void *p) {
    q->bufs[q->n++] = p;
    return p;
}

static void qweight_make(qweight *q, lt_quant_kind kind, int nested, const float *wf, int64_t out,
                         int64_t in) {
    memset(q, 0, sizeof *q);
    int64_t n = out * in, bs = 64, nb = (n + bs - 1) / bs;
    lt_quant hq = {.kind = kind}, dq;
    lt_tensor hw;
    static float dyn[256];
    bnb_dynamic_map(dyn);
    if (kind == LT_QUANT_NF4) {
        uint8_t *packed = keep(q, malloc((size_t)(n + 1) / 2));
        float *absmax = keep(q, malloc(sizeof(float) * (size_t)nb));
        bnb_nf4_quantize(wf, n, (int)bs, packed, absmax);
        hw = t2(LT_U8, packed, out, in);
        hq.blocksize = (int)bs;
        hq.code = bnb_nf4_code;
        if (nested) {
            int64_t nb2 = (nb + 255) / 256;
            uint8_t *qa = keep(q, malloc((size_t)nb));
            float *a2 = keep(q, malloc(sizeof(float) * (size_t)nb2));
            bnb_double_quantize(absmax, nb, dyn, 256, qa, a2, &hq.offset);
            hq.qabsmax = qa, hq.absmax2 = a2, hq.code2 = dyn, hq.nested_blocksize = 256;
        } else {
            hq.absmax = absmax;
        }
        dq = hq;
        dq.code = dev_put(hq.code, 16 * 4);
        if (nested) {
            dq.qabsmax = dev_put(hq.qabsmax, (size_t)nb);
            dq.absmax2 = dev_put(hq.absmax2, (size_t)((nb + 255) / 256) * 4);
            dq.code2 = dev_put(hq.code2, 256 * 4);
        } else {
            dq.absmax = dev_put(hq.absmax, (size_t)nb * 4);
        }
        q->dev.w = t2(LT_U8, dev_put(packed, (size_t)(n + 1) / 2), out, in);
    } else {
        int8_t *w8 = keep(q, malloc((size_t)n));
        float *scb = keep(q, malloc(sizeof(float) * (size_t)out));
        bnb_int8_quantize(wf, out, in, w8, scb);
        hw = t2(LT_I8, w8, out, in);
        hq.scb = scb;
        dq = hq;
        dq.scb = dev_put(scb, (size_t)out * 4);
        q->dev.w = t2(LT_I8, dev_put(w8, (size_t)n), out, in);
    }
    q->host.w = hw;
    q->host.q = hq;
    q->dev.q = dq;
}

static void qweight_free(qweight *q) {
    for (int i = 0; i < q->n; i++)
        free(q->bufs[i]);
}

/* linear and linear_backward (dx, adapter grads) on an NF4 / int8 weight, the GPU decoding it in
 * precision prec, against the CPU's fp32 arithmetic on the same bytes. T <= 8 with NF4 takes the
 * GEMV path (fp32). And, in fp32 precision, the decode itself must equal the CPU's bit for bit:
 * an identity input makes y = Wᵀ exactly. */
static void test_quant_linear(lt_quant_kind kind, int nested, lt_dtype prec, int64_t T, int64_t in,
                              int64_t out) {
    char name[160], what[64];
    snprintf(what, sizeof what, "%s%s %s T=%lld", kind == LT_QUANT_NF4 ? "nf4" : "int8",
             nested ? "+dq" : "", lt_dtype_user_name(prec), (long long)T);
    lt_cuda_set_precision(&gpu, prec);
    double tol = prec == LT_F32 ? 1e-4 : 1e-2;
    int64_t r = 8;
    float *wf = rand_f32(out * in, 0.05f), *x = rand_f32(T * in, 1.0f),
          *dy = rand_f32(T * out, 1.0f);
    float *a = rand_f32(r * in, 0.1f), *b = rand_f32(out * r, 0.1f);
    qweight q;
    qweight_make(&q, kind, nested, wf, out, in);
    lt_lora lo_c = {0}, lo_g;
    float *ga_c = calloc((size_t)(r * in), 4), *gb_c = calloc((size_t)(out * r), 4);
    lo_c.a = t2(LT_F32, a, r, in);
    lo_c.b = t2(LT_F32, b, out, r);
    lo_c.grad_a = t2(LT_F32, ga_c, r, in);
    lo_c.grad_b = t2(LT_F32, gb_c, out, r);
    lo_c.scale = 2.0f;
    lo_c.enabled = 1;
    lo_g = lo_c;
    lo_g.a = t2(LT_F32, dev_put(a, (size_t)(r * in) * 4), r, in);
    lo_g.b = t2(LT_F32, dev_put(b, (size_t)(out * r) * 4), out, r);
    lo_g.grad_a = t2(LT_F32, dev_put(NULL, (size_t)(r * in) * 4), r, in);
    lo_g.grad_b = t2(LT_F32, dev_put(NULL, (size_t)(out * r) * 4), out, r);
    q.host.lora = &lo_c;
    q.dev.lora = &lo_g;
    float *y_c = malloc(sizeof(float) * (size_t)(T * out)),
          *dx_c = malloc(sizeof(float) * (size_t)(T * in));
    lt_status rc = cpu.be->linear(&cpu, t2(LT_F32, y_c, T, out), t2(LT_F32, x, T, in), &q.host);
    if (rc == LT_OK)
        rc = cpu_linear_backward(&cpu, t2(LT_F32, dx_c, T, in), t2(LT_F32, dy, T, out),
                                 t2(LT_F32, x, T, in), &q.host);
    if (rc != LT_OK) diag("cpu quantized linear: %s", cpu.err);
    float *xg = dev_put(x, (size_t)(T * in) * 4), *dyg = dev_put(dy, (size_t)(T * out) * 4);
    float *yg = dev_poison(T * out), *dxg = dev_poison(T * in);
    rc = gpu.be->linear(&gpu, t2(LT_F32, yg, T, out), t2(LT_F32, xg, T, in), &q.dev);
    snprintf(name, sizeof name, "linear %s+lora runs", what);
    if (!ok(rc == LT_OK, name)) diag("%s", gpu.err);
    snprintf(name, sizeof name, "linear %s+lora y", what);
    check_close(name, yg, y_c, T * out, tol);
    rc = gpu.be->linear_backward(&gpu, t2(LT_F32, dxg, T, in), t2(LT_F32, dyg, T, out),
                                 t2(LT_F32, xg, T, in), &q.dev);
    snprintf(name, sizeof name, "linear_backward %s+lora runs", what);
    if (!ok(rc == LT_OK, name)) diag("%s", gpu.err);
    snprintf(name, sizeof name, "linear_backward %s dx", what);
    check_close(name, dxg, dx_c, T * in, prec == LT_F32 ? 1e-4 : 1e-2);
    snprintf(name, sizeof name, "linear_backward %s grad_a", what);
    check_close(name, lo_g.grad_a.data, ga_c, r * in, prec == LT_F32 ? 1e-4 : 1e-2);
    snprintf(name, sizeof name, "linear_backward %s grad_b", what);
    check_close(name, lo_g.grad_b.data, gb_c, out * r, prec == LT_F32 ? 1e-4 : 1e-2);
    if (prec == LT_F32) { /* the decode, bit for bit: y = I · Wᵀ with the adapter off */
        float *eye = calloc((size_t)(in * in), 4),
              *ref = malloc(sizeof(float) * (size_t)(out * in));
        for (int64_t i = 0; i < in; i++)
            eye[i * in + i] = 1.0f;
        lt_weight_dequantize_rows(&q.host, 0, out, ref);
        float *eg = dev_put(eye, (size_t)(in * in) * 4), *wt = dev_poison(in * out);
        lo_g.enabled = 0;
        rc = gpu.be->linear(&gpu, t2(LT_F32, wt, in, out), t2(LT_F32, eg, in, in), &q.dev);
        float *got = dev_get(wt, in * out);
        int64_t bad = rc == LT_OK ? 0 : 1;
        for (int64_t o = 0; o < out && !bad; o++)
            for (int64_t i = 0; i < in; i++)
                if (memcmp(&got[i * out + o], &ref[o * in + i], 4) != 0) bad++;
        snprintf(name, sizeof name, "%s decodes bit for bit as the CPU reference", what);
        ok(bad == 0, name);
        free(eye), free(ref), free(got);
    }
    lt_cuda_set_precision(&gpu, lt_cuda_policy_dtype(&gpu));
    qweight_free(&q);
    free(wf), free(x), free(dy), free(a), free(b), free(ga_c), free(gb_c), free(y_c), free(dx_c);
}

/* ---- linears: several linears of one input (q, k and v; gate and up) ---------------------- */

/* CUDA's linears against the CPU's linear on each part, and bit for bit against CUDA's linear on
 * each (one launch for all must not change any sum): 16-bit weights with mixed adapters (r 8,
 * none, r 16) and outs that are not multiples of 4. With T > 8, or an NF4 part, the group takes
 * cu_linear on each part: the same numbers again. */
static void test_linears(lt_dtype wdt, int64_t T, int64_t in, int nf4_part) {
    enum { N = 3 };
    const int64_t outs[N] = {256, 66, 130};
    const int rs[N] = {8, 0, 16};
    char what[96], name[160];
    snprintf(what, sizeof what, "linears %s T=%lld in=%lld%s", lt_dtype_user_name(wdt),
             (long long)T, (long long)in, nf4_part ? " with an nf4 part" : "");
    lt_weight wc[N], wg[N];
    lt_lora lc[N], lg[N];
    qweight q;
    const lt_weight *pc[N], *pg[N];
    lt_tensor yg[N], y1[N];
    float *yc[N];
    float *x = rand_f32(T * in, 1.0f), *xg = dev_put(x, sizeof(float) * (size_t)(T * in));
    for (int k = 0; k < N; k++) {
        int64_t out = outs[k];
        float *wf = rand_f32(out * in, 0.05f);
        void *wh = as_dtype(wf, out * in, wdt);
        wc[k] = (lt_weight){t2(wdt, wh, out, in), NULL, {0}, {0}};
        wg[k] = (lt_weight){
            t2(wdt, dev_put(wh, (size_t)(out * in) * lt_dtype_size(wdt)), out, in), NULL, {0}, {0}};
        if (k == 1 && nf4_part) {
            qweight_make(&q, LT_QUANT_NF4, 0, wf, out, in);
            wc[k] = q.host;
            wg[k] = q.dev;
        }
        if (rs[k]) {
            int r = rs[k];
            float *a = rand_f32(r * in, 0.1f), *b = rand_f32(out * r, 0.1f);
            memset(&lc[k], 0, sizeof lc[k]);
            lc[k].a = t2(LT_F32, a, r, in);
            lc[k].b = t2(LT_F32, b, out, r);
            lc[k].scale = 2.0f;
            lc[k].enabled = 1;
            lg[k] = lc[k];
            lg[k].a = t2(LT_F32, dev_put(a, sizeof(float) * (size_t)(r * in)), r, in);
            lg[k].b = t2(LT_F32, dev_put(b, sizeof(float) * (size_t)(out * r)), out, r);
            wc[k].lora = &lc[k];
            wg[k].lora = &lg[k];
        }
        pc[k] = &wc[k];
        pg[k] = &wg[k];
        yc[k] = malloc(sizeof(float) * (size_t)(T * out));
        if (cpu.be->linear(&cpu, t2(LT_F32, yc[k], T, out), t2(LT_F32, x, T, in), pc[k]) != LT_OK)
            diag("cpu linear: %s", cpu.err);
        yg[k] = t2(LT_F32, dev_poison(T * out), T, out);
        y1[k] = t2(LT_F32, dev_poison(T * out), T, out);
        if (gpu.be->linear(&gpu, y1[k], t2(LT_F32, xg, T, in), pg[k]) != LT_OK)
            diag("cuda linear: %s", gpu.err);
        free(wf);
    }
    lt_status rc = gpu.be->linears(&gpu, N, yg, t2(LT_F32, xg, T, in), pg);
    snprintf(name, sizeof name, "%s runs", what);
    if (!ok(rc == LT_OK, name)) diag("%s", gpu.err);
    int same = 1;
    for (int k = 0; k < N; k++) {
        int64_t n = T * outs[k];
        double tol = nf4_part && k == 1 ? 1e-2 : wdt == LT_F32 ? 1e-5 : T <= 8 ? 1e-4 : 1e-2;
        snprintf(name, sizeof name, "%s: part %d (out %lld, r %d) y", what, k, (long long)outs[k],
                 rs[k]);
        check_close(name, yg[k].data, yc[k], n, tol);
        float *a = dev_get(yg[k].data, n), *b = dev_get(y1[k].data, n);
        same = same && !memcmp(a, b, sizeof(float) * (size_t)n);
        free(a);
        free(b);
        free(yc[k]);
    }
    snprintf(name, sizeof name, "%s: bit for bit linear's on each part", what);
    ok(same, name);
    free(x);
}

/* ---- norms, rope, geglu, add, embedding
 * ------------------------------------------------------------ */

static void test_rmsnorm(int64_t N, int64_t D) {
    char name[96];
    float *x = rand_f32(N * D, 3.0f), *w = rand_f32(D, 0.5f), *dy = rand_f32(N * D, 1.0f);
    float *y_c = malloc(sizeof(float) * (size_t)(N * D)),
          *dx_c = malloc(sizeof(float) * (size_t)(N * D));
    float *dw_c = calloc((size_t)D, 4);
    cpu.be->rmsnorm(&cpu, t2(LT_F32, y_c, N, D), t2(LT_F32, x, N, D), t1(LT_F32, w, D), 1e-6f);
    cpu_rmsnorm_backward(&cpu, t2(LT_F32, dx_c, N, D), t1(LT_F32, dw_c, D), t2(LT_F32, dy, N, D),
                         t2(LT_F32, x, N, D), t1(LT_F32, w, D), 1e-6f);
    float *xg = dev_put(x, (size_t)(N * D) * 4), *wg = dev_put(w, (size_t)D * 4),
          *dyg = dev_put(dy, (size_t)(N * D) * 4);
    float *yg = dev_poison(N * D), *dxg = dev_poison(N * D), *dwg = dev_put(NULL, (size_t)D * 4);
    gpu.be->rmsnorm(&gpu, t2(LT_F32, yg, N, D), t2(LT_F32, xg, N, D), t1(LT_F32, wg, D), 1e-6f);
    snprintf(name, sizeof name, "rmsnorm [%lld,%lld]", (long long)N, (long long)D);
    check_close(name, yg, y_c, N * D, 1e-5);
    gpu.be->rmsnorm_backward(&gpu, t2(LT_F32, dxg, N, D), t1(LT_F32, dwg, D), t2(LT_F32, dyg, N, D),
                             t2(LT_F32, xg, N, D), t1(LT_F32, wg, D), 1e-6f);
    snprintf(name, sizeof name, "rmsnorm_backward dx [%lld,%lld]", (long long)N, (long long)D);
    check_close(name, dxg, dx_c, N * D, 1e-5);
    snprintf(name, sizeof name, "rmsnorm_backward dw [%lld,%lld]", (long long)N, (long long)D);
    check_close(name, dwg, dw_c, D, 1e-5);
    /* in place (y aliases x), as the layer code may call it */
    gpu.be->rmsnorm(&gpu, t2(LT_F32, xg, N, D), t2(LT_F32, xg, N, D), t1(LT_F32, wg, D), 1e-6f);
    check_close("rmsnorm in place", xg, y_c, N * D, 1e-5);
    free(x), free(w), free(dy), free(y_c), free(dx_c), free(dw_c);
}

/* rmsnorm_add (x = norm(x, w); h += x; a = norm(h, w2)) against the CPU's three ops, and bit for
 * bit against CUDA's own three: one launch must not change a value. with_a 0: without the
 * second norm. */
static void test_rmsnorm_add(int64_t N, int64_t D, int with_a) {
    char name[128];
    int64_t n = N * D;
    float *x = rand_f32(n, 3.0f), *h = rand_f32(n, 10.0f), *w = rand_f32(D, 0.5f),
          *w2 = rand_f32(D, 0.5f);
    float *xc = malloc(sizeof(float) * (size_t)n), *hc = malloc(sizeof(float) * (size_t)n),
          *ac = malloc(sizeof(float) * (size_t)n);
    memcpy(xc, x, sizeof(float) * (size_t)n);
    memcpy(hc, h, sizeof(float) * (size_t)n);
    lt_rmsnorm_add_ops(&cpu, t2(LT_F32, hc, N, D), t2(LT_F32, xc, N, D), t1(LT_F32, w, D),
                       t2(LT_F32, ac, N, D), t1(LT_F32, w2, D), 1e-6f);
    float *wg = dev_put(w, (size_t)D * 4), *w2g = dev_put(w2, (size_t)D * 4);
    float *xg = dev_put(x, (size_t)n * 4), *hg = dev_put(h, (size_t)n * 4), *ag = dev_poison(n);
    float *x3 = dev_put(x, (size_t)n * 4), *h3 = dev_put(h, (size_t)n * 4), *a3 = dev_poison(n);
    lt_status rc =
        gpu.be->rmsnorm_add(&gpu, t2(LT_F32, hg, N, D), t2(LT_F32, xg, N, D), t1(LT_F32, wg, D),
                            with_a ? t2(LT_F32, ag, N, D) : (lt_tensor){0},
                            with_a ? t1(LT_F32, w2g, D) : (lt_tensor){0}, 1e-6f);
    snprintf(name, sizeof name, "rmsnorm_add [%lld,%lld]%s runs", (long long)N, (long long)D,
             with_a ? " with the next norm" : "");
    if (!ok(rc == LT_OK, name)) diag("%s", gpu.err);
    lt_rmsnorm_add_ops(&gpu, t2(LT_F32, h3, N, D), t2(LT_F32, x3, N, D), t1(LT_F32, wg, D),
                       t2(LT_F32, a3, N, D), t1(LT_F32, w2g, D), 1e-6f);
    snprintf(name, sizeof name, "rmsnorm_add [%lld,%lld]: x, h against the CPU", (long long)N,
             (long long)D);
    check_close(name, xg, xc, n, 1e-6);
    check_close(name, hg, hc, n, 1e-6);
    if (with_a) {
        snprintf(name, sizeof name, "rmsnorm_add [%lld,%lld]: a against the CPU", (long long)N,
                 (long long)D);
        check_close(name, ag, ac, n, 1e-6);
    }
    float *p[3] = {dev_get(xg, n), dev_get(hg, n), dev_get(ag, n)},
          *q[3] = {dev_get(x3, n), dev_get(h3, n), dev_get(a3, n)};
    int same = 1;
    for (int k = 0; k < (with_a ? 3 : 2); k++)
        same = same && !memcmp(p[k], q[k], sizeof(float) * (size_t)n);
    snprintf(name, sizeof name, "rmsnorm_add [%lld,%lld]: bit for bit rmsnorm, add, rmsnorm",
             (long long)N, (long long)D);
    ok(same, name);
    for (int k = 0; k < 3; k++)
        free(p[k]), free(q[k]);
    free(x), free(h), free(w), free(w2), free(xc), free(hc), free(ac);
}

static void test_rope(int64_t T, int64_t nh, int64_t hd, float theta, float factor, int maxpos) {
    char name[96];
    float *x = rand_f32(T * nh * hd, 1.0f);
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)T);
    for (int64_t t = 0; t < T; t++)
        pos[t] = (int32_t)(rng_next() % (uint64_t)maxpos);
    float *y_c = malloc(sizeof(float) * (size_t)(T * nh * hd));
    memcpy(y_c, x, sizeof(float) * (size_t)(T * nh * hd));
    cpu.be->rope(&cpu, t3(LT_F32, y_c, T, nh, hd), t1(LT_I32, pos, T), theta, factor);
    float *xg = dev_put(x, (size_t)(T * nh * hd) * 4);
    int32_t *pg = dev_put(pos, (size_t)T * 4);
    gpu.be->rope(&gpu, t3(LT_F32, xg, T, nh, hd), t1(LT_I32, pg, T), theta, factor);
    snprintf(name, sizeof name, "rope hd=%lld theta=%g factor=%g", (long long)hd, theta, factor);
    check_close(name, xg, y_c, T * nh * hd, 1e-5);
    /* backward = inverse rotation: CPU's backward on the same gradient */
    float *d_c = malloc(sizeof(float) * (size_t)(T * nh * hd));
    memcpy(d_c, x, sizeof(float) * (size_t)(T * nh * hd));
    cpu_rope_backward(&cpu, t3(LT_F32, d_c, T, nh, hd), t1(LT_I32, pos, T), theta, factor);
    float *dg = dev_put(x, (size_t)(T * nh * hd) * 4);
    gpu.be->rope_backward(&gpu, t3(LT_F32, dg, T, nh, hd), t1(LT_I32, pg, T), theta, factor);
    snprintf(name, sizeof name, "rope_backward hd=%lld", (long long)hd);
    check_close(name, dg, d_c, T * nh * hd, 1e-5);
    free(x), free(pos), free(y_c), free(d_c);
}

/* qk_norm_rope (q_norm, k_norm, then RoPE on q and k) against the CPU's four ops, and bit for
 * bit against CUDA's own four. */
static void test_qk_norm_rope(int64_t T, int64_t nh, int64_t nkv, int64_t hd, float theta,
                              float factor, int maxpos) {
    char name[160];
    int64_t nq = T * nh * hd, nk = T * nkv * hd;
    float *q = rand_f32(nq, 2.0f), *k = rand_f32(nk, 2.0f), *qw = rand_f32(hd, 0.5f),
          *kw = rand_f32(hd, 0.5f);
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)T);
    for (int64_t t = 0; t < T; t++)
        pos[t] = (int32_t)(rng_next() % (uint64_t)maxpos);
    float *qc = malloc(sizeof(float) * (size_t)nq), *kc = malloc(sizeof(float) * (size_t)nk);
    memcpy(qc, q, sizeof(float) * (size_t)nq);
    memcpy(kc, k, sizeof(float) * (size_t)nk);
    lt_qk_norm_rope_ops(&cpu, t3(LT_F32, qc, T, nh, hd), t3(LT_F32, kc, T, nkv, hd),
                        t1(LT_F32, qw, hd), t1(LT_F32, kw, hd), t1(LT_I32, pos, T), 1e-6f, theta,
                        factor);
    float *qwg = dev_put(qw, (size_t)hd * 4), *kwg = dev_put(kw, (size_t)hd * 4);
    int32_t *pg = dev_put(pos, (size_t)T * 4);
    float *qg = dev_put(q, (size_t)nq * 4), *kg = dev_put(k, (size_t)nk * 4);
    float *q4 = dev_put(q, (size_t)nq * 4), *k4 = dev_put(k, (size_t)nk * 4);
    /* the four ops first: they make the RoPE table the fused op reads */
    lt_qk_norm_rope_ops(&gpu, t3(LT_F32, q4, T, nh, hd), t3(LT_F32, k4, T, nkv, hd),
                        t1(LT_F32, qwg, hd), t1(LT_F32, kwg, hd), t1(LT_I32, pg, T), 1e-6f, theta,
                        factor);
    lt_status rc = gpu.be->qk_norm_rope(&gpu, t3(LT_F32, qg, T, nh, hd), t3(LT_F32, kg, T, nkv, hd),
                                        t1(LT_F32, qwg, hd), t1(LT_F32, kwg, hd), t1(LT_I32, pg, T),
                                        1e-6f, theta, factor);
    snprintf(name, sizeof name, "qk_norm_rope T=%lld heads %lld/%lld hd=%lld theta=%g runs",
             (long long)T, (long long)nh, (long long)nkv, (long long)hd, theta);
    if (!ok(rc == LT_OK, name)) diag("%s", gpu.err);
    snprintf(name, sizeof name, "qk_norm_rope hd=%lld: q, k against the CPU", (long long)hd);
    check_close(name, qg, qc, nq, 1e-5);
    check_close(name, kg, kc, nk, 1e-5);
    float *a = dev_get(qg, nq), *b = dev_get(q4, nq), *c = dev_get(kg, nk), *d = dev_get(k4, nk);
    snprintf(name, sizeof name, "qk_norm_rope hd=%lld: bit for bit rmsnorm twice, rope twice",
             (long long)hd);
    ok(!memcmp(a, b, sizeof(float) * (size_t)nq) && !memcmp(c, d, sizeof(float) * (size_t)nk),
       name);
    free(a), free(b), free(c), free(d);
    free(q), free(k), free(qw), free(kw), free(pos), free(qc), free(kc);
}

static void test_geglu_add(int64_t n) {
    float *g = rand_f32(n, 2.0f), *u = rand_f32(n, 1.0f), *dy = rand_f32(n, 1.0f);
    float *y_c = malloc(sizeof(float) * (size_t)n), *dg_c = malloc(sizeof(float) * (size_t)n),
          *du_c = malloc(sizeof(float) * (size_t)n);
    cpu.be->geglu(&cpu, t1(LT_F32, y_c, n), t1(LT_F32, g, n), t1(LT_F32, u, n));
    cpu_geglu_backward(&cpu, t1(LT_F32, dg_c, n), t1(LT_F32, du_c, n), t1(LT_F32, dy, n),
                       t1(LT_F32, g, n), t1(LT_F32, u, n));
    float *gg = dev_put(g, (size_t)n * 4), *ug = dev_put(u, (size_t)n * 4),
          *dyg = dev_put(dy, (size_t)n * 4);
    float *yg = dev_poison(n), *dgg = dev_poison(n), *dug = dev_poison(n);
    gpu.be->geglu(&gpu, t1(LT_F32, yg, n), t1(LT_F32, gg, n), t1(LT_F32, ug, n));
    check_close("geglu", yg, y_c, n, 1e-5);
    gpu.be->geglu_backward(&gpu, t1(LT_F32, dgg, n), t1(LT_F32, dug, n), t1(LT_F32, dyg, n),
                           t1(LT_F32, gg, n), t1(LT_F32, ug, n));
    check_close("geglu_backward dgate", dgg, dg_c, n, 1e-5);
    check_close("geglu_backward dup", dug, du_c, n, 1e-5);
    /* add: y += x */
    for (int64_t i = 0; i < n; i++)
        y_c[i] += g[i];
    gpu.be->add(&gpu, t1(LT_F32, yg, n), t1(LT_F32, gg, n));
    check_close("add", yg, y_c, n, 1e-6);
    free(g), free(u), free(dy), free(y_c), free(dg_c), free(du_c);
}

/* ---- matmul-only activations in bf16 (backend.h bf16_activations) ---------------------------- */

/* n bf16 values on the device, widened on the host. */
static float *dev_get_bf16(const void *d, int64_t n) {
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)(n ? n : 1));
    float *f = malloc(sizeof(float) * (size_t)(n ? n : 1));
    if (gpu.be->download(&gpu, h, d, sizeof(uint16_t) * (size_t)n) != LT_OK)
        memset(h, 0xff, sizeof(uint16_t) * (size_t)n); /* NaNs */
    lt_convert(f, LT_F32, h, LT_BF16, n);
    free(h);
    return f;
}

static int same_floats(const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0) return 0;
    return 1;
}

/* A norm or GeGLU writing bf16 rounds what it would write in fp32 (the CPU does the same), and
 * linear / linear_backward given that bf16 x give exactly what they give for the same values in
 * fp32 (the cast they skip is the rounding already done). */
static void test_bf16_activations(int64_t T, int64_t in, int64_t out) {
    char name[128];
    int64_t r = 8;
    /* rmsnorm and geglu with bf16 outputs vs the CPU's */
    float *x = rand_f32(T * in, 3.0f), *w = rand_f32(in, 0.5f), *u = rand_f32(T * in, 1.0f);
    uint16_t *yc = malloc(sizeof(uint16_t) * (size_t)(T * in));
    float *ycf = malloc(sizeof(float) * (size_t)(T * in));
    float *xg = dev_put(x, (size_t)(T * in) * 4), *wg = dev_put(w, (size_t)in * 4),
          *ug = dev_put(u, (size_t)(T * in) * 4);
    void *yg = dev_put(NULL, (size_t)(T * in) * 2);
    cpu.be->rmsnorm(&cpu, t2(LT_BF16, yc, T, in), t2(LT_F32, x, T, in), t1(LT_F32, w, in), 1e-6f);
    lt_status rc = gpu.be->rmsnorm(&gpu, t2(LT_BF16, yg, T, in), t2(LT_F32, xg, T, in),
                                   t1(LT_F32, wg, in), 1e-6f);
    lt_convert(ycf, LT_F32, yc, LT_BF16, T * in);
    float *got = dev_get_bf16(yg, T * in);
    double e = rel_err(got, ycf, T * in);
    snprintf(name, sizeof name, "rmsnorm to bf16 [%lld,%lld]: rel err %.2e <= 1e-2", (long long)T,
             (long long)in, e);
    ok(rc == LT_OK && e <= 1e-2, name);
    free(got);
    cpu.be->geglu(&cpu, t2(LT_BF16, yc, T, in), t2(LT_F32, x, T, in), t2(LT_F32, u, T, in));
    rc = gpu.be->geglu(&gpu, t2(LT_BF16, yg, T, in), t2(LT_F32, xg, T, in), t2(LT_F32, ug, T, in));
    lt_convert(ycf, LT_F32, yc, LT_BF16, T * in);
    got = dev_get_bf16(yg, T * in);
    e = rel_err(got, ycf, T * in);
    snprintf(name, sizeof name, "geglu to bf16 [%lld,%lld]: rel err %.2e <= 1e-2", (long long)T,
             (long long)in, e);
    ok(rc == LT_OK && e <= 1e-2, name);
    free(got);
    /* geglu_backward with bf16 dgate, dup vs the CPU's */
    {
        uint16_t *dgc = malloc(sizeof(uint16_t) * (size_t)(T * in)),
                 *duc = malloc(sizeof(uint16_t) * (size_t)(T * in));
        float *dyv = rand_f32(T * in, 1.0f), *dgcf = malloc(sizeof(float) * (size_t)(T * in)),
              *ducf = malloc(sizeof(float) * (size_t)(T * in));
        float *dyvg = dev_put(dyv, (size_t)(T * in) * 4);
        void *dgg = dev_put(NULL, (size_t)(T * in) * 2), *dug = dev_put(NULL, (size_t)(T * in) * 2);
        cpu_geglu_backward(&cpu, t2(LT_BF16, dgc, T, in), t2(LT_BF16, duc, T, in),
                           t2(LT_F32, dyv, T, in), t2(LT_F32, x, T, in), t2(LT_F32, u, T, in));
        rc = gpu.be->geglu_backward(&gpu, t2(LT_BF16, dgg, T, in), t2(LT_BF16, dug, T, in),
                                    t2(LT_F32, dyvg, T, in), t2(LT_F32, xg, T, in),
                                    t2(LT_F32, ug, T, in));
        lt_convert(dgcf, LT_F32, dgc, LT_BF16, T * in);
        lt_convert(ducf, LT_F32, duc, LT_BF16, T * in);
        float *g1 = dev_get_bf16(dgg, T * in), *g2 = dev_get_bf16(dug, T * in);
        double e1 = rel_err(g1, dgcf, T * in), e2 = rel_err(g2, ducf, T * in);
        snprintf(name, sizeof name, "geglu_backward to bf16: rel err %.2e, %.2e <= 1e-2", e1, e2);
        ok(rc == LT_OK && e1 <= 1e-2 && e2 <= 1e-2, name);
        free(dgc), free(duc), free(dyv), free(dgcf), free(ducf), free(g1), free(g2);
    }

    /* linear and linear_backward: bf16 x and dy vs the same values in fp32, bf16 weight, LoRA */
    uint16_t *xb = as_dtype(x, T * in, LT_BF16);
    float *xw = malloc(sizeof(float) * (size_t)(T * in)); /* the bf16 values, widened */
    lt_convert(xw, LT_F32, xb, LT_BF16, T * in);
    float *wf = rand_f32(out * in, 0.05f), *dy = rand_f32(T * out, 1.0f);
    uint16_t *dyb = as_dtype(dy, T * out, LT_BF16);
    lt_convert(dy, LT_F32, dyb, LT_BF16, T * out); /* dy: the bf16 values, widened */
    float *a = rand_f32(r * in, 0.1f), *b = rand_f32(out * r, 0.1f);
    void *wh = as_dtype(wf, out * in, LT_BF16);
    void *wgd = dev_put(wh, (size_t)(out * in) * 2);
    float *ag = dev_put(a, (size_t)(r * in) * 4), *bg = dev_put(b, (size_t)(out * r) * 4);
    float *dyg = dev_put(dy, (size_t)(T * out) * 4);
    void *dybg = dev_put(dyb, (size_t)(T * out) * 2);
    void *xbg = dev_put(xb, (size_t)(T * in) * 2);
    float *xwg = dev_put(xw, (size_t)(T * in) * 4);
    float *res[2][4]; /* per run: y, dx, grad_a, grad_b (host) */
    for (int run = 0; run < 2; run++) {
        lt_lora lo = {0};
        lo.a = t2(LT_F32, ag, r, in);
        lo.b = t2(LT_F32, bg, out, r);
        lo.grad_a = t2(LT_F32, dev_put(NULL, (size_t)(r * in) * 4), r, in);
        lo.grad_b = t2(LT_F32, dev_put(NULL, (size_t)(out * r) * 4), out, r);
        lo.scale = 2.0f;
        lo.enabled = 1;
        lt_weight wt = {t2(LT_BF16, wgd, out, in), &lo, {0}, {0}};
        lt_tensor xt = run ? t2(LT_F32, xwg, T, in) : t2(LT_BF16, xbg, T, in);
        lt_tensor dyt = run ? t2(LT_F32, dyg, T, out) : t2(LT_BF16, dybg, T, out);
        float *yo = dev_poison(T * out), *dxo = dev_poison(T * in);
        rc = gpu.be->linear(&gpu, t2(LT_F32, yo, T, out), xt, &wt);
        if (rc == LT_OK) rc = gpu.be->linear_backward(&gpu, t2(LT_F32, dxo, T, in), dyt, xt, &wt);
        if (rc != LT_OK) diag("%s", gpu.err);
        res[run][0] = dev_get(yo, T * out);
        res[run][1] = dev_get(dxo, T * in);
        res[run][2] = dev_get(lo.grad_a.data, r * in);
        res[run][3] = dev_get(lo.grad_b.data, out * r);
    }
    ok(same_floats(res[0][0], res[1][0], T * out) && same_floats(res[0][1], res[1][1], T * in) &&
           same_floats(res[0][2], res[1][2], r * in) && same_floats(res[0][3], res[1][3], out * r),
       "linear and linear_backward with a bf16 x and dy: the same bits as with their values in "
       "fp32");
    /* the CPU takes a bf16 x too: the same as its widened values */
    lt_lora loc = {0};
    loc.a = t2(LT_F32, a, r, in);
    loc.b = t2(LT_F32, b, out, r);
    loc.scale = 2.0f;
    loc.enabled = 1;
    lt_weight wc = {t2(LT_BF16, wh, out, in), &loc, {0}, {0}};
    float *y1 = malloc(sizeof(float) * (size_t)(T * out)),
          *y2 = malloc(sizeof(float) * (size_t)(T * out));
    lt_status r1 = cpu.be->linear(&cpu, t2(LT_F32, y1, T, out), t2(LT_BF16, xb, T, in), &wc);
    lt_status r2 = cpu.be->linear(&cpu, t2(LT_F32, y2, T, out), t2(LT_F32, xw, T, in), &wc);
    ok(r1 == LT_OK && r2 == LT_OK && same_floats(y1, y2, T * out),
       "cpu linear with a bf16 x: the same bits as with its values in fp32");
    for (int run = 0; run < 2; run++)
        for (int k = 0; k < 4; k++)
            free(res[run][k]);
    free(x), free(w), free(u), free(yc), free(ycf), free(xb), free(xw), free(wf), free(dy), free(a),
        free(b), free(wh), free(y1), free(y2), free(dyb);
}

static void test_embedding(lt_dtype dt) {
    char name[96];
    int64_t V = 3000, H = 96, T = 50;
    float *tf = rand_f32(V * H, 0.5f), *dh = rand_f32(T * H, 1.0f);
    void *th = as_dtype(tf, V * H, dt);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)T);
    for (int64_t t = 0; t < T; t++)
        ids[t] = (int32_t)(rng_next() % (uint64_t)V);
    ids[3] = ids[7]; /* a repeated id: the backward must add both rows */
    float *h_c = malloc(sizeof(float) * (size_t)(T * H)), *gw_c = calloc((size_t)(V * H), 4);
    lt_weight tab_c = {t2(dt, th, V, H), NULL, t2(LT_F32, gw_c, V, H), {0}};
    cpu.be->embedding(&cpu, t2(LT_F32, h_c, T, H), t1(LT_I32, ids, T), &tab_c, 33.9411f);
    cpu_embedding_backward(&cpu, &tab_c, t2(LT_F32, dh, T, H), t1(LT_I32, ids, T), 33.9411f);
    int32_t *idg = dev_put(ids, (size_t)T * 4);
    lt_weight tab_g = {t2(dt, dev_put(th, (size_t)(V * H) * lt_dtype_size(dt)), V, H),
                       NULL,
                       t2(LT_F32, dev_put(NULL, (size_t)(V * H) * 4), V, H),
                       {0}};
    float *hg = dev_poison(T * H), *dhg = dev_put(dh, (size_t)(T * H) * 4);
    lt_status rc =
        gpu.be->embedding(&gpu, t2(LT_F32, hg, T, H), t1(LT_I32, idg, T), &tab_g, 33.9411f);
    snprintf(name, sizeof name, "embedding %s", lt_dtype_user_name(dt));
    if (rc != LT_OK) diag("%s", gpu.err);
    check_close(name, hg, h_c, T * H, 1e-6);
    gpu.be->embedding_backward(&gpu, &tab_g, t2(LT_F32, dhg, T, H), t1(LT_I32, idg, T), 33.9411f);
    snprintf(name, sizeof name, "embedding_backward %s", lt_dtype_user_name(dt));
    check_close(name, tab_g.grad_w.data, gw_c, V * H, 1e-5);
    /* a bad id is an error value, and the session goes on */
    ids[0] = (int32_t)V;
    gpu.be->upload(&gpu, idg, ids, 4);
    rc = gpu.be->embedding(&gpu, t2(LT_F32, hg, T, H), t1(LT_I32, idg, T), &tab_g, 1.0f);
    ok(rc == LT_ERR_ARG && strstr(gpu.err, "outside the vocabulary"),
       "embedding: an id outside [0, V) is LT_ERR_ARG");
    free(tf), free(dh), free(th), free(ids), free(h_c), free(gw_c);
}

/* ---- attention ----------------------------------------------------------------------------------
 */

/* Whether the CUDA backend should run this call on the fused kernels (kernels/attention.cu): a
 * 16-bit path on a device with its tensor-core instructions, a head dim they are built for,
 * LATHE_CUDA_FLASH not 0. The tiles of every device lathe targets fit these head dims. */
static long flash_expected(lt_dtype prec, int64_t hd) {
    const char *f = getenv("LATHE_CUDA_FLASH");
    int cc = lt_cuda_compute_capability(&gpu);
    if ((f && strcmp(f, "0") == 0) || prec == LT_F32 || (prec == LT_BF16 ? cc < 80 : cc < 75))
        return 0;
    return hd == 72 || hd == 128 || hd == 256;
}

/* The path a call took, from the backend's count of fused calls since *before. */
static void check_path(const char *name, lt_dtype prec, int64_t hd, long *before) {
    long now = lt_cuda_flash_calls(&gpu), want = flash_expected(prec, hd);
    char buf[240];
    snprintf(buf, sizeof buf, "%s: %s", name,
             want ? "the fused kernels ran" : "the chunked path ran");
    ok(now - *before == want, buf);
    *before = now;
}

/* 1: test_attention also runs the backward for dq and dk alone and for dv alone (the key side's
 * dK-only and dV-only launches of the split backward) */
static int attn_subsets;

/* decode: 0 causal from position 0, 1 a ring cache (forward only), 2 two packed samples whose
 * positions restart, 3 bidirectional (every position 0: the image tower's calls). */
static void test_attention(lt_dtype prec, int64_t T, int64_t S, int64_t nh, int64_t nkv, int64_t hd,
                           int window, int decode) {
    char name[160];
    double tol = tol_for(prec);
    float scale = 1.0f / 16.0f;
    float *q = rand_f32(T * nh * hd, 1.0f), *k = rand_f32(S * nkv * hd, 1.0f),
          *v = rand_f32(S * nkv * hd, 1.0f);
    float *dout = rand_f32(T * nh * hd, 1.0f);
    int32_t *qp = malloc(sizeof(int32_t) * (size_t)T), *kp = malloc(sizeof(int32_t) * (size_t)S);
    if (decode == 3) { /* bidirectional: every key visible to every query */
        for (int64_t t = 0; t < T; t++)
            qp[t] = 0;
        for (int64_t s = 0; s < S; s++)
            kp[s] = 0;
    } else if (decode == 2) { /* two packed samples: positions restart (the mask decides) */
        for (int64_t t = 0; t < T; t++)
            qp[t] = (int32_t)(t % (T / 2));
        for (int64_t s = 0; s < S; s++)
            kp[s] = (int32_t)(s % (S / 2));
    } else if (decode) { /* a ring cache: some slots empty (-1), positions out of order */
        for (int64_t s = 0; s < S; s++)
            kp[s] = (s % 7 == 3) ? -1 : (int32_t)((s * 37) % S);
        for (int64_t t = 0; t < T; t++)
            qp[t] = (int32_t)(S - T + t);
    } else {
        for (int64_t t = 0; t < T; t++)
            qp[t] = (int32_t)t;
        for (int64_t s = 0; s < S; s++)
            kp[s] = (int32_t)s;
    }
    float *o_c = malloc(sizeof(float) * (size_t)(T * nh * hd));
    cpu.be->attention(&cpu, t2(LT_F32, o_c, T, nh * hd), t3(LT_F32, q, T, nh, hd),
                      t3(LT_F32, k, S, nkv, hd), t3(LT_F32, v, S, nkv, hd), t1(LT_I32, qp, T),
                      t1(LT_I32, kp, S), window, scale);
    lt_cuda_set_precision(&gpu, prec);
    float *qg = dev_put(q, (size_t)(T * nh * hd) * 4), *kg = dev_put(k, (size_t)(S * nkv * hd) * 4),
          *vg = dev_put(v, (size_t)(S * nkv * hd) * 4),
          *dog = dev_put(dout, (size_t)(T * nh * hd) * 4);
    int32_t *qpg = dev_put(qp, (size_t)T * 4), *kpg = dev_put(kp, (size_t)S * 4);
    float *og = dev_poison(T * nh * hd);
    long flash_before = lt_cuda_flash_calls(&gpu);
    lt_status rc = gpu.be->attention(&gpu, t2(LT_F32, og, T, nh * hd), t3(LT_F32, qg, T, nh, hd),
                                     t3(LT_F32, kg, S, nkv, hd), t3(LT_F32, vg, S, nkv, hd),
                                     t1(LT_I32, qpg, T), t1(LT_I32, kpg, S), window, scale);
    if (rc != LT_OK) diag("%s", gpu.err);
    snprintf(name, sizeof name, "attention %s T=%lld S=%lld nh=%lld nkv=%lld hd=%lld window=%d%s",
             lt_dtype_user_name(prec), (long long)T, (long long)S, (long long)nh, (long long)nkv,
             (long long)hd, window,
             decode == 1   ? " (cache)"
             : decode == 2 ? " (restarting positions)"
             : decode == 3 ? " (bidirectional)"
                           : "");
    check_close(name, og, o_c, T * nh * hd, tol);
    check_path(name, prec, hd, &flash_before);
    if (decode != 1) {
        float *dq_c = malloc(sizeof(float) * (size_t)(T * nh * hd)),
              *dk_c = malloc(sizeof(float) * (size_t)(S * nkv * hd)),
              *dv_c = malloc(sizeof(float) * (size_t)(S * nkv * hd));
        cpu_attention_backward(&cpu, t3(LT_F32, dq_c, T, nh, hd), t3(LT_F32, dk_c, S, nkv, hd),
                               t3(LT_F32, dv_c, S, nkv, hd), t2(LT_F32, dout, T, nh * hd),
                               t3(LT_F32, q, T, nh, hd), t3(LT_F32, k, S, nkv, hd),
                               t3(LT_F32, v, S, nkv, hd), t1(LT_I32, qp, T), t1(LT_I32, kp, S),
                               window, scale);
        float *dqg = dev_poison(T * nh * hd), *dkg = dev_poison(S * nkv * hd),
              *dvg = dev_poison(S * nkv * hd);
        rc = gpu.be->attention_backward(&gpu, t3(LT_F32, dqg, T, nh, hd),
                                        t3(LT_F32, dkg, S, nkv, hd), t3(LT_F32, dvg, S, nkv, hd),
                                        t2(LT_F32, dog, T, nh * hd), t3(LT_F32, qg, T, nh, hd),
                                        t3(LT_F32, kg, S, nkv, hd), t3(LT_F32, vg, S, nkv, hd),
                                        t1(LT_I32, qpg, T), t1(LT_I32, kpg, S), window, scale);
        if (rc != LT_OK) diag("%s", gpu.err);
        char n2[200];
        snprintf(n2, sizeof n2, "%s backward dq", name);
        check_close(n2, dqg, dq_c, T * nh * hd, tol);
        snprintf(n2, sizeof n2, "%s backward dk", name);
        check_close(n2, dkg, dk_c, S * nkv * hd, tol);
        snprintf(n2, sizeof n2, "%s backward dv", name);
        check_close(n2, dvg, dv_c, S * nkv * hd, tol);
        snprintf(n2, sizeof n2, "%s backward", name);
        check_path(n2, prec, hd, &flash_before);
        for (int sub = 0; attn_subsets && sub < 2; sub++) { /* dq, dk alone; then dv alone */
            lt_tensor none = t3(LT_F32, NULL, 0, 0, 0);
            float *dq2 = dev_poison(T * nh * hd), *dk2 = dev_poison(S * nkv * hd),
                  *dv2 = dev_poison(S * nkv * hd);
            rc = gpu.be->attention_backward(
                &gpu, sub ? none : t3(LT_F32, dq2, T, nh, hd),
                sub ? none : t3(LT_F32, dk2, S, nkv, hd), sub ? t3(LT_F32, dv2, S, nkv, hd) : none,
                t2(LT_F32, dog, T, nh * hd), t3(LT_F32, qg, T, nh, hd), t3(LT_F32, kg, S, nkv, hd),
                t3(LT_F32, vg, S, nkv, hd), t1(LT_I32, qpg, T), t1(LT_I32, kpg, S), window, scale);
            if (rc != LT_OK) diag("%s", gpu.err);
            if (sub) {
                snprintf(n2, sizeof n2, "%s backward dv alone", name);
                check_close(n2, dv2, dv_c, S * nkv * hd, tol);
            } else {
                snprintf(n2, sizeof n2, "%s backward dq, dk without dv: dq", name);
                check_close(n2, dq2, dq_c, T * nh * hd, tol);
                snprintf(n2, sizeof n2, "%s backward dq, dk without dv: dk", name);
                check_close(n2, dk2, dk_c, S * nkv * hd, tol);
            }
            gpu.be->release(&gpu, dq2), gpu.be->release(&gpu, dk2), gpu.be->release(&gpu, dv2);
        }
        free(dq_c), free(dk_c), free(dv_c);
    }
    free(q), free(k), free(v), free(dout), free(qp), free(kp), free(o_c);
}

/* hd 72's split backward kernels: the one-pass backward fits every device lathe targets at hd
 * 72 (64,520 B), so a second CUDA ctx planned for a device with less shared memory a block
 * (LATHE_CUDA_SMEM_OPTIN at its init: 48 KiB gives 64 x 64 split tiles, 40 KiB 32-row tiles)
 * runs them, standing in for gpu for the calls; then dq and dk without dv, and dv alone. */
static void test_attention_split72(const char *smem) {
    char was[64] = "";
    const char *w = getenv("LATHE_CUDA_SMEM_OPTIN");
    if (w) snprintf(was, sizeof was, "%s", w);
    setenv("LATHE_CUDA_SMEM_OPTIN", smem, 1);
    lt_ctx small;
    lt_status rc = lt_ctx_init(&small, &lt_backend_cuda, 0);
    if (w)
        setenv("LATHE_CUDA_SMEM_OPTIN", was, 1);
    else
        unsetenv("LATHE_CUDA_SMEM_OPTIN");
    char name[120];
    snprintf(name, sizeof name, "a second CUDA ctx with LATHE_CUDA_SMEM_OPTIN=%s", smem);
    ok(rc == LT_OK, name);
    if (rc != LT_OK) return;
    lt_ctx keep = gpu;
    gpu = small;
    attn_subsets = 1;
    diag("hd 72 with %s bytes of shared memory a block: the split backward", smem);
    test_attention(LT_BF16, 200, 200, 4, 2, 72, 0, 3);
    test_attention(LT_F16, 130, 130, 4, 1, 72, 50, 0);
    attn_subsets = 0;
    small = gpu;
    gpu = keep;
    lt_ctx_shutdown(&small);
}

/* attention_span_backward (image blocks, backend.h's attention_span rule) against the CPU's, on
 * one sample at positions 0..T-1 as training passes it (q, k, v at the same positions): up to
 * two image blocks {start, length} (length 0: none), queries outside a block with no span
 * (0, -1). The CPU's plain attention_backward must differ from its span result wherever there is
 * a block (so a span op that ignored the table fails), and with no block at all the CUDA span op
 * must give attention_backward's result (in fp32, the same chunked path: bit for bit).
 * unseen: the span table lies in an upload too large for the backend's host copies, so the key
 * ranges cannot read it and every chunk takes every key. */
static void test_attention_span(lt_dtype prec, int64_t T, int64_t nh, int64_t nkv, int64_t hd,
                                int window, int64_t b0, int64_t n0, int64_t b1, int64_t n1,
                                int unseen) {
    char name[200], n2[260];
    double tol = tol_for(prec);
    float scale = 1.0f / 16.0f;
    int64_t S = T, QN = T * nh * hd, KN = S * nkv * hd;
    float *q = rand_f32(QN, 1.0f), *k = rand_f32(KN, 1.0f), *v = rand_f32(KN, 1.0f),
          *dout = rand_f32(QN, 1.0f);
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)T);
    size_t span_n = (size_t)(2 * T) + (unseen ? 70000 : 0); /* > 256 KiB: no host copy kept */
    int32_t *span = calloc(span_n, sizeof(int32_t));
    for (int64_t t = 0; t < T; t++) {
        pos[t] = (int32_t)t;
        span[2 * t] = 0, span[2 * t + 1] = -1;
        if (t >= b0 && t < b0 + n0)
            span[2 * t] = (int32_t)b0, span[2 * t + 1] = (int32_t)(b0 + n0 - 1);
        if (t >= b1 && t < b1 + n1)
            span[2 * t] = (int32_t)b1, span[2 * t + 1] = (int32_t)(b1 + n1 - 1);
    }
    int blocks = n0 > 0 || n1 > 0;
    snprintf(name, sizeof name,
             "attention_span_backward %s T=%lld nh=%lld nkv=%lld hd=%lld window=%d blocks "
             "[%lld,+%lld) [%lld,+%lld)%s",
             lt_dtype_user_name(prec), (long long)T, (long long)nh, (long long)nkv, (long long)hd,
             window, (long long)b0, (long long)n0, (long long)b1, (long long)n1,
             unseen ? " (table without a host copy)" : "");
    float *dq_c = malloc(sizeof(float) * (size_t)QN), *dk_c = malloc(sizeof(float) * (size_t)KN),
          *dv_c = malloc(sizeof(float) * (size_t)KN);
    float *pq = malloc(sizeof(float) * (size_t)QN), *pk = malloc(sizeof(float) * (size_t)KN),
          *pv = malloc(sizeof(float) * (size_t)KN);
    lt_status rc = cpu_attention_span_backward(
        &cpu, t3(LT_F32, dq_c, T, nh, hd), t3(LT_F32, dk_c, S, nkv, hd),
        t3(LT_F32, dv_c, S, nkv, hd), t2(LT_F32, dout, T, nh * hd), t3(LT_F32, q, T, nh, hd),
        t3(LT_F32, k, S, nkv, hd), t3(LT_F32, v, S, nkv, hd), t1(LT_I32, pos, T),
        t1(LT_I32, pos, S), t2(LT_I32, span, T, 2), window, scale);
    if (rc != LT_OK) diag("cpu: %s", cpu.err);
    cpu_attention_backward(
        &cpu, t3(LT_F32, pq, T, nh, hd), t3(LT_F32, pk, S, nkv, hd), t3(LT_F32, pv, S, nkv, hd),
        t2(LT_F32, dout, T, nh * hd), t3(LT_F32, q, T, nh, hd), t3(LT_F32, k, S, nkv, hd),
        t3(LT_F32, v, S, nkv, hd), t1(LT_I32, pos, T), t1(LT_I32, pos, S), window, scale);
    if (blocks) { /* the layout matters: the reference is not plain causal attention */
        double e = rel_err(pq, dq_c, QN) + rel_err(pk, dk_c, KN) + rel_err(pv, dv_c, KN);
        snprintf(n2, sizeof n2, "%s: the blocks change the CPU's gradients (%.2e)", name, e);
        ok(e > 1e-2, n2);
    }
    lt_cuda_set_precision(&gpu, prec);
    float *qg = dev_put(q, (size_t)QN * 4), *kg = dev_put(k, (size_t)KN * 4),
          *vg = dev_put(v, (size_t)KN * 4), *dog = dev_put(dout, (size_t)QN * 4);
    int32_t *pg = dev_put(pos, (size_t)T * 4), *sg = dev_put(span, span_n * 4);
    float *dqg = dev_poison(QN), *dkg = dev_poison(KN), *dvg = dev_poison(KN);
    rc = gpu.be->attention_span_backward(
        &gpu, t3(LT_F32, dqg, T, nh, hd), t3(LT_F32, dkg, S, nkv, hd), t3(LT_F32, dvg, S, nkv, hd),
        t2(LT_F32, dog, T, nh * hd), t3(LT_F32, qg, T, nh, hd), t3(LT_F32, kg, S, nkv, hd),
        t3(LT_F32, vg, S, nkv, hd), t1(LT_I32, pg, T), t1(LT_I32, pg, S), t2(LT_I32, sg, T, 2),
        window, scale);
    if (rc != LT_OK) diag("%s", gpu.err);
    snprintf(n2, sizeof n2, "%s runs", name);
    ok(rc == LT_OK, n2);
    snprintf(n2, sizeof n2, "%s dq", name);
    check_close(n2, dqg, dq_c, QN, tol);
    snprintf(n2, sizeof n2, "%s dk", name);
    check_close(n2, dkg, dk_c, KN, tol);
    snprintf(n2, sizeof n2, "%s dv", name);
    check_close(n2, dvg, dv_c, KN, tol);
    if (!blocks) { /* no block anywhere: attention_backward's result */
        float *aq = dev_poison(QN), *ak = dev_poison(KN), *av = dev_poison(KN);
        rc = gpu.be->attention_backward(
            &gpu, t3(LT_F32, aq, T, nh, hd), t3(LT_F32, ak, S, nkv, hd), t3(LT_F32, av, S, nkv, hd),
            t2(LT_F32, dog, T, nh * hd), t3(LT_F32, qg, T, nh, hd), t3(LT_F32, kg, S, nkv, hd),
            t3(LT_F32, vg, S, nkv, hd), t1(LT_I32, pg, T), t1(LT_I32, pg, S), window, scale);
        if (rc != LT_OK) diag("%s", gpu.err);
        float *g[3] = {dev_get(dqg, QN), dev_get(dkg, KN), dev_get(dvg, KN)},
              *a[3] = {dev_get(aq, QN), dev_get(ak, KN), dev_get(av, KN)};
        int64_t n[3] = {QN, KN, KN};
        int same = rc == LT_OK;
        double e = 0;
        for (int i = 0; i < 3; i++) {
            same = same && same_floats(g[i], a[i], n[i]);
            double ei = rel_err(g[i], a[i], n[i]);
            e = ei > e ? ei : e;
        }
        if (prec == LT_F32) {
            snprintf(n2, sizeof n2, "%s = attention_backward bit for bit (fp32)", name);
            ok(same, n2);
        } else {
            snprintf(n2, sizeof n2, "%s = attention_backward: rel err %.2e <= %.0e", name, e, tol);
            ok(rc == LT_OK && e <= tol, n2);
        }
        for (int i = 0; i < 3; i++)
            free(g[i]), free(a[i]);
        gpu.be->release(&gpu, aq), gpu.be->release(&gpu, ak), gpu.be->release(&gpu, av);
    }
    { /* the table's checks, the CPU's: I32 [T, 2] */
        rc = gpu.be->attention_span_backward(
            &gpu, t3(LT_F32, dqg, T, nh, hd), t3(LT_F32, dkg, S, nkv, hd),
            t3(LT_F32, dvg, S, nkv, hd), t2(LT_F32, dog, T, nh * hd), t3(LT_F32, qg, T, nh, hd),
            t3(LT_F32, kg, S, nkv, hd), t3(LT_F32, vg, S, nkv, hd), t1(LT_I32, pg, T),
            t1(LT_I32, pg, S), t2(LT_I32, sg, T - 1, 2), window, scale);
        lt_status rc2 = gpu.be->attention_span_backward(
            &gpu, t3(LT_F32, dqg, T, nh, hd), t3(LT_F32, dkg, S, nkv, hd),
            t3(LT_F32, dvg, S, nkv, hd), t2(LT_F32, dog, T, nh * hd), t3(LT_F32, qg, T, nh, hd),
            t3(LT_F32, kg, S, nkv, hd), t3(LT_F32, vg, S, nkv, hd), t1(LT_I32, pg, T),
            t1(LT_I32, pg, S), t2(LT_F32, sg, T, 2), window, scale);
        snprintf(n2, sizeof n2, "%s: a span table not I32 [T, 2] is LT_ERR_ARG", name);
        ok(rc == LT_ERR_ARG && rc2 == LT_ERR_ARG && strstr(gpu.err, "span must be I32 [T, 2]"), n2);
    }
    gpu.be->release(&gpu, qg), gpu.be->release(&gpu, kg), gpu.be->release(&gpu, vg);
    gpu.be->release(&gpu, dog), gpu.be->release(&gpu, pg), gpu.be->release(&gpu, sg);
    gpu.be->release(&gpu, dqg), gpu.be->release(&gpu, dkg), gpu.be->release(&gpu, dvg);
    free(q), free(k), free(v), free(dout), free(pos), free(span);
    free(dq_c), free(dk_c), free(dv_c), free(pq), free(pk), free(pv);
}

/* attention_rows (decode over per-row ring caches): R queries over R distinct rows of N caches
 * of S slots, positions drawn in [0, 2S) so some rings have wrapped; the output and both caches
 * after the append. */
static void test_attention_rows(int64_t N, int64_t S, int64_t R, int64_t nh, int64_t nkv,
                                int64_t hd, int window) {
    char name[160];
    float scale = 1.0f / 16.0f;
    int64_t cn = N * S * nkv * hd;
    float *q = rand_f32(R * nh * hd, 1.0f), *kn = rand_f32(R * nkv * hd, 1.0f),
          *vn = rand_f32(R * nkv * hd, 1.0f), *kc = rand_f32(cn, 1.0f), *vc = rand_f32(cn, 1.0f);
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)R), *qp = malloc(sizeof(int32_t) * (size_t)R);
    for (int64_t i = 0; i < R; i++) {
        rows[i] = (int32_t)((i * 7 + 3) % N); /* distinct while N does not divide 7 */
        qp[i] = (int32_t)(rng_next() % (uint64_t)(2 * S));
    }
    float *kg = dev_put(kc, (size_t)cn * 4), *vg = dev_put(vc, (size_t)cn * 4);
    float *qg = dev_put(q, (size_t)(R * nh * hd) * 4),
          *kng = dev_put(kn, (size_t)(R * nkv * hd) * 4),
          *vng = dev_put(vn, (size_t)(R * nkv * hd) * 4);
    int32_t *rg = dev_put(rows, (size_t)R * 4), *qpg = dev_put(qp, (size_t)R * 4);
    float *o_c = malloc(sizeof(float) * (size_t)(R * nh * hd)), *og = dev_poison(R * nh * hd);
    lt_status rc = cpu.be->attention_rows(
        &cpu, t2(LT_F32, o_c, R, nh * hd), t3(LT_F32, q, R, nh, hd), t3(LT_F32, kn, R, nkv, hd),
        t3(LT_F32, vn, R, nkv, hd), lt_tensor_4d(LT_F32, kc, N, S, nkv, hd),
        lt_tensor_4d(LT_F32, vc, N, S, nkv, hd), t1(LT_I32, rows, R), t1(LT_I32, qp, R), window,
        scale);
    if (rc != LT_OK) diag("%s", cpu.err);
    rc = gpu.be->attention_rows(&gpu, t2(LT_F32, og, R, nh * hd), t3(LT_F32, qg, R, nh, hd),
                                t3(LT_F32, kng, R, nkv, hd), t3(LT_F32, vng, R, nkv, hd),
                                lt_tensor_4d(LT_F32, kg, N, S, nkv, hd),
                                lt_tensor_4d(LT_F32, vg, N, S, nkv, hd), t1(LT_I32, rg, R),
                                t1(LT_I32, qpg, R), window, scale);
    if (rc != LT_OK) diag("%s", gpu.err);
    snprintf(name, sizeof name,
             "attention_rows N=%lld S=%lld R=%lld nh=%lld nkv=%lld hd=%lld window=%d", (long long)N,
             (long long)S, (long long)R, (long long)nh, (long long)nkv, (long long)hd, window);
    check_close(name, og, o_c, R * nh * hd, 1e-5);
    char n2[200];
    snprintf(n2, sizeof n2, "%s: K cache after the append", name);
    check_close(n2, kg, kc, cn, 0);
    snprintf(n2, sizeof n2, "%s: V cache after the append", name);
    check_close(n2, vg, vc, cn, 0);
    void *dev[] = {kg, vg, qg, kng, vng, rg, qpg, og};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        gpu.be->release(&gpu, dev[i]);
    free(q), free(kn), free(vn), free(kc), free(vc), free(rows), free(qp), free(o_c);
}

/* sample_rows: the GPU's draws equal the CPU reference's, id for id, from the same logits and
 * bits, for each of the options (a grid of values, so ties at every threshold; some -inf). */
static void test_sample_rows(int64_t R, int64_t V) {
    float *lg = malloc(sizeof(float) * (size_t)(R * V));
    for (int64_t i = 0; i < R * V; i++)
        lg[i] = i % 1009 == 3 ? -INFINITY : (float)(int)(nrand() * 24.0f) / 8.0f;
    int32_t *bits = malloc(sizeof(int32_t) * (size_t)R),
            *ids_c = malloc(sizeof(int32_t) * (size_t)R),
            *ids_g = malloc(sizeof(int32_t) * (size_t)R);
    float *lg_d = dev_put(lg, sizeof(float) * (size_t)(R * V));
    int32_t *bits_d = dev_put(NULL, sizeof(int32_t) * (size_t)R),
            *ids_d = dev_put(NULL, sizeof(int32_t) * (size_t)R);
    lt_sample_opts cases[] = {
        {0, 0, 1, 0},    {1, 0, 1, 0},     {1, 64, 1, 0},        {1 / 0.7f, 64, 0.95f, 0},
        {1, 0, 0.9f, 0}, {1, 0, 1, 0.05f}, {0.5f, 5, 0.5f, 0.2f}};
    int mismatch = 0, failed = 0;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        for (int64_t r = 0; r < R; r++)
            bits[r] = (int32_t)(rng_next() >> 32);
        gpu.be->upload(&gpu, bits_d, bits, sizeof(int32_t) * (size_t)R);
        lt_status a = cpu.be->sample_rows(&cpu, t1(LT_I32, ids_c, R), t2(LT_F32, lg, R, V),
                                          t1(LT_I32, bits, R), &cases[c]);
        lt_status b = gpu.be->sample_rows(&gpu, t1(LT_I32, ids_d, R), t2(LT_F32, lg_d, R, V),
                                          t1(LT_I32, bits_d, R), &cases[c]);
        if (a != LT_OK || b != LT_OK ||
            gpu.be->download(&gpu, ids_g, ids_d, sizeof(int32_t) * (size_t)R) != LT_OK) {
            diag("sample_rows: %s %s", cpu.err, gpu.err);
            failed = 1;
            continue;
        }
        for (int64_t r = 0; r < R; r++)
            if (ids_c[r] != ids_g[r]) {
                if (mismatch++ < 3)
                    diag("case %zu row %lld: cpu %d, gpu %d", c, (long long)r, ids_c[r], ids_g[r]);
            }
    }
    char name[120];
    snprintf(name, sizeof name,
             "sample_rows R=%lld V=%lld: the GPU draws the CPU's ids (%d differ)", (long long)R,
             (long long)V, mismatch);
    ok(!failed && mismatch == 0, name);
    gpu.be->release(&gpu, lg_d);
    gpu.be->release(&gpu, bits_d);
    gpu.be->release(&gpu, ids_d);
    free(lg), free(bits), free(ids_c), free(ids_g);
}

/* ---- fused cross-entropy, AdamW, the trainer's extra ops
 * ------------------------------------------ */

/* weighted: row weights of both signs, zeros and two magnitudes (GRPO's are ~1e-3), a logit
 * scale of 1/0.7 and the per-row log-probabilities; else the plain SFT call. */
static void test_cross_entropy(lt_dtype dt, int64_t T, int64_t V, int64_t H, int weighted) {
    char name[160];
    double tol = tol_for(dt);
    const char *tag = weighted ? " weighted" : "";
    float *h = rand_f32(T * H, 1.0f), *wf = rand_f32(V * H, 0.2f);
    void *wh = as_dtype(wf, V * H, dt);
    int32_t *tg = malloc(sizeof(int32_t) * (size_t)T);
    float *rw = malloc(sizeof(float) * (size_t)T), *lp_c = malloc(sizeof(float) * (size_t)T);
    for (int64_t t = 0; t < T; t++) {
        tg[t] = (t % 5 == 2) ? -100 : (int32_t)(rng_next() % (uint64_t)V);
        rw[t] = t % 3 == 0 ? 0.0f : ((float)(t % 4) - 1.5f) * (t % 2 ? 1e-3f : 1.0f);
    }
    float scale = weighted ? 1.0f / 0.7f : 1.0f;
    float *dh_c = malloc(sizeof(float) * (size_t)(T * H)), *gw_c = calloc((size_t)(V * H), 4);
    lt_weight head_c = {t2(dt, wh, V, H), NULL, t2(LT_F32, gw_c, V, H), {0}};
    double loss_c = 0, loss_g = 0;
    float gs = 1.0f / (float)T;
    lt_tensor nov = t1(LT_F32, NULL, T);
    lt_status rc = cpu_cross_entropy(&cpu, &loss_c, t2(LT_F32, dh_c, T, H), t2(LT_F32, h, T, H),
                                     &head_c, t1(LT_I32, tg, T), weighted ? t1(LT_F32, rw, T) : nov,
                                     t1(LT_F32, lp_c, T), scale, gs);
    if (rc != LT_OK) diag("cpu: %s", cpu.err);
    double mag = 0; /* Σ |w|·CE: the loss's scale when weights of both signs cancel */
    for (int64_t t = 0; t < T; t++)
        mag += (weighted ? fabs((double)rw[t]) : 1.0) * fabs((double)lp_c[t]);
    float *hg = dev_put(h, (size_t)(T * H) * 4), *dhg = dev_poison(T * H);
    float *rwg = dev_put(rw, (size_t)T * 4), *lpg = dev_poison(T);
    int32_t *tgg = dev_put(tg, (size_t)T * 4);
    lt_weight head_g = {t2(dt, dev_put(wh, (size_t)(V * H) * lt_dtype_size(dt)), V, H),
                        NULL,
                        t2(LT_F32, dev_put(NULL, (size_t)(V * H) * 4), V, H),
                        {0}};
    lt_tensor rwt = weighted ? t1(LT_F32, rwg, T) : nov;
    rc = gpu.be->cross_entropy(&gpu, &loss_g, t2(LT_F32, dhg, T, H), t2(LT_F32, hg, T, H), &head_g,
                               t1(LT_I32, tgg, T), rwt, t1(LT_F32, lpg, T), scale, gs);
    if (rc != LT_OK) diag("%s", gpu.err);
    snprintf(name, sizeof name, "cross_entropy%s %s T=%lld V=%lld loss %.6f vs %.6f", tag,
             lt_dtype_user_name(dt), (long long)T, (long long)V, loss_g, loss_c);
    ok(fabs(loss_g - loss_c) <= tol * mag + 1e-6, name);
    snprintf(name, sizeof name, "cross_entropy%s %s dh", tag, lt_dtype_user_name(dt));
    check_close(name, dhg, dh_c, T * H, tol);
    snprintf(name, sizeof name, "cross_entropy%s %s head grad_w", tag, lt_dtype_user_name(dt));
    check_close(name, head_g.grad_w.data, gw_c, V * H, tol);
    snprintf(name, sizeof name, "cross_entropy%s %s row_logp", tag, lt_dtype_user_name(dt));
    check_close(name, lpg, lp_c, T, tol);
    /* loss only: no gradient touched */
    double l2 = 0;
    rc = gpu.be->cross_entropy(&gpu, &l2, t2(LT_F32, NULL, T, H), t2(LT_F32, hg, T, H), &head_g,
                               t1(LT_I32, tgg, T), rwt, nov, scale, gs);
    ok(rc == LT_OK && fabs(l2 - loss_g) <= 1e-6 * mag,
       "cross_entropy loss-only call gives the same loss");
    tg[1] = (int32_t)V;
    gpu.be->upload(&gpu, tgg, tg, (size_t)T * 4);
    rc = gpu.be->cross_entropy(&gpu, &l2, t2(LT_F32, NULL, T, H), t2(LT_F32, hg, T, H), &head_g,
                               t1(LT_I32, tgg, T), rwt, nov, scale, gs);
    ok(rc == LT_ERR_ARG, "cross_entropy: a target outside the vocabulary is LT_ERR_ARG");
    if (weighted) {
        rc = gpu.be->cross_entropy(&gpu, &l2, t2(LT_F32, NULL, T, H), t2(LT_F32, hg, T, H), &head_g,
                                   t1(LT_I32, tgg, T), t1(LT_F32, rwg, T - 1), nov, scale, gs);
        ok(rc == LT_ERR_ARG, "cross_entropy: a row_weight of the wrong size is LT_ERR_ARG");
    }
    free(h), free(wf), free(wh), free(tg), free(rw), free(lp_c), free(dh_c), free(gw_c);
}

static void test_adamw_and_extras(void) {
    int64_t n = 10007;
    float *p = rand_f32(n, 1.0f), *g = rand_f32(n, 0.1f), *m = rand_f32(n, 0.01f),
          *v = malloc(4 * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        v[i] = urand() * 0.01f;
    float *pg = dev_put(p, (size_t)n * 4), *gg = dev_put(g, (size_t)n * 4),
          *mg = dev_put(m, (size_t)n * 4), *vg = dev_put(v, (size_t)n * 4);
    for (int step = 1; step <= 3; step++) {
        cpu_adamw(&cpu, t1(LT_F32, p, n), t1(LT_F32, g, n), t1(LT_F32, m, n), t1(LT_F32, v, n),
                  1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, step);
        gpu.be->adamw(&gpu, t1(LT_F32, pg, n), t1(LT_F32, gg, n), t1(LT_F32, mg, n),
                      t1(LT_F32, vg, n), 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, step);
    }
    check_close("adamw param after 3 steps", pg, p, n, 1e-6);
    check_close("adamw exp_avg_sq", vg, v, n, 1e-6);
    const lt_backend *gc = cpu.be, *gx = gpu.be;
    ok(lt_backend_missing_training_op(gx) == NULL, "the CUDA backend has every training op");
    double s_c = 0, s_g = 0;
    gc->sumsq(&cpu, &s_c, t1(LT_F32, g, n));
    gx->sumsq(&gpu, &s_g, t1(LT_F32, gg, n));
    ok(fabs(s_g - s_c) <= 1e-9 * s_c, "sumsq");
    float *y_c = malloc(4 * (size_t)n), *yg = dev_poison(n);
    gc->dropout(&cpu, t1(LT_F32, y_c, n), t1(LT_F32, g, n), 0.3f, 2.0f, 12345);
    gx->dropout(&gpu, t1(LT_F32, yg, n), t1(LT_F32, gg, n), 0.3f, 2.0f, 12345);
    check_close("dropout (same mask)", yg, y_c, n, 1e-7);
    gx->scale(&gpu, t1(LT_F32, yg, n), 0.5f);
    for (int64_t i = 0; i < n; i++)
        y_c[i] *= 0.5f;
    check_close("scale", yg, y_c, n, 1e-7);
    gx->fill(&gpu, t1(LT_F32, yg, n), 0.25f);
    for (int64_t i = 0; i < n; i++)
        y_c[i] = 0.25f;
    check_close("fill", yg, y_c, n, 0);
    free(p), free(g), free(m), free(v), free(y_c);
}

/* The fp16 rule: an input far beyond fp16's range through fp16 weights stays finite and right. */
static void test_fp16_range(void) {
    int64_t T = 16, in = 256, out = 64;
    float *x = rand_f32(T * in, 1.0f);
    for (int64_t i = 0; i < T * in; i += 7)
        x[i] *= 3.0e5f; /* a GeGLU product of Gemma 3 size */
    int naive_inf = 0;
    for (int64_t i = 0; i < T * in; i++)
        naive_inf |= isinf(lt_f16_to_f32(lt_f32_to_f16(x[i])));
    ok(naive_inf, "fp16: a plain cast of the input overflows to inf (the naive path)");
    free(x);
    /* the same input through the scaled path */
    rng_state ^= 0x55;
    test_linear(LT_F16, 1, T, in, out, 3.0e5f);
}

/* The stash (checkpoint offload): a copy out starts after the op queued before it (it must see
 * that op's result, with no host sync in between), the buffer may be rewritten after
 * stash_wait, and the copy back returns the saved values. Page-locked blocks are reused. */
static void test_stash(void) {
    const int64_t n = (int64_t)3 << 20; /* 12 MiB: long enough for copy and kernels to overlap */
    float *host_in = malloc(sizeof(float) * (size_t)n), *back = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        host_in[i] = nrand();
    float *d = gpu.be->alloc(&gpu, sizeof(float) * (size_t)n);
    float *d2 = gpu.be->alloc(&gpu, sizeof(float) * (size_t)n);
    float *h = gpu.be->host_alloc(&gpu, sizeof(float) * (size_t)n);
    ok(d && d2 && h, "stash: device buffers and page-locked host memory");
    if (!d || !d2 || !h) goto out;
    lt_tensor t = lt_tensor_1d(LT_F32, d, n);
    gpu.be->upload(&gpu, d, host_in, sizeof(float) * (size_t)n);
    gpu.be->scale(&gpu, t, 2.0f);                             /* queued, not waited for */
    gpu.be->stash_out(&gpu, h, d, sizeof(float) * (size_t)n); /* must see the doubled values */
    gpu.be->stash_wait(&gpu);
    gpu.be->fill(&gpu, t, -1.0f); /* rewrites the source once the copy is done */
    gpu.be->stash_in(&gpu, d2, h, sizeof(float) * (size_t)n);
    gpu.be->stash_wait(&gpu);
    gpu.be->scale(&gpu, lt_tensor_1d(LT_F32, d2, n), 0.5f); /* runs after the copy back */
    lt_status rc = gpu.be->download(&gpu, back, d2, sizeof(float) * (size_t)n);
    int same = rc == LT_OK;
    for (int64_t i = 0; i < n && same; i++)
        same = back[i] == host_in[i];
    ok(same, "stash: out after an op, rewrite, back in, then an op: the values round-trip");
    gpu.be->download(&gpu, back, d, sizeof(float) * 4);
    ok(back[0] == -1.0f && back[3] == -1.0f, "stash: the source was rewritten after stash_wait");
    gpu.be->host_release(&gpu, h);
    float *h2 = gpu.be->host_alloc(&gpu, sizeof(float) * (size_t)(n / 2));
    ok(h2 == h, "stash: a released page-locked block is reused for a smaller request");
    gpu.be->host_release(&gpu, h2);
out:
    gpu.be->release(&gpu, d);
    gpu.be->release(&gpu, d2);
    free(host_in);
    free(back);
}

/* ---- graphs (backend.h's graph ops) ----------------------------------------------------------
 */

static size_t gpu_in_use(void) {
    lt_cuda_mem m;
    lt_cuda_memory(&gpu, &m);
    return m.in_use;
}

static void *host_get(const void *d, size_t bytes) {
    void *h = malloc(bytes ? bytes : 1);
    if (gpu.be->download(&gpu, h, d, bytes) != LT_OK) memset(h, 0xff, bytes);
    return h;
}

/* The recorded ops of test_graph_replay: embedding -> bf16 linear + adapter -> rmsnorm ->
 * sample_rows -> copy of the ids. */
typedef struct graph_case {
    int64_t T, in, out, V;
    lt_weight table, w;
    lt_lora lo;
    float *norm, *h, *y;
    int32_t *ids, *bits, *drawn, *drawn2;
    lt_sample_opts so;
} graph_case;

static lt_status graph_case_ops(graph_case *c, float *y, int32_t *drawn, int32_t *drawn2) {
    lt_status rc;
    int64_t T = c->T;
    if ((rc = gpu.be->embedding(&gpu, t2(LT_F32, c->h, T, c->in), t1(LT_I32, c->ids, T), &c->table,
                                1.5f)) != LT_OK ||
        (rc = gpu.be->linear(&gpu, t2(LT_F32, y, T, c->out), t2(LT_F32, c->h, T, c->in), &c->w)) !=
            LT_OK ||
        (rc = gpu.be->rmsnorm(&gpu, t2(LT_F32, y, T, c->out), t2(LT_F32, y, T, c->out),
                              t1(LT_F32, c->norm, c->out), 1e-6f)) != LT_OK ||
        (rc = gpu.be->sample_rows(&gpu, t1(LT_I32, drawn, T), t2(LT_F32, y, T, c->out),
                                  t1(LT_I32, c->bits, T), &c->so)) != LT_OK)
        return rc;
    return gpu.be->copy(&gpu, drawn2, drawn, sizeof(int32_t) * (size_t)T);
}

/* Records the case once and replays it on three new sets of ids and bits: each replay equals
 * the same ops called directly, bit for bit. Buffers allocated after the recording, of the
 * sizes its temporaries have, are not written by the replays; graph_free gives every temporary
 * back. */
static void test_graph_replay(int64_t T) {
    char name[160];
    graph_case c;
    memset(&c, 0, sizeof c);
    c.T = T;
    c.in = 256;
    c.out = 4104; /* > 4,096: few rows split it into slices */
    c.V = 300;
    int64_t r = 8;
    lt_cuda_set_precision(&gpu, LT_BF16);
    float *tab = rand_f32(c.V * c.in, 0.5f), *wf = rand_f32(c.out * c.in, 0.05f);
    float *a = rand_f32(r * c.in, 0.1f), *b = rand_f32(c.out * r, 0.1f),
          *nw = rand_f32(c.out, 0.3f);
    void *wh = as_dtype(wf, c.out * c.in, LT_BF16);
    c.table = (lt_weight){
        t2(LT_F32, dev_put(tab, sizeof(float) * (size_t)(c.V * c.in)), c.V, c.in), NULL, {0}, {0}};
    c.lo.a = t2(LT_F32, dev_put(a, sizeof(float) * (size_t)(r * c.in)), r, c.in);
    c.lo.b = t2(LT_F32, dev_put(b, sizeof(float) * (size_t)(c.out * r)), c.out, r);
    c.lo.scale = 2.0f;
    c.lo.enabled = 1;
    c.w = (lt_weight){
        t2(LT_BF16, dev_put(wh, 2 * (size_t)(c.out * c.in)), c.out, c.in), &c.lo, {0}, {0}};
    c.norm = dev_put(nw, sizeof(float) * (size_t)c.out);
    c.h = dev_put(NULL, sizeof(float) * (size_t)(T * c.in));
    c.y = dev_put(NULL, sizeof(float) * (size_t)(T * c.out));
    c.ids = dev_put(NULL, sizeof(int32_t) * (size_t)T);
    c.bits = dev_put(NULL, sizeof(int32_t) * (size_t)T);
    c.drawn = dev_put(NULL, sizeof(int32_t) * (size_t)T);
    c.drawn2 = dev_put(NULL, sizeof(int32_t) * (size_t)T);
    c.so = (lt_sample_opts){1.0f, 64, 0.95f, 0.0f};
    float *y_e = dev_put(NULL, sizeof(float) * (size_t)(T * c.out));
    int32_t *d_e = dev_put(NULL, sizeof(int32_t) * (size_t)T),
            *d2_e = dev_put(NULL, sizeof(int32_t) * (size_t)T);
    int32_t *ih = malloc(sizeof(int32_t) * (size_t)T), *bh = malloc(sizeof(int32_t) * (size_t)T);
    /* no cached blocks: the first run's temporaries are then the only ones the recording can
     * take from the pool, and the only ones the guards below could get back */
    lt_cuda_trim(&gpu);
    /* a first run makes what the ops make on first use */
    lt_status rc = graph_case_ops(&c, y_e, d_e, d2_e);
    size_t before = gpu_in_use();
    lt_graph *g = NULL;
    if (rc == LT_OK) rc = gpu.be->graph_begin(&gpu);
    if (rc == LT_OK) {
        lt_status r1 = graph_case_ops(&c, c.y, c.drawn, c.drawn2);
        rc = gpu.be->graph_end(&gpu, &g);
        if (r1 != LT_OK) rc = r1;
    }
    snprintf(name, sizeof name,
             "graph T=%lld: embedding, bf16 linear + adapter, rmsnorm, "
             "sample_rows and copy record",
             (long long)T);
    if (!ok(rc == LT_OK && g, name)) diag("%s", gpu.err);
    /* buffers of exactly the temporaries' sizes (with more than 8 rows: the activation's bf16
     * cast, the adapter's casts and its product; with fewer: the adapter's fp32 product): had the
     * recording's temporaries gone back to the pool, these would be them (the best fit) */
    size_t sizes[] = {2 * (size_t)(T * c.in), 2 * (size_t)(r * c.in), 2 * (size_t)(c.out * r),
                      2 * (size_t)(T * r), 4 * (size_t)(T * r)};
    enum { NS = sizeof sizes / sizeof sizes[0] };
    void *guard[NS];
    size_t most = 0;
    for (int i = 0; i < NS; i++)
        if (sizes[i] > most) most = sizes[i];
    unsigned char *pat = malloc(most);
    memset(pat, 0x5a, most);
    for (int i = 0; i < NS; i++)
        guard[i] = dev_put(pat, sizes[i]);
    int same = g != NULL, guards = 1;
    for (int k = 0; k < 3 && g; k++) {
        for (int64_t t = 0; t < T; t++) {
            ih[t] = (int32_t)(rng_next() % (uint64_t)c.V);
            bh[t] = (int32_t)(rng_next() >> 32);
        }
        gpu.be->upload(&gpu, c.ids, ih, sizeof(int32_t) * (size_t)T);
        gpu.be->upload(&gpu, c.bits, bh, sizeof(int32_t) * (size_t)T);
        if (gpu.be->graph_launch(&gpu, g) != LT_OK || graph_case_ops(&c, y_e, d_e, d2_e) != LT_OK) {
            diag("%s", gpu.err);
            same = 0;
            break;
        }
        float *yg = host_get(c.y, sizeof(float) * (size_t)(T * c.out)),
              *ye = host_get(y_e, sizeof(float) * (size_t)(T * c.out));
        int32_t *dg = host_get(c.drawn, sizeof(int32_t) * (size_t)T),
                *dg2 = host_get(c.drawn2, sizeof(int32_t) * (size_t)T),
                *de = host_get(d_e, sizeof(int32_t) * (size_t)T);
        same &= !memcmp(yg, ye, sizeof(float) * (size_t)(T * c.out)) &&
                !memcmp(dg, de, sizeof(int32_t) * (size_t)T) &&
                !memcmp(dg2, de, sizeof(int32_t) * (size_t)T);
        free(yg), free(ye), free(dg), free(dg2), free(de);
        for (int i = 0; i < NS; i++) {
            unsigned char *back = host_get(guard[i], sizes[i]);
            guards &= !memcmp(back, pat, sizes[i]);
            free(back);
        }
    }
    snprintf(name, sizeof name,
             "graph T=%lld: three replays on new ids and bits equal the ops run directly, bit for "
             "bit",
             (long long)T);
    ok(same, name);
    snprintf(name, sizeof name,
             "graph T=%lld: buffers allocated after the recording are not written by a replay",
             (long long)T);
    ok(guards, name);
    for (int i = 0; i < NS; i++)
        gpu.be->release(&gpu, guard[i]);
    size_t held = gpu_in_use();
    gpu.be->graph_free(&gpu, g);
    snprintf(name, sizeof name,
             "graph T=%lld: graph_free gives its %.1f KiB of temporaries back (in use %zu -> %zu)",
             (long long)T, (double)(held - before) / 1024.0, held, gpu_in_use());
    ok(gpu_in_use() == before, name);
    void *dev[] = {c.table.w.data, c.lo.a.data, c.lo.b.data, c.w.w.data, c.norm, c.h, c.y,
                   c.ids,          c.bits,      c.drawn,     c.drawn2,   y_e,    d_e, d2_e};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        gpu.be->release(&gpu, dev[i]);
    free(tab), free(wf), free(a), free(b), free(nw), free(wh), free(ih), free(bh), free(pat);
}

/* Recorded attention over several query chunks reads each replay's positions: the recording's
 * key ranges (from host copies of its positions) must not be baked in. */
static void test_graph_attention(void) {
    int64_t T = 300, S = 300, nh = 4, nkv = 2, hd = 64;
    float scale = 0.125f;
    lt_cuda_set_precision(&gpu, LT_F32); /* the chunked path, where key ranges live */
    float *q = rand_f32(T * nh * hd, 1.0f), *k = rand_f32(S * nkv * hd, 1.0f),
          *v = rand_f32(S * nkv * hd, 1.0f), *o_c = malloc(sizeof(float) * (size_t)(T * nh * hd));
    int32_t *qp = malloc(sizeof(int32_t) * (size_t)T), *kp = malloc(sizeof(int32_t) * (size_t)S);
    for (int64_t i = 0; i < T; i++)
        qp[i] = (int32_t)i;
    for (int64_t i = 0; i < S; i++)
        kp[i] = (int32_t)i;
    float *qg = dev_put(q, sizeof(float) * (size_t)(T * nh * hd)),
          *kg = dev_put(k, sizeof(float) * (size_t)(S * nkv * hd)),
          *vg = dev_put(v, sizeof(float) * (size_t)(S * nkv * hd)), *og = dev_poison(T * nh * hd);
    int32_t *qpg = dev_put(qp, sizeof(int32_t) * (size_t)T),
            *kpg = dev_put(kp, sizeof(int32_t) * (size_t)S);
    lt_tensor out = t2(LT_F32, og, T, nh * hd), qt = t3(LT_F32, qg, T, nh, hd),
              kt = t3(LT_F32, kg, S, nkv, hd), vt = t3(LT_F32, vg, S, nkv, hd),
              qpt = t1(LT_I32, qpg, T), kpt = t1(LT_I32, kpg, S);
    lt_status rc = gpu.be->attention(&gpu, out, qt, kt, vt, qpt, kpt, 0, scale);
    lt_graph *g = NULL;
    if (rc == LT_OK) rc = gpu.be->graph_begin(&gpu);
    if (rc == LT_OK) {
        lt_status r1 = gpu.be->attention(&gpu, out, qt, kt, vt, qpt, kpt, 0, scale);
        rc = gpu.be->graph_end(&gpu, &g);
        if (r1 != LT_OK) rc = r1;
    }
    if (!ok(rc == LT_OK && g, "graph: attention over 3 query chunks records")) diag("%s", gpu.err);
    /* the replay's positions: queries late first, half the keys empty */
    for (int64_t i = 0; i < T; i++)
        qp[i] = (int32_t)(T - 1 - i);
    for (int64_t i = 0; i < S; i++)
        kp[i] = i % 2 ? -1 : (int32_t)i;
    gpu.be->upload(&gpu, qpg, qp, sizeof(int32_t) * (size_t)T);
    gpu.be->upload(&gpu, kpg, kp, sizeof(int32_t) * (size_t)S);
    cpu.be->attention(&cpu, t2(LT_F32, o_c, T, nh * hd), t3(LT_F32, q, T, nh, hd),
                      t3(LT_F32, k, S, nkv, hd), t3(LT_F32, v, S, nkv, hd), t1(LT_I32, qp, T),
                      t1(LT_I32, kp, S), 0, scale);
    if (g && gpu.be->graph_launch(&gpu, g) != LT_OK) diag("%s", gpu.err);
    check_close("graph: replayed attention takes the replay's positions", og, o_c, T * nh * hd,
                1e-5);
    gpu.be->graph_free(&gpu, g);
    void *dev[] = {qg, kg, vg, og, qpg, kpg};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        gpu.be->release(&gpu, dev[i]);
    free(q), free(k), free(v), free(o_c), free(qp), free(kp);
}

/* What cannot be recorded ends the recording with an error: graph_end returns it (no graph),
 * the stream then runs ops directly, and nothing stays held. */
static void test_graph_refusals(void) {
    char name[200];
    int64_t n = 4096;
    float *x = rand_f32(n, 1.0f), *y2 = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        y2[i] = 2.0f * x[i];
    float *xg = dev_put(x, sizeof(float) * (size_t)n),
          *yg = dev_put(NULL, sizeof(float) * (size_t)n);
    lt_tensor xt = t1(LT_F32, xg, n), yt = t1(LT_F32, yg, n);
    const char *kinds[] = {"upload", "download", "sync", "alloc", "sumsq", "graph_begin", "forced"};
    for (int kind = 0; kind < 7; kind++) {
        size_t before = gpu_in_use();
        lt_graph *g = (lt_graph *)&name; /* must come back NULL */
        lt_status step = LT_OK, rc;
        if (kind == 6) setenv("LATHE_CUDA_GRAPH_FAIL", "2", 1);
        rc = gpu.be->graph_begin(&gpu);
        if (kind == 6) unsetenv("LATHE_CUDA_GRAPH_FAIL");
        if (rc != LT_OK) {
            diag("%s", gpu.err);
            ok(0, "graph_begin");
            continue;
        }
        gpu.be->fill(&gpu, yt, 0.0f); /* recorded, then the refused call */
        double d = 0;
        void *p = NULL;
        switch (kind) {
        case 0:
            step = gpu.be->upload(&gpu, yg, x, sizeof(float) * 4);
            break;
        case 1:
            step = gpu.be->download(&gpu, y2, yg, sizeof(float) * 4);
            break;
        case 2:
            step = gpu.be->sync(&gpu);
            break;
        case 3:
            p = gpu.be->alloc(&gpu, 1000);
            step = p ? LT_OK : LT_ERR_STATE;
            break;
        case 4:
            step = gpu.be->sumsq(&gpu, &d, xt);
            break;
        case 5:
            step = gpu.be->graph_begin(&gpu);
            break;
        case 6: /* the second op fails on purpose */
            step = gpu.be->add(&gpu, yt, xt);
            break;
        }
        for (int64_t i = 0; i < n; i++)
            y2[i] = 2.0f * x[i];
        char step_err[LT_ERRLEN];
        snprintf(step_err, sizeof step_err, "%s", gpu.err);
        rc = gpu.be->graph_end(&gpu, &g);
        int ended = kind == 5 ? rc == LT_OK : rc != LT_OK && g == NULL;
        if (kind == 5) gpu.be->graph_free(&gpu, g); /* a nested begin is refused alone */
        /* the stream runs ops directly again */
        gpu.be->fill(&gpu, yt, 0.0f);
        gpu.be->add(&gpu, yt, xt);
        gpu.be->add(&gpu, yt, xt);
        snprintf(name, sizeof name,
                 "graph: %s while recording is refused%s, the stream works after, no memory held",
                 kinds[kind], kind == 5 ? " (the recording goes on)" : " and ends the recording");
        float *back = dev_get(yg, n);
        int right = !memcmp(back, y2, sizeof(float) * (size_t)n);
        free(back);
        ok(step != LT_OK && ended && right && gpu_in_use() == before, name);
        if (step == LT_OK || !ended) diag("step %d: %s; end %d: %s", step, step_err, rc, gpu.err);
        if (kind == 6)
            ok(strstr(gpu.err, "LATHE_CUDA_GRAPH_FAIL") != NULL,
               "graph: a forced failure says so in graph_end's message");
    }
    { /* a RoPE table not made yet: refused while recording; made by a direct call, recordable */
        int64_t T = 6, nh = 2, hd = 64;
        float theta = 12345.0f;
        float *q = rand_f32(T * nh * hd, 1.0f),
              *q_c = malloc(sizeof(float) * (size_t)(T * nh * hd));
        int32_t pos[6] = {0, 5, 9, 100, 3, 7};
        memcpy(q_c, q, sizeof(float) * (size_t)(T * nh * hd));
        cpu.be->rope(&cpu, t3(LT_F32, q_c, T, nh, hd), t1(LT_I32, pos, T), theta, 1.0f);
        float *qg = dev_put(q, sizeof(float) * (size_t)(T * nh * hd));
        int32_t *pg = dev_put(pos, sizeof(pos));
        lt_graph *g = NULL;
        lt_status rc = gpu.be->graph_begin(&gpu);
        if (rc == LT_OK) {
            lt_status r1 =
                gpu.be->rope(&gpu, t3(LT_F32, qg, T, nh, hd), t1(LT_I32, pg, T), theta, 1.0f);
            rc = gpu.be->graph_end(&gpu, &g);
            ok(r1 != LT_OK && rc != LT_OK && !g && strstr(gpu.err, "rope"),
               "graph: a RoPE table not made yet is refused while recording");
        }
        gpu.be->upload(&gpu, qg, q, sizeof(float) * (size_t)(T * nh * hd));
        gpu.be->rope(&gpu, t3(LT_F32, qg, T, nh, hd), t1(LT_I32, pg, T), theta, 1.0f);
        gpu.be->upload(&gpu, qg, q, sizeof(float) * (size_t)(T * nh * hd));
        rc = gpu.be->graph_begin(&gpu);
        if (rc == LT_OK) {
            gpu.be->rope(&gpu, t3(LT_F32, qg, T, nh, hd), t1(LT_I32, pg, T), theta, 1.0f);
            rc = gpu.be->graph_end(&gpu, &g);
        }
        if (rc == LT_OK) rc = gpu.be->graph_launch(&gpu, g);
        if (rc != LT_OK) diag("%s", gpu.err);
        check_close("graph: with the table made first, recorded RoPE replays right", qg, q_c,
                    T * nh * hd, 1e-5);
        gpu.be->graph_free(&gpu, g);
        gpu.be->release(&gpu, qg);
        gpu.be->release(&gpu, pg);
        free(q), free(q_c);
    }
    { /* graph_begin refused under the profiler and under LATHE_CUDA_GRAPHS=0 */
        lt_cuda_profile(&gpu, 1);
        lt_status rc = gpu.be->graph_begin(&gpu);
        ok(rc != LT_OK && strstr(gpu.err, "profiler"), "graph: refused while the profiler is on");
        if (rc == LT_OK) {
            lt_graph *g = NULL;
            gpu.be->graph_end(&gpu, &g);
            gpu.be->graph_free(&gpu, g);
        }
        lt_cuda_profile(&gpu, 0);
        char rep[4096];
        lt_cuda_profile_report(&gpu, rep, sizeof rep);
        setenv("LATHE_CUDA_GRAPHS", "0", 1);
        rc = gpu.be->graph_begin(&gpu);
        unsetenv("LATHE_CUDA_GRAPHS");
        ok(rc != LT_OK && strstr(gpu.err, "LATHE_CUDA_GRAPHS"),
           "graph: refused under LATHE_CUDA_GRAPHS=0");
        if (rc == LT_OK) {
            lt_graph *g = NULL;
            gpu.be->graph_end(&gpu, &g);
            gpu.be->graph_free(&gpu, g);
        }
        lt_graph *g = NULL;
        rc = gpu.be->graph_end(&gpu, &g);
        ok(rc != LT_OK && !g, "graph: graph_end without graph_begin is an error");
    }
    gpu.be->release(&gpu, xg);
    gpu.be->release(&gpu, yg);
    free(x), free(y2);
}

/* ---- the image tower's ops and their backward (lt_tower_grad_ops) -------------------------------
 * layernorm, gelu and avg_pool (the forward the backward pairs with) and layernorm_backward,
 * gelu_backward and avg_pool_backward from lt_backend_tower_grad(&lt_backend_cuda) against
 * backend_cpu_vision.c's, at the tower's row widths (72 = a head, 1152 = SigLIP's width, both off
 * any power of two), and attention with every position 0 (bidirectional, the tower's) at head dim
 * 72 over 1024 and 4096 patches. Tolerances: layernorm_backward takes its row statistics in
 * double on both backends, so dx differs by the rounding of the last cast (1e-6); dw and db sum
 * the rows in another order (the CPU in float, row by row; CUDA in double, in chunks), 1e-5 over
 * 4096 rows; the forward norm (fp32 statistics on CUDA, double on the CPU) and gelu's tanhf (a few
 * ulp between libm and CUDA) 1e-5, as the text model's fp32 ops; avg_pool and its backward take
 * the same sums in the same order and one division: bit for bit. */

static const lt_tower_grad_ops *tower_ops(const lt_ctx *c) {
    return lt_backend_tower_grad(c->be);
}

static void test_tower_layernorm(int64_t N, int64_t D) {
    char name[160];
    int64_t n = N * D;
    float *x = rand_f32(n, 2.0f), *w = rand_f32(D, 0.3f), *b = rand_f32(D, 0.2f),
          *dy = rand_f32(n, 1.0f);
    for (int64_t i = 0; i < n; i++)
        x[i] += 0.5f * (float)(i % D % 7); /* a row mean off zero */
    for (int64_t i = 0; i < D; i++)
        w[i] += 1.0f;
    float *dw0 = rand_f32(D, 1.0f), *db0 = rand_f32(D, 1.0f); /* accumulated into, not written */
    float *y_c = malloc(sizeof(float) * (size_t)n), *dx_c = malloc(sizeof(float) * (size_t)n);
    float *dw_c = malloc(sizeof(float) * (size_t)D), *db_c = malloc(sizeof(float) * (size_t)D);
    memcpy(dw_c, dw0, sizeof(float) * (size_t)D);
    memcpy(db_c, db0, sizeof(float) * (size_t)D);
    lt_tensor Xc = t2(LT_F32, x, N, D), Wc = t1(LT_F32, w, D);
    cpu_layernorm(&cpu, t2(LT_F32, y_c, N, D), Xc, Wc, t1(LT_F32, b, D), 1e-6f);
    cpu_layernorm_backward(&cpu, t2(LT_F32, dx_c, N, D), t1(LT_F32, dw_c, D), t1(LT_F32, db_c, D),
                           t2(LT_F32, dy, N, D), Xc, Wc, 1e-6f);
    float *xg = dev_put(x, (size_t)n * 4), *wg = dev_put(w, (size_t)D * 4),
          *bg = dev_put(b, (size_t)D * 4), *dyg = dev_put(dy, (size_t)n * 4);
    float *yg = dev_poison(n), *dxg = dev_poison(n);
    float *dwg = dev_put(dw0, (size_t)D * 4), *dbg = dev_put(db0, (size_t)D * 4);
    lt_tensor X = t2(LT_F32, xg, N, D), W = t1(LT_F32, wg, D);
    lt_status rc = gpu.be->layernorm(&gpu, t2(LT_F32, yg, N, D), X, W, t1(LT_F32, bg, D), 1e-6f);
    if (rc != LT_OK) diag("%s", gpu.err);
    snprintf(name, sizeof name, "layernorm [%lld,%lld]", (long long)N, (long long)D);
    check_close(name, yg, y_c, n, 1e-5);
    const lt_tower_grad_ops *g = tower_ops(&gpu);
    rc = g->layernorm_backward(&gpu, t2(LT_F32, dxg, N, D), t1(LT_F32, dwg, D), t1(LT_F32, dbg, D),
                               t2(LT_F32, dyg, N, D), X, W, 1e-6f);
    if (rc != LT_OK) diag("%s", gpu.err);
    snprintf(name, sizeof name, "layernorm_backward dx [%lld,%lld]", (long long)N, (long long)D);
    check_close(name, dxg, dx_c, n, 1e-6);
    snprintf(name, sizeof name, "layernorm_backward dw accumulated [%lld,%lld]", (long long)N,
             (long long)D);
    check_close(name, dwg, dw_c, D, 1e-5);
    snprintf(name, sizeof name, "layernorm_backward db accumulated [%lld,%lld]", (long long)N,
             (long long)D);
    check_close(name, dbg, db_c, D, 1e-5);
    /* as the tower calls it: no dw, db; and dx over dy (the CPU's loop allows it) */
    float *d2 = dev_put(dy, (size_t)n * 4);
    rc = g->layernorm_backward(&gpu, t2(LT_F32, d2, N, D), t1(LT_F32, NULL, D), t1(LT_F32, NULL, D),
                               t2(LT_F32, d2, N, D), X, W, 1e-6f);
    if (rc != LT_OK) diag("%s", gpu.err);
    snprintf(name, sizeof name, "layernorm_backward dx over dy, no dw/db [%lld,%lld]", (long long)N,
             (long long)D);
    check_close(name, d2, dx_c, n, 1e-6);
    /* the CPU's argument checks */
    rc = g->layernorm_backward(&gpu, t2(LT_F32, dxg, N, D), t1(LT_F32, dwg, D - 1),
                               t1(LT_F32, NULL, D), t2(LT_F32, dyg, N, D), X, W, 1e-6f);
    snprintf(name, sizeof name, "layernorm_backward: dw of the wrong size is LT_ERR_ARG");
    ok(rc == LT_ERR_ARG && strstr(gpu.err, "dw, db must be fp32 [D]"), name);
    gpu.be->release(&gpu, xg), gpu.be->release(&gpu, wg), gpu.be->release(&gpu, bg);
    gpu.be->release(&gpu, dyg), gpu.be->release(&gpu, yg), gpu.be->release(&gpu, dxg);
    gpu.be->release(&gpu, dwg), gpu.be->release(&gpu, dbg), gpu.be->release(&gpu, d2);
    free(x), free(w), free(b), free(dy), free(dw0), free(db0);
    free(y_c), free(dx_c), free(dw_c), free(db_c);
}

static void test_tower_gelu(int64_t n) {
    char name[160];
    float *x = rand_f32(n, 2.0f), *dy = rand_f32(n, 1.0f);
    float *y_c = malloc(sizeof(float) * (size_t)n), *dx_c = malloc(sizeof(float) * (size_t)n);
    cpu_gelu(&cpu, t1(LT_F32, y_c, n), t1(LT_F32, x, n));
    cpu_gelu_backward(&cpu, t1(LT_F32, dx_c, n), t1(LT_F32, dy, n), t1(LT_F32, x, n));
    float *xg = dev_put(x, (size_t)n * 4), *dyg = dev_put(dy, (size_t)n * 4);
    float *yg = dev_poison(n), *dxg = dev_poison(n);
    gpu.be->gelu(&gpu, t1(LT_F32, yg, n), t1(LT_F32, xg, n));
    snprintf(name, sizeof name, "gelu n=%lld", (long long)n);
    check_close(name, yg, y_c, n, 1e-5);
    const lt_tower_grad_ops *g = tower_ops(&gpu);
    lt_status rc =
        g->gelu_backward(&gpu, t1(LT_F32, dxg, n), t1(LT_F32, dyg, n), t1(LT_F32, xg, n));
    if (rc != LT_OK) diag("%s", gpu.err);
    snprintf(name, sizeof name, "gelu_backward n=%lld", (long long)n);
    check_close(name, dxg, dx_c, n, 1e-5);
    g->gelu_backward(&gpu, t1(LT_F32, dyg, n), t1(LT_F32, dyg, n), t1(LT_F32, xg, n));
    snprintf(name, sizeof name, "gelu_backward over dy (the tower's call) n=%lld", (long long)n);
    check_close(name, dyg, dx_c, n, 1e-5);
    rc = g->gelu_backward(&gpu, t1(LT_F32, dxg, n - 1), t1(LT_F32, dyg, n), t1(LT_F32, xg, n));
    ok(rc == LT_ERR_ARG, "gelu_backward: shapes that disagree are LT_ERR_ARG");
    gpu.be->release(&gpu, xg), gpu.be->release(&gpu, dyg), gpu.be->release(&gpu, yg);
    gpu.be->release(&gpu, dxg);
    free(x), free(dy), free(y_c), free(dx_c);
}

static void test_tower_pool(int64_t g, int64_t k, int64_t D) {
    char name[160];
    int64_t o = g / k, nx = g * g * D, ny = o * o * D;
    float *x = rand_f32(nx, 1.0f), *dy = rand_f32(ny, 1.0f);
    float *y_c = malloc(sizeof(float) * (size_t)ny), *dx_c = malloc(sizeof(float) * (size_t)nx);
    cpu_avg_pool(&cpu, t2(LT_F32, y_c, o * o, D), t2(LT_F32, x, g * g, D), (int)k);
    cpu_avg_pool_backward(&cpu, t2(LT_F32, dx_c, g * g, D), t2(LT_F32, dy, o * o, D), (int)k);
    float *xg = dev_put(x, (size_t)nx * 4), *dyg = dev_put(dy, (size_t)ny * 4);
    float *yg = dev_poison(ny), *dxg = dev_poison(nx);
    gpu.be->avg_pool(&gpu, t2(LT_F32, yg, o * o, D), t2(LT_F32, xg, g * g, D), (int)k);
    const lt_tower_grad_ops *gr = tower_ops(&gpu);
    lt_status rc =
        gr->avg_pool_backward(&gpu, t2(LT_F32, dxg, g * g, D), t2(LT_F32, dyg, o * o, D), (int)k);
    if (rc != LT_OK) diag("%s", gpu.err);
    float *y = dev_get(yg, ny), *dx = dev_get(dxg, nx);
    snprintf(name, sizeof name, "avg_pool %lldx%lld grid, k=%lld, D=%lld: the CPU's, bit for bit",
             (long long)g, (long long)g, (long long)k, (long long)D);
    ok(same_floats(y, y_c, ny), name);
    snprintf(name, sizeof name,
             "avg_pool_backward %lldx%lld grid, k=%lld, D=%lld: the CPU's, bit for bit",
             (long long)g, (long long)g, (long long)k, (long long)D);
    ok(rc == LT_OK && same_floats(dx, dx_c, nx), name);
    rc = gr->avg_pool_backward(&gpu, t2(LT_F32, dxg, g * g, D), t2(LT_F32, dyg, o * o, D),
                               (int)k + 1 + (g % (k + 1) == 0));
    ok(rc == LT_ERR_ARG, "avg_pool_backward: a grid that k does not divide is LT_ERR_ARG");
    gpu.be->release(&gpu, xg), gpu.be->release(&gpu, dyg), gpu.be->release(&gpu, yg);
    gpu.be->release(&gpu, dxg);
    free(x), free(dy), free(y_c), free(dx_c), free(y), free(dx);
}

/* The tower's attention: every position 0, so every patch sees every patch (siglip.c), forward
 * and backward against the CPU (computed once) in each precision of prec[np]: fp32 (1e-5) and
 * the card's 16-bit paths (1e-2). */
static void test_tower_attention(int64_t P, int64_t nh, int64_t hd, const lt_dtype *prec, int np) {
    char name[200], n2[260];
    float scale = 1.0f / sqrtf((float)hd);
    int64_t N = P * nh * hd;
    float *q = rand_f32(N, 1.0f), *k = rand_f32(N, 1.0f), *v = rand_f32(N, 1.0f),
          *dout = rand_f32(N, 1.0f);
    int32_t *pos = calloc((size_t)P, sizeof(int32_t));
    float *o_c = malloc(sizeof(float) * (size_t)N), *dq_c = malloc(sizeof(float) * (size_t)N),
          *dk_c = malloc(sizeof(float) * (size_t)N), *dv_c = malloc(sizeof(float) * (size_t)N);
    lt_tensor Q = t3(LT_F32, q, P, nh, hd), K = t3(LT_F32, k, P, nh, hd),
              V = t3(LT_F32, v, P, nh, hd), POS = t1(LT_I32, pos, P);
    cpu.be->attention(&cpu, t2(LT_F32, o_c, P, nh * hd), Q, K, V, POS, POS, 0, scale);
    cpu_attention_backward(&cpu, t3(LT_F32, dq_c, P, nh, hd), t3(LT_F32, dk_c, P, nh, hd),
                           t3(LT_F32, dv_c, P, nh, hd), t2(LT_F32, dout, P, nh * hd), Q, K, V, POS,
                           POS, 0, scale);
    float *qg = dev_put(q, (size_t)N * 4), *kg = dev_put(k, (size_t)N * 4),
          *vg = dev_put(v, (size_t)N * 4), *dog = dev_put(dout, (size_t)N * 4);
    int32_t *pg = dev_put(pos, (size_t)P * 4);
    lt_tensor QG = t3(LT_F32, qg, P, nh, hd), KG = t3(LT_F32, kg, P, nh, hd),
              VG = t3(LT_F32, vg, P, nh, hd), PG = t1(LT_I32, pg, P);
    for (int i = 0; i < np; i++) {
        double tol = tol_for(prec[i]);
        lt_cuda_set_precision(&gpu, prec[i]);
        float *og = dev_poison(N), *dqg = dev_poison(N), *dkg = dev_poison(N), *dvg = dev_poison(N);
        lt_status rc =
            gpu.be->attention(&gpu, t2(LT_F32, og, P, nh * hd), QG, KG, VG, PG, PG, 0, scale);
        if (rc != LT_OK) diag("%s", gpu.err);
        snprintf(name, sizeof name, "tower attention %s P=%lld nh=%lld hd=%lld (every position 0)",
                 lt_dtype_user_name(prec[i]), (long long)P, (long long)nh, (long long)hd);
        check_close(name, og, o_c, N, tol);
        rc = gpu.be->attention_backward(&gpu, t3(LT_F32, dqg, P, nh, hd),
                                        t3(LT_F32, dkg, P, nh, hd), t3(LT_F32, dvg, P, nh, hd),
                                        t2(LT_F32, dog, P, nh * hd), QG, KG, VG, PG, PG, 0, scale);
        if (rc != LT_OK) diag("%s", gpu.err);
        snprintf(n2, sizeof n2, "%s backward dq", name);
        check_close(n2, dqg, dq_c, N, tol);
        snprintf(n2, sizeof n2, "%s backward dk", name);
        check_close(n2, dkg, dk_c, N, tol);
        snprintf(n2, sizeof n2, "%s backward dv", name);
        check_close(n2, dvg, dv_c, N, tol);
        gpu.be->release(&gpu, og), gpu.be->release(&gpu, dqg), gpu.be->release(&gpu, dkg);
        gpu.be->release(&gpu, dvg);
    }
    gpu.be->release(&gpu, qg), gpu.be->release(&gpu, kg), gpu.be->release(&gpu, vg);
    gpu.be->release(&gpu, dog), gpu.be->release(&gpu, pg);
    free(q), free(k), free(v), free(dout), free(pos), free(o_c), free(dq_c), free(dk_c), free(dv_c);
}

static void test_tower_ops(void) {
    const lt_tower_grad_ops *g = tower_ops(&gpu);
    ok(g && g->layernorm_backward && g->gelu_backward && g->avg_pool_backward &&
           g != lt_backend_tower_grad(&lt_backend_cpu) &&
           lt_backend_missing_tower_training_op(&lt_backend_cuda) == NULL,
       "the CUDA backend has its own tower backward ops");
    if (!g) return;
    test_tower_layernorm(37, 72);     /* a head's width, rows in one chunk */
    test_tower_layernorm(300, 1152);  /* SigLIP's width, several 64-row chunks, a ragged last */
    test_tower_layernorm(4096, 1152); /* post_layernorm over an 896 x 896 image's patches */
    test_tower_layernorm(5, 130);
    test_tower_gelu(100003);
    test_tower_gelu((int64_t)4096 * 4304); /* fc1's output for one image at 4B */
    test_tower_pool(16, 4, 72);
    test_tower_pool(64, 4, 1152); /* the real projector: 64 x 64 patches -> 16 x 16 tokens */
    test_tower_pool(8, 2, 32);    /* tests/fixtures/vision's tower */
    test_tower_pool(4, 1, 5);
    /* SigLIP so400m's heads of 72 over a 448 x 448 image's 1024 patches, and two heads over the
     * 4096 patches of an 896 x 896 image (the CPU reference is a plain loop) */
    const lt_dtype dts[3] = {LT_F32, LT_BF16, LT_F16};
    test_tower_attention(1024, 16, 72, dts, 3);
    test_tower_attention(4096, 2, 72, dts, 2);
    lt_cuda_set_precision(&gpu, lt_cuda_policy_dtype(&gpu));
}

int main(void) {
    const char *seed = getenv("LATHE_TEST_SEED");
    rng_state = seed ? strtoull(seed, NULL, 10) : (uint64_t)time(NULL);
    setenv("LATHE_CUDA_CHUNK_ROWS", "128", 0); /* several attention / loss chunks at test sizes */
    setenv("LATHE_CUDA_KEYRANGE_ROWS", "128", 0); /* and the key-range path (off by default) */
    if (lt_cuda_device_count() == 0) {
        printf("1..0 # SKIP no CUDA device (make check-gpu runs these on a GPU machine)\n");
        return 0;
    }
    if (lt_ctx_init(&cpu, &lt_backend_cpu, 0) != LT_OK ||
        lt_ctx_init(&gpu, &lt_backend_cuda, 0) != LT_OK) {
        printf("1..0 # SKIP cannot start a backend: %s %s\n", cpu.err, gpu.err);
        return 0;
    }
    diag("seed %llu, compute capability %d, policy %s", (unsigned long long)rng_state,
         lt_cuda_compute_capability(&gpu), lt_dtype_user_name(lt_cuda_policy_dtype(&gpu)));

    lt_dtype dts[3] = {LT_F32, LT_BF16, LT_F16};
    for (int i = 0; i < 3; i++) {
        test_linear(dts[i], 0, 37, 96, 80, 1.0f);
        test_linear(dts[i], 1, 37, 96, 80, 1.0f);
        test_linear(dts[i], 1, 300, 1152, 256, 1.0f);
        test_linear(dts[i], 1, 8, 1152, 256, 1.0f); /* decoding rows: gemv.cu for 16 bits */
        test_linear(dts[i], 1, 5, 1152, 258, 1.0f); /* 4 rows a warp, a ragged last warp */
        test_linear(dts[i], 0, 2, 6912, 1150, 1.0f);
        test_linear(dts[i], 0, 1, 6912, 1152, 1.0f);
        test_linear(dts[i], 1, 3, 100, 80, 1.0f); /* in % 8 != 0: the GEMM path */
        test_linears(dts[i], 8, 1152, 0);
        test_linears(dts[i], 1, 6912, 0);
        test_linears(dts[i], 9, 1152, 0); /* more rows than gemv.cu takes: linear on each */
        test_linears(dts[i], 3, 1152, 1); /* an NF4 part: linear on each */
        test_embedding(dts[i]);
    }
    for (int k = 0; k < 3; k++) { /* nf4, nf4 + double quant, int8 */
        lt_quant_kind kind = k < 2 ? LT_QUANT_NF4 : LT_QUANT_INT8;
        test_quant_linear(kind, k == 1, LT_F32, 37, 320, 96);
        test_quant_linear(kind, k == 1, LT_BF16, 70, 1152, 256);
        test_quant_linear(kind, k == 1, LT_F16, 70, 1152, 256);
        test_quant_linear(kind, k == 1, LT_BF16, 3, 1152, 256); /* decoding: GEMV for nf4 */
        /* 40 x 100 weights: not a multiple of 32, so nf4 takes the byte-a-thread decode */
        test_quant_linear(kind, k == 1, LT_BF16, 12, 100, 40);
    }
    test_rmsnorm(33, 1152);
    test_rmsnorm(4 * 70, 256);
    test_rmsnorm(5, 5376);
    test_rmsnorm(9, 130);         /* a row length the float4 kernels do not take: the plain ones */
    test_rmsnorm_add(8, 1152, 1); /* a decoding step's sublayer end */
    test_rmsnorm_add(300, 2560, 1);
    test_rmsnorm_add(5, 5376, 0); /* without the next norm (a layer's last) */
    test_rmsnorm_add(7, 130, 1);  /* rows the float4 form does not take: the three ops */
    test_rope(40, 4, 256, 10000.0f, 1.0f, 4096);
    test_rope(40, 8, 128, 1000000.0f, 8.0f, 30000);
    test_qk_norm_rope(8, 4, 1, 256, 10000.0f, 1.0f, 4096); /* a 1B decoding step */
    test_qk_norm_rope(40, 8, 4, 128, 1000000.0f, 8.0f, 30000);
    test_qk_norm_rope(3, 2, 1, 130, 10000.0f, 1.0f, 512); /* hd % 4 != 0: the four ops */
    test_geglu_add(100003);
    if (lt_cuda_compute_capability(&gpu) >= 80) test_bf16_activations(70, 1152, 256);
    for (int i = 0; i < 3; i++) {
        test_attention(dts[i], 70, 70, 4, 2, 128, 0, 0);
        test_attention(dts[i], 70, 70, 4, 1, 256, 16, 0);
        test_attention(dts[i], 3, 100, 8, 4, 256, 0, 1);
        test_attention(dts[i], 1, 64, 4, 1, 256, 8, 1);
        test_cross_entropy(dts[i], 37, 5000, 64, 0);
        test_cross_entropy(dts[i], 37, 5000, 64, 1);
    }
    test_attention(LT_BF16, 600, 600, 8, 2, 256, 0, 0);  /* several query chunks, key ranges */
    test_attention(LT_F32, 520, 520, 4, 1, 256, 100, 0); /* sliding window over several chunks */
    test_attention(LT_F32, 400, 400, 4, 2, 128, 0, 2);
    test_attention(LT_BF16, 1100, 1100, 4, 1, 128, 0, 0); /* rows of 1025..2048 keys */
    test_attention(LT_F32, 2, 5000, 4, 2, 128, 0, 1);     /* a long cache: the generic softmax */
    test_attention(LT_F16, 400, 400, 4, 2, 128, 64, 2);
    /* the fused kernels over many tiles: a window, GQA, T not a multiple of 64 */
    test_attention(LT_BF16, 700, 700, 4, 2, 256, 300, 0);
    test_attention(LT_F16, 334, 334, 4, 2, 256, 100, 2);
    test_attention(LT_BF16, 1030, 1030, 16, 4, 128, 500, 0); /* 128-row forward blocks */
    /* hd 72 (SigLIP's heads: Gemma 3's image tower) on the fused kernels, tiles 80 wide */
    for (int i = 0; i < 3; i++) {
        test_attention(dts[i], 70, 70, 4, 2, 72, 0, 0); /* causal, GQA, a partial tile */
        test_attention(dts[i], 130, 130, 16, 16, 72, 0,
                       3); /* the tower's 16 heads, bidirectional */
    }
    test_attention(LT_BF16, 333, 333, 4, 1, 72, 100, 0); /* a window, T not a multiple of 64 */
    test_attention(LT_F16, 334, 334, 4, 2, 72, 0, 2);    /* restarting positions */
    test_attention(LT_BF16, 600, 600, 16, 16, 72, 0, 3); /* the tower's heads over many tiles */
    test_attention(LT_F16, 600, 600, 16, 16, 72, 0, 3);
    test_attention(LT_BF16, 3, 100, 8, 4, 72, 0, 1); /* a cache: empty slots, out of order */
    test_attention_split72("49152");
    test_attention_split72("40960");
    for (int i = 0; i < 3; i++) { /* image blocks (training's path; 128-row chunks) */
        /* Gemma 3 1B's heads; a window < T; a block at the start and one in the middle */
        test_attention_span(dts[i], 300, 4, 1, 256, 100, 0, 64, 150, 80, 0);
        /* a window shorter than the block (it cuts the block's past side only) */
        test_attention_span(dts[i], 200, 4, 1, 32, 16, 60, 50, 0, 0, 0);
        /* 2/2 heads, one chunk, no key ranges (S < 128), a block at the start */
        test_attention_span(dts[i], 70, 2, 2, 32, 0, 0, 20, 0, 0, 0);
        /* a block across the chunk boundary at 256, T not a multiple of 128 */
        test_attention_span(dts[i], 333, 2, 2, 256, 0, 5, 40, 200, 100, 0);
        /* the table without a host copy: every chunk takes every key */
        test_attention_span(dts[i], 300, 4, 1, 128, 0, 100, 100, 0, 0, 1);
        /* no block anywhere: attention_backward's result (the fused path's in 16 bits) */
        test_attention_span(dts[i], 300, 4, 1, 256, 100, 0, 0, 0, 0, 0);
        test_attention_span(dts[i], 70, 2, 2, 32, 0, 0, 0, 0, 0, 0);
    }
    test_attention_rows(10, 300, 7, 4, 1, 256, 0);   /* Gemma 3 1B's heads, rings wrapped */
    test_attention_rows(10, 300, 7, 4, 1, 256, 100); /* a sliding window */
    test_attention_rows(4, 5000, 3, 8, 2, 128, 0);   /* long caches: many key blocks */
    test_attention_rows(64, 40, 64, 4, 2, 72, 16);   /* many rows; hd not a multiple of 32 */
    test_sample_rows(8, 262144);                     /* GRPO's group on the real vocabulary */
    test_sample_rows(64, 262144);                    /* one block a row from 64 rows on */
    test_sample_rows(3, 4099);                       /* the tiny model's size, ragged: 2 slices */
    test_sample_rows(1, 262144);                     /* a chat's one row: 64 slices */
    test_sample_rows(2, 262144);
    test_sample_rows(5, 100003); /* slices of a ragged length */
    test_sample_rows(16, 50000);
    test_sample_rows(63, 262144); /* the last row count that slices */
    test_sample_rows(4, 4096);    /* one slice: one block a row */
    test_graph_replay(37);        /* cuBLAS linears (temporaries), the sampler in slices */
    test_graph_replay(5);         /* the few-row GEMV, the sampler in slices */
    test_graph_replay(70);        /* cuBLAS linears, one block a row */
    test_graph_attention();
    test_graph_refusals();
    lt_cuda_set_precision(&gpu, lt_cuda_policy_dtype(&gpu));
    test_cross_entropy(LT_BF16, 300, 262144, 128, 0); /* the real vocabulary, several chunks */
    test_cross_entropy(LT_F16, 300, 262144, 128, 1);
    test_adamw_and_extras();
    test_stash();
    test_fp16_range();
    test_tower_ops();
    { /* an allocation the device cannot hold is a clean error, and the ctx still works */
        void *huge = gpu.be->alloc(&gpu, (size_t)1 << 50);
        ok(!huge && strstr(gpu.err, "out of device memory"),
           "a CUDA out-of-memory is an error value");
        if (huge) gpu.be->release(&gpu, huge);
        test_geglu_add(1000);
    }
    lt_cuda_mem mem;
    lt_cuda_memory(&gpu, &mem);
    diag("device memory: in use %.1f MiB, peak %.1f MiB", mem.in_use / 1048576.0,
         mem.peak / 1048576.0);
    lt_ctx_shutdown(&gpu);
    lt_ctx_shutdown(&cpu);
    return tap_done();
}
