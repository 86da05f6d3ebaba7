/* flash_plan.h — which fused-attention kernel and tiles a device takes, from its shared memory.
 *
 * The fused kernels (attention.cu) keep 16-bit tiles of Q, K, V (and dO) in shared memory, rows
 * FLASH_WIDTH(hd) values wide (the head dim rounded up to the products' k step of 16; the extra
 * columns hold zeros) and padded by 8 more. Head dims built: 72 (SigLIP's, Gemma 3's image
 * tower: tiles 80 wide), 128 and 256. How much a block may take differs by architecture
 * (opt-in shared memory per block: sm_75 (T4) 64 KiB, sm_86 / sm_89 99 KiB, sm_80 163 KiB,
 * sm_90 227 KiB), so the tile sizes are chosen here, largest first, from that one number: the
 * forward's key tile BN, the one-pass backward where it fits, else the split backward's
 * query-side (rows, BN) and key-side (rows, BQ) tiles, always among the instantiations
 * attention.cu builds. A head dim of 256 on a T4 takes 32-row blocks with 16-row tiles; nothing
 * that fits any of the five architectures falls back to the chunked path. Pure arithmetic in C,
 * shared by the launchers and by a CPU unit test that prints the table for each architecture.
 * Owns nothing else: the kernels themselves live in attention.cu.
 */
#ifndef LATHE_FLASH_PLAN_H
#define LATHE_FLASH_PLAN_H

#include <stddef.h>

#define FLASH_PAD 8    /* 16-bit values a tile row is padded by (bank-conflict-free ldmatrix) */
#define FLASH_ROWS 64  /* rows (queries, or keys) a block of the forward owns */
#define FLASH_FB_BQ 64 /* the one-pass backward's query tile */
/* Values a tile row holds (before the pad): hd rounded up to 16, the k step of mma.sync
 * m16n8k16. A macro, so that attention.cu's templates take it as a constant. */
#define FLASH_WIDTH(hd) (((hd) + 15) / 16 * 16)

typedef struct flash_plan {
    int fwd_bn;       /* forward key tile (64, 32, 16); 0: the forward does not fit */
    int bwd_fused;    /* 1: the one-pass backward (flash_bwd_kernel) */
    int dq_rows;      /* split backward, query side: rows a block owns (64 or 32); 0: no fit */
    int dq_bn;        /* its key tile */
    int dkv_rows;     /* split backward, key side: keys a block owns (64 or 32); 0: no fit */
    int dkv_bq;       /* its query tile */
    int dkv_together; /* dK and dV in one launch (hd <= 128: both accumulators fit registers) */
} flash_plan;

/* Bytes a tile row takes. */
static inline size_t flash_row_bytes(int hd) {
    return (size_t)(FLASH_WIDTH(hd) + FLASH_PAD) * 2;
}

/* Bytes of dynamic shared memory of each kernel (attention.cu lays its tiles out this way). */
static inline size_t flash_fwd_smem(int hd, int rows, int bn) {
    return (size_t)(rows + 2 * bn) * flash_row_bytes(hd) + (size_t)(rows + bn + 2) * 4;
}
static inline size_t flash_bwd_smem(int hd) { /* the one-pass backward's 64 keys, 64 queries */
    return (size_t)(2 * FLASH_ROWS + 2 * FLASH_FB_BQ) * flash_row_bytes(hd) +
           (size_t)2 * FLASH_ROWS * (FLASH_FB_BQ + FLASH_PAD) * 2 +
           (size_t)(3 * FLASH_FB_BQ + FLASH_ROWS + 2) * 4;
}
static inline size_t flash_dq_smem(int hd, int rows, int bn) {
    return (size_t)(2 * rows + 2 * bn) * flash_row_bytes(hd) + (size_t)(rows + bn + 2) * 4;
}
static inline size_t flash_dkv_smem(int hd, int rows, int bq, int dk) {
    return (size_t)(rows + (dk ? rows : 0) + 2 * bq) * flash_row_bytes(hd) +
           (size_t)(3 * bq + rows + 2) * 4;
}

/* Whether attention.cu builds the fused kernels for head dim hd. */
static inline int flash_hd_built(int hd) {
    return hd == 72 || hd == 128 || hd == 256;
}

/* The tiles attention.cu instantiates (a plan names no other): up to hd 128, the forward's 64-key
 * tile and split blocks of 64 rows with 64- or 32-row tiles; at hd 256 forward tiles of 64, 32
 * or 16 keys and split blocks of 64 rows with 32- or 16-row tiles (register pressure of the
 * accumulators) or of 32 rows with 16. */
static inline int flash_fwd_built(int hd, int bn) {
    return hd <= 128 ? bn == 64 : (bn == 64 || bn == 32 || bn == 16);
}
static inline int flash_split_built(int hd, int rows, int tile) {
    if (hd <= 128) return rows == 64 && (tile == 64 || tile == 32);
    return (rows == 64 && (tile == 32 || tile == 16)) || (rows == 32 && tile == 16);
}

/* The plan for head dim hd on a device with smem_optin bytes a block; 0 when hd is not one the
 * kernels are built for. Tiles never exceed the rows a block owns, so every thread count the
 * kernels assume holds. */
static inline int flash_plan_make(int hd, size_t smem_optin, flash_plan *p) {
    static const int tiles[3] = {64, 32, 16};
    flash_plan z = {0, 0, 0, 0, 0, 0, 0};
    *p = z;
    if (!flash_hd_built(hd)) return 0;
    for (int i = 0; i < 3 && !p->fwd_bn; i++)
        if (flash_fwd_built(hd, tiles[i]) && flash_fwd_smem(hd, FLASH_ROWS, tiles[i]) <= smem_optin)
            p->fwd_bn = tiles[i];
    p->bwd_fused = flash_bwd_smem(hd) <= smem_optin;
    p->dkv_together = hd <= 128;
    for (int rows = FLASH_ROWS; rows >= 32 && !p->dq_rows; rows /= 2)
        for (int i = 0; i < 3 && !p->dq_rows; i++)
            if (flash_split_built(hd, rows, tiles[i]) &&
                flash_dq_smem(hd, rows, tiles[i]) <= smem_optin) {
                p->dq_rows = rows;
                p->dq_bn = tiles[i];
            }
    /* the key side sized for its dK launch (K and V tiles), the larger of its two */
    for (int rows = FLASH_ROWS; rows >= 32 && !p->dkv_rows; rows /= 2)
        for (int i = 0; i < 3 && !p->dkv_rows; i++)
            if (flash_split_built(hd, rows, tiles[i]) &&
                flash_dkv_smem(hd, rows, tiles[i], 1) <= smem_optin) {
                p->dkv_rows = rows;
                p->dkv_bq = tiles[i];
            }
    return 1;
}

/* Whether the fused forward (and, for backward, a fused backward) fits. */
static inline int flash_plan_fits(const flash_plan *p, int backward) {
    if (!p->fwd_bn) return 0;
    return !backward || p->bwd_fused || (p->dq_rows && p->dkv_rows);
}

#endif
