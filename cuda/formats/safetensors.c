/* safetensors.c — validated, memory-mapped reading of safetensors files and sharded indexes.
 *
 * Owns st_set (mapped files + tensor table). Never writes a file; never trusts a header:
 * every size and offset is checked against the file before a pointer is formed.
 */
#include "cuda/formats/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- small utilities ------------------------------------------------------------------- */

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

/* Element size of a safetensors dtype name; 0 if unknown. */
static size_t st_dtype_size(const char *d) {
    static const struct {
        const char *n;
        size_t sz;
    } table[] = {
        {"F64", 8}, {"F32", 4}, {"F16", 2},  {"BF16", 2},    {"I64", 8},
        {"I32", 4}, {"I16", 2}, {"I8", 1},   {"U64", 8},     {"U32", 4},
        {"U16", 2}, {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (!strcmp(d, table[i].n)) return table[i].sz;
    return 0;
}

lt_status st_convert(const st_tensor *t, void *dst, lt_dtype dt) {
    int64_t n = (int64_t)(t->nbytes / lt_dtype_size(t->dtype));
    if (((uintptr_t)t->data % lt_dtype_size(t->dtype)) == 0) {
        lt_convert(dst, dt, t->data, t->dtype, n);
        return LT_OK;
    }
    void *tmp = malloc(t->nbytes); /* unaligned in the file */
    if (!tmp) return LT_ERR_MEMORY;
    memcpy(tmp, t->data, t->nbytes);
    lt_convert(dst, dt, tmp, t->dtype, n);
    free(tmp);
    return LT_OK;
}

const char *st_shape_str(const st_tensor *t, char *buf, size_t cap) {
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < t->ndim && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
    return buf;
}

static int cmp_by_offset(const void *a, const void *b) {
    const st_tensor *x = *(st_tensor *const *)a, *y = *(st_tensor *const *)b;
    if ((const char *)x->data < (const char *)y->data) return -1;
    if ((const char *)x->data > (const char *)y->data) return 1;
    return 0;
}

static void tensor_free_fields(st_tensor *t) {
    free(t->name);
}

void st_close(st_set *s) {
    for (int i = 0; i < s->n_tensors; i++)
        tensor_free_fields(&s->tensors[i]);
    free(s->tensors);
    for (int i = 0; i < s->n_files; i++) {
        if (s->files[i].map && s->files[i].map != MAP_FAILED)
            munmap(s->files[i].map, s->files[i].size);
        free(s->files[i].path);
    }
    free(s->files);
    memset(s, 0, sizeof *s);
}

/* Reads an unsigned integer JSON value into *out; 0 on success. */
static int json_u64(json_t *v, uint64_t *out) {
    if (!json_is_integer(v)) return -1;
    json_int_t x = json_integer_value(v);
    if (x < 0) return -1;
    *out = (uint64_t)x;
    return 0;
}

/* ---- one file ---------------------------------------------------------------------------- */

/* Parses and validates the header of the mapped file `fi`, appending tensors to s. */
static lt_status parse_header(st_set *s, int fi, char *err) {
    st_file *f = &s->files[fi];
    const unsigned char *p = f->map;
    if (f->size < 8) {
        return lt_fail(
            err, LT_ERR_FORMAT,
            "%s: not a safetensors file (%zu bytes, shorter than the 8-byte header length)",
            f->path, f->size);
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | p[i];
    if (hlen > ST_MAX_HEADER) {
        return lt_fail(
            err, LT_ERR_FORMAT,
            "%s: safetensors header length %llu is larger than the 100 MB limit (corrupt or "
            "not a safetensors file)",
            f->path, (unsigned long long)hlen);
    }
    if (hlen > f->size - 8) {
        return lt_fail(
            err, LT_ERR_FORMAT,
            "%s: safetensors header length %llu runs past the end of the file (%zu bytes)", f->path,
            (unsigned long long)hlen, f->size);
    }
    const char *hdr = (const char *)p + 8;
    const unsigned char *data = p + 8 + hlen;
    uint64_t data_size = f->size - 8 - hlen;

    json_error_t je;
    json_t *root = json_loadb(hdr, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s: garbled safetensors JSON header (line %d, column %d: %s)", f->path,
                       je.line, je.column, je.text);
    }
    if (!json_is_object(root)) {
        json_decref(root);
        return lt_fail(err, LT_ERR_FORMAT, "%s: safetensors header is not a JSON object", f->path);
    }
    size_t n_new = json_object_size(root);
    st_tensor *grown = realloc(s->tensors, sizeof(st_tensor) * ((size_t)s->n_tensors + n_new + 1));
    if (!grown) {
        json_decref(root);
        return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory reading the header", f->path);
    }
    s->tensors = grown;
    int first = s->n_tensors;

    const char *key;
    json_t *val;
    lt_status rc = LT_OK;
    json_object_foreach(root, key, val) {
        if (!strcmp(key, "__metadata__")) continue;
        if (!json_is_object(val)) {
            rc = lt_fail(err, LT_ERR_FORMAT, "%s: tensor '%s': header entry is not an object",
                         f->path, key);
            break;
        }
        json_t *jd = json_object_get(val, "dtype"), *js = json_object_get(val, "shape"),
               *jo = json_object_get(val, "data_offsets");
        if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
            json_array_size(jo) != 2) {
            rc = lt_fail(
                err, LT_ERR_FORMAT,
                "%s: tensor '%s': header entry needs \"dtype\" (string), \"shape\" (list) and "
                "\"data_offsets\" ([begin, end])",
                f->path, key);
            break;
        }
        st_tensor t;
        memset(&t, 0, sizeof t);
        t.file = fi;
        const char *dn = json_string_value(jd);
        size_t esz = st_dtype_size(dn);
        if (!esz) {
            rc = lt_fail(err, LT_ERR_FORMAT, "%s: tensor '%s': unknown dtype '%s'", f->path, key,
                         dn);
            break;
        }
        snprintf(t.dtype_name, sizeof t.dtype_name, "%s", dn);
        t.dtype_ok = lt_dtype_parse(dn, &t.dtype) == 0;
        if (json_array_size(js) > 8) {
            rc =
                lt_fail(err, LT_ERR_FORMAT, "%s: tensor '%s': %zu dimensions (at most 8 supported)",
                        f->path, key, json_array_size(js));
            break;
        }
        t.ndim = (int)json_array_size(js);
        uint64_t numel = 1;
        int bad = 0;
        for (int d = 0; d < t.ndim; d++) {
            uint64_t dim;
            if (json_u64(json_array_get(js, (size_t)d), &dim) || dim > (1ull << 40)) {
                bad = 1;
                break;
            }
            t.shape[d] = (int64_t)dim;
            if (dim && numel > UINT64_MAX / dim / 8) {
                bad = 1;
                break;
            }
            numel *= dim;
        }
        if (bad) {
            rc = lt_fail(err, LT_ERR_FORMAT,
                         "%s: tensor '%s': shape must be a list of non-negative integers", f->path,
                         key);
            break;
        }
        uint64_t b, e;
        if (json_u64(json_array_get(jo, 0), &b) || json_u64(json_array_get(jo, 1), &e) || b > e) {
            rc =
                lt_fail(err, LT_ERR_FORMAT,
                        "%s: tensor '%s': data_offsets must be [begin, end] with 0 <= begin <= end",
                        f->path, key);
            break;
        }
        if (e > data_size) {
            rc = lt_fail(err, LT_ERR_FORMAT,
                         "%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the data "
                         "(%llu bytes; file truncated?)",
                         f->path, key, (unsigned long long)b, (unsigned long long)e,
                         (unsigned long long)data_size);
            break;
        }
        if (e - b != numel * esz) {
            char sh[128];
            rc = lt_fail(
                err, LT_ERR_FORMAT,
                "%s: tensor '%s': %llu bytes in data_offsets but dtype %s x shape %s needs %llu",
                f->path, key, (unsigned long long)(e - b), dn, st_shape_str(&t, sh, sizeof sh),
                (unsigned long long)(numel * esz));
            break;
        }
        t.data = data + b;
        t.nbytes = (size_t)(e - b);
        t.name = strdup(key);
        if (!t.name) {
            rc = lt_fail(err, LT_ERR_MEMORY, "%s: out of memory", f->path);
            break;
        }
        s->tensors[s->n_tensors++] = t;
    }
    json_decref(root);
    if (rc != LT_OK) return rc;

    /* Overlaps: sort this file's tensors by start and compare neighbours. */
    int n = s->n_tensors - first;
    if (n > 1) {
        st_tensor **order = malloc(sizeof(st_tensor *) * (size_t)n);
        if (!order) {
            return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory", f->path);
        }
        for (int i = 0; i < n; i++)
            order[i] = &s->tensors[first + i];
        qsort(order, (size_t)n, sizeof *order, cmp_by_offset);
        for (int i = 1; i < n; i++) {
            const char *prev_end = (const char *)order[i - 1]->data + order[i - 1]->nbytes;
            if (order[i]->nbytes && order[i - 1]->nbytes &&
                (const char *)order[i]->data < prev_end) {
                lt_fail(err, LT_ERR_FORMAT,
                        "%s: tensors '%s' and '%s' have overlapping data_offsets", f->path,
                        order[i - 1]->name, order[i]->name);
                free(order);
                return LT_ERR_FORMAT;
            }
        }
        free(order);
    }
    return LT_OK;
}

lt_status st_open_file(st_set *s, const char *file, char *err) {
    st_file *grown = realloc(s->files, sizeof(st_file) * ((size_t)s->n_files + 1));
    if (!grown) {
        return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory", file);
    }
    s->files = grown;
    st_file *f = &s->files[s->n_files];
    memset(f, 0, sizeof *f);
    f->path = strdup(file);
    if (!f->path) {
        return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory", file);
    }
    s->n_files++;
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return lt_fail(err, LT_ERR_IO, "%s: cannot open: %s", file, strerror(errno));
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        lt_fail(err, LT_ERR_IO, "%s: cannot stat: %s", file, strerror(errno));
        close(fd);
        return LT_ERR_IO;
    }
    if (!S_ISREG(sb.st_mode)) {
        lt_fail(err, LT_ERR_IO, "%s: not a regular file", file);
        close(fd);
        return LT_ERR_IO;
    }
    f->size = (size_t)sb.st_size;
    if (f->size == 0) {
        close(fd);
        return lt_fail(err, LT_ERR_FORMAT, "%s: empty file, not a safetensors file", file);
    }
    f->map = mmap(NULL, f->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        return lt_fail(err, LT_ERR_IO, "%s: cannot map: %s", file, strerror(errno));
    }
    return parse_header(s, s->n_files - 1, err);
}

