/* rewards.c — GRPO's reward functions (rewards.h): the four built-ins of Unsloth's Gemma 3 GRPO
 * notebook and "exec:COMMAND", a program that scores completions over pipes.
 *
 * The built-ins reproduce the notebook's Python exactly, regexes included, with the markers taken
 * as literal text (no regex metacharacters):
 *   match_format  = ^[\s]{0,}R_START.+?R_END.*?S_START(.+?)S_END[\s]{0,}$  (MULTILINE, DOTALL)
 *   match_numbers = S_START.*?([\d\.]{1,})                                  (MULTILINE, DOTALL)
 * MULTILINE means `^` matches at the start of any line and `$` before any "\n", so text on lines
 * before the reasoning start or after the solution end still matches, as it does in Python. The
 * search is written out by hand rather than with regex.h: POSIX has no lazy quantifiers, and
 * group 1 is the text Python's backtracking finds (the first reasoning end after the start, the
 * first solution start after that, the first solution end followed by whitespace to the end of a
 * line). \s and str.strip() are Python's Unicode whitespace; float() is Python's float() (signs,
 * "_" between digits, inf/infinity/nan in any case, surrounding whitespace). Digits are ASCII only:
 * where Python's \d and float() also take other Unicode decimal digits ("٤٢"), this file does not.
 * A row's "answer" given as a JSON number is compared as the text Python's str() prints (42, 3.5,
 * 1e+16).
 *
 * exec: the program runs under /bin/sh -c in its own process group, stdin and stdout on pipes,
 * stderr on a third pipe of which the last lines are kept to quote in error messages (nothing of
 * it reaches the kernel's own stderr). PYTHONUNBUFFERED=1 is added to its environment unless set,
 * so a Python program's print() arrives line by line; other programs must flush each line (and
 * read line by line: mawk needs -W interactive). The payload is written and the answers read in
 * one poll() loop, so a program may answer as it reads or read everything first; SIGPIPE is
 * blocked in the calling thread around each write (and a SIGPIPE that write raised is taken
 * back), so process-wide signal handling is untouched.
 *
 * Owns the reward_set, its programs and their pipes; touches nothing of the model or session.
 */
#define _GNU_SOURCE /* pipe2, environ, posix_spawn_file_actions_addchdir_np */

#include "cuda/train/rewards.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cuda/base/strbuf.h"

#define QUOTE_MAX 200          /* bytes of a program's line quoted in a message */
#define LINE_MAX_BYTES 1048576 /* a reward line longer than this is refused */
#define ERRTAIL 4096           /* bytes of a program's stderr kept */
#define NOT_FOUND SIZE_MAX

static const char *const default_markers[4] = {"<start_working_out>", "<end_working_out>",
                                               "<SOLUTION>", "</SOLUTION>"};
enum { R_START, R_END, S_START, S_END };

typedef enum { RW_FORMAT, RW_FORMAT_APPROX, RW_ANSWER, RW_NUMBER, RW_EXEC } reward_kind;

static const char *const builtin_names[] = {"format", "format_approx", "answer", "number"};
#define N_BUILTINS 4

typedef struct reward_prog {
    pid_t pid;                 /* 0 once reaped */
    int in_fd, out_fd, err_fd; /* our ends of its stdin, stdout, stderr; -1 once closed */
    lt_strbuf out;             /* stdout read but not yet taken as lines, from out_off */
    size_t out_off;
    char errtail[ERRTAIL]; /* the last bytes of its stderr */
    size_t errlen;
    char failed[LT_ERRLEN]; /* the message of the failure that stopped it; "" while it runs */
} reward_prog;

typedef struct reward_fn {
    reward_kind kind;
    char *name; /* "format", ..., "exec:COMMAND" */
    double weight;
    reward_prog *prog; /* exec only */
} reward_fn;

struct reward_set {
    reward_fn *fn;
    int n;
    char *marker[4];
    size_t marker_len[4];
    double timeout_s;
};

/* ---- text: literal search, Python's whitespace, strip and float() ------------------------- */

/* The first occurrence of needle in s[from, n), or NOT_FOUND. */
static size_t find(const char *s, size_t n, size_t from, const char *needle, size_t nl) {
    if (nl == 0 || from > n || n - from < nl) return NOT_FOUND;
    for (size_t i = from; i + nl <= n; i++)
        if (s[i] == needle[0] && memcmp(s + i, needle, nl) == 0) return i;
    return NOT_FOUND;
}

/* Python's str.count: non-overlapping occurrences. */
static int count_of(const char *s, size_t n, const char *needle, size_t nl) {
    int c = 0;
    for (size_t i = find(s, n, 0, needle, nl); i != NOT_FOUND; i = find(s, n, i + nl, needle, nl))
        c++;
    return c;
}

/* Bytes of the whitespace character starting at s[i] (Python's str.isspace: U+0009-000D,
 * U+001C-0020, U+0085, U+00A0, U+1680, U+2000-200A, U+2028, U+2029, U+202F, U+205F, U+3000),
 * or 0. */
static size_t space_at(const char *s, size_t n, size_t i) {
    const unsigned char *u = (const unsigned char *)s + i;
    size_t left = n - i;
    if (i >= n) return 0;
    if ((u[0] >= 0x09 && u[0] <= 0x0d) || (u[0] >= 0x1c && u[0] <= 0x20)) return 1;
    if (left >= 2 && u[0] == 0xc2 && (u[1] == 0x85 || u[1] == 0xa0)) return 2;
    if (left >= 3) {
        if (u[0] == 0xe1 && u[1] == 0x9a && u[2] == 0x80) return 3;
        if (u[0] == 0xe2 && u[1] == 0x80 &&
            ((u[2] >= 0x80 && u[2] <= 0x8a) || u[2] == 0xa8 || u[2] == 0xa9 || u[2] == 0xaf))
            return 3; /* U+2000-200A, U+2028, U+2029, U+202F */
        if (u[0] == 0xe2 && u[1] == 0x81 && u[2] == 0x9f) return 3;
        if (u[0] == 0xe3 && u[1] == 0x80 && u[2] == 0x80) return 3;
    }
    return 0;
}

