"""Small helpers shared by the benchmark modules: commands, mounts, caches, CPU time.

Caveats: mount detection reads /proc/self/mountinfo, so a mount made in another
mount namespace is invisible; CPU time comes from /proc/PID/stat in clock ticks
(usually 10 ms), which is coarse for jobs shorter than a second.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A one-line problem the runner reports without a traceback."""


def need_tool(name: str, hint: str) -> str:
    """Path of executable `name`, or BenchError naming how to install it."""
    path = shutil.which(name)
    if not path:
        raise BenchError(f"{name} not found; {hint}")
    return path


def run(cmd: list[str], *, timeout_s: float = 120, check: bool = True,
        input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a command, capture its output; a failure becomes a BenchError with its stderr."""
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, input=input_bytes)
    except FileNotFoundError:
        raise BenchError(f"{cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd[:3])} ... timed out after {timeout_s:.0f} s") from None
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout or b"").decode(errors="replace").strip().splitlines()
        last = err[-1] if err else f"exit status {proc.returncode}"
        raise BenchError(f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} failed: {last}")
    return proc


def _unescape_mountinfo(field: str) -> str:
    # one parser of /proc/self/mountinfo escapes: blockcrypt's (blockcrypt/mount/daemon.py
    # since the package layout, blockcrypt/mount.py before it)
    try:
        from blockcrypt.mount.daemon import _unescape
    except ImportError:
        from blockcrypt.mount import _unescape
    return _unescape(field)


def mount_points() -> dict[str, str]:
    """Mounted paths -> file system type, from /proc/self/mountinfo."""
    result = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if len(parts) >= 5:
                fstype = right.split()[0] if right else "?"
                result[_unescape_mountinfo(parts[4])] = fstype
    return result


def is_mounted(path: Path | str) -> bool:
    return str(Path(path).absolute()) in mount_points()


def wait_until(pred, timeout_s: float, what: str, poll_s: float = 0.05, alive=None) -> None:
    """Poll `pred` until true; BenchError after `timeout_s`, or at once if `alive()` turns false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        if alive is not None and not alive():
            raise BenchError(f"{what}: the process exited before it was ready")
        time.sleep(poll_s)
    raise BenchError(f"{what}: not ready after {timeout_s:.0f} s")


def unmount(path: Path | str, timeout_s: float = 10) -> None:
    """Unmount a FUSE (or any) mount; fall back to a lazy unmount. Never raises."""
    path = str(path)
    if not is_mounted(path):
        return
    for cmd in (["umount", path], ["fusermount", "-u", "-z", path], ["umount", "-l", path]):
        try:
            subprocess.run(cmd, capture_output=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if not is_mounted(path):
            return


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_pid(pid: int | None, timeout_s: float = 5) -> None:
    """SIGTERM, wait, then SIGKILL a process we started. Never raises."""
    if not pid_alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)


def cpu_times(pid: int | None) -> tuple[float, float] | None:
    """(user, system) seconds of a process (all its threads); None when unknown."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the comm field: state is [0], utime is field 14 overall -> [11], stime [12]
    return int(fields[11]) / CLOCK_TICKS_PER_S, int(fields[12]) / CLOCK_TICKS_PER_S


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None when unknown."""
    t = cpu_times(pid)
    return None if t is None else t[0] + t[1]


def host_cpu_ticks() -> tuple[int, int, int]:
    """(busy, user, total) jiffies of the whole host from /proc/stat: busy is user + nice +
    system, user is user + nice (interrupt time, which our own I/O causes, and hypervisor
    steal are left out)."""
    with open("/proc/stat", encoding="ascii") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    total = sum(vals[:8])
    return vals[0] + vals[1] + vals[2], vals[0] + vals[1], total


def drop_caches() -> None:
    """sync; echo 3 > /proc/sys/vm/drop_caches (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
    except OSError as e:
        raise BenchError(f"cannot drop caches ({e.strerror}); run as root") from None


REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def reported_kib() -> int | None:
    """KiB of free memory the guest has reported to the host so far (free page reporting),
    or None on a kernel that does not export the counter."""
    try:
        return int(REPORTED_KIB.read_text().strip())
    except (OSError, ValueError):
        return None


def prefault_anon(mib: int) -> None:
    """Fault in `mib` MiB of anonymous memory (MAP_POPULATE) and free it again at once, so the
    next allocations reuse pages the host has backed instead of ones it has taken back."""
    import mmap
    if mib <= 0:
        return
    m = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
    try:
        if not getattr(mmap, "MAP_POPULATE", 0):  # touch one byte per page
            for off in range(0, mib << 20, mmap.PAGESIZE):
                m[off] = 1
    finally:
        m.close()


def prefault_pagecache(path: Path, mib: int) -> None:
    """Pull `mib` MiB of page cache in (reading a sparse scratch file) and drop it again
    (POSIX_FADV_DONTNEED), the page-cache counterpart of prefault_anon."""
    if mib <= 0:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, mib << 20)
        chunk = 1 << 20
        for off in range(0, mib << 20, chunk):
            os.pread(fd, chunk, off)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass


def first_line(cmd: list[str]) -> str:
    """First output line of a version command, or 'unknown'."""
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (proc.stdout or proc.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unknown"


def host_busy_pct(window_s: float = 0.5) -> float:
    """Share of all CPUs busy over the next `window_s` seconds."""
    b0, _, t0 = host_cpu_ticks()
    time.sleep(window_s)
    b1, _, t1 = host_cpu_ticks()
    return 100.0 * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def wait_quiet(max_wait_s: float, busy_pct: float = 10.0, window_s: float = 0.5) -> tuple[float, float]:
    """Wait until the host is nearly idle (our daemons are idle between jobs).

    Returns (seconds waited, busy % of the last window); gives up after `max_wait_s`.
    """
    if max_wait_s <= 0:
        return 0.0, -1.0
    t0 = time.monotonic()
    while True:
        pct = host_busy_pct(window_s)
        waited = time.monotonic() - t0
        if pct <= busy_pct or waited >= max_wait_s:
            return waited, pct
