/* display.h — what magics show: a text builder, HTML escaping, live progress bars and
 * SVG line plots, all as MIME bundles (text/html + text/plain) sent through an lt_sink.
 *
 * Progress displays are display_data with a display_id, then update_display_data at most
 * every 0.1 s (Jupyter Server drops floods), and a final update when they end, so a saved
 * notebook holds the final state. text/plain is always there and reads well in nbconvert
 * output and in `lathe run`.
 */
#ifndef LATHE_DISPLAY_H
#define LATHE_DISPLAY_H

#include <stddef.h>
#include <stdint.h>

#include "kernel/interp.h"

/* A growable string. A failed allocation sets oom and keeps what it had. */
typedef struct strbuf_t {
    char *data;
    size_t len, cap;
    int oom;
} strbuf_t;

void sb_init(strbuf_t *b);
void sb_printf(strbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sb_append(strbuf_t *b, const char *s, size_t n);
void sb_html(strbuf_t *b, const char *text); /* appends text HTML-escaped */
char *sb_take(strbuf_t *b);                  /* the malloc'd string ("" if empty); resets b */
void sb_free(strbuf_t *b);

/* Seconds since an arbitrary start (monotonic). */
double display_now(void);
/* "12.3 MiB", "1.50 GiB" */
void display_bytes(char *out, size_t n, double bytes);
/* "1:02:03" or "2:03" */
void display_duration(char *out, size_t n, double seconds);

/* Sends one display_data (update=0) or update_display_data (update=1) with text/html and
 * text/plain; display_id may be NULL for a one-off display. */
void display_html(const lt_sink *sink, const char *html, const char *text, const char *display_id,
                  int update);

/* A live progress bar. */
typedef struct progress_bar {
    const lt_sink *sink;
    char id[64];
    char label[64];
    int64_t total;
    double t_start, t_last;
    int shown;
} progress_bar;

void progress_begin(progress_bar *p, const lt_sink *sink, const char *label, int64_t total);
/* Redraws when 0.1 s passed since the last draw (or force). `extra` is shown after the
 * counts ("loss 1.234  lr 2e-4"); may be NULL. */
void progress_update(progress_bar *p, int64_t done, const char *extra, int force);
/* Final draw; `status` e.g. "done", "interrupted". */
void progress_end(progress_bar *p, int64_t done, const char *extra, const char *status);

/* An SVG line plot of ys (n points, x = 1..n), w x h pixels, with axis labels. */
char *display_svg_plot(const float *ys, int n, int w, int h, const char *title);

/* A training run's live view: a progress bar and, under it, a curve (%train's loss, %grpo's
 * reward), both updated in place. The curve is redrawn at most twice a second unless it is
 * the last step. The view keeps its own copy of the curve and of the last texts, so the final
 * draw after the run needs nothing of the engine's. */
typedef struct run_view {
    progress_bar bar;
    int open;
    char plot_id[80];
    double plot_last;
    int plot_shown;
    float *ys; /* the curve's copy */
    int n;
    char extra[200], title[160], text[256]; /* the bar's extra text, the plot's title and its
                                               text/plain fallback */
} run_view;
/* One step: opens the view (label, total) on the first call, then draws. */
void run_view_step(run_view *v, const lt_sink *sink, const char *label, int step, int total,
                   const float *ys, int n, const char *extra, const char *title, const char *text);
/* After the run (opened or not): the bar at `done` with status, the curve once more; frees. */
void run_view_end(run_view *v, int done, const char *status);

#endif
