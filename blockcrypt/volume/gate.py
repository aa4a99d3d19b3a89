"""The revocation gate of a Python volume: what stands in for the sector layer
while a disk's key is revoked (every I/O raises the reason).

Caveat: the old layer is wiped by the volume after the swap; a request that took
the old layer just before the swap may still finish with it (the native engine's
gate waits for requests in flight instead).
"""
from __future__ import annotations


class KeyGone:
    """Stands in for the sector cipher while a disk's key is revoked: every I/O raises the reason."""

    algorithm = "none"

    def __init__(self, err, sector_size):
        self.err = err
        self.sector_size = sector_size

    def encrypt(self, data, sector_no):
        raise self.err

    decrypt = encrypt

    def wipe(self):
        pass
