/* server.c — the ZeroMQ kernel server: sockets, threads, request handlers, the iopub sink.
 *
 * Owns the five sockets named by the connection file and the four threads that serve them:
 *   heartbeat  ROUTER that echoes every message verbatim;
 *   iopub      XPUB socket fed by an inproc PULL: every other thread pushes finished, signed
 *              frames, so only this thread touches it. It also flushes output that was held
 *              back by the throttle below, and sends nothing before a first client has
 *              subscribed (iopub_main);
 *   control    ROUTER: shutdown, interrupt, kernel_info, and the non-execute shell requests
 *              (they must work while a cell runs);
 *   shell      ROUTER + stdin ROUTER: runs cells through interp_execute with an lt_sink that
 *              turns what a cell shows into iopub messages.
 * A fifth thread reads pipes put over file descriptors 1 and 2: what the engine's libraries
 * and child processes write there becomes the running cell's stdout/stderr (in order with the
 * cell's own output, every byte in before its reply), and goes to the log between cells.
 * busy/idle is published around every request on shell and control, unknown types included.
 * Bad input (wrong signature, missing frames) is logged and dropped; a correctly signed
 * request that is malformed (JSON parts, header, content fields) or of an unknown type gets
 * an error reply (status "error", ename/evalue) between busy and idle; the kernel keeps
 * serving. SIGINT only interrupts the running cell.
 * The sink may be called from any thread while a cell runs (e.g. an engine worker reporting
 * progress): every output goes through the output queue's mutex, which also serialises the
 * shell thread's PUSH socket.
 * Throttle: consecutive stream writes closer than 20 ms are merged, and update_display_data
 * for one display_id is sent at most every 100 ms (the latest one wins); whatever is held back
 * is flushed within ~20 ms by the iopub thread and always before the execute_reply.
 * Must not touch: interp internals (only interp.h), the engine, the wire format (protocol/).
 */
#define _GNU_SOURCE /* pthread_timedjoin_np */
#include "kernel/server.h"

#ifdef HAVE_CONFIG_H
#include "config.h"
#endif
#ifndef PACKAGE_VERSION
#define PACKAGE_VERSION "0.0.0"
#endif

#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "protocol/protocol.h"

#define POLL_MS 100          /* how often idle loops look at the stop flag */
#define LINGER_MS 1000       /* ipykernel's value: exit even if a client vanished */
#define ROUTER_SNDHWM 100000 /* replies queued per client before ROUTER drops */
#define IOPUB_SNDHWM 1000000 /* PUB drops silently past this: keep it high */
#define IOPUB_HOLD_S 120.0   /* iopub output waits this long at most for a first subscriber */
#define STREAM_GAP 0.020     /* s between two stream messages */
#define UPDATE_GAP 0.100     /* s between two updates of one display */
#define STREAM_MAX_PENDING (1 << 20)
#define OUTQ_MAX_IDS 32
#define HISTORY_MAX 10000
#define IOPUB_INPROC "inproc://lathe-iopub"

/* ---- logging -------------------------------------------------------------------------- */

static int log_fd = 2;

static void log_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_msg(const char *fmt, ...) {
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "lathe: ");
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0) m = 0;
    size_t len = (size_t)n +
                 ((size_t)m < sizeof buf - (size_t)n - 1 ? (size_t)m : sizeof buf - (size_t)n - 2);
    buf[len++] = '\n';
    ssize_t w = write(log_fd, buf, len);
    (void)w;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- state ---------------------------------------------------------------------------- */

typedef struct upd_slot {
    char *id;
    json_t *content; /* pending update_display_data content, or NULL */
    double last_sent;
} upd_slot;

/* Output held back by the throttle; shared by the shell thread (producer) and the iopub
 * thread (timer). Everything in it belongs to the cell now running (parent). */
typedef struct outq {
    pthread_mutex_t lock;
    json_t *parent;
    int s_pending;
    char s_name[8];
    char *s_buf;
    size_t s_len, s_cap;
    double s_last_sent;
    upd_slot upd[OUTQ_MAX_IDS];
    int n_upd;
    atomic_int active; /* something is pending: the iopub thread polls faster */
} outq;

typedef struct hist_entry {
    int line;
    char *input;
    char *output; /* text/plain of the execute_result, or NULL */
} hist_entry;

/* What the process writes to file descriptors 1 and 2 (the engine, SentencePiece, the CUDA
 * runtime, child processes): pipes over fds 1/2 and a reader thread. While a cell runs the
 * bytes become that cell's stream output; otherwise they go where fds 1/2 went before (the
 * kernel's log). The kernel's own log_msg writes to a copy of the original fd 2, never to a
 * pipe, so it cannot loop back into a cell. */
typedef struct capture {
    int rd[2];                 /* read ends: [0] fd 1 (stdout), [1] fd 2 (stderr); -1 = off */
    int orig[2];               /* the original fds 1 and 2 */
    pthread_mutex_t lock;      /* held while bytes read from a pipe are forwarded, so that a drain
                                  sees everything read before it */
    void *push;                /* the running cell's PUSH socket (under out.lock), or NULL */
    int silent;                /* the running cell is silent: its bytes go to the log */
    unsigned char carry[2][4]; /* an incomplete UTF-8 sequence at the end of the last read */
    size_t n_carry[2];
    atomic_int stop;
    pthread_t thread;
    int thread_ok;
} capture;

typedef struct server {
    void *ctx;
    jp_connection conn;
    jp_auth auth;
    jp_session sess;
    interp *in;
    void *sock[JP_NCHANNELS];
    void *pull; /* iopub thread's inproc PULL */

    atomic_int stopping;
    atomic_int interrupt_gen; /* bumped by every interrupt (request or SIGINT) */
    pthread_mutex_t stop_lock;
    pthread_cond_t stop_cond;

    pthread_mutex_t interp_lock; /* one caller of interp_* at a time */
    int execution_count;         /* shell thread only */

    pthread_mutex_t hist_lock;
    hist_entry *hist;
    size_t n_hist, cap_hist;

    outq out;
    capture cap;
} server;

/* One request-serving thread's view. */
typedef struct chan {
    server *srv;
    const char *name; /* "shell" or "control" */
    void *sock;       /* ROUTER for replies */
    void *push;       /* this thread's PUSH into the iopub thread */
    void *stdin_sock; /* shell only */
    int is_shell;
} chan;

static server *volatile g_srv;

/* ---- sending -------------------------------------------------------------------------- */

static int send_msg(server *s, void *sock, const jp_msg *m) {
    jp_frame *f;
    size_t n;
    char err[JP_ERRLEN];
    if (wire_encode(&s->auth, m, &f, &n, err, sizeof err) < 0) {
        log_msg("cannot encode %s: %s", msg_type(m) ? msg_type(m) : "message", err);
        return -1;
    }
    int rc = wire_send_frames(sock, f, n, 0);
    if (rc < 0 && errno != ETERM)
        log_msg("cannot send %s: %s", msg_type(m) ? msg_type(m) : "message", zmq_strerror(errno));
    jp_frames_free(f, n);
    return rc;
}

/* Broadcasts on iopub through `sock` (a PUSH, or the PUB itself in the iopub thread).
 * Steals content. */
static int send_broadcast(server *s, void *sock, const json_t *parent, const char *type,
                          json_t *content) {
    jp_msg m;
    if (msg_broadcast(&s->sess, parent, type, content, &m) < 0) {
        log_msg("out of memory building %s", type);
        return -1;
    }
    int rc = send_msg(s, sock, &m);
    jp_msg_free(&m);
    return rc;
}

static void publish_status(chan *ch, const json_t *parent, const char *state) {
    send_broadcast(ch->srv, ch->push, parent, "status",
                   json_pack("{s:s}", "execution_state", state));
}

/* Sends the reply to `req` on its channel: "<x>_request" -> "<x>_reply". Steals content. */
static void send_reply(chan *ch, const jp_msg *req, json_t *content) {
    const char *rt = msg_type(req);
    char type[96];
    size_t n = strlen(rt);
    if (n > 8 && strcmp(rt + n - 8, "_request") == 0)
        snprintf(type, sizeof type, "%.*s_reply", (int)(n - 8), rt);
    else
        snprintf(type, sizeof type, "%.80s_reply", rt);
    if (!content) {
        log_msg("%s: out of memory building %s", ch->name, type);
        return;
    }
    jp_msg m;
    if (msg_reply(&ch->srv->sess, req, type, content, &m) < 0) {
        log_msg("%s: out of memory building %s", ch->name, type);
        return;
    }
    send_msg(ch->srv, ch->sock, &m);
    jp_msg_free(&m);
}

