/* message.c — headers, ids, dates, and the reply / broadcast builders.
 *
 * Owns what goes into a header (jupyter_client's docs/messaging.rst, "Message Header"): msg_id
 * (UUID4), session (one UUID4 per process), username, date (ISO 8601 UTC with microseconds and
 * "Z"), msg_type, version "5.4". A reply copies the request's identities and its header verbatim as
 * parent_header; a broadcast gets a "kernel.<session>.<msg_type>" topic frame. Builds jp_msg values
 * only: encoding and sending are wire.c's and the server's.
 */
#include "protocol/protocol.h"

#include <pwd.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void msg_new_id(char out[37]) {
    unsigned char b[16];
    randombytes_buf(b, sizeof b);
    b[6] = (unsigned char)((b[6] & 0x0F) | 0x40); /* version 4 */
    b[8] = (unsigned char)((b[8] & 0x3F) | 0x80); /* RFC 4122 variant */
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
             b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
}

void msg_iso_now(char out[32]) {
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    char day[24];
    strftime(day, sizeof day, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, 32, "%.19s.%06uZ", day, (unsigned)(ts.tv_nsec / 1000) % 1000000u);
}

void msg_session_init(jp_session *s) {
    memset(s, 0, sizeof *s);
    msg_new_id(s->session);
    struct passwd pw, *res = NULL;
    char buf[1024];
    if (getpwuid_r(getuid(), &pw, buf, sizeof buf, &res) == 0 && res && res->pw_name &&
        jp_utf8_valid(res->pw_name, strlen(res->pw_name)))
        snprintf(s->username, sizeof s->username, "%s", res->pw_name);
    else
        snprintf(s->username, sizeof s->username, "kernel");
}

json_t *msg_header_new(const jp_session *s, const char *msg_type) {
    char id[37], date[32];
    msg_new_id(id);
    msg_iso_now(date);
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "msg_id", id, "session", s->session,
                     "username", s->username, "date", date, "msg_type", msg_type, "version",
                     JP_PROTOCOL_VERSION);
}

/* Shared tail of both builders: header, parent, metadata {}, content (stolen). */
static int fill(const jp_session *s, const json_t *parent, const char *msg_type, json_t *content,
                jp_msg *out) {
    out->header = msg_header_new(s, msg_type);
    /* A verbatim copy: clients compare parent_header.msg_id/msg_type with the request. */
    out->parent_header = parent ? json_deep_copy(parent) : json_object();
    out->metadata = json_object();
    out->content = content ? content : json_object();
    if (!out->header || !out->parent_header || !out->metadata || !out->content) {
        jp_msg_free(out);
        return -1;
    }
    return 0;
}

int msg_reply(const jp_session *s, const jp_msg *req, const char *msg_type, json_t *content,
              jp_msg *out) {
    jp_msg_init(out);
    if (req->n_idents) {
        out->idents = jp_frames_dup(req->idents, req->n_idents);
        if (!out->idents) {
            json_decref(content);
            return -1;
        }
        out->n_idents = req->n_idents;
    }
    return fill(s, req->header, msg_type, content, out);
}

int msg_broadcast(const jp_session *s, const json_t *parent, const char *msg_type, json_t *content,
                  jp_msg *out) {
    jp_msg_init(out);
    char topic[128];
    int n = snprintf(topic, sizeof topic, "kernel.%s.%s", s->session, msg_type);
    if (n < 0 || (size_t)n >= sizeof topic) n = (int)strlen(topic);
    out->idents = calloc(1, sizeof *out->idents);
    if (!out->idents || !(out->idents[0].data = malloc((size_t)n))) {
        free(out->idents);
        out->idents = NULL;
        json_decref(content);
        return -1;
    }
    memcpy(out->idents[0].data, topic, (size_t)n);
    out->idents[0].len = (size_t)n;
    out->n_idents = 1;
    return fill(s, parent, msg_type, content, out);
}

const char *msg_type(const jp_msg *m) {
    return json_string_value(json_object_get(m->header, "msg_type"));
}

const char *msg_content_str(const jp_msg *m, const char *key) {
    return json_string_value(json_object_get(m->content, key));
}
