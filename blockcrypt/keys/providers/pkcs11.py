"""Keys in a PKCS#11 token (an HSM; SoftHSM2 in tests), addressed by RFC 7512 URIs.

A key is an AES-256 secret-key object that never leaves the token
(CKA_EXTRACTABLE false, CKA_SENSITIVE true); its versions are objects with
the same label (``object``) and the version number as CKA_ID (ASCII decimal).
A reference names the token and object, the module and where the PIN is::

    pkcs11:token=TOKEN;object=NAME[;id=N]?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/bc/pin

``pin-source`` is ``file:PATH`` (a file of mode 0600 owned by this user) or
``env:VAR`` (an environment variable); a PIN in the URI (``pin-value``) is
refused: it would end up on command lines and in the catalog. The versioned
KEK id recorded in disk headers is the path part only,
``pkcs11:token=TOKEN;object=NAME;id=N``; the module and PIN come from the
disk encryption set (``Pkcs11KeyProvider``) or the platform key store's
configuration (platform.py, ``init --platform-keys pkcs11:...``).

- wrap:   CKM_AES_GCM inside the token, 12-byte random nonce, associated
          data = binding context || versioned KEK id; blob = nonce || ct || tag.
- unwrap: the same, in the token; a wrong disk, role or version fails the tag.
- rotation: a new key object (id N+1) and a re-wrap (unwrap + wrap).

Errors: the module or token missing, a removed device -> KeyUnavailable; a
PIN the token refuses, or an unreadable PIN source -> KeyAccessDenied; a key
whose CKA_DECRYPT was cleared -> KeyDisabled; a destroyed object ->
KeyPurged (tokens have no soft delete); a failed tag -> KeyIntegrityError.

Caveats: PKCS#11 logins are per process and token, so sessions are shared by
every provider instance in the process (``_TOKENS``); the PIN source is read
again on every call and a changed PIN logs in again (that is how a PIN the SO
changed revokes access). python-pkcs11 is imported lazily. These are not the
vault's own HSM keys (vault/server/hsm_keys.py, RSA-HSM keys of ``vault
serve``): this provider is the host's direct use of a token.
"""
from __future__ import annotations

import os
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, unquote

from ...errors import (KeyAccessDenied, KeyDisabled, KeyError_, KeyIntegrityError, KeyPurged, KeyUnavailable,
                       NotFound, Refused, UsageError)
from ..base import KekProvider, KeyStatus, WrappedKey

WRAP_ALG = "A256GCM"
DEK_BYTES = 64
CKR_KEY_FUNCTION_NOT_PERMITTED = 0x68
_PATH_ATTRS = ("token", "object", "id")
_QUERY_ATTRS = ("module-path", "pin-source")


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str
    object: str
    version: int | None = None
    module: str | None = None
    pin_source: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.token, self.object

    def kek_id(self, version: int | None = None) -> str:
        v = self.version if version is None else version
        return (f"pkcs11:token={quote(self.token, safe='')};object={quote(self.object, safe='')}"
                + (f";id={v}" if v is not None else ""))

    def with_version(self, version: int | None) -> "Pkcs11Uri":
        return Pkcs11Uri(self.token, self.object, version, self.module, self.pin_source)

    def full(self) -> str:
        q = "&".join(f"{k}={quote(v, safe='/:')}" for k, v in (("module-path", self.module),
                                                              ("pin-source", self.pin_source)) if v)
        return self.kek_id() + (f"?{q}" if q else "")


