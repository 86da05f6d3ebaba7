/* test_chat_image.c — lt_chat_images end to end on the CPU, on a copy of the committed tf5
 * fixture (a tiny Gemma3ForConditionalGeneration: one SigLIP layer, 4 soft tokens per image,
 * the image token past the embedding) whose projector, zero in the fixture (transformers'
 * init), gets random values so that the soft tokens carry the image.
 *
 * Checks: the prompt ids hold one image block per image where Gemma 3's processor
 * (transformers' processing_gemma3.py) puts it, against ids built here from lt_tokenize; a
 * greedy image chat replies what greedy decoding over lt_logits_image of the same ids and
 * images gives; another image changes the logits; later turns re-render the earlier images (the
 * replies follow lt_logits_image over the whole conversation with all its images); the cache
 * is never reused across different images behind equal ids; bad input (a missing file, a file
 * that is not an image, a truncated PNG, "<start_of_image>" in the text, a text-only model, a
 * conversation longer than max_seq) is refused with a message, the history unchanged and the
 * session usable; %train on a messages row with an image: step 0's loss equals the
 * cross-entropy of lt_logits_image's logits, training lowers it, another image changes it, and
 * bad image files are refused by line; %lora with the tower's linears and the projector in
 * targets=: %train trains through the tower (step 0 as the frozen tower's, the loss lowered, the
 * tower's adapters moved, another run than the frozen one, the memory plan saying so), the
 * adapter saves and loads back to the same logits, and %save merged= writes the multimodal model
 * with the tower's adapters merged (the same logits once loaded). TAP. The model runs on the
 * CPU; LATHE_TEST_DEVICE=cuda runs the multimodal loads on the GPU instead, the tower's training
 * and its merged save included (a manual check; make check stays on the CPU).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda/engine.h"
#include "cuda/formats/safetensors.h"
#include "tests/unit/tap.h"
#include "tests/unit/test_files.h"

#ifndef LATHE_SRCDIR
#define LATHE_SRCDIR "."
#endif

#define PROJ "model.multi_modal_projector.mm_input_projection_weight"
#define MM 4       /* tf5's mm_tokens_per_image */
#define BOI 8      /* boi_token_index */
#define EOI 9      /* eoi_token_index */
#define IMAGE 4096 /* image_token_index */

static const char *test_device(void) {
    const char *d = getenv("LATHE_TEST_DEVICE");
    return d && *d ? d : "cpu";
}

static char *slurp(const char *path, size_t *n) {
    return (char *)test_read_file(path, n);
}

static int spill(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int rc = fwrite(p, 1, n, f) == n ? 0 : -1;
    return fclose(f) == 0 ? rc : -1;
}

/* Copies tf5 into dir, the projector (F16) filled with random values in +-[1/32, 1). */
static int make_fixture(const char *dir) {
    static const char *files[] = {"config.json",
                                  "tokenizer.model",
                                  "model.safetensors.index.json",
                                  "model-00001-of-00003.safetensors",
                                  "model-00002-of-00003.safetensors",
                                  "model-00003-of-00003.safetensors"};
    int patched = 0;
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char from[4096], to[4096];
        snprintf(from, sizeof from, "%s/tests/fixtures/tf5/%s", test_srcdir(), files[i]);
        snprintf(to, sizeof to, "%s/%s", dir, files[i]);
        size_t n;
        char *p = slurp(from, &n);
        if (!p) return -1;
        int st = strstr(files[i], ".safetensors") && !strstr(files[i], "index");
        const char *hit = st && n > 8 ? strstr(p + 8, "\"" PROJ "\"") : NULL;
        if (hit) {
            uint64_t hlen = 0;
            for (int b = 7; b >= 0; b--)
                hlen = hlen << 8 | (unsigned char)p[b];
            long a = 0, e = 0;
            const char *off = strstr(hit, "\"data_offsets\"");
            if (!off || sscanf(strchr(off, '[') + 1, "%ld , %ld", &a, &e) != 2 ||
                8 + hlen + (uint64_t)e > n) {
                free(p);
                return -1;
            }
            unsigned char *w = (unsigned char *)p + 8 + hlen + a;
            unsigned s = 4242;
            for (long k = 0; k < (e - a) / 2; k++) {
                s = s * 1664525u + 1013904223u;
                unsigned r = s >> 8;
                unsigned h = (r & 1) << 15 | (10 + (r >> 1) % 5) << 10 | ((r >> 4) & 0x3ff);
                w[2 * k] = (unsigned char)(h & 0xff);
                w[2 * k + 1] = (unsigned char)(h >> 8);
            }
            patched = 1;
        }
        int rc = spill(to, p, n);
        free(p);
        if (rc) return -1;
    }
    return patched ? 0 : -1;
}

typedef struct collect {
    char text[8192];
} collect;

static void on_text(void *ctx, const char *piece) {
    collect *c = ctx;
    strncat(c->text, piece, sizeof c->text - strlen(c->text) - 1);
}

static lt_gen_opts greedy(int max_new) {
    lt_gen_opts o;
    lt_gen_opts_default(&o);
    o.temperature = 0;
    o.max_new = max_new;
    return o;
}

static int one_id(lt_session *s, const char *piece) {
    int32_t *ids = NULL;
    int n = 0, id = -1;
    if (lt_tokenize(s, piece, &ids, &n) == LT_OK && n == 1) id = ids[0];
    free(ids);
    return id;
}

/* The text greedy decoding over lt_logits_image gives for steps tokens after ids (with the
 * images), stopping at <eos> / <end_of_turn>. *last: the last row of the first call. */
static char *greedy_ref(lt_session *s, const int32_t *ids, int n, const char *const *imgs, int ni,
                        int steps, float *first_row) {
    int stop1 = one_id(s, "<eos>"), stop2 = one_id(s, "<end_of_turn>");
    int32_t *seq = malloc(sizeof(int32_t) * (size_t)(n + steps));
    memcpy(seq, ids, sizeof(int32_t) * (size_t)n);
    int len = n;
    for (int k = 0; k < steps; k++) {
        float *lg = NULL;
        int V = 0;
        if (lt_logits_image(s, seq, len, imgs, ni, NULL, &lg, &V) != LT_OK) {
            diag("lt_logits_image: %s", lt_last_error(s));
            free(seq);
            return NULL;
        }
        const float *row = lg + (size_t)(len - 1) * V;
        if (k == 0 && first_row) memcpy(first_row, row, sizeof(float) * (size_t)V);
        int best = 0;
        for (int v = 1; v < V; v++)
            if (row[v] > row[best]) best = v;
        free(lg);
        if (best == stop1 || best == stop2) break;
        seq[len++] = best;
    }
    char *text = NULL;
    if (lt_detokenize(s, seq + n, len - n, &text) != LT_OK) text = NULL;
    free(seq);
    return text;
}

