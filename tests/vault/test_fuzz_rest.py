"""Fuzzing the vault's REST surface (issue 15): random methods, paths, queries, headers and
bodies from an unauthenticated client and from an identity without permissions give
Azure-shaped errors ({"error": {"code", "message"}}; OAuth2's shape from the token
endpoint), never a 5xx, and change no state.
Bounded for `make test` (BLOCKCRYPT_FUZZ_SECONDS, default 8); `make fuzz` runs long."""
from __future__ import annotations

import http.client
import json
import os
import random
import ssl
import sqlite3
import time

from vault_helpers import identity_token, tls_context, vault_cli

SECONDS = float(os.environ.get("BLOCKCRYPT_FUZZ_SECONDS", "8"))
STATE_TABLES = ("keys", "key_versions", "identities", "policies", "deleted_keys")

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "BREW", "get"]
SEGMENTS = ["keys", "deletedkeys", "k1", "versions", "create", "import", "rotate", "wrapkey", "unwrapkey",
            "encrypt", "decrypt", "sign", "verify", "backup", "restore", "recover", "rotationpolicy",
            "oauth2", "v2.0", "token", ".well-known", "openid-configuration", "..", "%2e%2e", "%00", "a" * 300,
            "%C3%A9", "k1%2Fv", "", "?", "#"]
QUERIES = ["", "?api-version=7.4", "?api-version=9.9", "?api-version=", "?maxresults=-1&api-version=7.5",
           "?api-version=7.4&api-version=7.5", "?%zz", "?maxresults=99999999999999999999&api-version=7.4"]
BODIES = [None, b"", b"{}", b"[]", b"null", b"{\"kty\":\"RSA\",\"key_size\":2048}", b"{\"alg\":\"RSA-OAEP\",\"value\":\"!!\"}",
          b"{\"value\":\"" + b"A" * 5000 + b"\"}", b"\xff\xfe", b"{" * 1000, b"{\"attributes\":{\"enabled\":false}}",
          b"grant_type=client_credentials&client_id=x&client_secret=y", os.urandom(64)]


def _existing_tables(db):
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")]


def _state(db):
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return {t: c.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in _existing_tables(db) if t not in ("audit",) and not t.startswith("sqlite")}


def test_rest_surface_fuzz(vault_factory):
    v = vault_factory()
    vault_cli("key", "create", "k1", "--dir", v.dir)
    ident = json.loads(vault_cli("identity", "create", "nobody", "--dir", v.dir, "--json").stdout)
    ident.setdefault("tenantId", v.admin()["tenant_id"])
    tok = identity_token(v, ident)
    before = _state(v.dir / "vault.db")
    rng = random.Random(int(os.environ.get("BLOCKCRYPT_FUZZ_SEED", "15")))
    deadline = time.monotonic() + SECONDS
    n = 0
    conn = None
    while time.monotonic() < deadline:
        path = "/" + "/".join(rng.choice(SEGMENTS) for _ in range(rng.randint(0, 4))) + rng.choice(QUERIES)
        if rng.random() < 0.2:
            path = f"/{ident['tenantId']}/oauth2/v2.0/token" + rng.choice(QUERIES)
        method = rng.choice(METHODS)
        body = rng.choice(BODIES)
        headers = {}
        if rng.random() < 0.6:
            headers["Authorization"] = rng.choice([f"Bearer {tok}", "Bearer x.y.z", "Basic Zm9vOmJhcg==",
                                                   f"Bearer {tok[:-3]}abc", "Bearer"])
        if body is not None and rng.random() < 0.7:
            headers["Content-Type"] = rng.choice(["application/json", "application/x-www-form-urlencoded",
                                                  "text/plain", "application/json; charset=latin-1"])
        if rng.random() < 0.1:
            headers["Content-Length"] = rng.choice(["-1", "abc", "99999999999", "0"])
        if rng.random() < 0.05:
            headers["Transfer-Encoding"] = "chunked"
        if conn is None:
            conn = http.client.HTTPSConnection("127.0.0.1", v.port, context=tls_context(v), timeout=15)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, val in headers.items():
                conn.putheader(k, val)
            if body is not None and "Content-Length" not in headers and "Transfer-Encoding" not in headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body is not None and "Transfer-Encoding" not in headers else None)
            resp = conn.getresponse()
            data = resp.read()
        except (http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            conn.close()
            conn = None     # the server closed a connection it would not keep: fine (over TLS a send
            continue        # into a closed connection raises SSLEOFError, not BrokenPipeError)
        n += 1
        assert resp.status < 500, (method, path, headers, body, resp.status, data[:300])
        if resp.status >= 400 and method.upper() != "HEAD" and data:
            doc = json.loads(data)
            if "oauth2" in path and isinstance(doc.get("error"), str):   # the token endpoint: OAuth2's shape
                assert doc.get("error_description"), doc
            else:
                assert isinstance(doc.get("error"), dict) and doc["error"].get("code") and \
                    "message" in doc["error"], doc
        if resp.getheader("Connection", "").lower() == "close":
            conn.close()
            conn = None
    assert n > 100, n
    assert _state(v.dir / "vault.db") == before   # nothing changed
