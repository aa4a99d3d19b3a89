"""Mount, unmount and list the FUSE daemons that serve a state directory's disks.

``mount()`` checks the mount point, then either serves in the foreground or
starts a detached daemon (``python -m blockcrypt.mount serve --daemon``: it
forks once more, so the daemon belongs to init, starts a new session and logs
to ``STATE/logs/mount.log``) and waits until the mount answers (the daemon
lists its own mount point through FUSE before it says it is ready), so that a
returned ``mount()`` means a usable mount and a failed one gives the daemon's
own one-line error.

Logs: ``STATE/logs/mount.log`` rotates by size (settings ``log_max_bytes``,
``log_files``), the daemon's stderr following the current file; under systemd
(``$JOURNAL_STREAM`` names stderr) the daemon logs to stderr only, with syslog
priority prefixes, for the journal. Under systemd ``Type=notify``
(``$NOTIFY_SOCKET``) the daemon sends ``READY=1`` once the mount answers and
``STOPPING=1`` when it leaves its loop (_util/sdnotify.py). With a metrics
address (``--metrics`` or the ``metrics_listen`` setting) it serves Prometheus
metrics (mount/metrics.py) from before it is ready until it stops.

The status registry is ``STATE/run/mount-<id>.json``, one file per running
daemon, written atomically by the daemon when it starts and whenever a disk is
opened, closed or fails to open; the daemon removes it when it exits.
``status()`` reads these files and checks each pid and ``/proc/self/mountinfo``,
so a killed daemon shows up as dead (with its stale mount) instead of vanishing.

``umount()`` runs ``fusermount -u`` (refused by the kernel while a file or loop
device is still open: we say so rather than detach lazily) and waits for the
daemon to flush, close its disks and exit. SIGTERM/SIGINT/SIGHUP to the daemon
make libfuse leave its loop, unmount (lazily) and call ``destroy``, which
flushes and closes every disk. A mount whose daemon died (kill -9) is cleaned
with a lazy unmount by ``umount`` and automatically by the next ``mount`` on
that mount point.

Caveats: one live mount per state directory, enforced by an flock on
``STATE/run/mount.lock`` that the daemon holds for its life (two daemons would each hold
their own Volume on the same disk file and their read-modify-write locks
would not see each other); a null-cipher mount (``--bench-null-cipher``)
writes PLAINTEXT into the disk files and is for benchmarks on scratch disks
only (it is labelled in ``status`` and in the log).
"""
from __future__ import annotations

import fcntl
import functools
import json
import logging
import logging.handlers
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .._util.fsutil import atomic_write
from ..errors import BlockcryptError, Busy, MountError, UsageError
from . import tree

log = logging.getLogger("blockcrypt.mount")

#: modules the daemon starts when present: ``start_in_daemon(fs, state)`` is called once the
#: file system object exists (before mounting) and may return a callable that stops it
#: (e.g. the customer-managed-key checker that revokes and restores open volumes).
DAEMON_PLUGINS = ("blockcrypt.mount.monitor", "blockcrypt.mount.switch")

READY_TIMEOUT_S = 30.0
UMOUNT_TIMEOUT_S = 60.0
BUSY_RETRY_S = 2.0
FSTYPE = "fuse.blockcrypt"


# --- /proc/self/mountinfo ------------------------------------------------------------

def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_at(path: str) -> list[str]:
    """File system types mounted exactly at ``path`` (innermost last)."""
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and _unescape(fields[4]) == path:
                    found.append(right.split()[0])
    except OSError:
        pass
    return found


