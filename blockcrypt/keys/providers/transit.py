"""Customer-managed keys in an OpenBao (or HashiCorp Vault) transit engine.

A disk encryption set names a transit key by URL::

    transit+https://HOST:PORT/MOUNT/keys/NAME[/VERSION]     (transit+http:// for a local dev server)

and holds an AppRole identity (role id + secret id: the managed-identity
analogue) whose policy grants ``update`` on MOUNT/encrypt|decrypt|rewrap/NAME
and ``read`` on MOUNT/keys/NAME. This provider logs in with it, renews the
token before half its TTL has passed and logs in again when renewal is refused.

- wrap:   transit ``encrypt`` of the 64-byte DEK with ``context`` = the disk
          binding (the key must be ``derived``: every disk and layer role gets
          its own derived key, so a wrapped DEK moved to another disk fails
          its AES-GCM tag). blob = the ``vault:vN:...`` ciphertext (ASCII).
- unwrap: transit ``decrypt`` with the same context.
- rewrap: transit ``rewrap`` to the target version with the same context; the
          DEK never leaves the server in the clear. A rotation's batch of disks
          goes in one request (``rewrap_many``: ``batch_input``, up to BATCH_MAX
          DEKs); an item the server refuses is retried alone, for its typed error.

The versioned KEK id is the key URL with the version the ciphertext names
(``.../keys/NAME/3``); "latest" is the key's ``latest_version`` (what
auto-rotation follows: the server may rotate the key on its own
``auto_rotate_period``).

Errors: connection refused, timeouts, 5xx, a sealed server -> KeyUnavailable;
403 (policy removed, secret id revoked) -> KeyAccessDenied; a ciphertext
version below ``min_decryption_version`` -> KeyDisabled; a soft-deleted key
(OpenBao) -> KeyDeleted (restorable by the admin); a deleted key -> KeyPurged;
a failed tag -> KeyIntegrityError.

Caveats: the secret id lives in STATE/keys/des/<des id>.json (0600), like the
vault identity's secret; hvac is imported lazily. Refused at DES creation: a
key that is not derived, or one that is exportable or allows plaintext backup
(a KEK must never leave the server).
"""
from __future__ import annotations

import base64
import json
import threading
import time
from urllib.parse import urlsplit

from ...errors import (BlockcryptError, KeyAccessDenied, KeyDeleted, KeyDisabled, KeyError_, KeyIntegrityError,
                       KeyPurged, KeyUnavailable, NotFound, Refused, UsageError)
from ..base import KekProvider, KeyStatus, WrappedKey
from .akv import secret_path

SCHEMES = ("transit+https", "transit+http")
WRAP_ALG = "TRANSIT-DERIVED"
DEK_BYTES = 64
TIMEOUT_S = 5.0
BATCH_MAX = 256         # DEKs in one batch_input request
KEY_TYPES = ("aes256-gcm96", "chacha20-poly1305", "xchacha20-poly1305")


def parse_key_url(url: str) -> tuple[str, str, str, int | None]:
    """transit+http(s)://HOST:PORT/MOUNT/keys/NAME[/VERSION] -> (server URL, mount, name, version or None)."""
    parts = urlsplit(url or "")
    segs = [s for s in parts.path.split("/") if s]
    version = None
    if len(segs) >= 4 and segs[-3] == "keys" and segs[-1].isdigit():
        version = int(segs[-1])
        segs = segs[:-1]
    if parts.scheme not in SCHEMES or not parts.netloc or len(segs) < 3 or segs[-2] != "keys":
        raise UsageError(f"invalid transit key URL {url!r}: expected "
                         "transit+https://HOST:PORT/MOUNT/keys/NAME[/VERSION]")
    server = f"{parts.scheme.partition('+')[2]}://{parts.netloc}"
    return server, "/".join(segs[:-2]), segs[-1], version


def key_url(server: str, mount: str, name: str, version: int | None = None) -> str:
    scheme, _, rest = server.partition("://")
    return f"transit+{scheme}://{rest}/{mount}/keys/{name}" + (f"/{version}" if version else "")


