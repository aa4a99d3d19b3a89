"""Issue 15, M3/M4/M5 and the health Low item: headers repair only from their own disk,
`disk show` health tells the truth, one corrupt disk does not stop a rotation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt.control import disks, rotation
from blockcrypt.errors import CorruptHeader
from blockcrypt.format import layout
from blockcrypt.keys.providers.platform import PlatformKeyStore

BIN = Path(sys.executable).with_name("blockcrypt")


def cli(state, *args, expect=0):
    p = subprocess.run([str(BIN), "--state", str(state.path), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
    return p


def _graft_copy_b(src_path, dst_path, bump=0):
    """Copy B of another disk (with a higher sequence number after `bump` header writes)."""
    with open(src_path, "rb") as f:
        f.seek(layout.COPY_B_OFF)
        raw = f.read(layout.COPY_MAX)
    with open(dst_path, "r+b") as f:
        f.seek(layout.COPY_B_OFF)
        f.write(raw)


def test_grafted_copy_b_with_higher_sequence_never_repairs_copy_a(state, tmp_path):
    a = disks.create(state, "a", 1 << 20)
    b = disks.create(state, "b", 1 << 20)
    for _ in range(3):  # b's header gets a higher sequence number than a's
        rotation.rotate_platform_key(state)
        disks.resize(state, "b", disks.read_disk_header(b).size + 4096)
    _graft_copy_b(b.path, a.path)
    with open(a.path, "rb") as f:
        copy_a_before = f.read(layout.COPY_MAX)
    with disks.open_volume(state, "a") as v:   # opens from its own copy A and repairs B from it
        assert v.disk_id == a.disk_id
    with open(a.path, "rb") as f:
        assert f.read(layout.COPY_MAX) == copy_a_before
    assert disks.check_headers(state.catalog.get_disk("a"))["repaired"] == []
    # dump-key exports a's key, never b's
    out = tmp_path / "a.key"
    disks.dump_key(state, "a", str(out))
    with disks.open_volume(state, "a") as v:
        pass
    assert out.stat().st_size == 64


def test_header_naming_another_disk_is_corrupt(state, tmp_path):
    a = disks.create(state, "a", 1 << 20)
    b = disks.create(state, "b", 1 << 20)
    with open(b.path, "rb") as f:
        head = f.read(layout.COPY_B_OFF + layout.COPY_MAX)
    with open(a.path, "r+b") as f:
        f.write(head)                      # both copies of b's header in a's file
    with pytest.raises(CorruptHeader, match="names another disk"):
        disks.read_disk_header(state.catalog.get_disk("a"), repair=True)
    with pytest.raises(CorruptHeader):
        disks.dump_key(state, "a", str(tmp_path / "k"))
    assert not (tmp_path / "k").exists()
    show = json.loads(cli(state, "disk", "show", "a", "--json").stdout)
    assert show["health"] == "Corrupt" and "another disk" in show["error"]


def test_truncated_disk_file_is_reported_and_refused(state):
    rec = disks.create(state, "t", 8 << 20)
    with disks.open_volume(state, "t") as v:
        v.write(7 << 20, b"z" * 4096)
        v.flush()
    os.truncate(rec.path, (1 << 20) + (4 << 20))     # the data past 4 MiB is lost
    show = json.loads(cli(state, "disk", "show", "t", "--json").stdout)
    assert show["health"] == "Truncated", show
    with pytest.raises(CorruptHeader, match="truncated"):
        disks.open_volume(state, "t")


def test_one_corrupt_disk_does_not_stop_the_rotation(state):
    for n in ("a", "b", "c"):
        disks.create(state, n, 1 << 20)
    rb = state.catalog.get_disk("b")
    with open(rb.path, "r+b") as f:                  # both header copies destroyed
        f.write(bytes(layout.COPY_B_OFF + layout.COPY_MAX))
    p = cli(state, "platform-key", "rotate", "--json", expect=5)
    r = json.loads(p.stdout)
    assert sorted(r["rewrapped"]) == ["a", "c"] and list(r["failed"]) == ["b"]
    # --json: stderr is JSON lines, progress events then the one error (docs/CLI.md)
    *events, err = [json.loads(x) for x in p.stderr.splitlines()]
    assert all(e["event"] == "progress" for e in events)
    assert err["error"]["code"] == "Refused" and "b (" in err["error"]["message"]
    store = PlatformKeyStore(state.path / "keys")
    assert store.pending_rotation() is None           # not pending forever
    assert {v["version"] for v in store.versions()} == {1, 2}   # v1 kept: b may need it
    for n in ("a", "c"):
        assert disks.read_disk_header(state.catalog.get_disk(n)).layers[0].kek_id == "platform/2"
    r2 = json.loads(cli(state, "platform-key", "rotate", "--json", expect=5).stdout)
    assert r2["version"] == 3 and sorted(r2["rewrapped"]) == ["a", "c"]


def test_grafted_key_layer_shows_corrupt(state):
    from blockcrypt.format import ROLE_DATA, write_header
    from blockcrypt.storage import LocalFileBacking
    a = disks.create(state, "a", 1 << 20)
    b = disks.create(state, "b", 1 << 20)
    ha, hb = disks.read_disk_header(a), disks.read_disk_header(b)
    with LocalFileBacking(a.path) as bk:
        write_header(bk, ha.with_layer(hb.layer(ROLE_DATA)))   # b's wrapped DEK in a's header
    show = json.loads(cli(state, "disk", "show", "a", "--json").stdout)
    assert show["health"] == "Corrupt", show
