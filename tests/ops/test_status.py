"""Truthful status (issue 16), each case with a real mount: `blockcrypt status` shows one state
per disk (open, KeyUnavailable with its reason, ServingOnGrace with the seconds left, Corrupt)
and exits 0 only when all is well: 50 a dead mount (kill -9 of the daemon), 51 a stopped disk
(a revoked vault key; past the grace period), 53 a disk serving on its grace period (the vault
stopped). The monitor's warning during the outage is logged once, not every interval, and a
line says when the vault answers again. (52, Corrupt, is tested with tampered sectors in
tests/fuse/test_mount_double.py and a smashed header in tests/fuse/test_mount_basic.py.)"""
from __future__ import annotations

import errno
import json
import os
import time

import pytest

from blockcrypt.control import des, disks
from support.fusehelpers import Mount, bc, bc_json, cleanup_tree, direct_io, until, wait_for



MiB = 1 << 20


def _status(state, code):
    r = bc(state, "status", "--json", codes=(code,))
    return json.loads(r.stdout), r


def _disk(st, name):
    (d,) = [d for m in st["mounts"] for d in m["disks"] if d["name"] == name]
    return d


def test_dead_mount_exits_50(root, state):
    disks.create(state, "d", 8 * MiB)
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()
    try:
        with open(m.disk("d"), "rb"):
            st, _ = _status(state, 0)
            assert st["exitCode"] == 0 and _disk(st, "d")["state"] == "open"
        m.kill9()
        st, r = _status(state, 50)
        assert st["exitCode"] == 50 and st["mounts"][0]["state"].startswith("dead (stale mount")
        assert len(r.stderr.strip().splitlines()) == 1   # with --json the error is one JSON line
        err = json.loads(r.stderr)["error"]
        assert err["code"] == "StatusMountDead" and err["exitCode"] == 50 and "umount" in err["message"]
        r = bc(state, "status", codes=(50,))
        assert "dead (stale mount" in r.stdout
        assert r.stderr.startswith("blockcrypt: error: mount ") and "umount" in r.stderr
        bc(state, "umount", mp)
        assert bc_json(state, "status")["mounts"] == []   # cleaned up: 0 again
    finally:
        cleanup_tree(root, state)


def test_revoked_key_exits_51_and_disk_show_says_why(root, state, vault, key_name):
    state.catalog.set_setting("key_check_interval", "1")
    des.create(state, "des1", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True)
    des.create_disk(state, "vm", 16 * MiB, "des1")
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()
    fd = os.open(m.disk("vm"), os.O_RDWR | os.O_DIRECT)
    try:
        assert direct_io(fd, True) == 0
        wait_for(lambda: _disk(_status(state, 0)[0], "vm").get("lastKeyCheck"), 5, "a key check")
        d = _disk(_status(state, 0)[0], "vm")
        assert d["state"] == "open" and d["lastKeyCheck"].endswith("Z")
        vault.key("disable", key_name)
        assert until(lambda: direct_io(fd, True) == errno.EIO, 3) is not None
        st, r = _status(state, 51)
        d = _disk(st, "vm")
        assert d["state"] == "KeyUnavailable" and d["keyError"]["reason"] == "KeyDisabled" and d["serving"] is False
        assert "disks/vm is stopped (KeyDisabled)" in r.stderr
        assert "KeyUnavailable (KeyDisabled)" in bc(state, "status", codes=(51,)).stdout
        show = bc_json(state, "disk", "show", "vm")
        assert show["state"] == "KeyUnavailable" and show["live"]["keyError"]["reason"] == "KeyDisabled"
        assert show["live"]["mountpoint"] == str(mp)
        assert "KeyUnavailable (KeyDisabled) in the mount at" in bc(state, "disk", "show", "vm").stdout
        vault.key("enable", key_name)
        assert until(lambda: direct_io(fd, True) == 0, 3) is not None
        st, _ = _status(state, 0)
        assert _disk(st, "vm")["state"] == "open"
        assert bc_json(state, "disk", "show", "vm")["state"] == "open"
    finally:
        os.close(fd)
        vault.key("enable", key_name, check=False)
        cleanup_tree(root, state)
    assert bc_json(state, "disk", "show", "vm")["state"] == "closed"


def test_vault_outage_serves_on_grace_then_stops_then_recovers(root, state, vault, key_name):
    grace_s = 8.0
    state.catalog.set_setting("key_check_interval", "0.5")
    state.catalog.set_setting("key_grace_period", str(grace_s))
    des.create(state, "des1", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True)
    des.create_disk(state, "vm", 16 * MiB, "des1")
    des.create_disk(state, "vm2", 16 * MiB, "des1")
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()
    fds = [os.open(m.disk(n), os.O_RDWR | os.O_DIRECT) for n in ("vm", "vm2")]
    port = vault.port
    try:
        assert all(direct_io(fd, True) == 0 for fd in fds)
        wait_for(lambda: _disk(_status(state, 0)[0], "vm").get("lastKeyCheck"), 5, "a key check")
        vault.stop()
        t0 = time.monotonic()
        wait_for(lambda: bc(state, "status", check=False).returncode == 53, 10, "ServingOnGrace")
        st, r = _status(state, 53)
        for n in ("vm", "vm2"):
            d = _disk(st, n)
            assert d["state"] == "ServingOnGrace" and d["serving"] is True
            assert 0 < d["graceSecondsLeft"] <= grace_s and d["graceEndsAt"].endswith("Z")
        assert "serves on its grace period" in r.stderr
        assert "ServingOnGrace (" in bc(state, "status", codes=(53,)).stdout
        assert all(direct_io(fd, True) == 0 for fd in fds)     # still serving
        # past the grace period: stopped, 51
        wait_for(lambda: bc(state, "status", check=False).returncode == 51, grace_s + 5, "stopped after grace")
        assert time.monotonic() - t0 >= grace_s - 1
        st, _ = _status(state, 51)
        assert {_disk(st, n)["state"] for n in ("vm", "vm2")} == {"KeyUnavailable"}
        assert all(direct_io(fd, True) == errno.EIO for fd in fds)
        # a dozen checks failed, but the outage warning is logged once (per key, not per disk)
        log = (state.path / "logs" / "mount.log").read_text()
        assert log.count("vault unreachable") == 1, log[-3000:]
        vault.start(listen=f"127.0.0.1:{port}")
        assert until(lambda: all(direct_io(fd, True) == 0 for fd in fds), 5) is not None
        wait_for(lambda: bc(state, "status", check=False).returncode == 0, 5, "open again")
        wait_for(lambda: "answers again" in (state.path / "logs" / "mount.log").read_text(), 5, "recovery line")
    finally:
        for fd in fds:
            os.close(fd)
        if vault.proc is None:
            vault.start(listen=f"127.0.0.1:{port}")
        cleanup_tree(root, state)
