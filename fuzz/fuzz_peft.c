/* fuzz_peft.c — libFuzzer harness for PEFT adapter configs (cuda/train/peft_adapter.c): the
 * adapter_config.json of `%lora load=DIR` and of a resumed `%train resume=`, downloaded or
 * written by another tool.
 *
 * At start it loads the bundled tiny model (fp32, CPU backend) and saves a real adapter of it
 * (r=8, the default targets) into a scratch folder; each input replaces that folder's
 * adapter_config.json, and peft_load_adapter reads the folder as %lora load= does. An input
 * that keeps r=8 and those targets reaches the tensor loading; any other is checked against
 * the model (lora_attach) and refused when the tensors do not match. Accepted adapters are
 * freed again; the model is never changed.
 */
#include "fuzz/fuzz_util.h"

#include "cuda/backend/backend.h"
#include "cuda/model/model.h"
#include "cuda/train/train.h"

static gemma3_model *model;
static lt_ctx ctx;
static char dir[512], config_path[600];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    char err[LT_ERRLEN];
    if (gemma3_load_dir(&model, LATHE_SRCDIR "/models/tiny", "fp32", NULL, err) != LT_OK ||
        lt_ctx_init(&ctx, &lt_backend_cpu, 1) != LT_OK) {
        fprintf(stderr, "fuzz_peft: %s\n", err);
        abort();
    }
    snprintf(dir, sizeof dir, "%s/adapter", fuzz_dir());
    lora_opts o = {.r = 8, .alpha = 16};
    lt_adapters *a = NULL;
    if (lora_attach(&a, model, &ctx, &o, err) != LT_OK || peft_save_adapter(a, dir, err) != LT_OK) {
        fprintf(stderr, "fuzz_peft: %s\n", err);
        abort();
    }
    lora_free(a);
    snprintf(config_path, sizeof config_path, "%s/adapter_config.json", dir);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_write(config_path, data, size);
    lt_adapters *a = NULL;
    char err[LT_ERRLEN] = "";
    if (peft_load_adapter(&a, model, &ctx, dir, err) != LT_OK) {
        FUZZ_CHECK(a == NULL && err[0] != '\0');
        return 0;
    }
    FUZZ_CHECK(a != NULL && a->n_slots > 0);
    lora_free(a);
    return 0;
}
