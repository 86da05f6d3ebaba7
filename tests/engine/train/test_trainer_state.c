/* test_trainer_state.c — a checkpoint's trainer_state.json (cuda/train/trainer_state.c): what
 * %train save= writes reads back to the same options and counters, and every damaged or
 * hand-edited file is refused with LT_ERR_FORMAT naming the key, leaving nothing allocated.
 *
 * Bad inputs tried: not JSON, a top level that is not an object, options missing or not an
 * object, a duplicated key, format_version 2 and "1", step -1 and 2^31, step 2.5, position -1,
 * units 0, tokens missing, batch "8", batch 2^40, lr 1e39 (beyond a float), lr missing,
 * shuffle 1, seed 1.5, a format of 17 bytes, data holding a NUL byte, full "yes", losses not an
 * array, losses holding a string or 1e39, and a file that is not there.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/train/train.h"
#include "tests/unit/tap.h"

static lt_train_opts sample_opts(void) {
    lt_train_opts o;
    lt_train_opts_default(&o);
    o.data = "rows.jsonl";
    o.format = "chat";
    o.schedule = "cosine";
    o.batch = 4;
    o.grad_accum = 3;
    o.steps = 40;
    o.epochs = 2.5f;
    o.lr = 0.5f;
    o.warmup = 5;
    o.weight_decay = 0.125f;
    o.max_grad_norm = 0.5f;
    o.packing = 1;
    o.shuffle = 0;
    o.responses_only = 0;
    o.seed = 0xfedcba9876543210ull; /* above 2^63: written as a negative integer */
    return o;
}

static void test_round_trip(void) {
    float losses[3] = {2.5f, 2.25f, 1.875f};
    trainer_state s = {12, 40, 97, 1, 144, 30210, losses, 3};
    lt_train_opts o = sample_opts();
    char *text = trainer_state_text(&s, &o, 512);
    ok(text != NULL, "trainer_state_text writes a text");
    lt_train_opts r;
    lt_train_opts_default(&r);
    trainer_state got;
    trainer_state_texts tx;
    char err[LT_ERRLEN] = "";
    lt_status rc = trainer_state_parse(text, strlen(text), "t.json", &got, &r, &tx, err);
    is_int(rc, LT_OK, "it reads back");
    if (rc != LT_OK) diag("%s", err);
    ok(got.step == 12 && got.total_steps == 40 && got.units == 97 && got.full == 1 &&
           got.position == 144 && got.tokens == 30210,
       "step, total_steps, units, full, position and tokens read back");
    ok(got.n_losses == 3 && got.losses && got.losses[0] == 2.5f && got.losses[2] == 1.875f,
       "the losses read back");
    ok(r.batch == 4 && r.grad_accum == 3 && r.steps == 40 && r.warmup == 5 && r.max_seq == 512,
       "the integer options read back (max_seq: the run's)");
    ok(r.epochs == 2.5f && r.lr == 0.5f && r.weight_decay == 0.125f && r.max_grad_norm == 0.5f &&
           r.beta1 == o.beta1 && r.beta2 == o.beta2 && r.eps == o.eps,
       "the real options read back");
    ok(r.packing == 1 && r.shuffle == 0 && r.responses_only == 0, "the flags read back");
    ok(r.seed == 0xfedcba9876543210ull, "a seed above 2^63 reads back as its 64 bits");
    ok(!strcmp(r.data, "rows.jsonl") && !strcmp(r.format, "chat") &&
           !strcmp(r.schedule, "cosine") && r.data == tx.data,
       "the text options read back, into the texts");
    trainer_state_free(&got);
    ok(got.losses == NULL && got.n_losses == 0, "trainer_state_free empties the state");
    free(text);
    o.data = "rows\xff.jsonl"; /* JSON holds UTF-8 only */
    text = trainer_state_text(&s, &o, 512);
    ok(text == NULL, "a data path that is not UTF-8: no text (the caller says why)");
    free(text);
}

