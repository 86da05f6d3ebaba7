/* http.c — the Hub's HTTP client on libcurl (see http.h): one easy handle per download session
 * (so its connections are reused), the response headers the Hub speaks (X-Repo-Commit,
 * X-Linked-Etag, X-Linked-Size, X-Error-Code, X-Error-Message) parsed per hop, bodies into
 * memory or into a file at an offset. Plain http and https only, also across redirects.
 *
 * Owns the curl handle and nothing on disk: the caller opens, names and renames the files.
 * Without libcurl (configure found none) the same functions exist and refuse with the reason.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include "cuda/hub/http.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* ---- headers (with or without libcurl: fuzz/fuzz_hub.c calls them) ------------------------ */

void hub_response_clear(hub_response *r) {
    memset(r, 0, sizeof *r);
    r->linked_size = r->content_length = r->range_start = -1;
}

static void copy_value(char *dst, size_t cap, const char *v, size_t n) {
    if (n > cap - 1) n = cap - 1;
    memcpy(dst, v, n);
    dst[n] = 0;
}

static int64_t parse_size(const char *v, size_t n) {
    char tmp[32];
    if (n == 0 || n >= sizeof tmp) return -1;
    memcpy(tmp, v, n);
    tmp[n] = 0;
    char *end;
    errno = 0;
    long long x = strtoll(tmp, &end, 10);
    if (errno || *end || x < 0) return -1;
    return (int64_t)x;
}

