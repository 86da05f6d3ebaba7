/* test_flash_plan.c — which fused-attention kernels and tiles each GPU architecture takes.
 *
 * The CUDA backend sizes its fused attention tiles from the device's opt-in shared memory a
 * block (cuda/backend/cuda/kernels/flash_plan.h). This test runs that arithmetic for the five
 * architectures lathe targets, with the opt-in sizes of NVIDIA's CUDA C++ Programming Guide
 * (compute capabilities table: 7.5 64 KB, 8.0 163 KB, 8.6 and 8.9 99 KB, 9.0 227 KB), and
 * prints the table. Checked: no architecture falls back to the chunked path at head dim 72
 * (SigLIP's: Gemma 3's image tower), 128 or 256, forward or backward; every chosen kernel's
 * shared memory fits the device; tiles never exceed the rows a block owns and are ones
 * attention.cu instantiates; hd 72's tiles are 80 values wide (the next multiple of 16) plus the
 * pad, so its one-pass backward fits even a T4; the large devices keep the tiles they always had
 * (one-pass backward on sm_80 and sm_90); and a device below what the smallest tiles need gets
 * none.
 * The kernels themselves are compared with the CPU on a GPU (tests/gpu/test_ops, also with
 * LATHE_CUDA_SMEM_OPTIN=65536 to run a T4's tiles on a larger card).
 */
#include <stdio.h>

#include "cuda/backend/cuda/kernels/flash_plan.h"
#include "tests/unit/tap.h"

typedef struct arch {
    const char *name;
    size_t optin;
} arch;

static const arch archs[] = {
    {"sm_75 (T4)", 64 * 1024},          {"sm_80 (A100)", 163 * 1024},
    {"sm_86 (A10, RTX 30)", 99 * 1024}, {"sm_89 (L4, RTX 40)", 99 * 1024},
    {"sm_90 (H100, H200)", 227 * 1024},
};

static void describe(const arch *a, int hd, const flash_plan *p) {
    printf("# %-20s hd %3d: forward 64 x %2d keys (%6zu B); backward ", a->name, hd, p->fwd_bn,
           flash_fwd_smem(hd, FLASH_ROWS, p->fwd_bn));
    if (p->bwd_fused)
        printf("one pass (%zu B)\n", flash_bwd_smem(hd));
    else
        printf("split: dq %d x %d (%zu B), dk/dv %d x %d (%zu B)%s\n", p->dq_rows, p->dq_bn,
               flash_dq_smem(hd, p->dq_rows, p->dq_bn), p->dkv_rows, p->dkv_bq,
               flash_dkv_smem(hd, p->dkv_rows, p->dkv_bq, 1),
               p->dkv_together ? " together" : ", one launch each");
}

