/* test_hub_unit.c — the pieces of cuda/hub/ that need no server (TAP): SHA-256 against the
 * FIPS 180-4 examples (and a file hashed in odd-sized pieces against the same bytes at once),
 * Hub ids accepted and refused, the settings read from the environment as huggingface_hub's
 * constants.py and _auth.py read them, the cache folder names, the files lathe takes, and a
 * load of an id with neither a cache nor a reachable Hub. The protocol itself is
 * tests/hub/test_hub.py, against a real local server.
 *
 * Bad refs tried: a path ("../../../etc"). Bad ids tried: no slash, two slashes, an empty part, a
 * leading '.', "..", "--", a part beginning or ending with '-' or '.' ("a-/b" and "a/-b" would
 * share one cache folder), spaces, a shell character, an empty revision, a revision with a ".."
 * part, a leading or doubled '/'.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda/base/strbuf.h"
#include "cuda/hub/cache.h"
#include "cuda/hub/hub.h"
#include "cuda/hub/sha256.h"
#include "tests/unit/tap.h"

static void sha_of(const char *s, char hex[65]) {
    hub_sha256 h;
    hub_sha256_init(&h);
    hub_sha256_update(&h, s, strlen(s));
    hub_sha256_hex(&h, hex);
}

static void test_sha256(void) {
    char hex[65];
    sha_of("", hex);
    is_str(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256('')");
    sha_of("abc", hex);
    is_str(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
           "sha256('abc')");
    sha_of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", hex);
    is_str(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
           "sha256 of the 448-bit example (padding into a second block)");
    /* a million 'a', fed in pieces of 1..97 bytes: block boundaries everywhere */
    static char a[1000000];
    memset(a, 'a', sizeof a);
    hub_sha256 h;
    hub_sha256_init(&h);
    for (size_t off = 0, k = 1; off < sizeof a; off += k, k = k % 97 + 1)
        hub_sha256_update(&h, a + off, off + k <= sizeof a ? k : sizeof a - off);
    hub_sha256_hex(&h, hex);
    is_str(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
           "sha256 of a million 'a' in odd pieces");
    char path[] = "/tmp/lathe-hub-sha-XXXXXX";
    int fd = mkstemp(path);
    ok(fd >= 0 && write(fd, a, sizeof a) == (ssize_t)sizeof a, "write a file to hash");
    if (fd >= 0) close(fd);
    char fhex[65] = "";
    ok(hub_sha256_file(path, fhex) == 0, "hub_sha256_file reads it");
    is_str(fhex, hex, "the file's digest is the bytes' digest");
    unlink(path);
    ok(hub_sha256_file("/nonexistent/x", fhex) == -1, "a missing file is -1");
}

static void test_ids(void) {
    char repo[300], rev[300];
    ok(hub_parse_id("google/gemma-3-1b-it", repo, sizeof repo, rev, sizeof rev), "plain id");
    is_str(repo, "google/gemma-3-1b-it", "repo");
    is_str(rev, "main", "default revision is main");
    ok(hub_parse_id("org/name@v1.0", repo, sizeof repo, rev, sizeof rev), "id@tag");
    is_str(repo, "org/name", "repo of id@tag");
    is_str(rev, "v1.0", "tag");
    ok(hub_parse_id("org/name@refs/pr/1", repo, sizeof repo, rev, sizeof rev), "id@refs/pr/1");
    is_str(rev, "refs/pr/1", "a revision with slashes");
    ok(hub_parse_id("a_b/c.d@0123456789abcdef0123456789abcdef01234567", repo, sizeof repo, rev,
                    sizeof rev),
       "id@commit");
    ok(hub_parse_id("_a/b_", repo, sizeof repo, rev, sizeof rev), "'_' may begin and end a part");
    const char *bad[] = {"noslash", "a/b/c", "/name", "org/", "./x", ".org/name", "org/.name",
                         "org/na..me", "org/na--me", "org/na me", "org/na;me", "org/name@",
                         "org/name@../x", "org/name@a/../b", "org/name@/x", "org/name@x//y",
                         "org/name@x/", "~/x", "org/name@a b", "",
                         /* ORG or NAME not beginning and ending with a letter, digit or '_':
                          * "a-/b" and "a/-b" would share the cache folder models--a---b */
                         "a-/b", "a/-b", "-org/name", "org/name-", "org/name.", "org./name"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char name[80];
        snprintf(name, sizeof name, "refused: '%s'", bad[i]);
        ok(!hub_parse_id(bad[i], repo, sizeof repo, rev, sizeof rev), name);
    }
    ok(hub_is_commit("0123456789abcdef0123456789abcdef01234567"), "40 hex is a commit");
    ok(!hub_is_commit("0123456789ABCDEF0123456789abcdef01234567"), "upper case is not");
    ok(!hub_is_commit("main"), "main is not");
}

