"""The ``temp/`` directory of a mount: its temp disks (blockcrypt/control/tempdisks.py says
what they are), one sparse file each in the mount's temp directory.

Life of the files:

- at mount start, every ``*.tmpdisk`` file already in the temp directory is deleted: it was
  left by a mount that did not stop (kill -9, a crash, a power cut). We hold the state
  directory's mount lock, so no live mount owns it; under encryption at host its key died
  with that daemon and its sectors are unreadable noise; without, they are plain sectors
  that nobody will serve again. Then one new sparse file per temp disk (``ftruncate``: no
  block is allocated until written), mode 0600;
- while mounted, each temp disk's TempVolume stays open from its first open to the end
  (its ephemeral key must outlive every handle);
- at unmount, every volume is destroyed (the engine wipes the key) and every file deleted.

``TempConfig.resolve`` is where the mount options meet the catalog settings, once, when a
mount starts (never later: a change needs a remount).

Caveats: one temp directory per state directory (a leftover in it is deleted without
asking, as a VM's temporary disk is lost when the VM is reallocated); a temp directory on
a full file system gives ENOSPC on writes, nothing else.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .._util.units import format_size
from ..control import settings
from ..control.tempdisks import TEMP_SECTOR_SIZE, TempDiskSpec, check_temp_dir, parse_specs
from ..errors import MountError, UsageError
from ..volume import TempVolume
from .tree import Entry, Source

log = logging.getLogger("blockcrypt.mount.temp")

SUFFIX = ".tmpdisk"
DIR_NAME = "temp"
PLAIN_WARNING = ("NOT ENCRYPTED: plain sectors on this host (mount with --encryption-at-host "
                 "to encrypt temp disks)")
EPHEMERAL_NOTE = "aes-xts-plain64 under an ephemeral key that dies with the mount"


@dataclass(frozen=True)
class TempConfig:
    specs: tuple[TempDiskSpec, ...]
    temp_dir: str
    encryption_at_host: bool

    @classmethod
    def resolve(cls, st, temp_disks=None, temp_dir=None, encryption_at_host=None) -> "TempConfig":
        """The mount options where given, else the catalog settings (read now, once)."""
        specs = parse_specs(temp_disks if temp_disks is not None else settings.get_text(st, "temp_disks"))
        if temp_dir is None:
            temp_dir = settings.get(st, "temp_dir")
        else:
            try:
                temp_dir = check_temp_dir(os.path.abspath(temp_dir) if str(temp_dir).strip() else "")
            except ValueError:
                raise UsageError(f"invalid temp directory {temp_dir!r}") from None
        d = str(temp_dir or Path(st.path) / DIR_NAME)
        eah = settings.get(st, "encryption_at_host") if encryption_at_host is None else bool(encryption_at_host)
        return cls(tuple(specs), d, bool(eah))

    def argv(self) -> list[str]:
        """The daemon's command-line form (``python -m blockcrypt.mount serve``)."""
        out = ["--temp-dir", self.temp_dir]
        for s in self.specs:
            out += ["--temp-disk", f"{s.name}:{s.size}"]
        if self.encryption_at_host:
            out.append("--encryption-at-host")
        return out


class TempSource(Source):
    """temp/: the temp disks of one mount (files, volumes, status). The key monitor does not
    watch them: no key store stands behind an ephemeral key."""

    dir = DIR_NAME          # the directory of the tree (tree.py); the files are in self.where
    watched = False

    def __init__(self, config: TempConfig, *, cache: str = "buffered"):
        self.config = config
        self.where = Path(config.temp_dir)
        self.cache = cache
        self.specs = {s.name: s for s in config.specs}
        self._vols: dict[str, TempVolume] = {}
        self._lock = threading.Lock()
        self.removed_leftovers: list[str] = []

    @property
    def encryption_at_host(self) -> bool:
        return self.config.encryption_at_host

    def path(self, name: str) -> Path:
        return self.where / f"{name}{SUFFIX}"

    # -- life -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Delete leftovers of a dead mount, then make one sparse file per temp disk."""
        try:
            self.where.mkdir(mode=0o700, parents=True, exist_ok=True)
            for p in sorted(self.where.glob(f"*{SUFFIX}")):
                p.unlink()
                self.removed_leftovers.append(p.name)
                log.warning("removed %s, a temp disk file left by a mount that did not stop cleanly", p)
            for s in self.specs.values():
                fd = os.open(self.path(s.name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, s.size)
                finally:
                    os.close(fd)
        except OSError as e:
            raise MountError(f"cannot prepare the temp disks in {self.where}: {e.strerror or e}") from None
        for s in self.specs.values():
            log.info("temp disk %s: %s, %s, in %s", s.name, format_size(s.size),
                     EPHEMERAL_NOTE if self.encryption_at_host else PLAIN_WARNING, self.path(s.name))

    def entries(self) -> dict[str, Entry]:
        return {s.name: Entry(s.name, f"temp-{s.name}", s.size, False, str(self.path(s.name)))
                for s in self.specs.values()}

    def open(self, name: str, *, null_cipher: bool = False, cache: str | None = None) -> TempVolume:
        """The temp disk's volume, made on first open and kept until :meth:`shutdown`.
        ``null_cipher`` (a benchmark mount) changes nothing here: encryption at host decides."""
        with self._lock:
            vol = self._vols.get(name)
            if vol is None:
                s = self.specs[name]
                vol = TempVolume(str(self.path(name)), name, s.size, TEMP_SECTOR_SIZE,
                                 encrypted=self.encryption_at_host, cache=self.cache)
                self._vols[name] = vol
            return vol

    def shutdown(self) -> None:
        """Destroy every volume (the engine wipes the keys) and delete every file."""
        with self._lock:
            vols = list(self._vols.values())
            self._vols.clear()
        for v in vols:
            try:
                v.destroy()
            except Exception as e:
                log.error("temp disk %s: close failed: %s", v.name, e)
        for s in self.specs.values():
            try:
                self.path(s.name).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error("cannot delete the temp disk file %s: %s", self.path(s.name), e.strerror)
        if self.specs:
            log.info("temp disks removed from %s", self.where)

    # -- status ---------------------------------------------------------------------
    def status(self) -> list[dict]:
        out = []
        for s in self.specs.values():
            out.append({"name": s.name, "sizeBytes": s.size, "path": str(self.path(s.name)),
                        "encrypted": self.encryption_at_host,
                        "encryption": EPHEMERAL_NOTE if self.encryption_at_host else PLAIN_WARNING})
        return out