def parse_uri(uri: str) -> Pkcs11Uri:
    """An RFC 7512 ``pkcs11:`` URI naming a key (token and object; id = version)."""
    if not isinstance(uri, str) or not uri.startswith("pkcs11:"):
        raise UsageError(f"invalid PKCS#11 URI {uri!r}: expected pkcs11:token=T;object=K[;id=N]"
                         "?module-path=M&pin-source=file:PATH")
    path, _, query = uri[len("pkcs11:"):].partition("?")
    attrs: dict[str, str] = {}
    for part, allowed in ((path, _PATH_ATTRS), (query, _QUERY_ATTRS)):
        for item in filter(None, part.split(";" if part is path else "&")):
            name, eq, value = item.partition("=")
            if name == "pin-value":
                raise UsageError("a PIN in the PKCS#11 URI is refused (it would reach command lines and the "
                                 "catalog): use pin-source=file:PATH (mode 0600) or pin-source=env:VAR")
            if not eq or name not in allowed:
                raise UsageError(f"invalid PKCS#11 URI {uri!r}: unsupported attribute {name!r} "
                                 f"(path: {', '.join(_PATH_ATTRS)}; query: {', '.join(_QUERY_ATTRS)})")
            attrs[name] = unquote(value)
    if not attrs.get("token") or not attrs.get("object"):
        raise UsageError(f"invalid PKCS#11 URI {uri!r}: it must name token= and object=")
    version = attrs.get("id")
    if version is not None and not version.isdigit():
        raise UsageError(f"invalid PKCS#11 URI {uri!r}: id must be a key version number")
    return Pkcs11Uri(attrs["token"], attrs["object"], int(version) if version else None,
                     attrs.get("module-path"), attrs.get("pin-source"))


def read_pin(pin_source: str | None, key_id: str) -> str:
    """The PIN from ``file:PATH`` (0600, owned by this user) or ``env:VAR``."""
    if not pin_source:
        raise UsageError("a PKCS#11 key needs pin-source=file:PATH or pin-source=env:VAR in its URI")
    kind, _, where = pin_source.partition(":")
    if kind == "env" and where:
        pin = os.environ.get(where)
        if pin is None:
            raise KeyAccessDenied(key_id=key_id, msg=f"the PIN variable {where} is not set")
        return pin.strip()
    path = where if kind == "file" else pin_source
    try:
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.geteuid():
            raise KeyAccessDenied(key_id=key_id, msg=f"the PIN file {path} must be mode 0600 and owned by "
                                                      f"this user (chmod 600 {path})")
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise KeyAccessDenied(key_id=key_id, msg=f"cannot read the PIN file {path} ({e.strerror})") from None


class _TokenSession:
    """One logged-in session on one token of one module, shared by the whole process."""

    def __init__(self, module: str, token: str):
        self.module, self.token_label = module, token
        self.lock = threading.RLock()
        self.session = None
        self._pin_digest = None

    def _close(self):
        if self.session is not None:
            try:
                self.session.close()
            except Exception:   # the session may already be gone with its device
                pass
            self.session = None

    def open(self, pin: str):
        import hashlib
        import pkcs11
        digest = hashlib.sha256(pin.encode()).digest()
        if self.session is not None and digest == self._pin_digest:
            return self.session
        self._close()
        lib = pkcs11.lib(self.module)
        token = lib.get_token(token_label=self.token_label)
        self.session = token.open(user_pin=pin, rw=True)
        self._pin_digest = digest
        return self.session

    def reset(self):
        self._close()
        self._pin_digest = None


_TOKENS: dict[tuple[str, str], _TokenSession] = {}
_TOKENS_LOCK = threading.Lock()


def _token(module: str, token: str) -> _TokenSession:
    with _TOKENS_LOCK:
        t = _TOKENS.get((module, token))
        if t is None:
            t = _TOKENS[(module, token)] = _TokenSession(module, token)
        return t


