"""A small REST client for the vault (and for any Azure Key Vault that accepts
the same bearer tokens): client-credentials token fetch and caching, get key,
wrap/unwrap, and the admin operations the ``vault key`` CLI needs.

Data-plane calls (:meth:`VaultClient.get_key`, :meth:`wrap`, :meth:`unwrap`)
raise the shared key errors of :mod:`blockcrypt.errors` so that a KEK
provider can act on them directly:

==========================================  ===========================
vault answer                                raised
==========================================  ===========================
no connection, timeout, 5xx, garbage        KeyUnavailable (transient)
401 after a fresh token, 403 AccessDenied   KeyAccessDenied
403 KeyDisabled                             KeyDisabled
403 KeyExpired / KeyNotYetValid             KeyExpired
404 and the key is in deletedkeys           KeyDeleted (recoverable_until)
404 otherwise                               KeyPurged (or never existed: a caller
                                            that never used the key, as a DES
                                            probe, says KeyNotFound instead)
400 on unwrap                               KeyIntegrityError
token refused for its scope (audience)      VaultAudienceMismatch
==========================================  ===========================

Admin calls raise :class:`VaultRequestError` (404: :class:`VaultNotFound`, 403:
:class:`VaultForbidden`) with the vault's message made one line of ours: no
Azure help link, times as ISO dates, advice where we have it.

:meth:`VaultClient.unwrap_many` unwraps many values in one request through this
vault's ``unwrapkeys`` extension (each value still checked, answered and audited on
its own); against a vault without it, it raises :class:`BatchUnsupported` and the
caller goes one value at a time.

Caveats: one kept-alive HTTPS connection per thread (a TLS handshake per thread, not
per request); tokens are cached per client object until 60 s before they expire; the
caller context header ``x-blockcrypt-disk-id`` is sent when a ``disk_id`` is given.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from .._util.b64 import b64u_decode, b64u_encode
from .._util.clock import iso_z
from ..errors import (VaultRequestError, KeyAccessDenied, KeyDeleted, KeyDisabled, KeyExpired, KeyIntegrityError,
                      KeyPurged, KeyUnavailable, StateError, VaultAudienceMismatch, VaultForbidden, VaultNotFound)

DEFAULT_API_VERSION = "7.5"
DEFAULT_TIMEOUT_SECONDS = 15.0
TOKEN_REFRESH_MARGIN_SECONDS = 60

_HELP_LINK_RE = re.compile(r"\s*For help resolving this issue, please see \S+")
_UNIX_TIME_RE = re.compile(r"\b(\d{9,11}) \(Unix time\)")
_NOT_FOUND_RE = re.compile(r"\(name/id\) (\S+) was not found|Deleted Key not found: (\S+)")
_SCOPE_RE = re.compile(r"The scope must be '([^']+?)(?:/\.default)?'")


def clean_message(msg: str) -> str:
    """The vault's (Azure's) error message as one line of ours: no help link, ISO times."""
    msg = _HELP_LINK_RE.sub("", msg or "")
    msg = _UNIX_TIME_RE.sub(lambda m: iso_z(int(m.group(1))), msg)
    return " ".join(msg.split())


#: values per unwrapkeys request (the server takes up to keyops.MAX_BATCH_ITEMS)
MAX_BATCH_ITEMS = 100
#: the operation of the vault's batch unwrap (POST /keys/NAME/VERSION/unwrapkeys)
UNWRAP_MANY_OP = "unwrapkeys"


class BatchUnsupported(Exception):
    """The vault has no ``unwrapkeys`` (an Azure Key Vault, an older blockcrypt vault): unwrap
    one value per request instead. Internal: never reaches a user."""


class VaultClient:
    def __init__(self, url: str, *, tenant_id: str, client_id: str, client_secret: str,
                 ca_file: str | None = None, api_version: str = DEFAULT_API_VERSION,
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, authority: str | None = None):
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"vault URL must be https://HOST[:PORT], not {url!r}")
        self.url = f"https://{parts.netloc}"
        self.tenant_id = tenant_id
        self.client_id = client_id
        self._secret = client_secret
        self.api_version = api_version
        self.timeout_seconds = timeout_seconds
        self.authority = (authority or self.url).rstrip("/")
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._token: str | None = None
        self._token_exp = 0.0
        self._lock = threading.Lock()
        self._local = threading.local()   # per-thread kept-alive connections (see _raw)

    @classmethod
    def for_admin(cls, vault_dir: str | os.PathLike, url: str | None = None, **kw) -> "VaultClient":
        """The admin identity of a local vault directory (admin.json, serve.json, ca.pem)."""
        d = Path(vault_dir)
        try:
            creds = json.loads((d / "admin.json").read_text())
        except (OSError, ValueError) as e:
            raise StateError(path=str(d), why=f"cannot read admin.json ({e.__class__.__name__}); is it a vault?")
        if url is None:
            try:
                url = json.loads((d / "serve.json").read_text())["url"]
            except (OSError, ValueError, KeyError):
                raise StateError(path=str(d), why="the vault is not serving (no serve.json); start `vault serve` "
                                                  "or pass --url") from None
        return cls(url, tenant_id=creds["tenant_id"], client_id=creds["client_id"],
                   client_secret=creds["client_secret"], ca_file=str(d / "ca.pem"), **kw)

    # -- transport ------------------------------------------------------------------------
    def _conn(self, host: str, port: int) -> tuple[http.client.HTTPSConnection, bool]:
        """This thread's kept-alive connection to host:port, and whether it was used before."""
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get((host, port))
        if conn is not None:
            return conn, True
        conn = conns[(host, port)] = http.client.HTTPSConnection(host, port, context=self._ssl,
                                                                 timeout=self.timeout_seconds)
        return conn, False

    def _drop(self, host: str, port: int) -> None:
        conn = self._local.__dict__.get("conns", {}).pop((host, port), None)
        if conn is not None:
            conn.close()

    def _raw(self, method: str, url: str, body: bytes | None, headers: dict) -> tuple[int, dict, bytes]:
        """One request on this thread's kept-alive connection (HTTP/1.1): a TLS handshake per
        connection, not per request. A connection the server closed while idle is replaced once."""
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 443
        path = parts.path + ("?" + parts.query if parts.query else "")
        while True:
            conn, reused = self._conn(host, port)
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self._drop(host, port)
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except TimeoutError as e:
                self._drop(host, port)
                raise KeyUnavailable(key_id=self.url, msg=f"{type(e).__name__}: {e}") from None
            except (OSError, http.client.HTTPException) as e:
                self._drop(host, port)
                if reused:
                    continue   # closed by the server while idle (or it restarted): once more, afresh
                raise KeyUnavailable(key_id=self.url, msg=f"{type(e).__name__}: {e}") from None

    def token(self, *, force: bool = False) -> str:
        with self._lock:
            if not force and self._token and time.time() < self._token_exp - TOKEN_REFRESH_MARGIN_SECONDS:
                return self._token
            form = urlencode({"grant_type": "client_credentials", "client_id": self.client_id,
                              "client_secret": self._secret, "scope": f"{self.url}/.default"}).encode()
            status, _, data = self._raw("POST", f"{self.authority}/{self.tenant_id}/oauth2/v2.0/token", form,
                                        {"Content-Type": "application/x-www-form-urlencoded"})
            try:
                doc = json.loads(data)
            except ValueError:
                raise KeyUnavailable(key_id=self.url, msg=f"token endpoint answered {status} without JSON") from None
            if status != 200:
                desc = doc.get("error_description") or doc.get("error") or f"HTTP {status}"
                if status >= 500:
                    raise KeyUnavailable(key_id=self.url, msg=f"token endpoint: {desc}")
                m = _SCOPE_RE.search(str(desc))
                if doc.get("error") == "invalid_scope" and m:
                    raise VaultAudienceMismatch(key_id=self.url, url=self.url, audience=m.group(1))
                raise KeyAccessDenied(key_id=self.url, msg=f"token request refused: {desc}")
            self._token = doc["access_token"]
            self._token_exp = time.time() + int(doc.get("expires_in", 300))
            return self._token

    def request(self, method: str, path: str, body: dict | None = None, *, disk_id: str | None = None) -> tuple[int, dict]:
        """Send one API request with a bearer token (refreshed once on 401). Returns (status, JSON)."""
        sep = "&" if "?" in path else "?"
        url = f"{self.url}{path}{sep}api-version={self.api_version}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            headers = {"Authorization": f"Bearer {self.token(force=attempt == 1)}",
                       "Accept": "application/json", "x-ms-client-request-id": str(uuid.uuid4())}
            if data is not None:
                headers["Content-Type"] = "application/json"
            if disk_id:
                headers["x-blockcrypt-disk-id"] = disk_id
            status, _, raw = self._raw(method, url, data, headers)
            if status != 401:
                break
        if status == 204 or (not raw and status < 300):
            return status, {}
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError
        except ValueError:
            raise KeyUnavailable(key_id=self.url, msg=f"{method} {path}: HTTP {status} with a non-JSON body") from None
        return status, doc

    def call(self, method: str, path: str, body: dict | None = None, **kw) -> dict:
        status, doc = self.request(method, path, body, **kw)
        if status >= 500:
            raise KeyUnavailable(key_id=self.url, msg=f"{method} {path}: HTTP {status}")
        if status >= 300:
            err = doc.get("error") if isinstance(doc.get("error"), dict) else {}
            inner = (err.get("innererror") or {}).get("code") if isinstance(err.get("innererror"), dict) else None
            code = str(err.get("code", ""))
            msg = clean_message(err.get("message") or f"HTTP {status}")
            cls = VaultNotFound if status == 404 else VaultForbidden if status == 403 else VaultRequestError
            m = _NOT_FOUND_RE.search(msg) if code == "KeyNotFound" else None
            if m and m.group(1):
                msg = (f"key {m.group(1)} not found in the vault {self.url}: check the name (`blockcrypt vault "
                       "key list`); a soft-deleted key is listed by `vault key list --deleted` and comes back "
                       "with `vault key recover`")
            elif m:
                msg = (f"key {m.group(2)} is not soft-deleted in the vault {self.url}: only a deleted key can be "
                       "recovered or purged (`blockcrypt vault key list --deleted`)")
            elif inner == "PurgeProtectionEnabled":
                msg += " Recover it with `blockcrypt vault key recover`, or wait for that date."
            else:
                msg = f"the vault {self.url} refused {method} {path.split('?')[0]}: {msg}"
            raise cls(f"{msg} ({code or status}" + (f"/{inner}" if inner else "") + ")",
                      status=status, code=code, inner=inner)
        return doc

    # -- data plane (KEK provider) ----------------------------------------------------------
    def _key_error(self, e: VaultRequestError, name: str, version: str | None):
        key_id = f"{self.url}/keys/{name}" + (f"/{version}" if version else "")
        if e.status == 401 or e.inner == "AccessDenied":
            return KeyAccessDenied(key_id=key_id, msg=str(e))
        if e.inner == "KeyDisabled":
            return KeyDisabled(key_id=key_id)
        if e.inner in ("KeyExpired", "KeyNotYetValid"):
            return KeyExpired(key_id=key_id)
        if e.status == 404:
            try:
                d = self.call("GET", f"/deletedkeys/{name}")
                until = iso_z(d.get("scheduledPurgeDate", 0))
                return KeyDeleted(key_id=key_id, recoverable_until=until)
            except VaultRequestError as e2:
                if e2.status == 403:
                    return KeyAccessDenied(key_id=key_id, msg="key not found, and deleted keys are not visible")
                return KeyPurged(key_id=key_id)
        if e.status == 403:
            return KeyAccessDenied(key_id=key_id, msg=str(e))
        return None

    def get_key(self, name: str, version: str | None = None, *, disk_id: str | None = None) -> dict:
        try:
            return self.call("GET", f"/keys/{name}/{version or ''}", disk_id=disk_id)
        except VaultRequestError as e:
            raise (self._key_error(e, name, version) or e) from None

    def status(self, name: str, version: str | None = None, *, now: float | None = None) -> dict:
        """The key's usability: {kid, kty, state, recovery_level, purge_protected} where state is
        ``enabled``, ``disabled``, ``expired`` or ``not-yet-valid``; missing keys raise
        KeyDeleted/KeyPurged, unreachable vaults KeyUnavailable, as :meth:`get_key` does."""
        b = self.get_key(name, version)
        a = b.get("attributes", {})
        t = time.time() if now is None else now
        state = "enabled"
        if not a.get("enabled", False):
            state = "disabled"
        elif a.get("nbf") is not None and t < a["nbf"]:
            state = "not-yet-valid"
        elif a.get("exp") is not None and t >= a["exp"]:
            state = "expired"
        level = a.get("recoveryLevel", "")
        return {"kid": b["key"]["kid"], "kty": b["key"].get("kty"), "state": state, "recovery_level": level,
                "purge_protected": bool(level) and "Purgeable" not in level}

    def wrap(self, name: str, version: str | None, plaintext: bytes, *, alg: str = "RSA-OAEP-256",
             disk_id: str | None = None) -> tuple[str, bytes]:
        """Returns (kid with version, wrapped bytes)."""
        try:
            doc = self.call("POST", f"/keys/{name}/{version or ''}/wrapkey", {"alg": alg, "value": b64u_encode(plaintext)},
                            disk_id=disk_id)
        except VaultRequestError as e:
            raise (self._key_error(e, name, version) or e) from None
        return doc["kid"], b64u_decode(doc["value"])

    def unwrap(self, name: str, version: str | None, wrapped: bytes, *, alg: str = "RSA-OAEP-256",
               disk_id: str | None = None) -> bytes:
        try:
            doc = self.call("POST", f"/keys/{name}/{version or ''}/unwrapkey", {"alg": alg, "value": b64u_encode(wrapped)},
                            disk_id=disk_id)
        except VaultRequestError as e:
            err = self._key_error(e, name, version)
            if err is None and e.status == 400:
                err = KeyIntegrityError(key_id=f"{self.url}/keys/{name}/{version or ''}", msg=str(e))
            raise (err or e) from None
        return b64u_decode(doc["value"])

    def unwrap_many(self, name: str, version: str | None, items, *, alg: str = "RSA-OAEP-256") -> list:
        """unwrapKey of many values under one key version in one request (``unwrapkeys``, this
        vault's extension: each unwrap is still checked, answered and audited on its own, with
        its disk id). ``items``: ``[(wrapped, disk_id or None)]``, at most MAX_BATCH_ITEMS.
        Returns one result per item, in order: the plaintext, or the KeyIntegrityError
        :meth:`unwrap` would raise for it. A refusal of the key itself raises what
        :meth:`unwrap` raises (KeyDisabled, KeyDeleted, ...); a vault without the extension
        (an Azure Key Vault, an older blockcrypt) raises BatchUnsupported."""
        body = {"alg": alg, "items": [{"value": b64u_encode(w), **({"diskId": d} if d else {})} for w, d in items]}
        key_id = f"{self.url}/keys/{name}/{version or ''}"
        try:
            doc = self.call("POST", f"/keys/{name}/{version or ''}/{UNWRAP_MANY_OP}", body)
        except VaultRequestError as e:
            if e.status in (400, 405, 501) or (e.status == 404 and e.code != "KeyNotFound"):
                raise BatchUnsupported(str(e)) from None   # no such operation (or not for this key)
            raise (self._key_error(e, name, version) or e) from None
        answers = doc.get("items")
        if not isinstance(answers, list) or len(answers) != len(items):
            raise BatchUnsupported("the unwrapkeys answer does not have one item per value")
        out = []
        for a in answers:
            if isinstance(a, dict) and isinstance(a.get("value"), str):
                out.append(b64u_decode(a["value"]))
            else:
                err = a.get("error") if isinstance(a, dict) and isinstance(a.get("error"), dict) else {}
                out.append(KeyIntegrityError(key_id=key_id, msg=clean_message(str(err.get("message") or
                                                                                "the vault refused this value"))))
        return out

    # -- admin -------------------------------------------------------------------------------
    def create_key(self, name: str, *, kty: str = "RSA", key_size: int = 2048, key_ops=None, tags=None,
                   enabled: bool = True, nbf: int | None = None, exp: int | None = None) -> dict:
        body = {"kty": kty, "key_size": key_size, "attributes": {"enabled": enabled}}
        if key_ops:
            body["key_ops"] = list(key_ops)
        if tags:
            body["tags"] = dict(tags)
        if nbf is not None:
            body["attributes"]["nbf"] = nbf
        if exp is not None:
            body["attributes"]["exp"] = exp
        return self.call("POST", f"/keys/{name}/create", body)

    def list_keys(self) -> list[dict]:
        return self.call("GET", "/keys")["value"]

    def list_versions(self, name: str) -> list[dict]:
        return self.call("GET", f"/keys/{name}/versions")["value"]

    def update_key(self, name: str, version: str | None = None, **attrs) -> dict:
        body: dict = {}
        for k in ("enabled", "nbf", "exp"):
            if k in attrs:
                body.setdefault("attributes", {})[k] = attrs[k]
        if "tags" in attrs:
            body["tags"] = attrs["tags"]
        return self.call("PATCH", f"/keys/{name}/{version or ''}", body)

    def rotate_key(self, name: str) -> dict:
        return self.call("POST", f"/keys/{name}/rotate")

    def delete_key(self, name: str) -> dict:
        return self.call("DELETE", f"/keys/{name}")

    def get_deleted(self, name: str) -> dict:
        return self.call("GET", f"/deletedkeys/{name}")

    def list_deleted(self) -> list[dict]:
        return self.call("GET", "/deletedkeys")["value"]

    def recover_key(self, name: str) -> dict:
        return self.call("POST", f"/deletedkeys/{name}/recover")

    def purge_key(self, name: str) -> None:
        self.call("DELETE", f"/deletedkeys/{name}")
