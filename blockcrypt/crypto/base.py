"""The sector-layer interface every sector cipher meets.

A layer transforms whole sectors; sector numbers are tweaks or associated data::

    ct = layer.encrypt(plain, sector_no)             # layers without metadata
    pt = layer.decrypt(ct, sector_no)                # all-zero ciphertext sectors -> zeros
    ct, meta = layer.seal(plain, sector_no)          # every layer: meta is meta_bytes per sector
    pt = layer.open(ct, meta, sector_no)             # raises on a bad tag (IntegrityError)
    layer.wipe()

``meta_bytes`` is the per-sector metadata a layer stores beside the sector (0
for XTS; nonce + tag for the AEAD layer of double encryption); ``seal``/``open``
are the general form, ``encrypt``/``decrypt`` the metadata-free shorthand.

Caveat: layers are stateless per call and safe to call from many threads; the
key lives inside the layer until ``wipe``.
"""
from __future__ import annotations

import abc

ALG_XTS = "aes-xts-plain64"
ALG_NULL = "null"
ALG_AEAD = "xchacha20-poly1305"
SECTOR_SIZES = (512, 4096)


class SectorLayer(abc.ABC):
    algorithm: str = ""
    sector_size: int = 4096
    meta_bytes: int = 0

    @abc.abstractmethod
    def encrypt(self, data, sector_no: int) -> bytes: ...

    @abc.abstractmethod
    def decrypt(self, data, sector_no: int) -> bytes: ...

    def seal(self, data, sector_no: int) -> tuple[bytes, bytes]:
        return self.encrypt(data, sector_no), b""

    def open(self, data, meta: bytes, sector_no: int) -> bytes:
        return self.decrypt(data, sector_no)

    @abc.abstractmethod
    def wipe(self) -> None: ...
