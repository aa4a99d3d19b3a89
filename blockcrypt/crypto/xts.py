"""AES-256-XTS sectors (dm-crypt aes-xts-plain64) over the native C core.

Caveats: a native context serves one call at a time, so :class:`NativeXts`
keeps a pool of them (as many as concurrent requests); ``wipe`` wipes them all.
A large request on a context may also run on that context's helper thread (see
``split_threshold``); the environment variables ``BLOCKCRYPT_XTS_SPLIT_BYTES`` and
``BLOCKCRYPT_XTS_SPLIT_SPIN_US`` override the C defaults, for benchmarks.
"""
from __future__ import annotations

import os
import threading

from ..errors import NativeMissing
from .base import ALG_XTS, SECTOR_SIZES, SectorLayer

XTS_KEY_BYTES = 64


def _xts():
    try:
        from .. import _xts  # type: ignore[attr-defined]
    except ImportError as e:  # pragma: no cover - exercised by the CLI error test
        raise NativeMissing(module="blockcrypt._xts", why=str(e)) from None
    return _xts


def check_xts_key(key: bytes, sector_size: int) -> None:
    if len(key) != XTS_KEY_BYTES:
        raise ValueError(f"XTS key must be {XTS_KEY_BYTES} bytes")
    if sector_size not in SECTOR_SIZES:
        raise ValueError("sector_size must be 512 or 4096")


class NativeXts(SectorLayer):
    """AES-256-XTS over the C core, with a pool of libcrypto contexts.

    A request takes an idle context (or makes one) and gives it back, so the pool
    grows to the highest number of concurrent requests, not with thread churn (a
    FUSE daemon's worker threads come and go).

    ``split_threshold`` (bytes, 0 = never) and ``split_spin_us``: a request of at
    least that size, when no other request is in the C loop, is shared between the
    calling thread and the context's helper thread (docs/CRYPTO.md, "Splitting a
    request over two cores"). None takes ``BLOCKCRYPT_XTS_SPLIT_BYTES`` /
    ``BLOCKCRYPT_XTS_SPLIT_SPIN_US`` from the environment, else the C default."""

    algorithm = ALG_XTS

    def __init__(self, key: bytes, sector_size: int = 4096, *, split_threshold: int | None = None,
                 split_spin_us: int | None = None):
        check_xts_key(key, sector_size)
        self._mod = _xts()
        self._split = {}
        for kw, value, env in (("split_threshold", split_threshold, "BLOCKCRYPT_XTS_SPLIT_BYTES"),
                               ("split_spin_us", split_spin_us, "BLOCKCRYPT_XTS_SPLIT_SPIN_US")):
            if value is None and os.environ.get(env, "").strip():
                try:
                    value = int(os.environ[env])
                except ValueError:
                    raise ValueError(f"{env} must be an integer, not {os.environ[env]!r}") from None
            if value is not None:
                self._split[kw] = value
        self.sector_size = sector_size
        self._key = bytearray(key)
        self._lock = threading.Lock()
        self._all: list = []      # every context made (wiped together)
        self._idle: list = []     # contexts not in use; list.pop/append are atomic under the GIL
        self._wiped = False
        self._idle.append(self._new())  # validate the key now (equal halves etc.)

    def _new(self):
        with self._lock:
            if self._wiped:
                raise ValueError("cipher is wiped")
            ctx = self._mod.XtsContext(bytes(self._key), self.sector_size, **self._split)
            self._all.append(ctx)
            return ctx

    def _take(self):
        try:
            return self._idle.pop()
        except IndexError:
            return self._new()

    def encrypt(self, data, sector_no: int) -> bytes:
        ctx = self._take()
        try:
            return ctx.encrypt(data, sector_no)
        finally:
            self._idle.append(ctx)

    def decrypt(self, data, sector_no: int) -> bytes:
        ctx = self._take()
        try:
            return ctx.decrypt(data, sector_no)
        finally:
            self._idle.append(ctx)

    @property
    def pool_size(self) -> int:
        return len(self._all)

    def wipe(self) -> None:
        with self._lock:
            self._wiped = True
            for ctx in self._all:
                ctx.wipe()
            self._all.clear()
            self._idle.clear()
            for i in range(len(self._key)):
                self._key[i] = 0
