"""XChaCha20-Poly1305 sectors over the native libsodium core: the infrastructure
layer of double encryption (a random 192-bit nonce per write, a 128-bit tag, the
sector number as associated data), with 40 bytes of metadata per sector.

Caveat: not wired into volumes yet (the double-encryption issue does that on the
native engine); a sector whose ciphertext and metadata are all zero is a hole.
"""
from __future__ import annotations

from ..errors import IntegrityError, NativeMissing
from .base import ALG_AEAD, SECTOR_SIZES, SectorLayer

AEAD_KEY_BYTES = 32


def _aead():
    try:
        from .. import _aead  # type: ignore[attr-defined]
    except ImportError as e:  # pragma: no cover
        raise NativeMissing(module="blockcrypt._aead", why=str(e)) from None
    return _aead


class NativeAead(SectorLayer):
    algorithm = ALG_AEAD

    def __init__(self, key: bytes, sector_size: int = 4096):
        if len(key) != AEAD_KEY_BYTES:
            raise ValueError(f"AEAD key must be {AEAD_KEY_BYTES} bytes")
        if sector_size not in SECTOR_SIZES:
            raise ValueError("sector_size must be 512 or 4096")
        mod = _aead()
        self._err = mod.AeadSectorError
        self._ctx = mod.AeadSectorContext(bytes(key), sector_size)
        self.sector_size = sector_size
        self.meta_bytes = mod.SECTOR_META_BYTES

    def seal(self, data, sector_no: int) -> tuple[bytes, bytes]:
        return self._ctx.seal(data, sector_no)

    def open(self, data, meta: bytes, sector_no: int) -> bytes:
        try:
            return self._ctx.open(data, meta, sector_no)
        except self._err as e:
            raise IntegrityError(msg=f"sector tag mismatch ({e})") from None

    def encrypt(self, data, sector_no: int) -> bytes:
        raise TypeError("the AEAD layer has per-sector metadata: use seal()")

    def decrypt(self, data, sector_no: int) -> bytes:
        raise TypeError("the AEAD layer has per-sector metadata: use open()")

    def wipe(self) -> None:
        self._ctx.wipe()
