/* test_pan_scan.c — formats/pan_scan.c and chat_image_pan_scan_text without a golden: boxes
 * worked out by hand from transformers' Gemma3ImageProcessor.pan_and_scan arithmetic (a wide
 * image, a tall one cut unevenly, a square one and one just under the ratio left whole, the
 * ratio exactly at 1.2 activating, max crops respected, crops too small refused), crops tiling
 * the image without overlap over many sizes, a 1 x 5000 image handled, bad options refused,
 * pixels of a crop equal to resizing the cropped image, and Gemma3Processor's crop text. TAP.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/formats/pan_scan.h"
#include "cuda/text/chat_image.h"
#include "tests/unit/tap.h"

static int boxes_of(int w, int h, pan_scan_box *b) {
    pan_scan_opts o;
    pan_scan_opts_default(&o);
    char err[LT_ERRLEN];
    int n = -1;
    if (pan_scan_boxes(w, h, &o, b, &n, err) != LT_OK) {
        diag("%d x %d: %s", w, h, err);
        return -1;
    }
    return n;
}

static void test_by_hand(void) {
    pan_scan_box b[PAN_SCAN_MAX_CROPS];
    /* 1200 x 400: ratio 3 -> 3 crops of 400 x 400 */
    is_int(boxes_of(1200, 400, b), 3, "1200 x 400: 3 crops");
    ok(b[0].x == 0 && b[1].x == 400 && b[2].x == 800 && b[2].w == 400 && b[2].h == 400,
       "1200 x 400: 400 x 400 crops at x 0, 400, 800");
    /* 450 x 1361: ratio 3.02 -> 3 crops, ceil(1361 / 3) = 454 high, the last cut to 453 */
    is_int(boxes_of(450, 1361, b), 3, "450 x 1361: 3 crops");
    ok(b[0].h == 454 && b[1].y == 454 && b[2].y == 908 && b[2].h == 453 && b[2].w == 450,
       "450 x 1361: 454 high, the last one cut at the edge (453)");
    is_int(boxes_of(600, 600, b), 0, "a square image is not cut");
    is_int(boxes_of(599, 500, b), 0, "599 x 500 (ratio 1.198) is not cut");
    is_int(boxes_of(600, 500, b), 2, "600 x 500 (ratio exactly 1.2) is cut, as `< 1.2` is false");
    is_int(boxes_of(2000, 300, b), 4, "2000 x 300: 7 by the ratio, capped at max crops 4");
    ok(b[3].x == 1500 && b[3].w == 500, "2000 x 300: 500 wide crops");
    is_int(boxes_of(400, 300, b), 0, "400 x 300: crops of 200 < 256 pixels: none");
    is_int(boxes_of(1, 5000, b), 0, "1 x 5000: crops 1 pixel wide: none, no crash");
    is_int(boxes_of(5000, 1, b), 0, "5000 x 1: none");
}

static void test_tiling(void) {
    pan_scan_opts o;
    pan_scan_opts_default(&o);
    int bad = 0, cut = 0, too_many = 0;
    char err[LT_ERRLEN];
    for (int w = 200; w <= 2600; w += 37)
        for (int h = 200; h <= 2600; h += 41) {
            pan_scan_box b[PAN_SCAN_MAX_CROPS];
            int n = 0;
            if (pan_scan_boxes(w, h, &o, b, &n, err) != LT_OK) {
                bad++;
                continue;
            }
            if (n > o.max_crops) too_many++;
            if (!n) continue;
            cut++;
            int64_t area = 0;
            for (int i = 0; i < n; i++) {
                area += (int64_t)b[i].w * b[i].h;
                if (b[i].x < 0 || b[i].y < 0 || b[i].x + b[i].w > w || b[i].y + b[i].h > h ||
                    b[i].w < 1 || b[i].h < 1)
                    bad++;
                for (int j = 0; j < i; j++) /* no overlap */
                    if (b[i].x < b[j].x + b[j].w && b[j].x < b[i].x + b[i].w &&
                        b[i].y < b[j].y + b[j].h && b[j].y < b[i].y + b[i].h)
                        bad++;
            }
            if (area != (int64_t)w * h) bad++; /* disjoint + inside + same area = a tiling */
        }
    is_int(bad, 0, "every cut image is tiled by its crops, without overlap");
    ok(cut > 100, "many sizes were cut");
    is_int(too_many, 0, "never more than max crops");
}

