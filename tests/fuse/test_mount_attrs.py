"""chown, chmod and extended attributes on disk files, as libvirt's DAC driver uses them:
kept per disk in the catalog, served back, after a remount too; user.* and trusted.* only,
bounded; the errnos the kernel expects (ENODATA, ERANGE, EEXIST, ENOSPC, EOPNOTSUPP); and a
disk chowned to an unprivileged "qemu" user is readable and writable by that user through an
--allow-other mount (and not before)."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from blockcrypt.control import disks, settings
from blockcrypt.control.state import State

from support.fusehelpers import Mount, cleanup_tree, need, wait_for

MiB = 1 << 20
QEMU_UID = 64055   # Debian's libvirt-qemu user (any unprivileged uid does here)
DAC = "trusted.libvirt.security.dac"
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def state(root):
    """xattrs are served only with the `xattrs` setting on (read at mount time)."""
    st = State.init(root / "state")
    settings.set_(st, "xattrs", "true")
    return st


def test_xattrs_are_off_by_default(root, frontend):
    """Off (the default), the xattr operations answer ENOSYS once: the kernel stops sending
    them, its security.capability lookup before every write included."""
    st = State.init(root / "plain-state")
    mp = root / "plain-mnt"
    mp.mkdir()
    m = Mount(st, mp).start()
    try:
        disks.create(st, "d", 8 * MiB)
        p = m.disk("d")
        wait_for(p.exists, what="disk file")
        for call in (lambda: os.listxattr(p), lambda: os.getxattr(p, "user.x"),
                     lambda: os.setxattr(p, "user.x", b"1")):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.EOPNOTSUPP
        with open(p, "r+b", buffering=0) as f:   # writes still work
            f.write(b"data")
    finally:
        m.stop()


def _getxattr_size(path, name, size: int) -> tuple[int, int]:
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.getxattr(os.fsencode(path), name.encode(), buf if size else None, ctypes.c_size_t(size))
    return n, ctypes.get_errno()


def test_chown_chmod_are_kept_and_survive_a_remount(state, mnt):
    disks.create(state, "vm", 8 * MiB)
    disks.create(state, "other", 8 * MiB)
    p = mnt.disk("vm")
    wait_for(p.exists, what="disk file")
    st = os.stat(p)
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0)   # the default
    os.chown(p, QEMU_UID, QEMU_UID)
    os.chmod(p, 0o640)
    st = os.stat(p)
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, QEMU_UID, QEMU_UID)
    os.chown(p, -1, 0)                        # -1: the uid stays
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (QEMU_UID, 0)
    with pytest.raises(PermissionError):
        os.chmod(p, 0o4755)                   # setuid bits are not kept
    with pytest.raises(PermissionError):
        os.chmod(mnt.mp / "disks", 0o777)     # the directories are fixed
    fd = os.open(p, os.O_RDWR)
    try:
        os.fchmod(fd, 0o600)   # through the descriptor too
        assert os.fstat(fd).st_mode & 0o777 == 0o600
        os.pwrite(fd, b"still writable", 4096)
    finally:
        os.close(fd)
    assert os.stat(mnt.disk("other")).st_mode & 0o777 == 0o600   # per disk
    mnt.restart()
    st = os.stat(mnt.disk("vm"))
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, QEMU_UID, 0)
    with open(mnt.disk("vm"), "rb") as f:
        f.seek(4096)
        assert f.read(14) == b"still writable"
    # a deleted and re-made disk starts from the defaults again
    disks.delete(state, "vm")
    disks.create(state, "vm", 8 * MiB)
    wait_for(lambda: os.path.exists(mnt.disk("vm")) and os.stat(mnt.disk("vm")).st_uid == 0,
             timeout_s=10, what="the new disk with default owner")


def test_xattrs_as_the_kernel_expects(state, mnt):
    disks.create(state, "vm", 8 * MiB)
    p = mnt.disk("vm")
    wait_for(p.exists, what="disk file")
    assert os.listxattr(p) == []
    with pytest.raises(OSError) as ei:
        os.getxattr(p, "user.none")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:
        os.getxattr(p, "security.capability")   # asked before writes: answered at once
    assert ei.value.errno == errno.ENODATA
    # what libvirt's DAC driver keeps (remember_owner)
    os.setxattr(p, DAC, b"+0:+0")
    os.setxattr(p, "trusted.libvirt.security.ref_dac", b"1")
    os.setxattr(p, "user.note", b"")
    assert os.getxattr(p, DAC) == b"+0:+0"
    assert os.getxattr(p, "user.note") == b""
    assert sorted(os.listxattr(p)) == sorted([DAC, "trusted.libvirt.security.ref_dac", "user.note"])
    os.setxattr(p, DAC, b"+64055:+64055")     # replace
    assert os.getxattr(p, DAC) == b"+64055:+64055"
    with pytest.raises(FileExistsError):
        os.setxattr(p, DAC, b"x", os.XATTR_CREATE)
    with pytest.raises(OSError) as ei:
        os.setxattr(p, "user.absent", b"x", os.XATTR_REPLACE)
    assert ei.value.errno == errno.ENODATA
    # the size query and a short buffer
    n, _ = _getxattr_size(p, DAC, 0)
    assert n == len(b"+64055:+64055")
    n, e = _getxattr_size(p, DAC, 3)
    assert n == -1 and e == errno.ERANGE
    # other namespaces are refused clearly, and nothing is stored for them
    for name in ("security.selinux", "system.blockcrypt", "foo.bar", "user."):
        with pytest.raises(OSError) as ei:
            os.setxattr(p, name, b"x")
        assert ei.value.errno in (errno.EOPNOTSUPP, errno.EINVAL), (name, ei.value)
    # bounds: a value of 4 KiB fits, one byte more does not; at most 32 per disk
    os.setxattr(p, "user.big", b"v" * 4096)
    with pytest.raises(OSError) as ei:
        os.setxattr(p, "user.big", b"v" * 4097)
    assert ei.value.errno == errno.ENOSPC
    assert os.getxattr(p, "user.big") == b"v" * 4096
    os.removexattr(p, "user.big")
    for i in range(29):
        os.setxattr(p, f"user.n{i}", b"1")
    with pytest.raises(OSError) as ei:
        os.setxattr(p, "user.one-too-many", b"1")
    assert ei.value.errno == errno.ENOSPC
    for i in range(29):
        os.removexattr(p, f"user.n{i}")
    os.removexattr(p, "user.note")
    with pytest.raises(OSError) as ei:
        os.removexattr(p, "user.note")
    assert ei.value.errno == errno.ENODATA
    # directories have none and take none
    assert os.listxattr(mnt.mp / "disks") == []
    with pytest.raises(PermissionError):
        os.setxattr(mnt.mp / "disks", "user.x", b"1")
    # writes still work (the kernel checks security.capability on them)
    with open(p, "r+b") as f:
        f.write(b"data after xattrs")
    mnt.restart()
    p = mnt.disk("vm")
    assert sorted(os.listxattr(p)) == sorted([DAC, "trusted.libvirt.security.ref_dac"])
    assert os.getxattr(p, DAC) == b"+64055:+64055"
    with open(p, "rb") as f:
        assert f.read(17) == b"data after xattrs"


def _as_qemu(*cmd):
    return subprocess.run(["setpriv", f"--reuid={QEMU_UID}", f"--regid={QEMU_UID}", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def open_mnt(state):
    """An --allow-other mount on a mount point an unprivileged user can reach (pytest's tmp
    directories are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="bc-allow-other-"))
    base.chmod(0o755)
    mp = base / "mnt"
    mp.mkdir()
    m = Mount(state, mp, allow_other=True).start()
    yield m
    cleanup_tree(base, state)
    shutil.rmtree(base, ignore_errors=True)


