"""Header copies over a backing store: read the newest valid copy, write both.

Writes go copy A first, then copy B, each flushed, with the same sequence
number: a torn copy fails its checksum and the other copy is used, so a header
write is atomic. On open, the valid copy with the highest sequence number wins
and a damaged or stale copy is rewritten from it (when opened writable), but
only from a copy of the same disk id: a copy naming another disk (grafted
from another disk file) is damaged, never a source.

Many headers at once (:func:`write_headers`, a rotation's batch of disks) are written in two
passes with one sync pass after each: copy A of every header, sync them all, then copy B of
every header, sync them all. Each header keeps the argument above: while its copy A is being
written its copy B is untouched (the old header, valid), and copy B is only touched once every
copy A of the pass is durable (the new header, valid); so a crash anywhere leaves each disk
with its old or its new header, and the fsyncs of a pass overlap instead of queueing.

Caveat: ``backing`` is anything with read_at/write_at/flush (storage/base.py);
callers that update headers hold the backing's lock (control/disks.py).
"""
from __future__ import annotations

import struct
from dataclasses import replace

from ..errors import CorruptHeader, UnsupportedFormat
from .header import MAGIC_A, MAGIC_B, Header, pack, unpack
from .layout import COPY_A_OFF, COPY_B_OFF, COPY_MAX


_PAGE = 4096


def _write_copy(backing, h: Header, magic: bytes, off: int, flush: bool = True, old: Header | None = None) -> None:
    raw = pack(h, magic)
    # zero the rest of a previous, longer copy so no stale bytes (an older wrapped DEK) linger:
    # the whole copy area, or, knowing the copy being replaced (``old``), up to its end
    end = COPY_MAX
    if old is not None:
        end = min(COPY_MAX, -(-max(len(raw), len(pack(old, magic))) // _PAGE) * _PAGE)
    backing.write_at(off, raw + bytes(end - len(raw)))
    if flush:
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


def write_headers(items, sync=None) -> list[Header]:
    """Write a new version of each ``(backing, header[, on_disk])`` in ``items``, each atomically
    (see the module docstring): copy A of all, ``sync(backings)``, copy B of all,
    ``sync(backings)``. ``on_disk``, the header both copies hold now (read_header with repair),
    lets each copy be cleared up to the end of that one's copy instead of the whole 64 KiB
    area. ``sync`` (default: flush each in turn) makes every listed backing's writes durable; a
    caller passes one that flushes them in parallel. Returns the headers with their seqnos."""
    items = [tuple(it) + (None,) * (3 - len(it)) for it in items]
    backings = [b for b, _, _ in items]
    sync = sync or (lambda bs: [b.flush() for b in bs])
    new = [replace(h, seqno=h.seqno + 1) for _, h, _ in items]
    for (b, _, old), h in zip(items, new):
        _write_copy(b, h, MAGIC_A, COPY_A_OFF, flush=False, old=old)
    sync(backings)
    for (b, _, old), h in zip(items, new):
        _write_copy(b, h, MAGIC_B, COPY_B_OFF, flush=False, old=old)
    sync(backings)
    return new


def header_copy_state(backing) -> dict:
    """Which copies are valid, for `disk check` and tests: {"A": seqno|None, "B": seqno|None}."""
    try:
        results, _ = _parse_copies(backing, "?")
    except UnsupportedFormat:
        return {"A": None, "B": None}
    return {label: (results[label].seqno if label in results else None) for label in ("A", "B")}
