/* lock.c - robust process-shared mutexes (see lock.h). */
#define _GNU_SOURCE /* pthread_mutex_clocklock */
#include "lock.h"

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* owner_pid is diagnostics, but getpid() is a system call (~160 ns here, more
 * than the rest of a heap alloc): cache it, and forget it in a forked child. */
static pid_t cached_pid;
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;

static void forget_pid(void) { cached_pid = 0; }

static void register_atfork(void) { pthread_atfork(NULL, NULL, forget_pid); }

pid_t memd_self_pid(void)
{
    pid_t p = cached_pid;
    if (p == 0) {
        pthread_once(&pid_once, register_atfork);
        cached_pid = p = getpid();
    }
    return p;
}

int memd_lock_init(struct memd_lock *l)
{
    pthread_mutexattr_t a;
    int rc;
    memset(l, 0, sizeof(*l));
    if ((rc = pthread_mutexattr_init(&a)) != 0)
        return -rc;
    rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    if (rc == 0) /* a thread that locks what it holds gets EDEADLK, never a hang */
        rc = pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
    if (rc == 0)
        rc = pthread_mutex_init(&l->u.mutex, &a);
    pthread_mutexattr_destroy(&a);
    return -rc;
}

static int after_lock(struct memd_lock *l, int rc)
{
    if (rc == EOWNERDEAD) {
        /* The owner died inside its critical section. We own the lock now;
         * mark it usable and let the caller verify the guarded structure. */
        pthread_mutex_consistent(&l->u.mutex);
        l->recoveries++;
        l->owner_pid = memd_self_pid();
        return 1;
    }
    if (rc != 0)
        return -rc;
    l->owner_pid = memd_self_pid();
    return 0;
}

int memd_lock_acquire(struct memd_lock *l)
{
    return after_lock(l, pthread_mutex_lock(&l->u.mutex));
}

int memd_lock_timed(struct memd_lock *l, uint64_t timeout_ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t ns = (uint64_t)ts.tv_nsec + timeout_ns % 1000000000u;
    ts.tv_sec += (time_t)(timeout_ns / 1000000000u + ns / 1000000000u);
    ts.tv_nsec = (long)(ns % 1000000000u);
    return after_lock(l, pthread_mutex_clocklock(&l->u.mutex, CLOCK_MONOTONIC, &ts));
}

int memd_lock_try(struct memd_lock *l) { return after_lock(l, pthread_mutex_trylock(&l->u.mutex)); }

void memd_lock_release(struct memd_lock *l)
{
    l->owner_pid = 0;
    pthread_mutex_unlock(&l->u.mutex);
}
