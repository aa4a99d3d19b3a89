"""The engine's ephemeral XTS key (``("aes-xts-plain64", None)``): drawn inside the engine,
never visible to Python, gone with the volume; what it wrote is unreadable afterwards."""
from __future__ import annotations

import os

import pytest

from blockcrypt import _engine

SS = 4096
SIZE = 64 * SS


def _vol(path, layers):
    return _engine.Volume(str(path), size=SIZE, sector_size=SS, data_off=0, layers=layers)


def test_round_trip_and_only_ciphertext_in_the_file(tmp_path):
    p = tmp_path / "t.img"
    p.write_bytes(b"")
    os.truncate(p, SIZE)
    marker = b"EPHEMERAL-MARKER-" + os.urandom(8).hex().encode()
    data = (marker * (SS // len(marker) + 1))[:SS]
    with _vol(p, [("aes-xts-plain64", None)]) as v:
        assert v.read(5 * SS, SS) == bytes(SS)  # a new temp disk reads as zeros (holes)
        v.write(5 * SS, data)
        v.write(9 * SS + 100, marker)  # unaligned: read-modify-write under the same key
        assert v.read(5 * SS, SS) == data
        assert v.read(9 * SS + 100, len(marker)) == marker
        v.flush()
    raw = p.read_bytes()
    assert marker not in raw
    assert raw[5 * SS:6 * SS] != bytes(SS)  # something was written: ciphertext
    # a new volume on the same file has another key: the old sectors decrypt to noise
    with _vol(p, [("aes-xts-plain64", None)]) as v2:
        assert v2.read(5 * SS, SS) != data
        assert marker not in v2.read(0, SIZE)


def test_two_ephemeral_volumes_have_different_keys(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        p.write_bytes(b"")
        os.truncate(p, SIZE)
    block = os.urandom(SS)
    with _vol(a, [("aes-xts-plain64", None)]) as va, _vol(b, [("aes-xts-plain64", None)]) as vb:
        va.write(0, block)
        vb.write(0, block)
        va.flush()
        vb.flush()
    assert a.read_bytes()[:SS] != b.read_bytes()[:SS]


def test_null_layer_stores_plain_sectors(tmp_path):
    p = tmp_path / "n.img"
    p.write_bytes(b"")
    os.truncate(p, SIZE)
    block = os.urandom(SS)
    with _vol(p, [("null", b"")]) as v:
        v.write(3 * SS, block)
        v.flush()
    assert p.read_bytes()[3 * SS:4 * SS] == block


def test_a_key_of_the_wrong_type_is_refused(tmp_path):
    p = tmp_path / "x.img"
    p.write_bytes(b"")
    os.truncate(p, SIZE)
    with pytest.raises(TypeError):
        _vol(p, [("aes-xts-plain64", 42)])
