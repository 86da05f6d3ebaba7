/* data.c — supervised fine-tuning datasets: JSONL or JSON files -> token ids + label masks.
 *
 * Formats (auto-detected from the first record, or forced with format=):
 *   text      {"text": "..."}                         BOS + tokens, no EOS; every token trains
 *   alpaca    {"instruction", "input"?, "output"}     one user turn, one model turn
 *   sharegpt  {"conversations": [{"from", "value"}]}  human/user, gpt/assistant/model, system
 *   messages  {"messages": [{"role", "content"}]}     user, assistant/model, system
 * Chat formats are rendered with the Gemma chat template (chat.c); with responses_only only
 * the model turns (their text and the "<end_of_turn>\n" that closes them) are labels. Each
 * piece between turn boundaries is tokenized on its own (Hugging Face style: written special
 * pieces become their ids), which is also how a prompt ends at inference time.
 * Samples longer than max_seq are cut at max_seq (a message says how many), and a record is
 * tokenized only as far as that cut can use (a 50 MB line costs its JSON parse, not minutes of
 * SentencePiece). Errors name file:line and the field.
 * The file is read through data_reader: a regular file only (a directory, FIFO, device or
 * socket is refused by name before anything could block), in chunks with the cancel flag
 * polled between them, a UTF-8 BOM skipped, lines and the file bounded by limits the messages
 * name. Owns the train_data it fills and the reader's buffer; must not touch the model.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda/base/strbuf.h"
#include "cuda/text/chat.h"
#include "cuda/text/chat_image.h"
#include "cuda/train/train.h"

#define MAX_TURNS 512

/* ---- growing token buffer --------------------------------------------------------------- */

typedef struct tokbuf {
    int32_t *ids;
    uint8_t *mask;
    int n, cap;
    int limit;    /* tokens worth having (max_seq + 1); 0 = all */
    size_t piece; /* bytes of text one token covers at most (the longest piece) */
    int cut;      /* 1 when text was left untokenized because of limit */
    /* image blocks: their config ids, how many were written and where the last one ends */
    const chat_image_tokens *it;
    int n_blocks, last_block_end;
    int *imgs; /* [n_imgs] the record's images (train_data.images), block order */
    int n_imgs;
} tokbuf;

static int tb_push(tokbuf *b, const int32_t *ids, int n, uint8_t label) {
    if (b->n + n > b->cap) {
        int nc = b->cap ? b->cap : 64;
        while (nc < b->n + n)
            nc *= 2;
        int32_t *ni = realloc(b->ids, sizeof(int32_t) * (size_t)nc);
        if (!ni) return -1;
        b->ids = ni;
        uint8_t *nm = realloc(b->mask, (size_t)nc);
        if (!nm) return -1;
        b->mask = nm;
        b->cap = nc;
    }
    memcpy(b->ids + b->n, ids, sizeof(int32_t) * (size_t)n);
    memset(b->mask + b->n, label, (size_t)n);
    b->n += n;
    return 0;
}

static lt_status tb_text(tokbuf *b, const lt_tokenizer *tok, const char *text, size_t len,
                         uint8_t label, char *err) {
    if (len == 0) return LT_OK;
    if (b->limit > 0) {
        /* Past the cut nothing is kept: tokenize no more than limit tokens can cover (each
         * token covers at most b->piece bytes), plus a margin so the tokens before the cut are
         * those of the whole text; end on a UTF-8 character boundary. */
        if (b->n >= b->limit) {
            b->cut = 1;
            return LT_OK;
        }
        size_t room = ((size_t)(b->limit - b->n) + 16) * b->piece;
        if (len > room) {
            len = room;
            while (len > 0 && ((unsigned char)text[len] & 0xC0) == 0x80)
                len--;
            b->cut = 1;
        }
    }
    char *piece = strndup(text, len);
    if (!piece) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    int32_t *ids = NULL;
    int n = 0;
    lt_status st = tok_encode_special(tok, piece, &ids, &n, err);
    free(piece);
    if (st != LT_OK) return st;
    int r = tb_push(b, ids, n, label);
    free(ids);
    return r ? lt_fail(err, LT_ERR_MEMORY, "out of memory") : LT_OK;
}

/* ---- one record ---------------------------------------------------------------------------- */

typedef enum { F_TEXT, F_ALPACA, F_SHAREGPT, F_MESSAGES, F_UNKNOWN } fmt_t;
static const char *const FMT_NAMES[] = {"text", "alpaca", "sharegpt", "messages"};

static fmt_t detect(json_t *rec) {
    if (json_object_get(rec, "messages")) return F_MESSAGES;
    if (json_object_get(rec, "conversations")) return F_SHAREGPT;
    if (json_object_get(rec, "instruction") || json_object_get(rec, "output")) return F_ALPACA;
    if (json_object_get(rec, "text")) return F_TEXT;
    return F_UNKNOWN;
}

typedef struct where {
    const char *file;
    int line;
    const char *unit; /* "line" (JSONL) or "record" (JSON array) */
} where;

/* A string field of rec, or NULL with err set. */
static const char *str_field(json_t *rec, const char *key, int required, const where *w,
                             char *err) {
    json_t *v = json_object_get(rec, key);
    if (!v) {
        if (required)
            lt_fail(err, LT_ERR_FORMAT, "%s %s %d: field '%s' is missing", w->file, w->unit,
                    w->line, key);
        return NULL;
    }
    if (!json_is_string(v)) {
        lt_fail(err, LT_ERR_FORMAT, "%s %s %d: field '%s' is not a string", w->file, w->unit,
                w->line, key);
        return NULL;
    }
    return json_string_value(v);
}

/* Where an image part's file is found: its key ("image", else "path", else "url"); a URL must
 * be a local path or file:// (lathe downloads nothing). NULL with err set. */
