"""Raw REST against a real `vault serve`: the bearer challenge, token endpoint,
api-version, Azure-shaped errors for bad input, and a burst of 1,000 bad
requests after which good ones still work and nothing has changed."""
from __future__ import annotations

import base64
import json
import os
import random
import threading
import time

import pytest

from blockcrypt.vault.server import identities
from blockcrypt.vault.client import VaultClient
from blockcrypt.vault.server.store import Store
from vault_helpers import vault_cli
from vault_helpers import admin_token, plain_http, raw

DEK = os.urandom(64)


def _b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def v(shared_vault):
    return shared_vault


@pytest.fixture(scope="module")
def token(v):
    return admin_token(v)


@pytest.fixture(scope="module")
def client(v):
    return VaultClient.for_admin(v.dir)


def _is_azure_error(body, code=None):
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    if code:
        assert body["error"]["code"] == code, body
    return True


def _state(v) -> list:
    """Everything keyed in the store (versions, attributes, deletions)."""
    s = Store(v.dir)
    try:
        with s.read() as c:
            kv = [tuple(r) for r in c.execute("SELECT name, version, enabled, nbf, exp, tags, updated "
                                              "FROM key_versions ORDER BY seq")]
            dk = [tuple(r) for r in c.execute("SELECT * FROM deleted_keys ORDER BY name")]
    finally:
        s.close()
    return [kv, dk]


def test_challenge_on_missing_token(v):
    status, h, body = raw(v, "GET", "/keys?api-version=7.5")
    assert status == 401 and _is_azure_error(body, "Unauthorized")
    tenant = v.admin()["tenant_id"]
    assert h["www-authenticate"] == f'Bearer authorization="{v.url}/{tenant}", resource="{v.url}"'


@pytest.mark.parametrize("api_version", ["7.4", "7.5", "7.6", "2025-07-01"])
def test_api_versions_accepted(v, token, api_version):
    status, _, body = raw(v, "GET", f"/keys?api-version={api_version}", token=token)
    assert status == 200 and "value" in body and body["nextLink"] is None


@pytest.mark.parametrize("query,fragment", [("", "missing"), ("?api-version=", "missing"),
                                            ("?api-version=1999-01-01", "not recognized"),
                                            ("?api-version=7.5&api-version=9", "not recognized")])
def test_bad_api_version(v, token, query, fragment):
    status, _, body = raw(v, "GET", f"/keys{query}", token=token)
    assert status == 400 and _is_azure_error(body, "BadParameter") and fragment in body["error"]["message"]


def test_token_endpoint_errors(v):
    a = v.admin()
    url = f"/{a['tenant_id']}/oauth2/v2.0/token"
    form = {"grant_type": "client_credentials", "client_id": a["client_id"], "client_secret": "wrong",
            "scope": f"{v.url}/.default"}
    hdr = {"Content-Type": "application/x-www-form-urlencoded"}
    from urllib.parse import urlencode
    status, _, body = raw(v, "POST", url, urlencode(form).encode(), hdr)
    assert status == 401 and body["error"] == "invalid_client"
    status, _, body = raw(v, "POST", url, urlencode({**form, "grant_type": "password"}).encode(), hdr)
    assert status == 400 and body["error"] == "unsupported_grant_type"
    status, _, body = raw(v, "POST", "/not-the-tenant/oauth2/v2.0/token", urlencode(form).encode(), hdr)
    assert status == 400
    status, _, body = raw(v, "POST", url, urlencode({**form, "client_secret": a["client_secret"],
                                                     "scope": "https://elsewhere/.default"}).encode(), hdr)
    assert status == 400 and body["error"] == "invalid_scope"
    status, _, body = raw(v, "POST", url, urlencode({**form, "client_secret": a["client_secret"]}).encode(), hdr)
    assert status == 200 and body["token_type"] == "Bearer" and 0 < body["expires_in"] <= 600


