/* test_option_defaults.c — the defaults %help shows are the defaults the engine uses.
 *
 * An option that sets a field of an engine options struct (lt_load_opts, lt_gen_opts,
 * lt_image_opts, lt_lora_opts, lt_train_opts, lt_grpo_opts) takes its default from the engine's
 * table (lt_option_default); lt_*_opts_default fill the structs from the same table. This test
 * holds its own map of every field of those structs (name, type, offset, written from
 * cuda/engine.h) and checks, for every magic option mapped to a field, that the default the
 * kernel shows in %help (text, per-option and HTML) and fills in for an option left out is the
 * value lt_*_opts_default stores. So a hand edit on either side fails here: a value set after
 * the table in lt_*_opts_default, a literal default written back into kernel/magics.c, or a
 * default in a usage line ("[lr=2e-4]") that no longer matches. The reverse holds too: every
 * field is reachable from some magic option or is listed here as internal (AdamW's beta1,
 * beta2 and eps), and the engine's table lists exactly the fields of the map.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/engine.h"
#include "kernel/cell.h"
#include "kernel/display.h"
#include "kernel/magic.h"
#include "tests/unit/tap.h"

/* ---- every field of the engine's options structs ----------------------------------------- */

typedef enum field_kind { K_INT, K_FLOAT, K_DOUBLE, K_U64, K_FLAG, K_TEXT } field_kind;

typedef struct field {
    const char *group, *name;
    field_kind kind;
    size_t offset;
    int internal; /* 1: no magic sets it; the engine's default always applies */
} field;