class Pkcs11Keys:
    """Key objects of one (module, token, object, PIN source): versions, wrap, unwrap, create, destroy."""

    def __init__(self, uri: Pkcs11Uri):
        if not uri.module:
            raise UsageError(f"PKCS#11 key {uri.kek_id()}: the URI needs module-path=...")
        self.uri = uri.with_version(None)
        self._t = _token(uri.module, uri.token)

    @contextmanager
    def session(self, key_id: str | None = None):
        """The logged-in session, with PKCS#11 errors turned into typed key errors."""
        import pkcs11
        from pkcs11 import exceptions as x
        kid = key_id or self.uri.kek_id()
        with self._t.lock:
            pin = read_pin(self.uri.pin_source, kid)
            try:
                yield self._t.open(pin)
            except KeyError_:
                raise
            except (x.PinIncorrect, x.PinLocked, x.PinExpired, x.PinInvalid, x.PinLenRange) as e:
                self._t.reset()
                raise KeyAccessDenied(key_id=kid, msg=f"the token refused the PIN ({type(e).__name__})") from None
            except x.NoSuchKey:
                raise KeyPurged(key_id=kid) from None
            except (x.NoSuchToken, x.TokenNotPresent, x.TokenNotRecognised, x.DeviceRemoved, x.DeviceError,
                    x.DeviceMemory, x.SessionClosed, x.SessionHandleInvalid, x.UserNotLoggedIn,
                    x.KeyHandleInvalid, x.ObjectHandleInvalid) as e:
                self._t.reset()
                raise KeyUnavailable(key_id=kid, msg=f"token {self.uri.token!r}: {type(e).__name__}") from None
            except (x.EncryptedDataInvalid, x.EncryptedDataLenRange, x.GeneralError) as e:
                raise KeyIntegrityError(key_id=kid, msg="authentication failed: wrong disk, role or key "
                                                        f"version, or tampered ({type(e).__name__})") from None
            except pkcs11.PKCS11Error as e:
                if f"0x{CKR_KEY_FUNCTION_NOT_PERMITTED:x}" in str(e):
                    raise KeyDisabled(key_id=kid) from None
                raise KeyUnavailable(key_id=kid, msg=f"token {self.uri.token!r}: {type(e).__name__}") from None
            except (OSError, RuntimeError) as e:
                self._t.reset()
                raise KeyUnavailable(key_id=kid, msg=f"cannot load PKCS#11 module {self.uri.module} "
                                                     f"({type(e).__name__})") from None

    def _objects(self, s):
        from pkcs11 import Attribute, ObjectClass
        return list(s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self.uri.object}))

    def versions(self) -> list[int]:
        from pkcs11 import Attribute
        with self.session() as s:
            out = []
            for o in self._objects(s):
                v = bytes(o[Attribute.ID] or b"")
                if v.isdigit():
                    out.append(int(v))
            return sorted(out)

    def latest(self) -> int:
        vs = self.versions()
        if not vs:
            raise KeyPurged(key_id=self.uri.kek_id())
        return vs[-1]

    def _key(self, s, version: int):
        return s.get_key(label=self.uri.object, id=str(version).encode())

    def create(self, version: int | None = None) -> int:
        """A new non-extractable AES-256 key object (version = highest + 1 unless given)."""
        from pkcs11 import Attribute, KeyType
        with self.session() as s:
            if version is None:
                version = max(self.versions() or [0]) + 1
            s.generate_key(KeyType.AES, 256, label=self.uri.object, id=str(version).encode(), store=True,
                           template={Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True,
                                     Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.TOKEN: True,
                                     Attribute.PRIVATE: True, Attribute.WRAP: False, Attribute.UNWRAP: False})
        return version

    def destroy(self, version: int) -> None:
        with self.session() as s:
            self._key(s, version).destroy()

    def check(self, version: int) -> None:
        """Refuse a key that could leave the token, or that is not AES-256."""
        from pkcs11 import Attribute, KeyType
        kid = self.uri.kek_id(version)
        with self.session(kid) as s:
            k = self._key(s, version)
            if k.key_type != KeyType.AES or k.key_length != 256:
                raise Refused(f"PKCS#11 key {kid} is not AES-256")
            if k[Attribute.EXTRACTABLE] or not k[Attribute.SENSITIVE]:
                raise Refused(f"PKCS#11 key {kid} is extractable or not sensitive: a key-encryption key must "
                              "never leave the token")
            if not k[Attribute.DECRYPT]:
                raise KeyDisabled(key_id=kid)

    def set_usable(self, version: int, usable: bool) -> None:
        """Set CKA_ENCRYPT/CKA_DECRYPT of a version (clearing them disables the key)."""
        from pkcs11 import Attribute
        with self.session() as s:
            k = self._key(s, version)
            k[Attribute.ENCRYPT] = usable
            k[Attribute.DECRYPT] = usable

    def encrypt(self, version: int, dek: bytes, aad: bytes) -> bytes:
        from pkcs11 import GCMParams, Mechanism
        nonce = os.urandom(12)
        kid = self.uri.kek_id(version)
        with self.session(kid) as s:
            k = self._key(s, version)
            if not hasattr(k, "encrypt"):   # python-pkcs11 offers only what CKA_ENCRYPT allows
                raise KeyDisabled(key_id=kid)
            ct = k.encrypt(bytes(dek), mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, 128))
        return nonce + bytes(ct)

    def decrypt(self, version: int, blob: bytes, aad: bytes) -> bytes:
        from pkcs11 import GCMParams, Mechanism
        kid = self.uri.kek_id(version)
        if len(blob) < 12 + 16:
            raise KeyIntegrityError(key_id=kid, msg="short blob")
        with self.session(kid) as s:
            k = self._key(s, version)
            if not hasattr(k, "decrypt"):   # CKA_DECRYPT cleared: the key is disabled
                raise KeyDisabled(key_id=kid)
            return bytes(k.decrypt(blob[12:], mechanism=Mechanism.AES_GCM,
                                   mechanism_param=GCMParams(blob[:12], aad, 128)))


