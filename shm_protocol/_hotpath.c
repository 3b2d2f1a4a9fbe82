/* The transport's hot path in C: a worker's submit and wait, the sidecar's
 * scan, take (copy out and validate) and publish, and the semaphores they
 * post and wait on, with the GIL released while waiting.
 *
 * NOTE: shm_protocol/layout.py is the one spec. This file knows no offset:
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
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
static __thread int slack_set = 0;
static long timer_slack_ns = 1000;

static inline void ensure_slack(void) {
    if (!slack_set) {
        prctl(PR_SET_TIMERSLACK, (unsigned long)timer_slack_ns, 0, 0, 0);
        slack_set = 1;
    }
}

/* ---------------------------------------------------------------- Sem -- */

typedef struct {
    PyObject_HEAD
    sem_t *sem;
} SemObject;

static int Sem_init(SemObject *self, PyObject *args, PyObject *kw) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return -1;
    sem_t *s = sem_open(name, 0);
    if (s == SEM_FAILED) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
        return -1;
    }
    if (self->sem != NULL) sem_close(self->sem);
    self->sem = s;
    return 0;
}

static void Sem_dealloc(SemObject *self) {
    if (self->sem != NULL) sem_close(self->sem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int sem_ok(SemObject *self) {
    if (self->sem == NULL) {
        PyErr_SetString(PyExc_ValueError, "semaphore is closed");
        return 0;
    }
    return 1;
}

static PyObject *Sem_post(SemObject *self, PyObject *unused) {
    if (!sem_ok(self)) return NULL;
    if (sem_post(self->sem) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *Sem_trywait(SemObject *self, PyObject *unused) {
    if (!sem_ok(self)) return NULL;
    if (sem_trywait(self->sem) == 0) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

/* Wait up to ``timeout`` seconds (GIL released). True when taken; False
 * when the time ran out. A signal runs Python's handlers (which may raise)
 * and the wait goes on for what is left. */
static PyObject *Sem_wait(SemObject *self, PyObject *arg) {
    if (!sem_ok(self)) return NULL;
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    if (!(timeout >= 0)) timeout = 0;  /* NaN too */
    if (timeout > 1e7) timeout = 1e7;  /* infinity: 115 days, a bound the clock arithmetic holds */
    sem_t *sem = self->sem;  /* read with the GIL held: close() runs under it */
    uint64_t until = now_ns() + (uint64_t)(timeout * 1e9);
    for (;;) {
        int rc, err;
        struct timespec ts = {(time_t)(until / 1000000000ULL), (long)(until % 1000000000ULL)};
        Py_BEGIN_ALLOW_THREADS
        ensure_slack();
        rc = sem_clockwait(sem, CLOCK_MONOTONIC, &ts);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc == 0) Py_RETURN_TRUE;
        if (err == ETIMEDOUT) Py_RETURN_FALSE;
        if (err == EINTR) {
            if (PyErr_CheckSignals() != 0) return NULL;
            continue;
        }
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
}

/* Take up to ``limit`` pending posts without blocking; how many were taken. */
static PyObject *Sem_drain(SemObject *self, PyObject *arg) {
    if (!sem_ok(self)) return NULL;
    long long limit = PyLong_AsLongLong(arg);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    long long n = 0;
    while (n < limit && sem_trywait(self->sem) == 0) n++;
    return PyLong_FromLongLong(n);
}

/* Poll for a post until monotonic ``until_ns`` (GIL released): the sidecar's
 * idle doorbell, where parking would add a wake-up of 100 us or more. */
static PyObject *Sem_spin(SemObject *self, PyObject *arg) {
    if (!sem_ok(self)) return NULL;
    unsigned long long until = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    int got = 0;
    sem_t *s = self->sem;
    Py_BEGIN_ALLOW_THREADS
    for (unsigned n = 1;; n++) {
        if (sem_trywait(s) == 0) { got = 1; break; }
        if ((n & 15) == 0 && now_ns() >= until) break;
        if (n % SPIN_YIELD_EVERY == 0) sched_yield(); else CPU_RELAX();
    }
    Py_END_ALLOW_THREADS
    if (got) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *Sem_value(SemObject *self, PyObject *unused) {
    if (!sem_ok(self)) return NULL;
    int v = 0;
    if (sem_getvalue(self->sem, &v) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(v);
}

static PyObject *Sem_close(SemObject *self, PyObject *unused) {
    if (self->sem != NULL) {
        sem_close(self->sem);
        self->sem = NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Sem_methods[] = {
    {"post", (PyCFunction)Sem_post, METH_NOARGS, "Post once."},
    {"trywait", (PyCFunction)Sem_trywait, METH_NOARGS, "Take a post if one is pending."},
    {"wait", (PyCFunction)Sem_wait, METH_O, "wait(timeout_s) -> bool, GIL released."},
    {"drain", (PyCFunction)Sem_drain, METH_O, "drain(limit) -> posts taken."},
    {"spin", (PyCFunction)Sem_spin, METH_O, "spin(until_ns) -> bool: poll for a post until then."},
    {"value", (PyCFunction)Sem_value, METH_NOARGS, "The current value."},
    {"close", (PyCFunction)Sem_close, METH_NOARGS, "Close this process's handle."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SemType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shm_protocol._hotpath.Sem",
    .tp_doc = "An existing named POSIX semaphore, opened by name.",
    .tp_basicsize = sizeof(SemObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Sem_init,
    .tp_dealloc = (destructor)Sem_dealloc,
    .tp_methods = Sem_methods,
};

/* --------------------------------------------------------------- Ring -- */

/* Field offsets within a slot, from layout.slot_dtype (passed in by name). */
typedef struct {
    Py_ssize_t state, error, n_texts, n_tokens, seq, submit_ns, queue_ns, compute_ns, eta_ns,
        batch_texts, cancel, model, offsets, segments, tokens, out;
} Fields;

static const char *FIELD_NAMES[] = {"state", "error", "n_texts", "n_tokens", "seq", "submit_ns", "queue_ns",
                                    "compute_ns", "eta_ns", "batch_texts", "cancel", "model", "offsets",
                                    "segments", "tokens", "out", NULL};

typedef struct {
    PyObject_HEAD
    Py_buffer view;        /* the slots' memory, held while the Ring lives */
    int has_view;
    char *base;
    Py_ssize_t n_slots, slot_bytes;
    uint32_t max_texts, max_tokens, dim;
    Fields f;
    volatile uint32_t *queued;  /* the sidecar's queue depth in the header (worker side), or NULL */
    Py_buffer queued_view;
    int has_queued;
} RingObject;

#define SLOT(r, i) ((r)->base + (Py_ssize_t)(i) * (r)->slot_bytes)
#define U32(p, off) ((uint32_t *)((p) + (off)))
#define U64(p, off) ((uint64_t *)((p) + (off)))
#define I32(p, off) ((int32_t *)((p) + (off)))

static inline uint32_t load_acq32(char *slot, Py_ssize_t off) {
    return atomic_load_explicit((_Atomic uint32_t *)(slot + off), memory_order_acquire);
}
static inline void store_rel32(char *slot, Py_ssize_t off, uint32_t v) {
    atomic_store_explicit((_Atomic uint32_t *)(slot + off), v, memory_order_release);
}
static inline uint64_t load_rlx64(char *slot, Py_ssize_t off) {
    return atomic_load_explicit((_Atomic uint64_t *)(slot + off), memory_order_relaxed);
}

static int Ring_init(RingObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"slots", "slot_bytes", "fields", "max_texts", "max_tokens", "dim", "queued", NULL};
    PyObject *slots, *fields, *queued = Py_None;
    Py_ssize_t slot_bytes;
    unsigned int max_texts, max_tokens, dim;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnO!III|O", kwlist, &slots, &slot_bytes, &PyDict_Type, &fields,
                                     &max_texts, &max_tokens, &dim, &queued))
        return -1;
    if (self->has_view) return PyErr_SetString(PyExc_RuntimeError, "Ring already initialised"), -1;
    if (slot_bytes <= 0 || slot_bytes % 64 != 0 || max_texts == 0 || max_tokens == 0 || dim == 0) {
        PyErr_SetString(PyExc_ValueError, "bad ring geometry");
        return -1;
    }
    Py_ssize_t *dst = (Py_ssize_t *)&self->f;
    for (int i = 0; FIELD_NAMES[i] != NULL; i++) {
        PyObject *o = PyDict_GetItemString(fields, FIELD_NAMES[i]);
        if (o == NULL) return PyErr_Format(PyExc_KeyError, "field %s missing", FIELD_NAMES[i]), -1;
        Py_ssize_t off = PyLong_AsSsize_t(o);
        if (off == -1 && PyErr_Occurred()) return -1;
        if (off < 0 || off + 8 > slot_bytes || off % 4 != 0)
            return PyErr_Format(PyExc_ValueError, "field %s outside the slot or unaligned", FIELD_NAMES[i]), -1;
        dst[i] = off;
    }
    /* The arrays must fit in the slot: a wrong geometry would write past it. */
    if (self->f.offsets + 4 * ((Py_ssize_t)max_texts + 1) > slot_bytes ||
        self->f.segments + 4 * (Py_ssize_t)max_texts > slot_bytes ||
        self->f.tokens + 4 * (Py_ssize_t)max_tokens > slot_bytes ||
        self->f.out + 4 * (Py_ssize_t)max_texts * dim > slot_bytes) {
        PyErr_SetString(PyExc_ValueError, "slot arrays do not fit the slot size");
        return -1;
    }
    if (PyObject_GetBuffer(slots, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) return -1;
    self->has_view = 1;
    if (self->view.len % slot_bytes != 0 || self->view.len == 0) {
        PyErr_SetString(PyExc_ValueError, "buffer is not a whole number of slots");
        return -1;
    }
    if (((uintptr_t)self->view.buf) % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "slot memory is not 8-byte aligned");
        return -1;
    }
    self->base = (char *)self->view.buf;
    self->slot_bytes = slot_bytes;
    self->n_slots = self->view.len / slot_bytes;
    self->max_texts = max_texts;
    self->max_tokens = max_tokens;
    self->dim = dim;
    if (queued != Py_None) {
        if (PyObject_GetBuffer(queued, &self->queued_view, PyBUF_C_CONTIGUOUS) != 0) return -1;
        self->has_queued = 1;
        if (self->queued_view.len < 4 || ((uintptr_t)self->queued_view.buf) % 4 != 0) {
            PyErr_SetString(PyExc_ValueError, "queued must be one aligned u32");
            return -1;
        }
        self->queued = (volatile uint32_t *)self->queued_view.buf;
    }
    return 0;
}

static void ring_release(RingObject *self) {
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
        self->base = NULL;
        self->n_slots = 0;
    }
    if (self->has_queued) {
        PyBuffer_Release(&self->queued_view);
        self->has_queued = 0;
        self->queued = NULL;
    }
}

static void Ring_dealloc(RingObject *self) {
    ring_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Ring_release(RingObject *self, PyObject *unused) {
    ring_release(self);
    Py_RETURN_NONE;
}

static int slot_ok(RingObject *self, Py_ssize_t i) {
    if (self->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "ring released");
        return 0;
    }
    if (i < 0 || i >= self->n_slots) {
        PyErr_SetString(PyExc_IndexError, "slot index out of range");
        return 0;
    }
    return 1;
}

/* Integers from a buffer (any integer format numpy exports) or a sequence of
 * Python ints, one at a time through ``put``; the count, or -1 with an
 * exception. ``cap`` bounds the count before anything is written. */
typedef int (*put_fn)(void *dst, Py_ssize_t i, long long v);

static int put_i32(void *dst, Py_ssize_t i, long long v) {
    if (v < INT32_MIN || v > INT32_MAX) return PyErr_SetString(PyExc_OverflowError, "token id over 32 bits"), -1;
    ((int32_t *)dst)[i] = (int32_t)v;
    return 0;
}

static int put_u32(void *dst, Py_ssize_t i, long long v) {
    if (v < 0 || v > (long long)UINT32_MAX) return PyErr_SetString(PyExc_OverflowError, "value outside u32"), -1;
    ((uint32_t *)dst)[i] = (uint32_t)v;
    return 0;
}

static Py_ssize_t read_ints(PyObject *src, void *dst, Py_ssize_t cap, put_fn put, const char *what) {
    if (PyObject_CheckBuffer(src)) {
        Py_buffer b;
        if (PyObject_GetBuffer(src, &b, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) return -1;
        const char *f = b.format ? b.format : "B";
        if (*f == '<' || *f == '=' || *f == '@') f++;
        Py_ssize_t n = b.itemsize > 0 ? b.len / b.itemsize : 0;
        Py_ssize_t rc = n;
        if (n > cap) {
            PyErr_Format(PyExc_ValueError, "more %s than a slot holds", what);
            rc = -1;
        } else if (put == put_i32 && b.itemsize == 4 && (*f == 'i' || (*f == 'l' && sizeof(long) == 4))) {
            memcpy(dst, b.buf, (size_t)b.len);  /* int32 ids: the usual case */
        } else {
            for (Py_ssize_t i = 0; i < n && rc >= 0; i++) {
                long long v;
                char *q = (char *)b.buf + i * b.itemsize;
                switch (*f) {
                case 'b': v = *(int8_t *)q; break;
                case 'B': v = *(uint8_t *)q; break;
                case 'h': v = *(int16_t *)q; break;
                case 'H': v = *(uint16_t *)q; break;
                case 'i': v = *(int32_t *)q; break;
                case 'I': v = *(uint32_t *)q; break;
                case 'l': case 'q': v = b.itemsize == 8 ? *(int64_t *)q : *(int32_t *)q; break;
                case 'L': case 'Q': {
                    uint64_t u = b.itemsize == 8 ? *(uint64_t *)q : *(uint32_t *)q;
                    v = u > (uint64_t)INT64_MAX ? -1 : (long long)u;
                    break;
                }
                default:
                    PyErr_Format(PyExc_TypeError, "%s must be integers, not format %s", what, b.format);
                    rc = -1;
                    continue;
                }
                if (put(dst, i, v) != 0) rc = -1;
            }
        }
        PyBuffer_Release(&b);
        return rc;
    }
    /* A tuple of our own: an item's __index__ may run Python code that
     * changes a list under us, never this copy. */
    PyObject *seq = PyList_CheckExact(src) || PyTuple_CheckExact(src) || PySequence_Check(src)
                        ? PySequence_Tuple(src) : NULL;
    if (seq == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "expected a sequence of ints");
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > cap) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "more %s than a slot holds", what);
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_Check(items[i]) ? PyLong_AsLongLong(items[i]) : -1;
        if (!PyLong_Check(items[i])) {
            PyObject *ix = PyNumber_Index(items[i]);
            if (ix == NULL) {
                Py_DECREF(seq);
                return -1;
            }
            v = PyLong_AsLongLong(ix);
            Py_DECREF(ix);
        }
        if ((v == -1 && PyErr_Occurred()) || put(dst, i, v) != 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return n;
}

/* submit(slot, ids, lengths, model, segments, seq, clear_segments, bell, out_dim, mark) -> bool
 * Worker: write one request's payload, then state = READY (release), then
 * post the doorbell. ``lengths``: tokens of each text (a sequence of ints);
 * ``segments``: pair splits or None (then the split area is zeroed if
 * ``clear_segments``). Returns whether the doorbell post succeeded (a failed
 * post is only a lost wake-up: the sidecar scans at least every heartbeat). */
static PyObject *Ring_submit(RingObject *self, PyObject *args) {
    Py_ssize_t slot;
    PyObject *ids, *lengths, *segments;
    unsigned int model;
    unsigned long long seq;
    int clear_segments;
    PyObject *bell;
    unsigned int out_dim = 0, mark = 0;
    if (!PyArg_ParseTuple(args, "nOOIOKpO|II", &slot, &ids, &lengths, &model, &segments, &seq, &clear_segments,
                          &bell, &out_dim, &mark))
        return NULL;
    if (out_dim > self->dim) return PyErr_SetString(PyExc_ValueError, "out_dim over the slot's dim"), NULL;
    if (!slot_ok(self, slot)) return NULL;
    if (bell != Py_None && !PyObject_TypeCheck(bell, &SemType)) {
        PyErr_SetString(PyExc_TypeError, "bell must be a Sem or None");
        return NULL;
    }
    char *p = SLOT(self, slot);
    store_rel32(p, self->f.state, ST_CLAIMED);
    Py_ssize_t ntok = read_ints(ids, I32(p, self->f.tokens), self->max_tokens, put_i32, "tokens");
    if (ntok < 0) return NULL;
    uint32_t *offs = U32(p, self->f.offsets);
    /* Lengths go to offsets[1..n] as a running sum; offsets[0] = 0. */
    uint32_t lens[1024];
    uint32_t *lbuf = self->max_texts <= 1024 ? lens : PyMem_Malloc(sizeof(uint32_t) * self->max_texts);
    if (lbuf == NULL) return PyErr_NoMemory();
    Py_ssize_t n = read_ints(lengths, lbuf, self->max_texts, put_u32, "texts");
    if (n < 0) goto fail;
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "a request part holds at least one text");
        goto fail;
    }
    uint64_t run = 0;
    offs[0] = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        run += lbuf[i];
        offs[i + 1] = (uint32_t)run;
    }
    if (run != (uint64_t)ntok) {
        PyErr_SetString(PyExc_ValueError, "lengths do not add up to the ids");
        goto fail;
    }
    uint32_t *segs = U32(p, self->f.segments);
    if (segments != Py_None) {
        Py_ssize_t ns = read_ints(segments, segs, n, put_u32, "segment splits");
        if (ns < 0) goto fail;
        if (ns != n) {
            PyErr_SetString(PyExc_ValueError, "one segment split per text");
            goto fail;
        }
    } else if (clear_segments) {
        memset(segs, 0, sizeof(uint32_t) * self->max_texts);
    }
    if (lbuf != lens) PyMem_Free(lbuf);
    if (out_dim > 0) {
        /* Mark the last column the reader expects and the one after it: the
         * reader's collect() checks that the sidecar wrote rows exactly that wide. */
        uint32_t *o = U32(p, self->f.out);
        for (Py_ssize_t i = 0; i < n; i++) {
            o[i * self->dim + out_dim - 1] = mark;
            if (out_dim < self->dim) o[i * self->dim + out_dim] = mark;
        }
    }
    *U32(p, self->f.model) = model;
    *U32(p, self->f.n_texts) = (uint32_t)n;
    *U32(p, self->f.n_tokens) = (uint32_t)ntok;
    *U64(p, self->f.seq) = seq;
    *U32(p, self->f.error) = E_NONE;
    *U64(p, self->f.eta_ns) = ETA_NONE;
    *U64(p, self->f.submit_ns) = now_ns();
    /* NOTE: payload, then state (release), then the doorbell. */
    store_rel32(p, self->f.state, ST_READY);
    if (bell != Py_None) {
        SemObject *b = (SemObject *)bell;
        if (b->sem == NULL || sem_post(b->sem) != 0) Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
fail:
    if (lbuf != lens) PyMem_Free(lbuf);
    store_rel32(p, self->f.state, ST_CLAIMED);
    return NULL;
}

/* The slot's state (one acquire load) if it holds generation ``seq``'s
 * answer (DONE or ERROR), else 0. */
static inline uint32_t answered_state(RingObject *self, char *p, uint64_t seq) {
    uint32_t st = load_acq32(p, self->f.state);
    return (st == ST_DONE || st == ST_ERROR) && load_rlx64(p, self->f.seq) == seq ? st : 0;
}

static inline int answered(RingObject *self, char *p, uint64_t seq) { return answered_state(self, p, seq) != 0; }

/* Poll results. */
enum { POLL_ANSWERED = 1, POLL_TIMEOUT = 0, POLL_PARK = 2 };

/* poll(slot, seq, budget_ns, spin_ns, max_queued) -> 1 answered, 2 park, 0 budget spent
 * Worker, spin policy: poll the slot from the moment it is submitted until it
 * is answered, or until its ETA is far enough away to sleep on (2x spin_ns),
 * the sidecar asks waiters to park (ETA_PARK), more slots are queued than
 * ``max_queued`` (waiters would take turns on the same cores), or
 * ``budget_ns`` passes. GIL released throughout. */
static PyObject *Ring_poll(RingObject *self, PyObject *args) {
    Py_ssize_t slot;
    unsigned long long seq, budget, spin;
    unsigned int max_queued;
    if (!PyArg_ParseTuple(args, "nKKKI", &slot, &seq, &budget, &spin, &max_queued)) return NULL;
    if (!slot_ok(self, slot)) return NULL;
    char *p = SLOT(self, slot);
    volatile uint32_t *queued = self->queued;
    int result = POLL_TIMEOUT;
    Py_BEGIN_ALLOW_THREADS
    uint64_t end = now_ns() + budget;
    for (unsigned n = 1;; n++) {
        if (answered(self, p, seq)) { result = POLL_ANSWERED; break; }
        if ((n & 7) == 0) {
            uint64_t now = now_ns();
            uint64_t eta = load_rlx64(p, self->f.eta_ns);
            if (eta == ETA_PARK || (eta > ETA_PARK && eta > now && eta - now > 2 * spin)) { result = POLL_PARK; break; }
            if (now > end) break;
            if (queued != NULL && (n & 255) == 0 && *queued > max_queued) { result = POLL_PARK; break; }
        }
        if (n % SPIN_YIELD_EVERY == 0) sched_yield(); else CPU_RELAX();
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(result);
}

/* spin_until(slot, seq, until_ns) -> bool: poll until answered or until_ns. */
static PyObject *Ring_spin_until(RingObject *self, PyObject *args) {
    Py_ssize_t slot;
    unsigned long long seq, until;
    if (!PyArg_ParseTuple(args, "nKK", &slot, &seq, &until)) return NULL;
    if (!slot_ok(self, slot)) return NULL;
    char *p = SLOT(self, slot);
    int got = 0;
    Py_BEGIN_ALLOW_THREADS
    for (unsigned n = 1;; n++) {
        if (answered(self, p, seq)) { got = 1; break; }
        if ((n & 7) == 0 && now_ns() > until) break;
        if (n % SPIN_YIELD_EVERY == 0) sched_yield(); else CPU_RELAX();
    }
    Py_END_ALLOW_THREADS
    if (got) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

/* answered(slot, seq) -> bool (acquire): DONE or ERROR with this generation. */
static PyObject *Ring_answered(RingObject *self, PyObject *args) {
    Py_ssize_t slot;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "nK", &slot, &seq)) return NULL;
    if (!slot_ok(self, slot)) return NULL;
    if (answered(self, SLOT(self, slot), seq)) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

/* What collect() answers for an ERROR slot whose code no sidecar writes. */
#define FORGED_ERROR 0x7FFFFFFF

/* collect(slot, seq, out, mark) -> (code, queue_ns, compute_ns)
 * Worker, once answered(slot, seq): copy the slot's rows into ``out`` (a
 * C-contiguous float32 (n, d) buffer) when DONE, after checking that the
 * sidecar wrote each row exactly d wide (the marks submit() left: the last
 * column overwritten, the one after still marked); then state = FREE.
 * code: 0 copied; a SlotError code for ERROR; -1 rows of another width;
 * -2 not answered for this generation (nothing read, the slot untouched). */
static PyObject *Ring_collect(RingObject *self, PyObject *args) {
    Py_ssize_t slot;
    unsigned long long seq;
    PyObject *outobj;
    unsigned int mark;
    if (!PyArg_ParseTuple(args, "nKOI", &slot, &seq, &outobj, &mark)) return NULL;
    if (!slot_ok(self, slot)) return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(outobj, &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) != 0)
        return NULL;
    PyObject *result = NULL;
    if (b.ndim != 2 || b.itemsize != 4 || b.format == NULL || strcmp(b.format, "f") != 0 ||
        b.shape[0] < 1 || b.shape[0] > (Py_ssize_t)self->max_texts || b.shape[1] < 1 ||
        b.shape[1] > (Py_ssize_t)self->dim) {
        PyErr_SetString(PyExc_ValueError, "out must be float32 (n, d) within the slot's texts and dim");
        goto done;
    }
    char *p = SLOT(self, slot);
    uint32_t st = answered_state(self, p, seq);  /* the one state this decision is made on */
    if (st == 0) {
        result = Py_BuildValue("(iKK)", -2, 0ULL, 0ULL);
        goto done;
    }
    uint64_t q = *U64(p, self->f.queue_ns), c = *U64(p, self->f.compute_ns);
    int code = 0;
    Py_ssize_t n = b.shape[0], d = b.shape[1];
    if (st == ST_ERROR) {
        /* An ERROR with no code, or one that would read as our own -1/-2,
         * was written by someone else: refused, never taken for a vector. */
        uint32_t err = *(volatile uint32_t *)(p + self->f.error);
        code = err == 0 || err > 0x7FFFFFFFU ? FORGED_ERROR : (int)err;
    } else {
        uint32_t *src = U32(p, self->f.out);
        for (Py_ssize_t i = 0; i < n && code == 0; i++) {
            uint32_t last = src[i * self->dim + d - 1];
            if (last == mark || (d < (Py_ssize_t)self->dim && src[i * self->dim + d] != mark)) code = -1;
        }
        if (code == 0) {
            float *dst = (float *)b.buf;
            for (Py_ssize_t i = 0; i < n; i++)
                memcpy(dst + i * d, (float *)src + i * self->dim, (size_t)d * 4);
        }
    }
    store_rel32(p, self->f.state, ST_FREE);
    result = Py_BuildValue("(iKK)", code, (unsigned long long)q, (unsigned long long)c);
done:
    PyBuffer_Release(&b);
    return result;
}

/* set_state(slot, state): a release store (FREE after the copy-out, BUSY on take). */
static PyObject *Ring_set_state(RingObject *self, PyObject *args) {
    Py_ssize_t slot;
    unsigned int st;
    if (!PyArg_ParseTuple(args, "nI", &slot, &st)) return NULL;
    if (!slot_ok(self, slot)) return NULL;
    store_rel32(SLOT(self, slot), self->f.state, st);
    Py_RETURN_NONE;
}

/* scan(out) -> n: the indexes of READY slots (acquire), into an int64 buffer. */
static PyObject *Ring_scan(RingObject *self, PyObject *arg) {
    Py_buffer b;
    if (self->base == NULL) return PyErr_SetString(PyExc_ValueError, "ring released"), NULL;
    if (PyObject_GetBuffer(arg, &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) return NULL;
    if (b.len / 8 < self->n_slots) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "scan buffer smaller than the slots");
        return NULL;
    }
    int64_t *out = (int64_t *)b.buf;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < self->n_slots; i++)
        if (load_acq32(SLOT(self, i), self->f.state) == ST_READY) out[n++] = i;
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(n);
}

/* take(slot, model, max_len, vocab, pairs) -> (code, seq, n_texts, ids, offsets, splits)
 * Sidecar: take a READY slot (BUSY) and copy its request out for ``model``,
 * checking it against the layout and the model's limits: counts in range,
 * offsets from 0 to n_tokens and increasing, each text 1..max_len tokens,
 * ids in [0, vocab), splits inside their text (and only for a model that
 * takes pairs), the slot naming ``model``, its waiter not gone (cancel).
 * Everything is read once into private memory before it is checked, so a
 * writer cannot change it between check and use. ``ids`` (int32) and
 * ``offsets`` (int64) come back as bytes; ``splits`` is a list or None. */
static PyObject *Ring_take(RingObject *self, PyObject *args) {
    Py_ssize_t slot;
    unsigned int model, max_len, vocab;
    int pairs;
    if (!PyArg_ParseTuple(args, "nIIIp", &slot, &model, &max_len, &vocab, &pairs)) return NULL;
    if (!slot_ok(self, slot)) return NULL;
    char *p = SLOT(self, slot);
    uint64_t seq = load_rlx64(p, self->f.seq);
    store_rel32(p, self->f.state, ST_BUSY);
    uint32_t n_texts = atomic_load_explicit((_Atomic uint32_t *)(p + self->f.n_texts), memory_order_relaxed);
    uint32_t n_tokens = atomic_load_explicit((_Atomic uint32_t *)(p + self->f.n_tokens), memory_order_relaxed);
    int code = E_NONE;
    PyObject *ids = NULL, *offs = NULL, *splits = NULL, *result = NULL;
    if (load_rlx64(p, self->f.cancel) == seq) { code = E_CANCELLED; goto out; }
    if (*(volatile uint32_t *)(p + self->f.model) != model) { code = E_BAD_MODEL; goto out; }
    if (n_texts < 1 || n_texts > self->max_texts || n_tokens < 1 || n_tokens > self->max_tokens) {
        code = E_BAD_COUNT;
        goto out;
    }
    offs = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n_texts + 1) * 8);
    ids = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n_tokens * 4);
    if (offs == NULL || ids == NULL) goto error;
    int64_t *o = (int64_t *)PyBytes_AS_STRING(offs);
    volatile uint32_t *so = (volatile uint32_t *)(p + self->f.offsets);
    for (uint32_t i = 0; i <= n_texts; i++) o[i] = so[i];
    if (o[0] != 0 || o[n_texts] != (int64_t)n_tokens) { code = E_BAD_OFFSETS; goto out; }
    int too_long = 0;
    for (uint32_t i = 0; i < n_texts; i++) {
        int64_t len = o[i + 1] - o[i];
        if (len <= 0) { code = E_BAD_OFFSETS; goto out; }
        if (len > (int64_t)max_len) too_long = 1;
    }
    if (too_long) { code = E_TOO_LONG; goto out; }
    int32_t *d = (int32_t *)PyBytes_AS_STRING(ids);
    memcpy(d, p + self->f.tokens, (size_t)n_tokens * 4);
    for (uint32_t i = 0; i < n_tokens; i++)
        if ((uint32_t)d[i] >= vocab) { code = E_BAD_TOKEN; goto out; }  /* a negative id reads as >= 2**31 */
    uint32_t sp[1024];
    uint32_t *s = n_texts <= 1024 ? sp : PyMem_Malloc(sizeof(uint32_t) * n_texts);
    if (s == NULL) { PyErr_NoMemory(); goto error; }
    memcpy(s, p + self->f.segments, (size_t)n_texts * 4);
    int any = 0, bad = 0;
    for (uint32_t i = 0; i < n_texts; i++) {
        if (s[i] == 0) continue;
        any = 1;
        if (!pairs || (int64_t)s[i] >= o[i + 1] - o[i]) bad = 1;
    }
    if (bad) code = E_BAD_SEGMENTS;
    else if (any) {
        splits = PyList_New(n_texts);
        for (uint32_t i = 0; splits != NULL && i < n_texts; i++) {
            PyObject *v = PyLong_FromUnsignedLong(s[i]);
            if (v == NULL) Py_CLEAR(splits);
            else PyList_SET_ITEM(splits, i, v);
        }
    }
    if (s != sp) PyMem_Free(s);
    if (any && !bad && splits == NULL) goto error;
out:
    if (code != E_NONE) {
        Py_CLEAR(ids);
        Py_CLEAR(offs);
        Py_CLEAR(splits);
    }
    result = Py_BuildValue("iKIOOO", code, (unsigned long long)seq, n_texts, ids ? ids : Py_None,
                           offs ? offs : Py_None, splits ? splits : Py_None);
error:
    Py_XDECREF(ids);
    Py_XDECREF(offs);
    Py_XDECREF(splits);
    return result;
}

