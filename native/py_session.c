/*
 * py_session.c — blockcrypt._engine.Session: the libfuse 3 session (native/session) for
 * Python. See py_engine.h for the API.
 *
 *   Session(mountpoint, *, statfs_path, allow_other=False, max_threads=0,
 *           open_disk=None, closed=None, lookup_miss=None, debug=False, dirs=None,
 *           set_attr=None, set_xattr=None, xattrs=True)
 *           xattrs=False: the xattr operations answer ENOSYS, so the kernel stops sending
 *           them (and its security.capability lookup before every write)
 *       mounts (OSError(errno, "cannot mount ...: ...") on failure); serve with .loop();
 *       dirs: the top-level directory names (default ("disks",))
 *   .set_disk(path, size, mode=0o600, uid=0, gid=0, read_only=False, backing_path=None,
 *             xattrs=b"")    xattrs: packed as native/session/bc_xattr.h draws it
 *   .remove_disk(path)                          FileNotFoundError for an unknown path
 *   .drop_cache(path)                           the kernel drops the disk's cached pages
 *   .disk_state(path) -> {"handles", "errors", "lastErrno", "open"}
 *       path: "<dir>/<name>", or a bare "<name>" in the first directory
 *   .loop()    serves with the GIL released until unmounted or .exit(); unmounts on return
 *   .exit()    from any thread; .loop() returns soon after
 *   .close()   exit, wait for .loop() to return, unmount, drop every volume reference
 *   .mountpoint   .last_error -> None | (name, exception) of the last failed hook
 *
 * Hooks run in libfuse worker threads with the GIL taken (PyGILState_Ensure), on open,
 * last release, lookup, chmod/chown and xattr changes only, with the path "<dir>/<name>".
 * set_attr(path, mode, uid, gid): each None when not being set; set_xattr(path, name,
 * value, flags): value bytes, or None for a removal; both answer through exceptions with
 * an int .errno (a return value is ignored) and push the new entry with set_disk. open_disk(path) must return a blockcrypt._engine.Volume
 * (the session takes a reference of its own on the engine volume); an exception with an
 * int .errno answers that errno, anything else EIO. Exceptions are never printed (their
 * messages are the control plane's to log): the last one is kept in .last_error with its
 * traceback dropped.
 *
 * Caveats: the loop keeps the object alive while it runs; close() (or collection) stops
 * it first. A hook must not call close() (close waits for the loop, which waits for the
 * hook); exit() from a hook is fine.
 */
#include "py_engine.h"
#include "session/bc_session.h"

#include <errno.h>
#include <pthread.h>

typedef struct {
    PyObject_HEAD
    struct bc_session *s;
    PyObject *open_disk;
    PyObject *closed;
    PyObject *lookup_miss;
    PyObject *set_attr;
    PyObject *set_xattr;
    PyObject *last_error;
    PyObject *mountpoint;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int users;          /* calls using s with the GIL released (loop included), under mu */
    int looped;         /* loop() ran (a session loops once), under mu */
    int mu_ready;
} SessionObject;

