"""Issue 14: transit re-wraps in batches (``batch_input``) against a real `bao server -dev`: one
request per batch, an item the server refuses fails
alone with its typed error, a server that does not answer fails every item as unavailable,
and a DES rotation killed with SIGKILL at any step of a batch leaves every disk openable
under the old or the new key version."""
from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import pytest

from blockcrypt.control import des, rotation
from blockcrypt.control.disks import open_volume, read_disk_header
from blockcrypt.control.state import State
from blockcrypt.errors import KeyIntegrityError, KeyUnavailable
from blockcrypt.format import ROLE_DATA, binding_context
from blockcrypt.keys.envelope import new_dek
from blockcrypt.keys.providers import transit as transit_mod
from support.rotationkill import rotate_and_kill
_seq = itertools.count(1)


def _count_rewraps(prov, des_rec, monkeypatch) -> list:
    """The rewrap requests the provider's session sends from now on (a spy on the real client:
    OpenBao refuses to enable an audit device over its API)."""
    adapter = prov.session_for(des_rec).client.adapter
    calls: list[str] = []
    real = adapter.request

    def spy(method, url, *a, **kw):
        if "/rewrap/" in url:
            calls.append(url)
        return real(method, url, *a, **kw)
    monkeypatch.setattr(adapter, "request", spy)
    return calls


def _des(state, bao, tmp_path):
    key = f"batch-{next(_seq)}"
    bao.make_key(key)
    f = tmp_path / f"{key}-identity.json"
    f.write_text(json.dumps(bao.make_role(key, key)))
    f.chmod(0o600)
    des.create(state, "des", transit_mod.key_url(bao.url, "transit", key), identity_file=str(f))
    return key


def _disks_then_rotate(state, bao, key, count, off, reps) -> tuple[list[str], str]:
    """``count`` disks d00, d01, ... on the DES, each with its name written ``reps`` times at
    ``off``; then a new version of the transit key: (the names, the new version's key id)."""
    names = [f"d{i:02d}" for i in range(count)]
    for n in names:
        des.create_disk(state, n, 1 << 20, "des")
        with open_volume(state, n) as v:
            v.write(off, n.encode() * reps)
    bao.root.secrets.transit.rotate_key(key)
    return names, state.keys.get("transit").latest_version(state.catalog.get_des("des"))


def test_rewrap_many_is_one_request_and_a_bad_item_fails_alone(tmp_path, bao, monkeypatch):
    state = State.init(tmp_path / "state")
    key = _des(state, bao, tmp_path)
    prov = state.keys.get("transit")
    ref = state.catalog.get_des("des").active_key
    deks = [new_dek() for _ in range(20)]
    ctxs = [binding_context(os.urandom(16), ROLE_DATA) for _ in deks]
    wrapped = [prov.wrap(ref, d, c) for d, c in zip(deks, ctxs)]
    bao.root.secrets.transit.rotate_key(key)
    to = prov.latest_version(state.catalog.get_des("des"))
    assert to.endswith("/2")
    calls = _count_rewraps(prov, state.catalog.get_des("des"), monkeypatch)
    out = prov.rewrap_many([(w, c, to, None) for w, c in zip(wrapped, ctxs)])
    assert len(calls) == 1
    assert [w.kek_id for w in out] == [to] * 20
    assert [prov.unwrap(w, c) for w, c in zip(out, ctxs)] == deks
    # another disk's context for item 7: the batch is refused, each item retried alone
    items = [(w, c, to, None) for w, c in zip(out, ctxs)]
    items[7] = (out[7], ctxs[8], to, None)
    res = prov.rewrap_many(items)
    assert isinstance(res[7], KeyIntegrityError)
    assert all(not isinstance(r, Exception) and r.kek_id == to for i, r in enumerate(res) if i != 7)
    assert prov.unwrap(res[3], ctxs[3]) == deks[3]
    # the server stops answering: every item is unavailable (the grace path), in one timeout
    bao.pause()
    try:
        t0 = time.monotonic()
        res = prov.rewrap_many([(w, c, to, None) for w, c in zip(out[:5], ctxs[:5])])
        assert all(isinstance(r, KeyUnavailable) for r in res)
        assert time.monotonic() - t0 < 3 * transit_mod.TIMEOUT_S
    finally:
        bao.resume()


def test_des_rotation_in_batches_over_transit(tmp_path, bao, monkeypatch):
    state = State.init(tmp_path / "state")
    key = _des(state, bao, tmp_path)
    names, new = _disks_then_rotate(state, bao, key, 21, 0, 100)
    monkeypatch.setattr(rotation, "REWRAP_BATCH", 8)
    calls = _count_rewraps(state.keys.get("transit"), state.catalog.get_des("des"), monkeypatch)
    r = des.rotate(state, "des", new)
    assert r["rewrapped"] == names
    assert len(calls) == 3      # batches of 8, 8, 5
    for n in names:
        assert read_disk_header(state.catalog.get_disk(n)).layer(ROLE_DATA).kek_id == new
        with open_volume(state, n) as v:
            assert v.read(0, 200) == (n.encode() * 100)[:200]


@pytest.mark.parametrize("target,done", [("rewrap-d08", 6), ("write-1", 6), ("synced-A-1", 12),
                                         ("synced-B-2", 16)])
def test_transit_rotation_sigkilled_in_a_batch(tmp_path, bao, target, done):
    state = State.init(tmp_path / "state")
    key = _des(state, bao, tmp_path)
    old = state.catalog.get_des("des").active_key
    names, new = _disks_then_rotate(state, bao, key, 16, 4096, 64)
    rotate_and_kill(tmp_path, state.path, target, batch=6, what=f"des:des:{new}")
    st = State.open(state.path)
    ids = {n: read_disk_header(st.catalog.get_disk(n)).layer(ROLE_DATA).kek_id for n in names}
    assert set(ids.values()) <= {old, new}
    rewrapped = {n for n, k in ids.items() if k == new}
    assert rewrapped == set(names[:done]), (target, sorted(rewrapped))
    for n in names:   # every disk opens under the version its header names
        with open_volume(st, n) as v:
            assert v.read(4096, 128) == (n.encode() * 64)[:128]
    r = des.rotate(st, "des")      # resumes the rotation the DES still records
    assert r["activeKey"] == new and set(r["rewrapped"]) == set(names) - rewrapped
    assert st.catalog.get_des("des").previous_keys == ()
    for n in names:
        assert read_disk_header(st.catalog.get_disk(n)).layer(ROLE_DATA).kek_id == new
