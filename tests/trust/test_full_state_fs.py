"""Issue 15, M13: on a full state file system, disk delete, disk resize and config set give one
line (no traceback), and a failed resize leaves header and catalog agreeing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt.control import disks
from blockcrypt.control.state import State

BIN = Path(sys.executable).with_name("blockcrypt")


@pytest.fixture
def small_state(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], check=True)
    try:
        st = State.init(d / "state")
        yield st
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def fill(path: Path):
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        except OSError:
            pass


def cli(st, *args):
    p = subprocess.run([str(BIN), "--state", str(st.path), *args], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    if p.returncode:
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("blockcrypt: error: "), p.stderr
    return p


def test_full_state_fs_gives_one_line_and_loses_nothing(small_state):
    st = small_state
    for n in ("a", "b", "c"):
        disks.create(st, n, 1 << 20)
    with disks.open_volume(st, "a") as v:
        v.write(0, b"data" * 1024)
        v.flush()
    fill(st.path / "filler")
    failures = 0
    for args in (("config", "set", "key_check_interval", "5"), ("disk", "resize", "b", "--size", "2M"),
                 ("disk", "delete", "c", "--yes"), ("disk", "create", "d", "--size", "1M"),
                 ("config", "set", "on_revoke", "x" * 100000)):
        failures += cli(st, *args).returncode != 0
    assert failures >= 1           # the file system is really full
    st2 = State.open(st.path)
    for rec in st2.catalog.list_disks():
        h = disks.read_disk_header(rec)
        assert h.size == rec.size, (rec.name, h.size, rec.size)   # header and catalog agree
        assert Path(rec.path).exists()
    with disks.open_volume(st2, "a", read_only=True) as v:
        assert v.read(0, 4) == b"data"
    os.unlink(st.path / "filler")
    assert cli(st, "config", "set", "key_check_interval", "5").returncode == 0