def test_wrong_forged_expired_tokens(v, token):
    a = v.admin()
    s = Store(v.dir)
    try:
        expired, _ = identities.issue_token(s.token_key, client_id=a["client_id"], tenant_id=a["tenant_id"],
                                            audience=v.url, ttl_seconds=60, now=int(time.time()) - 3600)
        other_aud, _ = identities.issue_token(s.token_key, client_id=a["client_id"], tenant_id=a["tenant_id"],
                                              audience="https://127.0.0.1:1")
        ghost, _ = identities.issue_token(s.token_key, client_id="00000000-0000-0000-0000-000000000000",
                                          tenant_id=a["tenant_id"], audience=v.url)
    finally:
        s.close()
    forged, _ = identities.issue_token(os.urandom(32), client_id=a["client_id"], tenant_id=a["tenant_id"],
                                       audience=v.url)
    head, claims, sig = token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(claims + "=="))
    doc["exp"] += 10 ** 6
    tampered = ".".join([head, _b64u(json.dumps(doc).encode()), sig])
    cases = {"garbage": "not-a-token", "expired": expired, "forged": forged, "tampered": tampered,
             "other audience": other_aud, "unknown identity": ghost}
    for what, tok in cases.items():
        status, h, body = raw(v, "GET", "/keys?api-version=7.5", token=tok)
        assert status == 401, what
        assert _is_azure_error(body, "Unauthorized") and "www-authenticate" in h, what
    assert "expired" in raw(v, "GET", "/keys?api-version=7.5", token=expired)[2]["error"]["message"]
    status, _, _ = raw(v, "GET", "/keys?api-version=7.5", headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
    assert status == 401


def test_bad_input_changes_nothing(v, token, client):
    client.create_key("rest-k")
    before = _state(v)
    cases = [
        ("POST", "/keys/rest-new/create?api-version=7.5", b"{not json", 400, "BadParameter"),
        ("POST", "/keys/rest-new/create?api-version=7.5", b"[1,2]", 400, "BadParameter"),
        ("POST", "/keys/rest-new/create?api-version=7.5", b"", 400, "BadParameter"),
        ("POST", "/keys/rest-new/create?api-version=7.5", b'{"kty":"EC"}', 400, "BadParameter"),
        ("POST", "/keys/rest-new/create?api-version=7.5", b'{"kty":"RSA","key_size":"big"}', 400, "BadParameter"),
        ("POST", "/keys/rest-new/create?api-version=7.5", b'{"kty":"RSA","attributes":{"exp":"soon"}}', 400,
         "BadParameter"),
        ("POST", "/keys/rest-new/create?api-version=7.5", "{\"kty\":\"RSA\",\"tags\":{\"\u00e9\":1}}".encode(), 400,
         "BadParameter"),
        ("POST", "/keys/rest-new/create", b'{"kty":"RSA"}', 400, "BadParameter"),
        ("POST", "/keys/rest-new/create?api-version=6.0", b'{"kty":"RSA"}', 400, "BadParameter"),
        ("PATCH", "/keys/rest-k/?api-version=7.5", b'{"attributes":{"enabled":"no"}}', 400, "BadParameter"),
        ("PATCH", "/keys/rest-k/?api-version=7.5", b'\xff\xfe', 400, "BadParameter"),
        ("PUT", "/keys/rest-k?api-version=7.5", b'{"key":{"kty":"RSA","n":"AQAB","e":"AQAB"}}', 400, "BadParameter"),
        ("POST", "/keys/rest-k//unwrapkey?api-version=7.5", b'{"alg":"RSA-OAEP-256","value":"AAAA"}', 400,
         "BadParameter"),
        ("POST", "/keys/rest-k//unwrapkey?api-version=7.5", b'{"alg":"RSA1_5","value":"AAAA"}', 400,
         "BadParameter"),
        ("POST", "/keys/rest-k//wrapkey?api-version=7.5", b'{"alg":"RSA-OAEP-256","value":"!!"}', 400,
         "BadParameter"),
        ("POST", "/keys/rest-k//wrapkey?api-version=7.5",
         json.dumps({"alg": "RSA-OAEP-256", "value": _b64u(b"x" * 300)}).encode(), 400, "BadParameter"),
        ("GET", "/secrets?api-version=7.5", None, 404, "NotFound"),
        ("GET", "/keys/rest-k/versions/extra/parts?api-version=7.5", None, 404, "NotFound"),
        ("GET", "/keys/no-such-key?api-version=7.5", None, 404, "KeyNotFound"),
        ("GET", "/keys/rest-k/0123456789abcdef0123456789abcdef?api-version=7.5", None, 404, "KeyNotFound"),
        ("DELETE", "/keys?api-version=7.5", None, 405, "MethodNotAllowed"),
        ("POST", "/keys/rest-k/rotate?api-version=7.5", None, None, None),  # the one good request, undone below
    ]
    for method, path, body, want_status, want_code in cases[:-1]:
        status, _, out = raw(v, method, path, body, {"Content-Type": "application/json"}, token=token)
        assert status == want_status, (method, path, out)
        assert _is_azure_error(out, want_code)
    # oversized body: refused before it is read
    status, h, out = raw(v, "POST", "/keys/rest-new/create?api-version=7.5", b"{" + b" " * (1 << 20) + b"}",
                         {"Content-Type": "application/json"}, token=token)
    assert status == 413 and _is_azure_error(out, "RequestEntityTooLarge")
    assert _state(v) == before
    assert client.list_versions("rest-k")[0]["kid"].startswith(f"{v.url}/keys/rest-k/")


def test_plain_http_to_tls_port(v):
    out = plain_http(v.port, b"GET /keys?api-version=7.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    err = json.loads(body)
    assert err["error"]["code"] == "BadRequest" and v.url in err["error"]["message"]


def test_disk_id_context_is_audited(v, client):
    client.create_key("rest-ctx")
    kid, wrapped = client.wrap("rest-ctx", None, DEK, disk_id="disk-0042")
    assert client.unwrap("rest-ctx", kid.rsplit("/", 1)[1], wrapped, disk_id="disk-0042") == DEK
    recs = [json.loads(x) for x in vault_cli("audit", "--dir", v.dir, "--key", "rest-ctx", "--json").stdout.splitlines()]
    unwraps = [r for r in recs if r["operation"] == "KeyUnwrap"]
    assert unwraps[-1]["diskId"] == "disk-0042" and unwraps[-1]["version"] == kid.rsplit("/", 1)[1]
    assert unwraps[-1]["identity"] == "admin" and unwraps[-1]["status"] == 200


def test_client_status(v, client):
    client.create_key("rest-status")
    st = client.status("rest-status")
    assert st["state"] == "enabled" and st["purge_protected"] and st["kty"] == "RSA"
    client.update_key("rest-status", exp=int(time.time()) - 5)
    assert client.status("rest-status")["state"] == "expired"
    client.update_key("rest-status", exp=int(time.time()) + 3600, nbf=int(time.time()) + 60)
    assert client.status("rest-status")["state"] == "not-yet-valid"
    client.update_key("rest-status", enabled=False)
    assert client.status("rest-status")["state"] == "disabled"


def test_second_server_on_same_dir_is_refused(v):
    p = vault_cli("serve", "--dir", v.dir, "--listen", "127.0.0.1:0", check=False, timeout=30)
    assert p.returncode == 6 and "already served" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_client_maps_key_errors(v, client):
    from blockcrypt.errors import KeyDeleted, KeyDisabled, KeyIntegrityError, KeyPurged
    client.create_key("rest-map")
    kid, wrapped = client.wrap("rest-map", None, DEK)
    client.update_key("rest-map", enabled=False)
    with pytest.raises(KeyDisabled):
        client.unwrap("rest-map", None, wrapped)
    client.update_key("rest-map", enabled=True)
    with pytest.raises(KeyIntegrityError):
        client.unwrap("rest-map", None, bytes(len(wrapped)))
    client.delete_key("rest-map")
    with pytest.raises(KeyDeleted):
        client.unwrap("rest-map", None, wrapped)
    with pytest.raises(KeyPurged):
        client.unwrap("never-existed", None, wrapped)
    client.recover_key("rest-map")
    assert client.unwrap("rest-map", None, wrapped) == DEK


def test_burst_of_bad_requests_then_good_ones(v, token, client):
    client.create_key("burst-k")
    kid, wrapped = client.wrap("burst-k", None, DEK)
    before = _state(v)
    audit_before = json.loads(vault_cli("audit", "verify", "--dir", v.dir, "--json").stdout)["records"]
    a = v.admin()
    forged = identities.issue_token(os.urandom(32), client_id=a["client_id"], tenant_id=a["tenant_id"],
                                    audience=v.url)[0]
    J = {"Content-Type": "application/json"}
    kinds = [
        lambda: raw(v, "GET", "/keys?api-version=7.5"),
        lambda: raw(v, "GET", "/keys?api-version=7.5", token="garbage"),
        lambda: raw(v, "GET", "/keys?api-version=7.5", token=forged),
        lambda: raw(v, "GET", "/keys", token=token),
        lambda: raw(v, "GET", "/keys?api-version=0.1", token=token),
        lambda: raw(v, "GET", "/nowhere/at/all?api-version=7.5", token=token),
        lambda: raw(v, "POST", "/keys/burst-new/create?api-version=7.5", b"{{{", J, token=token),
        lambda: raw(v, "POST", "/keys/burst-new/create?api-version=7.5", b'{"kty":"oct"}', J, token=token),
        lambda: raw(v, "POST", "/keys/burst-k//unwrapkey?api-version=7.5", b'{"alg":"RSA-OAEP-256","value":"AA"}',
                    J, token=token),
        lambda: raw(v, "POST", "/keys/burst-new/create?api-version=7.5", b"x" * 70000, J, token=token),
        lambda: raw(v, "PUT", "/deletedkeys?api-version=7.5", b"{}", J, token=token),
        lambda: plain_http(v.port, b"POST /keys/x/create HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
        lambda: plain_http(v.port, os.urandom(200)),
    ]
    rng = random.Random(5)
    plan = [rng.randrange(len(kinds)) for _ in range(1000)]
    errors: list = []
    statuses: dict = {}
    lock = threading.Lock()

    def worker(chunk):
        for i in chunk:
            try:
                out = kinds[i]()
                st = out[0] if isinstance(out, tuple) else int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/") else 0
            except Exception as e:  # a reset is acceptable for the random-bytes case only
                if i != len(kinds) - 1:
                    errors.append((i, repr(e)))
                st = -1
            with lock:
                statuses[st] = statuses.get(st, 0) + 1
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(plan[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed_s = time.monotonic() - t0
    assert not errors, errors[:5]
    assert not any(200 <= s < 300 for s in statuses), statuses
    # good requests still work, and nothing changed
    assert client.unwrap("burst-k", None, wrapped) == DEK
    assert client.get_key("burst-k")["key"]["kid"] == kid
    assert _state(v) == before
    res = json.loads(vault_cli("audit", "verify", "--dir", v.dir, "--json").stdout)
    assert res["ok"] and res["records"] >= audit_before + 1000
    print(f"\n1000 bad requests in {elapsed_s:.1f} s; statuses {dict(sorted(statuses.items()))}")


def test_garbage_over_tls_gets_json_error(v, client):
    import socket
    import ssl as _ssl
    ctx = _ssl.create_default_context(cafile=str(v.dir / "ca.pem"))
    for payload in (b"GARBAGE\r\n\r\n", b"GET /keys HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", v.port), timeout=10) as raw_sock:
            with ctx.wrap_socket(raw_sock, server_hostname="127.0.0.1") as s:
                s.sendall(payload)
                out = b""
                try:
                    while chunk := s.recv(65536):
                        out += chunk
                except (ConnectionError, _ssl.SSLError):
                    pass
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] in (b"400", b"414"), out[:200]
        assert json.loads(body)["error"]["code"] in ("BadRequest", "BadParameter", "RequestUriTooLong")
    assert client.list_keys() is not None  # still serving


def test_tokens_expire_after_their_ttl(vault_factory):
    short = vault_factory(serve_args=("--token-ttl-seconds", "5"), name="short-ttl")
    tok = admin_token(short)
    assert raw(short, "GET", "/keys?api-version=7.5", token=tok)[0] == 200
    time.sleep(6)
    status, h, body = raw(short, "GET", "/keys?api-version=7.5", token=tok)
    assert status == 401 and "expired" in body["error"]["message"] and "www-authenticate" in h
    c = VaultClient.for_admin(short.dir)  # a client simply fetches a new token
    assert c.list_keys() == []