static const char *image_part_path(json_t *part, const char *at, const where *w, char *err) {
    static const char *const keys[] = {"image", "path", "url"};
    json_t *v = NULL;
    const char *key = NULL;
    for (int k = 0; k < 3 && !v; k++)
        if ((v = json_object_get(part, keys[k]))) key = keys[k];
    if (!v) {
        lt_fail(err, LT_ERR_FORMAT,
                "%s %s %d: %s is an image part without a file: give {\"type\": \"image\", "
                "\"image\": \"PATH\"} (a path relative to the dataset's folder, or absolute)",
                w->file, w->unit, w->line, at);
        return NULL;
    }
    if (!json_is_string(v) || !*json_string_value(v)) {
        lt_fail(err, LT_ERR_FORMAT,
                "%s %s %d: %s.%s is not a file path (images are read from files: give a path "
                "relative to the dataset's folder, or an absolute one)",
                w->file, w->unit, w->line, at, key);
        return NULL;
    }
    const char *p = json_string_value(v);
    if (!strncmp(p, "file://", 7)) p += 7;
    if (strstr(p, "://")) {
        lt_fail(err, LT_ERR_FORMAT,
                "%s %s %d: %s.%s is '%s': lathe reads image files, it downloads nothing; save "
                "the image next to the dataset and give its path",
                w->file, w->unit, w->line, at, key, json_string_value(v));
        return NULL;
    }
    return p;
}

/* The parse of one record: its images (indices into the dataset's list, in order) and where
 * relative image paths start from. */
typedef struct record_images {
    train_data *d;
    const data_opts *o;
    const char *dir; /* the dataset file's folder, "" for the working folder */
    const chat_image_tokens *it;
    int *idx;
    int n, cap;
    /* the dataset's distinct images: an open-addressing table of indices + 1 (0 = empty) */
    int **table;
    int *table_cap;
} record_images;

