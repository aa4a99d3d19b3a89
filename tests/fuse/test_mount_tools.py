"""Real tools on the disk files: ext4 over a loop device, fio with verification,
qemu-img, discard, a daemon killed mid-write, and a full backing file system."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from blockcrypt.control import disks
from blockcrypt.mount import daemon as bmount
from blockcrypt.control.state import State

from support.fusehelpers import (CLI, Mount, assert_clean_logs, backing_path, bc, bc_json, cleanup_tree, loopdev,
                       mounted_fs, need, sh, wait_for)

MiB = 1 << 20


def _tree(where: Path, marker: bytes, seed: int = 7) -> dict:
    rng = random.Random(seed)
    sums = {}
    for i in range(120):
        d = where / f"dir{i % 7}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        n = rng.choice([0, 1, 100, 4095, 4096, 4097, 65536, 300000])
        body = marker + rng.randbytes(n)
        p = d / f"file{i}.bin"
        p.write_bytes(body)
        sums[str(p.relative_to(where))] = hashlib.sha256(body).hexdigest()
    return sums


def _sums(where: Path) -> dict:
    return {str(p.relative_to(where)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in where.rglob("*.bin")}


def test_ext4_tree_survives_remount_fsck_clean_no_plaintext(state, mnt, root):
    need("losetup", "mkfs.ext4", "fsck.ext4")
    disks.create(state, "vm", 128 * MiB)
    marker = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    wait_for(lambda: mnt.disk("vm").exists(), what="disk listed")
    with loopdev(mnt.disk("vm")) as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted_fs(dev, root / "fs") as fs:
            want = _tree(fs, marker)
    mnt.stop()
    raw = backing_path(state, "vm").read_bytes()
    assert marker not in raw and b"lost+found" not in raw
    mnt.start()
    with loopdev(mnt.disk("vm")) as dev:
        r = sh("fsck.ext4", "-n", "-f", dev, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        with mounted_fs(dev, root / "fs", "-o", "ro") as fs:
            assert _sums(fs) == want


FIO_JOB = """
[global]
filename={disk}
ioengine={engine}
verify=crc32c
do_verify=1
verify_fatal=1
verify_backlog=64
verify_state_save=0
group_reporting=0
numjobs=2
size={size}
offset_increment={size}

[rand4k]
rw=randwrite
bs=4k
direct=1
iodepth={depth}
offset=0

[seq1m]
rw=write
bs=1M
offset={seq_off}

[unaligned512]
rw=randwrite
bs=512
direct=1
offset={small_off}
size=2M
offset_increment=2M
"""


def test_fio_verify_crc32c(state, mnt, root):
    need("fio")
    disks.create(state, "f", 96 * MiB)
    wait_for(lambda: mnt.disk("f").exists(), what="disk listed")
    job = root / "verify.fio"
    job.write_text(FIO_JOB.format(disk=mnt.disk("f"), engine="libaio", depth=8, size="16M",
                                  seq_off=32 * MiB, small_off=80 * MiB))
    r = subprocess.run(["fio", "--output-format=json", str(job)], capture_output=True, text=True,
                       timeout=240, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout[r.stdout.index("{"):])
    names = sorted(j["jobname"] for j in res["jobs"])
    assert names == ["rand4k", "rand4k", "seq1m", "seq1m", "unaligned512", "unaligned512"]
    for j in res["jobs"]:
        assert j["error"] == 0, j
        assert j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0, j["jobname"]  # verify reads
    assert os.stat(mnt.disk("f")).st_blocks > 0


def test_qemu_img_convert_and_compare(state, mnt, root):
    need("qemu-img")
    disks.create(state, "q", 64 * MiB)
    src = root / "src.raw"
    sh("qemu-img", "create", "-q", "-f", "raw", src, "64M")
    rng = random.Random(3)
    with open(src, "r+b") as f:  # data islands and holes
        for _ in range(40):
            f.seek(rng.randrange(0, 64 * MiB - 200000))
            f.write(rng.randbytes(rng.randrange(1, 200000)))
    wait_for(lambda: mnt.disk("q").exists(), what="disk listed")
    with open(mnt.disk("q"), "r+b") as f:  # junk where src has holes must be zeroed by convert
        f.write(b"\xff" * (4 * MiB))
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, mnt.disk("q"))
    r = sh("qemu-img", "compare", "-f", "raw", "-F", "raw", src, mnt.disk("q"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # and with O_DIRECT on the target (cache=none)
    sh("qemu-img", "convert", "-n", "-t", "none", "-f", "raw", "-O", "raw", src, mnt.disk("q"))
    r = sh("qemu-img", "compare", "-f", "raw", "-F", "raw", src, mnt.disk("q"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


WRITER = textwrap.dedent("""
    import os, sys, hashlib
    path = sys.argv[1]
    fd = os.open(path, os.O_RDWR)
    i = 0
    try:
        while True:
            blk = hashlib.sha256(b"rec%d" % i).digest() * 128 + b"x" * 333  # 4429 bytes, unaligned
            os.pwrite(fd, blk, i * 4429)
            i += 1
            if i % 8 == 0:
                os.fsync(fd)
                print(i, flush=True)
    except OSError as e:
        print("stopped", e.errno, flush=True)
