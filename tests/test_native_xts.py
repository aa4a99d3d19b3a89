"""Proof of the native AES-256-XTS core (blockcrypt._xts, blockcrypt.crypto.NativeXts).

What is checked here:

* known answers: the NIST CAVS XTSGenAES256 vectors (both tweak styles; the 600 per
  file whose data unit is a whole number of bytes) through ``_xts.xts_raw``, which
  runs the very per-unit routine the sector loop uses; IEEE 1619-2007 vectors 10-14
  (512-byte data units, sequence numbers up to 2**40-1) through ``XtsContext`` itself;
* differential: NativeXts against ReferenceXts (pure `cryptography`) over random
  sector counts, start sectors up to 2**64-1, both sector sizes, both directions,
  bytes/bytearray/memoryview inputs (also unaligned views);
* the all-zero ciphertext sector rule, argument validation, use after wipe, and
  correctness with 8 threads on one NativeXts (pooled contexts) and with a wipe racing calls in flight;
* the split path (a request shared by the calling thread and the context's helper
  thread): the sector-API known answers, the differential tests and the zero rule run
  with the split threshold forced to 1 byte, so every multi-sector request splits, on
  both IV paths; the helper starts lazily and stops on wipe; wipe races split calls.

Caveats: the vector files are data from NIST and IEEE (see tests/vectors/README.md).
There are no timed assertions; speed is measured by bench/xts_speed.py.
"""
from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from blockcrypt import _xts
from blockcrypt.crypto import NativeXts, ReferenceXts

VECTORS = Path(__file__).parent / "vectors"
SECTOR_SIZES = (512, 4096)
U64_MAX = 2**64 - 1


# --------------------------------------------------------------------------- loaders

def load_nist_xts(path: Path) -> list[dict]:
    """Parse a CAVS XTSGen .rsp file: ``[ENCRYPT]``/``[DECRYPT]`` sections of
    ``KEY = value`` blocks. Returns only the vectors whose data unit is whole bytes."""
    vectors, current, op = [], None, None
    for raw in path.read_bytes().decode("ascii").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            op = line.strip("[]")
            continue
        name, _, value = (part.strip() for part in line.partition("="))
        if name == "COUNT":
            current = {"op": op, "count": int(value)}
            vectors.append(current)
        else:
            current[name] = value
    return [v for v in vectors if int(v["DataUnitLen"]) % 8 == 0]


def load_botan_vec(path: Path) -> list[dict]:
    """Parse ``Key/Nonce/In/Out`` blocks, naming each by the comment above it."""
    vectors, current, title = [], {}, None
    for raw in path.read_text().splitlines() + [""]:
        line = raw.strip()
        if line.startswith("#"):
            title = line.lstrip("# ")
        elif line:
            name, _, value = (part.strip() for part in line.partition("="))
            current[name] = bytes.fromhex(value)
        elif current:
            current["title"] = title
            vectors.append(current)
            current = {}
    return vectors


NIST_HEX = load_nist_xts(VECTORS / "XTSGenAES256-tweak-128hexstr.rsp")
NIST_SEQ = load_nist_xts(VECTORS / "XTSGenAES256-tweak-dataunitseqno.rsp")
IEEE = load_botan_vec(VECTORS / "ieee1619-2007-aes256-xts.vec")


def _vid(v: dict) -> str:
    return f"{v['op'].lower()}-{v['count']}-{v['DataUnitLen']}bits"


DIRECT_IV_AVAILABLE = _xts.XtsContext(bytes(range(64)), 512).direct_iv

# every known answer and differential check runs over both ways of setting the tweak
IV_PATHS = [
    pytest.param(True, id="direct-iv",
                 marks=pytest.mark.skipif(not DIRECT_IV_AVAILABLE,
                                          reason="libcrypto failed the direct-IV self-test")),
    pytest.param(False, id="evp-reinit"),
]


# unsplit, and split with the threshold forced to 1 byte: every multi-sector request is
# shared by the caller and the helper thread (chunks of at most half the request)
SPLITS = [pytest.param(0, id="unsplit"), pytest.param(1, id="split")]


