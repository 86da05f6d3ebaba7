/* chat.h — the Gemma 3 chat template, rendered natively. Engine-private.
 *
 * Exactly what the Hub's Jinja template (transformers' convert_gemma3_weights.py _CHAT_TEMPLATE)
 * renders: one "<bos>", a leading system message folded into the first user turn followed by a
 * blank line, roles alternating user / non-user (else the template's own error), "assistant"
 * spelled "model", content trimmed as Python's str.strip() does, every turn closed by
 * "<end_of_turn>\n", and "<start_of_turn>model\n" appended when add_generation_prompt is set.
 * A content list's images are "<start_of_image>" markers where the list has them
 * (chat_parts_content; chat_user_content for images before one text).
 */
#ifndef LATHE_CHAT_H
#define LATHE_CHAT_H

#include "cuda/engine.h"

/* *out malloc'd. err: LT_ERRLEN bytes. */
lt_status chat_render(const char *const *roles, const char *const *contents, int n,
                      int add_generation_prompt, char **out, char *err);

/* One part of a message's content list: Hugging Face's {"type": "image", ...} (image = 1) or
 * {"type": "text", "text": text}. */
typedef struct chat_part {
    int image;
    const char *text;
} chat_part;

/* A content list as the template renders it: "<start_of_image>" for each image part, each text
 * part stripped (Python's str.strip()), in order. *out malloc'd. */
lt_status chat_parts_content(const chat_part *parts, int n, char **out, char *err);

/* A user turn's content when it carries n_images images before its text, as the same template
 * renders a content list [{"type": "image"} x n_images, {"type": "text", "text": text}]: one
 * "<start_of_image>" per image, then the text stripped (Python's str.strip()). chat_render
 * strips the whole content again, which leaves this one as it is. *out malloc'd. */
lt_status chat_user_content(const char *text, int n_images, char **out, char *err);

#endif
