/* engine_tool.c — a small command-line door into the engine for the Python comparisons in
 * tests/engine (tokenizer vs SentencePiece, chat template vs jinja2, logits vs transformers).
 *
 *   engine_tool tokenize TOKENIZER.model [special]   stdin text -> ids, one line "1,2,3"
 *   engine_tool decode TOKENIZER.model IDS           ids "1,2,3" -> text on stdout
 *   engine_tool pieces TOKENIZER.model               "id<TAB>type<TAB>score<TAB>hex(piece)" lines
 *   engine_tool chat [gen]                           stdin "role<TAB>content-as-JSON-string" lines
 *                                                    -> rendered template on stdout
 *   engine_tool logits SOURCE IDS OUT.npy [dtype]    lt_logits -> fp32 .npy [n, vocab]
 *   engine_tool greedy DIR|tiny IDS MAX_NEW          greedy ids through the KV cache, no stops
 *   engine_tool generate_ids SOURCE IDS MAX_NEW      lt_generate_ids (stops at eos/<end_of_turn>)
 *   engine_tool info SOURCE                          model_info as key=value lines
 * Test tool only: prints errors to stderr and exits 1.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/engine.h"
#include "cuda/model/model.h"
#include "cuda/text/tokenizer.h"

static char *read_all(FILE *f) {
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (!buf) return NULL;
    size_t got;
    while ((got = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += got;
        if (len + 1 >= cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return NULL;
            }
            buf = nb;
            cap *= 2;
        }
    }
    buf[len] = 0;
    return buf;
}

static int parse_ids(const char *s, int32_t **ids) {
    int n = 0, cap = 16;
    *ids = malloc(sizeof(int32_t) * (size_t)cap);
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) break;
        if (n == cap) {
            cap *= 2;
            *ids = realloc(*ids, sizeof(int32_t) * (size_t)cap);
        }
        (*ids)[n++] = (int32_t)v;
        s = end;
        while (*s == ',' || *s == ' ')
            s++;
    }
    return n;
}

static void print_ids(const int32_t *ids, int n) {
    for (int i = 0; i < n; i++)
        printf("%s%d", i ? "," : "", ids[i]);
    printf("\n");
}

static int die(const char *what, const char *msg) {
    fprintf(stderr, "engine_tool %s: %s\n", what, msg);
    return 1;
}

static int write_npy(const char *path, const float *data, int rows, int cols) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    char dict[128];
    int dl = snprintf(dict, sizeof dict,
                      "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }", rows, cols);
    int total = 10 + dl + 1;
    int pad = (64 - total % 64) % 64;
    unsigned short hl = (unsigned short)(dl + pad + 1);
    fwrite("\x93NUMPY\x01\x00", 1, 8, f);
    fputc(hl & 0xff, f);
    fputc(hl >> 8, f);
    fwrite(dict, 1, (size_t)dl, f);
    for (int i = 0; i < pad; i++)
        fputc(' ', f);
    fputc('\n', f);
    size_t n = (size_t)rows * (size_t)cols;
    int ok = fwrite(data, sizeof(float), n, f) == n;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static lt_session *load(const char *source, const char *dtype) {
    lt_session *s = lt_session_new();
    lt_load_opts o = {.dtype = dtype, .device = "cpu", .max_seq = 0};
    if (lt_load(s, source, &o, NULL) != LT_OK) {
        fprintf(stderr, "engine_tool: load %s: %s\n", source, lt_last_error(s));
        lt_session_free(s);
        return NULL;
    }
    return s;
}

int main(int argc, char **argv) {
    if (argc < 2) return die("usage", "see the header of tests/engine/engine_tool.c");
    const char *cmd = argv[1];
    char err[LT_ERRLEN];
    if (!strcmp(cmd, "tokenize") || !strcmp(cmd, "decode") || !strcmp(cmd, "pieces")) {
        if (argc < 3) return die(cmd, "needs TOKENIZER.model");
        lt_tokenizer *t;
        if (tok_load(&t, argv[2], err) != LT_OK) return die(cmd, err);
        if (!strcmp(cmd, "tokenize")) {
            char *text = read_all(stdin);
            int32_t *ids;
            int n;
            int special = argc > 3 && !strcmp(argv[3], "special");
            lt_status rc = special ? tok_encode_special(t, text, &ids, &n, err)
                                   : tok_encode(t, text, &ids, &n, err);
            if (rc != LT_OK) return die(cmd, err);
            print_ids(ids, n);
            free(ids);
            free(text);
        } else if (!strcmp(cmd, "decode")) {
            int32_t *ids;
            int n = parse_ids(argc > 3 ? argv[3] : "", &ids);
            char *text;
            if (tok_decode(t, ids, n, &text, err) != LT_OK) return die(cmd, err);
            fputs(text, stdout);
            free(text);
            free(ids);
        } else {
            for (int i = 0; i < tok_size(t); i++) {
                printf("%d\t%d\t%.9g\t", i, tok_type(t, i), tok_score(t, i));
                for (const unsigned char *p = (const unsigned char *)tok_piece(t, i); *p; p++)
                    printf("%02x", *p);
                printf("\n");
            }
        }
        tok_free(t);
        return 0;
    }
    if (!strcmp(cmd, "chat")) {
        /* stdin: a JSON list of {"role", "content"} */
        char *text = read_all(stdin);
        json_error_t je;
        json_t *msgs = json_loads(text, 0, &je);
        free(text);
        if (!json_is_array(msgs)) return die(cmd, "stdin must be a JSON list of messages");
        int n = (int)json_array_size(msgs);
        const char **roles = calloc((size_t)n + 1, sizeof(char *)),
                   **contents = calloc((size_t)n + 1, sizeof(char *));
        for (int i = 0; i < n; i++) {
            roles[i] = json_string_value(json_object_get(json_array_get(msgs, (size_t)i), "role"));
            contents[i] =
                json_string_value(json_object_get(json_array_get(msgs, (size_t)i), "content"));
        }
        lt_session *s = lt_session_new();
        char *out;
        int gen = argc > 2 && !strcmp(argv[2], "gen");
        if (lt_chat_render(s, roles, contents, n, gen, &out) != LT_OK) {
            fprintf(stderr, "%s\n", lt_last_error(s));
            return 2; /* the template's own error */
        }
        fputs(out, stdout);
        free(out);
        lt_session_free(s);
        json_decref(msgs);
        free(roles);
        free(contents);
        return 0;
    }
    if (argc < 3) return die(cmd, "needs SOURCE");
    if (!strcmp(cmd, "info")) {
        lt_session *s = load(argv[2], argc > 3 ? argv[3] : NULL);
        if (!s) return 1;
        lt_model_info i;
        lt_model_info_get(s, &i);
        printf("source=%s\narch=%s\ndtype=%s\ndevice=%s\nn_params=%lld\nweight_bytes=%lld\nn_"
               "layers=%d\nhidden=%d\n"
               "n_heads=%d\nn_kv_heads=%d\nhead_dim=%d\nintermediate=%d\nvocab=%d\nsliding_window=%"
               "d\nmax_seq=%d\n"
               "skipped_vision=%d\n",
               i.source, i.arch, i.dtype, i.device, (long long)i.n_params,
               (long long)i.weight_bytes, i.n_layers, i.hidden, i.n_heads, i.n_kv_heads, i.head_dim,
               i.intermediate, i.vocab, i.sliding_window, i.max_seq, i.skipped_vision);
        lt_session_free(s);
        return 0;
    }
    if (argc < 4) return die(cmd, "needs SOURCE IDS");
    int32_t *ids;
    int n = parse_ids(argv[3], &ids);
    if (!strcmp(cmd, "logits")) {
        if (argc < 5) return die(cmd, "needs OUT.npy");
        lt_session *s = load(argv[2], argc > 5 ? argv[5] : NULL);
        if (!s) return 1;
        float *lg;
        int V;
        if (lt_logits(s, ids, n, &lg, &V) != LT_OK) return die(cmd, lt_last_error(s));
        if (write_npy(argv[4], lg, n, V)) return die(cmd, "cannot write the .npy file");
        free(lg);
        lt_session_free(s);
        free(ids);
        return 0;
    }
    if (!strcmp(cmd, "generate_ids")) {
        lt_session *s = load(argv[2], NULL);
        if (!s) return 1;
        lt_gen_opts o;
        lt_gen_opts_default(&o);
        o.temperature = 0;
        o.max_new = argc > 4 ? atoi(argv[4]) : 16;
        int32_t *out;
        int no;
        if (lt_generate_ids(s, ids, n, &o, &out, &no) != LT_OK) return die(cmd, lt_last_error(s));
        print_ids(out, no);
        free(out);
        lt_session_free(s);
        free(ids);
        return 0;
    }
    if (!strcmp(cmd, "greedy")) {
        /* the model API directly: prefill the prompt through the cache, then one token at a time */
        int max_new = argc > 4 ? atoi(argv[4]) : 16;
        gemma3_model *m = NULL;
        char dir[600];
        snprintf(dir, sizeof dir, "%s", argv[2]);
        if (!strcmp(argv[2],
                    "tiny")) { /* a directory, or tiny (LATHE_TINY_DIR, else the source tree) */
            const char *env = getenv("LATHE_TINY_DIR");
            if (env && *env)
                snprintf(dir, sizeof dir, "%s", env);
            else
                snprintf(dir, sizeof dir, "%s/models/tiny", LATHE_SRCDIR);
        }
        if (gemma3_load_dir(&m, dir, NULL, NULL, err) != LT_OK) return die(cmd, err);
        lt_ctx ctx;
        if (lt_ctx_init(&ctx, &lt_backend_cpu, 0) != LT_OK) return die(cmd, "ctx");
        gemma3_cache cache;
        if (gemma3_cache_init(&cache, &ctx, &m->cfg, 4096) != LT_OK) return die(cmd, ctx.err);
        int V = m->cfg.vocab_size;
        float *last = malloc(sizeof(float) * (size_t)V);
        gemma3_outputs o = {.last_logits = last};
        if (gemma3_forward(m, &ctx, ids, n, &cache, &o) != LT_OK) return die(cmd, ctx.err);
        for (int i = 0; i < max_new; i++) {
            int best = 0;
            for (int v = 1; v < V; v++)
                if (last[v] > last[best]) best = v;
            printf("%s%d", i ? "," : "", best);
            if (i + 1 < max_new && gemma3_forward(m, &ctx, &best, 1, &cache, &o) != LT_OK)
                return die(cmd, ctx.err);
        }
        printf("\n");
        free(last);
        gemma3_cache_free(&cache, &ctx);
        lt_ctx_shutdown(&ctx);
        gemma3_model_free(m);
        free(ids);
        return 0;
    }
    return die(cmd, "unknown command");
}
