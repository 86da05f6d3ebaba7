/* bnb.c — bitsandbytes' NF4 and LLM.int8 formats: quantizers, the pre-quantized tensor-group
 * reader and config.json's quantization_config (see bnb.h).
 *
 * Owns nothing beyond its arguments: quantizers write caller buffers, the reader returns
 * pointers into the caller's st_set. Each quantizer follows bitsandbytes'
 * backends/default/ops.py operation for operation in fp32 (a reciprocal, then a product;
 * bucketize against fp32 midpoints), so the bytes equal bitsandbytes' own. Dequantizing is the
 * backend's job (lt_weight_dequantize_rows); models and sessions are other files' business.
 */
#include "cuda/formats/bnb.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const float bnb_nf4_code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

/* ---- the dynamic map --------------------------------------------------------------------- */

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* torch.linspace(start, end, steps) in fp32 as torch's CPU kernel computes it with 8-wide
 * vectors (AVX2): whole vectors of 8 from a base (start + step*idx below the halfway point,
 * else end - step*(steps-idx-1)) plus j*step; the remainder element by element. */
static void linspace_f32(float start, float end, int steps, float *out) {
    float step = (end - start) / (float)(steps - 1);
    int half = steps / 2, idx = 0;
    for (; idx + 8 <= steps; idx += 8) {
        float base = idx < half ? start + step * (float)idx : end - step * (float)(steps - idx - 1);
        out[idx] = base;
        for (int j = 1; j < 8; j++)
            out[idx + j] = base + (float)j * step;
    }
    for (; idx < steps; idx++)
        out[idx] = idx < half ? start + step * (float)idx : end - step * (float)(steps - idx - 1);
}

void bnb_dynamic_map(float map[256]) {
    /* signed, max_exponent_bits 7, total_bits 8: for i = 0..6, 2^i + 1 boundaries in
     * [0.1, 1], their 2^i midpoints times 10^(i-6), both signs; then 0 and 1.0 */
    int k = 0;
    float b[65];
    for (int i = 0; i < 7; i++) {
        int items = (1 << i) + 1;
        linspace_f32(0.1f, 1.0f, items, b);
        float scale = (float)pow(10.0, (double)(i - 6));
        for (int j = 0; j + 1 < items; j++) {
            float mean = (b[j] + b[j + 1]) / 2.0f;
            map[k++] = scale * mean;
            map[k++] = -scale * mean;
        }
    }
    map[k++] = 0.0f;
    map[k++] = 1.0f;
    qsort(map, 256, sizeof(float), cmp_float);
}

/* ---- nearest code ---------------------------------------------------------------------------
 * torch.bucketize(x, bounds, right=False) with bounds[i] = (code[i] + code[i+1]) / 2: the
 * number of bounds strictly below x, so a value equal to a midpoint takes the lower code. */

