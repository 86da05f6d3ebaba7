/* threads.c — lt_run_on_cores (see threads.h). */
#include "cuda/base/threads.h"

#include <pthread.h>
#include <unistd.h>

#define MAX_THREADS 64

void lt_run_on_cores(void *(*worker)(void *), void *job, long max_threads) {
    long nt = sysconf(_SC_NPROCESSORS_ONLN);
    if (nt < 1) nt = 1;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (max_threads > 0 && nt > max_threads) nt = max_threads;
    pthread_t th[MAX_THREADS];
    int started = 0;
    for (long i = 1; i < nt; i++)
        if (pthread_create(&th[started], NULL, worker, job) == 0) started++;
    worker(job);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
}