/* Bytes of the whitespace character ending at s[end] (exclusive) and starting at or after
 * start, or 0. */
static size_t space_before(const char *s, size_t start, size_t end) {
    for (size_t k = 1; k <= 3 && k <= end - start; k++)
        if (space_at(s, end, end - k) == k) return k;
    return 0;
}

/* Python's str.strip(): narrows [*a, *b) of s. */
static void py_strip(const char *s, size_t *a, size_t *b) {
    size_t k;
    while (*a < *b && (k = space_at(s, *b, *a)) > 0)
        *a += k;
    while (*b > *a && (k = space_before(s, *a, *b)) > 0)
        *b -= k;
}

static int is_digit(char c) {
    return c >= '0' && c <= '9';
}

/* Python's digitpart, digit (["_"] digit)*, from s[*i] (before end), copied to buf without the
 * underscores. Returns the digits taken. */
static int digitpart(const char *s, size_t *i, size_t end, char *buf, size_t *k) {
    int d = 0;
    while (*i < end) {
        if (is_digit(s[*i])) {
            buf[(*k)++] = s[(*i)++];
            d++;
        } else if (d > 0 && s[*i] == '_' && *i + 1 < end && is_digit(s[*i + 1])) {
            (*i)++;
        } else {
            break;
        }
    }
    return d;
}

