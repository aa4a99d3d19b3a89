"""The mount's file semantics, errors and life cycle, on a real FUSE mount."""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from blockcrypt.control import disks
from blockcrypt.mount import daemon as bmount

from support.fusehelpers import Mount, backing_path, bc, bc_json, need, sh, wait_for

MiB = 1 << 20


def test_layout_modes_and_sizes(state, mnt):
    disks.create(state, "a", 64 * MiB)
    disks.create(state, "b", 8 * MiB, sector_size=512)
    wait_for(lambda: sorted(os.listdir(mnt.mp / "disks")) == ["a", "b"], what="disks listed")
    # the tree's directories, in tree.DIRS order; temp/ is always served (empty: no temp disk here)
    assert os.listdir(mnt.mp) == ["disks", "snapshots", "images", "temp"]
    assert os.listdir(mnt.mp / "snapshots") == [] and os.listdir(mnt.mp / "images") == []
    assert os.listdir(mnt.mp / "temp") == []
    st = os.stat(mnt.disk("a"))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert st.st_size == 64 * MiB
    assert os.stat(mnt.disk("b")).st_size == 8 * MiB
    with open(mnt.disk("a"), "rb") as f:
        assert f.read(MiB) == bytes(MiB)  # a new disk reads as zeros
    data = os.urandom(3000)
    fd = os.open(mnt.disk("b"), os.O_RDWR)  # 512-byte sectors: unaligned write, read back
    try:
        assert os.pwrite(fd, data, 700) == 3000
        assert os.pread(fd, 4096, 0) == bytes(700) + data + bytes(396)
    finally:
        os.close(fd)
    raw = backing_path(state, "b").read_bytes()
    assert data[:32] not in raw
    with pytest.raises(FileNotFoundError):
        os.stat(mnt.mp / "disks" / "nope")
    with pytest.raises(FileNotFoundError):
        os.stat(mnt.mp / "other")


def test_any_offset_and_length_from_many_threads(state, mnt):
    size = 16 * MiB
    disks.create(state, "d", size)
    model = bytearray(size)
    path = mnt.disk("d")
    rng = random.Random(1)
    # disjoint regions per thread, unaligned offsets and lengths inside them
    plans = []
    for t in range(4):
        base = t * 4 * MiB
        ops = []
        for _ in range(150):
            off = base + rng.randrange(0, 4 * MiB - 70000)
            n = rng.randrange(1, 70000)
            ops.append((off, rng.randbytes(n)))
        plans.append(ops)
    for ops in plans:
        for off, data in ops:
            model[off:off + len(data)] = data

    def worker(ops):
        fd = os.open(path, os.O_RDWR)
        try:
            for off, data in ops:
                assert os.pwrite(fd, data, off) == len(data)
        finally:
            os.close(fd)

    ths = [threading.Thread(target=worker, args=(ops,)) for ops in plans]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    with open(path, "rb") as f:
        assert f.read() == bytes(model)
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"y" * 10, size - 5) == 5  # the kernel clips at the end...
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x" * 10, size)  # ...and a write past it is refused
        assert ei.value.errno == errno.EFBIG
        os.fsync(fd)
        os.fdatasync(fd)
        assert os.pread(fd, 100, size - 10) == bytes(model[size - 10:size - 5]) + b"y" * 5
    finally:
        os.close(fd)
    # nothing of it in clear in the disk file
    raw = backing_path(state, "d").read_bytes()
    assert plans[0][0][1][:64] not in raw


def test_odirect_dd_and_fsync(state, mnt, tmp_path):
    disks.create(state, "d", 32 * MiB)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(4 * MiB))
    sh("dd", f"if={src}", f"of={mnt.disk('d')}", "bs=1M", "oflag=direct", "conv=notrunc,fsync",
       "seek=3", "status=none")
    out = tmp_path / "out"
    sh("dd", f"if={mnt.disk('d')}", f"of={out}", "bs=64k", "iflag=direct", "skip=48", "count=64",
       "status=none")
    assert out.read_bytes() == src.read_bytes()
    # O_DIRECT with a 512-byte unaligned (inside a 4 KiB sector) request
    fd = os.open(mnt.disk("d"), os.O_RDWR | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        buf.write(b"\xab" * 4096)
        assert os.pwritev(fd, [memoryview(buf)[:512]], 512) == 512
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(mnt.disk("d"), "rb") as f:
        blk = f.read(4096)
    assert blk[:512] == bytes(512) and blk[512:1024] == b"\xab" * 512 and blk[1024:] == bytes(3072)


def test_refused_operations_answer_eperm(state, mnt):
    disks.create(state, "d", 8 * MiB)
    p = mnt.disk("d")
    wait_for(p.exists, what="disk file")
    with pytest.raises(PermissionError):
        os.truncate(p, 4 * MiB)
    os.truncate(p, 8 * MiB)  # the same size is fine
    with pytest.raises(PermissionError):
        open(p, "wb")  # O_TRUNC
    with pytest.raises(PermissionError):
        open(mnt.mp / "disks" / "new", "wb")
    with pytest.raises(PermissionError):
        os.unlink(p)
    with pytest.raises(PermissionError):
        os.rename(p, mnt.mp / "disks" / "x")
    with pytest.raises(PermissionError):
        os.chmod(p, 0o4644)  # setuid bits; chmod and chown themselves are kept (test_mount_attrs.py)
    with pytest.raises(PermissionError):
        os.mkdir(mnt.mp / "disks" / "dir")
    os.utime(p)  # accepted, ignored
    fd = os.open(p, os.O_RDWR)
    try:  # the same through a file descriptor (no path reaches the daemon)
        os.utime(fd)
        os.ftruncate(fd, 8 * MiB)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, MiB)
    finally:
        os.close(fd)
    assert os.stat(p).st_size == 8 * MiB


