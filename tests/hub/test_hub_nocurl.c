/* test_hub_nocurl.c — cuda/hub/ as a build without libcurl has it (TAP): the HTTP client says
 * it is missing and why, a complete snapshot in the cache still loads (with a note naming
 * libcurl), and an id that is not in the cache is refused naming libcurl, the cache folder and
 * `hf download`. Compiled with LATHE_HUB_WITHOUT_CURL on any build.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/hub/http.h"
#include "cuda/hub/hub.h"
#include "tests/unit/tap.h"

static char note[2048];

static void on_message(void *ctx, const char *text) {
    (void)ctx;
    snprintf(note, sizeof note, "%s", text);
}

int main(void) {
    ok(!hub_http_available(), "no HTTP client in this build");
    ok(strstr(hub_http_unavailable_reason(), "libcurl") != NULL, "the reason names libcurl");
    char home[] = "/tmp/lathe-hub-nocurl-XXXXXX";
    if (!mkdtemp(home)) return 1;
    setenv("HF_HOME", home, 1);
    unsetenv("HF_HUB_CACHE");
    unsetenv("HF_HUB_OFFLINE");
    unsetenv("TRANSFORMERS_OFFLINE");
    setenv("HF_ENDPOINT", "http://127.0.0.1:9", 1);
    char dir[4096], err[LT_ERRLEN];
    lt_status rc = hub_snapshot("acme/tiny", NULL, NULL, dir, sizeof dir, err);
    ok(rc == LT_ERR_IO && strstr(err, "libcurl") && strstr(err, "models--acme--tiny") &&
           strstr(err, "hf download acme/tiny"),
       "not in the cache: refused, naming libcurl, the cache folder and `hf download`");
    printf("# %s\n", err);
    /* a snapshot as huggingface_hub leaves it: refs/main, snapshots/<commit>/ */
    const char *commit = "0123456789abcdef0123456789abcdef01234567";
    char cmd[8192];
    snprintf(cmd, sizeof cmd,
             "set -e; r=%s/hub/models--acme--tiny; mkdir -p $r/refs $r/snapshots/%s; "
             "printf %s > $r/refs/main; cp %s/models/tiny/config.json "
             "%s/models/tiny/model.safetensors %s/models/tiny/tokenizer.model $r/snapshots/%s/",
             home, commit, commit, LATHE_SRCDIR, LATHE_SRCDIR, LATHE_SRCDIR, commit);
    ok(system(cmd) == 0, "a cached snapshot");
    lt_callbacks cb = {NULL, on_message, NULL, NULL};
    rc = hub_snapshot("acme/tiny", &cb, NULL, dir, sizeof dir, err);
    ok(rc == LT_OK && strstr(dir, commit), "the cached snapshot is used");
    ok(strstr(note, "libcurl") && strstr(note, commit), "with a note naming libcurl");
    printf("# %s\n", note);
    snprintf(cmd, sizeof cmd, "rm %s/hub/models--acme--tiny/snapshots/%s/tokenizer.model", home,
             commit);
    ok(system(cmd) == 0, "drop a file the snapshot needs");
    rc = hub_snapshot("acme/tiny", &cb, NULL, dir, sizeof dir, err);
    ok(rc == LT_ERR_IO && strstr(err, "missing: tokenizer.model"),
       "an incomplete snapshot is refused, naming what is missing");
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", home);
    ok(system(cmd) == 0, "clean up");
    return tap_done();
}
