/*
 * py_engine.c — module blockcrypt._engine: the Volume type over bc_volume (py_engine.h
 * documents the Python API). The Session type comes from py_session.c through
 * bc_py_session_register().
 *
 * Every engine call runs with the GIL released; the call holds its own reference on
 * the engine volume, so close() (or the last Python reference going away) while other
 * threads are inside read/write only drops the object's reference, and the engine
 * volume is flushed and closed by whichever call finishes last. Engine errors arrive
 * as OSError(errno, strerror) (or its errno subclass: PermissionError for EACCES ...).
 * Argument shapes are checked here (TypeError/ValueError); keys are checked by the
 * engine (OSError EINVAL: wrong length or equal halves); policy lives in Python.
 *
 * Key bytes: read from the caller's buffer straight into the layer's locked page; no
 * copy is made here, and no message carries them. ("aes-xts-plain64", None) asks for an
 * ephemeral key: the engine draws it into the locked page and nobody ever sees it (the
 * temp disks of a mount with encryption at host).
 *
 * Caveats: the Session type is linked in when native/py_session.c is compiled into the
 * same extension (setup.py globs it); without it, bc_py_session_register is a weak
 * undefined symbol and the module has no Session.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>

#include "py_engine.h"

/* provided by py_session.c when it is built in; NULL otherwise */
int bc_py_session_register(PyObject *module) __attribute__((weak));

typedef struct {
    PyObject_HEAD
    struct bc_volume *vol;   /* NULL once closed */
} VolumeObject;

static PyTypeObject VolumeType;

/* ---- helpers ---------------------------------------------------------------------- */

static PyObject *raise_errno(int neg)
{
    errno = neg < 0 ? -neg : EIO;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* "O&" converter: a Python int in 0..2**64-1 */
static int conv_u64(PyObject *obj, void *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected an int, not %.80s", Py_TYPE(obj)->tp_name);
        return 0;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "offsets, lengths and sizes must be in 0..2**64-1");
        return 0;
    }
    *(uint64_t *)out = (uint64_t)v;
    return 1;
}

/* The engine volume with a reference for one call, or NULL with ValueError. */
static struct bc_volume *take(VolumeObject *self)
{
    if (self->vol == NULL) {
        PyErr_SetString(PyExc_ValueError, "I/O operation on a closed Volume");
        return NULL;
    }
    bc_volume_ref(self->vol);
    return self->vol;
}

enum { L_XTS, L_NULL, L_AEAD, L_XTS_EPHEMERAL };

struct layer_spec {
    int kind;
    Py_buffer key;
    int have_key;
    uint8_t disk_id[16];   /* L_AEAD: bound into every sector's associated data */
};

static void specs_release(struct layer_spec *specs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (specs[i].have_key)
            PyBuffer_Release(&specs[i].key);
}

/* layers: a sequence of (name, key) pairs. Returns the count, or -1 with an exception. */
static Py_ssize_t parse_layers(PyObject *layers, struct layer_spec specs[BC_MAX_LAYERS])
{
    PyObject *seq = PySequence_Fast(layers, "layers must be a sequence of (name, key) pairs");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > BC_MAX_LAYERS) {
        PyErr_Format(PyExc_ValueError, "layers must have 1 to %d entries", BC_MAX_LAYERS);
        Py_DECREF(seq);
        return -1;
    }
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        specs[i].have_key = 0;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 2 || PyTuple_GET_SIZE(item) > 3 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_TypeError,
                            "each layer must be a (name: str, key: bytes) pair or (name, key, disk_id: bytes)");
            goto fail;
        }
        const char *name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(item, 0));
        PyObject *key = PyTuple_GET_ITEM(item, 1);
        if (name == NULL)
            goto fail;
        if (PyTuple_GET_SIZE(item) == 3 && strcmp(name, "xchacha20-poly1305") != 0) {
            PyErr_Format(PyExc_TypeError, "layer %.60R takes (name, key)", PyTuple_GET_ITEM(item, 0));
            goto fail;
        }
        if (strcmp(name, "aes-xts-plain64") == 0 && key == Py_None) {
            specs[i].kind = L_XTS_EPHEMERAL;   /* a random key drawn inside the engine */
        } else if (strcmp(name, "aes-xts-plain64") == 0) {
            specs[i].kind = L_XTS;
            if (PyObject_GetBuffer(key, &specs[i].key, PyBUF_SIMPLE) != 0)
                goto fail;
            specs[i].have_key = 1;
        } else if (strcmp(name, "null") == 0) {
            specs[i].kind = L_NULL;
        } else if (strcmp(name, "xchacha20-poly1305") == 0) {
            specs[i].kind = L_AEAD;
            PyObject *id = PyTuple_GET_SIZE(item) == 3 ? PyTuple_GET_ITEM(item, 2) : NULL;
            if (id == NULL || !PyBytes_Check(id) || PyBytes_GET_SIZE(id) != 16) {
                PyErr_SetString(PyExc_ValueError,
                                "layer 'xchacha20-poly1305' needs (name, key32, disk_id: 16 bytes)");
                goto fail;
            }
            memcpy(specs[i].disk_id, PyBytes_AS_STRING(id), 16);
            if (PyObject_GetBuffer(key, &specs[i].key, PyBUF_SIMPLE) != 0)
                goto fail;
            specs[i].have_key = 1;
        } else {
            PyErr_Format(PyExc_ValueError, "unknown layer %.60R", PyTuple_GET_ITEM(item, 0));
            goto fail;
        }
    }
    Py_DECREF(seq);
    return n;
