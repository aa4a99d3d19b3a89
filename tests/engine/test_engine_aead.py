"""blockcrypt._engine.Volume with the infrastructure layer of double encryption
("xchacha20-poly1305", key32, disk_id16) under the customer layer (AES-256-XTS).

A stored sector is opened with PyNaCl (libsodium's one-shot XChaCha20-Poly1305) and then
`cryptography`'s AES-XTS, from the documented slot layout and associated data alone
(docs/FORMAT.md); tampering answers EBADMSG for exactly that sector.
"""
from __future__ import annotations

import errno
import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

engine = pytest.importorskip("blockcrypt._engine", reason="the native engine is not built")
nacl_bindings = pytest.importorskip("nacl.bindings")

MiB = 1 << 20
DATA_OFF = MiB
META_OFF = 256 * MiB
META = 96
SLOT = 48
ROLE_INFRA = 2


def raw(path, off, length) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        data = f.read(length)
    return data + bytes(length - len(data))


def flip(path, off, mask=0x01):
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ mask]))


def open_sector(aead_key: bytes, disk_id: bytes, sector: int, ciphertext: bytes, meta: bytes) -> bytes:
    """Decrypt one stored sector exactly as FORMAT.md tells a user: newer slot first."""
    slots = [meta[:SLOT], meta[SLOT:]]
    seqs = [struct.unpack_from("<I", s)[0] for s in slots]
    diff = (seqs[1] - seqs[0]) & 0xFFFFFFFF  # serial arithmetic: slot 1 is newer if 0 < diff < 2^31
    order = [1, 0] if 0 < diff < 1 << 31 else [0, 1]
    for i in order:
        slot = slots[i]
        if slot == bytes(SLOT):
            continue
        ad = disk_id + sector.to_bytes(8, "little") + bytes([ROLE_INFRA]) + slot[:8]
        nonce, tag = slot[8:32], slot[32:48]
        try:
            return nacl_bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext + tag, ad, nonce, aead_key)
        except Exception:
            continue
    raise ValueError(f"sector {sector}: no slot authenticates it")


def xts_decrypt(key: bytes, sector: int, data: bytes) -> bytes:
    d = Cipher(algorithms.AES(key), modes.XTS(sector.to_bytes(16, "little"))).decryptor()
    return d.update(data) + d.finalize()


def make(tmp_path, ss, *, disk_id=None, seed=1):
    rng = random.Random(seed)
    xts_key, aead_key = rng.randbytes(64), rng.randbytes(32)
    disk_id = disk_id or rng.randbytes(16)
    path = tmp_path / "double.img"
    path.write_bytes(b"")
    layers = [("aes-xts-plain64", xts_key), ("xchacha20-poly1305", aead_key, disk_id)]
    return path, xts_key, aead_key, disk_id, layers


@pytest.mark.parametrize("ss", [512, 4096])
def test_stored_sector_opens_with_pynacl_then_cryptography(tmp_path, ss):
    path, xts_key, aead_key, disk_id, layers = make(tmp_path, ss, seed=ss)
    size = 64 * ss
    plain = bytearray(random.Random(7).randbytes(size))
    with engine.Volume(str(path), size=size, sector_size=ss, meta_off=META_OFF, layers=layers) as v:
        v.write(0, bytes(plain))
        new = random.Random(8).randbytes(3 * ss + 5)
        v.write(10 * ss + 3, new)  # a second write (the other slot) and RMW of the edges
        plain[10 * ss + 3:10 * ss + 3 + len(new)] = new
        assert v.read(0, size) == bytes(plain)
        v.flush()
    for s in range(64):
        c = raw(path, DATA_OFF + s * ss, ss)
        meta = raw(path, META_OFF + s * META, META)
        inner = open_sector(aead_key, disk_id, s, c, meta)
        assert xts_decrypt(xts_key, s, inner) == bytes(plain[s * ss:(s + 1) * ss]), s
    # not the XTS ciphertext alone: the AEAD layer is really below it
    assert raw(path, DATA_OFF, ss) != bytes(xts_decrypt(xts_key, 0, bytes(ss)))