/* Python's float() on s[0, n): 0 and *out, or -1 where Python raises ValueError (or memory). */
static int py_float(const char *s, size_t n, double *out) {
    size_t a = 0, b = n;
    py_strip(s, &a, &b);
    size_t i = a;
    int neg = 0;
    if (i < b && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
    size_t rest = b - i;
    if ((rest == 3 && strncasecmp(s + i, "inf", 3) == 0) ||
        (rest == 8 && strncasecmp(s + i, "infinity", 8) == 0)) {
        *out = neg ? -INFINITY : INFINITY;
        return 0;
    }
    if (rest == 3 && strncasecmp(s + i, "nan", 3) == 0) {
        *out = NAN;
        return 0;
    }
    char *buf = malloc(rest + 2);
    if (!buf) return -1;
    size_t k = 0;
    if (neg) buf[k++] = '-';
    int d = digitpart(s, &i, b, buf, &k);
    if (i < b && s[i] == '.') {
        buf[k++] = s[i++];
        d += digitpart(s, &i, b, buf, &k);
    }
    int okay = d > 0;
    if (okay && i < b && (s[i] == 'e' || s[i] == 'E')) {
        buf[k++] = s[i++];
        if (i < b && (s[i] == '+' || s[i] == '-')) buf[k++] = s[i++];
        okay = digitpart(s, &i, b, buf, &k) > 0;
    }
    buf[k] = 0;
    if (okay && i == b) *out = strtod(buf, NULL); /* overflow gives inf, as in Python */
    free(buf);
    return okay && i == b ? 0 : -1;
}

/* Python's str(float): the shortest text that reads back, fixed notation for exponents -4..15
 * (always with a ".": 42.0), else d.ddde+XX (1e+16, 1.5e-05). */
static void py_float_text(double v, char *out, size_t cap) {
    char e[40];
    for (int p = 1; p <= 17; p++) {
        snprintf(e, sizeof e, "%.*e", p - 1, v);
        if (strtod(e, NULL) == v) break;
    }
    char digits[24];
    size_t nd = 0;
    const char *c = e;
    int neg = *c == '-';
    if (neg) c++;
    for (; *c && *c != 'e'; c++)
        if (is_digit(*c) && nd < sizeof digits - 1) digits[nd++] = *c;
    digits[nd] = 0;
    int x = *c == 'e' ? atoi(c + 1) : 0;
    lt_strbuf b = {0};
    if (neg) lt_strbuf_puts(&b, "-");
    if (x < -4 || x >= 16) {
        lt_strbuf_put(&b, digits, 1);
        if (nd > 1) lt_strbuf_printf(&b, ".%s", digits + 1);
        lt_strbuf_printf(&b, "e%c%02d", x < 0 ? '-' : '+', x < 0 ? -x : x);
    } else if (x < 0) {
        lt_strbuf_puts(&b, "0.");
        for (int i = 0; i < -x - 1; i++)
            lt_strbuf_puts(&b, "0");
        lt_strbuf_puts(&b, digits);
    } else {
        for (int i = 0; i <= x; i++)
            lt_strbuf_put(&b, (size_t)i < nd ? digits + i : "0", 1);
        lt_strbuf_printf(&b, ".%s", (size_t)x + 1 < nd ? digits + x + 1 : "0");
    }
    snprintf(out, cap, "%s", b.oom ? "" : lt_strbuf_str(&b));
    lt_strbuf_free(&b);
}

/* ---- the built-ins ------------------------------------------------------------------------ */

/* Whether `[\s]{0,}$` (MULTILINE) matches at s[q]: the whitespace from q reaches the end or a
 * "\n". */
static int tail_ok(const char *s, size_t n, size_t q) {
    for (;;) {
        if (q == n || s[q] == '\n') return 1;
        size_t k = space_at(s, n, q);
        if (k == 0) return 0;
        q += k;
    }
}

/* match_format.search(s); on a match, group 1 is s[*g0, *g1). */
static int format_search(const reward_set *rs, const char *s, size_t n, size_t *g0, size_t *g1) {
    char *const *m = rs->marker;
    const size_t *ml = rs->marker_len;
    for (size_t a = 0; a <= n;) {
        size_t run = a, k; /* `[\s]{0,}` is greedy: the longest run first, then shorter */
        while ((k = space_at(s, n, run)) > 0)
            run += k;
        for (size_t p = run;;) {
            if (n - p >= ml[R_START] && memcmp(s + p, m[R_START], ml[R_START]) == 0) {
                /* Each lazy part takes the first occurrence that leaves a match possible; an
                 * earlier occurrence never leaves fewer choices, so the first one is the one. */
                size_t re = find(s, n, p + ml[R_START] + 1, m[R_END], ml[R_END]); /* .+? */
                size_t ss = re == NOT_FOUND ? NOT_FOUND
                                            : find(s, n, re + ml[R_END], m[S_START], ml[S_START]);
                size_t from = ss == NOT_FOUND ? NOT_FOUND : ss + ml[S_START] + 1; /* (.+?) */
                for (size_t se; from != NOT_FOUND; from = se + 1) {
                    se = find(s, n, from, m[S_END], ml[S_END]);
                    if (se == NOT_FOUND) break;
                    if (tail_ok(s, n, se + ml[S_END])) {
                        *g0 = ss + ml[S_START];
                        *g1 = se;
                        return 1;
                    }
                }
            }
            size_t back = p > a ? space_before(s, a, p) : 0;
            if (back == 0) break;
            p -= back;
        }
        size_t nl = find(s, n, a, "\n", 1); /* `^` again after the next newline */
        if (nl == NOT_FOUND) break;
        a = nl + 1;
    }
    return 0;
}

static double score_format(const reward_set *rs, const char *c, size_t n) {
    size_t g0, g1;
    return format_search(rs, c, n, &g0, &g1) ? 3.0 : 0.0;
}

static double score_format_approx(const reward_set *rs, const char *c, size_t n) {
    double s = 0;
    for (int i = 0; i < 4; i++)
        s += count_of(c, n, rs->marker[i], rs->marker_len[i]) == 1 ? 0.5 : -1.0;
    return s;
}

static double score_answer(const reward_set *rs, const char *c, size_t n, const char *ans,
                           size_t an) {
    size_t g0, g1;
    if (!format_search(rs, c, n, &g0, &g1)) return 0;
    if (g1 - g0 == an && memcmp(c + g0, ans, an) == 0) return 3.0;
    size_t a0 = 0, a1 = an;
    py_strip(c, &g0, &g1);
    py_strip(ans, &a0, &a1);
    if (g1 - g0 == a1 - a0 && memcmp(c + g0, ans + a0, a1 - a0) == 0) return 1.5;
    double guess, truth;
    if (py_float(c + g0, g1 - g0, &guess) || py_float(ans, an, &truth)) return -0.5;
    if (truth == 0) return -0.5; /* Python's ZeroDivisionError, caught by the same except */
    double ratio = guess / truth;
    if (ratio >= 0.9 && ratio <= 1.1) return 0.5;
    if (ratio >= 0.8 && ratio <= 1.2) return 0.25;
    return -1.0;
}

static double score_number(const reward_set *rs, const char *c, size_t n, const char *ans,
                           size_t an) {
    size_t p = find(c, n, 0, rs->marker[S_START], rs->marker_len[S_START]);
    if (p == NOT_FOUND) return 0;
    size_t i = p + rs->marker_len[S_START];
    while (i < n && !is_digit(c[i]) && c[i] != '.')
        i++;
    size_t j = i;
    while (j < n && (is_digit(c[j]) || c[j] == '.'))
        j++;
    double guess, truth;
    if (j == i || py_float(ans, an, &truth) || py_float(c + i, j - i, &guess)) return 0;
    return guess == truth ? 1.5 : 0.0;
}

/* ---- exec: the program ------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* `"text"`, cut at QUOTE_MAX bytes (on a character boundary, "..." added), control characters
 * shown as '?'. */
static void quote(const char *s, size_t n, char *out, size_t cap) {
    size_t cut = n;
    if (cut > QUOTE_MAX) {
        cut = QUOTE_MAX;
        while (cut > 0 && ((unsigned char)s[cut] & 0xc0) == 0x80)
            cut--;
    }
    size_t k = 0;
    if (cap < 8) return;
    out[k++] = '"';
    for (size_t i = 0; i < cut && k + 5 < cap; i++)
        out[k++] = (unsigned char)s[i] < 0x20 || s[i] == 0x7f ? '?' : s[i];
    if (cut < n && k + 5 < cap) {
        memcpy(out + k, "...", 3);
        k += 3;
    }
    out[k++] = '"';
    out[k] = 0;
}

/* "; its last stderr line: \"...\"", or "" when it wrote none. */
static void stderr_note(const reward_prog *p, char *out, size_t cap) {
    size_t b = p->errlen;
    while (b > 0 && (p->errtail[b - 1] == '\n' || p->errtail[b - 1] == '\r' ||
                     p->errtail[b - 1] == ' ' || p->errtail[b - 1] == '\t'))
        b--;
    size_t a = b;
    while (a > 0 && p->errtail[a - 1] != '\n')
        a--;
    out[0] = 0;
    if (a == b) return;
    char q[QUOTE_MAX + 16];
    quote(p->errtail + a, b - a, q, sizeof q);
    snprintf(out, cap, "; its last stderr line: %s", q);
}

static void status_text(int st, char *out, size_t cap) {
    if (WIFEXITED(st)) {
        int c = WEXITSTATUS(st);
        snprintf(out, cap, "exited with status %d%s", c,
                 c == 127   ? " (the shell could not find the command)"
                 : c == 126 ? " (the command could not be run)"
                            : "");
    } else if (WIFSIGNALED(st)) {
        snprintf(out, cap, "was killed by signal %d (%s)", WTERMSIG(st), strsignal(WTERMSIG(st)));
    } else {
        snprintf(out, cap, "stopped with wait status %d", st);
    }
}

/* Kills the program's process group if it still runs, reaps it, closes the pipes. */
static void prog_kill(reward_prog *p) {
    close_fd(&p->in_fd);
    close_fd(&p->out_fd);
    close_fd(&p->err_fd);
    if (p->pid > 0) {
        kill(-p->pid, SIGKILL);
        while (waitpid(p->pid, NULL, 0) < 0 && errno == EINTR) {
        }
        p->pid = 0;
    }
}

/* Records the failure (the program stops for good) and returns it. */
static lt_status prog_fail(reward_prog *p, lt_status st, char *err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static lt_status prog_fail(reward_prog *p, lt_status st, char *err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->failed, sizeof p->failed, fmt, ap);
    va_end(ap);
    prog_kill(p);
    return lt_fail(err, st, "%s", p->failed);
}

/* Reads what stderr has (non-blocking) into the tail; closes it at the end of the file. */
static void read_stderr(reward_prog *p) {
    while (p->err_fd >= 0) {
        char buf[ERRTAIL];
        ssize_t r = read(p->err_fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return; /* EAGAIN: nothing more now */
        if (r == 0) {
            close_fd(&p->err_fd);
            return;
        }
        size_t k = (size_t)r; /* <= ERRTAIL */
        if (p->errlen + k > ERRTAIL) {
            size_t drop = p->errlen + k - ERRTAIL;
            memmove(p->errtail, p->errtail + drop, p->errlen - drop);
            p->errlen -= drop;
        }
        memcpy(p->errtail + p->errlen, buf, k);
        p->errlen += k;
    }
}

/* Reads what stdout has (non-blocking); closes it at the end of the file. 0, or -1 (memory). */
static int read_stdout(reward_prog *p) {
    while (p->out_fd >= 0) {
        if (lt_strbuf_reserve(&p->out, 65536)) return -1;
        ssize_t r = read(p->out_fd, p->out.p + p->out.len, 65536);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return 0;
        if (r == 0) {
            close_fd(&p->out_fd);
            return 0;
        }
        p->out.len += (size_t)r;
        p->out.p[p->out.len] = 0;
        if ((size_t)r < 65536) return 0;
    }
    return 0;
}

/* write() with SIGPIPE blocked in this thread; a SIGPIPE the write raised is taken back (one
 * already pending before is left alone). */
static ssize_t write_nosigpipe(int fd, const void *data, size_t n) {
    sigset_t pipe_set, old, pending;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    sigpending(&pending);
    int was_pending = sigismember(&pending, SIGPIPE);
    ssize_t w = write(fd, data, n);
    int e = errno;
    if (w < 0 && e == EPIPE && !was_pending) {
        struct timespec zero = {0, 0};
        while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR) {
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    errno = e;
    return w;
}

/* The environment with PYTHONUNBUFFERED=1 added (unless set): a malloc'd array of borrowed
 * strings, or NULL. */
static char **child_environment(void) {
    static char unbuffered[] = "PYTHONUNBUFFERED=1";
    size_t n = 0;
    int has = 0;
    for (; environ && environ[n]; n++)
        if (strncmp(environ[n], "PYTHONUNBUFFERED=", 17) == 0) has = 1;
    char **env = malloc(sizeof(char *) * (n + 2));
    if (!env) return NULL;
    memcpy(env, environ, sizeof(char *) * n);
    if (!has) env[n++] = unbuffered;
    env[n] = NULL;
    return env;
}

static lt_status prog_start(reward_prog *p, const char *name, const char *cmd, const char *cwd,
                            char *err) {
    p->in_fd = p->out_fd = p->err_fd = -1;
    struct stat st;
    if (cwd && (stat(cwd, &st) != 0 || !S_ISDIR(st.st_mode)))
        return lt_fail(err, LT_ERR_ARG, "reward %s: the working directory %s is not a folder", name,
                       cwd);
    int in[2] = {-1, -1}, out[2] = {-1, -1}, errp[2] = {-1, -1};
    if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(errp, O_CLOEXEC)) {
        int e = errno;
        for (int i = 0; i < 2; i++) {
            close_fd(&in[i]);
            close_fd(&out[i]);
            close_fd(&errp[i]);
        }
        return lt_fail(err, LT_ERR_ARG, "reward %s: cannot create a pipe: %s", name, strerror(e));
    }
    /* posix_spawn (a vfork-style clone in glibc) rather than fork: no copy of the page tables
     * of a process that maps a whole model, nothing to keep async-signal-safe */
    char **envp = child_environment();
    char sh[] = "sh", dash_c[] = "-c";
    char *argv[] = {sh, dash_c, (char *)cmd, NULL};
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_init(&at);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0); /* the pipes' own fds close at exec */
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, errp[1], 2);
    if (cwd) posix_spawn_file_actions_addchdir_np(&fa, cwd);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK |
                                      POSIX_SPAWN_SETSIGDEF);
    posix_spawnattr_setpgroup(&at, 0);        /* its own group, killed as one */
    posix_spawnattr_setsigmask(&at, &none);   /* nothing blocked ... */
    posix_spawnattr_setsigdefault(&at, &all); /* ... nothing ignored (SIGPIPE, SIGINT) */
    pid_t pid = -1;
    int e = envp ? posix_spawn(&pid, "/bin/sh", &fa, &at, argv, envp) : ENOMEM;
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    free(envp);
    close_fd(&in[0]);
    close_fd(&out[1]);
    close_fd(&errp[1]);
    if (e != 0) {
        close_fd(&in[1]);
        close_fd(&out[0]);
        close_fd(&errp[0]);
        return lt_fail(err, LT_ERR_ARG, "reward %s: cannot start /bin/sh%s%s: %s", name,
                       cwd ? " in " : "", cwd ? cwd : "", strerror(e));
    }
    p->pid = pid;
    p->in_fd = in[1];
    p->out_fd = out[0];
    p->err_fd = errp[0];
    fcntl(p->in_fd, F_SETFL, fcntl(p->in_fd, F_GETFL) | O_NONBLOCK);
    fcntl(p->out_fd, F_SETFL, fcntl(p->out_fd, F_GETFL) | O_NONBLOCK);
    fcntl(p->err_fd, F_SETFL, fcntl(p->err_fd, F_GETFL) | O_NONBLOCK);
    return LT_OK;
}

