"""Backing up and moving platform keys: export a key store to a backup file, import one.

``export_keys`` writes the store's versions (or some of them) to a new file, 0600,
sealed under a passphrase (keys/keyfile.py: Argon2id or scrypt, then AES-256-GCM) or in
clear when the caller confirmed it. ``import_keys`` adds a backup's versions to this
state directory's store: idempotent for versions it holds with the same key, refused for a
version it holds with another key, unless no disk here uses that version and the caller
asks to replace it (a store made by `blockcrypt init` on a host being restored).

Caveat: which versions are in use is read from the headers of the catalog's members; a
disk file of this store that is not in the catalog (run `catalog rebuild` first) is not
counted.
"""
from __future__ import annotations

import os

from .._util.fsutil import create_private_file
from ..errors import UsageError
from ..keys import keyfile
from ..keys.providers.platform import PlatformKeyStore, parse_platform_kek_id


def _store(st) -> PlatformKeyStore:
    return PlatformKeyStore(st.path / "keys")


def versions_in_use(st) -> set[int]:
    """Platform key versions the headers of this state directory's disks, snapshots and images name."""
    from ..errors import BlockcryptError
    from .disks import read_disk_header
    used = set()
    for rec in st.catalog.list_members():
        try:
            layers = read_disk_header(rec).layers
        except BlockcryptError:  # a header we cannot read may use any version: all of them are in use
            return {v["version"] for v in _store(st).versions()} | used
        for layer in layers:
            if layer.provider == "platform":
                used.add(parse_platform_kek_id(layer.kek_id))
    return used


def export_keys(st, out: str, *, passphrase_file: str | None, versions: list[int] | None = None) -> dict:
    """Write the backup file ``out`` (a new file, 0600); ``passphrase_file`` None: keys in clear."""
    passphrase = keyfile.read_passphrase(passphrase_file) if passphrase_file else None
    vs, current = _store(st).export_versions(versions)
    data = keyfile.seal(vs, current, passphrase)
    fd = create_private_file(out)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        os.unlink(out)
        raise UsageError(f"cannot write {out}: {e.strerror}") from None
    os.close(fd)
    return {"file": str(out), "versions": [v["version"] for v in vs], "current": current,
            "protection": "passphrase" if passphrase is not None else "none"}


def import_keys(st, path: str, *, passphrase_file: str | None, replace_unused: bool = False) -> dict:
    """Add the versions of backup file ``path`` to this store (see the module docstring)."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    passphrase = keyfile.read_passphrase(passphrase_file) if passphrase_file else None
    vs, _current = keyfile.unseal(data, passphrase)
    store = _store(st)
    have = {v["version"] for v in store.versions()}
    unused = have - versions_in_use(st) if have & {v["version"] for v in vs} else set()
    r = store.import_versions(vs, unused=unused, replace_unused=replace_unused)
    return {"file": str(path), **r, "current": store.current()}
