/* atomic_file.h — files that appear whole or not at all. Engine-private.
 *
 * A file is written as a temp file beside its target ("<dir>/.<name>.tmp-PID-XXXXXX", locked
 * with flock while it is written), fsync'd,
 * then renamed over the target (or, in no-replace mode, hard-linked to it, so a file that
 * appeared meanwhile is never replaced), and the folder is fsync'd so the rename itself is
 * durable. A set of files (an adapter, a checkpoint) writes every temp first and renames only
 * when all of them were written. On any failure the temps are removed and the previous files
 * are untouched. A write that was killed leaves its temp behind: the next write to the same
 * target removes such temps, but only those whose writer is gone (no process has the pid in
 * the name, nobody holds the lock). Also: the whole-file write and the folder check the savers
 * start with.
 * Owns only its temp files; errors name the target path (err: LT_ERRLEN bytes).
 */
#ifndef LATHE_ATOMIC_FILE_H
#define LATHE_ATOMIC_FILE_H

#include <stddef.h>

#include "cuda/base/error.h"

/* A file being written: fd on the temp, renamed to path on commit. */
typedef struct lt_afile {
    char path[4096], tmp[4200];
    int fd;      /* -1 once finished or aborted */
    int existed; /* set by a no-replace commit that found the target there */
} lt_afile;

/* Creates the temp file beside path. */
lt_status lt_afile_open(lt_afile *f, const char *path, char *err);
lt_status lt_afile_write(lt_afile *f, const void *data, size_t n, char *err);
/* fsync + close; on failure the temp is removed. */
lt_status lt_afile_finish(lt_afile *f, char *err);
/* After finish: renames the temp onto the target (replace = 1), or links it there only when
 * no file of that name exists (replace = 0: a target that exists is an LT_ERR_IO with
 * f->existed set); then fsyncs the folder. The temp is gone afterwards either way. */
lt_status lt_afile_commit(lt_afile *f, int replace, char *err);
/* Closes (if open) and removes the temp. */
void lt_afile_abort(lt_afile *f);

/* Several files committed together. */
#define LT_AFILE_SET_MAX 8
typedef struct lt_afile_set {
    lt_afile f[LT_AFILE_SET_MAX];
    int n;
} lt_afile_set; /* = {0} to start */

/* Opens one more member (its temp) in *out: write it, then lt_afile_finish it. On any failure
 * of a member the caller aborts the set. */
lt_status lt_afile_set_add(lt_afile_set *s, const char *path, lt_afile **out, char *err);
/* A member holding text / a copy of the file src. */
lt_status lt_afile_set_text(lt_afile_set *s, const char *path, const char *text, char *err);
lt_status lt_afile_set_copy(lt_afile_set *s, const char *path, const char *src, char *err);
/* Renames every member into place (all finished), fsyncs their folders, empties the set. */
lt_status lt_afile_set_commit(lt_afile_set *s, char *err);
/* Removes every member's temp and empties the set. */
void lt_afile_set_abort(lt_afile_set *s);

/* Writes data as path, atomically (replacing). */
lt_status lt_file_write_atomic(const char *path, const void *data, size_t n, char *err);
/* Creates DIR (and its parents) if missing; checks it is a writable folder. */
lt_status lt_dir_prepare(const char *dir, char *err);

#endif
