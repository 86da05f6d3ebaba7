/* test_cell.c — the cell language: parsing, validation against the magic table, completion,
 * inspection, is_complete, and running cells through a capturing sink (including an
 * interrupt of %sleep from another thread). Bad inputs tried: non-magic lines, unterminated
 * quotes, bad magic names, unknown magics/options, wrong types, out-of-range values,
 * repeated options, missing/extra words, line/cell magic mix-ups.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernel/cell.h"
#include "kernel/display.h"
#include "kernel/interp.h"
#include "kernel/magic.h"
#include "tests/unit/tap.h"

/* ---- a sink that records everything ----------------------------------------------------- */

typedef struct capture {
    strbuf_t out, err;
    int displays, updates, results;
    char first_id[64], last_id[64];
    char last_plain[2048];
    char *input_answer; /* NULL = input refused */
} capture;

static void cap_stream(void *c, const char *name, const char *text) {
    capture *k = c;
    sb_printf(strcmp(name, "stderr") == 0 ? &k->err : &k->out, "%s", text);
}

static void cap_display(void *c, json_t *data, json_t *meta, const char *id, int update) {
    capture *k = c;
    (void)meta;
    if (update)
        ++k->updates;
    else
        ++k->displays;
    if (id && !k->first_id[0]) snprintf(k->first_id, sizeof k->first_id, "%s", id);
    if (id) snprintf(k->last_id, sizeof k->last_id, "%s", id);
    const char *p = json_string_value(json_object_get(data, "text/plain"));
    snprintf(k->last_plain, sizeof k->last_plain, "%s", p ? p : "");
}

static void cap_result(void *c, json_t *data, json_t *meta) {
    capture *k = c;
    ++k->results;
    cap_display(c, data, meta, NULL, 0);
    --k->displays;
}

static int cap_input(void *c, const char *prompt, int password, char **value) {
    capture *k = c;
    (void)prompt;
    (void)password;
    if (!k->input_answer) return -1;
    *value = strdup(k->input_answer);
    return 0;
}

static lt_sink sink_of(capture *k) {
    memset(k, 0, sizeof *k);
    lt_sink s = {k, cap_stream, cap_display, cap_result, cap_input, NULL};
    return s;
}

static void cap_free(capture *k) {
    sb_free(&k->out);
    sb_free(&k->err);
}

/* ---- parsing ---------------------------------------------------------------------------- */

static void test_parse(void) {
    cell_program p;
    cell_parse_error e;
    const char *c1 = "# setup\n%load tiny dtype=bf16   # a comment\n\n  %status\n";
    ok(cell_parse(c1, strlen(c1), &p, &e) == 0, "parse: comments, blank lines, indentation");
    is_int(p.ncalls, 2, "parse: two calls");
    is_str(p.calls[0].name, "load", "parse: first magic name");
    is_int(p.calls[0].nwords, 2, "parse: two words");
    is_str(p.calls[0].words[0].value, "tiny", "parse: positional");
    ok(p.calls[0].words[0].key == NULL, "parse: positional has no key");
    is_str(p.calls[0].words[1].key, "dtype", "parse: option key");
    is_str(p.calls[0].words[1].value, "bf16", "parse: option value");
    is_int(p.calls[0].line, 2, "parse: line numbers");
    is_int(p.calls[1].line, 4, "parse: line of the second call");
    cell_program_free(&p);

    const char *c2 = "%generate \"say \\\"hi\\\" now\" max_new=5 stop=\"a b\"";
    ok(cell_parse(c2, strlen(c2), &p, &e) == 0, "parse: quotes with escapes");
    is_str(p.calls[0].words[0].value, "say \"hi\" now", "parse: unquoted text");
    is_str(p.calls[0].words[2].key, "stop", "parse: quoted option value key");
    is_str(p.calls[0].words[2].value, "a b", "parse: quoted option value");
    cell_program_free(&p);

    const char *c3 = "%load \\\n  tiny \\\n  dtype=fp32\n%status";
    ok(cell_parse(c3, strlen(c3), &p, &e) == 0, "parse: backslash continuation");
    is_int(p.calls[0].nwords, 2, "parse: continued words join the call");
    is_int(p.calls[1].line, 4, "parse: lines counted through continuations");
    cell_program_free(&p);

    const char *c4 = "# chat\n%%chat reset temperature=0\nHello\n# not a comment here\nthere\n";
    ok(cell_parse(c4, strlen(c4), &p, &e) == 0, "parse: cell magic");
    ok(p.calls[0].is_cell, "parse: %% marks a cell magic");
    is_str(p.calls[0].body, "Hello\n# not a comment here\nthere\n",
           "parse: body is the rest, verbatim");
    cell_program_free(&p);

    const char *c5 = "a = 1 + 2";
    ok(cell_parse(c5, strlen(c5), &p, &e) != 0, "parse error: a line that is not a magic");
    ok(strstr(e.message, "not a magic") && e.line == 1, "parse error names the line");
    const char *c6 = "%load \"tiny";
    ok(cell_parse(c6, strlen(c6), &p, &e) != 0, "parse error: unterminated quote");
    ok(strstr(e.message, "unterminated quote") != NULL, "parse error says how to fix the quote");
    const char *c7 = "%\n";
    ok(cell_parse(c7, strlen(c7), &p, &e) != 0, "parse error: % alone");
    const char *c8 = "%lo-ad tiny";
    ok(cell_parse(c8, strlen(c8), &p, &e) != 0, "parse error: bad magic name");
    const char *c9 = "";
    ok(cell_parse(c9, 0, &p, &e) == 0 && p.ncalls == 0, "parse: empty cell is fine");
    /* invalid UTF-8 and NUL bytes are just bytes to the parser */
    const char c10[] = "%echo \xff\xfe\x00x";
    ok(cell_parse(c10, sizeof c10 - 1, &p, &e) == 0, "parse: odd bytes do not crash");
    cell_program_free(&p);
}