int main(void) {
    char name[160];
    static const int hds[3] = {72, 128, 256};
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++) {
        const arch *a = &archs[i];
        for (int h = 0; h < 3; h++) {
            const int hd = hds[h];
            flash_plan p;
            int made = flash_plan_make(hd, a->optin, &p);
            describe(a, hd, &p);
            snprintf(name, sizeof name, "%s hd %d: fused forward and backward, no fallback",
                     a->name, hd);
            ok(made && flash_plan_fits(&p, 0) && flash_plan_fits(&p, 1), name);
            snprintf(name, sizeof name, "%s hd %d: every chosen kernel fits its shared memory",
                     a->name, hd);
            int fits = flash_fwd_smem(hd, FLASH_ROWS, p.fwd_bn) <= a->optin &&
                       (!p.bwd_fused || flash_bwd_smem(hd) <= a->optin) &&
                       (!p.dq_rows || flash_dq_smem(hd, p.dq_rows, p.dq_bn) <= a->optin) &&
                       (!p.dkv_rows || flash_dkv_smem(hd, p.dkv_rows, p.dkv_bq, 1) <= a->optin);
            ok(fits, name);
            snprintf(name, sizeof name, "%s hd %d: tiles within the rows a block owns", a->name,
                     hd);
            ok(p.dq_bn <= p.dq_rows && p.dkv_bq <= p.dkv_rows && p.fwd_bn <= FLASH_ROWS &&
                   (p.dq_rows == 64 || p.dq_rows == 32) && (p.dkv_rows == 64 || p.dkv_rows == 32),
               name);
            snprintf(name, sizeof name, "%s hd %d: only tiles attention.cu instantiates", a->name,
                     hd);
            ok(flash_fwd_built(hd, p.fwd_bn) && flash_split_built(hd, p.dq_rows, p.dq_bn) &&
                   flash_split_built(hd, p.dkv_rows, p.dkv_bq) && p.dkv_together == (hd <= 128),
               name);
        }
    }
    /* hd 72: rows of 80 values (72 and eight zeros, the k step of 16) and the 8-value pad */
    ok(FLASH_WIDTH(72) == 80 && FLASH_WIDTH(128) == 128 && FLASH_WIDTH(256) == 256 &&
           flash_row_bytes(72) == 176 && flash_row_bytes(128) == 272,
       "tile rows: hd 72 is 80 values wide plus the pad (176 bytes), 128 and 256 as they are");
    ok(flash_fwd_smem(72, 64, 64) == 192 * 176 + 130 * 4 && flash_bwd_smem(72) == 64520,
       "hd 72: forward 34,312 B, one-pass backward 64,520 B");
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++) {
        flash_plan p;
        flash_plan_make(72, archs[i].optin, &p);
        snprintf(name, sizeof name,
                 "%s hd 72: 64-key forward, one-pass backward, split tiles 64 x 64 as well",
                 archs[i].name);
        ok(p.fwd_bn == 64 && p.bwd_fused && p.dq_rows == 64 && p.dq_bn == 64 && p.dkv_rows == 64 &&
               p.dkv_bq == 64,
           name);
    }
    { /* between the one-pass backward's 64,520 B and the split kernels' 45 KiB at hd 72 */
        flash_plan p;
        flash_plan_make(72, 56 * 1024, &p);
        ok(p.fwd_bn == 64 && !p.bwd_fused && p.dq_rows == 64 && p.dq_bn == 64 && p.dkv_rows == 64 &&
               p.dkv_bq == 64 && flash_plan_fits(&p, 1),
           "56 KiB hd 72: the split backward at 64 x 64 (the one-pass kernel does not fit)");
        flash_plan_make(72, 40 * 1024, &p);
        ok(p.fwd_bn == 64 && !p.bwd_fused && p.dq_bn == 32 && p.dkv_bq == 32 &&
               flash_plan_fits(&p, 1),
           "40 KiB hd 72: the split backward at 32-row tiles");
    }
    flash_plan p;
    /* the T4: hd 256 needs the small tiles; hd 128 the split backward at 32-row tiles */
    flash_plan_make(256, 64 * 1024, &p);
    ok(p.fwd_bn == 16 && !p.bwd_fused && p.dq_rows == 32 && p.dq_bn == 16 && p.dkv_rows == 32 &&
           p.dkv_bq == 16 && !p.dkv_together,
       "T4 hd 256: forward 16-key tiles, split backward on 32-row blocks with 16-row tiles");
    flash_plan_make(128, 64 * 1024, &p);
    ok(p.fwd_bn == 64 && !p.bwd_fused && p.dq_rows == 64 && p.dq_bn == 32 && p.dkv_rows == 64 &&
           p.dkv_bq == 32 && p.dkv_together,
       "T4 hd 128: forward 64-key tiles, split backward with 32-row tiles, dK and dV together");
    /* 99 KiB devices: hd 256's forward at 32 keys (64 needs 99.5 KiB) */
    flash_plan_make(256, 99 * 1024, &p);
    ok(p.fwd_bn == 32 && !p.bwd_fused && p.dq_rows == 64 && p.dq_bn == 16,
       "sm_86 / sm_89 hd 256: forward 32-key tiles, split backward 64 x 16");
    flash_plan_make(128, 99 * 1024, &p);
    ok(p.fwd_bn == 64 && p.bwd_fused, "sm_86 / sm_89 hd 128: the one-pass backward fits");
    /* the large devices: the tiles they had before the plan (64 keys; one-pass backward) */
    for (int hd = 128; hd <= 256; hd *= 2) {
        flash_plan_make(hd, 163 * 1024, &p);
        snprintf(name, sizeof name, "sm_80 hd %d: 64-key forward, one-pass backward", hd);
        ok(p.fwd_bn == 64 && p.bwd_fused, name);
        flash_plan_make(hd, 227 * 1024, &p);
        snprintf(name, sizeof name, "sm_90 hd %d: 64-key forward, one-pass backward", hd);
        ok(p.fwd_bn == 64 && p.bwd_fused, name);
    }
    /* hd 256's split backward keeps 32-row tiles at most even where 64 would fit */
    flash_plan_make(256, 227 * 1024, &p);
    ok(p.dq_bn == 32 && p.dkv_bq == 32, "hd 256 split tiles stay at 32 rows on a large device");
    /* too small for anything, and head dims the kernels are not built for */
    ok(flash_plan_make(256, 40 * 1024, &p) && !flash_plan_fits(&p, 0) && !flash_plan_fits(&p, 1),
       "40 KiB: no fused kernel fits (the chunked path)");
    ok(!flash_plan_make(64, 227 * 1024, &p) && !flash_plan_fits(&p, 0),
       "hd 64: not a head dim the fused kernels are built for");
    ok(!flash_plan_make(192, 227 * 1024, &p), "hd 192: refused");
    ok(!flash_plan_make(80, 227 * 1024, &p), "hd 80 (hd 72's tile width): refused");
    /* up to hd 128 the launchers build only the 64-key forward: a device without room for it
     * gets no plan that would launch a smaller tile */
    ok(flash_plan_make(128, 48 * 1024, &p) && !p.fwd_bn && !flash_plan_fits(&p, 0),
       "48 KiB hd 128: no forward tile smaller than the 64 keys built");
    return tap_done();
}
