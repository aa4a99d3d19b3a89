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
    int cache;               /* for set_storage: the geometry the volume was opened with */
    uint64_t data_off, meta_off;
    size_t meta_bytes;
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

/* ---- overlay chains ------------------------------------------------------------------- */

struct chain_spec {
    size_t n;                               /* lower files; 0: a plain file */
    PyObject *paths[BC_COW_MAX_FILES];      /* bytes (fs-encoded), owned */
    uint64_t map_chunks[BC_COW_MAX_FILES];  /* [0] the top's, then the lowers' */
    uint64_t journal_off[BC_COW_MAX_FILES]; /* each file's metadata journal log (0: none) */
    uint64_t map_off;
    uint32_t chunk_bytes;
};

static void chain_release(struct chain_spec *c)
{
    for (size_t i = 0; i < c->n; i++)
        Py_XDECREF(c->paths[i + 1]);
    c->n = 0;
}

/* lowers: None, or a sequence of (path, map_chunks[, journal_off]), nearest first. 0, or -1
 * with an exception. */
static int parse_chain(PyObject *lowers, uint64_t top_map_chunks, uint64_t map_off, unsigned chunk_bytes,
                       uint64_t top_journal_off, struct chain_spec *c)
{
    memset(c, 0, sizeof *c);
    c->map_chunks[0] = top_map_chunks;
    c->journal_off[0] = top_journal_off;
    c->map_off = map_off;
    c->chunk_bytes = chunk_bytes;
    if (lowers == NULL || lowers == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(lowers, "lowers must be a sequence of (path, map_chunks) pairs");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > BC_COW_MAX_FILES - 1) {
        PyErr_Format(PyExc_ValueError, "a chain holds at most %d files", BC_COW_MAX_FILES);
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i), *path = NULL;
        uint64_t mc = 0, jo = 0;
        if (!PyTuple_Check(item) ||
            !PyArg_ParseTuple(item, "O&O&|O&", PyUnicode_FSConverter, &path, conv_u64, &mc, conv_u64, &jo)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "each lower must be a (path, map_chunks[, journal_off]) tuple");
            chain_release(c);
            Py_DECREF(seq);
            return -1;
        }
        c->paths[i + 1] = path;
        c->map_chunks[i + 1] = mc;
        c->journal_off[i + 1] = jo;
        c->n = (size_t)i + 1;
    }
    Py_DECREF(seq);
    return 0;
}

/* One file of a volume: the local file, behind its metadata journal when it has one. */
static int open_file(const char *path, int writable, int cache, uint64_t journal_off, uint64_t meta_off,
                     size_t meta_bytes, const struct bc_storage_ops **ops, void **ctx)
{
    int rc = bc_storage_local_open(path, writable, cache, ops, ctx);
    if (rc != 0 || journal_off == 0 || meta_bytes == 0)
        return rc;
    if (journal_off <= meta_off) {
        (*ops)->close(*ctx);
        return -EINVAL;
    }
    struct bc_journal_params jp = {.meta_off = meta_off, .meta_bytes = meta_bytes,
                                   .meta_sectors = (journal_off - meta_off) / meta_bytes, .log_off = journal_off,
                                   .log_bytes = BC_JOURNAL_LOG_BYTES};
    const struct bc_storage_ops *jops;
    void *jctx;
    rc = bc_storage_journal_wrap(&jp, *ops, *ctx, writable, &jops, &jctx);
    if (rc != 0) {
        (*ops)->close(*ctx);
        return rc;
    }
    *ops = jops, *ctx = jctx;
    return 0;
}

