"""The native front end: the libfuse 3 session in C (native/session) over the C engine.

Same tree and semantics as the fusepy front end (fusepy_fs.py), but no Python
in a data request: read, write, fsync and fallocate go from the kernel to the
session's worker threads to the engine, 1 MiB at a time, with asynchronous
direct I/O. Python is the control plane here:

- the disk table: a thread pushes the catalog into the session every
  ``CATALOG_TTL_S`` (``set_disk``/``remove_disk``: disks created, deleted or
  resized while mounted appear, vanish or change size without a remount); a
  lookup of an unknown name refreshes it at once (rate-limited);
- ``open_disk`` (a hook the session calls on the first open of a disk, outside
  any data request): open the volume (header, DEK unwrap) and hand the session
  its engine volume; the last release calls ``closed`` and the volume is closed
  (the engine flushed it and wiped its key);
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
import threading
import time

from ..errors import BlockcryptError
from .status import FrontEndStatus

log = logging.getLogger("blockcrypt.mount.native_fs")

CATALOG_TTL_S = 1.0
#: how often the status file is brought up to date with the session's handle and error counts
STATUS_TICK_S = 0.2


class _OpenDisk:
    __slots__ = ("vol", "name", "disk_id", "opened")

    def __init__(self, vol, name: str, disk_id: str):
        self.vol = vol
        self.name = name
        self.disk_id = disk_id
        self.opened = time.time()


class NativeFS(FrontEndStatus):
    def __init__(self, state, *, null_cipher: bool = False, allow_other: bool = False, cache: str = "buffered",
                 on_change=None, on_ready=None, max_threads: int = 0):
        self.state = state
        self.null_cipher = bool(null_cipher)
        self.allow_other = bool(allow_other)
        self.cache = cache
        self.max_threads = max_threads
        self._on_change = on_change or (lambda fs: None)
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._open: dict[str, _OpenDisk] = {}     # by name
        self._failed: dict[str, dict] = {}
        self._table: dict[str, tuple] = {}        # name -> what was pushed
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

    def sync_table(self) -> None:
        """Push the catalog into the session: new, changed and removed disks."""
        with self._sync_lock:
            recs = {r.name: r for r in self.state.catalog.list_disks()}
            s = self._session
            changed = False
            for name, r in recs.items():
                row = (r.size, r.read_only, r.path, r.disk_id)
                if self._table.get(name) != row:
                    old = self._table.get(name)
                    if old is not None and old[3] != r.disk_id:
                        s.remove_disk(name)  # deleted and re-created under the same name
                    s.set_disk(name, r.size, self._mode(r.read_only), self._uid, self._gid, r.read_only, r.path)
                    self._table[name] = row
                    if old is not None and old[0] != r.size:
                        log.info("disk %s: size now %d bytes", name, r.size)
                        changed = True
            for name in [n for n in self._table if n not in recs]:
                try:
                    s.remove_disk(name)
                except FileNotFoundError:
                    pass
                del self._table[name]
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
            # handle counts and errors change inside the session: rewrite the status when they do
            now = [(od.name, *self._counts(od)[:2]) for od in self.open_disks()]
            if now != seen:
                seen = now
                self._changed()

    def _lookup_miss(self, name: str) -> None:
        """A name the table lacks: one indexed catalog query; a disk made since the last push
        is pushed now, so it opens right after `disk create`."""
        try:
            if self.state.catalog.find_disk(name) is not None:
                self.sync_table()
        except Exception as e:
            log.warning("catalog lookup of %s failed: %s", name, e)

    # -- hooks from the session (outside data requests) -------------------------------
    def _open_disk(self, name: str):
        from ..control.disks import open_volume
        try:
            vol = open_volume(self.state, name, null_cipher=self.null_cipher, cache=self.cache)
        except BlockcryptError as e:
            with self._lock:
                self._failed[name] = {"errno": errno.errorcode.get(e.errno, str(e.errno)),
                                      "message": str(e), "time": time.time()}
            log.error("disk %s cannot be opened: %s", name, e)
            self._changed()
            raise
        with self._lock:
            self._failed.pop(name, None)
            self._open[name] = _OpenDisk(vol, name, vol.disk_id)
        log.info("disk %s opened (id %s, cipher %s%s)", name, vol.disk_id, vol.cipher_name,
                 ", read-only" if vol.read_only else "")
        self._changed()
        return vol.engine

    def drop_cache(self, name: str) -> None:
        session = getattr(self, "_session", None)
        if session is None:
            return
        try:
            session.drop_cache(name)
        except OSError as e:
            log.warning("disk %s: the kernel's cached pages could not be dropped (%s)", name, e)

    def _closed(self, name: str) -> None:
        with self._lock:
            od = self._open.pop(name, None)
        if od is not None:
            od.vol.close()
            log.info("disk %s closed", name)
        self._changed()

    # -- serving --------------------------------------------------------------------
    def run(self, mountpoint: str) -> None:
        """Mount, serve until unmounted or signalled, unmount. Blocks."""
        from .. import _engine
        self._session = _engine.Session(mountpoint, statfs_path=str(self.state.path), allow_other=self.allow_other,
                                        max_threads=self.max_threads, open_disk=self._open_disk,
                                        closed=self._closed, lookup_miss=self._lookup_miss)
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
            st = self._session.disk_state(od.name) if self._session is not None else {}
        except (FileNotFoundError, ValueError):
            st = {}
        last = st.get("lastErrno") or 0
        return (st.get("handles", 0), st.get("errors", 0),
                {"errno": errno.errorcode.get(last, str(last)), "message": os.strerror(last)} if last else None)
