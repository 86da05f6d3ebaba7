/* siglip.h — Gemma 3's image tower (SigLIP) and its multimodal projector. Engine-private.
 *
 * siglip_tower holds the weights of transformers' SiglipVisionModel (vision_use_head false) and
 * Gemma3MultiModalProjector, read from a checkpoint under any of the prefixes the loaders
 * accept (vision_tower.vision_model. / model.vision_tower.vision_model. / vision_tower. /
 * model.vision_tower., and multi_modal_projector. / model.multi_modal_projector.). siglip_encode
 * turns one image's pixel values ([3, S, S], image.h's img_load_pixels) into mm_tokens_per_image
 * rows of the text hidden size: the soft tokens gemma3_forward_images puts at the image tokens'
 * positions. Written once against backend.h like the text forward; a backend without the image ops
 * (lt_backend_missing_vision_op) is refused with a message. For LoRA adapters on the tower's
 * linears and the projector (lt_weight.lora, attached by train/lora.c), siglip_encode_train and
 * siglip_backward (siglip_backward.c) are the training forward and the backward of one image.
 * Must not include kernel/, protocol/ or anything above model/.
 */
#ifndef LATHE_SIGLIP_H
#define LATHE_SIGLIP_H

#include "cuda/backend/backend.h"
#include "cuda/formats/hfconfig.h"
#include "cuda/formats/safetensors.h"

typedef struct siglip_layer {
    lt_tensor ln1_w, ln1_b;       /* layer_norm1 [D] fp32 */
    lt_weight q, k, v, o;         /* self_attn q/k/v/out_proj [D, D] */
    lt_tensor q_b, k_b, v_b, o_b; /* their biases [D] fp32 */
    lt_tensor ln2_w, ln2_b;       /* layer_norm2 [D] fp32 */
    lt_weight fc1, fc2;           /* mlp.fc1 [I, D], mlp.fc2 [D, I] */
    lt_tensor fc1_b, fc2_b;       /* [I], [D] fp32 */
} siglip_layer;

/* One tensor of an encoder layer, under "<tower>encoder.layers.<l>." in the checkpoint's names
 * (transformers' SiglipEncoderLayer): a linear's weight [rows, cols] (an lt_weight of
 * siglip_layer) or, cols 0, a vector of rows values (an lt_tensor); rows and cols name the
 * tower's width ('D') or its MLP's ('I'). The loader and the merged writer walk this one list,
 * in its order. */
typedef struct siglip_layer_tensor {
    const char *name;
    size_t offset; /* of the lt_weight or lt_tensor in siglip_layer */
    char rows, cols;
} siglip_layer_tensor;
#define SIGLIP_LAYER_TENSORS 16
extern const siglip_layer_tensor siglip_layer_tensors[SIGLIP_LAYER_TENSORS];
/* The width 'D' or 'I' stands for in c. */
static inline int64_t siglip_dim(const gemma3_vision_config *c, char d) {
    return d == 'I' ? c->intermediate_size : c->hidden_size;
}

typedef struct siglip_tower {
    gemma3_vision_config cfg;
    int text_hidden;          /* H: the projector's output width */
    lt_weight patch;          /* patch_embedding conv [D, 3, p, p] as a linear [D, 3*p*p] */
    lt_tensor patch_b;        /* [D] fp32 */
    lt_tensor pos;            /* position_embedding [P, D] fp32, P = (S/p)^2 */
    siglip_layer *layers;     /* [num_hidden_layers] */
    lt_tensor post_w, post_b; /* post_layernorm [D] fp32 */
    lt_tensor mm_norm;        /* mm_soft_emb_norm [D] fp32 (Gemma RMSNorm, 1 + w) */
    lt_weight mm_proj;        /* mm_input_projection_weight, transposed to [H, D] fp32 */
    int64_t n_params;
    char prefix[48], proj_prefix[48]; /* the checkpoint's prefixes (messages, exporters) */
    void **blocks;                    /* host allocations (converted tensors) */
    int n_blocks, cap_blocks;
    void *arena; /* a device copy's backend memory (siglip_to_device), or NULL */
} siglip_tower;

/* 1 when st holds a SigLIP tower under a prefix siglip_load reads. */
int siglip_present(const st_set *st);
/* Reads the tower and projector for a model whose config c has c->vision.present. The
 * matrices are mapped as stored when F32/F16/BF16 and aligned (st must stay open while the
 * tower lives), the vectors and the projector converted to fp32. On failure *out is NULL and
 * err names the tensor. */
lt_status siglip_load(siglip_tower **out, const st_set *st, const gemma3_config *c, char *err);
void siglip_free(siglip_tower *t);

/* *out = a copy of host in ctx's memory: the matrices in dt (F32/F16/BF16), the vectors fp32,
 * all in one arena. Free it with siglip_release (ctx: the same backend). On failure *out is
 * NULL and err says why. */
lt_status siglip_to_device(siglip_tower **out, const siglip_tower *host, lt_ctx *ctx, lt_dtype dt,
                           char *err);
/* siglip_to_device that also gives each host tensor back as soon as it is copied: its
 * converted block freed, its pages of st's mapping (the checkpoint it was read from) returned
 * to the system. host is then good only for siglip_free. For loads that stream to a device. */
lt_status siglip_to_device_dropping(siglip_tower **out, siglip_tower *host, lt_ctx *ctx,
                                    lt_dtype dt, const st_set *st, char *err);
/* Frees a tower of either kind (a device copy's arena through ctx). NULL is fine. */
void siglip_release(siglip_tower *t, lt_ctx *ctx);

