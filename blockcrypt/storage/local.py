"""The local sparse file: the backing store of every disk today (storage/base.py).

Holes read as zeros; punch is fallocate(PUNCH_HOLE|KEEP_SIZE); flush is fsync;
lock is an exclusive flock (header updates by CLI processes do not interleave);
anything but a regular file is refused with OSError(EINVAL), without blocking
(a FIFO put in place of a disk file);
clone is a reflink (FICLONE) where the file system has one.

Caveat: ext4 has no reflink, so clone raises OSError(EOPNOTSUPP) there; offsets
are backing-file offsets (format/layout.py adds the data offset).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


FICLONE = 0x40049409


class LocalFileBacking:
    def __init__(self, path: str, writable: bool = True, *, create_mode: int | None = None):
        """Open ``path``; with ``create_mode``, create it (exclusively) with that mode."""
        self.path = self.location = str(path)
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        if create_mode is not None:
            flags |= os.O_CREAT | os.O_EXCL
        # non-blocking: a FIFO in place of a disk file must not hang the caller (then refused below)
        self.fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY, 0o600 if create_mode is None else create_mode)
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            os.set_blocking(self.fd, True)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

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

    def lock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def lock_writer(self) -> bool:
        """Take the writer lock the engine takes on a writable open (an OFD write lock on the
        whole file, native/engine/bc_storage_local.c), without waiting; False when another
        writer holds it. Held until close."""
        fl = struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, fl)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def clone(self, dst_location: str) -> "LocalFileBacking":
        dst = LocalFileBacking(dst_location, True, create_mode=0o600)
        try:
            fcntl.ioctl(dst.fd, FICLONE, self.fd)
        except OSError:
            dst.close()
            os.unlink(dst_location)
            raise
        return dst

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_enospc(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