""")


def test_kill9_during_writes_keeps_fsynced_data_and_headers(state, mnt, root):
    disks.create(state, "k", 64 * MiB)
    wait_for(lambda: mnt.disk("k").exists(), what="disk listed")
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt.disk("k"))], stdout=subprocess.PIPE,
                         text=True)
    try:
        acked = 0
        deadline = time.monotonic() + 20
        while acked < 400 and time.monotonic() < deadline:
            line = w.stdout.readline()
            if line.strip().isdigit():
                acked = int(line)
        assert acked >= 400
        mnt.kill9()
        for line in w.stdout:
            if line.strip().isdigit():
                acked = int(line)  # an fsync acknowledged just before the kill counts too
    finally:
        w.kill()
        w.wait()
    st = bc_json(state, "status", codes=(50,))["mounts"]  # issue 16: a dead mount exits 50
    assert st and st[0]["state"].startswith("dead")
    mnt.start()  # cleans the stale mount of the dead daemon by itself
    assert bc_json(state, "status")["mounts"][0]["state"] == "running"
    with open(mnt.disk("k"), "rb") as f:
        for i in range(acked):
            blk = hashlib.sha256(b"rec%d" % i).digest() * 128 + b"x" * 333
            f.seek(i * 4429)
            assert f.read(4429) == blk, f"record {i} of {acked} fsynced records lost"
    chk = bc_json(state, "disk", "check", "k")
    assert chk["repaired"] == [] and None not in chk["before"].values(), chk


def test_discard_through_a_loop_device_frees_backing_blocks(state, mnt, root):
    need("losetup", "mkfs.ext4", "fstrim", "blkdiscard")
    disks.create(state, "t", 128 * MiB)
    wait_for(lambda: mnt.disk("t").exists(), what="disk listed")
    bpath = backing_path(state, "t")
    with loopdev(mnt.disk("t")) as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted_fs(dev, root / "fs") as fs:
            (fs / "big").write_bytes(os.urandom(48 * MiB))
            sh("sync")
            full = os.stat(bpath).st_blocks
            assert full >= 48 * MiB // 512
            (fs / "big").unlink()
            sh("sync")
            sh("fstrim", fs)
            trimmed = os.stat(bpath).st_blocks
            assert trimmed < full - 40 * MiB // 512, (full, trimmed)
            assert os.stat(mnt.disk("t")).st_blocks == trimmed
        sh("blkdiscard", "-f", dev)
    assert os.stat(bpath).st_blocks * 512 <= 256 * 1024  # the header area at most
    with open(mnt.disk("t"), "rb") as f:
        assert f.read(MiB) == bytes(MiB)


def test_enospc_on_a_full_backing_fs_corrupts_nothing(root):
    small = root / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", small)
    st = None
    try:
        st = State.init(small / "state")
        disks.create(st, "full", 128 * MiB)
        mp = root / "mnt"
        mp.mkdir()
        m = Mount(st, mp).start()
        first = os.urandom(8 * MiB)
        with open(m.disk("full"), "r+b", buffering=0) as f:
            f.write(first)
            os.fsync(f.fileno())
            chunk = os.urandom(MiB)
            with pytest.raises(OSError) as ei:
                for _ in range(128):
                    f.write(chunk)
            assert ei.value.errno == errno.ENOSPC
            f.seek(0)
            assert f.read(8 * MiB) == first  # what was there is intact
        assert bmount._pid_alive(m.pid)
        (entry,) = bc_json(st, "status")["mounts"]
        assert entry["state"] == "running"
        m.stop()  # flush and close with the file system still full
        chk = bc_json(st, "disk", "check", "full")
        assert chk["repaired"] == [] and None not in chk["before"].values(), chk
        m.start()
        with open(m.disk("full"), "rb") as f:
            assert f.read(8 * MiB) == first
        m.stop()
        assert_clean_logs(st)
    finally:
        cleanup_tree(root, st)


def test_many_concurrent_clients_churn_worker_threads_safely(state, mnt, root):
    """More concurrent requests than libfuse keeps idle threads (10): workers come and go."""
    need("fio")
    disks.create(state, "c", 64 * MiB)
    wait_for(lambda: mnt.disk("c").exists(), what="disk listed")

    def rss_kb():
        for line in open(f"/proc/{mnt.pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1])

    cmd = ["fio", "--name=churn", f"--filename={mnt.disk('c')}", "--rw=randwrite", "--bs=4k",
           "--direct=1", "--ioengine=psync", "--numjobs=24", "--size=2M", "--offset_increment=2M",
           "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--group_reporting"]
    rss = []
    for _ in range(3):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
        assert r.returncode == 0 and "err= 0" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        time.sleep(2.5)  # the reaper frees the states of exited workers every 2 s
        rss.append(rss_kb())
    assert bmount._pid_alive(mnt.pid)
    assert rss[-1] - rss[0] < 8 * 1024, f"daemon RSS keeps growing: {rss} kB"


def CLI_ARGS(state):
    return [*CLI, "--state", str(state.path)]


def test_allow_other_and_foreground(state, root):
    disks.create(state, "d", 8 * MiB)
    mp = root / "mnt"
    mp.mkdir()
    p = subprocess.Popen([*CLI_ARGS(state), "mount", str(mp), "--foreground", "--allow-other"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: bmount.FSTYPE in bmount.mounts_at(str(mp)) and (mp / "disks" / "d").exists(),
                 10, "foreground mount")
        st = os.stat(mp / "disks" / "d")
        import grp
        assert oct(st.st_mode & 0o777) == oct(0o660)
        assert st.st_gid == grp.getgrnam("disk").gr_gid
        assert "allow_other" in open("/proc/self/mountinfo").read()
        (m,) = bc_json(state, "status")["mounts"]
        assert m["allowOther"] is True and m["pid"] == p.pid
        p.send_signal(2)  # Ctrl-C
        out, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        assert "mounted" in err and "Traceback" not in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not bmount.mounts_at(str(mp))
    assert bc_json(state, "status")["mounts"] == []


def test_umount_names_the_loop_device_that_keeps_it_busy(state, mnt):
    disks.create(state, "l", 16 * MiB)
    wait_for(lambda: mnt.disk("l").exists(), what="disk listed")
    with loopdev(mnt.disk("l")) as dev:
        r = bc(state, "umount", mnt.mp, check=False)
        assert r.returncode != 0 and dev in r.stderr and "losetup -d" in r.stderr, r.stderr
        assert bmount._pid_alive(mnt.pid)
    bc(state, "umount", mnt.mp)
    assert not bmount._pid_alive(mnt.pid)
