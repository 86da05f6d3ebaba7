/* safetensors.h — reading safetensors checkpoints (single file or sharded). Engine-private.
 *
 * Files are memory-mapped (private, copy-on-write: writing a tensor's bytes never touches the
 * file). Every header is validated before any tensor is used: header length (<= 100 MB and
 * inside the file), JSON, each entry's dtype/shape/data_offsets, offsets inside the data
 * area, byte size == numel * dtype size, no two tensors overlapping. Errors name the file and
 * the tensor. Writing safetensors (adapters, merged checkpoints) belongs elsewhere.
 */
#ifndef LATHE_SAFETENSORS_H
#define LATHE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "cuda/base/tensor.h"

#define ST_MAX_HEADER (100u * 1000u * 1000u)

typedef struct st_tensor {
    char *name;
    char dtype_name[12]; /* as written: "BF16", "F32", "U8", ... */
    int dtype_ok;        /* 1 when dtype is F32/F16/BF16/I32/U8/I8 (lt_dtype in .dtype) */
    lt_dtype dtype;
    int ndim;
    int64_t shape[8];
    const void *data; /* inside the mapping */
    size_t nbytes;
    int file; /* index into st_set.files */
} st_tensor;

typedef struct st_file {
    char *path;
    void *map;
    size_t size;
} st_file;

typedef struct st_set {
    st_file *files;
    int n_files;
    st_tensor *tensors;
    int n_tensors;
} st_set;

/* Opens `path`: a .safetensors file, a model.safetensors.index.json, or a directory holding
 * either (index first). On failure nothing stays open. err: LT_ERRLEN bytes. */
lt_status st_open(st_set *s, const char *path, char *err);
/* Opens one file and appends its tensors (used by st_open). */
lt_status st_open_file(st_set *s, const char *file, char *err);
const st_tensor *st_find(const st_set *s, const char *name);
/* Gives the pages of [p, p + n) back to the system when that range lies inside one of the
 * set's mapped files (only whole pages inside the range: a neighbour's bytes are never
 * touched). The mapping stays and the file gives the bytes back if they are read again; bytes
 * written into the private mapping there are lost. 1 when the range was mapped, else 0 (and
 * nothing is done). For loaders that have copied a tensor elsewhere. */
int st_release_pages(const st_set *s, const void *p, size_t n);
void st_close(st_set *s);
/* The tensor's elements converted to dt into dst (numel elements), through an aligned scratch
 * copy when the tensor is not aligned to its element size in the file. t must be F32, F16 or
 * BF16, and so must dt. LT_OK, or LT_ERR_MEMORY (no message: the caller names the tensor). */
lt_status st_convert(const st_tensor *t, void *dst, lt_dtype dt);
/* Shape as "[a, b]" (for messages). */
const char *st_shape_str(const st_tensor *t, char *buf, size_t cap);

#endif