/* Closes stdin and the other pipes, gives the program ~1 s to exit, then kills it; reaps it. */
static void prog_stop(reward_prog *p) {
    close_fd(&p->in_fd);
    close_fd(&p->out_fd);
    close_fd(&p->err_fd);
    double until = now_s() + 1.0;
    while (p->pid > 0) {
        pid_t w = waitpid(p->pid, NULL, WNOHANG);
        if (w == p->pid || (w < 0 && errno != EINTR))
            p->pid = 0;
        else if (now_s() > until)
            prog_kill(p);
        else
            poll(NULL, 0, 5);
    }
    lt_strbuf_free(&p->out);
}

/* The next line of the program's stdout (a final one without "\n" once stdout ended): 1 with
 * *v (NaN for null), 0 when no whole line is there yet, -1 for a line that is not a number (its
 * text in *bad, *badn). */
static int take_line(reward_prog *p, double *v, const char **bad, size_t *badn) {
    const char *s = p->out.p ? p->out.p + p->out_off : "";
    size_t left = p->out.len - p->out_off;
    const char *nl = memchr(s, '\n', left);
    if (!nl && (p->out_fd >= 0 || left == 0)) return 0;
    size_t len = nl ? (size_t)(nl - s) : left;
    p->out_off += nl ? len + 1 : len;
    size_t a = 0, b = len;
    while (a < b && (s[a] == ' ' || s[a] == '\t' || s[a] == '\r'))
        a++;
    while (b > a && (s[b - 1] == ' ' || s[b - 1] == '\t' || s[b - 1] == '\r'))
        b--;
    *bad = s;
    *badn = len;
    if (b - a == 4 && memcmp(s + a, "null", 4) == 0) {
        *v = NAN;
        return 1;
    }
    if (b == a || memchr(s + a, 0, b - a)) return -1;
    char tmp[64], *end;
    if (b - a >= sizeof tmp) return -1; /* no number needs 64 characters */
    memcpy(tmp, s + a, b - a);
    tmp[b - a] = 0;
    *v = strtod(tmp, &end);
    return *end == 0 && isfinite(*v) ? 1 : -1;
}

