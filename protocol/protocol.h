/* protocol.h — the Jupyter wire protocol (v5.4) as a small C library.
 *
 * Three parts, one file each:
 *   connection.c  connection file (JSON) -> five endpoints, HMAC key, signature scheme;
 *   wire.c        multipart ZeroMQ frames <-> jp_msg (identities, "<IDS|MSG>", HMAC-SHA256
 *                 signature with constant-time verify, four JSON parts, raw buffers), plus
 *                 the UTF-8 helpers every JSON string needs;
 *   message.c     headers (msg_id, session, username, ISO-8601 UTC date, version "5.4"),
 *                 reply and broadcast builders (parent header copied verbatim).
 * This library knows messages, not magics: it never includes anything from kernel/ or cuda/.
 * Public names are prefixed jp_ (types), conn_, wire_ and msg_. Errors are values: every
 * function that can fail returns -1 (or NULL) and writes a one-line reason into err.
 * Thread safety: functions are reentrant; call jp_init() once before any thread starts.
 */
#ifndef LATHE_PROTOCOL_H
#define LATHE_PROTOCOL_H

#include <jansson.h>
#include <stddef.h>

#define JP_PROTOCOL_VERSION "5.4"
#define JP_DELIMITER "<IDS|MSG>"
#define JP_DELIMITER_LEN 9
#define JP_ERRLEN 256

/* Initialises libsodium; 0 on success, -1 when it cannot (no entropy source). */
int jp_init(void);

/* ---- connection file -------------------------------------------------------------- */

/* The five channels, in the order the connection file lists ports. */
typedef enum jp_channel {
    JP_SHELL = 0,
    JP_IOPUB,
    JP_STDIN,
    JP_CONTROL,
    JP_HB,
    JP_NCHANNELS
} jp_channel;

typedef struct jp_connection {
    char transport[8];            /* "tcp" or "ipc" */
    char *ip;                     /* tcp: address; ipc: path prefix */
    int port[JP_NCHANNELS];       /* indexed by jp_channel */
    unsigned char *key;           /* HMAC key bytes as written (not hex-decoded) */
    size_t key_len;               /* 0 => messages are neither signed nor verified */
    char *signature_scheme;       /* "hmac-sha256" (the only one supported) */
    char *kernel_name;            /* informative; "" when absent */
    char *endpoint[JP_NCHANNELS]; /* "tcp://IP:PORT" or "ipc://IP-PORT" */
} jp_connection;

/* Name of a channel ("shell", "iopub", ...) and of its port key ("shell_port", ...). */
const char *conn_channel_name(jp_channel ch);

/* Parses connection-file JSON text of `len` bytes. On success fills *c (release with
 * conn_free) and returns 0; on failure returns -1 and names the key and accepted form. */
int conn_parse(const char *text, size_t len, jp_connection *c, char *err, size_t errlen);
/* Reads and parses the file at `path` (errors name the file). */
int conn_load(const char *path, jp_connection *c, char *err, size_t errlen);
void conn_free(jp_connection *c);

/* ---- frames and messages ---------------------------------------------------------- */

/* One ZeroMQ frame: owned bytes (not NUL-terminated in general). */
typedef struct jp_frame {
    unsigned char *data;
    size_t len;
} jp_frame;

/* A decoded message. Every JSON part is an object owned by the message. */
typedef struct jp_msg {
    jp_frame *idents; /* routing frames before the delimiter (ROUTER) or the topic (PUB) */
    size_t n_idents;
    json_t *header;
    json_t *parent_header;
    json_t *metadata;
    json_t *content;
    jp_frame *buffers; /* raw frames after content; not signed */
    size_t n_buffers;
} jp_msg;

/* The signing key (borrowed bytes; key_len 0 => unsigned). */
typedef struct jp_auth {
    const unsigned char *key;
    size_t key_len;
} jp_auth;

/* Result codes of wire_decode (negative = dropped). */
enum {
    WIRE_OK = 0,
    WIRE_ERR_NO_DELIMITER = -1, /* no "<IDS|MSG>" frame */
    WIRE_ERR_SHORT = -2,        /* fewer than 5 frames after the delimiter */
    WIRE_ERR_SIGNATURE = -3,    /* wrong, missing or malformed signature */
    WIRE_ERR_JSON = -4,         /* a JSON part is not a valid JSON object */
    WIRE_ERR_HEADER = -5,       /* header lacks msg_id / msg_type strings */
    WIRE_ERR_NOMEM = -6
};

void jp_frames_free(jp_frame *frames, size_t n);
/* Deep-copies n frames (NULL on allocation failure, or when n == 0). */
jp_frame *jp_frames_dup(const jp_frame *frames, size_t n);

/* Initialises *m to the empty message (every pointer NULL). */
void jp_msg_init(jp_msg *m);
void jp_msg_free(jp_msg *m);

/* HMAC-SHA256 over the concatenation of the four parts, as 64 lowercase hex digits plus a
 * NUL in hex[65]. With an empty key writes "" (unsigned). Returns 0, or -1 on failure. */