/* ---- validation ------------------------------------------------------------------------- */

static int validate(const char *code, char *msg, size_t n) {
    cell_program p;
    cell_parse_error e;
    if (cell_parse(code, strlen(code), &p, &e)) {
        snprintf(msg, n, "%s", e.message);
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < p.ncalls && rc == 0; ++i) {
        magic_args a;
        rc = magic_validate(&p.calls[i], &a, msg, n);
    }
    cell_program_free(&p);
    return rc;
}

static void test_validate(void) {
    char m[1024];
    ok(validate("%load tiny dtype=bf16 max_seq=512", m, sizeof m) == 0, "valid %load");
    ok(validate("%loud tiny", m, sizeof m) && strstr(m, "unknown magic %loud") &&
           strstr(m, "%help"),
       "unknown magic is named with a hint");
    ok(validate("%load tiny dtipe=bf16", m, sizeof m) && strstr(m, "no option 'dtipe'") &&
           strstr(m, "dtype"),
       "unknown option lists the real ones");
    ok(validate("%load tiny dtype=int3", m, sizeof m) && strstr(m, "dtype=auto|fp32|fp16|bf16"),
       "bad choice shows the accepted form");
    ok(validate("%load tiny max_seq=abc", m, sizeof m) && strstr(m, "INTEGER"),
       "non-integer shows the accepted form");
    ok(validate("%load tiny max_seq=-5", m, sizeof m) && strstr(m, "'-5'"), "out of range integer");
    ok(validate("%generate hi top_p=0", m, sizeof m) && strstr(m, "> 0"),
       "open lower bound is enforced");
    ok(validate("%generate hi temperature=1e999", m, sizeof m) != 0, "infinite number refused");
    ok(validate("%generate hi top_k=3 top_k=4", m, sizeof m) && strstr(m, "twice"),
       "repeated option refused");
    ok(validate("%load", m, sizeof m) && strstr(m, "needs SOURCE"), "missing positional named");
    ok(validate("%load a b", m, sizeof m) && strstr(m, "unexpected word 'b'"), "extra positional");
    ok(validate("%status now", m, sizeof m) && strstr(m, "takes no words"),
       "word to a no-word magic");
    ok(validate("%chat hi", m, sizeof m) && strstr(m, "cell magic"),
       "cell magic used as a line magic");
    ok(validate("%%load tiny\n", m, sizeof m) && strstr(m, "line magic"),
       "line magic used as cell");
    ok(validate("%echo stream=stdin x", m, sizeof m) && strstr(m, "stdout|stderr"),
       "echo stream choice");
    ok(validate("%help load", m, sizeof m) == 0, "valid %help NAME");
}

