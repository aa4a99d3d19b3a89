"""Snapshots, images and disks made from them, without a mount: copy-on-write chains of real
files through the C engine. What a snapshot reads, what a disk from it reads, O(1) creation
(time and space), deletion (merging or refused naming dependents), diff from the maps, the
flat export against `cryptography`'s XTS, catalog rebuild restoring families, the CLI's one-line
errors, a copy's progress events and an interrupted copy leaving no disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockcrypt.control import copy as diskcopy, diff, disks, snapshots
from blockcrypt.errors import AlreadyExists, BadSize, NotFound, ReadOnly, Refused
from blockcrypt.format.layout import CHUNK_BYTES

MiB = 1 << 20
BIN = Path(sys.executable).parent / "blockcrypt"


def write(st, name, off, data, flush=True):
    with disks.open_volume(st, name) as v:
        v.write(off, data)
        if flush:
            v.flush()


def read(st, name, off, n):
    with disks.open_volume(st, name, read_only=True) as v:
        return v.read(off, n)


def blocks(path) -> int:
    return os.stat(path).st_blocks * 512


def test_snapshot_keeps_its_bytes_while_the_disk_changes(state):
    disks.create(state, "d", 64 * MiB)
    write(state, "d", 0, b"A" * (3 * MiB))
    s = snapshots.create_snapshot(state, "d", "s1")
    assert s.kind == "snapshot" and s.read_only and s.source_id == state.catalog.get_disk("d").disk_id
    write(state, "d", MiB + 5, b"B" * 1000)
    write(state, "d", 40 * MiB, b"C" * 4096)
    assert read(state, "s1", MiB, 10) == b"A" * 10
    assert read(state, "s1", 40 * MiB, 4) == bytes(4)
    assert read(state, "d", MiB + 5, 4) == b"BBBB" and read(state, "d", MiB, 5) == b"AAAAA"
    with disks.open_volume(state, "s1") as v:  # read-only whatever is asked
        with pytest.raises(ReadOnly):
            v.write(0, b"x")
    # the disk keeps its name and id; the snapshot has its own
    d = state.catalog.get_disk("d")
    assert d.disk_id != s.disk_id and d.family_id == s.family_id == d.disk_id


def test_disks_from_a_snapshot_diverge_and_image_chain(state):
    disks.create(state, "d", 32 * MiB)
    write(state, "d", 0, b"base" * 1024)
    snapshots.create_snapshot(state, "d", "s")
    a = snapshots.create_disk_from(state, "a", "s")
    b = snapshots.create_disk_from(state, "b", "s", size=64 * MiB)
    assert a.kind == b.kind == "disk" and b.size == 64 * MiB
    write(state, "a", 0, b"AAAA")
    write(state, "b", 0, b"BBBB")
    write(state, "b", 50 * MiB, b"tail")
    assert read(state, "a", 0, 8) == b"AAAAbase" and read(state, "b", 0, 8) == b"BBBBbase"
    assert read(state, "d", 0, 4) == b"base" and read(state, "s", 0, 4) == b"base"
    assert read(state, "b", 50 * MiB, 4) == b"tail"
    img = snapshots.create_image(state, "img", "s")
    assert img.kind == "image" and img.read_only
    c = snapshots.create_disk_from(state, "c", "img")
    assert read(state, "c", 0, 4) == b"base"
    j = snapshots.to_json(state, c)
    assert j["creationData"]["sourceResourceId"] == "/images/img"
    assert j["creationData"]["createOption"] == "FromImage"
    assert j["chainDepth"] == 3  # c's top over img's top over s's file (the family's first)
    ji = snapshots.to_json(state, img)
    assert ji["creationData"]["sourceResourceId"] == "/snapshots/s"
    with pytest.raises(BadSize, match="smaller than its source snapshot 's'"):
        snapshots.create_disk_from(state, "e", "s", size=MiB)


def test_create_is_o1_in_time_and_space(state):
    size = 1 << 40  # 1 TiB, sparse
    disks.create(state, "big", size)
    with disks.open_volume(state, "big") as v:
        for i in range(16):
            v.write(i * (1 << 35), os.urandom(4 * MiB))  # data spread over the whole disk
        v.flush()
    path = state.catalog.get_disk("big").path
    used = blocks(path)
    t0 = time.monotonic()
    snapshots.create_snapshot(state, "big", "s")
    snapshots.create_image(state, "i", "s")
    snapshots.create_disk_from(state, "c", "i")
    dt = time.monotonic() - t0
    assert dt < 3.0, f"three O(1) creations took {dt:.2f} s"
    for name in ("big", "i", "c"):
        top = state.catalog.get_disk(name).path
        assert top != path and blocks(top) < 256 * 1024, (name, blocks(top))  # a header, no data
    assert blocks(path) == used  # the frozen file is the snapshot's, unchanged
    # space grows with the changes, not with the disk
    write(state, "big", 12345 * CHUNK_BYTES, os.urandom(MiB))
    grown = blocks(state.catalog.get_disk("big").path)
    assert MiB <= grown < MiB + 512 * 1024, grown


def test_delete_merges_into_the_one_member_on_it_and_names_several(state):
    disks.create(state, "d", 8 * MiB)
    write(state, "d", 0, b"1" * 200_000)
    snapshots.create_snapshot(state, "d", "s1")
    write(state, "d", 100_000, b"2" * 300_000)
    snapshots.create_snapshot(state, "d", "s2")
    write(state, "d", 350_000, b"3" * 10)
    want = {n: read(state, n, 0, 600_000) for n in ("s1", "s2", "d")}
    files_before = len(list(state.disks_dir.glob("*.img")))
    r = snapshots.delete(state, "snapshot", "s1")  # its one dependent, s2's file, takes its chunks
    assert r == {"deleted": "s1", "merged": "s2"}
    assert len(list(state.disks_dir.glob("*.img"))) == files_before - 1
    assert read(state, "s2", 0, 600_000) == want["s2"] and read(state, "d", 0, 600_000) == want["d"]
    snapshots.create_disk_from(state, "c", "s2")
    with pytest.raises(Refused, match=r"snapshot 's2' is the base of disk 'c', disk 'd'"):
        snapshots.delete(state, "snapshot", "s2")
    state_c = read(state, "c", 0, 600_000)
    disks.delete(state, "c")
    assert snapshots.delete(state, "snapshot", "s2")["merged"] == "d"  # d is not open: merged into it
    assert read(state, "d", 0, 600_000) == want["d"] == state_c[:350_000] + b"3" * 10 + state_c[350_010:]
    assert state.catalog.list_members("snapshot") == []
    with pytest.raises(NotFound):
        snapshots.delete(state, "snapshot", "s2")
    snapshots.create_snapshot(state, "d", "s3")
    with pytest.raises(Refused, match="snapshot delete s3"):
        disks.delete(state, "s3")


def test_names_are_shared_and_checked(state):
    disks.create(state, "d", MiB)
    snapshots.create_snapshot(state, "d", "s")
    with pytest.raises(AlreadyExists):
        snapshots.create_snapshot(state, "d", "s")
    with pytest.raises(Refused, match="name 'd' is taken by disk"):
        snapshots.create_snapshot(state, "d", "d")
    with pytest.raises(Refused, match="not a disk"):
        snapshots.create_snapshot(state, "s", "s2")
    with pytest.raises(NotFound):
        snapshots.create_disk_from(state, "x", "d")  # a disk is not a snapshot or image
    assert [r.name for r in state.catalog.list_disks()] == ["d"]


def test_diff_lists_the_chunks_written_between_two_snapshots(state):
    disks.create(state, "d", 16 * MiB)
    write(state, "d", 0, os.urandom(16 * MiB))
    snapshots.create_snapshot(state, "d", "s1")
    writes = [(3 * CHUNK_BYTES + 100, 10), (10 * MiB, 3 * CHUNK_BYTES), (15 * MiB - 1, 2)]
    for off, n in writes:  # every byte changes (random bytes could repeat a 1-byte edge)
        write(state, "d", off, bytes(b ^ 0xFF for b in read(state, "d", off, n)))
    snapshots.create_snapshot(state, "d", "s2")
    r = diff.diff(state, "s1", "s2")
    want = set()
    for off, n in writes:
        want |= set(range(off // CHUNK_BYTES, (off + n - 1) // CHUNK_BYTES + 1))
    got = set()
    for x in r["changedRanges"]:
        assert x["offset"] % CHUNK_BYTES == 0
        got |= set(range(x["offset"] // CHUNK_BYTES, (x["offset"] + x["length"] - 1) // CHUNK_BYTES + 1))
    assert got == want and r["changedBytes"] == len(want) * CHUNK_BYTES
    # the bytes outside the ranges are equal, and inside them they differ
    a, b = read(state, "s1", 0, 16 * MiB), read(state, "s2", 0, 16 * MiB)
    for c in range(16 * MiB // CHUNK_BYTES):
        same = a[c * CHUNK_BYTES:(c + 1) * CHUNK_BYTES] == b[c * CHUNK_BYTES:(c + 1) * CHUNK_BYTES]
        assert same == (c not in want), c
    assert diff.diff(state, "s2", "s2")["changedRanges"] == []
    disks.create(state, "other", MiB)
    snapshots.create_snapshot(state, "other", "o1")
    with pytest.raises(Refused, match="not of one family"):
        diff.diff(state, "s1", "o1")


def test_export_is_plain64_under_the_family_key(state, tmp_path):
    disks.create(state, "d", 4 * MiB)
    data0 = os.urandom(MiB)
    write(state, "d", 0, data0)
    snapshots.create_snapshot(state, "d", "s")
    write(state, "d", 2 * MiB, b"Z" * 4096)
    key = tmp_path / "k"
    disks.dump_key(state, "s", str(key))
    out = tmp_path / "s.raw"
    r = diff.export(state, "d", str(out))
    assert r["sizeBytes"] == 4 * MiB and os.path.getsize(out) == 4 * MiB
    k = key.read_bytes()
    raw = out.read_bytes()

    def sector(n):
        d = Cipher(algorithms.AES(k), modes.XTS(n.to_bytes(16, "little"))).decryptor()
        return d.update(raw[n * 4096:(n + 1) * 4096]) + d.finalize()
    assert b"".join(sector(n) for n in range(256)) == data0
    assert sector(512) == b"Z" * 4096
    assert raw[3 * MiB:] == bytes(MiB)  # never written: a hole


def test_catalog_rebuild_restores_families(state):
    disks.create(state, "d", 4 * MiB)
    write(state, "d", 0, b"x" * 5000)
    s = snapshots.create_snapshot(state, "d", "s")
    snapshots.create_image(state, "i", "s")
    snapshots.create_disk_from(state, "c", "i")
    before = {r.name: r for r in state.catalog.list_members()}
    state.catalog.replace_all([])
    r = disks.rebuild_catalog(state)
    assert r["disks"] == ["c", "d"] and r["snapshots"] == ["s"] and r["images"] == ["i"]
    after = {r.name: r for r in state.catalog.list_members()}
    for n, rec in before.items():
        a = after[n]
        assert (a.kind, a.disk_id, a.path, a.family_id, a.source_id) == \
               (rec.kind, rec.disk_id, rec.path, rec.family_id, rec.source_id), n
    assert read(state, "c", 0, 4) == b"xxxx" and after["s"].disk_id == s.disk_id


def run(state, *args, expect=0):
    e = dict(os.environ, BLOCKCRYPT_STATE=str(state.path))
    p = subprocess.run([str(BIN), *args], capture_output=True, text=True, env=e, timeout=120)
    assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
    return p


def one_line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockcrypt: error: "), p.stderr
    return lines[0]


def test_cli_json_and_one_line_errors(state):
    run(state, "disk", "create", "d", "--size", "8M")
    s = json.loads(run(state, "snapshot", "create", "d", "s", "--json").stdout)
    assert s["kind"] == "snapshot" and s["encryption"]["type"] == "EncryptionAtRestWithPlatformKey"
    assert s["creationData"]["sourceResourceId"] == "/disks/d"
    assert [x["name"] for x in json.loads(run(state, "snapshot", "list", "--json").stdout)] == ["s"]
    assert json.loads(run(state, "snapshot", "show", "s", "--json").stdout)["id"] == s["id"]
    i = json.loads(run(state, "image", "create", "i", "--source", "s", "--json").stdout)
    assert i["creationData"]["sourceResourceId"] == "/snapshots/s"
    c = json.loads(run(state, "disk", "create", "c", "--source", "i", "--size", "16M", "--json").stdout)
    assert c["sizeBytes"] == 16 * MiB and c["kind"] == "disk"
    assert json.loads(run(state, "snapshot", "diff", "s", "s", "--json").stdout)["changedRanges"] == []
    assert "snapshot 'nope' not found" in one_line(run(state, "snapshot", "show", "nope", expect=3))
    assert "image 'nope' not found" in one_line(run(state, "image", "delete", "nope", expect=3))
    assert "is the base of" in one_line(run(state, "snapshot", "delete", "s", expect=5))
    assert "snapshot delete s" in one_line(run(state, "disk", "delete", "s", expect=5))
    assert "not found" in one_line(run(state, "disk", "create", "x", "--source", "d", expect=3))
    assert "already exists" in one_line(run(state, "snapshot", "create", "d", "s", expect=4))
    before = read(state, "c", 0, 8 * MiB)
    assert json.loads(run(state, "image", "delete", "i", "--yes", "--json").stdout) == {"deleted": "i", "merged": "c"}
    assert read(state, "c", 0, 8 * MiB) == before


def test_copy_progress_events_and_an_interrupted_copy_leaves_no_disk(state, tmp_path):
    disks.create(state, "src", 24 * MiB)
    write(state, "src", 0, os.urandom(24 * MiB))
    snapshots.create_snapshot(state, "src", "s")
    p = run(state, "disk", "copy", "s", "cp", "--json")
    # a copy under a new DEK: progress events on stderr (one JSON line each), the disk on stdout
    lines = [json.loads(x) for x in p.stderr.splitlines()]
    assert json.loads(p.stdout)["name"] == "cp"
    assert lines and lines[-1]["event"] == "progress" and lines[-1]["done"] == lines[-1]["total"] == 24 * MiB
    assert len(lines) <= 3  # at most one a second (and the last)
    assert read(state, "cp", 0, 24 * MiB) == read(state, "s", 0, 24 * MiB)
    assert disks.read_disk_header(state.catalog.get_disk("cp")).disk_id != \
        disks.read_disk_header(state.catalog.get_disk("s")).disk_id
    # a copy killed half-way: no disk named dst, and the next copy to that name works
    code = ("import os, sys\n"
            "from blockcrypt.control.state import State\n"
            "from blockcrypt.control import copy\n"
            "st = State.open(sys.argv[1])\n"
            "def prog(done, total):\n"
            "    if done > total // 3: os.kill(os.getpid(), 9)\n"
            "copy.copy(st, 'src', 'half', progress=prog)\n")
    k = subprocess.run([sys.executable, "-c", code, str(state.path)], capture_output=True, text=True)
    assert k.returncode == -9, k.stderr
    assert state.catalog.find_disk("half").kind == diskcopy.KIND_COPYING
    assert "half" not in [r.name for r in state.catalog.list_disks()]
    diskcopy.copy(state, "src", "half")
    assert read(state, "half", 0, MiB) == read(state, "src", 0, MiB)


def test_copy_and_verify_of_a_member_see_the_data_in_its_chain(state):
    """A disk whose data sits in the file below its top (frozen by a snapshot) copies and
    scrubs that data: the allocated ranges are those of every file of the chain."""
    disks.create(state, "d", 64 * MiB)
    a, b = os.urandom(3 * MiB), os.urandom(MiB)
    write(state, "d", 5 * MiB, a)
    snapshots.create_snapshot(state, "d", "s")       # a's chunks are now in the snapshot's file only
    write(state, "d", 40 * MiB, b)                   # b's in the disk's new top file
    diskcopy.copy(state, "d", "c")
    assert read(state, "c", 5 * MiB, len(a)) == a and read(state, "c", 40 * MiB, len(b)) == b
    with disks.open_volume(state, "d", read_only=True) as v:
        ranges = disks.written_sector_ranges(v)
        assert len(v.files) == 2
    ss = 4096
    covered = lambda off, n: any(s0 * ss <= off and off + n <= s1 * ss for s0, s1 in ranges)  # noqa: E731
    assert covered(5 * MiB, len(a)) and covered(40 * MiB, len(b))
    assert sum(s1 - s0 for s0, s1 in ranges) * ss < 16 * MiB      # by data, not by size
