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

/* A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined). */
static char *content_text(json_t *c) {
    if (json_is_string(c)) return strdup(json_string_value(c));
    if (!json_is_array(c)) return NULL;
    size_t total = 1, i;
    json_t *part;
    json_array_foreach(c, i, part) {
        json_t *t = json_is_object(part) ? json_object_get(part, "text") : NULL;
        if (!json_is_string(t)) return NULL;
        total += strlen(json_string_value(t));
    }
    char *out = calloc(1, total);
    if (!out) return NULL;
    json_array_foreach(c, i, part) strcat(out, json_string_value(json_object_get(part, "text")));
    return out;
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
                                const char *ckey, const where *w, char *err) {
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
        char *text = ct ? content_text(ct) : NULL;
        if (!text)
            return lt_fail(err, LT_ERR_FORMAT, "%s %s %d: %s[%zu].%s is missing or not text",
                           w->file, w->unit, w->line, key, i, ckey);
        lt_status st = conv_add(c, role, text, w, err);
        if (st != LT_OK) return st;
    }
    return LT_OK;
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
            st = tb_text(b, tok, full + done, a - done, responses_only ? 0 : 1, err); /* context */
            if (st == LT_OK) st = tb_text(b, tok, full + a, e - a, 1, err); /* the model turn */
            done = e;
        }
        free(pre);
        free(upto);
    }
    if (st == LT_OK)
        st = tb_text(b, tok, full + done, strlen(full) - done, responses_only ? 0 : 1, err);
    free(full);
    return st;
}

static lt_status record_tokens(json_t *rec, fmt_t f, tokbuf *b, const lt_tokenizer *tok, int bos,
                               int responses_only, const where *w, char *err) {
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
        st = conv_from_list(&c, rec, "conversations", "from", "value", w, err);
    } else {
        st = conv_from_list(&c, rec, "messages", "role", "content", w, err);
    }
    if (st == LT_OK) st = conv_tokens(&c, b, tok, responses_only, w, err);
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
    d->s[d->n++] = (train_sample){b->ids, b->mask, b->n, line};
    d->n_tokens += b->n;
    d->n_labels += labels;
    memset(b, 0, sizeof *b);
    return LT_OK;
}

static lt_status one_record(train_data *d, json_t *rec, fmt_t *f, int forced, int line,
                            const data_opts *o, const lt_tokenizer *tok, int bos, size_t piece,
                            const where *w0, const lt_callbacks *cb, char *err) {
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
    lt_status st = record_tokens(rec, *f, &b, tok, bos, o->responses_only, &w, err);
    if (st == LT_OK) st = add_sample(d, &b, line, o, &w, cb, err);
    free(b.ids);
    free(b.mask);
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
                st = one_record(d, rec, &f, forced, (int)i + 1, o, tok, bos, piece, &w, cb, err);
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
                st = one_record(d, rec, &f, forced, line, o, tok, bos, piece, &w, cb, err);
            json_decref(rec);
            if (st != LT_OK) break;
        }
    }
    data_reader_close(&r);
    if (st == LT_OK && d->n == 0)
        st = lt_fail(err, LT_ERR_FORMAT, "%s: the dataset is empty (no records)", file);
    if (st != LT_OK) data_free(d);
    return st;
}

void data_free(train_data *d) {
    for (int i = 0; i < d->n; i++) {
        free(d->s[i].ids);
        free(d->s[i].mask);
    }
    free(d->s);
    d->s = NULL;
    d->n = 0;
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
