/*
 * proc.h - is a process alive?  The one rule every structure uses (ring locks,
 * mempool owners, heap owners, the primary's process table), from C and Python.
 *
 * A process is dead when its pid is gone, when it is a zombie with no thread
 * left running (exited, not yet reaped), or when its pid now belongs to a
 * process started later (its start time, /proc/<pid>/stat field 22, differs).
 */
#ifndef MEMD_PROC_H
#define MEMD_PROC_H

#include <stdint.h>
#include <sys/types.h>

/* State (field 3), thread count (20) and start time (22) of /proc/<pid>/stat.
 * 0, or -errno (-ENOENT: no such process). */
int memd_proc_stat(pid_t pid, char *state, long *threads, uint64_t *start);

/* 1 if `pid` is alive and its start time agrees with `start` on the bits of
 * `start_mask` (0: any start time), else 0.  Where /proc hides the process
 * (hidepid=), kill(pid, 0) decides. */
int memd_process_alive(pid_t pid, uint64_t start, uint64_t start_mask);

/* 1 if [addr, addr+len) is readable in this process, 0 if a byte of it is not
 * (a hole: a load there would be SIGSEGV or SIGBUS).  Probes one byte per `unit`
 * (a power of two: mappings cover whole units) with process_vm_readv, which
 * reports a hole as EFAULT; 1 where the call is not allowed (seccomp). */
int memd_readable(const char *addr, uint64_t len, uint64_t unit);

/* --- surviving a fault in shared memory ------------------------------------------ */

/* A process that follows a link another process damaged may load from a hole in
 * the window (SIGSEGV) or past a page file's end (SIGBUS).  An operation that
 * must survive that runs under a guard: memd_fault_env points at its jump buffer
 * (taken with __builtin_setjmp: frame, stack pointer and resume address, no
 * signal mask, no call; with -fcf-protection GCC saves and unwinds the shadow
 * stack too), and the handler jumps back there (__builtin_longjmp) instead of
 * killing the process.  Outside a guard the signal goes to the
 * handler that was there before (the default: the process dies as it would have).
 * Thread-local: another thread's fault is never taken for ours. */
typedef void *memd_jmp_buf[5]; /* GCC's __builtin_setjmp buffer */
extern __thread memd_jmp_buf *memd_fault_env __attribute__((tls_model("initial-exec")));

/* Install the SIGSEGV/SIGBUS handler (once; SA_NODEFER, so a jump out of it leaves
 * the signal mask as it was).  0 or -errno. */
int memd_fault_init(void);

#endif /* MEMD_PROC_H */