static int py_finalizing(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

/* With the GIL: the raised exception becomes an errno (its int .errno, else EIO) and is
 * kept in last_error (traceback dropped: frames may hold locals). */
static int take_exception(SessionObject *self, const char *name)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    int err = EIO;
    if (value != NULL) {
        PyObject *e = PyObject_GetAttrString(value, "errno");
        if (e == NULL) {
            PyErr_Clear();
        } else {
            if (PyLong_Check(e)) {
                long v = PyLong_AsLong(e);
                if (v > 0 && v < 4096)
                    err = (int)v;
                else
                    PyErr_Clear();
            }
            Py_DECREF(e);
        }
        PyException_SetTraceback(value, Py_None);
        PyObject *pair = Py_BuildValue("(NO)", PyUnicode_DecodeFSDefault(name), value);
        if (pair != NULL) {
            Py_XSETREF(self->last_error, pair);
        } else {
            PyErr_Clear();
        }
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return err;
}

static int hook_open_disk(void *arg, const char *name, struct bc_volume **out)
{
    SessionObject *self = arg;
    if (py_finalizing())
        return -EIO;
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -EIO;
    PyObject *cb = self->open_disk;
    if (cb != NULL && cb != Py_None) {
        Py_INCREF(cb);
        PyObject *r = PyObject_CallFunction(cb, "N", PyUnicode_DecodeFSDefault(name));
        Py_DECREF(cb);
        if (r == NULL) {
            rc = -take_exception(self, name);
        } else {
            struct bc_volume *v = bc_py_volume_get(r);
            if (v == NULL) {
                take_exception(self, name);   /* not a Volume: EIO whatever its errno */
                rc = -EIO;
            } else {
                bc_volume_ref(v);
                *out = v;
                rc = 0;
            }
            Py_DECREF(r);
        }
    }
    PyGILState_Release(g);
    return rc;
}

static void call_name_hook(SessionObject *self, PyObject *cb, const char *name)
{
    if (cb == NULL || cb == Py_None)
        return;
    Py_INCREF(cb);
    PyObject *r = PyObject_CallFunction(cb, "N", PyUnicode_DecodeFSDefault(name));
    Py_DECREF(cb);
    if (r == NULL)
        take_exception(self, name);
    Py_XDECREF(r);
}

static void hook_closed(void *arg, const char *name)
{
    SessionObject *self = arg;
    if (py_finalizing())
        return;
    PyGILState_STATE g = PyGILState_Ensure();
    call_name_hook(self, self->closed, name);
    PyGILState_Release(g);
}

static void hook_lookup_miss(void *arg, const char *name)
{
    SessionObject *self = arg;
    if (py_finalizing())
        return;
    PyGILState_STATE g = PyGILState_Ensure();
    call_name_hook(self, self->lookup_miss, name);
    PyGILState_Release(g);
}

static int hook_set_attr(void *arg, const char *name, int to_set, uint32_t mode, uint32_t uid,
                         uint32_t gid)
{
    SessionObject *self = arg;
    if (py_finalizing())
        return -EIO;
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -EPERM;
    PyObject *cb = self->set_attr;
    if (cb != NULL && cb != Py_None) {
        PyObject *m = to_set & BC_SET_MODE ? PyLong_FromUnsignedLong(mode) : Py_NewRef(Py_None);
        PyObject *u = to_set & BC_SET_UID ? PyLong_FromUnsignedLong(uid) : Py_NewRef(Py_None);
        PyObject *gg = to_set & BC_SET_GID ? PyLong_FromUnsignedLong(gid) : Py_NewRef(Py_None);
        Py_INCREF(cb);
        PyObject *r = (m && u && gg) ? PyObject_CallFunction(cb, "NOOO", PyUnicode_DecodeFSDefault(name),
                                                             m, u, gg)
                                     : NULL;
        Py_DECREF(cb);
        Py_XDECREF(m);
        Py_XDECREF(u);
        Py_XDECREF(gg);
        rc = r == NULL ? -take_exception(self, name) : 0;
        Py_XDECREF(r);
    }
    PyGILState_Release(g);
    return rc;
}

static int hook_set_xattr(void *arg, const char *name, const char *xname, const void *value,
                          size_t size, int flags)
{
    SessionObject *self = arg;
    if (py_finalizing())
        return -EIO;
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -EOPNOTSUPP;
    PyObject *cb = self->set_xattr;
    if (cb != NULL && cb != Py_None) {
        PyObject *v = value != NULL ? PyBytes_FromStringAndSize(value, (Py_ssize_t)size)
                                    : Py_NewRef(Py_None);
        Py_INCREF(cb);
        PyObject *r = v != NULL ? PyObject_CallFunction(cb, "NNOi", PyUnicode_DecodeFSDefault(name),
                                                        PyUnicode_DecodeFSDefault(xname), v, flags)
                                : NULL;
        Py_DECREF(cb);
        Py_XDECREF(v);
        rc = r == NULL ? -take_exception(self, name) : 0;
        Py_XDECREF(r);
    }
    PyGILState_Release(g);
    return rc;
}

/* ---- use of the C session with the GIL released ------------------------------------- */

static struct bc_session *acquire(SessionObject *self)
{
    struct bc_session *s = NULL;
    if (self->mu_ready) {
        pthread_mutex_lock(&self->mu);
        s = self->s;
        if (s != NULL)
            self->users++;
        pthread_mutex_unlock(&self->mu);
    }
    if (s == NULL)
        PyErr_SetString(PyExc_ValueError, "the session is closed");
    return s;
}

static void release(SessionObject *self)
{
    pthread_mutex_lock(&self->mu);
    if (--self->users == 0)
        pthread_cond_broadcast(&self->cv);
    pthread_mutex_unlock(&self->mu);
}

static PyObject *oserror(int err, const char *what, PyObject *name)
{
    PyObject *msg = name != NULL ? PyUnicode_FromFormat("%s %R: %s", what, name, strerror(err))
                                 : PyUnicode_FromFormat("%s: %s", what, strerror(err));
    if (msg == NULL)
        return NULL;
    PyObject *args = Py_BuildValue("(iN)", err, msg);
    if (args == NULL)
        return NULL;
    PyObject *exc = PyObject_Call(PyExc_OSError, args, NULL);
    Py_DECREF(args);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* Close with the GIL held by the caller (released while waiting). */
static void do_close(SessionObject *self)
{
    if (!self->mu_ready)
        return;
    struct bc_session *s;
    pthread_mutex_lock(&self->mu);
    s = self->s;
    self->s = NULL;   /* no new user from here on */
    pthread_mutex_unlock(&self->mu);
    if (s == NULL)
        return;
    Py_BEGIN_ALLOW_THREADS
    bc_session_exit(s);
    pthread_mutex_lock(&self->mu);
    while (self->users > 0)
        pthread_cond_wait(&self->cv, &self->mu);
    pthread_mutex_unlock(&self->mu);
    bc_session_destroy(s);
    Py_END_ALLOW_THREADS
}

/* ---- the type ------------------------------------------------------------------------ */

static int Session_traverse(SessionObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->open_disk);
    Py_VISIT(self->closed);
    Py_VISIT(self->lookup_miss);
    Py_VISIT(self->set_attr);
    Py_VISIT(self->set_xattr);
    Py_VISIT(self->last_error);
    return 0;
}

static int Session_clear(SessionObject *self)
{
    Py_CLEAR(self->open_disk);
    Py_CLEAR(self->closed);
    Py_CLEAR(self->lookup_miss);
    Py_CLEAR(self->set_attr);
    Py_CLEAR(self->set_xattr);
    Py_CLEAR(self->last_error);
    return 0;
}

static void Session_dealloc(SessionObject *self)
{
    PyObject_GC_UnTrack(self);
    do_close(self);   /* hooks may run meanwhile: clear them only after */
    Session_clear(self);
    Py_CLEAR(self->mountpoint);
    if (self->mu_ready) {
        pthread_mutex_destroy(&self->mu);
        pthread_cond_destroy(&self->cv);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Session_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    (void)args;
    (void)kw;
    SessionObject *self = (SessionObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    pthread_mutex_init(&self->mu, NULL);
    pthread_cond_init(&self->cv, NULL);
    self->mu_ready = 1;
    return (PyObject *)self;
}

static int check_callable(PyObject *o, const char *what)
{
    if (o != NULL && o != Py_None && !PyCallable_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be callable or None", what);
        return -1;
    }
    return 0;
}

static int Session_init(SessionObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mountpoint", "statfs_path", "allow_other", "max_threads",
                             "open_disk", "closed", "lookup_miss", "debug", "dirs",
                             "set_attr", "set_xattr", "xattrs", NULL};
    PyObject *mp = NULL, *sp = NULL, *dirs = Py_None, *dirs_fast = NULL;
    const char *dir_names[BC_SESSION_MAX_DIRS];
    unsigned ndirs = 0;
    int allow_other = 0, max_threads = 0, debug = 0, xattrs = 1;
    PyObject *open_disk = Py_None, *closed = Py_None, *lookup_miss = Py_None;
    PyObject *set_attr = Py_None, *set_xattr = Py_None;
    if (self->s != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Session is already mounted");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|$O&piOOOpOOOp", kwlist,
                                     PyUnicode_FSConverter, &mp, PyUnicode_FSConverter, &sp,
                                     &allow_other, &max_threads, &open_disk, &closed,
                                     &lookup_miss, &debug, &dirs, &set_attr, &set_xattr, &xattrs))
        goto fail;
    if (dirs != Py_None) {
        dirs_fast = PySequence_Fast(dirs, "dirs must be a sequence of str");
        if (dirs_fast == NULL)
            goto fail;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(dirs_fast);
        if (n < 1 || n > BC_SESSION_MAX_DIRS) {
            PyErr_Format(PyExc_ValueError, "dirs: 1 to %d directory names", BC_SESSION_MAX_DIRS);
            goto fail;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *o = PySequence_Fast_GET_ITEM(dirs_fast, i);
            const char *c = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
            if (c == NULL) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "dirs must be a sequence of str");
                goto fail;
            }
            dir_names[ndirs++] = c;
        }
    }
    if (sp == NULL) {
        PyErr_SetString(PyExc_TypeError, "Session() needs statfs_path=");
        goto fail;
    }
    if (max_threads < 0 || max_threads > 1024) {
        PyErr_SetString(PyExc_ValueError, "max_threads must be in 0..1024");
        goto fail;
    }
    if (check_callable(open_disk, "open_disk") || check_callable(closed, "closed") ||
        check_callable(lookup_miss, "lookup_miss") || check_callable(set_attr, "set_attr") ||
        check_callable(set_xattr, "set_xattr"))
        goto fail;
    Py_XSETREF(self->open_disk, Py_NewRef(open_disk));
    Py_XSETREF(self->closed, Py_NewRef(closed));
    Py_XSETREF(self->lookup_miss, Py_NewRef(lookup_miss));
    Py_XSETREF(self->set_attr, Py_NewRef(set_attr));
    Py_XSETREF(self->set_xattr, Py_NewRef(set_xattr));
    Py_XSETREF(self->mountpoint, PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(mp)));
    if (self->mountpoint == NULL)
        goto fail;

    struct bc_session_opts opts = {
        .mountpoint = PyBytes_AS_STRING(mp),
        .statfs_path = PyBytes_AS_STRING(sp),
        .allow_other = allow_other,
        .xattrs = xattrs,
        .max_threads = max_threads,
        .max_request_bytes = 0,
        .debug = debug,
        .dirs = ndirs ? dir_names : NULL,
        .ndirs = ndirs,
    };
    struct bc_session_hooks hooks = {
        .arg = self,
        .open_disk = hook_open_disk,
        .closed = hook_closed,
        .lookup_miss = hook_lookup_miss,
        .set_attr = hook_set_attr,
        .set_xattr = hook_set_xattr,
    };
    struct bc_session *s = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bc_session_new(&opts, &hooks, &s);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        oserror(-rc, "cannot mount", self->mountpoint);
        goto fail;
    }
    pthread_mutex_lock(&self->mu);
    self->s = s;
    pthread_mutex_unlock(&self->mu);
    Py_DECREF(mp);
    Py_DECREF(sp);
    Py_XDECREF(dirs_fast);
    return 0;