static uint64_t fnv1a(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* The index of path in the dataset's image list, added when new. -1 when out of memory. */
static int image_index(record_images *ri, const char *path, int line) {
    train_data *d = ri->d;
    if ((d->n_images + 1) * 2 > *ri->table_cap) { /* grow the table, keeping it half empty */
        int nc = *ri->table_cap ? *ri->table_cap * 2 : 64;
        int *nt = calloc((size_t)nc, sizeof(int));
        if (!nt) return -1;
        for (int i = 0; i < d->n_images; i++) {
            size_t h = (size_t)(fnv1a(d->images[i].path) % (uint64_t)nc);
            while (nt[h])
                h = (h + 1) % (size_t)nc;
            nt[h] = i + 1;
        }
        free(*ri->table);
        *ri->table = nt;
        *ri->table_cap = nc;
    }
    int cap = *ri->table_cap, *t = *ri->table;
    size_t h = (size_t)(fnv1a(path) % (uint64_t)cap);
    for (; t[h]; h = (h + 1) % (size_t)cap)
        if (!strcmp(d->images[t[h] - 1].path, path)) return t[h] - 1;
    train_image *ni = realloc(d->images, sizeof(train_image) * (size_t)(d->n_images + 1));
    if (!ni) return -1;
    d->images = ni;
    char *copy = strdup(path);
    if (!copy) return -1;
    d->images[d->n_images] = (train_image){copy, line};
    t[h] = d->n_images + 1;
    return d->n_images++;
}

/* Resolves an image part's path, checks the file (present, a readable regular file) and adds it
 * to the record's images. */
static lt_status add_image(record_images *ri, const char *given, const char *at, const where *w,
                           char *err) {
    char path[4096];
    if (given[0] == '/' || !ri->dir[0])
        snprintf(path, sizeof path, "%s", given);
    else
        snprintf(path, sizeof path, "%s/%s", ri->dir, given);
    struct stat sb;
    if (stat(path, &sb) != 0)
        return lt_fail(err, LT_ERR_IO,
                       "%s %s %d: %s: the image file '%s' cannot be found (%s)%s%s%s; paths "
                       "are relative to the dataset's folder",
                       w->file, w->unit, w->line, at, path, strerror(errno),
                       strcmp(path, given) ? " (as given: " : "", strcmp(path, given) ? given : "",
                       strcmp(path, given) ? ")" : "");
    if (!S_ISREG(sb.st_mode))
        return lt_fail(err, LT_ERR_IO, "%s %s %d: %s: '%s' %s", w->file, w->unit, w->line, at, path,
                       S_ISDIR(sb.st_mode) ? "is a directory, not an image file (a PNG or JPEG)"
                                           : "is not a regular file (give a PNG or JPEG file)");
    if (access(path, R_OK) != 0)
        return lt_fail(err, LT_ERR_IO,
                       "%s %s %d: %s: the image file '%s' cannot be read (%s): check its "
                       "permissions",
                       w->file, w->unit, w->line, at, path, strerror(errno));
    int k = image_index(ri, path, w->line);
    if (k < 0) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    if (ri->n == ri->cap) {
        int nc = ri->cap ? ri->cap * 2 : 8;
        int *np = realloc(ri->idx, sizeof(int) * (size_t)nc);
        if (!np) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
        ri->idx = np;
        ri->cap = nc;
    }
    ri->idx[ri->n++] = k;
    return LT_OK;
}

/* A message's content: a string, or a list of parts. A user or model message's list renders as
 * the chat template renders it (chat_parts_content: each text part stripped, an image part as
 * "<start_of_image>"); a user message's image parts are added to ri. A system message's list is
 * one text part, its text (the template reads only the first). *out NULL with err set on a
 * refusal. */
static lt_status content_text(json_t *c, const char *role, const char *at, record_images *ri,
                              const where *w, char **out, char *err) {
    *out = NULL;
    if (json_is_string(c)) {
        *out = strdup(json_string_value(c));
        return *out ? LT_OK : lt_fail(err, LT_ERR_MEMORY, "out of memory");
    }
    if (!json_is_array(c))
        return lt_fail(err, LT_ERR_FORMAT, "%s %s %d: %s is missing or not text", w->file, w->unit,
                       w->line, at);
    size_t n = json_array_size(c), i;
    chat_part *parts = calloc(n ? n : 1, sizeof(chat_part));
    if (!parts) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    lt_status st = LT_OK;
    json_t *part;
    char pat[200];
    json_array_foreach(c, i, part) {
        snprintf(pat, sizeof pat, "%s[%zu]", at, i);
        json_t *type = json_is_object(part) ? json_object_get(part, "type") : NULL;
        json_t *text = json_is_object(part) ? json_object_get(part, "text") : NULL;
        const char *ty = json_is_string(type) ? json_string_value(type) : NULL;
        if (!json_is_object(part) || (type && !ty)) {
            st = lt_fail(err, LT_ERR_FORMAT,
                         "%s %s %d: %s is not a content part ({\"type\": \"text\", \"text\": "
                         "...} or {\"type\": \"image\", \"image\": PATH})",
                         w->file, w->unit, w->line, pat);
        } else if (ty && !strcmp(ty, "image")) {
            if (strcmp(role, "user") != 0)
                st = lt_fail(err, LT_ERR_FORMAT,
                             "%s %s %d: %s is an image in a%s %s message: images go in user "
                             "messages (Gemma 3 reads images, it never writes them%s); move it "
                             "into the user message%s",
                             w->file, w->unit, w->line, pat, strcmp(role, "model") ? "" : "n",
                             strcmp(role, "model") ? "system" : "assistant",
                             strcmp(role, "model") ? ", and its chat template keeps only the text "
                                                     "of a system message"
                                                   : "",
                             strcmp(role, "model") ? " after it" : " before it");
            else if (ri->o->image_refusal)
                st = lt_fail(err, LT_ERR_ARG,
                             "%s %s %d: %s is an image, but %s: %%load a Gemma 3 checkpoint with "
                             "an image tower (e.g. google/gemma-3-4b-it), or train on text-only "
                             "rows",
                             w->file, w->unit, w->line, pat, ri->o->image_refusal);
            else {
                const char *path = image_part_path(part, pat, w, err);
                st = path ? add_image(ri, path, pat, w, err) : LT_ERR_FORMAT;
                parts[i].image = 1;
            }
        } else if (!ty || !strcmp(ty, "text")) {
            if (!json_is_string(text))
                st = lt_fail(err, LT_ERR_FORMAT, "%s %s %d: %s has no 'text' string", w->file,
                             w->unit, w->line, pat);
            else
                parts[i].text = json_string_value(text);
        } else {
            st = lt_fail(err, LT_ERR_FORMAT,
                         "%s %s %d: %s has type '%s'; accepted: text, image (in user messages)",
                         w->file, w->unit, w->line, pat, ty);
        }
        if (st != LT_OK) break;
    }
    if (st == LT_OK && !strcmp(role, "system")) {
        /* Gemma 3's chat template takes messages[0]['content'][0]['text'] of a system list and
         * drops the rest: one text part is rendered as the template renders it; several would
         * lose text without a word, so they are refused */
        if (n != 1)
            st = lt_fail(err, LT_ERR_FORMAT,
                         "%s %s %d: %s has %zu parts, but Gemma 3's chat template keeps only the "
                         "first text part of a system message; give its text as one string or "
                         "one text part",
                         w->file, w->unit, w->line, at, n);
        else if (!(*out = strdup(parts[0].text)))
            st = lt_fail(err, LT_ERR_MEMORY, "out of memory");
    } else if (st == LT_OK) {
        st = chat_parts_content(parts, (int)n, out, err);
    }
    free(parts);
    return st;
}

typedef struct conv {
    const char *roles[MAX_TURNS];
    char *contents[MAX_TURNS];
    int n;
} conv;

static void conv_free(conv *c) {
    for (int i = 0; i < c->n; i++)
        free(c->contents[i]);
    c->n = 0;
}

static lt_status conv_add(conv *c, const char *role, char *content, const where *w, char *err) {
    if (!content) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    if (c->n >= MAX_TURNS) {
        free(content);
        return lt_fail(err, LT_ERR_FORMAT, "%s %s %d: more than %d turns", w->file, w->unit,
                       w->line, MAX_TURNS);
    }
    c->roles[c->n] = role;
    c->contents[c->n++] = content;
    return LT_OK;
}

/* Maps a role spelling to "user", "model" or "system"; NULL if unknown. */
static const char *norm_role(const char *r) {
    if (!strcmp(r, "user") || !strcmp(r, "human")) return "user";
    if (!strcmp(r, "assistant") || !strcmp(r, "model") || !strcmp(r, "gpt") || !strcmp(r, "bot"))
        return "model";
    if (!strcmp(r, "system")) return "system";
    return NULL;
}

static lt_status conv_from_list(conv *c, json_t *rec, const char *key, const char *rkey,
                                const char *ckey, record_images *ri, const where *w, char *err) {
    json_t *list = json_object_get(rec, key);
    if (!json_is_array(list))
        return lt_fail(err, LT_ERR_FORMAT, "%s %s %d: field '%s' is not a list", w->file, w->unit,
                       w->line, key);
    size_t i;
    json_t *m;
    json_array_foreach(list, i, m) {
        if (!json_is_object(m))
            return lt_fail(err, LT_ERR_FORMAT, "%s %s %d: %s[%zu] is not an object", w->file,
                           w->unit, w->line, key, i);
        json_t *r = json_object_get(m, rkey), *ct = json_object_get(m, ckey);
        if (!json_is_string(r))
            return lt_fail(err, LT_ERR_FORMAT, "%s %s %d: %s[%zu].%s is missing or not a string",
                           w->file, w->unit, w->line, key, i, rkey);
        const char *role = norm_role(json_string_value(r));
        if (!role)
            return lt_fail(err, LT_ERR_FORMAT,
                           "%s %s %d: %s[%zu].%s is '%s'; accepted: user, human, assistant, model, "
                           "gpt, system",
                           w->file, w->unit, w->line, key, i, rkey, json_string_value(r));
        char at[120], *text = NULL;
        snprintf(at, sizeof at, "%s[%zu].%s", key, i, ckey);
        lt_status st = ct ? content_text(ct, role, at, ri, w, &text, err)
                          : lt_fail(err, LT_ERR_FORMAT, "%s %s %d: %s is missing or not text",
                                    w->file, w->unit, w->line, at);
        if (st != LT_OK) return st;
        st = conv_add(c, role, text, w, err);
        if (st != LT_OK) return st;
    }
    return LT_OK;
}

/* The walk of a piece with image markers (chat_image_walk) into a tokbuf. */
typedef struct piece_walk {
    tokbuf *b;
    const lt_tokenizer *tok;
    uint8_t label;
} piece_walk;

static lt_status walk_text(void *ctx, const char *segment, char *err) {
    piece_walk *pw = ctx;
    return tb_text(pw->b, pw->tok, segment, strlen(segment), pw->label, err);
}

/* An image block: never a label. */
static lt_status walk_image(void *ctx, int image, char *err) {
    (void)image;
    piece_walk *pw = ctx;
    tokbuf *b = pw->b;
    int k = b->it->mm + 2;
    int32_t *blk = malloc(sizeof(int32_t) * (size_t)k);
    if (!blk) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    blk[0] = b->it->boi;
    for (int j = 0; j < b->it->mm; j++)
        blk[1 + j] = b->it->image;
    blk[k - 1] = b->it->eoi;
    int r = tb_push(b, blk, k, 0);
    free(blk);
    if (r) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    b->n_blocks++;
    b->last_block_end = b->n;
    return LT_OK;
}

/* A piece of the rendered conversation: its markers become image blocks when the record has
 * images (b->n_imgs > 0); a text-only record keeps a written "<start_of_image>" as text. */
static lt_status tb_piece(tokbuf *b, const lt_tokenizer *tok, const char *text, size_t len,
                          uint8_t label, char *err) {
    if (b->n_imgs == 0 || chat_image_count(text, len) == 0)
        return tb_text(b, tok, text, len, label, err);
    piece_walk pw = {b, tok, label};
    chat_image_visit v = {walk_text, walk_image};
    return chat_image_walk(text, len, &v, &pw, err);
}

/* Renders a conversation and tokenizes it piece by piece with labels. */
static lt_status conv_tokens(const conv *c, tokbuf *b, const lt_tokenizer *tok, int responses_only,
                             const where *w, char *err) {
    int has_model = 0;
    for (int i = 0; i < c->n; i++)
        has_model |= !strcmp(c->roles[i], "model");
    if (!has_model)
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s %s %d: the conversation has no model turn (nothing to train on)",
                       w->file, w->unit, w->line);
    char *full = NULL;
    lt_status st = chat_render(c->roles, (const char *const *)c->contents, c->n, 0, &full, err);
    if (st != LT_OK)
        return lt_fail_prefix(err, LT_ERR_FORMAT, "%s %s %d", w->file, w->unit, w->line);
    int markers = b->n_imgs ? chat_image_count(full, strlen(full)) : 0;
    if (markers != b->n_imgs) {
        free(full);
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s %s %d: the conversation's text holds %d '%s' for %d image part(s): "
                       "Gemma 3's processor turns each '%s' into an image, so a message may not "
                       "write it itself (take it out of the text)",
                       w->file, w->unit, w->line, markers, CHAT_IMAGE_MARKER, b->n_imgs,
                       CHAT_IMAGE_MARKER);
    }
    size_t done = 0;
    for (int i = 0; i < c->n && st == LT_OK; i++) {
        if (strcmp(c->roles[i], "model") != 0) continue;
        char *pre = NULL, *upto = NULL;
        st = chat_render(c->roles, (const char *const *)c->contents, i, 1, &pre, err);
        if (st == LT_OK)
            st = chat_render(c->roles, (const char *const *)c->contents, i + 1, 0, &upto, err);
        if (st != LT_OK) {
            free(pre);
            free(upto);
            st = lt_fail_prefix(err, LT_ERR_FORMAT, "%s %s %d", w->file, w->unit, w->line);
            break;
        }
        size_t a = strlen(pre), e = strlen(upto);
        if (a < done || e < a || strncmp(full, pre, a) != 0 || strncmp(full, upto, e) != 0) {
            st = lt_fail(err, LT_ERR_FORMAT,
                         "%s %s %d: the chat template does not render turn by turn", w->file,
                         w->unit, w->line);
        } else {
            st = tb_piece(b, tok, full + done, a - done, responses_only ? 0 : 1, err); /* context */
            if (st == LT_OK) st = tb_text(b, tok, full + a, e - a, 1, err); /* the model turn */
            done = e;
        }
        free(pre);
        free(upto);
    }
    if (st == LT_OK)
        st = tb_piece(b, tok, full + done, strlen(full) - done, responses_only ? 0 : 1, err);
    free(full);
    return st;
}

