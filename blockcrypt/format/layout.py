"""Every offset translation of a disk file, named in one place.

    0            COPY_B_OFF              DATA_OFFSET                DATA_OFFSET + size
    +------------+-----------------------+--------------------------+
    | copy A     | copy B                | data area: sector n at   |
    |            |                       | DATA_OFFSET + n * ss     |
    +------------+-----------------------+--------------------------+

A disk with FEATURE_SECTOR_META (double encryption) also has a metadata area at a
fixed far offset of the sparse file, which does not move when the disk grows::

    DATA_OFFSET ... DATA_OFFSET + size   (hole)   META_AREA_OFFSET = 8 TiB
    | data area (<= MAX_META_DISK_SIZE)  |  ...   | 96 bytes of metadata per sector:
                                                  | sector n at META_AREA_OFFSET + 96 * n

``Layout`` carries one disk's geometry: ``sector_off(n)`` is the backing offset
of sector n, ``span(plain_off, length)`` the sectors a plaintext range touches,
``backing_size(size)`` the file size a disk of ``size`` bytes needs. A layer with
per-sector metadata (the AEAD layer of double encryption) adds a metadata area;
``meta_off(n)`` is where sector n's metadata lives.

A file of an overlay chain (FEATURE_OVERLAY: a snapshot, an image, a disk with
snapshots or made from one) also has a chunk bitmap at MAP_AREA_OFFSET (12 TiB),
one bit per 64 KiB chunk of its parent, set when the file holds the chunk itself::

    ... data area ... | metadata area (if any) ... | MAP_AREA_OFFSET = 12 TiB: bit c of
                                                   | byte c // 8 (LSB first) = chunk c

A disk with FEATURE_META_JOURNAL (every double disk made since stop 24) writes its
metadata area through a log of JOURNAL_BYTES at JOURNAL_AREA_OFFSET (10 TiB)::

    ... metadata area (table, <= 9.5 TiB) ... | JOURNAL_AREA_OFFSET: 4 MiB of records

Caveat: a single-layer disk has no metadata area (meta_bytes 0). A disk with one has
the apparent file size of the largest metadata area it could need
(``backing_size``), whatever its logical size, so growing it never truncates
metadata; the holes cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

COPY_A_OFF = 0
COPY_B_OFF = 512 * 1024
COPY_MAX = 64 * 1024
DATA_OFFSET = 1024 * 1024
HEADER_AREA = DATA_OFFSET
SECTOR_SIZES = (512, 4096)

#: required feature bit 0: per-sector metadata at META_AREA_OFFSET (double encryption)
FEATURE_SECTOR_META = 1 << 0
META_AREA_OFFSET = 1 << 43          # 8 TiB: past the largest data area, below ext4's 16 TiB file limit
AEAD_META_BYTES = 96                # the infrastructure layer: two 48-byte slots per sector
MAX_META_DISK_SIZE = META_AREA_OFFSET - DATA_OFFSET

#: required feature bit 2 (with bit 0): the metadata area is written through a journal, a log
#: of JOURNAL_BYTES at JOURNAL_AREA_OFFSET that the table is brought up to date from at
#: checkpoints (native/engine/bc_storage_journal.c, docs/FORMAT.md "The metadata journal"):
#: a reader that does not apply the log would read stale metadata, so old readers must refuse
FEATURE_META_JOURNAL = 1 << 2
JOURNAL_AREA_OFFSET = 5 << 41       # 10 TiB: past the largest metadata area (9.5 TiB), below the bitmap
JOURNAL_BYTES = 4 << 20             # native/engine: BC_JOURNAL_LOG_BYTES

#: required feature bit 1: the file is one of an overlay chain (snapshots, images, disks made
#: from them): a chunk bitmap at MAP_AREA_OFFSET, a parent file below (docs/FORMAT.md)
FEATURE_OVERLAY = 1 << 1
MAP_AREA_OFFSET = 3 << 42           # 12 TiB: past the largest metadata area (9.5 TiB)
CHUNK_BYTES = 64 * 1024             # the unit of sharing and of copy-up
MAX_FAMILY_DISK_SIZE = META_AREA_OFFSET - DATA_OFFSET   # a family member's data ends before 8 TiB
MAX_MAP_BYTES = (MAX_FAMILY_DISK_SIZE // CHUNK_BYTES + 7) // 8
MAX_CHAIN_FILES = 255               # native/engine: BC_COW_MAX_FILES


def map_chunks_for(size_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Chunks of a disk of ``size_bytes``: the length of a child's bitmap over it."""
    return (size_bytes + chunk_bytes - 1) // chunk_bytes


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
    overlay: bool = False       # a chunk bitmap at MAP_AREA_OFFSET (FEATURE_OVERLAY)
    journal_off: int = 0        # the metadata journal's log (FEATURE_META_JOURNAL; 0: none)

    def sector_off(self, sector_no: int) -> int:
        return self.data_off + sector_no * self.sector_size

    def meta_off(self, sector_no: int) -> int:
        return self.meta_area_off + sector_no * self.meta_bytes

    def span(self, plain_off: int, length: int) -> tuple[int, int]:
        return sector_span(plain_off, length, self.sector_size)

    def backing_size(self, size_bytes: int) -> int:
        if self.overlay:
            return MAP_AREA_OFFSET + MAX_MAP_BYTES
        if self.journal_off:
            return self.journal_off + JOURNAL_BYTES
        if self.meta_bytes:
            return self.meta_area_off + (MAX_META_DISK_SIZE // self.sector_size) * self.meta_bytes
        return self.data_off + size_bytes

    @property
    def max_size(self) -> int | None:
        """The largest logical size this layout can hold (None: the file system's limit)."""
        if self.overlay:
            return MAX_FAMILY_DISK_SIZE
        return MAX_META_DISK_SIZE if self.meta_bytes else None

    @property
    def meta_sectors(self) -> int:
        """The sectors the metadata table spans for the journal (up to its log)."""
        return (self.journal_off - self.meta_area_off) // self.meta_bytes if self.journal_off else 0

    @classmethod
    def with_meta(cls, sector_size: int, journal: bool = True) -> "Layout":
        return cls(sector_size, DATA_OFFSET, META_AREA_OFFSET, AEAD_META_BYTES,
                   journal_off=JOURNAL_AREA_OFFSET if journal else 0)

    @classmethod
    def of(cls, header) -> "Layout":
        overlay = bool(header.required_features & FEATURE_OVERLAY)
        if header.required_features & FEATURE_SECTOR_META:
            journal = JOURNAL_AREA_OFFSET if header.required_features & FEATURE_META_JOURNAL else 0
            return cls(header.sector_size, header.data_offset, META_AREA_OFFSET, AEAD_META_BYTES, overlay,
                       journal)
        return cls(header.sector_size, header.data_offset, overlay=overlay)
