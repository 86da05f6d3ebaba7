/* gguf_tool.c — the engine side of the GGUF tests: export a checkpoint, and lathe's own greedy
 * continuation and perplexity to compare with llama.cpp's.
 *
 *   gguf_tool export DIR OUT.gguf TYPE [--overwrite]      (prints size and seconds as JSON)
 *   gguf_tool export random:4b OUT.gguf TYPE              (real shapes, seeded random weights,
 *                                                          DIR/tokenizer.model from
 * LATHE_TOKENIZER) gguf_tool export DIR OUT.gguf TYPE --cuda             (CUDA builds: the weights
 * are copied to the GPU in fp32 first and exported from there; the file must equal the host one)
 *   gguf_tool export-lora DIR OUT.gguf on|off             (attaches a seeded rank-4 adapter to
 *                                                          layer 0's q_proj and layer 1's
 *                                                          down_proj, exports f32, reads the file
 *                                                          back; prints the largest error against
 *                                                          W + scale*B*A, or W when off)
 *   gguf_tool greedy DIR --ids 2,17,... --n N             (prints {"greedy": [...]})
 *   gguf_tool ppl DIR --ids 2,17,...                      (prints {"logp": [log p(ids[t+1])],
 *                                                          "nll": .., "ppl": .., "n": ..})
 *   gguf_tool ppl DIR --ids 2,17,... --gguf FILE.gguf     (the same, with every weight replaced
 *                                                          by FILE's, dequantized: what llama.cpp
 *                                                          should compute on that file)
 *
 * Drives the engine's internals (gemma3_load_dir, gemma3_forward on the CPU backend,
 * gguf_export_gemma3) directly, so it runs before the public session API does. A test tool:
 * it prints errors to stderr and exits non-zero; library code never does.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "cuda/backend/backend.h"
#include "cuda/export/gguf_export.h"
#include "cuda/formats/gguf.h"
#include "cuda/model/gemma3_device.h"
#include "cuda/model/model.h"
#include "cuda/text/tokenizer.h"
#ifdef HAVE_CUDA
#include "cuda/backend/cuda/backend_cuda.h"
#endif

static int parse_ids(const char *s, int32_t **ids, int *n) {
    int cap = 16;
    *n = 0;
    *ids = malloc((size_t)cap * sizeof **ids);
    while (*ids && *s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) return -1;
        if (*n == cap && !(*ids = realloc(*ids, (size_t)(cap *= 2) * sizeof **ids))) return -1;
        (*ids)[(*n)++] = (int32_t)v;
        s = *end == ',' ? end + 1 : end;
    }
    return *ids && *n > 0 ? 0 : -1;
}

static void on_message(void *ctx, const char *text) {
    (void)ctx;
    fprintf(stderr, "# %s\n", text);
}

static int load(const char *src, gemma3_model **m, lt_tokenizer **tok, char *err) {
    lt_status st;
    char path[1200];
    if (strncmp(src, "random:", 7) == 0) {
        st = gemma3_load_random(m, src + 7, 1234, "bf16", NULL, err);
        const char *tp = getenv("LATHE_TOKENIZER");
        snprintf(path, sizeof path, "%s", tp ? tp : "models/tiny/tokenizer.model");
    } else {
        st = gemma3_load_dir(m, src, NULL, NULL, err);
        snprintf(path, sizeof path, "%s/tokenizer.model", src);
    }
    if (st != LT_OK) return -1;
    if (tok_load(tok, path, err) != LT_OK) return -1;
    gemma3_config_set_tokens(&(*m)->cfg, *tok);
    return 0;
}

/* ---- reading a GGUF back (for --gguf) ----------------------------------------------------- */

typedef struct rtensor {
    char name[64];
    uint32_t type;
    int64_t ne[4];
    int n_dims;
    uint64_t offset;
} rtensor;

typedef struct rfile {
    uint8_t *buf;
    size_t len, pos, data;
    rtensor *t;
    uint64_t n_t;
    int bad;
} rfile;

static uint64_t rget(rfile *f, int n) {
    uint64_t v = 0;
    if (f->pos + (size_t)n > f->len) {
        f->bad = 1;
        return 0;
    }
    for (int i = 0; i < n; ++i)
        v |= (uint64_t)f->buf[f->pos + i] << (8 * i);
    f->pos += (size_t)n;
    return v;
}

