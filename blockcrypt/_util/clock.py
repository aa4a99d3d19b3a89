"""The one clock: wall-clock timestamps as blockcrypt writes them.

``now_iso()`` is ISO 8601 UTC with seconds (``2026-12-01T10:22:51+00:00``), the
format of catalog records; ``now_s()`` is integer Unix seconds (the vault's key
attributes, as Azure has them); ``iso_z(t)`` turns Unix seconds into
``2026-12-01T10:22:51Z`` (logs, key events, the vault CLI).

Caveat: wall clock, not monotonic: use time.monotonic() for intervals.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def now_s() -> int:
    return int(time.time())


def iso_z(t: float | int | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else int(t)))


def iso_ms(t: float | None = None) -> str:
    """``2026-12-01T10:22:51.123Z``: the vault audit's record time."""
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
