"""The key monitor: revocation and auto-rotation inside a mount daemon.

Every ``key_check_interval`` seconds (catalog setting, default 60) the monitor
unwraps the DEK of every open customer-key disk again, through its provider (vault, transit), with
the disk id as caller context (so the vault's audit shows each check). Then:

- the key answers: the disk serves; a disk that was stopped is restored
  (its DEK unwrapped again) and serves from this check on;
- disabled, expired, deleted, purged, access denied, integrity failure: a disk
  with revocation ``immediate`` (the default) stops at once: its DEK is wiped
  from memory and every request answers EIO; ``on-restart`` disks (the seeds'
  ultra-disk behaviour) keep serving until the next mount, with a warning.
  The optional ``on_revoke`` command (catalog setting) runs with the disk
  name as its argument (e.g. to stop a VM), and the event is appended to
  STATE/logs/key-events.jsonl;
- unreachable (network, 5xx): not a revocation. The disk keeps serving from
  the cached DEK for ``key_grace_period`` seconds (default 3600) after the
  last good answer, retrying at every check; past that it stops like a
  revoked one, and comes back when the vault answers again.

Every ``auto_rotate_interval`` seconds (default 3600) it also runs one
auto-rotation pass (control/des.py auto_rotate_pass): disk encryption sets that follow
their key's newest version re-wrap their disks' DEKs.

The daemon loads this module as a plugin (mount.DAEMON_PLUGINS); it talks to
the file system object only through ``open_disks()`` and ``notify_changed()``.

Caveats: I/O stops within one interval plus the time of one vault round trip;
settings are re-read at every check, so ``blockcrypt config set`` applies to
running mounts.
"""
from __future__ import annotations

import json
import logging
import shlex
import subprocess
import threading
import time
from pathlib import Path

from .._util.clock import iso_z
from ..control import des
from ..control.disks import open_layers, read_disk_header, wipe_layers
from ..control.settings import get as setting
from ..errors import BlockcryptError, KeyError_, KeyUnavailable
from ..format import ROLE_DATA
from ..keys.envelope import unwrap_layer

log = logging.getLogger("blockcrypt.mount.monitor")


def record_event(st, event: dict) -> None:
    """Append a key event (no key material) to STATE/logs/key-events.jsonl."""
    p = Path(st.path) / "logs" / "key-events.jsonl"
    try:
        p.parent.mkdir(mode=0o700, exist_ok=True)
        with open(p, "a") as f:
            f.write(json.dumps({"time": iso_z(), **event}) + "\n")
            f.flush()
    except OSError as e:
        log.warning("cannot record key event: %s", e)


