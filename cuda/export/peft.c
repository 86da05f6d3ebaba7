/* peft.c — the files training writes and reads: a safetensors writer, PEFT adapters
 * (adapter_config.json + adapter_model.safetensors, as peft's save_pretrained writes them),
 * merged checkpoints that transformers loads (config.json + model.safetensors +
 * tokenizer.model), and atomic writes.
 *
 * Every file is written as a temp file in the destination folder, fsync'd, then renamed over
 * the old name; a save of several files writes all temps first and renames only when every
 * one was written, so a failed save (disk full, file-size limit, permissions) leaves the
 * previous good copy untouched and no temp behind. Reading reuses safetensors.c.
 * Owns nothing after a call returns. Must not change the model except through the
 * adapters it creates (peft_load_adapter).
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/formats/safetensors.h"
#include "cuda/train/train.h"

/* err = the formatted message (vsnprintf: long paths are cut, never overflow). */
static void perr(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void perr(char *err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, LT_ERRLEN, fmt, ap);
    va_end(ap);
}

/* ---- atomic files ---------------------------------------------------------------------------- */

lt_status dir_prepare(const char *dir, char *err) {
    if (!dir || !*dir) {
        perr(err, "no folder given");
        return LT_ERR_ARG;
    }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", dir);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(tmp, 0777) != 0 && errno != EEXIST) {
            perr(err, "%s: cannot create the folder %s (%s)", dir, tmp, strerror(errno));
            return LT_ERR_IO;
        }
        *p = '/';
    }
    if (mkdir(tmp, 0777) != 0 && errno != EEXIST) {
        perr(err, "%s: cannot create the folder (%s)", dir, strerror(errno));
        return LT_ERR_IO;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        perr(err, "%s: exists and is not a folder", dir);
        return LT_ERR_IO;
    }
    if (access(dir, W_OK) != 0) {
        perr(err, "%s: the folder is not writable (%s)", dir, strerror(errno));
        return LT_ERR_IO;
    }
    return LT_OK;
}

/* A file being written: fd on "<dir>/.<name>.tmp-<pid>", renamed to path on commit. */
typedef struct afile {
    char path[4096], tmp[4200];
    int fd;
} afile;

static lt_status af_open(afile *f, const char *path, char *err) {
    snprintf(f->path, sizeof f->path, "%s", path);
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", path);
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    size_t dl = (size_t)(base - path);
    snprintf(f->tmp, sizeof f->tmp, "%.*s.%s.tmp-%ld", (int)dl, path, base, (long)getpid());
    f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f->fd < 0) {
        perr(err, "%s: cannot create a file here (%s)", path, strerror(errno));
        return LT_ERR_IO;
    }
    return LT_OK;
}

static lt_status af_write(afile *f, const void *data, size_t n, char *err) {
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(f->fd, p, n > (1u << 30) ? (1u << 30) : n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            perr(err, "%s: write failed (%s); the previous copy is kept", f->path,
                 w < 0 ? strerror(errno) : "no space");
            return LT_ERR_IO;
        }
        p += w;
        n -= (size_t)w;
    }
    return LT_OK;
}

/* fsync + close; on failure the temp is removed. */
static lt_status af_finish(afile *f, char *err) {
    int bad = fsync(f->fd) != 0;
    int e = errno;
    if (close(f->fd) != 0 && !bad) {
        bad = 1;
        e = errno;
    }
    f->fd = -1;
    if (bad) {
        unlink(f->tmp);
        perr(err, "%s: could not flush the file to disk (%s); the previous copy is kept", f->path,
             strerror(e));
        return LT_ERR_IO;
    }
    return LT_OK;
}

static void af_abort(afile *f) {
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
    unlink(f->tmp);
}

static lt_status af_commit(afile *f, char *err) {
    if (rename(f->tmp, f->path) != 0) {
        perr(err, "%s: rename failed (%s)", f->path, strerror(errno));
        unlink(f->tmp);
        return LT_ERR_IO;
    }
    return LT_OK;
}

