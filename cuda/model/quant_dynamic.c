/* quant_dynamic.c — quant=dynamic's calibration text, error arithmetic and choice of the
 * linears kept in 16 bits (see quant_dynamic.h).
 *
 * Owns the calibration text and qdyn_report. The measures are relative Frobenius norms summed
 * in double: the weight error |W - dequant(quant(W))| / |W| (dequantized with
 * lt_weight_dequantize_rows, the decode every backend reproduces) and the output error
 * |X·Wᵀ - X·dequant(W)ᵀ| / |X·Wᵀ| (gemma3.c multiplies the residual this file leaves by the
 * captured inputs). The score puts both on one scale by dividing each by its median over the
 * model's linears, so "twice the typical weight error" and "twice the typical output error"
 * count the same, and a spike in either raises it. Loads no weights and runs no forward
 * (gemma3.c does both).
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/base/threads.h"
#include "cuda/model/quant_dynamic.h"

/* ---- calibration text --------------------------------------------------------------------- */

/* Written for lathe: ordinary prose (a scene, an explanation, advice, numbers, a quotation),
 * about 2000 characters: 660 tokens with the tiny model's tokenizer, fewer with Gemma 3's
 * larger vocabulary. Changing it changes which linears stay 16-bit. */
static const char calibration_text[] =
    "The river town woke slowly on market days. Before the sun had cleared the hills, the "
    "baker had already pulled forty loaves from the oven, and the smell of warm bread drifted "
    "down the narrow street toward the water. Fishermen coiled their ropes and argued about "
    "the weather, as they did every morning, while a boy on a bicycle delivered newspapers to "
    "doors that were not yet open.\n\n"
    "By eight o'clock the square was full. Farmers set out crates of apples, potatoes and "
    "onions; a woman from the next valley sold honey in small glass jars, three for ten "
    "euros. An old man repaired watches at a folding table, peering through a lens fixed to "
    "his glasses. \"Most clocks are not broken,\" he liked to say. \"They are only tired, and "
    "they need someone to listen to them.\"\n\n"
    "Learning a new skill works in much the same way. At first every step feels slow and "
    "uncertain, and mistakes seem to outnumber successes. With practice, however, the "
    "movements become familiar, and attention is freed for the parts that still need it. "
    "Researchers who study memory describe this as moving knowledge from effortful recall to "
    "automatic habit. It is why a pianist can hold a conversation while playing scales, and "
    "why an experienced driver rarely thinks about the pedals.\n\n"
    "There are simple ways to make practice more effective. Short sessions spread over "
    "several days are usually better than one long session. Testing yourself, rather than "
    "rereading notes, strengthens memory. Mixing different kinds of problems forces the mind "
    "to choose a method instead of repeating the last one. Finally, sleep matters: much of "
    "the work of learning happens at night, when the brain replays and organizes what it met "
    "during the day.\n\n"
    "In the afternoon the market packed up. The baker counted the coins in a tin box, the "
    "fishermen went home, and the watchmaker closed his case with a quiet click. Tomorrow the "
    "square would be empty again, waiting for the next market day.\n";

const char *qdyn_calibration_text(void) {
    return calibration_text;
}

lt_status qdyn_calibration_ids(const char *tokenizer_path, int32_t **ids, int *n, char *err) {
    *ids = NULL;
    *n = 0;
    lt_tokenizer *tok = NULL;
    lt_status rc = tok_load(&tok, tokenizer_path, err);
    if (rc != LT_OK) return rc;
    int32_t *t = NULL;
    int k = 0;
    rc = tok_encode(tok, calibration_text, &t, &k, err);
    int32_t *all = rc == LT_OK ? malloc(sizeof(int32_t) * (size_t)(k + 1)) : NULL;
    if (rc == LT_OK && !all) rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
    if (rc == LT_OK) {
        all[0] = tok_bos_id(tok);
        memcpy(all + 1, t, sizeof(int32_t) * (size_t)k);
        *ids = all;
        *n = k + 1;
    }
    free(t);
    tok_free(tok);
    return rc;
}

/* ---- the weight residual, on every core --------------------------------------------------- */

#define RESID_ROWS 64 /* rows per task */

typedef struct resid_job {
    const lt_weight *q;
    float *x;
    int64_t out, in, n_chunks, next, done;
    double *sq_w, *sq_d; /* per chunk, summed in chunk order afterwards (deterministic) */
    pthread_mutex_t mu;
} resid_job;

/* Takes chunks until none are left. A worker without scratch memory takes none: the others
 * do its share, and the caller sees done < n_chunks only when no worker had any. */
static void *resid_worker(void *arg) {
    resid_job *j = arg;
    float *deq = malloc(sizeof(float) * (size_t)(RESID_ROWS * j->in));
    for (int64_t c = -1; deq;) {
        pthread_mutex_lock(&j->mu);
        if (c >= 0) j->done++;
        c = j->next++;
        pthread_mutex_unlock(&j->mu);
        if (c >= j->n_chunks) break;
        int64_t r0 = c * RESID_ROWS, nr = j->out - r0 < RESID_ROWS ? j->out - r0 : RESID_ROWS;
        lt_weight_dequantize_rows(j->q, r0, nr, deq);
        float *x = j->x + r0 * j->in;
        double sw = 0, sd = 0;
        for (int64_t i = 0; i < nr * j->in; i++) {
            double w = x[i], d = w - (double)deq[i];
            sw += w * w;
            sd += d * d;
            x[i] = (float)d;
        }
        j->sq_w[c] = sw;
        j->sq_d[c] = sd;
    }
    free(deq);
    return NULL;
}

