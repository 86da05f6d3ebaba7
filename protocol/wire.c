/* wire.c — multipart ZeroMQ frames <-> jp_msg, HMAC-SHA256 signing, UTF-8 repair.
 *
 * Owns the byte layout of a Jupyter message (jupyter_client's docs/messaging.rst,
 * "The Wire Protocol"):
 *   [ident...] "<IDS|MSG>" signature header parent_header metadata content [buffer...]
 * The signature is the lowercase hex HMAC-SHA256 (libsodium) of the four JSON parts exactly
 * as received or sent, compared in constant time; an empty key means "unsigned". JSON parts
 * are parsed with json_loadb (frames are not NUL-terminated). Knows nothing about message
 * types or channels beyond the framing; never touches a socket it did not receive.
 */
#include "protocol/protocol.h"

#include <errno.h>
#include <sodium.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

int jp_init(void) {
    return sodium_init() < 0 ? -1 : 0;
}

/* ---- frames ---------------------------------------------------------------------- */

void jp_frames_free(jp_frame *frames, size_t n) {
    if (!frames) return;
    for (size_t i = 0; i < n; i++)
        free(frames[i].data);
    free(frames);
}

jp_frame *jp_frames_dup(const jp_frame *frames, size_t n) {
    if (n == 0) return NULL;
    jp_frame *out = calloc(n, sizeof *out);
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) {
        out[i].data = malloc(frames[i].len ? frames[i].len : 1);
        if (!out[i].data) {
            jp_frames_free(out, i);
            return NULL;
        }
        if (frames[i].len) memcpy(out[i].data, frames[i].data, frames[i].len);
        out[i].len = frames[i].len;
    }
    return out;
}

void jp_msg_init(jp_msg *m) {
    memset(m, 0, sizeof *m);
}

void jp_msg_free(jp_msg *m) {
    if (!m) return;
    jp_frames_free(m->idents, m->n_idents);
    json_decref(m->header);
    json_decref(m->parent_header);
    json_decref(m->metadata);
    json_decref(m->content);
    jp_frames_free(m->buffers, m->n_buffers);
    jp_msg_init(m);
}

/* ---- signatures ------------------------------------------------------------------- */

static int hmac_parts(const jp_auth *auth, const jp_frame parts[4],
                      unsigned char mac[crypto_auth_hmacsha256_BYTES]) {
    crypto_auth_hmacsha256_state st;
    if (crypto_auth_hmacsha256_init(&st, auth->key, auth->key_len) != 0) return -1;
    for (int i = 0; i < 4; i++)
        if (crypto_auth_hmacsha256_update(&st, parts[i].data, parts[i].len) != 0) return -1;
    return crypto_auth_hmacsha256_final(&st, mac) == 0 ? 0 : -1;
}

int wire_sign(const jp_auth *auth, const jp_frame parts[4], char hex[65]) {
    hex[0] = '\0';
    if (!auth || auth->key_len == 0) return 0;
    unsigned char mac[crypto_auth_hmacsha256_BYTES];
    if (hmac_parts(auth, parts, mac) < 0) return -1;
    sodium_bin2hex(hex, 65, mac, sizeof mac);
    return 0;
}

int wire_verify(const jp_auth *auth, const jp_frame *sig, const jp_frame parts[4]) {
    if (!auth || auth->key_len == 0) return 1;
    if (!sig || sig->len != 2 * crypto_auth_hmacsha256_BYTES) return 0;
    char want[65];
    if (wire_sign(auth, parts, want) < 0) return 0;
    /* Clients send lowercase hex; compare the bytes as sent, in constant time. */
    return sodium_memcmp(want, sig->data, 64) == 0;
}

/* ---- UTF-8 ------------------------------------------------------------------------ */

/* Length of the valid UTF-8 sequence at s[0..n), or 0 when it is not one. NUL is invalid
 * here because jansson strings and C strings cannot carry it. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c == 0) return 0;
    if (c < 0x80) return 1;
    size_t need;
    uint32_t cp, min;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
        cp = c & 0x1F;
        min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        cp = c & 0x0F;
        min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        cp = c & 0x07;
        min = 0x10000;
    } else {
        return 0;
    }
    if (n < need) return 0;
    for (size_t i = 1; i < need; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return need;
}

int jp_utf8_valid(const char *s, size_t len) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        size_t k = utf8_seq(p + i, len - i);
        if (!k) return 0;
        i += k;
    }
    return 1;
}

char *jp_utf8_sanitize(const char *s, size_t len) {
    const unsigned char *p = (const unsigned char *)s;
    /* Worst case each bad byte becomes 3 bytes of U+FFFD. */
    if (len > (SIZE_MAX - 1) / 3) return NULL;
    char *out = malloc(3 * len + 1);
    if (!out) return NULL;
    size_t i = 0, o = 0;
    while (i < len) {
        size_t k = utf8_seq(p + i, len - i);
        if (k) {
            memcpy(out + o, p + i, k);
            o += k;
            i += k;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i += 1;
        }
    }
    out[o] = '\0';
    return out;
}