/* ids == want, printing the first difference */
static int same_ids(const int32_t *got, int ng, const int32_t *want, int nw) {
    for (int i = 0; i < ng && i < nw; i++)
        if (got[i] != want[i]) {
            diag("ids differ at %d: %d vs %d", i, got[i], want[i]);
            return 0;
        }
    if (ng != nw) diag("%d ids, want %d", ng, nw);
    return ng == nw;
}

static void push_text(lt_session *s, int32_t *out, int *n, const char *text) {
    int32_t *t = NULL;
    int k = 0;
    if (lt_tokenize(s, text, &t, &k) == LT_OK) {
        memcpy(out + *n, t, sizeof(int32_t) * (size_t)k);
        *n += k;
    }
    free(t);
}

static void push_block(int32_t *out, int *n) {
    out[(*n)++] = BOI;
    for (int i = 0; i < MM; i++)
        out[(*n)++] = IMAGE;
    out[(*n)++] = EOI;
}

/* The prompt ids of the next turn, for comparing histories. */
static int32_t *prompt_ids(lt_session *s, const char *text, int ni, int *n) {
    int32_t *ids = NULL;
    if (lt_chat_prompt_ids(s, text, NULL, ni, NULL, &ids, n) != LT_OK) {
        diag("lt_chat_prompt_ids: %s", lt_last_error(s));
        *n = 0;
    }
    return ids;
}

static void test_rendering(lt_session *s) {
    int32_t want[256];
    int nw = 0, n = 0;
    want[nw++] = 2; /* BOS */
    push_text(s, want, &nw, "<start_of_turn>user\n\n\n");
    push_block(want, &nw);
    push_text(s, want, &nw, "\n\nWhat is it?<end_of_turn>\n<start_of_turn>model\n");
    int32_t *got = prompt_ids(s, "  What is it?\n", 1, &n);
    ok(got && same_ids(got, n, want, nw),
       "one image: <start_of_turn>user\\n + \\n\\n, the block, \\n\\n + the stripped text");
    free(got);

    nw = 0;
    want[nw++] = 2;
    push_text(s, want, &nw, "<start_of_turn>user\n\n\n");
    push_block(want, &nw);
    push_text(s, want, &nw, "\n\n\n\n");
    push_block(want, &nw);
    push_text(s, want, &nw, "\n\nCompare.<end_of_turn>\n<start_of_turn>model\n");
    got = prompt_ids(s, "Compare.", 2, &n);
    ok(got && same_ids(got, n, want, nw), "two images: two blocks, \\n\\n\\n\\n between them");
    int blocks = 0, images = 0;
    for (int i = 0; got && i < n; i++) {
        blocks += got[i] == BOI;
        images += got[i] == IMAGE;
        if (got[i] == BOI) {
            int run = 0;
            while (i + 1 + run < n && got[i + 1 + run] == IMAGE)
                run++;
            if (run != MM || i + 1 + run >= n || got[i + 1 + run] != EOI) blocks = -100;
        }
    }
    ok(blocks == 2 && images == 2 * MM,
       "each image is <start_of_image>, mm image tokens, <end_of_image>");
    free(got);

    lt_chat_system(s, "Be brief.");
    nw = 0;
    want[nw++] = 2;
    push_text(s, want, &nw, "<start_of_turn>user\nBe brief.\n\n\n\n");
    push_block(want, &nw);
    push_text(s, want, &nw, "\n\nHi<end_of_turn>\n<start_of_turn>model\n");
    got = prompt_ids(s, "Hi", 1, &n);
    ok(got && same_ids(got, n, want, nw), "a system prompt comes before the image");
    free(got);
    lt_chat_system(s, NULL);

    /* no image: the ids of the text template, as lt_chat always rendered them */
    const char *roles[1] = {"user"}, *contents[1] = {"Hello"};
    char *text = NULL;
    lt_chat_render(s, roles, contents, 1, 1, &text);
    nw = 0;
    want[nw++] = 2;
    push_text(s, want, &nw, text ? text + 5 : "");
    free(text);
    got = prompt_ids(s, "Hello", 0, &n);
    ok(got && same_ids(got, n, want, nw), "no image: the text template's ids");
    free(got);
}

/* One greedy turn against greedy_ref over the same ids and images; 1 when they agree. */
static int turn_matches(lt_session *s, const char *text, const char *const *new_imgs, int n_new,
                        const char *const *all_imgs, int n_all, int steps, const char *what) {
    int n = 0;
    int32_t *ids = prompt_ids(s, text, n_new, &n);
    char *want = ids ? greedy_ref(s, ids, n, all_imgs, n_all, steps, NULL) : NULL;
    free(ids);
    collect c = {""};
    lt_callbacks cb = {&c, NULL, NULL, on_text};
    lt_gen_opts o = greedy(steps);
    char *reply = NULL;
    lt_status rc = lt_chat_images(s, text, new_imgs, n_new, NULL, &o, &cb, &reply);
    if (rc != LT_OK) diag("%s: %s", what, lt_last_error(s));
    int good = rc == LT_OK && want && reply && !strcmp(reply, want) && !strcmp(c.text, reply);
    if (!good)
        diag("%s: reply '%s', streamed '%s', want '%s'", what, reply ? reply : "(null)", c.text,
             want ? want : "(null)");
    free(want);
    free(reply);
    return good;
}

