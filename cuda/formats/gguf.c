/* gguf.c — the GGUF v3 writer: typed metadata, tensor infos, aligned tensor data.
 *
 * Owns the byte layout of the file (ggml's docs/gguf.md): header, key/value pairs serialized as
 * they are added, tensor infos with 32-byte aligned offsets, zero padding, then each tensor's
 * rows, filled as fp32 by the caller's callback and quantized by gguf_quant.c on a few
 * threads, chunk by chunk, so that memory stays bounded whatever the model size.
 * The file is written atomically through base/atomic_file.h: a temp file in the target's
 * folder, fsync, then rename (or link, when overwriting is not allowed, so an existing file is
 * never replaced); on any failure or cancel the temp file is removed and the target is
 * untouched.
 * Must not touch: the sources it reads through callbacks, anything outside its own file.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/base/atomic_file.h"
#include "cuda/base/error.h"
#include "cuda/base/strbuf.h"
#include "cuda/formats/gguf.h"

enum { GGUF_ALIGN = 32, GGUF_MAX_NAME = 63, GGUF_MAX_DIMS = 4 };

/* GGUF value types (ggml's docs/gguf.md, gguf_metadata_value_type). */
enum {
    VT_U8 = 0,
    VT_I8 = 1,
    VT_U16 = 2,
    VT_I16 = 3,
    VT_U32 = 4,
    VT_I32 = 5,
    VT_F32 = 6,
    VT_BOOL = 7,
    VT_STRING = 8,
    VT_ARRAY = 9,
    VT_U64 = 10,
    VT_I64 = 11,
    VT_F64 = 12,
};

typedef struct gguf_tensor {
    char name[GGUF_MAX_NAME + 1];
    int n_dims;
    int64_t ne[GGUF_MAX_DIMS];
    gguf_type type;
    gguf_fill_fn fill;
    void *fill_ctx;
    uint64_t offset; /* from the start of the data section */
    uint64_t size;   /* bytes */
} gguf_tensor;

struct gguf_writer {
    lt_strbuf kv; /* serialized key/value pairs */
    uint64_t n_kv;
    char **keys; /* for the duplicate check */
    size_t n_keys, cap_keys;
    gguf_tensor *tensors;
    size_t n_tensors, cap_tensors;
    int has_alignment;
    char err[LT_ERRLEN];
};

gguf_writer *gguf_writer_new(void) {
    return calloc(1, sizeof(gguf_writer));
}

void gguf_writer_free(gguf_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n_keys; ++i)
        free(w->keys[i]);
    free(w->keys);
    lt_strbuf_free(&w->kv);
    free(w->tensors);
    free(w);
}

const char *gguf_writer_error(const gguf_writer *w) {
    return w ? w->err : "out of memory";
}

/* ---- serialization helpers -------------------------------------------------------------- */

static int buf_u32(lt_strbuf *b, uint32_t v) {
    return lt_strbuf_put(b, &v, 4); /* configure refuses big-endian hosts: host order is LE */
}

static int buf_u64(lt_strbuf *b, uint64_t v) {
    return lt_strbuf_put(b, &v, 8);
}

static int buf_str(lt_strbuf *b, const char *s, size_t n) {
    return buf_u64(b, (uint64_t)n) || lt_strbuf_put(b, s, n);
}