def test_vector_files_are_complete():
    # 1000 vectors per file; 400 at 384 bits + 200 at 256 bits are whole bytes
    assert len(NIST_HEX) == 600 and len(NIST_SEQ) == 600
    assert {v["op"] for v in NIST_HEX} == {"ENCRYPT", "DECRYPT"}
    assert [v["title"] for v in IEEE] == [f"IEEE 1619-2007 VECTOR {n}" for n in range(10, 15)]


# --------------------------------------------------------------------------- known answers

@pytest.mark.parametrize("direct_iv", IV_PATHS)
@pytest.mark.parametrize("v", NIST_HEX, ids=_vid)
def test_nist_xts_aes256_hex_tweak(v, direct_iv):
    key, tweak = bytes.fromhex(v["Key"]), bytes.fromhex(v["i"])
    pt, ct = bytes.fromhex(v["PT"]), bytes.fromhex(v["CT"])
    assert len(pt) * 8 == int(v["DataUnitLen"])
    if v["op"] == "ENCRYPT":
        assert _xts.xts_raw(key, pt, True, tweak=tweak, direct_iv=direct_iv) == ct
    else:
        assert _xts.xts_raw(key, ct, False, tweak=tweak, direct_iv=direct_iv) == pt


@pytest.mark.parametrize("direct_iv", IV_PATHS)
@pytest.mark.parametrize("v", NIST_SEQ, ids=_vid)
def test_nist_xts_aes256_sequence_number(v, direct_iv):
    # DataUnitSeqNumber is the plain64 tweak: the C encoder under test builds it
    key, seq = bytes.fromhex(v["Key"]), int(v["DataUnitSeqNumber"])
    pt, ct = bytes.fromhex(v["PT"]), bytes.fromhex(v["CT"])
    if v["op"] == "ENCRYPT":
        assert _xts.xts_raw(key, pt, True, sector_no=seq, direct_iv=direct_iv) == ct
    else:
        assert _xts.xts_raw(key, ct, False, sector_no=seq, direct_iv=direct_iv) == pt


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("direct_iv", IV_PATHS)
@pytest.mark.parametrize("v", IEEE, ids=lambda v: v["title"].split()[-1])
def test_ieee1619_through_the_sector_api(v, direct_iv, split):
    key, tweak, pt, ct = v["Key"], v["Nonce"], v["In"], v["Out"]
    sector_no = int.from_bytes(tweak, "little")
    assert len(pt) == 512 and sector_no <= U64_MAX
    ctx = _xts.XtsContext(key, 512, direct_iv=direct_iv, split_threshold=split)
    assert ctx.direct_iv is direct_iv
    assert ctx.encrypt(pt, sector_no) == ct
    assert ctx.decrypt(ct, sector_no) == pt
    cipher = NativeXts(key, 512, split_threshold=split)
    assert cipher.encrypt(pt, sector_no) == ct
    assert cipher.decrypt(ct, sector_no) == pt
    assert _xts.xts_raw(key, pt, True, tweak=tweak, direct_iv=direct_iv) == ct
    if sector_no > 0:
        # the vector as the second sector of a two-sector request: with split=1 the
        # helper thread computes it, with its own EVP context
        prev = ReferenceXts(key, 512).encrypt(pt, sector_no - 1)
        assert ctx.encrypt(pt + pt, sector_no - 1) == prev + ct
        assert ctx.decrypt(prev + ct, sector_no - 1) == pt + pt
        assert not split or ctx.split_helper_running


# --------------------------------------------------------------------------- differential

def _start_sectors(rng: random.Random, count: int) -> list[int]:
    return [
        0,
        rng.randrange(1, 2**32),
        rng.randrange(2**32, 2**40),
        2**32 - 1,  # crosses the 32-bit boundary inside the request
        rng.randrange(2**40, 2**63),
        U64_MAX - count + 1,  # the last sectors a 64-bit tweak can name
        rng.randrange(U64_MAX - 10_000, U64_MAX - count + 2),
    ]