int wire_sign(const jp_auth *auth, const jp_frame parts[4], char hex[65]);
/* Constant-time check of `sig` (len bytes) against the four parts: 1 = valid, 0 = not.
 * With an empty key every signature is accepted (signing disabled). */
int wire_verify(const jp_auth *auth, const jp_frame *sig, const jp_frame parts[4]);

/* Splits frames into a message: identities, delimiter, signature (verified over the
 * received bytes), header, parent_header, metadata, content (parsed with json_loadb; a part
 * with invalid UTF-8 or a lone surrogate escape is repaired to U+FFFD and parsed again),
 * buffers. Returns WIRE_OK and fills *m, or a WIRE_ERR_* code with err set. */
int wire_decode(const jp_auth *auth, const jp_frame *frames, size_t n, jp_msg *m, char *err,
                size_t errlen);
/* For a message that wire_decode refused with WIRE_ERR_JSON or WIRE_ERR_HEADER, i.e. one whose
 * signature verified but whose parts are malformed: fills *m with what an error reply needs —
 * the identities and the header (as parsed; when it is not a JSON object, the string values of
 * msg_id, msg_type, session, username, date and version found in its text, so a header cut
 * short still names its request). header is then an object, possibly empty, without a
 * msg_type that is not a string; the other parts stay NULL. Call it only after such a
 * verdict: it does not check the signature. 0, or -1 (no delimiter, too few frames, OOM). */
int wire_salvage(const jp_frame *frames, size_t n, jp_msg *m);
/* Serialises *m to frames: identities, delimiter, signature, 4 compact JSON parts,
 * buffers. NULL JSON parts are sent as {}. Returns 0 and a new frame array (free with
 * jp_frames_free), or -1. */
int wire_encode(const jp_auth *auth, const jp_msg *m, jp_frame **frames, size_t *n, char *err,
                size_t errlen);

/* ZeroMQ helpers (sock is a void * libzmq socket). wire_recv_frames reads every part of
 * the next message; returns 0, or -1 with errno as zmq_recv left it (EAGAIN with
 * ZMQ_DONTWAIT and nothing queued, ETERM on context shutdown). wire_send_frames sends
 * them as one multipart message; 0 or -1. */
int wire_recv_frames(void *sock, int flags, jp_frame **frames, size_t *n);
int wire_send_frames(void *sock, const jp_frame *frames, size_t n, int flags);

/* ---- UTF-8 helpers ---------------------------------------------------------------- */

/* 1 when s[0..len) is valid UTF-8 with no NUL byte, else 0. */
int jp_utf8_valid(const char *s, size_t len);
/* A malloc'd NUL-terminated copy of s[0..len) in which every invalid UTF-8 sequence (and
 * every NUL byte) is replaced by U+FFFD. NULL only when out of memory. */
char *jp_utf8_sanitize(const char *s, size_t len);
/* json_stringn that never fails on bad bytes (sanitizes first); NULL only on OOM. */
json_t *jp_json_string(const char *s, size_t len);
/* Number of code points in s[0..len) (invalid bytes count one each). */
size_t jp_utf8_count(const char *s, size_t len);
/* Byte offset of code point `cp` in s[0..len) (clamped to len). */
size_t jp_utf8_offset(const char *s, size_t len, size_t cp);

/* ---- message builders ------------------------------------------------------------- */

/* Identity of this kernel process in every header it sends. */
typedef struct jp_session {
    char session[40]; /* one UUID4 per process */
    char username[64];
} jp_session;

/* Fills *s with a fresh random session id and the current user's name (or "kernel"). */
void msg_session_init(jp_session *s);
/* A new UUID4 as 36 characters + NUL. */
void msg_new_id(char out[37]);
/* Current UTC time as "YYYY-MM-DDTHH:MM:SS.ffffffZ" (27 characters + NUL). */
void msg_iso_now(char out[32]);
/* A new header object with the six keys clients require. NULL on OOM. */
json_t *msg_header_new(const jp_session *s, const char *msg_type);

/* The reply to `req` on its own channel: req's identities, a new header of `msg_type`,
 * parent_header = a verbatim copy of req's header, metadata {}, content (reference
 * stolen; NULL => {}). Fills *out (jp_msg_free it); 0, or -1 on OOM. */
int msg_reply(const jp_session *s, const jp_msg *req, const char *msg_type, json_t *content,
              jp_msg *out);
/* An iopub broadcast: topic frame "kernel.<session>.<msg_type>", parent header copied from
 * `parent` (NULL => {}), content stolen. 0, or -1 on OOM. */
int msg_broadcast(const jp_session *s, const json_t *parent, const char *msg_type, json_t *content,
                  jp_msg *out);

/* Convenience accessors: the header's msg_type / a string field of content (or NULL). */
const char *msg_type(const jp_msg *m);
const char *msg_content_str(const jp_msg *m, const char *key);

#endif
