/* fuzz_safetensors.c — libFuzzer harness for safetensors headers (cuda/formats/safetensors.c):
 * the first bytes of every checkpoint and adapter lathe maps, from the Hub or a user's disk.
 *
 * An input starting with '{' is a sharded index (model.safetensors.index.json) in a scratch
 * folder that also holds two small valid shards, a.safetensors and b.safetensors, and goes
 * through st_open as `%load DIR` does; anything else is one .safetensors file (a memfd) read by
 * st_open_file. An accepted file's tensors must lie inside the mapping; each float tensor is
 * converted (st_convert) to fp32 so every byte the header points at is read.
 */
#include "fuzz/fuzz_util.h"

#include "cuda/formats/safetensors.h"

static char index_path[512];

/* A valid safetensors file of one F32 tensor `name` holding n floats. */
static void write_shard(const char *path, const char *name, int n) {
    char hdr[256];
    int hl = snprintf(hdr, sizeof hdr,
                      "{\"%s\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[0,%d]}}", name,
                      n, 4 * n);
    uint8_t buf[512];
    uint64_t len = (uint64_t)hl;
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(len >> (8 * i));
    memcpy(buf + 8, hdr, (size_t)hl);
    float v[16];
    for (int i = 0; i < n; i++)
        v[i] = (float)i;
    memcpy(buf + 8 + hl, v, sizeof(float) * (size_t)n);
    fuzz_write(path, buf, 8 + (size_t)hl + sizeof(float) * (size_t)n);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *dir = fuzz_dir();
    char p[512];
    snprintf(p, sizeof p, "%s/a.safetensors", dir);
    write_shard(p, "x", 4);
    snprintf(p, sizeof p, "%s/b.safetensors", dir);
    write_shard(p, "y", 2);
    snprintf(index_path, sizeof index_path, "%s/model.safetensors.index.json", dir);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    st_set s;
    char err[LT_ERRLEN] = "";
    lt_status rc;
    const uint8_t *lo = NULL, *hi = NULL;
    if (size && data[0] == '{') {
        fuzz_write(index_path, data, size);
        rc = st_open(&s, index_path, err);
    } else {
        memset(&s, 0, sizeof s);
        rc = st_open_file(&s, fuzz_file(data, size), err);
        if (rc != LT_OK) st_close(&s);
    }
    if (rc != LT_OK) {
        FUZZ_CHECK(err[0] != '\0');
        return 0;
    }
    for (int i = 0; i < s.n_tensors; i++) {
        const st_tensor *t = &s.tensors[i];
        const st_file *f = &s.files[t->file];
        lo = f->map;
        hi = lo + f->size;
        FUZZ_CHECK((const uint8_t *)t->data >= lo && (const uint8_t *)t->data + t->nbytes <= hi);
        FUZZ_CHECK(st_find(&s, t->name) != NULL);
        char sh[128];
        (void)st_shape_str(t, sh, sizeof sh);
        if (t->dtype_ok && (t->dtype == LT_F32 || t->dtype == LT_F16 || t->dtype == LT_BF16)) {
            size_t n = t->nbytes / lt_dtype_size(t->dtype);
            float *dst = malloc(sizeof(float) * (n ? n : 1));
            FUZZ_CHECK(dst != NULL);
            FUZZ_CHECK(st_convert(t, dst, LT_F32) == LT_OK);
            free(dst);
        }
    }
    st_close(&s);
    return 0;
}
