/* test_data.c — datasets (data.c) and learning-rate schedules (optim.c).
 *
 * Data, with the tiny tokenizer: each format is detected from its fields and can be forced;
 * text = BOS + tokens, every token a label, no EOS; chat formats render Gemma's template with
 * one <bos> and, with responses_only, label exactly the model turns' text plus the
 * "<end_of_turn>\n" that closes them; alpaca joins instruction and input with a blank line;
 * sharegpt maps human/gpt; a JSON array works like JSONL with record numbers in errors;
 * samples longer than max_seq are cut and counted.
 * Schedules: transformers' get_{constant,linear,cosine}_schedule_with_warmup at chosen steps.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda/train/train.h"
#include "tests/unit/tap.h"

#ifndef LATHE_SRCDIR
#define LATHE_SRCDIR "."
#endif

static char tmpdir[256];
static lt_tokenizer *tok;
static gemma3_config cfg;

static const char *write_tmp(const char *name, const char *text) {
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", tmpdir, name);
    FILE *f = fopen(p, "w");
    fputs(text, f);
    fclose(f);
    return p;
}

/* The pieces of the labelled (or unlabelled) tokens of sample i, concatenated. */
static void pieces(const train_sample *s, int labelled, char *out, size_t cap) {
    out[0] = 0;
    size_t n = 0;
    for (int i = 0; i < s->n; i++) {
        if (s->mask[i] != labelled) continue;
        char buf[64];
        int k = tok_piece_bytes(tok, s->ids[i], buf, sizeof buf - 1);
        if (k <= 0) { /* control / user-defined pieces: their text */
            snprintf(buf, sizeof buf, "%s", tok_piece(tok, s->ids[i]));
            k = (int)strlen(buf);
        }
        if (n + (size_t)k + 1 >= cap) break;
        memcpy(out + n, buf, (size_t)k);
        n += (size_t)k;
        out[n] = 0;
    }
}

static lt_status load(train_data *d, const char *path, const char *format, int max_seq, int ro,
                      char *err) {
    data_opts o = {path, format, max_seq, ro};
    return data_load(d, &o, tok, &cfg, NULL, err);
}

