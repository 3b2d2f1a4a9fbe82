/* Ring: the slots in shared memory, with the layout's field offsets: the
 * worker's submit, poll and collect, the sidecar's scan, take and publish. */
#include "hotpath.h"

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

PyTypeObject RingType = {
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
