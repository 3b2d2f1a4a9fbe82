/* BERT's tokenizer for ASCII text, token for token what the model's own
 * tokenizer.json gives (BertNormalizer, BertPreTokenizer, WordPiece, a
 * [CLS] $A [SEP] template): the tokenizers library spends 40 us of a short
 * query's 45 on building its Encoding object, offsets and all, which the
 * transport never reads. Text outside printable ASCII (plus tab, newline,
 * carriage return), or holding an added token's text, is not handled here:
 * encode() returns None and the caller uses the tokenizers library.
 * hotpath.py builds this only for a tokenizer.json of exactly that shape,
 * and tests/unit/test_hotpath.py compares the two on many texts. */
#include "hotpath.h"

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

PyTypeObject WordPieceType = {
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
