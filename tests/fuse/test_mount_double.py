"""A double-encrypted disk (AES-256-XTS over XChaCha20-Poly1305) through a real mount: ext4 +
fsck, fio with verification, a flipped bit in data / nonce / tag answering EIO for exactly that
sector, a sector copied from another offset answering EIO, and kill -9 of the daemon during
O_DIRECT writes (every fsync-acknowledged block intact, no EIO anywhere)."""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import subprocess
import sys
import textwrap
import time

import pytest

from blockcrypt.control import disks
from blockcrypt.format import layout

from support.fusehelpers import backing_path, bc_json, loopdev, mounted_fs, need, sh, wait_for

from test_mount_tools import FIO_JOB, _sums, _tree

MiB = 1 << 20
SS = 4096
META = layout.AEAD_META_BYTES


def flip(path, off, mask=0x20):
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ mask]))
        f.flush()
        os.fsync(f.fileno())


def read_direct(path, off, n=SS):
    """pread with O_DIRECT (no page cache of the FUSE file between us and the engine)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, n)
    try:
        got = os.preadv(fd, [buf], off)
        return bytes(buf[:got])
    finally:
        os.close(fd)
        buf.close()


def test_ext4_fsck_and_fio_verify_on_a_double_disk(state, mnt, root):
    need("losetup", "mkfs.ext4", "fsck.ext4", "fio")
    disks.create(state, "dd", 128 * MiB, double=True)
    assert bc_json(state, "disk", "show", "dd")["encryption"]["doubleEncryption"] is True
    marker = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    wait_for(lambda: mnt.disk("dd").exists(), what="disk listed")
    with loopdev(mnt.disk("dd")) as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted_fs(dev, root / "fs") as fs:
            want = _tree(fs, marker)
    with loopdev(mnt.disk("dd")) as dev:
        r = sh("fsck.ext4", "-n", "-f", dev, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        with mounted_fs(dev, root / "fs", "-o", "ro") as fs:
            assert _sums(fs) == want
    with open(backing_path(state, "dd"), "rb") as f:
        f.seek(layout.DATA_OFFSET)
        assert marker not in f.read(128 * MiB)
    disks.create(state, "f", 96 * MiB, double=True)
    wait_for(lambda: mnt.disk("f").exists(), what="disk listed")
    job = root / "verify.fio"
    job.write_text(FIO_JOB.format(disk=mnt.disk("f"), engine="libaio", depth=8, size="16M",
                                  seq_off=32 * MiB, small_off=80 * MiB))
    r = subprocess.run(["fio", "--output-format=json", str(job)], capture_output=True, text=True,
                       timeout=300, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout[r.stdout.index("{"):])
    for j in res["jobs"]:
        assert j["error"] == 0, j
        assert j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0, j["jobname"]


def _closed(state, name) -> bool:
    st = bc_json(state, "status", codes=(0, 52))
    return not [d for m in st["mounts"] for d in m["disks"] if d["name"] == name and "openHandles" in d]


@pytest.mark.parametrize("where", ["data", "nonce", "tag", "moved"])
def test_tampered_sector_is_eio_for_exactly_that_sector(state, mnt, where):
    disks.create(state, "t", 4 * MiB, double=True)
    wait_for(lambda: mnt.disk("t").exists(), what="disk listed")
    data = os.urandom(64 * SS)
    with open(mnt.disk("t"), "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    bpath = backing_path(state, "t")
    k = 17
    # tampering at rest: once the mount has closed the disk (its metadata journal checkpointed
    # into the table); an open disk keeps the metadata it logged in memory (docs/FORMAT.md)
    wait_for(lambda: _closed(state, "t"), what="the disk closed by the mount")
    if where == "moved":  # sector 5 (data + metadata) copied over sector 17
        with open(bpath, "r+b") as f:
            f.seek(layout.DATA_OFFSET + 5 * SS)
            d = f.read(SS)
            f.seek(layout.META_AREA_OFFSET + 5 * META)
            m = f.read(META)
            f.seek(layout.DATA_OFFSET + k * SS)
            f.write(d)
            f.seek(layout.META_AREA_OFFSET + k * META)
            f.write(m)
    else:
        off = {"data": layout.DATA_OFFSET + k * SS + 999, "nonce": layout.META_AREA_OFFSET + k * META + 8 + 11,
               "tag": layout.META_AREA_OFFSET + k * META + 32 + 1}[where]
        flip(bpath, off)
    keep = os.open(mnt.disk("t"), os.O_RDONLY)  # the volume stays open: status shows its counters
    with pytest.raises(OSError) as e:
        read_direct(mnt.disk("t"), k * SS)
    for n in (k - 1, k + 1, 0, 63):
        assert read_direct(mnt.disk("t"), n * SS) == data[n * SS:(n + 1) * SS]
    with pytest.raises(OSError):
        read_direct(mnt.disk("t"), k * SS)  # again: counted, not logged again
    # logged once with the disk and the sector's number, and recorded as an event
    line = f"disk t: sector {k} failed its integrity check"
    wait_for(lambda: line in "".join(p.read_text() for p in (state.path / "logs").glob("mount*.log*")),
             what="the integrity error logged")
    logs = "".join(p.read_text() for p in (state.path / "logs").glob("mount*.log*"))
    assert logs.count(line) == 1, logs[-2000:]
    events = [json.loads(x) for x in (state.path / "logs" / "key-events.jsonl").read_text().splitlines()]
    bad = [ev for ev in events if ev["event"] == "IntegrityError"]
    assert [(ev["disk"], ev["sector"]) for ev in bad] == [("t", k)]
    st = bc_json(state, "status", codes=(52,))  # issue 16: a disk with tampered sectors is Corrupt
    (d,) = [d for m in st["mounts"] for d in m["disks"] if d["name"] == "t"]
    assert d["io"]["integrityErrors"] == 2 and d["io"]["integrityLastSector"] == k
    assert d["state"] == "Corrupt" and d["integrityErrors"] == 2 and st["exitCode"] == 52
    os.close(keep)
    if where != "moved":  # the bit flipped back: the sector serves again
        wait_for(lambda: _closed(state, "t"), what="the disk closed by the mount")
        flip(bpath, off)
        assert read_direct(mnt.disk("t"), k * SS) == data[k * SS:(k + 1) * SS]
    assert e.value.errno == errno.EIO


WRITER = textwrap.dedent("""
    import mmap, os, sys, hashlib
    path, seed = sys.argv[1], sys.argv[2].encode()
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    i = 0
    try:
        while True:
            n = (i * 7919) % 2048  # revisits blocks: overwrites of earlier records
            buf[:] = hashlib.sha256(seed + b"%d" % i).digest() * 128
            os.pwritev(fd, [buf], n * 4096)
            i += 1
            if i % 16 == 0:
                os.fsync(fd)
                print(i, flush=True)
    except OSError as e:
        print("stopped", e.errno, flush=True)
