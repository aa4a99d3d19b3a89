"""Systems under test: one small class per system, each with setup, a target file
for fio, the daemon pid (for CPU accounting) and teardown.

Adding a system (double encryption, customer keys, ...) is a subclass plus one
line in ``SYSTEMS``::

    class BlockcryptDouble(BlockcryptSystem):
        name, label = "double", "blockcrypt double"
        disk_create_args = ["--double-encryption"]

Every system lives in its own directory under the run's work directory, so all
of them can stay mounted for the whole run and the jobs can be interleaved.

Caveats: setup uses fast key-derivation settings (gocryptfs -scryptn 10, LUKS
iter-time 100 ms) because KDF cost only changes unlock time, never I/O. qemu's
``luks`` driver writes LUKS version 1 headers (QEMU 7.2 cannot create LUKS2);
the data path, aes-xts-plain64 with 512-byte sectors, is what LUKS2 would use.
The blockcrypt daemon pid comes from `blockcrypt mount --json`; failing that,
from a /proc scan for the process that holds /dev/fuse and names the mount point.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .util import (BenchError, is_mounted, need_tool, pid_alive, run, stop_pid, unmount,
                   wait_until, first_line)

MOUNT_TIMEOUT_S = 60


class System:
    """Base class: a place fio can write a file to, and how to build and remove it."""

    name = ""              # key for --systems
    label = ""             # what tables and plots show
    role = "peer"          # "reference" | "blockcrypt" | "peer"
    encrypted = True
    default = True         # part of a run without --systems
    summary = ""           # one line for RESULTS.md

    def __init__(self, workdir: Path):
        self.dir = Path(workdir).absolute() / self.name
        self.target: Path | None = None
        self.daemon_pid: int | None = None
        self.owned = False  # set once setup has claimed self.dir: teardown touches nothing before

    # -- to override -------------------------------------------------------
    def unsupported(self) -> str | None:
        """Why this build cannot run the system (the runner skips it and says so), or None."""
        return None

    def check(self) -> None:
        """Raise BenchError if a tool is missing; runs before anything is set up."""

    def mount_points(self) -> list[Path]:
        """Paths this system mounts on (checked for 'busy' before setup)."""
        return []

    def setup(self, size_bytes: int) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        """Undo setup; idempotent, never raises."""

    def version(self) -> str:
        return ""

    # -- shared ------------------------------------------------------------
    def check_free(self) -> None:
        for mp in self.mount_points():
            if is_mounted(mp):
                raise BenchError(f"mount point {mp} is busy (already mounted); unmount it "
                                 f"(umount {mp}) or choose another --workdir")

    def fresh_dir(self) -> None:
        self.check_free()
        self.owned = True
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, mode=0o700)

    def remove_dir(self) -> None:
        if self.owned and self.dir.exists() and not any(is_mounted(mp) for mp in self.mount_points()):
            shutil.rmtree(self.dir, ignore_errors=True)
        self.owned = False

    def info(self) -> dict:
        return {"name": self.name, "label": self.label, "role": self.role,
                "encrypted": self.encrypted, "summary": self.summary,
                "version": self.version()}


class RawFile(System):
    """The backing file system itself, no FUSE: the ceiling for everyone."""

    name, label, role, encrypted = "raw", "raw file", "reference", False
    summary = "a plain file on the backing ext4, no FUSE, no encryption"

    def setup(self, size_bytes: int) -> None:
        self.fresh_dir()
        self.target = self.dir / "disk.img"

    def teardown(self) -> None:
        self.remove_dir()


class _DaemonSystem(System):
    """A system whose FUSE daemon we start ourselves in the foreground."""

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self._proc: subprocess.Popen | None = None
        self.log_path = self.dir / "daemon.log"

    def _start(self, cmd: list[str], mountpoint: Path, what: str) -> None:
        log = open(self.log_path, "ab")
        try:
            # own session: a Ctrl-C on the terminal reaches the runner, which tears down in order
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True)
        finally:
            log.close()
        self.daemon_pid = self._proc.pid
        try:
            wait_until(lambda: is_mounted(mountpoint), MOUNT_TIMEOUT_S, what,
                       alive=lambda: self._proc.poll() is None)
        except BenchError as e:
            raise BenchError(f"{e}; log: {self._log_tail()}") from None

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(none)"
        return lines[-1] if lines else "(empty)"

    def _stop(self, mountpoint: Path, terminate_first: bool) -> None:
        if self._proc is None:
            return  # never started: whatever is mounted there is not ours
        if self._proc is not None and terminate_first and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        unmount(mountpoint)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop_pid(self._proc.pid)
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self._proc = None
        self.daemon_pid = None


class FusepyFloor(_DaemonSystem):
    """bench/fusepy_floor.py: fusepy + libfuse 2 with nothing of ours in the request path."""

    name, label, role, encrypted, default = "fusepy", "fusepy floor", "reference", False, False
    summary = ("bench/fusepy_floor.py: the thinnest fusepy server (pread/pwrite, no locks, no "
               "crypto), same FUSE options as blockcrypt: the floor of the fusepy/libfuse 2 stack")

    def mount_points(self) -> list[Path]:
        return [self.dir / "mnt"]

    def version(self) -> str:
        try:
            from importlib.metadata import version
            return f"fusepy {version('fusepy')}"
        except Exception:  # noqa: BLE001 - informational
            return ""

    def setup(self, size_bytes: int) -> None:
        self.fresh_dir()
        backing, mnt = self.dir / "backing.img", self.dir / "mnt"
        mnt.mkdir()
        with open(backing, "wb") as f:
            f.truncate(size_bytes)
        script = Path(__file__).resolve().parent / "fusepy_floor.py"
        self._start([sys.executable, str(script), str(backing), str(mnt)], mnt, "fusepy floor mount")
        self.target = mnt / "disk"

    def teardown(self) -> None:
        self._stop(self.dir / "mnt", terminate_first=False)
        self.remove_dir()


FLOOR_SOURCE = Path(__file__).resolve().parent / "floor" / "passthrough_ll.c"
FLOOR_BUILD_DIR = Path(__file__).resolve().parent / "out" / "floor"   # git-ignored


def build_floor(build_dir: Path = FLOOR_BUILD_DIR) -> Path:
    """Compile bench/floor/passthrough_ll.c (gcc, libfuse 3) unless an up-to-date binary
    exists; returns its path. The binary goes in place atomically (a concurrent run sees
    either the old one or the new one)."""
    exe = build_dir / "passthrough_ll"
    if exe.exists() and exe.stat().st_mtime >= FLOOR_SOURCE.stat().st_mtime:
        return exe
    need_tool("gcc", "install it: apt-get install gcc")
    need_tool("pkg-config", "install it: apt-get install pkg-config")
    flags = run(["pkg-config", "--cflags", "--libs", "fuse3"], check=False)
    if flags.returncode != 0:
        raise BenchError("libfuse 3 development files not found (pkg-config fuse3); "
                         "install them: apt-get install libfuse3-dev")
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build_dir / f".passthrough_ll.{os.getpid()}"
    try:
        run(["gcc", "-O2", "-g", "-Wall", "-Wextra", "-std=gnu11", "-o", str(tmp), str(FLOOR_SOURCE),
             *flags.stdout.decode().split()], timeout_s=120)
        os.replace(tmp, exe)
    finally:
        tmp.unlink(missing_ok=True)
    return exe


class CFloor(_DaemonSystem):
    """bench/floor/passthrough_ll.c: a bare libfuse 3 low-level server, the transport floor."""

    name, label, role, encrypted = "c-floor", "C libfuse 3 floor", "reference", False
    summary = ("bench/floor/passthrough_ll.c: a bare libfuse 3 low-level passthrough server "
               "(multi-threaded, 1 MiB requests, async direct I/O, pread/pwrite on the backing "
               "file, no locks, no crypto): the floor of blockcrypt's native session")
    direct = False  # O_DIRECT on the backing file

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.exe: Path | None = None

    def check(self) -> None:
        self.exe = build_floor()

    def mount_points(self) -> list[Path]:
        return [self.dir / "mnt"]

    def version(self) -> str:
        return "libfuse " + first_line(["pkg-config", "--modversion", "fuse3"])

    def setup(self, size_bytes: int) -> None:
        self.fresh_dir()
        backing, mnt = self.dir / "backing.img", self.dir / "mnt"
        mnt.mkdir()
        with open(backing, "wb") as f:
            f.truncate(size_bytes)
        exe = self.exe or build_floor()
        self._start([str(exe), *(["--direct"] if self.direct else []), str(backing), "disk", str(mnt)],
                    mnt, f"{self.label} mount")
        self.target = mnt / "disks" / "disk"

    def teardown(self) -> None:
        self._stop(self.dir / "mnt", terminate_first=False)
        self.remove_dir()


class CFloorDirect(CFloor):
    name, label, default = "c-floor-direct", "C libfuse 3 floor, O_DIRECT backing", False
    summary = ("the C floor with its backing file opened O_DIRECT: the floor of "
               "`blockcrypt mount --backing-cache none`")
    direct = True


class Gocryptfs(_DaemonSystem):
    """gocryptfs (AES-256-GCM, 4 KiB blocks, defaults), one file inside the mount."""

    name, label = "gocryptfs", "gocryptfs"
    summary = "gocryptfs defaults (AES-256-GCM, 4 KiB blocks), a file inside the mount"

    def check(self) -> None:
        need_tool("gocryptfs", "install it: bash scripts/install-deps.sh --bench")

    def mount_points(self) -> list[Path]:
        return [self.dir / "plain"]

    def version(self) -> str:
        return first_line(["gocryptfs", "-version"])

    def setup(self, size_bytes: int) -> None:
        self.fresh_dir()
        cipher, plain, passfile = self.dir / "cipher", self.dir / "plain", self.dir / "passfile"
        cipher.mkdir()
        plain.mkdir()
        passfile.write_text(secrets.token_hex(16) + "\n")
        passfile.chmod(0o600)
        run(["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", str(passfile), str(cipher)])
        self._start(["gocryptfs", "-fg", "-q", "-passfile", str(passfile), str(cipher), str(plain)],
                    plain, "gocryptfs mount")
        self.target = plain / "disk.img"

    def teardown(self) -> None:
        self._stop(self.dir / "plain", terminate_first=False)
        self.remove_dir()


class QemuLuks(_DaemonSystem):
    """qemu-storage-daemon: a LUKS (aes-xts-plain64) image exported over FUSE."""

    name, label = "qsd", "qemu-storage-daemon LUKS"
    summary = ("qemu-storage-daemon, luks driver (aes-256 xts plain64, LUKS1 header) on a "
               "file node (cache.direct=off), FUSE export, writable")

    def check(self) -> None:
        hint = "install qemu-utils and qemu-system-common: bash scripts/install-deps.sh --bench"
        need_tool("qemu-img", hint)
        need_tool("qemu-storage-daemon", hint)

    def mount_points(self) -> list[Path]:
        return [self.dir / "export.img"]

    def version(self) -> str:
        return first_line(["qemu-storage-daemon", "--version"])

    def setup(self, size_bytes: int) -> None:
        self.fresh_dir()
        secret, image, export = self.dir / "secret", self.dir / "disk.luks", self.dir / "export.img"
        secret.write_text(secrets.token_hex(16))
        secret.chmod(0o600)
        obj = f"secret,id=sec0,file={secret},format=raw"
        attempts = 5
        for attempt in range(attempts):
            # qemu times PBKDF2 with the thread's CPU clock and gives up ("Unable to get
            # accurate CPU usage") when a busy host starves it: try again, with a longer
            # iter-time (only unlock time grows)
            create = ["qemu-img", "create", "-q", "-f", "luks", "--object", obj,
                      "-o", "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,"
                            f"hash-alg=sha256,iter-time={100 * (attempt + 1)}",
                      str(image), str(size_bytes)]
            try:
                run(create)
                break
            except BenchError as e:
                if "accurate CPU usage" not in str(e) or attempt == attempts - 1:
                    raise
                image.unlink(missing_ok=True)
                time.sleep(0.5)
        export.touch()
        self._start(["qemu-storage-daemon", "--object", obj,
                     "--blockdev", f"driver=file,node-name=file0,filename={image}",
                     "--blockdev", "driver=luks,node-name=disk0,file=file0,key-secret=sec0",
                     "--export", f"type=fuse,id=exp0,node-name=disk0,mountpoint={export},"
                                 "writable=on"],
                    export, "qemu-storage-daemon FUSE export")
        self.target = export

    def teardown(self) -> None:
        self._stop(self.dir / "export.img", terminate_first=True)
        self.remove_dir()


def blockcrypt_cli() -> str:
    """The blockcrypt console script next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "blockcrypt"
    if here.exists():
        return str(here)
    found = shutil.which("blockcrypt")
    if not found:
        raise BenchError("blockcrypt CLI not found; run `make build` first")
    return found


