/*
 * blockcrypt._aead — the platform layer of double encryption: XChaCha20-Poly1305
 * per sector over libsodium, with a random nonce per write and the tag stored apart.
 *
 * AeadSectorContext(key: 32 bytes, sector_size: 512|4096 = 4096)
 *   .seal(data, sector_no) -> (ciphertext, nonces_tags)
 *        whole sectors; ciphertext has the length of data; nonces_tags holds, per
 *        sector, a fresh random 24-byte nonce then the 16-byte tag (40 bytes)
 *   .open(ciphertext, nonces_tags, sector_no) -> bytes
 *        raises AeadSectorError(index, sector_no) for the first sector whose tag does
 *        not verify; a sector whose ciphertext AND nonce+tag are all zero is a hole
 *        and opens to zeros
 *   .wipe()                              forget the key; later calls raise ValueError
 * SECTOR_META_BYTES = 40, NONCE_BYTES = 24, TAG_BYTES = 16
 *
 * The associated data of sector n is n as 8 little-endian bytes, so a sector (with
 * its nonce and tag) copied to another sector number does not open. The key lives
 * in sodium_malloc'd memory (guard pages, locked, zeroed on free). Each call copies
 * the key under a short lock and releases the GIL for the loop, so calls on one
 * context run in parallel and wipe() never races a call in flight.
 *
 * Caveats: a random 192-bit nonce per write needs no counter state, and 2**64
 * writes under one key stay far from a collision. The hole rule means that anyone
 * who can write the backing store can turn a sector into zeros by zeroing both the
 * ciphertext and its metadata; the volume must treat "both zero" as "never
 * written", which is what a sparse file gives. Authentication failure reports only
 * the first bad sector of a request.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sodium.h>

#define AEAD_KEY_BYTES crypto_aead_xchacha20poly1305_ietf_KEYBYTES   /* 32 */
#define NONCE_BYTES crypto_aead_xchacha20poly1305_ietf_NPUBBYTES     /* 24 */
#define TAG_BYTES crypto_aead_xchacha20poly1305_ietf_ABYTES          /* 16 */
#define META_BYTES (NONCE_BYTES + TAG_BYTES)

static PyObject *AeadSectorError;

typedef struct {
    PyObject_HEAD
    unsigned char *key; /* sodium_malloc'd, AEAD_KEY_BYTES; NULL once wiped */
    uint32_t sector_size;
    PyThread_type_lock lock;
} AeadSectorContext;

static int all_zero(const unsigned char *p, size_t n)
{
    /* sodium_is_zero is constant-time over the whole buffer; holes are rare and the
     * common case (real ciphertext) is decided by the first bytes here */
    uint64_t head[2];
    memcpy(head, p, sizeof head);
    if (head[0] | head[1])
        return 0;
    return sodium_is_zero(p, n);
}

static void le64(unsigned char out[8], uint64_t v)
{
    for (int b = 0; b < 8; b++)
        out[b] = (unsigned char)(v >> (8 * b));
}

static void seal_run(const unsigned char *key, const unsigned char *in, unsigned char *out,
                     unsigned char *meta, size_t n, uint64_t sector_no, uint32_t sector_size)
{
    unsigned char ad[8];
    for (size_t i = 0; i < n; i++) {
        unsigned char *nonce = meta + i * META_BYTES, *tag = nonce + NONCE_BYTES;
        randombytes_buf(nonce, NONCE_BYTES);
        le64(ad, sector_no + i);
        crypto_aead_xchacha20poly1305_ietf_encrypt_detached(
            out + i * sector_size, tag, NULL, in + i * sector_size, sector_size,
            ad, sizeof ad, NULL, nonce, key);
    }
}

/* Returns -1 if all sectors open, else the index of the first that does not. */
static Py_ssize_t open_run(const unsigned char *key, const unsigned char *in, const unsigned char *meta,
                           unsigned char *out, size_t n, uint64_t sector_no, uint32_t sector_size)
{
    unsigned char ad[8];
    for (size_t i = 0; i < n; i++) {
        const unsigned char *src = in + i * sector_size, *nonce = meta + i * META_BYTES;
        unsigned char *dst = out + i * sector_size;
        if (all_zero(nonce, META_BYTES) && all_zero(src, sector_size)) {
            memset(dst, 0, sector_size); /* a hole: never written */
            continue;
        }
        le64(ad, sector_no + i);
        if (crypto_aead_xchacha20poly1305_ietf_decrypt_detached(
                dst, NULL, src, sector_size, nonce + NONCE_BYTES, ad, sizeof ad, nonce, key) != 0)
            return (Py_ssize_t)i;
    }
    return -1;
}