fail:
    Py_XDECREF(mp);
    Py_XDECREF(sp);
    Py_XDECREF(dirs_fast);
    return -1;
}

static PyObject *Session_loop(SessionObject *self, PyObject *unused)
{
    (void)unused;
    struct bc_session *s = acquire(self);
    if (s == NULL)
        return NULL;
    pthread_mutex_lock(&self->mu);
    int again = self->looped;
    self->looped = 1;
    pthread_mutex_unlock(&self->mu);
    if (again) {
        release(self);
        PyErr_SetString(PyExc_RuntimeError, "the session loop already ran (a session serves once)");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bc_session_loop(s);
    Py_END_ALLOW_THREADS
    release(self);
    if (rc < 0)
        return oserror(-rc, "session loop", self->mountpoint);
    Py_RETURN_NONE;
}

static PyObject *Session_exit(SessionObject *self, PyObject *unused)
{
    (void)unused;
    if (!self->mu_ready)
        Py_RETURN_NONE;
    pthread_mutex_lock(&self->mu);
    struct bc_session *s = self->s;
    if (s != NULL)
        self->users++;
    pthread_mutex_unlock(&self->mu);
    if (s == NULL)
        Py_RETURN_NONE;   /* closed already: nothing runs */
    Py_BEGIN_ALLOW_THREADS
    bc_session_exit(s);
    Py_END_ALLOW_THREADS
    release(self);
    Py_RETURN_NONE;
}

static PyObject *Session_close(SessionObject *self, PyObject *unused)
{
    (void)unused;
    do_close(self);
    Py_RETURN_NONE;
}

static PyObject *Session_enter(SessionObject *self, PyObject *unused)
{
    (void)unused;
    return Py_NewRef(self);
}

static PyObject *Session_exit_ctx(SessionObject *self, PyObject *args)
{
    (void)args;
    do_close(self);
    Py_RETURN_FALSE;
}

static PyObject *Session_set_disk(SessionObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "size", "mode", "uid", "gid", "read_only", "backing_path",
                             "xattrs", NULL};
    PyObject *name = NULL, *bp_obj = Py_None, *bp = NULL;
    unsigned long long size;
    unsigned int mode = 0600, uid = 0, gid = 0;
    int read_only = 0;
    Py_buffer xa = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&K|IIIpOy*", kwlist, PyUnicode_FSConverter, &name,
                                     &size, &mode, &uid, &gid, &read_only, &bp_obj, &xa))
        return NULL;
    if (bp_obj != Py_None && !PyUnicode_FSConverter(bp_obj, &bp)) {
        Py_DECREF(name);
        if (xa.obj != NULL)
            PyBuffer_Release(&xa);
        return NULL;
    }
    struct bc_session *s = acquire(self);
    if (s == NULL) {
        Py_DECREF(name);
        Py_XDECREF(bp);
        if (xa.obj != NULL)
            PyBuffer_Release(&xa);
        return NULL;
    }
    struct bc_disk_entry e = {
        .name = PyBytes_AS_STRING(name),
        .size_bytes = size,
        .mode = mode,
        .uid = uid,
        .gid = gid,
        .read_only = read_only,
        .backing_path = bp != NULL ? PyBytes_AS_STRING(bp) : NULL,
        .xattrs = xa.obj != NULL ? xa.buf : NULL,
        .xattrs_len = xa.obj != NULL ? (size_t)xa.len : 0,
    };
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bc_session_set_disk(s, &e);
    Py_END_ALLOW_THREADS
    release(self);
    PyObject *ret = NULL;
    if (rc < 0) {
        PyObject *n = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(name));
        if (n != NULL) {
            oserror(-rc, "set_disk", n);
            Py_DECREF(n);
        }
    } else {
        ret = Py_NewRef(Py_None);
    }
    Py_DECREF(name);
    Py_XDECREF(bp);
    if (xa.obj != NULL)
        PyBuffer_Release(&xa);
    return ret;
}

