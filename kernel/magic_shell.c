/* magic_shell.c — %%shell: runs the cell body as a shell script (like IPython's %%bash) and
 * streams its stdout and stderr into the cell as they come. For the steps a notebook needs
 * around the model: fetching data, running llama.cpp on an exported file, listing a folder.
 *
 * The body runs verbatim under /bin/sh -c in the notebook's working directory, in its own process
 * group with stdin from /dev/null. An interrupt sends SIGINT to that group, then SIGKILL if it
 * has not ended a second later. A non-zero exit status fails the cell.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernel/display.h"
#include "kernel/magic_handlers.h"

/* Reads what is available on fd and forwards it; returns 0 at end of file. */
static int forward(magic_ctx *ctx, int fd, const char *stream) {
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return 1;
    if (n <= 0) return 0;
    buf[n] = '\0';
    if (ctx->sink->stream) ctx->sink->stream(ctx->sink->ctx, stream, buf);
    return 1;
}

int magic_shell(magic_ctx *ctx, const magic_args *a) {
    char *command = strdup(a->body ? a->body : "");
    if (!command) return magic_fail(ctx, "MemoryError", "out of memory");

    int out[2], err[2];
    if (pipe(out)) {
        free(command);
        return magic_fail(ctx, "ShellError", "%%%%shell: cannot create a pipe: %s",
                          strerror(errno));
    }
    if (pipe(err)) {
        close(out[0]);
        close(out[1]);
        free(command);
        return magic_fail(ctx, "ShellError", "%%%%shell: cannot create a pipe: %s",
                          strerror(errno));
    }
    pid_t pid = fork();
    if (pid == 0) { /* child: only async-signal-safe calls until exec */
        setpgid(0, 0);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0) dup2(devnull, 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        /* only fds 1 and 2 may hold the write ends: a command left running in the
         * background would otherwise keep the cell waiting for the end of its output */
        if (out[1] > 2) close(out[1]);
        if (err[1] > 2) close(err[1]);
        close(out[0]);
        close(err[0]);
        signal(SIGINT, SIG_DFL);
        execl("/bin/sh", "sh", "-c", command, (char *)NULL);
        _exit(127);
    }
    close(out[1]);
    close(err[1]);
    free(command);
    if (pid < 0) {
        close(out[0]);
        close(err[0]);
        return magic_fail(ctx, "ShellError", "%%%%shell: cannot start /bin/sh: %s",
                          strerror(errno));
    }
    setpgid(pid, pid); /* also from the parent, so a signal cannot race the child's call */

    struct pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    int open_fds = 2;
    double interrupted_at = 0;
    while (open_fds > 0) {
        if (*ctx->interrupted && interrupted_at == 0) {
            kill(-pid, SIGINT);
            interrupted_at = display_now();
        }
        if (interrupted_at > 0 && display_now() - interrupted_at > 1.0) kill(-pid, SIGKILL);
        if (poll(fds, 2, 50) < 0 && errno != EINTR) break;
        for (int i = 0; i < 2; ++i) {
            if (fds[i].fd >= 0 && (fds[i].revents & (POLLIN | POLLHUP | POLLERR))) {
                if (!forward(ctx, fds[i].fd, i == 0 ? "stdout" : "stderr")) {
                    close(fds[i].fd);
                    fds[i].fd = -1;
                    --open_fds;
                }
            }
        }
    }
    for (int i = 0; i < 2; ++i)
        if (fds[i].fd >= 0) close(fds[i].fd);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (interrupted_at > 0)
        return magic_fail(ctx, "KeyboardInterrupt", "%%%%shell: the command was interrupted");
    if (WIFSIGNALED(status))
        return magic_fail(ctx, "ShellError", "%%%%shell: the command was killed by signal %d",
                          WTERMSIG(status));
    if (WEXITSTATUS(status) != 0)
        return magic_fail(ctx, "ShellError", "%%%%shell: the command exited with status %d",
                          WEXITSTATUS(status));
    return 0;
}
