"""The backing-store protocol: the one seam between a volume and where its bytes live.

Offsets are backing offsets (the header area included); format/layout.py turns
sector numbers into them. Every method may be called from many threads at once.

Caveat: a backing reads zeros past its end (a sparse file's holes and tail), so
a new disk reads as zeros without writing anything.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Backing(Protocol):
    location: str     # a path, or a URL for remote stores
    writable: bool

    def read_at(self, off: int, length: int) -> bytes: ...
    def write_at(self, off: int, data) -> None: ...
    def punch(self, off: int, length: int) -> None: ...        # OSError(EOPNOTSUPP) if it cannot
    def flush(self) -> None: ...                               # durable on return
    def size(self) -> int: ...
    def set_size(self, size: int) -> None: ...
    def allocated_blocks(self) -> int: ...                     # 512-byte blocks really used
    def lock(self) -> None: ...                                # exclusive, for header updates
    def clone(self, dst_location: str) -> "Backing": ...       # copy-on-write copy, OSError if none
    def close(self) -> None: ...