/* The program closed its stdout after `got` of n lines: waits (until the deadline) for it to
 * exit and says how it ended. */
static lt_status prog_ended(reward_prog *p, const char *name, int got, int n, double deadline,
                            char *err) {
    int st = 0;
    pid_t w = 0;
    while (p->pid > 0) {
        w = waitpid(p->pid, &st, WNOHANG);
        if (w != 0 && !(w < 0 && errno == EINTR)) break;
        double left = deadline - now_s();
        if (left <= 0) break;
        int ms = left > 0.01 ? 10 : 1;
        if (p->err_fd >= 0) {
            struct pollfd f = {p->err_fd, POLLIN, 0};
            if (poll(&f, 1, ms) > 0) read_stderr(p);
        } else {
            poll(NULL, 0, ms);
        }
    }
    char how[160], note[QUOTE_MAX + 64];
    if (w == p->pid && p->pid > 0) {
        p->pid = 0;
        read_stderr(p);
        status_text(st, how, sizeof how);
    } else if (w < 0) { /* reaped elsewhere (SIGCHLD ignored, say) */
        snprintf(how, sizeof how, "ended (its exit status is gone: %s)", strerror(errno));
        p->pid = 0;
        read_stderr(p);
    } else {
        snprintf(how, sizeof how, "closed its output and did not exit");
    }
    stderr_note(p, note, sizeof note);
    return prog_fail(p, LT_ERR_ARG, err,
                     "reward %s: the program %s after answering %d of %d completions (it must "
                     "print one line per completion)%s",
                     name, how, got, n, note);
}

/* Writes the n JSON lines of payload and reads n answers into scores[0, n). */
static lt_status prog_score(reward_prog *p, const char *name, const char *payload, size_t plen,
                            int n, double *scores, double timeout_s, char *err) {
    if (p->failed[0]) return lt_fail(err, LT_ERR_ARG, "%s", p->failed);
    double deadline = now_s() + timeout_s;
    size_t woff = 0;
    int got = 0;
    for (;;) {
        while (got < n) {
            const char *bad;
            size_t badn;
            int r = take_line(p, &scores[got], &bad, &badn);
            if (r == 0) break;
            if (r < 0) {
                char q[QUOTE_MAX + 16];
                quote(bad, badn, q, sizeof q);
                return prog_fail(p, LT_ERR_ARG, err,
                                 "reward %s: answer %d of %d is not a number or null: %s", name,
                                 got + 1, n, q);
            }
            got++;
        }
        if (p->out_off > 0) { /* keep only what is not taken yet */
            memmove(p->out.p, p->out.p + p->out_off, p->out.len - p->out_off + 1);
            p->out.len -= p->out_off;
            p->out_off = 0;
        }
        if (got == n) return LT_OK;
        if (p->out_fd < 0) return prog_ended(p, name, got, n, deadline, err);
        if (p->out.len - p->out_off > LINE_MAX_BYTES)
            return prog_fail(p, LT_ERR_ARG, err,
                             "reward %s: answer %d of %d is a line longer than %d bytes", name,
                             got + 1, n, LINE_MAX_BYTES);
        double left = deadline - now_s();
        if (left <= 0) {
            char note[QUOTE_MAX + 64];
            stderr_note(p, note, sizeof note);
            return prog_fail(p, LT_ERR_ARG, err,
                             "reward %s: no answer within %g s (%d of %d lines came%s; a program "
                             "must print one line per completion and flush it)%s",
                             name, timeout_s, got, n,
                             woff < plen ? ", and it had not read all its input" : "", note);
        }
        struct pollfd fds[3] = {{p->out_fd, POLLIN, 0}, {p->err_fd, POLLIN, 0}, {-1, POLLOUT, 0}};
        if (woff < plen) fds[2].fd = p->in_fd; /* poll ignores the negative fds */
        int ms = left > 3600 ? 3600000 : (int)ceil(left * 1000);
        if (poll(fds, 3, ms) < 0) {
            if (errno == EINTR) continue;
            return prog_fail(p, LT_ERR_IO, err, "reward %s: poll: %s", name, strerror(errno));
        }
        if (fds[2].revents) {
            ssize_t w = write_nosigpipe(p->in_fd, payload + woff, plen - woff);
            if (w > 0)
                woff += (size_t)w;
            else if (w < 0 && errno == EPIPE)
                close_fd(&p->in_fd); /* it stopped reading */
            else if (w < 0 && errno != EAGAIN && errno != EINTR)
                return prog_fail(p, LT_ERR_IO, err, "reward %s: writing to the program: %s", name,
                                 strerror(errno));
        }
        if (fds[0].revents && read_stdout(p))
            return prog_fail(p, LT_ERR_MEMORY, err, "reward %s: out of memory", name);
        if (fds[1].revents) read_stderr(p);
    }
}