/* The storage of a volume (GIL released): the file alone, or the chain over it. */
static int open_storage(const char *top, int writable, int cache, const struct chain_spec *c, uint32_t sector_size,
                        uint64_t data_off, uint64_t meta_off, size_t meta_bytes,
                        const struct bc_storage_ops **ops, void **ctx)
{
    if (c->n == 0)
        return open_file(top, writable, cache, c->journal_off[0], meta_off, meta_bytes, ops, ctx);
    struct bc_cow_file files[BC_COW_MAX_FILES];
    size_t opened = 0;
    int rc = open_file(top, writable, cache, c->journal_off[0], meta_off, meta_bytes, &files[0].ops, &files[0].ctx);
    if (rc == 0)
        opened = 1;
    files[0].map_chunks = c->map_chunks[0];
    for (size_t i = 1; rc == 0 && i <= c->n; i++) {
        rc = open_file(PyBytes_AS_STRING(c->paths[i]), 0, cache, c->journal_off[i], meta_off, meta_bytes,
                       &files[i].ops, &files[i].ctx);
        files[i].map_chunks = c->map_chunks[i];
        if (rc == 0)
            opened++;
    }
    if (rc == 0) {
        struct bc_cow_params p = {.sector_size = sector_size, .chunk_bytes = c->chunk_bytes, .data_off = data_off,
                                  .meta_off = meta_bytes ? meta_off : 0, .meta_bytes = meta_bytes,
                                  .map_off = c->map_off};
        rc = bc_storage_cow_open(&p, files, c->n + 1, writable, ops, ctx);
    }
    if (rc != 0)
        for (size_t i = 0; i < opened; i++)
            files[i].ops->close(files[i].ctx);
    return rc;
}

struct open_args {
    const char *top;
    int writable, cache;
    const struct chain_spec *chain;
    uint32_t sector_size;
    uint64_t data_off, meta_off;
    size_t meta_bytes;
};

static int open_with_args(void *arg, const struct bc_storage_ops **ops, void **ctx)
{
    const struct open_args *a = arg;
    return open_storage(a->top, a->writable, a->cache, a->chain, a->sector_size, a->data_off, a->meta_off,
                        a->meta_bytes, ops, ctx);
}

static size_t specs_meta_bytes(const struct layer_spec *specs, size_t n)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (specs[i].kind == L_AEAD)
            m += BC_AEAD_META_BYTES;
    return m;
}

/* ---- Volume --------------------------------------------------------------------------- */

static int Volume_init(VolumeObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"path", "size", "sector_size", "data_off", "meta_off", "read_only", "layers",
                             "cache", "lowers", "map_chunks", "map_off", "chunk_bytes", "journal_off", NULL};
    PyObject *path = NULL, *layers = NULL, *lowers = NULL;
    uint64_t size = 0, data_off = 1u << 20, meta_off = 0, map_chunks = 0, map_off = 0, journal_off = 0;
    unsigned int sector_size = 0, chunk_bytes = BC_COW_CHUNK_BYTES;
    int read_only = 0;
    const char *cache_s = "buffered";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&|$O&IO&O&pOsOO&O&IO&", kwlist, PyUnicode_FSConverter, &path,
                                     conv_u64, &size, &sector_size, conv_u64, &data_off, conv_u64, &meta_off,
                                     &read_only, &layers, &cache_s, &lowers, conv_u64, &map_chunks, conv_u64,
                                     &map_off, &chunk_bytes, conv_u64, &journal_off))
        return -1;
    int ret = -1;
    struct chain_spec chain;
    if (parse_chain(lowers, map_chunks, map_off, chunk_bytes, journal_off, &chain) != 0) {
        Py_XDECREF(path);
        return -1;
    }
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
    rc = open_storage(cpath, !read_only, cache, &chain, sector_size, data_off, meta_off,
                      specs_meta_bytes(specs, (size_t)n), &ops, &sctx);
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
    self->cache = cache;
    self->data_off = data_off;
    self->meta_off = meta_off;
    self->meta_bytes = specs_meta_bytes(specs, (size_t)n);
    ret = 0;
out:
    if (n > 0)
        specs_release(specs, (size_t)n);
    chain_release(&chain);
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

