/* safetensors_write.c — the safetensors writer (see safetensors_write.h): builds the JSON header
 * with jansson and streams header and tensor bytes into an atomic file. Owns nothing after a
 * call returns; reads the tensors it is given and writes only the file it was asked for.
 */
#include "cuda/formats/safetensors_write.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

/* The header and data into f; LT_ERR_MEMORY without a message (st_write_to adds it). */
static lt_status emit(lt_afile *f, const st_out *t, int n, const char *metadata_json, char *err) {
    json_t *hdr = json_object();
    if (!hdr) return LT_ERR_MEMORY;
    if (metadata_json) {
        json_t *md = json_loads(metadata_json, 0, NULL);
        if (md) json_object_set_new(hdr, "__metadata__", md);
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        json_t *shape = json_array();
        int64_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++) {
            json_array_append_new(shape, json_integer(t[i].shape[d]));
            numel *= t[i].shape[d];
        }
        uint64_t bytes = (uint64_t)numel * lt_dtype_size(t[i].dtype);
        json_t *e = json_pack("{s:s, s:o, s:[I, I]}", "dtype", lt_dtype_name(t[i].dtype), "shape",
                              shape, "data_offsets", (json_int_t)off, (json_int_t)(off + bytes));
        if (!e) {
            json_decref(hdr);
            return LT_ERR_MEMORY;
        }
        json_object_set_new(hdr, t[i].name, e);
        off += bytes;
    }
    char *text = json_dumps(hdr, JSON_COMPACT);
    json_decref(hdr);
    if (!text) return LT_ERR_MEMORY;
    size_t hl = strlen(text), padded = (hl + 7) / 8 * 8; /* 8-byte aligned data, space padded */
    char *h = malloc(padded + 8);
    if (!h) {
        free(text);
        return LT_ERR_MEMORY;
    }
    uint64_t n64 = padded;
    memcpy(h, &n64, 8); /* little-endian (configure refuses big-endian machines) */
    memcpy(h + 8, text, hl);
    memset(h + 8 + hl, ' ', padded - hl);
    free(text);
    lt_status rc = lt_afile_write(f, h, padded + 8, err);
    free(h);
    for (int i = 0; i < n && rc == LT_OK; i++) {
        int64_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++)
            numel *= t[i].shape[d];
        rc = lt_afile_write(f, t[i].data, (size_t)numel * lt_dtype_size(t[i].dtype), err);
    }
    return rc;
}

lt_status st_write_to(lt_afile *f, const st_out *t, int n, const char *metadata_json, char *err) {
    lt_status rc = emit(f, t, n, metadata_json, err);
    if (rc == LT_ERR_MEMORY) lt_fail(err, rc, "%s: out of memory", f->path);
    return rc;
}

lt_status st_write(const char *path, const st_out *t, int n, const char *metadata_json, char *err) {
    lt_afile f;
    lt_status rc = lt_afile_open(&f, path, err);
    if (rc != LT_OK) return rc;
    rc = st_write_to(&f, t, n, metadata_json, err);
    if (rc != LT_OK) {
        lt_afile_abort(&f);
        return rc;
    }
    if ((rc = lt_afile_finish(&f, err)) != LT_OK) return rc;
    return lt_afile_commit(&f, 1, err);
}

lt_status st_write_member(lt_afile_set *s, const char *path, const st_out *t, int n,
                          const char *metadata_json, char *err) {
    lt_afile *f;
    lt_status rc = lt_afile_set_add(s, path, &f, err);
    if (rc == LT_OK) rc = st_write_to(f, t, n, metadata_json, err);
    if (rc != LT_OK) return rc;
    return lt_afile_finish(f, err);
}
