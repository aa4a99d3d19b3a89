/*
 * blockcrypt._native — bulk sector crypto over OpenSSL libcrypto.
 *
 * XtsContext(key: 64 bytes, sector_size: 512|4096)
 *   .encrypt(data, sector_no) -> bytes   whole sectors, tweak = LE64(sector_no + i), upper
 *                                        8 tweak bytes zero (dm-crypt "plain64")
 *   .decrypt(data, sector_no) -> bytes   an all-zero ciphertext sector decrypts to zeros
 *                                        (holes in the backing file read as zeros)
 *   .wipe()                              forget the key; later calls raise ValueError
 *
 * xts_raw(key, data, encrypt, tweak=None, sector_no=None) -> bytes
 *   one XTS data unit of any length >= 16 bytes with an explicit 16-byte tweak or a
 *   plain64 sector number, through the same per-unit routine as XtsContext. For
 *   known-answer tests only (it sets the key on every call and has no zero rule).
 *
 * The key is set once per context (EVP_CipherInit_ex with the key, then only the
 * IV per sector, as cryptsetup's OpenSSL backend does). The GIL is released over
 * the whole loop, so requests on different sectors run in parallel. Internal
 * helpers return 0/-errno; Python exceptions are raised only at the boundary.
 * Validation of lengths and sector ranges happens here because it is cheap and
 * protects memory; policy lives in Python.
 *
 * Caveats: one context serves one thread at a time (the EVP context is
 * stateful; a per-context lock serialises callers and makes wipe() safe against
 * a call in flight); the Python side keeps one context per thread. A sector
 * range that would run past sector 2**64-1 is refused rather than wrapped.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>

#define XTS_KEY_BYTES 64
#define XTS_TWEAK_BYTES 16

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
    uint32_t sector_size;
    int initialised;
    PyThread_type_lock lock;
} XtsContext;

static int all_zero(const unsigned char *p, size_t n)
{
    /* word-at-a-time scan; sectors are multiples of 512 bytes, so n % 512 == 0 */
    uint64_t acc = 0;
    for (size_t off = 0; off < n; off += 512) {
        uint64_t w[64];
        memcpy(w, p + off, sizeof w); /* no aliasing/alignment assumptions; compiles to loads */
        for (int i = 0; i < 64; i++)
            acc |= w[i];
        if (acc)
            return 0;
    }
    return 1;
}

/* dm-crypt plain64: the sector number, little-endian, zero-padded to 16 bytes. */
static void plain64_iv(unsigned char iv[XTS_TWEAK_BYTES], uint64_t sector_no)
{
    for (int b = 0; b < 8; b++)
        iv[b] = (unsigned char)(sector_no >> (8 * b));
    memset(iv + 8, 0, 8);
}

/* One XTS data unit with the key already set on ctx: set only the IV, then one
 * update. Returns 0 or -EIO. `src` and `dst` may be equal. */
static int xts_unit(EVP_CIPHER_CTX *ctx, const unsigned char iv[XTS_TWEAK_BYTES],
                    const unsigned char *src, unsigned char *dst, int len, int encrypt)
{
    int outl = 0;
    if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, encrypt) != 1)
        return -EIO;
    if (EVP_CipherUpdate(ctx, dst, &outl, src, len) != 1 || outl != len)
        return -EIO;
    return 0;
}

/* Whole sectors. Returns 0 or -EIO. `in` and `out` may alias exactly. */
static int xts_run(EVP_CIPHER_CTX *ctx, const unsigned char *in, unsigned char *out,
                   size_t len, uint64_t sector_no, uint32_t sector_size, int encrypt)
{
    unsigned char iv[XTS_TWEAK_BYTES];
    size_t n = len / sector_size;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        const unsigned char *src = in + i * sector_size;
        unsigned char *dst = out + i * sector_size;
        if (!encrypt && all_zero(src, sector_size)) {
            memset(dst, 0, sector_size);
            continue;
        }
        plain64_iv(iv, sector_no + i);
        rc = xts_unit(ctx, iv, src, dst, (int)sector_size, encrypt);
    }
    OPENSSL_cleanse(iv, sizeof iv);
    return rc;
}

