/* atomic_file.c — temp file, fsync, rename (see atomic_file.h). Owns only the temp files it
 * creates, and the stale ones earlier writes to the same target left behind when they were
 * killed (a temp's name carries its writer's pid, and the writer holds a lock on it while it
 * writes): those are removed by the next write to that target, never one whose writer may
 * still run. Never touches a target except by the final rename or link.
 */
#include "cuda/base/atomic_file.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* A temp without a pid in its name (older lathe: ".NAME.tmp-XXXXXX") is only taken for stale
 * once it has not been written for this long. */
#define LEGACY_TEMP_AGE_S (10 * 60)

lt_status lt_dir_prepare(const char *dir, char *err) {
    if (!dir || !*dir) return lt_fail(err, LT_ERR_ARG, "no folder given");
    char tmp[4096];
    if (strlen(dir) >= sizeof tmp) return lt_fail(err, LT_ERR_ARG, "%.200s...: path too long", dir);
    snprintf(tmp, sizeof tmp, "%s", dir);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(tmp, 0777) != 0 && errno != EEXIST)
            return lt_fail(err, LT_ERR_IO, "%s: cannot create the folder %s (%s)", dir, tmp,
                           strerror(errno));
        *p = '/';
    }
    if (mkdir(tmp, 0777) != 0 && errno != EEXIST)
        return lt_fail(err, LT_ERR_IO, "%s: cannot create the folder (%s)", dir, strerror(errno));
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return lt_fail(err, LT_ERR_IO, "%s: exists and is not a folder", dir);
    if (access(dir, W_OK) != 0)
        return lt_fail(err, LT_ERR_IO, "%s: the folder is not writable (%s)", dir, strerror(errno));
    return LT_OK;
}

/* ---- stale temps ---------------------------------------------------------------------------- */

/* Whether the temp `name` (in the folder dirfd) belongs to a writer that is gone: its name's pid
 * (".NAME.tmp-PID-XXXXXX", or ".NAME.tmp-PID") names no process, or, for a name without a pid,
 * it has not changed for LEGACY_TEMP_AGE_S; and in both cases nobody holds its lock. */
static int temp_is_stale(int dirfd, const char *name, const char *rest) {
    const char *p = rest;
    long pid = 0;
    while (*p >= '0' && *p <= '9' && pid < 100000000)
        pid = pid * 10 + (*p++ - '0');
    int has_pid = p > rest && (*p == '-' || *p == 0);
    if (has_pid) {
        if ((pid_t)pid == getpid()) return 0; /* this process: maybe another writer of ours */
        if (pid <= 0 || kill((pid_t)pid, 0) == 0 || errno != ESRCH) return 0;
    } else if (strlen(rest) != 6) {
        return 0; /* not a name this file makes */
    }
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return 0;
    struct stat st;
    int stale = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
                (has_pid || time(NULL) - st.st_mtime > LEGACY_TEMP_AGE_S) &&
                flock(fd, LOCK_EX | LOCK_NB) == 0;
    close(fd); /* releases the lock: the unlink follows at once */
    return stale;
}

/* Removes the temps that earlier, killed writes to path left beside it (best effort). */
static void stale_temps_remove(const char *path) {
    char dir[4096], prefix[4200];
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    if (slash)
        snprintf(dir, sizeof dir, "%.*s", (int)(slash == path ? 1 : slash - path), path);
    else
        snprintf(dir, sizeof dir, ".");
    int n = snprintf(prefix, sizeof prefix, ".%s.tmp-", base);
    if (n <= 0 || (size_t)n >= sizeof prefix) return;
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, prefix, (size_t)n) != 0) continue;
        if (temp_is_stale(dirfd(d), e->d_name, e->d_name + n))
            (void)unlinkat(dirfd(d), e->d_name, 0);
    }
    closedir(d);
}

/* ---- one file ------------------------------------------------------------------------------- */

lt_status lt_afile_open(lt_afile *f, const char *path, char *err) {
    f->fd = -1;
    f->existed = 0;
    f->tmp[0] = 0;
    if (strlen(path) >= sizeof f->path)
        return lt_fail(err, LT_ERR_ARG, "%.200s...: path too long", path);
    snprintf(f->path, sizeof f->path, "%s", path);
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    stale_temps_remove(path);
    snprintf(f->tmp, sizeof f->tmp, "%.*s.%s.tmp-%ld-XXXXXX", (int)(base - path), path, base,
             (long)getpid());
    f->fd = mkstemp(f->tmp);
    if (f->fd < 0) {
        f->tmp[0] = 0;
        return lt_fail(err, LT_ERR_IO, "%s: cannot create a temp file in its folder (%s)", path,
                       strerror(errno));
    }
    (void)fcntl(f->fd, F_SETFD, FD_CLOEXEC);
    (void)flock(f->fd, LOCK_EX | LOCK_NB); /* held while it writes: see temp_is_stale */
    (void)fchmod(f->fd, 0644);             /* mkstemp makes it 0600 */
    return LT_OK;
}

lt_status lt_afile_write(lt_afile *f, const void *data, size_t n, char *err) {
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(f->fd, p, n > (1u << 30) ? (1u << 30) : n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0)
            return lt_fail(err, LT_ERR_IO, "%s: write failed (%s); any previous copy is kept",
                           f->path, w < 0 ? strerror(errno) : "no space");
        p += w;
        n -= (size_t)w;
    }
    return LT_OK;
}

