"""A temp disk's volume: headerless sectors in a sparse file, through the same C engine.

The data area starts at offset 0 of the file (there is no header: a temp disk has no
DEK to wrap and nothing to keep across mounts). ``encrypted``: one AES-256-XTS layer
whose key the engine draws itself (``("aes-xts-plain64", None)``) into its locked
page: no Python object, file or log ever holds it, and when the volume is destroyed
the file's sectors are unreadable for good. Not encrypted: the null layer, and the file
is the plain sectors (what the seeds' temporary disk is without encryption at host).

``close()`` is a no-op on purpose: the front ends close a disk's volume on its last
release, but a temp disk must keep its ephemeral key for the whole mount (a reopen with a
fresh key would read noise). ``destroy()`` ends it, when the mount stops.

Caveat: no revocation (no key provider stands behind it), and no resize.
"""
from __future__ import annotations

from .volume import Volume, _engine

TEMP_KIND = "temp"


class TempVolume(Volume):
    def __init__(self, path: str, name: str, size: int, sector_size: int, *, encrypted: bool,
                 cache: str = "buffered"):
        self.name = name
        self.disk_id = f"temp-{name}"
        self.path = path
        self.kind = TEMP_KIND
        self.read_only = False
        self.sector_size = sector_size
        self.layout = None
        self.encrypted = bool(encrypted)
        self.cipher_name = ("aes-xts-plain64 (ephemeral key)" if encrypted
                            else "none: PLAIN sectors on the host (no encryption at host)")
        self.cache = cache
        self._key_error = None
        layers = [("aes-xts-plain64", None)] if encrypted else [("null", b"")]
        self.engine = _engine().Volume(path, size=size, sector_size=sector_size, data_off=0,
                                       read_only=False, layers=layers, cache=cache)

    def header(self):
        raise ValueError("a temp disk has no header")

    def refresh(self) -> None:
        """A temp disk's size is fixed for the mount's life."""

    def close(self) -> None:
        """Kept open until :meth:`destroy` (the ephemeral key must outlive every handle)."""

    def destroy(self) -> None:
        """Flush, close, wipe the key (the engine's last reference does it)."""
        self.engine.close()
