/* fuzz_hub.c — libFuzzer harness for what the Hugging Face Hub and its cache hand the downloader
 * (cuda/hub/): the revision API's JSON, the headers of a HEAD on a resolve URL, a refs file of
 * the cache, the model id a user types, a model.safetensors.index.json, an ETag.
 *
 * Byte 0 picks the parser; the rest is its input. Each is the function hub_snapshot calls on
 * those bytes:
 *   0  hub_revision_parse  the revision JSON: a 40-hex commit, and only plain file names of the
 *                          snapshot folder (no '/', no "..", not absolute, no NUL, not leading
 *                          '.'), each one lathe takes, at most 256
 *   1  hub_response_header, then hub_redirect_relative and hub_head_meta: header lines split at
 *                          '\n'; a status of three digits or 0, sizes -1 or >= 0, fields
 *                          terminated; a relative redirect keeps the URL's host; an accepted
 *                          HEAD gives a size >= 0, a plain blob name and an absolute http(s) URL
 *                          (the scheme in any case, as URLs allow)
 *   2  hub_ref_parse       a refs/<rev> file: a plain folder name or nothing
 *   3  hub_parse_id        ORG/NAME[@REV] up to its first NUL: one '/', no ".." or "--"; the
 *                          revision has no empty, "." or ".." part; the cache folder
 *                          models--ORG--NAME names this repository and no other
 *   4  hub_index_parse     an index: distinct shard names, each a plain *.safetensors name
 *   5  hub_etag_name       an ETag: a plain blob name
 * A refusal of the lt_status parsers (0, 1, 4) must carry a reason; the others answer 0 and their
 * callers word the refusal.
 */
#include "fuzz/fuzz_util.h"

#include <strings.h>

#include "cuda/hub/cache.h"
#include "cuda/hub/http.h"
#include "cuda/hub/hub.h"

#define COMMIT "0123456789abcdef0123456789abcdef01234567"
#define ENDPOINT "https://huggingface.co"

static int name_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.';
}

/* A name that, joined to a folder, stays a file of that folder: non-empty, plain characters
 * (so no '/', '\\', NUL or control byte), not "." or "..", not leading '.'. */
static int plain_name(const char *s, size_t max) {
    size_t n = strnlen(s, max + 1);
    if (n == 0 || n > max || s[0] == '.') return 0;
    for (size_t i = 0; i < n; i++)
        if (!name_char(s[i])) return 0;
    return 1;
}

static int terminated(const char *field, size_t cap) {
    return memchr(field, 0, cap) != NULL;
}

static void check_revision(const uint8_t *p, size_t n) {
    hub_revision rev;
    char err[LT_ERRLEN] = "";
    if (hub_revision_parse((const char *)p, n, &rev, err) != LT_OK) {
        FUZZ_CHECK(err[0] != '\0');
        FUZZ_CHECK(rev.files == NULL && rev.n_files == 0);
        return;
    }
    FUZZ_CHECK(strlen(rev.commit) == 40 && hub_is_commit(rev.commit));
    FUZZ_CHECK(rev.n_files >= 0 && rev.n_files <= 256);
    for (int i = 0; i < rev.n_files; i++) {
        const char *f = rev.files[i];
        FUZZ_CHECK(plain_name(f, 200));
        size_t len = strlen(f);
        FUZZ_CHECK(hub_wanted_file(f) || (len > 12 && strcmp(f + len - 12, ".safetensors") == 0));
    }
    hub_revision_free(&rev);
    FUZZ_CHECK(rev.files == NULL && rev.n_files == 0);
}

static void check_headers(const uint8_t *p, size_t n) {
    hub_response r;
    hub_response_clear(&r);
    for (size_t at = 0; at < n;) {
        const uint8_t *nl = memchr(p + at, '\n', n - at);
        size_t len = nl ? (size_t)(nl - (p + at)) + 1 : n - at;
        hub_response_header(&r, (const char *)p + at, len);
        at += len;
    }
    FUZZ_CHECK(r.status == 0 || (r.status >= 100 && r.status <= 999));
    FUZZ_CHECK(r.linked_size >= -1 && r.content_length >= -1 && r.range_start >= -1);
    FUZZ_CHECK(terminated(r.location, sizeof r.location) && terminated(r.etag, sizeof r.etag) &&
               terminated(r.linked_etag, sizeof r.linked_etag) &&
               terminated(r.commit, sizeof r.commit) &&
               terminated(r.error_code, sizeof r.error_code) &&
               terminated(r.error_message, sizeof r.error_message));

    /* a relative redirect stays on the endpoint's host (the token goes there) */
    static char url[HUB_URL];
    const char *start = ENDPOINT "/org/name/resolve/" COMMIT "/config.json";
    snprintf(url, sizeof url, "%s", start);
    int followed = hub_redirect_relative(url, sizeof url, &r);
    FUZZ_CHECK(followed >= -1 && followed <= 1);
    if (followed == 1) {
        size_t o = strlen(ENDPOINT);
        FUZZ_CHECK(strncmp(url, ENDPOINT "/", o + 1) == 0 && url[o + 1] != '/');
        FUZZ_CHECK(strcmp(url + o, r.location) == 0);
    } else {
        FUZZ_CHECK(strcmp(url, start) == 0);
    }

    if (r.status >= 400) return; /* hub_snapshot's refusal() words these */
    static hub_file_meta m;
    char err[LT_ERRLEN] = "";
    if (hub_head_meta(&r, start, COMMIT, ENDPOINT, &m, err) != LT_OK) {
        FUZZ_CHECK(err[0] != '\0');
        return;
    }
    FUZZ_CHECK(r.status >= 200 && r.status < 400);
    FUZZ_CHECK(m.size >= 0);
    FUZZ_CHECK(plain_name(m.etag, 200));
    FUZZ_CHECK(strncasecmp(m.location, "http://", 7) == 0 ||
               strncasecmp(m.location, "https://", 8) == 0);
    FUZZ_CHECK(terminated(m.location, sizeof m.location));
    FUZZ_CHECK(r.commit[0] == '\0' || strcmp(r.commit, COMMIT) == 0);
}

