/* chat.c — the Gemma 3 chat template (see chat.h), built on base/strbuf.h, and Python's strip().
 *
 * Owns nothing beyond the returned string. Must render byte-for-byte what jinja2 renders
 * from the Hub template; tests/engine compares the two.
 */
#include "cuda/text/chat.h"

#include <stdlib.h>
#include <string.h>

#include "cuda/base/error.h"
#include "cuda/base/strbuf.h"

/* Length of the whitespace character at s (Python str.isspace), 0 if none. */
static int space_len(const unsigned char *s, size_t avail) {
    if (avail >= 1 && ((*s >= 0x09 && *s <= 0x0d) || (*s >= 0x1c && *s <= 0x20))) return 1;
    if (avail >= 2 && s[0] == 0xc2 && (s[1] == 0x85 || s[1] == 0xa0)) return 2;
    if (avail >= 3) {
        unsigned cp =
            ((unsigned)(s[0] & 0x0f) << 12) | ((unsigned)(s[1] & 0x3f) << 6) | (s[2] & 0x3f);
        if ((s[0] & 0xf0) == 0xe0 && (s[1] & 0xc0) == 0x80 && (s[2] & 0xc0) == 0x80 &&
            (cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 ||
             cp == 0x202f || cp == 0x205f || cp == 0x3000))
            return 3;
    }
    return 0;
}

/* Python's str.strip(): appends the stripped text. */
static void sb_put_stripped(lt_strbuf *b, const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s), a = 0, e = n;
    int k;
    while (a < n && (k = space_len(p + a, n - a)) > 0)
        a += (size_t)k;
    /* from the end: step back over whole characters */
    while (e > a) {
        size_t st = e - 1;
        while (st > a && (p[st] & 0xc0) == 0x80)
            st--; /* start of the last character */
        k = space_len(p + st, e - st);
        if (k > 0 && st + (size_t)k == e)
            e = st;
        else
            break;
    }
    lt_strbuf_put(b, s + a, e - a);
}

lt_status chat_render(const char *const *roles, const char *const *contents, int n,
                      int add_generation_prompt, char **out, char *err) {
    *out = NULL;
    for (int i = 0; i < n; i++)
        if (!roles[i] || !contents[i])
            return lt_fail(err, LT_ERR_ARG, "chat message %d has no %s", i,
                           roles[i] ? "content" : "role");
    if (n <= 0) /* the Hub template fails on messages[0] too */
        return lt_fail(err, LT_ERR_ARG, "chat template: no messages");
    lt_strbuf b = {0};
    lt_strbuf_puts(&b, "<bos>");
    int first = 0;
    const char *prefix = NULL;
    if (!strcmp(roles[0], "system")) {
        prefix = contents[0];
        first = 1;
    }
    for (int i = first; i < n; i++) {
        int idx = i - first;
        int is_user = !strcmp(roles[i], "user");
        if (is_user != (idx % 2 == 0)) {
            lt_strbuf_free(&b);
            return lt_fail(err, LT_ERR_ARG,
                           "Conversation roles must alternate user/assistant/user/assistant/... "
                           "(message %d has role '%s')",
                           i, roles[i]);
        }
        const char *role = !strcmp(roles[i], "assistant") ? "model" : roles[i];
        lt_strbuf_puts(&b, "<start_of_turn>");
        lt_strbuf_puts(&b, role);
        lt_strbuf_puts(&b, "\n");
        if (idx == 0 && prefix) {
            lt_strbuf_puts(&b, prefix); /* the system text is not trimmed by the template */
            lt_strbuf_puts(&b, "\n\n");
        }
        sb_put_stripped(&b, contents[i]);
        lt_strbuf_puts(&b, "<end_of_turn>\n");
    }
    if (add_generation_prompt) lt_strbuf_puts(&b, "<start_of_turn>model\n");
    if (b.oom) {
        lt_strbuf_free(&b);
        return lt_fail(err, LT_ERR_MEMORY, "chat template: out of memory");
    }
    *out = lt_strbuf_take(&b);
    return LT_OK;
}

lt_status chat_parts_content(const chat_part *parts, int n, char **out, char *err) {
    *out = NULL;
    lt_strbuf b = {0};
    for (int i = 0; i < n; i++) {
        if (parts[i].image)
            lt_strbuf_puts(&b, "<start_of_image>");
        else
            sb_put_stripped(&b, parts[i].text ? parts[i].text : "");
    }
    if (b.oom) {
        lt_strbuf_free(&b);
        return lt_fail(err, LT_ERR_MEMORY, "chat template: out of memory");
    }
    *out = lt_strbuf_take(&b);
    return LT_OK;
}

lt_status chat_user_content(const char *text, int n_images, char **out, char *err) {
    *out = NULL;
    chat_part *parts = malloc(sizeof(chat_part) * (size_t)(n_images + 1));
    if (!parts) return lt_fail(err, LT_ERR_MEMORY, "chat template: out of memory");
    for (int i = 0; i < n_images; i++)
        parts[i] = (chat_part){1, NULL};
    parts[n_images] = (chat_part){0, text};
    lt_status rc = chat_parts_content(parts, n_images + 1, out, err);
    free(parts);
    return rc;
}