def find_fuse_daemon(mountpoint: Path) -> int | None:
    """Pid of the process serving `mountpoint`: /dev/fuse open and the path in its argv."""
    want = str(mountpoint)
    candidates = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        if not any(a.rstrip("/") == want for a in argv):
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            holds_fuse = any(os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/fuse" for fd in fds)
        except OSError:
            holds_fuse = False
        candidates.append((holds_fuse, int(entry)))
    candidates.sort(reverse=True)
    return candidates[0][1] if candidates else None


_MOUNT_HELP: dict[str, str] = {}


def mount_help(cli: str) -> str:
    """`blockcrypt mount --help` (cached per CLI path); BenchError if the command fails."""
    if cli not in _MOUNT_HELP:
        proc = run([cli, "mount", "--help"], check=False, timeout_s=60)
        text = (proc.stdout + proc.stderr).decode(errors="replace")
        if proc.returncode != 0:
            raise BenchError("`blockcrypt mount` is not available in this build "
                             f"({text.strip().splitlines()[-1] if text.strip() else 'no output'})")
        _MOUNT_HELP[cli] = text
    return _MOUNT_HELP[cli]


class BlockcryptSystem(System):
    """blockcrypt through its CLI: a state of its own, one disk, a detached mount.

    `frontend` is "native" (the C libfuse 3 session) or "fusepy"; `backing_cache` is
    "buffered" or "none" (O_DIRECT on the backing file). The CLI options for them
    (`--frontend`, `--backing-cache`) are passed only when the build has them; a system
    that needs an option the build lacks is skipped (unsupported()) rather than failing.
    Without `--frontend` the build has only the fusepy front end, and `null`/`single`
    measure that.
    """

    role = "blockcrypt"
    disk_name = "bench"
    init_args: list[str] = []
    disk_create_args: list[str] = []
    mount_args: list[str] = []
    frontend: str | None = None        # None: the build's default front end
    backing_cache: str | None = None   # None: the build's default (buffered)
    null_cipher = False
    # which systems this one is compared with when they are in the run (report.py)
    baseline: str | None = None        # the same path with the null cipher
    floor: str | None = None           # the bare transport it sits on

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.state = self.dir / "state"
        self.mnt = self.dir / "mnt"
        self._cli: str | None = None
        self._mounted = False

    def _help(self) -> str:
        self._cli = self._cli or blockcrypt_cli()
        return mount_help(self._cli)

    def has_native(self) -> bool:
        """The build has the native front end (`blockcrypt mount --frontend`)."""
        return "--frontend" in self._help()

    def effective_frontend(self) -> str:
        if self.frontend is not None:
            return self.frontend
        return "native" if self.has_native() else "fusepy"

    def all_mount_args(self) -> list[str]:
        args = []
        if self.null_cipher:
            args.append("--bench-null-cipher")
        if self.has_native():
            args += ["--frontend", self.effective_frontend()]
        if self.backing_cache is not None:
            args += ["--backing-cache", self.backing_cache]
        return args + list(self.mount_args)

    def unsupported(self) -> str | None:
        help_text = self._help()
        if self.frontend is not None and "--frontend" not in help_text:
            return ("`blockcrypt mount` has no --frontend option in this build "
                    "(the native front end has not landed)")
        if self.backing_cache is not None and "--backing-cache" not in help_text:
            return "`blockcrypt mount` has no --backing-cache option in this build"
        return None

    def check(self) -> None:
        text = self._help()
        for flag in self.all_mount_args():
            if flag.startswith("--") and flag not in text:
                raise BenchError(f"`blockcrypt mount` has no {flag} option in this build")

    def info(self) -> dict:
        d = super().info()
        try:
            d["frontend"] = self.effective_frontend()
        except BenchError:
            d["frontend"] = self.frontend or "unknown"
        d.update({"backing_cache": self.backing_cache or "buffered", "null_cipher": self.null_cipher,
                  "baseline": self.baseline, "floor": self.floor})
        return d

    def mount_points(self) -> list[Path]:
        return [self.mnt]

    def version(self) -> str:
        try:
            from importlib.metadata import version
            return f"blockcrypt {version('blockcrypt')}"
        except Exception:  # noqa: BLE001 - version is informational only
            return "blockcrypt (version unknown)"

    def cli(self, *args: str, timeout_s: float = 120, check: bool = True):
        return run([self._cli or blockcrypt_cli(), "--state", str(self.state), *args],
                   timeout_s=timeout_s, check=check)

    def setup(self, size_bytes: int) -> None:
        self.fresh_dir()
        self.mnt.mkdir()
        self.cli("init", *self.init_args)
        self.before_disk()
        self.cli("disk", "create", self.disk_name, "--size", str(size_bytes), *self.disk_create_args)
        self._mounted = True  # the mount point was free: from here on, whatever is there is ours
        pid = self._mount()
        wait_until(lambda: is_mounted(self.mnt), MOUNT_TIMEOUT_S, f"{self.label} mount")
        self.target = self.mnt / "disks" / self.disk_name
        wait_until(self.target.exists, MOUNT_TIMEOUT_S, f"{self.label} disk file {self.target}")
        self.daemon_pid = pid if pid_alive(pid) else find_fuse_daemon(self.mnt)

    def before_disk(self) -> None:
        """After `init`, before `disk create` (a key vault and a disk encryption set, say)."""

    def _mount(self) -> int | None:
        """Run `blockcrypt mount --json`; the daemon's pid from its answer (None if absent)."""
        # Output goes to files, not pipes: a daemon that detaches may keep the
        # inherited descriptors open, and reading a pipe would then never end.
        out_path, err_path = self.dir / "mount.json", self.dir / "mount.log"
        cmd = [self._cli or blockcrypt_cli(), "--state", str(self.state), "mount", str(self.mnt),
               "--json", *self.all_mount_args()]
        with open(out_path, "wb") as out, open(err_path, "ab") as err:
            try:
                rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    timeout=MOUNT_TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                raise BenchError(f"blockcrypt mount did not return within {MOUNT_TIMEOUT_S} s") from None
        if rc != 0:
            lines = (err_path.read_text(errors="replace") + out_path.read_text(errors="replace")
                     ).strip().splitlines()
            raise BenchError(f"blockcrypt mount failed: {lines[-1] if lines else f'exit status {rc}'}")
        try:
            pid = json.loads(out_path.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            return None
        return pid if isinstance(pid, int) and pid > 0 else None

    def teardown(self) -> None:
        self.teardown_mount()
        self.remove_dir()

    def teardown_mount(self) -> None:
        pid = self.daemon_pid
        if self._mounted:
            try:
                self.cli("umount", str(self.mnt), timeout_s=60, check=False)
            except BenchError:
                pass
            unmount(self.mnt)
        if pid_alive(pid):
            try:
                wait_until(lambda: not pid_alive(pid), 10, "blockcrypt daemon exit")
            except BenchError:
                stop_pid(pid)
        self._mounted = False
        self.daemon_pid = None


class BlockcryptNull(BlockcryptSystem):
    name, label, encrypted = "null", "blockcrypt null cipher", False
    summary = ("blockcrypt mount --bench-null-cipher: the same path as `single` (the default "
               "front end: native once it exists), no encryption")
    null_cipher = True
    floor = "c-floor"


class BlockcryptSingle(BlockcryptSystem):
    name, label = "single", "blockcrypt single layer"
    summary = ("blockcrypt mount, one aes-xts-plain64 layer, platform-managed key, the default "
               "front end (native once it exists, `--frontend native`)")
    baseline, floor = "null", "c-floor"


class BlockcryptSingleDirect(BlockcryptSystem):
    name, label = "single-direct", "blockcrypt single layer, O_DIRECT backing"
    summary = "blockcrypt mount --frontend native --backing-cache none: XTS, O_DIRECT on the backing file"
    frontend, backing_cache = "native", "none"
    baseline, floor = "null-direct", "c-floor-direct"


class BlockcryptNullDirect(BlockcryptSystem):
    name, label, encrypted, default = "null-direct", "blockcrypt null cipher, O_DIRECT backing", False, False
    summary = "blockcrypt mount --frontend native --backing-cache none --bench-null-cipher"
    frontend, backing_cache, null_cipher = "native", "none", True
    floor = "c-floor-direct"


class BlockcryptFusepySingle(BlockcryptSystem):
    name, label = "fusepy-single", "blockcrypt single layer, fusepy front end"
    summary = "blockcrypt mount --frontend fusepy: XTS through the old fusepy/libfuse 2 front end"
    frontend = "fusepy"
    baseline, floor = "fusepy-null", "fusepy"


class BlockcryptFusepyNull(BlockcryptSystem):
    name, label, encrypted, default = "fusepy-null", "blockcrypt null cipher, fusepy front end", False, False
    summary = "blockcrypt mount --frontend fusepy --bench-null-cipher"
    frontend, null_cipher = "fusepy", True
    floor = "fusepy"


class BlockcryptFusepySingleDirect(BlockcryptSystem):
    name, label, default = ("fusepy-single-direct", "blockcrypt single layer, fusepy front end, "
                            "O_DIRECT backing", False)
    summary = "blockcrypt mount --frontend fusepy --backing-cache none"
    frontend, backing_cache = "fusepy", "none"


class BlockcryptDouble(BlockcryptSystem):
    name, label, default = "double", "blockcrypt double encryption", False
    summary = ("blockcrypt mount, disk create --double-encryption: aes-xts-plain64 over "
               "XChaCha20-Poly1305 per sector (two platform-managed keys), the default front end; "
               "target: >= 0.7x `single`")
    disk_create_args = ["--double-encryption"]
    baseline, floor = "null", "c-floor"


class BlockcryptDoubleCmk(BlockcryptSystem):
    """The seeds' double encryption: a customer key in a key vault for the outer layer, the
    platform key for the inner one. The vault (blockcrypt's own, HTTPS on 127.0.0.1) runs
    for the whole measurement, so the key monitor's periodic unwraps are in the figures."""

    name, label, default = "double-cmk", "blockcrypt double encryption, customer key", False
    summary = ("blockcrypt mount, a disk on a DES of type EncryptionAtRestWithPlatformAndCustomerKeys: "
               "aes-xts-plain64 under an RSA vault key over XChaCha20-Poly1305 under the platform key; "
               "target: >= 0.7x `single`")
    disk_create_args = ["--des", "dd"]
    baseline, floor = "null", "c-floor"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.vault_dir = self.dir / "vault"
        self._vault: subprocess.Popen | None = None

    def before_disk(self) -> None:
        cli = self._cli or blockcrypt_cli()
        run([cli, "vault", "init", "--dir", str(self.vault_dir), "--retention-days", "7", "--purge-protection"])
        log = open(self.dir / "vault.out", "wb")
        self._vault = subprocess.Popen([cli, "vault", "serve", "--dir", str(self.vault_dir), "--listen",
                                        "127.0.0.1:0"], stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        serve = self.vault_dir / "serve.json"
        wait_until(serve.exists, MOUNT_TIMEOUT_S, "vault serve", alive=lambda: self._vault.poll() is None)
        url = json.loads(serve.read_text())["url"]
        run([cli, "vault", "key", "create", "bench", "--dir", str(self.vault_dir)])
        self.cli("des", "create", "dd", "--key-url", f"{url}/keys/bench", "--vault-dir", str(self.vault_dir),
                 "--grant", "--type", "EncryptionAtRestWithPlatformAndCustomerKeys")

    def teardown(self) -> None:
        vault, self._vault = self._vault, None
        try:
            super().teardown_mount()
        finally:
            if vault is not None and vault.poll() is None:
                stop_pid(vault.pid)
            self.remove_dir()


# Run order and the keys accepted by --systems.
SYSTEMS: list[type[System]] = [RawFile, CFloor, CFloorDirect, FusepyFloor, BlockcryptNull, BlockcryptSingle,
                               BlockcryptNullDirect, BlockcryptSingleDirect, BlockcryptFusepyNull,
                               BlockcryptFusepySingle, BlockcryptFusepySingleDirect, Gocryptfs, QemuLuks, BlockcryptDouble,
                               BlockcryptDoubleCmk]


def by_name() -> dict[str, type[System]]:
    return {cls.name: cls for cls in SYSTEMS}
