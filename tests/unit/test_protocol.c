/* test_protocol.c — unit tests of protocol/: connection files, wire framing, HMAC, headers.
 *
 * Golden signatures were computed independently with Python's hmac module:
 *   hmac.new(KEY, digestmod=hashlib.sha256) updated with the four JSON frames below.
 * No sockets are used except a socket-free check of the UTF-8 helpers; prints TAP.
 */
#include "protocol/protocol.h"

#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/unit/tap.h"

#define KEY "a0436f6c-1916-498b-8eb9-e81ab9368e84"
#define HDR                                                                                        \
    "{\"msg_id\":\"abc\",\"msg_type\":\"kernel_info_request\",\"session\":\"s1\","                 \
    "\"username\":\"u\",\"date\":\"2026-01-01T00:00:00.000000Z\",\"version\":\"5.4\"}"
/* content with an escaped non-ASCII character (as Python's json.dumps writes it) */
#define CONTENT_ESC "{\"code\":\"%echo h\\u00e9\"}"
#define SIG_ESC "072a7967a50797e0cc8be3d1d876482600832922496375479bc3f820c04f47ed"
/* the same content with raw UTF-8 (as jansson writes it) */
#define CONTENT_RAW "{\"code\":\"%echo h\xc3\xa9\"}"
#define SIG_RAW "ae2cb4afa0a234e4b6e7ad3655a8ffbdf9e11af5b5f5652026e4dc8108709246"

static const jp_auth auth = {(const unsigned char *)KEY, sizeof KEY - 1};
static const jp_auth noauth = {NULL, 0};

static jp_frame fr(const char *s) {
    jp_frame f = {(unsigned char *)s, strlen(s)};
    return f;
}

/* frames: idents..., delimiter, sig, header, parent, metadata, content */
static size_t golden(jp_frame *f, const char *sig, const char *content) {
    size_t k = 0;
    f[k++] = fr("client-id-1");
    f[k++] = fr("client-id-2");
    f[k++] = fr(JP_DELIMITER);
    f[k++] = fr(sig);
    f[k++] = fr(HDR);
    f[k++] = fr("{}");
    f[k++] = fr("{}");
    f[k++] = fr(content);
    return k;
}

static int frame_is(const jp_frame *f, const char *s) {
    return f->len == strlen(s) && memcmp(f->data, s, f->len) == 0;
}

static void test_sign(void) {
    jp_frame parts[4] = {fr(HDR), fr("{}"), fr("{}"), fr(CONTENT_ESC)};
    char hex[65];
    ok(wire_sign(&auth, parts, hex) == 0, "wire_sign succeeds");
    is_str(hex, SIG_ESC, "HMAC-SHA256 matches Python's hmac");
    jp_frame good = fr(SIG_ESC), bad = fr(SIG_RAW), empty = fr(""),
             upper = fr("072A7967A50797E0CC8BE3D1D876482600832922496375479BC3F820C04F47ED");
    ok(wire_verify(&auth, &good, parts) == 1, "verify: correct signature accepted");
    ok(wire_verify(&auth, &bad, parts) == 0, "verify: other signature rejected");
    ok(wire_verify(&auth, &empty, parts) == 0, "verify: empty signature with a key rejected");
    ok(wire_verify(&auth, &upper, parts) == 0, "verify: uppercase hex rejected (bytes differ)");
    jp_frame tampered[4] = {fr(HDR), fr("{}"), fr("{ }"), fr(CONTENT_ESC)};
    ok(wire_verify(&auth, &good, tampered) == 0, "verify: whitespace change in metadata "
                                                 "invalidates the signature");
    ok(wire_sign(&noauth, parts, hex) == 0 && hex[0] == '\0', "empty key: empty signature");
    ok(wire_verify(&noauth, &empty, parts) == 1, "empty key: unsigned message accepted");
}

