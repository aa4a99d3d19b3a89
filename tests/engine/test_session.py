"""The libfuse 3 session in C (blockcrypt._engine.Session) on a real /dev/fuse mount.

Each test mounts a Session in a tmp dir over two engine Volumes (sparse files in tmp_path,
AES-256-XTS keys from os.urandom), serves it from a Python thread, and drives the mount
with ordinary system calls and tools (fio, losetup, mkfs.ext4, fsck). Results are checked
against the Volume objects read directly. Teardown always detaches loop devices and
unmounts, lazily as a last resort (fusermount3 -u -z).

Caveat: needs root and /dev/fuse (skipped without /dev/fuse); tests run serially.
"""
from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support.fusehelpers import (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                                FALLOC_FL_ZERO_RANGE, fallocate)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent")

engine = pytest.importorskip("blockcrypt._engine", reason="the native engine is not built")
Session = engine.Session
Volume = engine.Volume

MiB = 1 << 20
DATA_OFF = MiB
SIZE = 64 * MiB
SECTOR = 4096
FSTYPE = "fuse.blockcrypt"   # blockcrypt's mount daemon looks for this type in /proc/mounts


def mount_types(mp: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == str(mp):
                out.append(fields[sep + 1])
    return out


def sh(*cmd, check=True, **kw):
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, **kw)


def loops_on(path: Path) -> list[str]:
    p = sh("losetup", "-j", path, check=False)
    return [line.split(":", 1)[0] for line in p.stdout.splitlines() if line.strip()]


def aligned(n: int) -> mmap.mmap:
    """A page-aligned buffer for O_DIRECT."""
    return mmap.mmap(-1, n)


def wait_for(pred, timeout=5.0, step=0.05):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def make_volume(path: Path, *, size=SIZE, read_only=False) -> Volume:
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(DATA_OFF + size)
    return Volume(str(path), size=size, sector_size=SECTOR, data_off=DATA_OFF,
                  read_only=read_only, layers=[("aes-xts-plain64", os.urandom(64))])


class Served:
    """A mounted Session served from a thread, with the hooks' calls recorded."""

    def __init__(self, tmp: Path, volumes: dict[str, Volume], read_only=(), **kw):
        self.tmp = tmp
        self.mp = tmp / "mnt"
        self.mp.mkdir(exist_ok=True)
        self.volumes = volumes
        self.read_only = set(read_only)
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.missed: list[str] = []
        self.open_error: dict[str, BaseException] = {}
        self.on_miss = None
        self.before_open = None
        self.loop_error: BaseException | None = None
        self.session = Session(str(self.mp), statfs_path=str(tmp), open_disk=self._open,
                               closed=self._closed, lookup_miss=self._miss, **kw)
        for name, vol in volumes.items():
            self.publish(name, vol)
        self.thread = threading.Thread(target=self._loop, name="bc-session", daemon=True)
        self.thread.start()

    def publish(self, name: str, vol: Volume, size: int | None = None) -> None:
        ro = name in self.read_only
        self.session.set_disk(name, vol.size if size is None else size, 0o400 if ro else 0o600,
                              0, 0, ro, str(self.tmp / f"{name}.img"))

    @staticmethod
    def _leaf(path: str) -> str:
        """Hooks get "<dir>/<name>"; the tests here name disks/ entries by their bare name."""
        d, _, name = path.partition("/")
        assert name, f"a hook got {path!r}, not a <dir>/<name> path"
        return name if d == "disks" else path

    def _open(self, path):
        name = self._leaf(path)
        self.opened.append(name)
        if self.before_open is not None:
            self.before_open(name)
        if name in self.open_error:
            raise self.open_error[name]
        return self.volumes[name]

    def _closed(self, path):
        self.closed.append(self._leaf(path))

    def _miss(self, path):
        name = self._leaf(path)
        self.missed.append(name)
        if self.on_miss is not None:
            self.on_miss(name)

    def _loop(self):
        try:
            self.session.loop()
        except BaseException as e:  # surfaced by the test that stops the loop
            self.loop_error = e

    def disk(self, name: str) -> Path:
        return self.mp / "disks" / name

    def stop(self) -> None:
        for dev in loops_on_any(self.tmp):
            sh("losetup", "-d", dev, check=False)
        try:
            self.session.exit()
            self.thread.join(10)
            self.session.close()
        finally:
            if mount_types(self.mp):
                sh("fusermount3", "-u", "-z", self.mp, check=False)


