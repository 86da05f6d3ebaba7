/* fuzz_bnb.c — libFuzzer harness for bitsandbytes' pre-quantized checkpoints
 * (cuda/formats/bnb.c): the quant_state JSON packed into a U8 tensor, and the absmax /
 * quant_map / nested_* / SCB tensors around each NF4 or int8 weight of a downloaded QLoRA
 * checkpoint.
 *
 * The input is a safetensors file (a memfd, st_open_file). For each tensor named "*.weight",
 * bnb_group_read is called as the model loader calls it, with the [out, in] the loader takes
 * from config.json: here the "shape" of the weight's quant_state when it has one (each side at
 * most 10^9, as config.json allows), else the tensor's own 2-D shape. An accepted quantized
 * group is then dequantized whole through lt_weight_dequantize_rows, the arithmetic every
 * consumer uses, from aligned copies of its state, as the loader places them.
 */
#include "fuzz/fuzz_util.h"

#include <jansson.h>

#include "cuda/backend/backend.h"
#include "cuda/formats/bnb.h"

/* The [out, in] config.json would give for weight w (0 when there is no sensible one). */
static int shape_of(const st_set *s, const st_tensor *w, int64_t *out, int64_t *in) {
    char name[600];
    snprintf(name, sizeof name, "%s.quant_state.bitsandbytes__nf4", w->name);
    const st_tensor *qs = st_find(s, name);
    if (qs) {
        json_t *j = json_loadb(qs->data, qs->nbytes, 0, NULL);
        json_t *sh = json_object_get(j, "shape");
        json_int_t a = json_integer_value(json_array_get(sh, 0)),
                   b = json_integer_value(json_array_get(sh, 1));
        json_decref(j);
        if (a > 0 && b > 0 && a <= 1000000000 && b <= 1000000000) {
            *out = a;
            *in = b;
            return 1;
        }
    }
    if (w->ndim == 2 && w->shape[0] > 0 && w->shape[1] > 0) {
        *out = w->shape[0];
        *in = w->shape[1];
        return 1;
    }
    return 0;
}

static float *copy_f32(const st_tensor *t) {
    float *p = malloc(t->nbytes ? t->nbytes : 1);
    FUZZ_CHECK(p != NULL);
    memcpy(p, t->data, t->nbytes);
    return p;
}

static void dequantize(const bnb_group *g, int64_t out, int64_t in) {
    lt_weight w;
    memset(&w, 0, sizeof w);
    float *code = NULL, *absmax = NULL, *absmax2 = NULL, *code2 = NULL, *scb = NULL;
    w.w = lt_tensor_2d(g->kind == BNB_NF4 ? LT_U8 : LT_I8, (void *)g->weight->data, out, in);
    if (g->kind == BNB_NF4) {
        w.q.kind = LT_QUANT_NF4;
        w.q.blocksize = g->blocksize;
        w.q.code = code = copy_f32(g->quant_map);
        if (g->nested) {
            w.q.qabsmax = g->absmax->data;
            w.q.absmax2 = absmax2 = copy_f32(g->nested_absmax);
            w.q.code2 = code2 = copy_f32(g->nested_quant_map);
            w.q.nested_blocksize = g->nested_blocksize;
            w.q.offset = (float)g->offset;
        } else {
            w.q.absmax = absmax = copy_f32(g->absmax);
        }
    } else {
        w.q.kind = LT_QUANT_INT8;
        w.q.scb = scb = copy_f32(g->scb);
    }
    float *row = malloc(sizeof(float) * (size_t)in);
    FUZZ_CHECK(row != NULL);
    for (int64_t r = 0; r < out; r++)
        lt_weight_dequantize_rows(&w, r, 1, row);
    free(row);
    free(code);
    free(absmax);
    free(absmax2);
    free(code2);
    free(scb);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    st_set s;
    memset(&s, 0, sizeof s);
    char err[LT_ERRLEN] = "";
    if (st_open_file(&s, fuzz_file(data, size), err) != LT_OK) {
        st_close(&s);
        return 0;
    }
    for (int i = 0; i < s.n_tensors; i++) {
        const st_tensor *w = &s.tensors[i];
        size_t len = strlen(w->name);
        if (len < 7 || strcmp(w->name + len - 7, ".weight") != 0) continue;
        int64_t out, in;
        if (!shape_of(&s, w, &out, &in)) continue;
        bnb_group g;
        err[0] = '\0';
        if (bnb_group_read(&s, w->name, out, in, &g, err) != LT_OK) {
            FUZZ_CHECK(err[0] != '\0');
            continue;
        }
        /* the bytes an accepted group promises are there */
        if (g.kind == BNB_NF4) FUZZ_CHECK((int64_t)g.weight->nbytes == (out * in + 1) / 2);
        if (g.kind == BNB_INT8) FUZZ_CHECK((int64_t)g.weight->nbytes == out * in);
        if (g.kind != BNB_PLAIN) dequantize(&g, out, in);
    }
    st_close(&s);
    return 0;
}
