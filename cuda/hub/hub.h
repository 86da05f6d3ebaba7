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

#include "cuda/base/error.h"
#include "cuda/engine.h"
#include "cuda/hub/cache.h"

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
 * shape (repo: one '/', letters, digits, '-', '_', '.', no "--" or ".."; rev: the same and
 * '/', no ".." part), else 0. */
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

#ifdef __cplusplus
}
#endif

#endif
