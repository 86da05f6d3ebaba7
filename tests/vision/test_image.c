/* test_image.c — formats/image.c: PNG decoding against known pixels (committed files written by
 * make_image_fixtures.py with zlib alone: RGB, RGBA composited onto white as PIL's
 * alpha_composite does, grey), JPEG through a libjpeg round trip (encoded here, decoded within
 * a tolerance), PIL's bilinear resize on values worked out by hand from Pillow's Resample.c,
 * the processor's pixel values, and the refusal of empty, truncated, corrupt and non-image
 * input with a message. TAP.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <sys/resource.h>

#include "cuda/formats/image.h"
#include "tests/unit/tap.h"
#include "tests/unit/test_files.h"

static unsigned char *read_all(const char *path, size_t *n) {
    return (unsigned char *)test_read_file(path, n);
}

static void fixture(char *path, size_t cap, const char *name) {
    snprintf(path, cap, "%s/tests/vision/data/%s", test_srcdir(), name);
}

static void test_png(void) {
    char path[4096], err[LT_ERRLEN];
    img_rgb im;
    fixture(path, sizeof path, "rgb.png");
    ok(img_load(&im, path, err) == LT_OK, "rgb.png decodes");
    is_int(im.width, 7, "rgb.png is 7 wide");
    is_int(im.height, 5, "rgb.png is 5 high");
    int bad = 0;
    for (int y = 0; y < 5 && im.rgb; y++)
        for (int x = 0; x < 7; x++) {
            const uint8_t *p = im.rgb + (y * 7 + x) * 3;
            bad += p[0] != 30 * x || p[1] != 40 * y + 10 || p[2] != (11 * x * y) % 256;
        }
    is_int(bad, 0, "rgb.png: every pixel as written");
    img_free(&im);

    fixture(path, sizeof path, "rgba.png");
    ok(img_load(&im, path, err) == LT_OK, "rgba.png decodes");
    static const int alpha[4] = {0, 90, 180, 255};
    double worst = 0;
    for (int y = 0; y < 3 && im.rgb; y++)
        for (int x = 0; x < 4; x++) {
            int src[3] = {60 * x, 200, 80 * y}, a = alpha[x];
            for (int c = 0; c < 3; c++) {
                /* over white: c*a/255 + 255*(1 - a/255), PIL rounds its fixed point */
                double want = (src[c] * a + 255.0 * (255 - a)) / 255.0;
                double d = fabs(im.rgb[(y * 4 + x) * 3 + c] - want);
                if (d > worst) worst = d;
            }
        }
    ok(im.rgb && worst < 1.0, "rgba.png: alpha composited onto white (within 1 of exact)");
    ok(im.rgb && im.rgb[0] == 255 && im.rgb[1] == 255 && im.rgb[2] == 255,
       "rgba.png: a transparent pixel is white");
    ok(im.rgb && im.rgb[3 * 3 + 0] == 180 && im.rgb[3 * 3 + 2] == 0,
       "rgba.png: an opaque pixel is unchanged");
    img_free(&im);

    fixture(path, sizeof path, "grey.png");
    ok(img_load(&im, path, err) == LT_OK, "grey.png decodes");
    bad = 0;
    for (int y = 0; y < 4 && im.rgb; y++)
        for (int x = 0; x < 5; x++)
            for (int c = 0; c < 3; c++)
                bad += im.rgb[(y * 5 + x) * 3 + c] != 50 * x + y;
    is_int(bad, 0, "grey.png: grey expanded to three equal channels");
    img_free(&im);
}

/* A W x H RGB JPEG of a smooth gradient, encoded by libjpeg into *out (malloc'd); progressive
 * (SOF2) when asked, baseline otherwise. */
static size_t encode_jpeg(unsigned char **out, int W, int H, int quality, int progressive) {
    struct jpeg_compress_struct ci;
    struct jpeg_error_mgr je;
    ci.err = jpeg_std_error(&je);
    jpeg_create_compress(&ci);
    unsigned long n = 0;
    *out = NULL;
    jpeg_mem_dest(&ci, out, &n);
    ci.image_width = (JDIMENSION)W;
    ci.image_height = (JDIMENSION)H;
    ci.input_components = 3;
    ci.in_color_space = JCS_RGB;
    jpeg_set_defaults(&ci);
    jpeg_set_quality(&ci, quality, TRUE);
    if (progressive) jpeg_simple_progression(&ci);
    jpeg_start_compress(&ci, TRUE);
    unsigned char *row = malloc((size_t)W * 3);
    for (int y = 0; y < H; y++) {
        for (int x = 0; x < W; x++) {
            row[x * 3] = (unsigned char)(x * 255 / (W - 1));
            row[x * 3 + 1] = (unsigned char)(y * 255 / (H - 1));
            row[x * 3 + 2] = 128;
        }
        JSAMPROW r = row;
        jpeg_write_scanlines(&ci, &r, 1);
    }
    jpeg_finish_compress(&ci);
    jpeg_destroy_compress(&ci);
    free(row);
    return (size_t)n;
}

