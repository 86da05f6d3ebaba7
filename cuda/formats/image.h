/* image.h — image files to the pixel values an image tower reads. Engine-private.
 *
 * img_load decodes a PNG (libpng) or a JPEG (libjpeg-turbo), chosen by the file's first bytes,
 * into 8-bit RGB, as transformers' Gemma3ImageProcessor sees it after PIL's decoder and
 * convert_to_rgb (an alpha channel is composited onto white with PIL's alpha_composite
 * arithmetic). img_resize is PIL's Image.resize with resample=BILINEAR on 8-bit RGB (the
 * triangle filter widened by the scale factor when shrinking, i.e. antialiased, in Pillow's
 * fixed-point arithmetic: horizontal pass, then vertical, each rounded to 8 bits).
 * img_pixels rescales by 1/255 and normalizes with mean 0.5 / std 0.5 into [3, H, W] fp32
 * (channel-major), as the processor's rescale and normalize do.
 *
 * Bad input (an empty, truncated or corrupt file, a format it does not read, more than 16384 x
 * 16384 pixels, or fewer where LATHE_IMAGE_MAX_PIXELS says) is refused with a message naming
 * the file. Knows files and pixels, nothing of models.
 */
#ifndef LATHE_IMAGE_H
#define LATHE_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "cuda/base/error.h"

/* An 8-bit RGB image: rgb[(y * width + x) * 3 + c]. */
typedef struct img_rgb {
    int width, height;
    uint8_t *rgb; /* malloc'd */
} img_rgb;

/* Decodes the file at path (PNG or JPEG). On failure *out is empty and err names path. */
lt_status img_load(img_rgb *out, const char *path, char *err);
/* The same from bytes in memory; `what` names them in errors. */
lt_status img_decode(img_rgb *out, const void *bytes, size_t n, const char *what, char *err);
void img_free(img_rgb *im);

/* dst = src resized to width x height as PIL's resize(resample=BILINEAR) computes it. */
lt_status img_resize(img_rgb *dst, const img_rgb *src, int width, int height, char *err);

/* out[c * H * W + y * W + x] = (rgb / 255 - 0.5) / 0.5 in fp32, for an image of W x H. */
void img_pixels(float *out, const img_rgb *im);

/* What Gemma3ImageProcessor (no pan-and-scan) makes of the file at path for a tower of
 * side x side: decode, resize to side x side, rescale, normalize; out is [3, side, side]. */
lt_status img_load_pixels(float *out, const char *path, int side, char *err);

#endif