/* ---- completion / inspection / is_complete ---------------------------------------------- */

static int has_match(json_t *arr, const char *s) {
    for (size_t i = 0; i < json_array_size(arr); ++i)
        if (strcmp(json_string_value(json_array_get(arr, i)), s) == 0) return 1;
    return 0;
}

static void test_complete(void) {
    int cs, ce;
    json_t *m = interp_complete(NULL, "%he", 3, 3, &cs, &ce);
    ok(has_match(m, "%help") && json_array_size(m) == 1, "complete %he -> %help");
    is_int(cs, 0, "complete: cursor_start");
    is_int(ce, 3, "complete: cursor_end");
    json_decref(m);
    m = interp_complete(NULL, "%%c", 3, 3, &cs, &ce);
    ok(has_match(m, "%%chat"), "complete %%c -> %%chat");
    json_decref(m);
    const char *c = "%load tiny dt";
    m = interp_complete(NULL, c, strlen(c), 13, &cs, &ce);
    ok(has_match(m, "dtype=") && cs == 11, "complete option name");
    json_decref(m);
    c = "%load tiny dtype=b";
    m = interp_complete(NULL, c, strlen(c), 18, &cs, &ce);
    ok(has_match(m, "dtype=bf16") && json_array_size(m) == 1, "complete a choice value");
    json_decref(m);
    /* code points, not bytes: "é" is 2 bytes, 1 code point */
    c = "%echo é\n%sl";
    m = interp_complete(NULL, c, strlen(c), 11, &cs, &ce);
    ok(has_match(m, "%sleep") && cs == 8 && ce == 11, "complete counts code points");
    json_decref(m);

    json_t *d = interp_inspect(NULL, "%sleep 3", 8, 2, 0);
    const char *t = d ? json_string_value(json_object_get(d, "text/plain")) : NULL;
    ok(t && strstr(t, "%sleep SECONDS"), "inspect a magic shows its usage");
    json_decref(d);
    c = "%load tiny dtype=bf16";
    d = interp_inspect(NULL, c, strlen(c), 13, 0);
    t = d ? json_string_value(json_object_get(d, "text/plain")) : NULL;
    ok(t && strstr(t, "option dtype"), "inspect an option shows the option's help");
    json_decref(d);
    ok(interp_inspect(NULL, "", 0, 0, 0) == NULL, "inspect nothing -> not found");

    const char *ind;
    is_str(interp_is_complete(NULL, "%status", 7, &ind), "complete", "is_complete: complete");
    is_str(interp_is_complete(NULL, "%load \\", 7, &ind), "incomplete",
           "is_complete: continuation");
    is_str(interp_is_complete(NULL, "%%chat\nhello", 12, &ind), "incomplete",
           "is_complete: chat body");
    is_str(interp_is_complete(NULL, "%%chat\nhello\n\n", 14, &ind), "complete",
           "is_complete: body ended");
    is_str(interp_is_complete(NULL, "%nope", 5, &ind), "invalid", "is_complete: unknown magic");
    is_str(interp_is_complete(NULL, "%load \"x", 8, &ind), "invalid", "is_complete: bad quote");
}

/* ---- execution -------------------------------------------------------------------------- */

static void *interrupt_later(void *p) {
    struct timespec ts = {0, 300 * 1000000L};
    nanosleep(&ts, NULL);
    interp_interrupt(p);
    return NULL;
}

