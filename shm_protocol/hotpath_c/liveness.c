/* The quick part of the sidecar's liveness rule (region.unavailable_reason),
 * read from the header in one call: state READY, pid alive (signal 0),
 * heartbeat fresh, batching loop within its deadline. Every request runs it;
 * a failure is explained by the Python rule, which gives the reason. */
#include "hotpath.h"

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

PyTypeObject LivenessType = {
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