static void test_jpeg(void) {
    char err[LT_ERRLEN];
    unsigned char *jpg = NULL;
    int W = 48, H = 32;
    size_t n = encode_jpeg(&jpg, W, H, 95, 0);
    img_rgb im;
    ok(img_decode(&im, jpg, n, "gradient.jpg", err) == LT_OK, "a JPEG decodes");
    ok(im.width == W && im.height == H, "the JPEG's size");
    double sum = 0;
    int worst = 0;
    for (int y = 0; y < H && im.rgb; y++)
        for (int x = 0; x < W; x++) {
            int want[3] = {x * 255 / (W - 1), y * 255 / (H - 1), 128};
            for (int c = 0; c < 3; c++) {
                int d = abs(im.rgb[(y * W + x) * 3 + c] - want[c]);
                sum += d;
                if (d > worst) worst = d;
            }
        }
    double mean = sum / (W * H * 3);
    diag("JPEG round trip at quality 95: mean |error| %.2f, max %d", mean, worst);
    ok(im.rgb && mean < 3.0 && worst < 24, "JPEG pixels within the codec's error of the source");
    img_free(&im);
    lt_status rc = img_decode(&im, jpg, n / 2, "cut.jpg", err);
    ok(rc == LT_ERR_FORMAT && strstr(err, "cut.jpg") && strstr(err, "JPEG"),
       "a truncated JPEG is refused, naming the file");
    diag("%s", err);
    ok(im.rgb == NULL, "nothing is left allocated");
    rc = img_decode(&im, jpg, n - 40, "tail.jpg", err);
    ok(rc == LT_ERR_FORMAT && strstr(err, "tail.jpg") && strstr(err, "truncated JPEG"),
       "a JPEG cut inside its scan data is refused as truncated (libjpeg only warns)");
    diag("%s", err);
    ok(im.rgb == NULL, "nothing is left allocated");
    unsigned char *bad = malloc(n);
    memcpy(bad, jpg, n);
    memset(bad + 20, 0xff, 200 < n - 20 ? 200 : n - 20); /* garble the tables */
    rc = img_decode(&im, bad, n, "garbled.jpg", err);
    ok(rc == LT_ERR_FORMAT && strstr(err, "garbled.jpg"), "a garbled JPEG is refused");
    diag("%s", err);
    img_free(&im);
    free(bad);
    free(jpg);
}

static void test_bad(void) {
    char path[4096], err[LT_ERRLEN];
    img_rgb im;
    lt_status rc = img_decode(&im, "", 0, "empty.png", err);
    ok(rc == LT_ERR_FORMAT && strstr(err, "empty file"), "an empty file is refused");
    rc = img_decode(&im, "hello, world", 12, "notes.txt", err);
    ok(rc == LT_ERR_FORMAT && strstr(err, "not a PNG or JPEG"), "a text file is refused");
    diag("%s", err);
    fixture(path, sizeof path, "rgb.png");
    size_t n = 0;
    unsigned char *png = read_all(path, &n);
    ok(png != NULL, "read rgb.png");
    rc = png ? img_decode(&im, png, n - 20, "cut.png", err) : LT_ERR_IO;
    ok(rc == LT_ERR_FORMAT && strstr(err, "cut.png") && strstr(err, "PNG"),
       "a truncated PNG is refused, naming the file");
    diag("%s", err);
    rc = png ? img_decode(&im, png, 12, "header.png", err) : LT_ERR_IO;
    ok(rc == LT_ERR_FORMAT, "a PNG cut inside its header is refused");
    if (png) png[40] ^= 0x55; /* a bad CRC / corrupt data */
    rc = png ? img_decode(&im, png, n, "corrupt.png", err) : LT_ERR_IO;
    ok(rc == LT_ERR_FORMAT && strstr(err, "corrupt.png"), "a corrupt PNG is refused");
    diag("%s", err);
    free(png);
    rc = img_load(&im, "/nonexistent/x.png", err);
    ok(rc == LT_ERR_IO && strstr(err, "cannot open"), "a missing file is refused");
}

