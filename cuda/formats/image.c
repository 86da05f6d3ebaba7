/* image.c — PNG and JPEG files to 8-bit RGB, PIL's bilinear resize, and the pixel values of
 * Gemma 3's image processor (image.h states each).
 *
 * PNG goes through libpng's simplified API (png_image: every bit depth, palette, grey and
 * alpha expanded to 8-bit RGBA), JPEG through libjpeg-turbo (output colour space RGB, its
 * default DCT and upsampling, which is what PIL's decoder uses too). libpng and libjpeg-turbo
 * rather than stb_image: both are the decoders PIL itself links, so the bytes agree with what
 * transformers sees, and both are packaged and maintained. Alpha is composited onto white with
 * the integer arithmetic of PIL's ImagingAlphaComposite (transformers' convert_to_rgb does
 * Image.alpha_composite over a white background). The resize follows Pillow's Resample.c
 * (precompute_coeffs, normalize_coeffs_8bpc, the 8-bit horizontal then vertical passes) with
 * its bilinear filter.
 *
 * Known differences from PIL: a PNG with a gAMA chunk far from sRGB is gamma-corrected by
 * libpng's simplified API (PIL ignores gAMA), and 16-bit PNGs are reduced to 8 bits by libpng
 * (PIL keeps the high byte); a JPEG in CMYK is refused (PIL converts it); an EXIF orientation
 * is not applied (transformers' load_image applies ImageOps.exif_transpose when it opens a path
 * itself; a PIL image handed to the processor is used as it is). Owns only these conversions.
 */
#include "cuda/formats/image.h"

#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jerror.h>
#include <jpeglib.h>
#include <png.h>

#include "cuda/base/strbuf.h"

#define IMG_MAX_PIXELS ((int64_t)1 << 28) /* 16384 x 16384: refuse anything larger */

/* The largest image decoded: IMG_MAX_PIXELS, or LATHE_IMAGE_MAX_PIXELS when set (smaller). */
static int64_t max_pixels(void) {
    const char *e = getenv("LATHE_IMAGE_MAX_PIXELS");
    long long v = e && *e ? atoll(e) : 0;
    return v > 0 && v < IMG_MAX_PIXELS ? (int64_t)v : IMG_MAX_PIXELS;
}

void img_free(img_rgb *im) {
    if (!im) return;
    free(im->rgb);
    memset(im, 0, sizeof *im);
}

static lt_status img_alloc(img_rgb *im, int w, int h, const char *what, char *err) {
    if (w <= 0 || h <= 0)
        return lt_fail(err, LT_ERR_FORMAT, "%s: the image has no pixels (%d x %d)", what, w, h);
    if ((int64_t)w * h > max_pixels())
        return lt_fail(err, LT_ERR_ARG, "%s: %d x %d is too large (at most %lld pixels)", what, w,
                       h, (long long)max_pixels());
    im->rgb = malloc((size_t)w * (size_t)h * 3);
    if (!im->rgb)
        return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory for %d x %d pixels", what, w, h);
    im->width = w;
    im->height = h;
    return LT_OK;
}

/* ---- PNG --------------------------------------------------------------------------------- */

/* One channel of PIL's alpha_composite of (c, a) over an opaque white pixel. */
static uint8_t over_white(unsigned c, unsigned a) {
    if (a == 0) return 255;
    /* PIL: coef1 = a*255*255*2^7 / (a*255 + 255*(255-a)), coef2 = 255*2^7 - coef1,
     * out = SHIFTFORDIV255(c*coef1 + 255*coef2 + (0x80 << 7)) >> 7 */
    unsigned outa255 = a * 255 + 255 * (255 - a);
    unsigned coef1 = a * 255 * 255 * 128 / outa255;
    unsigned coef2 = 255 * 128 - coef1;
    unsigned t = c * coef1 + 255 * coef2 + (0x80u << 7);
    t = ((t >> 8) + t) >> 8;
    return (uint8_t)(t >> 7);
}

