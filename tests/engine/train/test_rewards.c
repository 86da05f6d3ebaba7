/* test_rewards.c — GRPO's rewards (train/rewards.c).
 *
 * Built-ins against scores worked out by hand from Unsloth's Gemma 3 GRPO notebook (its
 * match_format / match_numbers regexes and its four reward functions): every branch of answer
 * (exact, trimmed, within 10%, within 20%, far, not a number, a zero answer), the MULTILINE
 * anchors, markers missing or twice, Unicode whitespace, custom markers with regex
 * metacharacters, an "answer" given as a JSON number (compared as Python's str() prints it).
 * Options: spec, weights and markers parsing and their messages. The [reward][item] layout and
 * exec's null as NaN. exec programs: Python, sh and awk rewards, the row's fields reaching the
 * program, one program across calls, large payloads both ways (no deadlock), and programs that
 * fail (exit, crash by signal, non-number, too few lines, no answer before the timeout, no such
 * command, stdin closed without reading) each with its message, later calls failing alike, and
 * reward_set_free reaping every child. Nothing waits on a fixed sleep: a program that never
 * answers ends only through the timeout.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cuda/train/rewards.h"
#include "tests/unit/tap.h"

static char tmpdir[256];

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void write_tmp(const char *name, const char *text) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", tmpdir, name);
    FILE *f = fopen(p, "w");
    fputs(text, f);
    fclose(f);
}

static reward_set *make(const char *spec, const char *weights, const char *markers,
                        double timeout_s) {
    char err[LT_ERRLEN] = "";
    reward_opts o = {spec, weights, markers, tmpdir, timeout_s};
    reward_set *rs = NULL;
    if (reward_set_new(&rs, &o, err) != LT_OK) diag("reward_set_new(%s): %s", spec, err);
    return rs;
}

/* reward_set_new's status and message for options expected to fail. */
static lt_status make_fail(const char *spec, const char *weights, const char *markers, char *err) {
    reward_opts o = {spec, weights, markers, NULL, 5};
    reward_set *rs = NULL;
    err[0] = 0;
    lt_status st = reward_set_new(&rs, &o, err);
    reward_set_free(rs);
    return st;
}

/* The four built-ins (format, format_approx, answer, number) on one completion. */
static void builtins(const char *markers, const char *completion, const char *row, double *s) {
    reward_set *rs = make("format,format_approx,answer,number", NULL, markers, 1);
    char err[LT_ERRLEN] = "";
    reward_item it = {"Q", completion, row};
    for (int i = 0; i < 4; i++)
        s[i] = -99;
    if (!rs || reward_score(rs, &it, 1, s, err) != LT_OK) diag("reward_score: %s", err);
    reward_set_free(rs);
}

static void check4(const char *markers, const char *completion, const char *row, double f,
                   double fa, double a, double nu, const char *name) {
    double s[4];
    char label[300];
    builtins(markers, completion, row, s);
    const double want[4] = {f, fa, a, nu};
    static const char *const what[4] = {"format", "format_approx", "answer", "number"};
    for (int i = 0; i < 4; i++) {
        snprintf(label, sizeof label, "%s: %s", name, what[i]);
        is_close(s[i], want[i], 0, label);
    }
}

#define RS "<start_working_out>"
#define RE "<end_working_out>"
#define SS "<SOLUTION>"
#define SE "</SOLUTION>"
#define A42 "{\"answer\": \"42\"}"