static void rskip_value(rfile *f, uint32_t type) {
    static const int size[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    if (type == 8) {
        f->pos += rget(f, 8);
    } else if (type == 9) {
        uint32_t et = (uint32_t)rget(f, 4);
        uint64_t n = rget(f, 8);
        for (uint64_t i = 0; i < n && !f->bad; ++i)
            rskip_value(f, et);
    } else if (type < 13) {
        f->pos += (size_t)size[type];
    } else {
        f->bad = 1;
    }
    if (f->pos > f->len) f->bad = 1;
}

static int rfile_open(rfile *f, const char *path) {
    memset(f, 0, sizeof *f);
    FILE *fp = fopen(path, "rb");
    if (!fp) return -1;
    fseek(fp, 0, SEEK_END);
    f->len = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    f->buf = malloc(f->len);
    if (!f->buf || fread(f->buf, 1, f->len, fp) != f->len) {
        fclose(fp);
        return -1;
    }
    fclose(fp);
    if (rget(f, 4) != 0x46554747u || rget(f, 4) != 3) return -1;
    f->n_t = rget(f, 8);
    uint64_t n_kv = rget(f, 8);
    for (uint64_t i = 0; i < n_kv && !f->bad; ++i) {
        f->pos += rget(f, 8); /* key */
        rskip_value(f, (uint32_t)rget(f, 4));
    }
    f->t = calloc(f->n_t, sizeof *f->t);
    for (uint64_t i = 0; i < f->n_t && f->t && !f->bad; ++i) {
        uint64_t nl = rget(f, 8);
        if (nl >= sizeof f->t[i].name || f->pos + nl > f->len) return -1;
        memcpy(f->t[i].name, f->buf + f->pos, nl);
        f->pos += nl;
        f->t[i].n_dims = (int)rget(f, 4);
        for (int d = 0; d < 4; ++d)
            f->t[i].ne[d] = 1;
        for (int d = 0; d < f->t[i].n_dims && d < 4; ++d)
            f->t[i].ne[d] = (int64_t)rget(f, 8);
        f->t[i].type = (uint32_t)rget(f, 4);
        f->t[i].offset = rget(f, 8);
    }
    f->data = (f->pos + 31) / 32 * 32;
    return f->bad || !f->t ? -1 : 0;
}

typedef struct swap_ctx {
    rfile *f;
    float q_norm_mul;
    void **saved; /* original data pointers, restored before the model is freed */
    lt_dtype *saved_dt;
    int n;
    char err[256];
} swap_ctx;

/* Replaces one model weight by the file's tensor, dequantized, with the exporter's transforms
 * undone (norms: x / mul - 1). */
static int swap_weight(void *user, const char *hf, lt_tensor *t) {
    swap_ctx *sc = user;
    char name[96];
    int layer, role;
    if (gguf_export_tensor_name(hf, name, sizeof name, &layer, &role)) {
        snprintf(sc->err, sizeof sc->err, "no gguf name for %s", hf);
        return 1;
    }
    rtensor *rt = NULL;
    for (uint64_t i = 0; i < sc->f->n_t; ++i)
        if (strcmp(sc->f->t[i].name, name) == 0) rt = &sc->f->t[i];
    int64_t n = lt_tensor_numel(t), ne0 = t->shape[t->ndim - 1];
    if (!rt || rt->ne[0] != ne0 || rt->ne[0] * rt->ne[1] * rt->ne[2] * rt->ne[3] != n) {
        snprintf(sc->err, sizeof sc->err, "%s: missing or wrong shape in the file", name);
        return 1;
    }
    size_t rb = gguf_row_bytes((gguf_type)rt->type, ne0);
    float *x = malloc((size_t)n * sizeof *x);
    if (!rb || !x || sc->f->data + rt->offset + rb * (size_t)(n / ne0) > sc->f->len) {
        snprintf(sc->err, sizeof sc->err, "%s: type %u unreadable", name, rt->type);
        free(x);
        return 1;
    }
    for (int64_t r = 0; r < n / ne0; ++r)
        gguf_dequantize_row((gguf_type)rt->type,
                            sc->f->buf + sc->f->data + rt->offset + (size_t)r * rb, x + r * ne0,
                            ne0);
    if (role == GGUF_ROLE_NORM) {
        float mul = strstr(name, "attn_q_norm") ? sc->q_norm_mul : 1.0f;
        for (int64_t i = 0; i < n; ++i)
            x[i] = x[i] / mul - 1.0f;
    }
    sc->saved[sc->n] = t->data;
    sc->saved_dt[sc->n] = t->dtype;
    sc->n++;
    t->data = x;
    t->dtype = LT_F32;
    return 0;
}

static int restore_weight(void *user, const char *hf, lt_tensor *t) {
    swap_ctx *sc = user;
    (void)hf;
    free(t->data);
    t->data = sc->saved[sc->n];
    t->dtype = sc->saved_dt[sc->n];
    sc->n++;
    return 0;
}

/* ---- LoRA merge check ---------------------------------------------------------------------- */

static float lcg_uniform(uint64_t *st) {
    *st = *st * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*st >> 40) & 0xffffff) / 16777216.0f - 0.5f;
}

