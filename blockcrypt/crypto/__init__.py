"""Sector layers behind one interface (base.py): the native AES-256-XTS core
(xts.py), the native XChaCha20-Poly1305 core (aead.py), `cryptography`
references for tests (reference.py) and a null layer for benchmarks (null.py)::

    c = open_sector_cipher("aes-xts-plain64", key, sector_size)
    ct = c.encrypt(plain, sector_no)   # whole sectors -> bytes
    pt = c.decrypt(ct, sector_no)      # all-zero ciphertext sectors -> zeros
    c.wipe()

Caveat: nothing here imports FUSE, the CLI, SQLite or an SDK (the layering test says so).
"""
from __future__ import annotations

from .base import ALG_AEAD, ALG_NULL, ALG_XTS, SECTOR_SIZES, SectorLayer  # noqa: F401
from .null import NullCipher
from .reference import ReferenceXts  # noqa: F401
from .xts import XTS_KEY_BYTES, NativeXts  # noqa: F401


def open_sector_cipher(algorithm: str, key: bytes, sector_size: int) -> SectorLayer:
    if algorithm == ALG_XTS:
        return NativeXts(key, sector_size)
    if algorithm == ALG_NULL:
        return NullCipher(key, sector_size)
    raise ValueError(f"unknown sector cipher {algorithm!r}")
