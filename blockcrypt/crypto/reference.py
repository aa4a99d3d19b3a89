"""Pure-`cryptography` sector transforms: the oracles the native code is tested against.

Caveat: one `cryptography` call per sector; far too slow for I/O, right for tests.
"""
from __future__ import annotations

from .base import ALG_XTS, SectorLayer
from .xts import check_xts_key


class ReferenceXts(SectorLayer):
    """The same transform in pure `cryptography`: the oracle for tests."""

    algorithm = ALG_XTS

    def __init__(self, key: bytes, sector_size: int = 4096):
        check_xts_key(key, sector_size)
        self._key = bytes(key)
        self.sector_size = sector_size

    def _run(self, data, sector_no: int, encrypt: bool) -> bytes:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        data = bytes(data)
        if len(data) % self.sector_size:
            raise ValueError("length is not a multiple of the sector size")
        out = bytearray()
        zero = bytes(self.sector_size)
        for i in range(len(data) // self.sector_size):
            chunk = data[i * self.sector_size:(i + 1) * self.sector_size]
            if not encrypt and chunk == zero:
                out += zero
                continue
            tweak = (sector_no + i).to_bytes(16, "little")
            c = Cipher(algorithms.AES(self._key), modes.XTS(tweak))
            op = c.encryptor() if encrypt else c.decryptor()
            out += op.update(chunk) + op.finalize()
        return bytes(out)

    def encrypt(self, data, sector_no: int) -> bytes:
        return self._run(data, sector_no, True)

    def decrypt(self, data, sector_no: int) -> bytes:
        return self._run(data, sector_no, False)

    def wipe(self) -> None:
        self._key = b""
