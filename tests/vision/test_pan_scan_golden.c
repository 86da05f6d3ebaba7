/* test_pan_scan_golden.c — lathe's pan-and-scan against transformers' golden in
 * tests/fixtures/pan_scan/ (made by tests/fixtures/make_pan_scan_fixture.py): per image the
 * number of crops, the crop boxes, and the pixel values of the full image and every crop
 * (Gemma3ImageProcessor(do_pan_and_scan=True), within 1e-5 per value; the largest difference
 * is printed), and Gemma3Processor's expanded text for the fixture's prompt. Without the
 * fixture it fails, saying how to make it. TAP.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/base/strbuf.h"
#include "cuda/formats/pan_scan.h"
#include "cuda/text/chat_image.h"
#include "tests/unit/tap.h"
#include "tests/unit/test_files.h"

/* ok() with a formatted name. */
#define okf(cond, ...)                                                                             \
    do {                                                                                           \
        char okf_name_[256];                                                                       \
        snprintf(okf_name_, sizeof okf_name_, __VA_ARGS__);                                        \
        ok(cond, okf_name_);                                                                       \
    } while (0)

static void test_image(const char *dir, const char *name, json_t *e, int side, int *crops_out) {
    char path[8192], err[LT_ERRLEN], what[256];
    snprintf(path, sizeof path, "%s/%s", dir, json_string_value(json_object_get(e, "file")));
    img_rgb im;
    if (img_load(&im, path, err) != LT_OK) {
        okf(0, "%s decodes", name);
        diag("%s", err);
        return;
    }
    pan_scan_opts o;
    pan_scan_opts_default(&o);
    pan_scan_box b[PAN_SCAN_MAX_CROPS];
    int n = -1;
    okf(pan_scan_boxes(im.width, im.height, &o, b, &n, err) == LT_OK, "%s: boxes", name);
    int want = (int)json_integer_value(json_object_get(e, "num_crops"));
    snprintf(what, sizeof what, "%s: %d crops, as transformers", name, want);
    is_int(n, want, what);
    *crops_out = n;
    json_t *jb = json_object_get(e, "boxes");
    int same = (int)json_array_size(jb) == n;
    for (int i = 0; same && i < n; i++) {
        json_t *v = json_array_get(jb, (size_t)i);
        same = b[i].x == json_integer_value(json_array_get(v, 0)) &&
               b[i].y == json_integer_value(json_array_get(v, 1)) &&
               b[i].w == json_integer_value(json_array_get(v, 2)) &&
               b[i].h == json_integer_value(json_array_get(v, 3));
    }
    okf(same, "%s: the crop boxes", name);
    float *px = NULL;
    int nc = 0;
    okf(pan_scan_pixels(&im, side, &o, &px, &nc, err) == LT_OK, "%s: pixel values", name);
    snprintf(path, sizeof path, "%s/%s", dir,
             json_string_value(json_object_get(e, "pixel_values")));
    size_t count = 0;
    float *ref = test_read_npy_f32(path, &count);
    size_t mine = (size_t)(1 + nc) * 3 * (size_t)side * (size_t)side;
    okf(ref && count == mine, "%s: the golden holds [1 + %d, 3, %d, %d] floats", name, nc, side,
        side);
    double worst = 0;
    for (size_t i = 0; ref && px && count == mine && i < count; i++)
        if (fabs((double)ref[i] - px[i]) > worst) worst = fabs((double)ref[i] - px[i]);
    diag("%s: pixel values: largest difference %.3g", name, worst);
    okf(ref && px && count == mine && worst <= 1e-5, "%s: pixel values within 1e-5", name);
    free(ref);
    free(px);
    img_free(&im);
}

int main(void) {
    char dir[4096], path[4200];
    snprintf(dir, sizeof dir, "%s/tests/fixtures/pan_scan", test_srcdir());
    snprintf(path, sizeof path, "%s/reference.json", dir);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) {
        ok(0, "tests/fixtures/pan_scan/reference.json exists");
        diag("no pan-and-scan golden: on a machine with transformers 5.x, numpy and PIL run "
             "`python3 tests/fixtures/make_pan_scan_fixture.py --out tests/fixtures/pan_scan` "
             "(CPU, seconds) and commit that folder (%s)",
             je.text);
        return tap_done();
    }
    int side = (int)json_integer_value(json_object_get(root, "size"));
    int mm = (int)json_integer_value(json_object_get(root, "mm_tokens_per_image"));
    json_t *images = json_object_get(root, "images");
    json_t *pimgs = json_object_get(root, "prompt_images");
    int crops[16] = {0};
    const char *name;
    json_t *e;
    json_object_foreach(images, name, e) {
        int c = 0;
        test_image(dir, name, e, side, &c);
        for (size_t i = 0; i < json_array_size(pimgs) && i < 16; i++)
            if (!strcmp(json_string_value(json_array_get(pimgs, i)), name)) crops[i] = c;
    }
    /* the processor's text: the crop text, then every marker as its full_image_sequence */
    const char *prompt = json_string_value(json_object_get(root, "prompt"));
    const char *want = json_string_value(json_object_get(root, "expanded_text"));
    char *pas = NULL, err[LT_ERRLEN];
    int ni = (int)json_array_size(pimgs);
    ok(prompt && want && ni <= 16 &&
           chat_image_pan_scan_text(prompt, crops, ni, &pas, err) == LT_OK,
       "the prompt's crop text");
    lt_strbuf t = {0};
    for (const char *p = pas; p && *p;) {
        const char *m = strstr(p, CHAT_IMAGE_MARKER);
        if (!m) {
            lt_strbuf_puts(&t, p);
            break;
        }
        lt_strbuf_put(&t, p, (size_t)(m - p));
        lt_strbuf_puts(&t, "\n\n" CHAT_IMAGE_MARKER);
        for (int j = 0; j < mm; j++)
            lt_strbuf_puts(&t, "<image_soft_token>");
        lt_strbuf_puts(&t, "<end_of_image>\n\n");
        p = m + strlen(CHAT_IMAGE_MARKER);
    }
    ok(want && pas && !strcmp(lt_strbuf_str(&t), want),
       "the expanded text is Gemma3Processor's, character for character");
    lt_strbuf_free(&t);
    free(pas);
    json_decref(root);
    return tap_done();
}
