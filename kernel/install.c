/* install.c — `lathe install [--user|--sys-prefix|--prefix DIR] [--name NAME]`: writes the
 * kernelspec (kernel.json + logos) where Jupyter looks for it (the folders `jupyter kernelspec
 * install` uses: jupyter_client's docs/kernels.rst, "Kernel specs").
 *
 * argv names this very binary by absolute path, so the spec works from a build tree as well
 * as from an installed prefix; `--exec PATH` names another (`make install` uses it, since
 * under DESTDIR the binary that runs is not where it will live). Files are written
 * atomically (temp + fsync + rename).
 */
#include "kernel/install.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "kernel/logos.h"

/* mkdir -p */
static int make_dirs(const char *path) {
    char buf[PATH_MAX + 512];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return -1;
    for (char *p = buf + 1; *p; ++p) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(buf, 0755) && errno != EEXIST ? -1 : 0;
}

static int write_atomic(const char *path, const void *data, size_t n) {
    char tmp[PATH_MAX + 600];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return -1;
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            close(fd);
            unlink(tmp);
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    if (fsync(fd) || close(fd)) {
        unlink(tmp);
        return -1;
    }
    if (rename(tmp, path)) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* The kernels folder for each install flavour, as `jupyter kernelspec install` picks it: --user
 * ~/.local/share/jupyter/kernels (or under $JUPYTER_DATA_DIR / $XDG_DATA_HOME), --sys-prefix
 * /usr/share/jupyter/kernels (Debian's sys.prefix), --prefix P P/share/jupyter/kernels, and
 * /usr/local/share/jupyter/kernels otherwise. */
static int kernels_dir(const char *mode, const char *prefix, char *out, size_t n) {
    if (strcmp(mode, "--user") == 0) {
        const char *data = getenv("JUPYTER_DATA_DIR");
        if (data && *data) return snprintf(out, n, "%s/kernels", data) >= (int)n ? -1 : 0;
        const char *home = getenv("HOME");
        if (!home || !*home) {
            struct passwd *pw = getpwuid(getuid());
            home = pw ? pw->pw_dir : NULL;
        }
        if (!home) return -1;
        const char *xdg = getenv("XDG_DATA_HOME");
        if (xdg && *xdg) return snprintf(out, n, "%s/jupyter/kernels", xdg) >= (int)n ? -1 : 0;
        return snprintf(out, n, "%s/.local/share/jupyter/kernels", home) >= (int)n ? -1 : 0;
    }
    if (strcmp(mode, "--sys-prefix") == 0)
        return snprintf(out, n, "/usr/share/jupyter/kernels") >= (int)n ? -1 : 0;
    if (strcmp(mode, "--prefix") == 0)
        return snprintf(out, n, "%s/share/jupyter/kernels", prefix) >= (int)n ? -1 : 0;
    return snprintf(out, n, "/usr/local/share/jupyter/kernels") >= (int)n ? -1 : 0;
}

static void install_usage(void) {
    fprintf(stderr, "usage: lathe install [--user | --sys-prefix | --prefix DIR] [--name NAME] "
                    "[--exec PATH]\n"
                    "  (no flag: /usr/local/share/jupyter/kernels, like jupyter kernelspec)\n");
}

int install_main(int argc, char **argv) {
    const char *mode = "", *prefix = NULL, *name = "lathe", *exec = NULL;
    for (int i = 0; i < argc; ++i) {
        if (!strcmp(argv[i], "--user") || !strcmp(argv[i], "--sys-prefix")) {
            mode = argv[i];
        } else if (!strcmp(argv[i], "--prefix") && i + 1 < argc) {
            mode = "--prefix";
            prefix = argv[++i];
        } else if (!strcmp(argv[i], "--name") && i + 1 < argc) {
            name = argv[++i];
        } else if (!strcmp(argv[i], "--exec") && i + 1 < argc) {
            exec = argv[++i];
        } else {
            fprintf(stderr, "lathe install: unknown argument '%s'\n", argv[i]);
            install_usage();
            return 2;
        }
    }
    for (const char *p = name; *p; ++p)
        if (!(((*p | 32) >= 'a' && (*p | 32) <= 'z') || (*p >= '0' && *p <= '9') || *p == '-' ||
              *p == '.' || *p == '_')) {
            fprintf(stderr,
                    "lathe install: kernel name '%s' may hold only letters, digits, "
                    "'-', '.', '_'\n",
                    name);
            return 2;
        }
    char self[PATH_MAX];
    if (exec) {
        if (exec[0] != '/') {
            fprintf(stderr, "lathe install: --exec needs an absolute path, got '%s'\n", exec);
            return 2;
        }
        snprintf(self, sizeof self, "%s", exec);
    } else {
        ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
        if (n <= 0) {
            fprintf(stderr, "lathe install: cannot find this program's path: %s\n",
                    strerror(errno));
            return 1;
        }
        self[n] = '\0';
    }

    char dir[PATH_MAX + 256], base[PATH_MAX];
    if (kernels_dir(mode, prefix, base, sizeof base)) {
        fprintf(stderr, "lathe install: cannot work out the kernels folder\n");
        return 1;
    }
    snprintf(dir, sizeof dir, "%s/%s", base, name);
    if (make_dirs(dir)) {
        fprintf(stderr, "lathe install: cannot create %s: %s (try --user)\n", dir, strerror(errno));
        return 1;
    }
    json_t *spec =
        json_pack("{s:[s,s,s,s], s:s, s:s, s:s, s:{}, s:s}", "argv", self, "kernel", "-f",
                  "{connection_file}", "display_name", "Lathe (Gemma 3)", "language", "lathe",
                  "interrupt_mode", "message", "metadata", "kernel_protocol_version", "5.4");
    char *text = spec ? json_dumps(spec, JSON_INDENT(2)) : NULL;
    json_decref(spec);
    if (!text) {
        fprintf(stderr, "lathe install: out of memory\n");
        return 1;
    }
    struct {
        const char *file;
        const void *data;
        size_t len;
    } files[] = {
        {"kernel.json", text, strlen(text)},
        {"logo-32x32.png", logo_32, logo_32_len},
        {"logo-64x64.png", logo_64, logo_64_len},
        {"logo-svg.svg", logo_svg, logo_svg_len},
    };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; ++i) {
        char path[PATH_MAX + 512];
        snprintf(path, sizeof path, "%s/%s", dir, files[i].file);
        if (write_atomic(path, files[i].data, files[i].len)) {
            fprintf(stderr, "lathe install: cannot write %s: %s\n", path, strerror(errno));
            free(text);
            return 1;
        }
    }
    free(text);
    printf("installed kernelspec '%s' in %s\n", name, dir);
    return 0;
}