void hub_response_header(hub_response *r, const char *line, size_t n) {
    size_t len = n;
    while (len && (line[len - 1] == '\r' || line[len - 1] == '\n'))
        len--;
    if (len >= 5 && !strncmp(line, "HTTP/", 5)) { /* a new response: forget the last hop's */
        hub_response_clear(r);
        /* "HTTP/1.1 200 OK", "HTTP/2 302": 100..999 after the first space, else 0 */
        const char *sp = memchr(line, ' ', len);
        size_t at = sp ? (size_t)(sp - line) + 1 : len;
        if (at + 3 <= len && line[at] >= '1' && line[at] <= '9' &&
            isdigit((unsigned char)line[at + 1]) && isdigit((unsigned char)line[at + 2]) &&
            (at + 3 == len || line[at + 3] == ' '))
            r->status = (line[at] - '0') * 100 + (line[at + 1] - '0') * 10 + (line[at + 2] - '0');
        return;
    }
    const char *colon = memchr(line, ':', len);
    if (!colon) return;
    size_t klen = (size_t)(colon - line);
    const char *v = colon + 1;
    size_t vlen = len - klen - 1;
    while (vlen && (*v == ' ' || *v == '\t'))
        v++, vlen--;
    while (vlen && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
        vlen--;
#define IS(name) (klen == sizeof(name) - 1 && !strncasecmp(line, name, klen))
    if (IS("Location")) {
        copy_value(r->location, sizeof r->location, v, vlen);
        r->location_cut = vlen >= sizeof r->location;
    } else if (IS("ETag"))
        copy_value(r->etag, sizeof r->etag, v, vlen);
    else if (IS("X-Linked-Etag"))
        copy_value(r->linked_etag, sizeof r->linked_etag, v, vlen);
    else if (IS("X-Repo-Commit"))
        copy_value(r->commit, sizeof r->commit, v, vlen);
    else if (IS("X-Error-Code"))
        copy_value(r->error_code, sizeof r->error_code, v, vlen);
    else if (IS("X-Error-Message")) { /* shown to the user: control bytes become spaces */
        copy_value(r->error_message, sizeof r->error_message, v, vlen);
        for (char *c = r->error_message; *c; c++)
            if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = ' ';
    } else if (IS("X-Linked-Size"))
        r->linked_size = parse_size(v, vlen);
    else if (IS("Content-Length"))
        r->content_length = parse_size(v, vlen);
    else if (IS("Content-Range") && vlen > 6 && !strncasecmp(v, "bytes ", 6)) {
        const char *dash = memchr(v + 6, '-', vlen - 6);
        if (dash) r->range_start = parse_size(v + 6, (size_t)(dash - v - 6));
    }
#undef IS
}

/* LATHE_HUB_WITHOUT_CURL builds the client a configure without libcurl gives (the tests build
 * both). */
#if defined(HAVE_LIBCURL) && !defined(LATHE_HUB_WITHOUT_CURL)
#include <curl/curl.h>
#include <pthread.h>

#ifndef PACKAGE_VERSION
#define PACKAGE_VERSION "0"
#endif

struct hub_http {
    CURL *c;
    char auth[1100]; /* "Authorization: Bearer ..." or "" */
    long timeout_s, download_s;
    const atomic_int *cancel;
    char curlerr[CURL_ERROR_SIZE];
};

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static CURLcode global_rc = CURLE_FAILED_INIT;

static void global_init(void) {
    global_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

int hub_http_available(void) {
    return 1;
}

const char *hub_http_unavailable_reason(void) {
    return "";
}

lt_status hub_http_open(hub_http **out, const char *token, int timeout_s, int download_s,
                        const atomic_int *cancel, char *err) {
    *out = NULL;
    pthread_once(&global_once, global_init);
    if (global_rc != CURLE_OK)
        return lt_fail(err, LT_ERR_IO, "libcurl could not start: %s",
                       curl_easy_strerror(global_rc));
    hub_http *h = calloc(1, sizeof *h);
    if (!h) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    h->c = curl_easy_init();
    if (!h->c) {
        free(h);
        return lt_fail(err, LT_ERR_IO, "libcurl could not make a handle");
    }
    if (token && *token) snprintf(h->auth, sizeof h->auth, "Authorization: Bearer %s", token);
    h->timeout_s = timeout_s > 0 ? timeout_s : 10;
    h->download_s = download_s > 0 ? download_s : 10;
    h->cancel = cancel;
    *out = h;
    return LT_OK;
}

void hub_http_close(hub_http *h) {
    if (!h) return;
    curl_easy_cleanup(h->c);
    free(h);
}

/* One header line (curl calls this per line, for every hop of a redirect chain). */
static size_t on_header(char *line, size_t size, size_t nitems, void *ctx) {
    size_t n = size * nitems;
    hub_response_header(ctx, line, n);
    return n;
}

/* ---- one request ---------------------------------------------------------------------------- */

static int on_progress(void *ctx, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un) {
    (void)dt, (void)dn, (void)ut, (void)un;
    hub_http *h = ctx;
    return h->cancel && atomic_load(h->cancel) ? 1 : 0;
}

/* Resets the handle (its connections stay) and sets what every request shares. */
static struct curl_slist *request_begin(hub_http *h, const char *url, int auth, hub_response *r) {
    CURL *c = h->c;
    curl_easy_reset(c);
    hub_response_clear(r);
    h->curlerr[0] = 0;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, h->curlerr);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "lathe/" PACKAGE_VERSION);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, h->timeout_s);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, h->timeout_s);
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#else
    curl_easy_setopt(c, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
    curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, h);
    struct curl_slist *hdr = curl_slist_append(NULL, "Accept-Encoding: identity");
    if (hdr && auth && h->auth[0]) {
        struct curl_slist *more = curl_slist_append(hdr, h->auth);
        if (more) hdr = more;
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
    return hdr;
}

/* Runs the request; maps curl's outcome onto lt_status and r->net. own: a message of ours
 * for an abort our own write callback asked for ("" if none). */
static lt_status request_run(hub_http *h, const char *url, hub_response *r, const char *own,
                             char *err) {
    CURLcode rc = curl_easy_perform(h->c);
    char *eff = NULL;
    if (curl_easy_getinfo(h->c, CURLINFO_EFFECTIVE_URL, &eff) == CURLE_OK && eff)
        snprintf(r->url, sizeof r->url, "%s", eff);
    else
        snprintf(r->url, sizeof r->url, "%s", url);
    if (rc == CURLE_OK) {
        r->net = HUB_NET_OK;
        return LT_OK;
    }
    if (rc == CURLE_ABORTED_BY_CALLBACK && h->cancel && atomic_load(h->cancel))
        return lt_fail(err, LT_CANCELLED, "interrupted");
    if (own && *own) return lt_fail(err, LT_ERR_IO, "%s", own);
    r->net = r->status ? HUB_NET_BROKEN : HUB_NET_UNREACHABLE;
    return lt_fail(err, LT_ERR_IO, "%s", h->curlerr[0] ? h->curlerr : curl_easy_strerror(rc));
}

