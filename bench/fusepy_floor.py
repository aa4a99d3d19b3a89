"""The thinnest fusepy file server: one file, os.pread/os.pwrite, no locks, no crypto.

    python bench/fusepy_floor.py BACKING_FILE MOUNTPOINT     # serves MOUNTPOINT/disk

A calibration system for the benchmarks (``--systems fusepy``): it runs the same
stack as blockcrypt (fusepy 3, libfuse 2, multi-threaded, 128 KiB requests)
with nothing of ours in the request path, so the gap between it and
``null`` is blockcrypt's own Python, and the gap between it and gocryptfs is
the fusepy/libfuse 2/ctypes stack.

Caveats: not a product and not safe for anything but a benchmark file; the
file size is fixed at mount time.
"""
from __future__ import annotations

import errno
import os
import stat
import sys

import fuse


class FloorFS(fuse.Operations):
    def __init__(self, backing: str):
        self.fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path == "/disk":
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": self.size}
        raise fuse.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "disk"]

    def open(self, path, flags):
        if path != "/disk":
            raise fuse.FuseOSError(errno.ENOENT)
        return 1

    def read(self, path, size, offset, fh):
        return os.pread(self.fd, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(self.fd, data, offset)

    def truncate(self, path, length, fh=None):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(self.fd)
        return 0

    getxattr = None  # ENOSYS: the kernel stops asking before every write


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: fusepy_floor.py BACKING_FILE MOUNTPOINT", file=sys.stderr)
        return 2
    fuse.FUSE(FloorFS(argv[0]), argv[1], foreground=True, nothreads=False, big_writes=True,
              max_write=131072, max_read=131072, max_readahead=131072, default_permissions=True,
              fsname="fusepy-floor")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