fail:
    specs_release(specs, (size_t)i);
    Py_DECREF(seq);
    return -1;
}

/* Build the layers (GIL released by the caller). 0 or -errno; nothing left on failure. */
static int make_layers(const struct layer_spec *specs, size_t n, uint32_t sector_size, struct bc_layer *out)
{
    for (size_t i = 0; i < n; i++) {
        int rc = specs[i].kind == L_XTS
                     ? bc_layer_xts_new(specs[i].key.buf, (size_t)specs[i].key.len, sector_size, &out[i])
                 : specs[i].kind == L_AEAD
                     ? bc_layer_aead_new(specs[i].key.buf, (size_t)specs[i].key.len, sector_size,
                                         specs[i].disk_id, BC_ROLE_INFRA, &out[i])
                 : specs[i].kind == L_XTS_EPHEMERAL
                     ? bc_layer_xts_new_ephemeral(sector_size, &out[i])
                     : bc_layer_null_new(sector_size, &out[i]);
        if (rc != 0) {
            for (size_t j = 0; j < i; j++)
                out[j].ops->destroy(out[j].ctx);
            return rc;
        }
    }
    return 0;
}

static void destroy_layers(struct bc_layer *ls, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ls[i].ops->destroy(ls[i].ctx);
}

/* ---- Volume --------------------------------------------------------------------------- */

static int Volume_init(VolumeObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"path", "size", "sector_size", "data_off", "meta_off", "read_only", "layers",
                             "cache", NULL};
    PyObject *path = NULL, *layers = NULL;
    uint64_t size = 0, data_off = 1u << 20, meta_off = 0;
    unsigned int sector_size = 0;
    int read_only = 0;
    const char *cache_s = "buffered";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&|$O&IO&O&pOs", kwlist, PyUnicode_FSConverter, &path,
                                     conv_u64, &size, &sector_size, conv_u64, &data_off, conv_u64, &meta_off,
                                     &read_only, &layers, &cache_s))
        return -1;
    int ret = -1;
    struct layer_spec specs[BC_MAX_LAYERS];
    Py_ssize_t n = -1;
    if (self->vol != NULL) {
        PyErr_SetString(PyExc_ValueError, "Volume is already open; make a new one");
        goto out;
    }
    if (size == 0 || sector_size == 0 || layers == NULL) {
        PyErr_SetString(PyExc_TypeError, "Volume() needs size=, sector_size= and layers=");
        goto out;
    }
    int cache;
    if (strcmp(cache_s, "buffered") == 0)
        cache = BC_CACHE_BUFFERED;
    else if (strcmp(cache_s, "none") == 0)
        cache = BC_CACHE_NONE;
    else {
        PyErr_SetString(PyExc_ValueError, "cache must be 'buffered' or 'none'");
        goto out;
    }
    n = parse_layers(layers, specs);
    if (n < 0)
        goto out;
    const char *cpath = PyBytes_AS_STRING(path);
    struct bc_volume_params p = {.size_bytes = size, .sector_size = sector_size, .data_off = data_off,
                                 .meta_off = meta_off, .read_only = read_only};
    struct bc_volume *vol = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    const struct bc_storage_ops *ops = NULL;
    void *sctx = NULL;
    struct bc_layer ls[BC_MAX_LAYERS];
    rc = bc_storage_local_open(cpath, !read_only, cache, &ops, &sctx);
    if (rc == 0) {
        rc = make_layers(specs, (size_t)n, sector_size, ls);
        if (rc == 0) {
            rc = bc_volume_open(&p, ops, sctx, ls, (size_t)n, &vol);
            if (rc != 0)
                destroy_layers(ls, (size_t)n);
        }
        if (rc != 0)
            ops->close(sctx);
    }
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        raise_errno(rc);
        goto out;
    }
    self->vol = vol;
    ret = 0;