/* Attaches an adapter (host fp32) to w; returns it (caller frees a/b data). */
static lt_lora *attach_lora(lt_weight *w, int r, float scale, int enabled, uint64_t seed) {
    int64_t out = w->w.shape[0], in = w->w.shape[1];
    lt_lora *lo = calloc(1, sizeof *lo);
    float *a = malloc((size_t)(r * in) * sizeof *a), *b = malloc((size_t)(out * r) * sizeof *b);
    if (!lo || !a || !b) return NULL;
    for (int64_t i = 0; i < r * in; ++i)
        a[i] = lcg_uniform(&seed);
    for (int64_t i = 0; i < out * r; ++i)
        b[i] = lcg_uniform(&seed);
    lo->a = lt_tensor_2d(LT_F32, a, r, in);
    lo->b = lt_tensor_2d(LT_F32, b, out, r);
    lo->scale = scale;
    lo->enabled = enabled;
    w->lora = lo;
    return lo;
}

/* max |file - (W + scale*B*A)| over the tensor (the adapter term when enabled). */
static double merged_error(rfile *f, const char *gguf_name, const lt_weight *w, const lt_lora *lo,
                           int enabled, double *adapter_size) {
    rtensor *rt = NULL;
    for (uint64_t i = 0; i < f->n_t; ++i)
        if (strcmp(f->t[i].name, gguf_name) == 0) rt = &f->t[i];
    int64_t out = w->w.shape[0], in = w->w.shape[1], r = lo->a.shape[0];
    if (!rt || rt->type != GGUF_TYPE_F32 || rt->ne[0] != in || rt->ne[1] != out) return INFINITY;
    const float *file = (const float *)(f->buf + f->data + rt->offset);
    float *wf = malloc((size_t)(out * in) * sizeof *wf);
    lt_to_f32(wf, w->w.data, w->w.dtype, out * in);
    const float *A = lo->a.data, *B = lo->b.data;
    double worst = 0;
    *adapter_size = 0;
    for (int64_t o = 0; o < out; ++o) {
        for (int64_t j = 0; j < in; ++j) {
            double d = 0;
            for (int64_t k = 0; k < r; ++k)
                d += (double)B[o * r + k] * A[k * in + j];
            d *= lo->scale;
            *adapter_size = fmax(*adapter_size, fabs(d));
            double want = wf[o * in + j] + (enabled ? d : 0.0);
            worst = fmax(worst, fabs(file[o * in + j] - want));
        }
    }
    free(wf);
    return worst;
}

/* fp32 logits of every position: [n, V]. */
static float *forward_all(gemma3_model *m, const int32_t *ids, int n, char *err) {
    lt_ctx ctx;
    if (lt_ctx_init(&ctx, &lt_backend_cpu, 0) != LT_OK) {
        snprintf(err, LT_ERRLEN, "cpu backend: %.900s", ctx.err);
        return NULL;
    }
    int V = m->cfg.vocab_size;
    float *logits = ctx.be->alloc(&ctx, (size_t)n * V * sizeof(float));
    gemma3_outputs out = {.logits = logits};
    lt_status st = logits ? gemma3_forward(m, &ctx, ids, n, NULL, &out) : LT_ERR_MEMORY;
    float *host = NULL;
    if (st == LT_OK && (host = malloc((size_t)n * V * sizeof(float))))
        st = ctx.be->download(&ctx, host, logits, (size_t)n * V * sizeof(float));
    if (st != LT_OK) snprintf(err, LT_ERRLEN, "forward: %.900s", ctx.err);
    if (logits) ctx.be->release(&ctx, logits);
    lt_ctx_shutdown(&ctx);
    if (st != LT_OK) {
        free(host);
        return NULL;
    }
    return host;
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; ++i)
        if (x[i] > x[b]) b = i;
    return b;
}

