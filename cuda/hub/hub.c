/* hub.c — snapshot_download for lathe (see hub.h): settings from the environment, the revision
 * API for the commit and the file list, a HEAD on each missing file's resolve URL for its ETag
 * and size, the download into blobs/<etag>.incomplete (resumed with a Range request), the
 * SHA-256 check of LFS files, then the rename into blobs/ and the snapshot symlink.
 *
 * The flow follows huggingface_hub's _snapshot_download.py and file_download.py:
 * - a revision that is a commit whose snapshot is complete makes no request at all; another
 *   revision makes one API call (GET {endpoint}/api/models/{repo}/revision/{rev}) and files
 *   already in the snapshot make none;
 * - HF_HUB_OFFLINE=1 makes no request; when the API call fails (no connection, a 5xx, a 401,
 *   403 or 404 that is not "revision not found"), a complete cached snapshot of refs/<rev> is
 *   used, and a note says why;
 * - the HEAD follows relative redirects only (a renamed repository) and reads X-Repo-Commit,
 *   X-Linked-Etag or ETag, X-Linked-Size or Content-Length; the GET goes to the Location the
 *   HEAD gave (a CDN) and sends the token only to the endpoint's own host;
 * - a download that breaks is resumed from where it stopped, up to 5 times without progress
 *   (http_get's retries); what it wrote stays in .incomplete for the next load.
 * Owns the files it writes under the cache; a partial file never has its final name.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include "cuda/hub/hub.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "cuda/base/strbuf.h"
#include "cuda/hub/http.h"
#include "cuda/hub/sha256.h"

#define MAX_FILES 256                /* files lathe takes from one repository */
#define API_MAX ((size_t)64 << 20)   /* the revision JSON */
#define INDEX_MAX ((size_t)64 << 20) /* model.safetensors.index.json */
#define RETRIES 5                    /* breaks in a row without progress before giving up */

/* ---- settings ------------------------------------------------------------------------------ */

static int env_true(const char *v) {
    return v && (!strcasecmp(v, "1") || !strcasecmp(v, "ON") || !strcasecmp(v, "YES") ||
                 !strcasecmp(v, "TRUE"));
}

/* os.path.expanduser for a leading "~" or "~/". */
static void expand_home(char *out, size_t cap, const char *p) {
    const char *home = getenv("HOME");
    if (p[0] == '~' && (p[1] == 0 || p[1] == '/') && home)
        snprintf(out, cap, "%s%s", home, p + 1);
    else
        snprintf(out, cap, "%s", p);
}

static int env_int(const char *name, int def) {
    const char *v = getenv(name);
    int x = v && *v ? atoi(v) : 0;
    return x > 0 ? x : def;
}

/* _clean_token: drop \r and \n, strip spaces; "" stays none. */
static void clean_token(char *t) {
    size_t k = 0;
    for (size_t i = 0; t[i]; i++)
        if (t[i] != '\r' && t[i] != '\n') t[k++] = t[i];
    t[k] = 0;
    while (k && (t[k - 1] == ' ' || t[k - 1] == '\t'))
        t[--k] = 0;
    size_t lead = strspn(t, " \t");
    memmove(t, t + lead, strlen(t + lead) + 1);
}

void hub_settings_read(hub_settings *s) {
    memset(s, 0, sizeof *s);
    const char *ep = getenv("HF_ENDPOINT");
    snprintf(s->endpoint, sizeof s->endpoint, "%s", ep && *ep ? ep : "https://huggingface.co");
    for (size_t n = strlen(s->endpoint); n && s->endpoint[n - 1] == '/'; n--)
        s->endpoint[n - 1] = 0;
    const char *hh = getenv("HF_HOME"), *xdg = getenv("XDG_CACHE_HOME");
    char tmp[HUB_PATH];
    if (hh && *hh)
        snprintf(tmp, sizeof tmp, "%s", hh);
    else if (xdg && *xdg)
        snprintf(tmp, sizeof tmp, "%.4000s/huggingface", xdg);
    else
        snprintf(tmp, sizeof tmp, "~/.cache/huggingface");
    expand_home(s->home, sizeof s->home, tmp);
    const char *hc = getenv("HF_HUB_CACHE");
    if (!hc || !*hc) hc = getenv("HUGGINGFACE_HUB_CACHE");
    if (hc && *hc)
        expand_home(s->cache, sizeof s->cache, hc);
    else
        snprintf(s->cache, sizeof s->cache, "%.4000s/hub", s->home);
    const char *tp = getenv("HF_TOKEN_PATH");
    if (tp && *tp)
        expand_home(s->token_file, sizeof s->token_file, tp);
    else
        snprintf(s->token_file, sizeof s->token_file, "%.4000s/token", s->home);
    const char *tok = getenv("HF_TOKEN");
    const char *from = "HF_TOKEN";
    if (!tok || !*tok) tok = getenv("HUGGING_FACE_HUB_TOKEN"), from = "HUGGING_FACE_HUB_TOKEN";
    if (tok && *tok) {
        snprintf(s->token, sizeof s->token, "%s", tok);
        clean_token(s->token);
        if (s->token[0]) snprintf(s->token_from, sizeof s->token_from, "%s", from);
    }
    if (!s->token[0]) {
        FILE *f = fopen(s->token_file, "r");
        if (f) {
            size_t n = fread(s->token, 1, sizeof s->token - 1, f);
            s->token[n] = 0;
            fclose(f);
            clean_token(s->token);
            if (s->token[0]) snprintf(s->token_from, sizeof s->token_from, "%s", s->token_file);
        }
    }
    s->offline = env_true(getenv("HF_HUB_OFFLINE")) || env_true(getenv("TRANSFORMERS_OFFLINE"));
    s->etag_timeout = env_int("HF_HUB_ETAG_TIMEOUT", 10);
    s->download_timeout = env_int("HF_HUB_DOWNLOAD_TIMEOUT", 10);
}

