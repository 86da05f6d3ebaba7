/* sha256.h — SHA-256 (FIPS 180-4), incremental, for checking downloaded blobs. Engine-private.
 *
 * The Hub names a large (LFS) file by the SHA-256 of its bytes (its ETag, X-Linked-Etag), so a
 * download is checked by hashing the file it wrote. Owns nothing but the state it is given;
 * plain C, no allocation.
 */
#ifndef LATHE_HUB_SHA256_H
#define LATHE_HUB_SHA256_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct hub_sha256 {
    uint32_t h[8];
    uint64_t bytes;        /* message length so far */
    unsigned char buf[64]; /* a block being filled */
    size_t n;              /* bytes in buf */
} hub_sha256;

void hub_sha256_init(hub_sha256 *s);
void hub_sha256_update(hub_sha256 *s, const void *data, size_t n);
/* Writes the digest as 64 lowercase hex digits and a NUL into hex (65 bytes). */
void hub_sha256_hex(hub_sha256 *s, char hex[65]);
/* The digest of a whole file, as hex; 0, or -1 when it cannot be read (errno set). */
int hub_sha256_file(const char *path, char hex[65]);

#ifdef __cplusplus
}
#endif

#endif