static int Aead_init(AeadSectorContext *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "sector_size", NULL};
    Py_buffer key;
    unsigned int sector_size = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|I", kwlist, &key, &sector_size))
        return -1;
    int rc = -1;
    if (self->lock != NULL) {
        PyErr_SetString(PyExc_ValueError, "AeadSectorContext is already initialised; make a new one");
        PyBuffer_Release(&key);
        return -1; /* leave the working context alone */
    }
    if (key.len != AEAD_KEY_BYTES) {
        PyErr_Format(PyExc_ValueError, "AEAD key must be %d bytes, got %zd", AEAD_KEY_BYTES, key.len);
        goto out;
    }
    if (sector_size != 512 && sector_size != 4096) {
        PyErr_SetString(PyExc_ValueError, "sector_size must be 512 or 4096");
        goto out;
    }
    self->key = sodium_malloc(AEAD_KEY_BYTES);
    self->lock = PyThread_allocate_lock();
    if (self->key == NULL || self->lock == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    memcpy(self->key, key.buf, AEAD_KEY_BYTES);
    self->sector_size = sector_size;
    rc = 0;
out:
    if (rc != 0 && self->key != NULL) {
        sodium_free(self->key);
        self->key = NULL;
    }
    PyBuffer_Release(&key);
    return rc;
}

static int parse_sector_no(PyObject *obj, uint64_t *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "sector_no must be an int, not %.80s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "sector_no must be in 0..2**64-1");
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* Checks shared by seal and open; returns the number of sectors or -1 with an error set. */
static Py_ssize_t check_request(AeadSectorContext *self, Py_ssize_t len, uint64_t sector_no)
{
    uint32_t sector_size = self->sector_size;
    if (sector_size == 0) {
        PyErr_SetString(PyExc_ValueError, "AeadSectorContext is wiped or not initialised");
        return -1;
    }
    if (len % sector_size != 0) {
        PyErr_Format(PyExc_ValueError, "length %zd is not a multiple of the sector size %u", len, sector_size);
        return -1;
    }
    uint64_t n = (uint64_t)len / sector_size;
    if (n > 0 && sector_no > UINT64_MAX - (n - 1)) {
        PyErr_SetString(PyExc_ValueError, "sector range runs past sector 2**64-1");
        return -1;
    }
    return (Py_ssize_t)n;
}

/* Copy the key under the lock; 0, or -1 with ValueError if wiped meanwhile. */
static int take_key(AeadSectorContext *self, unsigned char key[AEAD_KEY_BYTES])
{
    int ok;
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    ok = self->key != NULL;
    if (ok)
        memcpy(key, self->key, AEAD_KEY_BYTES);
    PyThread_release_lock(self->lock);
    return ok ? 0 : -1;
}

static PyObject *Aead_seal(AeadSectorContext *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "seal() takes exactly 2 arguments (data, sector_no)");
        return NULL;
    }
    uint64_t sector_no;
    if (parse_sector_no(args[1], &sector_no) != 0)
        return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) != 0)
        return NULL;
    PyObject *ct = NULL, *meta = NULL, *result = NULL;
    Py_ssize_t n = check_request(self, data.len, sector_no);
    if (n < 0)
        goto out;
    ct = PyBytes_FromStringAndSize(NULL, data.len);
    meta = PyBytes_FromStringAndSize(NULL, n * META_BYTES);
    if (ct == NULL || meta == NULL)
        goto out;
    unsigned char key[AEAD_KEY_BYTES];
    uint32_t sector_size = self->sector_size; /* read with the GIL held: wipe() needs it too */
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = take_key(self, key);
    if (rc == 0)
        seal_run(key, data.buf, (unsigned char *)PyBytes_AS_STRING(ct),
                 (unsigned char *)PyBytes_AS_STRING(meta), (size_t)n, sector_no, sector_size);
    sodium_memzero(key, sizeof key);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_SetString(PyExc_ValueError, "AeadSectorContext is wiped or not initialised");
        goto out;
    }
    result = PyTuple_Pack(2, ct, meta);
