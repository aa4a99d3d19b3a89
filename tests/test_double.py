"""Double encryption at rest: the format (feature flag, metadata area), the control plane
(two layers, two independent DEKs, types, refusals, rotation, dump-key) on real disk
files and real keys; sectors decrypted with PyNaCl and `cryptography` alone."""
from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockcrypt.control import disks
from blockcrypt.control.disks import open_volume
from blockcrypt.control.rotation import rotate_platform_key
from blockcrypt.errors import BadSize, IntegrityError, UnsupportedFormat
from blockcrypt.format import ROLE_DATA, ROLE_INFRA, read_header
from blockcrypt.format import header as hdr
from blockcrypt.format import layout
from blockcrypt.storage import LocalFileBacking

nacl_bindings = pytest.importorskip("nacl.bindings")

META = layout.AEAD_META_BYTES


def raw(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        b = f.read(n)
    return b + bytes(n - len(b))


def flip(path, off, mask):
    """One bit (mask) of the file at off, flipped in place."""
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ mask]))


def open_sector(aead_key, disk_id, n, c, meta):
    """FORMAT.md's recipe: newer slot (serial seq) first, then the other."""
    slots = [meta[:48], meta[48:]]
    s0, s1 = (struct.unpack_from("<I", s)[0] for s in slots)
    order = [1, 0] if 0 < ((s1 - s0) & 0xFFFFFFFF) < 1 << 31 else [0, 1]
    for i in order:
        slot = slots[i]
        if slot == bytes(48):
            continue
        ad = disk_id + n.to_bytes(8, "little") + bytes([ROLE_INFRA]) + slot[:8]
        try:
            return nacl_bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(c + slot[32:48], ad, slot[8:32],
                                                                            aead_key)
        except Exception:
            continue
    raise ValueError(f"sector {n} does not authenticate")


def xts_open(key, n, data):
    d = Cipher(algorithms.AES(key), modes.XTS(n.to_bytes(16, "little"))).decryptor()
    return d.update(data) + d.finalize()