static lt_status record_tokens(json_t *rec, fmt_t f, tokbuf *b, const lt_tokenizer *tok, int bos,
                               int responses_only, record_images *ri, const where *w, char *err) {
    if (!json_is_object(rec))
        return lt_fail(err, LT_ERR_FORMAT, "%s %s %d: a record must be a JSON object", w->file,
                       w->unit, w->line);
    if (f == F_TEXT) {
        err[0] = 0;
        const char *text = str_field(rec, "text", 1, w, err);
        if (!text) return LT_ERR_FORMAT;
        if (!*text)
            return lt_fail(err, LT_ERR_FORMAT, "%s %s %d: field 'text' is empty", w->file, w->unit,
                           w->line);
        int32_t b0 = bos;
        if (tb_push(b, &b0, 1, 0)) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
        return tb_text(b, tok, text, strlen(text), 1, err);
    }
    conv c = {0};
    lt_status st = LT_OK;
    if (f == F_ALPACA) {
        err[0] = 0;
        const char *ins = str_field(rec, "instruction", 1, w, err);
        const char *inp = ins ? str_field(rec, "input", 0, w, err) : NULL;
        const char *out = ins && !err[0] ? str_field(rec, "output", 1, w, err) : NULL;
        if (!ins || !out || err[0]) return LT_ERR_FORMAT;
        size_t n = strlen(ins) + (inp ? strlen(inp) : 0) + 3;
        char *user = malloc(n);
        if (!user) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
        snprintf(user, n, "%s%s%s", ins, inp && *inp ? "\n\n" : "", inp && *inp ? inp : "");
        const char *sys = json_is_string(json_object_get(rec, "system"))
                              ? json_string_value(json_object_get(rec, "system"))
                              : NULL;
        if (sys && *sys) st = conv_add(&c, "system", strdup(sys), w, err);
        if (st == LT_OK)
            st = conv_add(&c, "user", user, w, err);
        else
            free(user);
        if (st == LT_OK) st = conv_add(&c, "model", strdup(out), w, err);
    } else if (f == F_SHAREGPT) {
        st = conv_from_list(&c, rec, "conversations", "from", "value", ri, w, err);
    } else {
        st = conv_from_list(&c, rec, "messages", "role", "content", ri, w, err);
    }
    b->imgs = ri->idx; /* the tokbuf owns them from here */
    b->n_imgs = ri->n;
    ri->idx = NULL;
    ri->n = ri->cap = 0;
    if (st == LT_OK) st = conv_tokens(&c, b, tok, responses_only, w, err);
    if (st == LT_OK && b->n_imgs) { /* every image token is one of the blocks' */
        int64_t k = 0;
        for (int i = 0; i < b->n; i++)
            k += b->ids[i] == b->it->image;
        if (k != (int64_t)b->n_imgs * b->it->mm)
            st = lt_fail(err, LT_ERR_FORMAT,
                         "%s %s %d: the text writes the image token (id %d) itself: take it out",
                         w->file, w->unit, w->line, b->it->image);
    }
    conv_free(&c);
    return st;
}

