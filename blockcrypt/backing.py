"""The backing-store seam: where a volume's bytes live.

A volume reaches its bytes only through this small interface (read at, write
at, punch, flush, size), so that a distributed store (Ceph RADOS objects) can
be added later without touching the volume or the crypto. Today the local
sparse file is the only implementation.

Caveat: offsets here are backing-file offsets (header area included); the
volume adds the data offset.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class LocalFileBacking:
    def __init__(self, path: str, writable: bool = True):
        self.path = path
        self.writable = writable
        self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)

    def read_at(self, off: int, length: int) -> bytes:
        data = os.pread(self.fd, length, off)
        if len(data) < length:  # a short file reads as zeros (holes past EOF)
            data += bytes(length - len(data))
        return data

    def write_at(self, off: int, data) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, off)
            view = view[n:]
            off += n

    def punch(self, off: int, length: int) -> None:
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def flush(self) -> None:
        os.fsync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def set_size(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def allocated_blocks(self) -> int:
        """512-byte blocks the backing file really uses."""
        return os.fstat(self.fd).st_blocks

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def is_enospc(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
