/* gguf_export.h — the Gemma 3 exporter: a loaded model (its enabled LoRA adapters merged in
 * fp32) and its tokenizer as a GGUF file llama.cpp loads, with llama.cpp's tensor names,
 * metadata and per-tensor type policy. Built on the GGUF writer and block quantizers of
 * cuda/formats/gguf.h. Engine-private; the session calls it for %export_gguf.
 */
#ifndef LATHE_GGUF_EXPORT_H
#define LATHE_GGUF_EXPORT_H

#include "cuda/formats/gguf.h"
#include "cuda/model/model.h"

typedef struct gguf_export_opts {
    gguf_ftype ftype;
    int overwrite;
    int n_threads;            /* 0 = online CPUs */
    const char *name;         /* general.name; NULL = the source's folder name */
    const atomic_int *cancel; /* polled between chunks; may be NULL */
    const lt_callbacks *cb; /* message + progress("export", bytes done, bytes total); may be NULL */
    lt_afile_set *set;      /* non-NULL: the file is written as a member of set, and appears only
                               when the caller commits it (with an mmproj, mmproj_export.h) */
} gguf_export_opts;

typedef struct gguf_export_result {
    uint64_t bytes; /* file size */
    int n_tensors;
    int n_fallback; /* tensors written in a fallback type (rows not a multiple of the block) */
} gguf_export_result;

/* Writes model m (with its enabled LoRA adapters merged in fp32) and tokenizer tok as a GGUF
 * file llama.cpp loads. dev: the backend holding the weights (NULL = host memory).
 * err: LT_ERRLEN bytes. The model is not modified. */
lt_status gguf_export_gemma3(struct gemma3_model *m, const struct lt_tokenizer *tok,
                             struct lt_ctx *dev, const char *path, const gguf_export_opts *o,
                             gguf_export_result *res, char *err);

/* Writes the finished writer w to path (or, with o->set, as a member of that set) with o's
 * overwrite, threads and cancel, its progress reported to o->cb under label; the writer's
 * message in err on failure. Shared by the text and the mmproj exporters. */
lt_status gguf_export_write(gguf_writer *w, const char *path, const gguf_export_opts *o,
                            const char *label, uint64_t *bytes, char *err);

/* HF weight name -> llama.cpp tensor name ("model.layers.3.mlp.up_proj.weight" ->
 * "blk.3.ffn_up.weight"); *layer (-1 outside layers) and *role (a gguf_role). 0 or -1. */
int gguf_export_tensor_name(const char *hf, char *out, size_t cap, int *layer, int *role);

#endif