static int bucketize(float x, const float *bounds, int n_bounds) {
    int lo = 0, hi = n_bounds; /* first index with bounds[i] >= x */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (bounds[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void midpoints(const float *code, int n, float *bounds) {
    for (int i = 0; i + 1 < n; i++)
        bounds[i] = (code[i] + code[i + 1]) / 2.0f;
}

static float clamp1(float v) {
    return v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v;
}

/* One block's scaled values, as quantize_4bit / quantize_blockwise form them: a whole block
 * multiplies by the fp32 reciprocal of max(absmax, 1e-38) and stores absmax itself; the short
 * last block divides by max(absmax, 1e-38) and stores that. */
static float block_scale(const float *x, int64_t len, int whole, float *stored, float *inv) {
    float am = 0.0f;
    for (int64_t i = 0; i < len; i++)
        am = fabsf(x[i]) > am ? fabsf(x[i]) : am;
    float c = am > 1e-38f ? am : 1e-38f;
    *stored = whole ? am : c;
    *inv = 1.0f / c;
    return c;
}

static float scaled(float v, int whole, float inv, float c) {
    return clamp1(whole ? v * inv : v / c);
}

void bnb_nf4_quantize(const float *x, int64_t n, int blocksize, uint8_t *packed, float *absmax) {
    float bounds[15];
    midpoints(bnb_nf4_code, 16, bounds);
    memset(packed, 0, (size_t)((n + 1) / 2));
    for (int64_t b0 = 0, b = 0; b0 < n; b0 += blocksize, b++) {
        int64_t len = n - b0 < blocksize ? n - b0 : blocksize;
        int whole = len == blocksize;
        float inv, c = block_scale(x + b0, len, whole, &absmax[b], &inv);
        for (int64_t i = 0; i < len; i++) {
            int64_t e = b0 + i;
            int q = bucketize(scaled(x[e], whole, inv, c), bounds, 15);
            packed[e >> 1] |= (uint8_t)((e & 1) ? q : q << 4);
        }
    }
    /* an odd count pads with 0.0, whose code (7) fills the last low nibble */
    if (n & 1) packed[n >> 1] |= (uint8_t)bucketize(0.0f, bounds, 15);
}

void bnb_blockwise_quantize(const float *x, int64_t n, const float code[256], int blocksize,
                            uint8_t *q, float *absmax) {
    float bounds[255];
    midpoints(code, 256, bounds);
    for (int64_t b0 = 0, b = 0; b0 < n; b0 += blocksize, b++) {
        int64_t len = n - b0 < blocksize ? n - b0 : blocksize;
        int whole = len == blocksize;
        float inv, c = block_scale(x + b0, len, whole, &absmax[b], &inv);
        for (int64_t i = 0; i < len; i++)
            q[b0 + i] = (uint8_t)bucketize(scaled(x[b0 + i], whole, inv, c), bounds, 255);
    }
}

lt_status bnb_double_quantize(const float *absmax, int64_t nb, const float code[256],
                              int nested_blocksize, uint8_t *qabsmax, float *absmax2,
                              float *offset) {
    double sum = 0;
    for (int64_t i = 0; i < nb; i++)
        sum += absmax[i];
    float off = nb ? (float)(sum / (double)nb) : 0.0f;
    float *centred = malloc(sizeof(float) * (size_t)(nb ? nb : 1));
    if (!centred) return LT_ERR_MEMORY;
    *offset = off;
    for (int64_t i = 0; i < nb; i++)
        centred[i] = absmax[i] - off;
    bnb_blockwise_quantize(centred, nb, code, nested_blocksize, qabsmax, absmax2);
    free(centred);
    return LT_OK;
}

void bnb_int8_quantize(const float *w, int64_t out, int64_t in, int8_t *w8, float *scb) {
    for (int64_t r = 0; r < out; r++) {
        const float *row = w + r * in;
        float am = 0.0f;
        for (int64_t c = 0; c < in; c++) {
            float v = fabsf(lt_f16_to_f32(lt_f32_to_f16(row[c])));
            am = v > am ? v : am;
        }
        scb[r] = am;
        float scale = (1.0f / am) * 127.0f;
        for (int64_t c = 0; c < in; c++) {
            float v = lt_f16_to_f32(lt_f32_to_f16(row[c]));
            w8[r * in + c] = am > 0.0f ? (int8_t)rintf(v * scale) : 0;
        }
    }
}

/* ---- pre-quantized tensor groups ----------------------------------------------------------- */

static const char *file_of(const st_set *st, const st_tensor *t) {
    return st->files[t->file].path;
}

static const st_tensor *find2(const st_set *st, const char *a, const char *b) {
    char name[512];
    snprintf(name, sizeof name, "%s%s", a, b);
    return st_find(st, name);
}

static int64_t numel_of(const st_tensor *t) {
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++)
        n *= t->shape[d];
    return n;
}

/* A quant-state tensor of dtype `dt` and `want` elements, or an error naming it. */
static lt_status need_tensor(const st_set *st, const st_tensor *t, const char *base,
                             const char *suffix, lt_dtype dt, int64_t want, const char *why,
                             char *err) {
    if (!t) {
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s: tensor '%s%s' is missing (%s); the checkpoint's quantization state is "
                       "incomplete: re-save it with bitsandbytes, or load the 16-bit original with "
                       "quant=nf4",
                       st->n_files ? st->files[0].path : "checkpoint", base, suffix, why);
    }
    if (!t->dtype_ok || t->dtype != dt || numel_of(t) != want) {
        char sh[96];
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s: tensor '%s' is %s %s but must be %s with %lld elements (%s)",
                       file_of(st, t), t->name, t->dtype_name, st_shape_str(t, sh, sizeof sh),
                       lt_dtype_name(dt), (long long)want, why);
    }
    return LT_OK;
}

