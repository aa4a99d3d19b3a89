"""Disk format v1: header round trip, two copies, corruption and recovery, dm-crypt compatibility."""
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockcrypt.control import disks
from blockcrypt.errors import CorruptHeader, UnsupportedFormat
from blockcrypt.format import header as hdr
from blockcrypt.format import headerio, layout, roles
from blockcrypt.storage import LocalFileBacking
from blockcrypt.format import header_copy_state, read_header, sector_span
from blockcrypt.control.disks import open_volume


def _fd(rec, writable=True):
    return LocalFileBacking(rec.path, writable)


def test_header_roundtrip():
    h = hdr.Header(disk_id=hdr.Header.new_id(), name="d", size=1 << 30, sector_size=512,
                   layers=(hdr.Layer(1, "platform", "platform/7", "A256GCM", "aes-xts-plain64",
                                     b"w" * 92, roles.binding_digest(b"x" * 16, 1)),), seqno=5)
    raw = hdr.pack(h, hdr.MAGIC_A)
    assert hdr.unpack(raw, hdr.MAGIC_A) == h
    with pytest.raises(ValueError):
        hdr.unpack(raw, hdr.MAGIC_B)  # copies carry different magics


def test_overlay_header_roundtrip_and_binding_to_the_family():
    fam, fid, parent, src = (bytes([i]) * 16 for i in (1, 2, 3, 4))
    h = hdr.Header(disk_id=b"\x09" * 16, name="s", size=1 << 30, sector_size=4096, kind="snapshot",
                   read_only=True, required_features=layout.FEATURE_OVERLAY, family_id=fam, file_id=fid,
                   parent_id=parent, map_chunks=16384, chunk_bytes=layout.CHUNK_BYTES, source_id=src)
    back = hdr.unpack(hdr.pack(h, hdr.MAGIC_A), hdr.MAGIC_A)
    assert back == h and back.binding_id == fam and back.own_file_id == fid
    first = h.evolve(parent_id=None, source_id=None)
    assert hdr.unpack(hdr.pack(first, hdr.MAGIC_B), hdr.MAGIC_B).parent_id is None
    plain = hdr.Header(disk_id=b"\x08" * 16, name="d", size=4096, sector_size=4096)
    assert plain.binding_id == plain.disk_id and not plain.overlay
    assert layout.Layout.of(h).backing_size(h.size) == layout.MAP_AREA_OFFSET + layout.MAX_MAP_BYTES
    with pytest.raises(ValueError, match="chunk size"):
        hdr.unpack(hdr.pack(h.evolve(chunk_bytes=1000), hdr.MAGIC_A), hdr.MAGIC_A)


def test_every_flipped_byte_is_detected():
    h = hdr.Header(disk_id=b"\1" * 16, name="d", size=4096, sector_size=4096)
    raw = bytearray(hdr.pack(h, hdr.MAGIC_A))
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x40
        with pytest.raises((ValueError, UnsupportedFormat)):
            hdr.unpack(bytes(bad), hdr.MAGIC_A)


def test_new_disk_is_sparse_and_reads_zeros(state):
    rec = disks.create(state, "d", 64 << 20)
    st = os.stat(rec.path)
    assert st.st_size == layout.DATA_OFFSET + (64 << 20)
    assert st.st_blocks * 512 <= 256 * 1024  # only the two header copies are allocated
    with open_volume(state, "d") as v:
        assert v.read(0, 1 << 20) == bytes(1 << 20)
        assert v.read((64 << 20) - 10, 100) == bytes(10)


def test_data_area_is_plain_aes_xts_plain64(state, tmp_path):
    """A holder of the DEK decrypts the data area with `cryptography` alone (dm-crypt's layout)."""
    for ss in (512, 4096):
        name = f"d{ss}"
        rec = disks.create(state, name, 4 << 20, sector_size=ss)
        data = os.urandom(3 * ss)
        with open_volume(state, name) as v:
            v.write(5 * ss, data)
        key = tmp_path / f"{name}.key"
        disks.dump_key(state, name, str(key))
        assert oct(os.stat(key).st_mode & 0o777) == "0o600"
        dek = key.read_bytes()
        raw = open(rec.path, "rb").read()
        assert data not in raw
        for i in range(3):
            sector_no = 5 + i
            ct = raw[layout.DATA_OFFSET + sector_no * ss:layout.DATA_OFFSET + (sector_no + 1) * ss]
            dec = Cipher(algorithms.AES(dek), modes.XTS(sector_no.to_bytes(16, "little"))).decryptor()
            assert dec.update(ct) + dec.finalize() == data[i * ss:(i + 1) * ss]


