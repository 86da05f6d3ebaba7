/* fuzz_hfconfig.c — libFuzzer harness for a model's config.json (cuda/formats/hfconfig.c and the
 * quantization_config reader of cuda/formats/bnb.c): the file `%load ORG/NAME` reads first.
 *
 * The model loader reads config.json twice, once for the Gemma 3 shapes (gemma3_config_parse,
 * what gemma3_config_load hands the text to) and once for bitsandbytes' quantization_config
 * (bnb_config_parse); the harness does both on the same text. An accepted config must be one
 * the model code can size: positive shapes, at most GEMMA3_MAX_LAYERS layers, a layer type per
 * layer; an accepted quantization_config must list its skipped modules.
 */
#include "fuzz/fuzz_util.h"

#include "cuda/formats/bnb.h"
#include "cuda/formats/hfconfig.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = fuzz_text(data, size);
    gemma3_config c;
    char err[LT_ERRLEN] = "";
    if (gemma3_config_parse(&c, text, "config.json", err) == LT_OK) {
        FUZZ_CHECK(c.hidden_size > 0 && c.intermediate_size > 0 && c.head_dim > 0 &&
                   c.num_attention_heads > 0 && c.num_key_value_heads > 0 && c.vocab_size > 0);
        FUZZ_CHECK(c.num_hidden_layers > 0 && c.num_hidden_layers <= GEMMA3_MAX_LAYERS);
        FUZZ_CHECK(c.num_attention_heads % c.num_key_value_heads == 0);
        for (int l = 0; l < c.num_hidden_layers; l++)
            FUZZ_CHECK(c.layer_types[l] == GEMMA3_SLIDING || c.layer_types[l] == GEMMA3_FULL);
        FUZZ_CHECK(c.n_eos_ids >= 0 && c.n_eos_ids <= 4);
    } else {
        FUZZ_CHECK(err[0] != '\0');
    }
    bnb_config q;
    err[0] = '\0';
    if (bnb_config_parse(&q, text, "config.json", err) == LT_OK) {
        FUZZ_CHECK(q.n_skip == 0 || q.skip != NULL);
        for (int i = 0; i < q.n_skip; i++)
            FUZZ_CHECK(q.skip[i] != NULL);
        (void)bnb_config_skips(&q, "model.layers.0.mlp.down_proj");
        (void)bnb_config_skips(&q, "lm_head");
        bnb_config_free(&q);
    } else {
        FUZZ_CHECK(err[0] != '\0');
    }
    free(text);
    return 0;
}