/* Validates a key and appends "key, value type" to the kv buffer. */
static lt_status kv_begin(gguf_writer *w, const char *key, uint32_t vtype) {
    if (!key || !*key) return lt_fail(w->err, LT_ERR_ARG, "gguf: empty metadata key");
    size_t n = strlen(key);
    if (n >= 65536)
        return lt_fail(w->err, LT_ERR_ARG, "gguf: metadata key longer than 65535 bytes");
    for (size_t i = 0; i < n; ++i) {
        char c = key[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_'))
            return lt_fail(w->err, LT_ERR_ARG,
                           "gguf: metadata key '%s': use lowercase ASCII, digits, '.' and '_'",
                           key);
    }
    for (size_t i = 0; i < w->n_keys; ++i)
        if (strcmp(w->keys[i], key) == 0)
            return lt_fail(w->err, LT_ERR_ARG, "gguf: metadata key '%s' set twice", key);
    if (w->n_keys == w->cap_keys) {
        size_t cap = w->cap_keys ? 2 * w->cap_keys : 64;
        char **k = realloc(w->keys, cap * sizeof *k);
        if (!k) return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
        w->keys = k;
        w->cap_keys = cap;
    }
    char *copy = strdup(key);
    if (!copy) return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
    if (buf_str(&w->kv, key, n) || buf_u32(&w->kv, vtype)) {
        free(copy);
        return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
    }
    w->keys[w->n_keys++] = copy;
    ++w->n_kv;
    if (strcmp(key, "general.alignment") == 0) w->has_alignment = 1;
    return LT_OK;
}

static lt_status kv_scalar(gguf_writer *w, const char *key, uint32_t vtype, const void *v,
                           size_t n) {
    size_t mark = w->kv.len;
    lt_status st = kv_begin(w, key, vtype);
    if (st != LT_OK) return st;
    if (lt_strbuf_put(&w->kv, v, n)) {
        lt_strbuf_truncate(&w->kv, mark);
        return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
    }
    return LT_OK;
}

lt_status gguf_set_u32(gguf_writer *w, const char *key, uint32_t v) {
    if (key && strcmp(key, "general.alignment") == 0 && v != GGUF_ALIGN)
        return lt_fail(w->err, LT_ERR_ARG, "gguf: general.alignment must be %d", GGUF_ALIGN);
    return kv_scalar(w, key, VT_U32, &v, 4);
}

lt_status gguf_set_i32(gguf_writer *w, const char *key, int32_t v) {
    return kv_scalar(w, key, VT_I32, &v, 4);
}

lt_status gguf_set_u64(gguf_writer *w, const char *key, uint64_t v) {
    return kv_scalar(w, key, VT_U64, &v, 8);
}

lt_status gguf_set_f32(gguf_writer *w, const char *key, float v) {
    return kv_scalar(w, key, VT_F32, &v, 4);
}

lt_status gguf_set_bool(gguf_writer *w, const char *key, int v) {
    uint8_t b = v ? 1 : 0;
    return kv_scalar(w, key, VT_BOOL, &b, 1);
}

lt_status gguf_set_str(gguf_writer *w, const char *key, const char *v) {
    if (!v) return lt_fail(w->err, LT_ERR_ARG, "gguf: metadata '%s': NULL string", key ? key : "");
    size_t mark = w->kv.len;
    lt_status st = kv_begin(w, key, VT_STRING);
    if (st != LT_OK) return st;
    if (buf_str(&w->kv, v, strlen(v))) {
        lt_strbuf_truncate(&w->kv, mark);
        return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
    }
    return LT_OK;
}

static lt_status kv_array(gguf_writer *w, const char *key, uint32_t etype, const void *v, size_t n,
                          size_t esize) {
    size_t mark = w->kv.len;
    lt_status st = kv_begin(w, key, VT_ARRAY);
    if (st != LT_OK) return st;
    if (buf_u32(&w->kv, etype) || buf_u64(&w->kv, (uint64_t)n) ||
        lt_strbuf_put(&w->kv, v, n * esize)) {
        lt_strbuf_truncate(&w->kv, mark);
        return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
    }
    return LT_OK;
}

lt_status gguf_set_arr_f32(gguf_writer *w, const char *key, const float *v, size_t n) {
    return kv_array(w, key, VT_F32, v, n, 4);
}

lt_status gguf_set_arr_i32(gguf_writer *w, const char *key, const int32_t *v, size_t n) {
    return kv_array(w, key, VT_I32, v, n, 4);
}

lt_status gguf_set_arr_str(gguf_writer *w, const char *key, size_t n,
                           const char *(*get)(void *ctx, size_t i), void *ctx) {
    size_t mark = w->kv.len;
    lt_status st = kv_begin(w, key, VT_ARRAY);
    if (st != LT_OK) return st;
    if (buf_u32(&w->kv, VT_STRING) || buf_u64(&w->kv, (uint64_t)n)) goto oom;
    for (size_t i = 0; i < n; ++i) {
        const char *s = get(ctx, i);
        if (!s) {
            lt_strbuf_truncate(&w->kv, mark);
            return lt_fail(w->err, LT_ERR_FORMAT, "gguf: metadata '%s': no string for entry %zu",
                           key, i);
        }
        if (buf_str(&w->kv, s, strlen(s))) goto oom;
    }
    return LT_OK;
oom:
    lt_strbuf_truncate(&w->kv, mark);
    return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
}

/* ---- tensors ---------------------------------------------------------------------------- */

lt_status gguf_add_tensor(gguf_writer *w, const char *name, int n_dims, const int64_t *ne,
                          gguf_type type, gguf_fill_fn fill, void *fill_ctx) {
    if (!name || !*name) return lt_fail(w->err, LT_ERR_ARG, "gguf: empty tensor name");
    if (strlen(name) > GGUF_MAX_NAME)
        return lt_fail(w->err, LT_ERR_ARG, "gguf: tensor name '%s' is longer than %d bytes", name,
                       GGUF_MAX_NAME);
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
        return lt_fail(w->err, LT_ERR_ARG, "gguf: tensor '%s': %d dimensions (accepted: 1 to 4)",
                       name, n_dims);
    if (!fill) return lt_fail(w->err, LT_ERR_ARG, "gguf: tensor '%s': no fill callback", name);
    if (gguf_type_block_len(type) == 0)
        return lt_fail(w->err, LT_ERR_ARG, "gguf: tensor '%s': unsupported type id %d", name,
                       (int)type);
    uint64_t nrows = 1;
    for (int d = 0; d < n_dims; ++d) {
        if (ne[d] < 1 || ne[d] > ((int64_t)1 << 40))
            return lt_fail(w->err, LT_ERR_ARG, "gguf: tensor '%s': dimension %d is %lld", name, d,
                           (long long)ne[d]);
        if (d > 0) nrows *= (uint64_t)ne[d];
    }
    size_t row = gguf_row_bytes(type, ne[0]);
    if (row == 0)
        return lt_fail(w->err, LT_ERR_ARG,
                       "gguf: tensor '%s': row length %lld is not a multiple of %s's block of %lld",
                       name, (long long)ne[0], gguf_type_name(type),
                       (long long)gguf_type_block_len(type));
    for (size_t i = 0; i < w->n_tensors; ++i)
        if (strcmp(w->tensors[i].name, name) == 0)
            return lt_fail(w->err, LT_ERR_ARG, "gguf: tensor '%s' added twice", name);
    if (w->n_tensors == w->cap_tensors) {
        size_t cap = w->cap_tensors ? 2 * w->cap_tensors : 256;
        gguf_tensor *t = realloc(w->tensors, cap * sizeof *t);
        if (!t) return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
        w->tensors = t;
        w->cap_tensors = cap;
    }
    gguf_tensor *t = &w->tensors[w->n_tensors++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->n_dims = n_dims;
    for (int d = 0; d < n_dims; ++d)
        t->ne[d] = ne[d];
    t->type = type;
    t->fill = fill;
    t->fill_ctx = fill_ctx;
    t->size = (uint64_t)row * nrows;
    return LT_OK;
}

/* ---- parallel quantization of one chunk ------------------------------------------------- */

typedef struct quant_job {
    gguf_type type;
    const float *src; /* [nrows, ne0] */
    uint8_t *dst;     /* [nrows, row bytes] */
    int64_t ne0, row0, row1;
    size_t row_bytes;
} quant_job;

static void *quant_rows(void *arg) {
    quant_job *j = arg;
    for (int64_t r = j->row0; r < j->row1; ++r)
        gguf_quantize_row(j->type, j->src + r * j->ne0, j->dst + (size_t)r * j->row_bytes, j->ne0);
    return NULL;
}

static void quantize_chunk(gguf_type type, const float *src, uint8_t *dst, int64_t nrows,
                           int64_t ne0, size_t row_bytes, int n_threads) {
    quant_job jobs[16];
    pthread_t tid[16];
    int started[16] = {0};
    if (n_threads > 16) n_threads = 16;
    if (n_threads > nrows) n_threads = (int)nrows;
    if (type == GGUF_TYPE_F32 || n_threads < 1) n_threads = 1;
    for (int i = 0; i < n_threads; ++i) {
        jobs[i] = (quant_job){
            type, src, dst, ne0, nrows * i / n_threads, nrows * (i + 1) / n_threads, row_bytes};
    }
    for (int i = 1; i < n_threads; ++i)
        started[i] = pthread_create(&tid[i], NULL, quant_rows, &jobs[i]) == 0;
    quant_rows(&jobs[0]);
    for (int i = 1; i < n_threads; ++i) {
        if (started[i])
            pthread_join(tid[i], NULL);
        else
            quant_rows(&jobs[i]); /* could not start a thread: do its share here */
    }
}

/* ---- writing the file ------------------------------------------------------------------- */

static lt_status write_zeros(lt_afile *f, size_t n, char *err) {
    static const uint8_t zeros[GGUF_ALIGN];
    while (n > 0) {
        size_t k = n < sizeof zeros ? n : sizeof zeros;
        lt_status st = lt_afile_write(f, zeros, k, err);
        if (st != LT_OK) return st;
        n -= k;
    }
    return LT_OK;
}

static uint64_t align_up(uint64_t v) {
    return (v + GGUF_ALIGN - 1) / GGUF_ALIGN * GGUF_ALIGN;
}

static int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 16 ? 16 : (int)n;
}

/* Serializes header, metadata and tensor infos into b. */
static lt_status build_header(gguf_writer *w, lt_strbuf *b) {
    uint64_t off = 0;
    for (size_t i = 0; i < w->n_tensors; ++i) {
        w->tensors[i].offset = off;
        off = align_up(off + w->tensors[i].size);
    }
    if (buf_u32(b, 0x46554747u) || buf_u32(b, 3) || buf_u64(b, (uint64_t)w->n_tensors) ||
        buf_u64(b, w->n_kv) || lt_strbuf_put(b, w->kv.p, w->kv.len))
        return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
    for (size_t i = 0; i < w->n_tensors; ++i) {
        const gguf_tensor *t = &w->tensors[i];
        if (buf_str(b, t->name, strlen(t->name)) || buf_u32(b, (uint32_t)t->n_dims))
            return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
        for (int d = 0; d < t->n_dims; ++d)
            if (buf_u64(b, (uint64_t)t->ne[d]))
                return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
        if (buf_u32(b, (uint32_t)t->type) || buf_u64(b, t->offset))
            return lt_fail(w->err, LT_ERR_MEMORY, "gguf: out of memory");
    }
    return LT_OK;
}

/* Streams one tensor: fill fp32 rows chunk by chunk, quantize, write. */
static lt_status write_tensor(gguf_writer *w, lt_afile *f, const gguf_tensor *t, const char *path,
                              const gguf_write_opts *o, int n_threads, uint64_t *done,
                              uint64_t total) {
    const int64_t ne0 = t->ne[0];
    int64_t nrows = 1;
    for (int d = 1; d < t->n_dims; ++d)
        nrows *= t->ne[d];
    const size_t row_bytes = gguf_row_bytes(t->type, ne0);
    /* chunk: about 4M weights (16 MiB of fp32), at least one row */
    int64_t chunk = ((int64_t)1 << 22) / ne0;
    if (chunk < 1) chunk = 1;
    if (chunk > nrows) chunk = nrows;
    float *src = malloc((size_t)chunk * (size_t)ne0 * sizeof *src);
    uint8_t *dst = t->type == GGUF_TYPE_F32 ? NULL : malloc((size_t)chunk * row_bytes);
    if (!src || (t->type != GGUF_TYPE_F32 && !dst)) {
        free(src);
        free(dst);
        return lt_fail(w->err, LT_ERR_MEMORY,
                       "gguf: out of memory for tensor '%s' (%lld-row chunk)", t->name,
                       (long long)chunk);
    }
    lt_status st = LT_OK;
    for (int64_t r = 0; r < nrows && st == LT_OK; r += chunk) {
        int64_t n = nrows - r < chunk ? nrows - r : chunk;
        if (o && o->cancel && atomic_load(o->cancel)) {
            st = lt_fail(w->err, LT_CANCELLED, "gguf: export cancelled; %s was not written", path);
            break;
        }
        char msg[256] = "";
        st = t->fill(t->fill_ctx, r, n, src, msg, sizeof msg);
        if (st != LT_OK) {
            st = lt_fail(w->err, st, "gguf: tensor '%s': %s", t->name,
                         msg[0] ? msg : "source failed");
            break;
        }
        /* src: [n, ne0] fp32 -> dst: [n, row_bytes] in t->type */
        const void *out = src;
        if (t->type != GGUF_TYPE_F32) {
            quantize_chunk(t->type, src, dst, n, ne0, row_bytes, n_threads);
            out = dst;
        }
        if ((st = lt_afile_write(f, out, (size_t)n * row_bytes, w->err)) != LT_OK) break;
        *done += (uint64_t)n * row_bytes;
        if (o && o->progress) o->progress(o->progress_ctx, t->name, (int64_t)*done, (int64_t)total);
    }
    free(src);
    free(dst);
    return st;
}

static lt_status exists_error(gguf_writer *w, const char *path) {
    return lt_fail(w->err, LT_ERR_IO, "%s: file exists; pass overwrite=true to replace it", path);
}

/* Writes the whole file into f (a temp opened on path) and finishes it; on failure the temp is
 * removed. *bytes: the file size. */
static lt_status write_file(gguf_writer *w, lt_afile *f, const char *path,
                            const gguf_write_opts *opts, uint64_t *bytes) {
    int n_threads = opts && opts->n_threads > 0 ? opts->n_threads : online_cpus();
    lt_strbuf head = {0};
    lt_status st = build_header(w, &head);
    uint64_t total = 0;
    for (size_t i = 0; i < w->n_tensors; ++i)
        total += w->tensors[i].size;
    if (st == LT_OK) st = lt_afile_write(f, head.p, head.len, w->err);
    if (st == LT_OK) st = write_zeros(f, align_up(head.len) - head.len, w->err);
    uint64_t pos = 0, done = 0; /* position inside the data section */
    for (size_t i = 0; i < w->n_tensors && st == LT_OK; ++i) {
        const gguf_tensor *t = &w->tensors[i];
        st = write_zeros(f, t->offset - pos, w->err);
        if (st == LT_OK) st = write_tensor(w, f, t, path, opts, n_threads, &done, total);
        pos = t->offset + t->size;
    }
    if (st == LT_OK) /* llama.cpp accepts either; keep it aligned */
        st = write_zeros(f, align_up(pos) - pos, w->err);
    if (st != LT_OK)
        lt_afile_abort(f);
    else
        st = lt_afile_finish(f, w->err);
    if (st == LT_OK && bytes) *bytes = align_up(head.len) + align_up(pos);
    lt_strbuf_free(&head);
    return st;
}

/* The checks both entry points start with: a path, not a folder, not there unless overwrite;
 * general.alignment added when the caller did not set it. */
static lt_status write_begin(gguf_writer *w, const char *path, const gguf_write_opts *opts) {
    struct stat sb;
    w->err[0] = '\0';
    if (!path || !*path) return lt_fail(w->err, LT_ERR_ARG, "gguf: empty output path");
    if (stat(path, &sb) == 0) {
        if (S_ISDIR(sb.st_mode))
            return lt_fail(w->err, LT_ERR_ARG,
                           "%s: is a directory; give a file name ending in .gguf", path);
        if (!(opts && opts->overwrite)) return exists_error(w, path);
    }
    if (!w->has_alignment) return gguf_set_u32(w, "general.alignment", GGUF_ALIGN);
    return LT_OK;
}

lt_status gguf_writer_write(gguf_writer *w, const char *path, const gguf_write_opts *opts,
                            uint64_t *bytes) {
    const int overwrite = opts && opts->overwrite;
    lt_status st = write_begin(w, path, opts);
    if (st != LT_OK) return st;
    lt_afile f;
    if ((st = lt_afile_open(&f, path, w->err)) != LT_OK) return st;
    uint64_t size = 0;
    if ((st = write_file(w, &f, path, opts, &size)) != LT_OK) return st;
    st = lt_afile_commit(&f, overwrite, w->err);
    if (f.existed) st = exists_error(w, path); /* it appeared while we wrote */
    if (st == LT_OK && bytes) *bytes = size;
    return st;
}

lt_status gguf_writer_write_member(gguf_writer *w, lt_afile_set *set, const char *path,
                                   const gguf_write_opts *opts, uint64_t *bytes) {
    lt_status st = write_begin(w, path, opts);
    if (st != LT_OK) return st;
    lt_afile *f;
    if ((st = lt_afile_set_add(set, path, &f, w->err)) != LT_OK) return st;
    return write_file(w, f, path, opts, bytes);
}
