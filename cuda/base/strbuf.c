/* strbuf.c — the growable byte string of strbuf.h. Owns the buffer it grows; nothing else.
 */
#include "cuda/base/strbuf.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

int lt_strbuf_reserve(lt_strbuf *b, size_t extra) {
    if (b->oom) return -1;
    if (extra > (size_t)-1 - 1 - b->len) {
        b->oom = 1;
        return -1;
    }
    size_t need = b->len + extra + 1;
    if (need <= b->cap) return 0;
    size_t nc = b->cap ? b->cap : 256;
    while (nc < need)
        nc = nc > (size_t)-1 / 2 ? need : nc * 2;
    char *np = realloc(b->p, nc);
    if (!np) {
        b->oom = 1;
        return -1;
    }
    if (!b->p) np[0] = 0;
    b->p = np;
    b->cap = nc;
    return 0;
}

int lt_strbuf_put(lt_strbuf *b, const void *data, size_t n) {
    if (lt_strbuf_reserve(b, n) != 0) return -1;
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

int lt_strbuf_puts(lt_strbuf *b, const char *s) {
    return lt_strbuf_put(b, s, strlen(s));
}

int lt_strbuf_printf(lt_strbuf *b, const char *fmt, ...) {
    if (b->oom) return -1;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || lt_strbuf_reserve(b, (size_t)n) != 0) {
        b->oom = 1;
        return -1;
    }
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

int lt_strbuf_read(lt_strbuf *b, FILE *f, size_t max) {
    for (;;) {
        if (b->len > max) return 1;
        if (lt_strbuf_reserve(b, 1 << 16) != 0) return -1;
        size_t got = fread(b->p + b->len, 1, b->cap - b->len - 1, f);
        b->len += got;
        b->p[b->len] = 0;
        if (got == 0) break;
    }
    return ferror(f) ? -1 : 0;
}

void lt_strbuf_truncate(lt_strbuf *b, size_t len) {
    if (len >= b->len) return;
    b->len = len;
    b->p[len] = 0;
}

const char *lt_strbuf_str(const lt_strbuf *b) {
    return b->p ? b->p : "";
}

char *lt_strbuf_take(lt_strbuf *b) {
    char *s = b->p ? b->p : strdup("");
    *b = (lt_strbuf){0};
    return s;
}

void lt_strbuf_free(lt_strbuf *b) {
    free(b->p);
    *b = (lt_strbuf){0};
}