static void dir_sync(const char *path) {
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", path);
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

lt_status file_write_atomic(const char *path, const void *data, size_t n, char *err) {
    afile f;
    lt_status rc = af_open(&f, path, err);
    if (rc != LT_OK) return rc;
    rc = af_write(&f, data, n, err);
    if (rc != LT_OK) {
        af_abort(&f);
        return rc;
    }
    if ((rc = af_finish(&f, err)) != LT_OK) return rc;
    rc = af_commit(&f, err);
    dir_sync(path);
    return rc;
}

/* ---- safetensors writer -----------------------------------------------------------------------
 */

/* Writes the whole file to an open afile. */
static lt_status st_emit(afile *f, const st_out *t, int n, const char *metadata_json, char *err) {
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
    lt_status rc = af_write(f, h, padded + 8, err);
    free(h);
    for (int i = 0; i < n && rc == LT_OK; i++) {
        int64_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++)
            numel *= t[i].shape[d];
        rc = af_write(f, t[i].data, (size_t)numel * lt_dtype_size(t[i].dtype), err);
    }
    return rc;
}

lt_status st_write(const char *path, const st_out *t, int n, const char *metadata_json, char *err) {
    afile f;
    lt_status rc = af_open(&f, path, err);
    if (rc != LT_OK) return rc;
    rc = st_emit(&f, t, n, metadata_json, err);
    if (rc != LT_OK) {
        if (rc == LT_ERR_MEMORY) perr(err, "%s: out of memory", path);
        af_abort(&f);
        return rc;
    }
    if ((rc = af_finish(&f, err)) != LT_OK) return rc;
    rc = af_commit(&f, err);
    dir_sync(path);
    return rc;
}

/* ---- a set of files committed together ----------------------------------------------------------
 */

#define MAX_SET 8

typedef struct file_set {
    afile f[MAX_SET];
    int n;
} file_set;

static void set_abort(file_set *s) {
    for (int i = 0; i < s->n; i++)
        af_abort(&s->f[i]);
    s->n = 0;
}

static lt_status set_text(file_set *s, const char *path, const char *text, char *err) {
    afile *f = &s->f[s->n];
    lt_status rc = af_open(f, path, err);
    if (rc != LT_OK) return rc;
    s->n++;
    if ((rc = af_write(f, text, strlen(text), err)) != LT_OK) return rc;
    return af_finish(f, err);
}

static lt_status set_st(file_set *s, const char *path, const st_out *t, int n, char *err) {
    afile *f = &s->f[s->n];
    lt_status rc = af_open(f, path, err);
    if (rc != LT_OK) return rc;
    s->n++;
    rc = st_emit(f, t, n, "{\"format\":\"pt\"}", err);
    if (rc == LT_ERR_MEMORY) perr(err, "%s: out of memory", path);
    if (rc != LT_OK) return rc;
    return af_finish(f, err);
}

/* Copies a file's bytes into the set. */
static lt_status set_copy(file_set *s, const char *path, const char *src, char *err) {
    FILE *in = fopen(src, "rb");
    if (!in) {
        perr(err, "%s: cannot read (%s)", src, strerror(errno));
        return LT_ERR_IO;
    }
    afile *f = &s->f[s->n];
    lt_status rc = af_open(f, path, err);
    if (rc != LT_OK) {
        fclose(in);
        return rc;
    }
    s->n++;
    char buf[1 << 16];
    size_t r;
    while (rc == LT_OK && (r = fread(buf, 1, sizeof buf, in)) > 0)
        rc = af_write(f, buf, r, err);
    if (rc == LT_OK && ferror(in)) {
        perr(err, "%s: read error", src);
        rc = LT_ERR_IO;
    }
    fclose(in);
    if (rc != LT_OK) return rc;
    return af_finish(f, err);
}

/* Renames every temp into place (all were fully written and fsync'd). */
static lt_status set_commit(file_set *s, const char *dir, char *err) {
    for (int i = 0; i < s->n; i++) {
        if (rename(s->f[i].tmp, s->f[i].path) != 0) {
            perr(err, "%s: rename failed (%s)", s->f[i].path, strerror(errno));
            for (int j = i; j < s->n; j++)
                unlink(s->f[j].tmp);
            return LT_ERR_IO;
        }
    }
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    s->n = 0;
    return LT_OK;
}

/* ---- host views of backend tensors ---------------------------------------------------------- */

/* Tensors of a device backend are downloaded into malloc'd copies kept in a pool (freed by
 * pool_free); on the CPU backend the data is used as it is. */
typedef struct host_pool {
    void **p;
    int n;
} host_pool;

static const void *host_of(lt_ctx *ctx, const lt_tensor *t, host_pool *hp) {
    if (!t->data || ctx->be == &lt_backend_cpu) return t->data;
    size_t bytes = lt_tensor_bytes(t);
    void *buf = malloc(bytes ? bytes : 1);
    void **np = realloc(hp->p, sizeof(void *) * (size_t)(hp->n + 1));
    if (!buf || !np) {
        free(buf);
        if (np) hp->p = np;
        return NULL;
    }
    hp->p = np;
    if (ctx->be->download(ctx, buf, t->data, bytes) != LT_OK) {
        free(buf);
        return NULL;
    }
    hp->p[hp->n++] = buf;
    return buf;
}