static json_t *error_content(const char *ename, const char *evalue, json_t *traceback) {
    json_t *c = json_object();
    if (!c) return NULL;
    const char *en = ename ? ename : "Error", *ev = evalue ? evalue : "";
    json_object_set_new(c, "status", json_string("error"));
    json_object_set_new(c, "ename", jp_json_string(en, strlen(en)));
    json_object_set_new(c, "evalue", jp_json_string(ev, strlen(ev)));
    json_t *tb = json_array();
    size_t i;
    json_t *line;
    if (json_is_array(traceback)) {
        json_array_foreach(traceback, i, line) {
            if (json_is_string(line)) json_array_append(tb, line);
        }
    }
    if (json_array_size(tb) == 0) {
        size_t len = strlen(en) + strlen(ev) + 3;
        char *t = malloc(len);
        if (t) {
            snprintf(t, len, "%s: %s", en, ev);
            json_array_append_new(tb, jp_json_string(t, strlen(t)));
            free(t);
        }
    }
    json_object_set_new(c, "traceback", tb);
    return c;
}

/* Whether a request of this type, malformed or unknown, is answered with an error: every
 * type but replies (a reply to a reply could go back and forth) and the comm messages, which
 * never have replies. A type that cannot be read gets an answer too. */
static int wants_error_reply(const char *type) {
    if (!type) return 1;
    size_t n = strlen(type);
    if (n >= 6 && strcmp(type + n - 6, "_reply") == 0) return 0;
    return strncmp(type, "comm_", 5) != 0;
}

/* The error reply to a request that cannot be served; "error_reply" when its type is not
 * known. An execute_request's reply also carries the execution counter. */
static void send_error_reply(chan *ch, const jp_msg *req, const char *ename, const char *evalue) {
    json_t *c = error_content(ename, evalue, NULL);
    const char *type = msg_type(req);
    if (c && type && strcmp(type, "execute_request") == 0 && ch->is_shell)
        json_object_set_new(c, "execution_count", json_integer(ch->srv->execution_count));
    if (type) {
        send_reply(ch, req, c);
        return;
    }
    jp_msg m;
    if (!c || msg_reply(&ch->srv->sess, req, "error_reply", c, &m) < 0) {
        log_msg("%s: out of memory building error_reply", ch->name);
        return;
    }
    send_msg(ch->srv, ch->sock, &m);
    jp_msg_free(&m);
}

/* ---- output throttle ------------------------------------------------------------------ */

static void wake_iopub(void *push) {
    zmq_send(push, "WAKE", 4, ZMQ_DONTWAIT);
}

/* Caller holds out.lock. */
static void outq_send_stream_locked(server *s, void *sock) {
    outq *q = &s->out;
    if (!q->s_pending) return;
    json_t *c = json_object();
    if (c) {
        json_object_set_new(c, "name", json_string(q->s_name));
        json_object_set_new(c, "text", jp_json_string(q->s_buf, q->s_len));
        send_broadcast(s, sock, q->parent, "stream", c);
    }
    q->s_pending = 0;
    q->s_len = 0;
    q->s_last_sent = now_s();
}

static void outq_refresh_active_locked(outq *q) {
    int any = q->s_pending;
    for (int i = 0; i < q->n_upd && !any; i++)
        any = q->upd[i].content != NULL;
    atomic_store(&q->active, any);
}

/* Sends what is due (everything when force). Caller holds out.lock. */
static void outq_flush_locked(server *s, void *sock, int force) {
    outq *q = &s->out;
    double t = now_s();
    if (q->s_pending && (force || t - q->s_last_sent >= STREAM_GAP))
        outq_send_stream_locked(s, sock);
    for (int i = 0; i < q->n_upd; i++) {
        upd_slot *u = &q->upd[i];
        if (u->content && (force || t - u->last_sent >= UPDATE_GAP)) {
            /* a held-back update also flushes earlier text so the order stays readable */
            outq_send_stream_locked(s, sock);
            send_broadcast(s, sock, q->parent, "update_display_data", u->content);
            u->content = NULL;
            u->last_sent = t;
        }
    }
    outq_refresh_active_locked(q);
}

static void outq_begin(server *s, const json_t *parent) {
    outq *q = &s->out;
    pthread_mutex_lock(&q->lock);
    json_decref(q->parent);
    q->parent = json_deep_copy(parent);
    q->s_last_sent = 0;
    pthread_mutex_unlock(&q->lock);
}

static void outq_end(server *s, void *sock) {
    outq *q = &s->out;
    pthread_mutex_lock(&q->lock);
    outq_flush_locked(s, sock, 1);
    for (int i = 0; i < q->n_upd; i++) {
        free(q->upd[i].id);
        json_decref(q->upd[i].content);
    }
    q->n_upd = 0;
    json_decref(q->parent);
    q->parent = NULL;
    atomic_store(&q->active, 0);
    pthread_mutex_unlock(&q->lock);
}

static void outq_stream(server *s, void *sock, const char *name, const char *text, size_t len) {
    outq *q = &s->out;
    if (len == 0) return;
    int wake = 0;
    pthread_mutex_lock(&q->lock);
    if (q->s_pending && strcmp(q->s_name, name) != 0) outq_send_stream_locked(s, sock);
    double t = now_s();
    if (!q->s_pending && t - q->s_last_sent >= STREAM_GAP) {
        json_t *c = json_object();
        if (c) {
            json_object_set_new(c, "name", json_string(name));
            json_object_set_new(c, "text", jp_json_string(text, len));
            send_broadcast(s, sock, q->parent, "stream", c);
        }
        q->s_last_sent = t;
    } else {
        if (q->s_len + len + 1 > q->s_cap) {
            size_t cap = q->s_cap ? q->s_cap : 4096;
            while (cap < q->s_len + len + 1)
                cap *= 2;
            char *nb = realloc(q->s_buf, cap);
            if (!nb) {
                log_msg("out of memory buffering output; sending it now");
                outq_send_stream_locked(s, sock);
                pthread_mutex_unlock(&q->lock);
                return;
            }
            q->s_buf = nb;
            q->s_cap = cap;
        }
        memcpy(q->s_buf + q->s_len, text, len);
        q->s_len += len;
        if (!q->s_pending) {
            q->s_pending = 1;
            snprintf(q->s_name, sizeof q->s_name, "%s", name);
            wake = 1;
        }
        if (q->s_len >= STREAM_MAX_PENDING) outq_send_stream_locked(s, sock);
        outq_refresh_active_locked(q);
    }
    if (wake) wake_iopub(sock); /* under the lock: the socket is shared */
    pthread_mutex_unlock(&q->lock);
}

/* Flushes pending text (before any other kind of output, to keep the order). */
static void outq_flush_stream(server *s, void *sock) {
    pthread_mutex_lock(&s->out.lock);
    outq_send_stream_locked(s, sock);
    outq_refresh_active_locked(&s->out);
    pthread_mutex_unlock(&s->out.lock);
}

static upd_slot *outq_slot_locked(outq *q, const char *id, int create) {
    for (int i = 0; i < q->n_upd; i++)
        if (strcmp(q->upd[i].id, id) == 0) return &q->upd[i];
    if (!create || q->n_upd == OUTQ_MAX_IDS) return NULL;
    upd_slot *u = &q->upd[q->n_upd];
    u->id = strdup(id);
    if (!u->id) return NULL;
    u->content = NULL;
    u->last_sent = 0;
    q->n_upd++;
    return u;
}

/* Publishes one output of the running cell (steals content) after the text held back
 * before it. A display_data with an id supersedes a held-back update of the same id. */
