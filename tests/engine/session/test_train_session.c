/* test_train_session.c — %lora / %train / %save through engine.h on models/tiny:
 *
 *   - interrupt: a cancel raised after step 2 stops with LT_CANCELLED and the weights of
 *     step 2; the same lt_train again continues, and the final adapter equals the one of an
 *     uninterrupted run (byte for byte);
 *   - checkpoints: save= save_every= writes checkpoint-N folders; resume= from step 2
 *     reaches the same final adapter; an adapter saved and loaded back gives the same loss;
 *     a trainer_state.json edited by hand (position -1, a position its step does not reach,
 *     AdamW's beta2 = 1, a step written as a string, another unit count) is refused naming
 *     it, and the same session then resumes the intact file;
 *   - gradient accumulation: batch=2 grad_accum=2 equals batch=4 (same step, same data);
 *   - packing: one packed row of every sample gives the loss of the samples unpacked
 *     (attention never crosses a sample);
 *   - bad input, each a clear error that leaves the session usable: empty dataset, a line
 *     that is not JSON, a conversation without a model turn, a record of another format,
 *     lr <= 0, r = 0, targets that match nothing, a save folder that cannot be written,
 *     a sample whose trained tokens all lie beyond max_seq;
 *   - a save that fails half-way (file-size limit) keeps the previous copy byte for byte and
 *     leaves no temp file.
 */
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/engine.h"
#include "tests/unit/tap.h"
#include "tests/unit/test_files.h"

#define STARS64 "****************************************************************"

#ifndef LATHE_SRCDIR
#define LATHE_SRCDIR "."
#endif

static char tmp[512];
static char data_text[600];

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

