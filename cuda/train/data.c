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
 * Samples longer than max_seq are cut at max_seq (a message says how many). Errors name
 * file:line and the field. Owns the train_data it fills; must not touch the model.
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/base/strbuf.h"
#include "cuda/text/chat.h"
#include "cuda/train/train.h"

#define MAX_TURNS 512

/* ---- growing token buffer --------------------------------------------------------------- */

typedef struct tokbuf {
    int32_t *ids;
    uint8_t *mask;
    int n, cap;
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

static char *read_all(const char *path, size_t *len, char *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        lt_fail(err, LT_ERR_IO, "data=%s: cannot open the file (%s)", path, strerror(errno));
        return NULL;
    }
    lt_strbuf b = {0};
    int r = lt_strbuf_read(&b, f, (size_t)-1);
    fclose(f);
    if (r != 0 || b.oom) {
        lt_fail(err, b.oom ? LT_ERR_MEMORY : LT_ERR_IO, "data=%s: %s", path,
                b.oom ? "out of memory" : "read error");
        lt_strbuf_free(&b);
        return NULL;
    }
    *len = b.len;
    return lt_strbuf_take(&b);
}

static lt_status add_sample(train_data *d, tokbuf *b, int line, const data_opts *o, const where *w,
                            const lt_callbacks *cb, char *err) {
    if (o->max_seq > 0 && b->n > o->max_seq) {
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
            snprintf(msg, sizeof msg, "%s %s %d: %d tokens, truncated to max_seq=%d", w->file,
                     w->unit, line, b->n, o->max_seq);
            cb->message(cb->ctx, msg);
        }
        d->n_truncated++;
        b->n = o->max_seq;
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
                            const data_opts *o, const lt_tokenizer *tok, int bos, const where *w0,
                            const lt_callbacks *cb, char *err) {
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
    lt_status st = record_tokens(rec, *f, &b, tok, bos, o->responses_only, &w, err);
    if (st == LT_OK) st = add_sample(d, &b, line, o, &w, cb, err);
    free(b.ids);
    free(b.mask);
    return st;
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
    size_t len = 0;
    char *text = read_all(o->path, &len, err);
    if (!text) return LT_ERR_IO;
    lt_status st = LT_OK;
    const char *p = text;
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    if (*p == '[') {
        /* one JSON array of records */
        json_error_t je;
        json_t *arr = json_loadb(text, len, 0, &je);
        where w = {file, 0, "record"};
        if (!arr) {
            st = lt_fail(err, LT_ERR_FORMAT, "%s line %d column %d: not valid JSON: %s", file,
                         je.line, je.column, je.text);
        } else if (!json_is_array(arr)) {
            st = lt_fail(err, LT_ERR_FORMAT, "%s: expected a JSON array of records", file);
        } else {
            size_t i;
            json_t *rec;
            json_array_foreach(arr, i, rec) {
                st = one_record(d, rec, &f, forced, (int)i + 1, o, tok, bos, &w, cb, err);
                if (st != LT_OK) break;
            }
        }
        json_decref(arr);
    } else {
        /* JSONL: one record per non-empty line */
        where w = {file, 0, "line"};
        int line = 0;
        char *s = text;
        while (st == LT_OK && *s) {
            char *nl = strchr(s, '\n');
            size_t n = nl ? (size_t)(nl - s) : strlen(s);
            line++;
            size_t k = 0;
            while (k < n && (s[k] == ' ' || s[k] == '\t' || s[k] == '\r'))
                k++;
            if (k < n) {
                json_error_t je;
                json_t *rec = json_loadb(s, n, 0, &je);
                if (!rec)
                    st = lt_fail(err, LT_ERR_FORMAT, "%s line %d: not valid JSON (%s at column %d)",
                                 file, line, je.text, je.column);
                else
                    st = one_record(d, rec, &f, forced, line, o, tok, bos, &w, cb, err);
                json_decref(rec);
            }
            s = nl ? nl + 1 : s + n;
        }
    }
    free(text);
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
