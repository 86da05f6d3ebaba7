/* safetensors_write.h — writing safetensors files (adapters, checkpoints, merged models) into
 * the atomic files of base/atomic_file.h. Engine-private.
 *
 * The layout is the format's: an 8-byte little-endian header length, a JSON header (dtype,
 * shape and data_offsets of each tensor, an optional __metadata__ object) padded with spaces
 * so the data starts 8-byte aligned, then each tensor's bytes in the order given. Reading is
 * safetensors.h's. Knows nothing of models or adapters: it writes what it is handed.
 */
#ifndef LATHE_SAFETENSORS_WRITE_H
#define LATHE_SAFETENSORS_WRITE_H

#include <stdint.h>

#include "cuda/base/atomic_file.h"
#include "cuda/base/tensor.h"

/* The metadata transformers' and PEFT's save_pretrained write. */
#define ST_METADATA_PT "{\"format\":\"pt\"}"

/* A tensor to write. */
typedef struct st_out {
    const char *name;
    lt_dtype dtype; /* of the file: F32, F16, BF16 */
    int ndim;
    int64_t shape[4];
    const void *data; /* host, already in `dtype` */
} st_out;

/* Writes the whole file (header and data) into the open atomic file f. metadata_json: a JSON
 * object for __metadata__, or NULL. */
lt_status st_write_to(lt_afile *f, const st_out *t, int n, const char *metadata_json, char *err);
/* Writes path atomically (temp in the same folder, fsync, rename). */
lt_status st_write(const char *path, const st_out *t, int n, const char *metadata_json, char *err);
/* Adds path to a set of files committed together: written and fsync'd, renamed with the set. */
lt_status st_write_member(lt_afile_set *s, const char *path, const st_out *t, int n,
                          const char *metadata_json, char *err);

#endif