json_t *jp_json_string(const char *s, size_t len) {
    if (!s) return json_string("");
    if (jp_utf8_valid(s, len)) return json_stringn(s, len);
    char *clean = jp_utf8_sanitize(s, len);
    if (!clean) return NULL;
    json_t *j = json_string(clean);
    free(clean);
    return j;
}

size_t jp_utf8_count(const char *s, size_t len) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, n = 0;
    while (i < len) {
        size_t k = utf8_seq(p + i, len - i);
        i += k ? k : 1;
        n++;
    }
    return n;
}

size_t jp_utf8_offset(const char *s, size_t len, size_t cp) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len && cp > 0) {
        size_t k = utf8_seq(p + i, len - i);
        i += k ? k : 1;
        cp--;
    }
    return i;
}

static int hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The code unit of a "\uXXXX" escape at s[i] (s[i] == '\\'), or -1. */
static long escape_unit(const unsigned char *s, size_t len, size_t i) {
    if (i + 6 > len || s[i] != '\\' || s[i + 1] != 'u') return -1;
    long v = 0;
    for (int k = 2; k < 6; k++) {
        int h = hexval(s[i + k]);
        if (h < 0) return -1;
        v = v * 16 + h;
    }
    return v;
}

/* JSON text repaired for jansson: invalid UTF-8 bytes -> U+FFFD, "\u0000" and unpaired
 * surrogate escapes -> "\ufffd". Everything else is copied unchanged. NULL on OOM. */
static char *json_text_repair(const unsigned char *s, size_t len, size_t *out_len) {
    char *clean = jp_utf8_sanitize((const char *)s, len);
    if (!clean) return NULL;
    unsigned char *p = (unsigned char *)clean;
    size_t n = strlen(clean);
    for (size_t i = 0; i + 1 < n; i++) {
        if (p[i] != '\\') continue;
        long u = escape_unit(p, n, i);
        if (u < 0) {
            i++; /* skip the escaped character (e.g. "\\\\") */
            continue;
        }
        int bad = 0;
        if (u == 0) {
            bad = 1;
        } else if (u >= 0xD800 && u <= 0xDBFF) {
            long lo = escape_unit(p, n, i + 6);
            if (lo >= 0xDC00 && lo <= 0xDFFF) {
                i += 11; /* a valid pair: keep both */
                continue;
            }
            bad = 1;
        } else if (u >= 0xDC00 && u <= 0xDFFF) {
            bad = 1;
        }
        if (bad) memcpy(p + i + 2, "fffd", 4);
        i += 5;
    }
    *out_len = n;
    return clean;
}

/* Parses one JSON part into an object; repairs bad text once before giving up. */
static json_t *part_load(const jp_frame *f, const char *what, char *err, size_t errlen) {
    json_error_t jerr;
    json_t *j = json_loadb((const char *)f->data, f->len, 0, &jerr);
    if (!j) {
        size_t n;
        char *fixed = json_text_repair(f->data, f->len, &n);
        if (fixed) {
            j = json_loadb(fixed, n, 0, NULL);
            free(fixed);
        }
    }
    if (!j) {
        snprintf(err, errlen, "%s is not valid JSON (%s at byte %d)", what, jerr.text,
                 jerr.position);
        return NULL;
    }
    if (!json_is_object(j)) {
        snprintf(err, errlen, "%s is not a JSON object", what);
        json_decref(j);
        return NULL;
    }
    return j;
}

/* ---- decode / encode -------------------------------------------------------------- */