static void test_builtins(void) {
    check4(NULL, RS "think" RE SS "42" SE, A42, 3, 2, 3, 1.5, "exact");
    check4(NULL, RS "think" RE SS " 42 " SE, A42, 3, 2, 1.5, 1.5, "trimmed");
    check4(NULL, RS "t" RE SS "42" SE, "{\"answer\": \" 42\\n\"}", 3, 2, 1.5, 1.5,
           "trimmed (the answer's whitespace)");
    check4(NULL, RS "t" RE SS "44" SE, A42, 3, 2, 0.5, 0, "within 10% (44/42)");
    check4(NULL, RS "t" RE SS "38" SE, A42, 3, 2, 0.5, 0, "within 10% (38/42)");
    check4(NULL, RS "t" RE SS "48" SE, A42, 3, 2, 0.25, 0, "within 20% (48/42)");
    check4(NULL, RS "t" RE SS "34" SE, A42, 3, 2, 0.25, 0, "within 20% (34/42)");
    check4(NULL, RS "t" RE SS "100" SE, A42, 3, 2, -1, 0, "far (100/42)");
    check4(NULL, RS "t" RE SS "forty-two" SE, A42, 3, 2, -0.5, 0, "not a number");
    check4(NULL, RS "t" RE SS "1" SE, "{\"answer\": \"0\"}", 3, 2, -0.5, 0,
           "a zero answer (Python's ZeroDivisionError)");
    check4(NULL, RS "t" RE SS "4_2" SE, A42, 3, 2, 0.5, 0, "float() takes 4_2 as 42: within 10%");
    check4(NULL, RS "t" RE SS "  4.20e1" SE, A42, 3, 2, 0.5, 0,
           "4.20e1 is 42 as a number; number reads only 4.20");
    check4(NULL, "The answer is 42.", A42, 0, -4, 0, 0, "no markers");
    check4(NULL, RS "t" RE "42", A42, 0, -1, 0, 0, "no solution markers");
    check4(NULL, RS RE SS "42" SE, A42, 0, 2, 0, 1.5, "empty reasoning (.+? needs a character)");
    check4(NULL, RS "t" RE SS SE " 42", A42, 0, 2, 0, 1.5, "empty solution");
    /* (.+?) runs past the first </SOLUTION>, which is not at the end of a line */
    check4(NULL, RS "a" RE SS "1" SE SS "2" SE, "{\"answer\": \"2\"}", 3, -1, -0.5, 0,
           "solution markers twice");
    check4(NULL, RS "a" RE RS "b" RE SS "42" SE, A42, 3, -1, 3, 1.5, "reasoning markers twice");
    check4(NULL, "preamble\n  " RS "x" RE "\n" SS "7" SE " \nafter", "{\"answer\": \"7\"}", 3, 2, 3,
           1.5, "MULTILINE: ^ after a newline, $ before one");
    check4(NULL, "preamble " RS "x" RE SS "7" SE, "{\"answer\": \"7\"}", 0, 2, 0, 1.5,
           "text before the start on its line");
    check4(NULL, RS "x" RE SS "7" SE " done", "{\"answer\": \"7\"}", 0, 2, 0, 1.5,
           "text after the end on its line");
    check4(NULL,
           "\xc2\xa0\t " RS "x" RE SS "\xe2\x80\x83"
           "7\xe3\x80\x80" SE "\xc2\xa0",
           "{\"answer\": \"7\"}", 3, 2, 1.5, 1.5, "Unicode whitespace (NBSP, EM SPACE, U+3000)");
    check4(NULL, RS "x" RE SS "The answer is 3.50 units" SE, "{\"answer\": \"3.5\"}", 3, 2, -0.5,
           1.5, "number: the first number after the solution start");
    check4(NULL, RS "x" RE SS "1.2.3" SE, "{\"answer\": \"1.2\"}", 3, 2, -0.5, 0,
           "number: 1.2.3 is no float");
    check4(NULL, RS "x" RE SS "42" SE, "{\"answer\": 42}", 3, 2, 3, 1.5, "a JSON number 42");
    check4(NULL, RS "x" RE SS "3.5" SE, "{\"answer\": 3.5}", 3, 2, 3, 1.5, "a JSON number 3.5");
    check4(NULL, RS "x" RE SS "2" SE, "{\"answer\": 2.0}", 3, 2, 0.5, 1.5,
           "a JSON 2.0 is the text 2.0, so 2 is only a number match");
    check4(NULL, RS "x" RE SS "1e+16" SE, "{\"answer\": 1e16}", 3, 2, 3, 0,
           "a JSON 1e16 is the text 1e+16 (number reads only the 1)");

    /* custom markers with regex metacharacters, written with spaces around the commas */
    const char *m = " [ans] , $ , (x) , *. ";
    check4(m, "[ans]think$(x)5*.", "{\"answer\": \"5\"}", 3, 2, 3, 1.5, "markers [ans],$,(x),*.");
    check4(m, "a think\n(x)5*.", "{\"answer\": \"5\"}", 0, -1, 0, 1.5,
           "[ans] is text, not a character class; $ is text, not an anchor");
    check4(m, "[ans]t$(x)5*.$", "{\"answer\": \"5\"}", 0, 0.5, 0, 1.5,
           "a second $ after the solution end");
    check4("<think>,</think>,<answer>,</answer>", "<think>hm</think>\n<answer>12</answer>\n",
           "{\"answer\": \"12\"}", 3, 2, 3, 1.5, "other markers");
    check4("<think>,</think>,<answer>,</answer>", RS "t" RE SS "42" SE, A42, 0, -4, 0, 0,
           "other markers: the default ones are plain text");
}