out:
    Py_XDECREF(ct);
    Py_XDECREF(meta);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *Aead_open(AeadSectorContext *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "open() takes exactly 3 arguments (ciphertext, nonces_tags, sector_no)");
        return NULL;
    }
    uint64_t sector_no;
    if (parse_sector_no(args[2], &sector_no) != 0)
        return NULL;
    Py_buffer data, meta;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) != 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &meta, PyBUF_SIMPLE) != 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = check_request(self, data.len, sector_no);
    if (n < 0)
        goto out;
    if (meta.len != n * META_BYTES) {
        PyErr_Format(PyExc_ValueError, "nonces_tags must be %d bytes per sector (%zd), got %zd",
                     META_BYTES, n * META_BYTES, meta.len);
        goto out;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL)
        goto out;
    unsigned char key[AEAD_KEY_BYTES];
    uint32_t sector_size = self->sector_size; /* read with the GIL held: wipe() needs it too */
    int rc;
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    rc = take_key(self, key);
    if (rc == 0)
        bad = open_run(key, data.buf, meta.buf, (unsigned char *)PyBytes_AS_STRING(result),
                       (size_t)n, sector_no, sector_size);
    sodium_memzero(key, sizeof key);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "AeadSectorContext is wiped or not initialised");
    } else if (bad >= 0) {
        /* never hand out a partly opened buffer */
        sodium_memzero(PyBytes_AS_STRING(result), (size_t)data.len);
        Py_CLEAR(result);
        PyObject *exc_args = Py_BuildValue("(snK)", "sector failed authentication", bad,
                                           (unsigned long long)(sector_no + (uint64_t)bad));
        if (exc_args != NULL) {
            PyErr_SetObject(AeadSectorError, exc_args);
            Py_DECREF(exc_args);
        }
    }
out:
    PyBuffer_Release(&data);
    PyBuffer_Release(&meta);
    return result;
}

static void aead_free_key(AeadSectorContext *self)
{
    if (self->key != NULL) {
        sodium_free(self->key); /* zeroes the buffer */
        self->key = NULL;
    }
    self->sector_size = 0;
}

static PyObject *Aead_wipe(AeadSectorContext *self, PyObject *Py_UNUSED(ignored))
{
    if (self->lock) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
        aead_free_key(self);
        PyThread_release_lock(self->lock);
    }
    Py_RETURN_NONE;
}

static void Aead_dealloc(AeadSectorContext *self)
{
    aead_free_key(self);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Aead_get_sector_size(AeadSectorContext *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->sector_size);
}

static PyMethodDef Aead_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))Aead_seal, METH_FASTCALL,
     "seal(data, sector_no) -> (ciphertext, nonces_tags): XChaCha20-Poly1305 per sector, "
     "random nonce, 40 bytes of nonce+tag per sector"},
    {"open", (PyCFunction)(void (*)(void))Aead_open, METH_FASTCALL,
     "open(ciphertext, nonces_tags, sector_no) -> bytes; raises AeadSectorError(index, sector_no)"},
    {"wipe", (PyCFunction)Aead_wipe, METH_NOARGS, "forget the key"},
    {NULL}
};

static PyGetSetDef Aead_getset[] = {
    {"sector_size", (getter)Aead_get_sector_size, NULL, "sector size in bytes (0 once wiped)", NULL},
    {NULL}
};

static PyTypeObject AeadSectorContextType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blockcrypt._aead.AeadSectorContext",
    .tp_basicsize = sizeof(AeadSectorContext),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Aead_init,
    .tp_dealloc = (destructor)Aead_dealloc,
    .tp_methods = Aead_methods,
    .tp_getset = Aead_getset,
    .tp_doc = "XChaCha20-Poly1305 per sector (random nonce, tag stored apart); key set once",
};

static PyObject *sodium_version(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)self;
    return PyUnicode_FromString(sodium_version_string());
}

static PyMethodDef module_methods[] = {
    {"sodium_version", sodium_version, METH_NOARGS, "the libsodium version string"},
    {NULL}
};

static struct PyModuleDef sodium_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "blockcrypt._aead",
    .m_doc = "Platform-layer sector AEAD for blockcrypt (libsodium XChaCha20-Poly1305).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__aead(void)
{
    if (sodium_init() < 0) {
        PyErr_SetString(PyExc_ImportError, "libsodium failed to initialise");
        return NULL;
    }
    if (PyType_Ready(&AeadSectorContextType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&sodium_module);
    if (m == NULL)
        return NULL;
    AeadSectorError = PyErr_NewExceptionWithDoc(
        "blockcrypt._aead.AeadSectorError",
        "A sector failed authentication: args are (message, index in the request, sector_no).",
        PyExc_Exception, NULL); /* bad data, not a bad argument: not a ValueError */
    if (AeadSectorError == NULL || PyModule_AddObject(m, "AeadSectorError", AeadSectorError) < 0) {
        Py_XDECREF(AeadSectorError);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(AeadSectorError); /* the module holds one reference, the C global another */
    Py_INCREF(&AeadSectorContextType);
    if (PyModule_AddObject(m, "AeadSectorContext", (PyObject *)&AeadSectorContextType) < 0) {
        Py_DECREF(&AeadSectorContextType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "KEY_BYTES", AEAD_KEY_BYTES);
    PyModule_AddIntConstant(m, "NONCE_BYTES", NONCE_BYTES);
    PyModule_AddIntConstant(m, "TAG_BYTES", TAG_BYTES);
    PyModule_AddIntConstant(m, "SECTOR_META_BYTES", META_BYTES);
    return m;
}
