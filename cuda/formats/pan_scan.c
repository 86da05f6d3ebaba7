/* pan_scan.c — Gemma 3's pan-and-scan crop boxes, and cropping (see pan_scan.h).
 *
 * The arithmetic follows transformers' Gemma3ImageProcessor.pan_and_scan line for line:
 * Python's true division is IEEE double division, math.floor and math.ceil are floor and ceil,
 * so computing in doubles here gives the same counts and sizes (a ratio exactly at min_ratio
 * activates, as `width / height < min_ratio` does not hold). Owns nothing beyond dst's pixels.
 */
#include "cuda/formats/pan_scan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void pan_scan_opts_default(pan_scan_opts *o) {
    o->min_crop_size = 256;
    o->max_crops = 4;
    o->min_ratio = 1.2;
}

lt_status pan_scan_opts_check(const pan_scan_opts *o, char *err) {
    if (o->min_crop_size < 1)
        return lt_fail(err, LT_ERR_ARG,
                       "pan-and-scan: min_crop_size %d must be at least 1 pixel (the processor's "
                       "default is 256)",
                       o->min_crop_size);
    if (o->max_crops < 1 || o->max_crops > PAN_SCAN_MAX_CROPS)
        return lt_fail(err, LT_ERR_ARG,
                       "pan-and-scan: max_crops %d must be in [1, %d] (the processor's default "
                       "is 4)",
                       o->max_crops, PAN_SCAN_MAX_CROPS);
    if (!(o->min_ratio > 0) || !isfinite(o->min_ratio))
        return lt_fail(err, LT_ERR_ARG,
                       "pan-and-scan: min_ratio %g must be a positive number (the processor's "
                       "default is 1.2)",
                       o->min_ratio);
    return LT_OK;
}

/* The number of crops along a side `lng` long whose other side is `shrt`, as the processor
 * chooses it, or 0 when the aspect ratio is below min_ratio. */
static int crops_along(int lng, int shrt, const pan_scan_opts *o) {
    double ratio = (double)lng / (double)shrt;
    if (ratio < o->min_ratio) return 0;
    int k = (int)floor(ratio + 0.5); /* half round up */
    int by_size = (int)floor((double)lng / (double)o->min_crop_size);
    if (by_size < k) k = by_size;
    if (k < 2) k = 2;
    if (k > o->max_crops) k = o->max_crops;
    return k;
}

lt_status pan_scan_boxes(int width, int height, const pan_scan_opts *o, pan_scan_box *boxes, int *n,
                         char *err) {
    *n = 0;
    lt_status rc = pan_scan_opts_check(o, err);
    if (rc != LT_OK) return rc;
    if (width <= 0 || height <= 0)
        return lt_fail(err, LT_ERR_ARG, "pan-and-scan: the image has no pixels (%d x %d)", width,
                       height);
    int nw = 1, nh = 1;
    if (width >= height) { /* square or landscape */
        if (!(nw = crops_along(width, height, o))) return LT_OK;
    } else { /* portrait */
        if (!(nh = crops_along(height, width, o))) return LT_OK;
    }
    int cw = (int)ceil((double)width / nw), ch = (int)ceil((double)height / nh);
    if ((cw < ch ? cw : ch) < o->min_crop_size) return LT_OK; /* crops too small: none */
    if ((int64_t)cw * (nw - 1) >= width || (int64_t)ch * (nh - 1) >= height)
        return lt_fail(err, LT_ERR_ARG,
                       "pan-and-scan: a %d x %d image cut into %d crops of %d x %d leaves the "
                       "last one empty (transformers' processor would fail on it too); raise "
                       "min_crop_size or lower max_crops",
                       width, height, nw * nh, cw, ch);
    int k = 0;
    for (int i = 0; i < nh; i++)
        for (int j = 0; j < nw; j++) {
            pan_scan_box b = {j * cw, i * ch, cw, ch};
            if (b.x + b.w > width) b.w = width - b.x; /* numpy's slice stops at the edge */
            if (b.y + b.h > height) b.h = height - b.y;
            boxes[k++] = b;
        }
    *n = k;
    return LT_OK;
}

lt_status img_crop(img_rgb *dst, const img_rgb *src, pan_scan_box b, char *err) {
    memset(dst, 0, sizeof *dst);
    if (b.x < 0 || b.y < 0 || b.w <= 0 || b.h <= 0 || b.x + b.w > src->width ||
        b.y + b.h > src->height)
        return lt_fail(err, LT_ERR_ARG, "crop (%d, %d) %d x %d is not inside a %d x %d image", b.x,
                       b.y, b.w, b.h, src->width, src->height);
    dst->rgb = malloc((size_t)b.w * (size_t)b.h * 3);
    if (!dst->rgb) return lt_fail(err, LT_ERR_MEMORY, "out of memory for a %d x %d crop", b.w, b.h);
    dst->width = b.w;
    dst->height = b.h;
    for (int y = 0; y < b.h; y++)
        memcpy(dst->rgb + (size_t)y * b.w * 3,
               src->rgb + ((size_t)(b.y + y) * src->width + (size_t)b.x) * 3, (size_t)b.w * 3);
    return LT_OK;
}

/* out = the pixel values of src resized to side x side. */
static lt_status resized_pixels(float *out, const img_rgb *src, int side, char *err) {
    img_rgb rs;
    lt_status rc = img_resize(&rs, src, side, side, err);
    if (rc != LT_OK) return rc;
    img_pixels(out, &rs);
    img_free(&rs);
    return LT_OK;
}

lt_status pan_scan_pixels(const img_rgb *im, int side, const pan_scan_opts *o, float **out,
                          int *n_crops, char *err) {
    *out = NULL;
    *n_crops = 0;
    pan_scan_box boxes[PAN_SCAN_MAX_CROPS];
    int n = 0;
    lt_status rc = o ? pan_scan_boxes(im->width, im->height, o, boxes, &n, err) : LT_OK;
    if (rc != LT_OK) return rc;
    if (side <= 0) return lt_fail(err, LT_ERR_ARG, "pan-and-scan: tower side %d", side);
    size_t block = 3 * (size_t)side * (size_t)side;
    float *px = malloc(sizeof(float) * block * (size_t)(1 + n));
    if (!px)
        return lt_fail(err, LT_ERR_MEMORY, "out of memory for %d images of %d x %d", 1 + n, side,
                       side);
    rc = resized_pixels(px, im, side, err);
    for (int i = 0; i < n && rc == LT_OK; i++) {
        img_rgb crop;
        rc = img_crop(&crop, im, boxes[i], err);
        if (rc == LT_OK) rc = resized_pixels(px + block * (size_t)(1 + i), &crop, side, err);
        img_free(&crop);
    }
    if (rc != LT_OK) {
        free(px);
        return rc;
    }
    *out = px;
    *n_crops = n;
    return LT_OK;
}