/* ---- names --------------------------------------------------------------------------------- */

static int name_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.';
}

/* A letter, digit or '_': what ORG and NAME begin and end with (huggingface_hub's
 * utils/_validators.py REPO_ID_REGEX puts a \b at each end of both). Without it "a-/b" and
 * "a/-b" would share the cache folder models--a---b. */
static int edge_char(char c) {
    return name_char(c) && c != '-' && c != '.';
}

int hub_parse_id(const char *spec, char *repo, size_t repo_cap, char *rev, size_t rev_cap) {
    const char *at = strchr(spec, '@');
    size_t n = at ? (size_t)(at - spec) : strlen(spec);
    const char *slash = memchr(spec, '/', n);
    if (!slash || slash == spec || (size_t)(slash - spec) + 1 >= n) return 0;
    if (memchr(slash + 1, '/', n - (size_t)(slash - spec) - 1)) return 0;
    if (!edge_char(spec[0]) || !edge_char(slash[-1]) || !edge_char(slash[1]) ||
        !edge_char(spec[n - 1]))
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (spec[i] == '/') continue;
        if (!name_char(spec[i])) return 0;
        if (i + 1 < n &&
            ((spec[i] == '-' && spec[i + 1] == '-') || (spec[i] == '.' && spec[i + 1] == '.')))
            return 0;
    }
    if (n >= repo_cap) return 0;
    const char *r = at ? at + 1 : "main";
    size_t m = strlen(r);
    if (m == 0 || m >= rev_cap || r[0] == '/' || r[m - 1] == '/') return 0;
    for (size_t i = 0; i < m; i++) {
        if (r[i] == '/') {
            if (r[i + 1] == '/') return 0;
            continue;
        }
        if (!name_char(r[i])) return 0;
        /* a part that is "." or ".." (never a folder outside refs/) */
        if (r[i] == '.' && (i == 0 || r[i - 1] == '/') &&
            (r[i + 1] == 0 || r[i + 1] == '/' ||
             (r[i + 1] == '.' && (r[i + 2] == 0 || r[i + 2] == '/'))))
            return 0;
    }
    memcpy(repo, spec, n);
    repo[n] = 0;
    memcpy(rev, r, m + 1);
    return 1;
}

/* What lathe takes from a repository besides the weight shards. transformers reads the same
 * files, so a snapshot lathe filled serves it too. */
static const char *const WANTED[] = {
    "config.json",           "generation_config.json",
    "tokenizer.model",       "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",     "chat_template.json",
    "chat_template.jinja",   "preprocessor_config.json",
    "processor_config.json", "model.safetensors.index.json",
    "model.safetensors",
};

int hub_wanted_file(const char *name) {
    for (size_t i = 0; i < sizeof WANTED / sizeof *WANTED; i++)
        if (!strcmp(name, WANTED[i])) return 1;
    return 0;
}

/* A shard the index names: a plain file name ending in .safetensors. */
static int shard_name_ok(const char *s) {
    size_t n = strlen(s);
    if (n <= 12 || n > 200 || s[0] == '.' || strcmp(s + n - 12, ".safetensors") != 0) return 0;
    for (size_t i = 0; i < n; i++)
        if (!name_char(s[i])) return 0;
    return 1;
}

/* A blob's name: the normalized ETag (W/ and quotes gone, as _normalize_etag), a plain name. */
int hub_etag_name(const char *raw, char *out, size_t cap) {
    const char *p = raw;
    while (*p == 'W' || *p == '/') /* lstrip("W/") */
        p++;
    while (*p == '"')
        p++;
    size_t n = strlen(p);
    while (n && p[n - 1] == '"')
        n--;
    if (n == 0 || n >= cap || n > 200 || p[0] == '.') return 0;
    for (size_t i = 0; i < n; i++)
        if (!name_char(p[i])) return 0;
    memcpy(out, p, n);
    out[n] = 0;
    return 1;
}

/* urllib.parse.quote: unreserved bytes stay, '/' stays when keep_slash, the rest is %XX. */
static void url_quote(lt_strbuf *b, const char *s, int keep_slash) {
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (name_char((char)*p) || *p == '~' || (keep_slash && *p == '/'))
            lt_strbuf_put(b, p, 1);
        else
            lt_strbuf_printf(b, "%%%02X", *p);
    }
}

/* "scheme://host[:port]" of url, for "is this the endpoint's host" and relative redirects. */
static size_t url_origin_len(const char *url) {
    size_t k = !strncasecmp(url, "http://", 7) ? 7 : !strncasecmp(url, "https://", 8) ? 8 : 0;
    size_t host = k ? strcspn(url + k, "/?#") : 0;
    return host ? k + host : 0; /* 0: not an absolute http(s) URL */
}

static int same_origin(const char *a, const char *b) {
    size_t na = url_origin_len(a), nb = url_origin_len(b);
    return na && na == nb && !strncasecmp(a, b, na);
}

/* ---- one job ------------------------------------------------------------------------------- */

typedef struct hub_job {
    hub_settings set;
    hub_repo_cache rc;
    char spec[600], repo[300], rev[300];
    char commit[129]; /* from the Hub: 40 hex; from a ref of the cache: a folder name */
    const lt_callbacks *cb;
    const atomic_int *cancel;
    hub_http *http;
    char *err;
    int announced; /* the "downloading ..." note was given */
    int n_fetched; /* files downloaded by this job */
    int64_t bytes_fetched;
} hub_job;