/* One image: pixels [3, S, S] fp32 in host memory (S = image_size) -> out [mm, H] fp32 in
 * ctx's memory (mm = mm_tokens_per_image). Computes SiglipVisionModel's last hidden state
 * (patch embedding + position embeddings, the encoder layers with bidirectional attention,
 * post_layernorm) and Gemma3MultiModalProjector on it (avg-pool to mm tokens, RMSNorm with
 * 1 + w, the projection). */
lt_status siglip_encode(const siglip_tower *t, lt_ctx *ctx, const float *pixels, float *out);
/* siglip_encode in training: drop_seed != 0 runs the tower adapters' LoRA dropout with masks
 * from it (siglip_backward with the same seed sees the same masks); 0 is siglip_encode. */
lt_status siglip_encode_train(const siglip_tower *t, lt_ctx *ctx, const float *pixels, float *out,
                              uint64_t drop_seed);
/* The backend memory siglip_encode takes for its activations (one image), out not included. */
size_t siglip_encode_bytes(const siglip_tower *t);

/* ---- the pieces of the forward, shared with the backward (siglip_backward.c) ------------- */

/* The sizes of a tower: width D, MLP width I, grid side g, patches P = g*g, patch length K,
 * heads nh of hd, text width H, pooled side and tokens M = side*side, eps, score scale. */
typedef struct siglip_dims {
    int64_t D, I, g, P, K, nh, hd, H, side, M;
    float eps, scale;
} siglip_dims;
void siglip_dims_get(const siglip_tower *t, siglip_dims *d);
/* pixels [3, S, S] -> host [P, K]: row r*g + c holds channel-major (ch, y, x) of patch (r, c). */
void siglip_patches(const siglip_tower *t, const float *pixels, float *host);
/* One encoder layer's activations, backend memory, [P, D] fp32 unless noted. The forward may
 * run with buffers aliased (siglip_encode: o, a2, f2 over a1; h and out over x; g over f1) or
 * apart, each kept (the backward's recompute). */
typedef struct siglip_acts {
    float *x;                    /* the layer's input */
    float *a1, *q, *k, *v, *att; /* layer_norm1(x), q/k/v_proj, attention */
    float *o;                    /* out_proj(att) */
    float *h;                    /* x + o */
    float *a2;                   /* layer_norm2(h) */
    float *f1, *g;               /* [P, I]: fc1(a2), gelu(f1) */
    float *f2;                   /* fc2(g) */
    float *out;                  /* h + f2, the layer's output; NULL: stop after g */
    int32_t *pos0;               /* [P] I32 zeros: every patch sees every patch */
    /* LoRA dropout on the tower's adapters (training): masks from drop_seed (0 = none), its
     * scratch drop of siglip_dropout_floats floats (widths drop_w, ranks drop_r) */
    uint64_t drop_seed;
    float *drop;
    int64_t drop_w, drop_r;
} siglip_acts;
/* The aliased layout siglip_encode runs in: x holds h and out; a holds a1, o, a2 and f2; f holds
 * f1 and g; q, k, v and att apart. No dropout (the caller sets drop_seed, drop, drop_w, drop_r). */
siglip_acts siglip_acts_aliased(float *x, float *a, float *f, float *q, float *k, float *v,
                                float *att, int32_t *pos0);
/* The dropout scratch of n rows, carved from b->drop: the dropped input xd, the adapter's
 * output y2 and (backward) dx, [n, drop_w] each; u and du [n, drop_r]. */
typedef struct siglip_drop_bufs {
    float *xd, *y2, *dx, *u, *du;
} siglip_drop_bufs;
void siglip_drop_carve(const siglip_acts *b, int64_t n, siglip_drop_bufs *s);
/* Floats of that scratch for P rows; *w, *r: the width and the largest adapter rank. */
size_t siglip_dropout_floats(const siglip_tower *t, int64_t *w, int64_t *r);
/* The mask seed of tower linear k (q, k, v, out_proj, fc1, fc2) of layer l. */
uint64_t siglip_module_seed(uint64_t seed, int layer, int k);
/* 1 when w's adapter runs with dropout under b. */
int siglip_uses_dropout(const siglip_acts *b, const lt_weight *w);
/* Encoder layer l on b (the same ops in the same order whatever the aliasing). */
lt_status siglip_layer_forward(const siglip_tower *t, lt_ctx *ctx, int l, const siglip_acts *b);

/* ---- training LoRA adapters on the tower (siglip_backward.c) ------------------------------ */

/* The lowest encoder layer with an adapter on one of its linears; num_hidden_layers when none
 * has one (only the projector's trains, or nothing). */
int siglip_first_trained_layer(const siglip_tower *t);
/* 1 when a tower linear or the projector has an adapter. */
int siglip_has_adapters(const siglip_tower *t);
/* The backward of one image: recomputes siglip_encode's forward from pixels (host [3, S, S]),
 * keeping each encoder layer's input from the first trained layer up, then goes back from dout
 * (ctx memory [mm, H] fp32: dL/d(soft tokens)) through the projector (its linear, RMSNorm and
 * pool), post_layernorm and the layers down to the first trained one, ACCUMULATING the
 * adapters' gradients (lt_lora grad_a / grad_b through linear_backward). Frozen weights get
 * no gradient and nothing flows below the first trained layer (none into the patch
 * embedding). drop_seed: the seed siglip_encode_train made the soft tokens with (0 = no
 * dropout). The backend needs
 * lt_backend_missing_tower_training_op's ops. */
lt_status siglip_backward(const siglip_tower *t, lt_ctx *ctx, const float *pixels,
                          const float *dout, uint64_t drop_seed);
/* The backend memory siglip_backward takes (one image): the kept layer inputs and one layer's
 * activations and gradients. */
size_t siglip_backward_bytes(const siglip_tower *t, int dropout);

#endif