static void test_replies(lt_session *s, const char *rgb, const char *grey, const char *rgba) {
    const char *one[1] = {rgb}, *other[1] = {grey};
    lt_chat_reset(s);
    ok(turn_matches(s, "Describe the image.", one, 1, one, 1, 4, "rgb"),
       "an image chat replies greedy lt_logits_image's tokens over the same ids and image");
    lt_chat_reset(s);
    ok(turn_matches(s, "Describe the image.", other, 1, other, 1, 4, "grey"),
       "... with another image too (a fresh conversation, the same ids)");

    /* another image changes the logits after its block */
    lt_chat_reset(s);
    int n = 0;
    int32_t *ids = prompt_ids(s, "Describe the image.", 1, &n);
    float *a = NULL, *b = NULL;
    int V = 0;
    lt_status r1 = lt_logits_image(s, ids, n, one, 1, NULL, &a, &V);
    lt_status r2 = lt_logits_image(s, ids, n, other, 1, NULL, &b, &V);
    double diff = 0;
    for (int v = 0; r1 == LT_OK && r2 == LT_OK && v < V; v++) {
        double d = a[(size_t)(n - 1) * V + v] - b[(size_t)(n - 1) * V + v];
        diff = d > diff ? d : -d > diff ? -d : diff;
    }
    diag("largest change of the last logits between the images: %g", diff);
    ok(r1 == LT_OK && r2 == LT_OK && diff > 1e-3, "another image changes the logits");
    free(a);
    free(b);
    free(ids);

    /* later turns re-render the earlier images: their soft tokens at their blocks */
    lt_chat_reset(s);
    const char *both[2] = {rgb, grey}, *last[1] = {rgba};
    ok(turn_matches(s, "What is this?", one, 1, one, 1, 3, "turn 1"), "turn 1 with an image");
    ok(turn_matches(s, "And this one?", other, 1, both, 2, 3, "turn 2"),
       "turn 2 with a second image: its reply follows lt_logits_image with both images");
    ok(turn_matches(s, "Compare them.", NULL, 0, both, 2, 3, "turn 3"),
       "turn 3, text only: the two earlier images are still in its prompt");
    ok(turn_matches(s, "And with two at once?", (const char *const[]){grey, rgba}, 2,
                    (const char *const[]){rgb, grey, grey, rgba}, 4, 3, "turn 4"),
       "turn 4 with two images: four blocks, in order");
    ok(turn_matches(s, "Again.", last, 1, (const char *const[]){rgb, grey, grey, rgba, rgba}, 5, 2,
                    "turn 5"),
       "turn 5: the history's images and a new one");

    /* equal ids, another image: the cache of the rgb prompt must not be reused */
    lt_chat_reset(s);
    lt_gen_opts o = greedy(1);
    char *reply = NULL;
    int np = 0;
    int32_t *p1 = prompt_ids(s, "Describe the image.", 1, &np);
    lt_chat_images(s, "Describe the image.", one, 1, NULL, &o, NULL,
                   &reply); /* caches its prompt */
    free(reply);
    lt_chat_reset(s);
    const char *longer = "Describe the image.<end_of_turn>\n<start_of_turn>model\nA colour.";
    int nl = 0;
    int32_t *p2 = prompt_ids(s, longer, 1, &nl);
    int extends = p1 && p2 && nl > np && !memcmp(p1, p2, sizeof(int32_t) * (size_t)np);
    ok(extends, "(a prompt with another image whose ids extend the cached ones)");
    free(p1);
    free(p2);
    ok(turn_matches(s, longer, other, 1, other, 1, 4, "cache"),
       "equal ids with another image: the reply follows that image (the cache is not reused)");
}