static PyObject *Volume_set_storage(VolumeObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"path", "lowers", "map_chunks", "map_off", "chunk_bytes", "journal_off", NULL};
    PyObject *path = NULL, *lowers = NULL;
    uint64_t map_chunks = 0, map_off = 0, journal_off = 0;
    unsigned int chunk_bytes = BC_COW_CHUNK_BYTES;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&|$OO&O&IO&:set_storage", kwlist, PyUnicode_FSConverter, &path,
                                     &lowers, conv_u64, &map_chunks, conv_u64, &map_off, &chunk_bytes, conv_u64,
                                     &journal_off))
        return NULL;
    struct chain_spec chain;
    if (parse_chain(lowers, map_chunks, map_off, chunk_bytes, journal_off, &chain) != 0) {
        Py_DECREF(path);
        return NULL;
    }
    struct bc_volume *v = take(self);
    if (v == NULL) {
        chain_release(&chain);
        Py_DECREF(path);
        return NULL;
    }
    int rc;
    struct open_args oa = {.top = PyBytes_AS_STRING(path), .writable = !bc_volume_read_only(v), .cache = self->cache,
                           .chain = &chain, .sector_size = bc_volume_sector_size(v), .data_off = self->data_off,
                           .meta_off = self->meta_off, .meta_bytes = self->meta_bytes};
    Py_BEGIN_ALLOW_THREADS
    /* the new chain is opened after the old storage's flush, under the engine's gate: the old
     * top's bitmap, now a lower's, holds every chunk copied up into it */
    rc = bc_volume_set_storage_with(v, open_with_args, &oa);
    bc_volume_unref(v);
    Py_END_ALLOW_THREADS
    chain_release(&chain);
    Py_DECREF(path);
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
    {"set_storage", (PyCFunction)(void (*)(void))Volume_set_storage, METH_VARARGS | METH_KEYWORDS,
     "set_storage(path, *, lowers=None, map_chunks=0, map_off=0, chunk_bytes=65536, journal_off=0): flush, then "
     "serve from "
     "another file (or chain over it); waits for requests in flight"},
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
              "layers=[(\"aes-xts-plain64\", key64 or None for an ephemeral key)], cache=\"buffered\"|\"none\", "
              "lowers=None (each (path, map_chunks[, journal_off])), map_chunks=0, map_off=0, chunk_bytes=65536, "
              "journal_off=0 (the top file's metadata journal log; 0: none)): one open disk in the C engine; every "
              "call releases the GIL",
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

/* journal_checkpoint(path, *, meta_off, meta_bytes, journal_off) -> sectors the log held:
 * replay a file's metadata journal and write it into the table (a file the control plane
 * then reads or writes directly, not through a Volume). */
static PyObject *engine_journal_checkpoint(PyObject *mod, PyObject *args, PyObject *kwds)
{
    (void)mod;
    static char *kwlist[] = {"path", "meta_off", "meta_bytes", "journal_off", NULL};
    PyObject *path = NULL;
    uint64_t meta_off = 0, journal_off = 0;
    Py_ssize_t meta_bytes = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&|$O&nO&:journal_checkpoint", kwlist, PyUnicode_FSConverter,
                                     &path, conv_u64, &meta_off, &meta_bytes, conv_u64, &journal_off))
        return NULL;
    if (meta_bytes <= 0 || journal_off == 0) {
        Py_DECREF(path);
        PyErr_SetString(PyExc_ValueError, "journal_checkpoint needs meta_off=, meta_bytes= and journal_off=");
        return NULL;
    }
    int rc;
    struct bc_journal_counts c = {0};
    Py_BEGIN_ALLOW_THREADS
    const struct bc_storage_ops *ops;
    void *ctx;
    rc = open_file(PyBytes_AS_STRING(path), 1, BC_CACHE_BUFFERED, journal_off, meta_off, (size_t)meta_bytes, &ops,
                   &ctx);
    if (rc == 0) {
        bc_storage_journal_counts(ctx, &c);
        rc = bc_storage_journal_checkpoint(ctx);
        ops->close(ctx);
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (rc < 0)
        return raise_errno(rc);
    return PyLong_FromUnsignedLongLong(c.pending);
}

static PyMethodDef engine_functions[] = {
    {"journal_checkpoint", (PyCFunction)(void (*)(void))engine_journal_checkpoint, METH_VARARGS | METH_KEYWORDS,
     "journal_checkpoint(path, *, meta_off, meta_bytes, journal_off) -> sectors the log held: bring a file's "
     "metadata table up to date from its journal"},
    {NULL}
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "blockcrypt._engine",
    .m_doc = "The C data plane: Volume (the engine) and Session (the libfuse 3 session).",
    .m_size = -1,
    .m_methods = engine_functions,
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
