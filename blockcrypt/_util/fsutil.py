"""Files that are either old or new, never torn.

``atomic_write`` is temp + fsync + rename + fsync(dir), the one way blockcrypt
replaces a small file (key stores, secrets, status files, vault keys).
``create_private_file`` is the one way it makes a file a user named for secrets
or images (`disk dump-key --out`, `platform-key export --out`, `disk export`):
new, mode 0600, never over an existing file.

Caveat: the temporary name carries the pid and thread id, so concurrent writers
of the same path do not collide; the last rename wins.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from ..errors import AlreadyExists, UsageError


def fsync_dir(d: str | os.PathLike) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def create_private_file(out: str | os.PathLike) -> int:
    """A new file of mode 0600 (never an existing one, whatever the umask): its descriptor.
    An existing path is AlreadyExists; a path that cannot be created is a UsageError."""
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise AlreadyExists(kind="file", name=str(out)) from None
    except OSError as e:
        raise UsageError(f"cannot create {out}: {e.strerror}") from None
    os.fchmod(fd, 0o600)
    return fd
