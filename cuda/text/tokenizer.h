/* tokenizer.h — C API over SentencePiece (tokenizer.cc is the only C++ in the engine).
 *
 * Two ways to encode:
 *   tok_encode          plain SentencePiece, exactly SentencePieceProcessor.encode(text):
 *                       control pieces such as "<bos>" written in the text are ordinary text.
 *   tok_encode_special  what Hugging Face's tokenizer does with add_special_tokens=False: every
 *                       control / user-defined piece written literally in the text ("<bos>",
 *                       "<start_of_turn>", "<end_of_turn>", ...) becomes its id; the text
 *                       between them goes through SentencePiece.
 * Neither adds a BOS. Piece types use SentencePiece's (and GGUF's) numbering.
 * This file owns the tokenizer handle; it knows nothing of models.
 */
#ifndef LATHE_TOKENIZER_H
#define LATHE_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "cuda/engine.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lt_tokenizer lt_tokenizer;

typedef enum tok_piece_type {
    TOK_NORMAL = 1,
    TOK_UNKNOWN = 2,
    TOK_CONTROL = 3,
    TOK_USER_DEFINED = 4,
    TOK_UNUSED = 5,
    TOK_BYTE = 6,
} tok_piece_type;

/* Loads a SentencePiece model file (tokenizer.model). err: LT_ERRLEN bytes. */
lt_status tok_load(lt_tokenizer **out, const char *path, char *err);
void tok_free(lt_tokenizer *t);
/* The path it was loaded from. */
const char *tok_path(const lt_tokenizer *t);

/* Plain SentencePiece encode; *ids malloc'd (caller frees). */
lt_status tok_encode(const lt_tokenizer *t, const char *text, int32_t **ids, int *n, char *err);
/* Hugging Face style: literal special pieces become their ids (see above). */
lt_status tok_encode_special(const lt_tokenizer *t, const char *text, int32_t **ids, int *n,
                             char *err);
/* SentencePiece decode (control pieces produce no text); *text malloc'd. Ids outside the
 * vocabulary (e.g. the 64 extra embedding rows of 4B+) are skipped. */
lt_status tok_decode(const lt_tokenizer *t, const int32_t *ids, int n, char **text, char *err);

/* The raw bytes one token contributes to the output stream: "▁" -> " ", byte pieces
 * <0xNN> -> that byte, control/unknown-range ids -> nothing. Returns the byte count written
 * (at most cap; pieces are short); used for streaming text that never splits a UTF-8 char. */
int tok_piece_bytes(const lt_tokenizer *t, int32_t id, char *buf, int cap);

/* Id of a piece, or -1 when the piece is not in the vocabulary. */
int tok_piece_to_id(const lt_tokenizer *t, const char *piece);

/* For exporters (GGUF): vocabulary size, and per id the piece, its score and its type. */
int tok_size(const lt_tokenizer *t);
const char *tok_piece(const lt_tokenizer *t, int id); /* "" when out of range */
float tok_score(const lt_tokenizer *t, int id);
int tok_type(const lt_tokenizer *t, int id); /* a tok_piece_type; 0 when out of range */
/* Special ids as the model proto declares them (-1 when absent). */
int tok_bos_id(const lt_tokenizer *t);
int tok_eos_id(const lt_tokenizer *t);
int tok_pad_id(const lt_tokenizer *t);
int tok_unk_id(const lt_tokenizer *t);

#ifdef __cplusplus
}
#endif
#endif
