/* quantized.h — the quantized-checkpoint exporter: a model whose linears are NF4 or int8, saved
 * in bitsandbytes' layout so transformers (with bitsandbytes) and %load read it back as it is.
 * Engine-private; the session calls it for %save quantized=.
 */
#ifndef LATHE_QUANTIZED_H
#define LATHE_QUANTIZED_H

#include "cuda/model/model.h"
#include "cuda/train/train.h"

/* Writes dir/config.json (the loaded text model's, else a generated Gemma3TextConfig, with
 * quantization_config set), dir/model.safetensors and, when tokenizer_path is given,
 * dir/tokenizer.model, as one atomic set. Each quantized linear P is written as bitsandbytes
 * saves it: NF4 as P.weight (U8 [(n+1)/2, 1]), P.weight.absmax, P.weight.quant_map, with double
 * quantization P.weight.nested_absmax and P.weight.nested_quant_map, and the JSON
 * P.weight.quant_state.bitsandbytes__nf4; int8 as P.weight (I8 [out, in]), P.SCB and
 * P.weight_format. The embedding, norms, head and the linears kept in 16 bits (listed in
 * llm_int8_skip_modules with lm_head) are written in dtype ("auto" = the model's storage dtype,
 * "bf16", "fp16", "fp32"). A model with no quantized linear is refused (LT_ERR_STATE). dev: the
 * backend ctx holding m's tensors (NULL = host memory). a: attached adapters, which are NOT
 * written (the checkpoint holds the quantized base); cb->message (cb may be NULL) says so.
 * err: LT_ERRLEN bytes. */
lt_status quantized_save(const lt_adapters *a, gemma3_model *m, lt_ctx *dev, const char *src_dir,
                         const char *tokenizer_path, const char *dtype, const char *dir,
                         const lt_callbacks *cb, char *err);

#endif