static void test_decode_golden(void) {
    jp_frame f[16];
    size_t n = golden(f, SIG_ESC, CONTENT_ESC);
    jp_msg m;
    char err[JP_ERRLEN] = "";
    int rc = wire_decode(&auth, f, n, &m, err, sizeof err);
    is_int(rc, WIRE_OK, "decode golden frames");
    if (rc != WIRE_OK) {
        diag("%s", err);
        return;
    }
    is_int(m.n_idents, 2, "two identities kept");
    ok(frame_is(&m.idents[0], "client-id-1") && frame_is(&m.idents[1], "client-id-2"),
       "identities in order");
    is_str(msg_type(&m), "kernel_info_request", "msg_type read from header");
    is_str(msg_content_str(&m, "code"), "%echo h\xc3\xa9", "escaped UTF-8 decoded");
    is_int(m.n_buffers, 0, "no buffers");

    /* Re-encode with the parsed header: jansson's compact form equals the golden bytes. */
    jp_frame *out;
    size_t nout;
    ok(wire_encode(&auth, &m, &out, &nout, err, sizeof err) == 0, "encode decoded message");
    is_int(nout, 8, "encode: 2 idents + delimiter + signature + 4 parts");
    ok(frame_is(&out[0], "client-id-1") && frame_is(&out[1], "client-id-2"),
       "encode: identities round trip");
    ok(frame_is(&out[2], JP_DELIMITER), "encode: delimiter");
    ok(frame_is(&out[4], HDR), "encode: header bytes identical to golden");
    ok(frame_is(&out[7], CONTENT_RAW), "encode: content as raw UTF-8");
    ok(frame_is(&out[3], SIG_RAW), "encode: signature equals Python's over the raw content");
    jp_frames_free(out, nout);
    jp_msg_free(&m);
}

static void test_decode_bad(void) {
    jp_frame f[16];
    jp_msg m;
    char err[JP_ERRLEN];
    size_t n = golden(f, SIG_RAW, CONTENT_ESC); /* signature of other bytes */
    is_int(wire_decode(&auth, f, n, &m, err, sizeof err), WIRE_ERR_SIGNATURE,
           "bad signature rejected");
    n = golden(f, "", CONTENT_ESC);
    is_int(wire_decode(&auth, f, n, &m, err, sizeof err), WIRE_ERR_SIGNATURE,
           "missing signature rejected");
    n = golden(f, "", CONTENT_ESC);
    is_int(wire_decode(&noauth, f, n, &m, err, sizeof err), WIRE_OK,
           "empty key: unsigned message accepted");
    jp_msg_free(&m);

    n = golden(f, SIG_ESC, CONTENT_ESC);
    is_int(wire_decode(&auth, f, n - 1, &m, err, sizeof err), WIRE_ERR_SHORT,
           "missing content frame rejected");
    ok(strstr(err, "need at least 5") != NULL, "short message error says what is needed");
    is_int(wire_decode(&auth, f + 3, n - 3, &m, err, sizeof err), WIRE_ERR_NO_DELIMITER,
           "no delimiter rejected");
    is_int(wire_decode(&auth, f, 0, &m, err, sizeof err), WIRE_ERR_NO_DELIMITER,
           "zero frames rejected");

    /* extra frames after content are buffers */
    jp_frame g[16];
    n = golden(g, SIG_ESC, CONTENT_ESC);
    g[n++] = fr("raw\x01");
    g[n++] = fr("");
    is_int(wire_decode(&auth, g, n, &m, err, sizeof err), WIRE_OK, "extra frames accepted");
    is_int(m.n_buffers, 2, "extra frames become buffers");
    ok(m.n_buffers == 2 && frame_is(&m.buffers[0], "raw\x01"), "buffer bytes kept");
    jp_msg_free(&m);

    /* malformed JSON in each part (unsigned, so only the JSON check applies) */
    static const char *names[4] = {"header", "parent_header", "metadata", "content"};
    for (int part = 0; part < 4; part++) {
        n = golden(f, "", CONTENT_ESC);
        f[4 + part] = fr(part == 2 ? "[1,2]" : "{\"a\":");
        char name[64];
        snprintf(name, sizeof name, "malformed %s rejected", names[part]);
        is_int(wire_decode(&noauth, f, n, &m, err, sizeof err), WIRE_ERR_JSON, name);
        ok(strstr(err, names[part]) != NULL, "error names the part");
    }
    n = golden(f, "", CONTENT_ESC);
    f[4] = fr("{\"msg_id\":\"x\"}");
    is_int(wire_decode(&noauth, f, n, &m, err, sizeof err), WIRE_ERR_HEADER,
           "header without msg_type rejected");

    /* invalid UTF-8 and a lone surrogate escape are repaired, not fatal */
    n = golden(f, "", CONTENT_ESC);
    f[7] = fr("{\"code\":\"a\xff"
              "b\",\"x\":\"\\ud800\",\"y\":\"\\ud83d\\ude00\",\"z\":\"\\\\ud800\"}");
    is_int(wire_decode(&noauth, f, n, &m, err, sizeof err), WIRE_OK,
           "invalid UTF-8 in content repaired");
    is_str(msg_content_str(&m, "code"),
           "a\xef\xbf\xbd"
           "b",
           "bad byte -> U+FFFD");
    is_str(msg_content_str(&m, "x"), "\xef\xbf\xbd", "lone surrogate -> U+FFFD");
    is_str(msg_content_str(&m, "y"), "\xf0\x9f\x98\x80", "surrogate pair kept");
    is_str(msg_content_str(&m, "z"), "\\ud800", "escaped backslash is not an escape");
    jp_msg_free(&m);
}

