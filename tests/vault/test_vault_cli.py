"""The `vault` CLI: init, key (over HTTPS as admin), identity, policy, audit and
audit verify against tampering; openssl interop; the retention sweep."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time

import pytest

from blockcrypt.vault.client import VaultClient
from blockcrypt.vault.server.keyops import KeyOps
from blockcrypt.vault.server.store import Store
from vault_helpers import VaultProcess, make_vault, vault_cli


def _one_line_error(p, code=None):
    assert p.returncode != 0
    if code is not None:
        assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockcrypt: error: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def test_init_validation(tmp_path):
    msg = _one_line_error(vault_cli("init", "--dir", tmp_path / "a", "--retention-days", "5", check=False), 2)
    assert "7..90" in msg
    assert vault_cli("init", "--dir", tmp_path / "a", "--sku", "gold", check=False).returncode == 2
    out = json.loads(vault_cli("init", "--dir", tmp_path / "a", "--sku", "premium", "--json").stdout)
    assert out["sku"] == "premium" and out["retentionDays"] == 90
    _one_line_error(vault_cli("init", "--dir", tmp_path / "a", check=False), 4)
    for name in ("master.key", "admin.json", "server.key", "ca.key", "vault.db"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o077 == 0, name
    assert b"PRIVATE KEY-----" in (tmp_path / "a" / "server.key").read_bytes()
    assert b"ENCRYPTED" in (tmp_path / "a" / "server.key").read_bytes()
    _one_line_error(vault_cli("serve", "--dir", tmp_path / "a", "--listen", "nonsense", check=False))
    _one_line_error(vault_cli("key", "list", "--dir", tmp_path / "a", check=False))  # not serving
    _one_line_error(vault_cli("key", "list", "--dir", tmp_path / "nothing", check=False))


def test_key_commands(shared_vault):
    d = shared_vault.dir

    def j(*args):
        return json.loads(vault_cli("key", *args, "--dir", d, "--json").stdout)
    b = j("create", "cli-k", "--size", "3072", "--tag", "env=test")
    kid = b["key"]["kid"]
    assert kid.startswith(f"{shared_vault.url}/keys/cli-k/") and b["tags"] == {"env": "test"}
    assert "d" not in b["key"]
    assert "cli-k" in {it["kid"].rsplit("/", 1)[1] for it in j("list")}
    assert j("show", "cli-k")["key"]["kid"] == kid
    r = j("rotate", "cli-k")
    assert r["key"]["kid"] != kid and len(j("show", "cli-k", "--versions")) == 2
    assert j("show", "cli-k", "--version", kid.rsplit("/", 1)[1])["key"]["kid"] == kid
    assert j("disable", "cli-k")["attributes"]["enabled"] is False
    assert j("enable", "cli-k")["attributes"]["enabled"] is True
    dk = j("delete", "cli-k")
    from datetime import datetime
    days = datetime.fromisoformat(dk["scheduledPurgeDate"]) - datetime.fromisoformat(dk["deletedDate"])
    assert days.total_seconds() == 7 * 86400  # the CLI's times are ISO 8601 UTC
    assert "cli-k" in {it["kid"].rsplit("/", 1)[1] for it in j("list", "--deleted")}
    msg = _one_line_error(vault_cli("key", "purge", "cli-k", "--dir", d, check=False), 2)
    assert "--yes" in msg  # no terminal to ask on
    msg = _one_line_error(vault_cli("key", "purge", "cli-k", "--yes", "--dir", d, check=False), 44)
    assert "purge protection" in msg
    assert j("recover", "cli-k")["key"]["kid"] == r["key"]["kid"]
    text = vault_cli("key", "show", "cli-k", "--dir", d).stdout
    assert "3072-bit enabled" in text
    assert "KeyNotFound" in _one_line_error(vault_cli("key", "show", "no-such", "--dir", d, check=False), 43)
    _one_line_error(vault_cli("key", "create", "x", "--size", "1000", "--dir", d, check=False), 40)
    _one_line_error(vault_cli("key", "create", "x", "--tag", "novalue", "--dir", d, check=False), 2)


def test_identity_and_policy(shared_vault):
    d = shared_vault.dir
    ident = json.loads(vault_cli("identity", "create", "cli-app", "--dir", d, "--json").stdout)
    assert len(ident["clientSecret"]) >= 32
    assert ident["clientSecret"].encode() not in (d / "vault.db").read_bytes()
    listing = vault_cli("identity", "list", "--dir", d).stdout
    assert "cli-app" in listing and ident["clientSecret"] not in listing
    _one_line_error(vault_cli("identity", "create", "cli-app", "--dir", d, check=False), 4)
    msg = _one_line_error(vault_cli("policy", "set", "--dir", d, "--identity", "cli-app", "--permissions",
                                    "get,fly", check=False), 2)
    assert "fly" in msg
    vault_cli("policy", "set", "--dir", d, "--identity", "cli-app", "--permissions", "GET,wrapkey,unwrapKey")
    shown = json.loads(vault_cli("policy", "show", "--dir", d, "--identity", "cli-app", "--json").stdout)
    assert shown["permissions"] == sorted(["get", "wrapKey", "unwrapKey"])
    app = VaultClient(shared_vault.url, tenant_id=ident["tenantId"], client_id=ident["clientId"],
                      client_secret=ident["clientSecret"], ca_file=str(d / "ca.pem"))
    VaultClient.for_admin(d).create_key("cli-pol")
    kid, wrapped = app.wrap("cli-pol", None, b"k" * 32)
    assert app.unwrap("cli-pol", None, wrapped) == b"k" * 32
    from blockcrypt.errors import KeyAccessDenied
    from blockcrypt.errors import VaultRequestError
    assert app.get_key("cli-pol")["key"]["kid"] == kid
    with pytest.raises(VaultRequestError) as ei:
        app.rotate_key("cli-pol")
    assert ei.value.status == 403 and ei.value.inner == "AccessDenied"
    vault_cli("policy", "set", "--dir", d, "--identity", "cli-app", "--permissions", "")
    with pytest.raises(KeyAccessDenied):  # takes effect at the next request
        app.unwrap("cli-pol", None, wrapped)
    vault_cli("identity", "delete", "cli-app", "--dir", d, "--yes")
    with pytest.raises(KeyAccessDenied):  # token dies with the identity
        app.get_key("cli-pol")


def test_openssl_wrapped_value_unwraps_through_vault(shared_vault, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    import base64

    c = VaultClient.for_admin(shared_vault.dir)
    b = c.create_key("cli-openssl", key_size=2048)

    def num(s):
        return int.from_bytes(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)), "big")
    pub = rsa.RSAPublicNumbers(num(b["key"]["e"]), num(b["key"]["n"])).public_key()
    (tmp_path / "pub.pem").write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    dek = bytes(range(64))
    (tmp_path / "dek.bin").write_bytes(dek)
    subprocess.run(["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", tmp_path / "pub.pem",
                    "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
                    "-in", tmp_path / "dek.bin", "-out", tmp_path / "wrapped.bin"], check=True)
    wrapped = (tmp_path / "wrapped.bin").read_bytes()
    assert len(wrapped) == 256
    version = b["key"]["kid"].rsplit("/", 1)[1]
    assert c.unwrap("cli-openssl", version, wrapped, alg="RSA-OAEP-256") == dek
    # ... and SHA-1 OAEP from openssl unwraps with RSA-OAEP
    subprocess.run(["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", tmp_path / "pub.pem",
                    "-pkeyopt", "rsa_padding_mode:oaep", "-in", tmp_path / "dek.bin",
                    "-out", tmp_path / "wrapped1.bin"], check=True)
    assert c.unwrap("cli-openssl", version, (tmp_path / "wrapped1.bin").read_bytes(), alg="RSA-OAEP") == dek


def _tampered_copy(src, dst, sql):
    shutil.copytree(src, dst)
    conn = sqlite3.connect(str(dst / "vault.db"))
    conn.executescript(sql)
    conn.commit()
    conn.close()
    return dst


def test_audit_filter_and_verify_detects_tampering(tmp_path):
    d = make_vault(tmp_path / "v")
    v = VaultProcess(d).start()
    try:
        c = VaultClient.for_admin(d)
        c.create_key("aud-a")
        c.create_key("aud-b")
        c.wrap("aud-a", None, b"x" * 32, disk_id="disk-7")
    finally:
        v.stop()
    recs = [json.loads(x) for x in vault_cli("audit", "--dir", d, "--key", "aud-a", "--json").stdout.splitlines()]
    assert {r["operation"] for r in recs} == {"KeyCreate", "KeyWrap"} and all(r["key"] == "aud-a" for r in recs)
    assert [r["diskId"] for r in recs if r["operation"] == "KeyWrap"] == ["disk-7"]
    text = vault_cli("audit", "--dir", d, "--key", "aud-a").stdout
    assert "KeyWrap" in text and "disk=disk-7" in text
    ok = vault_cli("audit", "verify", "--dir", d)
    assert ok.returncode == 0 and "intact" in ok.stdout
    n = json.loads(vault_cli("audit", "verify", "--dir", d, "--json").stdout)["records"]
    assert n >= 7

    edited = _tampered_copy(d, tmp_path / "edited", "UPDATE audit SET record = replace(record, '\"admin\"', "
                                                    "'\"mallory\"') WHERE seq = 5;")
    p = vault_cli("audit", "verify", "--dir", edited, check=False)
    assert p.returncode == 22 and "record 5 was edited" in p.stderr

    removed = _tampered_copy(d, tmp_path / "removed", "DELETE FROM audit WHERE seq = 4;")
    p = vault_cli("audit", "verify", "--dir", removed, check=False)
    assert p.returncode == 22 and "record 4 is missing" in p.stderr

    # reorder: swap the contents of records 3 and 4 (each keeps its own stored hashes)
    reordered = _tampered_copy(d, tmp_path / "reordered", """
        UPDATE audit SET seq = -3 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 4;
        UPDATE audit SET seq = 4 WHERE seq = -3;""")
    p = vault_cli("audit", "verify", "--dir", reordered, "--json", check=False)
    res = json.loads(p.stdout)
    assert p.returncode == 22 and res["badSeq"] == 3 and not res["ok"]

    relinked = _tampered_copy(d, tmp_path / "relinked", f"DELETE FROM audit WHERE seq = {n};")
    assert vault_cli("audit", "verify", "--dir", relinked).returncode == 0  # tail cut: see the documented caveat


def test_retention_sweep_purges_lapsed_keys(tmp_path):
    d = make_vault(tmp_path / "v", "--retention-days", "7", "--purge-protection")
    s = Store(d)
    try:
        ops = KeyOps(s, "https://127.0.0.1:1")
        ops.create("sw", {"kty": "RSA", "key_size": 2048})
        ops.create("keep", {"kty": "RSA"})
        ops.delete("sw")
        t = int(time.time())
        assert ops.sweep(now=t + 6 * 86400) == []
        with pytest.raises(Exception) as ei:
            ops.purge("sw", now=t + 6 * 86400)
        assert getattr(ei.value, "status", None) == 403
        assert ops.sweep(now=t + 7 * 86400 + 1) == ["sw"]
        assert ops.list_deleted()["value"] == []
        assert [i["kid"] for i in ops.list_keys()["value"]] == ["https://127.0.0.1:1/keys/keep"]
        ops.create("sw", {"kty": "RSA"})  # the name is free again
    finally:
        s.close()


def test_interrupted_init_can_be_redone(tmp_path):
    d = tmp_path / "v"
    make_vault(d)
    (d / ".init-incomplete").write_text("crashed\n")  # as if init died before its last step
    msg = _one_line_error(vault_cli("audit", "--dir", d, check=False))
    assert "did not finish" in msg
    old_admin = (d / "admin.json").read_text()
    vault_cli("init", "--dir", d)
    assert not (d / ".init-incomplete").exists() and (d / "admin.json").read_text() != old_admin
    assert vault_cli("audit", "verify", "--dir", d).returncode == 0