static lt_status read_nf4(const st_set *st, const char *wname, const st_tensor *qs, int64_t out,
                          int64_t in, bnb_group *g, char *err) {
    const char *file = file_of(st, qs);
    json_error_t je;
    json_t *j = json_loadb(qs->data, qs->nbytes, 0, &je);
    if (!j || !json_is_object(j)) {
        lt_fail(err, LT_ERR_FORMAT,
                "%s: tensor '%s' is not the JSON quant_state bitsandbytes writes (%s)", file,
                qs->name, j ? "not an object" : je.text);
        json_decref(j);
        return LT_ERR_FORMAT;
    }
    lt_status rc = LT_ERR_FORMAT;
    json_t *qt = json_object_get(j, "quant_type"), *bs = json_object_get(j, "blocksize"),
           *sh = json_object_get(j, "shape"), *dt = json_object_get(j, "dtype");
    if (!json_is_string(qt) || strcmp(json_string_value(qt), "nf4") != 0) {
        rc = lt_fail(err, LT_ERR_FORMAT,
                     "%s: '%s' has quant_type %s; only nf4 is supported (quantize with "
                     "bnb_4bit_quant_type=\"nf4\", or load the 16-bit original with quant=nf4)",
                     file, wname, json_is_string(qt) ? json_string_value(qt) : "(missing)");
        goto done;
    }
    json_int_t b = json_is_integer(bs) ? json_integer_value(bs) : 0;
    if (b < 32 || b > 4096 || (b & (b - 1))) {
        snprintf(err, LT_ERRLEN,
                 "%s: '%s' quant_state blocksize must be a power of two in 32..4096, got %lld",
                 file, wname, (long long)b);
        goto done;
    }
    g->blocksize = (int)b;
    if (!json_is_array(sh) || json_array_size(sh) != 2 ||
        json_integer_value(json_array_get(sh, 0)) != out ||
        json_integer_value(json_array_get(sh, 1)) != in) {
        snprintf(err, LT_ERRLEN,
                 "%s: '%s' quant_state shape disagrees with config.json, which implies [%lld, "
                 "%lld] (is the checkpoint for another model size?)",
                 file, wname, (long long)out, (long long)in);
        goto done;
    }
    snprintf(g->dtype, sizeof g->dtype, "%s", json_is_string(dt) ? json_string_value(dt) : "");
    int64_t n = out * in, nb = (n + g->blocksize - 1) / g->blocksize;
    if ((int64_t)g->weight->nbytes != (n + 1) / 2) {
        char s2[96];
        snprintf(err, LT_ERRLEN,
                 "%s: '%s' holds %zu bytes (%s %s) but shape [%lld, %lld] packed two 4-bit codes "
                 "a byte needs %lld",
                 file, wname, g->weight->nbytes, g->weight->dtype_name,
                 st_shape_str(g->weight, s2, sizeof s2), (long long)out, (long long)in,
                 (long long)((n + 1) / 2));
        goto done;
    }
    json_t *nbs = json_object_get(j, "nested_blocksize"),
           *nof = json_object_get(j, "nested_offset");
    g->quant_map = find2(st, wname, ".quant_map");
    g->nested_absmax = find2(st, wname, ".nested_absmax");
    g->nested = g->nested_absmax != NULL || nbs != NULL;
    g->absmax = find2(st, wname, ".absmax");
    rc = need_tensor(st, g->quant_map, wname, ".quant_map", LT_F32, 16, "the 16 NF4 code values",
                     err);
    if (rc == LT_OK)
        rc = need_tensor(st, g->absmax, wname, ".absmax", g->nested ? LT_U8 : LT_F32, nb,
                         g->nested ? "one 8-bit code per block of the nested absmax"
                                   : "one fp32 scale per block",
                         err);
    if (rc != LT_OK) goto done;
    if (g->nested) {
        json_int_t nb2 = json_is_integer(nbs) ? json_integer_value(nbs) : 0;
        if (nb2 < 32 || nb2 > 4096 || (nb2 & (nb2 - 1)) || !json_is_number(nof)) {
            rc = lt_fail(err, LT_ERR_FORMAT,
                         "%s: '%s' is double-quantized but its quant_state lacks a valid "
                         "nested_blocksize / nested_offset",
                         file, wname);
            goto done;
        }
        g->nested_blocksize = (int)nb2;
        g->offset = json_number_value(nof);
        g->nested_quant_map = find2(st, wname, ".nested_quant_map");
        rc = need_tensor(st, g->nested_absmax, wname, ".nested_absmax", LT_F32,
                         (nb + nb2 - 1) / nb2, "one fp32 scale per nested block", err);
        if (rc == LT_OK)
            rc = need_tensor(st, g->nested_quant_map, wname, ".nested_quant_map", LT_F32, 256,
                             "the 256-entry dynamic map", err);
    }
done:
    json_decref(j);
    return rc;
}

