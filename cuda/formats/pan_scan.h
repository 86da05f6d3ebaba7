/* pan_scan.h — Gemma 3's pan-and-scan: the crops an image is cut into besides its full view.
 * Engine-private.
 *
 * transformers' Gemma3ImageProcessor (image_processing_gemma3.py, pan_and_scan) cuts an image
 * whose long side is at least min_ratio times its short side into 2 to max_crops crops along
 * the long side, about as many as the aspect ratio (rounded half up), no more than
 * floor(long / min_crop_size), each ceil(long / crops) long and the full short side, the last
 * one cut off at the image's edge; none when a crop would be shorter than min_crop_size on
 * either side. The processor then resizes the full image and every crop to the tower's square
 * as it resizes an image without pan-and-scan. pan_scan_boxes is that arithmetic (in doubles,
 * as Python computes it); img_crop copies a box out of an image. Knows pixels, nothing of
 * models or text.
 */
#ifndef LATHE_PAN_SCAN_H
#define LATHE_PAN_SCAN_H

#include "cuda/base/error.h"
#include "cuda/formats/image.h"

/* The processor's options (Gemma3Processor's defaults: 256, 4, 1.2). */
typedef struct pan_scan_opts {
    int min_crop_size; /* pan_and_scan_min_crop_size, >= 1 */
    int max_crops;     /* pan_and_scan_max_num_crops, in [1, PAN_SCAN_MAX_CROPS] */
    double min_ratio;  /* pan_and_scan_min_ratio_to_activate, > 0 */
} pan_scan_opts;

#define PAN_SCAN_MAX_CROPS 64 /* the most crops lathe cuts an image into */

/* A crop: its top-left corner and size, in pixels of the source image. */
typedef struct pan_scan_box {
    int x, y, w, h;
} pan_scan_box;

/* The processor's defaults. */
void pan_scan_opts_default(pan_scan_opts *o);
/* Refuses options the processor's arithmetic cannot use (err says which and what works). */
lt_status pan_scan_opts_check(const pan_scan_opts *o, char *err);

/* The crops of a width x height image, in the processor's order (top to bottom, left to right),
 * into boxes[0..*n) (boxes holds PAN_SCAN_MAX_CROPS); *n = 0 when the image is not cut. Refused:
 * bad options, an empty image, or options under which a crop would start past the image's edge
 * (the processor would hand an empty crop to its resize; only with a min_crop_size far below
 * the default). */
lt_status pan_scan_boxes(int width, int height, const pan_scan_opts *o, pan_scan_box *boxes, int *n,
                         char *err);

/* dst = the pixels of src inside box b (which must lie within src). */
lt_status img_crop(img_rgb *dst, const img_rgb *src, pan_scan_box b, char *err);

/* What Gemma3ImageProcessor(do_pan_and_scan=True) gives for im and a tower of side x side: the
 * full image, then each crop of pan_scan_boxes, each resized to side x side (img_resize),
 * rescaled and normalized (img_pixels). *out is malloc'd [1 + *n_crops, 3, side, side]. o NULL:
 * the full image alone (*n_crops 0), as without pan-and-scan. */
lt_status pan_scan_pixels(const img_rgb *im, int side, const pan_scan_opts *o, float **out,
                          int *n_crops, char *err);

#endif