static void pool_free(host_pool *hp) {
    for (int i = 0; i < hp->n; i++)
        free(hp->p[i]);
    free(hp->p);
    hp->p = NULL;
    hp->n = 0;
}

/* ---- PEFT adapters --------------------------------------------------------------------------- */

static char *adapter_config_json(const lt_adapters *a) {
    json_t *c = json_object();
    json_t *targets;
    if (a->targets_regex) {
        targets = json_string(a->targets);
    } else if (a->model->cfg.multimodal) {
        /* a plain list would also match the vision tower's q/k/v/o in PEFT (peft's
         * tuners_utils.py check_target_module_exists matches any name ending in "." + entry):
         * a regex keeps the adapter on the language model */
        char re[700], alts[512] = "";
        snprintf(re, sizeof re, "%s", a->targets);
        size_t n = 0;
        char *save = NULL;
        for (char *w = strtok_r(re, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
            snprintf(alts + n, sizeof alts - n, "%s%s", n ? "|" : "", w);
            n = strlen(alts);
        }
        snprintf(re, sizeof re, ".*language_model.*\\.(%s)", alts);
        targets = json_string(re);
    } else {
        targets = json_array();
        char buf[512];
        snprintf(buf, sizeof buf, "%s", a->targets);
        char *save = NULL;
        for (char *w = strtok_r(buf, ",", &save); w; w = strtok_r(NULL, ",", &save))
            json_array_append_new(targets, json_string(w));
    }
    const char *src = a->model->source[0] ? a->model->source : "google/gemma-3-1b-it";
    json_object_set_new(c, "peft_type", json_string("LORA"));
    json_object_set_new(c, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(c, "base_model_name_or_path", json_string(src));
    json_object_set_new(c, "revision", json_null());
    json_object_set_new(c, "r", json_integer(a->r));
    json_object_set_new(c, "lora_alpha", json_real(a->alpha));
    json_object_set_new(c, "lora_dropout", json_real(a->dropout));
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "use_rslora", json_boolean(a->rslora));
    json_object_set_new(c, "use_dora", json_false());
    json_object_set_new(c, "fan_in_fan_out", json_false());
    json_object_set_new(c, "init_lora_weights", json_true());
    json_object_set_new(c, "inference_mode", json_true());
    json_object_set_new(c, "target_modules", targets);
    json_object_set_new(c, "modules_to_save", json_null());
    json_object_set_new(c, "layers_to_transform", json_null());
    json_object_set_new(c, "layers_pattern", json_null());
    json_object_set_new(c, "rank_pattern", json_object());
    json_object_set_new(c, "alpha_pattern", json_object());
    json_object_set_new(c, "exclude_modules", json_null());
    char *text = json_dumps(c, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(c);
    if (!text) return NULL;
    size_t n = strlen(text);
    char *out = realloc(text, n + 2);
    if (!out) {
        free(text);
        return NULL;
    }
    out[n] = '\n';
    out[n + 1] = 0;
    return out;
}

/* The adapter tensors as st_out entries with PEFT names; names are malloc'd in *names. */
static lt_status adapter_tensors(const lt_adapters *a, st_out **out, char ***names, host_pool *hp) {
    int n = a->n_slots * 2;
    st_out *t = calloc((size_t)n + 1, sizeof *t);
    char **nm = calloc((size_t)n + 1, sizeof *nm);
    if (!t || !nm) {
        free(t);
        free(nm);
        return LT_ERR_MEMORY;
    }
    for (int i = 0; i < a->n_slots; i++) {
        const lora_slot *s = &a->slots[i];
        char mod[256];
        lora_peft_module(a, s, mod, sizeof mod);
        for (int k = 0; k < 2; k++) {
            const lt_tensor *x = k == 0 ? &s->lora.a : &s->lora.b;
            size_t len = strlen(mod) + 24;
            char *name = malloc(len);
            if (!name) goto oom;
            snprintf(name, len, "%s.lora_%c.weight", mod, k == 0 ? 'A' : 'B');
            nm[2 * i + k] = name;
            const void *data = host_of(a->ctx, x, hp);
            if (!data) goto oom;
            t[2 * i + k] = (st_out){name, LT_F32, 2, {x->shape[0], x->shape[1]}, data};
        }
    }
    *out = t;
    *names = nm;
    return LT_OK;
oom:
    for (int i = 0; i < n; i++)
        free(nm[i]);
    free(nm);
    free(t);
    return LT_ERR_MEMORY;
}

static void free_names(char **nm, int n) {
    if (!nm) return;
    for (int i = 0; i < n; i++)
        free(nm[i]);
    free(nm);
}

lt_status peft_save_adapter(const lt_adapters *a, const char *dir, char *err) {
    if (!a) {
        perr(err, "%%save adapter=: no adapters attached (%%lora first)");
        return LT_ERR_STATE;
    }
    if (a->full) {
        perr(err, "%%save adapter=: full fine-tuning has no adapter; use %%save merged=DIR");
        return LT_ERR_STATE;
    }
    lt_status rc = dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    char *cfg = adapter_config_json(a);
    st_out *t = NULL;
    char **nm = NULL;
    host_pool hp = {0};
    if (!cfg || adapter_tensors(a, &t, &nm, &hp) != LT_OK) {
        free(cfg);
        pool_free(&hp);
        perr(err, "%%save adapter=%s: out of memory", dir);
        return LT_ERR_MEMORY;
    }
    char p1[4200], p2[4200];
    snprintf(p1, sizeof p1, "%s/adapter_model.safetensors", dir);
    snprintf(p2, sizeof p2, "%s/adapter_config.json", dir);
    file_set fs = {.n = 0};
    rc = set_st(&fs, p1, t, a->n_slots * 2, err);
    if (rc == LT_OK) rc = set_text(&fs, p2, cfg, err);
    if (rc == LT_OK) rc = set_commit(&fs, dir, err);
    if (rc != LT_OK) set_abort(&fs);
    free(cfg);
    free(t);
    free_names(nm, a->n_slots * 2);
    pool_free(&hp);
    return rc;
}

/* Finds the tensor of a slot under any PEFT key spelling. */
static const st_tensor *find_lora(const st_set *st, const lora_slot *s, char ab) {
    const char *rest = s->module + strlen("model.");
    static const char *const PRE[] = {"base_model.model.model.",
                                      "base_model.model.model.language_model.",
                                      "base_model.model.language_model.model."};
    char key[512];
    for (int i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "%s%s.lora_%c.weight", PRE[i], rest, ab);
        const st_tensor *t = st_find(st, key);
        if (t) return t;
        snprintf(key, sizeof key, "%s%s.lora_%c.default.weight", PRE[i], rest, ab);
        if ((t = st_find(st, key))) return t;
    }
    return NULL;
}

lt_status peft_load_adapter(lt_adapters **out, gemma3_model *m, lt_ctx *ctx, const char *dir,
                            char *err) {
    *out = NULL;
    char path[4200];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    json_error_t je;
    json_t *c = json_load_file(path, 0, &je);
    if (!c) {
        perr(err, "%%lora load=%s: cannot read adapter_config.json (%s)", dir, je.text);
        return LT_ERR_IO;
    }
    lt_status rc = LT_OK;
    json_t *pt = json_object_get(c, "peft_type");
    json_t *r = json_object_get(c, "r"), *alpha = json_object_get(c, "lora_alpha");
    json_t *tm = json_object_get(c, "target_modules");
    char targets[1024] = "";
    if (!json_is_string(pt) || strcmp(json_string_value(pt), "LORA") != 0) {
        perr(err, "%s: peft_type is not \"LORA\"", path);
        rc = LT_ERR_FORMAT;
    } else if (json_is_true(json_object_get(c, "use_dora"))) {
        perr(err, "%s: use_dora=true (DoRA) is not supported", path);
        rc = LT_ERR_FORMAT;
    } else if (json_object_size(json_object_get(c, "rank_pattern")) ||
               json_object_size(json_object_get(c, "alpha_pattern"))) {
        perr(err, "%s: rank_pattern/alpha_pattern (per-module ranks) are not supported", path);
        rc = LT_ERR_FORMAT;
    } else if (r && !json_is_integer(r)) {
        perr(err, "%s: key 'r' is not an integer", path);
        rc = LT_ERR_FORMAT;
    } else if (json_is_string(tm)) {
        snprintf(targets, sizeof targets, "%s", json_string_value(tm));
    } else if (json_is_array(tm)) {
        size_t i;
        json_t *v;
        json_array_foreach(tm, i, v) {
            if (!json_is_string(v)) continue;
            size_t n = strlen(targets);
            snprintf(targets + n, sizeof targets - n, "%s%s", n ? "," : "", json_string_value(v));
        }
    } else {
        perr(err, "%s: key 'target_modules' is missing (a list or a regex)", path);
        rc = LT_ERR_FORMAT;
    }
    lora_opts o = {0};
    if (rc == LT_OK) {
        o.r = r ? (int)json_integer_value(r) : 8;
        o.alpha = alpha && json_is_number(alpha) ? (float)json_number_value(alpha) : 8.0f;
        o.rslora = json_is_true(json_object_get(c, "use_rslora"));
        json_t *dr = json_object_get(c, "lora_dropout");
        o.dropout = dr && json_is_number(dr) ? (float)json_number_value(dr) : 0.0f;
        o.targets = targets;
    }
    json_decref(c);
    if (rc != LT_OK) return rc;
    /* PEFT's targets for a multimodal model may name vision modules too; we only hold text */
    lt_adapters *a = NULL;
    char aerr[LT_ERRLEN];
    rc = lora_attach(&a, m, ctx, &o, aerr);
    if (rc != LT_OK) {
        perr(err, "%%lora load=%s: %s", dir, aerr);
        return rc;
    }
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_set st;
    rc = st_open(&st, path, err);
    if (rc != LT_OK) {
        lora_free(a);
        return rc;
    }
    int used = 0;
    for (int i = 0; i < a->n_slots && rc == LT_OK; i++) {
        lora_slot *s = &a->slots[i];
        for (int k = 0; k < 2 && rc == LT_OK; k++) {
            const st_tensor *t = find_lora(&st, s, k == 0 ? 'A' : 'B');
            lt_tensor *dst = k == 0 ? &s->lora.a : &s->lora.b;
            if (!t) {
                perr(err, "%s: no lora_%c tensor for %s (the config targets it)", path,
                     k ? 'B' : 'A', s->module);
                rc = LT_ERR_FORMAT;
            } else if (!t->dtype_ok || !lt_dtype_is_float(t->dtype) || t->ndim != 2 ||
                       t->shape[0] != dst->shape[0] || t->shape[1] != dst->shape[1]) {
                char sh[64];
                perr(err, "%s: %s is %s %s; expected F32/F16/BF16 [%lld, %lld]", path, t->name,
                     t->dtype_name, st_shape_str(t, sh, sizeof sh), (long long)dst->shape[0],
                     (long long)dst->shape[1]);
                rc = LT_ERR_FORMAT;
            } else {
                int64_t n = lt_tensor_numel(dst);
                float *host = malloc(sizeof(float) * (size_t)n);
                if (!host) {
                    rc = LT_ERR_MEMORY;
                    perr(err, "out of memory");
                } else {
                    lt_to_f32(host, t->data, t->dtype, n);
                    rc = ctx->be->upload(ctx, dst->data, host, sizeof(float) * (size_t)n);
                    free(host);
                    used++;
                }
            }
        }
    }
    int lora_tensors = 0;
    for (int i = 0; i < st.n_tensors; i++)
        lora_tensors += strstr(st.tensors[i].name, ".lora_") != NULL;
    if (rc == LT_OK && lora_tensors > used) {
        perr(err,
             "%s: holds %d LoRA tensors but only %d belong to the text model's targeted layers",
             path, lora_tensors, used);
        /* vision-tower adapters of a multimodal checkpoint are the one acceptable case */
        if (!m->cfg.multimodal)
            rc = LT_ERR_FORMAT;
        else
            err[0] = 0;
    }
    st_close(&st);
    if (rc != LT_OK) {
        lora_free(a);
        return rc;
    }
    *out = a;
    return LT_OK;
}

/* ---- merged checkpoints ---------------------------------------------------------------------- */

static const char *torch_dtype(lt_dtype d) {
    return d == LT_BF16 ? "bfloat16" : d == LT_F16 ? "float16" : "float32";
}

/* A flat Gemma3TextConfig (transformers reads it as Gemma3ForCausalLM). */
static char *text_config_json(const gemma3_model *m, lt_dtype dt) {
    const gemma3_config *c = &m->cfg;
    json_t *j = json_object();
    json_object_set_new(j, "architectures", json_pack("[s]", "Gemma3ForCausalLM"));
    json_object_set_new(j, "model_type", json_string("gemma3_text"));
    json_object_set_new(j, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(j, "intermediate_size", json_integer(c->intermediate_size));
    json_object_set_new(j, "num_hidden_layers", json_integer(c->num_hidden_layers));
    json_object_set_new(j, "num_attention_heads", json_integer(c->num_attention_heads));
    json_object_set_new(j, "num_key_value_heads", json_integer(c->num_key_value_heads));
    json_object_set_new(j, "head_dim", json_integer(c->head_dim));
    json_object_set_new(j, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(j, "max_position_embeddings", json_integer(c->max_position_embeddings));
    json_object_set_new(j, "sliding_window", json_integer(c->sliding_window));
    json_object_set_new(j, "query_pre_attn_scalar", json_real(c->query_pre_attn_scalar));
    json_object_set_new(j, "rms_norm_eps", json_real(c->rms_norm_eps));
    json_object_set_new(j, "hidden_activation", json_string("gelu_pytorch_tanh"));
    json_object_set_new(j, "final_logit_softcapping", json_null());
    json_object_set_new(j, "attn_logit_softcapping", json_null());
    json_object_set_new(j, "attention_bias", json_false());
    json_object_set_new(j, "attention_dropout", json_real(0));
    json_object_set_new(j, "tie_word_embeddings", json_boolean(!m->lm_head.w.data));
    json_object_set_new(j, "rope_theta", json_real(c->rope[GEMMA3_FULL].theta));
    json_object_set_new(j, "rope_local_base_freq", json_real(c->rope[GEMMA3_SLIDING].theta));
    if (c->rope[GEMMA3_FULL].factor != 1.0)
        json_object_set_new(
            j, "rope_scaling",
            json_pack("{s:s, s:f}", "rope_type", "linear", "factor", c->rope[GEMMA3_FULL].factor));
    else
        json_object_set_new(j, "rope_scaling", json_null());
    json_t *lt = json_array();
    for (int l = 0; l < c->num_hidden_layers; l++)
        json_array_append_new(
            lt,
            json_string(c->layer_types[l] == GEMMA3_FULL ? "full_attention" : "sliding_attention"));
    json_object_set_new(j, "layer_types", lt);
    if (c->bos_id >= 0) json_object_set_new(j, "bos_token_id", json_integer(c->bos_id));
    if (c->pad_id >= 0) json_object_set_new(j, "pad_token_id", json_integer(c->pad_id));
    json_t *eos = json_array();
    for (int i = 0; i < c->n_eos_ids; i++)
        json_array_append_new(eos, json_integer(c->eos_ids[i]));
    json_object_set_new(j, "eos_token_id", eos);
    json_object_set_new(j, "torch_dtype", json_string(torch_dtype(dt)));
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(j);
    return text;
}

typedef struct merge_walk {
    gemma3_model *m;
    const lt_adapters *a;
    lt_dtype dt;
    st_out *t;
    char **names;
    void **bufs;
    int n;
    char *err;
    lt_status rc;
} merge_walk;

static const lora_slot *slot_of(const lt_adapters *a, const lt_tensor *t) {
    if (!a) return NULL;
    for (int i = 0; i < a->n_slots; i++)
        if (&a->slots[i].w->w == t) return &a->slots[i];
    return NULL;
}

static int merge_visit(void *user, const char *name, lt_tensor *t) {
    merge_walk *w = user;
    int64_t n = lt_tensor_numel(t);
    const lora_slot *s = slot_of(w->a, t);
    const lt_weight *owner = gemma3_weight_owner(w->m, t);
    float *f32 = NULL;
    if (s) { /* W' = W + s·B·A in fp32, then cast */
        f32 = malloc(sizeof(float) * (size_t)n);
        if (!f32 || lora_merged_weight(w->a, s, f32, w->err) != LT_OK) goto oom;
    } else if (owner && owner->q.kind != LT_QUANT_NONE) { /* NF4/int8: dequantized to fp32 */
        f32 = malloc(sizeof(float) * (size_t)n);
        if (!f32) goto oom;
        lt_weight_dequantize_rows(owner, 0, t->shape[0], f32);
    }
    void *buf = malloc((size_t)n * lt_dtype_size(w->dt));
    char *nm = strdup(name);
    if (!buf || !nm) {
        free(buf);
        free(nm);
        goto oom;
    }
    if (f32)
        lt_convert(buf, w->dt, f32, LT_F32, n);
    else
        lt_convert(buf, w->dt, t->data, t->dtype, n);
    free(f32);
    w->bufs[w->n] = buf;
    w->names[w->n] = nm;
    st_out *o = &w->t[w->n++];
    *o = (st_out){nm, w->dt, t->ndim, {0}, buf};
    for (int d = 0; d < t->ndim; d++)
        o->shape[d] = t->shape[d];
    return 0;
oom:
    free(f32);
    snprintf(w->err, LT_ERRLEN, "out of memory while merging %s", name);
    w->rc = LT_ERR_MEMORY;
    return 1;
}

lt_status peft_save_merged(const lt_adapters *a, gemma3_model *m, const char *src_dir,
                           const char *tokenizer_path, const char *dtype, const char *dir,
                           char *err) {
    lt_dtype dt = m->dtype;
    if (dtype && strcmp(dtype, "auto") != 0) {
        if (!strcmp(dtype, "fp32"))
            dt = LT_F32;
        else if (!strcmp(dtype, "fp16"))
            dt = LT_F16;
        else if (!strcmp(dtype, "bf16"))
            dt = LT_BF16;
        else {
            perr(err, "%%save dtype=%s; accepted: auto|fp32|fp16|bf16", dtype);
            return LT_ERR_ARG;
        }
    }
    if (dt != LT_F32 && dt != LT_F16 && dt != LT_BF16) dt = LT_BF16;
    if (a && a->ctx->be != &lt_backend_cpu) {
        perr(err,
             "%%save merged=: not available on the %s backend yet; save the adapter (%%save "
             "adapter=DIR), "
             "then %%load the model with device=cpu, %%lora load=DIR and %%save merged=",
             a->ctx->be->name);
        return LT_ERR_STATE;
    }
    lt_status rc = dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    int nw = gemma3_weight_count(m);
    merge_walk w = {m,
                    a,
                    dt,
                    calloc((size_t)nw + 1, sizeof(st_out)),
                    calloc((size_t)nw + 1, sizeof(char *)),
                    calloc((size_t)nw + 1, sizeof(void *)),
                    0,
                    err,
                    LT_OK};
    if (!w.t || !w.names || !w.bufs) {
        w.rc = LT_ERR_MEMORY;
        perr(err, "out of memory");
    } else {
        gemma3_weights_foreach(m, merge_visit, &w);
    }
    rc = w.rc;
    char *cfg = NULL;
    char src_cfg[4200] = "";
    if (rc == LT_OK) {
        /* keep the loaded config.json when there is one (text models); else write one */
        /* a pre-quantized checkpoint's config.json describes its quantization: not copied */
        if (src_dir && *src_dir && !m->cfg.multimodal && !m->prequantized) {
            snprintf(src_cfg, sizeof src_cfg, "%s/config.json", src_dir);
            if (access(src_cfg, R_OK) != 0) src_cfg[0] = 0;
        }
        if (!src_cfg[0] && !(cfg = text_config_json(m, dt))) {
            rc = LT_ERR_MEMORY;
            perr(err, "out of memory");
        }
    }
    file_set fs = {.n = 0};
    char p[4200];
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/model.safetensors", dir);
        rc = set_st(&fs, p, w.t, w.n, err);
    }
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/config.json", dir);
        rc = src_cfg[0] ? set_copy(&fs, p, src_cfg, err) : set_text(&fs, p, cfg, err);
    }
    if (rc == LT_OK && tokenizer_path) {
        snprintf(p, sizeof p, "%s/tokenizer.model", dir);
        rc = set_copy(&fs, p, tokenizer_path, err);
    }
    if (rc == LT_OK) rc = set_commit(&fs, dir, err);
    if (rc != LT_OK) set_abort(&fs);
    for (int i = 0; i < w.n; i++) {
        free(w.bufs[i]);
        free(w.names[i]);
    }
    free(w.t);
    free(w.names);
    free(w.bufs);
    free(cfg);
    return rc;
}

/* ---- training checkpoints -------------------------------------------------------------------- */

/* DIR/params.safetensors (every trainable tensor by its train_param name), optimizer.safetensors
 * (NAME.exp_avg, NAME.exp_avg_sq), trainer_state.json, and for LoRA the PEFT adapter files (so a
 * checkpoint is also a loadable adapter). One set: all written, then all renamed. */
lt_status ckpt_save(const lt_adapters *a, const char *dir, const char *state_json, char *err) {
    lt_status rc = dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    int n = a->n_params;
    st_out *pv = calloc((size_t)n + 1, sizeof *pv), *ov = calloc((size_t)n * 2 + 1, sizeof *ov);
    char **on = calloc((size_t)n * 2 + 1, sizeof *on);
    st_out *at = NULL;
    char **an = NULL;
    char *cfg = NULL;
    host_pool hp = {0};
    if (!pv || !ov || !on) goto oom;
    int no = 0;
    for (int i = 0; i < n; i++) {
        const train_param *p = &a->params[i];
        const void *val = host_of(a->ctx, p->value, &hp);
        if (!val) goto oom;
        pv[i] = (st_out){p->name, LT_F32, p->value->ndim, {0}, val};
        memcpy(pv[i].shape, p->value->shape, sizeof pv[i].shape);
        if (!p->m.data) continue;
        for (int k = 0; k < 2; k++) {
            size_t len = strlen(p->name) + 16;
            if (!(on[no] = malloc(len))) goto oom;
            snprintf(on[no], len, "%s.%s", p->name, k ? "exp_avg_sq" : "exp_avg");
            const void *st = host_of(a->ctx, k ? &p->v : &p->m, &hp);
            if (!st) goto oom;
            ov[no] = (st_out){on[no], LT_F32, p->value->ndim, {0}, st};
            memcpy(ov[no].shape, p->value->shape, sizeof ov[no].shape);
            no++;
        }
    }
    if (!a->full) {
        if (!(cfg = adapter_config_json(a)) || adapter_tensors(a, &at, &an, &hp) != LT_OK) goto oom;
    }
    file_set fs = {.n = 0};
    char p[4200];
    snprintf(p, sizeof p, "%s/params.safetensors", dir);
    rc = set_st(&fs, p, pv, n, err);
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/optimizer.safetensors", dir);
        rc = set_st(&fs, p, ov, no, err);
    }
    if (rc == LT_OK && !a->full) {
        snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
        rc = set_st(&fs, p, at, a->n_slots * 2, err);
        if (rc == LT_OK) {
            snprintf(p, sizeof p, "%s/adapter_config.json", dir);
            rc = set_text(&fs, p, cfg, err);
        }
    }
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/trainer_state.json", dir);
        rc = set_text(&fs, p, state_json, err);
    }
    if (rc == LT_OK) rc = set_commit(&fs, dir, err);
    if (rc != LT_OK) set_abort(&fs);
    goto out;