static void outq_publish(server *s, void *sock, const char *type, json_t *content,
                         const char *display_id) {
    outq *q = &s->out;
    pthread_mutex_lock(&q->lock);
    outq_send_stream_locked(s, sock);
    upd_slot *u = display_id ? outq_slot_locked(q, display_id, 1) : NULL;
    if (u) {
        json_decref(u->content);
        u->content = NULL;
        u->last_sent = now_s();
    }
    send_broadcast(s, sock, q->parent, type, content);
    outq_refresh_active_locked(q);
    pthread_mutex_unlock(&q->lock);
}

/* Steals content. */
static void outq_update(server *s, void *sock, const char *id, json_t *content) {
    outq *q = &s->out;
    int wake = 0;
    pthread_mutex_lock(&q->lock);
    outq_send_stream_locked(s, sock);
    upd_slot *u = outq_slot_locked(q, id, 1);
    double t = now_s();
    if (!u || t - u->last_sent >= UPDATE_GAP) {
        send_broadcast(s, sock, q->parent, "update_display_data", content);
        if (u) {
            json_decref(u->content);
            u->content = NULL;
            u->last_sent = t;
        }
    } else {
        wake = u->content == NULL;
        json_decref(u->content);
        u->content = content;
    }
    outq_refresh_active_locked(q);
    if (wake) wake_iopub(sock); /* under the lock: the socket is shared */
    pthread_mutex_unlock(&q->lock);
}

/* ---- history -------------------------------------------------------------------------- */

static void history_add(server *s, int line, const char *input, const char *output) {
    pthread_mutex_lock(&s->hist_lock);
    if (s->n_hist == HISTORY_MAX) {
        free(s->hist[0].input);
        free(s->hist[0].output);
        memmove(s->hist, s->hist + 1, (s->n_hist - 1) * sizeof *s->hist);
        s->n_hist--;
    }
    if (s->n_hist == s->cap_hist) {
        size_t cap = s->cap_hist ? s->cap_hist * 2 : 64;
        hist_entry *h = realloc(s->hist, cap * sizeof *h);
        if (!h) {
            pthread_mutex_unlock(&s->hist_lock);
            log_msg("out of memory: cell %d not kept in history", line);
            return;
        }
        s->hist = h;
        s->cap_hist = cap;
    }
    hist_entry *e = &s->hist[s->n_hist];
    e->line = line;
    e->input = strdup(input);
    e->output = output ? strdup(output) : NULL;
    if (!e->input) {
        free(e->output);
        log_msg("out of memory: cell %d not kept in history", line);
    } else {
        s->n_hist++;
    }
    pthread_mutex_unlock(&s->hist_lock);
}

static void history_free(server *s) {
    for (size_t i = 0; i < s->n_hist; i++) {
        free(s->hist[i].input);
        free(s->hist[i].output);
    }
    free(s->hist);
    s->hist = NULL;
    s->n_hist = s->cap_hist = 0;
}

static json_t *history_item(const hist_entry *e, int output) {
    json_t *in = json_string(e->input);
    json_t *third = in;
    if (output) third = json_pack("[o, o]", in, e->output ? json_string(e->output) : json_null());
    return json_pack("[i, i, o]", 1, e->line, third);
}

static int json_int_or(const json_t *c, const char *key, int dflt) {
    json_t *v = json_object_get(c, key);
    if (json_is_integer(v)) return (int)json_integer_value(v);
    if (json_is_real(v)) return (int)json_real_value(v);
    return dflt;
}

/* ---- fds 1 and 2 ---------------------------------------------------------------------- */

#define CAPTURE_READ 16384 /* bytes per read: two buffers of it live on the caller's stack */

/* Bytes at the end of b[0..n) that begin a UTF-8 sequence the read cut short. */
static size_t utf8_cut_tail(const unsigned char *b, size_t n) {
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        unsigned char c = b[n - k];
        if ((c & 0xC0) == 0x80) continue;
        size_t need = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
        return need > k ? k : 0;
    }
    return 0;
}

static void write_all(int fd, const unsigned char *b, size_t n) {
    while (fd >= 0 && n > 0) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        b += w;
        n -= (size_t)w;
    }
}

/* Sends n bytes read from pipe `which` (after its carried bytes) to the running cell, or to
 * the original fd. `last` flushes an incomplete sequence as it is. Caller holds cap.lock. */
static void capture_forward_locked(server *s, int which, const unsigned char *b, size_t n,
                                   int last) {
    capture *c = &s->cap;
    unsigned char buf[CAPTURE_READ + 4];
    size_t len = c->n_carry[which];
    memcpy(buf, c->carry[which], len);
    if (n > sizeof buf - len) n = sizeof buf - len; /* callers read at most CAPTURE_READ */
    memcpy(buf + len, b, n);
    len += n;
    size_t tail = last ? 0 : utf8_cut_tail(buf, len);
    memcpy(c->carry[which], buf + len - tail, tail);
    c->n_carry[which] = tail;
    len -= tail;
    if (len == 0) return;
    if (c->push && !c->silent)
        outq_stream(s, c->push, which ? "stderr" : "stdout", (const char *)buf, len);
    else
        write_all(c->orig[which], buf, len);
}

/* Reads what pipe `which` holds (at most `max_reads` reads) and forwards it. Returns 1 when
 * more may be waiting, 0 when it is empty, -1 at its end. Caller holds cap.lock. */
static int capture_read_locked(server *s, int which, int max_reads) {
    unsigned char buf[CAPTURE_READ];
    for (int i = 0; i < max_reads; i++) {
        ssize_t n = read(s->cap.rd[which], buf, sizeof buf);
        if (n < 0 && errno == EINTR) {
            i--;
            continue;
        }
        if (n == 0) return -1; /* every write end closed (someone closed fd 1 or 2) */
        if (n < 0) return 0;
        capture_forward_locked(s, which, buf, (size_t)n, 0);
    }
    return 1;
}

/* Everything written to fds 1/2 before this call reaches its destination before any output
 * queued after it: called before each of a cell's own outputs, so the two stay in order. */
static void capture_drain(server *s) {
    capture *c = &s->cap;
    if (c->rd[0] < 0) return;
    fflush(stdout); /* outside cap.lock: a writer blocked on a full pipe needs the reader */
    fflush(stderr);
    pthread_mutex_lock(&c->lock);
    for (int w = 0; w < 2; w++)
        capture_read_locked(s, w, 1024); /* 16 MB at most: a writer that never stops */
    pthread_mutex_unlock(&c->lock);
}

/* From now on fds 1/2 belong to the cell that publishes through push (NULL: none). */
static void capture_switch(server *s, void *push, int silent) {
    capture *c = &s->cap;
    if (c->rd[0] < 0) return;
    fflush(stdout);
    fflush(stderr);
    pthread_mutex_lock(&c->lock);
    for (int w = 0; w < 2; w++) {
        capture_read_locked(s, w, 1024);
        if (c->n_carry[w]) capture_forward_locked(s, w, NULL, 0, 1);
    }
    c->push = push;
    c->silent = silent;
    pthread_mutex_unlock(&c->lock);
}

static void *capture_main(void *arg) {
    server *s = arg;
    capture *c = &s->cap;
    int ended[2] = {0, 0};
    while (!atomic_load(&c->stop)) {
        struct pollfd fds[2] = {{ended[0] ? -1 : c->rd[0], POLLIN, 0},
                                {ended[1] ? -1 : c->rd[1], POLLIN, 0}};
        int rc = poll(fds, 2, POLL_MS);
        if (rc < 0 && errno != EINTR) {
            log_msg("capture: poll failed: %s", strerror(errno));
            break;
        }
        if (rc <= 0) continue;
        pthread_mutex_lock(&c->lock);
        for (int w = 0; w < 2; w++)
            if ((fds[w].revents & (POLLIN | POLLHUP)) && capture_read_locked(s, w, 64) < 0)
                ended[w] = 1; /* polling it again would spin */
        pthread_mutex_unlock(&c->lock);
    }
    return NULL;
}