static lt_status decode_png(img_rgb *out, const void *bytes, size_t n, const char *what,
                            char *err) {
    png_image pi;
    memset(&pi, 0, sizeof pi);
    pi.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_memory(&pi, bytes, n)) {
        lt_status rc = lt_fail(err, LT_ERR_FORMAT, "%s: not a readable PNG (%s)", what, pi.message);
        png_image_free(&pi);
        return rc;
    }
    if ((int64_t)pi.width * pi.height > max_pixels() || pi.width == 0 || pi.height == 0) {
        lt_status rc =
            pi.width == 0 || pi.height == 0
                ? lt_fail(err, LT_ERR_FORMAT, "%s: the image has no pixels (%u x %u)", what,
                          pi.width, pi.height)
                : lt_fail(err, LT_ERR_ARG, "%s: %u x %u is too large (at most %lld pixels)", what,
                          pi.width, pi.height, (long long)max_pixels());
        png_image_free(&pi);
        return rc;
    }
    pi.format = PNG_FORMAT_RGBA;
    uint8_t *rgba = malloc(PNG_IMAGE_SIZE(pi));
    if (!rgba) {
        png_image_free(&pi);
        return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory decoding the PNG", what);
    }
    if (!png_image_finish_read(&pi, NULL, rgba, 0, NULL)) {
        lt_status rc =
            lt_fail(err, LT_ERR_FORMAT, "%s: corrupt or truncated PNG (%s)", what, pi.message);
        png_image_free(&pi);
        free(rgba);
        return rc;
    }
    lt_status rc = img_alloc(out, (int)pi.width, (int)pi.height, what, err);
    if (rc == LT_OK) {
        size_t np = (size_t)pi.width * pi.height;
        for (size_t i = 0; i < np; i++) {
            unsigned a = rgba[i * 4 + 3];
            for (int c = 0; c < 3; c++)
                out->rgb[i * 3 + c] = a == 255 ? rgba[i * 4 + c] : over_white(rgba[i * 4 + c], a);
        }
    }
    free(rgba);
    return rc;
}

/* ---- JPEG -------------------------------------------------------------------------------- */

typedef struct jpeg_fail_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char msg[JMSG_LENGTH_MAX];
    int truncated; /* libjpeg's "premature end of data" warning was raised */
} jpeg_fail_mgr;

static void jpeg_on_error(j_common_ptr c) {
    jpeg_fail_mgr *e = (jpeg_fail_mgr *)c->err;
    (*c->err->format_message)(c, e->msg);
    longjmp(e->jump, 1);
}

/* Warnings: a premature end of data is an error (PIL refuses a truncated JPEG too); the
 * others (extraneous bytes, ...) are ignored, as PIL's decoder ignores them. */
static void jpeg_on_message(j_common_ptr c, int level) {
    jpeg_fail_mgr *e = (jpeg_fail_mgr *)c->err;
    if (level < 0 && c->err->msg_code == JWRN_JPEG_EOF && !e->truncated) {
        e->truncated = 1;
        (*c->err->format_message)(c, e->msg);
    }
}

static lt_status decode_jpeg(img_rgb *out, const void *bytes, size_t n, const char *what,
                             char *err) {
    struct jpeg_decompress_struct ci;
    jpeg_fail_mgr e;
    memset(&e, 0, sizeof e);
    ci.err = jpeg_std_error(&e.pub);
    e.pub.error_exit = jpeg_on_error;
    e.pub.emit_message = jpeg_on_message;
    img_rgb *volatile dst = out;
    if (setjmp(e.jump)) {
        jpeg_destroy_decompress(&ci);
        img_free(dst);
        return lt_fail(err, LT_ERR_FORMAT, "%s: corrupt JPEG (%s)", what, e.msg);
    }
    jpeg_create_decompress(&ci);
    jpeg_mem_src(&ci, (const unsigned char *)bytes, (unsigned long)n);
    jpeg_read_header(&ci, TRUE);
    /* the size is checked before jpeg_start_decompress: a progressive JPEG has libjpeg allocate
     * and zero its whole-image coefficient arrays there, so a small file declaring 30000 x 30000
     * would take gigabytes; libjpeg's own allowance is bounded the same way */
    if ((int64_t)ci.image_width * ci.image_height > max_pixels()) {
        lt_status rc = lt_fail(err, LT_ERR_ARG, "%s: %u x %u is too large (at most %lld pixels)",
                               what, ci.image_width, ci.image_height, (long long)max_pixels());
        jpeg_destroy_decompress(&ci);
        return rc;
    }
    ci.mem->max_memory_to_use = (long)(16 * (int64_t)ci.image_width * ci.image_height + (64 << 20));
    ci.out_color_space = JCS_RGB;
    jpeg_start_decompress(&ci);
    if (ci.output_components != 3) {
        jpeg_destroy_decompress(&ci);
        return lt_fail(err, LT_ERR_FORMAT, "%s: JPEG with %d colour components refused", what,
                       ci.output_components);
    }
    lt_status rc = img_alloc(out, (int)ci.output_width, (int)ci.output_height, what, err);
    if (rc != LT_OK) {
        jpeg_destroy_decompress(&ci);
        return rc;
    }
    while (ci.output_scanline < ci.output_height && !e.truncated) {
        JSAMPROW row = out->rgb + (size_t)ci.output_scanline * (size_t)out->width * 3;
        jpeg_read_scanlines(&ci, &row, 1);
    }
    if (e.truncated) {
        jpeg_destroy_decompress(&ci);
        img_free(out);
        return lt_fail(err, LT_ERR_FORMAT, "%s: truncated JPEG (%s)", what, e.msg);
    }
    jpeg_finish_decompress(&ci);
    jpeg_destroy_decompress(&ci);
    if (e.truncated) {
        img_free(out);
        return lt_fail(err, LT_ERR_FORMAT, "%s: truncated JPEG (%s)", what, e.msg);
    }
    return LT_OK;
}

