"""The state directory: catalog, platform key store, disk files, logs.

Layout::

    STATE/            0700
      catalog.db      SQLite catalog (names -> disk files)
      keys/           0700, platform key store (platform.json, 0600; the keys themselves, or the
                      PKCS#11 URI of the token that holds them)
      disks/          0700, one sparse file per disk: <disk id>.img
      logs/           daemon logs
      run/            running mounts (see mount.py)

The path comes from ``--state``, else ``$BLOCKCRYPT_STATE``, else
``/var/lib/blockcrypt``.

Caveat: the directory holds the platform keys; keep it on storage you trust.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..catalog import Catalog
from ..errors import StateError
from ..keys.providers.platform import PlatformKeyStore
from ..keys.registry import ProviderRegistry

DEFAULT_STATE = "/var/lib/blockcrypt"


def resolve_path(path: str | os.PathLike | None) -> Path:
    return Path(path or os.environ.get("BLOCKCRYPT_STATE") or DEFAULT_STATE).absolute()


class State:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.catalog = Catalog(self.path / "catalog.db")
        self.keys = ProviderRegistry(self)

    @property
    def disks_dir(self) -> Path:
        return self.path / "disks"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def run_dir(self) -> Path:
        return self.path / "run"

    @classmethod
    def init(cls, path=None, platform_keys: str | None = None) -> "State":
        """Create (or re-open) the state directory; ``platform_keys`` a ``pkcs11:`` URI keeps the
        platform keys in that token (keys/providers/platform.py)."""
        p = resolve_path(path)
        try:
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(p, 0o700)
            for sub in ("disks", "logs", "run"):
                (p / sub).mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise StateError(path=str(p), why=f"cannot create it ({e.strerror})") from None
        st = cls(p)
        PlatformKeyStore(p / "keys").create(platform_keys)
        st.catalog.create()
        return st

    @classmethod
    def open(cls, path=None) -> "State":
        p = resolve_path(path)
        if not p.is_dir():
            raise StateError(path=str(p), why="does not exist (run `blockcrypt init` first, or pass --state)")
        if not (p / "catalog.db").exists():
            raise StateError(path=str(p), why="is not a blockcrypt state directory (no catalog.db; run `blockcrypt init`)")
        if not os.access(p, os.R_OK | os.W_OK | os.X_OK):
            raise StateError(path=str(p), why="is not readable and writable by this user")
        st = cls(p)
        PlatformKeyStore(p / "keys")._check_perms()
        return st
