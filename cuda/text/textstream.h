/* textstream.h — generated text as a stream of UTF-8 pieces that never split a character.
 * Engine-private.
 *
 * Tokens carry bytes (byte-fallback pieces may hold part of a character); textstream_add keeps
 * an unfinished character back until its last byte arrives; bytes that can never form valid
 * UTF-8 become U+FFFD, and textstream_finish turns a character that never finished into
 * U+FFFD. So every piece is valid UTF-8 (JSON-safe). Everything emitted is kept in `text`
 * (text.oom is set when it could not grow; the pieces stop then).
 */
#ifndef LATHE_TEXTSTREAM_H
#define LATHE_TEXTSTREAM_H

#include "cuda/base/strbuf.h"

typedef struct textstream {
    lt_strbuf text; /* everything emitted so far */
    char pend[64];  /* bytes of an unfinished character */
    int npend;
    void (*emit)(void *ctx, const char *piece); /* may be NULL */
    void *ctx;
} textstream;

void textstream_add(textstream *st, const char *bytes, int n);
void textstream_finish(textstream *st);

#endif