lt_status bnb_group_read(const st_set *st, const char *weight_name, int64_t out, int64_t in,
                         bnb_group *g, char *err) {
    memset(g, 0, sizeof *g);
    g->weight = st_find(st, weight_name);
    if (!g->weight)
        return lt_fail(err, LT_ERR_FORMAT, "%s: tensor '%s' is missing",
                       st->n_files ? st->files[0].path : "checkpoint", weight_name);
    const char *file = file_of(st, g->weight);
    if (find2(st, weight_name, ".quant_state.bitsandbytes__fp4")) {
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s: '%s' is bitsandbytes fp4; fp4 is not supported: use an nf4 checkpoint "
                       "(bnb_4bit_quant_type=\"nf4\"), or load the 16-bit original with quant=nf4",
                       file, weight_name);
    }
    const st_tensor *qs = find2(st, weight_name, ".quant_state.bitsandbytes__nf4");
    if (qs) {
        g->kind = BNB_NF4;
        return read_nf4(st, weight_name, qs, out, in, g, err);
    }
    if (g->weight->dtype_ok && g->weight->dtype == LT_U8) {
        return lt_fail(
            err, LT_ERR_FORMAT,
            "%s: '%s' is U8 (a bitsandbytes 4-bit weight) but its quant_state "
            "('%s.quant_state.bitsandbytes__nf4') is missing; re-save the checkpoint with "
            "bitsandbytes, or load the 16-bit original with quant=nf4",
            file, weight_name, weight_name);
    }
    if (g->weight->dtype_ok && g->weight->dtype == LT_I8) {
        g->kind = BNB_INT8;
        char base[512];
        size_t len = strlen(weight_name);
        snprintf(base, sizeof base, "%.*s", (int)(len > 7 ? len - 7 : len), weight_name);
        if (len <= 7 || strcmp(weight_name + len - 7, ".weight") != 0) base[0] = 0;
        char sh[96];
        if (g->weight->ndim != 2 || g->weight->shape[0] != out || g->weight->shape[1] != in) {
            return lt_fail(err, LT_ERR_FORMAT,
                           "%s: int8 tensor '%s' has shape %s but config.json implies "
                           "[%lld, %lld]",
                           file, weight_name, st_shape_str(g->weight, sh, sizeof sh),
                           (long long)out, (long long)in);
        }
        g->scb = find2(st, base, ".SCB");
        if (!g->scb) {
            return lt_fail(
                err, LT_ERR_FORMAT,
                "%s: '%s' is int8 but '%s.SCB' (its fp32 row scales) is missing; an LLM.int8 "
                "checkpoint saves both: re-save it with bitsandbytes, or load the 16-bit "
                "original with quant=int8",
                file, weight_name, base);
        }
        return need_tensor(st, g->scb, base, ".SCB", LT_F32, out, "one fp32 scale per row", err);
    }
    g->kind = BNB_PLAIN;
    return LT_OK;
}

/* ---- writing a checkpoint -------------------------------------------------------------------- */

