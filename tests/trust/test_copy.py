"""Issue 15, M10/M11 and the copy-time Low item: a copy is of one moment, a killed copy is
never Healthy, and copy time follows the data, not the size."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockcrypt.control import copy as diskcopy, disks
from blockcrypt.errors import Busy

BIN = Path(sys.executable).with_name("blockcrypt")


def cli(state, *args, expect=0):
    p = subprocess.run([str(BIN), "--state", str(state.path), *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
    return p


def test_copy_of_a_disk_open_for_writing_is_refused(state):
    disks.create(state, "src", 1 << 20)
    with disks.open_volume(state, "src") as v:   # a writer, as a mount is
        v.write(0, b"moving")
        with pytest.raises(Busy, match="no single moment"):
            diskcopy.copy(state, "src", "dst")
    assert state.catalog.find_disk("dst") is None
    assert diskcopy.copy(state, "src", "dst").name == "dst"   # closed: copies
    with disks.open_volume(state, "dst", read_only=True) as v:
        assert v.read(0, 6) == b"moving"


def test_no_writer_opens_the_source_while_it_is_copied(state):
    disks.create(state, "src", 8 << 20)
    seen = []

    def progress(done, total):
        if not seen:
            with pytest.raises(Busy):
                disks.open_volume(state, "src")
            seen.append(done)
    with disks.open_volume(state, "src") as v:
        v.write(0, b"x" * (8 << 20))
    diskcopy.copy(state, "src", "dst", progress=progress)
    assert seen


def test_killed_copy_is_not_healthy(state):
    disks.create(state, "big", 1 << 30)
    block = os.urandom(1 << 20) * 8
    with disks.open_volume(state, "big") as v:
        for i in range(0, 1 << 30, 8 << 20):
            v.write(i, block)
    p = subprocess.Popen([str(BIN), "--state", str(state.path), "disk", "copy", "big", "half"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while state.catalog.find_disk("half") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    show = json.loads(cli(state, "disk", "show", "half", "--json").stdout)
    assert show["health"] == "Copying" and "running" in show["error"], show
    p.send_signal(signal.SIGKILL)
    p.wait()
    show = json.loads(cli(state, "disk", "show", "half", "--json").stdout)
    assert show["health"] == "Copying" and "interrupted" in show["error"], show
    cli(state, "disk", "delete", "half", "--yes")
    assert disks.copy_in_progress(state, "half") is None


def test_copy_time_follows_data_not_size(state):
    """A 1 TiB sparse disk with 1 MiB of data copies in seconds (it took ~2 min per TiB of
    zeros to read before)."""
    disks.create(state, "huge", 1 << 40)
    with disks.open_volume(state, "huge") as v:
        v.write(512 << 30, b"needle" * 1000)
    t0 = time.monotonic()
    diskcopy.copy(state, "huge", "huge2")
    assert time.monotonic() - t0 < 10
    with disks.open_volume(state, "huge2", read_only=True) as v:
        assert v.read(512 << 30, 6) == b"needle"
