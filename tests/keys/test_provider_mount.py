"""Each customer-key provider end to end over a real FUSE mount, loop device and ext4.

A DES on the provider's key (its real server), a disk on it, ext4 and files; rotate the key and
re-wrap (no data rewritten); remount, contents intact. Then with the disk held open: the key
disabled -> EIO within the check interval plus one second; enabled -> serving; access removed
-> EIO; restored -> serving; the server gone -> still serving from the cached key (grace
period); a remount, fsck and every file back. A provider whose revocation is final (KMIP Revoke)
is revoked last: EIO within the bound."""
from __future__ import annotations

import errno
import json
import mmap
import os
import time

import pytest

from blockcrypt.control import des
from blockcrypt.format import ROLE_DATA
from support.fusehelpers import Mount, loopdev, mounted_fs, need, sh, until
from support.treefixtures import root  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent")

INTERVAL_S = 1.0
BOUND_S = INTERVAL_S + 1.0
PROBE_OFF = 0   # the first 4 KiB (ext4's boot area, unused): read it and write the same bytes back


def probe(fd: int) -> int:
    """One O_DIRECT read of 4 KiB and a write of the same bytes: 0 or the errno."""
    buf = mmap.mmap(-1, 4096)
    try:
        os.preadv(fd, [buf], PROBE_OFF)
        os.pwritev(fd, [buf], PROBE_OFF)
        return 0
    except OSError as e:
        return e.errno
    finally:
        buf.close()


def assert_stops(fd: int, what: str) -> None:
    """I/O on ``fd`` answers EIO within the bound (the check interval plus one second)."""
    t = until(lambda: probe(fd) == errno.EIO, BOUND_S + 2)
    assert t is not None and t <= BOUND_S, f"I/O still served {t} s after {what}"


def test_disk_on_provider_end_to_end(root, des_harness):
    need("losetup", "mkfs.ext4", "fsck.ext4")
    h = des_harness
    state = h.state
    state.catalog.set_setting("key_check_interval", str(INTERVAL_S))
    state.catalog.set_setting("key_grace_period", "60")
    des.create_disk(state, "d1", 64 << 20, h.des.name)
    rec = state.catalog.get_disk("d1")
    from blockcrypt.control.disks import read_disk_header
    assert read_disk_header(rec).layer(ROLE_DATA).provider == h.prov.NAME
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()
    try:
        files = {f"f{i}.bin": os.urandom(40_000 + i) for i in range(12)}
        with loopdev(m.disk("d1")) as dev:
            sh("mkfs.ext4", "-q", "-F", dev)
            with mounted_fs(dev, root / "fs") as fs:
                for n, data in files.items():
                    (fs / n).write_bytes(data)
                sh("sync")

        # rotate: a new key version, every DEK re-wrapped, no data rewritten
        before = read_disk_header(rec).layer(ROLE_DATA).kek_id
        new_ref = h.rotate()
        r = des.rotate(state, h.des.name)
        after = read_disk_header(rec).layer(ROLE_DATA).kek_id
        assert r["rewrapped"] == ["d1"] and after == new_ref != before
        m.restart()
        with loopdev(m.disk("d1")) as dev:
            assert sh("fsck.ext4", "-n", "-f", dev, check=False).returncode == 0
            with mounted_fs(dev, root / "fs") as fs:
                assert {n: (fs / n).read_bytes() for n in files} == files

        fd = os.open(m.disk("d1"), os.O_RDWR | os.O_DIRECT)
        try:
            assert probe(fd) == 0
            expected = []
            if h.reversible_disable:
                # disabled -> EIO within the bound; enabled -> back
                h.disable()
                assert_stops(fd, "the key was disabled")
                h.enable()
                assert until(lambda: probe(fd) == 0, BOUND_S + 2) is not None
                expected.append("KeyDisabled")
            # access removed -> EIO; given back -> serving
            h.deny()
            assert_stops(fd, "access was removed")
            h.allow()
            assert until(lambda: probe(fd) == 0, BOUND_S + 2) is not None
            expected.append("KeyAccessDenied")
            # the server away: not a revocation; I/O goes on from the cached key
            if h.has_server:
                h.stop()
                try:
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < 3 * INTERVAL_S + 1:
                        assert probe(fd) == 0
                        time.sleep(0.1)
                finally:
                    h.start()
            assert probe(fd) == 0
        finally:
            os.close(fd)

        # restored: every byte back after a remount
        m.restart()
        with loopdev(m.disk("d1")) as dev:
            assert sh("fsck.ext4", "-n", "-f", dev, check=False).returncode == 0
            with mounted_fs(dev, root / "fs") as fs:
                assert {n: (fs / n).read_bytes() for n in files} == files
        if not h.reversible_disable:
            # a final revocation (KMIP Revoke): the mounted disk stops within the bound, for good
            fd = os.open(m.disk("d1"), os.O_RDWR | os.O_DIRECT)
            try:
                assert probe(fd) == 0
                h.disable()
                assert_stops(fd, "the key was revoked")
                expected.append("KeyDisabled")
            finally:
                os.close(fd)
        events = [json.loads(line) for line in (state.logs_dir / "key-events.jsonl").read_text().splitlines()]
        revoked = [e["reason"] for e in events if e["event"] == "KeyRevoked"]
        assert revoked == expected
        assert sum(e["event"] == "KeyRestored" for e in events) == len(expected) - (not h.reversible_disable)
    finally:
        m.stop()