int bnb_py_float(double v, char *buf, size_t cap) {
    if (isnan(v)) return snprintf(buf, cap, "NaN");
    if (isinf(v)) return snprintf(buf, cap, "%sInfinity", v < 0 ? "-" : "");
    if (v == 0) return snprintf(buf, cap, "%s0.0", signbit(v) ? "-" : "");
    char e[48];
    for (int p = 1; p <= 17; p++) { /* the shortest correctly rounded digits that read back */
        snprintf(e, sizeof e, "%.*e", p - 1, v);
        if (strtod(e, NULL) == v) break;
    }
    const char *c = e;
    int neg = *c == '-';
    if (neg) c++;
    char d[24];
    int nd = 0;
    for (; *c && *c != 'e' && nd < 20; c++)
        if (*c != '.') d[nd++] = *c;
    while (nd > 1 && d[nd - 1] == '0')
        nd--;
    d[nd] = 0;
    int decpt = atoi(c + 1) + 1; /* v = 0.d * 10^decpt */
    char out[64];
    size_t k = 0;
    if (neg) out[k++] = '-';
    if (decpt <= -4 || decpt > 16) { /* d.ddde+XX */
        out[k++] = d[0];
        if (nd > 1) out[k++] = '.';
        for (int i = 1; i < nd; i++)
            out[k++] = d[i];
        k += (size_t)snprintf(out + k, sizeof out - k, "e%c%02d", decpt - 1 < 0 ? '-' : '+',
                              abs(decpt - 1));
    } else if (decpt <= 0) { /* 0.000ddd */
        out[k++] = '0';
        out[k++] = '.';
        for (int i = 0; i < -decpt; i++)
            out[k++] = '0';
        for (int i = 0; i < nd; i++)
            out[k++] = d[i];
    } else { /* ddd.ddd, or ddd000.0 */
        for (int i = 0; i < nd || i < decpt; i++) {
            if (i == decpt) out[k++] = '.';
            out[k++] = i < nd ? d[i] : '0';
        }
        if (decpt >= nd) {
            out[k++] = '.';
            out[k++] = '0';
        }
    }
    out[k] = 0;
    return snprintf(buf, cap, "%s", out);
}

int bnb_nf4_state_json(char *buf, size_t cap, int blocksize, const char *dtype, int64_t out,
                       int64_t in, int nested, int nested_blocksize, float offset) {
    char off[64] = "";
    if (nested) bnb_py_float((double)offset, off, sizeof off);
    if (!nested)
        return snprintf(buf, cap,
                        "{\"quant_type\": \"nf4\", \"blocksize\": %d, \"dtype\": \"%s\", "
                        "\"shape\": [%lld, %lld]}",
                        blocksize, dtype, (long long)out, (long long)in);
    return snprintf(buf, cap,
                    "{\"quant_type\": \"nf4\", \"blocksize\": %d, \"dtype\": \"%s\", "
                    "\"shape\": [%lld, %lld], \"nested_blocksize\": %d, \"nested_dtype\": "
                    "\"float32\", \"nested_offset\": %s}",
                    blocksize, dtype, (long long)out, (long long)in, nested_blocksize, off);
}

