"""The key-encryption-key (KEK) provider interface.

Every KEK source (the platform key store, a key vault, a PKCS#11 token, an
external KMS) implements :class:`KekProvider`, names itself with ``NAME`` (the
string recorded in disk headers) and is listed in registry.py (a static table
of built-ins, plus entry points). The control plane only ever calls::

    status(kek_ref)                        -> KeyStatus
    wrap(kek_ref, dek, context, disk_id=None)          -> WrappedKey
    unwrap(wrapped, context, disk_id=None)             -> bytes (the DEK)
    rewrap(wrapped, context, to_ref, disk_id=None)     -> WrappedKey
    rewrap_many([(wrapped, context, to_ref, disk_id)], pool=None) -> [WrappedKey or error]

``kek_ref`` names a key, optionally unversioned ("latest"); a ``WrappedKey``
always records the *versioned* KEK id it was wrapped under. ``context`` is the
binding (disk id + layer role): providers with AEAD use it as associated data,
others carry a digest of it inside the wrapped plaintext and check it on unwrap.
``disk_id`` (hex) is caller context for the provider's audit trail only.
``rewrap_many`` is a rotation's batch: by default one ``rewrap`` per item over the
caller's thread pool; a provider with a batch API re-wraps many DEKs in fewer
round trips (transit: one ``batch_input`` request; the vault: see akv.py).

Failures are typed (blockcrypt.errors): KeyUnavailable (transient: retry and
keep serving from a cached DEK), KeyAccessDenied, KeyDisabled, KeyExpired,
KeyDeleted, KeyPurged, KeyIntegrityError (never retried).

Caveat: providers never log key bytes; DEKs are returned as ``bytes`` and the
caller is responsible for dropping them once the sector cipher holds the key.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class WrappedKey:
    provider: str
    kek_id: str       # versioned: e.g. "platform/3" or "https://vault:8443/keys/k/abc123"
    algorithm: str    # wrap algorithm: "A256GCM", "RSA-OAEP-256", ...
    blob: bytes


@dataclass(frozen=True)
class KeyStatus:
    kek_id: str
    usable: bool
    reason: str = "Enabled"     # or the reason string of the matching KeyError_ class
    detail: str = ""


class KekProvider(abc.ABC):
    NAME: ClassVar[str] = ""

    @abc.abstractmethod
    def default_ref(self) -> str:
        """The KEK reference new DEKs are wrapped under when the caller names none."""

    @abc.abstractmethod
    def status(self, kek_ref: str) -> KeyStatus: ...

    @abc.abstractmethod
    def wrap(self, kek_ref: str, dek: bytes, context: bytes, disk_id: str | None = None) -> WrappedKey: ...

    @abc.abstractmethod
    def unwrap(self, wrapped: WrappedKey, context: bytes, disk_id: str | None = None) -> bytes: ...

    def rewrap(self, wrapped: WrappedKey, context: bytes, to_ref: str, disk_id: str | None = None) -> WrappedKey:
        dek = self.unwrap(wrapped, context, disk_id=disk_id)
        try:
            return self.wrap(to_ref, dek, context, disk_id=disk_id)
        finally:
            del dek

    def rewrap_many(self, items, pool=None) -> list:
        """Re-wrap each ``(wrapped, context, to_ref, disk_id)``; one result per item, in order:
        the new WrappedKey, or the BlockcryptError that item failed with. Here: one rewrap per
        item, spread over ``pool`` (a ThreadPoolExecutor) when given."""
        from ..errors import BlockcryptError

        def one(item):
            wrapped, context, to_ref, disk_id = item
            try:
                return self.rewrap(wrapped, context, to_ref, disk_id=disk_id)
            except BlockcryptError as e:
                return e
        if pool is not None and len(items) > 1:
            return list(pool.map(one, items))
        return [one(it) for it in items]
