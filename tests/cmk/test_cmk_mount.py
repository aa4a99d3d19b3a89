"""Customer-managed keys end to end: a real vault over HTTPS, a real FUSE mount, loop device and ext4.

DES, disk, mkfs, files; rotate; remount, contents intact; disable the key -> EIO within the check
interval plus one second and the on-revoke hook ran; enable -> back; delete -> unavailable;
recover -> back; policy removed -> unavailable; purge refused under purge protection; a vault
killed and restarted within the grace period -> no I/O error; the audit shows every wrap and
unwrap with the disk id.
"""
import errno
import json
import mmap
import os
import time
from pathlib import Path

import pytest

from blockcrypt.control import des
from support.fusehelpers import Mount, bc_json, direct_io, loopdev, mounted_fs, need, sh, until  # noqa: F401

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent")

INTERVAL_S = 1.0
BOUND_S = INTERVAL_S + 1.0


def disk_states(state) -> dict:
    out = {}
    for m in bc_json(state, "status", codes=(0, 51, 53))["mounts"]:  # 51: a disk stopped, 53: on grace
        for d in m.get("disks", []):
            out[d["name"]] = d
    return out


def test_cmk_end_to_end(root, state, vault, key_name):
    need("losetup", "mkfs.ext4", "fsck.ext4")
    hook_out = root / "hook.txt"
    hook = root / "on-revoke.sh"
    hook.write_text(f"#!/bin/sh\necho \"$1 $BLOCKCRYPT_REASON\" >> {hook_out}\n")
    hook.chmod(0o755)
    state.catalog.set_setting("key_check_interval", str(INTERVAL_S))
    state.catalog.set_setting("key_grace_period", "30")
    state.catalog.set_setting("on_revoke", str(hook))
    rec_des = des.create(state, "des1", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True)
    des.create_disk(state, "cmk1", 128 << 20, "des1")
    des.create_disk(state, "ultra", 16 << 20, "des1", revocation="on-restart")
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()

    # ext4 on the CMK disk, files, then a key rotation and a remount
    files = {f"f{i}.bin": os.urandom(50_000 + i) for i in range(20)}
    with loopdev(m.disk("cmk1")) as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted_fs(dev, root / "fs") as fs:
            for n, data in files.items():
                (fs / n).write_bytes(data)
            sh("sync")
    new_kid = vault.key("rotate", key_name)["key"]["kid"]
    r = des.rotate(state, "des1")
    assert r["activeKey"] == new_kid and sorted(r["rewrapped"]) == ["cmk1", "ultra"]
    m.restart()
    with loopdev(m.disk("cmk1")) as dev:
        assert sh("fsck.ext4", "-n", "-f", dev, check=False).returncode == 0
        with mounted_fs(dev, root / "fs") as fs:
            assert {n: (fs / n).read_bytes() for n in files} == files
    raw = Path(state.catalog.get_disk("cmk1").path).read_bytes()
    assert all(data[:4096] not in raw for data in files.values())

    # both disks held open, like running VMs: the key monitor, not open(), must stop the I/O
    disk = os.open(m.disk("cmk1"), os.O_RDWR | os.O_DIRECT)
    ultra = os.open(m.disk("ultra"), os.O_RDWR | os.O_DIRECT)
    assert direct_io(disk, True) == 0 and direct_io(ultra, True) == 0

    # disable -> EIO within the bound; the hook ran; status says why; the on-restart disk keeps serving
    vault.key("disable", key_name)
    t = until(lambda: direct_io(disk, True) == errno.EIO, BOUND_S + 2)
    assert t is not None and t <= BOUND_S, f"I/O still served {t} s after disable"
    assert direct_io(disk, False) == errno.EIO
    assert direct_io(ultra, True) == 0  # on-restart: the running "VM" keeps its disk
    assert direct_io(m.disk("cmk1"), False) == errno.EIO  # and a new open of cmk1 fails too
    assert until(lambda: hook_out.exists() and "cmk1 KeyDisabled" in hook_out.read_text(), 5) is not None
    st = disk_states(state)["cmk1"]
    assert st["state"] == "KeyUnavailable" and st["keyError"]["reason"] == "KeyDisabled"

    # enable -> back at the next check
    vault.key("enable", key_name)
    assert until(lambda: direct_io(disk, True) == 0, BOUND_S + 1) is not None
    # delete -> unavailable; recover -> back
    vault.key("delete", key_name)
    assert until(lambda: direct_io(disk, True) == errno.EIO, BOUND_S + 1) is not None
    assert disk_states(state)["cmk1"]["keyError"]["reason"] == "KeyDeleted"
    purge = vault.key("purge", key_name, "--yes", check=False)
    assert purge.returncode != 0  # purge protection holds
    vault.key("recover", key_name)
    assert until(lambda: direct_io(disk, True) == 0, BOUND_S + 2) is not None
    # the identity loses its access -> unavailable; access back -> serving
    ident = rec_des.identity["name"]
    vault.cli("policy", "set", "--identity", ident, "--permissions", "get")
    assert until(lambda: direct_io(disk, True) == errno.EIO, BOUND_S + 1) is not None
    assert disk_states(state)["cmk1"]["keyError"]["reason"] == "KeyAccessDenied"
    vault.cli("policy", "set", "--identity", ident, "--permissions", "get,wrapKey,unwrapKey")
    assert until(lambda: direct_io(disk, True) == 0, BOUND_S + 1) is not None

    # a vault that is down is not a revocation: I/O goes on from the cached key within the grace period
    vault.stop()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * INTERVAL_S + 1:
            assert direct_io(disk, True) == 0
            assert direct_io(disk, False) == 0
            time.sleep(0.1)
    finally:
        vault.restart()
    assert direct_io(disk, True) == 0

    # the audit names the disk on the wraps and unwraps
    disk_id = state.catalog.get_disk("cmk1").disk_id
    events = [json.loads(line) for line in vault.cli("audit", "--key", key_name, "--json").stdout.splitlines()
              if line.strip()]
    ops = [e["operation"] for e in events if e.get("diskId") == disk_id]
    assert any("Unwrap" in o for o in ops) and any(o.endswith("Wrap") or "WrapKey" in o for o in ops), ops
    key_events = [json.loads(x) for x in (state.path / "logs" / "key-events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in key_events if e.get("disk") == "cmk1"]
    assert kinds.count("KeyRevoked") >= 3 and kinds.count("KeyRestored") >= 3
    assert any(e["event"] == "KeyRevokedServingUntilRestart" and e["disk"] == "ultra" for e in key_events)
    os.close(ultra)
    os.close(disk)
    m.stop()


def test_auto_rotation_in_a_running_mount(root, state, vault, key_name):
    """--auto-rotate: the mount daemon picks up the vault's newest key version within the interval."""
    state.catalog.set_setting("auto_rotate_interval", "1")
    state.catalog.set_setting("key_check_interval", "0.5")
    des.create(state, "auto", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True,
               auto_rotate=True)
    des.create_disk(state, "a1", 8 << 20, "auto")
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()
    try:
        fd = os.open(m.disk("a1"), os.O_RDWR | os.O_DIRECT)
        try:
            assert direct_io(fd, True) == 0
            new_kid = vault.key("rotate", key_name)["key"]["kid"]
            from blockcrypt.control.disks import read_disk_header
            t = until(lambda: read_disk_header(state.catalog.get_disk("a1")).layers[0].kek_id == new_kid, 10)
            assert t is not None, "the daemon did not re-wrap under the new version"
            assert state.catalog.get_des("auto").active_key == new_kid
            assert direct_io(fd, True) == 0 and direct_io(fd, False) == 0
        finally:
            os.close(fd)
    finally:
        m.stop()


@pytest.fixture(autouse=True, params=["native", "fusepy"])
def frontend(request, monkeypatch):
    """Every test here runs over both front ends: the libfuse 3 session in C and fusepy."""
    monkeypatch.setenv("BLOCKCRYPT_FRONTEND", request.param)
    return request.param