/* ---- the file ------------------------------------------------------------------------------ */

/* A limit from the environment (bytes, decimal), or the default. */
static uint64_t env_limit(const char *name, uint64_t dflt) {
    const char *v = getenv(name);
    if (!v || !*v) return dflt;
    char *end = NULL;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    return errno || *end || x == 0 ? dflt : (uint64_t)x;
}

/* "4 GiB", "64 MiB", "1000 bytes": a limit as the messages name it. */
static const char *size_text(uint64_t n, char *buf, size_t cap) {
    if (n >= (1ull << 30) && n % (1ull << 30) == 0)
        snprintf(buf, cap, "%llu GiB", (unsigned long long)(n >> 30));
    else if (n >= (1ull << 20) && n % (1ull << 20) == 0)
        snprintf(buf, cap, "%llu MiB", (unsigned long long)(n >> 20));
    else
        snprintf(buf, cap, "%llu bytes", (unsigned long long)n);
    return buf;
}

/* What a file that is not a regular one is, for the refusal. */
static const char *kind_of(mode_t m) {
    if (S_ISDIR(m)) return "is a directory, not a dataset file (give a .jsonl or .json file in it)";
    if (S_ISFIFO(m))
        return "is a FIFO (named pipe), not a regular file: a dataset is read from a regular file "
               "only (a pipe with no writer would block the kernel)";
    if (S_ISCHR(m))
        return "is a character device, not a regular file: a dataset is read from a regular file "
               "only (a device like /dev/zero never ends)";
    if (S_ISBLK(m))
        return "is a block device, not a regular file: a dataset is read from a regular file only";
    if (S_ISSOCK(m))
        return "is a socket, not a regular file: a dataset is read from a regular file only";
    return "is not a regular file: a dataset is read from a regular file only";
}

