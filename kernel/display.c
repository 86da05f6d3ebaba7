/* display.c — text building, HTML escaping, progress bars and SVG plots (see display.h).
 * Knows the sink, never a socket.
 */
#include "kernel/display.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <sodium.h>

/* ---- strbuf ----------------------------------------------------------------------------- */

void sb_init(strbuf_t *b) {
    memset(b, 0, sizeof *b);
}

static int sb_reserve(strbuf_t *b, size_t extra) {
    if (b->oom) return -1;
    if (b->len + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) {
        b->oom = 1;
        return -1;
    }
    b->data = p;
    b->cap = cap;
    return 0;
}

void sb_append(strbuf_t *b, const char *s, size_t n) {
    if (sb_reserve(b, n)) return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void sb_printf(strbuf_t *b, const char *fmt, ...) {
    va_list ap, copy;
    va_start(ap, fmt);
    va_copy(copy, ap);
    int n = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    if (n >= 0 && sb_reserve(b, (size_t)n) == 0) {
        vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
        b->len += (size_t)n;
    }
    va_end(ap);
}

void sb_html(strbuf_t *b, const char *s) {
    for (; *s; ++s) {
        switch (*s) {
        case '&':
            sb_append(b, "&amp;", 5);
            break;
        case '<':
            sb_append(b, "&lt;", 4);
            break;
        case '>':
            sb_append(b, "&gt;", 4);
            break;
        case '"':
            sb_append(b, "&quot;", 6);
            break;
        default:
            sb_append(b, s, 1);
        }
    }
}

char *sb_take(strbuf_t *b) {
    char *p = b->data;
    if (!p) p = strdup("");
    sb_init(b);
    return p;
}

void sb_free(strbuf_t *b) {
    free(b->data);
    sb_init(b);
}

/* ---- formatting ------------------------------------------------------------------------- */

double display_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void display_bytes(char *out, size_t n, double bytes) {
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024.0 && u < 4) {
        bytes /= 1024.0;
        ++u;
    }
    snprintf(out, n, u ? "%.2f %s" : "%.0f %s", bytes, unit[u]);
}