/* ---- one item's data ---------------------------------------------------------------------- */

/* A JSON string of s (NULL = ""), invalid UTF-8 replaced by U+FFFD as Python's
 * errors="replace" does, so the program can always decode its input. */
static json_t *json_text(const char *s) {
    if (!s) s = "";
    json_t *j = json_string(s);
    if (j) return j;
    lt_strbuf b = {0};
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; u[i];) {
        size_t k = u[i] < 0x80                             ? 1
                   : (u[i] & 0xe0) == 0xc0 && u[i] >= 0xc2 ? 2
                   : (u[i] & 0xf0) == 0xe0                 ? 3
                   : (u[i] & 0xf8) == 0xf0 && u[i] <= 0xf4 ? 4
                                                           : 0;
        for (size_t c = 1; c < k; c++)
            if ((u[i + c] & 0xc0) != 0x80) k = 0;
        if (k > 1) { /* no overlongs, surrogates or code points past U+10FFFF */
            unsigned cp = u[i] & (0x7f >> k);
            for (size_t c = 1; c < k; c++)
                cp = (cp << 6) | (u[i + c] & 0x3f);
            if ((k == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
                (k == 4 && (cp < 0x10000 || cp > 0x10ffff)))
                k = 0;
        }
        if (k == 0) {
            lt_strbuf_puts(&b, "\xef\xbf\xbd");
            i++;
        } else {
            lt_strbuf_put(&b, u + i, k);
            i += k;
        }
    }
    j = b.oom ? NULL : json_string(lt_strbuf_str(&b));
    lt_strbuf_free(&b);
    return j;
}

/* One line per item: {"prompt", "completion", then the row's other fields}. */
static lt_status build_payload(const reward_item *items, json_t *const *rows, int n, lt_strbuf *out,
                               char *err) {
    for (int i = 0; i < n; i++) {
        json_t *o = json_object();
        int bad = !o || json_object_set_new(o, "prompt", json_text(items[i].prompt)) ||
                  json_object_set_new(o, "completion", json_text(items[i].completion));
        const char *key;
        json_t *val;
        if (!bad && rows[i]) {
            json_object_foreach(rows[i], key, val) {
                if (strcmp(key, "prompt") != 0 && strcmp(key, "completion") != 0)
                    bad |= json_object_set(o, key, val);
            }
        }
        char *line = bad ? NULL : json_dumps(o, JSON_COMPACT);
        json_decref(o);
        if (!line) return lt_fail(err, LT_ERR_MEMORY, "reward: out of memory");
        lt_strbuf_puts(out, line);
        lt_strbuf_puts(out, "\n");
        free(line);
    }
    return out->oom ? lt_fail(err, LT_ERR_MEMORY, "reward: out of memory") : LT_OK;
}

/* The text of a row's "answer": a string as it is, a number as Python's str() prints it. */
typedef struct answer_text {
    const char *p;
    size_t n;
    char num[40];
} answer_text;

