/* test_config.c — config.json in its three styles, the class defaults a sparse
 * text_config leans on, every bad key (missing, wrong type, garbled), the random:* presets, and
 * loading checkpoints: the three weight prefixes, skipped vision tensors, the tied head, and
 * tensors that are missing or shaped unlike the config. bitsandbytes' quantization_config
 * refused when garbled or of another method (LT_ERR_FORMAT), and a double-quantized NF4 group
 * whose quant_state lacks nested_blocksize refused (it was accepted with its state missing).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/formats/bnb.h"
#include "cuda/model/model.h"
#include "tests/engine/st_write.h"
#include "tests/unit/tap.h"

static gemma3_config cfg;
static char err[LT_ERRLEN];

static lt_status parse(const char *json) {
    err[0] = 0;
    return gemma3_config_parse(&cfg, json, "config.json", err);
}

static void expect_bad(const char *json, const char *key, const char *name) {
    lt_status rc = parse(json);
    int good = rc != LT_OK && strstr(err, "config.json") && strstr(err, key);
    ok(good, name);
    if (!good) diag("rc %d, err: %s", rc, err);
}

static const char *FLAT_1B =
    "{\"architectures\":[\"Gemma3ForCausalLM\"],\"attention_bias\":false,\"attn_logit_"
    "softcapping\":null,"
    "\"bos_token_id\":2,\"eos_token_id\":[1,106],\"final_logit_softcapping\":null,\"head_dim\":256,"
    "\"hidden_activation\":\"gelu_pytorch_tanh\",\"hidden_size\":1152,\"intermediate_size\":6912,"
    "\"max_position_embeddings\":32768,\"model_type\":\"gemma3_text\",\"num_attention_heads\":4,"
    "\"num_hidden_layers\":26,\"num_key_value_heads\":1,\"pad_token_id\":0,\"query_pre_attn_"
    "scalar\":256,"
    "\"rms_norm_eps\":1e-06,\"rope_local_base_freq\":10000,\"rope_scaling\":null,\"rope_theta\":"
    "1000000,"
    "\"sliding_window\":512,\"sliding_window_pattern\":6,\"vocab_size\":262144}";

static const char *NESTED_4B =
    "{\"architectures\":[\"Gemma3ForConditionalGeneration\"],\"boi_token_index\":255999,"
    "\"eoi_token_index\":256000,\"eos_token_id\":[1,106],\"image_token_index\":262144,"
    "\"initializer_range\":0.02,\"mm_tokens_per_image\":256,\"model_type\":\"gemma3\","
    "\"text_config\":{\"hidden_size\":2560,\"intermediate_size\":10240,\"model_type\":\"gemma3_"
    "text\","
    "\"num_hidden_layers\":34,\"rope_scaling\":{\"factor\":8.0,\"rope_type\":\"linear\"},\"sliding_"
    "window\":1024},"
    "\"torch_dtype\":\"bfloat16\",\"vision_config\":{\"hidden_size\":1152,\"model_type\":\"siglip_"
    "vision_model\"}}";

static const char *TF5 = "{\"model_type\":\"gemma3_text\",\"hidden_size\":48,\"intermediate_size\":"
                         "80,\"num_hidden_layers\":4,"
                         "\"num_attention_heads\":6,\"num_key_value_heads\":2,\"head_dim\":16,"
                         "\"query_pre_attn_scalar\":24,"
                         "\"sliding_window\":5,\"vocab_size\":300,\"layer_types\":[\"sliding_"
                         "attention\",\"full_attention\","
                         "\"sliding_attention\",\"full_attention\"],\"rope_parameters\":{\"full_"
                         "attention\":{\"rope_type\":\"linear\","
                         "\"factor\":4.0,\"rope_theta\":500000.0},\"sliding_attention\":{\"rope_"
                         "type\":\"default\",\"rope_theta\":20000.0}}}";

static void test_styles(void) {
    is_int(parse(FLAT_1B), LT_OK, "flat 1B config parses");
    is_int(cfg.hidden_size, 1152, "1B hidden_size");
    is_int(cfg.num_key_value_heads, 1, "1B kv heads");
    is_int(cfg.vocab_size, 262144, "1B vocab");
    is_int(cfg.layer_types[5], GEMMA3_FULL, "1B layer 5 is global");
    is_int(cfg.layer_types[24], GEMMA3_SLIDING, "1B layer 24 is sliding");
    is_int(cfg.layer_types[25], GEMMA3_SLIDING, "1B layer 25 is sliding");
    is_close(cfg.rope[GEMMA3_FULL].theta, 1e6, 0, "1B global theta 1e6");
    is_close(cfg.rope[GEMMA3_SLIDING].theta, 1e4, 0, "1B local theta 1e4");
    is_close(cfg.rope[GEMMA3_FULL].factor, 1.0, 0, "1B: no rope scaling");
    is_int(cfg.n_eos_ids, 2, "1B: two stop ids");
    is_int(cfg.eos_ids[1], 106, "1B: <end_of_turn> stops");
    ok(!cfg.multimodal, "1B is not multimodal");

    is_int(parse(NESTED_4B), LT_OK, "nested sparse 4B config parses");
    if (err[0]) diag("%s", err);
    is_int(cfg.hidden_size, 2560, "4B hidden_size from text_config");
    is_int(cfg.num_attention_heads, 8, "4B heads from the class default (8)");
    is_int(cfg.num_key_value_heads, 4, "4B kv heads from the class default (4)");
    is_int(cfg.head_dim, 256, "4B head_dim default 256");
    is_int(cfg.vocab_size, 262208, "4B vocab default 262208");
    is_close(cfg.query_pre_attn_scalar, 256, 0, "4B query_pre_attn_scalar default 256");
    is_int(cfg.max_position_embeddings, 131072, "4B max positions default 131072");
    is_int(cfg.sliding_window, 1024, "4B sliding window from text_config");
    is_close(cfg.rope[GEMMA3_FULL].factor, 8.0, 0, "4B global rope: linear x8");
    is_close(cfg.rope[GEMMA3_SLIDING].factor, 1.0, 0, "4B local rope: unscaled");
    is_close(cfg.rope[GEMMA3_SLIDING].theta, 1e4, 0, "4B local theta default 1e4");
    ok(cfg.tie_word_embeddings, "4B head tied by default");
    ok(cfg.multimodal, "4B is multimodal");
    is_int(cfg.layer_types[29], GEMMA3_FULL, "4B layer 29 global");
    is_int(cfg.layer_types[33], GEMMA3_SLIDING, "4B layer 33 sliding");
    is_int(cfg.eos_ids[1], 106, "4B top-level eos list");

    is_int(parse(TF5), LT_OK, "transformers-5 config parses");
    is_int(cfg.layer_types[0], GEMMA3_SLIDING, "layer_types[0] obeyed");
    is_int(cfg.layer_types[1], GEMMA3_FULL, "layer_types[1] obeyed (not the pattern)");
    is_close(cfg.rope[GEMMA3_FULL].theta, 500000, 0, "rope_parameters.full_attention theta");
    is_close(cfg.rope[GEMMA3_FULL].factor, 4, 0, "rope_parameters.full_attention factor");
    is_close(cfg.rope[GEMMA3_SLIDING].theta, 20000, 0, "rope_parameters.sliding_attention theta");
    is_close(cfg.query_pre_attn_scalar, 24, 0, "query_pre_attn_scalar read");
}

static void test_bad(void) {
    expect_bad("{\"model_type\":\"gemma3_text\",\"intermediate_size\":8,\"num_hidden_layers\":2}",
               "'hidden_size'", "missing hidden_size names the key");
    expect_bad(
        "{\"model_type\":\"gemma3\",\"text_config\":{\"hidden_size\":8,\"num_hidden_layers\":2}}",
        "'text_config.intermediate_size'", "nested: missing key named with its path");
    expect_bad("{\"model_type\":\"gemma3_text\",\"hidden_size\":8,\"intermediate_size\":8,\"num_"
               "hidden_layers\":2,"
               "\"num_attention_heads\":\"4\"}",
               "'num_attention_heads' is not an integer", "a string where an integer belongs");
    expect_bad("{\"model_type\":\"gemma3_text\",\"hidden_size\":8,\"intermediate_size\":8,\"num_"
               "hidden_layers\":2,"
               "\"rms_norm_eps\":\"tiny\"}",
               "'rms_norm_eps' is not a number", "a string where a number belongs");
    expect_bad("{\"model_type\": \"gemma3_text\", \"hidden_size\": 8,", "garbled", "garbled JSON");
    expect_bad(
        "{\"model_type\":\"gemma3_text\",\"hidden_size\":8,\"intermediate_size\":3e84,"
        "\"num_hidden_layers\":2}",
        "'intermediate_size' = 3e+84 is out of range",
        "a whole number written as a huge real is out of range (was a float-to-int overflow)");
    expect_bad("{\"hidden_size\":8}", "'model_type'", "missing model_type");
    expect_bad("{\"model_type\":\"llama\",\"hidden_size\":8}", "llama", "a non-Gemma model_type");
    expect_bad("{\"model_type\":\"gemma3\"}", "'text_config'", "gemma3 without text_config");
    expect_bad("{\"model_type\":\"gemma3_text\",\"hidden_size\":8,\"intermediate_size\":8,\"num_"
               "hidden_layers\":2,"
               "\"layer_types\":[\"full_attention\"]}",
               "'layer_types'", "layer_types of the wrong length");
    expect_bad("{\"model_type\":\"gemma3_text\",\"hidden_size\":8,\"intermediate_size\":8,\"num_"
               "hidden_layers\":2,"
               "\"layer_types\":[\"full_attention\",\"global\"]}",
               "'layer_types[1]'", "an unknown layer type");
    expect_bad("{\"model_type\":\"gemma3_text\",\"hidden_size\":8,\"intermediate_size\":8,\"num_"
               "hidden_layers\":2,"
               "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":2}}",
               "'rope_scaling.rope_type' = 'yarn'", "an unsupported rope type");
    expect_bad("{\"model_type\":\"gemma3_text\",\"hidden_size\":8,\"intermediate_size\":8,\"num_"
               "hidden_layers\":2,"
               "\"rope_scaling\":{\"rope_type\":\"linear\"}}",
               "'rope_scaling.factor'", "linear rope without a factor");
    expect_bad("{\"model_type\":\"gemma3_text\",\"hidden_size\":8,\"intermediate_size\":8,\"num_"
               "hidden_layers\":2,"
               "\"num_attention_heads\":6,\"num_key_value_heads\":4}",
               "not a multiple", "heads not a multiple of kv heads");
    expect_bad("{\"model_type\":\"gemma3_text\",\"hidden_size\":-8,\"intermediate_size\":8,\"num_"
               "hidden_layers\":2}",
               "'hidden_size' = -8", "a negative size");
    expect_bad("{\"model_type\":\"gemma3_text\",\"hidden_size\":8,\"intermediate_size\":8,\"num_"
               "hidden_layers\":2,"
               "\"tie_word_embeddings\":1}",
               "'tie_word_embeddings' is not true/false", "a number where a boolean belongs");
    expect_bad("[1,2]", "not a JSON object", "a JSON list");
    /* a file that does not exist */
    lt_status rc = gemma3_config_load(&cfg, "/nonexistent/dir/config.json", err);
    ok(rc == LT_ERR_IO && strstr(err, "/nonexistent/dir/config.json"),
       "a missing config.json names its path");
}