lt_status data_reader_open(data_reader *r, const char *path, const char *what, uint64_t max_file,
                           size_t max_row, const atomic_int *cancel, const lt_callbacks *cb,
                           char *err) {
    memset(r, 0, sizeof *r);
    r->fd = -1;
    snprintf(r->what, sizeof r->what, "%s", what);
    r->max_file = max_file ? max_file : env_limit("LATHE_DATA_MAX_BYTES", DATA_MAX_FILE_BYTES);
    r->max_row = max_row ? max_row : (size_t)env_limit("LATHE_DATA_MAX_ROW", DATA_MAX_ROW_BYTES);
    r->cancel = cancel;
    r->cb = cb;
    struct stat sb;
    if (stat(path, &sb) != 0)
        return lt_fail(err, LT_ERR_IO, "%s: cannot open the file (%s)", what, strerror(errno));
    if (!S_ISREG(sb.st_mode)) return lt_fail(err, LT_ERR_IO, "%s: %s", what, kind_of(sb.st_mode));
    /* O_NONBLOCK: should the path become a FIFO between stat and open, open must not wait */
    r->fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (r->fd < 0)
        return lt_fail(err, LT_ERR_IO, "%s: cannot open the file (%s)", what, strerror(errno));
    if (fstat(r->fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        lt_status st = lt_fail(err, LT_ERR_IO, "%s: %s", what, kind_of(sb.st_mode));
        data_reader_close(r);
        return st;
    }
    r->size = (uint64_t)sb.st_size;
    if (r->size > r->max_file) {
        char a[32], b[32];
        lt_status st = lt_fail(
            err, LT_ERR_ARG,
            "%s: the file is %s, over the %s limit for a dataset file: split it, or raise the "
            "limit with the environment variable LATHE_DATA_MAX_BYTES (bytes)",
            what, size_text(r->size, a, sizeof a), size_text(r->max_file, b, sizeof b));
        data_reader_close(r);
        return st;
    }
    return LT_OK;
}

void data_reader_close(data_reader *r) {
    if (r->fd >= 0) close(r->fd);
    free(r->buf);
    r->buf = NULL;
    r->fd = -1;
}

/* Reads one more chunk after the buffered bytes (growing the buffer up to need + 1 bytes);
 * sets eof at the end. Polls the cancel flag. */
static lt_status reader_fill(data_reader *r, size_t need, char *err) {
    if (r->cancel && atomic_load(r->cancel))
        return lt_fail(err, LT_CANCELLED, "%s: cancelled while reading (%llu of %llu bytes)",
                       r->what, (unsigned long long)r->done, (unsigned long long)r->size);
    if (r->pos > 0) { /* keep only what is not consumed yet */
        memmove(r->buf, r->buf + r->pos, r->len - r->pos);
        r->len -= r->pos;
        r->scan -= r->scan >= r->pos ? r->pos : r->scan;
        r->pos = 0;
    }
    const size_t chunk = (size_t)1 << 20;
    size_t want = r->len + chunk + 1;
    if (want < need + 1) want = need + 1;
    if (want > r->cap) {
        size_t nc = r->cap ? r->cap : chunk + 1;
        while (nc < want)
            nc *= 2;
        char *nb = realloc(r->buf, nc);
        if (!nb) return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory reading the file", r->what);
        r->buf = nb;
        r->cap = nc;
    }
    ssize_t got;
    do {
        got = read(r->fd, r->buf + r->len, r->cap - r->len - 1);
    } while (got < 0 && errno == EINTR);
    if (got < 0) return lt_fail(err, LT_ERR_IO, "%s: read error (%s)", r->what, strerror(errno));
    if (got == 0) r->eof = 1;
    if (r->done == 0 && got >= 3 && memcmp(r->buf + r->len, "\xEF\xBB\xBF", 3) == 0) {
        r->pos = r->len + 3; /* a UTF-8 byte order mark: not part of the text */
        r->scan = r->pos;
    }
    r->len += (size_t)got;
    r->done += (uint64_t)got;
    if (r->done > r->max_file) { /* the file grew while we read it */
        char b[32];
        return lt_fail(err, LT_ERR_ARG,
                       "%s: the file grew past the %s limit for a dataset file while it was read",
                       r->what, size_text(r->max_file, b, sizeof b));
    }
    if (r->cb && r->cb->progress && got > 0)
        r->cb->progress(r->cb->ctx, "reading", (int64_t)r->done, (int64_t)r->size);
    return LT_OK;
}

lt_status data_reader_line(data_reader *r, char **line, size_t *len, char *err) {
    *line = NULL;
    *len = 0;
    for (;;) {
        char *nl = r->scan < r->len ? memchr(r->buf + r->scan, '\n', r->len - r->scan) : NULL;
        size_t n = nl ? (size_t)(nl - (r->buf + r->pos)) : r->len - r->pos;
        if (n > r->max_row) {
            char b[32];
            return lt_fail(err, LT_ERR_ARG,
                           "%s line %d: the line is longer than the %s limit for one record; "
                           "shorten it, or raise the limit with the environment variable "
                           "LATHE_DATA_MAX_ROW (bytes)",
                           r->what, r->line + 1, size_text(r->max_row, b, sizeof b));
        }
        if (nl || (r->eof && r->pos < r->len)) {
            *line = r->buf + r->pos;
            (*line)[n] = '\0';
            *len = n;
            r->pos += n + (nl != NULL);
            r->scan = r->pos;
            r->line++;
            return LT_OK;
        }
        if (r->eof) return LT_OK;
        r->scan = r->len;
        lt_status st = reader_fill(r, r->len - r->pos, err);
        if (st != LT_OK) return st;
    }
}

lt_status data_reader_rest(data_reader *r, uint64_t max_bytes, char **text, size_t *len,
                           char *err) {
    *text = NULL;
    *len = 0;
    if (r->size > max_bytes) {
        char a[32], b[32];
        return lt_fail(err, LT_ERR_ARG,
                       "%s: the file is %s, over the %s limit for a JSON array file (it is parsed "
                       "whole): write one record per line (JSON lines) instead",
                       r->what, size_text(r->size, a, sizeof a), size_text(max_bytes, b, sizeof b));
    }
    while (!r->eof) {
        if (r->len - r->pos > max_bytes) {
            char b[32];
            return lt_fail(err, LT_ERR_ARG,
                           "%s: the file grew past the %s limit for a JSON array file", r->what,
                           size_text(max_bytes, b, sizeof b));
        }
        lt_status st = reader_fill(r, r->len - r->pos, err);
        if (st != LT_OK) return st;
    }
    if (!r->buf && !(r->buf = malloc(1)))
        return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory", r->what);
    r->buf[r->len] = '\0';
    *text = r->buf + r->pos;
    *len = r->len - r->pos;
    r->pos = r->len;
    return LT_OK;
}

static lt_status add_sample(train_data *d, tokbuf *b, int line, const data_opts *o, const where *w,
                            const lt_callbacks *cb, char *err) {
    if (o->max_seq > 0 && b->n_blocks > 0 && b->last_block_end > o->max_seq)
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s %s %d: the sample's %d image block(s) (%d tokens each) end at token %d, "
                       "past max_seq=%d: raise max_seq= to at least %d, or give the row fewer "
                       "images or less text before them",
                       w->file, w->unit, line, b->n_blocks, b->it->mm + 2, b->last_block_end,
                       o->max_seq, b->last_block_end);
    if (o->max_seq > 0 && (b->n > o->max_seq || b->cut)) {
        int labels = 0;
        for (int i = 1; i < o->max_seq; i++)
            labels += b->mask[i];
        if (labels == 0) {
            return lt_fail(
                err, LT_ERR_FORMAT,
                "%s %s %d: the sample is %d tokens and max_seq=%d cuts off every trained token; "
                "raise max_seq= or shorten the sample",
                w->file, w->unit, line, b->n, o->max_seq);
        }
        if (d->n_truncated < 3 && cb && cb->message) {
            char msg[600];
            snprintf(msg, sizeof msg, "%s %s %d: %s%d tokens, truncated to max_seq=%d", w->file,
                     w->unit, line, b->cut ? "more than " : "", b->cut ? o->max_seq : b->n,
                     o->max_seq);
            cb->message(cb->ctx, msg);
        }
        d->n_truncated++;
        if (b->n > o->max_seq) b->n = o->max_seq;
    }
    int labels = 0;
    for (int i = 1; i < b->n; i++)
        labels += b->mask[i];
    if (labels == 0)
        return lt_fail(err, LT_ERR_FORMAT, "%s %s %d: the sample has no token to train on", w->file,
                       w->unit, line);
    train_sample *ns = realloc(d->s, sizeof(train_sample) * (size_t)(d->n + 1));
    if (!ns) return lt_fail(err, LT_ERR_MEMORY, "out of memory");
    d->s = ns;
    d->s[d->n++] = (train_sample){b->ids, b->mask, b->n, line, b->imgs, b->n_imgs};
    d->n_tokens += b->n;
    d->n_labels += labels;
    d->n_image_blocks += b->n_imgs;
    memset(b, 0, sizeof *b);
    return LT_OK;
}