#define F(group, type, f, kind)                                                                    \
    { group, #f, kind, offsetof(type, f), 0 }
#define INTERNAL(group, type, f, kind)                                                             \
    { group, #f, kind, offsetof(type, f), 1 }

static const field fields[] = {
    F("load", lt_load_opts, dtype, K_TEXT),
    F("load", lt_load_opts, device, K_TEXT),
    F("load", lt_load_opts, max_seq, K_INT),
    F("load", lt_load_opts, quant, K_TEXT),
    F("load", lt_load_opts, quant_keep, K_FLOAT),

    F("gen", lt_gen_opts, max_new, K_INT),
    F("gen", lt_gen_opts, temperature, K_FLOAT),
    F("gen", lt_gen_opts, top_k, K_INT),
    F("gen", lt_gen_opts, top_p, K_FLOAT),
    F("gen", lt_gen_opts, min_p, K_FLOAT),
    F("gen", lt_gen_opts, seed, K_U64),

    F("image", lt_image_opts, pan_and_scan, K_FLAG),
    F("image", lt_image_opts, pan_and_scan_min_crop_size, K_INT),
    F("image", lt_image_opts, pan_and_scan_max_num_crops, K_INT),
    F("image", lt_image_opts, pan_and_scan_min_ratio_to_activate, K_DOUBLE),

    F("lora", lt_lora_opts, r, K_INT),
    F("lora", lt_lora_opts, alpha, K_FLOAT),
    F("lora", lt_lora_opts, rslora, K_FLAG),
    F("lora", lt_lora_opts, dropout, K_FLOAT),
    F("lora", lt_lora_opts, seed, K_U64),
    F("lora", lt_lora_opts, targets, K_TEXT),
    F("lora", lt_lora_opts, full, K_FLAG),
    F("lora", lt_lora_opts, load, K_TEXT),

    F("train", lt_train_opts, data, K_TEXT),
    F("train", lt_train_opts, format, K_TEXT),
    F("train", lt_train_opts, batch, K_INT),
    F("train", lt_train_opts, grad_accum, K_INT),
    F("train", lt_train_opts, steps, K_INT),
    F("train", lt_train_opts, epochs, K_FLOAT),
    F("train", lt_train_opts, lr, K_FLOAT),
    F("train", lt_train_opts, warmup, K_INT),
    F("train", lt_train_opts, schedule, K_TEXT),
    F("train", lt_train_opts, optim, K_TEXT),
    F("train", lt_train_opts, weight_decay, K_FLOAT),
    F("train", lt_train_opts, max_grad_norm, K_FLOAT),
    INTERNAL("train", lt_train_opts, beta1, K_FLOAT),
    INTERNAL("train", lt_train_opts, beta2, K_FLOAT),
    INTERNAL("train", lt_train_opts, eps, K_FLOAT),
    F("train", lt_train_opts, max_seq, K_INT),
    F("train", lt_train_opts, responses_only, K_FLAG),
    F("train", lt_train_opts, packing, K_FLAG),
    F("train", lt_train_opts, seed, K_U64),
    F("train", lt_train_opts, shuffle, K_FLAG),
    F("train", lt_train_opts, save, K_TEXT),
    F("train", lt_train_opts, save_every, K_INT),
    F("train", lt_train_opts, keep, K_INT),
    F("train", lt_train_opts, resume, K_TEXT),
    INTERNAL("train", lt_train_opts, given, K_TEXT),
    F("grpo", lt_grpo_opts, data, K_TEXT),
    F("grpo", lt_grpo_opts, reward, K_TEXT),
    F("grpo", lt_grpo_opts, weights, K_TEXT),
    F("grpo", lt_grpo_opts, markers, K_TEXT),
    F("grpo", lt_grpo_opts, group, K_INT),
    F("grpo", lt_grpo_opts, batch, K_INT),
    F("grpo", lt_grpo_opts, micro, K_INT),
    F("grpo", lt_grpo_opts, steps, K_INT),
    F("grpo", lt_grpo_opts, lr, K_FLOAT),
    F("grpo", lt_grpo_opts, warmup, K_INT),
    F("grpo", lt_grpo_opts, schedule, K_TEXT),
    F("grpo", lt_grpo_opts, weight_decay, K_FLOAT),
    F("grpo", lt_grpo_opts, max_grad_norm, K_FLOAT),
    F("grpo", lt_grpo_opts, beta, K_FLOAT),
    F("grpo", lt_grpo_opts, epsilon, K_FLOAT),
    F("grpo", lt_grpo_opts, epsilon_high, K_FLOAT),
    F("grpo", lt_grpo_opts, loss, K_TEXT),
    F("grpo", lt_grpo_opts, scale_rewards, K_TEXT),
    F("grpo", lt_grpo_opts, max_prompt, K_INT),
    F("grpo", lt_grpo_opts, max_completion, K_INT),
    F("grpo", lt_grpo_opts, temperature, K_FLOAT),
    F("grpo", lt_grpo_opts, top_p, K_FLOAT),
    F("grpo", lt_grpo_opts, top_k, K_INT),
    F("grpo", lt_grpo_opts, iterations, K_INT),
    F("grpo", lt_grpo_opts, seed, K_U64),
    F("grpo", lt_grpo_opts, shuffle, K_FLAG),
    F("grpo", lt_grpo_opts, show_every, K_INT),
    F("grpo", lt_grpo_opts, reward_timeout, K_FLOAT),
    F("grpo", lt_grpo_opts, log, K_TEXT),
};
#define N_FIELDS ((int)(sizeof fields / sizeof fields[0]))

static const char *const groups[] = {"load", "gen", "image", "lora", "train", "grpo"};
#define N_GROUPS ((int)(sizeof groups / sizeof groups[0]))

/* The structs as lt_*_opts_default fill them, over bytes that are not zero, so a field the
 * fill leaves alone shows. */
static lt_load_opts load_d;
static lt_gen_opts gen_d;
static lt_image_opts image_d;
static lt_lora_opts lora_d;
static lt_train_opts train_d;
static lt_grpo_opts grpo_d;

static void structs_fill(void) {
    memset(&load_d, 0xA5, sizeof load_d);
    memset(&gen_d, 0xA5, sizeof gen_d);
    memset(&image_d, 0xA5, sizeof image_d);
    memset(&lora_d, 0xA5, sizeof lora_d);
    memset(&train_d, 0xA5, sizeof train_d);
    memset(&grpo_d, 0xA5, sizeof grpo_d);
    lt_load_opts_default(&load_d);
    lt_gen_opts_default(&gen_d);
    lt_image_opts_default(&image_d);
    lt_lora_opts_default(&lora_d);
    lt_train_opts_default(&train_d);
    lt_grpo_opts_default(&grpo_d);
}

static const char *field_at(const field *f) {
    const char *base = !strcmp(f->group, "load")    ? (const char *)&load_d
                       : !strcmp(f->group, "gen")   ? (const char *)&gen_d
                       : !strcmp(f->group, "image") ? (const char *)&image_d
                       : !strcmp(f->group, "lora")  ? (const char *)&lora_d
                       : !strcmp(f->group, "grpo")  ? (const char *)&grpo_d
                                                    : (const char *)&train_d;
    return base + f->offset;
}

static const field *field_find(const char *group, const char *name) {
    for (int i = 0; i < N_FIELDS; ++i)
        if (!strcmp(fields[i].group, group) && !strcmp(fields[i].name, name)) return &fields[i];
    return NULL;
}

static int engine_lists(const char *group, const char *name) {
    for (int i = 0; lt_option_name(group, i); ++i)
        if (!strcmp(lt_option_name(group, i), name)) return 1;
    return 0;
}

/* The field's value, as text, for messages. */
static void field_show(const field *f, char *out, size_t n) {
    const char *at = field_at(f);
    switch (f->kind) {
    case K_INT:
    case K_FLAG:
        snprintf(out, n, "%d", *(const int *)at);
        break;
    case K_FLOAT:
        snprintf(out, n, "%.9g", (double)*(const float *)at);
        break;
    case K_DOUBLE:
        snprintf(out, n, "%.17g", *(const double *)at);
        break;
    case K_U64:
        snprintf(out, n, "%llu", (unsigned long long)*(const uint64_t *)at);
        break;
    case K_TEXT: {
        const char *s = *(const char *const *)at;
        snprintf(out, n, "%s", s ? s : "(null)");
        break;
    }
    }
}

/* Does the field hold what the handler makes of the option's value (the casts of
 * kernel/magic_*.c: (int)arg_int, (float)arg_float, arg_bool, arg_str)? */
static int field_matches(const field *f, const magic_args *a, const char *opt) {
    const char *at = field_at(f);
    switch (f->kind) {
    case K_INT:
        return *(const int *)at == (int)arg_int(a, opt);
    case K_U64:
        return *(const uint64_t *)at == (uint64_t)arg_int(a, opt);
    case K_FLOAT:
        return *(const float *)at == (float)arg_float(a, opt);
    case K_DOUBLE:
        return *(const double *)at == arg_float(a, opt);
    case K_FLAG:
        return *(const int *)at == arg_bool(a, opt);
    case K_TEXT: {
        const char *s = *(const char *const *)at, *v = arg_str(a, opt);
        return s == v || (s && v && !strcmp(s, v));
    }
    }
    return 0;
}

/* The field against the engine's own text, parsed as the kernel parses option values. */
static int field_matches_text(const field *f, const char *text) {
    const char *at = field_at(f);
    if (!text) {
        switch (f->kind) {
        case K_TEXT:
            return *(const char *const *)at == NULL;
        case K_U64:
            return *(const uint64_t *)at == 0;
        case K_FLOAT:
            return *(const float *)at == 0.0f;
        case K_DOUBLE:
            return *(const double *)at == 0.0;
        default:
            return *(const int *)at == 0;
        }
    }
    switch (f->kind) {
    case K_INT:
        return *(const int *)at == (int)strtoll(text, NULL, 10);
    case K_U64:
        return *(const uint64_t *)at == (uint64_t)strtoll(text, NULL, 10);
    case K_FLOAT:
        return *(const float *)at == (float)strtod(text, NULL);
    case K_DOUBLE:
        return *(const double *)at == strtod(text, NULL);
    case K_FLAG:
        return (!strcmp(text, "true") && *(const int *)at == 1) ||
               (!strcmp(text, "false") && *(const int *)at == 0);
    case K_TEXT: {
        const char *s = *(const char *const *)at;
        return s && !strcmp(s, text);
    }
    }
    return 0;
}

/* "%train" or "%%chat", for messages. */
static const char *magic_label(const magic_spec *m) {
    static char b[64];
    snprintf(b, sizeof b, "%s%s", m->cell ? "%%" : "%", m->name);
    return b;
}

/* ---- validating a call the way a cell does ---------------------------------------------- */

/* Parses and validates `%name [x...] [key="value"]` (a body for cell magics); 0 on success. */
static int call_validate(const magic_spec *m, const char *key, const char *value, cell_program *p,
                         magic_args *a, char *msg, size_t msglen) {
    strbuf_t b;
    sb_init(&b);
    sb_printf(&b, "%s", magic_label(m));
    for (int i = 0; i < m->min_pos; ++i)
        sb_printf(&b, " x");
    if (key) sb_printf(&b, " %s=\"%s\"", key, value);
    if (m->cell) sb_printf(&b, "\nhello");
    char *code = sb_take(&b);
    cell_parse_error e;
    int rc = cell_parse(code, strlen(code), p, &e);
    if (rc == 0 && p->ncalls != 1) rc = -1;
    if (rc == 0)
        rc = magic_validate(&p->calls[0], a, msg, msglen);
    else
        snprintf(msg, msglen, "parse: %s", e.message);
    free(code);
    return rc;
}

/* ---- the checks -------------------------------------------------------------------------- */

static void test_engine_table(void) {
    structs_fill();
    for (int g = 0; g < N_GROUPS; ++g) {
        int n = 0;
        for (const char *name; (name = lt_option_name(groups[g], n)); ++n) {
            char what[160];
            snprintf(what, sizeof what, "engine %s.%s is a field of the struct", groups[g], name);
            ok(field_find(groups[g], name) != NULL, what);
        }
        int want = 0;
        for (int i = 0; i < N_FIELDS; ++i)
            if (!strcmp(fields[i].group, groups[g])) ++want;
        char what[160];
        snprintf(what, sizeof what, "engine group %s lists every field once (%d of %d)", groups[g],
                 n, want);
        ok(n == want, what);
    }
    for (int i = 0; i < N_FIELDS; ++i) {
        const field *f = &fields[i];
        const char *text = lt_option_default(f->group, f->name);
        char what[200], got[128];
        snprintf(what, sizeof what, "engine %s.%s is in the table", f->group, f->name);
        ok(engine_lists(f->group, f->name), what);
        field_show(f, got, sizeof got);
        snprintf(what, sizeof what, "lt_%s_opts_default: %s = %s, as the table's '%s'", f->group,
                 f->name, got, text ? text : "(unset)");
        ok(field_matches_text(f, text), what);
        if (f->kind != K_TEXT) {
            snprintf(what, sizeof what, "engine %s.%s: a number or flag has a default text",
                     f->group, f->name);
            ok(text != NULL, what);
        }
    }
    ok(lt_option_default("train", "no_such_field") == NULL, "unknown field: NULL");
    ok(lt_option_default("no_such_group", "lr") == NULL, "unknown group: NULL");
    ok(lt_option_name("no_such_group", 0) == NULL, "unknown group: no names");
    ok(lt_option_name("gen", 1000) == NULL, "past the last field: NULL");
}

/* Every magic option mapped to an engine field: %help and validation show and fill the
 * default that lt_*_opts_default stores. */
static void test_mapped_options(void) {
    structs_fill();
    int nmagic, checked = 0;
    const magic_spec *all = magics_all(&nmagic);
    for (int k = 0; k < nmagic; ++k) {
        const magic_spec *m = &all[k];
        char *help = magic_help_text(m), *html = magic_help_html(m);
        for (const opt_spec *o = m->opts; o->name; ++o) {
            if (!o->engine) continue;
            char what[256];
            const field *f = field_find(o->engine, o->name);
            snprintf(what, sizeof what, "%s %s= maps onto the field %s.%s", magic_label(m), o->name,
                     o->engine, o->name);
            if (!ok(f != NULL && engine_lists(o->engine, o->name), what)) continue;
            snprintf(what, sizeof what, "%s %s=: no literal default beside the engine's",
                     magic_label(m), o->name);
            ok(o->def == NULL, what);
            const char *def = opt_default(o);
            snprintf(what, sizeof what, "%s %s=: default is lt_option_default(\"%s\", \"%s\")",
                     magic_label(m), o->name, o->engine, o->name);
            ok(def == lt_option_default(o->engine, o->name), what);

            /* the three renderings of %help */
            char want[600];
            snprintf(want, sizeof want, "%s (default %s)\n", o->help, def ? def : "none");
            snprintf(what, sizeof what, "%%help %s shows %s=%s", m->name, o->name,
                     def ? def : "none");
            ok(help && strstr(help, want), what);
            char *one = opt_help_text(m, o);
            snprintf(want, sizeof want, "default: %s\n", def ? def : "(none)");
            snprintf(what, sizeof what, "option help of %s %s= shows %s", magic_label(m), o->name,
                     def ? def : "(none)");
            ok(one && strstr(one, want), what);
            free(one);
            snprintf(want, sizeof want, "<tr><td><code>%s</code></td>", o->name);
            const char *row = html ? strstr(html, want) : NULL;
            const char *end = row ? strstr(row, "</tr>") : NULL;
            char esc[300] = ""; /* the default as HTML text: <, > and & escaped */
            for (const char *c = def ? def : ""; *c && strlen(esc) + 6 < sizeof esc; ++c)
                strcat(esc, *c == '<'   ? "&lt;"
                            : *c == '>' ? "&gt;"
                            : *c == '&' ? "&amp;"
                                        : (char[2]){*c, 0});
            snprintf(want, sizeof want, "</code></td><td>%s</td>", esc);
            const char *cell = row ? strstr(row, want) : NULL;
            snprintf(what, sizeof what, "HTML help of %s shows %s=%s", magic_label(m), o->name,
                     def ? def : "");
            ok(cell && end && cell < end, what);

            /* what a cell that leaves the option out runs with */
            cell_program p;
            magic_args a;
            char msg[1024] = "";
            snprintf(what, sizeof what, "%s validates without %s=", magic_label(m), o->name);
            if (ok(call_validate(m, NULL, NULL, &p, &a, msg, sizeof msg) == 0, what)) {
                char got[128];
                field_show(f, got, sizeof got);
                snprintf(what, sizeof what,
                         "%s %s= left out: %s (%%help) = %s (lt_%s_opts_default)", magic_label(m),
                         o->name, def ? def : "none", got, o->engine);
                ok(arg_str(&a, o->name) == def && field_matches(f, &a, o->name), what);
                ++checked;
            } else {
                diag("%s", msg);
            }
            cell_program_free(&p);
            if (def) { /* the default is a value the option accepts */
                snprintf(what, sizeof what, "%s %s=%s is accepted", magic_label(m), o->name, def);
                if (!ok(call_validate(m, o->name, def, &p, &a, msg, sizeof msg) == 0, what))
                    diag("%s", msg);
                cell_program_free(&p);
            }
        }
        free(help);
        free(html);
    }
    int reachable = 0;
    for (int i = 0; i < N_FIELDS; ++i)
        reachable += !fields[i].internal;
    char what[160];
    snprintf(what, sizeof what, "%d options compared (at least one per reachable field: %d)",
             checked, reachable);
    ok(checked >= reachable, what);
}

/* An option without the engine mark must not be a field of an engine group: its literal would
 * be a second copy of the engine's default. */
static int magic_fills(const magic_spec *m, const char *group) {
    for (const opt_spec *o = m->opts; o->name; ++o)
        if (o->engine && !strcmp(o->engine, group)) return 1;
    return 0;
}

static void test_no_literal_copies(void) {
    int nmagic;
    const magic_spec *all = magics_all(&nmagic);
    for (int k = 0; k < nmagic; ++k) {
        const magic_spec *m = &all[k];
        for (int g = 0; g < N_GROUPS; ++g) {
            if (!magic_fills(m, groups[g])) continue;
            for (const opt_spec *o = m->opts; o->name; ++o) {
                if (o->engine) continue;
                char what[200];
                snprintf(what, sizeof what, "%s %s= (default %s) is kernel-only, not a field of %s",
                         magic_label(m), o->name, o->def ? o->def : "none", groups[g]);
                ok(field_find(groups[g], o->name) == NULL, what);
            }
        }
    }
}

/* Every field some magic can set is set by one with the engine mark; the internal ones by
 * none (expose one, and it leaves the internal list). */
static void test_reachable(void) {
    int nmagic;
    const magic_spec *all = magics_all(&nmagic);
    for (int i = 0; i < N_FIELDS; ++i) {
        const field *f = &fields[i];
        char by[256] = "";
        size_t n = 0;
        for (int k = 0; k < nmagic; ++k)
            for (const opt_spec *o = all[k].opts; o->name; ++o)
                if (o->engine && !strcmp(o->engine, f->group) && !strcmp(o->name, f->name)) {
                    int w = snprintf(by + n, sizeof by - n, " %s", magic_label(&all[k]));
                    if (w > 0 && (size_t)w < sizeof by - n) n += (size_t)w;
                }
        char what[400];
        if (f->internal) {
            snprintf(what, sizeof what, "%s.%s is internal: no magic sets it%s%s", f->group,
                     f->name, n ? "; set by" : "", by);
            ok(n == 0, what);
        } else {
            snprintf(what, sizeof what, "%s.%s is set by a magic option:%s", f->group, f->name,
                     n ? by : " none");
            ok(n > 0, what);
        }
    }
}

/* Usage lines quote defaults too ("%train ... [lr=2e-4]"): each name=value there, where the
 * value is not a placeholder (N, FILE) and not the first of a list of choices (dtype=auto|fp32),
 * is the option's default. */
static int is_placeholder(const char *v, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (!((v[i] >= 'A' && v[i] <= 'Z') || (v[i] >= '0' && v[i] <= '9') || v[i] == '_'))
            return 0;
    return n > 0 && v[0] >= 'A' && v[0] <= 'Z';
}

static void test_usage_lines(void) {
    int nmagic, seen = 0;
    const magic_spec *all = magics_all(&nmagic);
    for (int k = 0; k < nmagic; ++k) {
        const magic_spec *m = &all[k];
        const char *u = m->usage;
        while (*u) {
            size_t n = strcspn(u, " []|");
            const char *eq = memchr(u, '=', n);
            if (eq && u[n] != '|') {
                char name[64];
                size_t nl = (size_t)(eq - u);
                snprintf(name, sizeof name, "%.*s", (int)nl, u);
                const char *v = eq + 1;
                size_t vl = n - nl - 1;
                const opt_spec *o = magic_opt_find(m, name);
                if (o && !is_placeholder(v, vl)) {
                    const char *def = opt_default(o);
                    char what[300];
                    snprintf(what, sizeof what, "usage of %s says %s=%.*s; the default is %s",
                             magic_label(m), name, (int)vl, v, def ? def : "none");
                    ok(def && strlen(def) == vl && !strncmp(def, v, vl), what);
                    ++seen;
                }
            }
            u += n;
            if (*u) ++u;
        }
    }
    ok(seen >= 10, "usage lines quote defaults, and they were checked");
}

int main(void) {
    test_engine_table();
    test_mapped_options();
    test_no_literal_copies();
    test_reachable();
    test_usage_lines();
    return tap_done();
}
