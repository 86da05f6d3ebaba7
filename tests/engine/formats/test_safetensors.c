/* test_safetensors.c — safetensors reading: good single and sharded files, every dtype
 * we compute with, and each kind of broken header (written here, byte by byte), each of which
 * must give a clear error naming the file and, where there is one, the tensor.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/formats/safetensors.h"
#include "tests/engine/st_write.h"
#include "tests/unit/tap.h"

static char dir[256];

static const char *p(const char *name) {
    static char buf[4][512];
    static int k = 0;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

/* Opens path, expects failure with an error containing each of the (up to 2) substrings. */
static void expect_error(const char *path, const char *want1, const char *want2, const char *name) {
    st_set s;
    char err[LT_ERRLEN] = "";
    lt_status rc = st_open(&s, path, err);
    int good = rc != LT_OK && strstr(err, want1) && (!want2 || strstr(err, want2));
    ok(good, name);
    if (!good) diag("rc %d, err: %s", rc, err);
    if (rc == LT_OK) st_close(&s);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/lathe-st-XXXXXX");
    if (!mkdtemp(dir)) return 1;

    /* ---- a good file: F32 [2,3], F16 [2], BF16 [3], metadata ---- */
    {
        unsigned char data[24 + 4 + 6];
        float f[6] = {1, 2, 3, 4, 5, -6.5f};
        memcpy(data, f, 24);
        uint16_t h[2] = {lt_f32_to_f16(1.5f), lt_f32_to_f16(-2.0f)};
        memcpy(data + 24, h, 4);
        uint16_t b[3] = {lt_f32_to_bf16(0.25f), lt_f32_to_bf16(3.0f), lt_f32_to_bf16(-1.0f)};
        memcpy(data + 28, b, 6);
        const char *hdr = "{\"__metadata__\":{\"format\":\"pt\"},"
                          "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
                          "\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[24,28]},"
                          "\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[28,34]}}";
        st_raw(p("good.safetensors"), hdr, data, sizeof data, 0);
        st_set s;
        char err[LT_ERRLEN] = "";
        lt_status rc = st_open(&s, p("good.safetensors"), err);
        is_int(rc, LT_OK, "good file opens");
        if (rc != LT_OK) diag("%s", err);
        is_int(s.n_tensors, 3, "three tensors (metadata skipped)");
        const st_tensor *a = st_find(&s, "a"), *th = st_find(&s, "h"), *tb = st_find(&s, "b");
        ok(a && th && tb, "all three found by name");
        ok(!st_find(&s, "zz"), "an absent name is NULL");
        if (a && th && tb) {
            is_int(a->dtype, LT_F32, "a is F32");
            ok(a->ndim == 2 && a->shape[0] == 2 && a->shape[1] == 3, "a has shape [2, 3]");
            float a5; /* the data section need not be aligned: read through memcpy */
            memcpy(&a5, (const float *)a->data + 5, sizeof a5);
            is_close(a5, -6.5, 0, "a[1][2] == -6.5");
            is_int(th->dtype, LT_F16, "h is F16");
            uint16_t h1;
            memcpy(&h1, (const uint16_t *)th->data + 1, sizeof h1);
            is_close(lt_f16_to_f32(h1), -2.0, 0, "h[1] == -2");
            is_int(tb->dtype, LT_BF16, "b is BF16");
            float out[3];
            lt_to_f32(out, tb->data, LT_BF16, 3);
            is_close(out[0], 0.25, 0, "b[0] == 0.25");
            is_close(out[2], -1.0, 0, "b[2] == -1");
        }
        st_close(&s);
    }

    /* ---- broken headers ---- */
    {
        FILE *f = fopen(p("short.safetensors"), "wb");
        fputs("abc", f);
        fclose(f);
    }
    expect_error(p("short.safetensors"), "short.safetensors", "shorter than the 8-byte",
                 "a 3-byte file is refused");

    st_raw(p("huge.safetensors"), "{}", NULL, 0, 200ull * 1000 * 1000);
    expect_error(p("huge.safetensors"), "huge.safetensors", "100 MB",
                 "a header length above 100 MB is refused");

    st_raw(p("pastend.safetensors"), "{}", NULL, 0, 5000);
    expect_error(p("pastend.safetensors"), "pastend.safetensors", "past the end of the file",
                 "a header length past the end of the file is refused");

    st_raw(p("garbled.safetensors"), "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], ", NULL, 0, 0);
    expect_error(p("garbled.safetensors"), "garbled.safetensors", "garbled",
                 "garbled JSON is refused");

    {
        float f[2] = {1, 2};
        st_raw(p("offsets.safetensors"),
               "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", f, 8, 0);
        expect_error(p("offsets.safetensors"), "'w'", "past the end",
                     "offsets past the end name the tensor");

        st_raw(p("overlap.safetensors"),
               "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"y\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
               f, 8, 0);
        expect_error(p("overlap.safetensors"), "'x'", "overlapping",
                     "overlapping ranges name both tensors");
        expect_error(p("overlap.safetensors"), "'y'", "overlap.safetensors", "... and the file");

        st_raw(p("size.safetensors"),
               "{\"w\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,8]}}", f, 8, 0);
        expect_error(p("size.safetensors"), "'w'", "needs 6",
                     "dtype size x shape != byte count names the tensor");

        st_raw(p("dtype.safetensors"),
               "{\"w\":{\"dtype\":\"F99\",\"shape\":[2],\"data_offsets\":[0,8]}}", f, 8, 0);
        expect_error(p("dtype.safetensors"), "'w'", "unknown dtype 'F99'",
                     "an unknown dtype names the tensor");

        st_raw(p("neg.safetensors"),
               "{\"w\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", f, 8, 0);
        expect_error(p("neg.safetensors"), "'w'", "non-negative",
                     "a negative dimension is refused");

        st_raw(p("keys.safetensors"), "{\"w\":{\"dtype\":\"F32\",\"shape\":[2]}}", f, 8, 0);
        expect_error(p("keys.safetensors"), "'w'", "data_offsets",
                     "a missing data_offsets is refused");

        st_raw(p("arr.safetensors"), "[1,2,3]", f, 8, 0);
        expect_error(p("arr.safetensors"), "arr.safetensors", "not a JSON object",
                     "a non-object header is refused");

        st_raw(p("dup.safetensors"),
               "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
               "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
               f, 8, 0);
        expect_error(p("dup.safetensors"), "dup.safetensors", "garbled",
                     "duplicate tensor names are refused");
    }
    expect_error(p("nonexistent.safetensors"), "nonexistent.safetensors", NULL,
                 "a missing file names the path");

    /* ---- sharded: an index over two shards ---- */
    {
        mkdir(p("sharded"), 0755);
        float a[2] = {1, 2}, b[3] = {3, 4, 5};
        st_raw(p("sharded/model-00001-of-00002.safetensors"),
               "{\"t.a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", a, 8, 0);
        st_raw(p("sharded/model-00002-of-00002.safetensors"),
               "{\"t.b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}", b, 12, 0);
        FILE *f = fopen(p("sharded/model.safetensors.index.json"), "w");
        fprintf(f, "{\"metadata\":{\"total_size\":20},\"weight_map\":{\"t.a\":\"model-00001-of-"
                   "00002.safetensors\","
                   "\"t.b\":\"model-00002-of-00002.safetensors\"}}");
        fclose(f);
        st_set s;
        char err[LT_ERRLEN] = "";
        lt_status rc = st_open(&s, p("sharded"), err);
        is_int(rc, LT_OK, "a sharded directory opens through its index");
        if (rc != LT_OK) diag("%s", err);
        is_int(s.n_files, 2, "two shards mapped");
        const st_tensor *tb = st_find(&s, "t.b");
        float b2 = 0;
        if (tb) memcpy(&b2, (const float *)tb->data + 2, sizeof b2);
        ok(tb && b2 == 5.0f, "t.b read from the second shard");
        if (rc == LT_OK) st_close(&s);

        mkdir(p("badidx"), 0755);
        st_raw(p("badidx/one.safetensors"),
               "{\"t.a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", a, 8, 0);
        f = fopen(p("badidx/model.safetensors.index.json"), "w");
        fprintf(f, "{\"weight_map\":{\"t.a\":\"one.safetensors\",\"t.zz\":\"one.safetensors\"}}");
        fclose(f);
        expect_error(p("badidx"), "'t.zz'", "missing from one.safetensors",
                     "an indexed tensor missing from its shard");

        mkdir(p("noshard"), 0755);
        f = fopen(p("noshard/model.safetensors.index.json"), "w");
        fprintf(f, "{\"weight_map\":{\"t.a\":\"gone.safetensors\"}}");
        fclose(f);
        expect_error(p("noshard"), "gone.safetensors", "cannot open",
                     "a missing shard names its path");

        mkdir(p("garbidx"), 0755);
        f = fopen(p("garbidx/model.safetensors.index.json"), "w");
        fprintf(f, "{\"weight_map\": {\"t.a\": ");
        fclose(f);
        expect_error(p("garbidx"), "model.safetensors.index.json", NULL,
                     "a garbled index names the index file");

        mkdir(p("empty"), 0755);
        expect_error(p("empty"), "no model.safetensors", NULL,
                     "a directory without weights says so");
    }

    /* ---- conversions used by the loader ---- */
    is_int(lt_f32_to_bf16(1.0f), 0x3f80, "bf16(1.0) = 0x3f80");
    is_int(lt_f32_to_bf16(1.00390625f), 0x3f80, "bf16 rounds half to even (down)");
    is_int(lt_f32_to_bf16(1.01171875f), 0x3f82, "bf16 rounds half to even (up)");
    is_int(lt_f32_to_f16(65504.0f), 0x7bff, "f16(65504) = max");
    is_int(lt_f32_to_f16(65520.0f), 0x7c00, "f16(65520) overflows to inf");
    is_int(lt_f32_to_f16(5.9604644775390625e-08f), 0x0001, "f16 smallest subnormal");
    is_close(lt_f16_to_f32(0x3555), 0.333251953125, 0, "f16 0x3555 = 0.33325");
    is_int(lt_f32_to_f16(0.1f), 0x2e66, "f16(0.1) = 0x2e66");

    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) diag("could not remove %s", dir);
    return tap_done();
}