/* Key checks shared by XtsContext and xts_raw. Returns 0 or sets ValueError. */
static int check_key(const Py_buffer *key)
{
    if (key->len != XTS_KEY_BYTES) {
        PyErr_Format(PyExc_ValueError, "XTS key must be %d bytes, got %zd", XTS_KEY_BYTES, key->len);
        return -1;
    }
    if (memcmp(key->buf, (const char *)key->buf + 32, 32) == 0) {
        /* OpenSSL refuses XTS keys with equal halves (FIPS); say it clearly */
        PyErr_SetString(PyExc_ValueError, "XTS key halves must differ");
        return -1;
    }
    return 0;
}

static void xts_free_ctx(XtsContext *self)
{
    /* EVP_CIPHER_CTX_free cleanses the expanded key schedule */
    if (self->enc) { EVP_CIPHER_CTX_free(self->enc); self->enc = NULL; }
    if (self->dec) { EVP_CIPHER_CTX_free(self->dec); self->dec = NULL; }
    self->sector_size = 0;
}

static int XtsContext_init(XtsContext *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "sector_size", NULL};
    Py_buffer key;
    unsigned int sector_size = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|I", kwlist, &key, &sector_size))
        return -1;
    int rc = -1;
    if (self->initialised) {
        /* re-keying a context another thread may be using is never what the caller wants */
        PyErr_SetString(PyExc_ValueError, "XtsContext is already initialised; make a new one");
        PyBuffer_Release(&key);
        return -1; /* leave the working context alone */
    }
    if (check_key(&key) != 0)
        goto out;
    if (sector_size != 512 && sector_size != 4096) {
        PyErr_SetString(PyExc_ValueError, "sector_size must be 512 or 4096");
        goto out;
    }
    if (self->lock == NULL)
        self->lock = PyThread_allocate_lock();
    xts_free_ctx(self); /* a previous failed __init__ may have left contexts behind */
    self->enc = EVP_CIPHER_CTX_new();
    self->dec = EVP_CIPHER_CTX_new();
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
    self->initialised = 1;
    rc = 0;
out:
    if (rc != 0)
        xts_free_ctx(self);
    PyBuffer_Release(&key);
    return rc;
}

/* sector_no as an unsigned 64-bit number; ValueError outside 0..2**64-1. */
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

static PyObject *xts_call(XtsContext *self, PyObject *const *args, Py_ssize_t nargs, int encrypt)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly 2 arguments (data, sector_no)",
                     encrypt ? "encrypt" : "decrypt");
        return NULL;
    }
    uint64_t sector_no;
    if (parse_sector_no(args[1], &sector_no) != 0)
        return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) != 0)
        return NULL;
    PyObject *result = NULL;
    uint32_t sector_size = self->sector_size;
    if (sector_size == 0) {
        PyErr_SetString(PyExc_ValueError, "XtsContext is wiped or not initialised");
        goto out;
    }
    if (data.len % sector_size != 0) {
        PyErr_Format(PyExc_ValueError, "length %zd is not a multiple of the sector size %u",
                     data.len, sector_size);
        goto out;
    }
    uint64_t sectors = (uint64_t)data.len / sector_size;
    if (sectors > 0 && sector_no > UINT64_MAX - (sectors - 1)) {
        PyErr_SetString(PyExc_ValueError, "sector range runs past sector 2**64-1");
        goto out;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL)
        goto out;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    /* read the context under the lock: wipe() may have freed it meanwhile */
    EVP_CIPHER_CTX *ctx = encrypt ? self->enc : self->dec;
    if (ctx == NULL)
        rc = -EBADF;
    else
        rc = xts_run(ctx, data.buf, (unsigned char *)PyBytes_AS_STRING(result), (size_t)data.len,
                     sector_no, sector_size, encrypt);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    if (rc == -EBADF) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "XtsContext is wiped or not initialised");
    } else if (rc != 0) {
        Py_CLEAR(result);
        errno = -rc;
        PyErr_SetString(PyExc_OSError, "OpenSSL XTS operation failed");
    }
