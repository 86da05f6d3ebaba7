/* chat_image.c — a rendered chat with images to token ids (see chat_image.h).
 *
 * Owns nothing beyond the returned ids.
 */
#include "cuda/text/chat_image.h"

#include <stdlib.h>
#include <string.h>

#include "cuda/base/strbuf.h"

int chat_image_count(const char *text, size_t len) {
    int k = 0;
    size_t m = strlen(CHAT_IMAGE_MARKER);
    for (size_t i = 0; i + m <= len; i++)
        if (!memcmp(text + i, CHAT_IMAGE_MARKER, m)) {
            k++;
            i += m - 1;
        }
    return k;
}

lt_status chat_image_walk(const char *text, size_t len, const chat_image_visit *v, void *ctx,
                          char *err) {
    size_t m = strlen(CHAT_IMAGE_MARKER);
    int n_images = chat_image_count(text, len);
    lt_status rc = LT_OK;
    lt_strbuf seg = {0};
    const char *p = text, *end = text + len;
    for (int i = 0; i <= n_images && rc == LT_OK; i++) {
        const char *e = end;
        if (i < n_images)
            for (e = p; memcmp(e, CHAT_IMAGE_MARKER, m) != 0; e++) {
            }
        lt_strbuf_truncate(&seg, 0);
        if (i > 0) lt_strbuf_puts(&seg, "\n\n"); /* after the previous <end_of_image> */
        lt_strbuf_put(&seg, p, (size_t)(e - p));
        if (i < n_images) lt_strbuf_puts(&seg, "\n\n"); /* before this <start_of_image> */
        if (seg.oom) {
            rc = lt_fail(err, LT_ERR_MEMORY, "out of memory");
            break;
        }
        if (seg.len) rc = v->text(ctx, lt_strbuf_str(&seg), err);
        if (rc != LT_OK || i == n_images) break;
        rc = v->image(ctx, i, err);
        p = e + m;
    }
    lt_strbuf_free(&seg);
    return rc;
}

/* The ids being built by chat_image_ids. */
typedef struct id_list {
    const lt_tokenizer *tok;
    const chat_image_tokens *it;
    int32_t *ids;
    int n, cap;
} id_list;

static lt_status ids_reserve(id_list *l, int more, char *err) {
    if (l->n + more <= l->cap) return LT_OK;
    int nc = l->cap ? l->cap : 256;
    while (nc < l->n + more)
        nc *= 2;
    int32_t *np = realloc(l->ids, sizeof(int32_t) * (size_t)nc);
    if (!np) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    l->ids = np;
    l->cap = nc;
    return LT_OK;
}

/* Appends what tok_encode_special makes of text. */
static lt_status ids_text(void *ctx, const char *text, char *err) {
    id_list *l = ctx;
    int32_t *t = NULL;
    int k = 0;
    lt_status rc = tok_encode_special(l->tok, text, &t, &k, err);
    if (rc == LT_OK && (rc = ids_reserve(l, k, err)) == LT_OK) {
        memcpy(l->ids + l->n, t, sizeof(int32_t) * (size_t)k);
        l->n += k;
    }
    free(t);
    return rc;
}

/* Appends an image block from the config's ids. */
static lt_status ids_image(void *ctx, int image, char *err) {
    (void)image;
    id_list *l = ctx;
    lt_status rc = ids_reserve(l, l->it->mm + 2, err);
    if (rc != LT_OK) return rc;
    l->ids[l->n++] = l->it->boi;
    for (int j = 0; j < l->it->mm; j++)
        l->ids[l->n++] = l->it->image;
    l->ids[l->n++] = l->it->eoi;
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
    int found = chat_image_count(text, strlen(text));
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
    int found = chat_image_count(text, strlen(text));
    if (found != n_images) return marker_count_error(found, n_images, err);
    if (it->mm <= 0) return lt_fail(err, LT_ERR_ARG, "images: mm_tokens_per_image is not set");
    id_list l = {tok, it, NULL, 0, 0};
    chat_image_visit v = {ids_text, ids_image};
    lt_status rc = chat_image_walk(text, strlen(text), &v, &l, err);
    if (rc != LT_OK) {
        free(l.ids);
        return rc;
    }
    *ids = l.ids;
    *n = l.n;
    return LT_OK;
}
