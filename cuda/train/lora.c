/* lora.c — which weights train: LoRA adapters on the targeted linear layers (PEFT's
 * initialisation and naming), or every weight for full fine-tuning.
 *
 * Owns lt_adapters: the adapter tensors, their gradients, the list of train_param the
 * optimizer walks, and (full fine-tuning) fp32 copies of 16-bit weights plus the norm
 * gradients. Attaching points each targeted lt_weight's `lora` at its slot; lora_free points
 * them back at nothing. It must not touch the forward code or the model's storage.
 */
#include <limits.h>
#include <math.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/model/siglip.h"
#include "cuda/train/train.h"

/* The seven linear modules of a decoder layer, in gemma3_layer's order. */
static const char *const MODULES[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                       "mlp.down_proj"};

static lt_weight *layer_module(gemma3_layer *L, int k) {
    switch (k) {
    case 0:
        return &L->q_proj;
    case 1:
        return &L->k_proj;
    case 2:
        return &L->v_proj;
    case 3:
        return &L->o_proj;
    case 4:
        return &L->gate_proj;
    case 5:
        return &L->up_proj;
    default:
        return &L->down_proj;
    }
}

static int looks_like_regex(const char *s) {
    return strpbrk(s, "*()[]|^$+?\\") != NULL;
}

/* 1 when glibc's regcomp can build the regex in bounded memory and regexec match it in bounded
 * time. regcomp expands x+ into x x* and x{m,n} into n copies of x, so stacked or nested
 * repetitions grow exponentially ("a++++..." or "((a{50}){50}){50}" take gigabytes), and
 * regexec's DFA over thousands of copies of one atom takes minutes; this walks the pattern
 * estimating the copies regcomp makes and refuses more than REGEX_MAX_NODES in all or
 * REGEX_MAX_COPIES of one atom. Bracket expressions and escapes count as one atom. A repetition
 * right after another (a**, (x*)*+) is refused too, as Python's re refuses it ("multiple
 * repeat"): glibc builds it in time cubic in the stars (64 + 64 stars around a group took 0.6
 * s, 39 s under ASan); one lazy '?' after a repetition (a*?) is Python's and stays. */
#define REGEX_MAX_NODES 4096
#define REGEX_MAX_COPIES 256
static int regex_small(const char *p) {
    double total[64], last[64];
    int depth = 0, rep = 0; /* rep: 1 after a repetition, 2 after its lazy '?' */
    total[0] = last[0] = 0;
    for (size_t i = 0; p[i]; i++) {
        char c = p[i];
        double atom = 1;
        int is_rep = c == '*' || c == '+' || c == '?' || (c == '{' && strchr(p + i, '}'));
        if (is_rep && rep && !(c == '?' && rep == 1)) return 0; /* a repeated repetition */
        rep = is_rep ? (rep == 1 && c == '?' ? 2 : 1) : 0;
        if (c == '\\') {
            if (p[i + 1]) i++;
        } else if (c == '[') {
            size_t j = i + 1;
            if (p[j] == '^') j++;
            if (p[j] == ']') j++;
            while (p[j] && p[j] != ']')
                j++;
            if (!p[j]) return 1; /* regcomp refuses it */
            i = j;
        } else if (c == '(') {
            if (++depth >= 64) return 0;
            total[depth] = last[depth] = 0;
            continue;
        } else if (c == ')' && depth > 0) { /* an unmatched ')' is a literal for glibc */
            atom = total[depth--] + 1;
        } else if (c == '+' || (c == '{' && strchr(p + i, '}'))) {
            double copies = 2;
            if (c == '{') {
                char *end = NULL;
                long m = strtol(p + i + 1, &end, 10), n = m;
                if (end && *end == ',') /* {m,}: m and a star; strtol saturates at LONG_MAX */
                    n = end[1] == '}' ? (m < LONG_MAX ? m + 1 : m) : strtol(end + 1, &end, 10);
                while (p[i] != '}')
                    i++;
                copies = (double)(n > m ? n : m);
                if (copies < 1) copies = 1;
            }
            total[depth] += last[depth] * (copies - 1);
            last[depth] *= copies;
            if (total[depth] > REGEX_MAX_NODES || last[depth] > REGEX_MAX_COPIES) return 0;
            continue;
        } else if (c == '*' || c == '?' || c == '|') {
            total[depth] += 1;
            continue;
        }
        total[depth] += atom;
        last[depth] = atom;
        if (total[depth] > REGEX_MAX_NODES) return 0;
    }
    return total[0] <= REGEX_MAX_NODES;
}

