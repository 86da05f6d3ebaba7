/* fuzz_tokenizer.c — libFuzzer harness for tokenizer model loading (cuda/text/tokenizer.cc): the
 * tokenizer.model (a SentencePiece ModelProto) of every model lathe loads from the Hub or disk.
 *
 * The input is written to a memfd and loaded by tok_load, the function the model loader calls
 * on tokenizer.model (SentencePiece parses the proto; lathe's own reader walks its wire bytes
 * for the piece types). A model that loads must encode and decode a fixed text with special
 * pieces in it, in both encoders, give the bytes of every piece, and look its specials up by
 * name. SentencePiece itself is not instrumented: coverage is lathe's shim and what it calls.
 */
#include "fuzz/fuzz_util.h"

#include "cuda/base/error.h"
#include "cuda/text/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    lt_tokenizer *t = NULL;
    char err[LT_ERRLEN] = "";
    if (tok_load(&t, fuzz_file(data, size), err) != LT_OK) {
        FUZZ_CHECK(t == NULL && err[0] != '\0');
        return 0;
    }
    int n = tok_size(t);
    FUZZ_CHECK(n > 0);
    static const char text[] = "<bos><start_of_turn>user\nHello, w\xc3\xb6rld \xe2\x96\x81 "
                               "<0x41>\t<end_of_turn>\n<start_of_turn>model\n";
    for (int special = 0; special < 2; special++) {
        int32_t *ids = NULL;
        int k = 0;
        lt_status st = special ? tok_encode_special(t, text, &ids, &k, err)
                               : tok_encode(t, text, &ids, &k, err);
        if (st != LT_OK) continue;
        for (int i = 0; i < k; i++)
            FUZZ_CHECK(ids[i] >= 0 && ids[i] < n);
        char *back = NULL;
        if (tok_decode(t, ids, k, &back, err) == LT_OK) free(back);
        free(ids);
    }
    int limit = n < 4096 ? n : 4096;
    for (int i = 0; i < limit; i++) {
        char buf[64];
        int b = tok_piece_bytes(t, i, buf, sizeof buf);
        FUZZ_CHECK(b >= 0 && b <= (int)sizeof buf);
        const char *piece = tok_piece(t, i);
        FUZZ_CHECK(piece != NULL);
        (void)tok_score(t, i);
        (void)tok_type(t, i);
        if (tok_type(t, i) == TOK_CONTROL && piece[0]) FUZZ_CHECK(tok_piece_to_id(t, piece) >= 0);
    }
    (void)tok_bos_id(t);
    (void)tok_eos_id(t);
    (void)tok_pad_id(t);
    (void)tok_unk_id(t);
    tok_free(t);
    return 0;
}