static void test_contract(void) {
    char err[LT_ERRLEN] = "";
    write_tmp("skip.py", "import json, sys\n"
                         "for line in sys.stdin:\n"
                         "    d = json.loads(line)\n"
                         "    print('null' if d.get('skip') else len(d['completion']))\n");
    reward_set *rs = make("number, format ,exec:python3 skip.py", "0.5, 2,-1", NULL, 30);
    ok(rs != NULL, "contract: a set of three");
    if (!rs) return;
    is_int(reward_count(rs), 3, "contract: three rewards");
    is_str(reward_name(rs, 0), "number", "contract: names in order (0)");
    is_str(reward_name(rs, 1), "format", "contract: names trimmed (1)");
    is_str(reward_name(rs, 2), "exec:python3 skip.py", "contract: exec's name is exec:COMMAND");
    ok(reward_weight(rs, 0) == 0.5 && reward_weight(rs, 1) == 2 && reward_weight(rs, 2) == -1,
       "contract: weights in order");
    ok(reward_name(rs, 3) == NULL && isnan(reward_weight(rs, 3)), "contract: out of range");
    reward_item it[3] = {{"Q", RS "x" RE SS "42" SE, A42},
                         {"Q", "no", "{\"answer\": \"42\", \"skip\": true}"},
                         {"Q", SS "42", A42}};
    double s[9];
    is_int(reward_score(rs, it, 3, s, err), LT_OK, "contract: scores");
    const double want[9] = {1.5, 0, 1.5, 3, 0, 0, (double)strlen(it[0].completion), NAN, 12};
    int same = 1;
    for (int i = 0; i < 9; i++)
        same &= isnan(want[i]) ? isnan(s[i]) : s[i] == want[i];
    ok(same, "contract: scores[f * n + i], exec's null as NaN");
    if (!same)
        for (int i = 0; i < 9; i++)
            diag("s[%d] = %g, want %g", i, s[i], want[i]);
    is_int(reward_score(rs, it, 0, s, err), LT_OK, "contract: no items is fine");
    reward_set_free(rs);

    rs = make("format", NULL, NULL, 0);
    ok(rs && reward_weight(rs, 0) == 1.0, "contract: weights default to 1, no timeout needed");
    reward_set_free(rs);
}

