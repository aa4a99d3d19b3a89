"""Every offset translation of a disk file, named in one place.

    0            COPY_B_OFF              DATA_OFFSET                DATA_OFFSET + size
    +------------+-----------------------+--------------------------+
    | copy A     | copy B                | data area: sector n at   |
    |            |                       | DATA_OFFSET + n * ss     |
    +------------+-----------------------+--------------------------+

``Layout`` carries one disk's geometry: ``sector_off(n)`` is the backing offset
of sector n, ``span(plain_off, length)`` the sectors a plaintext range touches,
``backing_size(size)`` the file size a disk of ``size`` bytes needs. A layer with
per-sector metadata (the AEAD layer of double encryption) adds a metadata area;
``meta_off(n)`` is where sector n's metadata lives.

Caveat: format v1 has no metadata area (meta_bytes 0); its place will be a
format feature flag of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

COPY_A_OFF = 0
COPY_B_OFF = 512 * 1024
COPY_MAX = 64 * 1024
DATA_OFFSET = 1024 * 1024
HEADER_AREA = DATA_OFFSET
SECTOR_SIZES = (512, 4096)


def sector_span(plain_off: int, length: int, sector_size: int) -> tuple[int, int]:
    """First sector and sector count covering [plain_off, plain_off + length)."""
    first = plain_off // sector_size
    last = (plain_off + length + sector_size - 1) // sector_size
    return first, last - first


@dataclass(frozen=True)
class Layout:
    sector_size: int
    data_off: int = DATA_OFFSET
    meta_area_off: int = 0      # backing offset of sector 0's metadata (0: none)
    meta_bytes: int = 0         # metadata bytes per sector, over all layers

    def sector_off(self, sector_no: int) -> int:
        return self.data_off + sector_no * self.sector_size

    def meta_off(self, sector_no: int) -> int:
        return self.meta_area_off + sector_no * self.meta_bytes

    def span(self, plain_off: int, length: int) -> tuple[int, int]:
        return sector_span(plain_off, length, self.sector_size)

    def backing_size(self, size_bytes: int) -> int:
        return self.data_off + size_bytes

    @classmethod
    def of(cls, header) -> "Layout":
        return cls(header.sector_size, header.data_offset)
