"""Issue 14 leftovers, against a real `bao server -dev`: an AppRole token that outlives half its
TTL is renewed, one past its max TTL is replaced by a fresh login, one revoked on the server is
replaced on the next call; and a DES with --auto-rotate follows the transit key's newest version
in a running mount, with I/O going on."""
from __future__ import annotations

import itertools
import json
import mmap
import os
import time

import pytest

from blockcrypt.control import des
from blockcrypt.control.disks import read_disk_header
from blockcrypt.control.state import State
from blockcrypt.format import ROLE_DATA, binding_context
from blockcrypt.keys.envelope import new_dek
from blockcrypt.keys.providers.transit import key_url
from support.baoproc import policy_text
from support.fusehelpers import Mount

_seq = itertools.count(1)


def _des(state, bao, tmp_path, *, token_ttl="1h", token_max_ttl="24h", auto_rotate=False):
    key = f"life-{next(_seq)}"
    bao.make_key(key)
    bao.root.sys.create_or_update_policy(f"des-{key}", policy_text("transit", key))
    bao.root.auth.approle.create_or_update_approle(key, token_policies=[f"des-{key}"], token_ttl=token_ttl,
                                                   token_max_ttl=token_max_ttl)
    ident = {"name": key, "role_id": bao.root.auth.approle.read_role_id(key)["data"]["role_id"],
             "secret_id": bao.root.auth.approle.generate_secret_id(key)["data"]["secret_id"]}
    f = tmp_path / f"{key}.json"
    f.write_text(json.dumps(ident))
    f.chmod(0o600)
    d = des.create(state, "des", key_url(bao.url, "transit", key), identity_file=str(f), auto_rotate=auto_rotate)
    return key, d


def _until(pred, timeout_s):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def test_token_renewed_past_half_its_ttl_and_replaced_past_its_max(tmp_path, bao):
    state = State.init(tmp_path / "state")
    _, d = _des(state, bao, tmp_path, token_ttl="2s", token_max_ttl="5s")
    prov = state.keys.get("transit")
    ctx = binding_context(os.urandom(16), ROLE_DATA)
    dek = new_dek()
    w = prov.wrap(d.active_key, dek, ctx)
    s = prov.session_for(d)
    first_token, first_expiry = s.client.token, s.expires_at
    time.sleep(1.3)                      # past half the 2 s TTL, before its end: renewed in place
    assert prov.unwrap(w, ctx) == dek
    assert s.client.token == first_token and s.expires_at > first_expiry
    time.sleep(max(0.0, s.expires_at - time.monotonic()) + 0.5)   # expired: a fresh login
    assert prov.unwrap(w, ctx) == dek
    assert s.client.token != first_token
    # revoked on the server: the call is refused once, then logs in again and succeeds
    bao.root.auth.token.revoke(s.client.token)
    revoked = s.client.token
    assert prov.unwrap(w, ctx) == dek
    assert s.client.token != revoked


def test_auto_rotation_follows_transit_in_a_running_mount(tmp_path, bao):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is absent")
    state = State.init(tmp_path / "state")
    state.catalog.set_setting("auto_rotate_interval", "1")
    state.catalog.set_setting("key_check_interval", "0.5")
    key, d = _des(state, bao, tmp_path, auto_rotate=True)
    des.create_disk(state, "a1", 8 << 20, "des")
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()
    try:
        fd = os.open(m.disk("a1"), os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            buf.write(os.urandom(4096))
            os.pwritev(fd, [buf], 1 << 20)
            old = read_disk_header(state.catalog.get_disk("a1")).layer(ROLE_DATA).kek_id
            assert old.endswith("/1")
            bao.root.secrets.transit.rotate_key(key)
            want = key_url(bao.url, "transit", key, 2)
            t = _until(lambda: read_disk_header(state.catalog.get_disk("a1")).layer(ROLE_DATA).kek_id == want, 15)
            assert t is not None, "the mount daemon did not follow the newest transit version"
            assert state.catalog.get_des("des").active_key == want
            got = mmap.mmap(-1, 4096)
            assert os.preadv(fd, [got], 1 << 20) == 4096 and got[:] == buf[:]
            os.pwritev(fd, [buf], 2 << 20)
        finally:
            os.close(fd)
    finally:
        m.stop()
    # remounted, the disk opens under the new version with its data
    m = Mount(state, mp).start()
    try:
        with open(m.disk("a1"), "rb") as f:
            f.seek(1 << 20)
            assert f.read(4096) == buf[:]
    finally:
        m.stop()