class Pkcs11KeyProvider(KekProvider):
    """Customer-managed keys: a disk encryption set on a PKCS#11 token's AES-256 key (RFC 7512 URI)."""

    NAME = "pkcs11"

    def __init__(self, state):
        self.state = state
        self._probing: dict[tuple[str, str], object] = {}

    def des_for(self, kek_ref: str):
        key = parse_uri(kek_ref).key
        if key in self._probing:
            return self._probing[key]
        for d in self.state.catalog.list_des():
            if d.key_url.startswith("pkcs11:") and parse_uri(d.key_url).key == key:
                return d
        raise NotFound(kind="disk encryption set for key", name=parse_uri(kek_ref).kek_id())

    def keys_for(self, kek_ref: str) -> Pkcs11Keys:
        return Pkcs11Keys(parse_uri(self.des_for(kek_ref).key_url))

    @staticmethod
    def is_versioned(url: str) -> bool:
        return parse_uri(url).version is not None

    def forget(self, des_id: str) -> None:
        pass   # sessions are per process and token, shared (see _TOKENS)

    def default_ref(self) -> str:
        raise UsageError("a customer-managed key needs a disk encryption set (--des)")

    def latest_version(self, des) -> str:
        keys = Pkcs11Keys(parse_uri(des.key_url))
        return keys.uri.kek_id(keys.latest())

    def _version(self, keys: Pkcs11Keys, kek_ref: str) -> int:
        v = parse_uri(kek_ref).version
        return keys.latest() if v is None else v

    def status(self, kek_ref: str, disk_id: str | None = None) -> KeyStatus:
        try:
            keys = self.keys_for(kek_ref)
            version = self._version(keys, kek_ref)
            keys.check(version)
        except KeyError_ as e:
            return KeyStatus(parse_uri(kek_ref).kek_id(), False, e.reason, str(e))
        return KeyStatus(keys.uri.kek_id(version), True)

    def wrap(self, kek_ref: str, dek: bytes, context: bytes, disk_id: str | None = None) -> WrappedKey:
        if len(dek) != DEK_BYTES:
            raise ValueError("DEK must be 64 bytes")
        keys = self.keys_for(kek_ref)
        version = self._version(keys, kek_ref)
        kid = keys.uri.kek_id(version)
        return WrappedKey(self.NAME, kid, WRAP_ALG, keys.encrypt(version, dek, context + kid.encode()))

    def unwrap(self, wrapped: WrappedKey, context: bytes, disk_id: str | None = None) -> bytes:
        uri = parse_uri(wrapped.kek_id)
        if wrapped.algorithm != WRAP_ALG or uri.version is None:
            raise KeyIntegrityError(key_id=wrapped.kek_id, msg="unknown wrap algorithm or unversioned key id")
        keys = self.keys_for(wrapped.kek_id)
        return keys.decrypt(uri.version, wrapped.blob, context + uri.kek_id().encode())

    # -- disk encryption sets --------------------------------------------------------------------
    def identity_from(self, doc: dict | None) -> tuple[dict, dict]:
        """No identity file: the token's PIN (from the URI's pin-source) is the credential."""
        return {"name": ""}, {}

    def probe(self, des) -> str:
        uri = parse_uri(des.key_url)
        read_pin(uri.pin_source, uri.kek_id())
        keys = Pkcs11Keys(uri)
        version = uri.version or keys.latest()
        keys.check(version)
        kid = uri.kek_id(version)
        ctx = b"blockcrypt/v1/des-probe"
        self._probing[uri.key] = des
        try:
            sample = bytes(DEK_BYTES)
            if self.unwrap(self.wrap(kid, sample, ctx), ctx) != sample:
                raise Refused(f"PKCS#11 key {kid}: the encrypt/decrypt round trip failed")
        finally:
            self._probing.pop(uri.key, None)
        return kid