static void test_presets(void) {
    const struct {
        const char *size;
        int H, L, nh, nkv, hd, V, globals;
        double qpas, factor;
    } want[] = {
        {"270m", 640, 18, 4, 1, 256, 262144, 3, 256, 1},
        {"1b", 1152, 26, 4, 1, 256, 262144, 4, 256, 1},
        {"4b", 2560, 34, 8, 4, 256, 262208, 5, 256, 8},
        {"12b", 3840, 48, 16, 8, 256, 262208, 8, 256, 8},
        {"27b", 5376, 62, 32, 16, 128, 262208, 10, 168, 8},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        char name[128];
        lt_status rc = gemma3_config_preset(&cfg, want[i].size, err);
        int g = 0;
        for (int l = 0; l < cfg.num_hidden_layers; l++)
            g += cfg.layer_types[l] == GEMMA3_FULL;
        snprintf(name, sizeof name, "preset %s has the real shapes", want[i].size);
        ok(rc == LT_OK && cfg.hidden_size == want[i].H && cfg.num_hidden_layers == want[i].L &&
               cfg.num_attention_heads == want[i].nh && cfg.num_key_value_heads == want[i].nkv &&
               cfg.head_dim == want[i].hd && cfg.vocab_size == want[i].V && g == want[i].globals &&
               cfg.query_pre_attn_scalar == want[i].qpas &&
               cfg.rope[GEMMA3_FULL].factor == want[i].factor,
           name);
    }
    ok(gemma3_config_preset(&cfg, "2b", err) == LT_ERR_ARG && strstr(err, "270m, 1b, 4b, 12b, 27b"),
       "an unknown preset lists the accepted sizes");
}