def loops_on_any(root: Path) -> list[str]:
    devs = []
    for name in ("a", "b", "ro"):
        devs += loops_on(root / "mnt" / "disks" / name)
    return devs


@pytest.fixture
def vols(tmp_path):
    vs = {"a": make_volume(tmp_path / "a.img"), "b": make_volume(tmp_path / "b.img")}
    yield vs
    for v in vs.values():
        v.close()


@pytest.fixture
def served(tmp_path, vols):
    s = Served(tmp_path, vols)
    yield s
    s.stop()
    assert not mount_types(s.mp), "the session left its mount behind"


def test_engine_module_is_the_expected_build():
    """Under test_session_asan.py, BC_ENGINE_EXPECT_DIR names the sanitized build's directory."""
    want = os.environ.get("BC_ENGINE_EXPECT_DIR")
    if want:
        assert os.path.dirname(os.path.realpath(engine.__file__)) == os.path.realpath(want)
    assert hasattr(Session, "loop") and hasattr(Volume, "read")


# ---- the tree ------------------------------------------------------------------------

def test_tree_names_modes_sizes_and_fstype(served):
    assert mount_types(served.mp) == [FSTYPE]
    assert os.listdir(served.mp) == ["disks"]
    assert sorted(os.listdir(served.mp / "disks")) == ["a", "b"]
    for p in (served.mp, served.mp / "disks"):
        st = os.stat(p)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    sa, sb = os.stat(served.disk("a")), os.stat(served.disk("b"))
    for st in (sa, sb):
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == SIZE and st.st_nlink == 1
    assert sa.st_ino != sb.st_ino and sa.st_ino > 2
    assert os.stat(served.disk("a")).st_ino == sa.st_ino   # stable
    # nothing opened a volume for stat or readdir
    assert served.opened == []
    sv = os.statvfs(served.mp)
    ref = os.statvfs(served.tmp)
    assert (sv.f_bsize, sv.f_blocks) == (ref.f_bsize, ref.f_blocks)


def test_several_top_level_directories(tmp_path, vols):
    """dirs= gives the root several directories; an entry lives in the one its path names,
    the same name in two directories is two files, and the hooks get the full path."""
    s = Served(tmp_path, {}, dirs=("disks", "snapshots", "temp"))
    try:
        s.volumes.update({"a": vols["a"], "snapshots/a": vols["b"]})
        s.publish("a", vols["a"])                     # a bare name: the first directory
        s.session.set_disk("snapshots/a", SIZE, 0o400, 0, 0, True, str(tmp_path / "b.img"))
        assert sorted(os.listdir(s.mp)) == ["disks", "snapshots", "temp"]
        assert os.stat(s.mp).st_nlink == 5
        assert os.listdir(s.mp / "disks") == ["a"]
        assert os.listdir(s.mp / "snapshots") == ["a"]
        assert os.listdir(s.mp / "temp") == []
        snap = s.mp / "snapshots" / "a"
        assert stat.S_IMODE(os.stat(snap).st_mode) == 0o400
        assert os.stat(snap).st_ino != os.stat(s.disk("a")).st_ino
        vols["a"].write(0, b"A" * SECTOR)
        vols["b"].write(0, b"B" * SECTOR)
        with open(snap, "rb") as f:
            assert f.read(SECTOR) == b"B" * SECTOR
        with open(s.disk("a"), "rb") as f:
            assert f.read(SECTOR) == b"A" * SECTOR
        assert s.opened == ["snapshots/a", "a"]
        with pytest.raises(OSError) as ei:
            open(snap, "r+b")
        assert ei.value.errno == errno.EROFS
        with pytest.raises(FileNotFoundError):
            os.stat(s.mp / "temp" / "x")
        assert s.missed == ["temp/x"]
        assert s.session.disk_state("snapshots/a")["handles"] == 0
        s.session.remove_disk("snapshots/a")
        assert wait_for(lambda: os.listdir(s.mp / "snapshots") == [])
        assert os.listdir(s.mp / "disks") == ["a"]
        for bad in ("nodir/x", "snapshots/", "snapshots/x/y", "/x", "disks/.."):
            with pytest.raises(OSError) as ei:
                s.session.set_disk(bad, SIZE)
            assert ei.value.errno == errno.EINVAL
    finally:
        s.stop()
    for dirs in ((), ("a", "a"), ("x/y",), tuple(f"d{i}" for i in range(9)), (".",)):
        with pytest.raises((ValueError, OSError)):
            Session(str(tmp_path / "mnt"), statfs_path=str(tmp_path), dirs=dirs)
    assert not mount_types(tmp_path / "mnt")