/* "q" -> "q_proj"; "q_proj" stays. Writes into out. */
static void short_to_proj(const char *w, char *out, size_t cap) {
    static const char *const S[] = {"q", "k", "v", "o", "gate", "up", "down"};
    for (size_t i = 0; i < 7; i++)
        if (strcmp(w, S[i]) == 0) {
            snprintf(out, cap, "%s_proj", w);
            return;
        }
    snprintf(out, cap, "%s", w);
}

/* List semantics of PEFT: the module name equals an entry or ends with "." + entry. */
static int list_matches(const char *list, const char *module) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", list);
    char *save = NULL;
    for (char *w = strtok_r(buf, ", ", &save); w; w = strtok_r(NULL, ", ", &save)) {
        char e[96];
        short_to_proj(w, e, sizeof e);
        size_t n = strlen(module), m = strlen(e);
        if (strcmp(module, e) == 0) return 1;
        if (n > m && strcmp(module + n - m, e) == 0 && module[n - m - 1] == '.') return 1;
    }
    return 0;
}

/* re.fullmatch semantics via an anchored POSIX extended regex. */
static int regex_matches(const char *pattern, const char *module, int *bad) {
    size_t n = strlen(pattern) + 8;
    char *anch = malloc(n);
    if (!anch) return 0;
    snprintf(anch, n, "^(%s)$", pattern);
    regex_t re;
    int rc = regcomp(&re, anch, REG_EXTENDED | REG_NOSUB);
    free(anch);
    if (rc != 0) {
        *bad = 1;
        return 0;
    }
    int hit = regexec(&re, module, 0, NULL, 0) == 0;
    regfree(&re);
    return hit;
}

/* A regex may be written against the multimodal names PEFT sees on Gemma3ForConditionalGeneration
 * ("model.language_model.layers.N..." or, before transformers 4.52,
 * "language_model.model.layers.N..."): on a multimodal checkpoint every spelling of the module is
 * tried. */
static int target_matches(const lt_adapters *a, const char *module, int *bad) {
    if (!a->targets_regex) return list_matches(a->targets, module);
    if (regex_matches(a->targets, module, bad)) return 1;
    if (*bad || !a->model->cfg.multimodal || strncmp(module, "model.", 6) != 0) return 0;
    char alt[256];
    snprintf(alt, sizeof alt, "model.language_model.%s", module + 6);
    if (regex_matches(a->targets, alt, bad)) return 1;
    snprintf(alt, sizeof alt, "language_model.model.%s", module + 6);
    return regex_matches(a->targets, alt, bad);
}

int lora_module_matches(const lt_adapters *a, const char *module) {
    int bad = 0;
    return target_matches(a, module, &bad);
}

/* ---- parameters ------------------------------------------------------------------------- */

static void *zalloc(lt_ctx *ctx, size_t bytes) {
    return ctx->be->alloc(ctx, bytes ? bytes : 4);
}

