"""The key monitor: revocation and auto-rotation inside a mount daemon.

Every ``key_check_interval`` seconds (catalog setting, default 60) the monitor
checks each key of the open customer-key disks once: the disks are grouped by
(DES, key id with its version) from their headers, and one DEK of each group is
unwrapped again through its provider (vault, transit, PKCS#11, KMIP), with that
disk's id as caller context (so the vault's audit shows each check). The answer
holds for every disk on that key: 1,000 disks on one DES cost one unwrap per
interval. (A wrapped DEK that fails its integrity check is that disk's own
fault: it alone stops and another disk of the group asks again.) Then:

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

Warnings that repeat while a condition lasts (a vault outage, an unreadable header)
are rate-limited: the first one, then at most one per ``warning_repeat_interval``
seconds (default 300) saying how many were held back, and a line when it ends.

The daemon loads this module as a plugin (mount.DAEMON_PLUGINS); it talks to
the file system object only through ``open_disks()`` and ``notify_changed()``.

Caveats: I/O stops within one interval plus the time of one vault round trip;
the interval is re-read every second while the monitor waits (and every
setting at every check), so ``blockcrypt config set`` applies to running
mounts at once; a value the catalog cannot give reads as its default.
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
from ..control.settings import SETTINGS, get as setting
from ..errors import BlockcryptError, KeyError_, KeyIntegrityError, KeyUnavailable
from ..format import ROLE_DATA
from ..keys.envelope import unwrap_layer

log = logging.getLogger("blockcrypt.mount.monitor")

#: how often the monitor re-reads its interval while it waits (seconds)
SETTINGS_POLL_S = 1.0


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


class Throttle:
    """Rate-limited warnings for a condition that lasts: the first occurrence is logged, then
    at most one line per ``repeat_s`` (saying how many were held back), and one line when
    the condition ends (``recovered``). Keys name the condition (a key, a disk)."""

    def __init__(self, logger, repeat_s):
        self.log = logger
        self.repeat_s = repeat_s            # a callable: re-read at every use
        self.active: dict = {}              # key -> [first monotonic, last logged monotonic, held back]

    def warn(self, key, fmt: str, *args) -> bool:
        now = time.monotonic()
        a = self.active.get(key)
        if a is None:
            self.active[key] = [now, now, 0]
            self.log.warning(fmt, *args)
            return True
        if now - a[1] < self.repeat_s():
            a[2] += 1
            return False
        held, a[1], a[2] = a[2], now, 0
        self.log.warning(fmt + " (%d similar warning(s) held back since the last one)", *args, held)
        return True

    def recovered(self, key, fmt: str, *args) -> None:
        a = self.active.pop(key, None)
        if a is not None:
            self.log.warning(fmt + " (after %.0f s; %d repeated warning(s) held back)", *args,
                             time.monotonic() - a[0], a[2])


class KeyMonitor:
    """Checks every (DES, key version) of the open customer-key disks once per interval and
    applies the answer to every disk on it (1,000 disks on one key: one unwrap). ``disks``
    holds what `status` and the metrics show per disk (no key material)."""

    def __init__(self, fs, st):
        self.fs = fs
        self.st = st
        self.stop_event = threading.Event()
        self.last_ok: dict[tuple, float] = {}     # (DES, key id) -> monotonic time of the last good answer
        self.notices: dict[str, str] = {}         # disk id -> warning shown while still serving
        self.disks: dict[str, dict] = {}          # disk id -> key state for status and metrics
        self.checks: dict[tuple, int] = {}        # (DES, result) -> key checks done
        self.unwraps = 0                          # unwraps the checks asked for
        self.lock = threading.Lock()
        self.throttle = Throttle(log, lambda: self._setting("warning_repeat_interval"))
        self.next_rotate = time.monotonic() + self._setting("auto_rotate_interval")
        self.thread = threading.Thread(target=self.run, name="key-monitor", daemon=True)

    def start(self):
        self.thread.start()
        return self.stop

    def stop(self):
        self.stop_event.set()
        self.thread.join(10)

    def _setting(self, name: str):
        """A setting, or its default when the catalog cannot be read now (busy, full disk)."""
        try:
            return setting(self.st, name)
        except Exception as e:
            log.warning("cannot read setting %s (%s); using its default", name, e)
            return SETTINGS[name].parse(SETTINGS[name].default)

    def run(self):
        last = time.monotonic()
        while not self.stop_event.is_set():
            # re-read the interval every SETTINGS_POLL_S: a shorter one set while a long one
            # runs applies at once, not after the old interval has run out
            due = last + self._setting("key_check_interval") - time.monotonic()
            if due > 0:
                self.stop_event.wait(min(due, SETTINGS_POLL_S))
                continue
            last = time.monotonic()
            try:
                self.check_once()
            except Exception:  # the monitor must outlive any single failure
                log.exception("key check failed")
            if time.monotonic() >= self.next_rotate:
                self.next_rotate = time.monotonic() + self._setting("auto_rotate_interval")
                try:
                    for r in des.auto_rotate_pass(self.st):
                        log.info("auto-rotation: %s now on %s (%d disk(s) re-wrapped)",
                                 r["des"], r["activeKey"], len(r["rewrapped"]))
                        record_event(self.st, {"event": "KeyRotated", "des": r["des"], "key": r["activeKey"],
                                               "disks": r["rewrapped"]})
                except Exception as e:  # as above: one failed pass must not end the monitor
                    log.warning("auto-rotation pass failed: %s", e)

    # -- what status and the metrics read --------------------------------------------------
    def disk_info(self, disk_id: str) -> dict | None:
        """The key state of an open disk: keyId, des, lastCheck (Unix s), lastOk, graceSecondsLeft
        (None unless serving on grace), gracePeriod, revocations, restores, rotations."""
        with self.lock:
            info = self.disks.get(disk_id)
            if info is None:
                return None
            out = {k: v for k, v in info.items() if k != "graceUntil"}
            until = info.get("graceUntil")
        out["graceSecondsLeft"] = None if until is None else max(0.0, until - time.monotonic())
        return out

    def _info(self, od, rec) -> dict:
        info = self.disks.get(od.disk_id)
        if info is None:
            info = self.disks[od.disk_id] = {"name": od.name, "des": rec.des, "keyId": None, "lastCheck": None,
                                             "lastOk": None, "graceUntil": None, "gracePeriod": None,
                                             "revocations": 0, "restores": 0, "rotations": 0,
                                             "revokedOnRestart": None}
        return info

    # -- the check ---------------------------------------------------------------------------
    def check_once(self) -> None:
        changed = False
        groups: dict[tuple, list] = {}
        open_ids = set()
        for od in self.fs.open_disks():
            if not getattr(od, "watched", True):
                continue  # its source says no key store stands behind it (a temp disk)
            rec = self.st.catalog.find_disk(od.name)
            if rec is None or not rec.des or rec.disk_id != od.disk_id:
                continue
            open_ids.add(od.disk_id)
            try:
                h = read_disk_header(rec)
            except BlockcryptError as e:
                self.throttle.warn(("header", od.disk_id), "key check of disk %s failed: %s", od.name, e)
                continue
            self.throttle.recovered(("header", od.disk_id), "disk %s: its header reads again", od.name)
            kid = h.layer(ROLE_DATA).kek_id
            with self.lock:
                info = self._info(od, rec)
                if info["keyId"] is not None and info["keyId"] != kid:
                    info["rotations"] += 1  # re-wrapped under another key version since the last check
                info["keyId"], info["des"] = kid, rec.des
            groups.setdefault((rec.des, kid), []).append((od, rec, h))
        with self.lock:
            for gone in [d for d in self.disks if d not in open_ids]:
                if self.disks[gone]["revocations"] == 0 and self.disks[gone]["rotations"] == 0:
                    del self.disks[gone]  # closed; counters that moved stay for the metrics
        for gk, members in groups.items():
            changed |= self._check_key(gk, members)
        if changed:
            self.fs.notify_changed()

    def _check_key(self, gk: tuple, members: list) -> bool:
        """One unwrap for the key ``gk`` = (DES, key id), through a disk that serves (else the
        first); its answer holds for every member. A wrapped DEK that fails its integrity check
        is that disk's own fault: it alone is stopped and the next member asks again."""
        changed = False
        pending = list(members)
        while pending:
            rep = next((m for m in pending if m[0].vol.key_error is None), pending[0])
            now, wall = time.monotonic(), time.time()
            err = None
            try:
                dek = unwrap_layer(self.st.keys, rep[2], ROLE_DATA)
                del dek
            except KeyError_ as e:
                err = e
            except BlockcryptError as e:
                self.throttle.warn(("check", gk), "key check of %s (DES %s) failed: %s", gk[1], gk[0], e)
                return changed
            finally:
                with self.lock:
                    self.unwraps += 1
            result = "ok" if err is None else err.reason
            with self.lock:
                self.checks[(gk[0], result)] = self.checks.get((gk[0], result), 0) + 1
            if isinstance(err, KeyIntegrityError):
                with self.lock:
                    self._info(rep[0], rep[1])["lastCheck"] = wall
                changed |= self._failed(rep[0], rep[1], err, gk, now)
                pending.remove(rep)
                continue
            if err is None:
                self.last_ok[gk] = now
                self.throttle.recovered(("unreachable", gk), "key %s (DES %s) answers again; its %d disk(s) "
                                        "serve from a fresh check", gk[1], gk[0], len(pending))
            elif err.transient:
                self._grace_warning(gk, err, now, len(pending))
            for od, rec, h in pending:
                with self.lock:
                    info = self._info(od, rec)
                    info["lastCheck"] = wall
                    if err is None:
                        info["lastOk"], info["graceUntil"] = wall, None
                if err is None:
                    changed |= self._ok(od, rec, h)
                else:
                    changed |= self._failed(od, rec, err, gk, now)
            break
        return changed

    def _grace_warning(self, gk, err, now: float, n: int) -> None:
        grace = self._setting("key_grace_period")
        last = self.last_ok.setdefault(gk, now)
        left = grace - (now - last)
        if left > 0:
            self.throttle.warn(("unreachable", gk), "key %s (DES %s, %d disk(s)): vault unreachable (%s); "
                               "serving from the cached key for %.0f s more", gk[1], gk[0], n, err, left)

    def _ok(self, od, rec, h) -> bool:
        changed = False
        vol = od.vol
        if self.notices.pop(od.disk_id, None):
            changed = True
        with self.lock:
            self.disks[od.disk_id]["revokedOnRestart"] = None
        if vol.key_error is not None:
            try:
                layers = open_layers(self.st, h)
                try:
                    vol.restore(layers)
                finally:
                    wipe_layers(layers)
            except BlockcryptError as e:
                self.throttle.warn(("restore", od.disk_id), "disk %s: key answered but restore failed: %s",
                                   od.name, e)
                return changed
            self.throttle.active.pop(("restore", od.disk_id), None)
            log.warning("disk %s: key %s is available again; serving I/O", od.name, rec.des)
            record_event(self.st, {"event": "KeyRestored", "disk": od.name, "diskId": od.disk_id,
                                   "des": rec.des})
            with self.lock:
                self.disks[od.disk_id]["restores"] += 1
            changed = True
        return changed

    def _failed(self, od, rec, err: KeyError_, gk: tuple, now: float) -> bool:
        vol = od.vol
        if vol.key_error is not None:
            return False  # already stopped
        if err.transient:
            last = self.last_ok.setdefault(gk, now)
            grace = self._setting("key_grace_period")
            with self.lock:
                info = self._info(od, rec)
                info["gracePeriod"] = grace
            if now - last < grace:
                msg = f"vault unreachable ({err}); serving from the cached key until the grace period ends"
                with self.lock:
                    first = info["graceUntil"] is None
                    info["graceUntil"] = last + grace
                self.notices[od.disk_id] = msg
                return first
            err = KeyUnavailable(key_id=getattr(err, "kw", {}).get("key_id", rec.des),
                                 msg=f"unreachable for longer than the grace period ({grace:.0f} s)")
        with self.lock:
            self._info(od, rec)["graceUntil"] = None
        if rec.revocation == "on-restart":
            msg = f"{err.reason}: {err}; serving until the next mount (revocation on-restart)"
            if self.notices.get(od.disk_id) != msg:
                log.warning("disk %s: %s", od.name, msg)
                record_event(self.st, {"event": "KeyRevokedServingUntilRestart", "disk": od.name,
                                       "diskId": od.disk_id, "des": rec.des, "reason": err.reason})
            self.notices[od.disk_id] = msg
            with self.lock:
                self.disks[od.disk_id]["revokedOnRestart"] = {"reason": err.reason, "message": str(err)}
            return True
        vol.revoke(err)
        with self.lock:
            self.disks[od.disk_id]["revocations"] += 1
        drop = getattr(self.fs, "drop_cache", None)
        if drop is not None:  # no plaintext stays readable from the kernel's page cache or an mmap
            drop(f"{getattr(od, 'dir', 'disks')}/{od.name}")
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
    """Plugin entry point for the mount daemon; returns the function that stops the monitor.
    The front end keeps it as ``key_monitor`` (status and metrics read its per-disk state)."""
    mon = KeyMonitor(fs, st)
    fs.key_monitor = mon
    return mon.start()
