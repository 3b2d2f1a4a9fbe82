/* The module shm_protocol._hotpath: its functions (the clock, the timer
 * slack, sleep_cost), its constants, and the init that adds the types. */
#include "hotpath.h"

/* The timer slack ensure_slack() sets, and whether this thread has set it (hotpath.h). */
__thread int slack_set = 0;
long timer_slack_ns = 1000;

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