void display_duration(char *out, size_t n, double s) {
    if (!(s >= 0) || s > 1e8) {
        snprintf(out, n, "?");
        return;
    }
    long t = lround(s);
    if (t >= 3600)
        snprintf(out, n, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else
        snprintf(out, n, "%ld:%02ld", t / 60, t % 60);
}

void display_html(const lt_sink *sink, const char *html, const char *text, const char *display_id,
                  int update) {
    if (!sink->display) return;
    json_t *data = json_pack("{s:s, s:s}", "text/html", html, "text/plain", text);
    json_t *meta = json_object();
    if (data && meta) sink->display(sink->ctx, data, meta, display_id, update);
    json_decref(data);
    json_decref(meta);
}

/* ---- progress --------------------------------------------------------------------------- */

static void progress_draw(progress_bar *p, int64_t done, const char *extra, const char *status) {
    double elapsed = display_now() - p->t_start;
    double frac = p->total > 0 ? (double)done / (double)p->total : 0.0;
    if (frac > 1) frac = 1;
    char el[32], eta[32];
    display_duration(el, sizeof el, elapsed);
    if (frac > 0 && !status)
        display_duration(eta, sizeof eta, elapsed * (1 - frac) / frac);
    else
        snprintf(eta, sizeof eta, "%s", status ? "0:00" : "?");

    strbuf_t text, html;
    sb_init(&text);
    sb_init(&html);
    int width = 30, fill = (int)(frac * width + 0.5);
    sb_printf(&text, "%s [", p->label);
    for (int i = 0; i < width; ++i)
        sb_append(&text, i < fill ? "#" : "-", 1);
    if (p->total > 0)
        sb_printf(&text, "] %lld/%lld", (long long)done, (long long)p->total);
    else
        sb_printf(&text, "] %lld", (long long)done);
    sb_printf(&text, " elapsed %s eta %s", el, eta);
    if (extra && *extra) sb_printf(&text, "  %s", extra);
    if (status) sb_printf(&text, "  (%s)", status);

    const char *color = status && strcmp(status, "done") != 0 ? "#e53935" : "#4caf50";
    sb_printf(&html,
              "<div style=\"font-family:monospace\"><div style=\"display:inline-block;"
              "width:300px;background-color:#eee;vertical-align:middle\"><div style=\"width:%.1f%%;"
              "background-color:%s\">&nbsp;</div></div> ",
              100.0 * frac, color);
    sb_html(&html, p->label);
    if (p->total > 0)
        sb_printf(&html, " %lld/%lld", (long long)done, (long long)p->total);
    else
        sb_printf(&html, " %lld", (long long)done);
    sb_printf(&html, " &middot; elapsed %s &middot; eta %s", el, eta);
    if (extra && *extra) {
        sb_printf(&html, " &middot; ");
        sb_html(&html, extra);
    }
    if (status) {
        sb_printf(&html, " &middot; <b>");
        sb_html(&html, status);
        sb_printf(&html, "</b>");
    }
    sb_printf(&html, "</div>");
    if (!text.oom && !html.oom) display_html(p->sink, html.data, text.data, p->id, p->shown);
    p->shown = 1;
    p->t_last = display_now();
    sb_free(&text);
    sb_free(&html);
}

void progress_begin(progress_bar *p, const lt_sink *sink, const char *label, int64_t total) {
    memset(p, 0, sizeof *p);
    p->sink = sink;
    p->total = total;
    snprintf(p->label, sizeof p->label, "%s", label);
    unsigned char rnd[8];
    randombytes_buf(rnd, sizeof rnd);
    char hex[17];
    sodium_bin2hex(hex, sizeof hex, rnd, sizeof rnd);
    snprintf(p->id, sizeof p->id, "lathe-%s", hex);
    p->t_start = display_now();
    progress_draw(p, 0, NULL, NULL);
}

void progress_update(progress_bar *p, int64_t done, const char *extra, int force) {
    if (!force && display_now() - p->t_last < 0.1) return;
    progress_draw(p, done, extra, NULL);
}

void progress_end(progress_bar *p, int64_t done, const char *extra, const char *status) {
    progress_draw(p, done, extra, status ? status : "done");
}

/* ---- plots ------------------------------------------------------------------------------ */

char *display_svg_plot(const float *ys, int n, int w, int h, const char *title) {
    strbuf_t b;
    sb_init(&b);
    float lo = INFINITY, hi = -INFINITY;
    for (int i = 0; i < n; ++i)
        if (isfinite(ys[i])) {
            lo = fminf(lo, ys[i]);
            hi = fmaxf(hi, ys[i]);
        }
    if (!(lo <= hi)) lo = 0, hi = 1;
    if (hi - lo < 1e-6f) hi = lo + 1e-6f;
    const int ml = 50, mr = 10, mt = 20, mb = 25;
    double pw = w - ml - mr, ph = h - mt - mb;
    sb_printf(&b,
              "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
              "viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"11\">"
              "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>",
              w, h, w, h);
    sb_printf(&b, "<text x=\"%d\" y=\"14\">", ml);
    sb_html(&b, title ? title : "");
    sb_printf(&b, "</text>");
    sb_printf(&b,
              "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#999\"/>"
              "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#999\"/>",
              ml, mt, ml, h - mb, ml, h - mb, w - mr, h - mb);
    sb_printf(&b, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%.3g</text>", ml - 4, mt + 8,
              (double)hi);
    sb_printf(&b, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%.3g</text>", ml - 4, h - mb,
              (double)lo);
    sb_printf(&b, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%d</text>", w - mr, h - 8, n);
    if (n > 0) {
        sb_printf(&b, "<polyline fill=\"none\" stroke=\"#1e88e5\" stroke-width=\"1.5\" points=\"");
        for (int i = 0; i < n; ++i) {
            if (!isfinite(ys[i])) continue;
            double x = ml + (n == 1 ? pw / 2 : pw * i / (n - 1));
            double y = mt + ph * (1.0 - (ys[i] - lo) / (hi - lo));
            sb_printf(&b, "%.1f,%.1f ", x, y);
        }
        sb_printf(&b, "\"/>");
    }
    sb_printf(&b, "</svg>");
    return sb_take(&b);
}

/* ---- a run's bar and curve ---------------------------------------------------------------- */

static void run_view_plot(run_view *v, int force) {
    double now = display_now();
    if (!force && v->plot_shown && now - v->plot_last < 0.5) return;
    char *svg = display_svg_plot(v->ys, v->n, 480, 200, v->title);
    if (!svg) return;
    display_html(v->bar.sink, svg, v->text, v->plot_id, v->plot_shown);
    free(svg);
    v->plot_shown = 1;
    v->plot_last = now;
}

void run_view_step(run_view *v, const lt_sink *sink, const char *label, int step, int total,
                   const float *ys, int n, const char *extra, const char *title, const char *text) {
    if (!v->open) {
        progress_begin(&v->bar, sink, label, total);
        snprintf(v->plot_id, sizeof v->plot_id, "%s-curve", v->bar.id);
        v->open = 1;
    }
    float *c = realloc(v->ys, sizeof(float) * (size_t)(n > 0 ? n : 1));
    if (c) {
        memcpy(c, ys, sizeof(float) * (size_t)n);
        v->ys = c;
        v->n = n;
    }
    snprintf(v->extra, sizeof v->extra, "%s", extra);
    snprintf(v->title, sizeof v->title, "%s", title);
    snprintf(v->text, sizeof v->text, "%s", text);
    progress_update(&v->bar, step, v->extra, step == total);
    run_view_plot(v, step == total);
}

void run_view_end(run_view *v, int done, const char *status) {
    if (v->open) {
        progress_end(&v->bar, done, v->extra, status);
        if (v->n > 0) run_view_plot(v, 1);
    }
    free(v->ys);
    v->ys = NULL;
    v->n = 0;
}
