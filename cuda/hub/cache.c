/* cache.c — the Hugging Face cache layout (see cache.h): folder names, refs, snapshot pointers
 * as relative symlinks into blobs/, and the per-blob lock that huggingface_hub's WeakFileLock
 * takes (filelock's UnixFileLock: flock on .locks/<folder>/<etag>.lock), so a lathe download
 * and a huggingface_hub one never write the same blob at once.
 *
 * Owns only these paths; the bytes of a blob are written by hub.c.
 */
#define _GNU_SOURCE
#include "cuda/hub/cache.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cuda/base/atomic_file.h"

void hub_cache_init(hub_repo_cache *c, const char *cache, const char *repo) {
    memset(c, 0, sizeof *c);
    snprintf(c->cache, sizeof c->cache, "%s", cache);
    /* repo_folder_name: "models" + "--".join(repo_id.split("/")) */
    size_t k = (size_t)snprintf(c->folder, sizeof c->folder, "models--");
    for (const char *p = repo; *p && k + 3 < sizeof c->folder; p++) {
        if (*p == '/') {
            c->folder[k++] = '-';
            c->folder[k++] = '-';
        } else {
            c->folder[k++] = *p;
        }
    }
    c->folder[k] = 0;
    snprintf(c->root, sizeof c->root, "%.2048s/%.600s", c->cache, c->folder);
}

int hub_is_commit(const char *s) {
    size_t n = 0;
    for (; s[n]; n++)
        if (!((s[n] >= '0' && s[n] <= '9') || (s[n] >= 'a' && s[n] <= 'f'))) return 0;
    return n == 40;
}

int hub_ref_parse(const char *bytes, size_t len, char *commit, size_t cap) {
    commit[0] = 0;
    size_t n = 0;
    while (n < len && !memchr("\r\n \t", bytes[n], 4))
        n++;
    if (n == 0 || n >= cap || bytes[0] == '.') return 0;
    for (size_t i = 0; i < n; i++)
        if (!((bytes[i] >= '0' && bytes[i] <= '9') || (bytes[i] >= 'a' && bytes[i] <= 'z') ||
              (bytes[i] >= 'A' && bytes[i] <= 'Z') || bytes[i] == '-' || bytes[i] == '_' ||
              bytes[i] == '.'))
            return 0;
    memcpy(commit, bytes, n);
    commit[n] = 0;
    return 1;
}

int hub_cache_read_ref(const hub_repo_cache *c, const char *rev, char *commit, size_t cap) {
    char path[HUB_PATH + 300];
    snprintf(path, sizeof path, "%s/refs/%s", c->root, rev);
    commit[0] = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    char head[256]; /* a name longer than this is no snapshot's */
    size_t n = fread(head, 1, sizeof head, f);
    fclose(f);
    return hub_ref_parse(head, n, commit, cap);
}

lt_status hub_cache_write_ref(const hub_repo_cache *c, const char *rev, const char *commit,
                              char *err) {
    char have[160];
    if (hub_cache_read_ref(c, rev, have, sizeof have) && !strcmp(have, commit)) return LT_OK;
    char path[HUB_PATH + 300], dir[HUB_PATH + 300];
    snprintf(path, sizeof path, "%s/refs/%s", c->root, rev);
    snprintf(dir, sizeof dir, "%s", path);
    *strrchr(dir, '/') = 0;
    lt_status rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    return lt_file_write_atomic(path, commit, strlen(commit), err);
}

void hub_cache_snapshot(const hub_repo_cache *c, const char *commit, char *out, size_t cap) {
    snprintf(out, cap, "%s/snapshots/%s", c->root, commit);
}

void hub_cache_pointer(const hub_repo_cache *c, const char *commit, const char *file, char *out,
                       size_t cap) {
    snprintf(out, cap, "%s/snapshots/%s/%s", c->root, commit, file);
}

int hub_cache_has(const hub_repo_cache *c, const char *commit, const char *file) {
    char p[HUB_PATH + 600];
    hub_cache_pointer(c, commit, file, p, sizeof p);
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

void hub_cache_blob(const hub_repo_cache *c, const char *etag, const char *suffix, char *out,
                    size_t cap) {
    snprintf(out, cap, "%s/blobs/%s%s", c->root, etag, suffix);
}

lt_status hub_cache_link(const hub_repo_cache *c, const char *commit, const char *file,
                         const char *etag, char *err) {
    char ptr[HUB_PATH + 600], dir[HUB_PATH + 600], target[1200];
    hub_cache_pointer(c, commit, file, ptr, sizeof ptr);
    snprintf(dir, sizeof dir, "%s", ptr);
    *strrchr(dir, '/') = 0;
    lt_status rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    /* From snapshots/<commit>/<file>: one "../" per folder of file, then ../../blobs/<etag>. */
    size_t k = 0;
    target[0] = 0;
    for (const char *p = file; *p; p++)
        if (*p == '/' && k + 3 < sizeof target) {
            memcpy(target + k, "../", 3);
            k += 3;
        }
    snprintf(target + k, sizeof target - k, "../../blobs/%s", etag);
    if (unlink(ptr) != 0 && errno != ENOENT)
        return lt_fail(err, LT_ERR_IO, "%s: %s", ptr, strerror(errno));
    if (symlink(target, ptr) != 0)
        return lt_fail(err, LT_ERR_IO, "%s: cannot make the link to %s: %s", ptr, target,
                       strerror(errno));
    return LT_OK;
}

lt_status hub_cache_lock(const hub_repo_cache *c, const char *etag, const atomic_int *cancel,
                         int *fd, int *waited, char *err) {
    *fd = -1;
    *waited = 0;
    char dir[HUB_PATH + 700], path[HUB_PATH + 1000];
    snprintf(dir, sizeof dir, "%s/blobs", c->root);
    lt_status rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    snprintf(dir, sizeof dir, "%s/.locks/%s", c->cache, c->folder);
    rc = lt_dir_prepare(dir, err);
    if (rc != LT_OK) return rc;
    snprintf(path, sizeof path, "%s/%s.lock", dir, etag);
    int f = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (f < 0) return lt_fail(err, LT_ERR_IO, "%s: %s", path, strerror(errno));
    for (;;) {
        if (flock(f, LOCK_EX | LOCK_NB) == 0) break;
        if (errno != EWOULDBLOCK && errno != EINTR) {
            rc = lt_fail(err, LT_ERR_IO, "%s: cannot lock: %s", path, strerror(errno));
            close(f);
            return rc;
        }
        *waited = 1;
        if (cancel && atomic_load(cancel)) {
            close(f);
            return lt_fail(err, LT_CANCELLED, "interrupted while waiting for %s", path);
        }
        struct timespec ts = {0, 100 * 1000 * 1000}; /* another process holds it: poll */
        nanosleep(&ts, NULL);
    }
    *fd = f;
    return LT_OK;
}

void hub_cache_unlock(int fd) {
    if (fd < 0) return;
    flock(fd, LOCK_UN);
    close(fd);
}
