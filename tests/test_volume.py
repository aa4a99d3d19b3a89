"""Volume: any range, read-modify-write, holes, discard, threads against a plaintext model."""
import os
import random
import threading

import pytest

from blockcrypt.control import disks
from blockcrypt.errors import OutOfRange, ReadOnly
from blockcrypt.control.disks import open_layers, open_volume


@pytest.mark.parametrize("ss", [512, 4096])
def test_random_ranges_match_model(state, ss):
    size = 1 << 20
    disks.create(state, "d", size, sector_size=ss)
    model = bytearray(size)
    rng = random.Random(ss)
    with open_volume(state, "d") as v:
        for _ in range(400):
            off = rng.randrange(size)
            n = rng.randrange(1, min(3 * ss, size - off) + 1)
            if rng.random() < 0.6:
                data = rng.randbytes(n)
                assert v.write(off, data) == n
                model[off:off + n] = data
            else:
                assert v.read(off, n) == bytes(model[off:off + n])
        assert v.read(0, size) == bytes(model)
    with open_volume(state, "d") as v:  # persists across reopen
        assert v.read(0, size) == bytes(model)


def test_eof_and_bounds(state):
    disks.create(state, "d", 8192)
    with open_volume(state, "d") as v:
        assert v.read(8000, 1000) == bytes(192)
        assert v.read(8192, 10) == b""
        with pytest.raises(OutOfRange):
            v.write(8190, b"abc")
        with pytest.raises(ValueError):
            v.read(-1, 1)


def test_concurrent_unaligned_writers_match_model(state):
    """Many threads write random unaligned ranges; each thread owns interleaved byte stripes so the
    expected result is known, while their sectors overlap and force read-modify-write races."""
    size = 256 * 1024
    disks.create(state, "d", size, sector_size=4096)
    n_threads = 8
    stripe = 96  # bytes: many stripes per sector, so neighbours share sectors
    model = bytearray(size)
    with open_volume(state, "d") as v:
        def worker(t):
            rng = random.Random(t)
            for _ in range(300):
                k = rng.randrange(size // stripe // n_threads)
                off = (k * n_threads + t) * stripe
                if off + stripe > size:
                    continue
                data = rng.randbytes(stripe)
                v.write(off, data)
                model[off:off + stripe] = data  # disjoint per thread: no race on the model
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert v.read(0, size) == bytes(model)


def test_concurrent_readers_and_writers_on_disjoint_sectors(state):
    size = 2 << 20
    disks.create(state, "d", size)
    errors = []
    with open_volume(state, "d") as v:
        def worker(t):
            rng = random.Random(t)
            base = t * (size // 4)
            try:
                for _ in range(100):
                    data = rng.randbytes(rng.randrange(1, 20000))
                    off = base + rng.randrange(size // 4 - len(data))
                    v.write(off, data)
                    assert v.read(off, len(data)) == data
            except Exception as e:  # surfaced below
                errors.append(e)
        ts = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
    assert not errors


def test_discard_punches_and_reads_zeros(state):
    rec = disks.create(state, "d", 8 << 20)
    with open_volume(state, "d") as v:
        v.write(0, os.urandom(8 << 20))
        v.flush()
        used = v.blocks_used()
        v.discard(4096 + 100, (4 << 20))  # unaligned edges are zeroed, whole sectors punched
        assert v.read(4096 + 100, 4 << 20) == bytes(4 << 20)
        assert v.read(4096, 100) != bytes(100)
        assert v.blocks_used() < used - (3 << 20) // 512
    assert os.stat(rec.path).st_blocks < used


def test_read_only_disk_refuses_writes(state):
    disks.create(state, "img", 1 << 20, kind="image", read_only=True)
    with open_volume(state, "img") as v:
        assert v.read(0, 10) == bytes(10)
        with pytest.raises(ReadOnly):
            v.write(0, b"x")


def test_resize_seen_by_open_volume(state):
    disks.create(state, "d", 1 << 20)
    with open_volume(state, "d") as v:
        disks.resize(state, "d", 2 << 20)
        assert v.size == 1 << 20
        v.refresh()
        assert v.size == 2 << 20
        v.write((2 << 20) - 5, b"tail!")
        assert v.read((2 << 20) - 5, 5) == b"tail!"


def test_wiped_after_close(state):
    disks.create(state, "d", 1 << 20)
    v = open_volume(state, "d")
    v.close()
    with pytest.raises(ValueError):  # the engine dropped the volume and wiped its key
        v.read(0, 4096)


def test_revoke_stops_io_and_restore_resumes(state):
    from blockcrypt.errors import KeyDisabled
    disks.create(state, "d", 1 << 20)
    with open_volume(state, "d") as v:
        v.write(0, b"before")
        v.revoke(KeyDisabled(key_id="platform/1"))
        assert isinstance(v.key_error, KeyDisabled)
        with pytest.raises(KeyDisabled):
            v.read(0, 6)
        with pytest.raises(KeyDisabled):
            v.write(0, b"x" * 4096)
        v.restore(open_layers(state, v.header()))
        assert v.key_error is None
        assert v.read(0, 6) == b"before"


def test_python_side_key_copies_are_wiped_and_the_engine_keeps_its_own(state):
    from blockcrypt.control.disks import wipe_layers
    from blockcrypt.volume import Volume
    rec = disks.create(state, "d", 1 << 20, double=True)
    h = disks.read_disk_header(rec)
    layers = open_layers(state, h)
    keys = [l[1] for l in layers]
    assert all(isinstance(k, bytearray) and any(k) for k in keys)
    v = Volume(rec.path, h, layers)
    try:
        wipe_layers(layers)
        assert all(k == bytes(len(k)) for k in keys)  # zeroed in place
        v.write(4096, b"still-served")                 # the engine's locked copy serves on
        assert v.read(4096, 12) == b"still-served"
    finally:
        v.close()
    with open_volume(state, "d") as v2:  # and the data was encrypted under the real keys
        assert v2.read(4096, 12) == b"still-served"
