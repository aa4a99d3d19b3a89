"""Helpers for the FUSE integration tests: a real detached mount daemon, loop
devices, and a teardown that always unmounts and detaches, even when a test
fails half-way (the fixtures in conftest.py use them).

Everything is real: /dev/fuse, fusermount, losetup, mkfs.ext4, fio, qemu-img.
A test whose tool is missing fails and names it (scripts/install-deps.sh installs them all).

Caveat: needs root (loop devices, mount); tests run serially.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from blockcrypt.mount import daemon as bmount
from blockcrypt.control.state import State

CLI = [sys.executable, "-m", "blockcrypt.cli"]


def need(*tools):
    """Fail (not skip: only a missing /dev/fuse skips) when a tool the test drives is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run scripts/install-deps.sh (make deps)")


def sh(*cmd, check=True, **kw):
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, **kw)


def mounted_below(root: Path) -> list[str]:
    """Mount points at or below root, deepest first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = bmount._unescape(line.split()[4])
            if mp == str(root) or mp.startswith(str(root) + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def loops_backed_below(root: Path) -> list[str]:
    p = sh("losetup", "-l", "-J", check=False)
    if p.returncode != 0 or not p.stdout.strip():
        return []
    devs = []
    for d in json.loads(p.stdout).get("loopdevices", []):
        bf = (d.get("back-file") or "").replace(" (deleted)", "")
        if bf == str(root) or bf.startswith(str(root) + "/"):
            devs.append(d["name"])
    return devs


def _fstype(mp: str) -> str:
    t = bmount.mounts_at(mp)
    return t[-1] if t else ""


def cleanup_tree(root: Path, state: State | None = None) -> None:
    """Unmount everything below root and detach loop devices on files below it; never raises.

    Order: file systems on loop devices, the loop devices, blockcrypt mounts (through
    `umount`, else kill the daemon and unmount lazily), then whatever is left (tmpfs)."""
    for mp in mounted_below(root):
        if _fstype(mp) not in (bmount.FSTYPE, "tmpfs"):
            if sh("umount", mp, check=False).returncode != 0:
                sh("umount", "-l", mp, check=False)
    for dev in loops_backed_below(root):
        sh("losetup", "-d", dev, check=False)
    if state is not None:
        for e in bmount.Registry(state).entries():
            pid, mp = e.get("pid"), e.get("mountpoint")
            if mp and bmount.mounts_at(mp):
                try:
                    bmount.umount(state, mp, timeout_s=20)
                except Exception:
                    pass
            if bmount._pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    for mp in mounted_below(root):
        if _fstype(mp) == bmount.FSTYPE:
            sh("fusermount", "-u", "-z", mp, check=False)
    for mp in mounted_below(root):
        if sh("umount", mp, check=False).returncode != 0:
            sh("umount", "-l", mp, check=False)


class Mount:
    """A running blockcrypt mount of ``state`` at ``mp``."""

    def __init__(self, state: State, mp: Path, **opts):
        self.state = state
        self.mp = mp
        self.opts = opts
        self.info = None

    def start(self):
        self.info = bmount.mount(self.state, str(self.mp), **self.opts)
        return self

    @property
    def pid(self) -> int:
        return self.info["pid"]

    def disk(self, name: str) -> Path:
        return self.mp / "disks" / name

    def stop(self):
        bmount.umount(self.state, str(self.mp))

    def restart(self):
        self.stop()
        return self.start()

    def kill9(self):
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while bmount._pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def assert_clean_logs(state: State) -> None:
    """No request fell into fusepy's EINVAL catch-all and nothing crashed."""
    for lp in (state.path / "logs").glob("mount*.log*"):
        text = lp.read_text(errors="replace")
        assert "returning errno.EINVAL" not in text, f"{lp}: fusepy catch-all hit:\n{text[-3000:]}"
        assert "unexpected" not in text, f"{lp}: internal error:\n{text[-3000:]}"


def bc(state: State, *args, check=True, env=None, codes=(0,)):
    """Run the blockcrypt CLI on this state directory (``codes``: the exit codes that pass
    ``check``, e.g. `status`'s 51 while a disk is meant to be stopped)."""
    p = subprocess.run([*CLI, "--state", str(state.path), *map(str, args)], capture_output=True,
                       text=True, env=env)
    if check and p.returncode not in codes:
        raise AssertionError(f"blockcrypt {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}")
    return p


def bc_json(state: State, *args, codes=(0,)):
    return json.loads(bc(state, *args, "--json", codes=codes).stdout)


@contextmanager
def loopdev(path: Path, *opts):
    """A loop device on ``path`` (``opts``: more losetup options, e.g. --read-only), detached after."""
    dev = sh("losetup", "--find", "--show", *opts, path).stdout.strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            if sh("losetup", "-d", dev, check=False).returncode == 0:
                break
            time.sleep(0.1)


@contextmanager
def mounted_fs(dev: str, where: Path, *opts):
    where.mkdir(exist_ok=True)
    sh("mount", *opts, dev, where)
    try:
        yield where
    finally:
        for _ in range(50):
            if sh("umount", where, check=False).returncode == 0:
                break
            time.sleep(0.1)


def backing_path(state: State, name: str) -> Path:
    return Path(state.catalog.get_disk(name).path)


def wait_for(pred, timeout_s=5.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def direct_io(path, write: bool, off: int = 1 << 20) -> int:
    """One 4 KiB O_DIRECT request (no page cache in the way) on a path (opened for it) or an
    open fd (a VM that keeps its disk open): 0 or the errno."""
    buf = mmap.mmap(-1, 4096)
    if isinstance(path, int):
        fd, own = path, False
    else:
        own = True
        try:
            fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
        except OSError as e:
            return e.errno
    try:
        if write:
            buf.write(os.urandom(4096))
            os.pwritev(fd, [buf], off)
        else:
            os.preadv(fd, [buf], off)
        return 0
    except OSError as e:
        return e.errno
    finally:
        if own:
            os.close(fd)
        buf.close()


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    """fallocate(2) with its mode bits (punch a hole, zero a range), which os does not offer;
    OSError with the errno on failure."""
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def until(pred, timeout_s):
    """Seconds until pred() holds (polling every 20 ms), or None at the timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.02)
    return None
