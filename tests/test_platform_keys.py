"""Platform-managed keys: store permissions, wrap binding, rotation (also interrupted at every step)."""
import json
import os

import pytest

from blockcrypt.control import disks
from blockcrypt.keys import envelope
from blockcrypt.control import rotation
from blockcrypt.errors import KeyIntegrityError, KeyStoreError, StateError
from blockcrypt.format import binding_context
from blockcrypt.keys.providers.platform import PlatformKeyStore
from blockcrypt.control.state import State
from blockcrypt.control.disks import open_volume


def test_store_created_private(state):
    keys = state.path / "keys"
    assert oct(os.stat(keys).st_mode & 0o777) == "0o700"
    assert oct(os.stat(keys / "platform.json").st_mode & 0o777) == "0o600"
    assert oct(os.stat(state.path).st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("target,mode", [("keys/platform.json", 0o644), ("keys/platform.json", 0o640),
                                         ("keys", 0o755)])
def test_loose_permissions_refused(state, target, mode):
    os.chmod(state.path / target, mode)
    with pytest.raises(KeyStoreError, match="too open"):
        State.open(state.path)


def test_missing_store_refused(state):
    os.unlink(state.path / "keys" / "platform.json")
    with pytest.raises(KeyStoreError, match="missing"):
        State.open(state.path)


def test_damaged_store_refused(state):
    (state.path / "keys" / "platform.json").write_text("{not json")
    with pytest.raises(KeyStoreError, match="damaged"):
        state.keys.get("platform").wrap("platform/latest", os.urandom(64), b"ctx")


def test_missing_state_dir(tmp_path):
    with pytest.raises(StateError, match="does not exist"):
        State.open(tmp_path / "nope")


def test_wrap_binds_context_and_version(state):
    p = state.keys.get("platform")
    dek = os.urandom(64)
    wk = p.wrap(p.default_ref(), dek, b"ctx-a")
    assert wk.kek_id == "platform/1" and dek not in wk.blob
    assert p.unwrap(wk, b"ctx-a") == dek
    with pytest.raises(KeyIntegrityError):
        p.unwrap(wk, b"ctx-b")
    tampered = wk.__class__(wk.provider, wk.kek_id, wk.algorithm, wk.blob[:-1] + bytes([wk.blob[-1] ^ 1]))
    with pytest.raises(KeyIntegrityError):
        p.unwrap(tampered, b"ctx-a")


def test_key_bytes_never_in_messages(state):
    store = json.loads((state.path / "keys" / "platform.json").read_text())
    key_b64 = store["versions"][0]["key"]
    p = state.keys.get("platform")
    wk = p.wrap(p.default_ref(), os.urandom(64), b"x")
    try:
        p.unwrap(wk, b"y")
    except KeyIntegrityError as e:
        assert key_b64 not in str(e) and "platform/1" in str(e)


def _contents(state, names):
    out = {}
    for n in names:
        with open_volume(state, n) as v:
            out[n] = v.read(0, 3 * 4096 + 7)
    return out


def _fill(state, names):
    for n in names:
        disks.create(state, n, 4 << 20)
        with open_volume(state, n) as v:
            v.write(100, os.urandom(3 * 4096))


def test_rotation_rewraps_without_rewriting_data(state):
    names = ["a", "b", "c"]
    _fill(state, names)
    before = _contents(state, names)
    data_before = {n: open(state.catalog.get_disk(n).path, "rb").read()[1 << 20:] for n in names}
    r = rotation.rotate_platform_key(state)
    assert r["version"] == 2 and sorted(r["rewrapped"]) == names and r["retired"] == [1]
    for n in names:
        h = disks.read_disk_header(state.catalog.get_disk(n))
        assert h.layers[0].kek_id == "platform/2"
        assert open(state.catalog.get_disk(n).path, "rb").read()[1 << 20:] == data_before[n]
    assert _contents(state, names) == before
    assert [v["version"] for v in PlatformKeyStore(state.path / "keys").versions()] == [2]


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", [("new-version", None), ("rewrap", "a"), ("rewrap", "b"),
                                      ("rewrap", "c"), ("retire", None)])
def test_rotation_interrupted_at_each_step(state, crash_at):
    names = ["a", "b", "c"]
    _fill(state, names)
    before = _contents(state, names)

    def on_step(step, detail):
        if (step, detail) == crash_at:
            raise Crash

    with pytest.raises(Crash):
        rotation.rotate_platform_key(state, on_step=on_step)
    # every disk opens, whatever the point of the crash
    assert _contents(state, names) == before
    # running it again finishes the same rotation (no second new version)
    r = rotation.rotate_platform_key(state)
    assert r["version"] == 2
    for n in names:
        assert disks.read_disk_header(state.catalog.get_disk(n)).layers[0].kek_id == "platform/2"
    assert [v["version"] for v in PlatformKeyStore(state.path / "keys").versions()] == [2]
    assert PlatformKeyStore(state.path / "keys").pending_rotation() is None
    assert _contents(state, names) == before


def test_rotation_crash_inside_header_write(state):
    """Copy A written under the new key, crash before copy B: the disk still opens."""
    from blockcrypt.format import header as hdr
    from blockcrypt.format import headerio, layout
    from blockcrypt.storage import LocalFileBacking
    _fill(state, ["a"])
    before = _contents(state, ["a"])
    store = PlatformKeyStore(state.path / "keys")
    store.begin_rotation()
    rec = state.catalog.get_disk("a")
    fd = LocalFileBacking(rec.path)
    h = headerio.read_header(fd)
    p = state.keys.get("platform")
    wk = p.rewrap(envelope.wrapped_of(h.layers[0]), binding_context(h.disk_id, 1), "platform/2")
    newer = h.with_layer(envelope.layer_from(1, wk, h.disk_id)).evolve(seqno=h.seqno + 1)
    raw = hdr.pack(newer, hdr.MAGIC_A)
    os.pwrite(fd.fd, raw[:60], layout.COPY_A_OFF)  # torn copy A
    fd.close()
    assert _contents(state, ["a"]) == before
    rotation.rotate_platform_key(state)
    assert _contents(state, ["a"]) == before