def _version_of(ciphertext: str) -> int:
    pre, _, rest = ciphertext.partition(":")
    ver, _, _ = rest.partition(":")
    if pre != "vault" or not ver.startswith("v") or not ver[1:].isdigit():
        raise ValueError("not a transit ciphertext")
    return int(ver[1:])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class _Session:
    """One AppRole login against one server: the token, renewed at half its TTL."""

    def __init__(self, server: str, role_id: str, secret_id: str, ca_file: str | None):
        import hvac
        self._hvac = hvac
        self.server = server
        self.role_id, self._secret_id = role_id, secret_id
        self.client = hvac.Client(url=server, timeout=TIMEOUT_S, verify=ca_file or True)
        self.lock = threading.Lock()
        self.renew_at = 0.0     # monotonic time after which the token is renewed
        self.expires_at = 0.0

    def _login(self) -> None:
        auth = self.client.auth.approle.login(self.role_id, self._secret_id, use_token=True)["auth"]
        self._set_ttl(auth)

    def _set_ttl(self, auth: dict) -> None:
        ttl = float(auth.get("lease_duration") or 0)
        now = time.monotonic()
        self.expires_at = now + ttl if ttl else float("inf")
        self.renew_at = now + ttl / 2 if ttl and auth.get("renewable") else self.expires_at - min(ttl / 10, 5)

    def ensure(self, force_login: bool = False) -> None:
        with self.lock:
            now = time.monotonic()
            if force_login or not self.client.token or now >= self.expires_at:
                self._login()
            elif now >= self.renew_at:
                try:
                    self._set_ttl(self.client.auth.token.renew_self()["auth"])
                except self._hvac.exceptions.VaultError:
                    self._login()   # past its max TTL, or not renewable: a fresh login


