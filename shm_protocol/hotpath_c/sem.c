/* Sem: an existing named POSIX semaphore, opened by name; the GIL is
 * released while it waits or spins. */
#include "hotpath.h"

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

PyTypeObject SemType = {
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
