/* chat_image.h — a rendered chat with images to token ids, as Gemma 3's processor makes them.
 * Engine-private.
 *
 * The chat template writes "<start_of_image>" where a user turn has an image (chat.h's
 * chat_user_content). transformers' processing_gemma3.py (Gemma3Processor) replaces every
 * "<start_of_image>" of the text with
 *     "\n\n<start_of_image>" + mm_tokens_per_image x "<image_soft_token>" + "<end_of_image>\n\n"
 * and then tokenizes; the tokenizer splits the text at those special tokens. chat_image_ids does
 * the same without needing the specials in the SentencePiece model (a Gemma 3 tokenizer.model
 * has no "<image_soft_token>", and a config may place the image token past the embedding): the
 * text between the markers, with the "\n\n" on either side, goes through tok_encode_special,
 * and each image block is written from the config's ids. Knows text and ids, nothing of models.
 */
#ifndef LATHE_CHAT_IMAGE_H
#define LATHE_CHAT_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "cuda/base/error.h"
#include "cuda/text/tokenizer.h"

/* The ids of an image block (config.json's boi_token_index, image_token_index,
 * eoi_token_index and mm_tokens_per_image). */
typedef struct chat_image_tokens {
    int boi, image, eoi;
    int mm;
} chat_image_tokens;

/* The marker the chat template writes per image (Gemma 3's tokenizer.boi_token). */
#define CHAT_IMAGE_MARKER "<start_of_image>"

/* The markers in text's first len bytes. */
int chat_image_count(const char *text, size_t len);

/* What chat_image_walk hands on: text(ctx, segment) for each non-empty text between the image
 * blocks, the "\n\n" the processor writes beside a block included, and image(ctx, i) for the
 * i-th block (0-based) of the text, in order. */
typedef struct chat_image_visit {
    lt_status (*text)(void *ctx, const char *segment, char *err);
    lt_status (*image)(void *ctx, int image, char *err);
} chat_image_visit;

/* Walks text's first len bytes as Gemma 3's processor expands it: every marker becomes an
 * image block. chat_image_ids is this walk writing ids; the trainer's datasets (train/data.c)
 * walk each piece of a rendered conversation the same way. Stops at the first error a visit
 * returns. */
lt_status chat_image_walk(const char *text, size_t len, const chat_image_visit *v, void *ctx,
                          char *err);

/* Tokenizes text (no BOS added; a leading "<bos>" is the caller's to strip) with each of its
 * n_images markers expanded into an image block. A text whose marker count differs from
 * n_images (a message that writes "<start_of_image>" itself) is refused, as the processor
 * refuses it. *ids malloc'd. */
lt_status chat_image_ids(const lt_tokenizer *tok, const char *text, const chat_image_tokens *it,
                         int n_images, int32_t **ids, int *n, char *err);

/* Pan-and-scan: text with the marker of each image i whose crops[i] > 0 replaced by what
 * Gemma3Processor (processing_gemma3.py) writes for an image and its crops,
 *     "Here is the original image <start_of_image> and here are some crops to help you see "
 *     "better <start_of_image> <start_of_image> ..." (crops[i] markers joined by spaces),
 * so that chat_image_ids then expands every marker, the full image's first and its crops' in
 * order, into an image block. The markers of images without crops stay as they are. A text
 * whose marker count differs from n_images is refused as chat_image_ids refuses it. *out
 * malloc'd. */
lt_status chat_image_pan_scan_text(const char *text, const int *crops, int n_images, char **out,
                                   char *err);

#endif