static void test_utf8(void) {
    ok(jp_utf8_valid("h\xc3\xa9", 3), "valid UTF-8");
    ok(!jp_utf8_valid("\xc3", 1), "truncated sequence invalid");
    ok(!jp_utf8_valid("\xed\xa0\x80", 3), "encoded surrogate invalid");
    ok(!jp_utf8_valid("\xc0\xaf", 2), "overlong invalid");
    ok(!jp_utf8_valid("a\0b", 3), "NUL invalid");
    char *s = jp_utf8_sanitize("a\xff\xfe"
                               "b",
                               4);
    is_str(s,
           "a\xef\xbf\xbd\xef\xbf\xbd"
           "b",
           "sanitize replaces each bad byte");
    free(s);
    json_t *j = jp_json_string("x\x80", 2);
    ok(j && strcmp(json_string_value(j), "x\xef\xbf\xbd") == 0, "jp_json_string repairs");
    json_decref(j);
    const char *t = "h\xc3\xa9llo \xf0\x9f\x98\x80!"; /* hé llo 😀 ! */
    size_t len = strlen(t);
    is_int(jp_utf8_count(t, len), 8, "code points counted");
    is_int(jp_utf8_offset(t, len, 2), 3, "offset of code point 2");
    is_int(jp_utf8_offset(t, len, 7), 11, "offset after a 4-byte character");
    is_int(jp_utf8_offset(t, len, 100), len, "offset clamped");
}

