"""What both front ends share with the daemon: the status of their disks, and the
interface the key monitor and the status file use (``open_disks``,
``notify_changed``, ``disk_status``).

A front end keeps ``_open`` (open disks: objects with ``name``, ``dir``,
``disk_id``, ``vol``, ``opened``, ``watched``), ``_failed`` ("<dir>/<name>" -> the
last open failure), ``_lock`` and
``_on_change``, and says how many handles and errors a disk has (``_counts``).

Caveat: no key material in any of it: key errors appear by reason and message.
"""
from __future__ import annotations

import logging
import time

from ..volume import io_counters
from .tree import split

log = logging.getLogger("blockcrypt.mount")


class FrontEndStatus:
    def open_disks(self) -> list:
        """The open disks now (for a key checker that revokes/restores volumes; call
        :meth:`notify_changed` afterwards)."""
        with self._lock:
            return list(self._open.values())

    def drop_cache(self, name: str) -> None:
        """Make the kernel drop the cached pages of disk ``name`` (after a revocation); a front
        end that cannot (fusepy: no notify API) does nothing."""

    def notify_changed(self) -> None:
        """Rewrite the status registry entry (after a revoke/restore)."""
        self._changed()

    def _changed(self) -> None:
        try:
            self._on_change(self)
        except Exception:
            log.exception("status update failed")

    def _counts(self, od) -> tuple[int, int, dict | None]:
        """(open handles, errors answered, the last error as {"errno", "message"} or None)."""
        raise NotImplementedError

    def note_integrity(self, opened=None) -> None:
        """Log once, with its disk and sector number, a sector newly found failing its
        integrity check (double-encrypted disks), and record an ``IntegrityError`` event in
        the key-event log. The engine keeps the last failing sector of each volume, so when
        several sectors fail between two calls only the last is named (all are counted in
        ``status``). Front ends call it now and then and before they close a volume
        (``opened``: just those)."""
        seen = self.__dict__.setdefault("_integrity_seen", {})
        logged = self.__dict__.setdefault("_integrity_logged", set())
        for od in self.open_disks() if opened is None else opened:
            try:
                io = io_counters(od.vol)
            except Exception:  # a volume closing under us
                continue
            key = (getattr(od, "dir", "disks"), od.disk_id)
            n = io["integrityErrors"]
            if n <= seen.get(key, 0):
                continue
            seen[key] = n
            sector = io["integrityLastSector"]
            if (key, sector) in logged:
                continue
            if len(logged) < 100_000:  # bounded: a disk torn apart is not logged sector by sector forever
                logged.add((key, sector))
            log.error("disk %s: sector %s failed its integrity check (changed at rest: tampered with or "
                      "damaged); reads of it answer EIO", od.name, sector)
            from .monitor import record_event
            record_event(self.state, {"event": "IntegrityError", "disk": od.name, "dir": key[0],
                                      "diskId": od.disk_id, "sector": sector, "integrityErrors": n})

    def open_disk_state(self, od, io: dict) -> dict:
        """The one state of an open disk, with what explains it: ``open``; ``KeyUnavailable``
        (keyError: reason, message; ``serving`` false once stopped, true for an on-restart disk
        whose key is revoked); ``Corrupt`` (integrityErrors: sectors that failed their tag);
        ``ServingOnGrace`` (graceSecondsLeft: the key vault does not answer). Plus the key
        monitor's lastKeyCheck (ISO 8601 UTC) for customer-key disks."""
        from .._util.clock import iso_z
        kerr = od.vol.key_error
        mon = getattr(self, "key_monitor", None)
        ki = mon.disk_info(od.disk_id) if mon is not None else None
        out = {"state": "open", "serving": kerr is None, "keyError": None}
        if kerr is not None:
            out.update(state="KeyUnavailable", keyError={"reason": getattr(kerr, "reason", type(kerr).__name__),
                                                         "message": str(kerr)})
        elif ki and ki.get("revokedOnRestart"):
            out.update(state="KeyUnavailable", keyError=dict(ki["revokedOnRestart"]), stopsAt="next mount")
        elif io.get("integrityErrors"):
            out.update(state="Corrupt")
        elif ki and ki.get("graceSecondsLeft") is not None:
            out.update(state="ServingOnGrace", graceSecondsLeft=round(ki["graceSecondsLeft"]),
                       graceEndsAt=iso_z(time.time() + ki["graceSecondsLeft"]),
                       keyError={"reason": "KeyProviderUnavailable",
                                 "message": "the key provider does not answer; serving from the cached key"})
        out["integrityErrors"] = io.get("integrityErrors", 0)
        if ki:
            out["lastKeyCheck"] = iso_z(ki["lastCheck"]) if ki.get("lastCheck") else None
            out["keyId"] = ki.get("keyId")
        return out

    def disk_status(self) -> dict:
        """The state of this mount's disks, for `blockcrypt status` (no key material)."""
        with self._lock:
            opened = list(self._open.values())
            failed = dict(self._failed)
        disks = []
        for od in opened:
            vol = od.vol
            handles, errors, last_error = self._counts(od)
            io = io_counters(vol)
            disks.append({"name": od.name, "dir": getattr(od, "dir", "disks"), "id": od.disk_id,
                          **self.open_disk_state(od, io),
                          "cipher": vol.cipher_name, "readOnly": bool(vol.read_only),
                          "sizeBytes": vol.size, "openHandles": handles, "openedAt": od.opened,
                          "io": io, "errors": errors, "lastError": last_error})
        for path, f in sorted(failed.items()):
            d, name = split(path)
            disks.append({"name": name, "dir": d, "state": failed_state(f), "serving": False, "error": f})
        return {"disks": disks}


#: open failures that mean the disk's data or header is damaged, not its key
CORRUPT_REASONS = ("CorruptHeader", "UnsupportedFormat", "IntegrityError")


def failed_state(f: dict) -> str:
    """The state of a disk that failed to open: Corrupt (its header), KeyUnavailable (its key),
    else ``failed``."""
    reason = f.get("reason") or ""
    if reason in CORRUPT_REASONS:
        return "Corrupt"
    if reason.startswith("Key"):
        return "KeyUnavailable"
    return "failed"
