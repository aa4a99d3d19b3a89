"""`qemu-img convert` onto a disk file without `-n`, with the real qemu-img on a real mount.

What qemu-img does to a raw target that exists (strace of qemu-img 7.2 on a mount):
open(O_RDWR|O_CREAT), OFD locks, ftruncate(fd, 0), ftruncate(fd, SIZE), then it writes
only the source's data (a freshly created raw file reads as zeros, so zeros are skipped).
So ftruncate(fd, 0) wipes the disk (it reads as zeros, and keeps its size), and the
ftruncate to the disk's own size that follows is a no-op. Other sizes stay EPERM.
"""
from __future__ import annotations

import errno
import os

import pytest

from blockcrypt.control import disks

from support.fusehelpers import backing_path, need, sh, wait_for

MiB = 1 << 20


def _image(tmp_path, size, fmt="raw"):
    """A source image of ``size`` bytes: a marker every MiB, zeros between."""
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            f.seek(off)
            f.write(b"QEMU-IMG-MARK-%08d" % (off // MiB))
    if fmt == "raw":
        return raw, raw
    out = tmp_path / f"src.{fmt}"
    sh("qemu-img", "convert", "-f", "raw", "-O", fmt, raw, out)
    return out, raw


def test_ftruncate_to_zero_wipes_and_keeps_size(state, mnt, frontend):
    disks.create(state, "d", 8 * MiB)
    p = mnt.disk("d")
    wait_for(p.exists, what="disk file")
    with open(p, "r+b") as f:
        f.write(os.urandom(8 * MiB))
    fd = os.open(p, os.O_RDWR)
    try:
        assert os.pread(fd, 4096, 4 * MiB) != bytes(4096)   # cached in the kernel too
        os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == 8 * MiB
        if frontend == "native":  # the session drops the kernel's cached pages before it answers
            assert os.pread(fd, 8 * MiB, 0) == bytes(8 * MiB)
        with open(p, "rb") as f:  # fusepy: libfuse 2 cannot; a new open drops them (no keep_cache)
            assert f.read() == bytes(8 * MiB)
        os.ftruncate(fd, 8 * MiB)                           # qemu-img's second step: a no-op
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4 * MiB)
    finally:
        os.close(fd)
    with pytest.raises(PermissionError):
        os.truncate(p, 0)          # by path: still refused (no shell redirection wipes a disk)
    with pytest.raises(PermissionError):
        open(p, "wb")              # O_TRUNC: the same
    assert os.stat(p).st_size == 8 * MiB
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            os.ftruncate(fd, 0)    # a read-only descriptor: the kernel refuses
        assert ei.value.errno in (errno.EINVAL, errno.EBADF)
    finally:
        os.close(fd)
    # the wipe reached the backing file: the data area is holes again
    assert os.stat(backing_path(state, "d")).st_blocks * 512 < 2 * MiB


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_img_convert_without_n(state, mnt, tmp_path, fmt):
    need("qemu-img")
    size = 16 * MiB
    src, raw = _image(tmp_path, size, fmt)
    disks.create(state, "vm", size)
    p = mnt.disk("vm")
    wait_for(p.exists, what="disk file")
    with open(p, "r+b") as f:  # old content where the image has zeros must not survive
        f.write(b"\xee" * size)
    for cache in ("none", "writeback"):  # O_DIRECT and buffered
        r = sh("qemu-img", "convert", "-f", fmt, "-O", "raw", "-t", cache, src, p, check=False)
        assert r.returncode == 0, r.stderr
        with open(p, "rb") as f:
            assert f.read() == raw.read_bytes()
        assert sh("qemu-img", "compare", "-f", fmt, "-F", "raw", src, p).returncode == 0
    assert os.stat(p).st_size == size
    backing = backing_path(state, "vm").read_bytes()
    assert b"QEMU-IMG-MARK" not in backing and b"\xee" * 4096 not in backing


def test_qemu_img_convert_other_size_is_refused_clearly(state, mnt, tmp_path):
    need("qemu-img")
    src, _ = _image(tmp_path, 4 * MiB)
    disks.create(state, "big", 8 * MiB)
    p = mnt.disk("big")
    wait_for(p.exists, what="disk file")
    r = sh("qemu-img", "convert", "-f", "raw", "-O", "raw", src, p, check=False)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    assert os.stat(p).st_size == 8 * MiB