static void test_header(void) {
    jp_session s;
    msg_session_init(&s);
    regex_t uuid, date;
    regcomp(&uuid, "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
            REG_EXTENDED | REG_NOSUB);
    regcomp(&date, "^[0-9]{4}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9]\\.[0-9]{6}Z$",
            REG_EXTENDED | REG_NOSUB);
    ok(regexec(&uuid, s.session, 0, NULL, 0) == 0, "session is a UUID4");
    ok(s.username[0] != '\0', "username set");
    char d[32];
    msg_iso_now(d);
    ok(regexec(&date, d, 0, NULL, 0) == 0, "ISO-8601 UTC date with microseconds and Z");
    diag("date %s", d);

    json_t *h = msg_header_new(&s, "execute_reply");
    ok(h && json_object_size(h) == 6, "header has exactly six keys");
    is_str(json_string_value(json_object_get(h, "version")), "5.4", "version 5.4");
    is_str(json_string_value(json_object_get(h, "msg_type")), "execute_reply", "msg_type");
    is_str(json_string_value(json_object_get(h, "session")), s.session, "session");
    ok(regexec(&uuid, json_string_value(json_object_get(h, "msg_id")), 0, NULL, 0) == 0,
       "msg_id is a UUID4");
    ok(regexec(&date, json_string_value(json_object_get(h, "date")), 0, NULL, 0) == 0,
       "header date format");
    json_t *h2 = msg_header_new(&s, "execute_reply");
    ok(strcmp(json_string_value(json_object_get(h, "msg_id")),
              json_string_value(json_object_get(h2, "msg_id"))) != 0,
       "msg_id differs between headers");
    json_decref(h);
    json_decref(h2);

    jp_session s2;
    msg_session_init(&s2);
    ok(strcmp(s.session, s2.session) != 0, "a new session id each init");

    /* reply: identities copied, parent header verbatim */
    jp_frame f[16];
    size_t n = golden(f, SIG_ESC, CONTENT_ESC);
    jp_msg req, rep;
    char err[JP_ERRLEN];
    if (wire_decode(&auth, f, n, &req, err, sizeof err) != WIRE_OK) {
        ok(0, "decode for reply");
        return;
    }
    json_object_set_new(req.header, "extra_key", json_string("kept"));
    ok(msg_reply(&s, &req, "kernel_info_reply", json_pack("{s:s}", "status", "ok"), &rep) == 0,
       "msg_reply");
    ok(json_equal(rep.parent_header, req.header), "parent_header equals request header");
    is_str(json_string_value(json_object_get(rep.parent_header, "extra_key")), "kept",
           "unknown header keys copied verbatim");
    ok(rep.n_idents == 2 && frame_is(&rep.idents[1], "client-id-2"), "reply identities");
    is_str(msg_type(&rep), "kernel_info_reply", "reply msg_type");
    ok(json_is_object(rep.metadata) && json_object_size(rep.metadata) == 0, "metadata {}");
    /* encode + decode round trip with verification */
    jp_frame *out;
    size_t nout;
    jp_msg back;
    ok(wire_encode(&auth, &rep, &out, &nout, err, sizeof err) == 0 &&
           wire_decode(&auth, out, nout, &back, err, sizeof err) == WIRE_OK,
       "reply round trips through encode/decode with signature");
    ok(json_equal(back.header, rep.header) && json_equal(back.content, rep.content),
       "round trip keeps header and content");
    jp_msg_free(&back);
    jp_frames_free(out, nout);
    jp_msg_free(&rep);

    jp_msg b;
    ok(msg_broadcast(&s, req.header, "status", json_pack("{s:s}", "execution_state", "busy"), &b) ==
           0,
       "msg_broadcast");
    char topic[96];
    snprintf(topic, sizeof topic, "kernel.%s.status", s.session);
    ok(b.n_idents == 1 && frame_is(&b.idents[0], topic), "broadcast topic frame");
    ok(json_equal(b.parent_header, req.header), "broadcast parent header");
    jp_msg_free(&b);
    ok(msg_broadcast(&s, NULL, "status", NULL, &b) == 0 && json_object_size(b.parent_header) == 0,
       "broadcast without parent: {}");
    jp_msg_free(&b);
    jp_msg_free(&req);
    regfree(&uuid);
    regfree(&date);
}

static int write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fputs(text, f);
    return fclose(f);
}