def test_fallocate_punch_and_zero_range(state, mnt):
    need("fallocate")
    disks.create(state, "d", 16 * MiB)
    p = mnt.disk("d")
    data = os.urandom(8 * MiB)
    with open(p, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    used_full = os.stat(p).st_blocks
    assert used_full >= 8 * MiB // 512
    sh("fallocate", "--punch-hole", "--offset", str(MiB), "--length", str(2 * MiB), p)
    sh("fallocate", "--zero-range", "--offset", str(4 * MiB), "--length", str(2 * MiB), p)
    sh("fallocate", "--punch-hole", "--offset", "100", "--length", "5000", p)  # unaligned edges
    with open(p, "rb") as f:
        got = f.read(8 * MiB)
    want = bytearray(data)
    want[MiB:3 * MiB] = bytes(2 * MiB)
    want[4 * MiB:6 * MiB] = bytes(2 * MiB)
    want[100:5100] = bytes(5000)
    assert got == bytes(want)
    used = os.stat(p).st_blocks
    assert used <= used_full - (4 * MiB // 512) + 64, (used_full, used)
    assert used == os.stat(backing_path(state, "d")).st_blocks
    # allocation inside the disk is a no-op; growing is refused
    sh("fallocate", "--offset", "0", "--length", str(MiB), p)
    r = sh("fallocate", "--offset", "0", "--length", str(32 * MiB), p, check=False)
    assert r.returncode != 0 and "not permitted" in r.stderr


def test_disks_appear_change_and_vanish_without_remount(state, mnt):
    disks.create(state, "d", 8 * MiB)
    wait_for(lambda: mnt.disk("d").exists(), what="created disk")
    with open(mnt.disk("d"), "r+b") as f:
        f.write(b"before")
        disks.resize(state, "d", 24 * MiB)
        wait_for(lambda: os.stat(mnt.disk("d")).st_size == 24 * MiB, 3, "resize seen")
        f.seek(20 * MiB)
        f.write(b"after the old end")  # the open volume re-read its header
        f.flush()
        f.seek(0)
        assert f.read(6) == b"before"
        s = bc_json(state, "status")
        (m,) = s["mounts"]
        (d,) = m["disks"]
        assert d["name"] == "d" and d["sizeBytes"] == 24 * MiB and d["openHandles"] == 1
    with open(mnt.disk("d"), "rb") as f:
        f.seek(20 * MiB)
        assert f.read(17) == b"after the old end"
    disks.delete(state, "d")
    wait_for(lambda: not mnt.disk("d").exists(), 3, "deleted disk gone")
    assert os.listdir(mnt.mp / "disks") == []


def test_corrupt_header_is_eio_for_that_disk_only(state, mnt):
    disks.create(state, "good", 8 * MiB)
    disks.create(state, "bad", 8 * MiB)
    with open(backing_path(state, "bad"), "r+b") as f:  # smash both header copies
        f.write(os.urandom(MiB))
    wait_for(lambda: mnt.disk("bad").exists(), what="disk listed")
    assert os.stat(mnt.disk("bad")).st_size == 8 * MiB
    with pytest.raises(OSError) as ei:
        open(mnt.disk("bad"), "rb")
    assert ei.value.errno == errno.EIO
    with open(mnt.disk("good"), "r+b") as f:
        f.write(b"still fine")
        f.seek(0)
        assert f.read(10) == b"still fine"
        (m,) = bc_json(state, "status", codes=(52,))["mounts"]  # issue 16: Corrupt, exit 52
        by = {d["name"]: d for d in m["disks"]}
        assert by["good"]["state"] == "open"
        assert by["bad"]["state"] == "Corrupt" and by["bad"]["error"]["errno"] == "EIO"
        assert "corrupt" in by["bad"]["error"]["message"] and by["bad"]["serving"] is False
    r = bc(state, "status", codes=(52,))
    assert "bad  Corrupt (failed to open)" in r.stdout and "corrupt" in r.stdout
    assert r.stderr.startswith("blockcrypt: error: disks/bad is corrupt") and len(r.stderr.splitlines()) == 1


def test_read_only_disk_is_erofs(state, mnt):
    disks.create(state, "ro", 8 * MiB)
    state.catalog.update_disk("ro", read_only=1)  # what a snapshot/image looks like to the mount
    wait_for(lambda: mnt.disk("ro").exists(), what="disk listed")
    time.sleep(1.1)  # the catalog cache
    assert stat.S_IMODE(os.stat(mnt.disk("ro")).st_mode) == 0o400
    with pytest.raises(OSError) as ei:
        os.open(mnt.disk("ro"), os.O_RDWR)
    assert ei.value.errno in (errno.EROFS, errno.EACCES)
    with open(mnt.disk("ro"), "rb") as f:
        assert f.read(4096) == bytes(4096)


def test_status_json_and_cli(state, mnt):
    disks.create(state, "d", 8 * MiB)
    wait_for(lambda: mnt.disk("d").exists(), what="disk listed")
    s = bc_json(state, "status")
    (m,) = s["mounts"]
    assert m["state"] == "running" and m["pid"] == mnt.pid and m["mountpoint"] == str(mnt.mp)
    assert m["nullCipher"] is False and m["disks"] == []
    assert os.path.exists(m["log"])
    with open(mnt.disk("d"), "rb"):
        (m,) = bc_json(state, "status")["mounts"]
        (d,) = m["disks"]
        assert d["cipher"] == "aes-xts-plain64" and d["state"] == "open"
    out = bc(state, "status").stdout
    assert f"mount {m['id']}  running" in out


def test_null_cipher_only_with_the_flag_and_labelled(state, root):
    disks.create(state, "d", 8 * MiB)
    mp = root / "mnt"
    mp.mkdir()
    marker = b"NULL-CIPHER-MARKER-" + os.urandom(8).hex().encode()
    m = Mount(state, mp).start()
    with open(m.disk("d"), "r+b") as f:
        f.write(marker)
    m.stop()
    assert marker not in backing_path(state, "d").read_bytes()
    r = bc(state, "mount", mp, "--bench-null-cipher", "--json")
    assert "WITHOUT encryption" in r.stderr
    try:
        (st,) = bc_json(state, "status")["mounts"]
        assert st["nullCipher"] is True and "NOT ENCRYPTED" in st["cipher"]
        with open(m.disk("d"), "r+b") as f:
            f.seek(8192)
            f.write(marker)
            (st,) = bc_json(state, "status")["mounts"]
            assert st["disks"][0]["cipher"] == "null"
        assert "NOT ENCRYPTED" in bc(state, "status").stdout
        assert marker in backing_path(state, "d").read_bytes()  # it really is the null cipher
    finally:
        bc(state, "umount", mp)


def test_mount_errors_are_one_line(state, root):
    mp = root / "mnt"
    r = bc(state, "mount", mp, check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    mp.mkdir()
    (mp / "file").write_text("x")
    r = bc(state, "mount", mp, check=False)
    assert r.returncode != 0 and "not empty" in r.stderr
    (mp / "file").unlink()
    r = bc(state, "umount", mp, check=False)
    assert r.returncode != 0 and "not a blockcrypt mount" in r.stderr
    bc(state, "mount", mp)
    try:
        r = bc(state, "mount", mp, check=False)
        assert r.returncode != 0 and "already mounted" in r.stderr
        other = root / "other"
        other.mkdir()
        r = bc(state, "mount", other, check=False)
        assert r.returncode != 0 and "one mount per state directory" in r.stderr
        assert r.stderr.count("\n") == 1
    finally:
        bc(state, "umount", mp)
    assert bc_json(state, "status")["mounts"] == []


def test_umount_refuses_while_busy_then_flushes(state, mnt):
    disks.create(state, "d", 8 * MiB)
    wait_for(lambda: mnt.disk("d").exists(), what="disk listed")
    f = open(mnt.disk("d"), "r+b")
    try:
        f.write(b"kept")
        f.flush()
        r = bc(state, "umount", mnt.mp, check=False)
        assert r.returncode != 0 and "busy" in r.stderr
    finally:
        f.close()
    bc(state, "umount", mnt.mp)
    assert not bmount.mounts_at(str(mnt.mp)) and not bmount._pid_alive(mnt.pid)
    assert bc_json(state, "status")["mounts"] == []
    mnt.start()
    with open(mnt.disk("d"), "rb") as f:
        assert f.read(4) == b"kept"


def test_sigterm_flushes_and_unmounts(state, mnt):
    disks.create(state, "d", 8 * MiB)
    wait_for(lambda: mnt.disk("d").exists(), what="disk listed")
    data = os.urandom(MiB)
    with open(mnt.disk("d"), "r+b") as f:
        f.write(data)
    os.kill(mnt.pid, signal.SIGTERM)
    wait_for(lambda: not bmount._pid_alive(mnt.pid), 10, "daemon exit")
    assert not bmount.mounts_at(str(mnt.mp))
    assert bc_json(state, "status")["mounts"] == []
    log = open(mnt.info["log"]).read()
    assert "stopped" in log and "Traceback" not in log
    mnt.start()
    with open(mnt.disk("d"), "rb") as f:
        assert f.read(MiB) == data


def test_bad_request_never_takes_the_mount_down(state, mnt):
    """Errors of every kind answer an errno; the daemon keeps serving."""
    disks.create(state, "d", 8 * MiB)
    wait_for(lambda: mnt.disk("d").exists(), what="disk listed")
    fd = os.open(mnt.disk("d"), os.O_RDWR)
    try:
        for off in (8 * MiB, 8 * MiB + 1, 1 << 40):
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"x", off)
            assert ei.value.errno != errno.EINVAL
        assert os.pread(fd, 10, 1 << 40) == b""
        (m,) = bc_json(state, "status")["mounts"]
        (d,) = m["disks"]
        assert d["errors"] >= 1 and d["lastError"]["errno"] == "EFBIG", d
        with pytest.raises(OSError) as ei:   # xattrs are off by default: test_mount_attrs.py
            os.setxattr(mnt.disk("d"), "security.x", b"1")
        assert ei.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert bmount._pid_alive(mnt.pid)
    with open(mnt.disk("d"), "rb") as f:
        assert f.read(4) == bytes(4)
    log = open(mnt.info["log"]).read()
    assert "returning errno.EINVAL" not in log


def test_one_daemon_per_state_even_without_the_registry(state, mnt, root):
    """The state lock holds even when the registry file is gone (a full or damaged state fs)."""
    for p in (state.path / "run").glob("mount-*.json"):
        p.unlink()
    other = root / "other"
    other.mkdir()
    r = bc(state, "mount", other, check=False)
    assert r.returncode != 0 and "already mounted" in r.stderr, r.stderr
    assert not bmount.mounts_at(str(other))


#: a process that takes the state lock's kind of flock, then ends its main thread only: the
#: kernel shows the process as a zombie while its other thread (and so the flock) lives on
ZOMBIE_LEADER = r"""
import ctypes, fcntl, os, sys, threading, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
threading.Thread(target=time.sleep, args=(60,)).start()
print("locked", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_killed_daemon_is_alive_until_its_last_thread_is_gone(root):
    """After kill -9 the main thread is a zombie at once, but the process's files (the state
    lock) are closed only when its last thread has exited, later under load: _pid_alive (what
    Mount.kill9, umount and the registry wait on) says alive until then, so a mount right after
    finds the lock free instead of "already mounted"."""
    lock = root / "lock"
    p = subprocess.Popen([sys.executable, "-c", ZOMBIE_LEADER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"

        def leader_state():
            return open(f"/proc/{p.pid}/stat").read().rpartition(")")[2].split()[0]
        wait_for(lambda: leader_state() == "Z", what="the main thread to end")
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # the other thread holds it
            assert bmount._pid_alive(p.pid)
            p.kill()
            wait_for(lambda: not bmount._pid_alive(p.pid), what="the process to end")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)       # gone: the lock is free
        finally:
            os.close(fd)
    finally:
        p.kill()
        p.wait()


def test_status_shows_engine_io_counters(state, mnt):
    disks.create(state, "io", 8 * MiB)
    wait_for(lambda: mnt.disk("io").exists(), what="disk listed")
    fd = os.open(mnt.disk("io"), os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, MiB)
        buf.write(os.urandom(MiB))
        assert os.pwritev(fd, [buf], 0) == MiB
        (m,) = bc_json(state, "status")["mounts"]
        (d,) = m["disks"]
        assert d["io"]["bytesWritten"] == MiB and d["io"]["writes"] >= 1
        assert d["openHandles"] == 1
    finally:
        os.close(fd)
