/* mtmd_probe.c — llama.cpp's side of the mmproj test: loads a text GGUF and its mmproj through
 * llama.cpp's own libllama and libmtmd (tools/mtmd: the code llama-mtmd-cli and llama-server
 * run), tokenizes a prompt holding one image marker, encodes the image, and continues greedily.
 * Built against llama.cpp's source by tests/gguf/build-mtmd (never by lathe's build: it needs
 * llama.cpp's headers and libraries); driven by tests/gguf/test_mmproj.py.
 *
 *   mtmd_probe TEXT.gguf MMPROJ.gguf IMAGE PROMPT N OUT.json
 *
 * PROMPT holds mtmd's default marker "<__media__>" where the image goes. OUT.json:
 *   "chunks":  [[token ids] | {"image": n_tokens}, ...]  mtmd_tokenize's chunks
 *   "embd":    the image chunk's embeddings (mtmd_encode_chunk), [n_tokens * n_embd]
 *   "n_embd":  their width (the text model's hidden size)
 *   "steps":   N + 1 logit vectors: after the prompt (mtmd_helper_eval_chunks, the last
 *              token's), then after each greedy token
 *   "greedy":  N argmax tokens, each fed back with llama_decode
 * A test tool: errors go to stderr with a non-zero exit.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"
#include "mtmd-helper.h"
#include "mtmd.h"

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static void put_floats(FILE *f, const float *x, size_t n) {
    fputc('[', f);
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%s%.9g", i ? "," : "", (double)x[i]);
    fputc(']', f);
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: mtmd_probe TEXT.gguf MMPROJ.gguf IMAGE PROMPT N OUT.json\n");
        return 2;
    }
    const char *text_path = argv[1], *mm_path = argv[2], *image = argv[3], *prompt = argv[4];
    int n_predict = atoi(argv[5]);
    llama_log_set(quiet, NULL);
    mtmd_helper_log_set(quiet, NULL);
    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(text_path, mp);
    if (!model) {
        fprintf(stderr, "llama.cpp could not load %s\n", text_path);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = cp.n_threads_batch = 2;
    struct llama_context *lctx = llama_init_from_model(model, cp);
    if (!lctx) {
        fprintf(stderr, "llama.cpp could not create a context\n");
        return 1;
    }
    struct mtmd_context_params mcp = mtmd_context_params_default();
    mcp.use_gpu = false;
    mcp.print_timings = false;
    mcp.n_threads = 2;
    mcp.warmup = false;
    mtmd_context *mctx = mtmd_init_from_file(mm_path, model, mcp);
    if (!mctx) {
        fprintf(stderr, "llama.cpp's mtmd could not load the mmproj %s\n", mm_path);
        return 1;
    }
    struct mtmd_helper_bitmap_wrapper bw =
        mtmd_helper_bitmap_init_from_file(mctx, image, false, mtmd_helper_init_opt_default());
    if (!bw.bitmap) {
        fprintf(stderr, "llama.cpp could not read the image %s\n", image);
        return 1;
    }
    mtmd_input_chunks *chunks = mtmd_input_chunks_init();
    struct mtmd_input_text in = {prompt, strlen(prompt), true, true};
    const mtmd_bitmap *bitmaps[1] = {bw.bitmap};
    int32_t rc = mtmd_tokenize(mctx, chunks, &in, bitmaps, 1);
    if (rc != 0) {
        fprintf(stderr, "mtmd_tokenize failed (%d)\n", rc);
        return 1;
    }
    FILE *out = fopen(argv[6], "w");
    if (!out) {
        perror(argv[6]);
        return 1;
    }
    const int n_embd = llama_model_n_embd(model);
    fprintf(out, "{\"n_embd\": %d, \"chunks\": [", n_embd);
    const mtmd_input_chunk *img = NULL;
    for (size_t i = 0; i < mtmd_input_chunks_size(chunks); i++) {
        const mtmd_input_chunk *c = mtmd_input_chunks_get(chunks, i);
        if (i) fputc(',', out);
        if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n = 0;
            const llama_token *t = mtmd_input_chunk_get_tokens_text(c, &n);
            fputc('[', out);
            for (size_t k = 0; k < n; k++)
                fprintf(out, "%s%d", k ? "," : "", t[k]);
            fputc(']', out);
        } else {
            img = c;
            fprintf(out, "{\"image\": %zu}", mtmd_input_chunk_get_n_tokens(c));
        }
    }
    fputc(']', out);
    if (img) {
        if (mtmd_encode_chunk(mctx, img) != 0) {
            fprintf(stderr, "mtmd_encode_chunk failed\n");
            return 1;
        }
        fprintf(out, ", \"embd\": ");
        put_floats(out, mtmd_get_output_embd(mctx), mtmd_input_chunk_get_n_tokens(img) * n_embd);
    }
    llama_pos n_past = 0;
    if (mtmd_helper_eval_chunks(mctx, lctx, chunks, 0, 0, (int32_t)cp.n_batch, true, &n_past) !=
        0) {
        fprintf(stderr, "mtmd_helper_eval_chunks failed\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_token *greedy = malloc(sizeof(llama_token) * (size_t)(n_predict > 0 ? n_predict : 1));
    if (!greedy) return 1;
    fprintf(out, ", \"steps\": [");
    struct llama_batch b = llama_batch_init(1, 0, 1);
    for (int i = 0; i <= n_predict; i++) {
        const float *logits = llama_get_logits_ith(lctx, -1);
        fprintf(out, "%s", i ? "," : "");
        put_floats(out, logits, (size_t)n_vocab);
        if (i == n_predict) break;
        llama_token t = greedy[i] = argmax(logits, n_vocab);
        b.n_tokens = 1;
        b.token[0] = t;
        b.pos[0] = n_past++;
        b.n_seq_id[0] = 1;
        b.seq_id[0][0] = 0;
        b.logits[0] = 1;
        if (llama_decode(lctx, b) != 0) {
            fprintf(stderr, "llama_decode failed at step %d\n", i);
            return 1;
        }
    }
    fprintf(out, "], \"greedy\": [");
    for (int i = 0; i < n_predict; i++)
        fprintf(out, "%s%d", i ? "," : "", greedy[i]);
    fprintf(out, "]}\n");
    fclose(out);
    llama_batch_free(b);
    free(greedy);
    mtmd_input_chunks_free(chunks);
    mtmd_bitmap_free(bw.bitmap);
    mtmd_free(mctx);
    llama_free(lctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