int wire_decode(const jp_auth *auth, const jp_frame *frames, size_t n, jp_msg *m, char *err,
                size_t errlen) {
    jp_msg_init(m);
    size_t d = 0;
    while (d < n && !(frames[d].len == JP_DELIMITER_LEN &&
                      memcmp(frames[d].data, JP_DELIMITER, JP_DELIMITER_LEN) == 0))
        d++;
    if (d == n) {
        snprintf(err, errlen, "no <IDS|MSG> delimiter among %zu frames", n);
        return WIRE_ERR_NO_DELIMITER;
    }
    if (n - d - 1 < 5) {
        snprintf(err, errlen,
                 "%zu frames after <IDS|MSG>, need at least 5 "
                 "(signature, header, parent_header, metadata, content)",
                 n - d - 1);
        return WIRE_ERR_SHORT;
    }
    const jp_frame *sig = &frames[d + 1];
    const jp_frame *parts = &frames[d + 2];
    if (!wire_verify(auth, sig, parts)) {
        snprintf(err, errlen, sig->len ? "invalid signature" : "missing signature");
        return WIRE_ERR_SIGNATURE;
    }
    static const char *const names[4] = {"header", "parent_header", "metadata", "content"};
    json_t **dst[4] = {&m->header, &m->parent_header, &m->metadata, &m->content};
    for (int i = 0; i < 4; i++) {
        *dst[i] = part_load(&parts[i], names[i], err, errlen);
        if (!*dst[i]) {
            jp_msg_free(m);
            return WIRE_ERR_JSON;
        }
    }
    if (!json_is_string(json_object_get(m->header, "msg_type")) ||
        !json_is_string(json_object_get(m->header, "msg_id"))) {
        snprintf(err, errlen, "header lacks a string msg_type or msg_id");
        jp_msg_free(m);
        return WIRE_ERR_HEADER;
    }
    if (d > 0) {
        m->idents = jp_frames_dup(frames, d);
        if (!m->idents) goto nomem;
        m->n_idents = d;
    }
    size_t nb = n - d - 6;
    if (nb > 0) {
        m->buffers = jp_frames_dup(frames + d + 6, nb);
        if (!m->buffers) goto nomem;
        m->n_buffers = nb;
    }
    return WIRE_OK;
nomem:
    snprintf(err, errlen, "out of memory");
    jp_msg_free(m);
    return WIRE_ERR_NOMEM;
}

/* The string value of "key" in JSON text that does not parse (e.g. cut short): the first
 * `"key" : "..."` found, unescaped by jansson. NULL when absent or not a plain string. */
static json_t *scan_string(const unsigned char *s, size_t len, const char *key) {
    size_t kl = strlen(key);
    for (size_t i = 0; i + kl + 2 <= len; i++) {
        if (s[i] != '"' || memcmp(s + i + 1, key, kl) != 0 || s[i + 1 + kl] != '"') continue;
        size_t j = i + kl + 2;
        while (j < len && (s[j] == ' ' || s[j] == '\t' || s[j] == '\n' || s[j] == '\r'))
            j++;
        if (j >= len || s[j] != ':') continue;
        j++;
        while (j < len && (s[j] == ' ' || s[j] == '\t' || s[j] == '\n' || s[j] == '\r'))
            j++;
        if (j >= len || s[j] != '"') continue;
        size_t k = j + 1;
        while (k < len && s[k] != '"')
            k += s[k] == '\\' ? 2 : 1;
        if (k >= len) return NULL;
        size_t n;
        char *text = json_text_repair(s + j, k + 1 - j, &n);
        json_t *v = text ? json_loadb(text, n, JSON_DECODE_ANY, NULL) : NULL;
        free(text);
        if (json_is_string(v)) return v;
        json_decref(v);
        return NULL;
    }
    return NULL;
}

int wire_salvage(const jp_frame *frames, size_t n, jp_msg *m) {
    jp_msg_init(m);
    size_t d = 0;
    while (d < n && !(frames[d].len == JP_DELIMITER_LEN &&
                      memcmp(frames[d].data, JP_DELIMITER, JP_DELIMITER_LEN) == 0))
        d++;
    if (d == n || n - d - 1 < 5) return -1;
    if (d > 0) {
        m->idents = jp_frames_dup(frames, d);
        if (!m->idents) return -1;
        m->n_idents = d;
    }
    char err[JP_ERRLEN];
    const jp_frame *h = &frames[d + 2];
    m->header = part_load(h, "header", err, sizeof err);
    if (!m->header) {
        static const char *const keys[] = {"msg_id",   "msg_type", "session",
                                           "username", "date",     "version"};
        m->header = json_object();
        if (!m->header) {
            jp_msg_free(m);
            return -1;
        }
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
            json_t *v = scan_string(h->data, h->len, keys[i]);
            if (v) json_object_set_new(m->header, keys[i], v);
        }
    }
    /* a msg_type or msg_id that is not a string is no use to a reply */
    if (!json_is_string(json_object_get(m->header, "msg_type")))
        json_object_del(m->header, "msg_type");
    return 0;
}

