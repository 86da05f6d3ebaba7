/* fuzz_wire.c — libFuzzer harness for the Jupyter wire format (protocol/wire.c), signed and
 * unsigned: the bytes a ZeroMQ peer sends before anything checks who sent them.
 *
 * Input: byte 0 picks the mode (bit 0: signed with the key "fuzz-key"; bit 1: the harness
 * writes the correct HMAC over the four JSON parts, so mutations reach the JSON parsing of a
 * signed message, not only the signature check), then frames as [u16 little-endian length,
 * bytes]. It calls wire_decode as the server does on every received message; a decoded message
 * must encode again (wire_encode), decode back to equal JSON, and build a reply (msg_reply).
 * The UTF-8 repair the decoder relies on is checked on the raw bytes: its output is valid.
 * Touches no socket.
 */
#include "fuzz/fuzz_util.h"

#include <sodium.h>

#include "protocol/protocol.h"

#define MAX_FRAMES 64

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    if (jp_init() != 0) abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* UTF-8 helpers on the raw bytes */
    char *clean = jp_utf8_sanitize((const char *)data, size);
    FUZZ_CHECK(clean != NULL);
    FUZZ_CHECK(jp_utf8_valid(clean, strlen(clean)));
    size_t cps = jp_utf8_count((const char *)data, size);
    FUZZ_CHECK(jp_utf8_offset((const char *)data, size, cps) == size);
    free(clean);

    if (size < 1) return 0;
    int mode = data[0];
    static const unsigned char key[] = "fuzz-key";
    jp_auth auth = {key, (mode & 1) ? sizeof key - 1 : 0};
    jp_frame frames[MAX_FRAMES];
    size_t n = 0, p = 1;
    while (p + 2 <= size && n < MAX_FRAMES) {
        size_t len = (size_t)data[p] | (size_t)data[p + 1] << 8;
        p += 2;
        if (len > size - p) len = size - p;
        frames[n].data = (unsigned char *)(uintptr_t)(data + p);
        frames[n].len = len;
        n++;
        p += len;
    }
    /* a correct signature over the parts after the delimiter, when asked for */
    char hex[65];
    if ((mode & 3) == 3) {
        for (size_t d = 0; d + 5 < n; d++) {
            if (frames[d].len == JP_DELIMITER_LEN &&
                memcmp(frames[d].data, JP_DELIMITER, JP_DELIMITER_LEN) == 0) {
                FUZZ_CHECK(wire_sign(&auth, &frames[d + 2], hex) == 0);
                frames[d + 1].data = (unsigned char *)hex;
                frames[d + 1].len = 64;
                break;
            }
        }
    }
    jp_msg m;
    char err[JP_ERRLEN];
    int rc = wire_decode(&auth, frames, n, &m, err, sizeof err);
    if (rc != WIRE_OK) {
        FUZZ_CHECK(rc < 0 && err[0]);
        return 0;
    }
    FUZZ_CHECK(msg_type(&m) != NULL);
    /* round trip: what we decoded encodes, and decodes back to the same JSON */
    jp_frame *out = NULL;
    size_t nout = 0;
    FUZZ_CHECK(wire_encode(&auth, &m, &out, &nout, err, sizeof err) == 0);
    jp_msg back;
    FUZZ_CHECK(wire_decode(&auth, out, nout, &back, err, sizeof err) == WIRE_OK);
    FUZZ_CHECK(json_equal(back.header, m.header) && json_equal(back.content, m.content) &&
               json_equal(back.parent_header, m.parent_header) &&
               json_equal(back.metadata, m.metadata));
    FUZZ_CHECK(back.n_idents == m.n_idents && back.n_buffers == m.n_buffers);
    jp_msg_free(&back);
    jp_frames_free(out, nout);
    /* the reply the kernel would send */
    jp_session s;
    memset(&s, 0, sizeof s);
    snprintf(s.session, sizeof s.session, "fuzz-session");
    snprintf(s.username, sizeof s.username, "fuzz");
    jp_msg reply;
    FUZZ_CHECK(msg_reply(&s, &m, "fuzz_reply", NULL, &reply) == 0);
    FUZZ_CHECK(wire_encode(&auth, &reply, &out, &nout, err, sizeof err) == 0);
    jp_frames_free(out, nout);
    jp_msg_free(&reply);
    (void)msg_content_str(&m, "code");
    jp_msg_free(&m);
    return 0;
}