char *bnb_config_to_json(bnb_kind kind, int double_quant, const char *compute_dtype,
                         const char *const *skip, int n_skip) {
    int nf4 = kind == BNB_NF4;
    json_t *list = skip ? json_array() : json_null();
    for (int i = 0; skip && i < n_skip; i++)
        json_array_append_new(list, json_string(skip[i]));
    json_t *q = json_pack(
        "{s:s, s:b, s:b, s:b, s:b, s:f, s:o, s:b, s:b, s:s, s:b, s:s, s:s}", "quant_method",
        "bitsandbytes", "_load_in_4bit", nf4, "_load_in_8bit", !nf4, "load_in_4bit", nf4,
        "load_in_8bit", !nf4, "llm_int8_threshold", 6.0, "llm_int8_skip_modules", list,
        "llm_int8_enable_fp32_cpu_offload", 0, "llm_int8_has_fp16_weight", 0, "bnb_4bit_quant_type",
        nf4 ? "nf4" : "fp4", "bnb_4bit_use_double_quant", nf4 && double_quant,
        "bnb_4bit_compute_dtype", nf4 && compute_dtype ? compute_dtype : "float32",
        "bnb_4bit_quant_storage", "uint8");
    if (!q) return NULL;
    char *text = json_dumps(q, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(q);
    return text;
}

/* ---- quantization_config ------------------------------------------------------------------- */

void bnb_config_free(bnb_config *c) {
    for (int i = 0; c->skip && i < c->n_skip; i++)
        free(c->skip[i]);
    free(c->skip);
    memset(c, 0, sizeof *c);
}

static int json_flag(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    if (!v) {
        char k2[64];
        snprintf(k2, sizeof k2, "_%s", key); /* older BitsAndBytesConfig.to_dict spelling */
        v = json_object_get(o, k2);
    }
    return json_is_true(v);
}

static lt_status config_from(bnb_config *c, json_t *root, const char *what, char *err) {
    json_t *q = json_object_get(root, "quantization_config");
    lt_status rc = LT_OK;
    if (!q || json_is_null(q)) goto done;
    rc = LT_ERR_FORMAT;
    if (!json_is_object(q))
        return lt_fail(err, LT_ERR_FORMAT, "%s: quantization_config is not an object", what);
    json_t *m = json_object_get(q, "quant_method");
    if (!json_is_string(m) || strcmp(json_string_value(m), "bitsandbytes") != 0) {
        rc = lt_fail(err, LT_ERR_FORMAT,
                     "%s: quantization_config.quant_method is %s; only bitsandbytes (nf4, int8) "
                     "checkpoints load here: use the 16-bit original (optionally with quant=nf4)",
                     what, json_is_string(m) ? json_string_value(m) : "missing");
        goto done;
    }
    int in4 = json_flag(q, "load_in_4bit"), in8 = json_flag(q, "load_in_8bit");
    if (in4 == in8) {
        snprintf(err, LT_ERRLEN,
                 "%s: quantization_config must set exactly one of load_in_4bit and load_in_8bit",
                 what);
        goto done;
    }
    c->present = 1;
    c->kind = in4 ? BNB_NF4 : BNB_INT8;
    if (in4) {
        json_t *t = json_object_get(q, "bnb_4bit_quant_type");
        const char *ts = json_is_string(t) ? json_string_value(t) : "fp4";
        if (strcmp(ts, "nf4") != 0) {
            snprintf(err, LT_ERRLEN,
                     "%s: quantization_config.bnb_4bit_quant_type is %s; %s is not supported: use "
                     "an nf4 checkpoint (bnb_4bit_quant_type=\"nf4\"), or the 16-bit original with "
                     "quant=nf4",
                     what, ts, ts);
            c->present = 0;
            goto done;
        }
        c->double_quant = json_is_true(json_object_get(q, "bnb_4bit_use_double_quant"));
        json_t *cd = json_object_get(q, "bnb_4bit_compute_dtype");
        if (json_is_string(cd))
            snprintf(c->compute_dtype, sizeof c->compute_dtype, "%s", json_string_value(cd));
    }
    json_t *sk = json_object_get(q, "llm_int8_skip_modules");
    if (sk && !json_is_null(sk)) {
        if (!json_is_array(sk)) {
            snprintf(err, LT_ERRLEN,
                     "%s: quantization_config.llm_int8_skip_modules must be a "
                     "list of module names",
                     what);
            c->present = 0;
            goto done;
        }
        c->skip = calloc(json_array_size(sk) + 1, sizeof(char *));
        if (!c->skip) {
            snprintf(err, LT_ERRLEN, "%s: out of memory", what);
            goto done;
        }
        size_t i;
        json_t *v;
        json_array_foreach(sk, i, v) {
            if (!json_is_string(v)) continue;
            if (!(c->skip[c->n_skip] = strdup(json_string_value(v)))) {
                rc = lt_fail(err, LT_ERR_MEMORY, "%s: out of memory", what);
                goto done;
            }
            c->n_skip++;
        }
    }
    rc = LT_OK;
done:
    if (rc != LT_OK) bnb_config_free(c);
    return rc;
}

lt_status bnb_config_parse(bnb_config *c, const char *json, const char *what, char *err) {
    memset(c, 0, sizeof *c);
    json_error_t je;
    json_t *root = json_loads(json, 0, &je);
    if (!root) return lt_fail(err, LT_ERR_FORMAT, "%s: %s (line %d)", what, je.text, je.line);
    lt_status rc = config_from(c, root, what, err);
    json_decref(root);
    return rc;
}

lt_status bnb_config_load(bnb_config *c, const char *path, char *err) {
    memset(c, 0, sizeof *c);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) {
        return lt_fail(err, LT_ERR_FORMAT, "%s: %s (line %d)", path, je.text, je.line);
    }
    lt_status rc = config_from(c, root, path, err);
    json_decref(root);
    return rc;
}

int bnb_config_skips(const bnb_config *c, const char *module) {
    char hay[512];
    snprintf(hay, sizeof hay, "%s.", module);
    for (int i = 0; i < c->n_skip; i++) {
        char key[512];
        snprintf(key, sizeof key, "%s.", c->skip[i]);
        for (const char *p = strstr(hay, key); p; p = strstr(p + 1, key))
            if (p == hay || p[-1] == '.') return 1;
    }
    return 0;
}
