"""Exclusive locks on half-open sector ranges: disjoint ranges do not wait for each other.

Caveat: a list scan per acquire; right for the few requests in flight on one
disk, not for thousands.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager


class RangeLock:
    """Exclusive locks on half-open sector ranges; disjoint ranges do not wait for each other.

    ``acquire`` returns a token for ``release``; the uncontended path is one lock
    round trip and a scan of the (short) list of ranges held now."""

    def __init__(self):
        self._cv = threading.Condition(threading.Lock())
        self._held: list[tuple[int, int]] = []
        self._waiting = 0

    def acquire(self, start: int, end: int) -> tuple[int, int]:
        item = (start, end)
        with self._cv:
            held = self._held
            while held and any(s < end and start < e for s, e in held):
                self._waiting += 1
                try:
                    self._cv.wait()
                finally:
                    self._waiting -= 1
            held.append(item)
        return item

    def release(self, item: tuple[int, int]) -> None:
        with self._cv:
            self._held.remove(item)
            if self._waiting:
                self._cv.notify_all()

    @contextmanager
    def hold(self, start: int, end: int):
        item = self.acquire(start, end)
        try:
            yield
        finally:
            self.release(item)
