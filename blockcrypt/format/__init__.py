"""On-disk format: the header (header.py) and the sector offset math.

Caveat: nothing here imports FUSE, the CLI or any key provider.
"""
from .header import (  # noqa: F401
    DATA_OFFSET, FORMAT_VERSION, ROLE_DATA, ROLE_PLATFORM, ROLE_NAMES, Header, Layer,
    binding_context, binding_digest, read_header, write_header, header_copy_state,
)


def sector_span(plain_off: int, length: int, sector_size: int) -> tuple[int, int]:
    """First sector and sector count covering [plain_off, plain_off + length)."""
    first = plain_off // sector_size
    last = (plain_off + length + sector_size - 1) // sector_size
    return first, last - first