/* Puts pipes over fds 1 and 2. On failure logs why and leaves them alone (rd = -1). */
static void capture_open(server *s) {
    capture *c = &s->cap;
    c->rd[0] = c->rd[1] = c->orig[0] = c->orig[1] = -1;
    pthread_mutex_init(&c->lock, NULL);
    int p[2][2] = {{-1, -1}, {-1, -1}};
    if (pipe2(p[0], O_CLOEXEC) < 0 || pipe2(p[1], O_CLOEXEC) < 0) {
        log_msg("output of libraries stays in this log: cannot create a pipe: %s", strerror(errno));
        for (int w = 0; w < 2; w++)
            for (int k = 0; k < 2; k++)
                if (p[w][k] >= 0) close(p[w][k]);
        return;
    }
    fflush(stdout);
    fflush(stderr);
    for (int w = 0; w < 2; w++) {
        c->orig[w] = fcntl(w + 1, F_DUPFD_CLOEXEC, 3);
        fcntl(p[w][0], F_SETFL, fcntl(p[w][0], F_GETFL) | O_NONBLOCK);
        dup2(p[w][1], w + 1); /* without O_CLOEXEC: child processes write here too */
        close(p[w][1]);
        c->rd[w] = p[w][0];
    }
    setvbuf(stdout, NULL, _IOLBF, 0); /* a pipe would make stdio buffer whole blocks */
}

/* Gives fds 1/2 back, forwarding what is left to them. */
static void capture_close(server *s) {
    capture *c = &s->cap;
    if (c->rd[0] < 0) return;
    atomic_store(&c->stop, 1);
    if (c->thread_ok) pthread_join(c->thread, NULL);
    fflush(stdout);
    fflush(stderr);
    pthread_mutex_lock(&c->lock);
    c->push = NULL;
    for (int w = 0; w < 2; w++) {
        capture_read_locked(s, w, 1024);
        if (c->n_carry[w]) capture_forward_locked(s, w, NULL, 0, 1);
        if (c->orig[w] >= 0) {
            dup2(c->orig[w], w + 1);
            close(c->orig[w]);
        } else { /* it was closed: a later write must not meet a pipe without a reader */
            int null = open("/dev/null", O_WRONLY);
            if (null >= 0) {
                dup2(null, w + 1);
                close(null);
            }
        }
        close(c->rd[w]);
        c->rd[w] = c->orig[w] = -1;
    }
    pthread_mutex_unlock(&c->lock);
    pthread_mutex_destroy(&c->lock);
}

/* ---- the sink: what a running cell shows ---------------------------------------------- */

typedef struct exec_ctx {
    chan *ch;
    const jp_msg *req;
    int silent;
    int allow_stdin;
    int execution_count;
    char *result_text; /* text/plain of the execute_result, for history output */
} exec_ctx;

static void sink_stream(void *ctx, const char *name, const char *text) {
    exec_ctx *x = ctx;
    if (x->silent || !text) return;
    const char *n = (name && strcmp(name, "stderr") == 0) ? "stderr" : "stdout";
    capture_drain(x->ch->srv);
    outq_stream(x->ch->srv, x->ch->push, n, text, strlen(text));
}

static json_t *display_content(json_t *data, json_t *metadata, const char *display_id) {
    json_t *d = json_is_object(data) ? json_deep_copy(data) : json_object();
    json_t *m = json_is_object(metadata) ? json_deep_copy(metadata) : json_object();
    json_t *t = json_object();
    if (t && display_id)
        json_object_set_new(t, "display_id", jp_json_string(display_id, strlen(display_id)));
    return json_pack("{s:o, s:o, s:o}", "data", d, "metadata", m, "transient", t);
}

static void sink_display(void *ctx, json_t *data, json_t *metadata, const char *display_id,
                         int update) {
    exec_ctx *x = ctx;
    server *s = x->ch->srv;
    if (x->silent) return;
    if (!json_is_object(data)) {
        log_msg("a display without a data object was dropped");
        return;
    }
    if (display_id && !display_id[0]) display_id = NULL;
    if (update && !display_id) {
        log_msg("update_display_data without a display_id was dropped");
        return;
    }
    capture_drain(s);
    json_t *c = display_content(data, metadata, display_id);
    if (!c) {
        log_msg("out of memory building display_data");
        return;
    }
    if (update) {
        outq_update(s, x->ch->push, display_id, c);
        return;
    }
    outq_publish(s, x->ch->push, "display_data", c, display_id);
}

static void sink_result(void *ctx, json_t *data, json_t *metadata) {
    exec_ctx *x = ctx;
    server *s = x->ch->srv;
    if (!json_is_object(data)) return;
    const char *plain = json_string_value(json_object_get(data, "text/plain"));
    if (plain) {
        free(x->result_text);
        x->result_text = strdup(plain);
    }
    if (x->silent) return;
    capture_drain(s);
    json_t *c = json_pack("{s:i, s:o, s:o}", "execution_count", x->execution_count, "data",
                          json_deep_copy(data), "metadata",
                          json_is_object(metadata) ? json_deep_copy(metadata) : json_object());
    if (c) outq_publish(s, x->ch->push, "execute_result", c, NULL);
}

static void sink_clear(void *ctx, int wait) {
    exec_ctx *x = ctx;
    if (x->silent) return;
    capture_drain(x->ch->srv);
    json_t *c = json_pack("{s:b}", "wait", wait);
    if (c) outq_publish(x->ch->srv, x->ch->push, "clear_output", c, NULL);
}

/* input_request on stdin with the execute_request's identities; blocks until input_reply,
 * an interrupt or shutdown. */
