"""Issue 15 on the vault: `vault key disable NAME` is a kill switch for every version (H4)."""
from __future__ import annotations

import json

from blockcrypt.vault.client import VaultClient
from vault_helpers import vault_cli


def _enabled(d, name):
    c = VaultClient.for_admin(d)
    return {it["kid"].rsplit("/", 1)[1]: it["attributes"]["enabled"] for it in c.list_versions(name)}


def test_disable_acts_on_every_version_and_says_so(shared_vault):
    d = shared_vault.dir
    first = json.loads(vault_cli("key", "create", "ks-k", "--dir", d, "--json").stdout)["key"]["kid"]
    vault_cli("key", "rotate", "ks-k", "--dir", d)
    vault_cli("key", "rotate", "ks-k", "--dir", d)
    assert list(_enabled(d, "ks-k").values()) == [True] * 3
    p = vault_cli("key", "disable", "ks-k", "--dir", d)
    assert "disabled 3 version(s) of key ks-k" in p.stdout and first in p.stdout, p.stdout
    assert list(_enabled(d, "ks-k").values()) == [False] * 3   # the old versions too
    v1 = first.rsplit("/", 1)[1]
    out = json.loads(vault_cli("key", "enable", "ks-k", "--version", v1, "--dir", d, "--json").stdout)
    assert [x["version"] for x in out["versions"]] == [v1] and out["attributes"]["enabled"] is True
    st = _enabled(d, "ks-k")
    assert st.pop(v1) is True and list(st.values()) == [False, False]
    out = json.loads(vault_cli("key", "enable", "ks-k", "--dir", d, "--json").stdout)
    assert len(out["versions"]) == 3 and all(_enabled(d, "ks-k").values())


# --- M8: no serving with loose permissions ---------------------------------------------------

import os  # noqa: E402

import pytest  # noqa: E402

from vault_helpers import make_vault  # noqa: E402


@pytest.mark.parametrize("what,mode", [("master.key", 0o644), ("", 0o755), ("server.key", 0o640)])
def test_serve_refuses_loose_permissions(tmp_path, what, mode):
    d = make_vault(tmp_path / "v")
    p = d / what if what else d
    os.chmod(p, mode)
    r = vault_cli("serve", "--dir", d, "--listen", "127.0.0.1:0", check=False, timeout=30)
    assert r.returncode == 10, (r.returncode, r.stdout, r.stderr)
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "too open" in line and f"{mode:04o}" in line, r.stderr
    assert not (d / "serve.json").exists()


# --- M6: the audit chain is keyed ----------------------------------------------------------------

import hashlib  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402


def _rechain_sha256(db, edit_seq):
    """What an attacker with write access to vault.db does: edit a record, recompute every link."""
    conn = sqlite3.connect(str(db))
    rows = conn.execute("SELECT seq, record FROM audit ORDER BY seq").fetchall()
    prev = "0" * 64
    for seq, rec in rows:
        if seq == edit_seq:
            rec = rec.replace('"admin"', '"nobody"').replace('"local"', '"nobody"')
        h = hashlib.sha256((prev + "\n" + rec).encode()).hexdigest()
        conn.execute("UPDATE audit SET record = ?, prev_hash = ?, hash = ? WHERE seq = ?", (rec, prev, h, seq))
        prev = h
    conn.commit()
    return conn


def test_recomputed_audit_chain_is_detected(tmp_path):
    d = make_vault(tmp_path / "v")
    vault_cli("identity", "create", "app1", "--dir", d)
    ok = json.loads(vault_cli("audit", "verify", "--dir", d, "--json").stdout)
    assert ok["ok"] and ok["unkeyed"] == 0 and len(ok["head"]) == 64
    assert ok["head"] in vault_cli("audit", "verify", "--dir", d).stdout   # the head, for anchoring
    forged = tmp_path / "forged"
    shutil.copytree(d, forged)
    _rechain_sha256(forged / "vault.db", 1).close()
    p = vault_cli("audit", "verify", "--dir", forged, check=False)
    assert p.returncode == 22 and "record 1 was edited" in p.stderr, p.stderr
    # moving the keyed-from mark past the end (to make every record plain SHA-256) is caught too
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    conn = _rechain_sha256(moved / "vault.db", 1)
    conn.execute("UPDATE meta SET v = '999:' || substr(v, instr(v, ':') + 1) WHERE k = 'audit_keyed_from'")
    conn.commit()
    conn.close()
    p = vault_cli("audit", "verify", "--dir", moved, check=False)
    assert p.returncode == 22 and "audit_keyed_from" in p.stderr, p.stderr


def test_older_unkeyed_chain_still_verifies_and_continues_keyed(tmp_path):
    d = make_vault(tmp_path / "v")
    db = d / "vault.db"
    conn = _rechain_sha256(db, None)        # as an older release wrote it: plain SHA-256 links
    conn.execute("DELETE FROM meta WHERE k = 'audit_keyed_from'")
    conn.commit()
    n = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    conn.close()
    vault_cli("identity", "create", "app1", "--dir", d)     # appended keyed
    res = json.loads(vault_cli("audit", "verify", "--dir", d, "--json").stdout)
    assert res["ok"] and res["unkeyed"] == n and res["records"] > n, res
