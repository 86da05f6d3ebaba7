/* test_data.c — datasets (data.c) and learning-rate schedules (optim.c).
 *
 * Data, with the tiny tokenizer: each format is detected from its fields and can be forced;
 * text = BOS + tokens, every token a label, no EOS; chat formats render Gemma's template with
 * one <bos> and, with responses_only, label exactly the model turns' text plus the
 * "<end_of_turn>\n" that closes them; alpaca joins instruction and input with a blank line;
 * sharegpt maps human/gpt; a JSON array works like JSONL with record numbers in errors;
 * samples longer than max_seq are cut and counted.
 * Reading safely: a directory, a FIFO (with no writer: a blocking read would hang, so an alarm
 * fails the test instead), a character device and a socket are each refused by name; the file
 * and line limits are named (from data_opts and from LATHE_DATA_MAX_BYTES / _ROW); a UTF-8 BOM
 * is skipped in JSONL and JSON arrays; a NUL byte is named; a 4 MB record with max_seq=16 is
 * cut before tokenizing (the same first tokens as its start, in well under a second); the
 * cancel flag stops reading, before and between chunks; progress hears "reading" up to the size.
 * Schedules: transformers' get_{constant,linear,cosine}_schedule_with_warmup at chosen steps.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
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
    data_opts o = {.path = path, .format = format, .max_seq = max_seq, .responses_only = ro};
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
    /* a system message as a list of one text part renders as the string does (the template
     * reads messages[0]['content'][0]['text']) */
    const char *p1 = write_tmp(
        "m1.jsonl", "{\"messages\": [{\"role\": \"system\", \"content\": [{\"type\": \"text\", "
                    "\"text\": \"Be brief.\"}]}, {\"role\": \"user\", \"content\": \"Hi\"}, "
                    "{\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n");
    is_int(load(&d, p1, "auto", 0, 1, err), LT_OK, "messages: a system list of one text part");
    pieces(&d.s[0], 0, got, sizeof got);
    is_str(got, "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n",
           "... folded into the first user turn as the string is");
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

