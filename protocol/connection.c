/* connection.c — reads a Jupyter connection file into endpoints, key and signature scheme.
 *
 * Owns jp_connection and the conn_* functions. The file is the JSON object a client writes before
 * starting the kernel (jupyter_client's docs/kernels.rst, "Connection files"): transport, ip, five
 * *_port integers, key, signature_scheme. The key is used byte for byte (never hex-decoded); an
 * empty key turns signing off. Unknown fields are ignored. Endpoints are "tcp://IP:PORT" or
 * "ipc://IP-PORT". Touches no socket: binding is the server's job.
 */
#include "protocol/protocol.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const channel_names[JP_NCHANNELS] = {"shell", "iopub", "stdin", "control", "hb"};

const char *conn_channel_name(jp_channel ch) {
    return (ch >= 0 && ch < JP_NCHANNELS) ? channel_names[ch] : "?";
}

void conn_free(jp_connection *c) {
    if (!c) return;
    free(c->ip);
    if (c->key) {
        memset(c->key, 0, c->key_len);
        free(c->key);
    }
    free(c->signature_scheme);
    free(c->kernel_name);
    for (int i = 0; i < JP_NCHANNELS; i++)
        free(c->endpoint[i]);
    memset(c, 0, sizeof *c);
}

/* A string field: *out = malloc'd copy, or the default when absent. */
static int get_string(json_t *root, const char *name, const char *dflt, char **out, size_t *out_len,
                      char *err, size_t errlen) {
    json_t *v = json_object_get(root, name);
    const char *s = dflt;
    size_t n = dflt ? strlen(dflt) : 0;
    if (v) {
        if (!json_is_string(v)) {
            snprintf(err, errlen, "connection file: '%s' must be a string", name);
            return -1;
        }
        s = json_string_value(v);
        n = json_string_length(v);
    }
    *out = malloc(n + 1);
    if (!*out) {
        snprintf(err, errlen, "connection file: out of memory");
        return -1;
    }
    if (n) memcpy(*out, s, n); /* s is NULL for an absent key without a default */
    (*out)[n] = '\0';
    if (out_len) *out_len = n;
    return 0;
}

int conn_parse(const char *text, size_t len, jp_connection *c, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    json_error_t jerr;
    json_t *root = json_loadb(text, len, 0, &jerr);
    if (!root) {
        snprintf(err, errlen, "connection file is not valid JSON (line %d: %s)", jerr.line,
                 jerr.text);
        return -1;
    }
    if (!json_is_object(root)) {
        snprintf(err, errlen, "connection file must hold a JSON object");
        goto fail;
    }

    /* transport */
    json_t *t = json_object_get(root, "transport");
    const char *transport = t ? json_string_value(t) : "tcp";
    if (!transport || (strcmp(transport, "tcp") != 0 && strcmp(transport, "ipc") != 0)) {
        snprintf(err, errlen, "connection file: 'transport' must be \"tcp\" or \"ipc\"");
        goto fail;
    }
    snprintf(c->transport, sizeof c->transport, "%s", transport);

    if (get_string(root, "ip", strcmp(transport, "tcp") == 0 ? "127.0.0.1" : NULL, &c->ip, NULL,
                   err, errlen) < 0)
        goto fail;
    if (!c->ip || !c->ip[0]) {
        snprintf(err, errlen,
                 "connection file: 'ip' must be a non-empty string (ipc needs a "
                 "path prefix)");
        goto fail;
    }

    for (int ch = 0; ch < JP_NCHANNELS; ch++) {
        char key[32];
        snprintf(key, sizeof key, "%s_port", channel_names[ch]);
        json_t *p = json_object_get(root, key);
        if (!p) {
            if (ch == JP_SHELL)
                snprintf(err, errlen,
                         "connection file has no 'shell_port': lathe needs a connection file "
                         "with transport, ip and the five *_port integers (a 5.6 registration "
                         "file is not supported)");
            else
                snprintf(err, errlen, "connection file: missing '%s' (an integer port)", key);
            goto fail;
        }
        json_int_t v;
        if (json_is_integer(p)) {
            v = json_integer_value(p);
        } else if (json_is_string(p)) {
            /* Some hand-written files quote ports; accept plain decimal strings. */
            char *end;
            errno = 0;
            long lv = strtol(json_string_value(p), &end, 10);
            if (errno || end == json_string_value(p) || *end) {
                snprintf(err, errlen, "connection file: '%s' must be an integer, got \"%s\"", key,
                         json_string_value(p));
                goto fail;
            }
            v = lv;
        } else {
            snprintf(err, errlen, "connection file: '%s' must be an integer", key);
            goto fail;
        }
        if (v < 0 || v > 65535) {
            snprintf(err, errlen, "connection file: '%s' = %lld is out of range 0..65535", key,
                     (long long)v);
            goto fail;
        }
        c->port[ch] = (int)v;
    }

    /* key: bytes as written; absent => signing off (with a warning left to the caller). */
    char *key = NULL;
    size_t key_len = 0;
    if (get_string(root, "key", "", &key, &key_len, err, errlen) < 0) goto fail;
    c->key = (unsigned char *)key;
    c->key_len = key_len;

    if (get_string(root, "signature_scheme", "hmac-sha256", &c->signature_scheme, NULL, err,
                   errlen) < 0)
        goto fail;
    if (c->key_len > 0 && strcmp(c->signature_scheme, "hmac-sha256") != 0) {
        snprintf(err, errlen,
                 "connection file: signature_scheme \"%s\" is not supported (accepted: "
                 "\"hmac-sha256\")",
                 c->signature_scheme);
        goto fail;
    }
    if (get_string(root, "kernel_name", "", &c->kernel_name, NULL, err, errlen) < 0) goto fail;

    for (int ch = 0; ch < JP_NCHANNELS; ch++) {
        size_t n = strlen(c->ip) + 32;
        c->endpoint[ch] = malloc(n);
        if (!c->endpoint[ch]) {
            snprintf(err, errlen, "connection file: out of memory");
            goto fail;
        }
        if (strcmp(c->transport, "tcp") == 0)
            snprintf(c->endpoint[ch], n, "tcp://%s:%d", c->ip, c->port[ch]);
        else
            snprintf(c->endpoint[ch], n, "ipc://%s-%d", c->ip, c->port[ch]);
    }
    json_decref(root);
    return 0;

fail:
    json_decref(root);
    conn_free(c);
    return -1;
}

int conn_load(const char *path, jp_connection *c, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open connection file %s: %s", path, strerror(errno));
        return -1;
    }
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (!buf) {
        fclose(f);
        snprintf(err, errlen, "connection file %s: out of memory", path);
        return -1;
    }
    for (;;) {
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) break;
        if (len == cap) {
            if (cap >= (1u << 20)) {
                snprintf(err, errlen, "connection file %s is larger than 1 MiB", path);
                goto fail;
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                snprintf(err, errlen, "connection file %s: out of memory", path);
                goto fail;
            }
            buf = nb;
            cap *= 2;
        }
    }
    if (ferror(f)) {
        snprintf(err, errlen, "cannot read connection file %s: %s", path, strerror(errno));
        goto fail;
    }
    fclose(f);
    char inner[JP_ERRLEN];
    int rc = conn_parse(buf, len, c, inner, sizeof inner);
    free(buf);
    if (rc < 0) snprintf(err, errlen, "%s: %s", path, inner);
    return rc;

fail:
    fclose(f);
    free(buf);
    return -1;
}
