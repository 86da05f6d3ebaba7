/* fuzz_image.c — libFuzzer harness for image files (cuda/formats/image.c): the PNGs and JPEGs a
 * user hands %%chat image= and `lathe logits --image`, decoded by libpng / libjpeg-turbo and then
 * resized and normalized by lathe's own code.
 *
 * The input is the file's bytes, given to img_decode (img_load's work after reading the file).
 * An accepted image must have a positive size and pixels; it is then resized to 7 x 5 (PIL's
 * bilinear arithmetic, shrinking and widening both happen across inputs) and normalized, and
 * every value must lie in [-1, 1]. A refusal must say why. Images are bounded to 2048 x 2048
 * pixels (LATHE_IMAGE_MAX_PIXELS), so that a header declaring the 16384 x 16384 the product
 * allows (1 GB of RGBA under ASan) does not reach libFuzzer's 2 GB limit.
 */
#include "fuzz/fuzz_util.h"

#include <math.h>

#include "cuda/formats/image.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    setenv("LATHE_IMAGE_MAX_PIXELS", "4194304", 1);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    img_rgb im, small;
    char err[LT_ERRLEN] = "";
    if (img_decode(&im, data, size, "fuzz input", err) != LT_OK) {
        FUZZ_CHECK(err[0] != '\0');
        return 0;
    }
    FUZZ_CHECK(im.width > 0 && im.height > 0 && im.rgb != NULL);
    err[0] = '\0';
    if (img_resize(&small, &im, 7, 5, err) == LT_OK) {
        float px[3 * 7 * 5];
        img_pixels(px, &small);
        for (size_t i = 0; i < sizeof px / sizeof px[0]; i++)
            FUZZ_CHECK(isfinite(px[i]) && px[i] >= -1.0f && px[i] <= 1.0f);
        img_free(&small);
    } else {
        FUZZ_CHECK(err[0] != '\0');
    }
    img_free(&im);
    return 0;
}