class KeyMonitor:
    def __init__(self, fs, st):
        self.fs = fs
        self.st = st
        self.stop_event = threading.Event()
        self.last_ok: dict[str, float] = {}       # disk id -> monotonic time of the last good answer
        self.notices: dict[str, str] = {}         # disk id -> warning shown while still serving
        self.next_rotate = time.monotonic() + setting(st, "auto_rotate_interval")
        self.thread = threading.Thread(target=self.run, name="key-monitor", daemon=True)

    def start(self):
        self.thread.start()
        return self.stop

    def stop(self):
        self.stop_event.set()
        self.thread.join(10)

    def run(self):
        while not self.stop_event.wait(setting(self.st, "key_check_interval")):
            try:
                self.check_once()
            except Exception:  # the monitor must outlive any single failure
                log.exception("key check failed")
            if time.monotonic() >= self.next_rotate:
                self.next_rotate = time.monotonic() + setting(self.st, "auto_rotate_interval")
                try:
                    for r in des.auto_rotate_pass(self.st):
                        log.info("auto-rotation: %s now on %s (%d disk(s) re-wrapped)",
                                 r["des"], r["activeKey"], len(r["rewrapped"]))
                        record_event(self.st, {"event": "KeyRotated", "des": r["des"], "key": r["activeKey"],
                                               "disks": r["rewrapped"]})
                except BlockcryptError as e:
                    log.warning("auto-rotation pass failed: %s", e)

    def check_once(self) -> None:
        changed = False
        for od in self.fs.open_disks():
            if not getattr(od, "watched", True):
                continue  # its source says no key store stands behind it (a temp disk)
            rec = self.st.catalog.find_disk(od.name)
            if rec is None or not rec.des or rec.disk_id != od.disk_id:
                continue
            vol = od.vol
            now = time.monotonic()
            try:
                h = read_disk_header(rec)
                dek = unwrap_layer(self.st.keys, h, ROLE_DATA)
                del dek
            except KeyError_ as e:
                changed |= self._failed(od, rec, e, now)
                continue
            except BlockcryptError as e:
                log.warning("key check of disk %s failed: %s", od.name, e)
                continue
            self.last_ok[od.disk_id] = now
            if self.notices.pop(od.disk_id, None):
                changed = True
            if vol.key_error is not None:
                try:
                    layers = open_layers(self.st, h)
                    try:
                        vol.restore(layers)
                    finally:
                        wipe_layers(layers)
                except BlockcryptError as e:
                    log.warning("disk %s: key answered but restore failed: %s", od.name, e)
                    continue
                log.warning("disk %s: key %s is available again; serving I/O", od.name, rec.des)
                record_event(self.st, {"event": "KeyRestored", "disk": od.name, "diskId": od.disk_id,
                                       "des": rec.des})
                changed = True
        if changed:
            self.fs.notify_changed()

    def _failed(self, od, rec, err: KeyError_, now: float) -> bool:
        vol = od.vol
        if vol.key_error is not None:
            return False  # already stopped
        if err.transient:
            last = self.last_ok.setdefault(od.disk_id, now)
            grace = setting(self.st, "key_grace_period")
            if now - last < grace:
                msg = f"vault unreachable ({err}); serving from the cached key for {grace - (now - last):.0f} s more"
                if self.notices.get(od.disk_id) != msg:
                    log.warning("disk %s: %s", od.name, msg)
                self.notices[od.disk_id] = msg
                return False
            err = KeyUnavailable(key_id=getattr(err, "kw", {}).get("key_id", rec.des),
                                 msg=f"unreachable for longer than the grace period ({grace:.0f} s)")
        if rec.revocation == "on-restart":
            msg = f"{err.reason}: {err}; serving until the next mount (revocation on-restart)"
            if self.notices.get(od.disk_id) != msg:
                log.warning("disk %s: %s", od.name, msg)
                record_event(self.st, {"event": "KeyRevokedServingUntilRestart", "disk": od.name,
                                       "diskId": od.disk_id, "des": rec.des, "reason": err.reason})
            self.notices[od.disk_id] = msg
            return True
        vol.revoke(err)
        log.error("disk %s: %s; its key is wiped from memory and its I/O stopped", od.name, err)
        record_event(self.st, {"event": "KeyRevoked", "disk": od.name, "diskId": od.disk_id, "des": rec.des,
                               "reason": err.reason, "message": str(err)})
        self._run_hook(od.name, err)
        return True

    def _run_hook(self, disk_name: str, err: KeyError_) -> None:
        cmd = self.st.catalog.get_setting("on_revoke")
        if not cmd:
            return
        try:
            argv = shlex.split(cmd) + [disk_name]
            p = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "BLOCKCRYPT_DISK": disk_name,
                                    "BLOCKCRYPT_REASON": err.reason})
            log.info("on-revoke hook %r for %s exited %d", cmd, disk_name, p.returncode)
            record_event(self.st, {"event": "OnRevokeHook", "disk": disk_name, "command": cmd,
                                   "exitCode": p.returncode})
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            log.error("on-revoke hook %r for %s failed: %s", cmd, disk_name, e)


def start_in_daemon(fs, st):
    """Plugin entry point for the mount daemon; returns the function that stops the monitor."""
    return KeyMonitor(fs, st).start()
