"""Customer-managed keys on a KMIP server: a symmetric key by its unique id, over TLS with client certificates.

A disk encryption set names the key as ``kmip://HOST:PORT/UID`` and holds the
client certificate, its key and the server's CA (an identity file
``{"cert": PATH, "key": PATH, "ca": PATH}``, or ``--ca``); the server knows
the client by its certificate and lets only the key's owner use it.

- wrap:   KMIP Encrypt, AES-256-CBC with PKCS#5 padding and a random 16-byte IV,
          of  DEK (64) || SHA-256("blockcrypt/v1/kmip-binding\\0" || binding context || DEK).
          The common KMIP profile (and PyKMIP's client) offers no AEAD, so the
          binding and an integrity check travel inside the wrapped plaintext:
          a wrapped DEK moved to another disk, or a changed ciphertext, fails
          the digest. blob = IV || ciphertext.
- unwrap: KMIP Decrypt, then the digest check.

The versioned KEK id is the key URL itself (a KMIP key has no versions):
rotation is a new key id on the DES (``des update NAME --key-url
kmip://HOST:PORT/NEWUID``) and a re-wrap of every DEK (unwrap + wrap).

Errors: connection refused, TLS failures, timeouts -> KeyUnavailable; the
server does not know the key for this client (another owner) ->
KeyAccessDenied; a revoked (deactivated, compromised) key -> KeyDisabled;
destroyed -> KeyPurged; a failed digest -> KeyIntegrityError.

Caveats: PyKMIP (the client library, imported lazily) keeps one TLS
connection per DES, opened again when the certificate file changes or the
connection fails; its server is test-only by its own docs.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import threading
from urllib.parse import urlsplit

from ...errors import (KeyAccessDenied, KeyDisabled, KeyError_, KeyIntegrityError, KeyPurged, KeyUnavailable,
                       NotFound, Refused, UsageError)
from ..base import KekProvider, KeyStatus, WrappedKey

WRAP_ALG = "KMIP-AES-CBC+SHA256"
DEK_BYTES = 64
TIMEOUT_S = 10.0


def parse_key_url(url: str) -> tuple[str, int, str]:
    """kmip://HOST:PORT/UID -> (host, port, unique id)."""
    parts = urlsplit(url or "")
    uid = parts.path.strip("/")
    if parts.scheme != "kmip" or not parts.hostname or not uid or "/" in uid:
        raise UsageError(f"invalid KMIP key URL {url!r}: expected kmip://HOST:PORT/UID")
    return parts.hostname, parts.port or 5696, uid


def _digest(context: bytes, dek: bytes) -> bytes:
    return hashlib.sha256(b"blockcrypt/v1/kmip-binding\0" + context + dek).digest()


class _Conn:
    def __init__(self, host: str, port: int, ident: dict, ca: str | None):
        self.host, self.port, self.ident, self.ca = host, port, ident, ca or ident.get("ca")
        self.lock = threading.Lock()
        self.client = None
        self.cert_mtime = None

    def _cert_mtime(self):
        try:
            st = os.stat(self.ident["cert"])
            return st.st_mtime_ns, st.st_size
        except OSError:
            return None

    def get(self):
        m = self._cert_mtime()
        if self.client is not None and m == self.cert_mtime:
            return self.client
        self.drop()
        from kmip.pie.client import ProxyKmipClient
        c = ProxyKmipClient(hostname=self.host, port=self.port, cert=self.ident["cert"], key=self.ident["key"],
                            ca=self.ca, config_file="/dev/null")
        c.open()
        self.client, self.cert_mtime = c, m
        return c

    def drop(self):
        if self.client is not None:
            try:
                self.client.close()
            except Exception:   # the connection is gone already
                pass
        self.client = None


