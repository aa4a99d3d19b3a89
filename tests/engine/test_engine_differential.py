"""Differential test: the C engine (blockcrypt._engine.Volume) against the pure-Python
reference model (refmodel.RefVolume: a bytearray disk + ReferenceXts), driven by the
same seeded random operations.

Phase 1, concurrent rounds: 4-8 threads, each on its own byte range of the disk (the
split points are unaligned, so neighbours share a sector and the engine's range locks
and read-modify-write are what keeps their bytes apart), doing unaligned writes,
reads, discards and zero_ranges on both; every read is compared as it happens, the
whole disk after each round. Phase 2, single-threaded: overlapping operations over the
whole disk, requests larger than the engine's 1 MiB chunk, resizes. At the end the
backing file's data area must equal the model's ciphertext sector by sector (XTS is
deterministic): zeros for holes, aes-xts-plain64 of the plaintext elsewhere.

BC_ENGINE_EXPECT_DIR, when set (the sanitizer run), is the directory the engine module
must have been imported from.
"""
from __future__ import annotations

import os
import random
import threading

import pytest

import blockcrypt._engine as engine
from refmodel import RefVolume

MiB = 1 << 20
DATA_OFF = MiB


def test_engine_module_is_the_expected_build():
    want = os.environ.get("BC_ENGINE_EXPECT_DIR")
    if want:
        assert os.path.dirname(os.path.realpath(engine.__file__)) == os.path.realpath(want), engine.__file__


def random_op(rng: random.Random, lo: int, hi: int, ss: int, big: bool = False):
    """An operation inside [lo, hi): (kind, off, length)."""
    kind = rng.choices(["write", "read", "discard", "zero_range"], weights=[45, 35, 10, 10])[0]
    off = rng.randrange(lo, hi)
    r = rng.random()
    if big and r < 0.05:
        n = rng.randrange(MiB - ss, 5 * MiB // 2)          # crosses the 1 MiB chunking
    elif r < 0.6:
        n = rng.randrange(1, 3 * ss)
    else:
        n = rng.randrange(1, 64 * 1024)
    return kind, off, min(n, hi - off)


def apply(op, v, m: RefVolume, rng: random.Random):
    kind, off, n = op
    if kind == "write":
        data = rng.randbytes(n)
        assert v.write(off, data) == m.write(off, data)
    elif kind == "read":
        got, want = v.read(off, n), m.read(off, n)
        assert got == want, f"read {n}@{off} differs from the model"
    else:
        getattr(v, kind)(off, n)
        getattr(m, kind)(off, n)


def data_area(path, size) -> bytes:
    with open(path, "rb") as f:
        f.seek(DATA_OFF)
        return f.read(size)


@pytest.mark.parametrize("ss,seed", [(512, 11), (4096, 22), (4096, 33)])
def test_engine_matches_the_reference_model(tmp_path, ss, seed):
    rng = random.Random(seed)
    key = rng.randbytes(64)
    size = 4 * MiB
    path = tmp_path / "diff.img"
    open(path, "wb").close()
    v = engine.Volume(str(path), size=size, sector_size=ss, layers=[("aes-xts-plain64", key)])
    m = RefVolume(size, ss, key)
    try:
        # phase 1: threads on disjoint byte ranges, unaligned boundaries
        for rnd in range(8):
            nthreads = rng.randrange(4, 9)
            cuts = sorted(rng.sample(range(1, size), nthreads - 1))
            bounds = list(zip([0] + cuts, cuts + [size]))
            seeds = [rng.getrandbits(64) for _ in bounds]
            errors = []
            start = threading.Barrier(nthreads)

            def worker(lo, hi, s):
                r = random.Random(s)
                start.wait()
                try:
                    for _ in range(100):
                        apply(random_op(r, lo, hi, ss), v, m, r)
                except AssertionError as e:   # report in the main thread
                    errors.append(f"[{lo}, {hi}): {e}")

            threads = [threading.Thread(target=worker, args=(lo, hi, s)) for (lo, hi), s in zip(bounds, seeds)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert errors == [], f"round {rnd}: {errors[:3]}"
            assert v.read(0, size) == m.read(0, size), f"round {rnd}: whole disk differs"
        # phase 2: one thread, overlapping operations, big requests, resizes
        for i in range(800):
            if rng.random() < 0.03:
                new = rng.randrange(MiB // ss, 6 * MiB // ss + 1) * ss
                v.resize(new)
                m.resize(new)
                assert v.size == m.size
                continue
            apply(random_op(rng, 0, m.size, ss, big=True), v, m, rng)
        assert v.read(0, m.size) == m.read(0, m.size)
        v.flush()
        bad = m.mismatched_sectors(data_area(path, m.size))
        assert bad == [], f"{len(bad)} stored sectors differ from the model's ciphertext, first {bad[:5]}"
        st = v.stats()
        assert st["errors"] == 0 and st["reads"] > 0 and st["writes"] > 0 and st["discards"] > 0
    finally:
        v.close()
