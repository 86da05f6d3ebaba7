/* test_files.h — reading a whole file in the C tests and tools, written once.
 *
 * test_read_file(path, &n): the file's bytes, NUL-terminated (so text reads as a string), in
 * malloc'd memory the caller frees; *n (when n is not NULL) its size. NULL when it cannot be
 * opened or read.
 */
#ifndef LATHE_TEST_FILES_H
#define LATHE_TEST_FILES_H

#include <stdio.h>
#include <stdlib.h>

static char *test_read_file(const char *path, size_t *n) {
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

#endif