/* ---- sharded index ------------------------------------------------------------------------ */

static lt_status open_index(st_set *s, const char *index_path, char *err) {
    json_error_t je;
    json_t *root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        return lt_fail(err, access(index_path, R_OK) == 0 ? LT_ERR_FORMAT : LT_ERR_IO,
                       "%s: %s (line %d, column %d)", index_path, je.text, je.line, je.column);
    }
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm) || json_object_size(wm) == 0) {
        json_decref(root);
        return lt_fail(
            err, LT_ERR_FORMAT,
            "%s: key 'weight_map' is missing or not a non-empty object {tensor: shard file}",
            index_path);
    }
    /* directory of the index */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", index_path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = 0;
    else
        snprintf(dir, sizeof dir, ".");

    lt_status rc = LT_OK;
    const char *key;
    json_t *val;
    /* open each distinct shard once, in first-mention order */
    json_object_foreach(wm, key, val) {
        if (!json_is_string(val)) {
            rc = lt_fail(err, LT_ERR_FORMAT, "%s: weight_map['%s'] is not a file name", index_path,
                         key);
            break;
        }
        const char *shard = json_string_value(val);
        if (strchr(shard, '/') || !strcmp(shard, "..") || !*shard) {
            rc = lt_fail(err, LT_ERR_FORMAT, "%s: weight_map['%s'] = '%s' is not a plain file name",
                         index_path, key, shard);
            break;
        }
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir, shard);
        int seen = 0;
        for (int i = 0; i < s->n_files; i++)
            if (!strcmp(s->files[i].path, path)) seen = 1;
        if (seen) continue;
        rc = st_open_file(s, path, err);
        if (rc != LT_OK) break;
    }
    if (rc == LT_OK) {
        /* every indexed tensor must be in the shard the index names */
        json_object_foreach(wm, key, val) {
            const st_tensor *t = st_find(s, key);
            if (!t) {
                rc = lt_fail(err, LT_ERR_FORMAT,
                             "%s: tensor '%s' is listed in the index but missing from %s",
                             index_path, key, json_string_value(val));
                break;
            }
            if (strcmp(base_name(s->files[t->file].path), json_string_value(val)) != 0) {
                rc = lt_fail(err, LT_ERR_FORMAT, "%s: tensor '%s' is listed in %s but found in %s",
                             index_path, key, json_string_value(val),
                             base_name(s->files[t->file].path));
                break;
            }
        }
    }
    /* a tensor in two shards is ambiguous */
    for (int i = 0; rc == LT_OK && i < s->n_tensors; i++) {
        const st_tensor *t = st_find(s, s->tensors[i].name);
        if (t != &s->tensors[i]) {
            rc = lt_fail(err, LT_ERR_FORMAT, "%s: tensor '%s' appears in both %s and %s",
                         index_path, t->name, base_name(s->files[t->file].path),
                         base_name(s->files[s->tensors[i].file].path));
        }
    }
    json_decref(root);
    return rc;
}