static lt_status add_param(lt_adapters *a, const char *name, lt_tensor *value, void *grad,
                           int decay) {
    train_param *np = realloc(a->params, sizeof(train_param) * (size_t)(a->n_params + 1));
    if (!np) return LT_ERR_MEMORY;
    a->params = np;
    train_param *p = &a->params[a->n_params++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->value = value;
    p->grad = *value;
    p->grad.dtype = LT_F32;
    p->grad.data = grad;
    p->decay = decay;
    a->n_trainable += lt_tensor_numel(value);
    return LT_OK;
}

static uint64_t mix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ---- the image tower's linears ------------------------------------------------------------ */

/* The six linears of a SigLIP encoder layer, in siglip_layer's order, as transformers names
 * them under the layer, and their leaf names. */
static const char *const TOWER_MODULES[6] = {"self_attn.q_proj", "self_attn.k_proj",
                                             "self_attn.v_proj", "self_attn.out_proj",
                                             "mlp.fc1",          "mlp.fc2"};
static const char *const TOWER_LEAF[6] = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"};
/* transformers 5's module tree (the tree in tests/fixtures/vision/tree, written by 5.17 from
 * named_parameters: Gemma3ForConditionalGeneration.model.vision_tower holds the encoder), and
 * the spellings of earlier trees, where the SiglipVisionModel kept a vision_model level
 * (4.52 to 4.5x: model.vision_tower.vision_model.; before 4.52: vision_tower.vision_model.) */
#define TOWER_PATH "model.vision_tower.encoder.layers."
static const char *const TOWER_OLD[2] = {"model.vision_tower.vision_model.encoder.layers.",
                                         "vision_tower.vision_model.encoder.layers."};

static lt_weight *tower_module(siglip_layer *L, int k) {
    lt_weight *w[6] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
    return w[k];
}

/* A list entry naming the tower: "vision.q" / "vision.q_proj" -> "vision.q_proj" into out.
 * 1 for a tower entry ("vision" alone is expanded by the caller), 0 for another entry, -1 for
 * "vision.<unknown>". */
static int tower_entry(const char *w, char *out, size_t cap) {
    if (strncmp(w, "vision.", 7) != 0) return 0;
    const char *leaf = w + 7;
    static const char *const SHORT[4] = {"q", "k", "v", "out"};
    for (int i = 0; i < 4; i++)
        if (strcmp(leaf, SHORT[i]) == 0) {
            snprintf(out, cap, "vision.%s_proj", leaf);
            return 1;
        }
    for (int i = 0; i < 6; i++)
        if (strcmp(leaf, TOWER_LEAF[i]) == 0) {
            snprintf(out, cap, "vision.%s", leaf);
            return 1;
        }
    return -1;
}

/* Whether the adapters' targets select tower linear k of a layer whose canonical path is
 * module: a "vision.LEAF" list entry, a plain entry by PEFT's suffix rule (tower_suffix), or
 * a regex on either spelling of the path. */
static int tower_matches(const lt_adapters *a, const char *module, int k, int suffix, int *bad) {
    if (a->targets_regex) {
        if (regex_matches(a->targets, module, bad)) return 1;
        const char *rest = module + strlen(TOWER_PATH); /* "N.self_attn.q_proj" */
        for (int i = 0; i < 2 && !*bad; i++) {
            char alt[256];
            snprintf(alt, sizeof alt, "%s%s", TOWER_OLD[i], rest);
            if (regex_matches(a->targets, alt, bad)) return 1;
        }
        return 0;
    }
    char want[32];
    snprintf(want, sizeof want, "vision.%s", TOWER_LEAF[k]);
    char buf[512];
    snprintf(buf, sizeof buf, "%s", a->targets);
    char *save = NULL;
    for (char *w = strtok_r(buf, ",", &save); w; w = strtok_r(NULL, ",", &save))
        if (strcmp(w, want) == 0) return 1;
    return suffix && list_matches(a->targets, module);
}

/* 1 when the normalised list holds "projector". */
static int list_has(const char *list, const char *name) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", list);
    char *save = NULL;
    for (char *w = strtok_r(buf, ",", &save); w; w = strtok_r(NULL, ",", &save))
        if (strcmp(w, name) == 0) return 1;
    return 0;
}

/* Fresh adapter tensors for slot s (A [r, in], B [out, r], their gradients), initialised as
 * PEFT does: the input-side matrix ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform,
 * a = sqrt(5)), the other zero. For the projector PEFT's input side is our B (lora_slot). */