def _pid_alive(pid) -> bool:
    """Process ``pid`` has not ended: it runs, or its main thread is a zombie while other threads
    of it still exit. Those hold its open files (the state lock's flock among them) until the last
    one is gone, which under load can take a while after a kill -9; a zombie alone is gone (its
    parent may never reap it)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return False
    state = st.rpartition(")")[2].split()[0]
    if state not in ("Z", "X"):
        return True
    try:
        return any(tid != str(pid) for tid in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False


def _daemon_pids(mp: str) -> list[int]:
    """Mount daemons serving ``mp`` found in /proc (for when the registry could not be written)."""
    want = ["blockcrypt.mount", "serve", "--mountpoint", mp]
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(w in argv for w in want) and argv[argv.index("--mountpoint") + 1] == mp:
            if _pid_alive(int(d)):
                out.append(int(d))
    return out


# --- registry ----------------------------------------------------------------------------

class Registry:
    """``STATE/run/mount-<id>.json``: one file per mount daemon."""

    def __init__(self, state):
        self.dir = Path(state.path) / "run"

    def path(self, mount_id: str) -> Path:
        return self.dir / f"mount-{mount_id}.json"

    def write(self, entry: dict) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        atomic_write(self.path(entry["id"]), json.dumps(entry, indent=1, sort_keys=True).encode())

    def remove(self, mount_id: str) -> None:
        try:
            self.path(mount_id).unlink()
        except FileNotFoundError:
            pass

    def entries(self) -> list[dict]:
        out = []
        if not self.dir.is_dir():
            return out
        for p in sorted(self.dir.glob("mount-*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue  # being replaced, or half-written by a dead daemon
        return out


LOCK_NAME = "mount.lock"


def _take_state_lock(state) -> int | None:
    """An exclusive flock on STATE/run/mount.lock, held by the daemon for its whole life (the
    kernel drops it when the process dies, even by kill -9). None when another daemon holds it."""
    d = Path(state.path) / "run"
    d.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _state_locked(state) -> bool:
    fd = _take_state_lock(state)
    if fd is None:
        return True
    os.close(fd)
    return False


def _live(entry: dict) -> bool:
    """The entry's daemon still runs (and its pid was not reused by something else)."""
    pid = entry.get("pid")
    if not _pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"blockcrypt" in f.read()
    except OSError:
        return False


def _describe(entry: dict) -> dict:
    mp = entry.get("mountpoint", "")
    alive = _live(entry)
    mounted = FSTYPE in mounts_at(mp)
    if alive and mounted:
        state = "running"
    elif alive and time.time() - (entry.get("started") or time.time()) > READY_TIMEOUT_S + 5:
        state = f"dead (its mount point is gone but the daemon, pid {entry.get('pid')}, still runs)"
    elif alive:
        state = "starting"
    elif mounted:
        state = "dead (stale mount: run `blockcrypt umount " + mp + "`)"
    else:
        state = "dead"
    out = dict(entry)
    out["state"] = state
    out.setdefault("disks", [])
    return out


# --- mount ---------------------------------------------------------------------------------

def _check_mountpoint(reg: Registry, mp: str) -> None:
    if not os.path.lexists(mp) and not mounts_at(mp):
        raise UsageError(f"mount point {mp} does not exist (create the directory first)")
    types = mounts_at(mp)
    if types:
        stale = [e for e in reg.entries() if e.get("mountpoint") == mp and not _live(e)]
        if types[-1] == FSTYPE and stale:
            log.info("cleaning the stale mount of a dead daemon at %s", mp)
            _lazy_unmount(mp)
            for e in stale:
                reg.remove(e["id"])
            if mounts_at(mp):
                raise Busy(f"mount point {mp} is still mounted after cleaning a stale mount")
        else:
            raise Busy(f"mount point {mp} is already a mount point ({types[-1]}); "
                       f"unmount it first (`blockcrypt umount {mp}`)")
    if not os.path.isdir(mp):
        raise UsageError(f"mount point {mp} is not a directory")
    if os.listdir(mp):
        raise UsageError(f"mount point {mp} is not empty")


def _check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module (`modprobe fuse`) or run where FUSE is available")


FRONTENDS = ("native", "fusepy")
BACKING_CACHES = ("buffered", "none")


