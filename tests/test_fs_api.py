"""The FUSE operations object (mount/fusepy_fs.DiskFS) called directly, without a kernel.

As s3ql's t3_fs_api.py does: most semantics of the mount (tree, sizes, modes,
open/read/write/fallocate/truncate/release, the one errno boundary, the catalog
TTL, status snapshots) are checked here in milliseconds, and tests/fuse/ checks
that the kernel sees the same through /dev/fuse.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import time

import fuse
import pytest

from blockcrypt.control import disks, settings
from blockcrypt.format import layout
from blockcrypt.mount import fusepy_fs, tree
from blockcrypt.mount.fusepy_fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, DiskFS

MiB = 1 << 20


@pytest.fixture
def fs(state):
    disks.create(state, "a", 8 * MiB)
    disks.create(state, "b", 4 * MiB, sector_size=512)
    settings.set_(state, "xattrs", "true")   # served only with the setting on (read at mount time)
    ops = DiskFS(state)
    yield ops
    ops.close_all()


def _errno(fs, op, *args) -> int:
    with pytest.raises(fuse.FuseOSError) as ei:
        fs(op, *args)
    return ei.value.errno


def test_tree_sizes_and_modes(fs):
    assert stat.S_ISDIR(fs("getattr", "/")["st_mode"])
    assert stat.S_ISDIR(fs("getattr", "/disks")["st_mode"])
    assert fs("readdir", "/", fusepy_fs.DiskFS._DIR_ROOT) == [".", "..", "disks"]
    assert sorted(fs("readdir", "/disks", fs("opendir", "/disks"))[2:]) == ["a", "b"]
    st = fs("getattr", "/disks/a")
    assert stat.S_ISREG(st["st_mode"]) and stat.S_IMODE(st["st_mode"]) == 0o600
    assert st["st_size"] == 8 * MiB
    assert _errno(fs, "getattr", "/disks/nope") == errno.ENOENT
    assert _errno(fs, "getattr", "/other") == errno.ENOENT


def test_read_write_any_range_and_reopen(fs):
    fh = fs("open", "/disks/b", os.O_RDWR)
    assert fs("read", None, 4096, 0, fh) == bytes(4096)  # a new disk reads as zeros
    assert fs("write", None, b"hello world", 1000, fh) == 11
    assert fs("read", None, 20, 995, fh) == bytes(5) + b"hello world" + bytes(4)
    fs("fsync", None, 0, fh)
    fs("release", None, fh)
    fh = fs("open", "/disks/b", os.O_RDONLY)
    assert fs("read", None, 11, 1000, fh) == b"hello world"
    fs("release", None, fh)


def test_handles_share_one_volume_and_the_last_release_closes_it(fs):
    h1 = fs("open", "/disks/a", os.O_RDWR)
    h2 = fs("open", "/disks/a", os.O_RDONLY)
    assert [d["openHandles"] for d in fs.disk_status()["disks"]] == [2]
    fs("release", None, h1)
    assert [d["openHandles"] for d in fs.disk_status()["disks"]] == [1]
    fs("release", None, h2)
    assert fs.disk_status()["disks"] == []


def test_errno_boundary(fs, state):
    fh = fs("open", "/disks/a", os.O_RDWR)
    assert _errno(fs, "write", None, b"x", 8 * MiB, fh) == errno.EFBIG        # at the end
    assert fs("write", None, b"y" * 300, 8 * MiB - 100, fh) == 100              # across it: clipped
    assert fs("read", None, 200, 8 * MiB - 100, fh) == b"y" * 100
    assert _errno(fs, "truncate", None, 4 * MiB, fh) == errno.EPERM           # resizing is disk resize
    assert fs("truncate", None, 8 * MiB, fh) == 0                              # the same size is fine
    assert _errno(fs, "chmod", "/disks/a", 0o4644) == errno.EPERM             # setuid bits are not kept
    assert _errno(fs, "chmod", None, 0o644) == errno.EPERM                    # fchmod: no path under nopath
    assert _errno(fs, "chmod", "/disks", 0o777) == errno.EPERM
    assert _errno(fs, "setxattr", "/disks/a", "security.x", b"1", 0) == errno.EOPNOTSUPP
    assert _errno(fs, "getxattr", "/disks/a", "user.none") == errno.ENODATA
    assert _errno(fs, "unlink", "/disks/a") == errno.EPERM
    assert _errno(fs, "fallocate", None, 0x40, 0, 4096, fh) == errno.EOPNOTSUPP
    assert _errno(fs, "open", "/disks", os.O_RDONLY) == errno.EISDIR
    fs("release", None, fh)
    # a corrupt header answers EIO for that disk only, and status says why
    rec = state.catalog.get_disk("a")
    with open(rec.path, "r+b") as f:
        for off in (layout.COPY_A_OFF, layout.COPY_B_OFF):
            f.seek(off)
            f.write(bytes(200))
    assert _errno(fs, "open", "/disks/a", os.O_RDWR) == errno.EIO
    failed = [d for d in fs.disk_status()["disks"] if d["state"] == "Corrupt"]  # issue 16: its one state
    assert failed and failed[0]["name"] == "a" and "corrupt" in failed[0]["error"]["message"]
    fh = fs("open", "/disks/b", os.O_RDWR)
    assert fs("write", None, b"ok", 0, fh) == 2
    fs("release", None, fh)


def test_read_only_disk(state):
    disks.create(state, "ro", 1 * MiB, read_only=True)
    ops = DiskFS(state)
    try:
        assert stat.S_IMODE(ops("getattr", "/disks/ro")["st_mode"]) == 0o400
        assert _errno(ops, "open", "/disks/ro", os.O_RDWR) == errno.EROFS
        fh = ops("open", "/disks/ro", os.O_RDONLY)
        assert ops("read", None, 512, 0, fh) == bytes(512)
        ops("release", None, fh)
    finally:
        ops.close_all()


def test_fallocate_punch_and_zero_range_read_zeros_and_free_blocks(fs, state):
    fh = fs("open", "/disks/a", os.O_RDWR)
    fs("write", None, os.urandom(2 * MiB), 0, fh)
    fs("fsync", None, 0, fh)
    blocks_before = fs("getattr", None, fh)["st_blocks"]
    fs("fallocate", None, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, MiB, fh)
    fs("fallocate", None, FALLOC_FL_ZERO_RANGE, MiB + 100, 5000, fh)
    assert fs("read", None, MiB, 4096, fh) == bytes(MiB)
    assert fs("read", None, 5000, MiB + 100, fh) == bytes(5000)
    assert fs("read", None, 1, MiB + 99, fh) != b"" and fs("read", None, 4096, 0, fh) != bytes(4096)
    assert fs("getattr", None, fh)["st_blocks"] < blocks_before - (MiB // 512) // 2
    assert fs("fallocate", None, 0, 0, 4096, fh) == 0                       # allocate inside: no-op
    assert _errno(fs, "fallocate", None, 0, 8 * MiB - 4096, 8192, fh) == errno.EPERM  # would grow
    fs("release", None, fh)


def test_catalog_changes_appear_within_the_ttl(fs, state):
    assert _errno(fs, "getattr", "/disks/new") == errno.ENOENT
    disks.create(state, "new", 1 * MiB)
    time.sleep(fusepy_fs.CATALOG_MISS_TTL_S + 0.05)  # a lookup miss re-reads a listing older than this
    assert fs("getattr", "/disks/new")["st_size"] == 1 * MiB
    fh = fs("open", "/disks/a", os.O_RDONLY)
    disks.resize(state, "a", 16 * MiB)
    time.sleep(fusepy_fs.CATALOG_TTL_S + 0.05)
    fs("readdir", "/disks", fs("opendir", "/disks"))  # refreshes the listing, resizes open volumes
    assert fs("getattr", None, fh)["st_size"] == 16 * MiB
    fs("release", None, fh)
    disks.delete(state, "new")
    time.sleep(fusepy_fs.CATALOG_TTL_S + 0.05)
    assert "new" not in fs("readdir", "/disks", fs("opendir", "/disks"))


def test_an_unexpected_exception_answers_eio_and_is_counted(fs, monkeypatch):
    fh = fs("open", "/disks/a", os.O_RDWR)
    vol = fs._handles[fh].vol

    def boom(*a):
        raise RuntimeError("a bug")

    monkeypatch.setattr(vol, "read", boom)
    assert _errno(fs, "read", None, 4096, 0, fh) == errno.EIO
    d = fs.disk_status()["disks"][0]
    assert d["errors"] == 1 and d["lastError"]["errno"] == "EIO"
    fs("release", None, fh)


def test_status_counts_io(fs):
    fh = fs("open", "/disks/a", os.O_RDWR)
    fs("write", None, b"x" * 8192, 0, fh)
    fs("read", None, 4096, 0, fh)
    (d,) = fs.disk_status()["disks"]
    assert d["io"]["writes"] == 1 and d["io"]["bytesWritten"] == 8192
    assert d["io"]["reads"] == 1 and d["io"]["bytesRead"] == 4096
    assert sum(d["io"]["latencyUsLog2"]) == 2
    fs("release", None, fh)


def test_a_tampered_sector_answers_eio_and_status_counts_it(state, caplog):
    rec = disks.create(state, "dbl", 1 * MiB, double=True)
    ops = DiskFS(state)
    try:
        fh = ops("open", "/disks/dbl", os.O_RDWR)
        ops("write", None, os.urandom(3 * 4096), 0, fh)
        ops("fsync", None, 0, fh)
        with open(rec.path, "r+b") as f:  # one flipped bit in sector 1's stored data
            f.seek(layout.DATA_OFFSET + 4096 + 100)
            b = f.read(1)
            f.seek(layout.DATA_OFFSET + 4096 + 100)
            f.write(bytes([b[0] ^ 1]))
        assert _errno(ops, "read", None, 4096, 4096, fh) == errno.EIO
        assert len(ops("read", None, 4096, 0, fh)) == 4096 and len(ops("read", None, 4096, 8192, fh)) == 4096
        assert _errno(ops, "read", None, 4096, 4096, fh) == errno.EIO
        (d,) = ops.disk_status()["disks"]
        assert d["io"]["integrityErrors"] == 2 and d["io"]["integrityLastSector"] == 1
        ops("release", None, fh)
    finally:
        ops.close_all()
    # logged once by disk and sector, and recorded as an event (no data, no key)
    events = [json.loads(x) for x in (state.path / "logs" / "key-events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["disk"], e["sector"]) for e in events] == [("IntegrityError", "dbl", 1)]
    assert caplog.text.count("disk dbl: sector 1 failed its integrity check") == 1


class _ReadOnlyDisks(tree.Source):
    """A second directory over the same catalog: every disk again, opened read-only (a real
    source, as snapshots/ or temp/ are: the tree serves it beside disks/)."""

    dir = "images"
    watched = False

    def __init__(self, state):
        self.state = state

    def entries(self):
        return {n: tree.Entry(e.name, e.ident, e.size, True, e.backing_path)
                for n, e in tree.CatalogDisks(self.state).entries().items()}

    def open(self, name, *, null_cipher=False, cache="buffered"):
        return disks.open_volume(self.state, name, read_only=True, null_cipher=null_cipher, cache=cache)


def test_a_second_source_is_a_second_directory(state):
    disks.create(state, "a", 8 * MiB)
    ops = DiskFS(state, sources=[_ReadOnlyDisks(state), tree.CatalogDisks(state)])
    try:
        assert ops("readdir", "/", DiskFS._DIR_ROOT) == [".", "..", "disks", "images"]
        assert ops("getattr", "/")["st_nlink"] == 4
        assert ops("readdir", "/images", ops("opendir", "/images"))[2:] == ["a"]
        assert stat.S_IMODE(ops("getattr", "/images/a")["st_mode"]) == 0o400
        assert _errno(ops, "open", "/images/a", os.O_RDWR) == errno.EROFS
        assert _errno(ops, "getattr", "/temp") == errno.ENOENT       # no source: no directory
        w = ops("open", "/disks/a", os.O_RDWR)
        ops("write", "/disks/a", b"x" * 4096, 0, w)
        r = ops("open", "/images/a", os.O_RDONLY)
        assert ops("read", "/images/a", 4096, 0, r) == b"x" * 4096
        st = ops.disk_status()["disks"]
        assert sorted((d["dir"], d["name"], d["readOnly"]) for d in st) == [("disks", "a", False),
                                                                             ("images", "a", True)]
        assert [od.watched for od in ops.open_disks() if od.dir == "images"] == [False]
        for fh, p in ((w, "/disks/a"), (r, "/images/a")):
            ops("release", p, fh)
        assert ops.open_disks() == []
    finally:
        ops.close_all()
    with pytest.raises(ValueError):
        DiskFS(state, sources=[_ReadOnlyDisks(state)])                 # disks/ is always served
    with pytest.raises(ValueError):
        DiskFS(state, sources=[tree.CatalogDisks(state), tree.CatalogDisks(state)])


def test_owner_mode_and_xattrs_are_kept_per_disk(fs, state):
    assert fs("getattr", "/disks/a")["st_mode"] & 0o777 == 0o600
    fs("chmod", "/disks/a", 0o100640)
    fs("chown", "/disks/a", 107, 0xFFFFFFFF)          # -1 from libfuse: the gid stays
    fs("setxattr", "/disks/a", "trusted.libvirt.security.dac", b"+0:+0", 0)
    st = fs("getattr", "/disks/a")
    assert (st["st_mode"] & 0o777, st["st_uid"], st["st_gid"]) == (0o640, 107, 0)
    assert fs("getxattr", "/disks/a", "trusted.libvirt.security.dac") == b"+0:+0"
    assert fs("listxattr", "/disks/a") == ["trusted.libvirt.security.dac"]
    assert fs("getattr", "/disks/b")["st_mode"] & 0o777 == 0o600       # per disk
    assert _errno(fs, "setxattr", "/disks/a", "trusted.libvirt.security.dac", b"x", 1) == errno.EEXIST
    fh = fs("open", "/disks/a", os.O_RDWR)                            # through a handle too
    assert fs("getattr", None, fh)["st_uid"] == 107
    fs("release", None, fh)
    rec = state.catalog.get_disk("a")
    a = state.catalog.get_attrs(rec.disk_id)
    assert (a.mode, a.uid, a.gid) == (0o640, 107, None) and dict(a.xattrs) == {
        "trusted.libvirt.security.dac": b"+0:+0"}
    fs("removexattr", "/disks/a", "trusted.libvirt.security.dac")
    assert fs("listxattr", "/disks/a") == []
    from blockcrypt.control import disks as cdisks
    cdisks.delete(state, "b")
    assert state.catalog.all_attrs().keys() == {rec.disk_id}
    cdisks.delete(state, "a")
    assert state.catalog.all_attrs() == {}                              # a deleted disk's attributes go with it


def test_xattrs_off_answer_enosys(state):
    """The default: the xattr operations answer ENOSYS (the kernel then stops sending them)."""
    disks.create(state, "a", 8 * MiB)
    fs = DiskFS(state)
    try:
        for op, args in (("getxattr", ("/disks/a", "user.x")), ("listxattr", ("/disks/a",)),
                         ("setxattr", ("/disks/a", "user.x", b"1", 0)), ("removexattr", ("/disks/a", "user.x"))):
            assert _errno(fs, op, *args) == errno.ENOSYS, op
    finally:
        fs.close_all()
