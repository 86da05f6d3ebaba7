/* cell.h — cell text -> magic calls. Pure parsing: no magic table, no I/O.
 *
 * A cell is lines. `#` starts a comment (outside quotes). A line magic is
 * `%name positional key=value ...`; a value may be quoted ("..." with \" and \\ escapes).
 * A trailing backslash joins the next line. `%%name args` makes the rest of the cell its
 * body. Positions are byte offsets into the cell text (for completion and inspection).
 */
#ifndef LATHE_CELL_H
#define LATHE_CELL_H

#include <stddef.h>

typedef struct cell_word {
    char *key;         /* option name for key=value, NULL for a positional word */
    char *value;       /* unquoted text */
    size_t start, end; /* byte span of the whole word in the cell */
} cell_word;

typedef struct cell_call {
    char *name;  /* magic name without the % signs */
    int is_cell; /* 1 for %%name */
    cell_word *words;
    int nwords;
    char *body;   /* %%name: the rest of the cell; NULL for line magics */
    int line;     /* 1-based line of the call */
    size_t start; /* byte offset of the '%' */
} cell_call;

typedef struct cell_program {
    cell_call *calls;
    int ncalls;
} cell_program;

typedef struct cell_parse_error {
    int line;      /* 1-based */
    size_t offset; /* byte offset of the problem */
    char message[512];
} cell_parse_error;

/* Parses a whole cell. Returns 0, or -1 with *err filled; *prog is empty on failure. */
int cell_parse(const char *code, size_t len, cell_program *prog, cell_parse_error *err);
void cell_program_free(cell_program *prog);

/* 1 when the cell text is unfinished: a trailing backslash, an unclosed quote at the end,
 * or a %%magic whose body is still being typed (for a console's is_complete). */
int cell_is_incomplete(const char *code, size_t len);

/* The word that contains or ends at byte offset pos in the cell: sets *start (byte offset
 * of its first character) and returns a malloc'd copy of the text from *start to pos. */
char *cell_word_at(const char *code, size_t len, size_t pos, size_t *start);

/* The magic name of the line holding byte offset pos (malloc'd, without %), or NULL. */
char *cell_magic_of_line(const char *code, size_t len, size_t pos);

#endif
