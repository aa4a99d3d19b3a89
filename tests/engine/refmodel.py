"""A pure-Python reference model of one volume of the C engine, for differential tests.

The plaintext is a bytearray; each sector also carries a "stored" flag: 0 for a hole
(never written, or punched by discard/zero_range/shrink), 1 once a write (or the
read-modify-write of a partial discard edge) has put ciphertext there. With the
reference XTS (pure `cryptography`, blockcrypt.crypto.ReferenceXts) that gives the
exact bytes the backing file must hold: zeros for a hole, otherwise
aes-xts-plain64(plaintext of the sector, sector number).

Same semantics as bc_engine.h: reads are short at the end, writes clipped at the end
and refused at or past it (EFBIG), discard/zero_range clip and zero, shrinking drops
sectors (they read as zeros when the volume grows again).

Caveat: operations on disjoint byte ranges may run from several threads at once (the
flags of a sector shared by two ranges are only ever set to 1 by both); overlapping
ones must be serialised by the caller.
"""
from __future__ import annotations

import errno
import os

from blockcrypt.crypto import ReferenceXts


class RefVolume:
    def __init__(self, size: int, sector_size: int, key: bytes):
        assert size % sector_size == 0
        self.ss = sector_size
        self.size = size
        self.data = bytearray(size)
        self.stored = bytearray(size // sector_size)
        self.xts = ReferenceXts(key, sector_size)

    # -- the operations ------------------------------------------------------------

    def read(self, off: int, length: int) -> bytes:
        if off >= self.size:
            return b""
        return bytes(self.data[off:min(off + length, self.size)])

    def write(self, off: int, data: bytes) -> int:
        if not data:
            return 0
        if off >= self.size:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        n = min(len(data), self.size - off)
        self.data[off:off + n] = data[:n]
        for s in range(off // self.ss, (off + n - 1) // self.ss + 1):
            self.stored[s] = 1
        return n

    def discard(self, off: int, length: int) -> None:
        if off >= self.size or length == 0:
            return
        end = min(off + length, self.size)
        self.data[off:end] = bytes(end - off)
        first_full = -(-off // self.ss)
        last_full = end // self.ss
        if first_full > last_full:          # inside one sector: rewritten, not punched
            self.stored[off // self.ss] = 1
            return
        for s in range(first_full, last_full):
            self.stored[s] = 0
        if off % self.ss:
            self.stored[off // self.ss] = 1
        if end % self.ss:
            self.stored[end // self.ss] = 1

    zero_range = discard

    def resize(self, new_size: int) -> None:
        assert new_size % self.ss == 0
        if new_size < self.size:
            self.data[new_size:] = bytes(len(self.data) - new_size)
            for s in range(new_size // self.ss, len(self.stored)):
                self.stored[s] = 0
        elif new_size > len(self.data):
            self.data += bytes(new_size - len(self.data))
            self.stored += bytes(new_size // self.ss - len(self.stored))
        self.size = new_size

    # -- what the backing file must hold ------------------------------------------

    def expected_sector(self, s: int) -> bytes:
        """The stored bytes of sector s of the data area (within the current size)."""
        if not self.stored[s]:
            return bytes(self.ss)
        return self.xts.encrypt(bytes(self.data[s * self.ss:(s + 1) * self.ss]), s)

    def mismatched_sectors(self, data_area: bytes) -> list[int]:
        """Sectors of the current size whose bytes in data_area differ from the model."""
        bad = []
        for s in range(self.size // self.ss):
            got = data_area[s * self.ss:(s + 1) * self.ss]
            if len(got) < self.ss:
                got = got + bytes(self.ss - len(got))   # past the end of the file: a hole
            if got != self.expected_sector(s):
                bad.append(s)
        return bad
