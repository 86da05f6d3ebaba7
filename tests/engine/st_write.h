/* st_write.h — test-only helpers that write safetensors files and tiny Gemma 3 checkpoints, so
 * the C unit tests can build good and broken inputs themselves (no fixtures needed).
 *
 * st_raw: writes a file from a header string and data bytes as given (may be inconsistent on
 * purpose). tiny_ckpt_write: a complete random Gemma 3 checkpoint (config.json +
 * model.safetensors, F32) for a small config, under a chosen text prefix.
 */
#ifndef LATHE_TEST_ST_WRITE_H
#define LATHE_TEST_ST_WRITE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Writes u64 header length, the header, then data. hlen_override != 0 replaces the length. */
static inline int st_raw(const char *path, const char *header, const void *data, size_t n,
                         uint64_t hlen_override) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    uint64_t hl = hlen_override ? hlen_override : strlen(header);
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(hl >> (8 * i));
    fwrite(b, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    if (n) fwrite(data, 1, n, f);
    return fclose(f);
}

/* A growing list of named f32 tensors, serialised as one safetensors file. */
typedef struct st_list {
    char names[1024][256];
    int ndim[1024];
    int64_t shape[1024][2];
    float *data[1024];
    int n;
} st_list;

static uint64_t tst_rng = 88172645463325252ull;
static inline float tst_randn(void) { /* cheap: sum of uniforms, centred; std ~0.29*2 */
    float s = 0;
    for (int i = 0; i < 4; i++) {
        tst_rng ^= tst_rng << 13;
        tst_rng ^= tst_rng >> 7;
        tst_rng ^= tst_rng << 17;
        s += (float)(tst_rng >> 40) / 16777216.0f - 0.5f;
    }
    return s;
}

static inline void st_add(st_list *l, const char *name, int ndim, int64_t d0, int64_t d1,
                          float scale) {
    int i = l->n++;
    snprintf(l->names[i], sizeof l->names[i], "%s", name);
    l->ndim[i] = ndim;
    l->shape[i][0] = d0;
    l->shape[i][1] = d1;
    int64_t n = ndim == 2 ? d0 * d1 : d0;
    l->data[i] = malloc(sizeof(float) * (size_t)n);
    for (int64_t k = 0; k < n; k++)
        l->data[i][k] = tst_randn() * scale;
}

static inline int st_list_write(const st_list *l, const char *path) {
    size_t cap = 256 + (size_t)l->n * 256, k = 0;
    char *h = malloc(cap);
    uint64_t off = 0;
    k += (size_t)snprintf(h + k, cap - k, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < l->n; i++) {
        int64_t n = l->ndim[i] == 2 ? l->shape[i][0] * l->shape[i][1] : l->shape[i][0];
        if (l->ndim[i] == 2)
            k += (size_t)snprintf(
                h + k, cap - k,
                ",\"%s\":{\"dtype\":\"F32\",\"shape\":[%lld,%lld],\"data_offsets\":[%llu,%llu]}",
                l->names[i], (long long)l->shape[i][0], (long long)l->shape[i][1],
                (unsigned long long)off, (unsigned long long)(off + 4 * (uint64_t)n));
        else
            k += (size_t)snprintf(
                h + k, cap - k,
                ",\"%s\":{\"dtype\":\"F32\",\"shape\":[%lld],\"data_offsets\":[%llu,%llu]}",
                l->names[i], (long long)l->shape[i][0], (unsigned long long)off,
                (unsigned long long)(off + 4 * (uint64_t)n));
        off += 4 * (uint64_t)n;
    }
    k += (size_t)snprintf(h + k, cap - k, "}");
    while (k % 8)
        h[k++] = ' ';
    h[k] = 0;
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(h);
        return -1;
    }
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)((uint64_t)k >> (8 * i));
    fwrite(b, 1, 8, f);
    fwrite(h, 1, k, f);
    for (int i = 0; i < l->n; i++) {
        int64_t n = l->ndim[i] == 2 ? l->shape[i][0] * l->shape[i][1] : l->shape[i][0];
        fwrite(l->data[i], sizeof(float), (size_t)n, f);
    }
    free(h);
    return fclose(f);
}

static inline void st_list_free(st_list *l) {
    for (int i = 0; i < l->n; i++)
        free(l->data[i]);
    l->n = 0;
}

