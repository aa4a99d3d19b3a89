"""Header copies over a backing store: read the newest valid copy, write both.

Writes go copy A first, then copy B, each flushed, with the same sequence
number: a torn copy fails its checksum and the other copy is used, so a header
write is atomic. On open, the valid copy with the highest sequence number wins
and a damaged or stale copy is rewritten from it (when opened writable), but
only from a copy of the same disk id: a copy naming another disk (grafted
from another disk file) is damaged, never a source.

Caveat: ``backing`` is anything with read_at/write_at/flush (storage/base.py);
callers that update headers hold the backing's lock (control/disks.py).
"""
from __future__ import annotations

import struct
from dataclasses import replace

from ..errors import CorruptHeader, UnsupportedFormat
from .header import MAGIC_A, MAGIC_B, Header, pack, unpack
from .layout import COPY_A_OFF, COPY_B_OFF, COPY_MAX


def _write_copy(backing, h: Header, magic: bytes, off: int) -> None:
    raw = pack(h, magic)
    # zero the rest of a previous, longer copy so no stale bytes linger
    backing.write_at(off, raw + bytes(COPY_MAX - len(raw)))
    backing.flush()


def _parse_copies(backing, name_hint: str) -> tuple[dict, dict]:
    """Both copies: ({label: Header} for the valid ones, {label: why} for the damaged ones)."""
    results, errors = {}, {}
    for label, magic, off in (("A", MAGIC_A, COPY_A_OFF), ("B", MAGIC_B, COPY_B_OFF)):
        try:
            results[label] = unpack(backing.read_at(off, COPY_MAX), magic)
        except UnsupportedFormat as e:
            raise UnsupportedFormat(name=name_hint, why=e.kw["why"]) from None
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            errors[label] = str(e)
    return results, errors


def read_header(backing, name_hint: str = "?", repair: bool = False, expect_id: bytes | None = None) -> Header:
    """Read both copies; return the newest valid one. Optionally rewrite a bad or stale copy.

    A copy only ever repairs a copy of the same disk id: with ``expect_id`` (the catalog's id
    of the disk), a copy naming another disk counts as damaged, and when no copy names this
    disk the header is corrupt; without it, two valid copies naming different disks are
    corrupt (a copy grafted from another disk), and nothing is rewritten."""
    results, errors = _parse_copies(backing, name_hint)
    if expect_id is not None:
        for label in [k for k, h in results.items() if h.disk_id != expect_id]:
            errors[label] = f"names another disk ({results.pop(label).disk_id_hex})"
            if not results:
                raise CorruptHeader(name=name_hint, why="the header names another disk "
                                    f"({errors[label].split('(')[1].rstrip(')')}, not {expect_id.hex()})")
    elif len({h.disk_id for h in results.values()}) > 1:
        raise CorruptHeader(name=name_hint, why="the two header copies name different disks "
                            f"(A: {results['A'].disk_id_hex}, B: {results['B'].disk_id_hex})")
    if not results:
        raise CorruptHeader(name=name_hint,
                            why=f"both header copies are damaged (A: {errors['A']}; B: {errors['B']})")
    best = max(results.values(), key=lambda h: h.seqno)
    if repair:
        if "A" not in results or results["A"].seqno != best.seqno:
            _write_copy(backing, best, MAGIC_A, COPY_A_OFF)
        if "B" not in results or results["B"].seqno != best.seqno:
            _write_copy(backing, best, MAGIC_B, COPY_B_OFF)
    return best


def write_header(backing, h: Header) -> Header:
    """Write a new version of the header atomically (A then B); returns it with its seqno."""
    new = replace(h, seqno=h.seqno + 1)
    _write_copy(backing, new, MAGIC_A, COPY_A_OFF)
    _write_copy(backing, new, MAGIC_B, COPY_B_OFF)
    return new


def header_copy_state(backing) -> dict:
    """Which copies are valid, for `disk check` and tests: {"A": seqno|None, "B": seqno|None}."""
    try:
        results, _ = _parse_copies(backing, "?")
    except UnsupportedFormat:
        return {"A": None, "B": None}
    return {label: (results[label].seqno if label in results else None) for label in ("A", "B")}
