/* error.h — the engine's error convention: one message buffer, one setter, one check macro.
 * Engine-private.
 *
 * Every internal call that can fail takes `char *err` of LT_ERRLEN bytes and returns an
 * lt_status; on failure it writes a one-line message naming the file, key or tensor. lt_fail
 * writes that message and returns the status, so a failure reads `return lt_fail(err,
 * LT_ERR_ARG, "...")`; lt_fail_prefix puts context in front of a message a callee already
 * wrote ("%train save=: <the callee's message>"). LT_TRY is the one "call, and on failure jump
 * to done:" of the engine. Plain C, usable from C++ and CUDA sources. Knows nothing else.
 */
#ifndef LATHE_ERROR_H
#define LATHE_ERROR_H

#include "cuda/engine.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of every error buffer of the engine (messages longer than this are cut). */
#define LT_ERRLEN 1024

/* err = the formatted message (cut at LT_ERRLEN, never overflowing); returns st. err may be
 * NULL (then only st is returned). */
lt_status lt_fail(char *err, lt_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* err = "<the formatted prefix>: <err as it was>"; returns st. For a caller adding where or
 * what to a callee's message. err may be NULL. */
lt_status lt_fail_prefix(char *err, lt_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Evaluates x (an lt_status expression) into the caller's `rc`; on failure jumps to the
 * caller's `done:` label, which cleans up and returns rc. */
#define LT_TRY(x)                                                                                  \
    do {                                                                                           \
        rc = (x);                                                                                  \
        if (rc != LT_OK) goto done;                                                                \
    } while (0)

#ifdef __cplusplus
}
#endif

#endif