def mount(state, mountpoint: str, *, foreground: bool = False, allow_other: bool = False,
          null_cipher: bool = False, frontend: str | None = None, backing_cache: str = "buffered",
          temp_disks=None, temp_dir: str | None = None, encryption_at_host: bool | None = None,
          ready_timeout_s: float = READY_TIMEOUT_S, metrics: str | None = None,
          metrics_allow_remote: bool = False) -> dict:
    """Mount ``state``'s disks at ``mountpoint``. Returns the registry entry (background) or
    blocks until unmounted (foreground). ``temp_disks`` (``NAME:SIZE`` texts), ``temp_dir`` and
    ``encryption_at_host``: None takes the catalog setting, read now and never again.
    ``metrics``: HOST:PORT of the Prometheus endpoint ("off": none; None: the
    ``metrics_listen`` setting); a non-loopback address needs ``metrics_allow_remote``."""
    from .temp_source import TempConfig
    frontend = frontend or os.environ.get("BLOCKCRYPT_FRONTEND") or "native"
    if frontend not in FRONTENDS:
        raise UsageError(f"unknown front end {frontend!r} (use {' or '.join(FRONTENDS)})")
    if backing_cache not in BACKING_CACHES:
        raise UsageError(f"unknown backing cache mode {backing_cache!r} (use {' or '.join(BACKING_CACHES)})")
    temp = TempConfig.resolve(state, temp_disks, temp_dir, encryption_at_host)  # bad specs fail here
    metrics = resolve_metrics(state, metrics, metrics_allow_remote)
    mp = os.path.realpath(mountpoint)
    reg = Registry(state)
    if _state_locked(state):  # the daemon's flock is the authority; the registry only informs
        live = [e for e in reg.entries() if _live(e)]
        where = f" at {live[0].get('mountpoint')} (pid {live[0].get('pid')})" if live else ""
        raise Busy(f"state directory {state.path} is already mounted{where}; "
                   f"one mount per state directory")
    _check_fuse()
    _check_mountpoint(reg, mp)
    mount_id = secrets.token_hex(4)
    if foreground:
        serve(state.path, mp, mount_id, allow_other=allow_other, null_cipher=null_cipher,
              frontend=frontend, backing_cache=backing_cache, temp=temp, log_to_stderr=True,
              metrics=metrics, metrics_allow_remote=metrics_allow_remote)
        return {"id": mount_id, "mountpoint": mp}
    return _spawn(state, mp, mount_id, allow_other=allow_other, null_cipher=null_cipher,
                  frontend=frontend, backing_cache=backing_cache, temp=temp, ready_timeout_s=ready_timeout_s,
                  metrics=metrics, metrics_allow_remote=metrics_allow_remote)


def resolve_metrics(state, metrics: str | None, allow_remote: bool = False) -> str | None:
    """The metrics address a mount serves on (None: none), checked now: an option beats the
    ``metrics_listen`` setting; ``off`` or empty turns it off."""
    from .._util.metricsweb import check_listen
    if metrics is None:
        from ..control import settings
        metrics = settings.get(state, "metrics_listen")
    metrics = (metrics or "").strip()
    if metrics in ("", "off"):
        return None
    check_listen(metrics, allow_remote)
    return metrics


def log_path(state, mount_id: str | None = None) -> Path:
    """The mount log of a state directory (one daemon at a time; rotated by size)."""
    return Path(state.path) / "logs" / "mount.log"