/* ---- loading checkpoints ---------------------------------------------------------------- */

static char tmp[256];

static lt_status load_spec(const tiny_spec *sp, const char *sub, gemma3_model **m,
                           const char *dtype) {
    char d[512];
    snprintf(d, sizeof d, "%s/%s", tmp, sub);
    mkdir(d, 0755);
    tiny_ckpt_write(d, sp);
    err[0] = 0;
    return gemma3_load_dir(m, d, dtype, NULL, err);
}

static int visit_count(void *user, const char *name, lt_tensor *t) {
    int *n = user;
    if (*n == 0 && strcmp(name, "model.embed_tokens.weight")) return -1;
    (*n)++;
    return t && t->data ? 0 : -2;
}

static void test_load(void) {
    tiny_spec base = {
        .V = 40, .H = 16, .I = 24, .L = 2, .nh = 2, .nkv = 1, .hd = 8, .window = 4, .qpas = 8};
    const char *prefixes[] = {"model.", "language_model.model.", "model.language_model."};
    for (int i = 0; i < 3; i++) {
        tiny_spec sp = base;
        sp.prefix = prefixes[i];
        sp.with_vision = i == 1;
        gemma3_model *m = NULL;
        char sub[32], name[160];
        snprintf(sub, sizeof sub, "p%d", i);
        lt_status rc = load_spec(&sp, sub, &m, NULL);
        snprintf(name, sizeof name, "loads weights under prefix '%s'", prefixes[i]);
        ok(rc == LT_OK && m, name);
        if (rc != LT_OK) {
            diag("%s", err);
            continue;
        }
        if (i == 1) ok(m->skipped_vision, "vision tensors are skipped and reported");
        if (i == 0) {
            ok(!m->skipped_vision, "no vision tensors: none reported");
            is_int(gemma3_weight_count(m), 1 + 2 * 13 + 1,
                   "weight count: embed + 13 per layer + norm");
            char nm[160];
            lt_tensor *t = gemma3_weight_at(m, 2, nm, sizeof nm);
            is_str(nm, "model.layers.0.self_attn.q_proj.weight", "weight 2 is layer 0's q_proj");
            ok(t && t->shape[0] == 16 && t->shape[1] == 16, "q_proj shape [nh*hd, H]");
            t = gemma3_weight_at(m, gemma3_weight_count(m) - 1, nm, sizeof nm);
            is_str(nm, "model.norm.weight", "the last weight is the final norm (tied head)");
            int n = 0;
            is_int(gemma3_weights_foreach(m, visit_count, &n), 0, "foreach visits every weight");
            is_int(n, gemma3_weight_count(m), "foreach count == weight_count");
            ok(gemma3_head(m) == &m->embed_tokens, "the head is the embedding (tied)");
            is_int(m->embed_tokens.w.dtype, LT_F32, "auto keeps F32");
            is_int(m->n_params,
                   40 * 16 + 2 * (16 * 16 + 8 * 16 * 2 + 16 * 16 + 3 * 24 * 16 + 4 * 16 + 2 * 8) +
                       16,
                   "n_params counts every text weight");
        }
        gemma3_model_free(m);
    }
    /* dtype conversion on load */
    {
        tiny_spec sp = base;
        sp.prefix = "model.";
        gemma3_model *m = NULL;
        lt_status rc = load_spec(&sp, "bf", &m, "bf16");
        ok(rc == LT_OK && m->layers[0].q_proj.w.dtype == LT_BF16 &&
               m->layers[0].q_norm.dtype == LT_F32,
           "dtype=bf16 converts matrices, keeps norms fp32");
        gemma3_model_free(m);
        rc = load_spec(&sp, "bf", &m, "int3");
        ok(rc == LT_ERR_ARG && strstr(err, "dtype='int3'") && strstr(err, "fp32"),
           "a bad dtype= lists the accepted");
    }
    /* an untied head is loaded and used */
    {
        tiny_spec sp = base;
        sp.prefix = "model.";
        sp.untied = 1;
        gemma3_model *m = NULL;
        lt_status rc = load_spec(&sp, "untied", &m, NULL);
        ok(rc == LT_OK && m->lm_head.w.data && gemma3_head(m) == &m->lm_head,
           "an untied lm_head is loaded and used");
        if (rc == LT_OK) {
            char nm[160];
            is_int(gemma3_weight_count(m), 1 + 2 * 13 + 2, "untied: the head is one more weight");
            gemma3_weight_at(m, gemma3_weight_count(m) - 1, nm, sizeof nm);
            is_str(nm, "lm_head.weight", "untied: the last weight is lm_head.weight");
            gemma3_model_free(m);
        } else {
            diag("%s", err);
        }
    }
    /* missing tensor, wrong shape */
    {
        tiny_spec sp = base;
        sp.prefix = "model.";
        sp.skip = "layers.1.mlp.up_proj";
        gemma3_model *m = NULL;
        lt_status rc = load_spec(&sp, "miss", &m, NULL);
        ok(rc == LT_ERR_FORMAT && strstr(err, "'model.layers.1.mlp.up_proj.weight'") &&
               strstr(err, "missing"),
           "a missing tensor is named");
        ok(m == NULL, "a failed load returns no model");
        sp.skip = NULL;
        sp.bad_shape = "layers.0.self_attn.k_proj";
        rc = load_spec(&sp, "shape", &m, NULL);
        ok(rc == LT_ERR_FORMAT && strstr(err, "'model.layers.0.self_attn.k_proj.weight'") &&
               strstr(err, "[9, 16]") && strstr(err, "[8, 16]"),
           "a shape mismatch names the tensor and both shapes");
        if (rc == LT_OK) gemma3_model_free(m);
        sp.bad_shape = NULL;
        sp.prefix = "transformer.";
        rc = load_spec(&sp, "pfx", &m, NULL);
        ok(rc == LT_ERR_FORMAT && strstr(err, "no embed_tokens.weight"),
           "an unknown prefix says which it tried");
    }
}