static void test_execute(void) {
    interp *in = interp_new();
    ok(in != NULL, "interp_new");
    if (!in) return;
    capture k;
    lt_sink s = sink_of(&k);
    interp_error e;
    const char *c = "%echo hello, world\n%echo stream=stderr oops";
    ok(interp_execute(in, c, strlen(c), &s, &e) == 0, "execute %echo");
    is_str(k.out.data, "hello, world\n", "echo on stdout");
    is_str(k.err.data, "oops\n", "echo on stderr");
    interp_error_clear(&e);
    cap_free(&k);

    s = sink_of(&k);
    c = "%echo first\n%sleep abc";
    ok(interp_execute(in, c, strlen(c), &s, &e) != 0, "a bad line fails the cell");
    ok(k.out.data == NULL, "nothing ran before validation finished");
    is_str(e.ename, "CellError", "ename CellError");
    ok(e.evalue && strstr(e.evalue, "SECONDS 'abc'") && strstr(e.evalue, "NUMBER >= 0") &&
           json_array_size(e.traceback) >= 1,
       "error names the word, the accepted form, and has a traceback");
    interp_error_clear(&e);
    cap_free(&k);

    s = sink_of(&k);
    c = "%sleep 0.35";
    ok(interp_execute(in, c, strlen(c), &s, &e) == 0, "%sleep runs");
    is_int(k.displays, 1, "%sleep: one display_data");
    ok(k.updates >= 2, "%sleep: updated in place");
    ok(k.first_id[0] && strcmp(k.first_id, k.last_id) == 0, "%sleep: updates share the display_id");
    ok(strstr(k.last_plain, "done") && strstr(k.last_plain, "350/350"),
       "%sleep: final state shown");
    interp_error_clear(&e);
    cap_free(&k);

    s = sink_of(&k);
    pthread_t th;
    pthread_create(&th, NULL, interrupt_later, in);
    double t0 = display_now();
    ok(interp_execute(in, "%sleep 30", 9, &s, &e) != 0, "interrupted %sleep fails");
    double took = display_now() - t0;
    pthread_join(th, NULL);
    ok(took < 1.5, "interrupt stops %sleep promptly");
    is_str(e.ename, "KeyboardInterrupt", "interrupt gives KeyboardInterrupt");
    ok(strstr(k.last_plain, "interrupted") != NULL, "the bar shows it was interrupted");
    interp_error_clear(&e);
    cap_free(&k);

    s = sink_of(&k);
    ok(interp_execute(in, "%echo next", 10, &s, &e) == 0, "the next cell runs after an interrupt");
    interp_error_clear(&e);
    cap_free(&k);

    s = sink_of(&k);
    ok(interp_execute(in, "%input name?", 12, &s, &e) != 0, "input refused without a front end");
    is_str(e.ename, "StdinNotImplementedError", "input refusal ename");
    interp_error_clear(&e);
    cap_free(&k);
    s = sink_of(&k);
    k.input_answer = "Ada";
    ok(interp_execute(in, "%input name?", 12, &s, &e) == 0, "input answered");
    is_str(k.out.data, "Ada\n", "input echoes the answer");
    interp_error_clear(&e);
    cap_free(&k);

    s = sink_of(&k);
    ok(interp_execute(in, "%version", 8, &s, &e) == 0 && k.results == 1, "%version is a result");
    interp_error_clear(&e);
    cap_free(&k);

    s = sink_of(&k);
    ok(interp_execute(in, "%help", 5, &s, &e) == 0 && k.displays == 1 &&
           strstr(k.last_plain, "%load") && strstr(k.last_plain, "%%chat"),
       "%help lists the magics");
    interp_error_clear(&e);
    cap_free(&k);
    s = sink_of(&k);
    ok(interp_execute(in, "%help %sleep", 12, &s, &e) == 0 && strstr(k.last_plain, "SECONDS"),
       "%help NAME explains one");
    interp_error_clear(&e);
    cap_free(&k);
    s = sink_of(&k);
    ok(interp_execute(in, "%help nothing", 13, &s, &e) != 0 && strstr(e.evalue, "no magic named"),
       "%help of an unknown name fails clearly");
    interp_error_clear(&e);
    cap_free(&k);

    s = sink_of(&k);
    ok(interp_execute(in, "%status", 7, &s, &e) == 0 && strstr(k.last_plain, "none loaded"),
       "%status with nothing loaded");
    interp_error_clear(&e);
    cap_free(&k);

    s = sink_of(&k);
    ok(interp_execute(in, "%generate hi", 12, &s, &e) != 0 && strcmp(e.ename, "EngineError") == 0,
       "%generate without a model is an engine error");
    interp_error_clear(&e);
    cap_free(&k);
    interp_free(in);
}

int main(void) {
    test_parse();
    test_validate();
    test_complete();
    test_execute();
    return tap_done();
}
