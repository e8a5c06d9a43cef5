/* proc.c - process liveness and readable memory (see proc.h). */
#define _GNU_SOURCE /* process_vm_readv */
#include "proc.h"

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

int memd_proc_stat(pid_t pid, char *state, long *threads, uint64_t *start)
{
    char path[32], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    int err = errno;
    close(fd);
    if (n <= 0)
        return n < 0 ? -err : -ENOENT; /* ESRCH from read: it died meanwhile */
    buf[n] = '\0';
    /* comm (field 2) may hold spaces and parentheses: parse after the last ')'. */
    char *p = strrchr(buf, ')');
    if (p == NULL || p[1] != ' ')
        return -EINVAL;
    p += 2;
    *state = *p;
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (p == NULL)
            return -EINVAL;
        p++;
        if (field + 1 == 20)
            *threads = strtol(p, NULL, 10);
    }
    *start = strtoull(p, NULL, 10);
    return 0;
}

int memd_process_alive(pid_t pid, uint64_t start, uint64_t start_mask)
{
    if (pid <= 0)
        return 0; /* no process ever has this pid */
    /* EPERM: it exists but belongs to another user; alive as far as kill tells. */
    if (kill(pid, 0) == -1 && errno == ESRCH)
        return 0;
    char state;
    long threads = 0;
    uint64_t now_start;
    if (memd_proc_stat(pid, &state, &threads, &now_start) < 0)
        /* Gone between kill() and open(), or hidden from us (hidepid=): ask
         * kill() again rather than call a live process dead. */
        return !(kill(pid, 0) == -1 && errno == ESRCH);
    /* A zombie with one thread left is dead; a zombie thread-group leader whose
     * other threads still run is not. */
    if ((state == 'Z' || state == 'X') && threads <= 1)
        return 0;
    return (now_start & start_mask) == (start & start_mask);
}

int memd_readable(const char *addr, uint64_t len, uint64_t unit)
{
    char sink[64];
    struct iovec remote[64];
    uintptr_t at = (uintptr_t)addr, end = at + (len ? len : 1);
    while (at < end) {
        unsigned long n = 0;
        for (; n < 64 && at < end; n++, at = (at & ~(uintptr_t)(unit - 1)) + unit) {
            remote[n].iov_base = (void *)at;
            remote[n].iov_len = 1;
        }
        struct iovec local = {sink, (size_t)n};
        ssize_t got = process_vm_readv(getpid(), &local, 1, remote, n, 0);
        if (got < 0 && (errno == ENOSYS || errno == EPERM))
            return 1;
        if (got != (ssize_t)n)
            return 0;
    }
    return 1;
}

/* --- surviving a fault in shared memory ------------------------------------------ */

__thread memd_jmp_buf *memd_fault_env __attribute__((tls_model("initial-exec")));

static struct sigaction old_segv, old_bus;

/* Run the action that was there before memd's as the kernel would have run it:
 * memd's handler has SA_NODEFER and an empty mask (a longjmp out must leave the
 * signal open), so without this a flood of sent signals nests the old handler
 * without bound. Blocks its sa_mask and, unless SA_NODEFER, the signal; honours
 * SA_RESETHAND (memd's handler stays, so the guard keeps working, and takes the
 * signal as SIG_DFL from then on). Returns 1 if it ran the handler, else 0 with
 * the disposition, SIG_DFL or SIG_IGN, in *disp (SIG_DFL is NULL: no sentinel).
 * Async-signal-safe. */
static int forward(int sig, siginfo_t *si, void *uc, struct sigaction *old, void (**disp)(int))
{
    /* sa_handler and sa_sigaction share storage: test the value, whatever the
     * flags say (SIG_DFL with SA_SIGINFO is not a function to call) */
    void (*h)(int) = __atomic_load_n(&old->sa_handler, __ATOMIC_ACQUIRE);
    *disp = h;
    if (h == SIG_DFL || h == SIG_IGN)
        return 0;
    /* one shot: only the thread that resets it runs it, as under the kernel's lock */
    if (((unsigned)old->sa_flags & SA_RESETHAND) &&
        !__atomic_compare_exchange_n(&old->sa_handler, &h, SIG_DFL, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        *disp = h; /* another thread took it: h is now SIG_DFL */
        return 0;
    }
    sigset_t block = old->sa_mask, saved;
    if (!(old->sa_flags & SA_NODEFER))
        sigaddset(&block, sig);
    pthread_sigmask(SIG_BLOCK, &block, &saved);
    union {
        void (*handler)(int);
        void (*action)(int, siginfo_t *, void *);
    } fn = {.handler = h};
    if (old->sa_flags & SA_SIGINFO)
        fn.action(sig, si, uc);
    else
        fn.handler(sig);
    /* a signal that came meanwhile is delivered here, to a fresh frame */
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return 1;
}

static void on_fault(int sig, siginfo_t *si, void *uc)
{
    /* si_code <= 0: sent by kill, tkill or sigqueue, not raised by an access: never
     * a fault in shared memory, whatever this thread is doing */
    const int sent = si->si_code <= 0;
    memd_jmp_buf *env = memd_fault_env;
    if (env != NULL && !sent) {
        memd_fault_env = NULL;
        __builtin_longjmp(*env, 1);
    }
    /* Not ours: hand it to whoever had it. */
    struct sigaction *old = sig == SIGSEGV ? &old_segv : &old_bus;
    void (*h)(int);
    if (forward(sig, si, uc, old, &h)) {
        /* the old handler ran */
    } else if (!sent) {
        /* a fault: the access runs again with the old action in place (a fault
         * cannot be ignored: the kernel then kills) */
        sigaction(sig, old, NULL);
    } else if (h == SIG_DFL) {
        /* sent, default action: die of it now (SA_NODEFER: not blocked here) */
        sigaction(sig, old, NULL);
        raise(sig);
    } /* sent and ignored: nothing, and the guard stays */
}

int memd_fault_init(void)
{
    static int done;
    if (done)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &old_segv) < 0 || sigaction(SIGBUS, &sa, &old_bus) < 0)
        return -errno;
    done = 1;
    return 0;
}