static void test_options(void) {
    char err[LT_ERRLEN];
    is_int(make_fail("formt", NULL, NULL, err), LT_ERR_ARG, "spec: unknown name refused");
    ok(strstr(err, "'formt'") && strstr(err, "format, format_approx, answer, number") &&
           strstr(err, "exec:COMMAND"),
       "spec: the message names it and lists the accepted ones");
    diag("%s", err);
    make_fail("Format-Approx", NULL, NULL, err);
    ok(strstr(err, "did you mean format_approx?") != NULL, "spec: a near name is suggested");
    is_int(make_fail("", NULL, NULL, err), LT_ERR_ARG, "spec: empty refused");
    is_int(make_fail("format,,answer", NULL, NULL, err), LT_ERR_ARG, "spec: empty entry refused");
    is_int(make_fail("format,", NULL, NULL, err), LT_ERR_ARG, "spec: trailing comma refused");
    is_int(make_fail("answer,answer", NULL, NULL, err), LT_ERR_ARG, "spec: a name twice refused");
    is_int(make_fail("format,exec:  ", NULL, NULL, err), LT_ERR_ARG, "spec: exec: without command");
    ok(strstr(err, "needs a command") != NULL, "spec: ... says it needs a command");
    reward_opts o = {"format,exec:echo a,b", NULL, NULL, NULL, 0};
    reward_set *rs = NULL;
    is_int(reward_set_new(&rs, &o, err), LT_ERR_ARG, "spec: exec needs timeout > 0");
    reward_set_free(rs);
    o = (reward_opts){"exec:true", NULL, NULL, "/nonexistent-lathe-dir", 5};
    is_int(reward_set_new(&rs, &o, err), LT_ERR_ARG, "spec: exec in a missing folder refused");
    ok(strstr(err, "/nonexistent-lathe-dir") != NULL, "spec: ... the message names the folder");
    reward_set_free(rs);
    rs = make("format, exec: echo a,b, c ", NULL, NULL, 5);
    ok(rs && reward_count(rs) == 2, "spec: exec: takes the rest of the text");
    if (rs) is_str(reward_name(rs, 1), "exec:echo a,b, c", "spec: ... commas included");
    reward_set_free(rs);

    is_int(make_fail("format,answer", "1", NULL, err), LT_ERR_ARG, "weights: too few refused");
    ok(strstr(err, "1 weight for 2 rewards") != NULL, "weights: ... the message counts both");
    is_int(make_fail("format", "1,2", NULL, err), LT_ERR_ARG, "weights: too many refused");
    is_int(make_fail("format,answer", "1,abc", NULL, err), LT_ERR_ARG, "weights: non-number");
    ok(strstr(err, "'abc'") && strstr(err, "answer"), "weights: ... quotes it, names the reward");
    is_int(make_fail("format,answer", "1,", NULL, err), LT_ERR_ARG, "weights: empty refused");
    is_int(make_fail("format", "nan", NULL, err), LT_ERR_ARG, "weights: nan refused");
    is_int(make_fail("format", "2x", NULL, err), LT_ERR_ARG, "weights: trailing junk refused");
    rs = make("format,answer", " 1e-1 ,-2 ", NULL, 1);
    ok(rs && reward_weight(rs, 0) == 0.1 && reward_weight(rs, 1) == -2, "weights: parsed");
    reward_set_free(rs);

    is_int(make_fail("format", NULL, "a,b,c", err), LT_ERR_ARG, "markers: three refused");
    ok(strstr(err, "<start_working_out>") != NULL, "markers: ... the message shows the defaults");
    is_int(make_fail("format", NULL, "a,b,c,d,e", err), LT_ERR_ARG, "markers: five refused");
    is_int(make_fail("format", NULL, "a,,c,d", err), LT_ERR_ARG, "markers: empty refused");

    /* rows */
    rs = make("format,answer", NULL, NULL, 1);
    double s[4];
    reward_item it[2] = {{"Q", "x", A42}, {"Q", "x", "{\"question\": \"q\"}"}};
    is_int(reward_score(rs, it, 2, s, err), LT_ERR_ARG, "rows: no answer field refused");
    ok(strstr(err, "\"answer\"") && strstr(err, "completion 2"),
       "rows: ... the message names the field and the completion");
    diag("%s", err);
    it[1].row_json = NULL;
    is_int(reward_score(rs, it, 2, s, err), LT_ERR_ARG, "rows: no row refused for answer");
    it[1].row_json = "{\"answer\": true}";
    is_int(reward_score(rs, it, 2, s, err), LT_ERR_ARG, "rows: a boolean answer refused");
    it[1].row_json = "[1]";
    is_int(reward_score(rs, it, 2, s, err), LT_ERR_ARG, "rows: not an object refused");
    reward_set_free(rs);
    rs = make("format,format_approx", NULL, NULL, 1);
    is_int(reward_score(rs, it, 1, s, err), LT_OK, "rows: format needs no answer");
    reward_set_free(rs);
}

/* reward_score on n items of one exec program; returns the status, scores in s. */
static lt_status score_exec(reward_set *rs, const reward_item *it, int n, double *s, char *err) {
    err[0] = 0;
    return reward_score(rs, it, n, s, err);
}

