/* fuzz_data.c — libFuzzer harness for %train datasets (cuda/train/data.c): JSONL and JSON files
 * in each format (text, alpaca, sharegpt, messages), the records a user downloads and trains on.
 *
 * Byte 0 picks the options %train passes: format = auto|text|alpaca|sharegpt|messages
 * (byte 0 % 5), responses_only (bit 3), max_seq 0 or 4..67 (bits 4-7, 0 = none); the rest is the
 * file, written to a memfd and read by data_load, the function the trainer calls (through the
 * same data_reader, with limits of 8 KiB a line and 48 KiB a file so inputs reach them), with
 * the tokenizer of the bundled tiny model. Every accepted sample must hold ids of the vocabulary,
 * at most max_seq of them, and at least one label.
 */
#include "fuzz/fuzz_util.h"

#include "cuda/text/tokenizer.h"
#include "cuda/train/train.h"

static lt_tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    char err[LT_ERRLEN];
    if (tok_load(&tok, LATHE_SRCDIR "/models/tiny/tokenizer.model", err) != LT_OK) {
        fprintf(stderr, "fuzz_data: %s\n", err);
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    static const char *const formats[] = {"auto", "text", "alpaca", "sharegpt", "messages"};
    int b = data[0];
    data_opts o;
    memset(&o, 0, sizeof o);
    o.path = fuzz_file(data + 1, size - 1);
    o.format = formats[b % 5];
    o.responses_only = (b >> 3) & 1;
    o.max_seq = (b >> 4) ? 4 * (b >> 4) + 3 : 0;
    o.max_row_bytes = 8192; /* small limits, so inputs reach them */
    o.max_file_bytes = 49152;
    train_data d;
    char err[LT_ERRLEN] = "";
    if (data_load(&d, &o, tok, NULL, NULL, err) != LT_OK) {
        FUZZ_CHECK(err[0] != '\0');
        return 0;
    }
    FUZZ_CHECK(d.n > 0);
    int vocab = tok_size(tok);
    for (int i = 0; i < d.n; i++) {
        const train_sample *s = &d.s[i];
        FUZZ_CHECK(s->n > 0 && (o.max_seq == 0 || s->n <= o.max_seq));
        int labels = 0;
        for (int k = 0; k < s->n; k++) {
            FUZZ_CHECK(s->ids[k] >= 0 && s->ids[k] < vocab);
            labels += k > 0 && s->mask[k];
        }
        FUZZ_CHECK(labels > 0);
    }
    data_free(&d);
    return 0;
}
