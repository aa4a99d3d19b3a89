"""The metadata journal of double-encrypted disks (docs/FORMAT.md, "The metadata journal"):
the feature flag old readers refuse, small writes logged instead of written into the table,
a kill -9 of a writer replayed at the next open, the way out (dump-key + PyNaCl +
`cryptography`) applying the log as FORMAT.md says, and a snapshot merge that settles the
log before it copies tables. Real disk files, real keys, a real killed process."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest

from blockcrypt.control import disks, snapshots
from blockcrypt.control.disks import open_volume
from blockcrypt.errors import IntegrityError, UnsupportedFormat
from blockcrypt.format import read_header
from blockcrypt.format import header as hdr
from blockcrypt.format import layout
from blockcrypt.storage import LocalFileBacking

from test_double import flip, open_sector, raw, xts_open  # the table-only recipe, shared

META = layout.AEAD_META_BYTES
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log_records(path):
    """FORMAT.md's recipe: every valid record of the log, as (epoch, position, kind, first,
    count, payload); a record starts at a multiple of 64 and its CRC-32 covers bytes 0..27 and
    the payload."""
    log = raw(path, layout.JOURNAL_AREA_OFFSET, layout.JOURNAL_BYTES)
    out, at = [], 0
    while at + 32 <= len(log):
        magic, kind, zero, epoch, first, count, crc = struct.unpack_from("<IHHQQII", log, at)
        plen = count * META if kind == 1 else 0
        if (magic == 0x314A4342 and zero == 0 and kind in (1, 2, 3) and at + 32 + plen <= len(log)
                and zlib.crc32(log[at + 32:at + 32 + plen], zlib.crc32(log[at:at + 28])) == crc):
            out.append((epoch, at, kind, first, count, log[at + 32:at + 32 + plen]))
            at += (32 + plen + 63) // 64 * 64
        else:
            at += 64
    return out


def sector_meta(path, n, records=None):
    """Sector n's 96 bytes: the table's, unless the newest epoch's records (in log order) say
    otherwise (META: their bytes; DROP: the table's)."""
    records = log_records(path) if records is None else records
    table = raw(path, layout.META_AREA_OFFSET + n * META, META)
    meta = table
    if records:
        best = max(r[0] for r in records)
        for epoch, _at, kind, first, count, payload in records:
            if epoch == best and first <= n < first + count:
                meta = payload[(n - first) * META:(n - first + 1) * META] if kind == 1 else table
    return meta


def test_journal_flag_is_set_and_the_stop_23_reader_refuses_it(state):
    rec = disks.create(state, "j", 8 << 20, double=True)
    with LocalFileBacking(rec.path, False) as b:
        h = read_header(b, "j")
    assert h.required_features == layout.FEATURE_SECTOR_META | layout.FEATURE_META_JOURNAL
    assert layout.Layout.of(h).journal_off == layout.JOURNAL_AREA_OFFSET
    assert os.stat(rec.path).st_size == layout.JOURNAL_AREA_OFFSET + layout.JOURNAL_BYTES
    packed = hdr.pack(h, hdr.MAGIC_A)
    src = subprocess.run(["git", "show", "1bd28ac:blockcrypt/format/header.py"], capture_output=True, text=True,
                         cwd=REPO)
    if src.returncode != 0:
        pytest.skip("no git history here")
    import importlib.util
    spec = importlib.util.spec_from_loader("blockcrypt.format._stop23_header", loader=None)
    old = importlib.util.module_from_spec(spec)
    old.__package__ = "blockcrypt.format"
    sys.modules[spec.name] = old
    try:
        exec(compile(src.stdout, "stop23_header.py", "exec"), old.__dict__)
    finally:
        del sys.modules[spec.name]
    with pytest.raises(UnsupportedFormat, match="unknown required feature flags 0x4"):
        old.unpack(packed, old.MAGIC_A)
    with pytest.raises(ValueError, match="journal needs"):  # the journal flag alone is a damaged copy
        hdr.unpack(hdr.pack(h.evolve(required_features=layout.FEATURE_META_JOURNAL, layers=h.layers[:1]),
                            hdr.MAGIC_A), hdr.MAGIC_A)


def test_small_writes_go_to_the_log_and_a_close_checkpoints_them(state):
    rec = disks.create(state, "j", 8 << 20, double=True)
    with open_volume(state, "j") as v:
        for n in (5, 900, 77, 1500):
            v.write(n * 4096, bytes([n % 251]) * 4096)
        v.flush()
        assert raw(rec.path, layout.META_AREA_OFFSET, 2048 * META) == bytes(2048 * META)  # table untouched
        kinds = [r[2] for r in log_records(rec.path)]
        assert kinds.count(1) == 4
        assert v.read(900 * 4096, 4096) == bytes([900 % 251]) * 4096
    assert raw(rec.path, layout.META_AREA_OFFSET + 900 * META, META) != bytes(META)  # checkpointed
    recs = log_records(rec.path)
    best = max(r[0] for r in recs)
    assert [r[2] for r in recs if r[0] == best] == [3]  # a MARK: nothing left to apply


WRITER = textwrap.dedent("""
    import sys
    from blockcrypt.control.state import State
    from blockcrypt.control.disks import open_volume
    st = State.open(sys.argv[1])
    start, step, add = (int(a) for a in sys.argv[2:5])
    v = open_volume(st, "j").__enter__()
    for n in range(start, 256, step):
        v.write(n * 4096, bytes([(n + add) % 251 + 1]) * 4096)
    v.flush()
    print("flushed", flush=True)
    sys.stdin.read()   # killed here, the volume open
""")


def expected(image: bytearray, start: int, step: int, add: int) -> None:
    for n in range(start, 256, step):
        image[n * 4096:(n + 1) * 4096] = bytes([(n + add) % 251 + 1]) * 4096


def _write_then_kill(state, start=0, step=3, add=0):
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(state.path), str(start), str(step), str(add)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert p.stdout.readline().strip() == "flushed"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    assert p.returncode == -signal.SIGKILL


def test_kill_9_then_the_log_replays_and_the_way_out_applies_it(state, tmp_path):
    rec = disks.create(state, "j", 1 << 20, double=True)
    _write_then_kill(state)
    recs = log_records(rec.path)
    assert sum(r[2] == 1 for r in recs) == 86  # the killed process never checkpointed
    key = tmp_path / "k"
    disks.dump_key(state, "j", str(key))
    xts_key, aead_key = key.read_bytes()[:64], key.read_bytes()[64:]
    disk_id = bytes.fromhex(rec.disk_id)
    for n in range(0, 256, 3):
        c = raw(rec.path, layout.DATA_OFFSET + n * 4096, 4096)
        assert raw(rec.path, layout.META_AREA_OFFSET + n * META, META) == bytes(META)  # not in the table
        inner = open_sector(aead_key, disk_id, n, c, sector_meta(rec.path, n, recs))
        assert xts_open(xts_key, n, inner) == bytes([n % 251 + 1]) * 4096, n
    # the engine replays it too, and a clean close then leaves it in the table
    with open_volume(state, "j") as v:
        assert v.read(0, 1 << 20) == b"".join(
            (bytes([n % 251 + 1]) if n % 3 == 0 else b"\0") * 4096 for n in range(256))
    n = 255
    assert open_sector(aead_key, disk_id, n, raw(rec.path, layout.DATA_OFFSET + n * 4096, 4096),
                       raw(rec.path, layout.META_AREA_OFFSET + n * META, META))


def test_snapshot_delete_merges_after_settling_the_log(state):
    """A snapshot's file and its child's both left with logs by kills: delete merges the
    snapshot into the child by copying tables directly, so it settles both logs first."""
    disks.create(state, "j", 1 << 20, double=True)
    image = bytearray(1 << 20)
    _write_then_kill(state, 0, 1, 0)          # every sector, in the first file's log only
    expected(image, 0, 1, 0)
    snapshots.create_snapshot(state, "j", "s1")   # freezes that file, log and all
    _write_then_kill(state, 0, 100, 7)        # the new top's log: sectors 0, 100, 200 (three chunks)
    expected(image, 0, 100, 7)
    snapshots.delete(state, "snapshot", "s1")  # s1's chunks copied into the disk's file
    with open_volume(state, "j") as v:
        assert v.read(0, 1 << 20) == bytes(image)


def test_a_flipped_bit_in_a_log_record_is_eio_for_that_sector_only(state):
    rec = disks.create(state, "j", 1 << 20, double=True)
    _write_then_kill(state)                   # sectors 0, 3, 6, ... only in the log
    (hit,) = [r for r in log_records(rec.path) if r[2] == 1 and r[3] == 9]
    off = layout.JOURNAL_AREA_OFFSET + hit[1] + 32 + 48 + 20   # in sector 9's slot
    flip(rec.path, off, 0x10)
    with open_volume(state, "j") as v:
        with pytest.raises(IntegrityError):
            v.read(9 * 4096, 4096)
        for n in (6, 12, 0, 255):
            want = bytes([n % 251 + 1]) * 4096 if n % 3 == 0 else bytes(4096)
            assert v.read(n * 4096, 4096) == want, n