static void test_formats(void) {
    char err[LT_ERRLEN] = "", got[2048];
    train_data d;
    const char *p =
        write_tmp("t.jsonl", "{\"text\": \"Hello world\"}\n\n{\"text\": \"Second one\"}\n");
    is_int(load(&d, p, "auto", 0, 1, err), LT_OK, "text: loads");
    is_str(d.format, "text", "text: detected");
    is_int(d.n, 2, "text: two samples (blank line skipped)");
    ok(d.s[0].ids[0] == cfg.bos_id && d.s[0].ids[d.s[0].n - 1] != cfg.eos_id,
       "text: BOS first, no EOS added");
    pieces(&d.s[0], 1, got, sizeof got);
    is_str(got, "Hello world", "text: every token after BOS is a label");
    is_int(d.s[1].line, 3, "text: line numbers count blank lines");
    data_free(&d);

    p = write_tmp("m.jsonl", "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, "
                             "{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", "
                             "\"content\": \"Hello!\"}, "
                             "{\"role\": \"user\", \"content\": \"Again\"}, {\"role\": \"model\", "
                             "\"content\": \" Bye \"}]}\n");
    is_int(load(&d, p, "auto", 0, 1, err), LT_OK, "messages: loads");
    is_str(d.format, "messages", "messages: detected");
    pieces(&d.s[0], 1, got, sizeof got);
    is_str(got, "Hello!<end_of_turn>\nBye<end_of_turn>\n",
           "responses_only: labels = model turns + <end_of_turn>\\n");
    pieces(&d.s[0], 0, got, sizeof got);
    is_str(got,
           "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
           "<start_of_turn>user\nAgain<end_of_turn>\n<start_of_turn>model\n",
           "the rest is context (system folded into the first user turn)");
    data_free(&d);
    is_int(load(&d, p, "messages", 0, 0, err), LT_OK, "responses_only=false loads");
    int all = 1;
    for (int i = 1; i < d.s[0].n; i++)
        all &= d.s[0].mask[i];
    ok(all, "responses_only=false: every token trains");
    data_free(&d);

    p = write_tmp("a.jsonl",
                  "{\"instruction\": \"Add\", \"input\": \"2 and 3\", \"output\": \"5\"}\n"
                  "{\"instruction\": \"Say hi\", \"output\": \"hi\"}\n");
    is_int(load(&d, p, "auto", 0, 1, err), LT_OK, "alpaca: loads");
    is_str(d.format, "alpaca", "alpaca: detected");
    pieces(&d.s[0], 0, got, sizeof got);
    is_str(got, "<bos><start_of_turn>user\nAdd\n\n2 and 3<end_of_turn>\n<start_of_turn>model\n",
           "alpaca: instruction + blank line + input as the user turn");
    pieces(&d.s[1], 1, got, sizeof got);
    is_str(got, "hi<end_of_turn>\n", "alpaca: output is the model turn; input is optional");
    data_free(&d);

    p = write_tmp(
        "s.json",
        "[{\"conversations\": [{\"from\": \"human\", \"value\": \"Q\"}, {\"from\": \"gpt\", "
        "\"value\": \"A\"}]}, {\"conversations\": [{\"from\": \"human\", \"value\": \"Q2\"}, "
        "{\"from\": \"alien\", \"value\": \"A2\"}]}]");
    ok(load(&d, p, "auto", 0, 1, err) != LT_OK &&
           strstr(err, "s.json record 2: conversations[1].from is 'alien'"),
       "sharegpt in a JSON array: errors name the record and the field");
    diag("%s", err);
    p = write_tmp(
        "s2.json",
        "[{\"conversations\": [{\"from\": \"human\", \"value\": \"Q\"}, {\"from\": \"gpt\", "
        "\"value\": \"A\"}]}]");
    is_int(load(&d, p, "auto", 0, 1, err), LT_OK, "sharegpt: loads");
    pieces(&d.s[0], 1, got, sizeof got);
    is_str(got, "A<end_of_turn>\n", "sharegpt: gpt is the model");
    data_free(&d);

    p = write_tmp("f.jsonl", "{\"text\": \"x\", \"messages\": []}\n");
    ok(load(&d, p, "text", 0, 1, err) == LT_OK && d.n == 1,
       "format= forces a format over detection");
    data_free(&d);
    ok(load(&d, p, "alpaca", 0, 1, err) != LT_OK && strstr(err, "field 'instruction' is missing"),
       "a forced format names the missing field");

    p = write_tmp("long.jsonl",
                  "{\"text\": \"one two three four five six seven eight nine ten\"}\n");
    is_int(load(&d, p, "auto", 4, 1, err), LT_OK, "a sample longer than max_seq is cut");
    ok(d.s[0].n == 4 && d.n_truncated == 1, "to max_seq tokens, and counted");
    data_free(&d);
    p = write_tmp("empty.jsonl", "{\"text\": \"\"}\n");
    ok(load(&d, p, "auto", 0, 1, err) != LT_OK && strstr(err, "line 1: field 'text' is empty"),
       "empty text");
    p = write_tmp("num.jsonl", "{\"text\": 5}\n");
    ok(load(&d, p, "auto", 0, 1, err) != LT_OK && strstr(err, "field 'text' is not a string"),
       "text not a string");
    p = write_tmp("arr.jsonl", "[1, 2]\n");
    ok(load(&d, p, "auto", 0, 1, err) != LT_OK &&
           strstr(err, "record 1: a record must be a JSON object"),
       "a record that is not an object");
    p = write_tmp("unknown.jsonl", "{\"prompt\": \"x\"}\n");
    ok(load(&d, p, "auto", 0, 1, err) != LT_OK && strstr(err, "cannot tell the format"),
       "an unknown format");
}

static void test_schedules(void) {
    /* transformers: warmup 2, 10 steps */
    is_close(optim_lr_factor(SCHED_LINEAR, 0, 2, 10), 0.0, 1e-12, "warmup starts at 0");
    is_close(optim_lr_factor(SCHED_LINEAR, 1, 2, 10), 0.5, 1e-12, "warmup step 1 of 2 = 0.5");
    is_close(optim_lr_factor(SCHED_LINEAR, 2, 2, 10), 1.0, 1e-12, "linear: 1 after warmup");
    is_close(optim_lr_factor(SCHED_LINEAR, 6, 2, 10), 0.5, 1e-12, "linear: (10-6)/(10-2)");
    is_close(optim_lr_factor(SCHED_COSINE, 6, 2, 10), 0.5, 1e-12, "cosine: half way = 0.5");
    is_close(optim_lr_factor(SCHED_COSINE, 4, 2, 10), 0.5 * (1 + cos(M_PI * 0.25)), 1e-12,
             "cosine: a quarter");
    is_close(optim_lr_factor(SCHED_CONSTANT, 1, 2, 10), 0.5, 1e-12, "constant: warmup too");
    is_close(optim_lr_factor(SCHED_CONSTANT, 9, 2, 10), 1.0, 1e-12, "constant after warmup");
    is_close(optim_lr_factor(SCHED_LINEAR, 0, 0, 3), 1.0, 1e-12,
             "no warmup: full lr at the first step");
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "%s/lathe-data-XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmpdir)) {
        printf("Bail out! no temp folder\n");
        return 1;
    }
    char err[LT_ERRLEN], path[600];
    snprintf(path, sizeof path, "%s/models/tiny/tokenizer.model", LATHE_SRCDIR);
    if (tok_load(&tok, path, err) != LT_OK) {
        printf("Bail out! %s\n", err);
        return 1;
    }
    gemma3_config_defaults(&cfg);
    gemma3_config_set_tokens(&cfg, tok);
    test_formats();
    test_schedules();
    tok_free(tok);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) diag("could not remove %s", tmpdir);
    return tap_done();
}