lt_status lt_afile_finish(lt_afile *f, char *err) {
    int bad = fsync(f->fd) != 0;
    int e = errno;
    if (close(f->fd) != 0 && !bad) {
        bad = 1;
        e = errno;
    }
    f->fd = -1;
    if (bad) {
        unlink(f->tmp);
        f->tmp[0] = 0;
        return lt_fail(err, LT_ERR_IO,
                       "%s: could not flush the file to disk (%s); any previous copy is kept",
                       f->path, strerror(e));
    }
    return LT_OK;
}

void lt_afile_abort(lt_afile *f) {
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
    if (f->tmp[0]) unlink(f->tmp);
    f->tmp[0] = 0;
}

/* fsyncs the folder holding path so a rename into it is durable (best effort). */
static void folder_sync(const char *path) {
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", path);
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

/* The rename (or link) alone; on failure the temp is removed. */
static lt_status place(lt_afile *f, int replace, char *err) {
    lt_status rc = LT_OK;
    int moved = 0;
    if (replace) {
        if (rename(f->tmp, f->path) == 0)
            moved = 1;
        else
            rc = lt_fail(err, LT_ERR_IO, "%s: rename failed (%s)", f->path, strerror(errno));
    } else if (link(f->tmp, f->path) != 0) { /* never replaces a file that appeared meanwhile */
        struct stat sb;
        if (errno == EEXIST || stat(f->path, &sb) == 0) {
            f->existed = 1;
            rc = lt_fail(err, LT_ERR_IO, "%s: file exists; it was not replaced", f->path);
        } else if (rename(f->tmp, f->path) == 0) { /* a file system without hard links */
            moved = 1;
        } else {
            rc = lt_fail(err, LT_ERR_IO, "%s: rename failed (%s)", f->path, strerror(errno));
        }
    }
    if (!moved) unlink(f->tmp); /* linked: the temp name goes; failed: the temp goes */
    f->tmp[0] = 0;
    return rc;
}

lt_status lt_afile_commit(lt_afile *f, int replace, char *err) {
    lt_status rc = place(f, replace, err);
    if (rc == LT_OK) folder_sync(f->path);
    return rc;
}

lt_status lt_file_write_atomic(const char *path, const void *data, size_t n, char *err) {
    lt_afile f;
    lt_status rc = lt_afile_open(&f, path, err);
    if (rc == LT_OK) rc = lt_afile_write(&f, data, n, err);
    if (rc != LT_OK) {
        lt_afile_abort(&f);
        return rc;
    }
    if ((rc = lt_afile_finish(&f, err)) != LT_OK) return rc;
    return lt_afile_commit(&f, 1, err);
}

/* ---- a set of files committed together ------------------------------------------------------ */

lt_status lt_afile_set_add(lt_afile_set *s, const char *path, lt_afile **out, char *err) {
    *out = NULL;
    if (s->n == LT_AFILE_SET_MAX)
        return lt_fail(err, LT_ERR_STATE, "%s: internal: more than %d files in one save", path,
                       LT_AFILE_SET_MAX);
    lt_status rc = lt_afile_open(&s->f[s->n], path, err);
    if (rc != LT_OK) return rc;
    *out = &s->f[s->n++];
    return LT_OK;
}

lt_status lt_afile_set_text(lt_afile_set *s, const char *path, const char *text, char *err) {
    lt_afile *f;
    lt_status rc = lt_afile_set_add(s, path, &f, err);
    if (rc == LT_OK) rc = lt_afile_write(f, text, strlen(text), err);
    if (rc != LT_OK) return rc;
    return lt_afile_finish(f, err);
}

lt_status lt_afile_set_copy(lt_afile_set *s, const char *path, const char *src, char *err) {
    FILE *in = fopen(src, "rb");
    if (!in) return lt_fail(err, LT_ERR_IO, "%s: cannot read (%s)", src, strerror(errno));
    lt_afile *f;
    lt_status rc = lt_afile_set_add(s, path, &f, err);
    char buf[1 << 16];
    size_t r;
    while (rc == LT_OK && (r = fread(buf, 1, sizeof buf, in)) > 0)
        rc = lt_afile_write(f, buf, r, err);
    if (rc == LT_OK && ferror(in)) rc = lt_fail(err, LT_ERR_IO, "%s: read error", src);
    fclose(in);
    if (rc != LT_OK) return rc;
    return lt_afile_finish(f, err);
}

lt_status lt_afile_set_commit(lt_afile_set *s, char *err) {
    for (int i = 0; i < s->n; i++) {
        lt_status rc = place(&s->f[i], 1, err);
        if (rc != LT_OK) {
            lt_afile_set_abort(s); /* the temps not renamed yet */
            return rc;
        }
    }
    for (int i = 0; i < s->n; i++) { /* each folder once */
        int seen = 0;
        const char *bi = strrchr(s->f[i].path, '/');
        size_t li = bi ? (size_t)(bi - s->f[i].path) : 0;
        for (int j = 0; j < i && !seen; j++) {
            const char *bj = strrchr(s->f[j].path, '/');
            size_t lj = bj ? (size_t)(bj - s->f[j].path) : 0;
            seen = li == lj && strncmp(s->f[i].path, s->f[j].path, li) == 0;
        }
        if (!seen) folder_sync(s->f[i].path);
    }
    s->n = 0;
    return LT_OK;
}

void lt_afile_set_abort(lt_afile_set *s) {
    for (int i = 0; i < s->n; i++)
        lt_afile_abort(&s->f[i]);
    s->n = 0;
}
