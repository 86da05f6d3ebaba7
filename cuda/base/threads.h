/* threads.h — run one job on every core: the engine's loaders and measurements split their
 * work into chunks that workers take under the job's own lock, and this starts the workers.
 * Owns no state; knows nothing of what the job is.
 */
#ifndef LATHE_THREADS_H
#define LATHE_THREADS_H

/* Runs worker(job) on min(online cores, 64, max_threads) threads, this one included, and
 * returns when all have returned (max_threads <= 0: no limit but the cores). Threads that
 * cannot be started are done without: the calling thread always works, so the job finishes. */
void lt_run_on_cores(void *(*worker)(void *), void *job, long max_threads);

#endif
