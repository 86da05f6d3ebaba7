/* http.h — the Hub's HTTP client: one connection-reusing handle, three kinds of request (a
 * small GET into memory, a HEAD that does not follow redirects, a GET streamed into a file
 * from an offset with a Range request). Engine-private; libcurl underneath when configure
 * found it, and without it every request fails with the reason (hub_http_available says so).
 *
 * A request returns LT_OK when an HTTP response arrived, whatever its status (the caller reads
 * hub_response), LT_CANCELLED when the cancel flag rose, and LT_ERR_IO when no complete
 * response came (r->net says which: the server could not be reached, or the transfer broke
 * after it started), with curl's reason in err. Knows HTTP, nothing of repositories, caches or
 * models; sends the token only when the caller asks.
 */
#ifndef LATHE_HUB_HTTP_H
#define LATHE_HUB_HTTP_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda/base/error.h"
#include "cuda/base/strbuf.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct hub_http hub_http;

typedef enum hub_net {
    HUB_NET_OK = 0,          /* a response arrived */
    HUB_NET_UNREACHABLE = 1, /* no response: name resolution, connect or TLS failed, timed out */
    HUB_NET_BROKEN = 2,      /* the response started and then broke (dropped, stalled) */
} hub_net;

/* The longest URL kept (a CDN's signed Location runs to a few thousand bytes). */
#define HUB_URL 16384

/* The headers of the last response (the last hop when redirects were followed). */
typedef struct hub_response {
    long status;
    hub_net net;
    char url[HUB_URL];       /* the URL that answered */
    char location[HUB_URL];  /* Location, as sent */
    int location_cut;        /* 1 when Location was longer than HUB_URL - 1 bytes */
    char etag[256];          /* ETag, as sent */
    char linked_etag[256];   /* X-Linked-Etag (the LFS file's SHA-256 on a redirect) */
    char commit[128];        /* X-Repo-Commit */
    char error_code[64];     /* X-Error-Code (RepoNotFound, RevisionNotFound, GatedRepo...) */
    char error_message[256]; /* X-Error-Message */
    int64_t linked_size;     /* X-Linked-Size, -1 if absent */
    int64_t content_length;  /* Content-Length, -1 if absent */
    int64_t range_start;     /* a 206's Content-Range start, -1 if absent */
} hub_response;

/* Called as a body is written: bytes of the file so far, its full size (-1 unknown). */
typedef void (*hub_http_progress)(void *ctx, int64_t done, int64_t total);

/* The headers of a response as curl hands them over, a line at a time (with its CRLF): a
 * status line ("HTTP/...") starts a new hop and clears what an earlier hop said; the headers
 * above fill their fields (values cut at the field's size, sizes -1 unless a whole non-negative
 * decimal). Pure, for fuzz/fuzz_hub.c as well; the same with or without libcurl. */
void hub_response_clear(hub_response *r);
void hub_response_header(hub_response *r, const char *line, size_t n);

/* 1 when this build can make requests (it has libcurl), else 0. */
int hub_http_available(void);
/* Why it cannot, for messages ("this build of lathe has no libcurl ..."). */
const char *hub_http_unavailable_reason(void);

/* token: NULL or "" for none. timeout_s: the connect timeout and the longest stall of a GET into
 * memory or a HEAD; download_s: the longest stall of a download. cancel: polled while a request
 * runs (NULL: never). */
lt_status hub_http_open(hub_http **h, const char *token, int timeout_s, int download_s,
                        const atomic_int *cancel, char *err);
void hub_http_close(hub_http *h);

/* GET url into body (at most max bytes), following redirects. auth: send the token. */
lt_status hub_http_get_text(hub_http *h, const char *url, int auth, size_t max, lt_strbuf *body,
                            hub_response *r, char *err);
/* HEAD url without following redirects, with Accept-Encoding: identity (the real size). */
lt_status hub_http_head(hub_http *h, const char *url, int auth, hub_response *r, char *err);
/* GET url into the open file fd, following redirects. offset > 0 asks for bytes offset- with a
 * Range header: a 206 from offset is appended there; a 200 (the server ignored the Range)
 * rewrites the file from 0. The body of a response that is not 200/206 is not written.
 * *size: the file's length afterwards (what it holds). expect: the full size, for progress. */
lt_status hub_http_download(hub_http *h, const char *url, int auth, int fd, int64_t offset,
                            int64_t expect, int64_t *size, hub_http_progress progress,
                            void *progress_ctx, hub_response *r, char *err);

#ifdef __cplusplus
}
#endif

#endif