static lt_status slot_tensors(lt_adapters *a, lora_slot *s, uint64_t *rs, char *err) {
    lt_ctx *ctx = a->ctx;
    int64_t out = s->w->w.shape[0], in = s->w->w.shape[1], r = a->r;
    size_t na = (size_t)(r * in), nb = (size_t)(out * r);
    float *A = zalloc(ctx, na * 4), *B = zalloc(ctx, nb * 4);
    float *gA = zalloc(ctx, na * 4), *gB = zalloc(ctx, nb * 4);
    s->lora.a = lt_tensor_2d(LT_F32, A, r, in);
    s->lora.b = lt_tensor_2d(LT_F32, B, out, r);
    s->lora.grad_a = lt_tensor_2d(LT_F32, gA, r, in);
    s->lora.grad_b = lt_tensor_2d(LT_F32, gB, out, r);
    if (!A || !B || !gA || !gB)
        return lt_fail(err, LT_ERR_MEMORY, "%%lora: out of memory for the adapters");
    int proj = s->part == LORA_PROJECTOR;
    size_t nr = proj ? nb : na;       /* the random one */
    int64_t fan_in = proj ? out : in; /* PEFT's in_features: the stored matrix's [D, H] H */
    float *host = malloc(nr * 4);
    if (!host) return LT_ERR_MEMORY;
    double bound = 1.0 / sqrt((double)fan_in);
    for (size_t i = 0; i < nr; i++)
        host[i] = (float)((((double)(mix64(rs) >> 11)) / 9007199254740992.0 * 2.0 - 1.0) * bound);
    if (proj) { /* PEFT's lora_A [r, H] is our B [H, r] transposed */
        float *tr = malloc(nb * 4);
        if (!tr) {
            free(host);
            return LT_ERR_MEMORY;
        }
        for (int64_t i = 0; i < r; i++)
            for (int64_t j = 0; j < out; j++)
                tr[j * r + i] = host[i * out + j];
        free(host);
        host = tr;
    }
    lt_status rc = ctx->be->upload(ctx, proj ? B : A, host, nr * 4);
    free(host);
    if (rc != LT_OK) return rc;
    s->lora.scale = a->rslora ? a->alpha / sqrtf((float)r) : a->alpha / (float)r;
    s->lora.dropout = a->dropout;
    s->lora.enabled = 1;
    char name[192];
    snprintf(name, sizeof name, "%s.lora_A.weight", s->module);
    if (add_param(a, name, &s->lora.a, gA, 1) != LT_OK) return LT_ERR_MEMORY;
    a->params[a->n_params - 1].image_only = s->part != LORA_TEXT;
    snprintf(name, sizeof name, "%s.lora_B.weight", s->module);
    if (add_param(a, name, &s->lora.b, gB, 1) != LT_OK) return LT_ERR_MEMORY;
    a->params[a->n_params - 1].image_only = s->part != LORA_TEXT;
    return LT_OK;
}

