/* fuzz_connection.c — libFuzzer harness for the Jupyter connection file (protocol/connection.c):
 * the JSON a launcher writes before it starts the kernel (`lathe kernel -f FILE`).
 *
 * Calls conn_parse, the function conn_load hands the file's bytes to. An accepted file must
 * name five endpoints of its transport and a signature scheme; a refused one must say why.
 */
#include "fuzz/fuzz_util.h"

#include "protocol/protocol.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    jp_connection c;
    char err[JP_ERRLEN] = "";
    if (conn_parse((const char *)data, size, &c, err, sizeof err) != 0) {
        FUZZ_CHECK(err[0] != '\0');
        return 0;
    }
    FUZZ_CHECK(c.ip && c.signature_scheme && c.kernel_name);
    for (int i = 0; i < JP_NCHANNELS; i++) {
        FUZZ_CHECK(c.endpoint[i] != NULL);
        FUZZ_CHECK(strncmp(c.endpoint[i], c.transport, strlen(c.transport)) == 0);
        (void)conn_channel_name((jp_channel)i);
    }
    conn_free(&c);
    return 0;
}