@pytest.mark.parametrize("where", ["data", "nonce", "tag"])
def test_flipped_bit_fails_exactly_that_sector(tmp_path, where):
    ss = 4096
    path, _, _, _, layers = make(tmp_path, ss)
    size = 16 * ss
    data = random.Random(3).randbytes(size)
    with engine.Volume(str(path), size=size, sector_size=ss, meta_off=META_OFF, layers=layers) as v:
        v.write(0, data)
        v.flush()
        off = {"data": DATA_OFF + 5 * ss + 1234, "nonce": META_OFF + 5 * META + 8 + 3,
               "tag": META_OFF + 5 * META + 32 + 7}[where]
        flip(path, off, 0x40)
        with pytest.raises(OSError) as e:
            v.read(5 * ss, ss)
        assert e.value.errno == errno.EBADMSG
        assert v.stats()["integrity_errors"] == 1
        assert v.read(4 * ss, ss) == data[4 * ss:5 * ss]
        assert v.read(6 * ss, ss) == data[6 * ss:7 * ss]
        flip(path, off, 0x40)
        assert v.read(5 * ss, ss) == data[5 * ss:6 * ss]


def test_sector_from_another_disk_fails(tmp_path):
    ss = 4096
    path, xts_key, aead_key, disk_id, layers = make(tmp_path, ss)
    other = tmp_path / "other.img"
    other.write_bytes(b"")
    other_layers = [layers[0], ("xchacha20-poly1305", aead_key, bytes(16))]  # same keys, other disk id
    size = 8 * ss
    with engine.Volume(str(path), size=size, sector_size=ss, meta_off=META_OFF, layers=layers) as v, \
            engine.Volume(str(other), size=size, sector_size=ss, meta_off=META_OFF, layers=other_layers) as w:
        v.write(0, bytes([1]) * size)
        w.write(0, bytes([2]) * size)
        v.flush(), w.flush()
        with open(path, "r+b") as f:
            f.seek(DATA_OFF + 2 * ss)
            f.write(raw(other, DATA_OFF + 2 * ss, ss))
            f.seek(META_OFF + 2 * META)
            f.write(raw(other, META_OFF + 2 * META, META))
        with pytest.raises(OSError) as e:
            v.read(2 * ss, ss)
        assert e.value.errno == errno.EBADMSG
        assert v.read(3 * ss, ss) == bytes([1]) * ss


def test_holes_and_discard(tmp_path):
    ss = 4096
    path, _, _, _, layers = make(tmp_path, ss)
    size = 64 * ss
    with engine.Volume(str(path), size=size, sector_size=ss, meta_off=META_OFF, layers=layers) as v:
        assert v.read(0, size) == bytes(size)
        v.write(0, b"\xab" * size)
        v.discard(8 * ss, 32 * ss)
        v.flush()
        assert v.read(0, size) == b"\xab" * (8 * ss) + bytes(32 * ss) + b"\xab" * (24 * ss)
    assert raw(path, DATA_OFF + 8 * ss, 32 * ss) == bytes(32 * ss)
    assert raw(path, META_OFF + 8 * META, 32 * META) == bytes(32 * META)


def test_bad_layer_tuples_are_refused(tmp_path):
    path = tmp_path / "x.img"
    path.write_bytes(b"")
    kw = dict(size=4096 * 4, sector_size=4096, meta_off=META_OFF)
    with pytest.raises(ValueError):
        engine.Volume(str(path), layers=[("xchacha20-poly1305", bytes(32))], **kw)  # no disk id
    with pytest.raises(ValueError):
        engine.Volume(str(path), layers=[("xchacha20-poly1305", bytes(32), bytes(15))], **kw)
    with pytest.raises(OSError) as e:
        engine.Volume(str(path), layers=[("xchacha20-poly1305", bytes(31), bytes(16))], **kw)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(TypeError):
        engine.Volume(str(path), layers=[("aes-xts-plain64", os.urandom(64), bytes(16))], **kw)
    with pytest.raises(OSError):  # the AEAD layer must be innermost
        engine.Volume(str(path), layers=[("xchacha20-poly1305", bytes(32), bytes(16)),
                                         ("aes-xts-plain64", os.urandom(64))], **kw)
