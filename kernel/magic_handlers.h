/* magic_handlers.h — the handlers the table in magics.c points at (private to kernel/). */
#ifndef LATHE_MAGIC_HANDLERS_H
#define LATHE_MAGIC_HANDLERS_H

#include "kernel/magic.h"

/* magic_basic.c */
int magic_help(magic_ctx *ctx, const magic_args *a);
int magic_echo(magic_ctx *ctx, const magic_args *a);
int magic_input(magic_ctx *ctx, const magic_args *a);
int magic_version(magic_ctx *ctx, const magic_args *a);
int magic_clear(magic_ctx *ctx, const magic_args *a);
int magic_sleep(magic_ctx *ctx, const magic_args *a);

/* magic_model.c */
int magic_load(magic_ctx *ctx, const magic_args *a);
int magic_status(magic_ctx *ctx, const magic_args *a);
int magic_generate(magic_ctx *ctx, const magic_args *a);
int magic_chat(magic_ctx *ctx, const magic_args *a);

/* magic_shell.c */
int magic_shell(magic_ctx *ctx, const magic_args *a);

/* magic_export.c */
int magic_export_gguf(magic_ctx *ctx, const magic_args *a);

/* magic_train.c */
int magic_lora(magic_ctx *ctx, const magic_args *a);
int magic_train(magic_ctx *ctx, const magic_args *a);
int magic_save(magic_ctx *ctx, const magic_args *a);

/* magic_grpo.c */
int magic_grpo(magic_ctx *ctx, const magic_args *a);

#endif
