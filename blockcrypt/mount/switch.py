"""Daemon plugin: move open disks to the top file the catalog names (after a snapshot).

``snapshot create`` (control/snapshots.py) freezes the file a disk is served from
and commits the disk's new top file to the catalog, then asks the live mount over
the socket of control/live.py to switch. Here the daemon answers: it finds the
open disk (``fs.open_disks()``, the same interface the key monitor uses), and if the
catalog names another file for it (same disk id), calls ``Volume.switch``: the
engine waits for the requests in flight, flushes the old file and serves from the
new chain; the front end's open handles keep working (they hold the engine volume,
not the file). A check of every open disk also runs once a second, so a command
that died after its commit is caught up.

Caveat: a switch that fails (the new file unreadable) leaves the disk on its old
file and is reported to the asking command; the old file is then still written,
so the command removes the half-made snapshot.
"""
from __future__ import annotations

import json
import logging
import socket
import threading

from ..control import live

log = logging.getLogger("blockcrypt.mount.switch")

POLL_S = 1.0


class Switcher:
    def __init__(self, fs, st):
        self.fs, self.st = fs, st
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = None

    def _open(self, name: str):
        for od in self.fs.open_disks():
            if od.name == name and getattr(od, "dir", "disks") == "disks":
                return od
        return None

    def sync(self, name: str) -> dict:
        with self._lock:
            od = self._open(name)
            if od is None:
                return {"ok": True, "open": False, "switched": False}
            rec = self.st.catalog.find_disk(name)
            if rec is None or rec.disk_id != od.disk_id or rec.path == od.vol.path:
                return {"ok": True, "open": True, "switched": False}
            old = od.vol.path
            od.vol.switch(rec.path)
            log.info("disk %s: now served from %s (%s frozen)", name, rec.path, old)
            return {"ok": True, "open": True, "switched": True}

    def _serve_one(self, conn) -> None:
        try:
            conn.settimeout(10)
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < 4096:
                part = conn.recv(4096)
                if not part:
                    break
                buf += part
            req = json.loads(buf or b"{}")
            name = str(req.get("name", ""))
            if req.get("op") == "sync":
                ans = self.sync(name)
            elif req.get("op") == "open":
                ans = {"ok": True, "open": self._open(name) is not None}
            else:
                ans = {"ok": False, "error": f"unknown request {req.get('op')!r}"}
        except Exception as e:  # one bad request must not stop the daemon
            log.warning("live request failed: %s", e)
            ans = {"ok": False, "error": str(e)}
        try:
            conn.sendall(json.dumps(ans).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                for od in self.fs.open_disks():  # caught up: a command that died after its commit
                    if getattr(od, "dir", "disks") != "disks":
                        continue
                    try:
                        self.sync(od.name)
                    except Exception as e:
                        log.warning("disk %s: switch failed: %s", od.name, e)
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            threading.Thread(target=self._serve_one, args=(conn,), name="bc-live-req", daemon=True).start()

    def start(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(live.address(self.st.path))
        except OSError as e:  # the disks are still served; snapshots of open disks are refused
            log.error("cannot listen for snapshot switches (%s): `snapshot create` of an open disk will fail", e)
            s.close()
            return None
        s.listen(16)
        s.settimeout(POLL_S)
        self._sock = s
        t = threading.Thread(target=self._loop, name="bc-live", daemon=True)
        t.start()

        def stop():
            self._stop.set()
            s.close()
            t.join(5)
        return stop


def start_in_daemon(fs, st):
    return Switcher(fs, st).start()