static void test_settings(void) {
    const char *vars[] = {"HF_ENDPOINT",
                          "HF_HOME",
                          "HF_HUB_CACHE",
                          "HUGGINGFACE_HUB_CACHE",
                          "HF_TOKEN",
                          "HUGGING_FACE_HUB_TOKEN",
                          "HF_TOKEN_PATH",
                          "HF_HUB_OFFLINE",
                          "TRANSFORMERS_OFFLINE",
                          "XDG_CACHE_HOME",
                          "HF_HUB_ETAG_TIMEOUT"};
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++)
        unsetenv(vars[i]);
    setenv("HOME", "/home/u", 1);
    hub_settings s;
    hub_settings_read(&s);
    is_str(s.endpoint, "https://huggingface.co", "default endpoint");
    is_str(s.home, "/home/u/.cache/huggingface", "default HF_HOME");
    is_str(s.cache, "/home/u/.cache/huggingface/hub", "default cache");
    is_str(s.token_file, "/home/u/.cache/huggingface/token", "default token file");
    ok(!s.offline && s.etag_timeout == 10 && s.download_timeout == 10, "online, 10 s timeouts");
    setenv("XDG_CACHE_HOME", "/xdg", 1);
    hub_settings_read(&s);
    is_str(s.cache, "/xdg/huggingface/hub", "XDG_CACHE_HOME moves HF_HOME");
    setenv("HF_HOME", "~/hf", 1);
    setenv("HF_ENDPOINT", "http://mirror.example//", 1);
    setenv("HF_HUB_OFFLINE", "yes", 1);
    setenv("HF_TOKEN", "  hf_abc\r\n", 1);
    setenv("HF_HUB_ETAG_TIMEOUT", "3", 1);
    hub_settings_read(&s);
    is_str(s.home, "/home/u/hf", "HF_HOME with ~ expanded");
    is_str(s.cache, "/home/u/hf/hub", "cache under HF_HOME");
    is_str(s.endpoint, "http://mirror.example", "trailing slashes of HF_ENDPOINT dropped");
    ok(s.offline, "HF_HUB_OFFLINE=yes is offline");
    is_str(s.token, "hf_abc", "HF_TOKEN cleaned of spaces and newlines");
    is_str(s.token_from, "HF_TOKEN", "token from HF_TOKEN");
    ok(s.etag_timeout == 3, "HF_HUB_ETAG_TIMEOUT");
    setenv("HF_HUB_OFFLINE", "0", 1);
    setenv("HF_HUB_CACHE", "/cache", 1);
    unsetenv("HF_TOKEN");
    char dir[] = "/tmp/lathe-hub-home-XXXXXX";
    ok(mkdtemp(dir) != NULL, "a temporary HF_HOME");
    setenv("HF_HOME", dir, 1);
    char tf[200];
    snprintf(tf, sizeof tf, "%s/token", dir);
    FILE *f = fopen(tf, "w");
    if (f) {
        fputs("hf_from_file\n", f);
        fclose(f);
    }
    hub_settings_read(&s);
    ok(!s.offline, "HF_HUB_OFFLINE=0 is online");
    is_str(s.cache, "/cache", "HF_HUB_CACHE wins over HF_HOME");
    is_str(s.token, "hf_from_file", "the token file under HF_HOME");
    is_str(s.token_from, tf, "token from the file, named by its path");
    unlink(tf);
    rmdir(dir);
}

static void test_cache_names(void) {
    hub_repo_cache c;
    hub_cache_init(&c, "/c", "google/gemma-3-1b-it");
    is_str(c.folder, "models--google--gemma-3-1b-it", "repo_folder_name");
    is_str(c.root, "/c/models--google--gemma-3-1b-it", "its folder");
    char p[HUB_PATH + 600];
    hub_cache_blob(&c, "abc", ".incomplete", p, sizeof p);
    is_str(p, "/c/models--google--gemma-3-1b-it/blobs/abc.incomplete", "partial blob name");
    hub_cache_pointer(&c, "0123456789abcdef0123456789abcdef01234567", "config.json", p, sizeof p);
    is_str(p,
           "/c/models--google--gemma-3-1b-it/snapshots/0123456789abcdef0123456789abcdef01234567/"
           "config.json",
           "snapshot pointer");
    ok(hub_wanted_file("config.json") && hub_wanted_file("tokenizer.model") &&
           hub_wanted_file("model.safetensors.index.json") &&
           hub_wanted_file("generation_config.json"),
       "the files lathe takes");
    ok(!hub_wanted_file("pytorch_model.bin") && !hub_wanted_file("README.md") &&
           !hub_wanted_file("model.gguf") && !hub_wanted_file("original/config.json"),
       "and not the others");
}