def _views(data: bytes):
    """The same bytes as bytes, bytearray, memoryview and an unaligned memoryview."""
    padded = bytearray(b"\xa5" * 3 + data + b"\x5a" * 5)
    return {
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(bytearray(data)),
        "unaligned-view": memoryview(padded)[3:3 + len(data)],
    }


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("direct_iv", IV_PATHS)
@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
@pytest.mark.parametrize("seed", range(4))
def test_native_matches_reference(sector_size, seed, direct_iv, split):
    rng = random.Random(seed * 1000 + sector_size)
    key = rng.randbytes(64)
    ref = ReferenceXts(key, sector_size)
    native = (NativeXts(key, sector_size, split_threshold=split) if direct_iv
              else _xts.XtsContext(key, sector_size, direct_iv=False, split_threshold=split))
    for _ in range(3):
        count = rng.randint(1, 64)
        plain = rng.randbytes(count * sector_size)
        for sector_no in _start_sectors(rng, count):
            expect_ct = ref.encrypt(plain, sector_no)
            for kind, view in _views(plain).items():
                assert native.encrypt(view, sector_no) == expect_ct, (kind, sector_no)
            for kind, view in _views(expect_ct).items():
                assert native.decrypt(view, sector_no) == plain, (kind, sector_no)
            # decrypting random data (not our ciphertext) agrees too
            junk = rng.randbytes(len(plain))
            assert native.decrypt(junk, sector_no) == ref.decrypt(junk, sector_no)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("direct_iv", IV_PATHS)
@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_sector_loop_equals_single_units(sector_size, direct_iv, split):
    # each sector of a multi-sector request is the one-unit transform at its own tweak,
    # and the two ways of setting the tweak agree
    key = os.urandom(64)
    ctx = _xts.XtsContext(key, sector_size, direct_iv=direct_iv, split_threshold=split)
    start = 2**64 - 5
    plain = os.urandom(5 * sector_size)
    ct = ctx.encrypt(plain, start)
    for i in range(5):
        unit = plain[i * sector_size:(i + 1) * sector_size]
        tweak = (start + i).to_bytes(16, "little")
        assert ct[i * sector_size:(i + 1) * sector_size] == _xts.xts_raw(key, unit, True, tweak=tweak,
                                                                          direct_iv=not direct_iv)


def test_inputs_are_not_modified_and_outputs_are_fresh():
    key = os.urandom(64)
    native = NativeXts(key, 512)
    buf = bytearray(os.urandom(4 * 512))
    before = bytes(buf)
    view = memoryview(buf)
    ct = native.encrypt(view, 7)
    assert bytes(buf) == before and isinstance(ct, bytes)
    # overlapping views of one buffer, one after the other
    ct_tail = native.encrypt(view[512:], 8)
    assert ct_tail == ct[512:]
    # the output of one call fed straight back in
    assert native.decrypt(native.encrypt(ct, 7), 7) == ct
    assert native.encrypt(b"", 0) == b"" and native.decrypt(b"", U64_MAX) == b""


# --------------------------------------------------------------------------- the zero-sector rule

