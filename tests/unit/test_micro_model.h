/* test_micro_model.h — a micro Gemma 3 text model built in memory, for the C tests that check
 * the model's ops against finite differences or against each other, written once.
 *
 * The model: hidden 16, MLP 24, 2 layers (one sliding with a window of 4, one full), 2 query
 * heads over 1 key/value head of 8, every weight fp32 host memory drawn from the caller's
 * generator (test_frand: the same 64-bit LCG every such test used, uniform in [-1, 1)), in a
 * fixed order: the embedding, the final norm, then each layer's four norms, q_norm, k_norm and
 * its seven linears. test_micro_gemma3_free frees what test_micro_gemma3 allocated (a tower the
 * caller attached is the caller's to free).
 */
#ifndef LATHE_TEST_MICRO_MODEL_H
#define LATHE_TEST_MICRO_MODEL_H

#include <stdint.h>
#include <stdlib.h>

#include "cuda/model/model.h"

static inline float test_frand(uint64_t *rng) {
    *rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(*rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* [a, b] (b > 0) or [a] (b == 0) fp32, each value amp * test_frand. */
static inline lt_tensor test_rand_t(uint64_t *rng, int64_t a, int64_t b, float amp) {
    int64_t n = a * (b ? b : 1);
    float *p = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        p[i] = amp * test_frand(rng);
    return b ? lt_tensor_2d(LT_F32, p, a, b) : lt_tensor_1d(LT_F32, p, a);
}

enum { MICRO_H = 16, MICRO_I = 24, MICRO_QD = 16, MICRO_KD = 8, MICRO_HD = 8, MICRO_LAYERS = 2 };

/* The model with a vocabulary of vocab; embed_amp scales the embedding, weight_amp the
 * linears, norms are 0.3 * test_frand. */
static inline gemma3_model *test_micro_gemma3(uint64_t *rng, int vocab, float embed_amp,
                                              float weight_amp) {
    gemma3_model *m = calloc(1, sizeof *m);
    gemma3_config *c = &m->cfg;
    gemma3_config_defaults(c);
    c->hidden_size = MICRO_H;
    c->intermediate_size = MICRO_I;
    c->num_hidden_layers = MICRO_LAYERS;
    c->num_attention_heads = MICRO_QD / MICRO_HD;
    c->num_key_value_heads = MICRO_KD / MICRO_HD;
    c->head_dim = MICRO_HD;
    c->vocab_size = vocab;
    c->sliding_window = 4;
    c->query_pre_attn_scalar = 8;
    c->rms_norm_eps = 1e-6;
    c->layer_types[0] = GEMMA3_SLIDING;
    c->layer_types[1] = GEMMA3_FULL;
    c->rope[GEMMA3_SLIDING].theta = 10000;
    c->rope[GEMMA3_SLIDING].factor = 1;
    c->rope[GEMMA3_FULL].theta = 1e6;
    c->rope[GEMMA3_FULL].factor = 1;
    const int64_t H = MICRO_H, I = MICRO_I, QD = MICRO_QD, KD = MICRO_KD, hd = MICRO_HD;
    m->embed_tokens.w = test_rand_t(rng, vocab, H, embed_amp);
    m->norm = test_rand_t(rng, H, 0, 0.3f);
    m->layers = calloc(MICRO_LAYERS, sizeof(gemma3_layer));
    for (int l = 0; l < MICRO_LAYERS; l++) {
        gemma3_layer *L = &m->layers[l];
        L->input_layernorm = test_rand_t(rng, H, 0, 0.3f);
        L->post_attention_layernorm = test_rand_t(rng, H, 0, 0.3f);
        L->pre_feedforward_layernorm = test_rand_t(rng, H, 0, 0.3f);
        L->post_feedforward_layernorm = test_rand_t(rng, H, 0, 0.3f);
        L->q_norm = test_rand_t(rng, hd, 0, 0.3f);
        L->k_norm = test_rand_t(rng, hd, 0, 0.3f);
        L->q_proj.w = test_rand_t(rng, QD, H, weight_amp);
        L->k_proj.w = test_rand_t(rng, KD, H, weight_amp);
        L->v_proj.w = test_rand_t(rng, KD, H, weight_amp);
        L->o_proj.w = test_rand_t(rng, H, QD, weight_amp);
        L->gate_proj.w = test_rand_t(rng, I, H, weight_amp);
        L->up_proj.w = test_rand_t(rng, I, H, weight_amp);
        L->down_proj.w = test_rand_t(rng, H, I, weight_amp);
    }
    m->dtype = LT_F32;
    return m;
}

static inline void test_micro_gemma3_free(gemma3_model *m) {
    free(m->embed_tokens.w.data);
    free(m->norm.data);
    for (int l = 0; l < MICRO_LAYERS; l++) {
        gemma3_layer *L = &m->layers[l];
        lt_tensor *ts[] = {&L->input_layernorm,
                           &L->post_attention_layernorm,
                           &L->pre_feedforward_layernorm,
                           &L->post_feedforward_layernorm,
                           &L->q_norm,
                           &L->k_norm,
                           &L->q_proj.w,
                           &L->k_proj.w,
                           &L->v_proj.w,
                           &L->o_proj.w,
                           &L->gate_proj.w,
                           &L->up_proj.w,
                           &L->down_proj.w};
        for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
            free(ts[i]->data);
    }
    free(m->layers);
    free(m);
}

#endif