/* A call on one disk by name, with the GIL released: None, or OSError naming `what`. */
static PyObject *by_name(SessionObject *self, PyObject *arg, int (*fn)(struct bc_session *, const char *),
                         const char *what)
{
    PyObject *name = NULL;
    if (!PyUnicode_FSConverter(arg, &name))
        return NULL;
    struct bc_session *s = acquire(self);
    if (s == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fn(s, PyBytes_AS_STRING(name));
    Py_END_ALLOW_THREADS
    release(self);
    Py_DECREF(name);
    if (rc < 0)
        return oserror(-rc, what, arg);
    Py_RETURN_NONE;
}

static PyObject *Session_remove_disk(SessionObject *self, PyObject *arg)
{
    return by_name(self, arg, bc_session_remove_disk, "remove_disk");
}

static PyObject *Session_drop_cache(SessionObject *self, PyObject *arg)
{
    return by_name(self, arg, bc_session_drop_cache, "drop_cache");
}

static PyObject *Session_disk_state(SessionObject *self, PyObject *arg)
{
    PyObject *name = NULL;
    if (!PyUnicode_FSConverter(arg, &name))
        return NULL;
    struct bc_session *s = acquire(self);
    if (s == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    struct bc_disk_state st;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bc_session_disk_state(s, PyBytes_AS_STRING(name), &st);
    if (rc == 0 && st.volume != NULL)
        bc_volume_unref(st.volume);
    Py_END_ALLOW_THREADS
    release(self);
    Py_DECREF(name);
    if (rc < 0)
        return oserror(-rc, "disk_state", arg);
    return Py_BuildValue("{s:I,s:K,s:i,s:O}", "handles", (unsigned)st.handles, "errors",
                         (unsigned long long)st.errors, "lastErrno", st.last_errno, "open",
                         st.volume != NULL ? Py_True : Py_False);
}

static PyObject *Session_get_mountpoint(SessionObject *self, void *c)
{
    (void)c;
    return Py_NewRef(self->mountpoint ? self->mountpoint : Py_None);
}

static PyObject *Session_get_last_error(SessionObject *self, void *c)
{
    (void)c;
    return Py_NewRef(self->last_error ? self->last_error : Py_None);
}

static PyObject *Session_get_closed(SessionObject *self, void *c)
{
    (void)c;
    int closed = 1;
    if (self->mu_ready) {
        pthread_mutex_lock(&self->mu);
        closed = self->s == NULL;
        pthread_mutex_unlock(&self->mu);
    }
    return PyBool_FromLong(closed);
}

static PyMethodDef Session_methods[] = {
    {"loop", (PyCFunction)Session_loop, METH_NOARGS,
     "loop()\n--\n\nServe requests (GIL released) until unmounted or exit(); unmounts on return."},
    {"exit", (PyCFunction)Session_exit, METH_NOARGS,
     "exit()\n--\n\nMake loop() return (from any thread)."},
    {"close", (PyCFunction)Session_close, METH_NOARGS,
     "close()\n--\n\nExit, wait for loop() to return, unmount and drop every volume reference."},
    {"set_disk", (PyCFunction)(void (*)(void))Session_set_disk, METH_VARARGS | METH_KEYWORDS,
     "set_disk(name, size, mode=0o600, uid=0, gid=0, read_only=False, backing_path=None, xattrs=b'')\n--\n\n"
     "Add or update a disk of the tree (a new size also resizes its open volume); xattrs packed\n"
     "as native/session/bc_xattr.h draws it."},
    {"drop_cache", (PyCFunction)Session_drop_cache, METH_O,
     "drop_cache(name)\n--\n\nDrop the kernel's cached pages of a disk (after a revocation)."},
    {"remove_disk", (PyCFunction)Session_remove_disk, METH_O,
     "remove_disk(name)\n--\n\nRemove a disk from the tree; its open handles keep working."},
    {"disk_state", (PyCFunction)Session_disk_state, METH_O,
     "disk_state(name)\n--\n\n{'handles', 'errors', 'lastErrno', 'open'} of a disk in the tree."},
    {"__enter__", (PyCFunction)Session_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Session_exit_ctx, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Session_getset[] = {
    {"mountpoint", (getter)Session_get_mountpoint, NULL, "the mount point", NULL},
    {"last_error", (getter)Session_get_last_error, NULL,
     "None, or (disk name, exception) of the last hook that raised", NULL},
    {"closed", (getter)Session_get_closed, NULL, "True after close()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blockcrypt._engine.Session",
    .tp_doc = "A FUSE session (libfuse 3 low-level) serving MOUNTPOINT/<dir>/<name>.",
    .tp_basicsize = sizeof(SessionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Session_new,
    .tp_init = (initproc)Session_init,
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_traverse = (traverseproc)Session_traverse,
    .tp_clear = (inquiry)Session_clear,
    .tp_methods = Session_methods,
    .tp_getset = Session_getset,
};

int bc_py_session_register(PyObject *module)
{
    if (PyType_Ready(&SessionType) < 0)
        return -1;
    Py_INCREF(&SessionType);
    if (PyModule_AddObject(module, "Session", (PyObject *)&SessionType) < 0) {
        Py_DECREF(&SessionType);
        return -1;
    }
    return 0;
}