static lt_status one_record(train_data *d, json_t *rec, fmt_t *f, int forced, int line,
                            const data_opts *o, const lt_tokenizer *tok, int bos, size_t piece,
                            record_images *ri, const where *w0, const lt_callbacks *cb, char *err) {
    where w = *w0;
    w.line = line;
    if (!json_is_object(rec))
        return lt_fail(err, LT_ERR_FORMAT, "%s %s %d: a record must be a JSON object", w.file,
                       w.unit, line);
    if (*f == F_UNKNOWN) {
        *f = detect(rec);
        if (*f == F_UNKNOWN)
            return lt_fail(
                err, LT_ERR_FORMAT,
                "%s %s %d: cannot tell the format: expected a field 'text' (text), 'instruction' + "
                "'output' (alpaca), 'conversations' (sharegpt) or 'messages' (messages); or set "
                "format=",
                w.file, w.unit, line);
        snprintf(d->format, sizeof d->format, "%s", FMT_NAMES[*f]);
    } else if (!forced && detect(rec) != *f) {
        return lt_fail(err, LT_ERR_FORMAT,
                       "%s %s %d: the record is not in the %s format of the first record%s", w.file,
                       w.unit, line, FMT_NAMES[*f],
                       detect(rec) == F_UNKNOWN ? " (no known field)" : "");
    }
    tokbuf b = {0};
    b.limit = o->max_seq > 0 ? o->max_seq + 1 : 0;
    b.piece = piece;
    b.it = ri->it;
    lt_status st = record_tokens(rec, *f, &b, tok, bos, o->responses_only, ri, &w, err);
    if (st == LT_OK) st = add_sample(d, &b, line, o, &w, cb, err);
    free(b.ids);
    free(b.mask);
    free(b.imgs);
    return st;
}

/* The first byte that is not white space ('[' means a JSON array), without consuming
 * anything; -1 at the end, or when white space runs past a line's limit (then it is JSONL). */
static lt_status reader_first_byte(data_reader *r, int *c, char *err) {
    *c = -1;
    for (size_t i = r->pos;;) {
        for (; i < r->len; i++) {
            char ch = r->buf[i];
            if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r') {
                *c = (unsigned char)ch;
                return LT_OK;
            }
        }
        if (r->eof || r->len - r->pos > r->max_row) return LT_OK;
        size_t off = i - r->pos;
        lt_status st = reader_fill(r, r->len - r->pos, err);
        if (st != LT_OK) return st;
        i = r->pos + off;
    }
}