def _spawn(state, mp: str, mount_id: str, *, allow_other: bool, null_cipher: bool, frontend: str,
           backing_cache: str, temp, ready_timeout_s: float, metrics: str | None = None,
           metrics_allow_remote: bool = False) -> dict:
    lp = log_path(state, mount_id)
    lp.parent.mkdir(mode=0o700, exist_ok=True)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "blockcrypt.mount", "serve", "--daemon", "--state", str(state.path),
           "--mountpoint", mp, "--id", mount_id, "--ready-fd", str(w), "--frontend", frontend,
           "--backing-cache", backing_cache]
    if allow_other:
        cmd.append("--allow-other")
    if null_cipher:
        cmd.append("--bench-null-cipher")
    cmd += temp.argv()
    if metrics:
        cmd += ["--metrics", metrics] + (["--metrics-allow-remote"] if metrics_allow_remote else [])
    logf = open(lp, "ab")
    try:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 pass_fds=(w,), close_fds=True, start_new_session=True)
    finally:
        os.close(w)
        logf.close()
    try:
        child.wait(timeout=ready_timeout_s)  # the intermediate process exits after its fork
        msg = b""
        deadline = time.monotonic() + ready_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MountError(f"the mount daemon did not come up within {ready_timeout_s:.0f} s; see {lp}")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 256)
            if not chunk:
                break
            msg += chunk
            if msg.endswith(b"\n"):
                break
    except subprocess.TimeoutExpired:
        child.kill()
        raise MountError(f"the mount daemon did not start; see {lp}") from None
    finally:
        os.close(r)
    if not msg.startswith(b"ready "):
        raise MountError(_failure_line(lp, mount_id) or f"the mount daemon failed; see {lp}")
    pid = int(msg.split()[1])
    out = {"id": mount_id, "pid": pid, "mountpoint": mp, "log": str(lp), "nullCipher": null_cipher,
            "allowOther": allow_other, "frontend": frontend, "backingCache": backing_cache,
            "encryptionAtHost": temp.encryption_at_host, "tempDir": temp.temp_dir,
            "tempDisks": [s.name for s in temp.specs]}
    if metrics:
        entry = next((e for e in Registry(state).entries() if e.get("id") == mount_id), {})
        out["metricsUrl"] = entry.get("metricsUrl")
    return out


def _failure_line(lp: Path, mount_id: str) -> str | None:
    try:
        text = lp.read_text(errors="replace")
    except OSError:
        return None
    start = text.rfind(f"mount {mount_id} starting")
    lines = [l.strip() for l in text[max(start, 0):].splitlines() if l.strip()]
    for l in lines:  # libfuse's own complaint says it best ("fuse: mountpoint is not empty")
        if l.startswith("fuse:"):
            return f"cannot mount: {l[5:].strip()}"
    for l in lines:
        if "mount failed:" in l:
            return l.split("mount failed:", 1)[1].strip()
    return None


def _loops_on(mp: str) -> list[str]:
    """Loop devices whose backing file is under ``mp`` (as ``losetup -l -J`` names them)."""
    try:
        p = subprocess.run(["losetup", "-l", "-J"], capture_output=True, text=True, timeout=10)
        devs = json.loads(p.stdout or "{}").get("loopdevices", [])
    except (OSError, ValueError, subprocess.SubprocessError):
        return []
    return [d["name"] for d in devs
            if (d.get("back-file") or "").replace(" (deleted)", "").startswith(mp.rstrip("/") + "/")]


def _lazy_unmount(mp: str) -> None:
    fm = shutil.which("fusermount") or shutil.which("fusermount3")
    cmds = ([[fm, "-u", "-z", mp]] if fm else []) + [["umount", "-l", mp]]
    for cmd in cmds:
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return


def _unmount(mp: str) -> str | None:
    """Unmount now; None on success, else the tool's message."""
    fm = shutil.which("fusermount") or shutil.which("fusermount3")
    cmd = [fm, "-u", mp] if fm else ["umount", mp]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return None if p.returncode == 0 else (p.stderr.strip() or f"exit status {p.returncode}")


