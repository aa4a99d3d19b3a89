"""Issue 15, M12 and the Low items on names and sizes: hostile files and values get a clear
error at once, never a hang or a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt.control import disks
from blockcrypt.errors import CorruptHeader

BIN = Path(sys.executable).with_name("blockcrypt")


def cli(state, *args, expect=0, timeout=20):
    p = subprocess.run([str(BIN), "--state", str(state.path), *args], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    return p


def test_fifo_in_place_of_a_disk_file_does_not_hang(state, tmp_path):
    rec = disks.create(state, "f", 1 << 20)
    disks.create(state, "ok", 1 << 20)
    os.unlink(rec.path)
    os.mkfifo(rec.path, 0o600)
    show = json.loads(cli(state, "disk", "show", "f", "--json").stdout)
    assert show["health"] == "Corrupt" and "not a regular file" in show["error"]
    p = cli(state, "disk", "dump-key", "f", "--out", str(tmp_path / "k"), "--yes-i-understand", expect=20)
    assert "not a regular file" in p.stderr
    r = json.loads(cli(state, "catalog", "rebuild", "--json").stdout)
    assert r["disks"] == ["ok"] and "not a regular file" in r["unreadable"][0]["error"]
    with pytest.raises(CorruptHeader, match="not a regular file"):
        disks.read_disk_header(rec)       # what the key monitor calls, per open disk


@pytest.mark.parametrize("name", ["vm1\n", "a/b", ".hidden", "", "x" * 64])
def test_bad_names_are_refused(state, name):
    p = cli(state, "disk", "create", name, "--size", "1M", expect=2)
    assert "invalid disk name" in p.stderr


@pytest.mark.parametrize("size", ["8E", "16384P", "99999999999999999999999", "9223372036854775808"])
def test_huge_sizes_are_a_clear_error(state, size):
    p = cli(state, "disk", "create", "big", "--size", size, expect=2)
    assert len(p.stderr.strip().splitlines()) == 1 and "invalid size" in p.stderr, p.stderr


def test_rebuild_refuses_header_names_that_are_not_valid(state):
    from blockcrypt.format import write_header
    from blockcrypt.storage import LocalFileBacking
    rec = disks.create(state, "good", 1 << 20)
    h = disks.read_disk_header(rec)
    bad = disks.create(state, "other", 1 << 20)
    with LocalFileBacking(bad.path) as b:
        write_header(b, disks.read_disk_header(bad).evolve(name="../--version"))
    r = json.loads(cli(state, "catalog", "rebuild", "--json").stdout)
    assert r["disks"] == ["good"] and "invalid disk name" in r["unreadable"][0]["error"]
    assert h.name == "good"


def test_vault_names_ending_in_a_newline_are_refused():
    from blockcrypt.vault.server import identities, keyops
    from blockcrypt.errors import UsageError
    keyops.check_name("k1")
    with pytest.raises(keyops.ApiError):
        keyops.check_name("k1\n")
    with pytest.raises(UsageError):
        identities.create_identity(None, "app\n")