int main(int argc, char **argv) {
    char err[LT_ERRLEN] = "";
    if (argc < 3) {
        fprintf(stderr, "usage: gguf_tool export|greedy|ppl SOURCE ...\n");
        return 2;
    }
    gemma3_model *m = NULL;
    lt_tokenizer *tok = NULL;
    if (load(argv[2], &m, &tok, err)) {
        fprintf(stderr, "gguf_tool: %s: %s\n", argv[2], err);
        return 1;
    }
    int rc = 0;
    if (strcmp(argv[1], "export") == 0 && argc >= 5) {
        gguf_export_opts o = {0};
        gguf_export_result res;
        lt_callbacks cb = {.message = on_message};
        if (gguf_ftype_parse(argv[4], &o.ftype)) {
            fprintf(stderr, "gguf_tool: type '%s': use one of %s\n", argv[4], GGUF_FTYPE_CHOICES);
            return 2;
        }
        int on_cuda = 0;
        for (int i = 5; i < argc; ++i) {
            if (strcmp(argv[i], "--overwrite") == 0)
                o.overwrite = 1;
            else if (strcmp(argv[i], "--cuda") == 0)
                on_cuda = 1;
        }
        o.cb = &cb;
        gemma3_model *src = m;
        lt_ctx *dev = NULL;
#ifdef HAVE_CUDA
        lt_ctx cuctx;
        if (on_cuda) {
            if (lt_ctx_init(&cuctx, &lt_backend_cuda, 0) != LT_OK ||
                gemma3_to_device(&src, m, &cuctx, LT_F32, err) != LT_OK) {
                fprintf(stderr, "gguf_tool: cuda: %s %s\n", cuctx.err, err);
                return 1;
            }
            dev = &cuctx;
        }
#else
        if (on_cuda) {
            fprintf(stderr, "gguf_tool: --cuda: this build has no CUDA backend\n");
            return 2;
        }
#endif
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        lt_status st = gguf_export_gemma3(src, tok, dev, argv[3], &o, &res, err);
        clock_gettime(CLOCK_MONOTONIC, &t1);
#ifdef HAVE_CUDA
        if (on_cuda) {
            gemma3_model_release(src, &cuctx);
            lt_ctx_shutdown(&cuctx);
        }
#endif
        if (st != LT_OK) {
            fprintf(stderr, "gguf_tool: export: %s\n", err);
            rc = 1;
        } else {
            printf("{\"bytes\": %llu, \"tensors\": %d, \"fallback\": %d, \"seconds\": %.3f}\n",
                   (unsigned long long)res.bytes, res.n_tensors, res.n_fallback,
                   (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
        }
    } else if (strcmp(argv[1], "export-lora") == 0 && argc >= 5) {
        int on = strcmp(argv[4], "on") == 0;
        lt_lora *l0 = attach_lora(&m->layers[0].q_proj, 4, 0.5f, on, 11);
        lt_lora *l1 = m->cfg.num_hidden_layers > 1
                          ? attach_lora(&m->layers[1].down_proj, 4, 2.0f, on, 12)
                          : NULL;
        gguf_export_opts o = {.ftype = GGUF_FTYPE_F32, .overwrite = 1};
        gguf_export_result res;
        rfile f;
        if (!l0 || !l1 || gguf_export_gemma3(m, tok, NULL, argv[3], &o, &res, err) != LT_OK ||
            rfile_open(&f, argv[3])) {
            fprintf(stderr, "gguf_tool: export-lora: %s\n", err[0] ? err : "setup failed");
            return 1;
        }
        double s0, s1;
        double e0 = merged_error(&f, "blk.0.attn_q.weight", &m->layers[0].q_proj, l0, on, &s0);
        double e1 = merged_error(&f, "blk.1.ffn_down.weight", &m->layers[1].down_proj, l1, on, &s1);
        printf("{\"max_err\": %.9g, \"adapter_max\": %.9g}\n", fmax(e0, e1), fmin(s0, s1));
        lt_lora *ls[2] = {l0, l1};
        for (int i = 0; i < 2; ++i) {
            free(ls[i]->a.data);
            free(ls[i]->b.data);
            free(ls[i]);
        }
        m->layers[0].q_proj.lora = m->layers[1].down_proj.lora = NULL;
        free(f.buf);
        free(f.t);
    } else if ((strcmp(argv[1], "greedy") == 0 || strcmp(argv[1], "ppl") == 0) && argc >= 5 &&
               strcmp(argv[3], "--ids") == 0) {
        int32_t *ids;
        int n;
        int steps = argc >= 7 && strcmp(argv[5], "--n") == 0 ? atoi(argv[6]) : 8;
        if (parse_ids(argv[4], &ids, &n)) {
            fprintf(stderr, "gguf_tool: --ids: give comma-separated integers\n");
            return 2;
        }
        int V = m->cfg.vocab_size;
        if (strcmp(argv[1], "greedy") == 0) {
            /* recompute the whole prefix each step: simple and exactly the training forward */
            int32_t *seq = malloc((size_t)(n + steps) * sizeof *seq);
            memcpy(seq, ids, (size_t)n * sizeof *seq);
            printf("{\"greedy\": [");
            for (int s = 0; s < steps && rc == 0; ++s) {
                float *lg = forward_all(m, seq, n + s, err);
                if (!lg) {
                    rc = 1;
                    break;
                }
                const float *last = lg + (size_t)(n + s - 1) * V;
                int best = argmax(last, V);
                float second = -INFINITY;
                for (int i = 0; i < V; ++i)
                    if (i != best && last[i] > second) second = last[i];
                seq[n + s] = best;
                printf("%s%d", s ? ", " : "", best);
                fprintf(stderr, "# step %d: token %d, top-2 logit margin %.4f\n", s, best,
                        (double)(last[best] - second));
                free(lg);
            }
            printf("]}\n");
            free(seq);
        } else {
            rfile f;
            swap_ctx sc = {0};
            int swapped = 0;
            if (argc >= 7 && strcmp(argv[5], "--gguf") == 0) {
                const gemma3_config *c = &m->cfg;
                double rule = c->num_hidden_layers == 62
                                  ? (double)c->hidden_size / c->num_attention_heads
                                  : (double)c->head_dim;
                int nw = gemma3_weight_count(m);
                sc.f = &f;
                sc.q_norm_mul = (float)sqrt(rule / c->query_pre_attn_scalar);
                sc.saved = calloc((size_t)nw, sizeof *sc.saved);
                sc.saved_dt = calloc((size_t)nw, sizeof *sc.saved_dt);
                if (rfile_open(&f, argv[6]) || !sc.saved || !sc.saved_dt) {
                    fprintf(stderr, "gguf_tool: %s: not a readable GGUF v3 file\n", argv[6]);
                    return 1;
                }
                if (gemma3_weights_foreach(m, swap_weight, &sc)) {
                    fprintf(stderr, "gguf_tool: %s: %s\n", argv[6], sc.err);
                    return 1;
                }
                swapped = 1;
            }
            float *lg = forward_all(m, ids, n, err);
            if (!lg) {
                rc = 1;
            } else {
                double nll = 0;
                printf("{\"logp\": [");
                for (int t = 0; t + 1 < n; ++t) {
                    const float *row = lg + (size_t)t * V;
                    double mx = row[argmax(row, V)], se = 0;
                    for (int i = 0; i < V; ++i)
                        se += exp((double)row[i] - mx);
                    double lp = row[ids[t + 1]] - mx - log(se);
                    printf("%s%.7f", t ? ", " : "", lp);
                    nll += -lp;
                }
                printf("], \"nll\": %.6f, \"ppl\": %.6f, \"n\": %d}\n", nll / (n - 1),
                       exp(nll / (n - 1)), n - 1);
                free(lg);
            }
            if (swapped) {
                sc.n = 0;
                gemma3_weights_foreach(m, restore_weight, &sc);
                free(sc.saved);
                free(sc.saved_dt);
                free(f.buf);
                free(f.t);
            }
        }
        if (rc) fprintf(stderr, "gguf_tool: %s\n", err);
        free(ids);
    } else {
        fprintf(stderr, "gguf_tool: unknown command or missing arguments\n");
        rc = 2;
    }
    tok_free(tok);
    gemma3_model_free(m);
    return rc;
}