static void test_bad(void) {
    pan_scan_opts o;
    pan_scan_box b[PAN_SCAN_MAX_CROPS];
    char err[LT_ERRLEN];
    int n;
    pan_scan_opts_default(&o);
    o.min_crop_size = 0;
    ok(pan_scan_boxes(1200, 400, &o, b, &n, err) == LT_ERR_ARG && strstr(err, "min_crop_size"),
       "min_crop_size 0 refused, naming it");
    pan_scan_opts_default(&o);
    o.max_crops = 65;
    ok(pan_scan_boxes(1200, 400, &o, b, &n, err) == LT_ERR_ARG && strstr(err, "max_crops"),
       "max_crops 65 refused");
    pan_scan_opts_default(&o);
    o.min_ratio = 0;
    ok(pan_scan_boxes(1200, 400, &o, b, &n, err) == LT_ERR_ARG, "min_ratio 0 refused");
    pan_scan_opts_default(&o);
    ok(pan_scan_boxes(0, 400, &o, b, &n, err) == LT_ERR_ARG, "an empty image refused");
    o.min_crop_size = 1;
    ok(pan_scan_boxes(5, 1, &o, b, &n, err) == LT_ERR_ARG && strstr(err, "empty"),
       "5 x 1 with min crop 1: the last crop would be empty: refused");
}

static void test_pixels(void) {
    img_rgb im = {600, 250, malloc(600 * 250 * 3)};
    for (int i = 0; i < 600 * 250 * 3; i++)
        im.rgb[i] = (uint8_t)((i * 7) ^ (i >> 5));
    pan_scan_opts o;
    pan_scan_opts_default(&o);
    o.min_crop_size = 100;
    float *px = NULL;
    int n = 0;
    char err[LT_ERRLEN];
    ok(pan_scan_pixels(&im, 16, &o, &px, &n, err) == LT_OK, "pan_scan_pixels");
    is_int(n, 2, "600 x 250 (ratio 2.4) with min crop 100: 2 crops");
    img_rgb crop, rs;
    pan_scan_box b = {300, 0, 300, 250};
    float want[3 * 16 * 16];
    int same =
        img_crop(&crop, &im, b, err) == LT_OK && img_resize(&rs, &crop, 16, 16, err) == LT_OK;
    if (same) {
        img_pixels(want, &rs);
        same = px && !memcmp(want, px + 2 * 3 * 16 * 16, sizeof want);
        img_free(&rs);
    }
    img_free(&crop);
    ok(same, "the second crop's pixels are the cropped image resized");
    free(px);
    ok(pan_scan_pixels(&im, 16, NULL, &px, &n, err) == LT_OK && n == 0, "no options: no crops");
    free(px);
    img_free(&im);
}

static void test_text(void) {
    char *out = NULL, err[LT_ERRLEN];
    int crops[3] = {3, 0, 2};
    ok(chat_image_pan_scan_text("A <start_of_image>B <start_of_image> C<start_of_image>!", crops, 3,
                                &out, err) == LT_OK,
       "pan-and-scan text");
    is_str(out,
           "A Here is the original image <start_of_image> and here are some crops to help you see "
           "better <start_of_image> <start_of_image> <start_of_image>B <start_of_image> C"
           "Here is the original image <start_of_image> and here are some crops to help you see "
           "better <start_of_image> <start_of_image>!",
           "Gemma3Processor's text for 3, 0 and 2 crops");
    free(out);
    ok(chat_image_pan_scan_text("no marker", crops, 1, &out, err) == LT_ERR_ARG && !out,
       "a marker count that differs from the images is refused");
}

int main(void) {
    test_by_hand();
    test_tiling();
    test_bad();
    test_pixels();
    test_text();
    return tap_done();
}