static lt_status attach_lora(lt_adapters *a, const lora_opts *o, char *err) {
    gemma3_model *m = a->model;
    lt_ctx *ctx = a->ctx;
    int L = m->cfg.num_hidden_layers;
    siglip_tower *tw = m->vision;
    int LV = tw ? tw->cfg.num_hidden_layers : 0;
    /* which linears the targets select, before anything is allocated */
    int n_text = L * 7, n_all = n_text + LV * 6 + 1;
    char *hit = calloc((size_t)n_all, 1);
    a->slots = calloc((size_t)n_all, sizeof(lora_slot));
    if (!hit || !a->slots) {
        free(hit);
        return LT_ERR_MEMORY;
    }
    int bad = 0, n_hit = 0, n_tower = 0;
    for (int l = 0; l < L && !bad; l++)
        for (int k = 0; k < 7 && !bad; k++) {
            char module[160];
            snprintf(module, sizeof module, "model.layers.%d.%s", l, MODULES[k]);
            n_hit += hit[l * 7 + k] = (char)target_matches(a, module, &bad);
        }
    for (int l = 0; l < LV && !bad; l++)
        for (int k = 0; k < 6 && !bad; k++) {
            char module[160];
            snprintf(module, sizeof module, TOWER_PATH "%d.%s", l, TOWER_MODULES[k]);
            n_tower += hit[n_text + l * 6 + k] =
                (char)tower_matches(a, module, k, o->tower_suffix, &bad);
        }
    int proj = o->projector || (!a->targets_regex && list_has(a->targets, "projector"));
    int names_tower = proj || (!a->targets_regex && strstr(a->targets, "vision.") != NULL);
    lt_status rc = LT_OK;
    if (bad) {
        rc = lt_fail(err, LT_ERR_ARG, "%%lora: targets='%s' is not a valid regular expression",
                     a->targets);
    } else if (names_tower && !tw) {
        rc = lt_fail(err, LT_ERR_ARG,
                     "%%lora: targets='%s' names the image tower, but this model has none (%s)",
                     a->targets,
                     m->vision_error[0]  ? m->vision_error
                     : m->cfg.multimodal ? "its tower was not loaded"
                                         : "a text-only model");
    } else if (n_tower + proj > 0 && lt_backend_missing_tower_training_op(ctx->be)) {
        rc = lt_fail(err, LT_ERR_ARG,
                     "%%lora: targets='%s' adapts the image tower, whose training needs the "
                     "tower's backward, which the %s backend lacks (it has no %s op): %%load "
                     "the model with device=cpu or device=cuda, or leave the tower out of "
                     "targets= (a regex that keeps to the language model: "
                     ".*language_model.*\\.(q_proj|v_proj))",
                     a->targets, ctx->be->name, lt_backend_missing_tower_training_op(ctx->be));
    } else if (proj && a->dropout > 0.0f) {
        rc = lt_fail(err, LT_ERR_ARG,
                     "%%lora: dropout=%g with the projector in targets= ('%s'): its matrix is a "
                     "parameter, not a linear layer, and as PEFT's ParamWrapper "
                     "(target_parameters) refuses lora_dropout there, so does lathe: give "
                     "dropout=0, or leave projector out (the tower's linears take dropout)",
                     a->dropout, a->targets);
    } else if (n_hit + n_tower + proj == 0) {
        rc = lt_fail(err, LT_ERR_ARG,
                     "%%lora: targets='%s' matches no linear layer; use names from "
                     "q,k,v,o,gate,up,down (or q_proj, ...), " LORA_TOWER_NAMES
                     " or a regex over names like model.layers.0.self_attn.q_proj",
                     a->targets);
    }
    if (rc != LT_OK) {
        free(hit);
        return rc;
    }
    uint64_t rs = o->seed ^ 0x6c6f7261ull; /* "lora" */
    for (int i = 0; i < n_all && rc == LT_OK; i++) {
        int is_proj = i == n_all - 1;
        if (is_proj ? !proj : !hit[i]) continue;
        lora_slot *s = &a->slots[a->n_slots++];
        if (i < n_text) {
            int l = i / 7, k = i % 7;
            snprintf(s->module, sizeof s->module, "model.layers.%d.%s", l, MODULES[k]);
            s->layer = l;
            s->part = LORA_TEXT;
            s->w = layer_module(&m->layers[l], k);
        } else if (!is_proj) {
            int l = (i - n_text) / 6, k = (i - n_text) % 6;
            snprintf(s->module, sizeof s->module, TOWER_PATH "%d.%s", l, TOWER_MODULES[k]);
            s->layer = l;
            s->part = LORA_TOWER;
            s->w = tower_module(&tw->layers[l], k);
            a->n_tower_slots++;
        } else {
            snprintf(s->module, sizeof s->module, "model.multi_modal_projector");
            s->part = LORA_PROJECTOR;
            s->w = &tw->mm_proj;
            a->n_tower_slots++;
        }
        rc = slot_tensors(a, s, &rs, err);
    }
    free(hit);
    if (rc != LT_OK) return rc;
    for (int i = 0; i < a->n_slots; i++)
        a->slots[i].w->lora = &a->slots[i].lora;
    return LT_OK;
}

/* Full fine-tuning: every weight and norm trains; 16-bit matrices get an fp32 copy that the
 * model points at while the adapters live (lora_free writes the trained values back into
 * the model's own storage, in its dtype, and restores the pointer). */
