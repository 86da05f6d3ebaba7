/* fuzz_gguf.c — libFuzzer harness for GGUF block decoding (cuda/formats/gguf_quant.c) and the
 * type names of cuda/formats/gguf.c.
 *
 * The engine writes GGUF and reads no GGUF file: what it decodes of the format is the block
 * layout of each tensor type (gguf_dequantize_row, which the GGUF tests use to read lathe's
 * exports back). Byte 0 picks a type (f32, f16, bf16, q8_0, q4_0, q5_0, q4_K, q6_K), the rest
 * is rows of that type's blocks, decoded whole; a decoded row quantized again must decode to
 * finite values wherever the input was finite. The remaining bytes, as text, go to
 * gguf_ftype_parse (the %export_gguf type= value).
 */
#include "fuzz/fuzz_util.h"

#include <math.h>

#include "cuda/formats/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    static const gguf_type types[] = {GGUF_TYPE_F32,  GGUF_TYPE_F16,  GGUF_TYPE_BF16,
                                      GGUF_TYPE_Q8_0, GGUF_TYPE_Q4_0, GGUF_TYPE_Q5_0,
                                      GGUF_TYPE_Q4_K, GGUF_TYPE_Q6_K};
    gguf_type t = types[data[0] % 8];
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    int64_t bl = gguf_type_block_len(t);
    size_t bb = gguf_type_block_bytes(t);
    FUZZ_CHECK(bl > 0 && bb > 0);
    FUZZ_CHECK(strcmp(gguf_type_name(t), "?") != 0);
    size_t blocks = n / bb;
    if (blocks > 0) {
        int64_t ne = (int64_t)blocks * bl;
        FUZZ_CHECK(gguf_row_bytes(t, ne) == blocks * bb);
        void *src = malloc(blocks * bb); /* aligned copy, as a file's data section would be */
        float *y = malloc(sizeof(float) * (size_t)ne);
        void *q = malloc(blocks * bb);
        float *y2 = malloc(sizeof(float) * (size_t)ne);
        FUZZ_CHECK(src && y && q && y2);
        memcpy(src, p, blocks * bb);
        FUZZ_CHECK(gguf_dequantize_row(t, src, y, ne) == 0);
        int finite = 1;
        for (int64_t i = 0; i < ne; i++)
            finite &= isfinite(y[i]) != 0;
        if (finite) {
            FUZZ_CHECK(gguf_quantize_row(t, y, q, ne) == 0);
            FUZZ_CHECK(gguf_dequantize_row(t, q, y2, ne) == 0);
        }
        free(src);
        free(y);
        free(q);
        free(y2);
    }
    char *text = fuzz_text(p, n < 32 ? n : 32);
    gguf_ftype f;
    if (gguf_ftype_parse(text, &f) == 0) FUZZ_CHECK(strcmp(gguf_ftype_name(f), "?") != 0);
    free(text);
    return 0;
}
