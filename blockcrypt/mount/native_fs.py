"""The native front end: the libfuse 3 session in C (native/session) over the C engine.

Same tree and semantics as the fusepy front end (fusepy_fs.py), but no Python
in a data request: read, write, fsync and fallocate go from the kernel to the
session's worker threads to the engine, 1 MiB at a time, with asynchronous
direct I/O. Python is the control plane here:

- the table: a thread pushes the entries of the tree's sources (tree.py: disks/
  from the catalog, and whatever other directories the daemon serves) into the
  session every ``CATALOG_TTL_S`` (``set_disk``/``remove_disk`` of
  ``"<dir>/<name>"``: disks created, deleted or resized while mounted appear,
  vanish or change size without a remount); a lookup of an unknown name asks its
  source at once;
- ``open_disk`` (a hook the session calls on the first open of a file, outside
  any data request): the source opens the volume (header, DEK unwrap) and the
  session gets its engine volume; the last release calls ``closed`` and the
  volume is closed (the engine flushed it and wiped its key);
- ``set_attr``/``set_xattr`` (hooks on chmod/chown and setxattr/removexattr of a
  file): its source records them (tree.py: in the catalog, per disk) and the entry
  is pushed again at once, its xattrs packed for the session (:func:`pack_xattrs`);
  getxattr and listxattr never leave the session;
- status (``disk_status``), and the plugin interface of the key monitor
  (``open_disks``/``notify_changed``): revoking a volume closes the engine's
  gate, so the session's next request on it fails with EIO.

Caveats: the session loop runs in a thread of its own so that the main thread
can take SIGTERM/SIGINT/SIGHUP and end it; kernel requests on an open disk never
wait for the catalog or a key provider.
"""
from __future__ import annotations

import errno
import grp
import logging
import os
import signal
import struct
import threading
import time

from ..control import settings
from ..errors import BlockcryptError
from . import tree
from .status import FrontEndStatus

log = logging.getLogger("blockcrypt.mount.native_fs")

CATALOG_TTL_S = 1.0
#: how often the status file is brought up to date with the session's handle and error counts
STATUS_TICK_S = 0.2


def pack_xattrs(xattrs) -> bytes:
    """((name, value), ...) as native/session/bc_xattr.h draws it: u16 LE name length, u32 LE
    value length, name, value; one record after the other."""
    out = bytearray()
    for name, value in xattrs:
        raw = name.encode("utf-8", "surrogateescape")
        out += struct.pack("<HI", len(raw), len(value)) + raw + bytes(value)
    return bytes(out)


class _OpenDisk:
    __slots__ = ("vol", "name", "disk_id", "opened", "dir", "watched")

    def __init__(self, vol, name: str, disk_id: str, dir_: str = "disks", watched: bool = True):
        self.vol = vol
        self.name = name
        self.disk_id = disk_id
        self.opened = time.time()
        self.dir = dir_
        self.watched = watched