static void test_exec_good(void) {
    char err[LT_ERRLEN];
    /* Counts the lines it has read, so a later call shows it kept running. */
    write_tmp("len.py", "import json, sys\n"
                        "seen = 0\n"
                        "for line in sys.stdin:\n"
                        "    seen += 1\n"
                        "    d = json.loads(line)\n"
                        "    if d.get('count'):\n"
                        "        print(seen)\n"
                        "        continue\n"
                        "    bonus = d.get('bonus', 0) + (1000 if d['prompt'] == 'Q: hi' else 0)\n"
                        "    print(len(d['completion']) + bonus)\n");
    reward_set *rs = make("exec:python3 len.py", NULL, NULL, 30);
    ok(rs != NULL, "python: starts in opts->cwd");
    if (!rs) return;
    reward_item it[3] = {{"Q: hi", "abcd", NULL},
                         {"P", "h\xc3\xa9llo", "{\"bonus\": 20, \"completion\": \"WRONG\"}"},
                         {"P", "", "{\"prompt\": \"Q: hi\", \"answer\": 1}"}};
    double s[3];
    is_int(score_exec(rs, it, 3, s, err), LT_OK, "python: scores");
    if (err[0]) diag("%s", err);
    ok(s[0] == 1004 && s[1] == 25 && s[2] == 0,
       "python: len(completion) in characters, the row's fields reach it, ours override its "
       "prompt and completion");
    diag("got %g %g %g", s[0], s[1], s[2]);
    reward_item again[2] = {{"P", "xy", NULL}, {"P", "", "{\"count\": 1}"}};
    is_int(score_exec(rs, again, 2, s, err), LT_OK, "python: a second call");
    ok(s[0] == 2 && s[1] == 5, "python: the same program, still running (5 lines seen)");
    reward_set_free(rs);

    rs = make("exec:while IFS= read -r l; do case \"$l\" in *good*) echo 1;; *) echo ' -2.5 ';; "
              "esac; done",
              NULL, NULL, 30);
    reward_item sh[3] = {{"P", "good", NULL}, {"P", "bad", NULL}, {"P", "bad", "{\"x\":\"good\"}"}};
    is_int(score_exec(rs, sh, 3, s, err), LT_OK, "sh: scores");
    ok(s[0] == 1 && s[1] == -2.5 && s[2] == 1, "sh: numbers with whitespace around, row fields");
    reward_set_free(rs);

    /* mawk reads its input in blocks unless -W interactive; gawk reads what a pipe has */
    rs = make("exec:if awk -W version 2>&1 | grep -q mawk; then exec awk -W interactive "
              "'{ print NR * 0.5 }'; else exec awk '{ print NR * 0.5; fflush() }'; fi",
              NULL, NULL, 30);
    is_int(score_exec(rs, sh, 3, s, err), LT_OK, "awk: scores");
    if (err[0]) diag("%s", err);
    ok(s[0] == 0.5 && s[1] == 1 && s[2] == 1.5, "awk: one answer a line, in order");
    reward_set_free(rs);

    /* 300 items of 4 KB in, 2 KB lines out: far past a pipe's buffer both ways. */
    enum { N = 300 };
    static reward_item big[N];
    static double bs[N];
    char *prompt = malloc(4097);
    memset(prompt, 'p', 4096);
    prompt[4096] = 0;
    for (int i = 0; i < N; i++)
        big[i] = (reward_item){prompt, i % 2 ? "odd" : "even!", NULL};
    write_tmp("pad.py", "import json, sys\n"
                        "for line in sys.stdin:\n"
                        "    print(str(len(json.loads(line)['completion'])) + ' ' * 2000)\n");
    write_tmp("all.py", "import json, sys\n"
                        "lines = [sys.stdin.readline() for _ in range(300)]\n"
                        "for l in lines:\n"
                        "    print(len(json.loads(l)['completion']) * 2)\n"
                        "sys.stdout.flush()\n");
    const char *progs[2] = {"exec:python3 pad.py", "exec:python3 all.py"};
    for (int k = 0; k < 2; k++) {
        rs = make(progs[k], NULL, NULL, 60);
        lt_status st = score_exec(rs, big, N, bs, err);
        int right = 1;
        for (int i = 0; i < N; i++)
            right &= bs[i] == (i % 2 ? 3 : 5) * (k + 1);
        ok(st == LT_OK && right, k ? "big: a program that reads everything first"
                                   : "big: a program that answers "
                                     "while it reads");
        if (st) diag("%s", err);
        reward_set_free(rs);
    }
    free(prompt);
    ok(waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD, "free: every program reaped");
}

/* A program that fails: the status, a message holding each of want[], and a second call that
 * fails at once with the same message. */