def test_a_disk_chowned_to_the_qemu_user_is_usable_by_it(state, open_mnt):
    need("setpriv", "dd")
    disks.create(state, "vm", 8 * MiB)
    p = open_mnt.disk("vm")
    wait_for(p.exists, what="disk file")
    r = _as_qemu("dd", f"if={p}", "of=/dev/null", "bs=4096", "count=1", "status=none")
    assert r.returncode != 0 and "Permission denied" in r.stderr   # root:disk 0660: not for qemu yet
    os.chown(p, QEMU_UID, QEMU_UID)   # what libvirt's DAC driver does before it starts QEMU
    os.chmod(p, 0o600)
    r = _as_qemu("dd", "if=/dev/urandom", f"of={p}", "bs=4096", "count=4", "seek=8", "conv=notrunc,fsync",
                 "oflag=direct", "status=none")
    assert r.returncode == 0, r.stderr
    r = _as_qemu("dd", f"if={p}", "of=/dev/null", "bs=4096", "count=16", "iflag=direct", "status=none")
    assert r.returncode == 0, r.stderr
    with open(p, "rb") as f:
        f.seek(8 * 4096)
        assert f.read(4 * 4096) != bytes(4 * 4096)
    os.chown(p, 0, 0)   # and back, as libvirt restores the owner when the VM stops
    r = _as_qemu("dd", f"if={p}", "of=/dev/null", "bs=4096", "count=1", "status=none")
    assert r.returncode != 0