/* publish(slot, seq, code, queue_ns, compute_ns, batch_texts, sem) -> (published, posted)
 * Sidecar: only if the slot is still BUSY with generation ``seq``: write the
 * outcome's fields, then state = DONE (code 0) or ERROR (release), then post
 * the slot's semaphore. A failed post (EOVERFLOW on a semaphore someone
 * pushed to its maximum) leaves the state published: the waiter polls it. */
static PyObject *Ring_publish(RingObject *self, PyObject *args) {
    Py_ssize_t slot;
    unsigned long long seq, queue_ns, compute_ns;
    unsigned int code, batch_texts;
    PyObject *sem;
    if (!PyArg_ParseTuple(args, "nKIKKIO", &slot, &seq, &code, &queue_ns, &compute_ns, &batch_texts, &sem))
        return NULL;
    if (!slot_ok(self, slot)) return NULL;
    if (sem != Py_None && !PyObject_TypeCheck(sem, &SemType)) {
        PyErr_SetString(PyExc_TypeError, "sem must be a Sem or None");
        return NULL;
    }
    char *p = SLOT(self, slot);
    if (load_acq32(p, self->f.state) != ST_BUSY || load_rlx64(p, self->f.seq) != seq)
        return Py_BuildValue("(OO)", Py_False, Py_False);
    *U32(p, self->f.error) = code;
    *U64(p, self->f.queue_ns) = queue_ns;
    *U64(p, self->f.compute_ns) = compute_ns;
    *U32(p, self->f.batch_texts) = batch_texts;
    /* NOTE: fields (and the vectors, written before this call), then state, then post. */
    store_rel32(p, self->f.state, code == E_NONE ? ST_DONE : ST_ERROR);
    int posted = 0;
    if (sem != Py_None) {
        SemObject *s = (SemObject *)sem;
        posted = s->sem != NULL && sem_post(s->sem) == 0;
    }
    return Py_BuildValue("(OO)", Py_True, posted ? Py_True : Py_False);
}

