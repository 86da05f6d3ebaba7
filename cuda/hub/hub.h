/* hub.h — models from the Hugging Face Hub: `%load ORG/NAME[@REVISION]` turned into a snapshot
 * folder of the shared Hugging Face cache, downloading what is missing the way huggingface_hub's
 * snapshot_download does, so lathe and huggingface_hub reuse each other's downloads.
 * Engine-private; the session's one door into this room.
 *
 * The settings are huggingface_hub's environment variables (constants.py): HF_ENDPOINT,
 * HF_HOME, HF_HUB_CACHE, HF_TOKEN (else the token file), HF_HUB_OFFLINE, HF_HUB_ETAG_TIMEOUT,
 * HF_HUB_DOWNLOAD_TIMEOUT. Notes (a cached snapshot used because the Hub could not be
 * reached, what was downloaded) go to cb->message; each file's download to cb->progress.
 * Knows HTTP (http.h), the cache layout (cache.h) and which files a Gemma checkpoint needs;
 * nothing of models, tokenizers or sessions. Errors name the repository, revision, file or
 * URL, and for a refusal what to do (err: LT_ERRLEN bytes).
 */
#ifndef LATHE_HUB_H
#define LATHE_HUB_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda/base/error.h"
#include "cuda/engine.h"
#include "cuda/hub/cache.h"
#include "cuda/hub/http.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct hub_settings {
    char endpoint[1024];       /* HF_ENDPOINT without a trailing '/' (https://huggingface.co) */
    char home[HUB_PATH];       /* HF_HOME (~/.cache/huggingface, or $XDG_CACHE_HOME/...) */
    char cache[HUB_PATH];      /* HF_HUB_CACHE (HF_HOME/hub) */
    char token[1024];          /* "" for none */
    char token_from[HUB_PATH]; /* "HF_TOKEN", or the token file's path; "" for none */
    char token_file[HUB_PATH]; /* where the token file is looked for (HF_TOKEN_PATH) */
    int offline;               /* HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is 1/ON/YES/TRUE */
    int etag_timeout;          /* seconds (HF_HUB_ETAG_TIMEOUT, 10) for the API and HEAD */
    int download_timeout;      /* seconds (HF_HUB_DOWNLOAD_TIMEOUT, 10) a download may stall */
} hub_settings;

/* Reads the environment as huggingface_hub's constants.py and utils/_auth.py do. */
void hub_settings_read(hub_settings *s);

/* Splits "ORG/NAME[@REVISION]" into repo and rev ("main" when none). 1 when spec has that
 * shape (repo: one '/', letters, digits, '-', '_', '.', no "--" or "..", each part beginning
 * and ending with a letter, digit or '_', as huggingface_hub's validate_repo_id; rev: letters,
 * digits, '-', '_', '.' and '/', no empty, "." or ".." part), else 0. */
int hub_parse_id(const char *spec, char *repo, size_t repo_cap, char *rev, size_t rev_cap);

/* The snapshot folder of spec in the cache, complete for lathe (config.json, tokenizer.model and
 * the safetensors weights: the index and every shard it names, or model.safetensors), with what
 * was missing downloaded first. cancel: polled during requests (NULL: never). */
lt_status hub_snapshot(const char *spec, const lt_callbacks *cb, const atomic_int *cancel,
                       char *dir, size_t cap, char *err);

/* lathe's choice of files from a repository's list: 1 when name is one the snapshot gets
 * (config.json, generation_config.json, the tokenizer files, the weights index and
 * model.safetensors; shards come from the index), else 0. */
int hub_wanted_file(const char *name);

/* The parsers of what the Hub sends, pure (bytes in, struct out) so that fuzz/fuzz_hub.c
 * calls the functions hub_snapshot calls. Each refusal writes its reason to err. */

/* The revision API's answer (GET {endpoint}/api/models/{repo}/revision/{rev}): its "sha" (40
 * lowercase hex digits) and, of its "siblings", the files lathe takes (hub_wanted_file, or a
 * shard name: letters, digits, '-', '_', '.', not leading '.', ending .safetensors); names in a
 * folder or with any other byte are left out, so every name kept is a plain file name of the
 * snapshot folder. At most 256 files. */
typedef struct hub_revision {
    char commit[41];
    char **files;
    int n_files;
} hub_revision;
lt_status hub_revision_parse(const char *body, size_t len, hub_revision *out, char *err);
void hub_revision_free(hub_revision *r);

/* The shards model.safetensors.index.json names (the values of its weight_map, each once), each
 * a shard name as above; *out: n_out malloc'd names (free with hub_names_free). */
lt_status hub_index_parse(const char *text, size_t len, char ***out, int *n_out, char *err);
void hub_names_free(char **names, int n);

/* A blob's file name from an ETag header (W/ and quotes dropped, as huggingface_hub's
 * _normalize_etag): 1 when it is a plain name (letters, digits, '-', '_', '.', not leading
 * '.', at most 200 bytes), else 0. */
int hub_etag_name(const char *raw, char *out, size_t cap);

/* A relative redirect of a HEAD (3xx, Location "/path", not "//host"): url (an absolute
 * http(s) URL) becomes its origin + Location. 1 when followed, 0 when r is not such a redirect,
 * -1 when the new URL would not fit in cap. */
int hub_redirect_relative(char *url, size_t cap, const hub_response *r);

/* What the HEAD of a file's resolve URL says of it, once relative redirects are followed and a
 * status of 400 or more is handled: its blob name (X-Linked-Etag, else ETag, as hub_etag_name),
 * size (X-Linked-Size, else the Content-Length of a 200), and where to GET it (the Location of
 * a redirect, an absolute http(s) URL, else url). commit: the revision's commit, which
 * X-Repo-Commit must match when sent. endpoint: named in the messages. */
typedef struct hub_file_meta {
    char etag[256];
    int64_t size;
    char location[HUB_URL]; /* a CDN's signed URLs run to a few thousand bytes */
} hub_file_meta;
lt_status hub_head_meta(const hub_response *r, const char *url, const char *commit,
                        const char *endpoint, hub_file_meta *m, char *err);

#ifdef __cplusplus
}
#endif

#endif
