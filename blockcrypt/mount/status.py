"""What both front ends share with the daemon: the status of their disks, and the
interface the key monitor and the status file use (``open_disks``,
``notify_changed``, ``disk_status``).

A front end keeps ``_open`` (open disks: objects with ``name``, ``disk_id``,
``vol``, ``opened``), ``_failed`` (name -> the last open failure), ``_lock`` and
``_on_change``, and says how many handles and errors a disk has (``_counts``).

Caveat: no key material in any of it: key errors appear by reason and message.
"""
from __future__ import annotations

import logging

from ..volume import io_counters

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

    def disk_status(self) -> dict:
        """The state of this mount's disks, for `blockcrypt status` (no key material)."""
        with self._lock:
            opened = list(self._open.values())
            failed = dict(self._failed)
        disks = []
        for od in opened:
            vol = od.vol
            kerr = vol.key_error
            handles, errors, last_error = self._counts(od)
            disks.append({"name": od.name, "id": od.disk_id, "state": "open" if kerr is None else "KeyUnavailable",
                          "keyError": None if kerr is None else {
                              "reason": getattr(kerr, "reason", type(kerr).__name__), "message": str(kerr)},
                          "cipher": vol.cipher_name, "readOnly": bool(vol.read_only),
                          "sizeBytes": vol.size, "openHandles": handles, "openedAt": od.opened,
                          "io": io_counters(vol), "errors": errors, "lastError": last_error})
        for name, f in sorted(failed.items()):
            disks.append({"name": name, "state": "failed", "error": f})
        return {"disks": disks}