static lt_status own_f32(lt_adapters *a, lt_tensor *t) {
    if (t->dtype == LT_F32) return LT_OK;
    int64_t n = lt_tensor_numel(t);
    float *dev = zalloc(a->ctx, sizeof(float) * (size_t)n);
    owned_copy *no = realloc(a->owned, sizeof(owned_copy) * (size_t)(a->n_owned + 1));
    if (!dev || !no) {
        if (dev) a->ctx->be->release(a->ctx, dev);
        if (no) a->owned = no;
        return LT_ERR_MEMORY;
    }
    a->owned = no;
    lt_status rc = a->ctx->be->convert(a->ctx, dev, LT_F32, t->data, t->dtype, n);
    if (rc != LT_OK) {
        a->ctx->be->release(a->ctx, dev);
        return rc;
    }
    a->owned[a->n_owned++] = (owned_copy){t, t->data, t->dtype, dev};
    t->data = dev;
    t->dtype = LT_F32;
    return LT_OK;
}

static lt_status attach_full(lt_adapters *a, char *err) {
    gemma3_model *m = a->model;
    int L = m->cfg.num_hidden_layers;
    int64_t H = m->cfg.hidden_size;
    if (m->n_quantized) {
        return lt_fail(
            err, LT_ERR_STATE,
            "%%lora full=true: this model's linears are %s (frozen, no gradients); train "
            "LoRA adapters on them, or load the 16-bit checkpoint without quant= for full "
            "fine-tuning",
            m->quant == LT_QUANT_NF4 ? "NF4" : "int8");
    }
    a->ng.layers = calloc((size_t)L * NG_COUNT, sizeof(lt_tensor));
    if (!a->ng.layers) return LT_ERR_MEMORY;
    char name[192];
    lt_weight *mats[2] = {&m->embed_tokens, m->lm_head.w.data ? &m->lm_head : NULL};
    for (int i = 0; i < 2; i++) {
        if (!mats[i]) continue;
        if (own_f32(a, &mats[i]->w) != LT_OK) goto oom;
        void *g = zalloc(a->ctx, lt_tensor_bytes(&mats[i]->w));
        if (!g) goto oom;
        mats[i]->grad_w = mats[i]->w;
        mats[i]->grad_w.data = g;
        snprintf(name, sizeof name, "%s", i == 0 ? "model.embed_tokens.weight" : "lm_head.weight");
        if (add_param(a, name, &mats[i]->w, g, 1) != LT_OK) goto oom;
    }
    for (int l = 0; l < L; l++) {
        gemma3_layer *ly = &m->layers[l];
        lt_tensor *norms[NG_COUNT] = {&ly->input_layernorm,
                                      &ly->q_norm,
                                      &ly->k_norm,
                                      &ly->post_attention_layernorm,
                                      &ly->pre_feedforward_layernorm,
                                      &ly->post_feedforward_layernorm};
        static const char *const NN[NG_COUNT] = {
            "input_layernorm",          "self_attn.q_norm",          "self_attn.k_norm",
            "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"};
        for (int k = 0; k < NG_COUNT; k++) {
            void *g = zalloc(a->ctx, lt_tensor_bytes(norms[k]));
            if (!g) goto oom;
            a->ng.layers[l * NG_COUNT + k] = *norms[k];
            a->ng.layers[l * NG_COUNT + k].data = g;
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, NN[k]);
            if (add_param(a, name, norms[k], g, 0) != LT_OK) goto oom;
        }
        for (int k = 0; k < 7; k++) {
            lt_weight *w = layer_module(ly, k);
            if (own_f32(a, &w->w) != LT_OK) goto oom;
            void *g = zalloc(a->ctx, lt_tensor_bytes(&w->w));
            if (!g) goto oom;
            w->grad_w = w->w;
            w->grad_w.data = g;
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, MODULES[k]);
            if (add_param(a, name, &w->w, g, 1) != LT_OK) goto oom;
        }
    }
    void *g = zalloc(a->ctx, (size_t)H * 4);
    if (!g) goto oom;
    a->ng.final = lt_tensor_1d(LT_F32, g, H);
    if (add_param(a, "model.norm.weight", &m->norm, g, 0) != LT_OK) goto oom;
    return LT_OK;