static void test_connection(void) {
    jp_connection c;
    char err[JP_ERRLEN];
    const char *tcp = "{\"shell_port\": 5001, \"iopub_port\": 5002, \"stdin_port\": 5003,"
                      " \"control_port\": 5004, \"hb_port\": 5005, \"ip\": \"127.0.0.1\","
                      " \"key\": \"" KEY "\", \"transport\": \"tcp\","
                      " \"signature_scheme\": \"hmac-sha256\", \"kernel_name\": \"lathe\","
                      " \"unknown_field\": [1, 2]}";
    ok(conn_parse(tcp, strlen(tcp), &c, err, sizeof err) == 0, "parse tcp connection file");
    is_str(c.endpoint[JP_SHELL], "tcp://127.0.0.1:5001", "shell endpoint");
    is_str(c.endpoint[JP_IOPUB], "tcp://127.0.0.1:5002", "iopub endpoint");
    is_str(c.endpoint[JP_STDIN], "tcp://127.0.0.1:5003", "stdin endpoint");
    is_str(c.endpoint[JP_CONTROL], "tcp://127.0.0.1:5004", "control endpoint");
    is_str(c.endpoint[JP_HB], "tcp://127.0.0.1:5005", "hb endpoint");
    ok(c.key_len == strlen(KEY) && memcmp(c.key, KEY, c.key_len) == 0, "key used byte for byte");
    is_str(c.signature_scheme, "hmac-sha256", "scheme");
    is_str(c.kernel_name, "lathe", "kernel_name");
    conn_free(&c);

    const char *ipc = "{\"shell_port\": 1, \"iopub_port\": 2, \"stdin_port\": 3,"
                      " \"control_port\": 4, \"hb_port\": 5, \"ip\": \"/tmp/kernel-x\","
                      " \"key\": \"\", \"transport\": \"ipc\", \"signature_scheme\": \"\"}";
    ok(conn_parse(ipc, strlen(ipc), &c, err, sizeof err) == 0, "parse ipc connection file");
    is_str(c.endpoint[JP_SHELL], "ipc:///tmp/kernel-x-1", "ipc endpoint uses a hyphen");
    is_str(c.endpoint[JP_HB], "ipc:///tmp/kernel-x-5", "ipc hb endpoint");
    is_int(c.key_len, 0, "empty key => unsigned");
    conn_free(&c);

    const char *noshell = "{\"iopub_port\": 2, \"stdin_port\": 3, \"control_port\": 4,"
                          " \"hb_port\": 5, \"ip\": \"127.0.0.1\", \"key\": \"k\"}";
    ok(conn_parse(noshell, strlen(noshell), &c, err, sizeof err) < 0,
       "missing shell_port rejected");
    ok(strstr(err, "shell_port") != NULL, "error names shell_port");

    const char *nokey = "{\"shell_port\": 1, \"iopub_port\": 2, \"stdin_port\": 3,"
                        " \"control_port\": 4, \"hb_port\": 5, \"ip\": \"127.0.0.1\"}";
    ok(conn_parse(nokey, strlen(nokey), &c, err, sizeof err) == 0 && c.key_len == 0,
       "missing key => signing disabled");
    conn_free(&c);

    const char *badport = "{\"shell_port\": \"x\", \"iopub_port\": 2, \"stdin_port\": 3,"
                          " \"control_port\": 4, \"hb_port\": 5}";
    ok(conn_parse(badport, strlen(badport), &c, err, sizeof err) < 0 && strstr(err, "shell_port") &&
           strstr(err, "integer"),
       "non-integer port rejected with the key named");
    const char *badscheme = "{\"shell_port\": 1, \"iopub_port\": 2, \"stdin_port\": 3,"
                            " \"control_port\": 4, \"hb_port\": 5, \"key\": \"k\","
                            " \"signature_scheme\": \"hmac-md5\"}";
    ok(conn_parse(badscheme, strlen(badscheme), &c, err, sizeof err) < 0 &&
           strstr(err, "hmac-sha256"),
       "unsupported scheme rejected, accepted form named");
    const char *badtransport = "{\"transport\": \"udp\", \"shell_port\": 1}";
    ok(conn_parse(badtransport, strlen(badtransport), &c, err, sizeof err) < 0 &&
           strstr(err, "transport"),
       "unknown transport rejected");
    ok(conn_parse("{\"shell_port\":", 14, &c, err, sizeof err) < 0 && strstr(err, "JSON"),
       "truncated JSON rejected");
    ok(conn_parse("[1]", 3, &c, err, sizeof err) < 0, "non-object rejected");

    char path[] = "/tmp/lathe-conn-XXXXXX";
    int fd = mkstemp(path);
    if (fd >= 0) close(fd);
    ok(fd >= 0 && write_file(path, tcp) == 0, "write temp connection file");
    ok(conn_load(path, &c, err, sizeof err) == 0 && c.port[JP_CONTROL] == 5004,
       "conn_load reads the file");
    conn_free(&c);
    unlink(path);
    ok(conn_load(path, &c, err, sizeof err) < 0 && strstr(err, path),
       "missing file: error names the path");
}

int main(void) {
    if (jp_init() < 0) {
        printf("not ok 1 - sodium_init\n1..1\n");
        return 1;
    }
    test_sign();
    test_decode_golden();
    test_decode_bad();
    test_utf8();
    test_header();
    test_connection();
    return tap_done();
}