out:
    if (n > 0)
        specs_release(specs, (size_t)n);
    Py_XDECREF(path);
    return ret;
}

static void close_vol(VolumeObject *self)
{
    struct bc_volume *v = self->vol;
    self->vol = NULL;
    if (v != NULL) {
        Py_BEGIN_ALLOW_THREADS
        bc_volume_unref(v);   /* the last reference flushes and closes */
        Py_END_ALLOW_THREADS
    }
}

static void Volume_dealloc(VolumeObject *self)
{
    close_vol(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Volume_read(VolumeObject *self, PyObject *args)
{
    uint64_t off;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "O&n:read", conv_u64, &off, &length))
        return NULL;
    if (length < 0) {
        PyErr_SetString(PyExc_ValueError, "length must be >= 0");
        return NULL;
    }
    struct bc_volume *v = take(self);
    if (v == NULL)
        return NULL;
    uint64_t size = bc_volume_size(v);
    if (off >= size)
        length = 0;
    else if ((uint64_t)length > size - off)
        length = (Py_ssize_t)(size - off);
    PyObject *out = PyBytes_FromStringAndSize(NULL, length);
    if (out == NULL) {
        bc_volume_unref(v);
        return NULL;
    }
    ssize_t rc;
    char *buf = PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    rc = length ? bc_volume_read(v, buf, (size_t)length, off) : 0;
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_DECREF(out);
        return raise_errno((int)rc);
    }
    if (rc != length && _PyBytes_Resize(&out, rc) != 0)   /* a shrink raced with us */
        return NULL;
    return out;
}

static PyObject *Volume_readinto(VolumeObject *self, PyObject *args)
{
    uint64_t off;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "O&w*:readinto", conv_u64, &off, &b))
        return NULL;
    struct bc_volume *v = take(self);
    if (v == NULL) {
        PyBuffer_Release(&b);
        return NULL;
    }
    ssize_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bc_volume_read(v, b.buf, (size_t)b.len, off);
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (rc < 0)
        return raise_errno((int)rc);
    return PyLong_FromSsize_t(rc);
}

static PyObject *Volume_write(VolumeObject *self, PyObject *args)
{
    uint64_t off;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "O&y*:write", conv_u64, &off, &b))
        return NULL;
    struct bc_volume *v = take(self);
    if (v == NULL) {
        PyBuffer_Release(&b);
        return NULL;
    }
    ssize_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bc_volume_write(v, b.buf, (size_t)b.len, off);
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (rc < 0)
        return raise_errno((int)rc);
    return PyLong_FromSsize_t(rc);
}

static PyObject *range_call(VolumeObject *self, PyObject *args, int zero)
{
    uint64_t off, len;
    if (!PyArg_ParseTuple(args, zero ? "O&O&:zero_range" : "O&O&:discard", conv_u64, &off, conv_u64, &len))
        return NULL;
    struct bc_volume *v = take(self);
    if (v == NULL)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = zero ? bc_volume_zero_range(v, off, len) : bc_volume_discard(v, off, len);
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc);
    Py_RETURN_NONE;
}

static PyObject *Volume_discard(VolumeObject *self, PyObject *args) { return range_call(self, args, 0); }
static PyObject *Volume_zero_range(VolumeObject *self, PyObject *args) { return range_call(self, args, 1); }

static PyObject *Volume_flush(VolumeObject *self, PyObject *Py_UNUSED(ignored))
{
    struct bc_volume *v = take(self);
    if (v == NULL)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bc_volume_flush(v);
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc);
    Py_RETURN_NONE;
}

static PyObject *Volume_resize(VolumeObject *self, PyObject *args)
{
    uint64_t size;
    if (!PyArg_ParseTuple(args, "O&:resize", conv_u64, &size))
        return NULL;
    struct bc_volume *v = take(self);
    if (v == NULL)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bc_volume_resize(v, size);
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc);
    Py_RETURN_NONE;
}

