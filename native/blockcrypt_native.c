/*
 * blockcrypt._native — bulk sector crypto over OpenSSL libcrypto.
 *
 * XtsContext(key: 64 bytes, sector_size: 512|4096)
 *   .encrypt(data, sector_no) -> bytes   whole sectors, tweak = LE64(sector_no + i)
 *   .decrypt(data, sector_no) -> bytes   an all-zero ciphertext sector decrypts to zeros
 *                                        (holes in the backing file read as zeros)
 *   .wipe()                              forget the key; later calls raise ValueError
 *
 * The key is set once per context (EVP_CipherInit_ex with the key, then only the
 * IV per sector). The GIL is released over the whole loop, so requests on
 * different sectors run in parallel. Internal helpers return 0/-errno; Python
 * exceptions are raised only at the boundary. Validation of lengths happens here
 * because it is cheap and protects memory; policy lives in Python.
 *
 * Caveats: one context serves one thread at a time (the EVP context is
 * stateful); the Python side keeps a small pool of contexts per disk.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>

#define XTS_KEY_BYTES 64

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
    uint32_t sector_size;
    PyThread_type_lock lock;
} XtsContext;

static int all_zero(const unsigned char *p, size_t n)
{
    /* word-at-a-time scan; sectors are multiples of 512 bytes */
    const uint64_t *w = (const uint64_t *)p;
    size_t words = n / 8;
    uint64_t acc = 0;
    for (size_t i = 0; i < words; i++) {
        acc |= w[i];
        if ((i & 63) == 63 && acc)
            return 0;
    }
    return acc == 0;
}

/* Returns 0 or -EIO. `in` and `out` may alias. */
static int xts_run(EVP_CIPHER_CTX *ctx, const unsigned char *in, unsigned char *out,
                   size_t len, uint64_t sector_no, uint32_t sector_size, int encrypt)
{
    unsigned char iv[16];
    size_t n = len / sector_size;
    for (size_t i = 0; i < n; i++) {
        const unsigned char *src = in + i * sector_size;
        unsigned char *dst = out + i * sector_size;
        if (!encrypt && all_zero(src, sector_size)) {
            memset(dst, 0, sector_size);
            continue;
        }
        uint64_t s = sector_no + i;
        for (int b = 0; b < 8; b++)
            iv[b] = (unsigned char)(s >> (8 * b));
        memset(iv + 8, 0, 8);
        int outl = 0;
        if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, encrypt) != 1)
            return -EIO;
        if (EVP_CipherUpdate(ctx, dst, &outl, src, (int)sector_size) != 1 ||
            (uint32_t)outl != sector_size)
            return -EIO;
    }
    OPENSSL_cleanse(iv, sizeof iv);
    return 0;
}

static int XtsContext_init(XtsContext *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "sector_size", NULL};
    Py_buffer key;
    unsigned int sector_size = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|I", kwlist, &key, &sector_size))
        return -1;
    int rc = -1;
    if (key.len != XTS_KEY_BYTES) {
        PyErr_Format(PyExc_ValueError, "XTS key must be %d bytes", XTS_KEY_BYTES);
        goto out;
    }
    if (sector_size != 512 && sector_size != 4096) {
        PyErr_SetString(PyExc_ValueError, "sector_size must be 512 or 4096");
        goto out;
    }
    if (memcmp(key.buf, (const char *)key.buf + 32, 32) == 0) {
        /* OpenSSL refuses XTS keys with equal halves (FIPS); say it clearly */
        PyErr_SetString(PyExc_ValueError, "XTS key halves must differ");
        goto out;
    }
    if (self->enc == NULL)
        self->enc = EVP_CIPHER_CTX_new();
    if (self->dec == NULL)
        self->dec = EVP_CIPHER_CTX_new();
    if (self->lock == NULL)
        self->lock = PyThread_allocate_lock();
    if (!self->enc || !self->dec || !self->lock) {
        PyErr_NoMemory();
        goto out;
    }
    if (EVP_CipherInit_ex(self->enc, EVP_aes_256_xts(), NULL, key.buf, NULL, 1) != 1 ||
        EVP_CipherInit_ex(self->dec, EVP_aes_256_xts(), NULL, key.buf, NULL, 0) != 1) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL refused the XTS key");
        goto out;
    }
    self->sector_size = sector_size;
    rc = 0;