static void check_ref(const uint8_t *p, size_t n) {
    char commit[129];
    memset(commit, 'x', sizeof commit);
    if (!hub_ref_parse((const char *)p, n, commit, sizeof commit)) {
        FUZZ_CHECK(commit[0] == '\0');
        return;
    }
    FUZZ_CHECK(plain_name(commit, sizeof commit - 1));
}

static void check_id(const uint8_t *p, size_t n) {
    char *spec = fuzz_text(p, n);
    char repo[300], rev[300];
    if (!hub_parse_id(spec, repo, sizeof repo, rev, sizeof rev)) {
        free(spec);
        return; /* hub_snapshot and the session name the id when they refuse it */
    }
    const char *slash = strchr(repo, '/');
    FUZZ_CHECK(slash && slash != repo && slash[1] && !strchr(slash + 1, '/'));
    FUZZ_CHECK(!strstr(repo, "..") && !strstr(repo, "--"));
    for (const char *c = repo; *c; c++)
        FUZZ_CHECK(*c == '/' || name_char(*c));
    FUZZ_CHECK(repo[0] != '.' && slash[1] != '.');
    /* the revision: parts of a path under refs/, none empty, "." or ".." */
    size_t m = strlen(rev);
    FUZZ_CHECK(m > 0 && rev[0] != '/' && rev[m - 1] != '/' && !strstr(rev, "//"));
    for (const char *part = rev; part;) {
        const char *end = strchr(part, '/');
        size_t k = end ? (size_t)(end - part) : strlen(part);
        FUZZ_CHECK(k > 0 && !(k == 1 && part[0] == '.') &&
                   !(k == 2 && part[0] == '.' && part[1] == '.'));
        for (size_t i = 0; i < k; i++)
            FUZZ_CHECK(name_char(part[i]));
        part = end ? end + 1 : NULL;
    }
    /* models--ORG--NAME read back gives this repository: no other id shares its cache */
    static hub_repo_cache c;
    hub_cache_init(&c, "/cache", repo);
    FUZZ_CHECK(strncmp(c.folder, "models--", 8) == 0 && !strchr(c.folder, '/'));
    const char *sep = strstr(c.folder + 8, "--");
    FUZZ_CHECK(sep != NULL);
    char back[300];
    snprintf(back, sizeof back, "%.*s/%s", (int)(sep - c.folder - 8), c.folder + 8, sep + 2);
    FUZZ_CHECK(strcmp(back, repo) == 0);
    free(spec);
}

static void check_index(const uint8_t *p, size_t n) {
    char **names;
    int k;
    char err[LT_ERRLEN] = "";
    if (hub_index_parse((const char *)p, n, &names, &k, err) != LT_OK) {
        FUZZ_CHECK(err[0] != '\0');
        FUZZ_CHECK(names == NULL && k == 0);
        return;
    }
    FUZZ_CHECK(k >= 0 && k <= 256);
    for (int i = 0; i < k; i++) {
        size_t len = strlen(names[i]);
        FUZZ_CHECK(plain_name(names[i], 200));
        FUZZ_CHECK(len > 12 && strcmp(names[i] + len - 12, ".safetensors") == 0);
        for (int j = 0; j < i; j++)
            FUZZ_CHECK(strcmp(names[i], names[j]) != 0);
    }
    hub_names_free(names, k);
}

static void check_etag(const uint8_t *p, size_t n) {
    char *raw = fuzz_text(p, n);
    char name[256];
    if (hub_etag_name(raw, name, sizeof name)) FUZZ_CHECK(plain_name(name, 200));
    free(raw);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    switch (data[0] % 6) {
    case 0:
        check_revision(p, n);
        break;
    case 1:
        check_headers(p, n);
        break;
    case 2:
        check_ref(p, n);
        break;
    case 3:
        check_id(p, n);
        break;
    case 4:
        check_index(p, n);
        break;
    default:
        check_etag(p, n);
        break;
    }
    return 0;
}
