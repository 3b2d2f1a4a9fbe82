/* The transport's hot path in C: a worker's submit and wait, the sidecar's
 * scan, take (copy out and validate) and publish, and the semaphores they
 * post and wait on, with the GIL released while waiting.
 *
 * NOTE: shm_protocol/layout.py is the one spec. These files know no offset:
 * a Ring is built from the slot dtype's field offsets (hotpath.py passes
 * them), and tests/unit/test_hotpath.py checks that what C writes, numpy
 * reads, and the reverse.
 *
 * Memory order: the writer of a slot's payload publishes it with a release
 * store of ``state``; the reader loads ``state`` with acquire before it
 * reads the payload (and a semaphore post/wait orders too). This is what
 * makes the protocol correct on weakly ordered CPUs (ARM), not only x86.
 *
 * Nothing read from shared memory is trusted: every count, offset and id is
 * read once into private memory and checked before it is used.
 *
 * The extension is built from the files of this folder, one job each, with
 * this header as their shared private part:
 *   sem.c        Sem: a named POSIX semaphore (post, wait, drain, spin)
 *   ring.c       Ring: the slots (submit, poll, collect; scan, take, publish)
 *   liveness.c   Liveness: the quick check of the sidecar's header
 *   wordpiece.c  WordPiece: BERT's tokenizer for ASCII text
 *   module.c     the module's functions, its constants and its init
 */
#ifndef SHM_HOTPATH_H
#define SHM_HOTPATH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <signal.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() do { } while (0)
#endif

/* Slot states and error codes: hotpath.py checks these against layout.py at import. */
enum { ST_FREE = 0, ST_CLAIMED = 1, ST_READY = 2, ST_BUSY = 3, ST_DONE = 4, ST_ERROR = 5 };
enum { E_NONE = 0, E_BAD_COUNT = 1, E_BAD_OFFSETS = 2, E_BAD_TOKEN = 3, E_TOO_LONG = 4,
       E_CANCELLED = 8, E_BAD_MODEL = 9, E_BAD_SEGMENTS = 10 };
#define ETA_NONE 0ULL
#define ETA_PARK 1ULL

/* Polls between yields of the CPU while spinning: a spinner must let a
 * thread of its own process (or the peer on a shared core) run. */
#define SPIN_YIELD_EVERY 64

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Timer slack is per thread: 50 us by default, which a timed wait of a few
 * hundred microseconds overshoots by. Set once per waiting thread. */
extern __thread int slack_set;   /* defined in module.c */
extern long timer_slack_ns;

static inline void ensure_slack(void) {
    if (!slack_set) {
        prctl(PR_SET_TIMERSLACK, (unsigned long)timer_slack_ns, 0, 0, 0);
        slack_set = 1;
    }
}

/* A Sem's object: Ring.publish posts one. */
typedef struct {
    PyObject_HEAD
    sem_t *sem;
} SemObject;

/* Poll results. */
enum { POLL_ANSWERED = 1, POLL_TIMEOUT = 0, POLL_PARK = 2 };

/* The types, each defined in its own file and added to the module by module.c. */
extern PyTypeObject SemType, RingType, LivenessType, WordPieceType;

#endif /* SHM_HOTPATH_H */