class TransitKeyProvider(KekProvider):
    """DEKs wrapped by a derived key in an OpenBao/Vault transit engine, through an AppRole."""

    NAME = "transit"

    def __init__(self, state):
        self.state = state
        self._sessions: dict[str, _Session] = {}
        self._probing: dict[tuple, object] = {}   # (server, mount, name) -> a DES not in the catalog yet
        self._lock = threading.Lock()

    # -- the DES that owns a key, and its session ------------------------------------------------
    def des_for(self, kek_ref: str):
        server, mount, name, _ = parse_key_url(kek_ref)
        probing = self._probing.get((server, mount, name))
        if probing is not None:
            return probing
        for d in self.state.catalog.list_des():
            if d.key_url.startswith(SCHEMES) and parse_key_url(d.key_url)[:3] == (server, mount, name):
                return d
        raise NotFound(kind="disk encryption set for key", name=key_url(server, mount, name))

    def session_for(self, des) -> _Session:
        with self._lock:
            s = self._sessions.get(des.des_id)
            if s is None:
                secret = json.loads(secret_path(self.state, des.des_id).read_text())["secret_id"]
                server = parse_key_url(des.key_url)[0]
                s = self._sessions[des.des_id] = _Session(server, des.identity["role_id"], secret, des.ca_file)
            return s

    @staticmethod
    def is_versioned(url: str) -> bool:
        """Whether a key URL names one version (a DES on it cannot follow the newest)."""
        return parse_key_url(url)[3] is not None

    def forget(self, des_id: str) -> None:
        with self._lock:
            self._sessions.pop(des_id, None)

    def _call(self, session: _Session, kek_id: str, fn):
        """fn(client) with typed errors; one fresh login when the token was refused."""
        hvac = session._hvac
        import requests
        for attempt in (0, 1):
            try:
                session.ensure(force_login=attempt == 1)
                return fn(session.client)
            except hvac.exceptions.Forbidden as e:
                if attempt == 0:
                    continue   # an expired or revoked token: log in again, then judge
                raise KeyAccessDenied(key_id=kek_id, msg=_first_error(e)) from None
            except (hvac.exceptions.InternalServerError, hvac.exceptions.VaultDown,
                    hvac.exceptions.BadGateway, hvac.exceptions.RateLimitExceeded) as e:
                raise KeyUnavailable(key_id=kek_id, msg=_first_error(e)) from None
            except requests.RequestException as e:
                raise KeyUnavailable(key_id=kek_id, msg=e.__class__.__name__) from None
            except hvac.exceptions.InvalidRequest as e:
                raise _request_error(kek_id, e, login="approle/login" in str(e)) from None
            except hvac.exceptions.InvalidPath as e:
                raise KeyPurged(key_id=kek_id) from None
            except hvac.exceptions.VaultError as e:
                raise KeyUnavailable(key_id=kek_id, msg=_first_error(e)) from None

    # -- the provider interface ------------------------------------------------------------------
    def default_ref(self) -> str:
        raise UsageError("a customer-managed key needs a disk encryption set (--des)")

    def read_key(self, des, kek_ref: str | None = None) -> dict:
        ref = kek_ref or des.key_url
        server, mount, name, _ = parse_key_url(ref)
        return self._call(self.session_for(des), key_url(server, mount, name),
                          lambda c: c.secrets.transit.read_key(name, mount_point=mount))["data"]

    def latest_version(self, des) -> str:
        server, mount, name, _ = parse_key_url(des.key_url)
        return key_url(server, mount, name, int(self.read_key(des)["latest_version"]))

    def status(self, kek_ref: str, disk_id: str | None = None) -> KeyStatus:
        server, mount, name, version = parse_key_url(kek_ref)
        try:
            doc = self.read_key(self.des_for(kek_ref), kek_ref)
        except KeyError_ as e:
            return KeyStatus(kek_ref, False, e.reason, str(e))
        kid = key_url(server, mount, name, version or int(doc["latest_version"]))
        if doc.get("soft_deleted"):
            err = KeyDeleted(key_id=kid, recoverable_until="the admin restores it")
        elif version is not None and version < int(doc.get("min_decryption_version") or 1):
            err = KeyDisabled(key_id=kid)
        elif version is not None and str(version) not in doc.get("keys", {}):
            err = KeyPurged(key_id=kid)
        else:
            return KeyStatus(kid, True)
        return KeyStatus(kid, False, err.reason, str(err))

    def wrap(self, kek_ref: str, dek: bytes, context: bytes, disk_id: str | None = None) -> WrappedKey:
        if len(dek) != DEK_BYTES:
            raise ValueError("DEK must be 64 bytes")
        server, mount, name, version = parse_key_url(kek_ref)
        kid = key_url(server, mount, name, version)
        kw = {"key_version": version} if version else {}
        doc = self._call(self.session_for(self.des_for(kek_ref)), kid, lambda c: c.secrets.transit.encrypt_data(
            name, _b64(bytes(dek)), context=_b64(context), mount_point=mount, **kw))["data"]
        ct = doc["ciphertext"]
        return WrappedKey(self.NAME, key_url(server, mount, name, _version_of(ct)), WRAP_ALG, ct.encode())

    def _checked(self, wrapped: WrappedKey) -> tuple[str, str, str, str]:
        server, mount, name, version = parse_key_url(wrapped.kek_id)
        try:
            ct = wrapped.blob.decode("ascii")
            ok = wrapped.algorithm == WRAP_ALG and version is not None and _version_of(ct) == version
        except (UnicodeDecodeError, ValueError):
            ok = False
        if not ok:
            raise KeyIntegrityError(key_id=wrapped.kek_id, msg="not a transit ciphertext of this key version")
        return server, mount, name, ct

    def unwrap(self, wrapped: WrappedKey, context: bytes, disk_id: str | None = None) -> bytes:
        server, mount, name, ct = self._checked(wrapped)
        doc = self._call(self.session_for(self.des_for(wrapped.kek_id)), wrapped.kek_id,
                         lambda c: c.secrets.transit.decrypt_data(name, ct, context=_b64(context),
                                                                  mount_point=mount))["data"]
        dek = base64.b64decode(doc["plaintext"])
        if len(dek) != DEK_BYTES:
            raise KeyIntegrityError(key_id=wrapped.kek_id, msg="the unwrapped key has the wrong length")
        return dek

    def rewrap(self, wrapped: WrappedKey, context: bytes, to_ref: str, disk_id: str | None = None) -> WrappedKey:
        server, mount, name, ct = self._checked(wrapped)
        to = parse_key_url(to_ref)
        if to[:3] != (server, mount, name):
            return super().rewrap(wrapped, context, to_ref, disk_id=disk_id)   # another key: unwrap + wrap
        kw = {"key_version": to[3]} if to[3] else {}
        doc = self._call(self.session_for(self.des_for(wrapped.kek_id)), wrapped.kek_id,
                         lambda c: c.secrets.transit.rewrap_data(name, ct, context=_b64(context),
                                                                 mount_point=mount, **kw))["data"]
        new = doc["ciphertext"]
        return WrappedKey(self.NAME, key_url(server, mount, name, _version_of(new)), WRAP_ALG, new.encode())

    def rewrap_many(self, items, pool=None) -> list:
        """Re-wrap ``[(wrapped, context, to_ref, disk_id)]`` with one transit ``rewrap`` request per
        key, target version and BATCH_MAX items (``batch_input``); one result per item, in order
        (a WrappedKey, or its typed error). A refused request (any item failed: the server then
        answers 400 for the lot) falls back to one request per item, so each gets its own error;
        an unreachable server fails every item of the request with KeyUnavailable."""
        out: list = [None] * len(items)
        groups: dict[tuple, list] = {}
        for i, (wrapped, context, to_ref, disk_id) in enumerate(items):
            try:
                server, mount, name, ct = self._checked(wrapped)
                to = parse_key_url(to_ref)
            except BlockcryptError as e:
                out[i] = e
                continue
            if to[:3] != (server, mount, name):   # another key: the single path (unwrap + wrap)
                out[i] = super().rewrap_many([items[i]])[0]
                continue
            groups.setdefault((server, mount, name, to[3]), []).append((i, ct))
        for (server, mount, name, version), members in groups.items():
            for k in range(0, len(members), BATCH_MAX):
                chunk = members[k:k + BATCH_MAX]
                self._rewrap_chunk(items, out, chunk, server, mount, name, version)
        return out

    def _rewrap_chunk(self, items, out, chunk, server, mount, name, version) -> None:
        kid = items[chunk[0][0]][0].kek_id
        body = {"batch_input": [{"ciphertext": ct, "context": _b64(items[i][1])} for i, ct in chunk]}
        if version:
            body["key_version"] = version
        try:
            doc = self._call(self.session_for(self.des_for(kid)), kid,
                             lambda c: c.adapter.post(f"/v1/{mount}/rewrap/{name}", json=body))
            results = doc["data"]["batch_results"]
            if len(results) != len(chunk):
                raise KeyIntegrityError(key_id=kid, msg="the batch answer has the wrong length")
        except KeyUnavailable as e:
            for i, _ in chunk:
                out[i] = e
            return
        except (BlockcryptError, KeyError, TypeError):   # refused, or an answer of another shape
            results = [{"error": "refused"}] * len(chunk)
        for (i, _), r in zip(chunk, results):
            ct = r.get("ciphertext") if isinstance(r, dict) and not r.get("error") else None
            try:
                if ct is None:   # this item failed: alone, it gets its typed error
                    out[i] = self.rewrap(*items[i][:3], disk_id=items[i][3])
                else:
                    out[i] = WrappedKey(self.NAME, key_url(server, mount, name, _version_of(ct)), WRAP_ALG,
                                        ct.encode())
            except (BlockcryptError, ValueError) as e:
                out[i] = e if isinstance(e, BlockcryptError) else KeyIntegrityError(
                    key_id=kid, msg="the server answered something that is not a transit ciphertext")

    # -- disk encryption sets ----------------------------------------------------------------------
    def identity_from(self, doc: dict | None) -> tuple[dict, dict]:
        """(public identity, secret document) from an identity file's content."""
        if doc is None:
            raise UsageError("a transit key needs --identity-file: {\"role_id\": ..., \"secret_id\": ...} "
                             "of the AppRole its admin created")
        try:
            return {"name": doc.get("name", ""), "role_id": doc["role_id"]}, {"secret_id": doc["secret_id"]}
        except KeyError as e:
            raise UsageError(f"a transit identity file needs role_id and secret_id (missing {e})") from None

    def probe(self, des) -> str:
        """Check the key can back a DES and the role can use it; returns the versioned key id."""
        doc = self.read_key(des)
        url = des.key_url
        if doc.get("type") not in KEY_TYPES or not doc.get("derived"):
            raise Refused(f"transit key {url} is {doc.get('type')}{' (derived)' if doc.get('derived') else ''}: "
                          "a disk encryption set needs a derived AES-256-GCM or ChaCha20 key "
                          "(`bao write -f MOUNT/keys/NAME derived=true`)")
        if doc.get("exportable") or doc.get("allow_plaintext_backup"):
            raise Refused(f"transit key {url} is exportable or allows plaintext backup: "
                          "a key-encryption key must never leave the server")
        kid = self.latest_version(des) if parse_key_url(url)[3] is None else url
        sample = bytes(DEK_BYTES)
        ctx = b"blockcrypt/v1/des-probe"
        self._probing[parse_key_url(url)[:3]] = des
        try:
            if self.unwrap(self.wrap(kid, sample, ctx), ctx) != sample:
                raise Refused(f"transit key {url}: the encrypt/decrypt round trip failed")
        finally:
            self._probing.pop(parse_key_url(url)[:3], None)
        return kid


def _first_error(e) -> str:
    errs = getattr(e, "errors", None) or []
    text = (errs[0] if errs else str(e).split(", on ")[0]) or e.__class__.__name__
    return " ".join(str(text).split())


def _request_error(kek_id: str, e, login: bool) -> KeyError_:
    text = _first_error(e)
    if login or "invalid role or secret" in text:
        return KeyAccessDenied(key_id=kek_id, msg=f"AppRole login refused: {text}")
    if "soft-deleted" in text:
        return KeyDeleted(key_id=kek_id, recoverable_until="the admin restores it")
    if "disallowed by policy" in text or "too old" in text:
        return KeyDisabled(key_id=kek_id)
    if "key not found" in text:
        return KeyPurged(key_id=kek_id)
    if "authentication failed" in text or "invalid ciphertext" in text or "decode" in text:
        return KeyIntegrityError(key_id=kek_id, msg="the wrapped key belongs to another disk or layer, "
                                                      "or is damaged")
    return KeyIntegrityError(key_id=kek_id, msg=text)