""")


def kill9_during_direct_writes(mnt, r: int, target: int) -> None:
    """Round ``r`` of a kill -9 of the daemon during O_DIRECT writes to disks/k: WRITER (seed
    ``round{r}-``) writes until ``target`` records are fsync-acknowledged, the daemon is killed and
    mounted again; then every block reads (no EIO after the kill) and holds its newest acknowledged
    record, or a later, unacknowledged one of the same block."""
    seed = f"round{r}-"
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt.disk("k")), seed], stdout=subprocess.PIPE,
                         text=True)
    try:
        acked = 0
        deadline = time.monotonic() + 20
        while acked < target and time.monotonic() < deadline:
            line = w.stdout.readline()
            if line.strip().isdigit():
                acked = int(line)
        assert acked >= target
        mnt.kill9()
        for line in w.stdout:
            if line.strip().isdigit():
                acked = int(line)
    finally:
        w.kill()
        w.wait()
    mnt.start()
    wait_for(lambda: mnt.disk("k").exists(), what="disk listed")
    last = {}
    for i in range(acked):
        last[(i * 7919) % 2048] = i
    fd = os.open(mnt.disk("k"), os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 8 * MiB)
    try:
        assert os.preadv(fd, [buf], 0) == 8 * MiB  # every block reads: no EIO after the kill
        blob = bytes(buf)
    finally:
        os.close(fd)
        buf.close()
    for n, i in last.items():
        got = blob[n * 4096:(n + 1) * 4096]
        ok = got == hashlib.sha256(f"{seed}{i}".encode()).digest() * 128
        if not ok:  # a later, unacknowledged record of the same block may have landed
            later = [j for j in range(i + 1, i + 64) if (j * 7919) % 2048 == n]
            ok = any(got == hashlib.sha256(f"{seed}{j}".encode()).digest() * 128 for j in later)
        assert ok, f"round {r}: block {n} lost its acknowledged record {i}"


def test_kill9_during_direct_writes_rounds_no_eio(state, mnt):
    disks.create(state, "k", 8 * MiB, double=True)
    wait_for(lambda: mnt.disk("k").exists(), what="disk listed")
    for r in range(10):
        kill9_during_direct_writes(mnt, r, 200 + 97 * r)  # kill at a different point each round