int wire_encode(const jp_auth *auth, const jp_msg *m, jp_frame **out, size_t *n_out, char *err,
                size_t errlen) {
    *out = NULL;
    *n_out = 0;
    size_t n = m->n_idents + 6 + m->n_buffers;
    jp_frame *f = calloc(n, sizeof *f);
    if (!f) goto nomem;
    size_t k = 0;
    for (size_t i = 0; i < m->n_idents; i++, k++) {
        f[k].data = malloc(m->idents[i].len ? m->idents[i].len : 1);
        if (!f[k].data) goto nomem;
        if (m->idents[i].len) memcpy(f[k].data, m->idents[i].data, m->idents[i].len);
        f[k].len = m->idents[i].len;
    }
    f[k].data = malloc(JP_DELIMITER_LEN);
    if (!f[k].data) goto nomem;
    memcpy(f[k].data, JP_DELIMITER, JP_DELIMITER_LEN);
    f[k].len = JP_DELIMITER_LEN;
    k++;
    size_t sig_at = k++;
    json_t *parts[4] = {m->header, m->parent_header, m->metadata, m->content};
    for (int i = 0; i < 4; i++, k++) {
        if (!parts[i]) {
            f[k].data = malloc(2);
            if (!f[k].data) goto nomem;
            memcpy(f[k].data, "{}", 2);
            f[k].len = 2;
            continue;
        }
        size_t len = json_dumpb(parts[i], NULL, 0, JSON_COMPACT);
        if (len == 0) {
            snprintf(err, errlen, "a JSON part cannot be serialised (NaN or invalid string?)");
            jp_frames_free(f, n);
            return -1;
        }
        f[k].data = malloc(len);
        if (!f[k].data) goto nomem;
        f[k].len = json_dumpb(parts[i], (char *)f[k].data, len, JSON_COMPACT);
    }
    char hex[65];
    if (wire_sign(auth, &f[sig_at + 1], hex) < 0) {
        snprintf(err, errlen, "HMAC computation failed");
        jp_frames_free(f, n);
        return -1;
    }
    size_t hl = strlen(hex);
    f[sig_at].data = malloc(hl ? hl : 1);
    if (!f[sig_at].data) goto nomem;
    memcpy(f[sig_at].data, hex, hl);
    f[sig_at].len = hl;
    for (size_t i = 0; i < m->n_buffers; i++, k++) {
        f[k].data = malloc(m->buffers[i].len ? m->buffers[i].len : 1);
        if (!f[k].data) goto nomem;
        if (m->buffers[i].len) memcpy(f[k].data, m->buffers[i].data, m->buffers[i].len);
        f[k].len = m->buffers[i].len;
    }
    *out = f;
    *n_out = n;
    return 0;
nomem:
    snprintf(err, errlen, "out of memory");
    jp_frames_free(f, f ? n : 0);
    return -1;
}

/* ---- sockets ---------------------------------------------------------------------- */

int wire_recv_frames(void *sock, int flags, jp_frame **frames, size_t *n) {
    *frames = NULL;
    *n = 0;
    size_t cap = 0, len = 0;
    jp_frame *f = NULL;
    int more = 1, oom = 0;
    while (more) {
        zmq_msg_t part;
        zmq_msg_init(&part);
        int rc;
        /* Once the first part arrived the rest are already queued: never block mid-way. */
        do {
            rc = zmq_msg_recv(&part, sock, len == 0 && !oom ? flags : 0);
        } while (rc < 0 && errno == EINTR);
        if (rc < 0) {
            int e = errno;
            zmq_msg_close(&part);
            jp_frames_free(f, len);
            errno = e;
            return -1;
        }
        more = zmq_msg_more(&part);
        if (!oom && len == cap) {
            size_t nc = cap ? cap * 2 : 8;
            jp_frame *nf = realloc(f, nc * sizeof *nf);
            if (nf) {
                f = nf;
                cap = nc;
            } else {
                oom = 1;
            }
        }
        if (!oom) {
            /* Keep reading after a failed allocation so the socket stays in step. */
            size_t sz = zmq_msg_size(&part);
            f[len].data = malloc(sz ? sz : 1);
            if (f[len].data) {
                if (sz) memcpy(f[len].data, zmq_msg_data(&part), sz);
                f[len].len = sz;
                len++;
            } else {
                oom = 1;
            }
        }
        zmq_msg_close(&part);
    }
    if (oom) {
        jp_frames_free(f, len);
        errno = ENOMEM;
        return -1;
    }
    *frames = f;
    *n = len;
    return 0;
}

int wire_send_frames(void *sock, const jp_frame *frames, size_t n, int flags) {
    for (size_t i = 0; i < n; i++) {
        int fl = flags | (i + 1 < n ? ZMQ_SNDMORE : 0);
        int rc;
        do {
            rc = zmq_send(sock, frames[i].data, frames[i].len, fl);
        } while (rc < 0 && errno == EINTR);
        if (rc < 0) return -1;
    }
    return 0;
}
