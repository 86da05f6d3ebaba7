/* rewards.h — GRPO's reward functions: the built-in ones of the reasoning recipe and any
 * program as a reward ("exec:COMMAND"). Engine-private; host only, no model.
 *
 * Built-ins, as Unsloth's Gemma 3 GRPO notebook defines them, with four markers (default
 * "<start_working_out>", "<end_working_out>", "<SOLUTION>", "</SOLUTION>"):
 *   format         3.0 when the whole completion is  R_START ... R_END ... S_START x S_END
 *                  (whitespace around allowed), else 0
 *   format_approx  +0.5 for each marker that appears exactly once, -1.0 for each that does not
 *   answer         against the row's "answer": the text between the solution markers equal to it
 *                  3.0, equal after trimming 1.5, as numbers within 10% 0.5, within 20% 0.25,
 *                  otherwise -1.0 (-0.5 when either is not a number), 0 when nothing is there
 *   number         1.5 when the first number after S_START equals the answer as a number, else 0
 * exec:COMMAND starts COMMAND once (through /bin/sh -c, in opts->cwd) and keeps it running for
 * the life of the set. For each completion it writes one JSON object a line to the program's
 * stdin, {"prompt": ..., "completion": ..., and every other field of the data row}, and reads one
 * line back for each, in order: a number, or null ("no reward for this one"). A crash, a line
 * that is not a number, too few lines or no answer within the timeout fails reward_score with a
 * message that names the program and quotes the bad line; the program is then stopped.
 * Details of exec: the row's own "prompt" and "completion" fields, if any, are replaced by ours;
 * an answer line is a number strtod reads whole (whitespace around it allowed; nan and inf
 * refused) or null; the program's stderr is kept (its last line is quoted in errors), not
 * passed on; PYTHONUNBUFFERED=1 is set for it, other programs must flush after each line.
 * Statuses: LT_ERR_ARG for bad options, bad rows and a failing program, LT_ERR_MEMORY, LT_ERR_IO
 * for a failed pipe call.
 */
#ifndef LATHE_REWARDS_H
#define LATHE_REWARDS_H

#include "cuda/base/error.h"

typedef struct reward_set reward_set;

typedef struct reward_opts {
    /* reward=: names separated by commas; an "exec:" entry takes the rest of the text (commas
     * in its command belong to the command), so it comes last */
    const char *spec;
    const char *weights; /* weights=: one number per reward, commas; NULL = all 1 */
    const char *markers; /* four markers, commas; NULL = the defaults above */
    const char *cwd;     /* exec: the program's working directory; NULL = the current one */
    double timeout_s;    /* exec: seconds to answer one reward_score call (> 0) */
} reward_opts;

/* Parses the options and starts the programs. Errors (LT_ERR_ARG: an unknown name, a weight
 * count that disagrees, a program that cannot start) say what to write instead. */
lt_status reward_set_new(reward_set **out, const reward_opts *o, char *err);
/* Stops the programs (closes their stdin, waits briefly, then kills) and frees. NULL is fine. */
void reward_set_free(reward_set *rs);

int reward_count(const reward_set *rs);
/* "format", "answer", "exec:python3 r.py" ...: the name in TRL's metric rewards/<name>/mean. */
const char *reward_name(const reward_set *rs, int i);
double reward_weight(const reward_set *rs, int i);

/* One completion to score. row_json is the data row as a JSON object text (its fields reach
 * the programs; "answer" feeds the built-ins). */
typedef struct reward_item {
    const char *prompt;     /* as the model saw it (chat template applied) */
    const char *completion; /* the sampled text, stop token not included */
    const char *row_json;
} reward_item;

/* scores[f * n + i] = reward f of item i, NaN for "no reward" (exec's null, TRL's None). A
 * program that fails leaves the set unusable for exec (later calls fail at once). */
lt_status reward_score(reward_set *rs, const reward_item *items, int n, double *scores, char *err);

#endif
