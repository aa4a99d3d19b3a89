"""The fusepy front end (``mount --frontend fusepy``, libfuse 2): every disk of the
catalog as a plain file, served by Python callbacks over the same C engine as the
native session (each request is one ``vol.read``/``vol.write``, which releases
the GIL inside the engine). Simple and debuggable; the native front end
(native_fs.py) is the default and the fast one.

Tree::

    MOUNTPOINT/               0755
      disks/                  0755 (and the other directories of the tree's sources: tree.py)
        <name>                regular file, the disk's size; 0600 root (0400 for read-only
                              disks), or root:disk 0660/0440 with --allow-other

A directory is its source (disks/: the catalog): it is queried on lookup and
readdir, with a cache of at most ``CATALOG_TTL_S`` seconds, so disks created,
deleted or resized while mounted appear, vanish or change size without a
remount (an open disk whose size changed re-reads its header with
``Volume.refresh``).

Open file handles of one disk share one :class:`~blockcrypt.volume.Volume`
(one DEK unwrap per disk, not per open); the last release flushes and closes
it, which wipes the DEK. The I/O path is one dictionary lookup and one
``vol.read``/``vol.write`` per FUSE request: no catalog query, no logging.

Errors become errnos at exactly one place, :meth:`DiskFS.__call__`:
a :class:`BlockcryptError` answers its ``.errno`` (corrupt header -> EIO for
that disk only, unknown -> ENOENT, read-only -> EROFS, full backing file
system -> ENOSPC, write past the end -> EFBIG); an ``OSError`` passes through;
anything else answers EIO and logs one line. Nothing reaches fusepy's EINVAL
catch-all, and no request can take the mount down.

Semantics worth knowing:

* ``truncate`` to the current size succeeds; ``ftruncate(fd, 0)`` on an open
  disk wipes it (``vol.discard`` of all of it: it reads as zeros) and keeps its
  size, which is what ``qemu-img convert``/``create`` do to a raw target
  (truncate to 0, then to the image size); truncate to 0 by path, ``O_TRUNC``
  and any other size answer **EPERM** (resizing is ``blockcrypt disk resize``). So do create, unlink,
  rename, mkdir, chmod and chown. ``utimens`` is accepted and ignored.
* ``fallocate``: PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE -> ``vol.discard`` /
  ``vol.zero_range`` (holes in the backing file, read back as zeros); mode 0
  (allocate) inside the disk is accepted as a no-op, past its end EPERM;
  any other mode EOPNOTSUPP. Ranges past the end are clipped.
* ``fsync``/``fdatasync`` -> ``vol.flush()`` (fsync of the backing file).
* ``st_blocks`` is the 512-byte blocks the backing file really uses.
* A write straddling the end of the disk is clipped here (a short write:
  the kernel sends it whole once the last page is cached); a write starting
  at or past the end answers EFBIG.
* ``chmod``/``chown`` and extended attributes (``user.*``, ``trusted.*``) are
  kept per disk by the file's source (tree.py: in the catalog) and served back,
  after a remount too; other namespaces answer EOPNOTSUPP to set, ENODATA to get.
  (``fchmod``/``fchown`` arrive with the file's path: libfuse 2 builds it for
  chmod/chown even under ``flag_nopath``; a call without one answers EPERM.)

Performance notes: requests are at most 128 KiB (libfuse 2 cannot negotiate
more pages) and an O_DIRECT request is sent by the kernel one 128 KiB piece at
a time (no async direct I/O in libfuse 2), so per-request latency, crypto
included, sets sequential O_DIRECT throughput. libfuse skips path lookups for
handle-based operations (``flag_nopath``); writes hand the volume a view of
libfuse's buffer instead of a copy. A speculative read-ahead for sequential
O_DIRECT readers was tried and measured no clear gain on this 2-core host.

Caveats: fusepy 3.0.1 does not know the libfuse 2.9 ``fallocate`` operation;
:func:`run` installs an extended ``fuse_operations`` layout (the real libfuse
2.9 one, a strict superset of fusepy's) into the ``fuse`` module before it
mounts. ctypes gives each callback from a libfuse worker thread a fresh Python
thread state, which would drop every ``threading.local`` (the per-thread SQLite
connections) after each request; :meth:`DiskFS.__call__`
therefore pins one thread state per worker thread for the life of the thread,
and a reaper thread frees the states of workers that libfuse ended (it ends
one whenever more than 10 are idle, so bursts of more than 10 concurrent
requests churn threads).
"""
from __future__ import annotations

