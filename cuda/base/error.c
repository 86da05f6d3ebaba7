/* error.c — the error setters of error.h. Owns nothing; touches only the buffer it is given.
 */
#include "cuda/base/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

lt_status lt_fail(char *err, lt_status st, const char *fmt, ...) {
    if (!err) return st;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, LT_ERRLEN, fmt, ap);
    va_end(ap);
    return st;
}

/* Appends s to the message in err, cut at LT_ERRLEN. */
static void append(char *err, const char *s) {
    size_t n = strlen(err), k = strlen(s);
    if (k > LT_ERRLEN - 1 - n) k = LT_ERRLEN - 1 - n;
    memcpy(err + n, s, k);
    err[n + k] = 0;
}

lt_status lt_fail_prefix(char *err, lt_status st, const char *fmt, ...) {
    if (!err) return st;
    char was[LT_ERRLEN];
    size_t n = strnlen(err, LT_ERRLEN - 1);
    memcpy(was, err, n);
    was[n] = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, LT_ERRLEN, fmt, ap);
    va_end(ap);
    append(err, ": ");
    append(err, was);
    return st;
}