lt_status qdyn_residual(const lt_weight *q, float *x, int64_t out, int64_t in, double *sq_w,
                        double *sq_d, char *err) {
    resid_job j = {.q = q, .x = x, .out = out, .in = in};
    j.n_chunks = (out + RESID_ROWS - 1) / RESID_ROWS;
    j.sq_w = calloc((size_t)(j.n_chunks ? j.n_chunks : 1), sizeof(double));
    j.sq_d = calloc((size_t)(j.n_chunks ? j.n_chunks : 1), sizeof(double));
    if (!j.sq_w || !j.sq_d) {
        free(j.sq_w);
        free(j.sq_d);
        return lt_fail(err, LT_ERR_MEMORY, "out of memory measuring a quantization error");
    }
    pthread_mutex_init(&j.mu, NULL);
    lt_run_on_cores(resid_worker, &j, (long)(j.n_chunks > 1 ? j.n_chunks : 1));
    pthread_mutex_destroy(&j.mu);
    double sw = 0, sd = 0;
    for (int64_t c = 0; c < j.n_chunks; c++) {
        sw += j.sq_w[c];
        sd += j.sq_d[c];
    }
    free(j.sq_w);
    free(j.sq_d);
    if (j.done < j.n_chunks)
        return lt_fail(err, LT_ERR_MEMORY, "out of memory measuring a quantization error");
    *sq_w = sw;
    *sq_d = sd;
    return LT_OK;
}

double qdyn_sumsq(const float *x, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += (double)x[i] * (double)x[i];
    return s;
}

double qdyn_ratio(double sq_a, double sq_b) {
    if (sq_a <= 0) return 0;
    if (sq_b <= 0) return INFINITY;
    return sqrt(sq_a / sq_b);
}

/* ---- the report and the choice ----------------------------------------------------------- */

lt_status qdyn_report_init(qdyn_report *r, int n_modules) {
    memset(r, 0, sizeof *r);
    r->mods = calloc((size_t)(n_modules > 0 ? n_modules : 1), sizeof *r->mods);
    if (!r->mods) return LT_ERR_MEMORY;
    r->info.n_modules = n_modules;
    r->info.dynamic = 1;
    return LT_OK;
}

void qdyn_report_free(qdyn_report *r) {
    if (!r) return;
    free(r->mods);
    memset(r, 0, sizeof *r);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of one measure (which: 0 weight, 1 output) over the modules (only the quantized ones
 * when asked), 0 when there are none; v is scratch for n doubles. */
static double median_of(const lt_quant_module *m, int n, int which, int only_quantized, double *v) {
    int k = 0;
    for (int i = 0; i < n; i++) {
        if (only_quantized && m[i].kept) continue;
        v[k++] = which ? m[i].output_error : m[i].weight_error;
    }
    if (!k) return 0;
    qsort(v, (size_t)k, sizeof *v, cmp_double);
    return k % 2 ? v[k / 2] : 0.5 * (v[k / 2 - 1] + v[k / 2]);
}

/* A multiple of the median; a module with a measure when the median is 0 counts as far off. */
static double over_median(double x, double med) {
    if (med > 0) return x / med;
    return x > 0 ? 1e9 : 0;
}

typedef struct ranked {
    double score;
    int i;
} ranked;

static int cmp_ranked(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->score != y->score) return x->score < y->score ? 1 : -1; /* worst first */
    return (x->i > y->i) - (x->i < y->i);                          /* then the model's order */
}

lt_status qdyn_report_choose(qdyn_report *r, double keep) {
    lt_quant_info *in = &r->info;
    int n = in->n_modules;
    lt_quant_module *m = r->mods;
    double *v = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    ranked *order = malloc(sizeof(ranked) * (size_t)(n > 0 ? n : 1));
    if (!v || !order) {
        free(v);
        free(order);
        return LT_ERR_MEMORY;
    }
    in->keep = keep;
    in->linear_params = 0;
    for (int i = 0; i < n; i++) {
        m[i].kept = 0;
        in->linear_params += m[i].n_params;
    }
    double med_w = median_of(m, n, 0, 0, v), med_o = median_of(m, n, 1, 0, v);
    for (int i = 0; i < n; i++) {
        m[i].score = over_median(m[i].weight_error, med_w) + over_median(m[i].output_error, med_o);
        order[i] = (ranked){m[i].score, i};
    }
    qsort(order, (size_t)n, sizeof *order, cmp_ranked);
    int64_t budget = (int64_t)floor(keep * (double)in->linear_params), used = 0;
    in->n_kept = 0;
    for (int k = 0; k < n; k++) {
        lt_quant_module *mod = &m[order[k].i];
        if (used + mod->n_params > budget) continue;
        mod->kept = 1;
        used += mod->n_params;
        in->n_kept++;
    }
    in->kept_params = used;
    in->median_weight_error = median_of(m, n, 0, 1, v);
    in->median_output_error = median_of(m, n, 1, 1, v);
    free(v);
    free(order);
    return LT_OK;
}