static void test_refs(void) {
    char dir[] = "/tmp/lathe-hub-refs-XXXXXX";
    ok(mkdtemp(dir) != NULL, "a temporary cache");
    hub_repo_cache c;
    hub_cache_init(&c, dir, "o/n");
    char err[LT_ERRLEN], commit[129];
    const char *sha = "0123456789abcdef0123456789abcdef01234567";
    ok(!hub_cache_read_ref(&c, "main", commit, sizeof commit), "no ref yet");
    ok(hub_cache_write_ref(&c, "refs/pr/1", sha, err) == LT_OK, "write a nested ref");
    ok(hub_cache_read_ref(&c, "refs/pr/1", commit, sizeof commit), "read it back");
    is_str(commit, sha, "the commit");
    char p[HUB_PATH + 100];
    snprintf(p, sizeof p, "%s/refs/refs/pr/1", c.root);
    FILE *f = fopen(p, "rb");
    char raw[64] = "";
    size_t n = f ? fread(raw, 1, sizeof raw - 1, f) : 0;
    if (f) fclose(f);
    is_int(n, 40, "written without a newline, as huggingface_hub writes it");
    ok(hub_cache_link(&c, sha, "sub/dir/x.json", "etag1", err) == LT_OK, "link a nested file");
    char link[200] = "";
    hub_cache_pointer(&c, sha, "sub/dir/x.json", p, sizeof p);
    ssize_t k = readlink(p, link, sizeof link - 1);
    link[k > 0 ? k : 0] = 0;
    is_str(link, "../../../../blobs/etag1", "a relative link from a subfolder");
    snprintf(p, sizeof p, "%s/refs/dev", c.root);
    f = fopen(p, "w");
    if (f) {
        fputs("0123abc\n", f); /* another tool's ref: read as it is, as huggingface_hub does */
        fclose(f);
    }
    ok(hub_cache_read_ref(&c, "dev", commit, sizeof commit), "a ref that is not a full commit");
    is_str(commit, "0123abc", "read as it is, without its newline");
    snprintf(p, sizeof p, "%s/refs/evil", c.root);
    f = fopen(p, "w");
    if (f) {
        fputs("../../../etc", f);
        fclose(f);
    }
    ok(!hub_cache_read_ref(&c, "evil", commit, sizeof commit), "a ref naming another folder: no");
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ok(system(cmd) == 0, "clean up");
}