def test_unknown_name_is_enoent_after_lookup_miss(served):
    with pytest.raises(FileNotFoundError):
        os.stat(served.disk("nope"))
    assert "nope" in served.missed
    with pytest.raises(FileNotFoundError):
        os.stat(served.mp / "other")
    with pytest.raises(NotADirectoryError):
        os.stat(served.disk("a") / "x")


def test_lookup_miss_may_publish_the_disk(served, tmp_path):
    late = make_volume(tmp_path / "late.img", size=8 * MiB)
    try:
        served.volumes["late"] = late
        served.on_miss = lambda name: name == "late" and served.publish("late", late)
        st = os.stat(served.disk("late"))
        assert st.st_size == 8 * MiB
        with open(served.disk("late"), "r+b", buffering=0) as f:
            f.write(b"late!")
        assert late.read(0, 5) == b"late!"
    finally:
        served.on_miss = None


# ---- I/O -------------------------------------------------------------------------------

@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_pread_pwrite_match_the_volume(served, vols, direct):
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    fd = os.open(served.disk("a"), flags)
    try:
        cases = [(0, 4096), (8 * MiB, 64 * 1024), (3 * MiB + 4096, MiB), (SIZE - 8192, 8192)]
        if not direct:
            cases += [(513, 3000), (10 * MiB - 100, 300), (SIZE - 10, 10)]
        for off, n in cases:
            data = os.urandom(n)
            if direct:
                buf = aligned(n)
                buf[:] = data
                assert os.pwrite(fd, buf, off) == n
            else:
                assert os.pwrite(fd, data, off) == n
            assert vols["a"].read(off, n) == data, (off, n)
            if direct:
                rb = aligned(n)
                assert os.preadv(fd, [rb], off) == n
                assert rb[:] == data
            else:
                assert os.pread(fd, n, off) == data
        # a volume write shows through a new read of the mount (O_DIRECT bypasses the cache)
        vols["a"].write(5 * MiB, b"Z" * 4096)
        rb = aligned(4096)
        fd2 = os.open(served.disk("a"), os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.preadv(fd2, [rb], 5 * MiB) == 4096 and rb[:] == b"Z" * 4096
        finally:
            os.close(fd2)
        # the other disk saw none of it
        assert vols["b"].read(0, 4096) == bytes(4096)
    finally:
        os.close(fd)


def test_unaligned_direct_io_reaches_the_volume(served, vols):
    """O_DIRECT on FUSE sends the caller's offset and length as they are (read-modify-write
    in the engine); check whichever way the kernel answers that it is never wrong data."""
    fd = os.open(served.disk("b"), os.O_RDWR | os.O_DIRECT)
    try:
        data = os.urandom(1000)
        buf = aligned(4096)
        buf[:1000] = data
        try:
            n = os.pwrite(fd, memoryview(buf)[:1000], 4096 + 77)
        except OSError as e:
            assert e.errno == errno.EINVAL
            return
        assert n == 1000
        assert vols["b"].read(4096 + 77, 1000) == data
        rb = aligned(4096)
        assert os.preadv(fd, [memoryview(rb)[:1000]], 4096 + 77) == 1000
        assert rb[:1000] == data
    finally:
        os.close(fd)


def test_direct_requests_reach_one_mib(served, vols):
    """4 MiB O_DIRECT read and write arrive as 1 MiB requests (max_pages 256, async DIO)."""
    fd = os.open(served.disk("a"), os.O_RDWR | os.O_DIRECT)
    try:
        data = os.urandom(4 * MiB)
        buf = aligned(4 * MiB)
        buf[:] = data
        w0 = vols["a"].stats()
        assert os.pwrite(fd, buf, 8 * MiB) == 4 * MiB
        w1 = vols["a"].stats()
        rb = aligned(4 * MiB)
        assert os.preadv(fd, [rb], 8 * MiB) == 4 * MiB
        r1 = vols["a"].stats()
        assert rb[:] == data
    finally:
        os.close(fd)
    writes, wbytes = w1["writes"] - w0["writes"], w1["bytes_written"] - w0["bytes_written"]
    reads, rbytes = r1["reads"] - w1["reads"], r1["bytes_read"] - w1["bytes_read"]
    assert wbytes == 4 * MiB and rbytes == 4 * MiB
    assert writes == 4, f"{writes} write requests for 4 MiB: max_write is not 1 MiB"
    assert reads == 4, f"{reads} read requests for 4 MiB: max_read is not 1 MiB"


def test_write_past_the_end_is_efbig_and_straddling_is_clipped(served, vols):
    fd = os.open(served.disk("a"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x" * 10, SIZE)
        assert ei.value.errno == errno.EFBIG
        assert os.pwrite(fd, b"y" * 10, SIZE - 4) == 4
        assert vols["a"].read(SIZE - 4, 4) == b"yyyy"
        assert os.pread(fd, 10, SIZE - 4) == b"yyyy"
    finally:
        os.close(fd)


def test_fsync_flushes_the_volume(served, vols):
    fd = os.open(served.disk("a"), os.O_RDWR)
    try:
        os.pwrite(fd, b"durable", 0)
        f0 = vols["a"].stats()["flushes"]
        os.fsync(fd)
        os.fdatasync(fd)
        assert vols["a"].stats()["flushes"] >= f0 + 2
    finally:
        os.close(fd)


def test_punch_hole_and_zero_range(served, vols, tmp_path):
    fd = os.open(served.disk("a"), os.O_RDWR | os.O_DIRECT)
    try:
        buf = aligned(8 * MiB)
        buf[:] = os.urandom(8 * MiB)
        assert os.pwrite(fd, buf, 0) == 8 * MiB
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        assert before >= 8 * MiB // 512
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, 4 * MiB)
        assert vols["a"].read(MiB, 4 * MiB) == bytes(4 * MiB)
        assert vols["a"].read(0, MiB) == buf[:MiB]
        after = os.fstat(fd).st_blocks
        assert after <= before - 4 * MiB // 512, (before, after)
        assert os.stat(tmp_path / "a.img").st_blocks <= before - 4 * MiB // 512
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 6 * MiB + 100, 1000)
        assert vols["a"].read(6 * MiB + 100, 1000) == bytes(1000)
        assert vols["a"].read(6 * MiB, 100) == buf[6 * MiB:6 * MiB + 100]
        fallocate(fd, 0, 0, MiB)                              # inside: a no-op
        fallocate(fd, FALLOC_FL_KEEP_SIZE, SIZE - 10, 100)     # keep size: a no-op
        assert vols["a"].read(0, MiB) == buf[:MiB]
        for mode, off, n, err in [(0, SIZE - 10, 100, errno.EPERM),
                                  (FALLOC_FL_ZERO_RANGE, SIZE - 10, 100, errno.EPERM),
                                  (FALLOC_FL_COLLAPSE_RANGE, 0, MiB, errno.EOPNOTSUPP)]:
            with pytest.raises(OSError) as ei:
                fallocate(fd, mode, off, n)
            assert ei.value.errno in (err, errno.EINVAL if mode == FALLOC_FL_COLLAPSE_RANGE else err)
        assert os.fstat(fd).st_size == SIZE
    finally:
        os.close(fd)


# ---- refusals ---------------------------------------------------------------------------

def test_refusals(served, tmp_path):
    d = served.disk("a")
    os.truncate(d, SIZE)                      # to the current size: accepted
    with pytest.raises(PermissionError):
        os.truncate(d, SIZE // 2)
    with pytest.raises(PermissionError):
        os.truncate(d, SIZE * 2)
    with pytest.raises(PermissionError):
        os.chmod(d, 0o644)
    with pytest.raises(PermissionError):
        os.chown(d, 1, 1)
    os.utime(d, (1, 2))                       # accepted (and ignored)
    for call in (lambda: os.unlink(d), lambda: os.rename(d, served.disk("c")),
                 lambda: os.mkdir(served.disk("c")), lambda: os.mknod(served.disk("c")),
                 lambda: os.symlink("a", served.disk("c")), lambda: os.link(d, served.disk("c")),
                 lambda: os.rmdir(served.mp / "disks"),
                 lambda: open(served.disk("c"), "wb")):
        with pytest.raises(PermissionError):
            call()
    with pytest.raises(PermissionError):
        os.open(d, os.O_WRONLY | os.O_TRUNC)
    with pytest.raises(OSError) as ei:
        os.getxattr(d, "user.x")
    assert ei.value.errno in (errno.ENOTSUP, errno.ENODATA)
    assert sorted(os.listdir(served.mp / "disks")) == ["a", "b"]


def test_read_only_disk(tmp_path, vols):
    vols["ro"] = make_volume(tmp_path / "ro.img", read_only=True)
    s = Served(tmp_path, vols, read_only={"ro"})
    try:
        d = s.disk("ro")
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o400
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as ei:
                os.open(d, flags)
            assert ei.value.errno == errno.EROFS
        assert "ro" not in s.opened              # refused before open_disk
        with open(d, "rb") as f:
            assert f.read(4096) == bytes(4096)
        assert s.opened == ["ro"]
    finally:
        s.stop()


# ---- open_disk, handles, the table ----------------------------------------------------------

def test_open_shares_one_volume_and_closes_after_last_handle(served):
    f1 = open(served.disk("a"), "rb", buffering=0)
    f2 = open(served.disk("a"), "rb", buffering=0)
    assert served.opened == ["a"]
    assert served.session.disk_state("a") == {"handles": 2, "errors": 0, "lastErrno": 0, "open": True}
    f1.close()   # RELEASE is asynchronous: close() returns before the session sees it
    assert wait_for(lambda: served.session.disk_state("a")["handles"] == 1)
    assert served.closed == []
    f2.close()
    assert wait_for(lambda: served.closed == ["a"])
    assert served.session.disk_state("a") == {"handles": 0, "errors": 0, "lastErrno": 0, "open": False}
    with open(served.disk("a"), "rb"):
        assert served.opened == ["a", "a"]


def test_open_disk_errors_answer_their_errno(served):
    class KeyGone(Exception):
        errno = errno.EIO

    served.open_error["a"] = KeyGone("key unavailable")
    with pytest.raises(OSError) as ei:
        open(served.disk("a"), "rb")
    assert ei.value.errno == errno.EIO
    name, exc = served.session.last_error
    assert name == "disks/a" and isinstance(exc, KeyGone)
    st = served.session.disk_state("a")
    assert st["errors"] == 1 and st["lastErrno"] == errno.EIO and st["handles"] == 0

    served.open_error["a"] = PermissionError(errno.EACCES, "denied")
    with pytest.raises(PermissionError):
        open(served.disk("a"), "rb")
    served.open_error["a"] = ValueError("no errno here")
    with pytest.raises(OSError) as ei:
        open(served.disk("a"), "rb")
    assert ei.value.errno == errno.EIO
    del served.open_error["a"]
    served.volumes["b"], saved = "not a volume", served.volumes["b"]
    try:
        with pytest.raises(OSError) as ei:
            open(served.disk("b"), "rb")
        assert ei.value.errno == errno.EIO
        assert isinstance(served.session.last_error[1], TypeError)
    finally:
        served.volumes["b"] = saved
    with open(served.disk("a"), "rb") as f:
        assert f.read(10) == bytes(10)


#: openat(2)'s number, for /proc/<pid>/task/<tid>/syscall
SYS_OPENAT = {"x86_64": 257, "aarch64": 56}[os.uname().machine]


def _in_syscall(tid: int | None, nr: int) -> bool:
    """Thread ``tid`` of this process is blocked in system call ``nr``."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return f.read().split()[0] == str(nr)
    except (OSError, IndexError):
        return False


def test_open_disk_is_serialized_per_disk_not_across_disks(served):
    gate = threading.Event()
    served.before_open = lambda name: name == "a" and gate.wait(10)
    results = {}

    def opener(key):
        with open(served.disk("a"), "rb") as f:
            results[key] = f.read(4)
            if key == "a1":  # a1 keeps "a" open until a2 has read: a late OPEN of a2 finds it open
                wait_for(lambda: "a2" in results, timeout=20)

    t1 = threading.Thread(target=opener, args=("a1",))
    t2 = threading.Thread(target=opener, args=("a2",))
    try:
        t1.start()
        assert wait_for(lambda: served.opened == ["a"])
        t2.start()
        # a2's open is in the kernel, waiting on the session (it cannot end before a1's open_disk)
        assert wait_for(lambda: _in_syscall(t2.native_id, SYS_OPENAT), timeout=20)
        time.sleep(0.3)  # the time a session without the per-disk lock has to call open_disk again
        assert served.opened == ["a"], "a second open_disk of the same disk ran concurrently"
        with open(served.disk("b"), "rb") as f:        # another disk does not wait
            assert f.read(4) == bytes(4)
        assert served.opened == ["a", "b"] and not results
    finally:
        gate.set()
        t1.join(30)
        t2.join(30)
    assert results == {"a1": bytes(4), "a2": bytes(4)}
    assert served.opened == ["a", "b"]                 # the two opens of "a" shared one volume


def test_remove_disk_keeps_open_handles_working(served, vols):
    fd = os.open(served.disk("a"), os.O_RDWR)
    try:
        served.session.remove_disk("a")
        assert os.listdir(served.mp / "disks") == ["b"]
        with pytest.raises(FileNotFoundError):
            served.session.disk_state("a")
        with pytest.raises(FileNotFoundError):
            served.session.remove_disk("a")
        assert wait_for(lambda: not served.disk("a").exists(), timeout=3)
        assert os.pwrite(fd, b"still here", 4096) == 10
        assert os.pread(fd, 10, 4096) == b"still here"
        assert vols["a"].read(4096, 10) == b"still here"
        assert os.fstat(fd).st_size == SIZE
        os.fsync(fd)
    finally:
        os.close(fd)
    assert wait_for(lambda: served.closed == ["a"])
    # re-added: served again, with a fresh open_disk
    served.publish("a", vols["a"])
    with open(served.disk("a"), "rb") as f:
        f.seek(4096)
        assert f.read(10) == b"still here"
    assert served.opened == ["a", "a"]


def test_set_disk_changes_size(served, vols):
    d = served.disk("b")
    assert os.stat(d).st_size == SIZE
    served.publish("b", vols["b"], size=SIZE + 8 * MiB)          # not open: the table only
    assert wait_for(lambda: os.stat(d).st_size == SIZE + 8 * MiB, timeout=3)
    served.publish("b", vols["b"], size=SIZE)
    assert wait_for(lambda: os.stat(d).st_size == SIZE, timeout=3)
    fd = os.open(d, os.O_RDWR)
    try:
        served.publish("b", vols["b"], size=SIZE + 4 * MiB)      # open: the volume too
        assert vols["b"].size == SIZE + 4 * MiB
        assert wait_for(lambda: os.fstat(fd).st_size == SIZE + 4 * MiB, timeout=3)
        assert os.pwrite(fd, b"grown", SIZE + MiB) == 5
        assert vols["b"].read(SIZE + MiB, 5) == b"grown"
    finally:
        os.close(fd)


def test_revoke_makes_reads_fail_with_eio(served, vols):
    fd = os.open(served.disk("a"), os.O_RDWR | os.O_DIRECT)
    try:
        rb = aligned(4096)
        assert os.preadv(fd, [rb], 0) == 4096
        vols["a"].revoke(errno.EIO, "test: key disabled")
        for call in (lambda: os.preadv(fd, [rb], 0), lambda: os.pwrite(fd, rb, 0)):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.EIO
        st = served.session.disk_state("a")
        assert st["errors"] >= 2 and st["lastErrno"] == errno.EIO
        assert served.session.disk_state("b")["errors"] == 0
    finally:
        os.close(fd)


# ---- life cycle --------------------------------------------------------------------------

def test_exit_from_another_thread_returns_loop_and_unmounts(tmp_path, vols):
    s = Served(tmp_path, vols)
    try:
        with open(s.disk("a"), "rb") as f:
            f.read(4096)
        assert mount_types(s.mp) == [FSTYPE]
        # idle first: a late request (the async RELEASE of that file) would wake the loop
        # by itself and hide an exit() that cannot
        assert wait_for(lambda: s.closed == ["a"])
        time.sleep(0.3)
        t0 = time.monotonic()
        threading.Thread(target=s.session.exit).start()
        s.thread.join(10)
        assert not s.thread.is_alive(), "loop() did not return after exit()"
        assert time.monotonic() - t0 < 3
        assert s.loop_error is None
        assert mount_types(s.mp) == []
        with pytest.raises(RuntimeError):
            s.session.loop()                         # a session serves once
        s.session.close()
        assert s.session.closed
        with pytest.raises(ValueError):
            s.session.set_disk("a", SIZE, 0o600, 0, 0, False, None)
        s.session.exit()                             # harmless when closed
    finally:
        s.stop()


def test_close_without_loop_unmounts(tmp_path):
    mp = tmp_path / "m"
    mp.mkdir()
    s = Session(str(mp), statfs_path=str(tmp_path))
    try:
        assert mount_types(mp) == [FSTYPE]
        assert s.mountpoint == str(mp)
    finally:
        s.close()
    assert mount_types(mp) == []


def test_close_while_looping_stops_the_loop_first(tmp_path, vols):
    s = Served(tmp_path, vols)
    try:
        fd = os.open(s.disk("a"), os.O_RDONLY)   # a handle still open at close
        try:
            assert os.pread(fd, 4, 0) == bytes(4)
            s.session.close()                   # no exit() first
            assert not s.thread.is_alive()
            assert s.loop_error is None
            assert mount_types(s.mp) == []
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        # the session dropped its references: the volume still works for its owner
        assert vols["a"].read(0, 4) == bytes(4)
    finally:
        s.stop()


def test_collected_session_unmounts(tmp_path):
    import gc
    mp = tmp_path / "m"
    mp.mkdir()
    with Session(str(mp), statfs_path=str(tmp_path)) as s:
        assert mount_types(mp) == [FSTYPE]
    assert s.closed and mount_types(mp) == []
    s = Session(str(mp), statfs_path=str(tmp_path), open_disk=lambda name: s)  # a cycle
    assert mount_types(mp) == [FSTYPE]
    del s
    gc.collect()
    assert mount_types(mp) == []


def test_scandir_stat_and_readdir_of_many_disks(served, vols, tmp_path):
    for i in range(300):
        served.session.set_disk(f"d{i:03}", MiB * (i + 1), 0o600, 0, 0, False, None)
    names = os.listdir(served.mp / "disks")
    assert len(names) == 302 and len(set(names)) == 302
    sizes = {e.name: e.stat().st_size for e in os.scandir(served.mp / "disks")}
    assert sizes["d000"] == MiB and sizes["d299"] == 300 * MiB and sizes["a"] == SIZE
    served.session.remove_disk("d100")
    assert "d100" not in os.listdir(served.mp / "disks")
    inos = {os.stat(served.disk(n)).st_ino for n in ("a", "b", "d000", "d299")}
    assert len(inos) == 4


def test_allow_other_and_options_reach_the_mount(tmp_path):
    mp = tmp_path / "m"
    mp.mkdir()
    for allow_other in (False, True):
        with Session(str(mp), statfs_path=str(tmp_path), allow_other=allow_other):
            with open("/proc/self/mountinfo") as f:
                line = next(ln for ln in f if ln.split()[4] == str(mp))
            fields = line.split()
            sep = fields.index("-")
            fstype, source, sopts = fields[sep + 1], fields[sep + 2], fields[sep + 3].split(",")
            assert (fstype, source) == (FSTYPE, "blockcrypt")
            assert "default_permissions" in sopts and "max_read=1048576" in sopts
            assert ("allow_other" in sopts) == allow_other
        assert mount_types(mp) == []


def test_mount_failure_is_a_clear_oserror(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        Session(str(tmp_path / "missing"), statfs_path=str(tmp_path))
    assert "cannot mount" in str(ei.value) and "missing" in str(ei.value)
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        Session(str(f), statfs_path=str(tmp_path))
    with pytest.raises(TypeError):
        Session(str(tmp_path), statfs_path=str(tmp_path), open_disk=42)


def test_set_disk_rejects_bad_names(served):
    for bad in ("", "x/y", ".", "..", "n" * 256):
        with pytest.raises(OSError) as ei:
            served.session.set_disk(bad, SIZE, 0o600, 0, 0, False, None)
        assert ei.value.errno == errno.EINVAL


# ---- real tools ---------------------------------------------------------------------------

def test_fio_verify(served):
    assert shutil.which("fio"), "fio not installed"
    p = sh("fio", "--name=v", f"--filename={served.disk('a')}", "--rw=randwrite", "--bs=4k",
           "--size=16M", "--offset_increment=16M", "--numjobs=2", "--direct=1",
           "--ioengine=psync", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
           "--group_reporting", "--output-format=terse", "--verify_state_save=0", check=False, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verify" not in p.stderr.lower(), p.stderr
    p = sh("fio", "--name=u", f"--filename={served.disk('b')}", "--rw=randrw", "--bs=1536",
           "--size=4M", "--ioengine=psync", "--verify=md5", "--verify_fatal=1",
           "--output-format=terse", "--verify_state_save=0", check=False, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


def test_loop_device_ext4_fsck(served, tmp_path):
    for tool in ("losetup", "mkfs.ext4", "fsck.ext4"):
        assert shutil.which(tool), f"{tool} not installed"
    dev = sh("losetup", "--find", "--show", served.disk("a")).stdout.strip()
    fsmp = tmp_path / "ext4"
    fsmp.mkdir()
    try:
        sh("mkfs.ext4", "-q", "-F", dev)
        sh("mount", dev, fsmp)
        try:
            payload = os.urandom(3 * MiB)
            (fsmp / "hello.bin").write_bytes(payload)
            os.sync()
        finally:
            sh("umount", fsmp)
        p = sh("fsck.ext4", "-n", "-f", dev, check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        sh("mount", "-o", "ro", dev, fsmp)
        try:
            assert (fsmp / "hello.bin").read_bytes() == payload
        finally:
            sh("umount", fsmp)
    finally:
        if mount_types(fsmp):
            sh("umount", "-l", fsmp, check=False)
        sh("losetup", "-d", dev, check=False)
