/* checkpoint.c — training checkpoints: what %train save= writes every save_every steps and a
 * resumed run reads back.
 *
 * DIR holds params.safetensors (every trainable tensor under its train_param name),
 * optimizer.safetensors (NAME.exp_avg, NAME.exp_avg_sq and NAME.step: AdamW's state, once the
 * parameter took a step; the step count a float32 scalar, as torch keeps it per parameter),
 * trainer_state.json (the run's position, written by train.c) and, for LoRA, the PEFT adapter
 * files, so that a checkpoint is also a loadable adapter. They are one atomic set: all are
 * written, then all renamed, so a failed save keeps the previous checkpoint whole. keep=
 * (ckpt_prune) removes older checkpoint folders of the run once a new one is complete. Owns
 * nothing after a call returns; ckpt_load writes only into the adapters it is given.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/backend/host_view.h"
#include "cuda/base/atomic_file.h"
#include "cuda/formats/safetensors.h"
#include "cuda/formats/safetensors_write.h"
#include "cuda/train/train.h"

/* DIR/params.safetensors (every trainable tensor by its train_param name), optimizer.safetensors
 * (NAME.exp_avg, NAME.exp_avg_sq, NAME.step), trainer_state.json, and for LoRA the PEFT adapter
 * files (so a checkpoint is also a loadable adapter). One set: all written, then all renamed. */
lt_status ckpt_save(const lt_adapters *a, const char *dir, const char *state_json, char *err) {
    lt_status rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    int n = a->n_params;
    st_out *pv = calloc((size_t)n + 1, sizeof *pv), *ov = calloc((size_t)n * 3 + 1, sizeof *ov);
    char **on = calloc((size_t)n * 3 + 1, sizeof *on);
    float *steps = calloc((size_t)n + 1, sizeof *steps);
    lt_host_pool hp = {0};
    char what[4200];
    snprintf(what, sizeof what, "checkpoint %s", dir);
    if (!pv || !ov || !on || !steps) goto oom;
    int no = 0;
    for (int i = 0; i < n; i++) {
        const train_param *p = &a->params[i];
        const void *val = lt_host_view(a->ctx, p->value, &hp);
        if (!val) goto oom;
        pv[i] = (st_out){p->name, LT_F32, p->value->ndim, {0}, val};
        memcpy(pv[i].shape, p->value->shape, sizeof pv[i].shape);
        if (!p->m.data) continue;
        for (int k = 0; k < 2; k++) {
            size_t len = strlen(p->name) + 16;
            if (!(on[no] = malloc(len))) goto oom;
            snprintf(on[no], len, "%s.%s", p->name, k ? "exp_avg_sq" : "exp_avg");
            const void *st = lt_host_view(a->ctx, k ? &p->v : &p->m, &hp);
            if (!st) goto oom;
            ov[no] = (st_out){on[no], LT_F32, p->value->ndim, {0}, st};
            memcpy(ov[no].shape, p->value->shape, sizeof ov[no].shape);
            no++;
        }
        size_t len = strlen(p->name) + 8;
        if (!(on[no] = malloc(len))) goto oom;
        snprintf(on[no], len, "%s.step", p->name);
        steps[i] = (float)p->steps;
        ov[no] = (st_out){on[no], LT_F32, 0, {0}, &steps[i]};
        no++;
    }
    lt_afile_set fs = {0};
    char p[4200];
    snprintf(p, sizeof p, "%s/params.safetensors", dir);
    rc = st_write_member(&fs, p, pv, n, ST_METADATA_PT, err);
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/optimizer.safetensors", dir);
        rc = st_write_member(&fs, p, ov, no, ST_METADATA_PT, err);
    }
    if (rc == LT_OK && !a->full) rc = peft_adapter_write(&fs, a, dir, what, err);
    if (rc == LT_OK) {
        snprintf(p, sizeof p, "%s/trainer_state.json", dir);
        rc = lt_afile_set_text(&fs, p, state_json, err);
    }
    if (rc == LT_OK) rc = lt_afile_set_commit(&fs, err);
    if (rc != LT_OK) lt_afile_set_abort(&fs);
    goto out;
oom:
    rc = lt_fail(err, LT_ERR_MEMORY, "%s: out of memory", what);
out:
    for (int i = 0; on && i < n * 3; i++)
        free(on[i]);
    free(on);
    free(steps);
    free(ov);
    free(pv);
    lt_host_pool_free(&hp);
    return rc;
}