static void test_resize(void) {
    char err[LT_ERRLEN];
    uint8_t two[6] = {0, 0, 0, 255, 255, 255};
    img_rgb src = {2, 1, two}, dst;
    ok(img_resize(&dst, &src, 4, 1, err) == LT_OK, "upscale 2 -> 4");
    /* Pillow: centers 0.25, 0.75, 1.25, 1.75; taps (1), (.75, .25), (.25, .75), (1) */
    ok(dst.rgb && dst.rgb[0] == 0 && dst.rgb[3] == 64 && dst.rgb[6] == 191 && dst.rgb[9] == 255,
       "2 -> 4 gives 0, 64, 191, 255 as PIL's BILINEAR");
    img_free(&dst);
    uint8_t four[12] = {0, 0, 0, 100, 100, 100, 200, 200, 200, 255, 255, 255};
    src = (img_rgb){4, 1, four};
    ok(img_resize(&dst, &src, 2, 1, err) == LT_OK, "downscale 4 -> 2");
    /* support 2 (antialiased): out 0 = (.75 * 0 + .75 * 100 + .25 * 200) / 1.75 = 71.4,
     * out 1 = (.25 * 100 + .75 * 200 + .75 * 255) / 1.75 = 209.3 */
    ok(dst.rgb && dst.rgb[0] == 71 && dst.rgb[3] == 209, "4 -> 2 gives 71, 209 (antialiased)");
    img_free(&dst);
    uint8_t flat[5 * 7 * 3];
    memset(flat, 77, sizeof flat);
    src = (img_rgb){5, 7, flat};
    ok(img_resize(&dst, &src, 9, 3, err) == LT_OK, "resize 5x7 -> 9x3");
    int same = 1;
    for (int i = 0; dst.rgb && i < 9 * 3 * 3; i++)
        same &= dst.rgb[i] == 77;
    ok(dst.rgb && same, "a flat image stays flat");
    img_free(&dst);
    ok(img_resize(&dst, &src, 5, 7, err) == LT_OK && !memcmp(dst.rgb, flat, sizeof flat),
       "same size: a copy");
    img_free(&dst);
    float px[3 * 4];
    uint8_t q[12] = {0, 255, 128, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    src = (img_rgb){2, 2, q};
    img_pixels(px, &src);
    ok(px[0] == -1.0f && px[4] == 1.0f && px[8] == (float)((float)(128.0 / 255.0) - 0.5f) / 0.5f,
       "pixels: (x / 255 - 0.5) / 0.5, channel-major");
    ok(px[1] == (float)((float)(1.0 / 255.0) - 0.5f) / 0.5f, "pixels: second pixel, red");
}

/* LATHE_IMAGE_MAX_PIXELS lowers the size limit (the fuzz harness runs with one), for PNG and
 * JPEG alike; unset, the 7 x 5 fixture decodes. */
static void test_pixel_limit(void) {
    char path[2100], err[LT_ERRLEN];
    img_rgb im;
    fixture(path, sizeof path, "rgb.png");
    setenv("LATHE_IMAGE_MAX_PIXELS", "34", 1);
    ok(img_load(&im, path, err) == LT_ERR_ARG && strstr(err, "7 x 5 is too large (at most 34"),
       "bad input: a PNG over LATHE_IMAGE_MAX_PIXELS is refused, naming the limit");
    unsigned char *jpg = NULL;
    size_t n = encode_jpeg(&jpg, 9, 4, 90, 0);
    ok(img_decode(&im, jpg, n, "j", err) == LT_ERR_ARG && strstr(err, "too large"),
       "bad input: a JPEG over LATHE_IMAGE_MAX_PIXELS is refused");
    /* a progressive JPEG declaring 30000 x 30000 in its frame header: refused before libjpeg
     * allocates (and zeroes) whole-image coefficient arrays for it */
    unsetenv("LATHE_IMAGE_MAX_PIXELS");
    unsigned char *pj = NULL;
    size_t pn = encode_jpeg(&pj, 10, 7, 80, 1);
    int patched = 0;
    for (size_t i = 0; pj && i + 8 < pn; i++)
        if (pj[i] == 0xFF && pj[i + 1] == 0xC2) { /* SOF2: length, precision, height, width */
            pj[i + 5] = pj[i + 7] = 30000 >> 8;
            pj[i + 6] = pj[i + 8] = 30000 & 255;
            patched = 1;
            break;
        }
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    lt_status prc = img_decode(&im, pj, pn, "huge.jpg", err);
    getrusage(RUSAGE_SELF, &r1);
    ok(patched && prc == LT_ERR_ARG && strstr(err, "30000 x 30000 is too large"),
       "bad input: a progressive JPEG declaring 30000 x 30000 is refused by its header");
    ok(r1.ru_maxrss - r0.ru_maxrss < 200 * 1024, "... without allocating for it (peak RSS)");
    if (prc == LT_OK) img_free(&im);
    free(pj);
    setenv("LATHE_IMAGE_MAX_PIXELS", "35", 1);
    ok(img_load(&im, path, err) == LT_OK, "at the limit it decodes");
    img_free(&im);
    free(jpg);
    unsetenv("LATHE_IMAGE_MAX_PIXELS");
}

int main(void) {
    test_png();
    test_pixel_limit();
    test_jpeg();
    test_bad();
    test_resize();
    return tap_done();
}
