/* main.c — the `lathe` program: one binary, several doors (entry points):
 *   lathe kernel -f CONNECTION_FILE   what Jupyter starts (the kernelspec's argv)
 *   lathe install [--user|...]        writes the kernelspec
 *   lathe run FILE|-                  runs cells without Jupyter
 *   lathe logits MODEL [key=value ...] [--image FILE] --ids ... --out FILE.npy
 */
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "kernel/install.h"
#include "kernel/interp.h"
#include "kernel/run.h"
#include "kernel/server.h"

static int usage(FILE *f) {
    fprintf(f,
            "%s — a Jupyter kernel that fine-tunes and runs Gemma 3\n\n"
            "usage:\n"
            "  lathe kernel -f CONNECTION_FILE   serve Jupyter (started by Jupyter)\n"
            "  lathe install [--user | --sys-prefix | --prefix DIR] [--name NAME]\n"
            "  lathe run FILE|-                  run a cell script (cells split at '# %%%%')\n"
            "  lathe logits MODEL [dtype= device= quant=] [--image FILE] --ids 2,17,... "
            "--out FILE.npy\n"
            "  lathe --version\n",
            PACKAGE_STRING);
    return f == stderr ? 2 : 0;
}

static int kernel_main(int argc, char **argv) {
    server_watch_launcher(); /* first: the launcher may die while the kernel starts */
    const char *conn = NULL;
    for (int i = 0; i < argc; ++i) {
        if ((!strcmp(argv[i], "-f") || !strcmp(argv[i], "--connection-file")) && i + 1 < argc)
            conn = argv[++i];
        else if (!strncmp(argv[i], "--connection-file=", 18))
            conn = argv[i] + 18;
    }
    if (!conn) {
        fprintf(stderr, "usage: lathe kernel -f CONNECTION_FILE\n");
        return 2;
    }
    interp *in = interp_new();
    if (!in) {
        fprintf(stderr, "lathe: cannot start the interpreter (out of memory)\n");
        return 1;
    }
    int rc = server_run(conn, in);
    interp_free(in);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage(stderr);
    const char *cmd = argv[1];
    if (!strcmp(cmd, "kernel")) return kernel_main(argc - 2, argv + 2);
    if (!strcmp(cmd, "install")) return install_main(argc - 2, argv + 2);
    if (!strcmp(cmd, "run")) return run_main(argc - 2, argv + 2);
    if (!strcmp(cmd, "logits")) return logits_main(argc - 2, argv + 2);
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
        printf("%s\n", PACKAGE_STRING);
        return 0;
    }
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "help") || !strcmp(cmd, "-h")) return usage(stdout);
    fprintf(stderr, "lathe: unknown command '%s'\n", cmd);
    return usage(stderr);
}