static void say(hub_job *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(hub_job *j, const char *fmt, ...) {
    if (!j->cb || !j->cb->message) return;
    char line[LT_ERRLEN + 512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    j->cb->message(j->cb->ctx, line);
}

static int cancelled(const hub_job *j) {
    return j->cancel && atomic_load(j->cancel);
}

static void human_size(char *out, size_t cap, int64_t n) {
    if (n >= (int64_t)1 << 30)
        snprintf(out, cap, "%.2f GiB", (double)n / (double)((int64_t)1 << 30));
    else if (n >= (int64_t)1 << 20)
        snprintf(out, cap, "%.1f MiB", (double)n / (double)(1 << 20));
    else if (n >= 1024)
        snprintf(out, cap, "%.1f KiB", (double)n / 1024.0);
    else
        snprintf(out, cap, "%lld bytes", (long long)n);
}

/* A readable file of the snapshot (a symlink into blobs/ or a copy). */
static int snap_has(const char *snap, const char *file) {
    char p[HUB_PATH + 600];
    snprintf(p, sizeof p, "%s/%s", snap, file);
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

void hub_names_free(char **names, int n) {
    for (int i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

lt_status hub_index_parse(const char *text, size_t len, char ***out, int *n_out, char *err) {
    *out = NULL;
    *n_out = 0;
    json_error_t je;
    json_t *root = json_loadb(text ? text : "", len, 0, &je);
    json_t *map = root ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(map)) {
        json_decref(root);
        return lt_fail(err, LT_ERR_FORMAT, "not a safetensors index (no weight_map object)");
    }
    char **names = NULL;
    int n = 0;
    lt_status rc = LT_OK;
    const char *key;
    json_t *v;
    json_object_foreach(map, key, v) {
        const char *s = json_string_value(v);
        if (!s || !shard_name_ok(s)) {
            rc = lt_fail(err, LT_ERR_FORMAT,
                         "weight_map[\"%.200s\"] is not a .safetensors file name of this folder",
                         key);
            break;
        }
        int seen = 0;
        for (int i = 0; i < n && !seen; i++)
            seen = !strcmp(names[i], s);
        if (seen) continue;
        if (n == MAX_FILES) {
            rc = lt_fail(err, LT_ERR_FORMAT, "more than %d shards", MAX_FILES);
            break;
        }
        char **more = realloc(names, sizeof *names * (size_t)(n + 1));
        char *copy = strdup(s);
        if (!more || !copy) {
            free(copy);
            if (more) names = more;
            rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
            break;
        }
        names = more;
        names[n++] = copy;
    }
    json_decref(root);
    if (rc != LT_OK) {
        hub_names_free(names, n);
        return rc;
    }
    *out = names;
    *n_out = n;
    return LT_OK;
}

/* The shards of the index file at path (hub_index_parse). */
static lt_status index_shards(const char *path, char ***out, int *n_out, char *err) {
    *out = NULL;
    *n_out = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return lt_fail(err, LT_ERR_IO, "%s: %s", path, strerror(errno));
    lt_strbuf b = {0};
    int r = lt_strbuf_read(&b, f, INDEX_MAX);
    fclose(f);
    if (r != 0 || b.oom) {
        lt_strbuf_free(&b);
        return lt_fail(err, r > 0 ? LT_ERR_FORMAT : LT_ERR_IO, "%s: %s", path,
                       r > 0 ? "larger than 64 MiB" : "cannot be read");
    }
    lt_status rc = hub_index_parse(b.p, b.len, out, n_out, err);
    lt_strbuf_free(&b);
    return rc == LT_OK ? rc : lt_fail_prefix(err, rc, "%s", path);
}

/* lathe's test of a cached snapshot: config.json, tokenizer.model, and the weights (the index
 * and each shard, or model.safetensors). 1 when complete; else missing lists what is not. */
static int snapshot_complete(const char *snap, char *missing, size_t cap) {
    missing[0] = 0;
    struct stat sb;
    if (stat(snap, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        snprintf(missing, cap, "the whole snapshot");
        return 0;
    }
    lt_strbuf b = {0};
    if (!snap_has(snap, "config.json")) lt_strbuf_puts(&b, ", config.json");
    if (!snap_has(snap, "tokenizer.model")) lt_strbuf_puts(&b, ", tokenizer.model");
    if (snap_has(snap, "model.safetensors.index.json")) {
        char idx[HUB_PATH + 100], e[LT_ERRLEN];
        snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", snap);
        char **shards;
        int n;
        if (index_shards(idx, &shards, &n, e) != LT_OK) {
            lt_strbuf_puts(&b, ", a readable model.safetensors.index.json");
        } else {
            for (int i = 0; i < n; i++)
                if (!snap_has(snap, shards[i])) lt_strbuf_printf(&b, ", %s", shards[i]);
            hub_names_free(shards, n);
        }
    } else if (!snap_has(snap, "model.safetensors")) {
        lt_strbuf_puts(&b, ", model.safetensors (or model.safetensors.index.json)");
    }
    int ok = b.len == 0 && !b.oom;
    if (!ok) snprintf(missing, cap, "%s", b.oom ? "(out of memory)" : b.p + 2);
    lt_strbuf_free(&b);
    return ok;
}

/* The cached snapshot that revision rev names (a commit, or refs/<rev>), when complete. */
static int cached_snapshot(hub_job *j, char *dir, size_t cap, char *missing, size_t mcap) {
    char commit[sizeof j->commit];
    if (hub_is_commit(j->rev))
        memcpy(commit, j->rev, 41);
    else if (!hub_cache_read_ref(&j->rc, j->rev, commit, sizeof commit)) {
        snprintf(missing, mcap, "no refs/%s", j->rev);
        return 0;
    }
    hub_cache_snapshot(&j->rc, commit, dir, cap);
    if (!snapshot_complete(dir, missing, mcap)) return 0;
    memcpy(j->commit, commit, sizeof commit);
    return 1;
}

/* ---- refusals ------------------------------------------------------------------------------ */

/* The message for a response of status >= 400 to a request about `what`. */
static lt_status refusal(hub_job *j, const hub_response *r, const char *what) {
    const char *msg = r->error_message[0] ? r->error_message : "";
    const char *code = r->error_code;
    char why[400]; /* "401 (the Hub's X-Error-Message)" */
    snprintf(why, sizeof why, "%ld%s%s%s", r->status, msg[0] ? " (" : "", msg, msg[0] ? ")" : "");
    const char *ep = j->set.endpoint;
    if (r->status == 401 || r->status == 403) {
        if (!j->set.token[0])
            return lt_fail(j->err, LT_ERR_IO,
                           "%s %s: the Hub at %s answered %s to %s, sent without a token. If it "
                           "is gated, accept its licence at %s/%s; then set HF_TOKEN to an access "
                           "token from %s/settings/tokens (or save the token in %s, as `hf auth "
                           "login` does)",
                           j->repo,
                           !strcmp(code, "RepoNotFound")
                               ? "was not found (nor is it a folder here), or is private or gated"
                               : "is gated or private",
                           ep, why, what, ep, j->repo, ep, j->set.token_file);
        if (!strcmp(code, "GatedRepo") || r->status == 403)
            return lt_fail(
                j->err, LT_ERR_IO,
                "%s is gated and the token from %s has no access to it (the Hub answered "
                "%s to %s): accept its licence at %s/%s with that token's account",
                j->repo, j->set.token_from, why, what, ep, j->repo);
        return lt_fail(j->err, LT_ERR_IO,
                       "the Hub at %s refused the token from %s (it answered %s to %s): check "
                       "it at %s/settings/tokens and that it may read %s/%s",
                       ep, j->set.token_from, why, what, ep, ep, j->repo);
    }
    if (r->status == 404) {
        if (!strcmp(code, "RevisionNotFound"))
            return lt_fail(j->err, LT_ERR_ARG,
                           "%s has no revision '%s' on %s (the Hub answered %s)", j->repo, j->rev,
                           ep, why);
        if (!strcmp(code, "EntryNotFound"))
            return lt_fail(j->err, LT_ERR_IO, "%s (commit %s) has no file %s (the Hub answered %s)",
                           j->repo, j->commit, what, why);
        return lt_fail(j->err, LT_ERR_ARG,
                       "%s: no such model on %s (the Hub answered %s; the revision asked for was "
                       "'%s'), and no folder of that name here",
                       j->repo, ep, why, j->rev);
    }
    return lt_fail(j->err, LT_ERR_IO, "the Hub at %s answered %s to %s", ep, why, what);
}

/* ---- the revision call ------------------------------------------------------------------- */

void hub_revision_free(hub_revision *r) {
    hub_names_free(r->files, r->n_files);
    r->files = NULL;
    r->n_files = 0;
}

lt_status hub_revision_parse(const char *body, size_t len, hub_revision *out, char *err) {
    memset(out, 0, sizeof *out);
    json_error_t je;
    json_t *root = json_loadb(body ? body : "", len, 0, &je);
    const char *sha = root ? json_string_value(json_object_get(root, "sha")) : NULL;
    json_t *sib = root ? json_object_get(root, "siblings") : NULL;
    if (!sha || !hub_is_commit(sha) || !json_is_array(sib)) {
        lt_status rc = lt_fail(err, LT_ERR_FORMAT,
                               "not the Hub's revision answer (expected JSON with a 40-hex \"sha\" "
                               "and a \"siblings\" list%s%s)",
                               root ? "" : "; ", root ? "" : je.text);
        json_decref(root);
        return rc;
    }
    memcpy(out->commit, sha, 41);
    lt_status rc = LT_OK;
    size_t i;
    json_t *e;
    json_array_foreach(sib, i, e) {
        const char *name = json_string_value(json_object_get(e, "rfilename"));
        /* only top-level files are ever taken: "original/x" or "../x" never */
        if (!name || strchr(name, '/') || !(hub_wanted_file(name) || shard_name_ok(name))) continue;
        if (out->n_files == MAX_FILES) { /* never cut the list silently: a shard would be missing */
            rc = lt_fail(err, LT_ERR_FORMAT,
                         "the repository lists more than %d files lathe would download "
                         "(config, tokenizer and safetensors shards); lathe takes at most %d",
                         MAX_FILES, MAX_FILES);
            break;
        }
        char **more = realloc(out->files, sizeof *more * (size_t)(out->n_files + 1));
        char *copy = strdup(name);
        if (!more || !copy) {
            free(copy);
            if (more) out->files = more;
            rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
            break;
        }
        out->files = more;
        out->files[out->n_files++] = copy;
    }
    json_decref(root);
    if (rc != LT_OK) hub_revision_free(out);
    return rc;
}

/* GET /api/models/{repo}/revision/{rev}: the commit and the files. *reached: 0 when no
 * answer came (or a 5xx/429), so the caller may fall back to the cache; *fallback: 1 when the
 * answer is one huggingface_hub falls back to the cache for (401, 403, a 404 that is not
 * RevisionNotFound). */
static lt_status revision_get(hub_job *j, hub_revision *info, int *reached, int *fallback) {
    memset(info, 0, sizeof *info);
    *reached = 1;
    *fallback = 0;
    lt_strbuf url = {0}, body = {0};
    lt_strbuf_printf(&url, "%s/api/models/%s/revision/", j->set.endpoint, j->repo);
    url_quote(&url, j->rev, 0);
    if (url.oom) return lt_fail(j->err, LT_ERR_MEMORY, "out of memory");
    hub_response r;
    lt_status rc = hub_http_get_text(j->http, url.p, 1, API_MAX, &body, &r, j->err);
    if (rc == LT_ERR_IO && r.net != HUB_NET_OK) *reached = 0;
    if (rc != LT_OK) goto done;
    if (r.status >= 500 || r.status == 429) {
        *reached = 0;
        rc = lt_fail(j->err, LT_ERR_IO, "HTTP %ld%s%s", r.status, r.error_message[0] ? ": " : "",
                     r.error_message);
        goto done;
    }
    if (r.status >= 400) {
        *fallback = !(r.status == 404 && !strcmp(r.error_code, "RevisionNotFound"));
        char what[800];
        snprintf(what, sizeof what, "%s", url.p);
        rc = refusal(j, &r, what);
        goto done;
    }
    if (r.status != 200) {
        rc = lt_fail(j->err, LT_ERR_IO, "%s: HTTP %ld (expected 200)", url.p, r.status);
        goto done;
    }
    rc = hub_revision_parse(body.p, body.len, info, j->err);
    if (rc != LT_OK) {
        lt_fail_prefix(j->err, rc, "%s", url.p);
        goto done;
    }
    memcpy(j->commit, info->commit, 41);
done:
    lt_strbuf_free(&url);
    lt_strbuf_free(&body);
    return rc;
}

static int info_has(const hub_revision *info, const char *name) {
    for (int i = 0; i < info->n_files; i++)
        if (!strcmp(info->files[i], name)) return 1;
    return 0;
}

/* ---- one file ------------------------------------------------------------------------------ */

typedef struct progress_view {
    hub_job *j;
    char label[300];
    int64_t unit, last;
} progress_view;

static void on_bytes(void *ctx, int64_t done, int64_t total) {
    progress_view *p = ctx;
    if (!p->j->cb || !p->j->cb->progress) return;
    int64_t d = done / p->unit, t = total > 0 ? (total + p->unit - 1) / p->unit : 0;
    if (done >= total && total > 0) d = t;
    if (d == p->last) return;
    p->last = d;
    p->j->cb->progress(p->j->cb->ctx, p->label, d, t);
}

static void progress_init(progress_view *p, hub_job *j, const char *file, int64_t size) {
    p->j = j;
    p->unit = size >= ((int64_t)16 << 20) ? (1 << 20) : 1024;
    snprintf(p->label, sizeof p->label, "%.200s (%s)", file, p->unit == 1024 ? "KiB" : "MiB");
    p->last = -1;
}

int hub_redirect_relative(char *url, size_t cap, const hub_response *r) {
    if (!(r->status >= 300 && r->status < 400 && r->location[0] == '/' && r->location[1] != '/'))
        return 0;
    size_t o = url_origin_len(url), n = strlen(r->location);
    if (o == 0 || o + n >= cap) return -1;
    memcpy(url + o, r->location, n + 1);
    return 1;
}

lt_status hub_head_meta(const hub_response *r, const char *url, const char *commit,
                        const char *endpoint, hub_file_meta *m, char *err) {
    memset(m, 0, sizeof *m);
    m->size = -1;
    int redirect = r->status >= 300 && r->status < 400;
    if (r->status < 200 || (r->status >= 300 && !redirect))
        return lt_fail(err, LT_ERR_IO, "%s: HTTP %ld to a HEAD", url, r->status);
    const char *raw = r->linked_etag[0] ? r->linked_etag : r->etag;
    int64_t size = r->linked_size >= 0 ? r->linked_size : redirect ? -1 : r->content_length;
    if (!raw[0] || size < 0)
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s: the answer has no %s (is HF_ENDPOINT=%s a Hugging Face Hub?)", url,
                       raw[0] ? "size (X-Linked-Size or Content-Length)" : "ETag", endpoint);
    if (!hub_etag_name(raw, m->etag, sizeof m->etag))
        return lt_fail(err, LT_ERR_FORMAT, "%s: the ETag '%.200s' is not a usable blob name", url,
                       raw);
    if (r->commit[0] && strcmp(r->commit, commit) != 0)
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s: the Hub says it is of commit %.64s, not %s as the revision said", url,
                       r->commit, commit);
    if (redirect) {
        if (url_origin_len(r->location) == 0)
            return lt_fail(err, LT_ERR_FORMAT, "%s: a redirect to '%.300s', not a URL", url,
                           r->location);
        snprintf(m->location, sizeof m->location, "%s", r->location);
    } else {
        snprintf(m->location, sizeof m->location, "%s", url);
    }
    m->size = size;
    return LT_OK;
}

/* The metadata of a file: HEAD on its resolve URL, following relative redirects only. */
static lt_status file_head(hub_job *j, const char *file, hub_file_meta *m) {
    lt_strbuf b = {0};
    lt_strbuf_printf(&b, "%s/%s/resolve/%s/", j->set.endpoint, j->repo, j->commit);
    url_quote(&b, file, 1);
    if (b.oom) return lt_fail(j->err, LT_ERR_MEMORY, "out of memory");
    char url[HUB_URL];
    snprintf(url, sizeof url, "%s", b.p);
    lt_strbuf_free(&b);
    hub_response r;
    lt_status rc;
    for (int hop = 0;; hop++) {
        rc = hub_http_head(j->http, url, same_origin(url, j->set.endpoint), &r, j->err);
        if (rc != LT_OK) return lt_fail_prefix(j->err, rc, "%s: HEAD %s", file, url);
        if (r.location_cut)
            return lt_fail(j->err, LT_ERR_IO, "%s: a redirect to a URL longer than %d bytes", url,
                           HUB_URL - 1);
        int followed = hub_redirect_relative(url, sizeof url, &r);
        if (followed == 0) break;
        if (followed < 0)
            return lt_fail(j->err, LT_ERR_IO, "%s: a redirect to a URL too long", url);
        if (hop == 10) return lt_fail(j->err, LT_ERR_IO, "%s: more than 10 redirects", url);
    }
    if (r.status >= 400) return refusal(j, &r, url);
    return hub_head_meta(&r, url, j->commit, j->set.endpoint, m, j->err);
}

static int is_sha256(const char *s) {
    size_t n = 0;
    for (; s[n]; n++)
        if (!((s[n] >= '0' && s[n] <= '9') || (s[n] >= 'a' && s[n] <= 'f'))) return 0;
    return n == 64;
}

/* As http_get: a second before retrying a break that brought no bytes. */
static void pause_once(void) {
    struct timespec ts = {1, 0};
    nanosleep(&ts, NULL);
}

/* Downloads blob `m` into part (open fd) until it holds m->size bytes. */
static lt_status download_part(hub_job *j, const char *file, const hub_file_meta *m, int fd,
                               const char *part) {
    struct stat sb;
    if (fstat(fd, &sb) != 0) return lt_fail(j->err, LT_ERR_IO, "%s: %s", part, strerror(errno));
    int64_t have = (int64_t)sb.st_size;
    if (have > m->size) {
        if (ftruncate(fd, 0) != 0)
            return lt_fail(j->err, LT_ERR_IO, "%s: %s", part, strerror(errno));
        have = 0;
    }
    if (have > 0)
        say(j, "%s: resuming the partial download at byte %lld of %lld", file, (long long)have,
            (long long)m->size);
    struct statvfs fs; /* as _check_disk_space: a note, not a refusal */
    if (fstatvfs(fd, &fs) == 0 && (int64_t)fs.f_bavail * (int64_t)fs.f_frsize < m->size - have) {
        char need[32], room[32];
        human_size(need, sizeof need, m->size - have);
        human_size(room, sizeof room, (int64_t)fs.f_bavail * (int64_t)fs.f_frsize);
        say(j, "%s: needs %s more, and the disk of %s has %s free", file, need, part, room);
    }
    progress_view pv;
    progress_init(&pv, j, file, m->size);
    on_bytes(&pv, have, m->size);
    int tries = RETRIES, restarted = 0;
    int auth = same_origin(m->location, j->set.endpoint);
    while (have < m->size) {
        hub_response r;
        int64_t got = have;
        lt_status rc = hub_http_download(j->http, m->location, auth, fd, have, m->size, &got,
                                         on_bytes, &pv, &r, j->err);
        if (rc == LT_CANCELLED) return rc;
        if (rc == LT_OK && r.status == 416 && have > 0 && !restarted) {
            /* the server will not continue this part: start it again, once */
            if (ftruncate(fd, 0) != 0)
                return lt_fail(j->err, LT_ERR_IO, "%s: %s", part, strerror(errno));
            have = 0;
            restarted = 1;
            continue;
        }
        if (rc == LT_OK && r.status >= 400 && !auth) /* a CDN: its signed URL, not the token */
            return lt_fail(j->err, LT_ERR_IO,
                           "%s: the download server %.*s answered HTTP %ld (its signed link may "
                           "have expired: load again)",
                           file, (int)url_origin_len(m->location), m->location, r.status);
        if (rc == LT_OK && r.status >= 400) return refusal(j, &r, m->location);
        if (rc == LT_OK && r.status != 200 && r.status != 206)
            return lt_fail(j->err, LT_ERR_IO, "%s: HTTP %ld to a GET", m->location, r.status);
        if (rc != LT_OK && r.net == HUB_NET_OK) /* not the network: a write or a wrong range */
            return lt_fail_prefix(j->err, rc, "%s", file);
        if (got > m->size)
            return lt_fail(j->err, LT_ERR_FORMAT,
                           "%s: the server sent %lld bytes, more than the %lld the Hub announced",
                           file, (long long)got, (long long)m->size);
        if (rc == LT_OK && got == m->size) {
            have = got;
            break;
        }
        /* the transfer broke (or ended short): resume where it stopped */
        char why[LT_ERRLEN];
        snprintf(why, sizeof why, "%s", rc == LT_OK ? "the connection closed early" : j->err);
        if (got > have)
            tries = RETRIES;
        else if (--tries <= 0)
            return lt_fail(j->err, LT_ERR_IO,
                           "%s: the download from %s broke (%s); %lld of %lld bytes are kept in "
                           "%s and the next %%load resumes there",
                           file, m->location, why, (long long)got, (long long)m->size, part);
        if (got <= have) pause_once();
        have = got;
        say(j, "%s: %s; resuming at byte %lld", file, why, (long long)have);
        if (cancelled(j)) return lt_fail(j->err, LT_CANCELLED, "interrupted");
    }
    on_bytes(&pv, m->size, m->size);
    return LT_OK;
}

/* Fetches one file of the snapshot: its blob (unless a blob of that ETag is there), then the
 * pointer. *bytes: what was downloaded. */
static lt_status fetch_file(hub_job *j, const char *file, int64_t *bytes) {
    *bytes = 0;
    if (cancelled(j)) return lt_fail(j->err, LT_CANCELLED, "interrupted");
    hub_file_meta m;
    lt_status rc = file_head(j, file, &m);
    if (rc != LT_OK) return rc;
    char blob[HUB_PATH + 300], part[HUB_PATH + 320];
    hub_cache_blob(&j->rc, m.etag, "", blob, sizeof blob);
    hub_cache_blob(&j->rc, m.etag, ".incomplete", part, sizeof part);
    struct stat sb;
    if (stat(blob, &sb) == 0 && S_ISREG(sb.st_mode) && (int64_t)sb.st_size == m.size)
        return hub_cache_link(&j->rc, j->commit, file, m.etag, j->err);
    if (!j->announced) {
        say(j, "%s: downloading from %s (revision %s, commit %s) into %s", j->repo, j->set.endpoint,
            j->rev, j->commit, j->rc.root);
        j->announced = 1;
    }
    int lock, waited;
    rc = hub_cache_lock(&j->rc, m.etag, j->cancel, &lock, &waited, j->err);
    if (rc != LT_OK) return rc;
    if (waited) say(j, "%s: another download of this file finished first", file);
    if (stat(blob, &sb) == 0 && S_ISREG(sb.st_mode) && (int64_t)sb.st_size == m.size) {
        rc = hub_cache_link(&j->rc, j->commit, file, m.etag, j->err);
        hub_cache_unlock(lock);
        return rc;
    }
    int fd = open(part, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = lt_fail(j->err, LT_ERR_IO, "%s: %s", part, strerror(errno));
        hub_cache_unlock(lock);
        return rc;
    }
    struct stat before;
    int64_t had = fstat(fd, &before) == 0 ? (int64_t)before.st_size : 0;
    rc = download_part(j, file, &m, fd, part);
    if (rc == LT_OK && fsync(fd) != 0)
        rc = lt_fail(j->err, LT_ERR_IO, "%s: %s", part, strerror(errno));
    close(fd);
    if (rc == LT_ERR_FORMAT) unlink(part); /* more bytes than announced: nothing to resume */
    if (rc == LT_OK && is_sha256(m.etag)) {
        char hex[65];
        if (hub_sha256_file(part, hex) != 0) {
            rc = lt_fail(j->err, LT_ERR_IO, "%s: %s", part, strerror(errno));
        } else if (strcmp(hex, m.etag) != 0) {
            unlink(part); /* a wrong file is never kept, under any name */
            rc = lt_fail(j->err, LT_ERR_FORMAT,
                         "%s: the downloaded bytes have SHA-256 %s, but the Hub's ETag says %s: "
                         "the file is discarded (load again to download it again)",
                         file, hex, m.etag);
        }
    }
    /* the part was created 0644 less the umask, as the blob's mode should be */
    if (rc == LT_OK && rename(part, blob) != 0)
        rc = lt_fail(j->err, LT_ERR_IO, "%s -> %s: %s", part, blob, strerror(errno));
    if (rc == LT_OK) rc = hub_cache_link(&j->rc, j->commit, file, m.etag, j->err);
    hub_cache_unlock(lock);
    if (rc == LT_OK) *bytes = m.size - (had < m.size ? had : 0);
    return rc;
}

/* ---- the snapshot -------------------------------------------------------------------------- */

/* Fetches what of files is not in the snapshot yet. */
static lt_status fetch_missing(hub_job *j, char **files, int n) {
    for (int i = 0; i < n; i++) {
        if (hub_cache_has(&j->rc, j->commit, files[i])) continue;
        int64_t got;
        lt_status rc = fetch_file(j, files[i], &got);
        if (rc != LT_OK) return rc;
        j->n_fetched++;
        j->bytes_fetched += got;
    }
    return LT_OK;
}

static lt_status from_cache_after(hub_job *j, const char *reason, char *dir, size_t cap,
                                  char *missing, size_t mcap) {
    if (cached_snapshot(j, dir, cap, missing, mcap)) {
        say(j, "%s: %s; using the cached snapshot %s (revision %s) from %s", j->repo, reason,
            j->commit, j->rev, j->rc.root);
        return LT_OK;
    }
    return LT_ERR_IO;
}

lt_status hub_snapshot(const char *spec, const lt_callbacks *cb, const atomic_int *cancel,
                       char *dir, size_t cap, char *err) {
    hub_job *j = calloc(1, sizeof *j);
    if (!j) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    j->cb = cb;
    j->cancel = cancel;
    j->err = err;
    snprintf(j->spec, sizeof j->spec, "%s", spec);
    lt_status rc = LT_OK;
    hub_revision info = {0};
    char **shards = NULL;
    int n_shards = 0;
    char missing[LT_ERRLEN];
    if (!hub_parse_id(spec, j->repo, sizeof j->repo, j->rev, sizeof j->rev)) {
        rc = lt_fail(err, LT_ERR_ARG,
                     "'%s' is not a Hugging Face id (ORG/NAME or ORG/NAME@REVISION)", spec);
        goto done;
    }
    hub_settings_read(&j->set);
    hub_cache_init(&j->rc, j->set.cache, j->repo);
    if (!url_origin_len(j->set.endpoint)) {
        rc = lt_fail(err, LT_ERR_ARG, "HF_ENDPOINT='%.300s' is not an http:// or https:// URL",
                     j->set.endpoint);
        goto done;
    }

    /* No request: offline, no HTTP client, or a commit whose snapshot is complete. */
    if (j->set.offline) {
        if (cached_snapshot(j, dir, cap, missing, sizeof missing)) {
            say(j, "%s: HF_HUB_OFFLINE is set; using the cached snapshot %s (revision %s)", j->repo,
                j->commit, j->rev);
            goto done;
        }
        rc = lt_fail(err, LT_ERR_IO,
                     "%s (revision %s) is not complete in the Hugging Face cache %s (missing: %s), "
                     "and HF_HUB_OFFLINE is set, so nothing is downloaded (unset it to download)",
                     j->repo, j->rev, j->rc.root, missing);
        goto done;
    }
    if (hub_is_commit(j->rev) && cached_snapshot(j, dir, cap, missing, sizeof missing)) goto done;
    if (!hub_http_available()) {
        if (cached_snapshot(j, dir, cap, missing, sizeof missing)) {
            say(j, "%s: %s; using the cached snapshot %s", j->repo, hub_http_unavailable_reason(),
                j->commit);
            goto done;
        }
        rc = lt_fail(err, LT_ERR_IO,
                     "%s (revision %s) is not complete in the Hugging Face cache %s (missing: %s), "
                     "and %s. Download it with `hf download %s` meanwhile",
                     j->repo, j->rev, j->rc.root, missing, hub_http_unavailable_reason(), j->repo);
        goto done;
    }
    rc = hub_http_open(&j->http, j->set.token, j->set.etag_timeout, j->set.download_timeout, cancel,
                       err);
    if (rc != LT_OK) goto done;

    int reached, fallback;
    rc = revision_get(j, &info, &reached, &fallback);
    if (rc == LT_CANCELLED) goto done;
    if (rc != LT_OK && (!reached || fallback)) {
        char reason[LT_ERRLEN + 200];
        if (!reached)
            snprintf(reason, sizeof reason, "the Hub at %s could not be reached (%s)",
                     j->set.endpoint, err);
        else
            snprintf(reason, sizeof reason, "the Hub refused the revision call (%s)", err);
        if (from_cache_after(j, reason, dir, cap, missing, sizeof missing) == LT_OK) {
            rc = LT_OK;
            err[0] = 0;
            goto done;
        }
        char first[LT_ERRLEN];
        snprintf(first, sizeof first, "%s", err);
        if (!reached)
            rc = lt_fail(err, LT_ERR_IO,
                         "%s: the Hub at %s could not be reached (%s), and the Hugging Face "
                         "cache %s has no complete snapshot of revision %s (missing: %s)",
                         j->repo, j->set.endpoint, first, j->rc.root, j->rev, missing);
        else /* where it looked first: the refusal is long and may be cut */
            rc = lt_fail(err, rc,
                         "%s: no complete snapshot of revision %s in the Hugging Face "
                         "cache %s (missing: %s); %s",
                         j->repo, j->rev, j->rc.root, missing, first);
        goto done;
    }
    if (rc != LT_OK) goto done;

    /* The commit is known and the Hub answers: fetch what is missing. */
    if (strcmp(j->rev, j->commit) != 0 && hub_cache_write_ref(&j->rc, j->rev, j->commit, err))
        say(j, "%s: the ref is not recorded (%s); the snapshot is used all the same", j->repo,
            err); /* a read-only cache: huggingface_hub goes on as well */
    err[0] = 0;
    if (!info_has(&info, "config.json")) {
        rc = lt_fail(err, LT_ERR_FORMAT,
                     "%s (commit %s) has no config.json: not a model lathe loads", j->repo,
                     j->commit);
        goto done;
    }
    int sharded = info_has(&info, "model.safetensors.index.json");
    if (!sharded && !info_has(&info, "model.safetensors")) {
        rc =
            lt_fail(err, LT_ERR_FORMAT,
                    "%s (commit %s) has neither model.safetensors nor model.safetensors.index.json "
                    "(lathe reads safetensors checkpoints)",
                    j->repo, j->commit);
        goto done;
    }
    /* the small files first (the index tells which shards), then the weights */
    char *small[sizeof WANTED / sizeof *WANTED];
    int n_small = 0;
    for (size_t i = 0; i < sizeof WANTED / sizeof *WANTED; i++)
        if (strcmp(WANTED[i], "model.safetensors") != 0 && info_has(&info, WANTED[i]))
            small[n_small++] = (char *)WANTED[i];
    rc = fetch_missing(j, small, n_small);
    if (rc != LT_OK) goto done;
    if (sharded) {
        char idx[HUB_PATH + 600];
        hub_cache_pointer(&j->rc, j->commit, "model.safetensors.index.json", idx, sizeof idx);
        rc = index_shards(idx, &shards, &n_shards, err);
        if (rc != LT_OK) goto done;
        for (int i = 0; i < n_shards; i++)
            if (!info_has(&info, shards[i])) {
                rc = lt_fail(err, LT_ERR_FORMAT,
                             "%s (commit %s): its model.safetensors.index.json names %s, which is "
                             "not in the repository",
                             j->repo, j->commit, shards[i]);
                goto done;
            }
        rc = fetch_missing(j, shards, n_shards);
    } else {
        char *one[] = {"model.safetensors"};
        rc = fetch_missing(j, one, 1);
    }
    if (rc != LT_OK) goto done;
    hub_cache_snapshot(&j->rc, j->commit, dir, cap);
    if (!snapshot_complete(dir, missing, sizeof missing)) {
        rc = lt_fail(err, LT_ERR_FORMAT, "%s (commit %s) lacks what lathe needs: %s", j->repo,
                     j->commit, missing);
        goto done;
    }
    if (j->n_fetched) {
        char size[32];
        human_size(size, sizeof size, j->bytes_fetched);
        say(j, "%s: %d file%s downloaded (%s); snapshot %s", j->repo, j->n_fetched,
            j->n_fetched == 1 ? "" : "s", size, j->commit);
    }
done:
    if (rc != LT_OK && rc != LT_CANCELLED && j->repo[0] && !strstr(err, j->repo))
        lt_fail_prefix(err, rc, "%s", j->repo);
    hub_http_close(j->http);
    hub_revision_free(&info);
    hub_names_free(shards, n_shards);
    free(j);
    return rc;
}