static int sink_input(void *ctx, const char *prompt, int password, char **value) {
    exec_ctx *x = ctx;
    server *s = x->ch->srv;
    void *sock = x->ch->stdin_sock;
    *value = NULL;
    if (!x->allow_stdin || !sock) return -1;
    int gen0 = atomic_load(&s->interrupt_gen);
    capture_drain(s);
    outq_flush_stream(s, x->ch->push);

    /* Drop stale replies first. */
    jp_frame *f;
    size_t n;
    while (wire_recv_frames(sock, ZMQ_DONTWAIT, &f, &n) == 0) {
        log_msg("stdin: dropped a message that arrived before input_request");
        jp_frames_free(f, n);
    }
    const char *p = prompt ? prompt : "";
    json_t *c = json_pack("{s:o, s:b}", "prompt", jp_json_string(p, strlen(p)), "password",
                          password ? 1 : 0);
    jp_msg m;
    if (!c || msg_reply(&s->sess, x->req, "input_request", c, &m) < 0) {
        log_msg("out of memory building input_request");
        return -1;
    }
    int rc = send_msg(s, sock, &m);
    jp_msg_free(&m);
    if (rc < 0) return -1;

    for (;;) {
        if (atomic_load(&s->stopping) || atomic_load(&s->interrupt_gen) != gen0) return -1;
        zmq_pollitem_t it = {sock, 0, ZMQ_POLLIN, 0};
        int pr = zmq_poll(&it, 1, POLL_MS);
        if (pr < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (!(it.revents & ZMQ_POLLIN)) continue;
        if (wire_recv_frames(sock, ZMQ_DONTWAIT, &f, &n) < 0) continue;
        jp_msg r;
        char err[JP_ERRLEN];
        int dr = wire_decode(&s->auth, f, n, &r, err, sizeof err);
        jp_frames_free(f, n);
        if (dr != WIRE_OK) {
            log_msg("stdin: dropped a message: %s", err);
            continue;
        }
        if (strcmp(msg_type(&r), "input_reply") != 0) {
            log_msg("stdin: ignored a %s while waiting for input_reply", msg_type(&r));
            jp_msg_free(&r);
            continue;
        }
        const char *v = msg_content_str(&r, "value");
        *value = strdup(v ? v : "");
        jp_msg_free(&r);
        return *value ? 0 : -1;
    }
}

/* ---- request handlers ----------------------------------------------------------------- */

/* Each returns 1 when the shell queue must be aborted (failed cell with stop_on_error). */
typedef int (*handler_fn)(chan *ch, const jp_msg *req, int aborting);

static int interp_acquire(chan *ch) {
    if (ch->is_shell) {
        pthread_mutex_lock(&ch->srv->interp_lock);
        return 1;
    }
    /* control must never wait for a running cell */
    return pthread_mutex_trylock(&ch->srv->interp_lock) == 0;
}

static int on_kernel_info(chan *ch, const jp_msg *req, int aborting) {
    json_t *li = interp_language_info();
    if (!li) li = json_pack("{s:s}", "name", "lathe");
    const char *banner = interp_banner();
    json_t *c =
        json_pack("{s:s, s:s, s:s, s:s, s:o, s:s, s:[{s:s, s:s}], s:[], s:b}", "status", "ok",
                  "protocol_version", JP_PROTOCOL_VERSION, "implementation", "lathe",
                  "implementation_version", PACKAGE_VERSION, "language_info", li, "banner",
                  banner ? banner : "lathe", "help_links", "text", "lathe magics", "url",
                  "https://github.com/lathe-ml/lathe#readme", "supported_features", "debugger", 0);
    send_reply(ch, req, c);
    return 0;
}

static const char *json_kind(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

/* An execute_request's content: a string `code`; the optional flags booleans and
 * user_expressions an object when present (null counts as absent). 0 with the reason. */
static int execute_fields_ok(const json_t *content, char *why, size_t len) {
    json_t *code = json_object_get(content, "code");
    if (!json_is_string(code)) {
        snprintf(why, len, "execute_request content needs a string 'code'%s%s",
                 code ? ", not " : "", code ? json_kind(code) : "");
        return 0;
    }
    static const char *const flags[] = {"silent", "store_history", "allow_stdin", "stop_on_error"};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        json_t *v = json_object_get(content, flags[i]);
        if (v && !json_is_null(v) && !json_is_boolean(v)) {
            snprintf(why, len, "execute_request '%s' must be true or false, not %s", flags[i],
                     json_kind(v));
            return 0;
        }
    }
    json_t *ue = json_object_get(content, "user_expressions");
    if (ue && !json_is_null(ue) && !json_is_object(ue)) {
        snprintf(why, len, "execute_request 'user_expressions' must be an object, not %s",
                 json_kind(ue));
        return 0;
    }
    return 1;
}

static int on_execute(chan *ch, const jp_msg *req, int aborting) {
    server *s = ch->srv;
    json_t *content = req->content;
    json_t *jcode = json_object_get(content, "code");
    if (!ch->is_shell) {
        send_reply(ch, req,
                   error_content("ChannelError",
                                 "execute_request is served on the shell channel only", NULL));
        return 0;
    }
    char why[160];
    if (!execute_fields_ok(content, why, sizeof why)) {
        send_error_reply(ch, req, "BadRequest", why);
        return 0;
    }
    int silent = json_is_true(json_object_get(content, "silent"));
    json_t *sh = json_object_get(content, "store_history");
    int store = silent ? 0 : (json_is_boolean(sh) ? json_is_true(sh) : 1);
    int allow_stdin = json_is_true(json_object_get(content, "allow_stdin"));
    json_t *soe = json_object_get(content, "stop_on_error");
    int stop_on_error = json_is_boolean(soe) ? json_is_true(soe) : 1;

    if (aborting) {
        json_t *c = error_content("ExecutionAborted",
                                  "not run: an earlier cell failed (stop_on_error)", NULL);
        if (c) json_object_set_new(c, "execution_count", json_integer(s->execution_count));
        send_reply(ch, req, c);
        return 0;
    }
    if (store) s->execution_count++;
    int count = s->execution_count;
    if (!silent)
        send_broadcast(s, ch->push, req->header, "execute_input",
                       json_pack("{s:O, s:i}", "code", jcode, "execution_count", count));

    exec_ctx x = {ch, req, silent, allow_stdin, count, NULL};
    lt_sink sink = {&x, sink_stream, sink_display, sink_result, sink_input, sink_clear};
    interp_error e = {NULL, NULL, NULL};
    outq_begin(s, req->header);
    capture_switch(s, ch->push, silent);
    interp_acquire(ch);
    int rc = interp_execute(s->in, json_string_value(jcode), json_string_length(jcode), &sink, &e);
    pthread_mutex_unlock(&s->interp_lock);
    capture_switch(s, NULL, 0); /* what the cell wrote to fds 1/2 is in it, to the last byte */
    outq_end(s, ch->push);

    if (store) history_add(s, count, json_string_value(jcode), x.result_text);
    free(x.result_text);
    int abort = 0;
    if (rc == 0) {
        send_reply(ch, req,
                   json_pack("{s:s, s:i, s:{}, s:[]}", "status", "ok", "execution_count", count,
                             "user_expressions", "payload"));
    } else {
        if (!silent)
            send_broadcast(s, ch->push, req->header, "error",
                           error_content(e.ename, e.evalue, e.traceback));
        json_t *c = error_content(e.ename, e.evalue, e.traceback);
        if (c) {
            json_object_set_new(c, "execution_count", json_integer(count));
            json_object_set_new(c, "user_expressions", json_object());
            json_object_set_new(c, "payload", json_array());
        }
        send_reply(ch, req, c);
        abort = stop_on_error;
    }
    interp_error_clear(&e);
    return abort;
}

/* cursor_pos in code points, clamped to the code; missing => end of code. */
static int cursor_of(const jp_msg *req, const char *code, size_t len) {
    int ncp = (int)jp_utf8_count(code, len);
    int pos = json_int_or(req->content, "cursor_pos", ncp);
    if (pos < 0) pos = 0;
    if (pos > ncp) pos = ncp;
    return pos;
}

static const char *code_of(const jp_msg *req, size_t *len) {
    json_t *j = json_object_get(req->content, "code");
    if (!json_is_string(j)) {
        *len = 0;
        return "";
    }
    *len = json_string_length(j);
    return json_string_value(j);
}

static int on_complete(chan *ch, const jp_msg *req, int aborting) {
    size_t len;
    const char *code = code_of(req, &len);
    int pos = cursor_of(req, code, len), start = pos, end = pos;
    json_t *matches = NULL;
    if (interp_acquire(ch)) {
        matches = interp_complete(ch->srv->in, code, len, pos, &start, &end);
        pthread_mutex_unlock(&ch->srv->interp_lock);
    }
    if (!json_is_array(matches)) {
        json_decref(matches);
        matches = json_array();
        start = end = pos;
    }
    int ncp = (int)jp_utf8_count(code, len);
    if (start < 0 || start > ncp) start = pos;
    if (end < start || end > ncp) end = pos < start ? start : pos;
    send_reply(ch, req,
               json_pack("{s:s, s:o, s:i, s:i, s:{}}", "status", "ok", "matches", matches,
                         "cursor_start", start, "cursor_end", end, "metadata"));
    return 0;
}

static int on_inspect(chan *ch, const jp_msg *req, int aborting) {
    size_t len;
    const char *code = code_of(req, &len);
    int pos = cursor_of(req, code, len);
    int detail = json_int_or(req->content, "detail_level", 0) ? 1 : 0;
    json_t *bundle = NULL;
    if (interp_acquire(ch)) {
        bundle = interp_inspect(ch->srv->in, code, len, pos, detail);
        pthread_mutex_unlock(&ch->srv->interp_lock);
    }
    int found = json_is_object(bundle) && json_object_size(bundle) > 0;
    if (!found) {
        json_decref(bundle);
        bundle = json_object();
    }
    send_reply(ch, req,
               json_pack("{s:s, s:b, s:o, s:{}}", "status", "ok", "found", found, "data", bundle,
                         "metadata"));
    return 0;
}

static int on_is_complete(chan *ch, const jp_msg *req, int aborting) {
    size_t len;
    const char *code = code_of(req, &len);
    const char *status = "unknown", *indent = NULL;
    if (interp_acquire(ch)) {
        status = interp_is_complete(ch->srv->in, code, len, &indent);
        pthread_mutex_unlock(&ch->srv->interp_lock);
        if (!status) status = "unknown";
    }
    json_t *c = json_pack("{s:s}", "status", status);
    if (c && strcmp(status, "incomplete") == 0)
        json_object_set_new(c, "indent", json_string(indent ? indent : ""));
    send_reply(ch, req, c);
    return 0;
}

static int on_history(chan *ch, const jp_msg *req, int aborting) {
    server *s = ch->srv;
    const json_t *c = req->content;
    const char *type = msg_content_str(req, "hist_access_type");
    int output = json_is_true(json_object_get(c, "output"));
    json_t *list = json_array();
    pthread_mutex_lock(&s->hist_lock);
    if (!type) type = "tail";
    if (strcmp(type, "tail") == 0) {
        int n = json_int_or(c, "n", 10);
        size_t first = (n >= 0 && (size_t)n < s->n_hist) ? s->n_hist - (size_t)n : 0;
        for (size_t i = first; i < s->n_hist; i++)
            json_array_append_new(list, history_item(&s->hist[i], output));
    } else if (strcmp(type, "range") == 0) {
        int session = json_int_or(c, "session", 0);
        int start = json_int_or(c, "start", 0);
        json_t *jstop = json_object_get(c, "stop");
        int has_stop = json_is_number(jstop);
        int stop = json_int_or(c, "stop", 0);
        if (session == 0 || session == 1) /* 0 = this session; ours is number 1 */
            for (size_t i = 0; i < s->n_hist; i++) {
                int line = s->hist[i].line;
                if (line >= start && (!has_stop || line < stop))
                    json_array_append_new(list, history_item(&s->hist[i], output));
            }
    } else if (strcmp(type, "search") == 0) {
        const char *pattern = msg_content_str(req, "pattern");
        int n = json_int_or(c, "n", 0);
        int unique = json_is_true(json_object_get(c, "unique"));
        if (!pattern) pattern = "*";
        /* newest first, like IPython's search; reversed at the end */
        json_t *rev = json_array();
        for (size_t k = s->n_hist; k-- > 0 && (n <= 0 || (int)json_array_size(rev) < n);) {
            const hist_entry *e = &s->hist[k];
            if (fnmatch(pattern, e->input, 0) != 0) continue;
            if (unique) {
                int dup = 0;
                for (size_t j = k + 1; j < s->n_hist && !dup; j++)
                    dup = strcmp(s->hist[j].input, e->input) == 0 &&
                          fnmatch(pattern, s->hist[j].input, 0) == 0;
                if (dup) continue;
            }
            json_array_append_new(rev, history_item(e, output));
        }
        for (size_t k = json_array_size(rev); k-- > 0;)
            json_array_append(list, json_array_get(rev, k));
        json_decref(rev);
    } else {
        log_msg("%s: history_request with unknown hist_access_type '%s'", ch->name, type);
    }
    pthread_mutex_unlock(&s->hist_lock);
    send_reply(ch, req, json_pack("{s:s, s:o}", "status", "ok", "history", list));
    return 0;
}

static int on_comm_info(chan *ch, const jp_msg *req, int aborting) {
    send_reply(ch, req, json_pack("{s:s, s:{}}", "status", "ok", "comms"));
    return 0;
}

static int on_comm_open(chan *ch, const jp_msg *req, int aborting) {
    /* lathe has no comm targets: close the comm so the front end does not keep it open */
    json_t *id = json_object_get(req->content, "comm_id");
    const char *target = msg_content_str(req, "target_name");
    log_msg("%s: comm_open for unknown target '%s': closing it", ch->name,
            target ? target : "(none)");
    if (!json_is_string(id)) return 0;
    send_broadcast(ch->srv, ch->push, req->header, "comm_close",
                   json_pack("{s:O, s:{}}", "comm_id", id, "data"));
    return 0;
}

static int on_comm_ignore(chan *ch, const jp_msg *req, int aborting) {
    return 0;
}

/* ---- the launcher ------------------------------------------------------------------ */

/* The process that started the kernel. Nobody can reach a kernel whose launcher is gone
 * (killed, or a notebook's Python kernel that started lathe exited), so it stops, as
 * ipykernel's parent poller does. Recorded at exec time (server_watch_launcher), so a launcher
 * that dies while the kernel is still starting is noticed too. */
static pid_t g_launcher;   /* getppid() at exec time */
static pid_t g_jpy_parent; /* JPY_PARENT_PID when it names another process, else 0 */
static volatile sig_atomic_t g_parent_signal;

static void on_parent_death(int sig) {
    (void)sig;
    g_parent_signal = 1;
}

void server_watch_launcher(void) {
    g_launcher = getppid();
    const char *p = getenv("JPY_PARENT_PID"); /* jupyter_client's launcher.py sets it */
    char *end = NULL;
    long v = p ? strtol(p, &end, 10) : 0;
    g_jpy_parent = (v > 1 && end && *end == '\0' && (pid_t)v != g_launcher) ? (pid_t)v : 0;
#ifdef __linux__
    /* Linux tells us when the parent dies (PR_SET_PDEATHSIG); the handler only raises a
     * flag, the main loop decides (it also fires when the launcher's thread that forked us
     * exits while the launcher lives on). */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_parent_death;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGHUP, &sa, NULL);
    if (prctl(PR_SET_PDEATHSIG, SIGHUP) != 0)
        log_msg("cannot ask to be told when the launcher dies: %s", strerror(errno));
        /* a parent that died before the prctl is seen by the main loop's first look */
#endif
}