out:
    PyBuffer_Release(&key);
    return rc;
}

static PyObject *xts_call(XtsContext *self, PyObject *args, int encrypt)
{
    Py_buffer data;
    unsigned long long sector_no;
    if (!PyArg_ParseTuple(args, "y*K", &data, &sector_no))
        return NULL;
    PyObject *result = NULL;
    EVP_CIPHER_CTX *ctx = encrypt ? self->enc : self->dec;
    if (ctx == NULL || self->sector_size == 0) {
        PyErr_SetString(PyExc_ValueError, "XtsContext is wiped or not initialised");
        goto out;
    }
    if (data.len % self->sector_size != 0) {
        PyErr_Format(PyExc_ValueError, "length %zd is not a multiple of the sector size %u",
                     data.len, self->sector_size);
        goto out;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL)
        goto out;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    rc = xts_run(ctx, data.buf, (unsigned char *)PyBytes_AS_STRING(result), (size_t)data.len,
                 (uint64_t)sector_no, self->sector_size, encrypt);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        Py_CLEAR(result);
        errno = -rc;
        PyErr_SetString(PyExc_OSError, "OpenSSL XTS operation failed");
    }
out:
    PyBuffer_Release(&data);
    return result;
}

static PyObject *XtsContext_encrypt(XtsContext *self, PyObject *args) { return xts_call(self, args, 1); }
static PyObject *XtsContext_decrypt(XtsContext *self, PyObject *args) { return xts_call(self, args, 0); }

static void xts_free_ctx(XtsContext *self)
{
    /* EVP_CIPHER_CTX_free cleanses the expanded key schedule */
    if (self->enc) { EVP_CIPHER_CTX_free(self->enc); self->enc = NULL; }
    if (self->dec) { EVP_CIPHER_CTX_free(self->dec); self->dec = NULL; }
    self->sector_size = 0;
}

static PyObject *XtsContext_wipe(XtsContext *self, PyObject *Py_UNUSED(ignored))
{
    if (self->lock) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
        xts_free_ctx(self);
        PyThread_release_lock(self->lock);
    } else {
        xts_free_ctx(self);
    }
    Py_RETURN_NONE;
}

static void XtsContext_dealloc(XtsContext *self)
{
    xts_free_ctx(self);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *XtsContext_get_sector_size(XtsContext *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->sector_size);
}

static PyMethodDef XtsContext_methods[] = {
    {"encrypt", (PyCFunction)XtsContext_encrypt, METH_VARARGS,
     "encrypt(data, sector_no) -> bytes: AES-256-XTS plain64 over whole sectors"},
    {"decrypt", (PyCFunction)XtsContext_decrypt, METH_VARARGS,
     "decrypt(data, sector_no) -> bytes: all-zero ciphertext sectors read as zeros"},
    {"wipe", (PyCFunction)XtsContext_wipe, METH_NOARGS, "forget the key schedule"},
    {NULL}
};

static PyGetSetDef XtsContext_getset[] = {
    {"sector_size", (getter)XtsContext_get_sector_size, NULL, "sector size in bytes (0 once wiped)", NULL},
    {NULL}
};

static PyTypeObject XtsContextType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blockcrypt._native.XtsContext",
    .tp_basicsize = sizeof(XtsContext),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)XtsContext_init,
    .tp_dealloc = (destructor)XtsContext_dealloc,
    .tp_methods = XtsContext_methods,
    .tp_getset = XtsContext_getset,
    .tp_doc = "AES-256-XTS (plain64 tweak) over whole sectors; key set once",
};

static PyObject *native_openssl_version(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(OpenSSL_version(OPENSSL_VERSION));
}

static PyMethodDef module_methods[] = {
    {"openssl_version", native_openssl_version, METH_NOARGS, "the libcrypto version string"},
    {NULL}
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "blockcrypt._native",
    "Bulk sector crypto for blockcrypt (OpenSSL libcrypto).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&XtsContextType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&XtsContextType);
    if (PyModule_AddObject(m, "XtsContext", (PyObject *)&XtsContextType) < 0) {
        Py_DECREF(&XtsContextType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "XTS_KEY_BYTES", XTS_KEY_BYTES);
    return m;
}
