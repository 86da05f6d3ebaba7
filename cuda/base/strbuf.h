/* strbuf.h — a growable byte string: append bytes, text or printf output, then take the
 * malloc'd, NUL-terminated result. Engine-private.
 *
 * An append that cannot get memory sets the buffer's oom flag and every later append does
 * nothing, so a builder appends freely and checks b.oom once at the end (the appends also
 * return -1 for callers that check each one). The bytes are always NUL-terminated once
 * anything was appended, so the buffer holds text or binary data alike. Owns only its own
 * allocation. Plain C, usable from C++.
 */
#ifndef LATHE_STRBUF_H
#define LATHE_STRBUF_H

#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lt_strbuf {
    char *p;         /* len bytes + a NUL; NULL until the first append or reserve */
    size_t len, cap; /* cap: bytes allocated, the NUL included */
    int oom;         /* 1 once an append failed for memory */
} lt_strbuf;

/* Makes room for `extra` more bytes (and the NUL). 0, or -1 (and oom set). */
int lt_strbuf_reserve(lt_strbuf *b, size_t extra);
/* Appends n bytes / a C string / printf output. 0, or -1 when out of memory (or oom was set). */
int lt_strbuf_put(lt_strbuf *b, const void *data, size_t n);
int lt_strbuf_puts(lt_strbuf *b, const char *s);
int lt_strbuf_printf(lt_strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends what is left of f. 0 at the end of the file; -1 on a read error; 1 when the buffer
 * would hold more than max bytes (the rest is not read); out of memory sets oom (and -1). */
int lt_strbuf_read(lt_strbuf *b, FILE *f, size_t max);
/* Drops the bytes after the first len (a mark taken before a group of appends). */
void lt_strbuf_truncate(lt_strbuf *b, size_t len);
/* The text so far ("" before the first append); valid until the next append. */
const char *lt_strbuf_str(const lt_strbuf *b);
/* Hands the string over (malloc'd, NUL-terminated; "" when nothing was appended; NULL only
 * when even that cannot be allocated) and leaves b empty. It does not look at oom: check it
 * first when a partial string is not wanted. */
char *lt_strbuf_take(lt_strbuf *b);
/* Frees the bytes and leaves b empty (oom cleared). */
void lt_strbuf_free(lt_strbuf *b);

#ifdef __cplusplus
}
#endif

#endif