static void test_bad_input(lt_session *s, const char *rgb, const char *dir) {
    lt_chat_reset(s);
    const char *one[1] = {rgb};
    lt_gen_opts o = greedy(2);
    char *reply = NULL;
    lt_chat_images(s, "First.", one, 1, NULL, &o, NULL, &reply);
    free(reply);
    int n0 = 0;
    int32_t *before = prompt_ids(s, "Next.", 0, &n0);

    char missing[4200], junk[4200], trunc[4200];
    snprintf(missing, sizeof missing, "%s/no-such.png", dir);
    snprintf(junk, sizeof junk, "%s/junk.png", dir);
    snprintf(trunc, sizeof trunc, "%s/truncated.png", dir);
    spill(junk, "this is not an image\n", 21);
    size_t pn;
    char *png = slurp(rgb, &pn);
    if (png) spill(trunc, png, pn / 2);
    free(png);
    struct {
        const char *text, *file;
        lt_status want;
        const char *says, *what;
    } bad[] = {
        {"Look.", missing, LT_ERR_IO, "no-such.png", "a missing image file"},
        {"Look.", junk, LT_ERR_FORMAT, "not a PNG or JPEG", "a file that is not an image"},
        {"Look.", trunc, LT_ERR_FORMAT, "PNG", "a truncated PNG"},
        {"Look at <start_of_image> here.", rgb, LT_ERR_ARG, "<start_of_image>",
         "a message that writes <start_of_image> itself"},
        {"Look.", "", LT_ERR_ARG, "no file name", "an empty file name"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        const char *imgs[2] = {rgb, bad[i].file};
        reply = NULL;
        lt_status rc = lt_chat_images(s, bad[i].text, imgs, 2, NULL, &o, NULL, &reply);
        char name[200];
        snprintf(name, sizeof name, "%s is refused with a message", bad[i].what);
        ok(rc == bad[i].want && strstr(lt_last_error(s), bad[i].says) && !reply, name);
        if (rc != bad[i].want || !strstr(lt_last_error(s), bad[i].says))
            diag("rc %d: %s", rc, lt_last_error(s));
        int n1 = 0;
        int32_t *after = prompt_ids(s, "Next.", 0, &n1);
        snprintf(name, sizeof name, "... the history is unchanged after %s", bad[i].what);
        ok(before && after && same_ids(after, n1, before, n0), name);
        free(after);
    }
    ok(lt_chat_images(s, "Next.", NULL, 0, NULL, &o, NULL, &reply) == LT_OK && reply,
       "the conversation goes on after the refused turns");
    free(reply);
    free(before);
}

static void test_text_only_model(void) {
    lt_session *s = lt_session_new();
    lt_load_opts lo;
    lt_load_opts_default(&lo);
    lo.device = "cpu";
    if (lt_load(s, "tiny", &lo, NULL) != LT_OK) {
        ok(0, "load tiny");
        diag("%s", lt_last_error(s));
        lt_session_free(s);
        return;
    }
    char png[4096];
    snprintf(png, sizeof png, "%s/tests/vision/data/rgb.png", test_srcdir());
    const char *one[1] = {png};
    lt_gen_opts o = greedy(2);
    char *reply = NULL;
    lt_status rc = lt_chat_images(s, "Look.", one, 1, NULL, &o, NULL, &reply);
    ok(rc == LT_ERR_ARG && strstr(lt_last_error(s), "image tower"),
       "an image for a text-only model is refused, naming the image tower");
    diag("%s", lt_last_error(s));
    int32_t *ids = NULL;
    int n = 0;
    ok(lt_chat_prompt_ids(s, "Look.", NULL, 1, NULL, &ids, &n) == LT_ERR_ARG && !ids,
       "... and so is rendering its prompt");
    ok(lt_chat(s, "Hello", &o, NULL, &reply) == LT_OK && reply, "... and text chat still works");
    free(reply);
    ids = prompt_ids(s, "Again", 0, &n);
    int turns = 0;
    for (int i = 0; ids && i < n; i++)
        turns += ids[i] == one_id(s, "<start_of_turn>");
    ok(turns == 4, "... with one earlier turn in the history (the refused one is not)");
    free(ids);
    lt_session_free(s);
}

static void test_max_seq(const char *dir, const char *rgb) {
    lt_session *s = lt_session_new();
    lt_load_opts lo;
    lt_load_opts_default(&lo);
    lo.device = test_device();
    lo.dtype = "fp32";
    lo.max_seq = 40;
    if (lt_load(s, dir, &lo, NULL) != LT_OK) {
        ok(0, "load the fixture with max_seq=40");
        diag("%s", lt_last_error(s));
        lt_session_free(s);
        return;
    }
    const char *six[6] = {rgb, rgb, rgb, rgb, rgb, rgb};
    lt_gen_opts o = greedy(2);
    char *reply = NULL;
    lt_status rc = lt_chat_images(s, "Count them.", six, 6, NULL, &o, NULL, &reply);
    ok(rc == LT_ERR_ARG && strstr(lt_last_error(s), "max_seq") && strstr(lt_last_error(s), "each"),
       "images past max_seq are refused, saying what an image takes");
    diag("%s", lt_last_error(s));
    ok(lt_chat_images(s, "Count it.", six, 1, NULL, &o, NULL, &reply) == LT_OK && reply,
       "... and a turn that fits runs next");
    if (!reply) diag("%s", lt_last_error(s));
    free(reply);
    lt_session_free(s);
}

/* Pan-and-scan with a 2-pixel min crop, so that the 7 x 5 rgb.png (ratio 1.4) is cut in 2: the
 * prompt holds 3 image blocks and Gemma3Processor's crop text, the chat replies, the next turn
 * re-renders the three blocks; bad options and a text-only model are refused, the session
 * usable. */
static int count_image_tokens(const int32_t *ids, int n) {
    int k = 0;
    for (int i = 0; ids && i < n; i++)
        k += ids[i] == IMAGE;
    return k;
}

static void test_pan_and_scan(lt_session *s, const char *rgb) {
    lt_chat_reset(s);
    lt_image_opts io;
    lt_image_opts_default(&io);
    ok(!io.pan_and_scan && io.pan_and_scan_min_crop_size == 256 &&
           io.pan_and_scan_max_num_crops == 4 && io.pan_and_scan_min_ratio_to_activate == 1.2,
       "lt_image_opts_default: Gemma3Processor's defaults");
    io.pan_and_scan = 1;
    io.pan_and_scan_min_crop_size = 2;
    const char *one[1] = {rgb};
    int blocks = 0;
    ok(lt_image_blocks(s, rgb, &io, &blocks) == LT_OK && blocks == 3,
       "pan-and-scan: rgb.png takes 3 blocks (itself and 2 crops)");
    int32_t *ids = NULL;
    int n = 0;
    ok(lt_chat_prompt_ids(s, "Look.", one, 1, &io, &ids, &n) == LT_OK &&
           count_image_tokens(ids, n) == 3 * MM,
       "pan-and-scan: the prompt holds 3 image blocks");
    char *text = NULL;
    if (ids) lt_detokenize(s, ids, n, &text);
    ok(text && strstr(text, "Here is the original image") &&
           strstr(text, "and here are some crops to help you see better"),
       "pan-and-scan: the prompt says it as Gemma3Processor does");
    free(text);
    free(ids);
    lt_gen_opts o = greedy(2);
    char *reply = NULL;
    lt_status rc = lt_chat_images(s, "Look.", one, 1, &io, &o, NULL, &reply);
    ok(rc == LT_OK && reply, "pan-and-scan: the chat replies");
    if (rc != LT_OK) diag("%s", lt_last_error(s));
    free(reply);
    ids = prompt_ids(s, "And now?", 0, &n);
    is_int(count_image_tokens(ids, n), 3 * MM, "the next turn re-renders the 3 blocks");
    free(ids);
    lt_image_opts bad = io;
    bad.pan_and_scan_max_num_crops = 0;
    rc = lt_chat_images(s, "Again.", one, 1, &bad, &o, NULL, &reply);
    ok(rc == LT_ERR_ARG && strstr(lt_last_error(s), "max_crops"),
       "pan_and_scan_max_num_crops 0 is refused, naming it");
    bad = io;
    bad.pan_and_scan_min_crop_size = 1; /* 7 x 5, min crop 1: 7 crops capped at 4, 2 wide: fine */
    bad.pan_and_scan_max_num_crops = 64;
    bad.pan_and_scan_min_ratio_to_activate = 1.0;
    rc = lt_image_blocks(s, rgb, &bad, &blocks);
    diag("min crop 1, 64 crops: %s, %d blocks", rc == LT_OK ? "ok" : lt_last_error(s), blocks);
    ids = prompt_ids(s, "Still there?", 0, &n);
    is_int(count_image_tokens(ids, n), 3 * MM, "after the refusals the history is unchanged");
    free(ids);
    lt_chat_reset(s);

    lt_session *t = lt_session_new();
    lt_load_opts lo;
    lt_load_opts_default(&lo);
    lo.device = "cpu";
    if (lt_load(t, "tiny", &lo, NULL) == LT_OK) {
        rc = lt_chat_images(t, "Hi.", NULL, 0, &io, &o, NULL, &reply);
        ok(rc == LT_ERR_ARG && strstr(lt_last_error(t), "pan-and-scan"),
           "pan-and-scan on a text-only model is refused");
        diag("%s", lt_last_error(t));
        ok(lt_chat_images(t, "Hi.", NULL, 0, NULL, &o, NULL, &reply) == LT_OK && reply,
           "and the session goes on");
        free(reply);
    } else {
        ok(0, "load tiny");
    }
    lt_session_free(t);
}

/* A one-row messages dataset in dir: a user image (img) and text, the assistant's reply. */
static void image_row(char *data, size_t cap, const char *dir, const char *name, const char *img) {
    char text[8400];
    snprintf(data, cap, "%s/%s", dir, name);
    snprintf(text, sizeof text,
             "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": "
             "\"%s\"}, {\"type\": \"text\", \"text\": \"Colour?\"}]}, {\"role\": \"assistant\", "
             "\"content\": \"Red and blue.\"}]}\n",
             img);
    spill(data, text, strlen(text));
}

static char plan_line[2000];

static void on_train_message(void *ctx, const char *text) {
    (void)ctx;
    if (strstr(text, "memory plan")) snprintf(plan_line, sizeof plan_line, "%s", text);
}

static double first_loss(lt_session *s, const char *data, int steps, float lr, double *last) {
    lt_train_opts o;
    lt_train_opts_default(&o);
    o.data = data;
    o.steps = steps;
    o.lr = lr;
    o.batch = 1;
    o.responses_only = 1;
    o.shuffle = 0;
    lt_train_result res;
    memset(&res, 0, sizeof res);
    lt_train_callbacks cb = {NULL, on_train_message, NULL};
    lt_status rc = lt_train(s, &o, &cb, &res);
    if (rc != LT_OK) diag("lt_train: %s", lt_last_error(s));
    if (last) *last = res.last_loss;
    return rc == LT_OK ? res.first_loss : -1;
}

/* %train on image rows: step 0's loss is the cross-entropy of lt_logits_image's logits over the
 * reply (the training forward is the inference forward), training lowers it, another image
 * changes it; bad image files are refused by line and the session trains on after. */
static void test_train_images(lt_session *s, const char *dir, const char *rgb, const char *grey) {
    lt_lora_opts lo;
    lt_lora_opts_default(&lo);
    lo.r = 2;
    ok(lt_lora_attach(s, &lo, NULL) == LT_OK, "(%lora on the multimodal fixture)");
    char data[4200], data2[4200];
    image_row(data, sizeof data, dir, "rgb.jsonl", rgb);
    image_row(data2, sizeof data2, dir, "grey.jsonl", grey);

    /* the reference: lt_chat_prompt_ids + the reply, through lt_logits_image */
    lt_chat_reset(s);
    int np = 0, nr = 0;
    int32_t *prompt = prompt_ids(s, "Colour?", 1, &np), *reply = NULL;
    lt_tokenize(s, "Red and blue.<end_of_turn>\n", &reply, &nr);
    int n = np + nr;
    int32_t *all = malloc(sizeof(int32_t) * (size_t)n);
    memcpy(all, prompt, sizeof(int32_t) * (size_t)np);
    memcpy(all + np, reply, sizeof(int32_t) * (size_t)nr);
    const char *one[1] = {rgb};
    float *lg = NULL;
    int V = 0;
    double want = 0;
    if (lt_logits_image(s, all, n, one, 1, NULL, &lg, &V) == LT_OK) {
        for (int j = 0; j < nr; j++) {
            const float *z = lg + (size_t)(np - 1 + j) * V;
            double mx = -1e30, se = 0;
            for (int v = 0; v < V; v++)
                mx = z[v] > mx ? z[v] : mx;
            for (int v = 0; v < V; v++)
                se += exp(z[v] - mx);
            want += mx + log(se) - z[reply[j]];
        }
        want /= nr;
    }
    free(lg);
    free(prompt);
    free(reply);
    free(all);
    double got = first_loss(s, data, 1, 1e-9f, NULL);
    diag("step 0 loss %.7f, from lt_logits_image %.7f", got, want);
    ok(want > 0 && fabs(got - want) <= 1e-4 * want,
       "%train on an image row: step 0's loss is lt_logits_image's cross-entropy of the reply");
    double other = first_loss(s, data2, 1, 1e-9f, NULL);
    diag("another image: step 0 loss %.7f", other);
    ok(other > 0 && fabs(other - got) > 1e-5 * got, "... another image changes step 0's loss");
    double last = 0, f = first_loss(s, data, 12, 3e-2f, &last);
    diag("12 steps: %.5f -> %.5f", f, last);
    ok(f > 0 && last < f - 0.05, "... training steps lower the loss on the repeated row");
    diag("%s", plan_line);
    ok(strstr(plan_line, "image tower") && strstr(plan_line, "soft tokens of 1 image(s)"),
       "... the memory plan counts the image tower and the soft tokens");

    char junk[4200], trunc[4200], bad[4200];
    snprintf(junk, sizeof junk, "%s/junk2.png", dir);
    snprintf(trunc, sizeof trunc, "%s/trunc2.png", dir);
    spill(junk, "this is not an image\n", 21);
    size_t pn;
    char *png = slurp(rgb, &pn);
    if (png) spill(trunc, png, pn / 2);
    free(png);
    image_row(bad, sizeof bad, dir, "junk.jsonl", junk);
    lt_train_opts o;
    lt_train_opts_default(&o);
    o.data = bad;
    o.steps = 1;
    lt_train_result res;
    ok(lt_train(s, &o, NULL, &res) != LT_OK && strstr(lt_last_error(s), "junk.jsonl line 1") &&
           strstr(lt_last_error(s), "not a PNG or JPEG"),
       "%train: a file that is not an image is refused by line");
    diag("%s", lt_last_error(s));
    image_row(bad, sizeof bad, dir, "trunc.jsonl", trunc);
    ok(lt_train(s, &o, NULL, &res) != LT_OK && strstr(lt_last_error(s), "trunc.jsonl line 1") &&
           strstr(lt_last_error(s), "PNG"),
       "%train: a truncated PNG is refused by line");
    diag("%s", lt_last_error(s));
    ok(first_loss(s, data, 2, 1e-3f, NULL) > 0, "... and image training runs next");
}

/* The largest |value| of a tensor in an adapter file (-1 when it is not there). */
static double max_abs(const char *dir, const char *name) {
    char path[4300], err[LT_ERRLEN];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_set st;
    if (st_open(&st, path, err) != LT_OK) return -1;
    const st_tensor *t = st_find(&st, name);
    double m = -1;
    if (t && t->dtype == LT_F32) {
        m = 0;
        int64_t n = 1;
        for (int d = 0; d < t->ndim; d++)
            n *= t->shape[d];
        for (int64_t i = 0; i < n; i++)
            m = fmax(m, fabs(((const float *)t->data)[i]));
    }
    st_close(&st);
    return m;
}

/* %lora with the tower's linears and the projector in targets=: %train encodes each step's image
 * anew and trains through the tower. Step 0 equals the frozen tower's (the adapters start as
 * identity), training lowers the loss and moves the tower's adapters, the run differs from the
 * frozen-tower run; the memory plan says the tower trains; the adapter saves under PEFT's names
 * and loads back to the same logits; %save merged= writes the multimodal model, the tower's
 * adapters merged, which loads to the same logits. */
static void test_train_tower(lt_session *s, const char *dir, const char *rgb) {
    char data[4200], ad[4300], ad2[4300];
    image_row(data, sizeof data, dir, "rgb_tower.jsonl", rgb);
    lt_lora_opts lo;
    lt_lora_opts_default(&lo);
    lo.r = 2;
    lo.seed = 11;
    ok(lt_lora_attach(s, &lo, NULL) == LT_OK, "(%lora on the language model: the frozen tower)");
    double frozen_last = 0, frozen_first = first_loss(s, data, 6, 3e-2f, &frozen_last);
    lo.targets = "q,k,v,o,gate,up,down,vision,projector";
    ok(lt_lora_attach(s, &lo, NULL) == LT_OK, "%lora targets=...,vision,projector attaches");
    if (lt_last_error(s)[0]) diag("%s", lt_last_error(s));
    lt_lora_info info;
    lt_lora_info_get(s, &info);
    ok(info.n_modules == 7 * 7 + 6 + 1, "... 49 text linears, the tower's six and the projector");
    const char *one[1] = {rgb};
    lt_chat_reset(s);
    ok(turn_matches(s, "What colour is it?", one, 1, one, 1, 4, "before training"),
       "(a chat turn with the image before the tower trains)");
    plan_line[0] = 0;
    double last = 0, first = first_loss(s, data, 6, 3e-2f, &last);
    diag("frozen tower: %.6f -> %.6f; tower trained: %.6f -> %.6f", frozen_first, frozen_last,
         first, last);
    ok(first > 0 && fabs(first - frozen_first) <= 1e-6 * frozen_first,
       "... step 0's loss equals the frozen tower's (B = 0: the adapters start as identity)");
    ok(last < first - 0.05, "... training through the tower lowers the loss");
    /* the history's image is encoded again through the trained tower, as transformers encodes
     * pixel_values on every generate: the next turn equals greedy decoding over lt_logits_image */
    ok(turn_matches(s, "And now?", NULL, 0, one, 1, 4, "after training"),
       "%chat after training the tower: the earlier image's soft tokens are the trained tower's");
    ok(fabs(last - frozen_last) > 1e-4 * frozen_last,
       "... and the run differs from the frozen-tower run");
    diag("%s", plan_line);
    ok(strstr(plan_line, "image tower trained (7 adapters") != NULL,
       "... the memory plan counts the tower's backward");
    snprintf(ad, sizeof ad, "%s/tower_adapter", dir);
    ok(lt_save_adapter(s, ad) == LT_OK, "%save adapter= with the tower's adapters");
    double vb = max_abs(ad, "base_model.model.model.vision_tower.encoder.layers.0.mlp.fc1.lora_B"
                            ".weight"),
           pb = max_abs(ad, "base_model.model.model.multi_modal_projector.lora_B.weight");
    diag("max |lora_B|: tower fc1 %.3g, projector %.3g", vb, pb);
    ok(vb > 0 && pb > 0, "... the tower's and the projector's adapters moved from zero");
    /* logits with the trained adapters, then after loading the saved adapter back */
    lt_chat_reset(s);
    int np = 0;
    int32_t *ids = prompt_ids(s, "Colour?", 1, &np);
    float *lg1 = NULL, *lg2 = NULL;
    int V = 0;
    lt_status r1 = lt_logits_image(s, ids, np, one, 1, NULL, &lg1, &V);
    lt_lora_opts ld;
    lt_lora_opts_default(&ld);
    ld.r = 4; /* the adapter's config wins */
    ld.load = ad;
    lt_lora_attach(s, &lo, NULL); /* fresh adapters in between: the load must bring them back */
    float *lg0 = NULL;
    double moved = 0;
    if (r1 == LT_OK && lt_logits_image(s, ids, np, one, 1, NULL, &lg0, &V) == LT_OK)
        for (int64_t i = 0; i < (int64_t)np * V; i++)
            moved = fmax(moved, fabs((double)lg1[i] - lg0[i]));
    free(lg0);
    diag("trained vs fresh adapters: max |dlogit| %.3g", moved);
    ok(moved > 1e-3,
       "... the trained adapters change the image logits (the checks below see them)");
    ok(lt_lora_attach(s, &ld, NULL) == LT_OK, "%lora load= of the saved tower adapter");
    if (lt_last_error(s)[0]) diag("%s", lt_last_error(s));
    lt_lora_info_get(s, &info);
    lt_status r2 = lt_logits_image(s, ids, np, one, 1, NULL, &lg2, &V);
    int same = r1 == LT_OK && r2 == LT_OK && info.n_modules == 7 * 7 + 6 + 1;
    for (int64_t i = 0; same && i < (int64_t)np * V; i++)
        same = fabsf(lg1[i] - lg2[i]) <= 1e-5f * (1.0f + fabsf(lg1[i]));
    ok(same, "... its logits on the image equal the trained adapters' (PEFT save -> load)");
    /* %save merged=: the tower's adapters merged into its weights, the whole multimodal model */
    snprintf(ad2, sizeof ad2, "%s/tower_merged", dir);
    ok(lt_save_merged(s, ad2, "fp32", NULL) == LT_OK, "%save merged= with tower adapters");
    if (lt_last_error(s)[0]) diag("%s", lt_last_error(s));
    lt_session *s2 = lt_session_new();
    lt_load_opts lo2;
    lt_load_opts_default(&lo2);
    lo2.device = "cpu";
    lo2.dtype = "fp32";
    float *lg3 = NULL;
    lt_status r3 = lt_load(s2, ad2, &lo2, NULL);
    if (r3 != LT_OK) diag("%s", lt_last_error(s2));
    lt_model_info mi;
    if (r3 == LT_OK) lt_model_info_get(s2, &mi);
    if (r3 == LT_OK) r3 = lt_logits_image(s2, ids, np, one, 1, NULL, &lg3, &V);
    double worst = 0, big = 0;
    for (int64_t i = 0; r1 == LT_OK && r3 == LT_OK && i < (int64_t)np * V; i++) {
        worst = fmax(worst, fabs((double)lg1[i] - lg3[i]));
        big = fmax(big, fabs((double)lg1[i]));
    }
    diag("merged vs adapters: max |dlogit| %.3g of max |logit| %.3g", worst, big);
    ok(r3 == LT_OK && mi.vision_loaded && worst <= 1e-4 * (1 + big),
       "... it loads as a multimodal model whose image logits equal the adapters' (merged tower)");
    free(lg3);
    lt_session_free(s2);
    /* LoRA dropout on the tower's linears (not on the projector, as PEFT) */
    lt_lora_opts dl;
    lt_lora_opts_default(&dl);
    dl.r = 2;
    dl.dropout = 0.1f;
    dl.targets = "q,v,vision";
    double dlast = 0, dfirst = -1;
    if (lt_lora_attach(s, &dl, NULL) == LT_OK) dfirst = first_loss(s, data, 4, 3e-2f, &dlast);
    diag("dropout 0.1 through the tower: %.6f -> %.6f", dfirst, dlast);
    ok(dfirst > 0 && dlast < dfirst,
       "%train with dropout=0.1 on the tower's linears lowers the loss");
    dl.targets = "q,v,projector";
    ok(lt_lora_attach(s, &dl, NULL) != LT_OK && strstr(lt_last_error(s), "ParamWrapper"),
       "dropout with the projector is refused, as PEFT refuses it");
    free(ids);
    free(lg1);
    free(lg2);
}

/* A float32 tensor of a safetensors file, copied out (NULL when missing), and its count. */
static float *st_floats(const char *path, const char *name, int64_t *count) {
    char err[LT_ERRLEN];
    st_set st;
    *count = 0;
    if (st_open(&st, path, err) != LT_OK) return NULL;
    const st_tensor *t = st_find(&st, name);
    float *v = t && t->dtype == LT_F32 ? malloc(t->nbytes + 4) : NULL;
    if (v) {
        memcpy(v, t->data, t->nbytes);
        *count = (int64_t)(t->nbytes / 4);
    }
    st_close(&st);
    return v;
}

/* NAME.step of DIR/checkpoint-STEP/optimizer.safetensors, or -1. */
static float ckpt_steps(const char *save, int step, const char *name) {
    char path[4400], key[300];
    snprintf(path, sizeof path, "%s/checkpoint-%d/optimizer.safetensors", save, step);
    snprintf(key, sizeof key, "%s.step", name);
    int64_t n = 0;
    float *v = st_floats(path, key, &n);
    float r = v && n == 1 ? v[0] : -1;
    free(v);
    return r;
}

/* 1 when tensor NAME is the same, bit for bit, in params.safetensors of two checkpoints. */
static int ckpt_same(const char *save, int s1, int s2, const char *name) {
    char p1[4400], p2[4400];
    snprintf(p1, sizeof p1, "%s/checkpoint-%d/params.safetensors", save, s1);
    snprintf(p2, sizeof p2, "%s/checkpoint-%d/params.safetensors", save, s2);
    int64_t n1 = 0, n2 = 0;
    float *a = st_floats(p1, name, &n1), *b = st_floats(p2, name, &n2);
    int same = a && b && n1 == n2 && !memcmp(a, b, sizeof(float) * (size_t)n1);
    free(a);
    free(b);
    return same;
}

/* Overwrites the float32 scalar NAME of a safetensors file in place with v. */
static int st_patch_scalar(const char *path, const char *name, float v) {
    size_t n = 0;
    char *b = test_read_file(path, &n);
    char key[320];
    snprintf(key, sizeof key, "\"%s\"", name);
    char *at = b && n > 8 ? strstr(b + 8, key) : NULL;
    char *offs = at ? strstr(at, "\"data_offsets\"") : NULL;
    long long off = -1;
    uint64_t hl = 0;
    if (offs) {
        memcpy(&hl, b, 8);
        off = strtoll(strchr(offs, '[') + 1, NULL, 10);
    }
    int good = off >= 0 && 8 + hl + (uint64_t)off + 4 <= n;
    if (good) memcpy(b + 8 + hl + off, &v, 4);
    good = good && spill(path, b, n) == 0;
    free(b);
    return good;
}

/* A step whose batch holds no image leaves the tower's and the projector's adapters as they are
 * (torch.optim.AdamW skips a parameter whose grad is None: no momentum, no decay), and each
 * parameter's bias correction counts its own steps (torch's per-parameter state['step']), which
 * a checkpoint keeps (NAME.step) and a resumed run continues from, bit for bit. Bad input: a
 * step count that is not a whole number is refused, naming it. */
static void test_tower_waits_without_images(lt_session *s, const char *dir, const char *rgb) {
    char data[4200], save[4300], text[8800];
    snprintf(data, sizeof data, "%s/img_text_img.jsonl", dir);
    snprintf(save, sizeof save, "%s/tower_ckpt", dir);
    const char *img_row = "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": "
                          "\"image\", \"image\": \"%s\"}, {\"type\": \"text\", \"text\": "
                          "\"Colour?\"}]}, {\"role\": \"assistant\", \"content\": \"Red.\"}]}\n";
    int len = snprintf(text, sizeof text, img_row, rgb);
    len += snprintf(text + len, sizeof text - (size_t)len,
                    "{\"messages\": [{\"role\": \"user\", \"content\": \"Say hi.\"}, "
                    "{\"role\": \"assistant\", \"content\": \"Hi there.\"}]}\n");
    len += snprintf(text + len, sizeof text - (size_t)len, img_row, rgb);
    spill(data, text, (size_t)len);
    lt_lora_opts lo;
    lt_lora_opts_default(&lo);
    lo.r = 2;
    lo.seed = 5;
    lo.targets = "q,v,vision,projector";
    ok(lt_lora_attach(s, &lo, NULL) == LT_OK, "(%lora on q, v, the tower and the projector)");
    lt_train_opts o;
    lt_train_opts_default(&o);
    o.data = data;
    o.steps = 3;
    o.lr = 3e-2f;
    o.weight_decay = 0.1f;
    o.batch = 1;
    o.shuffle = 0;
    o.save = save;
    o.save_every = 1;
    lt_train_result res;
    memset(&res, 0, sizeof res);
    lt_status rc = lt_train(s, &o, NULL, &res);
    if (rc != LT_OK) diag("lt_train: %s", lt_last_error(s));
    ok(rc == LT_OK, "%train over an image row, a text row and an image row, a checkpoint a step");
    const char *tw = "model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight",
               *pj = "model.multi_modal_projector.lora_B.weight",
               *tx = "model.layers.0.self_attn.q_proj.lora_A.weight";
    ok(ckpt_same(save, 1, 2, tw) && ckpt_same(save, 1, 2, pj),
       "the text-only step leaves the tower's and the projector's adapters bit for bit");
    ok(!ckpt_same(save, 1, 2, tx), "... and moves the language model's");
    ok(!ckpt_same(save, 2, 3, tw) && !ckpt_same(save, 2, 3, pj),
       "the next image step moves the tower's and the projector's again");
    float t1 = ckpt_steps(save, 1, tw), t2 = ckpt_steps(save, 2, tw), t3 = ckpt_steps(save, 3, tw),
          x3 = ckpt_steps(save, 3, tx), p3 = ckpt_steps(save, 3, pj);
    diag("AdamW step counts: tower %g %g %g, projector %g, text %g (after steps 1, 2, 3)", t1, t2,
         t3, p3, x3);
    ok(t1 == 1 && t2 == 1 && t3 == 2 && p3 == 2 && x3 == 3,
       "each parameter counts its own AdamW steps (tower 1, 1, 2; text 3), kept as NAME.step");
    /* resume after the text-only step: the tower's second update uses its own count */
    char ck2[4400], out[4400];
    snprintf(ck2, sizeof ck2, "%s/checkpoint-2", save);
    snprintf(out, sizeof out, "%s/tower_resumed", dir);
    lt_train_opts r;
    lt_train_opts_default(&r);
    r.resume = ck2;
    r.save = out;
    memset(&res, 0, sizeof res);
    rc = lt_train(s, &r, NULL, &res);
    if (rc != LT_OK) diag("lt_train resume: %s", lt_last_error(s));
    char a3[4500], b3[4500];
    snprintf(a3, sizeof a3, "%s/checkpoint-3", save);
    snprintf(b3, sizeof b3, "%s/checkpoint-3", out);
    int64_t na = 0, nb = 0;
    char pa[4600], pb[4600];
    snprintf(pa, sizeof pa, "%s/params.safetensors", a3);
    snprintf(pb, sizeof pb, "%s/params.safetensors", b3);
    float *va = st_floats(pa, tw, &na), *vb = st_floats(pb, tw, &nb);
    ok(rc == LT_OK && va && vb && na == nb && !memcmp(va, vb, sizeof(float) * (size_t)na),
       "resuming from the checkpoint after the text step gives step 3's tower adapter bit for bit");
    free(va);
    free(vb);
    /* bad input: a step count of 1.5 */
    char opt[4500];
    snprintf(opt, sizeof opt, "%s/optimizer.safetensors", ck2);
    char key[300];
    snprintf(key, sizeof key, "%s.step", tw);
    ok(st_patch_scalar(opt, key, 1.5f), "(checkpoint-2's tower step count set to 1.5)");
    rc = lt_train(s, &r, NULL, &res);
    diag("%s", lt_last_error(s));
    ok(rc != LT_OK && strstr(lt_last_error(s), key) && strstr(lt_last_error(s), "step count"),
       "bad input: a step count that is not a whole number is refused, naming it");
    lt_train_opts_default(&o);
    o.data = data;
    o.steps = 1;
    o.batch = 1;
    ok(lt_train(s, &o, NULL, &res) == LT_OK, "... and the session trains on after");
}

int main(void) {
    char dir[] = "/tmp/lathe-chat-image-XXXXXX";
    if (!mkdtemp(dir) || make_fixture(dir) != 0) {
        printf("Bail out! cannot copy tests/fixtures/tf5 into %s\n", dir);
        return 1;
    }
    char rgb[4096], grey[4096], rgba[4096];
    snprintf(rgb, sizeof rgb, "%s/tests/vision/data/rgb.png", test_srcdir());
    snprintf(grey, sizeof grey, "%s/tests/vision/data/grey.png", test_srcdir());
    snprintf(rgba, sizeof rgba, "%s/tests/vision/data/rgba.png", test_srcdir());
    lt_session *s = lt_session_new();
    lt_load_opts lo;
    lt_load_opts_default(&lo);
    lo.device = test_device();
    lo.dtype = "fp32";
    lt_status rc = lt_load(s, dir, &lo, NULL);
    ok(rc == LT_OK, "load the multimodal fixture");
    if (rc != LT_OK) {
        diag("%s", lt_last_error(s));
        return tap_done();
    }
    test_rendering(s);
    test_replies(s, rgb, grey, rgba);
    test_bad_input(s, rgb, dir);
    test_pan_and_scan(s, rgb);
    lt_chat_reset(s);
    int n = 0;
    const char *one[1] = {rgb};
    lt_gen_opts o = greedy(1);
    char *reply = NULL;
    lt_chat_images(s, "Hi.", one, 1, NULL, &o, NULL, &reply);
    free(reply);
    lt_chat_reset(s);
    int32_t *ids = prompt_ids(s, "Hi.", 0, &n);
    int images = 0;
    for (int i = 0; ids && i < n; i++)
        images += ids[i] == IMAGE;
    ok(ids && images == 0, "lt_chat_reset forgets the images too");
    free(ids);
    test_train_images(s, dir, rgb, grey);
    test_train_tower(s, dir, rgb);
    test_tower_waits_without_images(s, dir, rgb);
    lt_session_free(s);
    test_text_only_model();
    test_max_seq(dir, rgb);
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (getenv("LATHE_TEST_KEEP")) /* for a closer look */
        diag("kept %s", dir);
    else if (system(cmd) != 0)
        diag("could not remove %s", dir);
    return tap_done();
}
