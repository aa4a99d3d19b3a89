"""An open disk: read and write any byte range of its plaintext.

A request becomes one sector span (format.sector_span), one backing read or
write, and one call into the sector cipher for the whole span (no per-sector
Python loop). Unaligned writes read-modify-write their first and last sectors
under a lock that covers exactly the touched sectors, so overlapping requests
serialize and disjoint ones run in parallel.

Caveats: the DEK lives only inside the sector cipher (wiped on close or
revocation); a disk whose header is corrupt does not open (the caller answers
EIO for that disk only); the null cipher exists for benchmarks and writes
plaintext into the disk file.
"""
from __future__ import annotations

import errno
import threading
from contextlib import contextmanager

from .backing import LocalFileBacking, is_enospc
from .crypto import NullCipher, open_sector_cipher
from .disks import unwrap_layer
from .errors import CorruptHeader, NoSpace, OutOfRange, ReadOnly
from .format import ROLE_DATA, read_header, sector_span


class RangeLock:
    """Exclusive locks on half-open sector ranges; disjoint ranges do not wait for each other.

    ``acquire`` returns a token for ``release``; the uncontended path is one lock
    round trip and a scan of the (short) list of ranges held now."""

    def __init__(self):
        self._cv = threading.Condition(threading.Lock())
        self._held: list[tuple[int, int]] = []
        self._waiting = 0

    def acquire(self, start: int, end: int) -> tuple[int, int]:
        item = (start, end)
        with self._cv:
            held = self._held
            while held and any(s < end and start < e for s, e in held):
                self._waiting += 1
                try:
                    self._cv.wait()
                finally:
                    self._waiting -= 1
            held.append(item)
        return item

    def release(self, item: tuple[int, int]) -> None:
        with self._cv:
            self._held.remove(item)
            if self._waiting:
                self._cv.notify_all()

    @contextmanager
    def hold(self, start: int, end: int):
        item = self.acquire(start, end)
        try:
            yield
        finally:
            self.release(item)


class _KeyGone:
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


class Volume:
    def __init__(self, rec, backing, header, cipher):
        self.name = rec.name
        self.disk_id = rec.disk_id
        self.path = rec.path
        self.kind = rec.kind
        self.read_only = bool(header.read_only)
        self.sector_size = header.sector_size
        self.data_off = header.data_offset
        self.cipher_name = cipher.algorithm
        self._size = header.size
        self._backing = backing
        self._cipher = cipher
        self._locks = RangeLock()
        self._closed = False

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, st, name: str, *, null_cipher: bool = False, read_only: bool = False) -> "Volume":
        rec = st.catalog.get_disk(name)
        writable = not (read_only or rec.read_only)
        try:
            backing = LocalFileBacking(rec.path, writable=writable)
        except FileNotFoundError:
            raise CorruptHeader(name=name, why=f"disk file {rec.path} is missing") from None
        try:
            header = read_header(backing.fd, name, repair=writable)
            if header.disk_id.hex() != rec.disk_id:
                raise CorruptHeader(name=name, why="the disk file belongs to another disk id")
            if null_cipher:
                cipher = NullCipher(b"", header.sector_size)
            else:
                dek = unwrap_layer(st, header, ROLE_DATA)
                try:
                    cipher = open_sector_cipher(header.layer(ROLE_DATA).data_alg, dek, header.sector_size)
                finally:
                    del dek
        except BaseException:
            backing.close()
            raise
        vol = cls(rec, backing, header, cipher)
        vol.read_only = not writable
        return vol

    @property
    def size(self) -> int:
        return self._size

    # -- key availability (revocation) ------------------------------------------------
    @property
    def key_error(self):
        """The KeyError_ that stopped this disk, or None while its key is available."""
        c = self._cipher
        return c.err if isinstance(c, _KeyGone) else None

    def revoke(self, err) -> None:
        """Stop serving I/O: wipe the DEK from memory; every request now raises ``err``."""
        old, self._cipher = self._cipher, _KeyGone(err, self.sector_size)
        old.wipe()

    def restore(self, st) -> None:
        """Unwrap the DEK again (the key is back) and serve I/O again."""
        header = read_header(self._backing.fd, self.name)
        dek = unwrap_layer(st, header, ROLE_DATA)
        try:
            cipher = open_sector_cipher(header.layer(ROLE_DATA).data_alg, dek, header.sector_size)
        finally:
            del dek
        self._cipher = cipher

    def refresh(self) -> None:
        """Re-read the header (after `disk resize` elsewhere)."""
        self._size = read_header(self._backing.fd, self.name).size

    # -- I/O -------------------------------------------------------------------------
    def read(self, plain_off: int, length: int) -> bytes:
        size = self._size
        if plain_off < 0 or length < 0:
            raise ValueError("negative offset or length")
        if plain_off >= size or length == 0:
            return b""
        length = min(length, size - plain_off)
        ss = self.sector_size
        first, count = sector_span(plain_off, length, ss)
        locks = self._locks
        token = locks.acquire(first, first + count)
        try:
            ct = self._backing.read_at(self.data_off + first * ss, count * ss)
        finally:
            locks.release(token)
        pt = self._cipher.decrypt(ct, first)
        head = plain_off - first * ss
        if head == 0 and length == len(pt):
            return pt
        return pt[head:head + length]

    def _read_sectors(self, first: int, count: int) -> bytes:
        ss = self.sector_size
        return self._cipher.decrypt(self._backing.read_at(self.data_off + first * ss, count * ss), first)

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
        first, count = sector_span(plain_off, n, ss)
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
                self._backing.write_at(self.data_off + first * ss, ct)
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
                self._backing.punch(self.data_off + first_full * ss, (end_full - first_full) * ss)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                # no hole punching on this file system: write zero sectors (they read as zeros too)
                self._backing.write_at(self.data_off + first_full * ss,
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
