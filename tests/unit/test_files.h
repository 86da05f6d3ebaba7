/* test_files.h — reading files in the C tests and tools, written once.
 *
 * test_read_file(path, &n): the file's bytes, NUL-terminated (so text reads as a string), in
 * malloc'd memory the caller frees; *n (when n is not NULL) its size. NULL when it cannot be
 * opened or read.
 * test_read_npy_f32(path, &count): the data of a float32 little-endian C-order .npy (numpy's
 * format 1.0 or 2.0), malloc'd, and its element count; NULL on anything else.
 * test_srcdir(): the source tree (LATHE_SRCDIR in the environment, else the one configured).
 */
#ifndef LATHE_TEST_FILES_H
#define LATHE_TEST_FILES_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline char *test_read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    long len = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    char *b = len >= 0 && fseek(f, 0, SEEK_SET) == 0 ? malloc((size_t)len + 1) : NULL;
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) b[len] = 0;
    if (n) *n = b ? (size_t)len : 0;
    return b;
}

static inline float *test_read_npy_f32(const char *path, size_t *count) {
    size_t n = 0;
    char *b = test_read_file(path, &n);
    *count = 0;
    if (!b || n < 12 || memcmp(b, "\x93NUMPY", 6)) {
        free(b);
        return NULL;
    }
    size_t hl = b[6] == 1
                    ? (size_t)(unsigned char)b[8] | (size_t)(unsigned char)b[9] << 8
                    : (size_t)(unsigned char)b[8] | (size_t)(unsigned char)b[9] << 8 |
                          (size_t)(unsigned char)b[10] << 16 | (size_t)(unsigned char)b[11] << 24;
    size_t start = b[6] == 1 ? 10 : 12, off = start + hl;
    char *hdr = off <= n ? strndup(b + start, hl) : NULL; /* the header dict, as text */
    int good = hdr && strstr(hdr, "'<f4'") && !strstr(hdr, "'fortran_order': True");
    free(hdr);
    float *f = good ? malloc(n - off + 1) : NULL;
    if (f) {
        memcpy(f, b + off, n - off);
        *count = (n - off) / 4;
    }
    free(b);
    return f;
}

#ifdef LATHE_SRCDIR
static inline const char *test_srcdir(void) {
    const char *s = getenv("LATHE_SRCDIR");
    return s && *s ? s : LATHE_SRCDIR;
}
#endif

#endif