static void test_bnb(void) {
    bnb_config q;
    err[0] = 0;
    ok(bnb_config_parse(&q, "{\"quantization_config\": ", "config.json", err) == LT_ERR_FORMAT &&
           strstr(err, "config.json"),
       "bnb: a garbled config.json is an error, not 'no quantization_config'");
    ok(bnb_config_parse(&q, "{\"quantization_config\": {\"quant_method\": \"gptq\"}}",
                        "config.json", err) == LT_ERR_FORMAT &&
           strstr(err, "quant_method is gptq"),
       "bnb: another quant_method is a format error naming it");
    is_int(bnb_config_parse(&q, "{\"quantization_config\": 3}", "config.json", err), LT_ERR_FORMAT,
           "bnb: a quantization_config that is not an object");
    /* a double-quantized NF4 weight [1, 4] whose quant_state has no nested_blocksize */
    const char *js = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", "
                     "\"shape\": [1, 4], \"nested_offset\": 0.5}";
    size_t jl = strlen(js);
    char hdr[1024];
    snprintf(
        hdr, sizeof hdr,
        "{\"w.weight\":{\"dtype\":\"U8\",\"shape\":[2,1],\"data_offsets\":[0,2]},"
        "\"w.weight.quant_map\":{\"dtype\":\"F32\",\"shape\":[16],\"data_offsets\":[2,66]},"
        "\"w.weight.absmax\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[66,67]},"
        "\"w.weight.nested_absmax\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[67,71]},"
        "\"w.weight.quant_state.bitsandbytes__nf4\":{\"dtype\":\"U8\",\"shape\":[%zu],"
        "\"data_offsets\":[71,%zu]}}",
        jl, 71 + jl);
    unsigned char data[512] = {0};
    memcpy(data + 71, js, jl);
    char path[600];
    snprintf(path, sizeof path, "%s/nested.safetensors", tmp);
    st_set st;
    bnb_group g;
    if (st_raw(path, hdr, data, 71 + jl, 0) == 0 && st_open(&st, path, err) == LT_OK) {
        ok(bnb_group_read(&st, "w.weight", 1, 4, &g, err) == LT_ERR_FORMAT &&
               strstr(err, "lacks a valid nested_blocksize"),
           "bnb: a nested NF4 group without nested_blocksize is refused");
        st_close(&st);
    } else {
        ok(0, "bnb: writing the nested test checkpoint");
        diag("%s", err);
    }
}

int main(void) {
    snprintf(tmp, sizeof tmp, "/tmp/lathe-cfg-XXXXXX");
    if (!mkdtemp(tmp)) return 1;
    test_styles();
    test_bad();
    test_presets();
    test_load();
    test_bnb();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    if (system(cmd) != 0) diag("could not remove %s", tmp);
    return tap_done();
}