class KmipKeyProvider(KekProvider):
    """DEKs wrapped by a symmetric key on a KMIP server (Encrypt/Decrypt), through a client certificate."""

    NAME = "kmip"

    def __init__(self, state):
        self.state = state
        self._conns: dict[str, _Conn] = {}
        self._probing: dict[str, object] = {}
        self._lock = threading.Lock()

    # -- the DES that owns a key ----------------------------------------------------------------------
    def des_for(self, kek_ref: str):
        host, port, uid = parse_key_url(kek_ref)
        if kek_ref in self._probing:
            return self._probing[kek_ref]
        for d in self.state.catalog.list_des():
            if not d.key_url.startswith("kmip://"):
                continue
            urls = (d.key_url, d.active_key, *d.previous_keys)
            if any(parse_key_url(u) == (host, port, uid) for u in urls):
                return d
        raise NotFound(kind="disk encryption set for key", name=kek_ref)

    def same_key(self, des, url: str) -> bool:
        """A DES's key may move to another key id on the same server (that is KMIP rotation)."""
        return parse_key_url(url)[:2] == parse_key_url(des.key_url)[:2]

    @staticmethod
    def is_versioned(url: str) -> bool:
        parse_key_url(url)
        return True   # a unique id names one key: nothing newer to follow

    def forget(self, des_id: str) -> None:
        with self._lock:
            c = self._conns.pop(des_id, None)
        if c is not None:
            c.drop()

    def _conn(self, des) -> _Conn:
        with self._lock:
            c = self._conns.get(des.des_id)
            if c is None:
                host, port, _ = parse_key_url(des.key_url)
                c = self._conns[des.des_id] = _Conn(host, port, des.identity, des.ca_file)
            return c

    def _call(self, kek_id: str, fn):
        from kmip.core import enums
        from kmip.pie.exceptions import KmipOperationFailure
        conn = self._conn(self.des_for(kek_id))
        with conn.lock:
            try:
                return fn(conn.get(), parse_key_url(kek_id)[2])
            except KmipOperationFailure as e:
                text = str(getattr(e, "message", "") or e)
                if e.reason == enums.ResultReason.ITEM_NOT_FOUND:
                    raise KeyPurged(key_id=kek_id) from None
                if e.reason == enums.ResultReason.PERMISSION_DENIED:
                    if "Active state" in text:
                        raise KeyDisabled(key_id=kek_id) from None
                    raise KeyAccessDenied(key_id=kek_id, msg="the KMIP server refused this client "
                                                             "certificate the key") from None
                if e.reason in (enums.ResultReason.CRYPTOGRAPHIC_FAILURE, enums.ResultReason.INVALID_MESSAGE):
                    raise KeyIntegrityError(key_id=kek_id, msg="the KMIP server could not decrypt it") from None
                raise KeyUnavailable(key_id=kek_id, msg=f"KMIP {e.reason.name if e.reason else 'failure'}") from None
            except KeyError_:
                raise
            except Exception as e:   # sockets, TLS, PyKMIP's own connection errors
                conn.drop()
                raise KeyUnavailable(key_id=kek_id, msg=f"KMIP server: {type(e).__name__}") from None

    @staticmethod
    def _params():
        from kmip.core.enums import BlockCipherMode, CryptographicAlgorithm, PaddingMethod
        return {"block_cipher_mode": BlockCipherMode.CBC, "padding_method": PaddingMethod.PKCS5,
                "cryptographic_algorithm": CryptographicAlgorithm.AES}

    # -- the provider interface -------------------------------------------------------------------------
    def default_ref(self) -> str:
        raise UsageError("a customer-managed key needs a disk encryption set (--des)")

    def latest_version(self, des) -> str:
        return des.active_key

    def _state(self, kek_ref: str):
        from kmip.core import enums
        _, attrs = self._call(kek_ref, lambda c, uid: c.get_attributes(uid, ["State"]))
        state = attrs[0].attribute_value.value if attrs else None
        if state in (enums.State.DEACTIVATED, enums.State.COMPROMISED, enums.State.PRE_ACTIVE):
            raise KeyDisabled(key_id=kek_ref)
        if state in (enums.State.DESTROYED, enums.State.DESTROYED_COMPROMISED):
            raise KeyPurged(key_id=kek_ref)
        return state

    def status(self, kek_ref: str, disk_id: str | None = None) -> KeyStatus:
        try:
            self._state(kek_ref)
        except KeyError_ as e:
            return KeyStatus(kek_ref, False, e.reason, str(e))
        return KeyStatus(kek_ref, True)

    def wrap(self, kek_ref: str, dek: bytes, context: bytes, disk_id: str | None = None) -> WrappedKey:
        if len(dek) != DEK_BYTES:
            raise ValueError("DEK must be 64 bytes")
        iv = os.urandom(16)
        plain = bytes(dek) + _digest(context, bytes(dek))
        ct, _ = self._call(kek_ref, lambda c, uid: c.encrypt(plain, uid=uid, cryptographic_parameters=self._params(),
                                                              iv_counter_nonce=iv))
        del plain
        return WrappedKey(self.NAME, kek_ref, WRAP_ALG, iv + bytes(ct))

    def unwrap(self, wrapped: WrappedKey, context: bytes, disk_id: str | None = None) -> bytes:
        if wrapped.algorithm != WRAP_ALG or len(wrapped.blob) < 16 + 16:
            raise KeyIntegrityError(key_id=wrapped.kek_id, msg="unknown wrap algorithm or short blob")
        iv, ct = wrapped.blob[:16], wrapped.blob[16:]
        plain = bytes(self._call(wrapped.kek_id, lambda c, uid: c.decrypt(
            ct, uid=uid, cryptographic_parameters=self._params(), iv_counter_nonce=iv)))
        if len(plain) != DEK_BYTES + 32 or not hmac.compare_digest(plain[DEK_BYTES:],
                                                                   _digest(context, plain[:DEK_BYTES])):
            raise KeyIntegrityError(key_id=wrapped.kek_id, msg="the wrapped key belongs to another disk or layer, "
                                                               "or is damaged")
        return plain[:DEK_BYTES]

    # -- disk encryption sets ---------------------------------------------------------------------------
    def identity_from(self, doc: dict | None) -> tuple[dict, dict]:
        """The client certificate: {"cert": PATH, "key": PATH[, "ca": PATH][, "name": ...]}."""
        if not doc or not doc.get("cert") or not doc.get("key"):
            raise UsageError('a KMIP key needs --identity-file {"cert": PATH, "key": PATH, "ca": PATH} '
                             "(the client certificate the KMIP server knows)")
        ident = {k: str(doc[k]) for k in ("name", "cert", "key", "ca") if doc.get(k)}
        return ident, {}

    def probe(self, des) -> str:
        url = des.key_url
        self._probing[url] = des
        try:
            self._state(url)
            sample = bytes(DEK_BYTES)
            ctx = b"blockcrypt/v1/des-probe"
            if self.unwrap(self.wrap(url, sample, ctx), ctx) != sample:
                raise Refused(f"KMIP key {url}: the encrypt/decrypt round trip failed")
        finally:
            self._probing.pop(url, None)
        return url
