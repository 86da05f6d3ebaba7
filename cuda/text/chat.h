/* chat.h — the Gemma 3 chat template, rendered natively. Engine-private.
 *
 * Exactly what the Hub's Jinja template (transformers' convert_gemma3_weights.py _CHAT_TEMPLATE)
 * renders: one "<bos>", a leading system message folded into the first user turn followed by a
 * blank line, roles alternating user / non-user (else the template's own error), "assistant"
 * spelled "model", content trimmed as Python's str.strip() does, every turn closed by
 * "<end_of_turn>\n", and "<start_of_turn>model\n" appended when add_generation_prompt is set.
 */
#ifndef LATHE_CHAT_H
#define LATHE_CHAT_H

#include "cuda/engine.h"

/* *out malloc'd. err: LT_ERRLEN bytes. */
lt_status chat_render(const char *const *roles, const char *const *contents, int n,
                      int add_generation_prompt, char **out, char *err);

#endif
