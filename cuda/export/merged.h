/* merged.h — the merged-checkpoint exporter: a loaded model with its trained adapters merged
 * in, as a folder transformers loads (config.json + model.safetensors + tokenizer.model).
 * Engine-private; the session calls it for %save merged=.
 */
#ifndef LATHE_MERGED_H
#define LATHE_MERGED_H

#include "cuda/model/model.h"
#include "cuda/train/train.h"

/* Writes dir/config.json (the one of src_dir when it has one, else generated),
 * dir/model.safetensors (dtype: "auto" = the model's, "bf16", "fp16" or "fp32") and, when
 * tokenizer_path is given, dir/tokenizer.model, as one atomic set. a: the adapters to merge
 * (NULL = none; the CPU backend only for now). err: LT_ERRLEN bytes. */
lt_status merged_save(const lt_adapters *a, gemma3_model *m, const char *src_dir,
                      const char *tokenizer_path, const char *dtype, const char *dir, char *err);

#endif