def test_one_damaged_copy_is_recovered(state):
    rec = disks.create(state, "d", 1 << 20)
    with open_volume(state, "d") as v:
        v.write(0, b"keep me" * 100)
    for off in (layout.COPY_A_OFF, layout.COPY_B_OFF):
        fd = _fd(rec)
        os.pwrite(fd.fd, os.urandom(200), off + 40)  # scribble over one copy
        assert None in header_copy_state(fd).values()
        fd.close()
        with open_volume(state, "d") as v:  # opens from the other copy and repairs
            assert v.read(0, 700) == b"keep me" * 100
        fd = _fd(rec)
        assert None not in header_copy_state(fd).values()
        fd.close()


def test_both_copies_damaged_is_corrupt_and_other_disks_work(state):
    rec = disks.create(state, "bad", 1 << 20)
    disks.create(state, "good", 1 << 20)
    fd = _fd(rec)
    os.pwrite(fd.fd, bytes(100), layout.COPY_A_OFF)
    os.pwrite(fd.fd, bytes(100), layout.COPY_B_OFF)
    fd.close()
    with pytest.raises(CorruptHeader, match="both header copies are damaged"):
        open_volume(state, "bad")
    with open_volume(state, "good") as v:
        v.write(0, b"x")
        assert v.read(0, 1) == b"x"


def test_torn_write_of_copy_a_falls_back_to_b(state):
    """A crash while copy A is being written (torn A) leaves copy B, the previous header."""
    rec = disks.create(state, "d", 1 << 20)
    disks.resize(state, "d", 2 << 20)
    fd = _fd(rec)
    good = read_header(fd)
    newer = good.evolve(size=3 << 20, seqno=good.seqno + 1)
    raw = hdr.pack(newer, hdr.MAGIC_A)
    os.pwrite(fd.fd, raw[: len(raw) // 2], layout.COPY_A_OFF)  # torn
    assert read_header(fd).size == 2 << 20
    # a crash after A but before B: A is newer and wins
    headerio._write_copy(fd, newer, hdr.MAGIC_A, layout.COPY_A_OFF)
    assert read_header(fd).size == 3 << 20
    fd.close()


def test_unknown_required_feature_refuses(state):
    rec = disks.create(state, "d", 1 << 20)
    fd = _fd(rec)
    h = read_header(fd)
    for magic, off in ((hdr.MAGIC_A, layout.COPY_A_OFF), (hdr.MAGIC_B, layout.COPY_B_OFF)):
        os.pwrite(fd.fd, hdr.pack(h.evolve(required_features=1 << 40), magic), off)
    fd.close()
    with pytest.raises(UnsupportedFormat, match="unknown required feature"):
        open_volume(state, "d")


def test_unknown_compat_feature_is_ignored(state):
    rec = disks.create(state, "d", 1 << 20)
    fd = _fd(rec)
    h = read_header(fd)
    os.pwrite(fd.fd, hdr.pack(h.evolve(compat_features=1 << 40, seqno=h.seqno + 1), hdr.MAGIC_A), 0)
    fd.close()
    open_volume(state, "d").close()


def test_wrapped_key_moved_to_another_disk_does_not_unwrap(state):
    a = disks.create(state, "a", 1 << 20)
    b = disks.create(state, "b", 1 << 20)
    fa, fb = _fd(a), _fd(b)
    ha, hb = read_header(fa), read_header(fb)
    # graft a's layer (wrapped DEK and binding) onto b
    headerio.write_header(fb, hb.evolve(layers=ha.layers))
    fa.close()
    fb.close()
    with pytest.raises(CorruptHeader, match="bound to another disk"):
        open_volume(state, "b")
    # and with b's binding digest but a's blob, the AEAD refuses
    fb = _fd(b)
    layer = ha.layers[0]
    forged = hdr.Layer(layer.role, layer.provider, layer.kek_id, layer.wrap_alg, layer.data_alg,
                       layer.wrapped_dek, roles.binding_digest(hb.disk_id, 1))
    headerio.write_header(fb, read_header(fb).evolve(layers=(forged,)))
    fb.close()
    from blockcrypt.errors import KeyIntegrityError
    with pytest.raises(KeyIntegrityError):
        open_volume(state, "b")


@pytest.mark.parametrize("off,length,ss,expect", [
    (0, 4096, 4096, (0, 1)), (1, 1, 4096, (0, 1)), (4095, 2, 4096, (0, 2)),
    (512, 512, 512, (1, 1)), (8192, 0, 4096, (2, 0)),
])
def test_sector_span(off, length, ss, expect):
    assert sector_span(off, length, ss) == expect


def test_header_struct_layout_is_stable():
    # the fixed part is documented byte by byte in docs/FORMAT.md
    assert hdr._FIXED.size == 84
    assert struct.calcsize("<8sHHIQQQ16sQIIQBBH") == 84
