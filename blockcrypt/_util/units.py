"""Parse and format sizes with binary units (K, M, G, T = powers of 1024).

Caveat: a plain number is bytes; decimal units (KB, GB) are not accepted, so
that "10G" always means 10 GiB as in the cloud disk sizes.
"""
from __future__ import annotations

import re

from ..errors import BadSize

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        value = text
    else:
        m = _RE.match(str(text))
        if not m:
            raise BadSize(value=text, why="not a size")
        value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise BadSize(value=text, why="must be greater than zero")
    return value


def format_size(n_bytes: int) -> str:
    for unit in ("T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n_bytes >= mult and n_bytes % mult == 0:
            return f"{n_bytes // mult}{unit}"
    for unit in ("T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n_bytes >= mult:
            return f"{n_bytes / mult:.1f}{unit}"
    return f"{n_bytes}B"
