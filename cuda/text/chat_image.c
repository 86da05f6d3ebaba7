/* chat_image.c — a rendered chat with images to token ids (see chat_image.h).
 *
 * Owns nothing beyond the returned ids.
 */
#include "cuda/text/chat_image.h"

#include <stdlib.h>
#include <string.h>

#include "cuda/base/strbuf.h"

static int count_markers(const char *text) {
    int k = 0;
    for (const char *p = text; (p = strstr(p, CHAT_IMAGE_MARKER)); p += strlen(CHAT_IMAGE_MARKER))
        k++;
    return k;
}

/* Appends what tok_encode_special makes of text to *ids (grown as needed). */
static lt_status append_text(const lt_tokenizer *tok, const char *text, int32_t **ids, int *n,
                             int *cap, char *err) {
    int32_t *t = NULL;
    int k = 0;
    lt_status rc = tok_encode_special(tok, text, &t, &k, err);
    if (rc != LT_OK) return rc;
    if (*n + k > *cap) {
        int nc = *cap ? *cap : 256;
        while (nc < *n + k)
            nc *= 2;
        int32_t *np = realloc(*ids, sizeof(int32_t) * (size_t)nc);
        if (!np) {
            free(t);
            return lt_fail(err, LT_ERR_MEMORY, "out of memory");
        }
        *ids = np;
        *cap = nc;
    }
    memcpy(*ids + *n, t, sizeof(int32_t) * (size_t)k);
    *n += k;
    free(t);
    return LT_OK;
}

static lt_status marker_count_error(int found, int n_images, char *err) {
    return lt_fail(err, LT_ERR_ARG,
                   "the conversation's text holds %d '%s' but %d image(s) were given: Gemma "
                   "3's processor turns each '%s' into an image, so a message may not "
                   "write it itself (take it out of the text)",
                   found, CHAT_IMAGE_MARKER, n_images, CHAT_IMAGE_MARKER);
}

lt_status chat_image_pan_scan_text(const char *text, const int *crops, int n_images, char **out,
                                   char *err) {
    *out = NULL;
    int found = count_markers(text);
    if (found != n_images) return marker_count_error(found, n_images, err);
    lt_strbuf b = {0};
    const char *p = text;
    for (int i = 0; i < n_images; i++) {
        const char *e = strstr(p, CHAT_IMAGE_MARKER);
        lt_strbuf_put(&b, p, (size_t)(e - p));
        if (crops[i] > 0) {
            lt_strbuf_puts(&b, "Here is the original image " CHAT_IMAGE_MARKER
                               " and here are some crops to help you see better ");
            for (int j = 0; j < crops[i]; j++) {
                if (j) lt_strbuf_puts(&b, " ");
                lt_strbuf_puts(&b, CHAT_IMAGE_MARKER);
            }
        } else {
            lt_strbuf_puts(&b, CHAT_IMAGE_MARKER);
        }
        p = e + strlen(CHAT_IMAGE_MARKER);
    }
    lt_strbuf_puts(&b, p);
    if (b.oom) {
        lt_strbuf_free(&b);
        return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    }
    *out = lt_strbuf_take(&b);
    return LT_OK;
}

lt_status chat_image_ids(const lt_tokenizer *tok, const char *text, const chat_image_tokens *it,
                         int n_images, int32_t **ids, int *n, char *err) {
    *ids = NULL;
    *n = 0;
    int found = count_markers(text);
    if (found != n_images) return marker_count_error(found, n_images, err);
    if (it->mm <= 0) return lt_fail(err, LT_ERR_ARG, "images: mm_tokens_per_image is not set");
    int32_t *out = NULL;
    int len = 0, cap = 0;
    lt_status rc = LT_OK;
    lt_strbuf seg = {0};
    const char *p = text;
    for (int i = 0; i <= n_images && rc == LT_OK; i++) {
        const char *e = i < n_images ? strstr(p, CHAT_IMAGE_MARKER) : p + strlen(p);
        lt_strbuf_truncate(&seg, 0);
        if (i > 0) lt_strbuf_puts(&seg, "\n\n"); /* after the previous <end_of_image> */
        lt_strbuf_put(&seg, p, (size_t)(e - p));
        if (i < n_images) lt_strbuf_puts(&seg, "\n\n"); /* before this <start_of_image> */
        if (seg.oom) {
            rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
            break;
        }
        if (seg.len) rc = append_text(tok, lt_strbuf_str(&seg), &out, &len, &cap, err);
        if (rc != LT_OK || i == n_images) break;
        int need = len + it->mm + 2;
        if (need > cap) {
            int nc = cap ? cap : 256;
            while (nc < need)
                nc *= 2;
            int32_t *np = realloc(out, sizeof(int32_t) * (size_t)nc);
            if (!np) {
                rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
                break;
            }
            out = np;
            cap = nc;
        }
        out[len++] = it->boi;
        for (int j = 0; j < it->mm; j++)
            out[len++] = it->image;
        out[len++] = it->eoi;
        p = e + strlen(CHAT_IMAGE_MARKER);
    }
    lt_strbuf_free(&seg);
    if (rc != LT_OK) {
        free(out);
        return rc;
    }
    *ids = out;
    *n = len;
    return LT_OK;
}
