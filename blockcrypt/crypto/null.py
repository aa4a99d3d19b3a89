"""The null sector layer: no encryption at all, for benchmarks of the transport.

Caveat: a disk served through it holds PLAINTEXT; the mount refuses it without an explicit flag.
"""
from __future__ import annotations

from .base import ALG_NULL, SectorLayer


class NullCipher(SectorLayer):
    """No encryption at all. Benchmarks only: the mount refuses it without an explicit flag."""

    algorithm = ALG_NULL

    def __init__(self, key: bytes = b"", sector_size: int = 4096):
        self.sector_size = sector_size

    def encrypt(self, data, sector_no: int) -> bytes:
        return bytes(data)

    def decrypt(self, data, sector_no: int) -> bytes:
        return bytes(data)

    def wipe(self) -> None:
        pass
