"""Vault identities (the stand-in for Azure AD service principals / managed
identities) and the bearer tokens they obtain.

An identity is a client id (UUID) and a secret shown once at creation; the
store keeps only a salted scrypt hash of the secret. The token endpoint
(OAuth2 client credentials) exchanges id + secret for a short-lived bearer
token::

    bcv1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(token key, "bcv1." + claims part))>

with claims ``sub`` (client id), ``tid`` (tenant), ``aud`` (the vault's
resource URL), ``iat``, ``exp`` (Unix seconds) and ``jti``. The token key is
derived from the vault's master key, so tokens survive a restart and die with
the vault.

Caveats: tokens cannot be revoked one by one; deleting the identity (or
waiting for ``exp``) ends them. Secret checks cost one scrypt (~50 ms) on
purpose, which also bounds how fast the token endpoint can be brute-forced.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import uuid

from ...errors import AlreadyExists, NotFound, UsageError
from ..._util.b64 import b64u_decode, b64u_encode
from ..._util.clock import now_s
from ...errors import TokenInvalid
from .store import Store

TOKEN_PREFIX = "bcv1"
DEFAULT_TOKEN_TTL_SECONDS = 600
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # fullmatch: no trailing newline
_SCRYPT = dict(n=2 ** 14, r=8, p=1, dklen=32)


def _hash_secret(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def create_identity(store: Store, name: str, *, is_admin: bool = False) -> dict:
    """Create an identity; returns {name, client_id, client_secret} (the secret only here)."""
    if not _NAME_RE.fullmatch(name or ""):
        raise UsageError(f"invalid identity name {name!r} (letters, digits, '.', '_', '-'; at most 63)")
    client_id = str(uuid.uuid4())
    secret = secrets.token_urlsafe(30)
    salt = os.urandom(16)
    digest = _hash_secret(secret, salt)
    with store.tx() as c:
        if c.execute("SELECT 1 FROM identities WHERE name = ?", (name,)).fetchone():
            raise AlreadyExists(kind="identity", name=name)
        c.execute("INSERT INTO identities (client_id, name, secret_salt, secret_hash, is_admin, created) "
                  "VALUES (?, ?, ?, ?, ?, ?)", (client_id, name, salt, digest, int(is_admin), now_s()))
    return {"name": name, "client_id": client_id, "client_secret": secret}


def list_identities(store: Store) -> list[dict]:
    with store.read() as c:
        rows = c.execute("SELECT i.client_id, i.name, i.is_admin, i.created, p.permissions FROM identities i "
                         "LEFT JOIN policies p ON p.client_id = i.client_id ORDER BY i.created, i.name").fetchall()
    return [{"name": r["name"], "client_id": r["client_id"], "admin": bool(r["is_admin"]),
             "created": r["created"], "permissions": json.loads(r["permissions"]) if r["permissions"] else []}
            for r in rows]


def delete_identity(store: Store, name_or_id: str) -> dict:
    ident = find_identity(store, name_or_id)
    if ident["admin"]:
        raise UsageError("the admin identity cannot be deleted")
    with store.tx() as c:
        c.execute("DELETE FROM policies WHERE client_id = ?", (ident["client_id"],))
        c.execute("DELETE FROM identities WHERE client_id = ?", (ident["client_id"],))
    return ident


def find_identity(store: Store, name_or_id: str) -> dict:
    with store.read() as c:
        r = c.execute("SELECT client_id, name, is_admin FROM identities WHERE name = ? OR client_id = ?",
                      (name_or_id, name_or_id)).fetchone()
    if r is None:
        raise NotFound(kind="identity", name=name_or_id)
    return {"client_id": r["client_id"], "name": r["name"], "admin": bool(r["is_admin"])}


def lookup_client(store: Store, client_id: str) -> dict | None:
    with store.read() as c:
        r = c.execute("SELECT client_id, name, is_admin FROM identities WHERE client_id = ?",
                      (client_id,)).fetchone()
    if r is None:
        return None
    return {"client_id": r["client_id"], "name": r["name"], "admin": bool(r["is_admin"])}


def check_secret(store: Store, client_id: str, secret: str) -> dict | None:
    """The identity if ``secret`` is right for ``client_id``, else None (constant work either way)."""
    with store.read() as c:
        r = c.execute("SELECT client_id, name, is_admin, secret_salt, secret_hash FROM identities "
                      "WHERE client_id = ?", (client_id,)).fetchone()
    salt = r["secret_salt"] if r else b"\0" * 16
    digest = _hash_secret(secret, salt)
    if r is None or not hmac.compare_digest(digest, r["secret_hash"]):
        return None
    return {"client_id": r["client_id"], "name": r["name"], "admin": bool(r["is_admin"])}


# -- tokens -------------------------------------------------------------------------

def issue_token(token_key: bytes, *, client_id: str, tenant_id: str, audience: str,
                ttl_seconds: int = DEFAULT_TOKEN_TTL_SECONDS, now: int | None = None) -> tuple[str, int]:
    """Return (token, expires_on) for the identity."""
    iat = now_s() if now is None else now
    claims = {"sub": client_id, "tid": tenant_id, "aud": audience, "iat": iat, "exp": iat + int(ttl_seconds),
              "jti": secrets.token_hex(8)}
    body = TOKEN_PREFIX + "." + b64u_encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    sig = hmac.new(token_key, body.encode(), hashlib.sha256).digest()
    return body + "." + b64u_encode(sig), claims["exp"]


def verify_token(token_key: bytes, token: str, *, tenant_id: str, audience: str, now: int | None = None) -> dict:
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenInvalid("the bearer token is malformed")
    body = parts[0] + "." + parts[1]
    want = hmac.new(token_key, body.encode(), hashlib.sha256).digest()
    try:
        got = b64u_decode(parts[2])
    except (ValueError, TypeError):
        raise TokenInvalid("the bearer token is malformed") from None
    if not hmac.compare_digest(want, got):
        raise TokenInvalid("the bearer token signature is invalid")
    try:
        claims = json.loads(b64u_decode(parts[1]))
        exp = int(claims["exp"])
        sub = str(claims["sub"])
    except (ValueError, TypeError, KeyError):
        raise TokenInvalid("the bearer token is malformed") from None
    t = now_s() if now is None else now
    if exp <= t:
        raise TokenInvalid("the bearer token is expired")
    if claims.get("tid") != tenant_id:
        raise TokenInvalid("the bearer token was issued for another tenant")
    if claims.get("aud") != audience:
        raise TokenInvalid("the bearer token was issued for another audience")
    claims["sub"] = sub
    return claims
