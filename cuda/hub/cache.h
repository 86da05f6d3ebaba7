/* cache.h — the Hugging Face cache on disk, as huggingface_hub lays it out, so that lathe and
 * huggingface_hub (transformers, `hf download`) read and fill the same folders:
 *
 *     <cache>/models--ORG--NAME/blobs/<etag>            the bytes, named by their ETag
 *     <cache>/models--ORG--NAME/blobs/<etag>.incomplete a download under way (resumable)
 *     <cache>/models--ORG--NAME/snapshots/<commit>/FILE a relative symlink ../../blobs/<etag>
 *     <cache>/models--ORG--NAME/refs/<revision>         the commit a branch or tag named
 *     <cache>/.locks/models--ORG--NAME/<etag>.lock      flock()ed while a blob is written
 *
 * (huggingface_hub's file_download.py: repo_folder_name, _create_symlink,
 * _cache_commit_hash_for_specific_revision, the WeakFileLock around a download.) Where the
 * cache is comes from hub_settings (hub.h). Owns these paths; knows nothing of HTTP or of
 * which files a model needs. Errors name the path (err: LT_ERRLEN bytes).
 */
#ifndef LATHE_HUB_CACHE_H
#define LATHE_HUB_CACHE_H

#include <stdatomic.h>
#include <stddef.h>

#include "cuda/base/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define HUB_PATH 4096

typedef struct hub_repo_cache {
    char cache[HUB_PATH]; /* the hub cache folder (HF_HUB_CACHE) */
    char folder[600];     /* "models--ORG--NAME" */
    char root[HUB_PATH];  /* cache/folder */
} hub_repo_cache;

/* repo: "ORG/NAME" (checked by the caller). */
void hub_cache_init(hub_repo_cache *c, const char *cache, const char *repo);
/* 1 when s is a full commit hash (40 lowercase hex digits), as huggingface_hub's
 * REGEX_COMMIT_HASH. */
int hub_is_commit(const char *s);
/* The snapshot name refs/<rev> holds (1): a commit as huggingface_hub writes it, or any plain
 * folder name (huggingface_hub reads the file as it is); 0 when there is no such ref or it
 * holds no usable name. cap: at least 41. */
int hub_cache_read_ref(const hub_repo_cache *c, const char *rev, char *commit, size_t cap);
/* The name a ref file's bytes hold (hub_cache_read_ref's parse, pure): its first word (up to a
 * space, tab, CR or LF), 1 when it is letters, digits, '-', '_' and '.' only, not leading '.',
 * shorter than cap; else 0 and commit "". */
int hub_ref_parse(const char *bytes, size_t len, char *commit, size_t cap);
/* Writes refs/<rev> = commit (no newline, as huggingface_hub writes it), atomically, when it
 * differs. rev may hold '/' (refs/pr/1 is a folder). */
lt_status hub_cache_write_ref(const hub_repo_cache *c, const char *rev, const char *commit,
                              char *err);
/* snapshots/<commit> and snapshots/<commit>/<file>. */
void hub_cache_snapshot(const hub_repo_cache *c, const char *commit, char *out, size_t cap);
void hub_cache_pointer(const hub_repo_cache *c, const char *commit, const char *file, char *out,
                       size_t cap);
/* 1 when snapshots/<commit>/<file> leads to a regular file (a symlink into blobs/, or a copy). */
int hub_cache_has(const hub_repo_cache *c, const char *commit, const char *file);
/* blobs/<etag> (suffix "" or ".incomplete"). */
void hub_cache_blob(const hub_repo_cache *c, const char *etag, const char *suffix, char *out,
                    size_t cap);
/* Makes snapshots/<commit>/<file> a relative symlink to blobs/<etag> (replacing one there). */
lt_status hub_cache_link(const hub_repo_cache *c, const char *commit, const char *file,
                         const char *etag, char *err);
/* Creates blobs/ and the lock folder; takes .locks/<folder>/<etag>.lock (flock, exclusive),
 * polling so the cancel flag can end the wait; waited: set to 1 when another process held it.
 * *fd: the lock, for hub_cache_unlock. */
lt_status hub_cache_lock(const hub_repo_cache *c, const char *etag, const atomic_int *cancel,
                         int *fd, int *waited, char *err);
void hub_cache_unlock(int fd);

#ifdef __cplusplus
}
#endif

#endif
