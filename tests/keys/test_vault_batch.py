"""Issue 14: a rotation's batch on the built-in vault (akv.py rewrap_many), against the real
vault over HTTPS (RSA, and RSA-HSM in SoftHSM2): the vault unwraps every DEK, wraps under the
new version once per batch, and the rest are wrapped with that version's public key, so the
vault itself unwraps them again; a version that cannot wrap, an identity without wrapKey and
another disk's context each get the vault's own typed error."""
from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from blockcrypt.control import des
from blockcrypt.control.state import State
from blockcrypt.errors import KeyAccessDenied, KeyDisabled, KeyIntegrityError
from blockcrypt.format import ROLE_DATA, binding_context
from blockcrypt.keys.envelope import new_dek
from support.vaultproc import vault_cli

_seq = itertools.count(1)


def _audit(v, key):
    recs = [json.loads(x) for x in vault_cli("audit", "--dir", v.dir, "--key", key, "--json").stdout.splitlines()]
    return [r["operation"] for r in recs if r.get("status") == 200]


@pytest.fixture(params=["RSA", "RSA-HSM"])
def setup(request, tmp_path):
    v = request.getfixturevalue("soft_vault" if request.param == "RSA" else "hsm_vault")
    key = f"batch-{next(_seq)}"
    v.key("create", key, "--kty", request.param)
    state = State.init(tmp_path / "state")
    d = des.create(state, "des", f"{v.url}/keys/{key}", vault_dir=str(v.dir), grant=True)
    prov = state.keys.get("vault")
    deks = [new_dek() for _ in range(12)]
    ctxs = [binding_context(os.urandom(16), ROLE_DATA) for _ in deks]
    wrapped = [prov.wrap(d.active_key, k, c, disk_id=f"disk{i}") for i, (k, c) in enumerate(zip(deks, ctxs))]
    new = v.key("rotate", key)["key"]["kid"]
    yield v, key, d, prov, deks, ctxs, wrapped, new
    v.cli("policy", "set", "--identity", d.identity["name"], "--permissions", "get,wrapKey,unwrapKey")


def _items(wrapped, ctxs, to):
    return [(w, c, to, f"disk{i}") for i, (w, c) in enumerate(zip(wrapped, ctxs))]


def test_one_wrap_per_batch_and_every_dek_back(setup):
    v, key, d, prov, deks, ctxs, wrapped, new = setup
    before = _audit(v, key)
    with ThreadPoolExecutor(4) as pool:
        out = prov.rewrap_many(_items(wrapped, ctxs, new), pool=pool)
    assert [w.kek_id for w in out] == [new] * 12
    assert all(w.algorithm == wrapped[0].algorithm for w in out)
    ops = _audit(v, key)[len(before):]
    assert ops.count("KeyWrap") == 1 and ops.count("KeyUnwrap") == 12 and ops.count("KeyGet") == 1, ops
    # the vault unwraps what was wrapped here with the version's public key
    assert [prov.unwrap(w, c) for w, c in zip(out, ctxs)] == deks


def test_a_version_that_cannot_wrap_or_an_identity_without_wrapkey_refuses_every_item(setup):
    v, key, d, prov, deks, ctxs, wrapped, new = setup
    v.key("disable", key, "--version", new.rsplit("/", 1)[1])
    out = prov.rewrap_many(_items(wrapped, ctxs, new))
    assert all(isinstance(r, KeyDisabled) for r in out), out
    v.key("enable", key)
    v.cli("policy", "set", "--identity", d.identity["name"], "--permissions", "get,unwrapKey")
    out = prov.rewrap_many(_items(wrapped, ctxs, new))
    assert all(isinstance(r, KeyAccessDenied) for r in out), out


def test_another_disks_context_fails_alone(setup):
    v, key, d, prov, deks, ctxs, wrapped, new = setup
    items = _items(wrapped, ctxs, new)
    items[5] = (wrapped[5], ctxs[6], new, "disk5")
    items[0] = (wrapped[0], ctxs[1], new, "disk0")        # the batch's first item too
    out = prov.rewrap_many(items)
    assert isinstance(out[5], KeyIntegrityError) and isinstance(out[0], KeyIntegrityError)
    ok = [i for i in range(12) if i not in (0, 5)]
    assert [prov.unwrap(out[i], ctxs[i]) for i in ok] == [deks[i] for i in ok]