/* The writer's text with one edit: the first `from` replaced by `to`. */
static char *edited(const char *from, const char *to) {
    float losses[2] = {2.5f, 2.0f};
    trainer_state s = {2, 10, 8, 0, 8, 900, losses, 2};
    lt_train_opts o = sample_opts();
    char *text = trainer_state_text(&s, &o, 256);
    char *at = strstr(text, from);
    if (!at) {
        diag("edit: no '%s' in the text", from);
        return text;
    }
    size_t n = strlen(text) + strlen(to) + 1;
    char *out = malloc(n);
    snprintf(out, n, "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    free(text);
    return out;
}

/* Parses text (freed here): LT_ERR_FORMAT, a message holding `names`, nothing allocated. */
static void refused(char *text, const char *names, const char *what) {
    lt_train_opts r;
    lt_train_opts_default(&r);
    trainer_state got;
    trainer_state_texts tx;
    char err[LT_ERRLEN] = "";
    lt_status rc =
        trainer_state_parse(text, strlen(text), "ck/trainer_state.json", &got, &r, &tx, err);
    char name[256];
    snprintf(name, sizeof name, "%s: refused, naming %s", what, names);
    ok(rc == LT_ERR_FORMAT && strstr(err, names) && strstr(err, "ck/trainer_state.json") &&
           got.losses == NULL && got.n_losses == 0,
       name);
    if (rc != LT_ERR_FORMAT || !strstr(err, names)) diag("rc %d: %s", (int)rc, err);
    free(text);
}

static char *dup_text(const char *s) {
    char *d = malloc(strlen(s) + 1);
    strcpy(d, s);
    return d;
}

static void test_bad_files(void) {
    refused(dup_text("{\"step\": 2,"), "not JSON", "a cut-off file");
    refused(dup_text("[1, 2]"), "an object", "an array");
    refused(edited("\"options\"", "\"opts\""), "\"options\" is missing", "no options");
    refused(dup_text("{\"options\": 3, \"step\": 1}"), "options", "options a number");
    refused(edited("\"step\": 2", "\"step\": 2, \"step\": 3"), "duplicate", "a duplicated key");
    refused(edited("\"format_version\": 1", "\"format_version\": 2"), "format_version 2",
            "format_version 2");
    refused(edited("\"format_version\": 1", "\"format_version\": \"1\""), "format_version",
            "format_version a string");
    refused(edited("\"step\": 2", "\"step\": -1"), "\"step\" is -1", "step -1");
    refused(edited("\"step\": 2", "\"step\": 2147483648"), "\"step\" is 2147483648", "step 2^31");
    refused(edited("\"step\": 2", "\"step\": 2.5"), "\"step\"", "step 2.5");
    refused(edited("\"position\": 8", "\"position\": -1"), "\"position\" is -1", "position -1");
    refused(edited("\"units\": 8", "\"units\": 0"), "\"units\" is 0", "units 0");
    refused(edited("\"tokens\": 900", "\"tokenz\": 900"), "\"tokens\" is missing",
            "tokens missing");
    refused(edited("\"batch\": 4", "\"batch\": \"8\""), "\"batch\" is a string", "batch \"8\"");
    refused(edited("\"batch\": 4", "\"batch\": 1099511627776"), "\"batch\"", "batch 2^40");
    refused(edited("\"lr\": 0.5", "\"lr\": 1e39"), "\"lr\"", "lr 1e39");
    refused(edited("\"lr\": 0.5", "\"lz\": 0.0001"), "\"lr\" is missing", "lr missing");
    refused(edited("\"shuffle\": false", "\"shuffle\": 1"), "\"shuffle\"", "shuffle 1");
    refused(edited("\"seed\": -81985529216486896", "\"seed\": 1.5"), "\"seed\"", "seed 1.5");
    refused(edited("\"format\": \"chat\"", "\"format\": \"chatchatchatchatc\""), "\"format\"",
            "a format of 17 bytes");
    refused(edited("\"data\": \"rows.jsonl\"", "\"data\": \"rows\\u0000.jsonl\""), "NUL",
            "data with a NUL byte");
    refused(edited("\"full\": false", "\"full\": \"yes\""), "\"full\"", "full \"yes\"");
    refused(edited("\"losses\": [", "\"losses\": 3, \"x\": ["), "\"losses\"", "losses a number");
    refused(edited("\"losses\": [", "\"losses\": [\"x\", "), "losses[0]", "losses with a string");
    refused(edited("\"losses\": [", "\"losses\": [1, 1e39, "), "losses[1]",
            "a loss beyond a float");

    trainer_state got;
    lt_train_opts r;
    trainer_state_texts tx;
    char err[LT_ERRLEN] = "";
    lt_status rc = trainer_state_read("/nonexistent/ck", &got, &r, &tx, err);
    ok(rc == LT_ERR_IO && strstr(err, "/nonexistent/ck/trainer_state.json"),
       "a missing file is LT_ERR_IO naming it");
}

int main(void) {
    test_round_trip();
    test_bad_files();
    return tap_done();
}
