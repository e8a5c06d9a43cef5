/*
 * lock.h - process-shared robust locks in shared memory.
 *
 * A holder that dies must not wedge everyone: the next locker gets the lock back
 * (EOWNERDEAD), the lock is marked consistent, and the caller is told with a
 * return of 1 so it can check the structure the dead owner was changing.
 */
#ifndef MEMD_LOCK_H
#define MEMD_LOCK_H

#include "memd_layout.h"

/* This process's pid, cached (getpid() is a system call) and refreshed in a
 * forked child: what locks, heap blocks and mempool objects are tagged with. */
pid_t memd_self_pid(void);

/* Initialise an unlocked lock. Fails iff pthread attributes fail (-errno). */
int memd_lock_init(struct memd_lock *l);

/* Returns 0 when taken, 1 when taken from a dead owner (check what it guards),
 * -ENOTRECOVERABLE if an earlier recovery was abandoned, -EDEADLK if this thread
 * holds it already (a bug, reported instead of a hang). Blocks. */
int memd_lock_acquire(struct memd_lock *l);

/* As memd_lock_acquire but gives up with -ETIMEDOUT after timeout_ns. */
int memd_lock_timed(struct memd_lock *l, uint64_t timeout_ns);

/* As memd_lock_acquire but returns -EBUSY at once instead of blocking. */
int memd_lock_try(struct memd_lock *l);

void memd_lock_release(struct memd_lock *l);

#endif