/* ---- GET into memory -------------------------------------------------------------------- */

typedef struct text_sink {
    lt_strbuf *b;
    size_t max;
    int over;
} text_sink;

static size_t on_text(char *data, size_t size, size_t nitems, void *ctx) {
    text_sink *t = ctx;
    size_t n = size * nitems;
    if (t->b->len + n > t->max) {
        t->over = 1;
        return 0;
    }
    return lt_strbuf_put(t->b, data, n) == 0 ? n : 0;
}

lt_status hub_http_get_text(hub_http *h, const char *url, int auth, size_t max, lt_strbuf *body,
                            hub_response *r, char *err) {
    struct curl_slist *hdr = request_begin(h, url, auth, r);
    text_sink t = {body, max, 0};
    curl_easy_setopt(h->c, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h->c, CURLOPT_MAXREDIRS, 10L);
    curl_easy_setopt(h->c, CURLOPT_WRITEFUNCTION, on_text);
    curl_easy_setopt(h->c, CURLOPT_WRITEDATA, &t);
    char own[160] = "";
    lt_status rc = request_run(h, url, r, "", err);
    if (rc == LT_ERR_IO && (t.over || body->oom)) {
        snprintf(own, sizeof own, "%s: the answer is larger than %zu bytes", url, max);
        rc = lt_fail(err, LT_ERR_IO, "%s", t.over ? own : "out of memory");
        r->net = HUB_NET_OK;
    }
    curl_slist_free_all(hdr);
    return rc;
}

/* ---- HEAD ---------------------------------------------------------------------------------- */

lt_status hub_http_head(hub_http *h, const char *url, int auth, hub_response *r, char *err) {
    struct curl_slist *hdr = request_begin(h, url, auth, r);
    curl_easy_setopt(h->c, CURLOPT_NOBODY, 1L);
    curl_easy_setopt(h->c, CURLOPT_FOLLOWLOCATION, 0L);
    lt_status rc = request_run(h, url, r, "", err);
    curl_slist_free_all(hdr);
    return rc;
}

/* ---- GET into a file ------------------------------------------------------------------------ */

typedef struct file_sink {
    hub_http *h;
    hub_response *r;
    int fd;
    int64_t offset, pos, expect;
    int started, skip, failed;
    char why[200];
    hub_http_progress progress;
    void *progress_ctx;
} file_sink;

/* The first bytes of a body decide where they go: a 206 continues at the offset, a 200 starts
 * the file again, anything else is not the file and is dropped. */
static int sink_start(file_sink *s) {
    s->started = 1;
    long status = s->r->status;
    if (status == 206) {
        if (s->r->range_start != s->offset) {
            snprintf(s->why, sizeof s->why,
                     "asked for bytes from %lld, the server sent a range from %lld",
                     (long long)s->offset, (long long)s->r->range_start);
            return -1;
        }
        s->pos = s->offset;
    } else if (status == 200) {
        if (ftruncate(s->fd, 0) != 0) {
            snprintf(s->why, sizeof s->why, "cannot truncate the partial file: %s",
                     strerror(errno));
            return -1;
        }
        s->pos = 0;
    } else {
        s->skip = 1;
    }
    return 0;
}

static size_t on_file(char *data, size_t size, size_t nitems, void *ctx) {
    file_sink *s = ctx;
    size_t n = size * nitems;
    if (!s->started && sink_start(s) != 0) {
        s->failed = 1;
        return 0;
    }
    if (s->skip) return n;
    for (size_t done = 0; done < n;) {
        ssize_t w = pwrite(s->fd, data + done, n - done, (off_t)s->pos);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            snprintf(s->why, sizeof s->why, "cannot write the partial file: %s",
                     w < 0 ? strerror(errno) : "no space written");
            s->failed = 1;
            return 0;
        }
        done += (size_t)w;
        s->pos += w;
    }
    if (s->progress) s->progress(s->progress_ctx, s->pos, s->expect);
    return n;
}