static PyObject *Ring_len(RingObject *self, void *unused) { return PyLong_FromSsize_t(self->n_slots); }

static PyMethodDef Ring_methods[] = {
    {"submit", (PyCFunction)Ring_submit, METH_VARARGS, "Worker: write a request part, READY, ring the bell."},
    {"poll", (PyCFunction)Ring_poll, METH_VARARGS, "Worker: poll a slot under the spin policy."},
    {"spin_until", (PyCFunction)Ring_spin_until, METH_VARARGS, "Worker: poll a slot until a deadline."},
    {"answered", (PyCFunction)Ring_answered, METH_VARARGS, "Whether a slot holds its generation's answer."},
    {"collect", (PyCFunction)Ring_collect, METH_VARARGS, "Worker: check and copy an answer out, free the slot."},
    {"set_state", (PyCFunction)Ring_set_state, METH_VARARGS, "Release-store a slot's state."},
    {"scan", (PyCFunction)Ring_scan, METH_O, "Sidecar: READY slots into an int64 buffer."},
    {"take", (PyCFunction)Ring_take, METH_VARARGS, "Sidecar: take a slot BUSY, copy out and validate."},
    {"publish", (PyCFunction)Ring_publish, METH_VARARGS, "Sidecar: publish an answer and post."},
    {"release", (PyCFunction)Ring_release, METH_NOARGS, "Let go of the memory (before it is unmapped)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"n_slots", (getter)Ring_len, NULL, "Slots in this ring.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shm_protocol._hotpath.Ring",
    .tp_doc = "Slots in shared memory, with the layout's field offsets.",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

/* ----------------------------------------------------------- Liveness -- */

/* The quick part of the sidecar's liveness rule (region.unavailable_reason),
 * read from the header in one call: state READY, pid alive (signal 0),
 * heartbeat fresh, batching loop within its deadline. Every request runs it;
 * a failure is explained by the Python rule, which gives the reason. */
#include <signal.h>

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    Py_ssize_t state, pid, heartbeat, deadline;
    uint32_t ready;
} LivenessObject;

static int Liveness_init(LivenessObject *self, PyObject *args, PyObject *kw) {
    PyObject *header;
    Py_ssize_t st, pid, hb, dl;
    unsigned int ready;
    if (!PyArg_ParseTuple(args, "OnnnnI", &header, &st, &pid, &hb, &dl, &ready)) return -1;
    if (self->has_view) return PyErr_SetString(PyExc_RuntimeError, "Liveness already initialised"), -1;
    if (PyObject_GetBuffer(header, &self->view, PyBUF_C_CONTIGUOUS) != 0) return -1;
    self->has_view = 1;
    Py_ssize_t offs[4] = {st, pid, hb, dl}, sizes[4] = {4, 4, 8, 8};
    for (int i = 0; i < 4; i++)
        if (offs[i] < 0 || offs[i] + sizes[i] > self->view.len || offs[i] % sizes[i] != 0)
            return PyErr_SetString(PyExc_ValueError, "header field outside the header"), -1;
    if (((uintptr_t)self->view.buf) % 8 != 0) return PyErr_SetString(PyExc_ValueError, "header not aligned"), -1;
    self->state = st;
    self->pid = pid;
    self->heartbeat = hb;
    self->deadline = dl;
    self->ready = ready;
    return 0;
}

static void Liveness_dealloc(LivenessObject *self) {
    if (self->has_view) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Liveness_release(LivenessObject *self, PyObject *unused) {
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_RETURN_NONE;
}

/* ok(stale_ns) -> bool */
static PyObject *Liveness_ok(LivenessObject *self, PyObject *arg) {
    unsigned long long stale = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (!self->has_view) Py_RETURN_FALSE;
    char *h = (char *)self->view.buf;
    if (atomic_load_explicit((_Atomic uint32_t *)(h + self->state), memory_order_acquire) != self->ready)
        Py_RETURN_FALSE;
    int32_t pid = *(volatile int32_t *)(h + self->pid);
    if (pid <= 0 || (kill(pid, 0) != 0 && errno == ESRCH)) Py_RETURN_FALSE;
    uint64_t now = now_ns();
    uint64_t hb = *(volatile uint64_t *)(h + self->heartbeat), dl = *(volatile uint64_t *)(h + self->deadline);
    if (now > hb && now - hb > stale) Py_RETURN_FALSE;
    if (now > dl) Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

static PyMethodDef Liveness_methods[] = {
    {"ok", (PyCFunction)Liveness_ok, METH_O, "ok(stale_ns) -> whether the sidecar serves now."},
    {"release", (PyCFunction)Liveness_release, METH_NOARGS, "Let go of the header's memory."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LivenessType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shm_protocol._hotpath.Liveness",
    .tp_doc = "The quick liveness check of a sidecar's header.",
    .tp_basicsize = sizeof(LivenessObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Liveness_init,
    .tp_dealloc = (destructor)Liveness_dealloc,
    .tp_methods = Liveness_methods,
};

/* ---------------------------------------------------------- WordPiece -- */

/* BERT's tokenizer for ASCII text, token for token what the model's own
 * tokenizer.json gives (BertNormalizer, BertPreTokenizer, WordPiece, a
 * [CLS] $A [SEP] template): the tokenizers library spends 40 us of a short
 * query's 45 on building its Encoding object, offsets and all, which the
 * transport never reads. Text outside printable ASCII (plus tab, newline,
 * carriage return), or holding an added token's text, is not handled here:
 * encode() returns None and the caller uses the tokenizers library.
 * hotpath.py builds this only for a tokenizer.json of exactly that shape,
 * and tests/unit/test_hotpath.py compares the two on many texts. */

typedef struct {
    PyObject_HEAD
    char *arena;            /* every vocabulary string, back to back */
    uint32_t *slot_off;     /* per hash slot: arena offset + 1 (0: empty) */
    uint16_t *slot_len;
    int32_t *slot_id;
    uint32_t mask;
    int32_t unk, cls, sep;
    int lowercase;
    Py_ssize_t max_chars;
    char prefix[16];
    Py_ssize_t prefix_len;
} WordPieceObject;

static inline uint64_t fnv1a(const char *a, Py_ssize_t na, const char *b, Py_ssize_t nb) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < na; i++) h = (h ^ (unsigned char)a[i]) * 1099511628211ULL;
    for (Py_ssize_t i = 0; i < nb; i++) h = (h ^ (unsigned char)b[i]) * 1099511628211ULL;
    return h;
}

/* The id of prefix a (na bytes) + b (nb bytes), or -1. */
static int32_t wp_lookup(WordPieceObject *w, const char *a, Py_ssize_t na, const char *b, Py_ssize_t nb) {
    uint32_t i = (uint32_t)fnv1a(a, na, b, nb) & w->mask;
    Py_ssize_t n = na + nb;
    for (;;) {
        uint32_t off = w->slot_off[i];
        if (off == 0) return -1;
        if (w->slot_len[i] == n) {
            const char *k = w->arena + off - 1;
            if (memcmp(k, a, (size_t)na) == 0 && memcmp(k + na, b, (size_t)nb) == 0) return w->slot_id[i];
        }
        i = (i + 1) & w->mask;
    }
}

static void wp_free(WordPieceObject *w) {
    PyMem_Free(w->arena);
    PyMem_Free(w->slot_off);
    PyMem_Free(w->slot_len);
    PyMem_Free(w->slot_id);
    w->arena = NULL;
    w->slot_off = NULL;
    w->slot_len = NULL;
    w->slot_id = NULL;
}

/* WordPiece(vocab: dict[str, int], unk, cls, sep, lowercase, max_chars, prefix) */
static int WordPiece_init(WordPieceObject *self, PyObject *args, PyObject *kw) {
    PyObject *vocab;
    int unk, cls, sep, lowercase;
    Py_ssize_t max_chars;
    const char *prefix;
    Py_ssize_t prefix_len;
    if (!PyArg_ParseTuple(args, "O!iiipns#", &PyDict_Type, &vocab, &unk, &cls, &sep, &lowercase, &max_chars,
                          &prefix, &prefix_len))
        return -1;
    if (prefix_len >= (Py_ssize_t)sizeof(self->prefix)) return PyErr_SetString(PyExc_ValueError, "prefix too long"), -1;
    wp_free(self);
    Py_ssize_t n = PyDict_Size(vocab), bytes = 0, pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(vocab, &pos, &k, &v)) {
        Py_ssize_t len;
        if (!PyUnicode_Check(k) || PyUnicode_AsUTF8AndSize(k, &len) == NULL) {
            PyErr_SetString(PyExc_TypeError, "vocabulary keys must be strings");
            return -1;
        }
        if (len > 65535) return PyErr_SetString(PyExc_ValueError, "vocabulary entry too long"), -1;
        bytes += len;
    }
    uint32_t size = 1;
    while (size < 2 * (uint64_t)n + 16) size <<= 1;
    self->arena = PyMem_Malloc((size_t)bytes + 1);
    self->slot_off = PyMem_Calloc(size, sizeof(uint32_t));
    self->slot_len = PyMem_Calloc(size, sizeof(uint16_t));
    self->slot_id = PyMem_Calloc(size, sizeof(int32_t));
    if (!self->arena || !self->slot_off || !self->slot_len || !self->slot_id) {
        wp_free(self);
        PyErr_NoMemory();
        return -1;
    }
    self->mask = size - 1;
    Py_ssize_t at = 0;
    pos = 0;
    while (PyDict_Next(vocab, &pos, &k, &v)) {
        Py_ssize_t len;
        const char *key = PyUnicode_AsUTF8AndSize(k, &len);
        long id = PyLong_AsLong(v);
        if (id == -1 && PyErr_Occurred()) return wp_free(self), -1;
        if (id < 0 || id > INT32_MAX) return wp_free(self), PyErr_SetString(PyExc_ValueError, "vocabulary id"), -1;
        memcpy(self->arena + at, key, (size_t)len);
        uint32_t i = (uint32_t)fnv1a(key, len, NULL, 0) & self->mask;
        while (self->slot_off[i] != 0) i = (i + 1) & self->mask;  /* keys are unique: a dict's */
        self->slot_off[i] = (uint32_t)at + 1;
        self->slot_len[i] = (uint16_t)len;
        self->slot_id[i] = (int32_t)id;
        at += len;
    }
    self->unk = unk;
    self->cls = cls;
    self->sep = sep;
    self->lowercase = lowercase;
    self->max_chars = max_chars;
    memcpy(self->prefix, prefix, (size_t)prefix_len);
    self->prefix_len = prefix_len;
    return 0;
}

static void WordPiece_dealloc(WordPieceObject *self) {
    wp_free(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline int is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
static inline int is_punct(unsigned char c) {
    return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126);
}

/* Append one word's pieces to out (n in/out); room for at least len + 1 more. */
static void wp_word(WordPieceObject *w, const char *word, Py_ssize_t len, int32_t *out, Py_ssize_t *n) {
    if (len > w->max_chars) {  /* ASCII: characters are bytes */
        out[(*n)++] = w->unk;
        return;
    }
    Py_ssize_t start = 0, first = *n;
    while (start < len) {
        Py_ssize_t end = len;
        int32_t id = -1;
        while (start < end) {
            id = start > 0 ? wp_lookup(w, w->prefix, w->prefix_len, word + start, end - start)
                           : wp_lookup(w, word, end - start, NULL, 0);
            if (id >= 0) break;
            end--;
        }
        if (id < 0) {
            *n = first;
            out[(*n)++] = w->unk;
            return;
        }
        out[(*n)++] = id;
        start = end;
    }
}

/* encode(text, max_len) -> (ids, truncated) or None
 * ``ids``: [CLS] + pieces + [SEP], the pieces cut so that the whole is at
 * most ``max_len`` (``truncated`` says whether any were cut); None when the
 * text is not for this fast path. */
static PyObject *WordPiece_encode(WordPieceObject *self, PyObject *args) {
    PyObject *text;
    Py_ssize_t max_len;
    if (!PyArg_ParseTuple(args, "Un", &text, &max_len)) return NULL;
    if (self->arena == NULL) return PyErr_SetString(PyExc_ValueError, "WordPiece not initialised"), NULL;
    if (!PyUnicode_IS_ASCII(text) || max_len < 2) Py_RETURN_NONE;
    const unsigned char *src = (const unsigned char *)PyUnicode_DATA(text);
    Py_ssize_t len = PyUnicode_GET_LENGTH(text);
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = src[i];
        if (c < 32 ? !is_ws(c) : c > 126) Py_RETURN_NONE;  /* control characters: the library's rules */
    }
    /* Each byte gives at most one piece; plus the two specials. */
    int32_t stack_ids[512];
    char stack_buf[512];
    int32_t *ids = len + 2 <= 512 ? stack_ids : PyMem_Malloc(sizeof(int32_t) * (size_t)(len + 2));
    char *buf = len <= 512 ? stack_buf : PyMem_Malloc((size_t)len + 1);
    if (ids == NULL || buf == NULL) {
        if (ids != stack_ids) PyMem_Free(ids);
        if (buf != stack_buf) PyMem_Free(buf);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = src[i];
        buf[i] = (char)(self->lowercase && c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    Py_ssize_t n = 0;
    ids[n++] = self->cls;
    Py_ssize_t i = 0;
    while (i < len) {
        unsigned char c = (unsigned char)buf[i];
        if (is_ws(c)) { i++; continue; }
        if (is_punct(c)) { wp_word(self, buf + i, 1, ids, &n); i++; continue; }
        Py_ssize_t j = i;
        while (j < len && !is_ws((unsigned char)buf[j]) && !is_punct((unsigned char)buf[j])) j++;
        wp_word(self, buf + i, j - i, ids, &n);
        i = j;
    }
    int truncated = n + 1 > max_len;
    if (truncated) n = max_len - 1;
    ids[n++] = self->sep;
    PyObject *list = PyList_New(n);
    for (Py_ssize_t k = 0; list != NULL && k < n; k++) {
        PyObject *v = PyLong_FromLong(ids[k]);
        if (v == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, k, v);
    }
    if (ids != stack_ids) PyMem_Free(ids);
    if (buf != stack_buf) PyMem_Free(buf);
    if (list == NULL) return NULL;
    return Py_BuildValue("(NO)", list, truncated ? Py_True : Py_False);
}

static PyMethodDef WordPiece_methods[] = {
    {"encode", (PyCFunction)WordPiece_encode, METH_VARARGS, "encode(text, max_len) -> (ids, truncated) or None."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WordPieceType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shm_protocol._hotpath.WordPiece",
    .tp_doc = "BERT's WordPiece tokenizer for ASCII text.",
    .tp_basicsize = sizeof(WordPieceObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)WordPiece_init,
    .tp_dealloc = (destructor)WordPiece_dealloc,
    .tp_methods = WordPiece_methods,
};

/* ------------------------------------------------------------- module -- */

static PyObject *mod_monotonic_ns(PyObject *m, PyObject *unused) { return PyLong_FromUnsignedLongLong(now_ns()); }

static PyObject *mod_set_timer_slack(PyObject *m, PyObject *arg) {
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    if (v < 1) v = 1;
    timer_slack_ns = v;
    slack_set = 0;
    Py_RETURN_NONE;
}

/* sleep_cost(us, n) -> list of ns: what a timed wait of ``us`` really takes
 * here (timer slack and the machine's wake-up), for choosing how early to wake. */
static PyObject *mod_sleep_cost(PyObject *m, PyObject *args) {
    unsigned int us, n;
    if (!PyArg_ParseTuple(args, "II", &us, &n)) return NULL;
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (unsigned i = 0; i < n; i++) {
        uint64_t t0, t1;
        Py_BEGIN_ALLOW_THREADS
        ensure_slack();
        t0 = now_ns();
        uint64_t until = t0 + (uint64_t)us * 1000;
        struct timespec ts = {(time_t)(until / 1000000000ULL), (long)(until % 1000000000ULL)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) { }
        t1 = now_ns();
        Py_END_ALLOW_THREADS
        PyList_SET_ITEM(out, i, PyLong_FromUnsignedLongLong(t1 - t0));
    }
    return out;
}

static PyMethodDef module_methods[] = {
    {"monotonic_ns", mod_monotonic_ns, METH_NOARGS, "CLOCK_MONOTONIC in ns (time.monotonic_ns's clock)."},
    {"set_timer_slack", mod_set_timer_slack, METH_O, "Timer slack (ns) for threads that wait from now on."},
    {"sleep_cost", mod_sleep_cost, METH_VARARGS, "sleep_cost(us, n): real ns of n timed sleeps of us."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_hotpath", "The transport's hot path in C (see shm_protocol/hotpath.py).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__hotpath(void) {
    if (PyType_Ready(&SemType) < 0 || PyType_Ready(&RingType) < 0 || PyType_Ready(&WordPieceType) < 0 ||
        PyType_Ready(&LivenessType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    Py_INCREF(&SemType);
    Py_INCREF(&RingType);
    Py_INCREF(&WordPieceType);
    Py_INCREF(&LivenessType);
    if (PyModule_AddObject(m, "Sem", (PyObject *)&SemType) < 0 ||
        PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0 ||
        PyModule_AddObject(m, "WordPiece", (PyObject *)&WordPieceType) < 0 ||
        PyModule_AddObject(m, "Liveness", (PyObject *)&LivenessType) < 0) return NULL;
    PyModule_AddIntConstant(m, "ST_FREE", ST_FREE);
    PyModule_AddIntConstant(m, "ST_CLAIMED", ST_CLAIMED);
    PyModule_AddIntConstant(m, "ST_READY", ST_READY);
    PyModule_AddIntConstant(m, "ST_BUSY", ST_BUSY);
    PyModule_AddIntConstant(m, "ST_DONE", ST_DONE);
    PyModule_AddIntConstant(m, "ST_ERROR", ST_ERROR);
    PyModule_AddIntConstant(m, "E_NONE", E_NONE);
    PyModule_AddIntConstant(m, "E_BAD_COUNT", E_BAD_COUNT);
    PyModule_AddIntConstant(m, "E_BAD_OFFSETS", E_BAD_OFFSETS);
    PyModule_AddIntConstant(m, "E_BAD_TOKEN", E_BAD_TOKEN);
    PyModule_AddIntConstant(m, "E_TOO_LONG", E_TOO_LONG);
    PyModule_AddIntConstant(m, "E_CANCELLED", E_CANCELLED);
    PyModule_AddIntConstant(m, "E_BAD_MODEL", E_BAD_MODEL);
    PyModule_AddIntConstant(m, "E_BAD_SEGMENTS", E_BAD_SEGMENTS);
    PyModule_AddIntConstant(m, "POLL_ANSWERED", POLL_ANSWERED);
    PyModule_AddIntConstant(m, "POLL_TIMEOUT", POLL_TIMEOUT);
    PyModule_AddIntConstant(m, "POLL_PARK", POLL_PARK);
    PyModule_AddIntConstant(m, "ETA_NONE", (long)ETA_NONE);
    PyModule_AddIntConstant(m, "ETA_PARK", (long)ETA_PARK);
    return m;
}