static PyObject *Volume_blocks_used(VolumeObject *self, PyObject *Py_UNUSED(ignored))
{
    struct bc_volume *v = take(self);
    if (v == NULL)
        return NULL;
    int rc;
    uint64_t blocks = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = bc_volume_blocks_used(v, &blocks);
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc);
    return PyLong_FromUnsignedLongLong(blocks);
}

static PyObject *Volume_stats(VolumeObject *self, PyObject *Py_UNUSED(ignored))
{
    struct bc_volume *v = take(self);
    if (v == NULL)
        return NULL;
    struct bc_stats st;
    Py_BEGIN_ALLOW_THREADS
    bc_volume_stats(v, &st);
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    PyObject *hist = PyList_New(32);
    if (hist == NULL)
        return NULL;
    for (int i = 0; i < 32; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(st.lat_us_hist[i]);
        if (x == NULL) {
            Py_DECREF(hist);
            return NULL;
        }
        PyList_SET_ITEM(hist, i, x);
    }
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsN}", "reads", (unsigned long long)st.reads, "writes",
                         (unsigned long long)st.writes, "discards", (unsigned long long)st.discards, "flushes",
                         (unsigned long long)st.flushes, "errors", (unsigned long long)st.errors, "bytes_read",
                         (unsigned long long)st.bytes_read, "bytes_written", (unsigned long long)st.bytes_written,
                         "integrity_errors", (unsigned long long)st.integrity_errors, "integrity_last_sector",
                         (unsigned long long)st.integrity_last_sector, "lat_us_hist", hist);
}

static PyObject *Volume_revoke(VolumeObject *self, PyObject *args)
{
    int err;
    const char *reason;
    if (!PyArg_ParseTuple(args, "is:revoke", &err, &reason))
        return NULL;
    if (err <= 0) {
        PyErr_SetString(PyExc_ValueError, "errno must be a positive errno value");
        return NULL;
    }
    struct bc_volume *v = take(self);
    if (v == NULL)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bc_volume_revoke(v, err, reason);   /* waits for requests in flight */
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc);
    Py_RETURN_NONE;
}

static PyObject *Volume_set_layers(VolumeObject *self, PyObject *args)
{
    PyObject *layers;
    if (!PyArg_ParseTuple(args, "O:set_layers", &layers))
        return NULL;
    struct layer_spec specs[BC_MAX_LAYERS];
    Py_ssize_t n = parse_layers(layers, specs);
    if (n < 0)
        return NULL;
    struct bc_volume *v = take(self);
    if (v == NULL) {
        specs_release(specs, (size_t)n);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    struct bc_layer ls[BC_MAX_LAYERS];
    rc = make_layers(specs, (size_t)n, bc_volume_sector_size(v), ls);
    if (rc == 0) {
        rc = bc_volume_set_layers(v, ls, (size_t)n);
        if (rc != 0)
            destroy_layers(ls, (size_t)n);
    }
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    specs_release(specs, (size_t)n);
    if (rc < 0)
        return raise_errno(rc);
    Py_RETURN_NONE;
}

static PyObject *Volume_close(VolumeObject *self, PyObject *Py_UNUSED(ignored))
{
    close_vol(self);
    Py_RETURN_NONE;
}

static PyObject *Volume_enter(VolumeObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->vol == NULL) {
        PyErr_SetString(PyExc_ValueError, "I/O operation on a closed Volume");
        return NULL;
    }
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *Volume_exit(VolumeObject *self, PyObject *Py_UNUSED(args))
{
    close_vol(self);
    Py_RETURN_FALSE;
}

static PyObject *Volume_get_gate(VolumeObject *self, void *closure)
{
    (void)closure;
    struct bc_volume *v = take(self);
    if (v == NULL)
        return NULL;
    char reason[BC_REASON_MAX];
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = bc_volume_gate(v, reason, sizeof reason);
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    if (err == 0)
        Py_RETURN_NONE;
    PyObject *r = PyUnicode_DecodeUTF8(reason, (Py_ssize_t)strlen(reason), "replace");
    if (r == NULL)
        return NULL;
    return Py_BuildValue("(iN)", err, r);
}

static PyObject *Volume_get_size(VolumeObject *self, void *closure)
{
    (void)closure;
    if (take(self) == NULL)
        return NULL;
    uint64_t size = bc_volume_size(self->vol);
    bc_volume_unref(self->vol);
    return PyLong_FromUnsignedLongLong(size);
}

static PyObject *Volume_get_sector_size(VolumeObject *self, void *closure)
{
    (void)closure;
    if (take(self) == NULL)
        return NULL;
    uint32_t ss = bc_volume_sector_size(self->vol);
    bc_volume_unref(self->vol);
    return PyLong_FromUnsignedLong(ss);
}

static PyObject *Volume_get_read_only(VolumeObject *self, void *closure)
{
    (void)closure;
    if (take(self) == NULL)
        return NULL;
    int ro = bc_volume_read_only(self->vol);
    bc_volume_unref(self->vol);
    return PyBool_FromLong(ro);
}

static PyObject *Volume_get_closed(VolumeObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->vol == NULL);
}

