/* merged.h — the merged-checkpoint exporter: a loaded model with its trained adapters merged
 * in, as a folder transformers loads (config.json + model.safetensors + tokenizer.model), and
 * the small helpers the quantized exporter (quantized.h) shares with it. Engine-private; the
 * session calls it for %save merged=.
 */
#ifndef LATHE_MERGED_H
#define LATHE_MERGED_H

#include "cuda/formats/safetensors_write.h"
#include "cuda/model/model.h"
#include "cuda/train/train.h"

/* Writes dir/config.json (the one of src_dir when it has one, else generated; with adapters on
 * the image tower the whole multimodal model, text under model.language_model., the tower and
 * projector under transformers 5's names, src_dir's config.json required),
 * dir/model.safetensors (dtype: "auto" = the model's, "bf16", "fp16" or "fp32") and, when
 * tokenizer_path is given, dir/tokenizer.model, as one atomic set. a: the adapters to merge
 * (NULL = none). dev: the backend a model on a device lives in (NULL for a host model): each
 * weight and its adapter are read back one at a time and merged on the host, in fp32, as for a
 * host model. A quantized linear's base is its
 * original 16-bit weight when the model was quantized at load from a checkpoint it still maps,
 * else its dequantized values; cb->message (cb may be NULL) says which. err: LT_ERRLEN bytes. */
lt_status merged_save(const lt_adapters *a, gemma3_model *m, lt_ctx *dev, const char *src_dir,
                      const char *tokenizer_path, const char *dtype, const char *dir,
                      const lt_callbacks *cb, char *err);

/* dtype "auto" (NULL: the model's storage dtype, bf16 when that is not a float type), "fp32",
 * "fp16" or "bf16" -> *out; anything else is an LT_ERR_ARG naming `what` ("%save"). */
lt_status merged_parse_dtype(const gemma3_model *m, const char *dtype, const char *what,
                             lt_dtype *out, char *err);
/* transformers' spelling of a float dtype: "bfloat16", "float16", "float32". */
const char *merged_torch_dtype(lt_dtype d);
/* A flat Gemma3TextConfig for m (transformers reads it as Gemma3ForCausalLM) with torch_dtype
 * dt, as indented JSON text (malloc'd; NULL when out of memory). */
char *merged_text_config(const gemma3_model *m, lt_dtype dt);
/* A checkpoint folder as one atomic set: dir/model.safetensors (the n tensors t),
 * dir/config.json (a copy of the file config_path when it is given, else the text config) and,
 * when tokenizer_path is given, a copy of it as dir/tokenizer.model. All appear, or none. */
lt_status merged_write_folder(const char *dir, const st_out *t, int n, const char *config_path,
                              const char *config, const char *tokenizer_path, char *err);

#endif
