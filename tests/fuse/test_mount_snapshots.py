"""Snapshots and images through a real mount (both front ends): ext4 on a disk, a snapshot
taken while it is mounted, more writes; the snapshot (snapshots/<name>, a read-only loop
device) fsck-clean with the old files; a disk from the snapshot with the old content that
diverges; snapshot diff against what fio wrote; kill -9 of the daemon during O_DIRECT writes
to a disk with snapshots, 10 rounds; the space a snapshot costs grows with the changes."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import time

from blockcrypt.control import disks

from support.fusehelpers import bc, bc_json, loopdev, mounted_fs, need, sh, wait_for

from test_mount_double import kill9_during_direct_writes
from test_mount_tools import _sums, _tree

MiB = 1 << 20


def test_ext4_snapshot_while_mounted_then_clone_diverges(state, mnt, root):
    need("losetup", "mkfs.ext4", "fsck.ext4", "fsfreeze")
    disks.create(state, "vm", 128 * MiB)
    wait_for(lambda: mnt.disk("vm").exists(), what="disk listed")
    marker = b"OLD-" + os.urandom(8).hex().encode()
    with loopdev(mnt.disk("vm")) as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted_fs(dev, root / "fs") as fs:
            old = _tree(fs, marker)
            sh("fsfreeze", "-f", fs)  # application-consistent: ext4 flushed and quiet
            try:
                s = bc_json(state, "snapshot", "create", "vm", "s1")
            finally:
                sh("fsfreeze", "-u", fs)
            assert s["kind"] == "snapshot" and s["creationData"]["sourceResourceId"] == "/disks/vm"
            # more writes after the snapshot: new files, changed and deleted old ones
            new = _tree(fs / "after", b"NEW-", seed=11)
            victims = sorted(old)[:30]
            for rel in victims[:15]:
                (fs / rel).write_bytes(b"changed")
            for rel in victims[15:]:
                (fs / rel).unlink()
            now = _sums(fs)
    assert now != old and len(new) > 0
    snap = mnt.mp / "snapshots" / "s1"
    wait_for(snap.exists, what="snapshots/s1 listed")
    assert not os.access(snap, os.W_OK) or os.stat(snap).st_mode & 0o222 == 0
    with loopdev(snap, "--read-only") as dev:
        r = sh("fsck.ext4", "-n", "-f", dev, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        with mounted_fs(dev, root / "snapfs", "-o", "ro,noload") as fs:
            assert _sums(fs) == old
    # a disk from the snapshot: the old content, then its own life
    bc(state, "disk", "create", "clone", "--source", "s1")
    wait_for(lambda: mnt.disk("clone").exists(), what="disks/clone listed")
    with loopdev(mnt.disk("clone")) as dev:
        with mounted_fs(dev, root / "clonefs") as fs:
            assert _sums(fs) == old
            (fs / "clone-only.bin").write_bytes(b"mine")
            for rel in sorted(old)[-5:]:
                (fs / rel).write_bytes(b"clone changed")
            clone_now = _sums(fs)
    with loopdev(mnt.disk("vm")) as dev:
        r = sh("fsck.ext4", "-n", "-f", dev, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        with mounted_fs(dev, root / "fs", "-o", "ro") as fs:
            assert _sums(fs) == now  # the disk is untouched by the clone
    with loopdev(snap, "--read-only") as dev:
        with mounted_fs(dev, root / "snapfs", "-o", "ro,noload") as fs:
            assert _sums(fs) == old  # and the snapshot by both
    with loopdev(mnt.disk("clone")) as dev:
        with mounted_fs(dev, root / "clonefs", "-o", "ro") as fs:
            assert _sums(fs) == clone_now
    # an image from the snapshot shows under images/, as a disk made from it boots the old tree
    bc(state, "image", "create", "golden", "--source", "s1")
    wait_for(lambda: (mnt.mp / "images" / "golden").exists(), what="images/golden listed")
    with loopdev(mnt.mp / "images" / "golden", "--read-only") as dev:
        with mounted_fs(dev, root / "imgfs", "-o", "ro,noload") as fs:
            assert _sums(fs) == old


def test_snapshot_diff_matches_what_fio_wrote(state, mnt, root):
    need("fio")
    disks.create(state, "f", 64 * MiB)
    wait_for(lambda: mnt.disk("f").exists(), what="disk listed")
    bc(state, "snapshot", "create", "f", "before")
    regions = [(3 * MiB, MiB), (20 * MiB + 4096 * 3, 8192), (50 * MiB, 256 * 1024)]
    for i, (off, size) in enumerate(regions):
        r = subprocess.run(["fio", "--name", f"w{i}", f"--filename={mnt.disk('f')}", "--rw=write", "--bs=4k",
                            f"--offset={off}", f"--size={size}", "--direct=1", "--ioengine=psync",
                            "--fsync_on_close=1", "--output-format=json"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    bc(state, "snapshot", "create", "f", "after")
    d = bc_json(state, "snapshot", "diff", "before", "after")
    chunk = d["chunkBytes"]
    want = set()
    for off, size in regions:
        want |= set(range(off // chunk, (off + size - 1) // chunk + 1))
    got = set()
    for x in d["changedRanges"]:
        got |= set(range(x["offset"] // chunk, (x["offset"] + x["length"] - 1) // chunk + 1))
    assert got == want


def _space(state, name) -> int:
    return os.stat(state.catalog.get_disk(name).path).st_blocks * 512


def test_space_grows_with_the_changes_not_the_disk(state, mnt):
    disks.create(state, "big", 64 << 30)  # 64 GiB, sparse
    wait_for(lambda: mnt.disk("big").exists(), what="disk listed")
    fd = os.open(mnt.disk("big"), os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(32 * MiB), 5 << 30)
        os.fsync(fd)
        t0 = time.monotonic()
        bc(state, "snapshot", "create", "big", "s")  # while the disk is open in the mount
        dt = time.monotonic() - t0
        assert _space(state, "big") < 256 * 1024  # the new top: a header
        os.pwrite(fd, os.urandom(2 * MiB), 40 << 30)
        os.fsync(fd)
    finally:
        os.close(fd)
    grown = _space(state, "big")
    assert 2 * MiB <= grown < 3 * MiB, grown
    assert bc_json(state, "snapshot", "show", "s")["spaceUsedBytes"] >= 32 * MiB
    assert dt < 5, f"snapshot create took {dt:.2f} s (CLI start included)"


def test_kill9_during_direct_writes_with_snapshots_rounds(state, mnt):
    """A snapshot before each round, kill -9 of the daemon during O_DIRECT writes: every
    fsync-acknowledged block intact, no EIO; every snapshot keeps reading what it read."""
    disks.create(state, "k", 8 * MiB)
    wait_for(lambda: mnt.disk("k").exists(), what="disk listed")
    snap_sums = {}
    rounds = 10
    for r in range(rounds):
        fd = os.open(mnt.disk("k"), os.O_RDONLY)
        try:
            want = hashlib.sha256(os.pread(fd, 8 * MiB, 0)).hexdigest()
        finally:
            os.close(fd)
        bc(state, "snapshot", "create", "k", f"r{r}")
        snap_sums[f"r{r}"] = want
        kill9_during_direct_writes(mnt, r, 150 + 97 * r)
    for name, want in snap_sums.items():
        p = mnt.mp / "snapshots" / name
        wait_for(p.exists, what=f"snapshots/{name}")
        with open(p, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == want, name
    assert len(json.loads(bc(state, "snapshot", "list", "--json").stdout)) == rounds


def test_snapshots_of_an_open_disk_in_a_row_lose_no_unflushed_write(state, mnt):
    """Writes without fsync between snapshots of a disk held open: each snapshot switch flushes
    the old top first and reads its bitmap after, so no write goes missing from the disk or the
    snapshots (the second switch puts the first top, with bits only in memory, under the new one)."""
    disks.create(state, "live", 16 * MiB)
    wait_for(lambda: mnt.disk("live").exists(), what="disk listed")
    fd = os.open(mnt.disk("live"), os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 64 * 1024)
    views = {}
    model = bytearray(16 * MiB)
    try:
        for k in range(4):
            for j in range(40):
                off = ((k * 977 + j * 7919) % 256) * 64 * 1024
                data = hashlib.sha256(f"{k}-{j}".encode()).digest() * 2048
                buf[:] = data
                os.pwritev(fd, [buf], off)  # no fsync: copied-up chunks' bits only in memory
                model[off:off + len(data)] = data
            bc(state, "snapshot", "create", "live", f"v{k}")
            views[f"v{k}"] = hashlib.sha256(model).hexdigest()
        got = mmap.mmap(-1, 16 * MiB)
        assert os.preadv(fd, [got], 0) == 16 * MiB
        assert bytes(got) == bytes(model)
        got.close()
    finally:
        os.close(fd)
        buf.close()
    for name, want in views.items():
        p = mnt.mp / "snapshots" / name
        wait_for(p.exists, what=name)
        with open(p, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == want, name