out:
    PyBuffer_Release(&data);
    return result;
}

static PyObject *XtsContext_encrypt(XtsContext *self, PyObject *const *args, Py_ssize_t nargs)
{
    return xts_call(self, args, nargs, 1);
}

static PyObject *XtsContext_decrypt(XtsContext *self, PyObject *const *args, Py_ssize_t nargs)
{
    return xts_call(self, args, nargs, 0);
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
    (void)closure;
    return PyLong_FromUnsignedLong(self->sector_size);
}

static PyMethodDef XtsContext_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))XtsContext_encrypt, METH_FASTCALL,
     "encrypt(data, sector_no) -> bytes: AES-256-XTS plain64 over whole sectors"},
    {"decrypt", (PyCFunction)(void (*)(void))XtsContext_decrypt, METH_FASTCALL,
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

/* xts_raw(key, data, encrypt, tweak=None, sector_no=None): one data unit, for KATs. */
static PyObject *native_xts_raw(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    static char *kwlist[] = {"key", "data", "encrypt", "tweak", "sector_no", NULL};
    Py_buffer key, data;
    int encrypt;
    PyObject *tweak_obj = Py_None, *sector_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*p|$OO", kwlist, &key, &data, &encrypt,
                                     &tweak_obj, &sector_obj))
        return NULL;
    PyObject *result = NULL;
    EVP_CIPHER_CTX *ctx = NULL;
    unsigned char iv[XTS_TWEAK_BYTES];
    if (check_key(&key) != 0)
        goto out;
    if ((tweak_obj == Py_None) == (sector_obj == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "give exactly one of tweak= or sector_no=");
        goto out;
    }
    if (tweak_obj != Py_None) {
        Py_buffer tw;
        if (PyObject_GetBuffer(tweak_obj, &tw, PyBUF_SIMPLE) != 0)
            goto out;
        int ok = tw.len == XTS_TWEAK_BYTES;
        if (ok)
            memcpy(iv, tw.buf, XTS_TWEAK_BYTES);
        PyBuffer_Release(&tw);
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "tweak must be %d bytes", XTS_TWEAK_BYTES);
            goto out;
        }
    } else {
        uint64_t sector_no;
        if (parse_sector_no(sector_obj, &sector_no) != 0)
            goto out;
        plain64_iv(iv, sector_no);
    }
    if (data.len < 16 || data.len > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "XTS data unit must be 16 bytes or longer");
        goto out;
    }
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    if (EVP_CipherInit_ex(ctx, EVP_aes_256_xts(), NULL, key.buf, NULL, encrypt) != 1) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL refused the XTS key");
        goto out;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL)
        goto out;
    if (xts_unit(ctx, iv, data.buf, (unsigned char *)PyBytes_AS_STRING(result), (int)data.len,
                 encrypt) != 0) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_OSError, "OpenSSL XTS operation failed");
    }
out:
    OPENSSL_cleanse(iv, sizeof iv);
    EVP_CIPHER_CTX_free(ctx);
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *native_openssl_version(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)self;
    return PyUnicode_FromString(OpenSSL_version(OPENSSL_VERSION));
}

static PyMethodDef module_methods[] = {
    {"openssl_version", native_openssl_version, METH_NOARGS, "the libcrypto version string"},
    {"xts_raw", (PyCFunction)(void (*)(void))native_xts_raw, METH_VARARGS | METH_KEYWORDS,
     "xts_raw(key, data, encrypt, *, tweak=None, sector_no=None) -> bytes: one XTS data unit "
     "(known-answer tests only)"},
    {NULL}
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "blockcrypt._native",
    .m_doc = "Bulk sector crypto for blockcrypt (OpenSSL libcrypto).",
    .m_size = -1,
    .m_methods = module_methods,
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
