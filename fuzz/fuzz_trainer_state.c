/* fuzz_trainer_state.c — libFuzzer harness for a checkpoint's trainer_state.json
 * (cuda/train/trainer_state.c), which %train resume= reads from a folder a person may have
 * edited, copied half or damaged.
 *
 * Each input is parsed as the file's text. Refused: LT_ERR_FORMAT (or LT_ERR_MEMORY) with a
 * message, nothing allocated. Accepted: every count in its range (what train.c then indexes
 * with), the text options terminated inside their buffers; and the state written again by
 * trainer_state_text reads back to the same values (the writer and the reader agree on every
 * file the reader accepts).
 */
#include "fuzz/fuzz_util.h"

#include "cuda/train/train.h"

static int same_opts(const lt_train_opts *a, const lt_train_opts *b) {
    return a->batch == b->batch && a->grad_accum == b->grad_accum && a->steps == b->steps &&
           a->warmup == b->warmup && a->max_seq == b->max_seq && a->epochs == b->epochs &&
           a->lr == b->lr && a->weight_decay == b->weight_decay &&
           a->max_grad_norm == b->max_grad_norm && a->beta1 == b->beta1 && a->beta2 == b->beta2 &&
           a->eps == b->eps && a->responses_only == b->responses_only && a->packing == b->packing &&
           a->shuffle == b->shuffle && a->seed == b->seed && !strcmp(a->data, b->data) &&
           !strcmp(a->format, b->format) && !strcmp(a->schedule, b->schedule);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    trainer_state s;
    trainer_state_texts tx;
    lt_train_opts o;
    lt_train_opts_default(&o);
    char err[LT_ERRLEN] = "";
    lt_status rc = trainer_state_parse((const char *)data, size, "fuzz", &s, &o, &tx, err);
    if (rc != LT_OK) {
        FUZZ_CHECK((rc == LT_ERR_FORMAT || rc == LT_ERR_MEMORY) && err[0] != '\0');
        FUZZ_CHECK(s.losses == NULL && s.n_losses == 0);
        return 0;
    }
    FUZZ_CHECK(s.step >= 0 && s.units >= 1 && s.position >= 0 && s.tokens >= 0 &&
               s.total_steps >= 0 && s.n_losses >= 0 && (s.full == 0 || s.full == 1));
    FUZZ_CHECK(memchr(tx.data, 0, sizeof tx.data) && memchr(tx.format, 0, sizeof tx.format) &&
               memchr(tx.schedule, 0, sizeof tx.schedule));
    char *again = trainer_state_text(&s, &o, o.max_seq);
    FUZZ_CHECK(again != NULL);
    trainer_state s2;
    trainer_state_texts tx2;
    lt_train_opts o2;
    lt_train_opts_default(&o2);
    rc = trainer_state_parse(again, strlen(again), "fuzz (written again)", &s2, &o2, &tx2, err);
    FUZZ_CHECK(rc == LT_OK);
    FUZZ_CHECK(s2.step == s.step && s2.units == s.units && s2.position == s.position &&
               s2.tokens == s.tokens && s2.total_steps == s.total_steps && s2.full == s.full &&
               s2.n_losses <= s.n_losses);
    FUZZ_CHECK(same_opts(&o, &o2));
    free(again);
    trainer_state_free(&s2);
    trainer_state_free(&s);
    return 0;
}
