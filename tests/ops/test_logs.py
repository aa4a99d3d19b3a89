"""The mount's log (issue 16): one file per state directory, STATE/logs/mount.log, rotated by
size into a bounded number of files (settings log_max_bytes and log_files), with the
daemon's stderr following the current file; remounts append to it instead of writing a new
file each."""
from __future__ import annotations

import os

from blockcrypt.control import disks
from support.fusehelpers import Mount, cleanup_tree

MiB = 1 << 20


def test_log_rotates_by_size_and_keeps_a_bounded_number(root, state):
    state.catalog.set_setting("log_max_bytes", "65536")
    state.catalog.set_setting("log_files", "2")
    mp = root / "mnt"
    mp.mkdir()
    logs = state.path / "logs"
    try:
        for i in range(3):
            m = Mount(state, mp).start()
            m.stop()
        assert sorted(p.name for p in logs.glob("mount*")) == ["mount.log"]   # remounts append
        assert (logs / "mount.log").read_text().count(" starting: ") == 3
        m = Mount(state, mp).start()
        # every open and close of a disk is a log line: make it write a few hundred KiB
        disks.create(state, "d", 4 * MiB)
        for _ in range(2000):
            with open(m.disk("d"), "rb"):
                pass
        m.stop()
        names = sorted(p.name for p in logs.glob("mount*"))
        assert names == ["mount.log", "mount.log.1", "mount.log.2"], names
        assert all(os.path.getsize(logs / n) <= 65536 + 4096 for n in names)
        assert "stopped" in (logs / "mount.log").read_text()        # the newest file has the end
    finally:
        cleanup_tree(root, state)
