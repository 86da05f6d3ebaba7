/* backend_cuda.h — what the CUDA backend offers beyond the op table. Engine-private.
 *
 * Only compiled-in when HAVE_CUDA is defined; callers guard their use with #ifdef HAVE_CUDA.
 * The op table itself is lt_backend_cuda (backend_cuda.cu), used through lt_ctx like the CPU
 * one. These extras let the loader pick the precision policy (bf16 or fp16), the planner read
 * device memory, and benches read a per-op time breakdown. This header must not include any
 * CUDA header, so plain C files can use it.
 */
#ifndef LATHE_BACKEND_CUDA_H
#define LATHE_BACKEND_CUDA_H

#include "cuda/backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

extern const lt_backend lt_backend_cuda;

/* Number of usable CUDA devices (0 when there is no GPU or no driver; never an error). */
int lt_cuda_device_count(void);

/* The precision policy for this ctx's device (the dtype of matmul inputs; the rest stays
 * fp32): LT_BF16 on sm_80 and newer, LT_F16 below (the T4). LATHE_PRECISION=fp16|bf16|fp32 in the
 * environment overrides it. */
lt_dtype lt_cuda_policy_dtype(lt_ctx *ctx);
/* Compute capability as 10*major+minor (75, 80, 90), 0 if unknown. */
int lt_cuda_compute_capability(lt_ctx *ctx);
/* How many attention and attention_backward calls on this ctx took the fused kernels
 * (kernels/attention.cu) rather than the chunked cuBLAS path, since it was made: lets tests
 * check which path ran. */
long lt_cuda_flash_calls(lt_ctx *ctx);
/* The dtype attention's matmuls run in (q, k, v, P cast to it; fp32 accumulate). Linear layers
 * always compute in their weight's storage dtype. Set by the loader from the policy. */
lt_status lt_cuda_set_precision(lt_ctx *ctx, lt_dtype dt);
lt_dtype lt_cuda_precision(lt_ctx *ctx);
/* Parses "fp16"/"bf16"/"fp32"/"auto" (auto = policy). -1 on an unknown word. */
int lt_cuda_parse_precision(lt_ctx *ctx, const char *word, lt_dtype *out);

typedef struct lt_cuda_mem {
    size_t in_use;       /* bytes handed out by the backend's allocator now */
    size_t peak;         /* high-water mark of in_use since the last reset */
    const char *peak_op; /* the op that reached it ("" = between ops) */
    size_t reserved;     /* bytes the allocator holds from CUDA (in use + cached) */
    size_t free;         /* cudaMemGetInfo */
    size_t total;
} lt_cuda_mem;
void lt_cuda_memory(lt_ctx *ctx, lt_cuda_mem *m);
void lt_cuda_reset_peak(lt_ctx *ctx);
/* Gives cached (free) blocks back to CUDA, and the page-locked host blocks of the checkpoint
 * stash back to the system (the trainer calls it when %train ends). */
void lt_cuda_trim(lt_ctx *ctx);

/* Device-side dtype conversion of n elements (fp16 results clamped to ±65504). */
lt_status lt_cuda_convert(lt_ctx *ctx, void *dst, lt_dtype dt, const void *src, lt_dtype sdt,
                          int64_t n);

/* Per-op timing with CUDA events: on/off; report writes "op calls ms" lines, biggest first,
 * and clears the totals. Returns the number of bytes written. */
void lt_cuda_profile(lt_ctx *ctx, int on);
int lt_cuda_profile_report(lt_ctx *ctx, char *buf, size_t cap);
/* With LATHE_CUDA_PEAK_BLOCKS=1 in the environment at init: the blocks live at the last peak,
 * grouped by size and by the op that took them, biggest groups first (a measuring aid). */
int lt_cuda_peak_report(lt_ctx *ctx, char *buf, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