def umount(state, mountpoint: str, *, timeout_s: float = UMOUNT_TIMEOUT_S) -> dict:
    """Unmount a blockcrypt mount: the daemon flushes and closes its disks and exits."""
    mp = os.path.realpath(mountpoint)
    reg = Registry(state)
    entries = [e for e in reg.entries() if e.get("mountpoint") == mp]
    types = mounts_at(mp)
    if not types and not entries:
        raise UsageError(f"{mp} is not a blockcrypt mount point")
    if types and types[-1] != FSTYPE:
        raise UsageError(f"{mp} is not a blockcrypt mount point (it is {types[-1]})")
    pids = {e["pid"] for e in entries if _live(e)} | set(_daemon_pids(mp))
    if types:
        if pids:
            err = _unmount(mp)
            busy_until = time.monotonic() + BUSY_RETRY_S  # a just-detached loop device lets go late
            while err is not None and "busy" in err.lower() and time.monotonic() < busy_until:
                time.sleep(0.1)
                err = _unmount(mp)
            if err is not None:
                if "busy" in err.lower():
                    loops = _loops_on(mp)
                    if loops:
                        raise Busy(f"{mp} is busy: loop device(s) {', '.join(loops)} use its disk files; "
                                   f"unmount what is on them and detach them (`losetup -d`) first")
                    raise Busy(f"{mp} is busy: a disk file is still open; close it first "
                               f"(`fuser -m {mp}` shows who holds it)")
                raise MountError(f"cannot unmount {mp}: {err}")
        else:
            _lazy_unmount(mp)  # the daemon is gone: nothing left to flush
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            raise MountError(f"the daemon (pid {pid}) did not exit within {timeout_s:.0f} s "
                             f"after unmounting; see its log in {Path(state.path) / 'logs'}")
    for e in entries:
        reg.remove(e["id"])
    return {"mountpoint": mp, "unmounted": True, "ids": [e["id"] for e in entries]}


STATUS_REFRESH_TIMEOUT_S = 1.0


def _refresh(reg: Registry) -> None:
    """Ask each live daemon to rewrite its status file now (SIGUSR1) and wait for it: handle,
    error and I/O counts live in the engine and the C session, not in Python events."""
    waiting = {}
    for e in reg.entries():
        if e.get("frontend") and _live(e):  # daemons that know SIGUSR1 record their front end
            p = reg.path(e["id"])
            try:
                st0 = p.stat()
                waiting[p] = (st0.st_ino, st0.st_mtime_ns)
                os.kill(e["pid"], signal.SIGUSR1)
            except OSError:
                waiting.pop(p, None)
    deadline = time.monotonic() + STATUS_REFRESH_TIMEOUT_S
    while waiting and time.monotonic() < deadline:
        for p, t in list(waiting.items()):
            try:
                st1 = p.stat()
                if (st1.st_ino, st1.st_mtime_ns) != t:
                    del waiting[p]
            except OSError:
                del waiting[p]
        time.sleep(0.01)


def encryption_at_host(state) -> tuple[bool, str]:
    """Whether this state directory's disks are served with encryption at host, and whence
    that comes: the live mount's value (fixed when it started), else the catalog setting
    (what the next mount takes)."""
    for e in Registry(state).entries():
        if _live(e) and "encryptionAtHost" in e:
            return bool(e["encryptionAtHost"]), f"mount {e['id']}"
    from ..control import settings
    return bool(settings.get(state, "encryption_at_host")), "setting (applies at the next mount)"


def status(state) -> list[dict]:
    """Every registered mount of this state directory, with the state of its open disks."""
    reg = Registry(state)
    _refresh(reg)
    return [_describe(e) for e in reg.entries()]


