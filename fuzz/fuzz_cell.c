/* fuzz_cell.c — libFuzzer harness for cell text and magic options (kernel/cell.c and the
 * option checking of kernel/magics.c): the code of every execute, complete, inspect and
 * is_complete request.
 *
 * The input is a cell as the kernel receives it from the JSON of a request: valid UTF-8
 * without NUL (the wire decoder repairs anything else to U+FFFD first), so the harness
 * repairs it the same way (jp_utf8_sanitize). It calls cell_parse and magic_validate on every
 * call, as interp_execute does before anything runs (nothing runs here), and
 * interp_is_complete, interp_complete and interp_inspect at a cursor chosen from the input
 * (the last byte, as a code point offset) and at both ends. Parsing never runs a magic.
 */
#include "fuzz/fuzz_util.h"

#include "kernel/cell.h"
#include "kernel/interp.h"
#include "kernel/magic.h"
#include "protocol/protocol.h"

static interp *in;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    in = interp_new();
    if (!in) abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *code = jp_utf8_sanitize((const char *)data, size);
    FUZZ_CHECK(code != NULL);
    size_t len = strlen(code);

    cell_program prog;
    cell_parse_error perr;
    if (cell_parse(code, len, &prog, &perr) == 0) {
        for (int i = 0; i < prog.ncalls; i++) {
            const cell_call *c = &prog.calls[i];
            FUZZ_CHECK(c->name != NULL && c->start < len);
            for (int w = 0; w < c->nwords; w++)
                FUZZ_CHECK(c->words[w].value && c->words[w].start <= c->words[w].end &&
                           c->words[w].end <= len);
            magic_args args;
            char msg[1024];
            memset(&args, 0, sizeof args);
            if (magic_validate(c, &args, msg, sizeof msg) == 0) {
                FUZZ_CHECK(args.spec != NULL && args.npos <= MAGIC_MAX_POS);
            } else {
                FUZZ_CHECK(msg[0] != '\0');
            }
        }
        cell_program_free(&prog);
    } else {
        FUZZ_CHECK(perr.message[0] != '\0' && perr.offset <= len);
    }

    const char *indent = NULL;
    const char *st = interp_is_complete(in, code, len, &indent);
    FUZZ_CHECK(st != NULL);
    size_t ncp = jp_utf8_count(code, len);
    int cursors[3] = {0, (int)ncp, size ? (int)(data[size - 1] % (ncp + 1)) : 0};
    for (int k = 0; k < 3; k++) {
        int cs = -1, ce = -1;
        json_t *m = interp_complete(in, code, len, cursors[k], &cs, &ce);
        if (m) FUZZ_CHECK(cs >= 0 && cs <= ce && ce <= (int)ncp);
        json_decref(m);
        json_decref(interp_inspect(in, code, len, cursors[k], k));
    }
    free(code);
    return 0;
}