lt_status st_open(st_set *s, const char *path, char *err) {
    memset(s, 0, sizeof *s);
    struct stat sb;
    if (stat(path, &sb) != 0) {
        return lt_fail(err, LT_ERR_IO, "%s: %s", path, strerror(errno));
    }
    lt_status rc;
    if (S_ISDIR(sb.st_mode)) {
        char p[8192];
        snprintf(p, sizeof p, "%s/model.safetensors.index.json", path);
        if (access(p, F_OK) == 0) {
            rc = open_index(s, p, err);
        } else {
            snprintf(p, sizeof p, "%s/model.safetensors", path);
            if (access(p, F_OK) != 0) {
                return lt_fail(
                    err, LT_ERR_IO,
                    "%s: no model.safetensors or model.safetensors.index.json in this directory",
                    path);
            }
            rc = st_open_file(s, p, err);
        }
    } else {
        size_t n = strlen(path);
        if (n > 5 && !strcmp(path + n - 5, ".json"))
            rc = open_index(s, path, err);
        else
            rc = st_open_file(s, path, err);
    }
    if (rc != LT_OK) st_close(s);
    return rc;
}

int st_release_pages(const st_set *s, const void *p, size_t n) {
    uintptr_t a = (uintptr_t)p, e = a + n;
    for (int i = 0; i < s->n_files; i++) {
        uintptr_t m = (uintptr_t)s->files[i].map;
        if (!s->files[i].map || s->files[i].map == MAP_FAILED || a < m || e > m + s->files[i].size)
            continue;
        long ps = sysconf(_SC_PAGESIZE);
        if (ps <= 0) return 1;
        uintptr_t lo = (a + (uintptr_t)ps - 1) & ~((uintptr_t)ps - 1),
                  hi = e & ~((uintptr_t)ps - 1);
        if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
        return 1;
    }
    return 0;
}

const st_tensor *st_find(const st_set *s, const char *name) {
    /* Linear scan: a few thousand names at most, once per weight at load time. */
    for (int i = 0; i < s->n_tensors; i++)
        if (!strcmp(s->tensors[i].name, name)) return &s->tensors[i];
    return NULL;
}