def problems(mounts: list[dict]):
    """What `status` exits with for ``mounts`` (as status() gives them): None when every mount
    runs and every disk serves normally, else the error to raise (a StatusFinding), the worst
    first: a dead mount, then a stopped disk (key unavailable, or it failed to open), then a
    corrupt disk, then a disk serving on its grace period."""
    from ..errors import StatusDiskCorrupt, StatusDiskStopped, StatusMountDead, StatusServingOnGrace
    dead, stopped, corrupt, grace = [], [], [], []
    for m in mounts:
        if m["state"].startswith("dead"):
            dead.append(f"mount {m.get('id')} at {m.get('mountpoint')} is {m['state']}")
            continue
        for d in m.get("disks") or []:
            where = f"{d.get('dir', 'disks')}/{d.get('name')}"
            st = d.get("state")
            if st == "KeyUnavailable" or st == "failed":
                why = (d.get("keyError") or {}).get("reason") or (d.get("error") or {}).get("message", "")
                stopped.append(f"{where} {'serves until the next mount but its key is revoked' if d.get('serving') else 'is stopped'} ({why})")
            elif st == "Corrupt":
                n = d.get("integrityErrors")
                corrupt.append(f"{where} is corrupt ("
                               + (f"{n} integrity failure(s)" if n else (d.get("error") or {}).get("message", "")) + ")")
            elif st == "ServingOnGrace":
                grace.append(f"{where} serves on its grace period ({d.get('graceSecondsLeft', 0):.0f} s left)")
    for cls, found in ((StatusMountDead, dead), (StatusDiskStopped, stopped), (StatusDiskCorrupt, corrupt),
                       (StatusServingOnGrace, grace)):
        if found:
            return cls(found)
    return None


#: `disk show`'s state for a disk that no mount has open, from its health
CLOSED_STATES = {"Healthy": "closed", "KeyUnavailable": "KeyUnavailable", "Corrupt": "Corrupt",
                 "Truncated": "Corrupt", "Copying": "Copying"}


def disk_state(state, rec, health: str) -> dict:
    """The one state of disk ``rec`` for `disk show`: as the mount that has it open says
    (open, KeyUnavailable, ServingOnGrace, Corrupt, with their details and ``mountpoint``), else
    from its ``health`` (closed when Healthy)."""
    for m in status(state):
        if not m["state"].startswith("running"):
            continue
        for d in m.get("disks") or []:
            if d.get("dir", "disks") != "temp" and d.get("id") == rec.disk_id:
                keep = ("state", "serving", "keyError", "graceSecondsLeft", "graceEndsAt", "integrityErrors",
                        "lastKeyCheck", "stopsAt", "error")
                return {"state": d.get("state"), "mountpoint": m.get("mountpoint"),
                        **{k: d[k] for k in keep if k in d and k != "state"}}
    return {"state": CLOSED_STATES.get(health, health), "mountpoint": None}


def mount_with_disk_open(state, name: str, disk_id: str | None = None) -> str | None:
    """The mount point of a running mount of this state directory that has disk ``name``
    open (by name, or by ``disk_id``), or None."""
    for e in status(state):
        if not e["state"].startswith(("running", "starting")):
            continue
        for d in e.get("disks", []):
            if "error" not in d and (d.get("name") == name or (disk_id and d.get("id") == disk_id)):
                return e.get("mountpoint")
    return None


# --- the daemon ----------------------------------------------------------------------------

class _JournalFormatter(logging.Formatter):
    """``<N>name: message`` lines: journald reads the syslog priority N and adds the time."""
    PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def format(self, record):
        return f"<{self.PRIORITY.get(record.levelno, 6)}>" + super().format(record)


class _RotatingLog(logging.handlers.RotatingFileHandler):
    """Size-rotated log; in a detached daemon, stderr and stdout (libfuse's own lines, a
    traceback) follow the current file after each rotation."""

    def __init__(self, path, max_bytes: int, backups: int, own_std: bool):
        super().__init__(path, maxBytes=max_bytes, backupCount=backups)
        self.own_std = own_std

    def doRollover(self):
        super().doRollover()
        if self.own_std and self.stream is not None:
            for fd in (1, 2):
                try:
                    os.dup2(self.stream.fileno(), fd)
                except OSError:
                    pass