lt_status data_load(train_data *d, const data_opts *o, const lt_tokenizer *tok,
                    const gemma3_config *cfg, const lt_callbacks *cb, char *err) {
    memset(d, 0, sizeof *d);
    if (!o->path || !*o->path)
        return lt_fail(err, LT_ERR_ARG, "%%train: data= is required (a .jsonl or .json file)");
    snprintf(d->path, sizeof d->path, "%s", o->path);
    const char *file = strrchr(o->path, '/') ? strrchr(o->path, '/') + 1 : o->path;
    fmt_t f = F_UNKNOWN;
    int forced = 0;
    if (o->format && *o->format && strcmp(o->format, "auto") != 0) {
        for (int i = 0; i < 4; i++)
            if (!strcmp(o->format, FMT_NAMES[i])) f = (fmt_t)i;
        if (f == F_UNKNOWN)
            return lt_fail(err, LT_ERR_ARG,
                           "%%train: format=%s; accepted: auto|text|alpaca|sharegpt|messages",
                           o->format);
        forced = 1;
        snprintf(d->format, sizeof d->format, "%s", o->format);
    }
    int bos = cfg && cfg->bos_id >= 0 ? cfg->bos_id : tok_bos_id(tok);
    size_t piece = 1; /* the most text bytes one token stands for */
    for (int i = 0, n = tok_size(tok); i < n; i++) {
        size_t k = strlen(tok_piece(tok, i));
        if (k > piece) piece = k;
    }
    /* image parts: their block's ids, and the folder their paths start from */
    chat_image_tokens it = {0, 0, 0, 0};
    data_opts oo = *o;
    if (cfg && cfg->vision.present)
        it = (chat_image_tokens){cfg->vision.boi_token_id, cfg->vision.image_token_id,
                                 cfg->vision.eoi_token_id, cfg->vision.mm_tokens_per_image};
    else if (!oo.image_refusal)
        oo.image_refusal = "this model has no image tower (a text-only config)";
    o = &oo;
    char dir[4096] = "";
    if (strrchr(o->path, '/'))
        snprintf(dir, sizeof dir, "%.*s", (int)(strrchr(o->path, '/') - o->path), o->path);
    if (strrchr(o->path, '/') == o->path) snprintf(dir, sizeof dir, "/");
    int *table = NULL, table_cap = 0;
    record_images ri = {d, o, dir, &it, NULL, 0, 0, &table, &table_cap};
    snprintf(d->file, sizeof d->file, "%s", file);
    char what[600];
    snprintf(what, sizeof what, "data=%s", o->path);
    data_reader r;
    lt_status st = data_reader_open(&r, o->path, what, o->max_file_bytes, o->max_row_bytes,
                                    o->cancel, cb, err);
    if (st != LT_OK) {
        data_reader_close(&r);
        return st;
    }
    int c = -1;
    st = reader_first_byte(&r, &c, err);
    if (st == LT_OK && c == '[') {
        /* one JSON array of records */
        char *text = NULL;
        size_t len = 0;
        uint64_t cap = r.max_file < DATA_MAX_ARRAY_BYTES ? r.max_file : DATA_MAX_ARRAY_BYTES;
        st = data_reader_rest(&r, cap, &text, &len, err);
        json_error_t je;
        json_t *arr = st == LT_OK ? json_loadb(text, len, 0, &je) : NULL;
        where w = {file, 0, "record"};
        if (st != LT_OK) {
            /* the reader said why */
        } else if (!arr) {
            st = lt_fail(err, LT_ERR_FORMAT, "%s line %d column %d: not valid JSON: %s", file,
                         je.line, je.column, je.text);
        } else if (!json_is_array(arr)) {
            st = lt_fail(err, LT_ERR_FORMAT, "%s: expected a JSON array of records", file);
        } else {
            size_t i;
            json_t *rec;
            json_array_foreach(arr, i, rec) {
                if (o->cancel && atomic_load(o->cancel)) {
                    st = lt_fail(err, LT_CANCELLED, "%s: cancelled at record %zu", what, i + 1);
                    break;
                }
                st = one_record(d, rec, &f, forced, (int)i + 1, o, tok, bos, piece, &ri, &w, cb,
                                err);
                if (st != LT_OK) break;
            }
        }
        json_decref(arr);
    } else if (st == LT_OK) {
        /* JSONL: one record per non-empty line */
        where w = {file, 0, "line"};
        for (;;) {
            char *s = NULL;
            size_t n = 0;
            if ((st = data_reader_line(&r, &s, &n, err)) != LT_OK || !s) break;
            int line = r.line;
            if (o->cancel && atomic_load(o->cancel)) {
                st = lt_fail(err, LT_CANCELLED, "%s: cancelled at line %d", what, line);
                break;
            }
            size_t k = 0;
            while (k < n && (s[k] == ' ' || s[k] == '\t' || s[k] == '\r'))
                k++;
            if (k == n) continue;
            const char *nul = memchr(s, '\0', n);
            if (nul) {
                st = lt_fail(err, LT_ERR_FORMAT,
                             "%s line %d: a NUL byte at column %zu: not a text file of JSON lines",
                             file, line, (size_t)(nul - s) + 1);
                break;
            }
            json_error_t je;
            json_t *rec = json_loadb(s, n, 0, &je);
            if (!rec)
                st = lt_fail(err, LT_ERR_FORMAT, "%s line %d: not valid JSON (%s at column %d)",
                             file, line, je.text, je.column);
            else
                st = one_record(d, rec, &f, forced, line, o, tok, bos, piece, &ri, &w, cb, err);
            json_decref(rec);
            if (st != LT_OK) break;
        }
    }
    data_reader_close(&r);
    free(table);
    free(ri.idx);
    d->unit = c == '[' ? "record" : "line";
    if (st == LT_OK && d->n == 0)
        st = lt_fail(err, LT_ERR_FORMAT, "%s: the dataset is empty (no records)", file);
    if (st != LT_OK) data_free(d);
    return st;
}

void data_free(train_data *d) {
    for (int i = 0; i < d->n; i++) {
        free(d->s[i].ids);
        free(d->s[i].mask);
        free(d->s[i].images);
    }
    free(d->s);
    d->s = NULL;
    d->n = 0;
    for (int i = 0; i < d->n_images; i++)
        free(d->images[i].path);
    free(d->images);
    d->images = NULL;
    d->n_images = 0;
}

/* ---- the visiting order -------------------------------------------------------------------- */

uint64_t train_mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

int epoch_order_init(epoch_order *o, int n, int shuffle, uint64_t seed) {
    *o = (epoch_order){n, shuffle, seed, -1, NULL};
    if (shuffle && !(o->perm = malloc(sizeof(int) * (size_t)(n > 0 ? n : 1)))) return -1;
    return 0;
}

int epoch_order_at(epoch_order *o, int64_t pos) {
    int n = o->n;
    int64_t e = pos / n;
    if (!o->shuffle) return (int)(pos % n);
    if (e != o->epoch) {
        for (int i = 0; i < n; i++)
            o->perm[i] = i;
        uint64_t st = train_mix64(o->seed ^ train_mix64((uint64_t)e + 1));
        for (int i = n - 1; i > 0; i--) { /* Fisher-Yates */
            st = train_mix64(st);
            int j = (int)(st % (uint64_t)(i + 1));
            int x = o->perm[i];
            o->perm[i] = o->perm[j];
            o->perm[j] = x;
        }
        o->epoch = e;
    }
    return o->perm[pos % n];
}

void epoch_order_free(epoch_order *o) {
    free(o->perm);
    o->perm = NULL;
}