/* Loads params.safetensors and optimizer.safetensors of DIR into a (names must match). */
lt_status ckpt_load(lt_adapters *a, const char *dir, int step, char *err) {
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
            rc = lt_fail(err, LT_ERR_FORMAT,
                         "%s/params.safetensors: no F32 tensor %s of the right shape (was the "
                         "checkpoint made with other %%lora options?)",
                         dir, p->name);
            break;
        }
        rc = ctx->be->upload(ctx, p->value->data, t->data, bytes);
        char key[256];
        for (int k = 0; k < 2 && rc == LT_OK; k++) {
            snprintf(key, sizeof key, "%s.%s", p->name, k ? "exp_avg_sq" : "exp_avg");
            const st_tensor *o = st_find(&os, key);
            if (!o) continue; /* no step taken yet */
            if (o->dtype != LT_F32 || o->nbytes != bytes) {
                rc = lt_fail(err, LT_ERR_FORMAT, "%s/optimizer.safetensors: %s has the wrong shape",
                             dir, key);
                break;
            }
            lt_tensor *dst = k ? &p->v : &p->m;
            if (!dst->data) {
                *dst = p->grad;
                dst->data = ctx->be->alloc(ctx, bytes);
                if (!dst->data) {
                    rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
                    break;
                }
            }
            rc = ctx->be->upload(ctx, dst->data, o->data, bytes);
        }
        /* its own step count; a checkpoint without one (written before lathe kept them) counts
         * every step of the run for a parameter with state */
        snprintf(key, sizeof key, "%s.step", p->name);
        const st_tensor *c = rc == LT_OK ? st_find(&os, key) : NULL;
        float n = 0;
        if (c && c->dtype == LT_F32 && c->nbytes == sizeof n) memcpy(&n, c->data, sizeof n);
        if (c && (c->dtype != LT_F32 || c->nbytes != sizeof n || !(n >= 0 && n <= 1e9f) ||
                  n != (float)(int)n)) {
            rc = lt_fail(err, LT_ERR_FORMAT,
                         "%s/optimizer.safetensors: %s is not a step count (a whole float32)", dir,
                         key);
            break;
        }
        p->steps = c ? (int)n : p->m.data ? step : 0;
    }
    st_close(&ps);
    st_close(&os);
    return rc;
}

/* ---- keep= ---------------------------------------------------------------------------------- */

/* The step of a "checkpoint-N" folder name, or -1. */
static long ckpt_step_of(const char *name) {
    if (strncmp(name, "checkpoint-", 11) != 0 || name[11] < '0' || name[11] > '9') return -1;
    char *end;
    long n = strtol(name + 11, &end, 10);
    return *end ? -1 : n;
}

/* Removes one checkpoint folder: trainer_state.json first (so that a folder half removed is
 * no longer taken for a checkpoint), then its other files, then the folder. A folder holding
 * anything but plain files stays (rmdir fails): 0, or -1 with errno. */
static int ckpt_remove(const char *dir) {
    char p[4400];
    snprintf(p, sizeof p, "%s/trainer_state.json", dir);
    if (unlink(p) != 0 && errno != ENOENT) return -1;
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISDIR(st.st_mode))
            (void)unlinkat(dirfd(d), e->d_name, 0);
    }
    closedir(d);
    return rmdir(dir);
}

static int long_desc(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

void ckpt_prune(const char *save, int step, int keep, char *note, size_t cap) {
    note[0] = 0;
    if (keep <= 0) return;
    DIR *d = opendir(save);
    if (!d) return;
    long *older = NULL;
    size_t n = 0, cap_n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long s = ckpt_step_of(e->d_name);
        if (s < 0 || s >= step) continue;
        char ts[4400];
        snprintf(ts, sizeof ts, "%s/%s/trainer_state.json", save, e->d_name);
        if (access(ts, F_OK) != 0) continue; /* not a complete checkpoint: not ours to judge */
        if (n == cap_n) {
            size_t nc = cap_n ? cap_n * 2 : 16;
            long *g = realloc(older, nc * sizeof *g);
            if (!g) break;
            older = g;
            cap_n = nc;
        }
        older[n++] = s;
    }
    closedir(d);
    if (n > 0) qsort(older, n, sizeof *older, long_desc);
    size_t used = 0;
    for (size_t i = (size_t)keep - 1; i < n; i++) { /* the new one counts as one of keep */
        char dir[4200];
        snprintf(dir, sizeof dir, "%s/checkpoint-%ld", save, older[i]);
        int ok = ckpt_remove(dir) == 0;
        int w = snprintf(note + used, cap - used, "%scheckpoint-%ld%s", used ? ", " : "", older[i],
                         ok ? "" : " (could not remove it)");
        if (w > 0 && (size_t)w < cap - used) used += (size_t)w;
    }
    free(older);
}
