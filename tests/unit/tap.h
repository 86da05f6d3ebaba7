/* tap.h — the smallest Test Anything Protocol helper for the C unit tests.
 *
 * Each check prints "ok N - name" or "not ok N - name" (with file:line and a detail line);
 * tap_done() prints the plan "1..N" and returns the exit status. automake's tap-driver
 * counts every line, so `make check` reports each check, not each program.
 */
#ifndef LATHE_TAP_H
#define LATHE_TAP_H

#include <math.h>
#include <stdio.h>
#include <string.h>

static int tap_count_ = 0;
static int tap_failed_ = 0;

static int tap_check_(int cond, const char *file, int line, const char *name) {
    ++tap_count_;
    if (cond) {
        printf("ok %d - %s\n", tap_count_, name);
    } else {
        ++tap_failed_;
        printf("not ok %d - %s\n# at %s:%d\n", tap_count_, name, file, line);
    }
    fflush(stdout);
    return cond;
}

/* ok(cond, "name"): one check. */
#define ok(cond, name) tap_check_(!!(cond), __FILE__, __LINE__, (name))
/* is_str(got, want, "name"): string equality, printing both on failure. */
#define is_str(got, want, name)                                                                    \
    do {                                                                                           \
        const char *g_ = (got), *w_ = (want);                                                      \
        if (!ok(g_ && w_ && strcmp(g_, w_) == 0, name))                                            \
            printf("#   got:  '%s'\n#   want: '%s'\n", g_ ? g_ : "(null)", w_ ? w_ : "(null)");    \
    } while (0)
/* is_int(got, want, "name") */
#define is_int(got, want, name)                                                                    \
    do {                                                                                           \
        long long g_ = (long long)(got), w_ = (long long)(want);                                   \
        if (!ok(g_ == w_, name)) printf("#   got:  %lld\n#   want: %lld\n", g_, w_);               \
    } while (0)
/* is_close(got, want, tol, "name"): |got - want| <= tol */
#define is_close(got, want, tol, name)                                                             \
    do {                                                                                           \
        double g_ = (got), w_ = (want);                                                            \
        if (!ok(fabs(g_ - w_) <= (tol), name))                                                     \
            printf("#   got:  %.9g\n#   want: %.9g (tol %g)\n", g_, w_, (double)(tol));            \
    } while (0)
#define diag(...) (printf("# "), printf(__VA_ARGS__), printf("\n"))

static int tap_done(void) {
    printf("1..%d\n", tap_count_);
    return tap_failed_ ? 1 : 0;
}

#endif