static lt_status load_opts(train_data *d, data_opts *o, char *err) {
    return data_load(d, o, tok, &cfg, NULL, err);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static atomic_int cancel_flag;
static int64_t progress_done, progress_total;
static int progress_calls;

static void progress_cancel_after_first(void *ctx, const char *what, int64_t done, int64_t total) {
    (void)ctx;
    if (strcmp(what, "reading") == 0) atomic_store(&cancel_flag, 1);
    progress_done = done;
    progress_total = total;
}

static void progress_record(void *ctx, const char *what, int64_t done, int64_t total) {
    (void)ctx;
    if (strcmp(what, "reading") != 0) return;
    progress_calls++;
    progress_done = done;
    progress_total = total;
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "not ok - data_load blocked on a FIFO (alarm after 20 s)\n";
    if (write(1, msg, sizeof msg - 1) < 0) _exit(2);
    _exit(1);
}

static void test_safe_reading(void) {
    train_data d;
    char err[LT_ERRLEN], p[600];

    /* not regular files, each named */
    ok(load(&d, tmpdir, "auto", 0, 1, err) == LT_ERR_IO && strstr(err, "is a directory"),
       "bad input: a directory says 'is a directory'");
    diag("%s", err);
    snprintf(p, sizeof p, "%s/fifo.jsonl", tmpdir);
    if (mkfifo(p, 0600) == 0) {
        signal(SIGALRM, on_alarm);
        alarm(20);
        ok(load(&d, p, "auto", 0, 1, err) == LT_ERR_IO && strstr(err, "is a FIFO (named pipe)"),
           "bad input: a FIFO with no writer is refused by name, without blocking");
        alarm(0);
        diag("%s", err);
    } else {
        ok(0, "bad input: mkfifo for the FIFO test");
    }
    ok(load(&d, "/dev/zero", "auto", 0, 1, err) == LT_ERR_IO &&
           strstr(err, "is a character device"),
       "bad input: /dev/zero (a character device) is refused by name, never read");
    snprintf(p, sizeof p, "%s/sock", tmpdir);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(p) < sizeof sa.sun_path) memcpy(sa.sun_path, p, strlen(p) + 1);
    if (fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
        ok(load(&d, p, "auto", 0, 1, err) == LT_ERR_IO && strstr(err, "is a socket"),
           "bad input: a socket is refused by name");
    } else {
        ok(0, "bad input: a unix socket for the socket test");
    }
    if (fd >= 0) close(fd);

    /* limits, named in the message */
    const char *two = write_tmp("two.jsonl", "{\"text\": \"one two three\"}\n"
                                             "{\"text\": \"four five six seven eight nine\"}\n");
    data_opts o = {two, "auto", 0, 1, NULL, 40, 0, NULL};
    ok(load_opts(&d, &o, err) == LT_ERR_ARG && strstr(err, "over the 40 bytes limit") &&
           strstr(err, "LATHE_DATA_MAX_BYTES"),
       "bad input: a file over the file limit is refused, naming the limit and how to raise it");
    diag("%s", err);
    setenv("LATHE_DATA_MAX_BYTES", "50", 1);
    o.max_file_bytes = 0;
    ok(load_opts(&d, &o, err) == LT_ERR_ARG && strstr(err, "over the 50 bytes limit"),
       "bad input: LATHE_DATA_MAX_BYTES sets the file limit");
    unsetenv("LATHE_DATA_MAX_BYTES");
    o.max_row_bytes = 30;
    ok(load_opts(&d, &o, err) == LT_ERR_ARG && strstr(err, "two.jsonl line 2") &&
           strstr(err, "longer than the 30 bytes limit for one record") &&
           strstr(err, "LATHE_DATA_MAX_ROW"),
       "bad input: a line over the row limit is refused, naming the line and the limit");
    diag("%s", err);
    o.max_row_bytes = 0;
    setenv("LATHE_DATA_MAX_ROW", "30", 1);
    ok(load_opts(&d, &o, err) == LT_ERR_ARG && strstr(err, "30 bytes limit"),
       "bad input: LATHE_DATA_MAX_ROW sets the row limit");
    unsetenv("LATHE_DATA_MAX_ROW");
    is_int(load_opts(&d, &o, err), LT_OK, "the same file loads within the default limits");
    is_int(d.n, 2, "both records");
    data_free(&d);

    /* a UTF-8 byte order mark is skipped */
    const char *bom = write_tmp("bom.jsonl", "\xEF\xBB\xBF{\"text\": \"with a BOM\"}\n");
    ok(load(&d, bom, "auto", 0, 1, err) == LT_OK && d.n == 1,
       "bad input: a UTF-8 BOM before JSON lines is skipped");
    char got[512];
    pieces(&d.s[0], 1, got, sizeof got);
    is_str(got, "with a BOM", "the BOM is not part of the first record");
    data_free(&d);
    bom = write_tmp("bom.json", "\xEF\xBB\xBF [{\"text\": \"array\"}]");
    ok(load(&d, bom, "auto", 0, 1, err) == LT_OK && d.n == 1,
       "bad input: a UTF-8 BOM before a JSON array is skipped");
    data_free(&d);

    /* a NUL byte */
    snprintf(p, sizeof p, "%s/nul.jsonl", tmpdir);
    FILE *f = fopen(p, "wb");
    fwrite("{\"text\": \"a\"}\n{\"text\": \"b\0c\"}\n", 1, 30, f);
    fclose(f);
    ok(load(&d, p, "auto", 0, 1, err) == LT_ERR_FORMAT &&
           strstr(err, "line 2: a NUL byte at column 12"),
       "bad input: a NUL byte is named with its line and column");
    diag("%s", err);

    /* an over-long record is cut before tokenizing */
    size_t big = 4u << 20;
    char *text = malloc(big + 32);
    size_t k = (size_t)snprintf(text, 32, "{\"text\": \"");
    for (size_t i = 0; k < big; i++)
        text[k++] = "abc de fghij klm nopq "[i % 22];
    memcpy(text + k, "\"}\n", 4);
    snprintf(p, sizeof p, "%s/huge.jsonl", tmpdir);
    f = fopen(p, "wb");
    fputs(text, f);
    fclose(f);
    double t0 = now_s();
    lt_status st = load(&d, p, "auto", 16, 1, err);
    double secs = now_s() - t0;
    ok(st == LT_OK && d.n == 1 && d.s[0].n == 16 && d.n_truncated == 1,
       "bad input: a 4 MB record with max_seq=16 loads as 16 tokens, counted as truncated");
    ok(secs < 2.5,
       "bad input: the 4 MB record is cut before tokenizing (under 2.5 s; 7.6 s uncut)");
    diag("4 MB record: %.3f s", secs);
    int32_t *ids = NULL;
    int n = 0;
    text[10 + 400] = '\0';
    if (st == LT_OK && tok_encode_special(tok, text + 10, &ids, &n, err) == LT_OK && n >= 15) {
        int same = 1;
        for (int i = 0; i < 15; i++)
            same &= d.s[0].ids[i + 1] == ids[i];
        ok(same, "the cut sample's tokens are those of the record's start");
    } else {
        ok(0, "the cut sample's tokens are those of the record's start");
    }
    free(ids);
    if (st == LT_OK) data_free(&d);
    /* the same in a chat format: the long model turn is cut, its first tokens stay labels */
    k = (size_t)snprintf(text, 96,
                         "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, "
                         "{\"role\": \"assistant\", \"content\": \"");
    for (size_t i = 0; k < big; i++)
        text[k++] = "xyz uvw "[i % 8];
    memcpy(text + k, "\"}]}\n", 6);
    f = fopen(p, "wb");
    fputs(text, f);
    fclose(f);
    t0 = now_s();
    st = load(&d, p, "auto", 32, 1, err);
    secs = now_s() - t0;
    ok(st == LT_OK && d.n == 1 && d.s[0].n == 32 && d.n_truncated == 1 && d.n_labels > 0,
       "bad input: a 4 MB model turn with max_seq=32 is cut, keeping labels");
    ok(secs < 2.5, "bad input: the 4 MB chat record is cut before tokenizing (under 2.5 s)");
    if (st == LT_OK) data_free(&d);
    free(text);

    /* cancel: before reading, and between chunks (a 3 MiB file, 1 MiB chunks) */
    atomic_store(&cancel_flag, 1);
    data_opts oc = {two, "auto", 0, 1, &cancel_flag, 0, 0, NULL};
    ok(load_opts(&d, &oc, err) == LT_CANCELLED && strstr(err, "cancelled"),
       "bad input: a raised cancel flag stops the read");
    atomic_store(&cancel_flag, 0);
    snprintf(p, sizeof p, "%s/three.jsonl", tmpdir);
    f = fopen(p, "wb");
    for (int i = 0; i < 3 * 1024 * 32; i++)
        fprintf(f, "{\"text\": \"%019d\"}\n", i); /* 32 bytes a line */
    fclose(f);
    lt_callbacks cb = {NULL, NULL, progress_cancel_after_first, NULL};
    oc.path = p;
    ok(data_load(&d, &oc, tok, &cfg, &cb, err) == LT_CANCELLED && strstr(err, "cancelled") &&
           progress_done < progress_total,
       "bad input: a cancel raised while reading stops between chunks, before the end");
    diag("%s", err);
    atomic_store(&cancel_flag, 0);
    progress_calls = 0;
    cb.progress = progress_record;
    oc.cancel = NULL;
    ok(data_load(&d, &oc, tok, &cfg, &cb, err) == LT_OK && d.n == 3 * 1024 * 32,
       "the 3 MiB file loads");
    ok(progress_calls >= 3 && progress_done == progress_total && progress_total == 3 << 20,
       "progress hears 'reading' chunk by chunk up to the file's size");
    data_free(&d);
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

/* ---- messages with image parts ----------------------------------------------------------- */

static gemma3_config vcfg; /* cfg with an image tower's config: 4 image tokens per image */

/* Appends tok_encode_special(text) to out with label lab. */
static void push_enc(int32_t *out, uint8_t *lab, int *n, const char *text, uint8_t l) {
    int32_t *t = NULL;
    int k = 0;
    char err[LT_ERRLEN];
    if (tok_encode_special(tok, text, &t, &k, err) != LT_OK) return;
    for (int i = 0; i < k; i++) {
        out[*n] = t[i];
        lab[(*n)++] = l;
    }
    free(t);
}

static void push_blk(int32_t *out, uint8_t *lab, int *n) {
    out[*n] = vcfg.vision.boi_token_id;
    lab[(*n)++] = 0;
    for (int i = 0; i < vcfg.vision.mm_tokens_per_image; i++) {
        out[*n] = vcfg.vision.image_token_id;
        lab[(*n)++] = 0;
    }
    out[*n] = vcfg.vision.eoi_token_id;
    lab[(*n)++] = 0;
}

static int same_sample(const train_sample *s, const int32_t *ids, const uint8_t *lab, int n) {
    if (s->n != n) {
        diag("%d tokens, want %d", s->n, n);
        return 0;
    }
    for (int i = 0; i < n; i++)
        if (s->ids[i] != ids[i] || s->mask[i] != lab[i]) {
            diag("token %d: id %d label %d, want %d %d", i, s->ids[i], s->mask[i], ids[i], lab[i]);
            return 0;
        }
    return 1;
}

static lt_status load_v(train_data *d, const char *path, int max_seq, int ro, char *err) {
    data_opts o = {.path = path, .format = "auto", .max_seq = max_seq, .responses_only = ro};
    return data_load(d, &o, tok, &vcfg, NULL, err);
}

static void test_images(void) {
    vcfg = cfg;
    vcfg.vision.present = 1;
    vcfg.vision.mm_tokens_per_image = 4;
    vcfg.vision.boi_token_id = 255999 < tok_size(tok) ? 255999 : 8;
    vcfg.vision.eoi_token_id = 256000 < tok_size(tok) ? 256000 : 9;
    vcfg.vision.image_token_id = tok_size(tok); /* past the embedding, as in the tf5 fixture */
    write_tmp("a.png", "not decoded here");
    write_tmp("b.png", "not decoded here");
    char dirimg[600];
    snprintf(dirimg, sizeof dirimg, "%s/adir.png", tmpdir);
    mkdir(dirimg, 0755);
    char err[LT_ERRLEN];
    train_data d;
    int32_t want[512];
    uint8_t lab[512];
    int n = 0;

    char one[600], two[600]; /* write_tmp's buffer is reused */
    snprintf(
        one, sizeof one, "%s",
        write_tmp(
            "img1.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": "
            "\"a.png\"}, {\"type\": \"text\", \"text\": \" What is it? \"}]}, {\"role\": "
            "\"assistant\", \"content\": \"It is red.\"}]}\n"));
    push_enc(want, lab, &n, "<bos><start_of_turn>user\n\n\n", 0);
    push_blk(want, lab, &n);
    push_enc(want, lab, &n, "\n\nWhat is it?<end_of_turn>\n<start_of_turn>model\n", 0);
    push_enc(want, lab, &n, "It is red.<end_of_turn>\n", 1);
    lt_status st = load_v(&d, one, 0, 1, err);
    if (st != LT_OK) diag("%s", err);
    ok(st == LT_OK && d.n == 1 && same_sample(&d.s[0], want, lab, n),
       "images: a user image renders as Gemma 3's processor expands it, its block unlabelled");
    ok(st == LT_OK && d.n_images == 1 && d.s[0].n_images == 1 && d.s[0].images[0] == 0 &&
           strstr(d.images[0].path, tmpdir) && strstr(d.images[0].path, "/a.png") &&
           d.images[0].line == 1,
       "images: the path is resolved against the dataset's folder, with its line");
    data_free(&d);

    /* responses_only=false: the text trains, the block still does not */
    for (int i = 0; i < n; i++)
        lab[i] = 1; /* <bos> too, as any chat row: nothing predicts it */
    for (int i = 0; i < n; i++)
        if (want[i] == vcfg.vision.image_token_id || want[i] == vcfg.vision.boi_token_id ||
            want[i] == vcfg.vision.eoi_token_id)
            lab[i] = 0;
    st = load_v(&d, one, 0, 0, err);
    ok(st == LT_OK && d.n == 1 && same_sample(&d.s[0], want, lab, n),
       "images: without responses_only the text is labelled, the image block never");
    data_free(&d);

    /* two images in a turn, a second turn with the first image again: one file listed once */
    snprintf(
        two, sizeof two, "%s",
        write_tmp(
            "img2.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"path\": "
            "\"a.png\"}, {\"type\": \"image\", \"url\": \"file://b.png\"}, {\"type\": \"text\", "
            "\"text\": \"Compare.\"}]}, {\"role\": \"assistant\", \"content\": [{\"type\": "
            "\"text\", "
            "\"text\": \"Same.\"}]}, {\"role\": \"user\", \"content\": [{\"type\": \"text\", "
            "\"text\": "
            "\"And \"}, {\"type\": \"image\", \"image\": \"a.png\"}]}, {\"role\": \"assistant\", "
            "\"content\": \"Red.\"}]}\n"));
    n = 0;
    push_enc(want, lab, &n, "<bos><start_of_turn>user\n\n\n", 0);
    push_blk(want, lab, &n);
    push_enc(want, lab, &n, "\n\n\n\n", 0);
    push_blk(want, lab, &n);
    push_enc(want, lab, &n, "\n\nCompare.<end_of_turn>\n<start_of_turn>model\n", 0);
    push_enc(want, lab, &n, "Same.<end_of_turn>\n", 1);
    push_enc(want, lab, &n, "<start_of_turn>user\nAnd\n\n", 0);
    push_blk(want, lab, &n);
    push_enc(want, lab, &n, "\n\n<end_of_turn>\n<start_of_turn>model\n", 0);
    push_enc(want, lab, &n, "Red.<end_of_turn>\n", 1);
    st = load_v(&d, two, 0, 1, err);
    if (st != LT_OK) diag("%s", err);
    ok(st == LT_OK && d.n == 1 && same_sample(&d.s[0], want, lab, n),
       "images: two in a turn and one in a later turn, each part stripped as the template does");
    ok(st == LT_OK && d.n_images == 2 && d.s[0].n_images == 3 && d.s[0].images[0] == 0 &&
           d.s[0].images[1] == 1 && d.s[0].images[2] == 0 && d.n_image_blocks == 3,
       "images: 'path' and a file:// 'url' are read; a file used twice is listed once");
    data_free(&d);

    /* max_seq: cutting text after the last block is a truncation; cutting a block is refused */
    st = load_v(&d, one, 5, 1, err);
    ok(st == LT_ERR_FORMAT && strstr(err, "line 1") && strstr(err, "max_seq="),
       "images: a block past max_seq is refused, naming the line and max_seq");
    diag("%s", err);

    /* a text-only row keeps a written "<start_of_image>" as text, as lt_chat does */
    const char *lit = write_tmp("lit.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": "
                                             "\"a <start_of_image> b\"}, {\"role\": \"assistant\", "
                                             "\"content\": \"ok\"}]}\n");
    st = load_v(&d, lit, 0, 1, err);
    ok(st == LT_OK && d.n == 1 && d.s[0].n_images == 0, "images: text-only rows stay text");
    if (st == LT_OK) data_free(&d);

    struct {
        const char *row, *says, *what;
    } bad[] = {
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", "
         "\"content\": [{\"type\": \"image\", \"image\": \"a.png\"}]}]}",
         "assistant message", "an image in an assistant message"},
        {"{\"messages\": [{\"role\": \"system\", \"content\": [{\"type\": \"image\", \"image\": "
         "\"a.png\"}]}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", "
         "\"content\": \"Yo\"}]}",
         "system message", "an image in a system message"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": "
         "\"gone.png\"}]}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}",
         "cannot be found", "a missing image file"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": "
         "\"adir.png\"}]}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}",
         "is a directory", "a directory as the image"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"url\": "
         "\"https://x.org/a.png\"}]}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}",
         "downloads nothing", "an http URL"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}]}, {\"role\": "
         "\"assistant\", \"content\": \"Yo\"}]}",
         "without a file", "an image part without a file"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"audio\", \"audio\": "
         "\"a.wav\"}]}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}",
         "type 'audio'", "a part of an unknown type"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": "
         "\"a.png\"}, {\"type\": \"text\", \"text\": \"<start_of_image>\"}]}, {\"role\": "
         "\"assistant\", \"content\": \"Yo\"}]}",
         "may not write it itself", "a row with images that writes <start_of_image> itself"},
        {"{\"messages\": [{\"role\": \"system\", \"content\": [{\"type\": \"text\", \"text\": "
         "\"Be \"}, {\"type\": \"text\", \"text\": \"brief.\"}]}, {\"role\": \"user\", "
         "\"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}",
         "keeps only the first text part", "a system message of two text parts"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char text[1200];
        snprintf(text, sizeof text, "%s\n", bad[i].row);
        const char *p = write_tmp("bad.jsonl", text);
        st = load_v(&d, p, 0, 1, err);
        char name[200];
        snprintf(name, sizeof name, "images, bad input: %s is refused, naming the line",
                 bad[i].what);
        ok(st != LT_OK && strstr(err, "bad.jsonl line 1") && strstr(err, bad[i].says), name);
        diag("%s", err);
    }
    /* a model without an image tower */
    st = load(&d, one, "auto", 0, 1, err);
    ok(st == LT_ERR_ARG && strstr(err, "line 1") && strstr(err, "image tower"),
       "images, bad input: a model without an image tower is named");
    diag("%s", err);
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
    test_safe_reading();
    test_schedules();
    test_images();
    tok_free(tok);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) diag("could not remove %s", tmpdir);
    return tap_done();
}
