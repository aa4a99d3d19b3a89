"""Issue 14 (issue 16 item 5, second half): `vault audit prune --before DATE` deletes the oldest
audit records and leaves a signed checkpoint, so `vault audit verify` still passes, and still
fails when the checkpoint or a record before or after it is edited, removed or slipped in."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time

import pytest

from blockcrypt._util.clock import iso_ms, iso_z
from vault_helpers import PY, REPO, make_vault, vault_cli


def _records(d):
    return [json.loads(x) for x in vault_cli("audit", "--dir", d, "--json").stdout.splitlines()]


def _verify(d):
    p = vault_cli("audit", "verify", "--dir", d, "--json", check=False)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None, p.stderr


def _vault_with_history(tmp_path, old=4, new=3):
    """A vault whose first records (init + `old` identities) are older than the returned cut."""
    d = make_vault(tmp_path / "v")
    for i in range(old):
        vault_cli("identity", "create", f"old{i}", "--dir", d)
    # the CLI prints times to the second (docs/CLI.md): a cut on a second of its own, more
    # than a second away from every record, so comparing printed times is exact
    time.sleep(1.1)
    cut = iso_z(int(time.time()))
    time.sleep(1.1)
    for i in range(new):
        vault_cli("identity", "create", f"new{i}", "--dir", d)
    return d, cut


def test_prune_keeps_the_chain_verifiable(tmp_path):
    d, cut = _vault_with_history(tmp_path)
    before = _records(d)
    n_old = sum(1 for r in before if r["time"] < cut)
    p = vault_cli("audit", "prune", "--before", cut, "--yes", "--json", "--dir", d)
    res = json.loads(p.stdout)
    assert res["pruned"] == n_old and res["prunedTotal"] == n_old and res["checkpointSeq"] == n_old
    assert res["records"] == len(before) - n_old + 1       # the kept ones and the AuditPrune record
    rc, v, err = _verify(d)
    assert rc == 0 and v["ok"] and v["pruned"] == n_old and v["records"] == res["records"], (v, err)
    assert v["head"] == res["head"]
    after = _records(d)
    assert after[0]["operation"] == "AuditCheckpoint" and after[0]["pruned"] == n_old
    assert [r["seq"] for r in after[1:]] == list(range(n_old + 1, len(before) + 2))
    assert after[-1]["operation"] == "AuditPrune" and f"pruned {n_old} records" in after[-1]["detail"]
    assert all(r["time"] >= cut for r in after[1:])
    # the text form says so too
    text = vault_cli("audit", "verify", "--dir", d).stdout
    assert f"{n_old} earlier records pruned" in text
    # appends go on after a prune, and a later prune moves the checkpoint forward
    vault_cli("identity", "create", "later", "--dir", d)
    time.sleep(0.02)
    cut2 = iso_ms()
    res2 = json.loads(vault_cli("audit", "prune", "--before", cut2, "--yes", "--json", "--dir", d).stdout)
    assert res2["prunedTotal"] == res2["checkpointSeq"] == len(before) + 2
    assert res2["pruned"] == len(before) + 2 - n_old
    rc, v, _ = _verify(d)
    assert rc == 0 and v["ok"] and v["pruned"] == len(before) + 2 and v["records"] == 1
    # nothing older than the date: nothing pruned, the checkpoint stays
    res3 = json.loads(vault_cli("audit", "prune", "--before", "2000-01-01", "--yes", "--json",
                                "--dir", d).stdout)
    assert res3["pruned"] == 0 and res3["prunedTotal"] == res2["prunedTotal"]
    assert _verify(d)[0] == 0


def _tampered(tmp_path, d, name, *sql):
    t = tmp_path / name
    shutil.copytree(d, t)
    conn = sqlite3.connect(str(t / "vault.db"))
    for q in sql:
        conn.execute(q)
    conn.commit()
    conn.close()
    return t


@pytest.fixture
def pruned(tmp_path):
    d, cut = _vault_with_history(tmp_path)
    res = json.loads(vault_cli("audit", "prune", "--before", cut, "--yes", "--json", "--dir", d).stdout)
    return d, res["checkpointSeq"]


@pytest.mark.parametrize("what", ["checkpoint-count", "checkpoint-hash", "checkpoint-moved", "checkpoint-removed",
                                  "record-after-edited", "record-after-removed", "record-slipped-before",
                                  "later-record-edited", "second-checkpoint"])
def test_tampering_around_the_checkpoint_is_caught(tmp_path, pruned, what):
    d, ck = pruned
    sql = {
        "checkpoint-count": [f"UPDATE audit SET record = replace(record, '\"pruned\":{ck}', '\"pruned\":{ck + 5}') "
                             f"WHERE seq = {ck}"],
        "checkpoint-hash": [f"UPDATE audit SET hash = '{'0' * 64}' WHERE seq = {ck}"],
        "checkpoint-moved": [f"UPDATE audit SET seq = {ck - 1} WHERE seq = {ck}"],
        "checkpoint-removed": [f"DELETE FROM audit WHERE seq = {ck}"],
        "record-after-edited": [f"UPDATE audit SET record = replace(record, 'new0', 'evil') WHERE seq = {ck + 1}"],
        "record-after-removed": [f"DELETE FROM audit WHERE seq = {ck + 1}"],
        "record-slipped-before": [f"INSERT INTO audit SELECT {ck - 1}, record, prev_hash, hash FROM audit "
                                  f"WHERE seq = {ck + 1}"],
        "later-record-edited": [f"UPDATE audit SET record = replace(record, 'new2', 'evil') WHERE seq = {ck + 3}"],
        "second-checkpoint": [f"UPDATE audit SET prev_hash = (SELECT prev_hash FROM audit WHERE seq = {ck}) "
                              f"WHERE seq = {ck + 2}"],
    }[what]
    t = _tampered(tmp_path, d, what, *sql)
    assert _verify(d)[0] == 0          # the original still verifies
    rc, v, err = _verify(t)
    assert rc == 22 and v["ok"] is False and "BROKEN" in err and len(err.strip().splitlines()) == 1, (what, v, err)


def test_prune_refuses_a_broken_chain_and_prunes_nothing(tmp_path):
    d, cut = _vault_with_history(tmp_path)
    conn = sqlite3.connect(str(d / "vault.db"))
    conn.execute("UPDATE audit SET record = replace(record, 'old1', 'evil') WHERE record LIKE '%old1%'")
    conn.commit()
    n = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    conn.close()
    p = vault_cli("audit", "prune", "--before", cut, "--yes", "--dir", d, check=False)
    assert p.returncode == 22 and "nothing was pruned" in p.stderr
    conn = sqlite3.connect(str(d / "vault.db"))
    assert conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == n
    conn.close()


def test_prune_without_a_terminal_needs_yes(tmp_path):
    d, cut = _vault_with_history(tmp_path)
    n = len(_records(d))
    p = subprocess.run([PY, "-m", "blockcrypt", "vault", "audit", "prune", "--before", cut, "--dir", str(d)],
                       cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--yes" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert len(_records(d)) == n


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01", "2026-12-01T16:30:00", "12/01/2026"])
def test_prune_bad_date_is_one_line(tmp_path, bad):
    d = make_vault(tmp_path / "v")
    n = len(_records(d))
    p = vault_cli("audit", "prune", "--before", bad, "--yes", "--dir", d, check=False)
    assert p.returncode == 2 and "ISO 8601" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert len(_records(d)) == n


def test_prune_while_the_vault_serves(vault_factory):
    from blockcrypt.vault.client import VaultClient
    v = vault_factory()
    c = VaultClient.for_admin(v.dir)
    c.create_key("k")
    kid, wrapped = c.wrap("k", None, b"x" * 64)
    time.sleep(0.02)
    cut = iso_ms()
    res = json.loads(vault_cli("audit", "prune", "--before", cut, "--yes", "--json", "--dir", v.dir).stdout)
    assert res["pruned"] >= 3
    assert c.unwrap("k", kid.rsplit("/", 1)[1], wrapped) == b"x" * 64   # the server appends after it
    rc, out, err = _verify(v.dir)
    assert rc == 0 and out["ok"] and out["pruned"] == res["prunedTotal"], (out, err)
    assert _records(v.dir)[-1]["operation"] == "KeyUnwrap"
