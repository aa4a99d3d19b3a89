"""Issue 14: a DES rotation on a real vault over HTTPS unwraps the DEKs through the vault's
``unwrapkeys`` (keys/providers/akv.py rewrap_many): every disk re-wrapped, its data intact, one
audited unwrap per disk (with its disk id) and one vault wrapKey per batch; against a vault
without the extension (a real server asked for an operation it does not have) the same rotation
goes one unwrap per request; a disabled old version stops the rotation with KeyDisabled and
leaves every disk openable."""
from __future__ import annotations

import json

import pytest

from blockcrypt.control import des, disks, rotation
from blockcrypt.errors import KeyDisabled
from blockcrypt.vault import client as vault_client
from support.vaultproc import vault_cli
from test_des import _write_read

DISKS = 70   # two batches (REWRAP_BATCH=64); the first's 63 others in two unwrapkeys chunks (UNWRAP_CHUNK=32)


def _records(vault, key: str | None, after: int = 0) -> list[dict]:
    args = ("--key", key) if key else ()
    out = [json.loads(x) for x in vault_cli("audit", "--dir", vault.dir, *args, "--json").stdout.splitlines()]
    return [r for r in out if r["seq"] > after]


def _last_seq(vault, key) -> int:
    recs = _records(vault, key)
    return recs[-1]["seq"] if recs else 0


def _make(state, n=DISKS):
    names = [f"d{i:03d}" for i in range(n)]
    for name in names:
        des.create_disk(state, name, 1 << 20, "des1")
    _write_read(state, names[0])
    _write_read(state, names[-1])
    return names, {disks.read_disk_header(state.catalog.get_disk(n)).disk_id_hex: n for n in names}


def _rotate(state, vault, key_name):
    """DISKS disks on des1, the key rotated, the DES rotated: (names, {disk id: name}, the new kid,
    the last audit seq of the key before the rotation, the key's records of the rotation)."""
    names, ids = _make(state)
    new_kid = vault.key("rotate", key_name)["key"]["kid"]
    mark = _last_seq(vault, key_name)
    r = des.rotate(state, "des1", new_kid)
    assert sorted(r["rewrapped"]) == names
    return names, ids, new_kid, mark, _records(vault, key_name, mark)


def test_rotation_unwraps_through_unwrapkeys_one_record_per_disk(state, vault, des_rec, key_name):
    assert rotation.REWRAP_BATCH == 64
    names, ids, new_kid, mark, recs = _rotate(state, vault, key_name)
    for n in names:
        assert disks.read_disk_header(state.catalog.get_disk(n)).layers[0].kek_id == new_kid
    _write_read(state, names[0])
    _write_read(state, names[-1])
    unwraps = [r for r in recs if r["operation"] == "KeyUnwrap"]
    assert sorted(r["diskId"] for r in unwraps) == sorted(ids)          # each disk once
    assert all(r["status"] == 200 for r in unwraps)
    batched = [r for r in unwraps if r["path"].endswith("/unwrapkeys")]
    assert len(batched) == DISKS - 2                                     # all but each batch's proof
    assert [r["operation"] for r in recs].count("KeyWrap") == 2          # one wrapKey per batch


def test_rotation_against_a_vault_without_unwrapkeys_goes_one_by_one(state, vault, des_rec, key_name,
                                                                     monkeypatch):
    monkeypatch.setattr(vault_client, "UNWRAP_MANY_OP", "unwrapkeys-not-here")   # the server: 404 NotFound
    names, ids, new_kid, mark, recs = _rotate(state, vault, key_name)
    _write_read(state, names[-1])
    # an operation the vault does not have names no key in its record
    probes = [r for r in _records(vault, None, mark) if r.get("path", "").endswith("/unwrapkeys-not-here")]
    # asked by the first batch's two chunks (they go at once), then one unwrap per request
    assert 1 <= len(probes) <= 2 and all(p["status"] == 404 for p in probes)
    unwraps = [r for r in recs if r["operation"] == "KeyUnwrap" and r["status"] == 200]
    assert sorted(r["diskId"] for r in unwraps) == sorted(ids)
    assert all(r["path"].endswith("/unwrapkey") for r in unwraps)


def test_rotation_stops_on_a_disabled_old_version(state, vault, des_rec, key_name):
    names, _ = _make(state, 40)
    old = des_rec.active_key
    new_kid = vault.key("rotate", key_name)["key"]["kid"]
    vault.key("disable", key_name, "--version", old.rsplit("/", 1)[1])
    with pytest.raises(KeyDisabled):
        des.rotate(state, "des1", new_kid)
    for n in names:   # nothing written: every disk still on the old version
        assert disks.read_disk_header(state.catalog.get_disk(n)).layers[0].kek_id == old
    vault.key("enable", key_name, "--version", old.rsplit("/", 1)[1])
    assert sorted(des.rotate(state, "des1", new_kid)["rewrapped"]) == names
    _write_read(state, names[-1])