static char *read_file(const char *path, size_t *n) {
    return (char *)test_read_file(path, n);
}

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    char *x = read_file(a, &na), *y = read_file(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

typedef struct stopper {
    lt_session *s;
    int stop_at;
    int steps_seen;
    double losses[64];
} stopper;

static void on_step(void *ctx, const lt_train_progress *p) {
    stopper *st = ctx;
    if (p->step <= 64) st->losses[p->step - 1] = p->loss;
    st->steps_seen++;
    if (st->stop_at && p->step == st->stop_at) lt_cancel(st->s);
}

static lt_train_opts base_opts(void) {
    lt_train_opts o;
    lt_train_opts_default(&o);
    o.data = data_text;
    o.format = "text";
    o.batch = 2;
    o.steps = 5;
    o.lr = 1e-2f;
    o.schedule = "cosine";
    o.warmup = 1;
    o.seed = 11;
    return o;
}

static lt_session *fresh(void) {
    lt_session *s = lt_session_new();
    lt_load_opts lo = {.dtype = "auto", .device = "cpu"};
    if (lt_load(s, "tiny", &lo, NULL) != LT_OK) diag("load tiny: %s", lt_last_error(s));
    lt_lora_opts l;
    lt_lora_opts_default(&l);
    l.r = 4;
    l.alpha = 8;
    if (lt_lora_attach(s, &l, NULL) != LT_OK) diag("lora: %s", lt_last_error(s));
    return s;
}

static void path(char *out, size_t n, const char *name) {
    snprintf(out, n, "%s/%s", tmp, name);
}

static void test_interrupt_and_resume(void) {
    char full[600], part[600], ckdir[600], resumed[600], a1[700], a2[700];
    path(full, sizeof full, "full");
    path(part, sizeof part, "part");
    path(ckdir, sizeof ckdir, "ck");
    path(resumed, sizeof resumed, "resumed");

    /* reference: 5 uninterrupted steps */
    lt_session *s = fresh();
    lt_train_opts o = base_opts();
    stopper st = {s, 0, 0, {0}};
    lt_train_callbacks cb = {&st, NULL, on_step};
    lt_train_result r;
    is_int(lt_train(s, &o, &cb, &r), LT_OK, "5 steps train");
    is_int(r.steps_done, 5, "steps_done = 5");
    ok(lt_save_adapter(s, full) == LT_OK, "save the reference adapter");
    double ref_losses[5];
    memcpy(ref_losses, st.losses, sizeof ref_losses);
    lt_session_free(s);

    /* interrupted after step 2, then the same %train again */
    s = fresh();
    st = (stopper){s, 2, 0, {0}};
    o.save = ckdir;
    o.save_every = 2;
    lt_status rc = lt_train(s, &o, &cb, &r);
    is_int(rc, LT_CANCELLED, "a cancel stops the run");
    ok(r.interrupted && r.steps_done == 2, "it stopped after step 2");
    ok(strstr(lt_last_error(s), "step 2") != NULL,
       "the message says which step's weights are kept");
    diag("%s", lt_last_error(s));
    st.stop_at = 0;
    rc = lt_train(s, &o, &cb, &r);
    is_int(rc, LT_OK, "the same %train continues");
    is_int(r.first_step, 2, "from step 2");
    is_int(r.steps_done, 5, "to step 5");
    is_close(st.losses[4], ref_losses[4], 1e-6, "the step-5 loss equals the uninterrupted run's");
    ok(lt_save_adapter(s, part) == LT_OK, "save after the interrupted run");
    snprintf(a1, sizeof a1, "%s/adapter_model.safetensors", full);
    snprintf(a2, sizeof a2, "%s/adapter_model.safetensors", part);
    ok(same_file(a1, a2), "interrupted + continued = uninterrupted (same adapter bytes)");
    char ck[700];
    snprintf(ck, sizeof ck, "%s/checkpoint-2/trainer_state.json", ckdir);
    ok(access(ck, R_OK) == 0, "save_every=2 wrote checkpoint-2");
    snprintf(ck, sizeof ck, "%s/checkpoint-4/optimizer.safetensors", ckdir);
    ok(access(ck, R_OK) == 0, "checkpoint-4 has the optimizer state");
    snprintf(ck, sizeof ck, "%s/checkpoint-5/adapter_config.json", ckdir);
    ok(access(ck, R_OK) == 0, "the last step is saved too (checkpoint-5)");
    lt_session_free(s);

    /* resume from checkpoint-2 in a new session */
    s = fresh();
    lt_train_opts ro;
    lt_train_opts_default(&ro);
    snprintf(ck, sizeof ck, "%s/checkpoint-2", ckdir);
    ro.resume = ck;
    st = (stopper){s, 0, 0, {0}};
    /* first a damaged or hand-edited trainer_state.json: each refused, naming what is wrong;
     * the file is put back after each, and the same session then resumes as below */
    {
        static const struct {
            const char *key, *value;
            lt_status rc;
            const char *says;
        } edits[] = {
            {"position", "-1", LT_ERR_FORMAT, "\"position\" is -1"}, /* indexed the data */
            {"position", "3", LT_ERR_FORMAT, "position 3 at step 2"},
            {"beta2", "1", LT_ERR_ARG, "betas"}, /* divided the bias correction by 0 */
            {"step", "\"2\"", LT_ERR_FORMAT, "\"step\" is a string"},
            {"units", "7", LT_ERR_ARG, "made with 7"},
        };
        char ts[760];
        snprintf(ts, sizeof ts, "%s/trainer_state.json", ck);
        size_t n = 0;
        char *orig = test_read_file(ts, &n);
        for (size_t i = 0; orig && i < sizeof edits / sizeof edits[0]; i++) {
            char key[32];
            snprintf(key, sizeof key, "\"%s\": ", edits[i].key);
            const char *at = strstr(orig, key), *end = at ? strpbrk(at, ",\n") : NULL;
            FILE *f = end ? fopen(ts, "wb") : NULL;
            if (f) {
                fprintf(f, "%.*s%s%s", (int)(at + strlen(key) - orig), orig, edits[i].value, end);
                fclose(f);
            }
            lt_status erc = lt_train(s, &ro, &cb, &r);
            char name[160];
            snprintf(name, sizeof name, "resume with %s %s: refused, saying '%s'", edits[i].key,
                     edits[i].value, edits[i].says);
            ok(f && erc == edits[i].rc && strstr(lt_last_error(s), edits[i].says), name);
            diag("%s", lt_last_error(s));
            if ((f = fopen(ts, "wb"))) {
                fwrite(orig, 1, n, f);
                fclose(f);
            }
        }
        ok(orig != NULL, "(read the checkpoint's trainer_state.json)");
        free(orig);
    }
    rc = lt_train(s, &ro, &cb, &r);
    is_int(rc, LT_OK, "resume=checkpoint-2 trains");
    if (rc != LT_OK) diag("%s", lt_last_error(s));
    ok(r.first_step == 2 && r.steps_done == 5, "resume continues from step 2 to 5");
    ok(lt_save_adapter(s, resumed) == LT_OK, "save the resumed adapter");
    snprintf(a2, sizeof a2, "%s/adapter_model.safetensors", resumed);
    ok(same_file(a1, a2), "resumed = uninterrupted (same adapter bytes)");
    lt_session_free(s);

    /* the saved adapter loads back */
    s = lt_session_new();
    lt_load_opts lo = {.dtype = "auto", .device = "cpu"};
    lt_load(s, "tiny", &lo, NULL);
    lt_lora_opts l;
    lt_lora_opts_default(&l);
    l.load = full;
    is_int(lt_lora_attach(s, &l, NULL), LT_OK, "%lora load= reads our adapter");
    lt_lora_info info;
    lt_lora_info_get(s, &info);
    ok(info.attached && info.r == 4 && info.n_modules == 28, "with its rank and 28 modules");
    lt_session_free(s);
}

static void test_epochs(void) {
    lt_session *s = fresh();
    lt_train_opts o = base_opts();
    o.steps = 0;
    o.epochs = 2;
    o.batch = 2; /* 6 samples: 3 steps per epoch */
    lt_train_result r;
    is_int(lt_train(s, &o, NULL, &r), LT_OK, "epochs=2 trains");
    is_int(r.steps_done, 6, "epochs=2 of 6 samples at batch 2 = 6 steps");
    o.epochs = 0.5f;
    o.seed = 12; /* another run */
    lt_train(s, &o, NULL, &r);
    is_int(r.total_steps, 2, "epochs=0.5 rounds up to 2 steps");
    lt_session_free(s);
}

static void test_grad_accum_and_packing(void) {
    lt_session *s = fresh();
    lt_train_opts o = base_opts();
    o.steps = 1;
    o.batch = 4;
    o.shuffle = 0;
    stopper st = {s, 0, 0, {0}};
    lt_train_callbacks cb = {&st, NULL, on_step};
    lt_train_result r;
    lt_train(s, &o, &cb, &r);
    double big = st.losses[0];
    lt_session_free(s);
    s = fresh();
    o.batch = 2;
    o.grad_accum = 2;
    st.s = s;
    lt_train(s, &o, &cb, &r);
    is_close(st.losses[0], big, 1e-5 * big, "batch=2 grad_accum=2 gives the loss of batch=4");
    lt_session_free(s);
    /* all six samples packed into one row vs six separate samples: the same loss only if
     * attention stays inside each packed sample */
    s = fresh();
    o.batch = 6;
    o.grad_accum = 1;
    st.s = s;
    lt_train(s, &o, &cb, &r);
    double unpacked = st.losses[0];
    lt_session_free(s);
    s = fresh();
    o.batch = 1;
    o.packing = 1;
    o.max_seq = 2048;
    st.s = s;
    is_int(lt_train(s, &o, &cb, &r), LT_OK, "packing=true trains");
    is_close(st.losses[0], unpacked, 1e-5 * unpacked,
             "one packed row of 6 samples = 6 samples unpacked");
    lt_session_free(s);
}

static void expect_error(lt_session *s, lt_train_opts *o, const char *want, const char *name) {
    lt_train_result r;
    lt_status rc = lt_train(s, o, NULL, &r);
    const char *msg = lt_last_error(s);
    if (!ok(rc != LT_OK && strstr(msg, want) != NULL, name)) diag("rc %d: %s", rc, msg);
}

static void test_bad_input(void) {
    lt_session *s = fresh();
    char f[600];
    lt_train_opts o = base_opts();
    o.steps = 1;

    path(f, sizeof f, "empty.jsonl");
    write_file(f, "\n\n");
    o.data = f;
    o.format = "auto";
    expect_error(s, &o, "empty", "an empty dataset is an error");

    path(f, sizeof f, "notjson.jsonl");
    write_file(f, "{\"text\": \"fine\"}\n{\"text\": oops}\n");
    expect_error(s, &o, "notjson.jsonl line 2: not valid JSON",
                 "a line that is not JSON names file:line");

    path(f, sizeof f, "nomodel.jsonl");
    write_file(f, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
    expect_error(s, &o, "line 1: the conversation has no model turn",
                 "a conversation with no model turn");

    path(f, sizeof f, "mixed.jsonl");
    write_file(f, "{\"text\": \"a\"}\n{\"instruction\": \"b\", \"output\": \"c\"}\n");
    expect_error(s, &o, "line 2", "a record in another format names its line");

    path(f, sizeof f, "badrole.jsonl");
    write_file(f, "{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}\n");
    expect_error(s, &o, "messages[0].role is 'robot'", "an unknown role names the field");

    path(f, sizeof f, "long.jsonl");
    write_file(f, "{\"messages\": [{\"role\": \"user\", \"content\": \"one two three four five six "
                  "seven eight "
                  "nine ten eleven twelve\"}, {\"role\": \"model\", \"content\": \"ok\"}]}\n");
    o.max_seq = 8;
    expect_error(s, &o, "max_seq=8 cuts off every trained token",
                 "a sample longer than max_seq with nothing left to train");
    o.max_seq = 0;

    o.data = data_text;
    o.format = "text";
    o.lr = 0;
    expect_error(s, &o, "lr=0", "lr <= 0 is an error");
    o.lr = 1e-3f;

    path(f, sizeof f, "missing.jsonl");
    o.data = f;
    expect_error(s, &o, "cannot open", "a missing data file is an error");
    o.data = data_text;

    o.save = "/proc/lathe-cannot-write-here";
    expect_error(s, &o, "save=", "a save folder that can't be written is refused before training");
    o.save = NULL;

    lt_lora_opts l;
    lt_lora_opts_default(&l);
    l.r = 0;
    ok(lt_lora_attach(s, &l, NULL) != LT_OK && strstr(lt_last_error(s), "r=0"), "r=0 is an error");
    l.r = 4;
    l.targets = "nothing_proj";
    ok(lt_lora_attach(s, &l, NULL) != LT_OK && strstr(lt_last_error(s), "matches no linear layer"),
       "targets that match nothing is an error");
    lt_lora_info info;
    lt_lora_info_get(s, &info);
    ok(info.attached && info.n_modules == 28, "a failed %lora keeps the adapters attached before");
    l.targets = ".*layers\\.[01]\\..*(q_proj|v_proj)";
    is_int(lt_lora_attach(s, &l, NULL), LT_OK, "a regex target");
    lt_lora_info_get(s, &info);
    is_int(info.n_modules, 4, "the regex selects q and v of layers 0 and 1");
    /* glibc's regcomp copies x+ and x{m,n}: stacked repetitions took gigabytes */
    char blow[200];
    snprintf(blow, sizeof blow, "q_proj%s", "+++++++++++++++++++++++++++++++++++++++++++++++++++");
    l.targets = blow;
    ok(lt_lora_attach(s, &l, NULL) == LT_ERR_ARG && strstr(lt_last_error(s), "repeats too much"),
       "a regex of stacked repetitions (q_proj+++...) is refused before regcomp");
    l.targets = "((q{50}){50}){50}";
    ok(lt_lora_attach(s, &l, NULL) == LT_ERR_ARG && strstr(lt_last_error(s), "repeats too much"),
       "a regex of nested bounded repetitions is refused before regcomp");
    l.targets = "(q_proj){99999999999999999999999,}"; /* strtol saturates: m + 1 overflowed */
    ok(lt_lora_attach(s, &l, NULL) == LT_ERR_ARG && strstr(lt_last_error(s), "repeats too much"),
       "bad input: a regex {m,} with m beyond long is refused before regcomp");
    l.targets = ".*layers\\.[0-9]{1,2}\\.self_attn\\.(q|v)_proj";
    is_int(lt_lora_attach(s, &l, NULL), LT_OK, "a regex with a small {1,2} is accepted");
    /* stars stacked on a group of stacked stars: glibc's regcomp took 39 s under ASan (fuzz_peft)
     */
    char stars[300];
    snprintf(stars, sizeof stars, "q_pro%.64s)%.64sj", STARS64, STARS64);
    l.targets = stars;
    ok(lt_lora_attach(s, &l, NULL) == LT_ERR_ARG && strstr(lt_last_error(s), "repeats too much"),
       "bad input: a regex of stacked stars (q_pro**...)**...j) is refused before regcomp");
    l.targets = "q_pro*";
    ok(lt_lora_attach(s, &l, NULL) != LT_ERR_ARG || !strstr(lt_last_error(s), "repeats too much"),
       "one star is not a stacked repetition");
    l.targets = ".*layers\\.0\\..*?q_proj";
    is_int(lt_lora_attach(s, &l, NULL), LT_OK, "a lazy .*? (Python's) stays accepted");
    /* full=true reaches the trainer (a field added before it in the engine's options once
     * shifted it into another, and %lora full=true attached LoRA) */
    l.targets = NULL;
    l.full = 1;
    is_int(lt_lora_attach(s, &l, NULL), LT_OK, "full=true attaches");
    lt_lora_info_get(s, &info);
    ok(info.full && info.n_trainable == info.n_total,
       "full=true trains every weight, with no adapters");
    l.full = 0;
    l.targets = ".*layers\\.0\\..*?q_proj";
    is_int(lt_lora_attach(s, &l, NULL), LT_OK, "LoRA again after full fine-tuning");
    char adir[600], acfg[700];
    path(adir, sizeof adir, "bad-rank");
    mkdir(adir, 0700);
    snprintf(acfg, sizeof acfg, "%s/adapter_config.json", adir);
    write_file(acfg,
               "{\"peft_type\": \"LORA\", \"r\": 2147483656, \"target_modules\": [\"q_proj\"]}");
    l.targets = NULL;
    l.load = adir;
    ok(lt_lora_attach(s, &l, NULL) != LT_OK &&
           strstr(lt_last_error(s), "'r' = 2147483656 is out of range"),
       "a PEFT adapter_config.json with r beyond int is refused (it wrapped to r=8)");
    /* target_modules as a JSON list are names, as PEFT matches them, even with regex characters */
    write_file(acfg, "{\"peft_type\": \"LORA\", \"r\": 8, \"target_modules\": "
                     "[\"q_pr**)**oj\", \"k||up\"]}");
    ok(lt_lora_attach(s, &l, NULL) != LT_OK && strstr(lt_last_error(s), "matches no linear layer"),
       "bad input: a PEFT list entry with regex characters is a name that matches nothing");
    l.load = NULL;

    o.data = data_text;
    o.steps = 1;
    lt_train_result r;
    is_int(lt_train(s, &o, NULL, &r), LT_OK, "after all those errors the session still trains");
    ok(lt_save_adapter(s, "/proc/lathe-no") != LT_OK,
       "%save adapter= into an unwritable folder is an error");
    lt_session_free(s);
}

static void test_failed_save_keeps_previous(void) {
    lt_session *s = fresh();
    lt_train_opts o = base_opts();
    o.steps = 1;
    lt_train_result r;
    lt_train(s, &o, NULL, &r);
    char dir[600], file[700], copy[700];
    path(dir, sizeof dir, "keep");
    ok(lt_save_adapter(s, dir) == LT_OK, "a first save");
    snprintf(file, sizeof file, "%s/adapter_model.safetensors", dir);
    snprintf(copy, sizeof copy, "%s/first.bin", tmp);
    size_t n;
    char *before = read_file(file, &n);
    if (before) {
        FILE *f = fopen(copy, "wb");
        fwrite(before, 1, n, f);
        fclose(f);
    }
    free(before);
    o.steps = 2; /* train on, so a new save would differ */
    lt_train(s, &o, NULL, &r);
    /* make every write past 64 KiB fail (EFBIG), as a full disk would */
    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    lim.rlim_cur = 64 * 1024;
    signal(SIGXFSZ, SIG_IGN);
    setrlimit(RLIMIT_FSIZE, &lim);
    lt_status rc = lt_save_adapter(s, dir);
    setrlimit(RLIMIT_FSIZE, &old);
    ok(rc == LT_ERR_IO, "a save that fails half-way is an error");
    ok(strstr(lt_last_error(s), "previous copy is kept") != NULL,
       "the message says the previous copy is kept");
    diag("%s", lt_last_error(s));
    ok(same_file(file, copy), "the previous adapter is intact, byte for byte");
    DIR *d = opendir(dir);
    int temps = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        temps += strstr(e->d_name, ".tmp-") != NULL;
    if (d) closedir(d);
    is_int(temps, 0, "no temp file is left behind");
    ok(lt_save_adapter(s, dir) == LT_OK && !same_file(file, copy),
       "the next save (no limit) replaces it");
    /* merged save round trip */
    char merged[600];
    path(merged, sizeof merged, "merged");
    is_int(lt_save_merged(s, merged, "fp32", NULL), LT_OK, "%save merged= writes a checkpoint");
    lt_session *s2 = lt_session_new();
    lt_load_opts lo = {.dtype = "auto", .device = "cpu"};
    is_int(lt_load(s2, merged, &lo, NULL), LT_OK, "the merged checkpoint loads back");
    int32_t ids[6] = {2, 100, 200, 300, 400, 500};
    float *la = NULL, *lb = NULL;
    int V = 0;
    lt_logits(s, ids, 6, &la, &V);
    lt_logits(s2, ids, 6, &lb, &V);
    double md = 0;
    for (int i = 0; la && lb && i < 6 * V; i++)
        md = fmax(md, fabs((double)la[i] - lb[i]));
    ok(la && lb && md < 1e-4, "merged logits = base + adapter logits");
    diag("max |diff| %g", md);
    free(la);
    free(lb);
    lt_session_free(s2);
    lt_session_free(s);
}

int main(void) {
    const char *base = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(tmp, sizeof tmp, "%s/lathe-train-XXXXXX", base);
    if (!mkdtemp(tmp)) {
        printf("Bail out! cannot create a temp folder\n");
        return 1;
    }
    snprintf(data_text, sizeof data_text, "%s/tests/fixtures/peft/data.jsonl", LATHE_SRCDIR);
    test_interrupt_and_resume();
    test_epochs();
    test_grad_accum_and_packing();
    test_bad_input();
    test_failed_save_keeps_previous();
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0) diag("could not remove %s", tmp);
    return tap_done();
}
