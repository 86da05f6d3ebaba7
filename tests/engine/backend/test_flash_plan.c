/* test_flash_plan.c — which fused-attention kernels and tiles each GPU architecture takes.
 *
 * The CUDA backend sizes its fused attention tiles from the device's opt-in shared memory a
 * block (cuda/backend/cuda/kernels/flash_plan.h). This test runs that arithmetic for the five
 * architectures lathe targets, with the opt-in sizes of NVIDIA's CUDA C++ Programming Guide
 * (compute capabilities table: 7.5 64 KB, 8.0 163 KB, 8.6 and 8.9 99 KB, 9.0 227 KB), and
 * prints the table. Checked: no architecture falls back to the chunked path at head dim 128 or
 * 256, forward or backward; every chosen kernel's shared memory fits the device; tiles never
 * exceed the rows a block owns; the large devices keep the tiles they always had (one-pass
 * backward on sm_80 and sm_90); and a device below what the smallest tiles need gets none.
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
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++) {
        const arch *a = &archs[i];
        for (int hd = 128; hd <= 256; hd *= 2) {
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
        }
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
    return tap_done();
}