/* The pid of the launcher when it is gone, else 0: the parent recorded at exec time is no
 * longer our parent, or JPY_PARENT_PID (when it names another process, e.g. through a
 * wrapper; or a launcher that died before exec) no longer exists. */
static pid_t launcher_gone(void) {
    g_parent_signal = 0;
    if (g_launcher > 1 && getppid() != g_launcher) return g_launcher;
    if (g_jpy_parent && kill(g_jpy_parent, 0) < 0 && errno == ESRCH) return g_jpy_parent;
    return 0;
}

static void request_stop(server *s) {
    pthread_mutex_lock(&s->stop_lock);
    atomic_store(&s->stopping, 1);
    pthread_cond_broadcast(&s->stop_cond);
    pthread_mutex_unlock(&s->stop_lock);
}

static void interrupt_now(server *s) {
    interp_interrupt(s->in);
    atomic_fetch_add(&s->interrupt_gen, 1);
}

static int on_shutdown(chan *ch, const jp_msg *req, int aborting) {
    int restart = json_is_true(json_object_get(req->content, "restart"));
    log_msg("%s: shutdown_request (restart=%s)", ch->name, restart ? "true" : "false");
    send_reply(ch, req, json_pack("{s:s, s:b}", "status", "ok", "restart", restart));
    return 0; /* the caller stops the server after publishing idle */
}

static int on_interrupt(chan *ch, const jp_msg *req, int aborting) {
    interrupt_now(ch->srv);
    send_reply(ch, req, json_pack("{s:s}", "status", "ok"));
    return 0;
}

static const struct {
    const char *type;
    handler_fn fn;
} handlers[] = {
    {"kernel_info_request", on_kernel_info},
    {"execute_request", on_execute},
    {"complete_request", on_complete},
    {"inspect_request", on_inspect},
    {"is_complete_request", on_is_complete},
    {"history_request", on_history},
    {"comm_info_request", on_comm_info},
    {"comm_open", on_comm_open},
    {"comm_msg", on_comm_ignore},
    {"comm_close", on_comm_ignore},
    {"shutdown_request", on_shutdown},
    {"interrupt_request", on_interrupt},
};

/* busy -> handler -> idle. Returns 1 when the shell queue must be aborted. */
static int handle_request(chan *ch, const jp_msg *req, int aborting) {
    const char *type = msg_type(req);
    publish_status(ch, req->header, "busy");
    int abort = 0, known = 0;
    for (size_t i = 0; i < sizeof handlers / sizeof handlers[0]; i++) {
        if (strcmp(handlers[i].type, type) == 0) {
            abort = handlers[i].fn(ch, req, aborting);
            known = 1;
            break;
        }
    }
    if (!known) {
        int answer = wants_error_reply(type);
        log_msg("%s: unknown msg_type '%.100s'%s", ch->name, type,
                answer ? ": error reply" : ": no reply");
        if (answer) {
            char ev[200];
            snprintf(ev, sizeof ev, "lathe does not serve '%.100s' on the %s channel", type,
                     ch->name);
            send_error_reply(ch, req, "UnknownMessageType", ev);
        }
    }
    publish_status(ch, req->header, "idle");
    if (known && strcmp(type, "shutdown_request") == 0) request_stop(ch->srv);
    return abort;
}

/* A correctly signed message whose parts are malformed: busy, an error reply naming what is
 * wrong (so the client does not wait for its own timeout), idle. */