/* The Hub's answers through the parsers hub_snapshot uses (fuzz/fuzz_hub.c fuzzes them). */
static void test_hub_answers(void) {
    const char *sha = "0123456789abcdef0123456789abcdef01234567";
    char body[2048], err[LT_ERRLEN];
    snprintf(
        body, sizeof body,
        "{\"sha\": \"%s\", \"siblings\": [{\"rfilename\": \"../config.json\"}, "
        "{\"rfilename\": \"/etc/passwd\"}, {\"rfilename\": \"..\"}, "
        "{\"rfilename\": \"sub/../model.safetensors\"}, {\"rfilename\": \"/model.safetensors\"}, "
        "{\"rfilename\": \".hidden.safetensors\"}, {\"rfilename\": \"a\\\\b.safetensors\"}, "
        "{\"rfilename\": \"config.json\"}, {\"rfilename\": \"model-1.safetensors\"}, "
        "{\"rfilename\": \"README.md\"}, {\"rfilename\": 7}, {}]}",
        sha);
    hub_revision r;
    ok(hub_revision_parse(body, strlen(body), &r, err) == LT_OK, "a revision answer");
    is_str(r.commit, sha, "its commit");
    is_int(r.n_files, 2, "of its siblings, only plain names lathe takes: no '..', '/', '\\'");
    ok(r.n_files == 2 && !strcmp(r.files[0], "config.json") &&
           !strcmp(r.files[1], "model-1.safetensors"),
       "config.json and the shard");
    hub_revision_free(&r);
    {
        hub_response hr;
        memset(&hr, 0, sizeof hr);
        const char line[] = "X-Error-Message: gated\x1b[31m repo\x07 \x7fhere";
        hub_response_header(&hr, line, sizeof line - 1);
        is_str(hr.error_message, "gated [31m repo   here",
               "X-Error-Message: control bytes (ESC, BEL, DEL) become spaces before any message");
    }
    /* 256 shards are taken, 257 refused (never a silently shortened list) */
    for (int extra = 0; extra < 2; extra++) {
        lt_strbuf big = {0};
        lt_strbuf_printf(&big, "{\"sha\": \"%s\", \"siblings\": [", sha);
        for (int i = 0; i < 256 + extra; i++)
            lt_strbuf_printf(&big, "%s{\"rfilename\": \"model-%05d.safetensors\"}", i ? ", " : "",
                             i);
        lt_strbuf_printf(&big, "]}");
        lt_status rc = hub_revision_parse(big.p, big.len, &r, err);
        if (!extra) {
            ok(rc == LT_OK && r.n_files == 256, "256 shards: all taken");
            hub_revision_free(&r);
        } else {
            ok(rc == LT_ERR_FORMAT && strstr(err, "more than 256 files") && r.n_files == 0 &&
                   !r.files,
               "257 shards: refused, saying so (not cut to 256)");
            diag("%s", err);
        }
        lt_strbuf_free(&big);
    }
    const char *bad = "{\"sha\": \"0123\", \"siblings\": []}";
    ok(hub_revision_parse(bad, strlen(bad), &r, err) == LT_ERR_FORMAT && strstr(err, "40-hex"),
       "a sha that is not a commit: refused, saying why");
    const char *idx = "{\"weight_map\": {\"a\": \"../x.safetensors\"}}";
    char **names;
    int n;
    ok(hub_index_parse(idx, strlen(idx), &names, &n, err) == LT_ERR_FORMAT && n == 0,
       "an index naming ../x.safetensors: refused");
    char name[256];
    ok(!hub_etag_name("\"../../x\"", name, sizeof name) &&
           hub_etag_name("W/\"abc\"", name, sizeof name) && !strcmp(name, "abc"),
       "ETags: a path is no blob name, W/\"abc\" is abc");
    hub_response h;
    hub_response_clear(&h);
    const char *lines[] = {"HTTP/1.1 307 Temporary Redirect\r\n",
                           "Location: /x\r\n",
                           "\r\n",
                           "HTTP/1.1 302 Found\r\n",
                           "X-Linked-Size: 12\r\n",
                           "X-Linked-Etag: \"abc\"\r\n",
                           "Location: https://cdn.example/b\r\n",
                           "Content-Range: bytes 5-11/12\r\n",
                           "\r\n"};
    for (size_t i = 0; i < sizeof lines / sizeof *lines; i++)
        hub_response_header(&h, lines[i], strlen(lines[i]));
    ok(h.status == 302 && h.linked_size == 12 && h.range_start == 5 &&
           !strcmp(h.location, "https://cdn.example/b"),
       "headers: the last hop's");
    hub_file_meta m;
    ok(hub_head_meta(&h, "https://hub.example/o/n/resolve/c/f", sha, "https://hub.example", &m,
                     err) == LT_OK &&
           m.size == 12 && !strcmp(m.etag, "abc") && !strcmp(m.location, "https://cdn.example/b"),
       "the file's blob, size and download URL");
    char url[200] = "https://hub.example/o/n/resolve/c/f";
    hub_response_clear(&h);
    hub_response_header(&h, "HTTP/2 301\r\n", 12);
    hub_response_header(&h, "location: /p/q\r\n", 16);
    ok(hub_redirect_relative(url, sizeof url, &h) == 1 && !strcmp(url, "https://hub.example/p/q"),
       "a relative redirect keeps the host");
    hub_response_header(&h, "HTTP/1.1 -200 OK\r\n", 18);
    ok(h.status == 0, "a status that is not three digits is 0");
    hub_response_header(&h, "HTTP/2 026\r\n", 12);
    ok(h.status == 0, "nor one with a leading 0");
    char commit[129];
    ok(!hub_ref_parse("a\0b", 3, commit, sizeof commit) && commit[0] == 0,
       "a ref holding a NUL byte: no name");
}

static void test_no_hub(void) {
    char dir[] = "/tmp/lathe-hub-none-XXXXXX";
    ok(mkdtemp(dir) != NULL, "an empty HF_HOME");
    setenv("HF_HOME", dir, 1);
    unsetenv("HF_HUB_CACHE");
    setenv("HF_ENDPOINT", "http://127.0.0.1:9", 1); /* the discard port: refused here */
    setenv("HF_HUB_OFFLINE", "1", 1);
    char out[4096], err[LT_ERRLEN];
    lt_status rc = hub_snapshot("org/name", NULL, NULL, out, sizeof out, err);
    ok(rc == LT_ERR_IO && strstr(err, "HF_HUB_OFFLINE") && strstr(err, "org/name"),
       "offline, empty cache: refused, naming HF_HUB_OFFLINE and the repo");
    printf("# %s\n", err);
    rc = hub_snapshot("not an id", NULL, NULL, out, sizeof out, err);
    ok(rc == LT_ERR_ARG, "not an id: LT_ERR_ARG");
    rmdir(dir);
}

int main(void) {
    test_sha256();
    test_ids();
    test_settings();
    test_cache_names();
    test_refs();
    test_hub_answers();
    test_no_hub();
    return tap_done();
}