@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_all_zero_ciphertext_sectors_read_as_zeros(sector_size, split):
    key = os.urandom(64)
    native, ref = NativeXts(key, sector_size, split_threshold=split), ReferenceXts(key, sector_size)
    zero = bytes(sector_size)
    # a hole decrypts to zeros, anywhere in a request
    assert native.decrypt(zero * 3, 2**40) == zero * 3
    plain = os.urandom(2 * sector_size)
    ct = native.encrypt(plain, 10)
    mixed = ct[:sector_size] + zero + ct[sector_size:]
    got = native.decrypt(mixed, 10)
    assert got[:sector_size] == plain[:sector_size]
    assert got[sector_size:2 * sector_size] == zero
    # sector 12 holds what was encrypted at sector 11, so it decrypts to noise, like the reference
    assert got[2 * sector_size:] == ref.decrypt(ct[sector_size:], 12)
    # holes in both halves of a split request, and in the first/last sector of each
    for holes in ({0, 5}, {3, 4}, {7}, set(range(8))):
        plain8 = os.urandom(8 * sector_size)
        ct8 = bytearray(native.encrypt(plain8, 2**35))
        want = bytearray(plain8)
        for h in holes:
            ct8[h * sector_size:(h + 1) * sector_size] = zero
            want[h * sector_size:(h + 1) * sector_size] = zero
        assert native.decrypt(ct8, 2**35) == want, holes
    # zero plaintext encrypts to non-zero ciphertext (the rule is for reads of holes only)
    enc_zero = native.encrypt(zero, 5)
    assert enc_zero != zero and enc_zero == ref.encrypt(zero, 5)
    # one non-zero byte anywhere (first, middle, last word) is not a hole
    for pos in (0, sector_size // 2 + 3, sector_size - 1):
        nearly = bytearray(zero)
        nearly[pos] = 1
        out = native.decrypt(bytes(nearly), 99)
        assert out != zero and out == ref.decrypt(bytes(nearly), 99)


# --------------------------------------------------------------------------- argument validation

KEY = bytes(range(64))


@pytest.mark.parametrize("make", [_xts.XtsContext, NativeXts, ReferenceXts])
@pytest.mark.parametrize("key", [b"", bytes(32), KEY[:63], KEY + b"\0"], ids=["0", "32", "63", "65"])
def test_wrong_key_length(make, key):
    with pytest.raises(ValueError, match="64 bytes"):
        make(key, 4096)


@pytest.mark.parametrize("make", [_xts.XtsContext, NativeXts])
def test_equal_key_halves_refused(make):
    half = os.urandom(32)
    with pytest.raises(ValueError, match="halves must differ"):
        make(half + half, 4096)


@pytest.mark.parametrize("make", [_xts.XtsContext, NativeXts])
@pytest.mark.parametrize("sector_size", [0, 256, 1024, 8192])
def test_bad_sector_size(make, sector_size):
    with pytest.raises(ValueError, match="512 or 4096"):
        make(KEY, sector_size)


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
@pytest.mark.parametrize("delta", [-1, 1, 16])
def test_length_not_a_multiple_of_the_sector(sector_size, delta):
    native = NativeXts(KEY, sector_size)
    data = bytes(sector_size * 2 + delta)
    with pytest.raises(ValueError, match="not a multiple of the sector size"):
        native.encrypt(data, 0)
    with pytest.raises(ValueError, match="not a multiple of the sector size"):
        native.decrypt(data, 0)


@pytest.mark.parametrize("sector_no", [-1, 2**64, 2**70])
def test_sector_number_out_of_range(sector_no):
    ctx = _xts.XtsContext(KEY, 512)
    with pytest.raises(ValueError, match="sector_no"):
        ctx.encrypt(bytes(512), sector_no)
    with pytest.raises(ValueError, match="sector_no"):
        _xts.xts_raw(KEY, bytes(16), True, sector_no=sector_no)


def test_sector_range_past_the_last_tweak_is_refused():
    ctx = _xts.XtsContext(KEY, 512)
    ctx.encrypt(bytes(512), U64_MAX)  # the last sector itself is fine
    ctx.encrypt(bytes(2 * 512), U64_MAX - 1)
    with pytest.raises(ValueError, match="past sector 2\\*\\*64-1"):
        ctx.encrypt(bytes(2 * 512), U64_MAX)


def test_wrong_argument_types():
    ctx = _xts.XtsContext(KEY, 512)
    with pytest.raises(TypeError):
        ctx.encrypt("not bytes" * 64, 0)
    with pytest.raises(TypeError):
        ctx.encrypt(bytes(512), 1.0)
    with pytest.raises(TypeError):
        ctx.encrypt(bytes(512))
    with pytest.raises((BufferError, TypeError)):
        ctx.encrypt(memoryview(bytes(1024))[::2], 0)  # not contiguous


def test_context_cannot_be_rekeyed():
    ctx = _xts.XtsContext(KEY, 512)
    with pytest.raises(ValueError, match="already initialised"):
        ctx.__init__(os.urandom(64), 512)
    assert ctx.encrypt(bytes(512), 1) == ReferenceXts(KEY, 512).encrypt(bytes(512), 1)


def test_use_after_wipe():
    ctx = _xts.XtsContext(KEY, 4096)
    ctx.wipe()
    assert ctx.sector_size == 0
    for op in (ctx.encrypt, ctx.decrypt):
        with pytest.raises(ValueError, match="wiped"):
            op(bytes(4096), 0)
    ctx.wipe()  # idempotent
    native = NativeXts(KEY, 512)
    native.encrypt(bytes(512), 0)
    native.wipe()
    assert not any(native._key)
    for op in (native.encrypt, native.decrypt):
        with pytest.raises(ValueError, match="wiped"):
            op(bytes(512), 0)


def test_direct_iv_is_in_use_by_default():
    # NativeXts (what volumes use) gets the fast path whenever the self-test passes
    if not DIRECT_IV_AVAILABLE:
        pytest.skip(f"{_xts.openssl_version()} failed the direct-IV self-test; the EVP path is used")
    native = NativeXts(KEY, 4096)
    native.encrypt(bytes(4096), 0)
    assert all(ctx.direct_iv for ctx in native._all)
    assert _xts.XtsContext(KEY, 4096, direct_iv=False).direct_iv is False


def test_uninitialised_context():
    ctx = _xts.XtsContext.__new__(_xts.XtsContext)
    with pytest.raises(ValueError, match="not initialised"):
        ctx.encrypt(bytes(512), 0)


def test_xts_raw_validation():
    with pytest.raises(ValueError, match="exactly one"):
        _xts.xts_raw(KEY, bytes(16), True)
    with pytest.raises(ValueError, match="exactly one"):
        _xts.xts_raw(KEY, bytes(16), True, tweak=bytes(16), sector_no=0)
    with pytest.raises(ValueError, match="16 bytes"):
        _xts.xts_raw(KEY, bytes(16), True, tweak=bytes(15))
    with pytest.raises(ValueError, match="16 bytes or longer"):
        _xts.xts_raw(KEY, bytes(15), True, sector_no=0)
    with pytest.raises(ValueError, match="64 bytes"):
        _xts.xts_raw(KEY[:32], bytes(16), True, sector_no=0)
    with pytest.raises(ValueError, match="halves must differ"):
        _xts.xts_raw(bytes(64), bytes(16), True, sector_no=0)


# --------------------------------------------------------------------------- threads

@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_eight_threads_on_one_cipher(sector_size):
    key = os.urandom(64)
    native, ref = NativeXts(key, sector_size), ReferenceXts(key, sector_size)
    rng = random.Random(sector_size)
    cases = []
    for _ in range(24):
        count = rng.choice([1, 2, 8, 64, 256])
        sector_no = rng.choice([rng.randrange(2**32), rng.randrange(2**32, 2**63), U64_MAX - count + 1])
        plain = rng.randbytes(count * sector_size)
        cases.append((plain, sector_no, ref.encrypt(plain, sector_no)))
    barrier = threading.Barrier(8)
    errors: list[str] = []

    def hammer(tid: int) -> None:
        local = random.Random(tid)
        barrier.wait()
        for n in range(150):
            plain, sector_no, ct = local.choice(cases)
            if native.encrypt(plain, sector_no) != ct:
                errors.append(f"thread {tid} op {n}: encrypt mismatch at sector {sector_no}")
            if native.decrypt(bytearray(ct), sector_no) != plain:
                errors.append(f"thread {tid} op {n}: decrypt mismatch at sector {sector_no}")

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert 1 <= native.pool_size <= 8  # at most one libcrypto context per concurrent caller


def test_context_pool_does_not_grow_with_thread_churn():
    """A FUSE daemon's worker threads come and go: contexts are pooled, not kept per thread."""
    native = NativeXts(bytes(range(64)), 4096)
    for _ in range(200):
        t = threading.Thread(target=native.encrypt, args=(bytes(4096), 7))
        t.start()
        t.join()
    assert native.pool_size == 1


@pytest.mark.parametrize("split", [pytest.param(0, id="unsplit"), pytest.param(4096, id="split")])
def test_wipe_races_calls_in_flight(split):
    # a revocation wipes the key while readers are inside the C loop (with split: while
    # the helper thread works on the same request): every call either completes with
    # the right answer or raises ValueError; nothing crashes, the helper is stopped
    key = os.urandom(64)
    ctx = _xts.XtsContext(key, 4096, split_threshold=split, split_spin_us=50)
    plain = os.urandom(1 << 20)
    ct = ReferenceXts(key, 4096).encrypt(plain, 2**33)
    started = threading.Barrier(5)
    outcomes: list[str] = []

    def reader() -> None:
        started.wait()
        for _ in range(20_000):  # until the wipe lands; the cap only stops a runaway loop
            try:
                got = ctx.decrypt(ct, 2**33)
            except ValueError:
                outcomes.append("wiped")
                return
            outcomes.append("ok" if got == plain else "WRONG")

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    ctx.wipe()
    for t in threads:
        t.join(timeout=120)
    assert "WRONG" not in outcomes
    assert outcomes.count("wiped") == 4
    assert not ctx.split_helper_running


# --------------------------------------------------------------------------- the split path

def test_split_defaults_and_validation():
    ctx = _xts.XtsContext(KEY, 4096)
    assert ctx.split_threshold == _xts.XTS_SPLIT_THRESHOLD_BYTES >= 0
    assert not ctx.split_helper_running  # started lazily, by the first split request
    for bad in ({"split_threshold": -1}, {"split_spin_us": -1}, {"split_spin_us": 10**6}):
        with pytest.raises(ValueError, match="split_"):
            _xts.XtsContext(KEY, 4096, **bad)
    assert NativeXts(KEY, 4096, split_threshold=0)._idle[0].split_threshold == 0


def test_split_threshold_and_helper_lifecycle():
    key = os.urandom(64)
    ref = ReferenceXts(key, 4096)
    ctx = _xts.XtsContext(key, 4096, split_threshold=3 * 4096)
    two = os.urandom(2 * 4096)
    assert ctx.encrypt(two, 9) == ref.encrypt(two, 9)
    assert ctx.encrypt(os.urandom(4096), 9) and not ctx.split_helper_running  # below the threshold
    big = os.urandom(64 * 4096)
    assert ctx.encrypt(big, 2**40) == ref.encrypt(big, 2**40)
    assert ctx.split_helper_running
    for spin_us in (0, 1, 200):  # the helper asleep, barely awake, spinning between calls
        c = _xts.XtsContext(key, 4096, split_threshold=1, split_spin_us=spin_us)
        for n in range(30):
            assert c.decrypt(c.encrypt(big, n), n) == big
        assert c.encrypt(big, 5) == ref.encrypt(big, 5)
        c.wipe()
        assert not c.split_helper_running
    ctx.wipe()
    assert not ctx.split_helper_running
    with pytest.raises(ValueError, match="wiped"):
        ctx.encrypt(big, 0)
    # a context dropped while its helper runs is joined in dealloc (no leak, no crash)
    c = _xts.XtsContext(key, 4096, split_threshold=1)
    c.encrypt(big, 0)
    before = threading.active_count()
    del c
    assert threading.active_count() == before  # the helper is not a Python thread either way


def test_split_helper_threads_are_stopped_on_wipe():
    def task_count() -> int:
        return len(os.listdir("/proc/self/task"))

    key = os.urandom(64)
    base = task_count()
    ctxs = [_xts.XtsContext(key, 4096, split_threshold=1) for _ in range(3)]
    for c in ctxs:
        c.encrypt(os.urandom(8 * 4096), 0)
    assert task_count() == base + 3
    for c in ctxs:
        c.wipe()
    assert task_count() == base
    c = _xts.XtsContext(key, 4096, split_threshold=1)
    c.encrypt(os.urandom(8 * 4096), 0)
    del c
    assert task_count() == base


def test_split_contexts_under_concurrency():
    # many threads, each with split contexts in a NativeXts pool: a request splits only
    # when it is alone in the C loop; answers are right either way
    key = os.urandom(64)
    native, ref = NativeXts(key, 512, split_threshold=1), ReferenceXts(key, 512)
    cases = []
    for count in (2, 3, 17, 64, 256):
        plain = os.urandom(count * 512)
        cases.append((plain, 2**32 - 7, ref.encrypt(plain, 2**32 - 7)))
    errors: list[str] = []

    def hammer(tid: int) -> None:
        local = random.Random(tid)
        for _ in range(200):
            plain, sector_no, ct = local.choice(cases)
            if native.encrypt(plain, sector_no) != ct or native.decrypt(ct, sector_no) != plain:
                errors.append(f"thread {tid}: mismatch")

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    native.wipe()


def test_split_from_environment(monkeypatch):
    monkeypatch.setenv("BLOCKCRYPT_XTS_SPLIT_BYTES", "8192")
    monkeypatch.setenv("BLOCKCRYPT_XTS_SPLIT_SPIN_US", "7")
    assert NativeXts(KEY, 4096)._idle[0].split_threshold == 8192
    assert NativeXts(KEY, 4096, split_threshold=0)._idle[0].split_threshold == 0
    monkeypatch.setenv("BLOCKCRYPT_XTS_SPLIT_BYTES", "lots")
    with pytest.raises(ValueError, match="BLOCKCRYPT_XTS_SPLIT_BYTES must be an integer"):
        NativeXts(KEY, 4096)


# --------------------------------------------------------------------------- platform AEAD layer
# blockcrypt._aead (native/blockcrypt_aead.c): XChaCha20-Poly1305 per sector for the
# platform layer of double encryption, checked against PyNaCl (libsodium through cffi).
# It is a separate extension so that the XTS core builds without libsodium; these tests
# skip until setup.py builds it.

try:
    from blockcrypt import _aead
except ImportError:  # pragma: no cover - before setup.py builds blockcrypt._aead
    _aead = None

needs_sodium = pytest.mark.skipif(_aead is None, reason="blockcrypt._aead is not built")


def _nacl_seal(key: bytes, sector: bytes, sector_no: int, nonce: bytes) -> bytes:
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

    return crypto_aead_xchacha20poly1305_ietf_encrypt(sector, sector_no.to_bytes(8, "little"), nonce, key)


def _split_meta(meta: bytes, i: int) -> tuple[bytes, bytes]:
    m = meta[i * 40:(i + 1) * 40]
    return m[:24], m[24:]


@needs_sodium
@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_aead_seal_matches_pynacl(sector_size):
    assert (_aead.KEY_BYTES, _aead.NONCE_BYTES, _aead.TAG_BYTES, _aead.SECTOR_META_BYTES) == (32, 24, 16, 40)
    key = os.urandom(32)
    ctx = _aead.AeadSectorContext(key, sector_size)
    for sector_no, count in ((0, 1), (2**33 + 7, 5), (U64_MAX - 2, 3)):
        plain = os.urandom(count * sector_size)
        ct, meta = ctx.seal(memoryview(bytearray(plain)), sector_no)
        assert len(ct) == len(plain) and len(meta) == 40 * count
        for i in range(count):
            nonce, tag = _split_meta(meta, i)
            sector = plain[i * sector_size:(i + 1) * sector_size]
            assert _nacl_seal(key, sector, sector_no + i, nonce) == ct[i * sector_size:(i + 1) * sector_size] + tag
        assert ctx.open(ct, meta, sector_no) == plain


@needs_sodium
def test_aead_opens_what_pynacl_sealed_and_nonces_are_fresh():
    key, sector_size = os.urandom(32), 512
    ctx = _aead.AeadSectorContext(key, sector_size)
    plain = os.urandom(4 * sector_size)
    ct, meta = b"", b""
    for i in range(4):
        nonce = os.urandom(24)
        sealed = _nacl_seal(key, plain[i * sector_size:(i + 1) * sector_size], 100 + i, nonce)
        ct += sealed[:-16]
        meta += nonce + sealed[-16:]
    assert ctx.open(ct, bytearray(meta), 100) == plain
    # the same data sealed twice: new nonces, new ciphertext
    (ct1, meta1), (ct2, meta2) = ctx.seal(plain, 100), ctx.seal(plain, 100)
    assert ct1 != ct2
    nonces = {_split_meta(m, i)[0] for m in (meta1, meta2) for i in range(4)}
    assert len(nonces) == 8


@needs_sodium
@pytest.mark.parametrize("where", ["ciphertext", "nonce", "tag"])
def test_aead_tamper_names_the_sector(where):
    sector_size = 4096
    ctx = _aead.AeadSectorContext(os.urandom(32), sector_size)
    plain = os.urandom(6 * sector_size)
    ct, meta = ctx.seal(plain, 2**40)
    ct, meta = bytearray(ct), bytearray(meta)
    bad = 4
    if where == "ciphertext":
        ct[bad * sector_size + 1234] ^= 0x01
    elif where == "nonce":
        meta[bad * 40 + 3] ^= 0x80
    else:
        meta[bad * 40 + 24 + 15] ^= 0x01
    with pytest.raises(_aead.AeadSectorError) as info:
        ctx.open(ct, meta, 2**40)
    assert info.value.args[1:] == (bad, 2**40 + bad)
    assert not isinstance(info.value, ValueError)  # bad data, not a bad argument


@needs_sodium
def test_aead_sector_moved_or_swapped_does_not_open():
    ss = 512
    ctx = _aead.AeadSectorContext(os.urandom(32), ss)
    ct, meta = ctx.seal(os.urandom(2 * ss), 10)
    with pytest.raises(_aead.AeadSectorError) as info:
        ctx.open(ct, meta, 11)  # the same bytes at another sector number
    assert info.value.args[1:] == (0, 11)
    swapped_ct = ct[ss:] + ct[:ss]
    swapped_meta = meta[40:] + meta[:40]
    with pytest.raises(_aead.AeadSectorError):
        ctx.open(swapped_ct, swapped_meta, 10)
    other = _aead.AeadSectorContext(os.urandom(32), ss)
    with pytest.raises(_aead.AeadSectorError):
        other.open(ct, meta, 10)  # another disk's key


@needs_sodium
def test_aead_holes_read_as_zeros_and_half_holes_do_not():
    ss = 512
    ctx = _aead.AeadSectorContext(os.urandom(32), ss)
    plain = os.urandom(ss)
    ct, meta = ctx.seal(plain, 7)
    # a hole (ciphertext and metadata all zero) between two real sectors
    ct9, meta9 = ctx.seal(plain, 9)
    got = ctx.open(ct + bytes(ss) + ct9, meta + bytes(40) + meta9, 7)
    assert got == plain + bytes(ss) + plain
    with pytest.raises(_aead.AeadSectorError) as info:
        ctx.open(bytes(ss), meta, 7)  # data zeroed, metadata kept
    assert info.value.args[1] == 0
    with pytest.raises(_aead.AeadSectorError):
        ctx.open(ct, bytes(40), 7)  # metadata zeroed, data kept
    # zero plaintext seals to non-zero ciphertext
    zct, zmeta = ctx.seal(bytes(ss), 3)
    assert any(zct) and ctx.open(zct, zmeta, 3) == bytes(ss)


@needs_sodium
def test_aead_argument_validation_and_wipe():
    for key in (b"", bytes(31), bytes(33), bytes(64)):
        with pytest.raises(ValueError, match="32 bytes"):
            _aead.AeadSectorContext(key, 4096)
    with pytest.raises(ValueError, match="512 or 4096"):
        _aead.AeadSectorContext(bytes(32), 1024)
    ctx = _aead.AeadSectorContext(os.urandom(32), 512)
    with pytest.raises(ValueError, match="already initialised"):
        ctx.__init__(os.urandom(32), 512)
    with pytest.raises(ValueError, match="not a multiple"):
        ctx.seal(bytes(513), 0)
    ct, meta = ctx.seal(bytes(1024), 0)
    with pytest.raises(ValueError, match="40 bytes per sector"):
        ctx.open(ct, meta[:-1], 0)
    with pytest.raises(ValueError, match="sector_no"):
        ctx.seal(bytes(512), -1)
    with pytest.raises(ValueError, match="past sector"):
        ctx.seal(bytes(1024), U64_MAX)
    assert ctx.seal(b"", 0) == (b"", b"") and ctx.open(b"", b"", 0) == b""
    ctx.wipe()
    assert ctx.sector_size == 0
    with pytest.raises(ValueError, match="wiped"):
        ctx.seal(bytes(512), 0)
    with pytest.raises(ValueError, match="wiped"):
        ctx.open(ct, meta, 0)


@needs_sodium
def test_aead_eight_threads_on_one_context():
    ss = 4096
    key = os.urandom(32)
    ctx = _aead.AeadSectorContext(key, ss)
    barrier = threading.Barrier(8)
    errors: list[str] = []

    def hammer(tid: int) -> None:
        rng = random.Random(tid)
        barrier.wait()
        for n in range(100):
            count, sector_no = rng.randint(1, 32), rng.randrange(2**63)
            plain = rng.randbytes(count * ss)
            ct, meta = ctx.seal(plain, sector_no)
            if ctx.open(ct, meta, sector_no) != plain:
                errors.append(f"thread {tid} op {n}: round trip failed")
            i = rng.randrange(count)
            nonce, tag = _split_meta(meta, i)
            if _nacl_seal(key, plain[i * ss:(i + 1) * ss], sector_no + i, nonce)[-16:] != tag:
                errors.append(f"thread {tid} op {n}: tag differs from PyNaCl")

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
