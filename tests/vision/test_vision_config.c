/* test_vision_config.c — the image side of config.json (formats/hfconfig.c): a sparse
 * vision_config as google/gemma-3-4b-it ships it takes SiglipVisionConfig's and Gemma3Config's
 * defaults, the top-level ids are read under both spellings (*_index and *_id), a text-only
 * config has none, and a vision_config lathe cannot use leaves the text model loadable with
 * the reason kept. TAP.
 */
#include <stdio.h>
#include <string.h>

#include "cuda/formats/hfconfig.h"
#include "tests/unit/tap.h"

#define TEXT                                                                                       \
    "\"text_config\":{\"hidden_size\":2560,\"intermediate_size\":10240,"                           \
    "\"model_type\":\"gemma3_text\",\"num_hidden_layers\":34,\"sliding_window\":1024}"

int main(void) {
    char err[LT_ERRLEN];
    gemma3_config c;
    const char *hub = "{\"model_type\":\"gemma3\"," TEXT ",\"boi_token_index\":255999,"
                      "\"eoi_token_index\":256000,\"image_token_index\":262144,"
                      "\"mm_tokens_per_image\":256,\"vision_config\":{\"hidden_size\":1152,"
                      "\"image_size\":896,\"intermediate_size\":4304,\"model_type\":"
                      "\"siglip_vision_model\",\"num_attention_heads\":16,"
                      "\"num_hidden_layers\":27,\"patch_size\":14,\"vision_use_head\":false}}";
    ok(gemma3_config_parse(&c, hub, "4b/config.json", err) == LT_OK, "the 4B's config parses");
    const gemma3_vision_config *v = &c.vision;
    ok(v->present, "it has an image tower");
    ok(v->hidden_size == 1152 && v->intermediate_size == 4304 && v->num_hidden_layers == 27 &&
           v->num_attention_heads == 16 && v->image_size == 896 && v->patch_size == 14,
       "the tower's sizes as written");
    ok(v->num_channels == 3 && v->layer_norm_eps == 1e-6 &&
           !strcmp(v->hidden_act, "gelu_pytorch_tanh"),
       "SiglipVisionConfig's defaults for what the 4B leaves out");
    ok(v->mm_tokens_per_image == 256 && v->image_token_id == 262144 && v->boi_token_id == 255999 &&
           v->eoi_token_id == 256000,
       "the top-level image fields");

    const char *ids = "{\"model_type\":\"gemma3\"," TEXT ",\"boi_token_id\":8,\"eoi_token_id\":9,"
                      "\"image_token_id\":4096,\"mm_tokens_per_image\":16,\"vision_config\":{"
                      "\"image_size\":64,\"patch_size\":8,\"hidden_size\":32,"
                      "\"num_attention_heads\":4}}";
    ok(gemma3_config_parse(&c, ids, "ids/config.json", err) == LT_OK && c.vision.present,
       "the *_id spelling parses");
    ok(c.vision.boi_token_id == 8 && c.vision.eoi_token_id == 9 &&
           c.vision.image_token_id == 4096 && c.vision.mm_tokens_per_image == 16,
       "ids read under the *_id spelling");
    ok(c.vision.num_hidden_layers == 12 && c.vision.intermediate_size == 3072,
       "SiglipVisionConfig's class defaults for the rest");

    const char *defaults = "{\"model_type\":\"gemma3\"," TEXT ",\"vision_config\":{"
                           "\"image_size\":896,\"patch_size\":14}}";
    ok(gemma3_config_parse(&c, defaults, "d/config.json", err) == LT_OK && c.vision.present &&
           c.vision.mm_tokens_per_image == 256 && c.vision.image_token_id == 262144,
       "Gemma3Config's defaults for absent top-level fields");

    const char *text = "{\"model_type\":\"gemma3_text\",\"hidden_size\":64,"
                       "\"intermediate_size\":128,\"num_hidden_layers\":2}";
    ok(gemma3_config_parse(&c, text, "t/config.json", err) == LT_OK && !c.vision.present &&
           !c.vision.error[0],
       "a text-only config has no tower and no complaint");

    const char *bad = "{\"model_type\":\"gemma3\"," TEXT ",\"mm_tokens_per_image\":256,"
                      "\"vision_config\":{\"hidden_size\":1152,\"model_type\":"
                      "\"siglip_vision_model\"}}"; /* 224 / 16 = 14 patches a side: 16 won't go */
    ok(gemma3_config_parse(&c, bad, "bad/config.json", err) == LT_OK,
       "an unusable vision_config still loads the text model");
    ok(!c.vision.present && strstr(c.vision.error, "mm_tokens_per_image") &&
           strstr(c.vision.error, "bad/config.json"),
       "... with the reason kept");
    diag("%s", c.vision.error);
    ok(c.hidden_size == 2560 && c.num_hidden_layers == 34, "... and the text config intact");

    const char *act = "{\"model_type\":\"gemma3\"," TEXT ",\"mm_tokens_per_image\":16,"
                      "\"vision_config\":{\"image_size\":64,\"patch_size\":8,"
                      "\"hidden_act\":\"relu\"}}";
    ok(gemma3_config_parse(&c, act, "act/config.json", err) == LT_OK && !c.vision.present &&
           strstr(c.vision.error, "hidden_act"),
       "another activation is refused for the tower, with its reason");
    const char *heads = "{\"model_type\":\"gemma3\"," TEXT ",\"mm_tokens_per_image\":16,"
                        "\"vision_config\":{\"image_size\":64,\"patch_size\":8,"
                        "\"hidden_size\":30,\"num_attention_heads\":4}}";
    ok(gemma3_config_parse(&c, heads, "h/config.json", err) == LT_OK && !c.vision.present &&
           strstr(c.vision.error, "num_attention_heads"),
       "a width that the heads do not divide is refused for the tower");
    const char *kind = "{\"model_type\":\"gemma3\"," TEXT ",\"vision_config\":{"
                       "\"model_type\":\"clip_vision_model\"}}";
    ok(gemma3_config_parse(&c, kind, "k/config.json", err) == LT_OK && !c.vision.present &&
           strstr(c.vision.error, "siglip_vision_model"),
       "a tower that is not SigLIP is refused for the tower");
    return tap_done();
}
