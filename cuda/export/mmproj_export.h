/* mmproj_export.h — the image side of a multimodal Gemma 3 (its SigLIP tower and projector,
 * enabled LoRA adapters merged in fp32) as the "mmproj" GGUF file that llama.cpp's multimodal
 * tools (tools/mtmd: llama-mtmd-cli, llama-server --mmproj) load beside the text GGUF that
 * gguf_export.h writes. Engine-private; the session calls it for %export_gguf.
 */
#ifndef LATHE_MMPROJ_EXPORT_H
#define LATHE_MMPROJ_EXPORT_H

#include "cuda/export/gguf_export.h"

/* The name llama.cpp's users expect beside TEXT: "mmproj-" + TEXT's file name in TEXT's folder
 * ("out/gemma-q8_0.gguf" -> "out/mmproj-gemma-q8_0.gguf"), the prefix convert_hf_to_gguf.py
 * --mmproj gives its files. 0, or -1 when it does not fit in cap. */
int mmproj_default_path(const char *text_path, char *out, size_t cap);

/* The tensor type of one mmproj tensor in an export of file type f, as convert_hf_to_gguf.py's
 * Gemma3VisionModel picks it: 1-D tensors, norms, the patch and position embeddings f32; the
 * projection always f16; the encoder's matrices f32 / bf16 in an f32 / bf16 export, else f16
 * (a quantized text file is paired with an f16 mmproj, as llama.cpp's published files are). */
gguf_type mmproj_tensor_type(gguf_ftype f, const char *name, int n_dims);

/* Writes m's image tower and projector (m->vision) as an mmproj GGUF at path. dev: the backend
 * holding a device copy of the tower (NULL = host memory). o->set, when non-NULL, makes the file
 * a member of a set the caller commits with the text file. Refused (LT_ERR_STATE) for a model
 * without a tower. err: LT_ERRLEN bytes. The model is not modified. */
lt_status mmproj_export_gemma3(const struct gemma3_model *m, struct lt_ctx *dev, const char *path,
                               const gguf_export_opts *o, gguf_export_result *res, char *err);

#endif