class NativeFS(FrontEndStatus):
    def __init__(self, state, *, null_cipher: bool = False, allow_other: bool = False, cache: str = "buffered",
                 on_change=None, on_ready=None, max_threads: int = 0, sources=None):
        self.state = state
        self.sources = tree.ordered(sources if sources is not None else [tree.CatalogDisks(state)])
        self._by_dir = {src.dir: src for src in self.sources}
        self.null_cipher = bool(null_cipher)
        self.allow_other = bool(allow_other)
        self.cache = cache
        self.max_threads = max_threads
        self._on_change = on_change or (lambda fs: None)
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._open: dict[str, _OpenDisk] = {}     # by path "<dir>/<name>"
        self._failed: dict[str, dict] = {}        # by path
        self._table: dict[str, tuple] = {}        # path -> what was pushed
        self._last_sync = 0.0
        self._stop = threading.Event()
        self._session = None
        self._uid = os.getuid()
        self._gid = 0
        if allow_other:
            try:
                self._gid = grp.getgrnam("disk").gr_gid
            except KeyError:
                self._gid = os.getgid()

    # -- the disk table -------------------------------------------------------------
    def _mode(self, read_only: bool) -> int:
        if self.allow_other:
            return 0o440 if read_only else 0o660
        return 0o400 if read_only else 0o600

    def _owner(self, e) -> tuple[int, int, int]:
        """(mode, uid, gid) of an entry: what chmod/chown recorded, else the defaults."""
        a = e.attrs
        return (self._mode(e.read_only) if a.mode is None else a.mode,
                self._uid if a.uid is None else a.uid, self._gid if a.gid is None else a.gid)

    def _push(self, path: str, e) -> None:
        mode, uid, gid = self._owner(e)
        self._session.set_disk(path, e.size, mode, uid, gid, e.read_only, e.backing_path,
                               pack_xattrs(e.attrs.xattrs))

    def _entries(self) -> dict:
        """path -> Entry over every source; a source that fails keeps its previous rows."""
        out = {}
        for src in self.sources:
            try:
                got = src.entries()
            except Exception as e:
                if src.dir == "disks":
                    raise
                log.warning("listing %s/ failed (%s); serving the previous table", src.dir, e)
                prefix = src.dir + "/"
                out.update({p: self._table[p][4] for p in self._table if p.startswith(prefix)})
                continue
            out.update({tree.join(src.dir, name): e for name, e in got.items()})
        return out

    def sync_table(self) -> None:
        """Push the sources' entries into the session: new, changed and removed files."""
        with self._sync_lock:
            ents = self._entries()
            s = self._session
            changed = False
            for path, e in ents.items():
                row = (e.size, e.read_only, e.backing_path, e.ident, e, e.attrs)
                old = self._table.get(path)
                if old is None or old[:4] != row[:4] or old[5] != row[5]:
                    if old is not None and old[3] != e.ident:
                        s.remove_disk(path)  # deleted and re-created under the same name
                    self._push(path, e)
                    if old is not None and old[0] != e.size:
                        log.info("%s: size now %d bytes", path, e.size)
                        changed = True
                self._table[path] = row
            for path in [p for p in self._table if p not in ents]:
                try:
                    s.remove_disk(path)
                except FileNotFoundError:
                    pass
                del self._table[path]
            self._last_sync = time.monotonic()
        if changed:
            self._changed()

    def _sync_loop(self) -> None:
        seen = None
        while not self._stop.wait(STATUS_TICK_S):
            if time.monotonic() - self._last_sync >= CATALOG_TTL_S:
                try:
                    self.sync_table()
                except Exception as e:  # a busy or broken catalog must not stop the disks being served
                    log.warning("catalog sync failed (%s); serving the previous table", e)
                self.note_integrity()
            # handle counts and errors change inside the session: rewrite the status when they do
            now = [(od.dir, od.name, *self._counts(od)[:2]) for od in self.open_disks()]
            if now != seen:
                seen = now
                self._changed()

    def _lookup_miss(self, path: str) -> None:
        """A name the table lacks: ask its source (for disks/, one indexed catalog query); a
        disk made since the last push is pushed now, so it opens right after `disk create`."""
        d, name = tree.split(path)
        src = self._by_dir.get(d)
        try:
            if src is not None and src.find(name) is not None:
                self.sync_table()
        except Exception as e:
            log.warning("lookup of %s failed: %s", path, e)

    # -- hooks from the session (outside data requests) -------------------------------
    def _refresh_one(self, path: str) -> None:
        """Push one entry again after its source changed it (chmod, chown, xattrs)."""
        d, name = tree.split(path)
        e = self._by_dir[d].find(name)
        if e is None:
            return
        with self._sync_lock:
            old = self._table.get(path)
            if old is not None and old[3] == e.ident:
                self._push(path, e)
                self._table[path] = (e.size, e.read_only, e.backing_path, e.ident, e, e.attrs)

    def _set_attr(self, path: str, mode, uid, gid) -> None:
        d, name = tree.split(path)
        self._by_dir[d].set_owner(name, mode=mode, uid=uid, gid=gid)
        log.info("%s: %s", path, ", ".join(f"{k} {v:o}" if k == "mode" else f"{k} {v}" for k, v in
                                           (("mode", mode), ("uid", uid), ("gid", gid)) if v is not None))
        self._refresh_one(path)

    def _set_xattr(self, path: str, xname: str, value, flags: int) -> None:
        d, name = tree.split(path)
        self._by_dir[d].set_xattr(name, xname, value, flags)
        self._refresh_one(path)

    def _open_disk(self, path: str):
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
        with self._lock:
            self._failed.pop(path, None)
            self._open[path] = _OpenDisk(vol, name, vol.disk_id, d, src.watched)
        log.info("%s opened (id %s, cipher %s%s)", path, vol.disk_id, vol.cipher_name,
                 ", read-only" if vol.read_only else "")
        self._changed()
        return vol.engine

    def drop_cache(self, name: str) -> None:
        """The kernel drops its cached pages of ``name`` ("<dir>/<name>", or a disk's bare name)."""
        session = getattr(self, "_session", None)
        if session is None:
            return
        try:
            session.drop_cache(name)
        except OSError as e:
            log.warning("%s: the kernel's cached pages could not be dropped (%s)", name, e)

    def _closed(self, path: str) -> None:
        with self._lock:
            od = self._open.pop(path, None)
        if od is not None:
            self.note_integrity([od])
            od.vol.close()
            log.info("%s closed", path)
        self._changed()

    # -- serving --------------------------------------------------------------------
    def run(self, mountpoint: str) -> None:
        """Mount, serve until unmounted or signalled, unmount. Blocks."""
        from .. import _engine
        self._session = _engine.Session(mountpoint, statfs_path=str(self.state.path), allow_other=self.allow_other,
                                        max_threads=self.max_threads, open_disk=self._open_disk,
                                        closed=self._closed, lookup_miss=self._lookup_miss,
                                        dirs=[src.dir for src in self.sources], set_attr=self._set_attr,
                                        set_xattr=self._set_xattr,
                                        xattrs=bool(settings.get(self.state, "xattrs")))
        try:
            self.sync_table()
            syncer = threading.Thread(target=self._sync_loop, name="bc-catalog-sync", daemon=True)
            syncer.start()
            loop = threading.Thread(target=self._session.loop, name="bc-session", daemon=True)
            loop.start()
            old = {sig: signal.signal(sig, lambda *_: self._session.exit())
                   for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
            log.info("serving %s through the native session (libfuse 3)", "with the NULL cipher (benchmarks "
                     "only, NOT ENCRYPTED)" if self.null_cipher else "disks")
            if self._on_ready is not None:
                try:
                    self._on_ready()
                except Exception:
                    log.exception("readiness callback failed")
            try:
                while loop.is_alive():
                    loop.join(0.5)  # the main thread stays in Python: signal handlers run here
            finally:
                for sig, h in old.items():
                    signal.signal(sig, h)
                self._stop.set()
        finally:
            self._session.close()
            self.close_all()

    def close_all(self) -> None:
        """Close every volume still open (the session already flushed them)."""
        with self._lock:
            opened = list(self._open.values())
            self._open.clear()
        for od in opened:
            try:
                od.vol.close()
                log.info("disk %s flushed and closed", od.name)
            except Exception as e:
                log.error("disk %s: close failed: %s", od.name, e)
        self._changed()

    # -- status (mount/status.py) ----------------------------------------------------------
    def _counts(self, od):
        try:
            st = self._session.disk_state(tree.join(od.dir, od.name)) if self._session is not None else {}
        except (FileNotFoundError, ValueError):
            st = {}
        last = st.get("lastErrno") or 0
        return (st.get("handles", 0), st.get("errors", 0),
                {"errno": errno.errorcode.get(last, str(last)), "message": os.strerror(last)} if last else None)