oom:
    rc = LT_ERR_MEMORY;
    perr(err, "checkpoint %s: out of memory", dir);
out:
    for (int i = 0; on && i < n * 2; i++)
        free(on[i]);
    free(on);
    free(ov);
    free(pv);
    free(at);
    free_names(an, a ? a->n_slots * 2 : 0);
    free(cfg);
    pool_free(&hp);
    return rc;
}

/* Loads params.safetensors and optimizer.safetensors of DIR into a (names must match). */
lt_status ckpt_load(lt_adapters *a, const char *dir, char *err) {
    char path[4200];
    st_set ps, os;
    snprintf(path, sizeof path, "%s/params.safetensors", dir);
    lt_status rc = st_open(&ps, path, err);
    if (rc != LT_OK) return rc;
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    rc = st_open(&os, path, err);
    if (rc != LT_OK) {
        st_close(&ps);
        return rc;
    }
    lt_ctx *ctx = a->ctx;
    for (int i = 0; i < a->n_params && rc == LT_OK; i++) {
        train_param *p = &a->params[i];
        size_t bytes = lt_tensor_bytes(p->value);
        const st_tensor *t = st_find(&ps, p->name);
        if (!t || t->dtype != LT_F32 || t->nbytes != bytes) {
            perr(err,
                 "%s/params.safetensors: no F32 tensor %s of the right shape (was the "
                 "checkpoint made with other %%lora options?)",
                 dir, p->name);
            rc = LT_ERR_FORMAT;
            break;
        }
        rc = ctx->be->upload(ctx, p->value->data, t->data, bytes);
        char key[256];
        for (int k = 0; k < 2 && rc == LT_OK; k++) {
            snprintf(key, sizeof key, "%s.%s", p->name, k ? "exp_avg_sq" : "exp_avg");
            const st_tensor *o = st_find(&os, key);
            if (!o) continue; /* no step taken yet */
            if (o->dtype != LT_F32 || o->nbytes != bytes) {
                perr(err, "%s/optimizer.safetensors: %s has the wrong shape", dir, key);
                rc = LT_ERR_FORMAT;
                break;
            }
            lt_tensor *dst = k ? &p->v : &p->m;
            if (!dst->data) {
                *dst = p->grad;
                dst->data = ctx->be->alloc(ctx, bytes);
                if (!dst->data) {
                    rc = LT_ERR_MEMORY;
                    perr(err, "out of memory");
                    break;
                }
            }
            rc = ctx->be->upload(ctx, dst->data, o->data, bytes);
        }
    }
    st_close(&ps);
    st_close(&os);
    return rc;
}