def test_double_header_needs_the_feature_and_old_readers_refuse(state):
    rec = disks.create(state, "dd", 8 << 20, double=True)
    with LocalFileBacking(rec.path, False) as b:
        h = read_header(b, "dd")
    assert h.required_features & layout.FEATURE_SECTOR_META
    assert [l.role for l in h.layers] == [ROLE_DATA, ROLE_INFRA]
    assert h.layer(ROLE_INFRA).data_alg == "xchacha20-poly1305"
    assert h.layer(ROLE_INFRA).provider == "platform"
    assert h.layer(ROLE_DATA).wrapped_dek != h.layer(ROLE_INFRA).wrapped_dek
    packed = hdr.pack(h, hdr.MAGIC_A)
    assert hdr.unpack(packed, hdr.MAGIC_A) == h
    # the reader of the previous commit (KNOWN_REQUIRED = 0), loaded from git, refuses it
    src = subprocess.run(["git", "show", "cfed38a:blockcrypt/format/header.py"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if src.returncode != 0:
        pytest.skip("no git history here")
    spec = importlib.util.spec_from_loader("blockcrypt.format._old_header", loader=None)
    old = importlib.util.module_from_spec(spec)
    old.__package__ = "blockcrypt.format"
    sys.modules[spec.name] = old  # dataclasses look their module up
    try:
        exec(compile(src.stdout, "old_header.py", "exec"), old.__dict__)
    finally:
        del sys.modules[spec.name]
    assert old.KNOWN_REQUIRED == 0
    with pytest.raises(UnsupportedFormat, match="unknown required feature"):
        old.unpack(packed, old.MAGIC_A)
    # an infrastructure layer without the flag (or the flag without one) is a damaged copy
    with pytest.raises(ValueError):
        hdr.unpack(hdr.pack(h.evolve(required_features=0), hdr.MAGIC_A), hdr.MAGIC_A)
    single = disks.create(state, "s", 8 << 20)
    with LocalFileBacking(single.path, False) as b:
        hs = read_header(b, "s")
    assert hs.required_features == 0
    with pytest.raises(ValueError):
        hdr.unpack(hdr.pack(hs.evolve(required_features=1), hdr.MAGIC_A), hdr.MAGIC_A)


def test_layout_metadata_area_is_fixed_and_survives_resize(state):
    assert layout.META_AREA_OFFSET == 8 << 40
    L = layout.Layout.with_meta(4096)
    assert L.meta_off(0) == layout.META_AREA_OFFSET and L.meta_off(3) == layout.META_AREA_OFFSET + 3 * 96
    assert L.backing_size(1 << 20) == L.backing_size(1 << 40)  # does not depend on the size
    L512 = layout.Layout.with_meta(512)
    # the journal's log lies past the largest table and ends the file; without it, the table does
    assert L512.meta_off(layout.MAX_META_DISK_SIZE // 512) <= L512.journal_off == layout.JOURNAL_AREA_OFFSET
    assert L512.backing_size(0) == layout.JOURNAL_AREA_OFFSET + layout.JOURNAL_BYTES < layout.MAP_AREA_OFFSET
    old = layout.Layout.with_meta(512, journal=False)
    assert old.meta_off(layout.MAX_META_DISK_SIZE // 512) == old.backing_size(0)
    rec = disks.create(state, "g", 4 << 20, double=True)
    data = os.urandom(4 << 20)
    with open_volume(state, "g") as v:
        v.write(0, data)
    before = os.stat(rec.path)
    disks.resize(state, "g", 64 << 20)
    after = os.stat(rec.path)
    assert after.st_size == before.st_size  # the file's apparent size never moves
    assert after.st_blocks * 512 < (16 << 20)  # still sparse
    with open_volume(state, "g") as v:
        assert v.size == 64 << 20
        assert v.read(0, 4 << 20) == data
        assert v.read(4 << 20, 1 << 20) == bytes(1 << 20)
        v.write(60 << 20, b"x" * 4096)
        assert v.read(60 << 20, 4096) == b"x" * 4096
    with pytest.raises(BadSize):
        disks.create(state, "huge", layout.MAX_META_DISK_SIZE + 4096, double=True)
    with pytest.raises(BadSize):
        disks.resize(state, "g", layout.MAX_META_DISK_SIZE + 4096)


@pytest.mark.parametrize("ss", [512, 4096])
def test_dump_key_decrypts_a_sector_with_pynacl_and_cryptography(state, tmp_path, ss):
    rec = disks.create(state, "d", 4 << 20, sector_size=ss, double=True)
    data = os.urandom(5 * ss)
    with open_volume(state, "d") as v:
        v.write(3 * ss, data)
        v.write(4 * ss, data[:ss])  # sector 4 written twice: its second slot
    expect = data[:ss] + data[:ss] + data[2 * ss:]
    key = tmp_path / "k"
    disks.dump_key(state, "d", str(key))
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    keys = key.read_bytes()
    assert len(keys) == 96
    xts_key, aead_key = keys[:64], keys[64:]
    disk_id = bytes.fromhex(rec.disk_id)
    for i in range(5):
        n = 3 + i
        c = raw(rec.path, layout.DATA_OFFSET + n * ss, ss)
        meta = raw(rec.path, layout.META_AREA_OFFSET + n * META, META)
        assert xts_open(xts_key, n, open_sector(aead_key, disk_id, n, c, meta)) == expect[i * ss:(i + 1) * ss]
    # the data area alone is not XTS of the plaintext (the AEAD layer is below)
    assert xts_open(xts_key, 3, raw(rec.path, layout.DATA_OFFSET + 3 * ss, ss)) != data[:ss]


def test_tamper_is_an_integrity_error_for_that_sector_only(state):
    rec = disks.create(state, "t", 1 << 20, double=True)
    with open_volume(state, "t") as v:
        v.write(0, b"\x11" * (1 << 20))
        v.flush()
    flip(rec.path, layout.META_AREA_OFFSET + 7 * META + 32 + 3, 4)  # sector 7's tag
    with open_volume(state, "t") as v:
        with pytest.raises(IntegrityError):
            v.read(7 * 4096, 4096)
        assert v.read(6 * 4096, 4096) == b"\x11" * 4096
        assert v.read(8 * 4096, 4096) == b"\x11" * 4096


def test_types_layers_and_platform_rotation(state):
    s = disks.create(state, "single", 1 << 20)
    d = disks.create(state, "double", 1 << 20, double=True)
    assert s.encryption_type == d.encryption_type == disks.TYPE_PMK  # both keys platform: no CMK type
    data = os.urandom(1 << 20)
    with open_volume(state, "double") as v:
        v.write(0, data)
    with LocalFileBacking(d.path, False) as b:
        h0 = read_header(b, "double")
    assert disks.is_double(h0)
    r = rotate_platform_key(state)
    assert "double" in r["rewrapped"]
    with LocalFileBacking(d.path, False) as b:
        h1 = read_header(b, "double")
    for role in (ROLE_DATA, ROLE_INFRA):  # both platform layers re-wrapped, under the new version
        assert h1.layer(role).kek_id == f"platform/{r['version']}" != h0.layer(role).kek_id
    blocks = os.stat(d.path).st_blocks
    with open_volume(state, "double") as v:
        assert v.read(0, 1 << 20) == data  # readable, not rewritten
    assert os.stat(d.path).st_blocks == blocks