static PyMethodDef Volume_methods[] = {
    {"read", (PyCFunction)Volume_read, METH_VARARGS, "read(off, length) -> bytes (short at the end)"},
    {"readinto", (PyCFunction)Volume_readinto, METH_VARARGS, "readinto(off, buffer) -> bytes read"},
    {"write", (PyCFunction)Volume_write, METH_VARARGS, "write(off, data) -> bytes written (clipped at the end)"},
    {"discard", (PyCFunction)Volume_discard, METH_VARARGS, "discard(off, length): holes; partial edges zeroed"},
    {"zero_range", (PyCFunction)Volume_zero_range, METH_VARARGS, "zero_range(off, length): as discard"},
    {"flush", (PyCFunction)Volume_flush, METH_NOARGS, "flush(): durable on return"},
    {"resize", (PyCFunction)Volume_resize, METH_VARARGS, "resize(size): the logical size"},
    {"blocks_used", (PyCFunction)Volume_blocks_used, METH_NOARGS, "blocks_used() -> 512-byte blocks of backing"},
    {"stats", (PyCFunction)Volume_stats, METH_NOARGS, "stats() -> dict of counters and lat_us_hist"},
    {"revoke", (PyCFunction)Volume_revoke, METH_VARARGS,
     "revoke(errno, reason): wait for requests in flight, wipe the layers, fail every later request"},
    {"set_layers", (PyCFunction)Volume_set_layers, METH_VARARGS,
     "set_layers(layers): a fresh layer stack (a restored key); opens the gate"},
    {"close", (PyCFunction)Volume_close, METH_NOARGS, "close(): flush and close (idempotent)"},
    {"__enter__", (PyCFunction)Volume_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Volume_exit, METH_VARARGS, NULL},
    {NULL}
};

static PyGetSetDef Volume_getset[] = {
    {"gate", (getter)Volume_get_gate, NULL, "None while serving, else (errno, reason)", NULL},
    {"size", (getter)Volume_get_size, NULL, "logical size in bytes", NULL},
    {"sector_size", (getter)Volume_get_sector_size, NULL, "512 or 4096", NULL},
    {"read_only", (getter)Volume_get_read_only, NULL, "True if writes are refused (EROFS)", NULL},
    {"closed", (getter)Volume_get_closed, NULL, "True once closed", NULL},
    {NULL}
};

static PyTypeObject VolumeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blockcrypt._engine.Volume",
    .tp_basicsize = sizeof(VolumeObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Volume_init,
    .tp_dealloc = (destructor)Volume_dealloc,
    .tp_methods = Volume_methods,
    .tp_getset = Volume_getset,
    .tp_doc = "Volume(path, *, size, sector_size, data_off=1048576, meta_off=0, read_only=False, "
              "layers=[(\"aes-xts-plain64\", key64 or None for an ephemeral key)], cache=\"buffered\"|\"none\"): one open disk in the C "
              "engine; every call releases the GIL",
};

struct bc_volume *bc_py_volume_get(PyObject *obj)
{
    if (!PyObject_TypeCheck(obj, &VolumeType)) {
        PyErr_Format(PyExc_TypeError, "expected a blockcrypt._engine.Volume, not %.80s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    VolumeObject *self = (VolumeObject *)obj;
    if (self->vol == NULL) {
        PyErr_SetString(PyExc_ValueError, "the Volume is closed");
        return NULL;
    }
    return self->vol;
}

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "blockcrypt._engine",
    .m_doc = "The C data plane: Volume (the engine) and Session (the libfuse 3 session).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__engine(void)
{
    if (PyType_Ready(&VolumeType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&VolumeType);
    if (PyModule_AddObject(m, "Volume", (PyObject *)&VolumeType) < 0) {
        Py_DECREF(&VolumeType);
        Py_DECREF(m);
        return NULL;
    }
    if (bc_py_session_register != NULL && bc_py_session_register(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
