/* server.h — the ZeroMQ kernel server: five sockets, four threads, one interpreter.
 *
 * server_run binds the endpoints named by a Jupyter connection file and serves the messaging
 * protocol 5.4 (jupyter_client's docs/messaging.rst) until a shutdown_request arrives, on four
 * threads: heartbeat thread (echo), iopub publisher thread (fed through an inproc PULL socket),
 * control thread (shutdown, interrupt, kernel_info and the other non-execute requests), shell
 * thread (execute and everything else; owns the stdin socket and runs cells through
 * interp_execute). What is written to file descriptors 1 and 2 while a cell runs (libraries,
 * child processes) is that cell's stdout/stderr. SIGINT only interrupts the running cell. The
 * kernel stops by itself when the process that started it is gone. Logs go to the kernel's own
 * stderr with a "lathe:" prefix.
 */
#ifndef LATHE_SERVER_H
#define LATHE_SERVER_H

#include "kernel/interp.h"

/* Serves until shutdown. Returns the process exit status: 0 after a clean shutdown, 1 when
 * the connection file is unusable or a socket cannot be bound (the reason is logged). The
 * interpreter stays owned by the caller. Call once per process. A shutdown first interrupts
 * the running cell; if it has not stopped 2 s later the process ends inside server_run
 * (_exit), since the interpreter is still in use and must not be freed. */
int server_run(const char *connection_file, interp *in);

/* Records the process that started this one (its parent now, and JPY_PARENT_PID) so that
 * server_run stops when it is gone, even if it died while the kernel was still starting; on
 * Linux also asks the OS to signal (SIGHUP) the parent's death. Call first thing in main,
 * before anything slow. */
void server_watch_launcher(void);

#endif
