"""Issue 14: re-wraps in batches (control/rotation.py) with two header sync passes per batch
(format/headerio.py write_headers), still atomic per disk: interrupted at every step of a
batch, and killed with SIGKILL at every step in a real process, every disk opens under its
old or its new key version, and running the rotation again finishes it."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest

from blockcrypt.control import disks, rotation
from blockcrypt.control.disks import open_volume
from blockcrypt.format import header as hdr
from blockcrypt.format import headerio, layout, read_header, write_headers
from blockcrypt.keys.providers.platform import PlatformKeyStore
from blockcrypt.storage import LocalFileBacking
from support.rotationkill import disks_done, rotate_and_kill


def _fill(state, names):
    for i, n in enumerate(names):
        disks.create(state, n, 1 << 20)
        with open_volume(state, n) as v:
            v.write(4096 * (i % 7), n.encode() * 50)


def _contents(state, names):
    out = {}
    for n in names:
        with open_volume(state, n) as v:
            out[n] = v.read(0, 8 * 4096)
    return out


def _kek_ids(state, names):
    return {n: disks.read_disk_header(state.catalog.get_disk(n)).layers[0].kek_id for n in names}


class Crash(Exception):
    pass


def test_batches_rewrap_every_disk_with_two_sync_passes_each(state, monkeypatch):
    names = [f"d{i:02d}" for i in range(11)]
    _fill(state, names)
    before = _contents(state, names)
    passes = []
    real = rotation._sync_pass
    monkeypatch.setattr(rotation, "_sync_pass", lambda bs, pool=None: (passes.append(len(bs)), real(bs, pool)))
    monkeypatch.setattr(rotation, "REWRAP_BATCH", 4)
    r = rotation.rotate_platform_key(state)
    assert r["rewrapped"] == names and r["failed"] == {}
    assert passes == [4, 4, 4, 4, 3, 3]          # batches of 4, 4, 3: copy A pass, copy B pass
    assert set(_kek_ids(state, names).values()) == {"platform/2"}
    assert _contents(state, names) == before


@pytest.mark.parametrize("at", ["rewrap-first", "rewrap-last", "write", "sync-a", "sync-b"])
def test_interrupted_inside_a_batch_every_disk_opens(state, monkeypatch, at):
    names = [f"d{i}" for i in range(6)]
    _fill(state, names)
    before = _contents(state, names)
    monkeypatch.setattr(rotation, "REWRAP_BATCH", 3)
    real = rotation._sync_pass
    calls = []

    def sync(bs, pool=None):
        real(bs, pool)
        calls.append(len(bs))
        if (at, len(calls)) in (("sync-a", 3), ("sync-b", 4)):   # in the second batch
            raise Crash
    monkeypatch.setattr(rotation, "_sync_pass", sync)

    def on_step(step, detail):
        if (at == "rewrap-first" and (step, detail) == ("rewrap", "d3")) or \
           (at == "rewrap-last" and (step, detail) == ("rewrap", "d5")) or \
           (at == "write" and step == "write" and detail == ["d3", "d4", "d5"]):
            raise Crash

    with pytest.raises(Crash):
        rotation.rotate_platform_key(state, on_step=on_step)
    ids = _kek_ids(state, names)
    assert all(ids[n] == "platform/2" for n in names[:3])      # the first batch was written
    second = {ids[n] for n in names[3:]}
    assert second == ({"platform/2"} if at in ("sync-a", "sync-b") else {"platform/1"})
    assert _contents(state, names) == before
    r = rotation.rotate_platform_key(state)
    assert r["version"] == 2 and r["failed"] == {}
    assert set(_kek_ids(state, names).values()) == {"platform/2"}
    assert [v["version"] for v in PlatformKeyStore(state.path / "keys").versions()] == [2]
    assert _contents(state, names) == before


def test_write_headers_torn_copy_a_keeps_the_old_header(state):
    """A crash during pass A: a disk whose copy A is torn reads its old header from copy B;
    one whose copy A made it reads the new one; after pass A every disk has the new one."""
    names = ["a", "b", "c"]
    _fill(state, names)
    backings = [LocalFileBacking(state.catalog.get_disk(n).path) for n in names]
    olds = [read_header(b) for b in backings]
    news = [o.with_layer(replace(o.layers[0], kek_id="platform/9")) for o in olds]

    class Stop(Exception):
        pass

    def crash_after_pass_a(bs):
        raw = hdr.pack(replace(news[1], seqno=news[1].seqno + 1), hdr.MAGIC_A)
        os.pwrite(bs[1].fd, raw[:40] + bytes(60), layout.COPY_A_OFF)   # disk b's copy A torn
        raise Stop
    with pytest.raises(Stop):
        write_headers(list(zip(backings, news)), sync=crash_after_pass_a)
    assert [read_header(b).layers[0].kek_id for b in backings] == ["platform/9", "platform/1", "platform/9"]
    written = write_headers([(b, o) for b, o in zip(backings, olds)])
    for b, w in zip(backings, written):
        assert read_header(b) == w and headerio.header_copy_state(b) == {"A": w.seqno, "B": w.seqno}
        b.close()
    assert _kek_ids(state, names) == {n: "platform/1" for n in names}


@pytest.mark.parametrize("target,done", [("rewrap-d13", 8), ("write-1", 8), ("synced-A-1", 16),
                                         ("synced-B-1", 16), ("synced-A-3", 30)])
def test_sigkill_at_every_step_of_a_batch(state, tmp_path, target, done):
    names = [f"d{i:02d}" for i in range(30)]
    _fill(state, names)
    before = _contents(state, names)
    if not target.startswith("rewrap-"):
        assert min(disks_done(target, 8), 30) == done
    rotate_and_kill(tmp_path, state.path, target, batch=8)
    ids = _kek_ids(state, names)
    assert set(ids.values()) <= {"platform/1", "platform/2"}
    # batches before the one killed are written; its own disks are new only once pass A is durable
    assert {n for n, k in ids.items() if k == "platform/2"} == set(names[:done]), (target, ids)
    assert _contents(state, names) == before      # every disk opens, its data unchanged
    r = rotation.rotate_platform_key(state)
    assert r["version"] == 2 and r["failed"] == {}
    assert set(_kek_ids(state, names).values()) == {"platform/2"}
    assert [v["version"] for v in PlatformKeyStore(state.path / "keys").versions()] == [2]
    assert _contents(state, names) == before