import ctypes
import errno
import grp
import itertools
import logging
import os
import stat
import threading
import time

import fuse

from ..control import settings
from ..errors import BlockcryptError
from . import tree
from .status import FrontEndStatus

log = logging.getLogger("blockcrypt.mount.fusepy_fs")

CATALOG_TTL_S = 1.0
#: a lookup that misses re-queries the catalog when the cache is older than this
CATALOG_MISS_TTL_S = 0.2

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_tls = threading.local()
_api = ctypes.pythonapi
_api.PyGILState_Ensure.restype = ctypes.c_int
_api.PyGILState_Ensure.argtypes = []
_api.PyThreadState_Get.restype = ctypes.c_void_p
_api.PyThreadState_Get.argtypes = []
_api.PyThreadState_Clear.restype = None
_api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Delete.restype = None
_api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]
_pinned: dict[int, int] = {}  # native thread id -> its pinned PyThreadState*
_pinned_lock = threading.Lock()
REAP_INTERVAL_S = 2.0


def _pin_thread_state() -> None:
    """Keep this (libfuse-created) thread's Python thread state alive across callbacks."""
    _api.PyGILState_Ensure()  # never released: the gilstate counter stays above zero
    _tls.pinned = True
    with _pinned_lock:
        _pinned[threading.get_native_id()] = _api.PyThreadState_Get()


def reap_dead_thread_states() -> int:
    """Free the pinned thread states of libfuse worker threads that have exited.

    libfuse 2 ends a worker thread when more than 10 are idle, so a burst of more than
    10 concurrent requests leaves pinned thread states behind. A thread id that is no
    longer in /proc/self/task has exited (outside any callback, holding nothing): its
    state is cleared and deleted here, with the GIL held. A reused thread id only delays
    this (the entry is overwritten when the new thread pins), never frees a live state.
    """
    with _pinned_lock:
        dead = [(tid, ts) for tid, ts in _pinned.items() if not os.path.exists(f"/proc/self/task/{tid}")]
        for tid, _ in dead:
            del _pinned[tid]
    for _, ts in dead:
        _api.PyThreadState_Clear(ts)
        _api.PyThreadState_Delete(ts)
    return len(dead)


def _reaper(stop: threading.Event) -> None:
    while not stop.wait(REAP_INTERVAL_S):
        try:
            reap_dead_thread_states()
        except Exception:  # never let housekeeping kill the daemon
            log.exception("reaping exited worker thread states failed")


class _OpenDisk:
    """One open volume and the handles that share it."""

    __slots__ = ("vol", "name", "disk_id", "handles", "opened", "errors", "last_error", "dir", "watched")

    def __init__(self, vol, name: str, disk_id: str, dir_: str = "disks", watched: bool = True):
        self.vol = vol
        self.name = name
        self.disk_id = disk_id
        self.handles = 0
        self.opened = time.time()
        self.errors = 0
        self.last_error = None
        self.dir = dir_
        self.watched = watched

    @property
    def key(self) -> tuple:
        return self.dir, self.disk_id


class _CatalogView:
    __slots__ = ("t_mono", "records")

    def __init__(self, t_mono: float, records: dict):
        self.t_mono = t_mono
        self.records = records


