"""blockcrypt._engine.Volume: the C volume engine through its CPython binding, on real
sparse files in tmp_path.

The data area is checked byte for byte against `cryptography`'s AES-XTS per sector
(tweak = little-endian sector number: dm-crypt aes-xts-plain64), independently of
blockcrypt's own code. Errors are OSError with the engine's errno.
"""
from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

engine = pytest.importorskip("blockcrypt._engine", reason="the native engine is not built")
Volume = engine.Volume

MiB = 1 << 20
DATA_OFF = MiB


def key64(seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(64)


def xts_sector(key: bytes, sector: int, data: bytes, encrypt: bool) -> bytes:
    c = Cipher(algorithms.AES(key), modes.XTS(sector.to_bytes(16, "little")))
    op = c.encryptor() if encrypt else c.decryptor()
    return op.update(data) + op.finalize()


def open_volume(path, size, ss=4096, key=None, **kw):
    if not os.path.exists(path):
        open(path, "wb").close()
    layers = kw.pop("layers", None) or [("aes-xts-plain64", key or key64())]
    return Volume(str(path), size=size, sector_size=ss, layers=layers, **kw)


def raw(path, off, length) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        data = f.read(length)
    return data + bytes(length - len(data))


@pytest.mark.parametrize("ss", [512, 4096])
def test_data_area_is_aes_xts_plain64(tmp_path, ss):
    path = tmp_path / "d.img"
    header = b"H" * DATA_OFF  # whatever the header area holds stays as it is
    path.write_bytes(header)
    key = key64(ss)
    size = 256 * ss
    rng = random.Random(ss)
    plain = bytearray(size)
    with open_volume(path, size, ss, key) as v:
        pos = 0
        while pos < size:   # unaligned pieces, so RMW joins them
            n = min(rng.randrange(1, 3 * ss), size - pos)
            piece = rng.randbytes(n)
            assert v.write(pos, piece) == n
            plain[pos:pos + n] = piece
            pos += n
        v.flush()
        assert v.read(0, size) == plain
    assert raw(path, 0, DATA_OFF) == header
    area = raw(path, DATA_OFF, size)
    for s in range(size // ss):
        ct = area[s * ss:(s + 1) * ss]
        assert xts_sector(key, s, ct, encrypt=False) == plain[s * ss:(s + 1) * ss], f"sector {s}"
        assert ct == xts_sector(key, s, bytes(plain[s * ss:(s + 1) * ss]), encrypt=True)


def test_new_volume_reads_zeros_and_allocates_nothing(tmp_path):
    with open_volume(tmp_path / "z.img", 64 * MiB) as v:
        assert v.read(12345, 3 * MiB) == bytes(3 * MiB)
        assert v.read(64 * MiB - 10, 100) == bytes(10)       # short at the end
        assert v.read(64 * MiB, 10) == b""
        buf = bytearray(b"\xee" * 10000)
        assert v.readinto(5, buf) == 10000 and buf == bytes(10000)
        assert v.blocks_used() == 0
        assert (v.size, v.sector_size, v.read_only, v.gate) == (64 * MiB, 4096, False, None)


@pytest.mark.parametrize("ss", [512, 4096])
def test_unaligned_against_a_bytearray(tmp_path, ss):
    size = 2 * MiB
    model = bytearray(size)
    rng = random.Random(7 + ss)
    with open_volume(tmp_path / "u.img", size, ss) as v:
        for i in range(600):
            off = rng.randrange(size)
            n = rng.choice([1, 2, 15, ss - 1, ss, ss + 1, rng.randrange(1, 5 * ss), rng.randrange(1, 2 * MiB)])
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                want = min(n, size - off)
                assert v.write(off, data) == want
                model[off:off + want] = data[:want]
            else:
                assert v.read(off, n) == model[off:off + n], f"op {i}: read {n}@{off}"
        assert v.read(0, size) == model


def test_discard_and_zero_range_punch_holes(tmp_path):
    path = tmp_path / "h.img"
    size = 16 * MiB
    data = os.urandom(size)
    with open_volume(path, size) as v:
        v.write(0, data)
        v.flush()
        before = v.blocks_used()
        assert before >= size // 512
        v.discard(MiB + 100, 6 * MiB)                 # unaligned edges
        mid = v.blocks_used()
        assert mid <= before - (6 * MiB - 2 * 4096) // 512
        v.zero_range(9 * MiB, 4 * MiB + 1)
        after = v.blocks_used()
        assert after <= mid - 4 * MiB // 512
        want = bytearray(data)
        want[MiB + 100:7 * MiB + 100] = bytes(6 * MiB)
        want[9 * MiB:13 * MiB + 1] = bytes(4 * MiB + 1)
        assert v.read(0, size) == want
    # the whole sectors inside are holes in the backing file
    assert raw(path, DATA_OFF + 2 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert raw(path, DATA_OFF + 9 * MiB, 4 * MiB) == bytes(4 * MiB)
    # the partial edge sectors are rewritten: ciphertext of the kept bytes and zeros
    for s in (MiB // 4096, (7 * MiB + 100) // 4096):
        ct = raw(path, DATA_OFF + s * 4096, 4096)
        assert xts_sector(key64(), s, ct, encrypt=False) == want[s * 4096:(s + 1) * 4096]


def test_resize_and_the_end(tmp_path):
    with open_volume(tmp_path / "r.img", MiB) as v:
        assert v.write(MiB - 10, b"x" * 100) == 10                    # clipped
        with pytest.raises(OSError) as e:
            v.write(MiB, b"x")
        assert e.value.errno == errno.EFBIG
        v.resize(4 * MiB)
        assert v.size == 4 * MiB
        assert v.read(MiB, MiB) == bytes(MiB)
        v.write(3 * MiB, b"y" * 4096)
        v.resize(2 * MiB)                                              # shrink drops sectors
        assert v.read(2 * MiB, 10) == b""
        v.resize(4 * MiB)
        assert v.read(3 * MiB, 4096) == bytes(4096)                    # grown again: zeros
        assert v.read(MiB - 10, 10) == b"x" * 10
        with pytest.raises(OSError) as e:
            v.resize(12345)
        assert e.value.errno == errno.EINVAL


def test_read_only_refuses_writes(tmp_path):
    path = tmp_path / "ro.img"
    with open_volume(path, MiB, key=key64(3)) as v:
        v.write(0, b"keep")
    with open_volume(path, MiB, key=key64(3), read_only=True) as v:
        assert v.read_only
        assert v.read(0, 4) == b"keep"
        for call in (lambda: v.write(0, b"x"), lambda: v.discard(0, 4096), lambda: v.zero_range(0, 1)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EROFS
        assert v.read(0, 4) == b"keep"


def test_bad_arguments(tmp_path):
    path = tmp_path / "b.img"
    open(path, "wb").close()
    with pytest.raises(OSError) as e:
        Volume(str(path), size=MiB, sector_size=4096, layers=[("aes-xts-plain64", b"\x01" * 64)])
    assert e.value.errno == errno.EINVAL                               # equal key halves
    with pytest.raises(OSError) as e:
        Volume(str(path), size=MiB, sector_size=4096, layers=[("aes-xts-plain64", b"short")])
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        Volume(str(path), size=MiB, sector_size=4096, layers=[("rot13", b"")])
    with pytest.raises(OSError) as e:
        Volume(str(path), size=1000, sector_size=512, layers=[("null", b"")])
    assert e.value.errno == errno.EINVAL
    with pytest.raises(FileNotFoundError):
        Volume(str(tmp_path / "missing"), size=MiB, sector_size=4096, layers=[("null", b"")])
    with pytest.raises(ValueError):
        Volume(str(path), size=MiB, sector_size=4096, layers=[("null", b"")], cache="sometimes")
    v = Volume(str(path), size=MiB, sector_size=4096, layers=[("null", b"")])
    with pytest.raises(ValueError):
        v.read(-1, 10)
    with pytest.raises(ValueError):
        v.revoke(0, "no errno")
    v.close()
    v.close()  # idempotent
    with pytest.raises(ValueError):
        v.read(0, 1)


def test_null_layer_stores_plaintext(tmp_path):
    path = tmp_path / "n.img"
    with open_volume(path, MiB, layers=[("null", b"")]) as v:
        v.write(4096 + 3, b"plain text")
    assert raw(path, DATA_OFF + 4096 + 3, 10) == b"plain text"


def test_revoke_fails_io_with_the_errno_and_set_layers_restores(tmp_path):
    key = key64(9)
    size = 8 * MiB
    data = os.urandom(size)
    with open_volume(tmp_path / "g.img", size, key=key) as v:
        v.write(0, data)
        stop = threading.Event()
        errors, oks = [], []

        def reader(seed):
            rng = random.Random(seed)
            while not stop.is_set():
                off = rng.randrange(size - 65536)
                try:
                    got = v.read(off, 65536)
                    assert got == data[off:off + 65536]
                    oks.append(1)
                except OSError as e:
                    errors.append(e.errno)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        v.revoke(errno.EKEYREVOKED, "key k1 disabled in vault v1")
        for _ in range(20):   # after revoke returned, every request fails
            with pytest.raises(OSError) as e:
                v.read(0, 10)
            assert e.value.errno == errno.EKEYREVOKED
        time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        assert oks and errors and set(errors) == {errno.EKEYREVOKED}
        assert v.gate == (errno.EKEYREVOKED, "key k1 disabled in vault v1")
        for call in (lambda: v.write(0, b"x"), lambda: v.discard(0, 4096), v.flush):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EKEYREVOKED
        with pytest.raises(OSError):   # a bad key does not reopen the gate
            v.set_layers([("aes-xts-plain64", b"\x02" * 64)])
        assert v.gate is not None
        v.set_layers([("aes-xts-plain64", key)])
        assert v.gate is None
        assert v.read(0, size) == data


def test_stats_count_requests(tmp_path):
    with open_volume(tmp_path / "s.img", MiB) as v:
        for i in range(5):
            v.write(i * 7000, b"a" * 1000)
        for _ in range(3):
            v.read(100, 65536)
        with pytest.raises(OSError):
            v.write(MiB, b"x")
        v.discard(0, 4096)
        v.zero_range(0, 4096)
        v.flush()
        st = v.stats()
    assert {k: st[k] for k in ("reads", "writes", "discards", "flushes", "errors", "bytes_read",
                               "bytes_written")} == {"reads": 3, "writes": 6, "discards": 2, "flushes": 1,
                                                     "errors": 1, "bytes_read": 3 * 65536, "bytes_written": 5000}
    assert len(st["lat_us_hist"]) == 32 and sum(st["lat_us_hist"]) == 12


def test_threads_on_disjoint_ranges(tmp_path):
    size = 32 * MiB
    nthreads = 8
    span = size // nthreads
    with open_volume(tmp_path / "t.img", size) as v:
        failures = []

        def worker(k):
            rng = random.Random(k)
            base = k * span
            mine = bytearray(span)
            for _ in range(150):
                off = rng.randrange(span - 1)
                n = min(rng.randrange(1, 70000), span - off)
                if rng.random() < 0.6:
                    d = rng.randbytes(n)
                    v.write(base + off, d)
                    mine[off:off + n] = d
                elif v.read(base + off, n) != mine[off:off + n]:
                    failures.append((k, off, n))
            if v.read(base, span) != mine:
                failures.append((k, "final"))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []


def test_engine_calls_release_the_gil(tmp_path):
    """While one thread is inside a long engine read, another thread runs Python code."""
    size = 192 * MiB
    with open_volume(tmp_path / "gil.img", size) as v:
        buf = bytearray(size)
        span = {}

        def long_read():
            span["start"] = time.monotonic()
            v.readinto(0, buf)
            span["end"] = time.monotonic()

        t = threading.Thread(target=long_read)
        ticks = []
        t.start()
        while t.is_alive():
            ticks.append(time.monotonic())
        t.join()
    inside = [x for x in ticks if span["start"] < x < span["end"]]
    assert span["end"] - span["start"] > 0.01, "the read was too quick to tell"
    assert len(inside) > 100, f"{len(inside)} ticks during a {span['end'] - span['start']:.3f} s engine call"


def test_close_while_other_threads_do_io(tmp_path):
    v = open_volume(tmp_path / "c.img", 16 * MiB)
    v.write(0, b"z" * MiB)
    results = []

    def worker():
        try:
            for _ in range(5000):
                v.read(0, MiB)
            results.append("done")
        except ValueError:
            results.append("closed")   # the Volume was closed under us: a clean error

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.02)
    v.close()
    for t in threads:
        t.join()
    assert len(results) == 4 and "closed" in results


def test_cache_none_uses_o_direct(tmp_path):
    path = tmp_path / "dio.img"
    data = os.urandom(2 * MiB)
    try:
        v = open_volume(path, 4 * MiB, cache="none")
    except OSError as e:   # a file system without O_DIRECT (old tmpfs)
        pytest.skip(f"no O_DIRECT on {tmp_path}: {e}")
    with v:
        assert v.write(4096, data) == len(data)
        assert v.write(3, b"odd") == 3               # unaligned: through the buffered path
        v.flush()
        assert v.read(4096, len(data)) == data
        assert v.read(3, 3) == b"odd"


def test_session_is_registered_when_built_in():
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(here, "..", "..", "native", "py_session.c")):
        assert hasattr(engine, "Session"), "py_session.c exists but the module has no Session"