def _setup_logging(st, lp: Path, to_stderr: bool) -> str:
    """Log to the journal (stderr, when $JOURNAL_STREAM names it) or to the rotated file
    ``lp`` (and stderr in the foreground). Returns where the log goes, for status."""
    from .._util.sdnotify import under_journal
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if under_journal():
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
        root.addHandler(h)
        return "journal"
    from ..control import settings
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        max_bytes, backups = settings.get(st, "log_max_bytes"), settings.get(st, "log_files")
    except Exception:  # a busy catalog must not stop the mount
        max_bytes, backups = 10 << 20, 5
    h = _RotatingLog(lp, max_bytes, backups, own_std=not to_stderr)
    h.setFormatter(fmt)
    root.addHandler(h)
    if to_stderr:
        s = logging.StreamHandler(sys.stderr)
        s.setFormatter(fmt)
        root.addHandler(s)
    return str(lp)


def _announce_when_serving(mp: str, ready_fd: int | None, log_to_stderr: bool, st, mount_id: str,
                           timeout_s: float = READY_TIMEOUT_S) -> None:
    """Say "ready" (to ``mount()`` on ``ready_fd``, to systemd with READY=1) only once the
    mount answers: it is in the mount table and a listing of its root went through FUSE."""
    from .._util.sdnotify import notify
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if FSTYPE in mounts_at(mp) and os.listdir(mp):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            log.error("the mount at %s did not answer within %.0f s", mp, timeout_s)
            return
        time.sleep(0.02)
    log.info("mounted at %s", mp)
    notify("READY=1", f"STATUS=serving {st.path} at {mp} (mount {mount_id})")
    if ready_fd is not None:
        try:
            os.write(ready_fd, f"ready {os.getpid()}\n".encode())
            os.close(ready_fd)
        except OSError:
            pass
    if log_to_stderr:
        print(f"blockcrypt: mounted {st.path} at {mp} (id {mount_id}); Ctrl-C or "
              f"`blockcrypt umount {mp}` to unmount", file=sys.stderr, flush=True)