oom:
    return lt_fail(err, LT_ERR_MEMORY,
                   "%%lora full=true: out of memory for fp32 weights and gradients "
                   "(full fine-tuning needs about 4x the fp32 model size; try LoRA)");
}

/* Drops the gradient buffers of full fine-tuning and unhooks the weights. */
static void detach_full(lt_adapters *a) {
    gemma3_model *m = a->model;
    lt_weight *mats[2] = {&m->embed_tokens, &m->lm_head};
    for (int i = 0; i < 2; i++)
        mats[i]->grad_w.data = NULL;
    for (int l = 0; l < m->cfg.num_hidden_layers; l++)
        for (int k = 0; k < 7; k++)
            layer_module(&m->layers[l], k)->grad_w.data = NULL;
    /* gradient buffers are the params' grads (released in lora_free); the fp32 weight copies
     * stay referenced by the model, so they are not freed here (see lora_free). */
}

lt_status lora_attach(lt_adapters **out, gemma3_model *m, lt_ctx *ctx, const lora_opts *o,
                      char *err) {
    *out = NULL;
    if (!m) {
        return lt_fail(err, LT_ERR_STATE, "%%lora: no model loaded (%%load one first)");
    }
    if (!o->full && o->r <= 0) {
        return lt_fail(err, LT_ERR_ARG, "%%lora: r=%d; the rank must be a positive integer", o->r);
    }
    if (!(o->dropout >= 0 && o->dropout < 1)) {
        return lt_fail(err, LT_ERR_ARG, "%%lora: dropout=%g; accepted: a number from 0 to below 1",
                       o->dropout);
    }
    lt_adapters *a = calloc(1, sizeof *a);
    if (!a) return LT_ERR_MEMORY;
    a->model = m;
    a->ctx = ctx;
    a->full = o->full;
    a->r = o->r;
    a->alpha = o->alpha;
    a->rslora = o->rslora;
    a->dropout = o->dropout;
    const char *t = o->targets && *o->targets
                        ? o->targets
                        : "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";
    a->targets_regex = !o->targets_list && looks_like_regex(t);
    /* checked as regex_matches compiles it, wrapped: a ')' in t may close that group */
    size_t tn = strlen(t) + 3;
    char *wrapped = a->targets_regex ? malloc(tn) : NULL;
    if (wrapped) snprintf(wrapped, tn, "(%s)", t);
    int small = !a->targets_regex || (wrapped && regex_small(wrapped));
    free(wrapped);
    if (!small) {
        free(a);
        return lt_fail(err, LT_ERR_ARG,
                       "%%lora: targets='%.200s' repeats too much for a regex (stacked or nested "
                       "repetitions such as a++ or (x{50}){50} expand to more than %d states); "
                       "write a simpler regex or a list of names",
                       t, REGEX_MAX_NODES);
    }
    if (!a->targets_regex) {
        /* normalise the list to PEFT's spelling */
        char buf[512], norm[512] = "";
        snprintf(buf, sizeof buf, "%s", t);
        char *save = NULL;
        for (char *w = strtok_r(buf, ", ", &save); w; w = strtok_r(NULL, ", ", &save)) {
            char e[96];
            int tower = o->targets_list ? 0 : tower_entry(w, e, sizeof e);
            if (tower < 0) {
                free(a);
                return lt_fail(err, LT_ERR_ARG,
                               "%%lora: targets= names '%.80s', which is no linear of the image "
                               "tower; accepted for the tower: " LORA_TOWER_NAMES,
                               w);
            }
            if (!tower && !o->targets_list && strcmp(w, "vision") == 0) {
                for (int k = 0; k < 6; k++) {
                    size_t n = strlen(norm);
                    snprintf(norm + n, sizeof norm - n, "%svision.%s", n ? "," : "", TOWER_LEAF[k]);
                }
                continue;
            }
            if (!tower) short_to_proj(w, e, sizeof e);
            size_t n = strlen(norm);
            snprintf(norm + n, sizeof norm - n, "%s%s", n ? "," : "", e);
        }
        a->targets = strdup(norm);
    } else {
        a->targets = strdup(t);
    }
    if (!a->targets) {
        free(a);
        return LT_ERR_MEMORY;
    }
    lt_status rc = o->full ? attach_full(a, err) : attach_lora(a, o, err);
    if (rc != LT_OK) {
        if (rc == LT_ERR_MEMORY && !err[0]) lt_fail(err, rc, "%%lora: out of memory");
        lora_free(a);
        return rc;
    }
    *out = a;
    return LT_OK;
}

