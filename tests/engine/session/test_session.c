/* test_session.c — engine.h end to end on the CPU: %load sources (tiny, a directory, a
 * Hugging Face cache id under a fake HF_HOME, random:*), a failed load keeping the previous
 * model, tokenize/detokenize, logits, streaming generation (pieces are whole UTF-8, their
 * concatenation is the result, seeds reproduce), cancel, chat with history and system prompt.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/engine.h"
#include "tests/unit/tap.h"

#ifndef LATHE_SRCDIR
#define LATHE_SRCDIR "."
#endif

typedef struct collect {
    char text[8192];
    int n_pieces;
    int bad_utf8;
    int cancel_after;
    lt_session *s;
} collect;

static int utf8_valid(const unsigned char *p) {
    while (*p) {
        int n = *p < 0x80             ? 1
                : (*p & 0xe0) == 0xc0 ? 2
                : (*p & 0xf0) == 0xe0 ? 3
                : (*p & 0xf8) == 0xf0 ? 4
                                      : 0;
        if (!n) return 0;
        for (int i = 1; i < n; i++)
            if ((p[i] & 0xc0) != 0x80) return 0;
        p += n;
    }
    return 1;
}

static void on_text(void *ctx, const char *piece) {
    collect *c = ctx;
    c->n_pieces++;
    if (!utf8_valid((const unsigned char *)piece)) c->bad_utf8 = 1;
    strncat(c->text, piece, sizeof c->text - strlen(c->text) - 1);
    if (c->cancel_after && c->n_pieces == c->cancel_after) lt_cancel(c->s);
}

static void test_load_and_tokens(lt_session *s) {
    lt_model_info info;
    int32_t *ids;
    int n;
    is_int(lt_tokenize(s, "x", &ids, &n), LT_ERR_STATE,
           "tokenize without a model is a state error");
    ok(strstr(lt_last_error(s), "%load") != NULL, "... and says to %load first");
    lt_status rc = lt_load(s, "tiny", NULL, NULL);
    is_int(rc, LT_OK, "%load tiny");
    if (rc != LT_OK) diag("%s", lt_last_error(s));
    lt_model_info_get(s, &info);
    ok(info.loaded && info.hidden == 128 && info.n_layers == 4 && info.vocab == 4096 &&
           info.n_kv_heads == 2,
       "tiny: hidden 128, 4 layers, 2 kv heads, vocab 4096");
    is_str(info.source, "tiny", "info.source is tiny");
    is_str(info.dtype, "fp32", "tiny is stored fp32");
    is_int(info.skipped_vision, 0, "tiny has no vision tower");

    /* failures leave tiny loaded */
    rc = lt_load(s, "/nonexistent/model/dir", NULL, NULL);
    ok(rc != LT_OK && strstr(lt_last_error(s), "/nonexistent/model/dir"),
       "a missing directory is named");
    lt_load_opts bad = {.dtype = "int7"};
    rc = lt_load(s, "tiny", &bad, NULL);
    ok(rc == LT_ERR_ARG && strstr(lt_last_error(s), "int7"), "a bad dtype= is named");
    lt_load_opts cu = {.device = "cuda"};
    is_int(lt_load(s, "tiny", &cu, NULL), LT_ERR_DEVICE,
           "device=cuda without CUDA is a device error");
    rc = lt_load(s, "random:gemma-3-9b", NULL, NULL);
    ok(rc == LT_ERR_ARG && strstr(lt_last_error(s), "270m, 1b, 4b, 12b, 27b"),
       "an unknown random size lists sizes");
    lt_model_info_get(s, &info);
    ok(info.loaded && !strcmp(info.source, "tiny"), "after failed loads tiny is still loaded");

    rc = lt_tokenize(s, "<start_of_turn>user\nHi 12", &ids, &n);
    ok(rc == LT_OK && n >= 3 && ids[0] == 6, "literal <start_of_turn> becomes its id");
    char *text = NULL;
    rc = lt_detokenize(s, ids, n, &text);
    ok(rc == LT_OK && text && strstr(text, "user\nHi 12"), "detokenize gives the text back");
    free(text);
    free(ids);

    float *lg;
    int V;
    int32_t seq[4] = {2, 100, 200, 300};
    rc = lt_logits(s, seq, 4, &lg, &V);
    ok(rc == LT_OK && V == 4096, "logits: [4, 4096]");
    int finite = 1;
    for (int i = 0; rc == LT_OK && i < 4 * V; i++)
        finite &= lg[i] == lg[i] && lg[i] < 1e30f && lg[i] > -1e30f;
    ok(finite, "logits are finite");
    if (rc == LT_OK) free(lg);
    seq[2] = 5000;
    ok(lt_logits(s, seq, 4, &lg, &V) == LT_ERR_ARG && strstr(lt_last_error(s), "5000"),
       "an id outside the vocabulary is refused and named");
}

