/* fuzz_rewards.c — libFuzzer harness for GRPO's built-in rewards (cuda/train/rewards.c), which
 * read the text a model samples: the format match, the marker counts, and the answer compared as
 * text and as a number the way Python's float() reads it (py_float), with the markers of
 * %grpo markers=.
 *
 * Input: up to three parts split at NUL bytes: the markers option (empty: the defaults), the
 * completion, and the data row as JSON text (absent: {"answer": "42"}). Refused options or rows
 * give LT_ERR_ARG with a message. Scored: each of the four rewards takes only the values its
 * documentation lists (format 0 or 3; format_approx +0.5 or -1 a marker, so -4 .. 2 in halves;
 * answer 3, 1.5, 0.5, 0.25, 0, -0.5 or -1; number 0 or 1.5), never NaN. exec: is not fuzzed
 * here (a process a run); tests/engine/train/test_rewards.c drives its bad programs.
 */
#include "fuzz/fuzz_util.h"

#include <math.h>

#include "cuda/train/rewards.h"

static int one_of(double v, const double *set, int n) {
    for (int i = 0; i < n; i++)
        if (v == set[i]) return 1;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = malloc(size + 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    buf[size] = 0;
    const char *part[3] = {buf, "", "{\"answer\": \"42\"}"};
    int np = 1;
    for (size_t i = 0; i < size && np < 3; i++)
        if (buf[i] == 0) part[np++] = buf + i + 1;
    reward_opts o = {"format,format_approx,answer,number", NULL, part[0][0] ? part[0] : NULL, NULL,
                     5.0};
    reward_set *rs = NULL;
    char err[LT_ERRLEN] = "";
    lt_status rc = reward_set_new(&rs, &o, err);
    if (rc != LT_OK) {
        FUZZ_CHECK(rs == NULL && rc == LT_ERR_ARG && err[0] != '\0');
        free(buf);
        return 0;
    }
    FUZZ_CHECK(reward_count(rs) == 4);
    reward_item it = {"prompt", part[1], part[2]};
    double sc[4];
    rc = reward_score(rs, &it, 1, sc, err);
    if (rc != LT_OK) {
        FUZZ_CHECK((rc == LT_ERR_ARG || rc == LT_ERR_MEMORY) && err[0] != '\0');
    } else {
        static const double fmt[] = {0.0, 3.0}, num[] = {0.0, 1.5},
                            ans[] = {3.0, 1.5, 0.5, 0.25, 0.0, -0.5, -1.0};
        FUZZ_CHECK(one_of(sc[0], fmt, 2));
        FUZZ_CHECK(sc[1] >= -4.0 && sc[1] <= 2.0 && sc[1] * 2 == floor(sc[1] * 2));
        FUZZ_CHECK(one_of(sc[2], ans, 7));
        FUZZ_CHECK(one_of(sc[3], num, 2));
    }
    reward_set_free(rs);
    free(buf);
    return 0;
}