static void exec_fails(const char *cmd, double timeout_s, int n, const char *const *want,
                       const char *name) {
    char err[LT_ERRLEN], err2[LT_ERRLEN], label[300];
    reward_set *rs = make(cmd, NULL, NULL, timeout_s);
    snprintf(label, sizeof label, "%s: starts", name);
    ok(rs != NULL, label);
    if (!rs) return;
    reward_item it[4] = {{"P", "a", NULL}, {"P", "b", NULL}, {"P", "c", NULL}, {"P", "d", NULL}};
    double s[4];
    double t0 = now_s();
    lt_status st = score_exec(rs, it, n, s, err);
    double took = now_s() - t0;
    snprintf(label, sizeof label, "%s: fails", name);
    is_int(st, LT_ERR_ARG, label);
    int all = strstr(err, cmd) != NULL;
    for (int i = 0; want[i]; i++)
        all &= strstr(err, want[i]) != NULL;
    snprintf(label, sizeof label, "%s: the message names the program and says what", name);
    ok(all, label);
    diag("%s", err);
    snprintf(label, sizeof label, "%s: within the timeout (%.2f s)", name, took);
    ok(took < timeout_s + 9, label);
    t0 = now_s();
    st = score_exec(rs, it, n, s, err2);
    snprintf(label, sizeof label, "%s: a later call fails at once, alike", name);
    ok(st == LT_ERR_ARG && strcmp(err, err2) == 0 && now_s() - t0 < 0.5, label);
    reward_set_free(rs);
}

static void test_exec_bad(void) {
    exec_fails("exec:echo oops >&2; exit 3", 10, 2,
               (const char *const[]){"exited with status 3", "0 of 2", "\"oops\"", NULL},
               "exits at once");
    exec_fails("exec:read l; kill -TERM $$", 10, 2,
               (const char *const[]){"killed by signal 15", NULL}, "killed by a signal");
    exec_fails("exec:while read l; do echo abc; done", 10, 2,
               (const char *const[]){"not a number", "\"abc\"", "answer 1 of 2", NULL},
               "prints abc");
    exec_fails("exec:while read l; do echo nan; done", 10, 1,
               (const char *const[]){"not a number", "\"nan\"", NULL}, "prints nan");
    exec_fails("exec:read l; echo 1", 10, 3,
               (const char *const[]){"exited with status 0", "1 of 3", "one line per", NULL},
               "too few lines");
    exec_fails("exec:sleep 30", 1, 2, (const char *const[]){"no answer within 1 s", "0 of 2", NULL},
               "never answers");
    exec_fails("exec:no_such_program_lathe_test", 10, 1,
               (const char *const[]){"status 127", "could not find", "not found", NULL},
               "no such command");

    /* It closes stdin without reading while 1 MB is written: EPIPE, not SIGPIPE. */
    sigset_t before, after;
    sigprocmask(SIG_SETMASK, NULL, &before);
    enum { N = 256 };
    static reward_item big[N];
    char *prompt = malloc(4097);
    memset(prompt, 'p', 4096);
    prompt[4096] = 0;
    for (int i = 0; i < N; i++)
        big[i] = (reward_item){prompt, "c", NULL};
    reward_set *rs = make("exec:exec 0<&-; echo 1; exit 0", NULL, NULL, 10);
    char err[LT_ERRLEN];
    static double s[N];
    ok(score_exec(rs, big, N, s, err) == LT_ERR_ARG && strstr(err, "1 of 256"),
       "closed stdin: fails with a message, the kernel lives on");
    diag("%s", err);
    reward_set_free(rs);
    free(prompt);
    sigset_t pending;
    sigpending(&pending);
    sigprocmask(SIG_SETMASK, NULL, &after);
    ok(!sigismember(&pending, SIGPIPE) &&
           sigismember(&before, SIGPIPE) == sigismember(&after, SIGPIPE),
       "closed stdin: no SIGPIPE left pending, the signal mask as it was");

    /* free: a program that never reads stdin is killed after about a second */
    rs = make("exec:sleep 30", NULL, NULL, 10);
    double t0 = now_s();
    reward_set_free(rs);
    double took = now_s() - t0;
    ok(took < 8, "free: a program that ignores its stdin is killed");
    diag("free took %.2f s", took);
    ok(waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD, "free: nothing left to reap");
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "%s/lathe-rewards-XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmpdir)) {
        printf("Bail out! no temp folder\n");
        return 1;
    }
    test_builtins();
    test_contract();
    test_options();
    test_exec_good();
    test_exec_bad();
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) diag("could not remove %s", tmpdir);
    return tap_done();
}