static void test_generate(lt_session *s) {
    lt_gen_opts o;
    lt_gen_opts_default(&o);
    is_int(o.top_k, 64, "Gemma default top_k 64");
    o.max_new = 24;
    o.seed = 11;
    collect c = {0};
    lt_callbacks cb = {.ctx = &c, .text = on_text};
    char *out = NULL;
    lt_status rc = lt_generate(s, "Once upon a time, in 2024, 🙂", &o, &cb, &out);
    is_int(rc, LT_OK, "generate (sampled) runs");
    ok(out && !strcmp(out, c.text), "streamed pieces concatenate to the result");
    ok(!c.bad_utf8, "no streamed piece splits a UTF-8 character");
    char *out2 = NULL;
    collect c2 = {0};
    cb.ctx = &c2;
    lt_generate(s, "Once upon a time, in 2024, 🙂", &o, &cb, &out2);
    ok(out && out2 && !strcmp(out, out2), "the same seed gives the same text");
    free(out);
    free(out2);

    /* cancel from the text callback after 3 pieces */
    o.max_new = 40;
    o.temperature = 0;
    collect c3 = {.cancel_after = 3, .s = s};
    cb.ctx = &c3;
    rc = lt_generate(s, "Tell me a story", &o, &cb, &out);
    is_int(rc, LT_CANCELLED, "a cancel between tokens returns LT_CANCELLED");
    ok(out && !strcmp(out, c3.text) && c3.n_pieces <= 4,
       "a cancelled call keeps what was generated");
    free(out);
    o.max_new = 3;
    collect c4 = {0};
    cb.ctx = &c4;
    is_int(lt_generate(s, "again", &o, &cb, &out), LT_OK,
           "the next call runs (the flag is cleared)");
    free(out);
    o.max_new = 0;
    rc = lt_generate(s, "nothing", &o, NULL, &out);
    ok(rc == LT_OK && out && !out[0], "max_new=0 gives an empty completion");
    free(out);
    o.max_new = 5;
    o.top_p = 2;
    ok(lt_generate(s, "x", &o, NULL, &out) == LT_ERR_ARG && strstr(lt_last_error(s), "top_p"),
       "a bad top_p is named");
}

/* The session reuses its KV cache when a new sequence extends the cached one: the result must
 * equal a fresh computation. */
static void test_cache_reuse(lt_session *s) {
    int32_t *p = NULL, *g = NULL, *h = NULL, *all = NULL;
    int np = 0, ng = 0, nh = 0, na = 0;
    lt_gen_opts o;
    lt_gen_opts_default(&o);
    o.temperature = 0;
    lt_tokenize(s,
                "<bos><start_of_turn>user\nWrite a haiku about the "
                "sea.<end_of_turn>\n<start_of_turn>model\n",
                &p, &np);
    o.max_new = 5;
    lt_status r1 = lt_generate_ids(s, p, np, &o, &g, &ng);
    int32_t *ext = malloc(sizeof(int32_t) * (size_t)(np + ng));
    memcpy(ext, p, sizeof(int32_t) * (size_t)np);
    if (ng) memcpy(ext + np, g, sizeof(int32_t) * (size_t)ng);
    o.max_new = 4;
    lt_status r2 = lt_generate_ids(s, ext, np + ng, &o, &h, &nh); /* extends the cache */
    char *junk = NULL;
    lt_generate(s, "unrelated", &o, NULL, &junk); /* replaces the cache */
    free(junk);
    o.max_new = 9;
    lt_status r3 = lt_generate_ids(s, p, np, &o, &all, &na);
    int same = r1 == LT_OK && r2 == LT_OK && r3 == LT_OK && ng == 5 && nh == 4 && na == 9 &&
               !memcmp(all, g, 5 * sizeof(int32_t)) && !memcmp(all + 5, h, 4 * sizeof(int32_t));
    ok(same, "continuing from the cached prefix == generating from scratch");
    free(p);
    free(g);
    free(h);
    free(all);
    free(ext);
}

