/* test_base.c — the engine's small shared pieces: the error setters (error.h), the
 * string buffer (strbuf.h), atomic files and sets of files (atomic_file.h), the safetensors
 * writer read back through the reader, and the host view of a CPU tensor.
 *
 * Files are written under a fresh temp folder; every check that a write is atomic looks at
 * what is left in the folder (the target, the previous bytes, no ".tmp-" file).
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/backend/host_view.h"
#include "cuda/base/atomic_file.h"
#include "cuda/base/error.h"
#include "cuda/base/strbuf.h"
#include "cuda/formats/safetensors.h"
#include "cuda/formats/safetensors_write.h"
#include "tests/unit/tap.h"

static char dir[256];

static const char *p(const char *name) {
    static char buf[4][512];
    static int k = 0;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

/* The whole file as a string (NULL if unreadable). */
static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    lt_strbuf b = {0};
    int r = lt_strbuf_read(&b, f, 1 << 20);
    fclose(f);
    if (r != 0 || b.oom) {
        lt_strbuf_free(&b);
        return NULL;
    }
    return lt_strbuf_take(&b);
}

static void spit(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

/* Entries of folder d whose name contains ".tmp-". */
static int temps_in(const char *d) {
    DIR *dd = opendir(d);
    int n = 0;
    struct dirent *e;
    while (dd && (e = readdir(dd)))
        n += strstr(e->d_name, ".tmp-") != NULL;
    if (dd) closedir(dd);
    return n;
}

static int file_is(const char *path, const char *want) {
    char *got = slurp(path);
    int same = got && strcmp(got, want) == 0;
    free(got);
    return same;
}

static void test_error(void) {
    char err[LT_ERRLEN] = "";
    is_int(lt_fail(err, LT_ERR_IO, "%s: %d", "x.bin", 7), LT_ERR_IO, "lt_fail returns its status");
    is_str(err, "x.bin: 7", "lt_fail formats the message");
    is_int(lt_fail(NULL, LT_ERR_ARG, "ignored"), LT_ERR_ARG,
           "lt_fail with no buffer still returns");
    char big[3 * LT_ERRLEN];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = 0;
    lt_fail(err, LT_ERR_ARG, "%s", big);
    is_int(strlen(err), LT_ERRLEN - 1, "a long message is cut at LT_ERRLEN - 1 bytes");
    lt_fail(err, LT_ERR_IO, "cannot open");
    is_int(lt_fail_prefix(err, LT_ERR_FORMAT, "%%train save=%s", "d"), LT_ERR_FORMAT,
           "lt_fail_prefix returns its status");
    is_str(err, "%train save=d: cannot open", "lt_fail_prefix puts the context in front");
    lt_fail(err, LT_ERR_IO, "%s", big);
    lt_fail_prefix(err, LT_ERR_IO, "ctx");
    ok(strlen(err) == LT_ERRLEN - 1 && !strncmp(err, "ctx: aaa", 8),
       "lt_fail_prefix keeps the prefix and cuts the old text");
}

static void test_strbuf(void) {
    lt_strbuf b = {0};
    is_str(lt_strbuf_str(&b), "", "an empty buffer reads as \"\"");
    lt_strbuf_puts(&b, "<bos>");
    lt_strbuf_printf(&b, "%d-%s", 42, "x");
    lt_strbuf_put(&b, "yz", 1);
    is_str(b.p, "<bos>42-xy", "puts, printf and put append in order");
    /* growth: 10000 numbered pieces, compared with a buffer sized up front */
    lt_strbuf g = {0};
    char *want = malloc(10000 * 8 + 1), *w = want;
    for (int i = 0; i < 10000; i++) {
        lt_strbuf_printf(&g, "%d,", i);
        w += sprintf(w, "%d,", i);
    }
    ok(!g.oom && g.len == (size_t)(w - want) && !strcmp(g.p, want),
       "10000 appends grow the buffer and keep every byte");
    free(want);
    size_t mark = b.len;
    lt_strbuf_put(&b, "\0\1\2", 3);
    is_int(b.len, mark + 3, "binary bytes (a NUL among them) count in len");
    ok(b.p[b.len] == 0, "... and a NUL still follows them");
    lt_strbuf_truncate(&b, mark);
    is_str(b.p, "<bos>42-xy", "truncate goes back to a mark");
    char *s = lt_strbuf_take(&b);
    is_str(s, "<bos>42-xy", "take hands the string over");
    ok(b.p == NULL && b.len == 0, "... and leaves the buffer empty");
    free(s);
    s = lt_strbuf_take(&b);
    is_str(s, "", "take of an empty buffer is a malloc'd \"\"");
    free(s);
    lt_strbuf_free(&g);
    /* reading a file, whole and past a limit */
    spit(p("read.txt"), "line one\nline two\n");
    FILE *f = fopen(p("read.txt"), "rb");
    lt_strbuf r = {0};
    lt_strbuf_puts(&r, ">");
    is_int(lt_strbuf_read(&r, f, 100), 0, "read: 0 at the end of the file");
    fclose(f);
    is_str(r.p, ">line one\nline two\n", "read appends the file's bytes");
    lt_strbuf_free(&r);
    f = fopen(p("read.txt"), "rb");
    is_int(lt_strbuf_read(&r, f, 4), 1, "read: 1 when the file is larger than the limit");
    fclose(f);
    lt_strbuf_free(&r);
}

static void test_atomic(void) {
    char err[LT_ERRLEN] = "";
    /* the whole-file write, new and replacing */
    is_int(lt_file_write_atomic(p("a.txt"), "first", 5, err), LT_OK, "whole-file write");
    ok(file_is(p("a.txt"), "first") && temps_in(dir) == 0, "... the file holds it, no temp left");
    is_int(lt_file_write_atomic(p("a.txt"), "second", 6, err), LT_OK, "a second write replaces");
    ok(file_is(p("a.txt"), "second"), "... the file holds the new bytes");
    struct stat sb;
    ok(stat(p("a.txt"), &sb) == 0 && (sb.st_mode & 0777) == 0644, "the file is 0644");
    /* no-replace: an existing target is kept */
    lt_afile f;
    is_int(lt_afile_open(&f, p("a.txt"), err), LT_OK, "open a temp beside an existing file");
    ok(temps_in(dir) == 1 && file_is(p("a.txt"), "second"),
       "... the temp is there, the file untouched");
    lt_afile_write(&f, "third", 5, err);
    lt_afile_finish(&f, err);
    is_int(lt_afile_commit(&f, 0, err), LT_ERR_IO, "a no-replace commit onto a file fails");
    ok(f.existed && strstr(err, "a.txt") && strstr(err, "exists"), "... saying the file exists");
    ok(file_is(p("a.txt"), "second") && temps_in(dir) == 0, "... the file kept, the temp removed");
    lt_afile_open(&f, p("b.txt"), err);
    lt_afile_write(&f, "new", 3, err);
    lt_afile_finish(&f, err);
    is_int(lt_afile_commit(&f, 0, err), LT_OK, "a no-replace commit onto no file succeeds");
    ok(file_is(p("b.txt"), "new") && temps_in(dir) == 0, "... the file is there, no temp left");
    /* abort */
    lt_afile_open(&f, p("c.txt"), err);
    lt_afile_write(&f, "half", 4, err);
    lt_afile_abort(&f);
    ok(access(p("c.txt"), F_OK) != 0 && temps_in(dir) == 0, "abort leaves neither file nor temp");
    /* a folder that is not there */
    is_int(lt_afile_open(&f, p("missing/x.txt"), err), LT_ERR_IO, "open in a missing folder");
    ok(strstr(err, "missing/x.txt") != NULL, "... an I/O error naming the path");

    /* a set: all or nothing */
    spit(p("src.bin"), "copied bytes");
    lt_afile_set s = {0};
    lt_status rc = lt_afile_set_text(&s, p("one.json"), "{\"a\": 1}\n", err);
    if (rc == LT_OK) rc = lt_afile_set_copy(&s, p("two.bin"), p("src.bin"), err);
    ok(rc == LT_OK && access(p("one.json"), F_OK) != 0 && temps_in(dir) == 2,
       "set: members are temps until the commit");
    is_int(lt_afile_set_commit(&s, err), LT_OK, "set: commit");
    ok(file_is(p("one.json"), "{\"a\": 1}\n") && file_is(p("two.bin"), "copied bytes") &&
           temps_in(dir) == 0 && s.n == 0,
       "... both files in place, no temp left, the set empty");
    lt_afile_set_text(&s, p("one.json"), "replaced", err);
    rc = lt_afile_set_copy(&s, p("three.bin"), p("no-such-file"), err);
    is_int(rc, LT_ERR_IO, "set: a member that cannot be made fails");
    ok(strstr(err, "no-such-file") != NULL, "... naming the file it could not read");
    lt_afile_set_abort(&s);
    ok(file_is(p("one.json"), "{\"a\": 1}\n") && access(p("three.bin"), F_OK) != 0 &&
           temps_in(dir) == 0,
       "set: abort keeps the previous files and leaves no temp");

    /* dir_prepare */
    is_int(lt_dir_prepare(p("d1/d2/d3"), err), LT_OK, "dir_prepare makes nested folders");
    ok(stat(p("d1/d2/d3"), &sb) == 0 && S_ISDIR(sb.st_mode), "... the folder exists");
    is_int(lt_dir_prepare(p("d1/d2/d3"), err), LT_OK, "... and accepts it the next time");
    is_int(lt_dir_prepare(p("a.txt"), err), LT_ERR_IO, "dir_prepare refuses a file");
    ok(strstr(err, "not a folder") != NULL, "... saying it is not a folder");
    is_int(lt_dir_prepare("", err), LT_ERR_ARG, "dir_prepare refuses an empty name");
}

static void test_safetensors_write(void) {
    char err[LT_ERRLEN] = "";
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint16_t b[3] = {0x3f80, 0x4000, 0xbf80}; /* bf16 1, 2, -1 */
    st_out t[2] = {{"w.a", LT_F32, 2, {2, 3}, a}, {"w.b", LT_BF16, 1, {3}, b}};
    is_int(st_write(p("t.safetensors"), t, 2, ST_METADATA_PT, err), LT_OK, "st_write");
    char *raw = slurp(p("t.safetensors"));
    uint64_t hl = 0;
    if (raw) memcpy(&hl, raw, 8);
    ok(raw && hl % 8 == 0 && strstr(raw + 8, "\"__metadata__\":{\"format\":\"pt\"}"),
       "the header is 8-byte padded and holds the metadata");
    free(raw);
    st_set s;
    is_int(st_open(&s, p("t.safetensors"), err), LT_OK, "the reader opens what the writer wrote");
    const st_tensor *ra = st_find(&s, "w.a"), *rb = st_find(&s, "w.b");
    ok(ra && ra->dtype == LT_F32 && ra->ndim == 2 && ra->shape[0] == 2 && ra->shape[1] == 3 &&
           !memcmp(ra->data, a, sizeof a),
       "an F32 [2, 3] tensor comes back byte for byte");
    ok(rb && rb->dtype == LT_BF16 && rb->ndim == 1 && rb->shape[0] == 3 &&
           !memcmp(rb->data, b, sizeof b),
       "a BF16 [3] tensor comes back byte for byte");
    st_close(&s);
    ok(temps_in(dir) == 0, "no temp left");
    /* the host view of a CPU tensor is the tensor's own memory */
    lt_ctx ctx = {.be = &lt_backend_cpu};
    lt_host_pool hp = {0};
    lt_tensor x = lt_tensor_2d(LT_F32, a, 2, 3);
    ok(lt_host_view(&ctx, &x, &hp) == a && hp.n == 0, "host view on the CPU: no copy");
    lt_host_pool_free(&hp);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/lathe-base-XXXXXX");
    if (!mkdtemp(dir)) {
        printf("Bail out! cannot create a temp folder\n");
        return 1;
    }
    test_error();
    test_strbuf();
    test_atomic();
    test_safetensors_write();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) diag("could not remove %s", dir);
    return tap_done();
}