static void answer_malformed(chan *ch, const jp_frame *f, size_t n, const char *why) {
    jp_msg req;
    if (wire_salvage(f, n, &req) < 0) {
        log_msg("%s: dropped a message: %s", ch->name, why);
        return;
    }
    const char *type = msg_type(&req);
    int answer = wants_error_reply(type);
    log_msg("%s: malformed %.100s: %s%s", ch->name, type ? type : "message", why,
            answer ? ": error reply" : ": dropped");
    publish_status(ch, req.header, "busy");
    if (answer) send_error_reply(ch, &req, "BadRequest", why);
    publish_status(ch, req.header, "idle");
    jp_msg_free(&req);
}

/* Decodes and serves one received message; bad ones are logged and dropped, authentic but
 * malformed ones get an error reply. */
static int serve_frames(chan *ch, jp_frame *f, size_t n, int aborting) {
    jp_msg req;
    char err[JP_ERRLEN];
    int rc = wire_decode(&ch->srv->auth, f, n, &req, err, sizeof err);
    if (rc == WIRE_ERR_JSON || rc == WIRE_ERR_HEADER) {
        answer_malformed(ch, f, n, err);
        return 0;
    }
    if (rc != WIRE_OK) {
        log_msg("%s: dropped a message: %s", ch->name, err);
        return 0;
    }
    int abort = handle_request(ch, &req, aborting);
    jp_msg_free(&req);
    return abort;
}

/* stop_on_error: answer the execute_requests already queued with an error (not run);
 * other queued requests are served normally. */
static void abort_queue(chan *ch) {
    jp_frame *f;
    size_t n;
    while (!atomic_load(&ch->srv->stopping) &&
           wire_recv_frames(ch->sock, ZMQ_DONTWAIT, &f, &n) == 0) {
        serve_frames(ch, f, n, 1);
        jp_frames_free(f, n);
    }
}

/* ---- threads -------------------------------------------------------------------------- */

static void *open_push(server *s) {
    void *push = zmq_socket(s->ctx, ZMQ_PUSH);
    if (!push) return NULL;
    int zero = 0, linger = LINGER_MS;
    zmq_setsockopt(push, ZMQ_SNDHWM, &zero, sizeof zero); /* never block the producer */
    zmq_setsockopt(push, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(push, IOPUB_INPROC) < 0) {
        zmq_close(push);
        return NULL;
    }
    return push;
}

static void serve_loop(chan *ch) {
    server *s = ch->srv;
    while (!atomic_load(&s->stopping)) {
        zmq_pollitem_t items[2] = {{ch->sock, 0, ZMQ_POLLIN, 0},
                                   {ch->stdin_sock, 0, ZMQ_POLLIN, 0}};
        int rc = zmq_poll(items, ch->stdin_sock ? 2 : 1, POLL_MS);
        if (rc < 0) {
            if (errno == EINTR) continue;
            if (errno == ETERM) break;
            log_msg("%s: poll failed: %s", ch->name, zmq_strerror(errno));
            continue;
        }
        jp_frame *f;
        size_t n;
        if (ch->stdin_sock && (items[1].revents & ZMQ_POLLIN)) {
            while (wire_recv_frames(ch->stdin_sock, ZMQ_DONTWAIT, &f, &n) == 0) {
                log_msg("stdin: dropped a message: no input_request is waiting");
                jp_frames_free(f, n);
            }
        }
        if (!(items[0].revents & ZMQ_POLLIN)) continue;
        if (wire_recv_frames(ch->sock, ZMQ_DONTWAIT, &f, &n) < 0) {
            if (errno != EAGAIN && errno != EINTR)
                log_msg("%s: receive failed: %s", ch->name, zmq_strerror(errno));
            continue;
        }
        int abort = serve_frames(ch, f, n, 0);
        jp_frames_free(f, n);
        if (abort) abort_queue(ch);
    }
}

static void *shell_main(void *arg) {
    server *s = arg;
    chan ch = {s, "shell", s->sock[JP_SHELL], open_push(s), s->sock[JP_STDIN], 1};
    if (!ch.push) {
        log_msg("shell: cannot connect to the iopub thread: %s", zmq_strerror(errno));
        request_stop(s);
    } else {
        serve_loop(&ch);
        zmq_close(ch.push);
    }
    zmq_close(s->sock[JP_SHELL]);
    zmq_close(s->sock[JP_STDIN]);
    return NULL;
}

static void *control_main(void *arg) {
    server *s = arg;
    chan ch = {s, "control", s->sock[JP_CONTROL], open_push(s), NULL, 0};
    if (!ch.push) {
        log_msg("control: cannot connect to the iopub thread: %s", zmq_strerror(errno));
        request_stop(s);
    } else {
        serve_loop(&ch);
        zmq_close(ch.push);
    }
    zmq_close(s->sock[JP_CONTROL]);
    return NULL;
}

static void *heartbeat_main(void *arg) {
    server *s = arg;
    void *hb = s->sock[JP_HB];
    while (!atomic_load(&s->stopping)) {
        zmq_pollitem_t it = {hb, 0, ZMQ_POLLIN, 0};
        int rc = zmq_poll(&it, 1, POLL_MS);
        if (rc < 0) {
            if (errno == EINTR) continue;
            if (errno == ETERM) break;
            continue;
        }
        if (!(it.revents & ZMQ_POLLIN)) continue;
        jp_frame *f;
        size_t n;
        if (wire_recv_frames(hb, ZMQ_DONTWAIT, &f, &n) == 0) {
            wire_send_frames(hb, f, n, ZMQ_DONTWAIT); /* echo verbatim */
            jp_frames_free(f, n);
        }
    }
    zmq_close(hb);
    return NULL;
}

/* Reads what the XPUB iopub socket receives (subscriptions: a first byte of 1, then the
 * topic); returns 1 if one was a subscription. */
static int read_subscriptions(void *pub) {
    int sub = 0;
    unsigned char b[256];
    int len;
    while ((len = zmq_recv(pub, b, sizeof b, ZMQ_DONTWAIT)) >= 0) {
        if (len >= 1 && b[0] == 1) sub = 1;
        int more = 0;
        size_t ml = sizeof more;
        while (zmq_getsockopt(pub, ZMQ_RCVMORE, &more, &ml) == 0 && more &&
               zmq_recv(pub, b, sizeof b, ZMQ_DONTWAIT) >= 0)
            ;
    }
    return sub;
}

/* Until a first client has subscribed, the iopub thread takes nothing from the inproc queue:
 * the messages wait there, in order, and go out once it has. ZeroMQ's PUB socket drops what
 * it sends before a subscription has arrived, and a client may send its first request the
 * moment kernel_info is answered while its SUB socket is still connecting (jupyter console
 * 6.4 does, then waits for that request's idle status: it would wait forever). The XPUB
 * socket sees the subscription. The hold ends at IOPUB_HOLD_S without one (a client that
 * never subscribes does not keep output queued for long) and at shutdown. */
static void *iopub_main(void *arg) {
    server *s = arg;
    void *pub = s->sock[JP_IOPUB], *pull = s->pull;
    int stop = 0, held = 1;
    double hold_until = now_s() + IOPUB_HOLD_S;
    while (!stop) {
        zmq_pollitem_t it[2] = {{pub, 0, ZMQ_POLLIN, 0}, {pull, 0, ZMQ_POLLIN, 0}};
        int timeout = held ? POLL_MS : atomic_load(&s->out.active) ? 10 : POLL_MS * 5;
        int rc = zmq_poll(it, held ? 1 : 2, timeout);
        if (rc < 0 && errno != EINTR) {
            if (errno == ETERM) break;
            log_msg("iopub: poll failed: %s", zmq_strerror(errno));
            continue;
        }
        if (read_subscriptions(pub)) held = 0;
        if (held && (now_s() >= hold_until || atomic_load(&s->stopping))) held = 0;
        if (held) continue;
        /* Under the lock, so that held-back output cannot overtake what was pushed first. */
        pthread_mutex_lock(&s->out.lock);
        jp_frame *f;
        size_t n;
        while (wire_recv_frames(pull, ZMQ_DONTWAIT, &f, &n) == 0) {
            if (n == 1) {
                if (f[0].len == 4 && memcmp(f[0].data, "STOP", 4) == 0) stop = 1;
            } else if (wire_send_frames(pub, f, n, 0) < 0 && errno != EAGAIN) {
                log_msg("iopub: send failed: %s", zmq_strerror(errno));
            }
            jp_frames_free(f, n);
        }
        outq_flush_locked(s, pub, stop);
        pthread_mutex_unlock(&s->out.lock);
    }
    zmq_close(pull);
    zmq_close(pub);
    return NULL;
}