void lora_free(lt_adapters *a) {
    if (!a) return;
    lt_ctx *ctx = a->ctx;
    for (int i = 0; i < a->n_slots; i++) {
        lora_slot *s = &a->slots[i];
        if (s->w && s->w->lora == &s->lora) s->w->lora = NULL;
        ctx->be->release(ctx, s->lora.a.data);
        ctx->be->release(ctx, s->lora.b.data);
        ctx->be->release(ctx, s->lora.grad_a.data);
        ctx->be->release(ctx, s->lora.grad_b.data);
    }
    if (a->full) {
        detach_full(a);
        for (int i = 0; i < a->n_params; i++)
            ctx->be->release(ctx, a->params[i].grad.data);
        for (int i = 0; i < a->n_owned; i++) {
            owned_copy *c = &a->owned[i];
            /* the trained values back into the model's own storage, in its dtype */
            (void)ctx->be->convert(ctx, c->orig, c->orig_dtype, c->copy, LT_F32,
                                   lt_tensor_numel(c->t));
            c->t->data = c->orig;
            c->t->dtype = c->orig_dtype;
            ctx->be->release(ctx, c->copy);
        }
    }
    optim_reset(a);
    free(a->ng.layers);
    free(a->slots);
    free(a->params);
    free(a->targets);
    free(a->owned);
    free(a);
}

const gemma3_trainable *lora_trainable(lt_adapters *a) {
    if (!a) return NULL;
    a->tr = (gemma3_trainable){a->full, &a->ng, a->dropout, a->full ? 0 : a->r};
    return &a->tr;
}

lt_status lora_zero_grads(lt_adapters *a) {
    for (int i = 0; i < a->n_params; i++) {
        lt_status rc = a->ctx->be->fill(a->ctx, a->params[i].grad, 0.0f);
        if (rc != LT_OK) return rc;
    }
    return LT_OK;
}

void lora_enable(lt_adapters *a, int on) {
    for (int i = 0; i < a->n_slots; i++)
        a->slots[i].lora.enabled = on;
}

void lora_peft_module(const lt_adapters *a, const lora_slot *s, char *out, size_t cap) {
    if (s->part != LORA_TEXT) { /* the tower's and the projector's paths are already PEFT's */
        snprintf(out, cap, "base_model.model.%s", s->module);
        return;
    }
    const char *rest = s->module + strlen("model.");
    if (a->model->cfg.multimodal)
        snprintf(out, cap, "base_model.model.model.language_model.%s", rest);
    else
        snprintf(out, cap, "base_model.model.model.%s", rest);
}

void lora_add_delta(const lora_slot *s, float *out) {
    const lt_tensor *w = &s->w->w;
    int64_t O = w->shape[0], I = w->shape[1], r = s->lora.a.shape[0];
    const float *A = s->lora.a.data, *B = s->lora.b.data;
    float sc = s->lora.scale;
    /* W' = W + s·B·A, in fp32: [O, I] += [O, r]·[r, I] */
    for (int64_t o = 0; o < O; o++) {
        float *row = out + o * I;
        for (int64_t k = 0; k < r; k++) {
            float b = sc * B[o * r + k];
            if (b == 0.0f) continue;
            const float *ar = A + k * I;
            for (int64_t i = 0; i < I; i++)
                row[i] += b * ar[i];
        }
    }
}

lt_status lora_merged_weight(const lt_adapters *a, const lora_slot *s, float *out, char *err) {
    (void)a;
    (void)err;
    lt_weight_dequantize_rows(s->w, 0, s->w->w.shape[0], out); /* 16-bit widened, NF4/int8 */
    lora_add_delta(s, out);
    return LT_OK;
}
