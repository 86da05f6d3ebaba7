/* gguf.h — lathe's own GGUF v3 writer and ggml-compatible quantizers (engine-private).
 *
 * Two layers, one header:
 *   - block formats: fp32 -> f32/f16/bf16/q8_0/q4_0/q5_0/q4_K/q6_K rows, byte-compatible with
 *     ggml's reference quantizers (gguf_quant.c), and the inverse for tests;
 *   - the writer: typed metadata, tensor infos, 32-byte aligned data, written atomically
 *     (temp file in the target folder, fsync, rename), streaming tensors through a fill
 *     callback so a model never has to exist twice in memory (gguf.c); or written as one
 *     member of a set of files that appear together (a model and its mmproj).
 * The Gemma 3 exporter built on these is cuda/export/gguf_export.h.
 * Errors are values: every function that can fail returns an lt_status and leaves a message
 * in the writer (gguf_writer_error). Nothing here prints, exits or aborts.
 * Must not touch: the model's weights (sources are read-only), anything outside cuda/.
 */
#ifndef LATHE_GGUF_H
#define LATHE_GGUF_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda/base/atomic_file.h"
#include "cuda/engine.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- ggml tensor types (ids as in ggml.h / gguf constants) ------------------------------- */

typedef enum gguf_type {
    GGUF_TYPE_F32 = 0,
    GGUF_TYPE_F16 = 1,
    GGUF_TYPE_Q4_0 = 2,
    GGUF_TYPE_Q5_0 = 6,
    GGUF_TYPE_Q8_0 = 8,
    GGUF_TYPE_Q4_K = 12,
    GGUF_TYPE_Q6_K = 14,
    GGUF_TYPE_BF16 = 30,
} gguf_type;

/* Weights per block (1 for f32/f16/bf16) and bytes per block; 0 for a type we do not write. */
int64_t gguf_type_block_len(gguf_type t);
size_t gguf_type_block_bytes(gguf_type t);
/* "f32", "q4_K", ...; "?" for an unknown id. */
const char *gguf_type_name(gguf_type t);
/* Bytes of one row of n weights; 0 when n is not a multiple of the block length. */
size_t gguf_row_bytes(gguf_type t, int64_t n);

/* Scalar conversions, round-to-nearest-even like ggml (NaN stays NaN, overflow -> inf). */
uint16_t gguf_fp32_to_fp16(float f);
float gguf_fp16_to_fp32(uint16_t h);
uint16_t gguf_fp32_to_bf16(float f);
float gguf_bf16_to_fp32(uint16_t h);

/* Quantizes one row x[n] into dst (gguf_row_bytes(t, n) bytes). n must be a multiple of the
 * block length (check gguf_row_bytes first). Byte-identical to ggml_quantize_chunk without an
 * importance matrix. Returns 0, or -1 for an unsupported type / bad n. */
int gguf_quantize_row(gguf_type t, const float *x, void *dst, int64_t n);
/* The inverse: y[n] fp32 from a row written by gguf_quantize_row. Returns 0 or -1. */
int gguf_dequantize_row(gguf_type t, const void *src, float *y, int64_t n);

/* ---- export types: what the user asks for, and llama.cpp's per-tensor policy ------------- */

/* The file types a user can ask for (%export_gguf type=...). */
typedef enum gguf_ftype {
    GGUF_FTYPE_F32 = 0,     /* general.file_type ALL_F32 */
    GGUF_FTYPE_F16 = 1,     /* MOSTLY_F16 */
    GGUF_FTYPE_Q4_0 = 2,    /* MOSTLY_Q4_0 */
    GGUF_FTYPE_Q8_0 = 7,    /* MOSTLY_Q8_0 */
    GGUF_FTYPE_Q4_K_M = 15, /* MOSTLY_Q4_K_M */
    GGUF_FTYPE_BF16 = 32,   /* MOSTLY_BF16 */
} gguf_ftype;

/* Parses "f32|f16|bf16|q8_0|q4_0|q4_k_m" (case-insensitive; "q4_K_M" too). 0 or -1. */
int gguf_ftype_parse(const char *s, gguf_ftype *out);
const char *gguf_ftype_name(gguf_ftype f);
/* The accepted spellings, for error messages. */
#define GGUF_FTYPE_CHOICES "f32, f16, bf16, q8_0, q4_0, q4_k_m"

/* Where a tensor sits in the model, for the mixing policy. */
typedef enum gguf_role {
    GGUF_ROLE_NORM,       /* 1-D tensors and *_norm.weight: always f32 */
    GGUF_ROLE_TOKEN_EMBD, /* token_embd.weight (also the output matrix when tied) */
    GGUF_ROLE_OUTPUT,     /* output.weight (untied models only) */
    GGUF_ROLE_ATTN_V,
    GGUF_ROLE_FFN_DOWN,
    GGUF_ROLE_OTHER_2D, /* every other matrix */
} gguf_role;