def serve(state_path, mp: str, mount_id: str, *, allow_other: bool = False, null_cipher: bool = False,
          frontend: str = "native", backing_cache: str = "buffered", temp=None, ready_fd: int | None = None,
          log_to_stderr: bool = False, metrics: str | None = None, metrics_allow_remote: bool = False) -> None:
    """Run the daemon in this process until unmounted or signalled. ``temp``: a TempConfig
    (None: the catalog settings, read now); ``metrics``: HOST:PORT of the Prometheus endpoint."""
    from ..control.state import State
    from .hostsec import harden
    from .temp_source import TempConfig, TempSource

    hardening = harden()  # before any key is unwrapped: no core file, no ptrace, ever
    st = State.open(state_path)
    lp = log_path(st, mount_id)
    lp.parent.mkdir(mode=0o700, exist_ok=True)
    log_to = _setup_logging(st, lp, log_to_stderr)
    log.info("host hardening: core dumps %s, process %s", "off" if hardening["coreLimit"] == 0 else
             f"LIMITED TO {hardening['coreLimit']} BYTES", "DUMPABLE" if hardening["dumpable"] else "non-dumpable")
    log.info("mount %s starting: %s at %s (pid %d, %s front end, backing cache %s)%s", mount_id, st.path, mp,
             os.getpid(), frontend, backing_cache,
             " with the NULL cipher: benchmarks only, data NOT encrypted" if null_cipher else "")
    lock_fd = _take_state_lock(st)  # kept open (and locked) until this process ends
    if lock_fd is None:
        raise Busy(f"state directory {st.path} is already mounted by another daemon; "
                   f"one mount per state directory")
    reg = Registry(st)
    temp = temp or TempConfig.resolve(st)
    temps = TempSource(temp, cache=backing_cache)
    temps.prepare()  # under the state lock: leftovers of a dead mount are nobody's
    log.info("encryption at host %s", "on: temp disks under ephemeral keys" if temp.encryption_at_host
             else "off: temp disks (if any) store PLAIN sectors on this host")
    # `status` sends SIGUSR1 to ask for a fresh status file (handle, error and I/O counts change
    # without an event). Blocked in every thread made from here on (libfuse's too) and taken by
    # one thread with sigwait, so it is served even while the main thread is inside libfuse.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    entry = {"id": mount_id, "pid": os.getpid(), "mountpoint": mp, "state": str(st.path),
             "started": time.time(), "log": log_to, "allowOther": allow_other,
             "nullCipher": null_cipher, "frontend": frontend, "backingCache": backing_cache,
             "cipher": "null (benchmark only, NOT ENCRYPTED)" if null_cipher else "aes-xts-plain64",
             "hostHardening": hardening, "encryptionAtHost": temp.encryption_at_host,
             "tempDir": temp.temp_dir, "tempDisks": temps.status(), "disks": []}

    def on_change(fs):
        entry["disks"] = fs.disk_status()["disks"]
        try:
            reg.write(entry)
        except OSError as e:
            log.warning("cannot update the status file: %s", e)

    def on_ready():  # the session runs: readiness waits in a thread until the mount answers
        threading.Thread(target=_announce_when_serving, args=(mp, ready_fd, log_to_stderr, st, mount_id),
                         name="bc-ready", daemon=True).start()

    sources = tree_sources(st, temps)
    if frontend == "native":
        from .native_fs import NativeFS
        ops = NativeFS(st, null_cipher=null_cipher, allow_other=allow_other, cache=backing_cache,
                       on_change=on_change, on_ready=on_ready, sources=sources)
        run = ops.run
    else:
        from . import fusepy_fs
        ops = fusepy_fs.DiskFS(st, null_cipher=null_cipher, allow_other=allow_other, cache=backing_cache,
                               on_change=on_change, on_ready=on_ready, sources=sources)
        run = functools.partial(fusepy_fs.run, ops, allow_other=allow_other)
    stops = []
    if metrics:
        from .metrics import start_metrics
        entry["metricsUrl"], stop_metrics = start_metrics(ops, st, entry, metrics, metrics_allow_remote)
        stops.append(stop_metrics)
        log.info("metrics at %s", entry["metricsUrl"])
    try:
        reg.write(entry)
    except OSError as e:  # a full state file system must not stop the disks from being served
        log.warning("cannot write the status file %s: %s", reg.path(mount_id), e)
    threading.Thread(target=_status_on_request, args=(on_change, ops), name="bc-status", daemon=True).start()
    stops += _start_plugins(ops, st)
    try:
        run(mp)
    except BlockcryptError:
        raise
    except Exception as e:
        log.error("mount failed: libfuse could not serve %s (%s: %s)", mp, type(e).__name__, e)
        raise MountError(f"mount at {mp} failed; see {lp}") from None
    finally:
        from .._util.sdnotify import notify
        notify("STOPPING=1", f"STATUS=unmounted {mp}; flushing and closing the disks")
        for stop in stops:
            try:
                stop()
            except Exception:
                log.exception("stopping a daemon plugin failed")
        ops.close_all()
        temps.shutdown()
        reg.remove(mount_id)
        log.info("mount %s stopped", mount_id)
        os.close(lock_fd)


def tree_sources(st, temps=None) -> list:
    """The directories this mount serves (tree.py): disks/ from the catalog; each feature that
    adds a directory (snapshots/, images/, temp/) adds its source here."""
    from .members import CatalogMembers
    return ([tree.CatalogDisks(st), CatalogMembers(st, "snapshot"), CatalogMembers(st, "image")]
            + ([temps] if temps is not None else []))


def _status_on_request(on_change, ops) -> None:
    while True:
        signal.sigwait({signal.SIGUSR1})
        on_change(ops)


def _start_plugins(ops, st) -> list:
    import importlib
    import importlib.util
    stops = []
    for name in DAEMON_PLUGINS:
        try:
            if importlib.util.find_spec(name) is None:
                continue
        except ImportError:
            continue
        mod = importlib.import_module(name)
        start = getattr(mod, "start_in_daemon", None)
        if start is None:
            continue
        stop = start(ops, st)
        log.info("plugin %s started", name)
        if callable(stop):
            stops.append(stop)
    return stops
