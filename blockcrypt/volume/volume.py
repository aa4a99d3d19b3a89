"""An open disk: read and write any byte range of its plaintext.

A request becomes one sector span (format.Layout), one backing read or write,
and one call into the sector layer for the whole span (no per-sector Python
loop). Unaligned writes read-modify-write their first and last sectors under a
lock that covers exactly the touched sectors, so overlapping requests serialize
and disjoint ones run in parallel.

A volume is made from an open backing store, the disk's header and its sector
layer; control/disks.py ``open_volume`` does the catalog lookup and the DEK
unwrap that come before.

Caveats: the DEK lives only inside the sector layer (wiped on close or
revocation); the null layer exists for benchmarks and writes plaintext into
the disk file.
"""
from __future__ import annotations

import errno

from ..errors import NoSpace, OutOfRange, ReadOnly
from ..format import Layout, read_header
from ..storage import is_enospc
from .gate import KeyGone
from .rangelock import RangeLock


class Volume:
    def __init__(self, backing, header, cipher, *, name: str | None = None, kind: str | None = None,
                 read_only: bool | None = None):
        self.name = name or header.name
        self.disk_id = header.disk_id_hex
        self.path = backing.location
        self.kind = kind or header.kind
        self.read_only = bool(header.read_only) if read_only is None else bool(read_only)
        self.sector_size = header.sector_size
        self.layout = Layout.of(header)
        self.cipher_name = cipher.algorithm
        self._size = header.size
        self._backing = backing
        self._cipher = cipher
        self._locks = RangeLock()
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    # -- key availability (revocation) ------------------------------------------------
    @property
    def key_error(self):
        """The KeyError_ that stopped this disk, or None while its key is available."""
        c = self._cipher
        return c.err if isinstance(c, KeyGone) else None

    def revoke(self, err) -> None:
        """Stop serving I/O: wipe the DEK from memory; every request now raises ``err``."""
        old, self._cipher = self._cipher, KeyGone(err, self.sector_size)
        old.wipe()

    def header(self):
        """The disk's header as the backing holds it now."""
        return read_header(self._backing, self.name)

    def restore(self, cipher) -> None:
        """Serve I/O again with ``cipher`` (the key is back: the caller unwrapped the DEK)."""
        self._cipher = cipher

    def refresh(self) -> None:
        """Re-read the header (after `disk resize` elsewhere)."""
        self._size = read_header(self._backing, self.name).size

    # -- I/O -------------------------------------------------------------------------
    def read(self, plain_off: int, length: int) -> bytes:
        size = self._size
        if plain_off < 0 or length < 0:
            raise ValueError("negative offset or length")
        if plain_off >= size or length == 0:
            return b""
        length = min(length, size - plain_off)
        ss = self.sector_size
        first, count = self.layout.span(plain_off, length)
        locks = self._locks
        token = locks.acquire(first, first + count)
        try:
            ct = self._backing.read_at(self.layout.sector_off(first), count * ss)
        finally:
            locks.release(token)
        pt = self._cipher.decrypt(ct, first)
        head = plain_off - first * ss
        if head == 0 and length == len(pt):
            return pt
        return pt[head:head + length]

    def _read_sectors(self, first: int, count: int) -> bytes:
        ss = self.sector_size
        return self._cipher.decrypt(self._backing.read_at(self.layout.sector_off(first), count * ss), first)

    def _check_write(self, plain_off: int, length: int) -> None:
        if self.read_only:
            raise ReadOnly(kind=self.kind, name=self.name)
        if plain_off < 0 or length < 0:
            raise ValueError("negative offset or length")
        if plain_off + length > self._size:
            raise OutOfRange(kind=self.kind, name=self.name,
                             msg=f"write past the end of the disk ({plain_off + length} > {self._size} bytes)")

    def write(self, plain_off: int, data) -> int:
        n = len(data)
        self._check_write(plain_off, n)
        if n == 0:
            return 0
        ss = self.sector_size
        first, count = self.layout.span(plain_off, n)
        head = plain_off - first * ss
        end = head + n
        aligned = head == 0 and end % ss == 0
        ct = self._cipher.encrypt(data, first) if aligned else None
        locks = self._locks
        token = locks.acquire(first, first + count)
        try:
            if ct is None:
                buf = bytearray(count * ss)
                if head:
                    buf[0:ss] = self._read_sectors(first, 1)
                if end % ss and (count > 1 or head == 0):
                    buf[(count - 1) * ss:] = self._read_sectors(first + count - 1, 1)
                buf[head:end] = data
                ct = self._cipher.encrypt(buf, first)
            try:
                self._backing.write_at(self.layout.sector_off(first), ct)
            except OSError as e:
                if is_enospc(e):
                    raise NoSpace(name=self.name) from None
                raise
        finally:
            locks.release(token)
        return n

    def discard(self, plain_off: int, length: int) -> None:
        """Punch the range: whole sectors become holes (read as zeros); partial edges are zeroed."""
        self._check_write(plain_off, length)
        if length == 0:
            return
        ss = self.sector_size
        end = plain_off + length
        first_full = -(-plain_off // ss)
        end_full = end // ss
        if first_full >= end_full:  # no whole sector inside: zero the bytes
            self.write(plain_off, bytes(length))
            return
        if plain_off < first_full * ss:
            self.write(plain_off, bytes(first_full * ss - plain_off))
        if end > end_full * ss:
            self.write(end_full * ss, bytes(end - end_full * ss))
        with self._locks.hold(first_full, end_full):
            try:
                self._backing.punch(self.layout.sector_off(first_full), (end_full - first_full) * ss)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                # no hole punching on this file system: write zero sectors (they read as zeros too)
                self._backing.write_at(self.layout.sector_off(first_full),
                                       bytes((end_full - first_full) * ss))

    zero_range = discard

    def flush(self) -> None:
        self._backing.flush()

    def blocks_used(self) -> int:
        return self._backing.allocated_blocks()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only:
                self._backing.flush()
        finally:
            self._cipher.wipe()
            self._backing.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