typedef struct tiny_spec {
    int V, H, I, L, nh, nkv, hd, window;
    double qpas;
    const char *prefix;    /* "model.", "language_model.model.", "model.language_model." */
    int with_vision;       /* add a vision tower tensor to be skipped */
    const char *skip;      /* a tensor suffix to leave out (to test "missing"), or NULL */
    const char *bad_shape; /* a tensor suffix to write with a wrong shape, or NULL */
    int untied;            /* write tie_word_embeddings false and an lm_head.weight */
} tiny_spec;

/* Writes DIR/config.json (flat gemma3_text, sliding pattern 6) and DIR/model.safetensors. */
static inline int tiny_ckpt_write(const char *dir, const tiny_spec *s) {
    char path[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(
        f,
        "{\"architectures\":[\"Gemma3ForCausalLM\"],\"model_type\":\"gemma3_text\",\"vocab_size\":%"
        "d,"
        "\"hidden_size\":%d,\"intermediate_size\":%d,\"num_hidden_layers\":%d,\"num_attention_"
        "heads\":%d,"
        "\"num_key_value_heads\":%d,\"head_dim\":%d,\"query_pre_attn_scalar\":%g,\"sliding_"
        "window\":%d,"
        "\"sliding_window_pattern\":6,\"rope_theta\":1000000.0,\"rope_local_base_freq\":10000.0,"
        "\"rope_scaling\":null,\"rms_norm_eps\":1e-06,\"max_position_embeddings\":4096,"
        "\"final_logit_softcapping\":null,\"attn_logit_softcapping\":null,\"bos_token_id\":2,"
        "\"eos_token_id\":[1,106],\"pad_token_id\":0,\"hidden_activation\":\"gelu_pytorch_tanh\","
        "\"tie_word_embeddings\":%s}\n",
        s->V, s->H, s->I, s->L, s->nh, s->nkv, s->hd, s->qpas, s->window,
        s->untied ? "false" : "true");
    fclose(f);
    st_list *l = calloc(1, sizeof *l);
    char n[256];
#define ADD(suffix, nd, a, b, sc)                                                                  \
    do {                                                                                           \
        if (s->skip && strstr(suffix, s->skip)) break;                                             \
        int64_t a_ = (a);                                                                          \
        if (s->bad_shape && strstr(suffix, s->bad_shape)) a_ += 1;                                 \
        snprintf(n, sizeof n, "%s%s", s->prefix, suffix);                                          \
        st_add(l, n, nd, a_, b, sc);                                                               \
    } while (0)
    ADD("embed_tokens.weight", 2, s->V, s->H, 1.0f);
    for (int i = 0; i < s->L; i++) {
        char sfx[128];
#define LAYER(name, nd, a, b, sc)                                                                  \
    snprintf(sfx, sizeof sfx, "layers.%d.%s", i, name);                                            \
    ADD(sfx, nd, a, b, sc)
        LAYER("input_layernorm.weight", 1, s->H, 0, 0.5f);
        LAYER("self_attn.q_proj.weight", 2, s->nh * s->hd, s->H, 0.3f);
        LAYER("self_attn.k_proj.weight", 2, s->nkv * s->hd, s->H, 0.3f);
        LAYER("self_attn.v_proj.weight", 2, s->nkv * s->hd, s->H, 0.3f);
        LAYER("self_attn.o_proj.weight", 2, s->H, s->nh * s->hd, 0.3f);
        LAYER("self_attn.q_norm.weight", 1, s->hd, 0, 0.5f);
        LAYER("self_attn.k_norm.weight", 1, s->hd, 0, 0.5f);
        LAYER("post_attention_layernorm.weight", 1, s->H, 0, 0.5f);
        LAYER("pre_feedforward_layernorm.weight", 1, s->H, 0, 0.5f);
        LAYER("mlp.gate_proj.weight", 2, s->I, s->H, 0.3f);
        LAYER("mlp.up_proj.weight", 2, s->I, s->H, 0.3f);
        LAYER("mlp.down_proj.weight", 2, s->H, s->I, 0.3f);
        LAYER("post_feedforward_layernorm.weight", 1, s->H, 0, 0.5f);
#undef LAYER
    }
    ADD("norm.weight", 1, s->H, 0, 0.5f);
#undef ADD
    if (s->untied) st_add(l, "lm_head.weight", 2, s->V, s->H, 1.0f);
    if (s->with_vision) st_add(l, "vision_tower.vision_model.post_layernorm.weight", 1, 8, 0, 1.0f);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    int rc = st_list_write(l, path);
    st_list_free(l);
    free(l);
    return rc;
}

#endif
