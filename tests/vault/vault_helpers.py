"""Helpers shared by the vault tests: a TokenCredential that takes tokens from
the vault's own token endpoint, SDK client factories, and a raw HTTPS request
function for the bad-input tests."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import time

import requests
from azure.core.credentials import AccessToken

from support.vaultproc import REPO, PY, VaultProcess, make_vault, vault_cli  # noqa: F401


class VaultTokenCredential:
    """azure.core TokenCredential: client credentials against the vault's token endpoint."""

    def __init__(self, authority: str, client_id: str, client_secret: str, ca_file: str):
        self.authority, self.client_id, self.client_secret, self.ca_file = authority, client_id, client_secret, ca_file
        self.calls = 0

    def get_token(self, *scopes, claims=None, tenant_id=None, enable_cae=False, **kwargs):
        self.calls += 1
        r = requests.post(f"{self.authority}/{tenant_id}/oauth2/v2.0/token",
                          data={"grant_type": "client_credentials", "client_id": self.client_id,
                                "client_secret": self.client_secret, "scope": " ".join(scopes)},
                          verify=self.ca_file, timeout=10)
        r.raise_for_status()
        doc = r.json()
        return AccessToken(doc["access_token"], int(time.time()) + int(doc["expires_in"]))


def _snake(ident: dict) -> dict:
    """An identity from `vault identity create --json` (camelCase) or admin.json (snake_case)."""
    names = {"clientId": "client_id", "clientSecret": "client_secret", "tenantId": "tenant_id"}
    return {names.get(k, k): v for k, v in ident.items()}


def credential(v, ident: dict | None = None) -> VaultTokenCredential:
    ident = _snake(ident or v.admin())
    return VaultTokenCredential(v.url, ident["client_id"], ident["client_secret"], str(v.dir / "ca.pem"))


def key_client(v, ident=None):
    from azure.keyvault.keys import KeyClient
    return KeyClient(v.url, credential(v, ident), verify_challenge_resource=False,
                     connection_verify=str(v.dir / "ca.pem"))


def crypto_client(v, key, ident=None):
    from azure.keyvault.keys.crypto import CryptographyClient
    return CryptographyClient(key, credential(v, ident), verify_challenge_resource=False,
                              connection_verify=str(v.dir / "ca.pem"))


def tls_context(v) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(v.dir / "ca.pem"))


def admin_token(v) -> str:
    return identity_token(v, v.admin())


def identity_token(v, ident: dict) -> str:
    """A bearer token for identity ``ident`` (client_id, client_secret; the vault's tenant)."""
    ident = _snake(ident)
    tenant = ident.get("tenant_id") or v.admin()["tenant_id"]
    r = requests.post(f"{v.url}/{tenant}/oauth2/v2.0/token",
                      data={"grant_type": "client_credentials", "client_id": ident["client_id"],
                            "client_secret": ident["client_secret"], "scope": f"{v.url}/.default"},
                      verify=str(v.dir / "ca.pem"), timeout=10)
    r.raise_for_status()
    return r.json()["access_token"]


def raw(v, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
        token: str | None = None, conn=None):
    """One HTTPS request; returns (status, headers dict (lower-case), parsed JSON or raw bytes)."""
    own = conn is None
    if own:
        conn = http.client.HTTPSConnection("127.0.0.1", v.port, context=tls_context(v), timeout=15)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read()
    hdrs = {k.lower(): val for k, val in resp.getheaders()}
    if own:
        conn.close()
    try:
        return resp.status, hdrs, json.loads(data) if data else None
    except ValueError:
        return resp.status, hdrs, data


def plain_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def kill9_under_load(v, stop, threads, join_s: float = 30.0) -> None:
    """SIGKILL the vault server ``v`` while ``threads`` load it, then set ``stop``, join them and
    reap the server."""
    import signal
    v.proc.send_signal(signal.SIGKILL)
    v.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(join_s)
    v.stop()