class DiskFS(FrontEndStatus, fuse.Operations):
    """fusepy Operations serving ``/<dir>/<name>`` from the sources of a mount tree (tree.py)."""

    use_ns = True
    # read/write/fsync/release/fgetattr/fallocate work on file handles: let libfuse skip
    # building the path (and taking its tree lock) for them.
    flag_nullpath_ok = 1
    flag_nopath = 1

    def __init__(self, state, *, null_cipher: bool = False, allow_other: bool = False, cache: str = "buffered",
                 on_change=None, on_ready=None, sources=None):
        self.state = state
        self.sources = tree.ordered(sources if sources is not None else [tree.CatalogDisks(state)])
        self._by_dir = {src.dir: src for src in self.sources}
        self._dir_fh = {src.dir: 2 + i for i, src in enumerate(self.sources)}
        self.cache = cache
        self.null_cipher = bool(null_cipher)
        self.allow_other = bool(allow_other)
        self._xattrs_setting = None
        self._on_change = on_change or (lambda fs: None)
        self._on_ready = on_ready
        self._lock = threading.Lock()            # handles, open disks, failures
        self._cat_lock = threading.Lock()        # catalog refresh
        self._handles: dict[int, _OpenDisk] = {}
        self._open: dict[tuple, _OpenDisk] = {}  # by (dir, disk id)
        self._opening: dict[tuple, threading.Lock] = {}
        self._failed: dict[str, dict] = {}       # by "<dir>/<name>": last open failure
        self._fh_seq = itertools.count(1)
        self._view: _CatalogView | None = None
        self._uid = os.getuid()
        self._mount_gid = os.getgid()
        if allow_other:
            try:
                self._mount_gid = grp.getgrnam("disk").gr_gid
            except KeyError:
                pass
        self._err_log_t: dict[tuple, float] = {}
        self.t_start = time.time()

    # -- the one error boundary ----------------------------------------------------
    def __call__(self, op, *args):
        try:
            _tls.pinned
        except AttributeError:
            _pin_thread_state()
        try:
            return getattr(self, op)(*args)
        except BlockcryptError as e:
            code = e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO
            self._note_error(op, args, code, str(e))
            raise fuse.FuseOSError(code) from None
        except OSError as e:
            if isinstance(e.errno, int) and e.errno > 0:
                if e.errno not in (errno.ENOENT, errno.EPERM, errno.EROFS, errno.EOPNOTSUPP,
                                   errno.ENODATA, errno.ENOTSUP, errno.EISDIR, errno.ENOTDIR,
                                   errno.EFBIG, errno.ENOTTY) and not (
                                       e.errno == errno.ENOSYS and op.endswith("xattr")):  # xattrs off
                    self._note_error(op, args, e.errno, os.strerror(e.errno))
                raise
            self._note_error(op, args, errno.EIO, f"OSError without errno: {e!r}")
            raise fuse.FuseOSError(errno.EIO) from None
        except Exception as e:  # a bug: answer EIO, log it, keep serving
            log.exception("%s failed with an unexpected %s; answering EIO", op, type(e).__name__)
            self._count_error(op, args, errno.EIO, f"internal error: {type(e).__name__}")
            raise fuse.FuseOSError(errno.EIO) from None

    def _note_error(self, op, args, code: int, msg: str) -> None:
        """Log an I/O error (at most one line per disk, op and errno every 10 s) and count it."""
        od = self._count_error(op, args, code, msg)
        if od is not None and code == errno.EIO:
            self.note_integrity()  # a sector that failed its tag is logged by number, once
        key = (od.disk_id if od else None, op, code)
        now = time.monotonic()
        if now - self._err_log_t.get(key, -1e9) >= 10.0:
            self._err_log_t[key] = now
            log.warning("%s %s: %s -> %s", op, od.name if od else (args[0] if args else ""), msg,
                        errno.errorcode.get(code, code))
            if od is not None:
                self._changed()  # `status` shows the error count (as often as this line is logged)

    def _count_error(self, op, args, code: int, msg: str):
        od = None
        if op in _FH_OPS and args:
            fh = args[-1]
            if isinstance(fh, int):
                od = self._handles.get(fh)
        if od is not None:
            od.errors += 1
            od.last_error = {"errno": errno.errorcode.get(code, str(code)), "message": msg,
                             "time": time.time()}
        return od

    # -- catalog view ------------------------------------------------------------------
    def _records(self, max_age_s: float = CATALOG_TTL_S) -> dict:
        view = self._view
        now = time.monotonic()
        if view is not None and now - view.t_mono < max_age_s:
            return view.records
        with self._cat_lock:
            view = self._view
            if view is not None and time.monotonic() - view.t_mono < max_age_s:
                return view.records
            try:
                recs = {}
                for src in self.sources:
                    recs.update({tree.join(src.dir, n): e for n, e in src.entries().items()})
            except BlockcryptError:
                raise
            except Exception as e:
                if view is None:
                    raise
                log.warning("listing the tree failed (%s); serving the previous listing", e)
                recs = view.records
            self._view = _CatalogView(time.monotonic(), recs)
        self._sync_sizes(recs)
        return recs

    def _sync_sizes(self, recs: dict) -> None:
        """An open disk whose catalog size changed (disk resize elsewhere) re-reads its header."""
        with self._lock:
            opened = list(self._open.values())
        for od in opened:
            rec = recs.get(tree.join(od.dir, od.name))
            if rec is not None and rec.ident == od.disk_id and rec.size != od.vol.size:
                try:
                    od.vol.refresh()
                    log.info("disk %s: size now %d bytes", od.name, od.vol.size)
                    self._changed()
                except BlockcryptError as e:
                    log.warning("disk %s: cannot re-read its header after a resize: %s", od.name, e)

    def _record(self, path: str):
        """The Entry of "<dir>/<name>" (ENOENT when its directory does not have it)."""
        rec = self._records().get(path)
        if rec is None:
            rec = self._records(CATALOG_MISS_TTL_S).get(path)
        if rec is None:
            raise fuse.FuseOSError(errno.ENOENT)
        return rec

    def _split(self, path: str):
        """'/' -> ('root', None); '/disks' -> ('dir', 'disks'); '/disks/x' -> ('disk', 'disks/x')."""
        if path == "/":
            return "root", None
        parts = path.strip("/").split("/")
        if parts[0] not in self._by_dir:
            raise fuse.FuseOSError(errno.ENOENT)
        if len(parts) == 1:
            return "dir", parts[0]
        if len(parts) == 2:
            return "disk", tree.join(parts[0], parts[1])
        raise fuse.FuseOSError(errno.ENOENT)

    def _disk_mode(self, read_only: bool) -> int:
        if self.allow_other:
            return 0o440 if read_only else 0o660
        return 0o400 if read_only else 0o600

    def _dir_attrs(self, nlink: int) -> dict:
        t = int(self.t_start * 1e9)
        return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=nlink, st_uid=self._uid, st_gid=0,
                    st_size=0, st_atime=t, st_mtime=t, st_ctime=t)

    # -- metadata -------------------------------------------------------------------
    def getattr(self, path, fh=None):
        od = self._handles.get(fh) if fh is not None else None
        if od is None:
            kind, name = self._split(path)
            if kind == "root":
                return self._dir_attrs(2 + len(self.sources))
            if kind == "dir":
                return self._dir_attrs(2)
            rec = self._record(name)
            with self._lock:
                od = self._open.get((tree.split(name)[0], rec.ident))
            if od is None:
                return self._file_attrs(rec.backing_path, rec.size, rec.read_only, None, rec.attrs)
        vol = od.vol
        rec = self._records().get(tree.join(od.dir, od.name))
        attrs = rec.attrs if rec is not None and rec.ident == od.disk_id else None
        return self._file_attrs(vol.path, vol.size, vol.read_only, vol, attrs)

    def _file_attrs(self, backing_path: str | None, size: int, read_only: bool, vol, attrs=None) -> dict:
        try:
            if backing_path is None:
                raise FileNotFoundError
            bst = os.stat(backing_path)
            blocks = vol.blocks_used() if vol is not None else bst.st_blocks
            at, mt, ct = bst.st_atime_ns, bst.st_mtime_ns, bst.st_ctime_ns
        except OSError:
            blocks, at = 0, int(self.t_start * 1e9)
            mt = ct = at
        mode, uid, gid = self._disk_mode(read_only), self._uid, self._mount_gid if self.allow_other else 0
        if attrs is not None:  # what chmod/chown recorded (tree.py: in the catalog)
            mode = mode if attrs.mode is None else attrs.mode
            uid = uid if attrs.uid is None else attrs.uid
            gid = gid if attrs.gid is None else attrs.gid
        return dict(st_mode=stat.S_IFREG | mode, st_nlink=1, st_uid=uid, st_gid=gid,
                    st_size=size, st_blocks=blocks, st_blksize=4096,
                    st_atime=at, st_mtime=mt, st_ctime=ct)

    # with flag_nopath, readdir gets no path: the directory handle says which one it is
    # (1 the root, 2 + i the i-th source's directory)
    _DIR_ROOT = 1

    def opendir(self, path):
        kind, d = self._split(path)
        if kind == "root":
            return self._DIR_ROOT
        if kind == "dir":
            return self._dir_fh[d]
        raise fuse.FuseOSError(errno.ENOTDIR)

    def readdir(self, path, fh):
        if fh == self._DIR_ROOT:
            return [".", "..", *(src.dir for src in self.sources)]
        prefix = self.sources[fh - 2].dir + "/"
        return [".", "..", *(p[len(prefix):] for p in self._records(CATALOG_MISS_TTL_S) if p.startswith(prefix))]

    def releasedir(self, path, fh):
        return 0

    def statfs(self, path):
        sv = os.statvfs(self.state.path)
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                             "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

    def access(self, path, amode):
        self.getattr(path)  # existence; permissions are checked by the kernel (default_permissions)
        return 0

    def utimens(self, path, times=None):
        self.getattr(path)
        return 0

    def _refuse(self, *args, **kw):
        raise fuse.FuseOSError(errno.EPERM)

    create = mkdir = mknod = rename = rmdir = symlink = unlink = link = _refuse

    # -- owners, modes, extended attributes (kept by the source: tree.py) --------------------
    def _file(self, path):
        """(source, name in it) of a file path; EPERM for the root and the directories, and for
        a call without a path (libfuse 2 gives chmod/chown no handle)."""
        if path is None:
            raise fuse.FuseOSError(errno.EPERM)
        kind, name = self._split(path)
        if kind != "disk":
            raise fuse.FuseOSError(errno.EPERM)
        self._record(name)  # ENOENT for an unknown name
        d, leaf = tree.split(name)
        return self._by_dir[d], leaf

    def _recorded(self):
        self._view = None  # the next lookup serves what was recorded

    def chmod(self, path, mode):
        src, leaf = self._file(path)
        src.set_owner(leaf, mode=stat.S_IMODE(mode))
        self._recorded()
        return 0

    def chown(self, path, uid, gid):
        src, leaf = self._file(path)
        # -1 (as an unsigned 32-bit value from libfuse): leave that one as it is
        src.set_owner(leaf, uid=None if uid in (-1, 0xFFFFFFFF) else uid,
                      gid=None if gid in (-1, 0xFFFFFFFF) else gid)
        self._recorded()
        return 0

    def _xattrs(self, path) -> dict:
        kind, name = self._split(path)
        if kind != "disk":
            return {}
        return dict(self._record(name).attrs.xattrs)

    def _xattrs_on(self) -> None:
        """The `xattrs` setting (read once, at mount time): off, the xattr operations answer
        ENOSYS, so the kernel stops sending them (and its security.capability lookup before
        every write: one FUSE round trip per write)."""
        if self._xattrs_setting is None:
            self._xattrs_setting = bool(settings.get(self.state, "xattrs"))
        if not self._xattrs_setting:
            raise fuse.FuseOSError(errno.ENOSYS)

    def getxattr(self, path, name, position=0):
        self._xattrs_on()
        value = self._xattrs(path).get(name)
        if value is None:  # security.capability before writes too: not kept, so ENODATA
            raise fuse.FuseOSError(errno.ENODATA)
        return value

    def listxattr(self, path):
        self._xattrs_on()
        try:  # trusted.* for privileged callers, as on ext4
            privileged = fuse.fuse_get_context()[0] == 0
        except ValueError:  # no request context (a direct call): this process's own
            privileged = os.geteuid() == 0
        return [n for n in self._xattrs(path) if privileged or not n.startswith("trusted.")]

    def setxattr(self, path, name, value, options, position=0):
        self._xattrs_on()
        src, leaf = self._file(path)
        src.set_xattr(leaf, name, bytes(value), options)
        self._recorded()
        return 0

    def removexattr(self, path, name):
        self._xattrs_on()
        src, leaf = self._file(path)
        src.set_xattr(leaf, name, None)
        self._recorded()
        return 0

    def truncate(self, path, length, fh=None):
        od = self._handles.get(fh) if fh is not None else None
        if od is not None:
            size = od.vol.size
        else:
            kind, name = self._split(path)
            if kind != "disk":
                raise fuse.FuseOSError(errno.EISDIR)
            size = self._record(name).size
        if length == size:
            return 0
        if length == 0 and od is not None:
            # ftruncate(fd, 0): qemu-img's create step (truncate to 0, then to the image size).
            # The disk is wiped (all of it reads as zeros) and keeps its size, which libfuse
            # answers from getattr, so the following ftruncate to that size is a no-op.
            od.vol.discard(0, size)  # ReadOnly -> EROFS at the errno boundary
            return 0
        raise fuse.FuseOSError(errno.EPERM)

    # -- open / release ---------------------------------------------------------------
    def open(self, path, flags):
        kind, name = self._split(path)
        if kind != "disk":
            raise fuse.FuseOSError(errno.EISDIR)
        rec = self._record(name)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and rec.read_only:
            raise fuse.FuseOSError(errno.EROFS)
        if flags & os.O_TRUNC and rec.size != 0:
            raise fuse.FuseOSError(errno.EPERM)
        fh = next(self._fh_seq)
        okey = (tree.split(name)[0], rec.ident)
        with self._lock:
            od = self._open.get(okey)
            if od is not None:
                od.handles += 1
                self._handles[fh] = od
                return fh
            opening = self._opening.setdefault(okey, threading.Lock())
        with opening:  # one unwrap per disk even when opens race; other disks do not wait
            with self._lock:
                od = self._open.get(okey)
            if od is None:
                od = self._open_volume(name, rec)
            with self._lock:
                self._open.setdefault(okey, od)
                od = self._open[okey]
                od.handles += 1
                self._handles[fh] = od
        self._changed()
        return fh

    def _open_volume(self, path: str, rec) -> _OpenDisk:
        d, name = tree.split(path)
        src = self._by_dir[d]
        try:
            vol = src.open(name, null_cipher=self.null_cipher, cache=self.cache)
        except BlockcryptError as e:
            with self._lock:
                self._failed[path] = {"errno": errno.errorcode.get(e.errno, str(e.errno)),
                                      "message": str(e), "time": time.time(),
                                      "reason": getattr(e, "reason", type(e).__name__)}
            log.error("%s cannot be opened: %s", path, e)
            self._changed()
            raise
        if vol.disk_id != rec.ident:  # deleted and re-created between query and open
            vol.close()
            raise fuse.FuseOSError(errno.ENOENT)
        with self._lock:
            self._failed.pop(path, None)
        log.info("%s opened (id %s, cipher %s%s)", path, rec.ident, vol.cipher_name,
                 ", read-only" if vol.read_only else "")
        return _OpenDisk(vol, name, rec.ident, d, src.watched)

    def release(self, path, fh):
        with self._lock:
            od = self._handles.get(fh)
            if od is None:
                return 0
            opening = self._opening.setdefault(od.key, threading.Lock())
        # the last close runs under the disk's opening lock: an open racing it waits, so the
        # disk file is never open twice for writing (the engine's writer lock would refuse it)
        with opening:
            with self._lock:
                if self._handles.pop(fh, None) is None:
                    return 0
                od.handles -= 1
                last = od.handles == 0
                if last and self._open.get(od.key) is od:
                    del self._open[od.key]
            if last:
                try:
                    if od.errors:
                        self.note_integrity([od])
                    od.vol.close()
                    log.info("disk %s closed", od.name)
                finally:
                    self._changed()
        return 0

    def flush(self, path, fh):
        return 0  # writes are synchronous; durability is fsync's job

    # -- the I/O path: one volume call per request --------------------------------------
    def read(self, path, size, offset, fh):
        return self._handles[fh].vol.read(offset, size)

    def write(self, path, data, offset, fh):
        vol = self._handles[fh].vol
        end = vol.size
        if offset < end < offset + len(data):  # straddling the end: clipped (a short write), as the
            data = memoryview(data)[:end - offset]  # native session does; the kernel does not always
        return vol.write(offset, data)

    def fsync(self, path, datasync, fh):
        self._handles[fh].vol.flush()
        return 0

    def fallocate(self, path, mode, offset, length, fh):
        vol = self._handles[fh].vol
        if offset < 0 or length <= 0:
            raise fuse.FuseOSError(errno.EINVAL)
        size = vol.size
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            if mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                raise fuse.FuseOSError(errno.EOPNOTSUPP)
            if offset + length > size and not mode & FALLOC_FL_KEEP_SIZE:
                raise fuse.FuseOSError(errno.EPERM)  # would grow the disk
            length = min(length, size - offset)
            if length <= 0:
                return 0
            if mode & FALLOC_FL_PUNCH_HOLE:
                vol.discard(offset, length)
            else:
                vol.zero_range(offset, length)
            return 0
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise fuse.FuseOSError(errno.EOPNOTSUPP)
        if offset + length > size and not mode & FALLOC_FL_KEEP_SIZE:
            raise fuse.FuseOSError(errno.EPERM)
        return 0  # a disk file is fixed-size: allocation inside it is a no-op

    # -- life cycle -----------------------------------------------------------------------
    def init(self, path):
        self._reaper_stop = threading.Event()
        threading.Thread(target=_reaper, args=(self._reaper_stop,), name="bc-reaper", daemon=True).start()
        log.info("serving %s", "with the NULL cipher (benchmarks only, NOT ENCRYPTED)"
                 if self.null_cipher else "disks")
        if self._on_ready is not None:
            try:
                self._on_ready()
            except Exception:
                log.exception("readiness callback failed")

    def destroy(self, path):
        stop = getattr(self, "_reaper_stop", None)
        if stop is not None:
            stop.set()
        self.close_all()

    def close_all(self) -> None:
        """Flush and close every open volume (unmount, SIGTERM)."""
        with self._lock:
            opened = list(self._open.values())
            self._open.clear()
            self._handles.clear()
        for od in opened:
            try:
                od.vol.close()
                log.info("disk %s flushed and closed", od.name)
            except Exception as e:
                log.error("disk %s: close failed: %s", od.name, e)
        self._changed()

    def _counts(self, od):
        return od.handles, od.errors, od.last_error