/* ---- files ------------------------------------------------------------------------------- */

lt_status img_decode(img_rgb *out, const void *bytes, size_t n, const char *what, char *err) {
    memset(out, 0, sizeof *out);
    const uint8_t *b = bytes;
    static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (n == 0) return lt_fail(err, LT_ERR_FORMAT, "%s: empty file, not an image", what);
    if (n >= 8 && !memcmp(b, png_sig, 8)) return decode_png(out, bytes, n, what, err);
    if (n >= 3 && b[0] == 0xff && b[1] == 0xd8 && b[2] == 0xff)
        return decode_jpeg(out, bytes, n, what, err);
    char head[40] = "";
    size_t k = n < 8 ? n : 8;
    for (size_t i = 0; i < k; i++)
        snprintf(head + 3 * i, sizeof head - 3 * i, "%02x ", b[i]);
    return lt_fail(err, LT_ERR_FORMAT,
                   "%s: not a PNG or JPEG image (first bytes %s; accepted: PNG, JPEG)", what, head);
}

lt_status img_load(img_rgb *out, const char *path, char *err) {
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "rb");
    if (!f) return lt_fail(err, LT_ERR_IO, "%s: cannot open the image", path);
    lt_strbuf b = {0};
    int r = lt_strbuf_read(&b, f, (size_t)1 << 30);
    fclose(f);
    lt_status rc;
    if (b.oom)
        rc = lt_fail(err, LT_ERR_MEMORY, "%s: out of memory reading the image", path);
    else if (r > 0)
        rc = lt_fail(err, LT_ERR_ARG, "%s: larger than 1 GiB, refused", path);
    else if (r < 0)
        rc = lt_fail(err, LT_ERR_IO, "%s: read error", path);
    else
        rc = img_decode(out, b.p, b.len, path, err);
    lt_strbuf_free(&b);
    return rc;
}

/* ---- PIL's bilinear resize --------------------------------------------------------------- */

#define PREC_BITS (32 - 8 - 2) /* Pillow's PRECISION_BITS for 8-bit images */