/* ---- setup ---------------------------------------------------------------------------- */

static void on_sigint(int sig) {
    (void)sig;
    server *s = g_srv;
    if (s) interrupt_now(s);
}

static void set_int(void *sock, int opt, int v) {
    zmq_setsockopt(sock, opt, &v, sizeof v);
}

static int open_sockets(server *s) {
    static const int types[JP_NCHANNELS] = {ZMQ_ROUTER, ZMQ_XPUB, ZMQ_ROUTER, ZMQ_ROUTER,
                                            ZMQ_ROUTER};
    for (int ch = 0; ch < JP_NCHANNELS; ch++) {
        void *sock = zmq_socket(s->ctx, types[ch]);
        if (!sock) {
            log_msg("cannot create the %s socket: %s", conn_channel_name(ch), zmq_strerror(errno));
            return -1;
        }
        s->sock[ch] = sock;
        set_int(sock, ZMQ_LINGER, LINGER_MS);
        if (ch == JP_IOPUB) {
            set_int(sock, ZMQ_SNDHWM, IOPUB_SNDHWM);
        } else if (ch != JP_HB) {
            set_int(sock, ZMQ_ROUTER_HANDOVER, 1);
            set_int(sock, ZMQ_SNDHWM, ROUTER_SNDHWM);
        }
        if (zmq_bind(sock, s->conn.endpoint[ch]) < 0) {
            log_msg("cannot bind the %s socket to %s: %s", conn_channel_name(ch),
                    s->conn.endpoint[ch], zmq_strerror(errno));
            return -1;
        }
    }
    s->pull = zmq_socket(s->ctx, ZMQ_PULL);
    if (!s->pull) return -1;
    set_int(s->pull, ZMQ_RCVHWM, 0);
    set_int(s->pull, ZMQ_LINGER, 0);
    if (zmq_bind(s->pull, IOPUB_INPROC) < 0) {
        log_msg("cannot bind %s: %s", IOPUB_INPROC, zmq_strerror(errno));
        return -1;
    }
    return 0;
}

static void close_all(server *s) {
    for (int ch = 0; ch < JP_NCHANNELS; ch++)
        if (s->sock[ch]) zmq_close(s->sock[ch]);
    if (s->pull) zmq_close(s->pull);
}

int server_run(const char *connection_file, interp *in) {
    int fd = fcntl(2, F_DUPFD_CLOEXEC, 3);
    if (fd >= 0) log_fd = fd; /* keep the real stderr even if fd 2 is redirected later */
    if (jp_init() < 0) {
        log_msg("libsodium cannot initialise (no entropy source?)");
        return 1;
    }
    server *s = calloc(1, sizeof *s);
    if (!s) {
        log_msg("out of memory");
        return 1;
    }
    char err[JP_ERRLEN];
    if (conn_load(connection_file, &s->conn, err, sizeof err) < 0) {
        log_msg("%s", err);
        free(s);
        return 1;
    }
    if (s->conn.key_len == 0)
        log_msg("the connection file has an empty key: messages are not signed");
    s->auth.key = s->conn.key;
    s->auth.key_len = s->conn.key_len;
    s->in = in;
    msg_session_init(&s->sess);
    pthread_mutex_init(&s->stop_lock, NULL);
    pthread_cond_init(&s->stop_cond, NULL);
    pthread_mutex_init(&s->interp_lock, NULL);
    pthread_mutex_init(&s->hist_lock, NULL);
    pthread_mutex_init(&s->out.lock, NULL);
    capture_open(s);

    /* Every thread started from here on (ours and libzmq's I/O thread) inherits this mask:
     * SIGINT is taken by the main thread only, so no socket call sees EINTR from it. */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    s->ctx = zmq_ctx_new();
    if (!s->ctx || open_sockets(s) < 0) {
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        capture_close(s);
        if (s->ctx) {
            close_all(s);
            zmq_ctx_term(s->ctx);
        }
        conn_free(&s->conn);
        free(s);
        return 1;
    }
    void *push = open_push(s);
    if (!push) {
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        log_msg("cannot connect to %s: %s", IOPUB_INPROC, zmq_strerror(errno));
        capture_close(s);
        close_all(s);
        zmq_ctx_term(s->ctx);
        conn_free(&s->conn);
        free(s);
        return 1;
    }

    pthread_t t_iopub, t_hb, t_control, t_shell;
    int ok_iopub = pthread_create(&t_iopub, NULL, iopub_main, s) == 0;
    send_broadcast(s, push, NULL, "status", json_pack("{s:s}", "execution_state", "starting"));
    int ok_hb = pthread_create(&t_hb, NULL, heartbeat_main, s) == 0;
    int ok_control = pthread_create(&t_control, NULL, control_main, s) == 0;
    int ok_shell = pthread_create(&t_shell, NULL, shell_main, s) == 0;
    if (s->cap.rd[0] >= 0) {
        s->cap.thread_ok = pthread_create(&s->cap.thread, NULL, capture_main, s) == 0;
        if (!s->cap.thread_ok) {
            log_msg("cannot start the thread that reads fds 1 and 2: they stay in this log");
            capture_close(s);
        }
    }

    g_srv = s;
    struct sigaction sa, old_sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGINT, &sa, &old_sa);
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    int status = 0;
    if (!(ok_iopub && ok_hb && ok_control && ok_shell)) {
        log_msg("cannot start the server threads");
        status = 1;
        request_stop(s);
    } else {
        log_msg("kernel ready: shell %s, session %s", s->conn.endpoint[JP_SHELL], s->sess.session);
    }

    pthread_mutex_lock(&s->stop_lock);
    while (!atomic_load(&s->stopping)) {
        int told = g_parent_signal;
        pid_t gone = launcher_gone();
        if (gone) {
            log_msg("the process that started the kernel (pid %d) is gone%s: stopping", (int)gone,
                    told ? " (parent-death signal)" : "");
            atomic_store(&s->stopping, 1);
            break;
        }
        struct timespec tick;
        clock_gettime(CLOCK_REALTIME, &tick);
        tick.tv_nsec += 250000000L; /* look again 4 times a second */
        if (tick.tv_nsec >= 1000000000L) {
            tick.tv_sec++;
            tick.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&s->stop_cond, &s->stop_lock, &tick);
    }
    pthread_mutex_unlock(&s->stop_lock);

    /* Shutdown: stop a running cell, give the threads a moment, flush iopub, leave. */
    interrupt_now(s);
    if (ok_control) pthread_join(t_control, NULL);
    if (ok_hb) pthread_join(t_hb, NULL);
    int shell_done = 1;
    if (ok_shell) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 2;
        if (pthread_timedjoin_np(t_shell, NULL, &until) != 0) {
            shell_done = 0;
            log_msg("the running cell did not stop within 2 s; exiting without it");
        }
    }
    if (shell_done) capture_close(s);
    zmq_send(push, "STOP", 4, 0);
    zmq_close(push);
    if (ok_iopub) pthread_join(t_iopub, NULL);

    sigaction(SIGINT, &old_sa, NULL);
    if (!shell_done) {
        /* The cell still runs inside the interpreter, so the caller must not free it, and
         * zmq_ctx_term would wait for the shell's sockets forever: end the process here. */
        log_msg("kernel stopped (a cell was still running)");
        _exit(status);
    }
    g_srv = NULL;
    zmq_ctx_term(s->ctx); /* waits at most LINGER_MS for unsent messages */
    for (int i = 0; i < s->out.n_upd; i++) {
        free(s->out.upd[i].id);
        json_decref(s->out.upd[i].content);
    }
    json_decref(s->out.parent);
    history_free(s);
    conn_free(&s->conn);
    free(s->out.s_buf);
    free(s);
    log_msg("kernel stopped");
    if (log_fd != 2) {
        close(log_fd);
        log_fd = 2;
    }
    return status;
}
