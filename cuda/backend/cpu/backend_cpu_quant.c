/* backend_cpu_quant.c — the values of a frozen weight in host memory, whatever its format:
 * 16-bit weights widened, bitsandbytes NF4 (with or without double quantization) and LLM.int8
 * weights dequantized to fp32.
 *
 * Owns lt_weight_dequantize_rows, lt_weight_parts and lt_weight_bytes (backend.h). This is the
 * arithmetic the CPU backend's quantized linear / linear_backward multiply with, the exporters
 * merge from, and a CUDA dequantize kernel must reproduce bit for bit. Every product and sum is one
 * fp32 operation in the order bitsandbytes' backends/default/ops.py performs it (nested absmax:
 * code2[q] * absmax2, then + offset; weight: code[nibble] * absmax; int8: w8 * SCB, then
 * * 7.874015718698502e-3). No FMA: this file is built for the baseline target only. It does
 * not quantize (formats/bnb.c does) and knows nothing of checkpoints or Gemma.
 */
#include <string.h>

#include "cuda/backend/backend.h"

int lt_weight_parts(lt_quant_kind kind, int64_t n, int64_t rows, size_t elem, int blocksize,
                    int nested_blocksize, size_t parts[LT_WEIGHT_MAX_PARTS]) {
    if (kind == LT_QUANT_NF4) {
        int64_t nb = (n + blocksize - 1) / blocksize;
        parts[0] = (size_t)((n + 1) / 2);
        parts[1] = 16 * sizeof(float);
        if (nested_blocksize <= 0) {
            parts[2] = (size_t)nb * sizeof(float);
            return 3;
        }
        int64_t nb2 = (nb + nested_blocksize - 1) / nested_blocksize;
        parts[2] = (size_t)nb;
        parts[3] = (size_t)nb2 * sizeof(float);
        parts[4] = 256 * sizeof(float);
        return 5;
    }
    if (kind == LT_QUANT_INT8) {
        parts[0] = (size_t)n;
        parts[1] = (size_t)rows * sizeof(float);
        return 2;
    }
    parts[0] = (size_t)n * elem;
    return 1;
}

size_t lt_weight_bytes(const lt_weight *w) {
    const lt_quant *q = &w->q;
    size_t parts[LT_WEIGHT_MAX_PARTS], bytes = 0;
    int np =
        lt_weight_parts(q->kind, lt_tensor_numel(&w->w), w->w.shape[0], lt_dtype_size(w->w.dtype),
                        q->blocksize, q->qabsmax ? q->nested_blocksize : 0, parts);
    for (int i = 0; i < np; i++)
        bytes += parts[i];
    return bytes;
}

/* The fp32 scale of NF4 block b. */
static float nf4_absmax(const lt_quant *q, int64_t b) {
    if (!q->qabsmax) return q->absmax[b];
    float v = q->code2[q->qabsmax[b]] * q->absmax2[b / q->nested_blocksize];
    return v + q->offset;
}

static void nf4_rows(const lt_weight *w, int64_t r0, int64_t nr, float *dst) {
    const lt_quant *q = &w->q;
    const uint8_t *packed = w->w.data;
    int64_t in = w->w.shape[1], e0 = r0 * in, e1 = (r0 + nr) * in;
    int64_t bs = q->blocksize;
    for (int64_t e = e0; e < e1;) {
        int64_t b = e / bs, end = (b + 1) * bs < e1 ? (b + 1) * bs : e1;
        float am = nf4_absmax(q, b);
        for (; e < end; e++) {
            uint8_t byte = packed[e >> 1];
            int code = (e & 1) ? (byte & 0x0f) : (byte >> 4);
            dst[e - e0] = q->code[code] * am;
        }
    }
}

static void int8_rows(const lt_weight *w, int64_t r0, int64_t nr, float *dst) {
    const int8_t *w8 = w->w.data;
    int64_t in = w->w.shape[1];
    for (int64_t r = 0; r < nr; r++) {
        float scb = w->q.scb[r0 + r];
        const int8_t *src = w8 + (r0 + r) * in;
        float *d = dst + r * in;
        for (int64_t c = 0; c < in; c++) {
            float v = (float)src[c] * scb;
            d[c] = v * 7.874015718698502e-3f;
        }
    }
}

void lt_weight_dequantize_rows(const lt_weight *w, int64_t r0, int64_t nr, float *dst) {
    int64_t in = w->w.shape[1];
    if (nr <= 0) return;
    switch (w->q.kind) {
    case LT_QUANT_NF4:
        nf4_rows(w, r0, nr, dst);
        return;
    case LT_QUANT_INT8:
        int8_rows(w, r0, nr, dst);
        return;
    case LT_QUANT_NONE:
        break;
    }
    size_t es = lt_dtype_size(w->w.dtype);
    lt_to_f32(dst, (const char *)w->w.data + (size_t)(r0 * in) * es, w->w.dtype, nr * in);
}