lt_status hub_http_download(hub_http *h, const char *url, int auth, int fd, int64_t offset,
                            int64_t expect, int64_t *size, hub_http_progress progress,
                            void *progress_ctx, hub_response *r, char *err) {
    struct curl_slist *hdr = request_begin(h, url, auth, r);
    if (offset > 0) {
        char range[64];
        snprintf(range, sizeof range, "Range: bytes=%lld-", (long long)offset);
        struct curl_slist *more = curl_slist_append(hdr, range);
        if (!more) {
            curl_slist_free_all(hdr);
            return lt_fail(err, LT_ERR_MEMORY, "out of memory");
        }
        hdr = more;
        curl_easy_setopt(h->c, CURLOPT_HTTPHEADER, hdr);
    }
    file_sink s = {.h = h,
                   .r = r,
                   .fd = fd,
                   .offset = offset,
                   .pos = offset,
                   .expect = expect,
                   .progress = progress,
                   .progress_ctx = progress_ctx};
    curl_easy_setopt(h->c, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h->c, CURLOPT_MAXREDIRS, 10L);
    curl_easy_setopt(h->c, CURLOPT_LOW_SPEED_TIME, h->download_s);
    curl_easy_setopt(h->c, CURLOPT_WRITEFUNCTION, on_file);
    curl_easy_setopt(h->c, CURLOPT_WRITEDATA, &s);
    lt_status rc = request_run(h, url, r, "", err);
    if (rc == LT_ERR_IO && s.failed) {
        rc = lt_fail(err, LT_ERR_IO, "%s", s.why);
        r->net = HUB_NET_OK;
    }
    if (rc == LT_OK && !s.started && r->status == 200) { /* an empty 200 body */
        s.started = 1;
        if (ftruncate(fd, 0) != 0)
            rc = lt_fail(err, LT_ERR_IO, "cannot truncate: %s", strerror(errno));
        s.pos = 0;
    }
    /* What the file holds: a body that never started leaves it as it was. */
    *size = s.started && !s.skip ? s.pos : offset;
    curl_slist_free_all(hdr);
    return rc;
}

#else /* no libcurl */

struct hub_http {
    int unused;
};

int hub_http_available(void) {
    return 0;
}

const char *hub_http_unavailable_reason(void) {
    return "this build of lathe has no HTTP client (configure found no libcurl; install "
           "libcurl4-openssl-dev and run ./configure again)";
}

lt_status hub_http_open(hub_http **h, const char *token, int timeout_s, int download_s,
                        const atomic_int *cancel, char *err) {
    (void)token, (void)timeout_s, (void)download_s, (void)cancel;
    *h = NULL;
    return lt_fail(err, LT_ERR_IO, "%s", hub_http_unavailable_reason());
}

void hub_http_close(hub_http *h) {
    (void)h;
}

lt_status hub_http_get_text(hub_http *h, const char *url, int auth, size_t max, lt_strbuf *body,
                            hub_response *r, char *err) {
    (void)h, (void)url, (void)auth, (void)max, (void)body;
    memset(r, 0, sizeof *r);
    r->net = HUB_NET_UNREACHABLE;
    return lt_fail(err, LT_ERR_IO, "%s", hub_http_unavailable_reason());
}

lt_status hub_http_head(hub_http *h, const char *url, int auth, hub_response *r, char *err) {
    return hub_http_get_text(h, url, auth, 0, NULL, r, err);
}

lt_status hub_http_download(hub_http *h, const char *url, int auth, int fd, int64_t offset,
                            int64_t expect, int64_t *size, hub_http_progress progress,
                            void *progress_ctx, hub_response *r, char *err) {
    (void)fd, (void)expect, (void)progress, (void)progress_ctx;
    *size = offset;
    return hub_http_get_text(h, url, auth, 0, NULL, r, err);
}

#endif