static lt_status answer_of(json_t *row, int i, const char *who, answer_text *a, char *err) {
    json_t *v = row ? json_object_get(row, "answer") : NULL;
    if (!v)
        return lt_fail(err, LT_ERR_ARG,
                       "reward %s: completion %d's data row has no \"answer\" field (the rewards "
                       "answer and number compare against it; add it to every row, or leave "
                       "those rewards out)",
                       who, i + 1);
    if (json_is_string(v)) {
        a->p = json_string_value(v);
        a->n = json_string_length(v);
        return LT_OK;
    }
    if (json_is_integer(v))
        snprintf(a->num, sizeof a->num, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    else if (json_is_real(v))
        py_float_text(json_real_value(v), a->num, sizeof a->num);
    else
        return lt_fail(err, LT_ERR_ARG,
                       "reward %s: completion %d's \"answer\" is neither a string nor a number",
                       who, i + 1);
    a->p = a->num;
    a->n = strlen(a->num);
    return LT_OK;
}

/* ---- options ------------------------------------------------------------------------------ */

static void trim(const char **a, const char **b) {
    while (*a < *b && (**a == ' ' || **a == '\t' || **a == '\n' || **a == '\r'))
        (*a)++;
    while (*b > *a && ((*b)[-1] == ' ' || (*b)[-1] == '\t' || (*b)[-1] == '\n' || (*b)[-1] == '\r'))
        (*b)--;
}

/* "format-approx" or "Format" for "format_approx" / "format": a hint, or "". */
static const char *near_builtin(const char *a, size_t n) {
    for (int k = 0; k < N_BUILTINS; k++) {
        const char *b = builtin_names[k];
        if (strlen(b) != n) continue;
        size_t i = 0;
        while (i < n && (a[i] == '-' ? '_' : a[i] >= 'A' && a[i] <= 'Z' ? a[i] + 32 : a[i]) == b[i])
            i++;
        if (i == n) return b;
    }
    return NULL;
}

static lt_status add_fn(reward_set *rs, reward_kind kind, const char *name, size_t len, char *err) {
    reward_fn *g = realloc(rs->fn, sizeof *g * (size_t)(rs->n + 1));
    if (!g) return lt_fail(err, LT_ERR_MEMORY, "reward=: out of memory");
    rs->fn = g;
    reward_fn *f = &rs->fn[rs->n];
    memset(f, 0, sizeof *f);
    f->kind = kind;
    f->weight = 1.0;
    f->name = strndup(name, len);
    if (!f->name) return lt_fail(err, LT_ERR_MEMORY, "reward=: out of memory");
    rs->n++;
    return LT_OK;
}

static lt_status parse_spec(reward_set *rs, const char *spec, char *err) {
    static const char accepted[] = "format, format_approx, answer, number, or exec:COMMAND (a "
                                   "program that prints one score a line; it comes last)";
    const char *s = spec ? spec : "";
    for (;;) {
        const char *a = s, *b = s + strlen(s);
        trim(&a, &b);
        if (b - a >= 5 && strncmp(a, "exec:", 5) == 0) {
            const char *c = a + 5;
            trim(&c, &b);
            if (c == b)
                return lt_fail(err, LT_ERR_ARG,
                               "reward=exec: needs a command after the colon, e.g. "
                               "exec:python3 reward.py");
            lt_strbuf name = {0};
            lt_strbuf_puts(&name, "exec:");
            lt_strbuf_put(&name, c, (size_t)(b - c));
            lt_status rc = name.oom ? lt_fail(err, LT_ERR_MEMORY, "reward=: out of memory")
                                    : add_fn(rs, RW_EXEC, name.p, name.len, err);
            lt_strbuf_free(&name);
            return rc;
        }
        const char *comma = strchr(s, ',');
        b = comma ? comma : s + strlen(s);
        a = s;
        trim(&a, &b);
        if (a == b)
            return lt_fail(err, LT_ERR_ARG, "reward=: %s; name the rewards: %s",
                           rs->n || comma ? "an empty name between commas" : "no reward named",
                           accepted);
        int k = 0;
        while (k < N_BUILTINS && !(strlen(builtin_names[k]) == (size_t)(b - a) &&
                                   strncmp(builtin_names[k], a, (size_t)(b - a)) == 0))
            k++;
        if (k == N_BUILTINS) {
            const char *near = near_builtin(a, (size_t)(b - a));
            char hint[64] = "";
            if (near) snprintf(hint, sizeof hint, " (did you mean %s?)", near);
            return lt_fail(err, LT_ERR_ARG, "reward=: unknown reward '%.*s'%s; the rewards are %s",
                           (int)(b - a), a, hint, accepted);
        }
        for (int i = 0; i < rs->n; i++)
            if (strcmp(rs->fn[i].name, builtin_names[k]) == 0)
                return lt_fail(err, LT_ERR_ARG, "reward=: '%s' is named twice; name it once",
                               builtin_names[k]);
        lt_status rc = add_fn(rs, (reward_kind)k, builtin_names[k], strlen(builtin_names[k]), err);
        if (rc != LT_OK) return rc;
        if (!comma) return LT_OK;
        s = comma + 1;
    }
}

static lt_status parse_weights(reward_set *rs, const char *weights, char *err) {
    if (!weights) return LT_OK;
    int count = 1;
    for (const char *c = weights; *c; c++)
        count += *c == ',';
    if (count != rs->n)
        return lt_fail(err, LT_ERR_ARG,
                       "weights=: %d weight%s for %d reward%s; give one number per reward, in "
                       "the order of reward=, commas between",
                       count, count == 1 ? "" : "s", rs->n, rs->n == 1 ? "" : "s");
    const char *s = weights;
    for (int i = 0; i < rs->n; i++) {
        const char *comma = strchr(s, ','), *a = s, *b = comma ? comma : s + strlen(s);
        trim(&a, &b);
        char tmp[64], *end = tmp;
        double v = NAN;
        if (b > a && (size_t)(b - a) < sizeof tmp) {
            memcpy(tmp, a, (size_t)(b - a));
            tmp[b - a] = 0;
            v = strtod(tmp, &end);
        }
        if (b == a || *end || !isfinite(v))
            return lt_fail(err, LT_ERR_ARG,
                           "weights=: '%.*s' (for %s) is not a finite number; write one number "
                           "per reward, e.g. weights=1,0.5",
                           (int)(b - a), a, rs->fn[i].name);
        rs->fn[i].weight = v;
        s = comma ? comma + 1 : b;
    }
    return LT_OK;
}

static lt_status parse_markers(reward_set *rs, const char *markers, char *err) {
    const char *s = markers;
    for (int i = 0; i < 4; i++) {
        const char *a = default_markers[i], *b = a + strlen(a);
        if (markers) {
            const char *comma = strchr(s, ',');
            a = s;
            b = comma ? comma : s + strlen(s);
            trim(&a, &b);
            if (a == b || (i == 3) != !comma) {
                int count = 1;
                for (const char *c = markers; *c; c++)
                    count += *c == ',';
                return lt_fail(err, LT_ERR_ARG,
                               "markers=: %s; write four, commas between: reasoning start, "
                               "reasoning end, solution start, solution end (the defaults: "
                               "%s,%s,%s,%s)",
                               count != 4 ? "not four markers" : "an empty marker",
                               default_markers[0], default_markers[1], default_markers[2],
                               default_markers[3]);
            }
            s = comma ? comma + 1 : b;
        }
        rs->marker[i] = strndup(a, (size_t)(b - a));
        if (!rs->marker[i]) return lt_fail(err, LT_ERR_MEMORY, "markers=: out of memory");
        rs->marker_len[i] = (size_t)(b - a);
    }
    return LT_OK;
}

/* ---- the set ------------------------------------------------------------------------------ */

lt_status reward_set_new(reward_set **out, const reward_opts *o, char *err) {
    *out = NULL;
    if (!o) return lt_fail(err, LT_ERR_ARG, "reward=: no options");
    reward_set *rs = calloc(1, sizeof *rs);
    if (!rs) return lt_fail(err, LT_ERR_MEMORY, "reward=: out of memory");
    lt_status rc = LT_OK;
    LT_TRY(parse_spec(rs, o->spec, err));
    LT_TRY(parse_weights(rs, o->weights, err));
    LT_TRY(parse_markers(rs, o->markers, err));
    rs->timeout_s = o->timeout_s;
    for (int i = 0; i < rs->n; i++) {
        reward_fn *f = &rs->fn[i];
        if (f->kind != RW_EXEC) continue;
        if (!(o->timeout_s > 0)) {
            rc = lt_fail(err, LT_ERR_ARG, "reward %s: the timeout must be > 0 seconds", f->name);
            goto done;
        }
        f->prog = calloc(1, sizeof *f->prog);
        if (!f->prog) {
            rc = lt_fail(err, LT_ERR_MEMORY, "reward=: out of memory");
            goto done;
        }
        rc = prog_start(f->prog, f->name, f->name + 5, o->cwd, err);
        if (rc != LT_OK) {
            free(f->prog);
            f->prog = NULL;
            goto done;
        }
    }
done:
    if (rc != LT_OK) {
        reward_set_free(rs);
        return rc;
    }
    *out = rs;
    return LT_OK;
}

void reward_set_free(reward_set *rs) {
    if (!rs) return;
    for (int i = 0; i < rs->n; i++) {
        if (rs->fn[i].prog) {
            prog_stop(rs->fn[i].prog);
            free(rs->fn[i].prog);
        }
        free(rs->fn[i].name);
    }
    for (int i = 0; i < 4; i++)
        free(rs->marker[i]);
    free(rs->fn);
    free(rs);
}

int reward_count(const reward_set *rs) {
    return rs ? rs->n : 0;
}

const char *reward_name(const reward_set *rs, int i) {
    return rs && i >= 0 && i < rs->n ? rs->fn[i].name : NULL;
}

double reward_weight(const reward_set *rs, int i) {
    return rs && i >= 0 && i < rs->n ? rs->fn[i].weight : NAN;
}

lt_status reward_score(reward_set *rs, const reward_item *items, int n, double *scores, char *err) {
    if (!rs || n < 0 || (n > 0 && (!items || !scores)))
        return lt_fail(err, LT_ERR_ARG, "reward_score: no set, items or score array");
    for (size_t i = 0; i < (size_t)rs->n * (size_t)n; i++)
        scores[i] = NAN;
    if (n == 0) return LT_OK;
    int rows_needed = 0, answers_needed = 0;
    const char *answer_user = NULL;
    for (int f = 0; f < rs->n; f++) {
        reward_kind k = rs->fn[f].kind;
        rows_needed |= k == RW_ANSWER || k == RW_NUMBER || k == RW_EXEC;
        if ((k == RW_ANSWER || k == RW_NUMBER) && !answer_user) {
            answers_needed = 1;
            answer_user = rs->fn[f].name;
        }
    }
    lt_status rc = LT_OK;
    json_t **rows = rows_needed ? calloc((size_t)n, sizeof *rows) : NULL;
    answer_text *ans = answers_needed ? calloc((size_t)n, sizeof *ans) : NULL;
    lt_strbuf payload = {0};
    if ((rows_needed && !rows) || (answers_needed && !ans)) {
        rc = lt_fail(err, LT_ERR_MEMORY, "reward_score: out of memory");
        goto done;
    }
    for (int i = 0; rows && i < n; i++) {
        if (!items[i].row_json) continue;
        json_error_t je;
        rows[i] = json_loads(items[i].row_json, 0, &je);
        if (!json_is_object(rows[i])) {
            rc = lt_fail(err, LT_ERR_ARG,
                         "reward_score: completion %d's data row is not a JSON "
                         "object%s%s",
                         i + 1, rows[i] ? "" : ": ", rows[i] ? "" : je.text);
            goto done;
        }
    }
    for (int i = 0; ans && i < n; i++)
        LT_TRY(answer_of(rows[i], i, answer_user, &ans[i], err));
    for (int f = 0; f < rs->n; f++) {
        reward_fn *fn = &rs->fn[f];
        double *out = scores + (size_t)f * (size_t)n;
        if (fn->kind == RW_EXEC) {
            if (payload.len == 0) LT_TRY(build_payload(items, rows, n, &payload, err));
            LT_TRY(
                prog_score(fn->prog, fn->name, payload.p, payload.len, n, out, rs->timeout_s, err));
            continue;
        }
        for (int i = 0; i < n; i++) {
            const char *c = items[i].completion ? items[i].completion : "";
            size_t cn = strlen(c);
            switch (fn->kind) {
            case RW_FORMAT:
                out[i] = score_format(rs, c, cn);
                break;
            case RW_FORMAT_APPROX:
                out[i] = score_format_approx(rs, c, cn);
                break;
            case RW_ANSWER:
                out[i] = score_answer(rs, c, cn, ans[i].p, ans[i].n);
                break;
            case RW_NUMBER:
                out[i] = score_number(rs, c, cn, ans[i].p, ans[i].n);
                break;
            case RW_EXEC:
                break;
            }
        }
    }
done:
    for (int i = 0; rows && i < n; i++)
        json_decref(rows[i]);
    free(rows);
    free(ans);
    lt_strbuf_free(&payload);
    return rc;
}