static void test_chat(lt_session *s) {
    const char *roles[] = {"system", "user", "assistant"},
               *contents[] = {"Be brief.", " Hi ", "Yo"};
    char *text = NULL;
    lt_status rc = lt_chat_render(s, roles, contents, 3, 1, &text);
    is_str(rc == LT_OK ? text : "",
           "<bos><start_of_turn>user\nBe "
           "brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
           "<start_of_turn>model\n",
           "chat_render: system folded, trimmed, assistant -> model");
    free(text);
    const char *r2[] = {"user", "user"}, *c2[] = {"a", "b"};
    ok(lt_chat_render(s, r2, c2, 2, 1, &text) == LT_ERR_ARG &&
           strstr(lt_last_error(s), "alternate"),
       "non-alternating roles: the template's error");

    lt_gen_opts o;
    lt_gen_opts_default(&o);
    o.max_new = 6;
    o.temperature = 0;
    is_int(lt_chat_system(s, "You are a pirate."), LT_OK, "set a system prompt");
    char *reply = NULL;
    collect c = {0};
    lt_callbacks cb = {.ctx = &c, .text = on_text};
    rc = lt_chat(s, "Hello there", &o, &cb, &reply);
    is_int(rc, LT_OK, "chat turn 1");
    ok(reply && !strcmp(reply, c.text), "chat streams its reply");
    char *first = reply ? strdup(reply) : NULL;
    free(reply);
    rc = lt_chat(s, "And then?", &o, NULL, &reply);
    is_int(rc, LT_OK, "chat turn 2 (history re-rendered and re-tokenized, as transformers does)");
    char *second = reply;
    /* the same two turns again, but with the cache invalidated in between: same reply */
    lt_chat_reset(s);
    lt_chat(s, "Hello there", &o, NULL, &reply);
    free(reply);
    char *junk = NULL;
    lt_generate(s, "something else entirely", &o, NULL, &junk);
    free(junk);
    rc = lt_chat(s, "And then?", &o, NULL, &reply);
    ok(rc == LT_OK && second && reply && !strcmp(second, reply),
       "turn 2 after another call in between gives the same reply");
    free(reply);
    free(second);
    lt_chat_reset(s);
    rc = lt_chat(s, "Hello there", &o, NULL, &reply);
    ok(rc == LT_OK && first && reply && !strcmp(first, reply),
       "after reset, the same first turn gives the same reply");
    free(reply);
    free(first);
    lt_chat_system(s, NULL);
    lt_chat_reset(s);
}

static void test_hf_cache(lt_session *s) {
    char home[] = "/tmp/lathe-hf-XXXXXX";
    if (!mkdtemp(home)) return;
    char p[1024], cmd[4096];
    setenv("HF_HOME", home, 1);
    unsetenv("HF_HUB_CACHE");
    setenv("HF_ENDPOINT", "http://127.0.0.1:9", 1); /* nothing listens: the Hub is unreachable */
    lt_status rc = lt_load(s, "acme/tiny-gemma", NULL, NULL);
    ok(rc == LT_ERR_IO && strstr(lt_last_error(s), home) &&
           strstr(lt_last_error(s), "models--acme--tiny-gemma"),
       "an id not in the cache says where it looked");
    snprintf(p, sizeof p, "%s/hub/models--acme--tiny-gemma/snapshots/0123abc", home);
    snprintf(cmd, sizeof cmd,
             "mkdir -p %s %s/hub/models--acme--tiny-gemma/refs && cp %s/models/tiny/* %s/ && "
             "printf 0123abc > %s/hub/models--acme--tiny-gemma/refs/main",
             p, home, LATHE_SRCDIR, p, home);
    if (system(cmd) != 0) diag("setup failed: %s", cmd);
    rc = lt_load(s, "acme/tiny-gemma", NULL, NULL);
    is_int(rc, LT_OK, "a Hugging Face id loads from $HF_HOME/hub via refs/main");
    if (rc != LT_OK) diag("%s", lt_last_error(s));
    lt_model_info info;
    lt_model_info_get(s, &info);
    ok(strstr(info.source, "snapshots/0123abc") != NULL, "the snapshot named by refs/main is used");
    snprintf(cmd, sizeof cmd, "rm -rf %s", home);
    if (system(cmd) != 0) diag("cleanup failed");
    unsetenv("HF_HOME");
    unsetenv("HF_ENDPOINT");
}

static void test_random(lt_session *s) {
    lt_status rc = lt_load(s, "random:gemma-3-270m", NULL, NULL);
    is_int(rc, LT_OK, "random:gemma-3-270m loads");
    if (rc != LT_OK) {
        diag("%s", lt_last_error(s));
        return;
    }
    lt_model_info info;
    lt_model_info_get(s, &info);
    is_int(info.n_params, 268098176, "270m: 268,098,176 text parameters");
    is_str(info.dtype, "bf16", "random:* defaults to bf16 storage");
    is_int(info.vocab, 262144, "270m keeps the real 262144 rows");
    float *lg;
    int V;
    int32_t ids[3] = {2, 10, 20};
    rc = lt_logits(s, ids, 3, &lg, &V);
    ok(rc == LT_OK && V == 262144, "random 270m logits have 262144 columns");
    if (rc == LT_OK) free(lg);
    lt_gen_opts o;
    lt_gen_opts_default(&o);
    o.max_new = 2;
    int32_t *out;
    int n;
    ok(lt_generate_ids(s, ids, 3, &o, &out, &n) == LT_OK && n >= 1, "random 270m generates");
    if (n) free(out);
}

int main(void) {
    lt_session *s = lt_session_new();
    unsetenv("LATHE_TINY_DIR");
    test_load_and_tokens(s);
    test_generate(s);
    test_cache_reuse(s);
    test_chat(s);
    test_hf_cache(s);
    test_random(s);
    lt_session_free(s);
    return tap_done();
}