#: operations whose last argument is a file handle (or None)
_FH_OPS = frozenset({"read", "write", "fsync", "fallocate", "truncate", "getattr", "release", "flush"})


# --- mounting --------------------------------------------------------------------------

class _FuseOpsV29(ctypes.Structure):
    """libfuse 2.9 ``struct fuse_operations``: fusepy's fields plus poll .. fallocate."""

    _fields_ = list(fuse.fuse_operations._fields_) + [
        ("poll", ctypes.c_void_p),
        ("write_buf", ctypes.c_void_p),
        ("read_buf", ctypes.c_void_p),
        ("flock", ctypes.c_void_p),
        ("fallocate", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_int, fuse.c_off_t,
                                       fuse.c_off_t, ctypes.POINTER(fuse.fuse_file_info))),
    ]


class _Fuse(fuse.FUSE):
    """fusepy's FUSE with the fallocate operation wired in (and ioctl without a path)."""

    def write(self, path, buf, size, offset, fip):
        # a view of libfuse's buffer instead of fusepy's string_at copy; valid during this call
        # only, which is all Volume.write needs (it encrypts into a new buffer or writes it out)
        data = memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))).cast("B")
        return self.operations("write", None, data, offset, fip.contents.fh)

    # with flag_nopath, setattr on an open file (fchmod, fchown, futimens) has no path either;
    # fusepy decodes these paths unconditionally
    def chmod(self, path, mode):
        return self.operations("chmod", self._decode_optional_path(path), mode)

    def chown(self, path, uid, gid):
        return self.operations("chown", self._decode_optional_path(path), uid, gid)

    def utimens(self, path, buf):
        if path is None:
            return 0  # accepted and ignored, as with a path
        return super().utimens(path, buf)

    def ioctl(self, path, cmd, arg, fip, flags, data):
        # fusepy decodes the path unconditionally; with flag_nopath it is NULL here
        return self.operations("ioctl", self._decode_optional_path(path), cmd, arg, fip.contents.fh,
                               flags, data)

    def fallocate(self, path, mode, offset, length, fip):
        return self.operations("fallocate", self._decode_optional_path(path), mode, offset, length,
                               fip.contents.fh)


def _install_fallocate() -> None:
    names = [f[0] for f in fuse.fuse_operations._fields_]
    if "fallocate" not in names:
        fuse.fuse_operations = _FuseOpsV29


#: FUSE mount options: 128 KiB requests (the most libfuse 2 and the kernel agree on
#: without max_pages), kernel permission checks on the modes above.
FUSE_OPTIONS = dict(big_writes=True, max_write=131072, max_read=131072, max_readahead=131072,
                    default_permissions=True)


def run(ops: DiskFS, mountpoint: str, *, allow_other: bool = False) -> None:
    """Mount and serve until unmounted or signalled (SIGTERM/SIGINT/SIGHUP); blocks."""
    _install_fallocate()
    opts = dict(FUSE_OPTIONS)
    if allow_other:
        opts["allow_other"] = True
    _Fuse(ops, mountpoint, foreground=True, nothreads=False, fsname="blockcrypt",
          subtype="blockcrypt", **opts)