/* The tensor type llama.cpp would choose for this tensor in a file of type f
 * (convert_hf_to_gguf.py for f32/f16/bf16/q8_0, llama-quantize's policy for q4_0/q4_k_m),
 * including the fallbacks when ne0 is not a multiple of the block length
 * (q4_K -> q5_0, q6_K -> q8_0, then f16). layer/n_layers place attn_v and ffn_down;
 * tied: the model has no output.weight (token_embd doubles as output).
 * *fallback is set to 1 when a fallback was taken. */
gguf_type gguf_choose_type(gguf_ftype f, gguf_role role, int64_t ne0, int layer, int n_layers,
                           int tied, int *fallback);

/* ---- the writer ------------------------------------------------------------------------- */

typedef struct gguf_writer gguf_writer;

/* Fills rows [row0, row0+nrows) of a tensor as fp32, row-major: dst [nrows, ne0].
 * Returns LT_OK or an error with a message in err (errlen bytes). Called from the thread
 * that runs gguf_writer_write, in increasing row order. */
typedef lt_status (*gguf_fill_fn)(void *ctx, int64_t row0, int64_t nrows, float *dst, char *err,
                                  size_t errlen);

/* Progress: bytes of tensor data written so far, of total. */
typedef void (*gguf_progress_fn)(void *ctx, const char *tensor, int64_t done, int64_t total);

gguf_writer *gguf_writer_new(void); /* NULL when out of memory */
void gguf_writer_free(gguf_writer *w);
/* The message of the last failure ("" if none). */
const char *gguf_writer_error(const gguf_writer *w);

/* Metadata, in the order added. Keys: lowercase dotted ASCII, unique, < 65536 bytes.
 * general.alignment (u32 32) is added by the writer unless the caller set it. */
lt_status gguf_set_u32(gguf_writer *w, const char *key, uint32_t v);
lt_status gguf_set_i32(gguf_writer *w, const char *key, int32_t v);
lt_status gguf_set_u64(gguf_writer *w, const char *key, uint64_t v);
lt_status gguf_set_f32(gguf_writer *w, const char *key, float v);
lt_status gguf_set_bool(gguf_writer *w, const char *key, int v);
lt_status gguf_set_str(gguf_writer *w, const char *key, const char *v);
lt_status gguf_set_arr_f32(gguf_writer *w, const char *key, const float *v, size_t n);
lt_status gguf_set_arr_i32(gguf_writer *w, const char *key, const int32_t *v, size_t n);
/* String array from a getter (a 262144-entry vocabulary need not be copied first):
 * get(ctx, i) returns the i-th string (UTF-8, NUL-terminated) or NULL on error. */
lt_status gguf_set_arr_str(gguf_writer *w, const char *key, size_t n,
                           const char *(*get)(void *ctx, size_t i), void *ctx);

/* Declares a tensor: ne[] fastest dimension first (PyTorch shape reversed), 1..4 dims, name
 * < 64 bytes and unique, ne[0] a multiple of the type's block length. Data comes from fill
 * when the file is written. The fill context must outlive gguf_writer_write. */
lt_status gguf_add_tensor(gguf_writer *w, const char *name, int n_dims, const int64_t *ne,
                          gguf_type type, gguf_fill_fn fill, void *fill_ctx);

typedef struct gguf_write_opts {
    int overwrite;             /* 0: refuse when path exists (checked before and at rename) */
    int n_threads;             /* quantization threads; 0 = online CPUs (at most 16) */
    const atomic_int *cancel;  /* polled between chunks; non-zero -> LT_CANCELLED */
    gguf_progress_fn progress; /* may be NULL */
    void *progress_ctx;
} gguf_write_opts;

/* Writes the file. Either a complete file appears at path or nothing does (the temp file is
 * removed on every failure). *bytes (may be NULL) receives the file size. */
lt_status gguf_writer_write(gguf_writer *w, const char *path, const gguf_write_opts *opts,
                            uint64_t *bytes);
/* The same as one member of a set of files committed together (a model and its mmproj): the
 * file is written and finished as set's temp for path, and appears only when the caller runs
 * lt_afile_set_commit (which replaces; overwrite=0 is checked here, before writing). On
 * failure this member's temp is removed; the caller aborts the set. */
lt_status gguf_writer_write_member(gguf_writer *w, lt_afile_set *set, const char *path,
                                   const gguf_write_opts *opts, uint64_t *bytes);

#ifdef __cplusplus
}
#endif
#endif
