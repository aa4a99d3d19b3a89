"""Host hardening of the mount daemon, on a real mount, over both front ends: its core limit
is 0 (/proc/PID/limits), it says it is non-dumpable (status file, log), the kernel treats it
as non-dumpable, and a core forced from it (SIGSEGV) is not written, while the same signal to
an ordinary process here does write one (the OS makes cores; the daemon's settings stop them).

Linux shows no dumpable flag in /proc/PID/status (only CoreDumping), so the kernel's own check
is the proof: a mount started without CAP_SYS_PTRACE, and a reader with the same capabilities,
is refused /proc/PID/mem (a non-dumpable target needs CAP_SYS_PTRACE), while an ordinary
process started the same way is not."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockcrypt.mount import daemon as bmount

from support.fusehelpers import CLI, need, sh, wait_for

def core_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit line in /proc/PID/limits")


def core_files(d: Path) -> set[str]:
    return {p.name for p in d.glob("core*")}


def core_pattern() -> str:
    return Path("/proc/sys/kernel/core_pattern").read_text().strip()


def force_core(pid: int, timeout_s: float = 20.0) -> None:
    """SIGSEGV (a signal whose default action dumps core) and wait for the process to die."""
    os.kill(pid, signal.SIGSEGV)
    wait_for(lambda: not bmount._pid_alive(pid), timeout_s=timeout_s, what=f"pid {pid} to die")


def control_process_dumps_core(where: Path) -> bool:
    """An ordinary process with core dumps allowed, killed the same way, in ``where``."""
    def allow():
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=where, preexec_fn=allow)
    time.sleep(0.3)
    p.send_signal(signal.SIGSEGV)
    p.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not core_files(where) and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(core_files(where))


def test_the_daemon_says_non_dumpable_with_no_core_limit(mnt):
    pid = mnt.pid
    assert core_limit(pid) == ("0", "0")
    assert "CoreDumping:\t0" in Path(f"/proc/{pid}/status").read_text()
    entry = json.loads(bmount.Registry(mnt.state).path(mnt.info["id"]).read_text())
    assert entry["hostHardening"] == {"dumpable": False, "coreLimit": 0}
    log = Path(mnt.info["log"]).read_text()
    assert "host hardening: core dumps off, process non-dumpable" in log


def test_a_core_forced_from_the_daemon_is_not_written(mnt, state, root):
    pattern = core_pattern()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} is not a plain file name in the process's cwd")
    control = root / "control"
    control.mkdir()
    assert control_process_dumps_core(control), "the OS writes no core even for an ordinary process"
    from blockcrypt.control import disks
    disks.create(state, "d1", 16 << 20)
    wait_for(lambda: mnt.disk("d1").exists(), what="disk listed")
    fd = os.open(mnt.disk("d1"), os.O_RDWR)  # an open disk: its key is in the daemon's memory
    try:
        os.pwrite(fd, b"HARDENING-MARKER" * 256, 0)
        os.fsync(fd)
        cwd = Path(os.readlink(f"/proc/{mnt.pid}/cwd"))
        before = core_files(cwd)
        force_core(mnt.pid)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    time.sleep(1.0)  # a core is written before the process is reaped; leave it time anyway
    assert core_files(cwd) == before, f"a core file appeared in {cwd}"


NO_PTRACE = ["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace", "--"]


def _mem_readable(pid: int) -> bool:
    p = sh(*NO_PTRACE, sys.executable, "-c", f"open('/proc/{pid}/mem', 'rb').close()", check=False)
    if p.returncode != 0:
        assert "Permission denied" in p.stderr, p.stderr
    return p.returncode == 0


def test_the_kernel_treats_the_daemon_as_non_dumpable(state, root, frontend):
    need("setpriv")
    mp = root / "mnt"
    mp.mkdir()
    ordinary = subprocess.Popen([*NO_PTRACE, "sleep", "60"])
    try:
        p = sh(*NO_PTRACE, *CLI, "--state", state.path, "mount", mp, "--frontend", frontend, "--json")
        pid = json.loads(p.stdout)["pid"]
        time.sleep(0.2)
        assert _mem_readable(ordinary.pid)  # same capabilities, dumpable: the kernel lets us in
        assert not _mem_readable(pid)       # non-dumpable: refused without CAP_SYS_PTRACE
    finally:
        ordinary.kill()
        ordinary.wait()
        bmount.umount(state, str(mp))