static double bilinear(double x) {
    if (x < 0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

/* Pillow's precompute_coeffs (support 1, bilinear) then normalize_coeffs_8bpc: for each output
 * index, the first input index bounds[2i], the count bounds[2i+1], and ksize fixed-point taps. */
static int resize_coeffs(int in_size, int out_size, int **bounds_out, int32_t **kk_out) {
    double scale = (double)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 1.0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *pre = malloc(sizeof(double) * (size_t)out_size * (size_t)ksize);
    int *bounds = malloc(sizeof(int) * (size_t)out_size * 2);
    int32_t *kk = malloc(sizeof(int32_t) * (size_t)out_size * (size_t)ksize);
    if (!pre || !bounds || !kk) {
        free(pre);
        free(bounds);
        free(kk);
        return -1;
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double *k = pre + (size_t)xx * (size_t)ksize;
        int x;
        for (x = 0; x < xmax; x++) {
            double w = bilinear((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++)
            if (ww != 0.0) k[x] /= ww;
        for (; x < ksize; x++)
            k[x] = 0;
        bounds[xx * 2] = xmin;
        bounds[xx * 2 + 1] = xmax;
    }
    for (size_t i = 0; i < (size_t)out_size * (size_t)ksize; i++)
        kk[i] = pre[i] < 0 ? (int32_t)(-0.5 + pre[i] * (1 << PREC_BITS))
                           : (int32_t)(0.5 + pre[i] * (1 << PREC_BITS));
    free(pre);
    *bounds_out = bounds;
    *kk_out = kk;
    return ksize;
}

static uint8_t clip8(int32_t v) {
    if (v <= 0) return 0;
    v >>= PREC_BITS;
    return v > 255 ? 255 : (uint8_t)v;
}

lt_status img_resize(img_rgb *dst, const img_rgb *src, int width, int height, char *err) {
    memset(dst, 0, sizeof *dst);
    if (width <= 0 || height <= 0)
        return lt_fail(err, LT_ERR_ARG, "resize: target %d x %d has no pixels", width, height);
    int sw = src->width, sh = src->height;
    lt_status rc = img_alloc(dst, width, height, "resize", err);
    if (rc != LT_OK) return rc;
    if (sw == width && sh == height) { /* PIL returns a copy */
        memcpy(dst->rgb, src->rgb, (size_t)sw * (size_t)sh * 3);
        return LT_OK;
    }
    int *bh = NULL, *bv = NULL;
    int32_t *kh = NULL, *kv = NULL;
    uint8_t *tmp = NULL;
    int ksh = resize_coeffs(sw, width, &bh, &kh);
    int ksv = ksh < 0 ? -1 : resize_coeffs(sh, height, &bv, &kv);
    if (ksv >= 0) tmp = malloc((size_t)width * (size_t)sh * 3);
    if (ksh < 0 || ksv < 0 || !tmp) {
        rc = lt_fail(err, LT_ERR_MEMORY, "resize: out of memory");
        goto done;
    }
    /* horizontal pass (every source row; Pillow skips the rows no output uses: same values) */
    if (width != sw) {
        for (int y = 0; y < sh; y++)
            for (int xx = 0; xx < width; xx++) {
                int xmin = bh[xx * 2], xn = bh[xx * 2 + 1];
                const int32_t *k = kh + (size_t)xx * (size_t)ksh;
                for (int c = 0; c < 3; c++) {
                    int32_t ss = 1 << (PREC_BITS - 1);
                    for (int x = 0; x < xn; x++)
                        ss += src->rgb[((size_t)y * sw + (size_t)(x + xmin)) * 3 + c] * k[x];
                    tmp[((size_t)y * width + xx) * 3 + c] = clip8(ss);
                }
            }
    } else {
        memcpy(tmp, src->rgb, (size_t)sw * (size_t)sh * 3);
    }
    /* vertical pass */
    if (height != sh) {
        for (int yy = 0; yy < height; yy++) {
            int ymin = bv[yy * 2], yn = bv[yy * 2 + 1];
            const int32_t *k = kv + (size_t)yy * (size_t)ksv;
            for (int xx = 0; xx < width; xx++)
                for (int c = 0; c < 3; c++) {
                    int32_t ss = 1 << (PREC_BITS - 1);
                    for (int y = 0; y < yn; y++)
                        ss += tmp[((size_t)(y + ymin) * width + xx) * 3 + c] * k[y];
                    dst->rgb[((size_t)yy * width + xx) * 3 + c] = clip8(ss);
                }
        }
    } else {
        memcpy(dst->rgb, tmp, (size_t)width * (size_t)height * 3);
    }
done:
    free(bh);
    free(bv);
    free(kh);
    free(kv);
    free(tmp);
    if (rc != LT_OK) img_free(dst);
    return rc;
}

/* ---- pixel values ------------------------------------------------------------------------ */

void img_pixels(float *out, const img_rgb *im) {
    size_t plane = (size_t)im->width * (size_t)im->height;
    for (size_t i = 0; i < plane; i++)
        for (int c = 0; c < 3; c++) {
            /* transformers' rescale: uint8 * (1/255) in float64, stored as float32; then
             * normalize in float32: (x - 0.5) / 0.5 */
            float r = (float)((double)im->rgb[i * 3 + c] * (1.0 / 255.0));
            out[(size_t)c * plane + i] = (r - 0.5f) / 0.5f;
        }
}

lt_status img_load_pixels(float *out, const char *path, int side, char *err) {
    img_rgb im, rs;
    lt_status rc = img_load(&im, path, err);
    if (rc != LT_OK) return rc;
    rc = img_resize(&rs, &im, side, side, err);
    img_free(&im);
    if (rc != LT_OK) return lt_fail_prefix(err, rc, "%s", path);
    img_pixels(out, &rs);
    img_free(&rs);
    return LT_OK;
}
