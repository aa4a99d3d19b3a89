"""Families on customer-managed keys, against a real vault over HTTPS: snapshots and images of
a customer-key disk stay on its DES; a disk from a customer-key image on another DES is
refused with one line naming `disk copy` (which does it, with a new DEK); a DES of type
EncryptionAtRestWithPlatformAndCustomerKeys gives double-encrypted snapshots; a DES rotation
re-wraps every member without rewriting data; disabling the key stops every open member of a
real mount (disk, snapshot, image) within the check interval plus one second."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt.control import des, disks, snapshots
from blockcrypt.errors import Refused
from support.fusehelpers import Mount, bc_json, wait_for

from test_cmk_mount import BOUND_S, INTERVAL_S, direct_io, until

MiB = 1 << 20
BIN = Path(sys.executable).parent / "blockcrypt"


def write(st, name, off, data):
    with disks.open_volume(st, name) as v:
        v.write(off, data)
        v.flush()


def data_area(st, name, n=4 * MiB) -> bytes:
    """The stored bytes of a member's own file: its data area (its files are sparse and huge)."""
    with open(st.catalog.get_disk(name).path, "rb") as f:
        f.seek(MiB)
        return f.read(n)


def read(st, name, off, n):
    with disks.open_volume(st, name, read_only=True) as v:
        return v.read(off, n)


def test_family_keeps_the_des_and_another_des_is_refused(state, vault, des_rec, key_name):
    des.create_disk(state, "vm", 8 * MiB, "des1")
    write(state, "vm", 0, b"cmk" * 1000)
    s = snapshots.create_snapshot(state, "vm", "s")
    img = snapshots.create_image(state, "img", "s")
    for rec in (s, img):
        j = snapshots.to_json(state, rec)
        assert j["encryption"]["type"] == "EncryptionAtRestWithCustomerKey"
        assert j["encryption"]["diskEncryptionSetId"] == "des1"
        h = disks.read_disk_header(rec)
        assert h.layers[0].provider == "vault" and h.layers[0].kek_id == des_rec.active_key
    c = snapshots.create_disk_from(state, "c", "img", des="des1")
    assert c.des == "des1" and read(state, "c", 0, 3) == b"cmk"
    vault.key("create", key_name + "-2")
    des.create(state, "des2", f"{vault.url}/keys/{key_name}-2", vault_dir=str(vault.dir), grant=True)
    with pytest.raises(Refused, match=r"must use its disk encryption set 'des1'.*blockcrypt disk copy img x "
                                      r"--des des2"):
        snapshots.create_disk_from(state, "x", "img", des="des2")
    with pytest.raises(Refused, match="blockcrypt disk copy img x --des ''"):
        snapshots.create_disk_from(state, "x", "img", des="")  # off the customer key: a copy too
    assert state.catalog.find_disk("x") is None
    e = dict(os.environ, BLOCKCRYPT_STATE=str(state.path))
    p = subprocess.run([str(BIN), "disk", "create", "x", "--source", "img", "--des", "des2"], capture_output=True,
                       text=True, env=e, timeout=60)
    assert p.returncode == 5 and len(p.stderr.strip().splitlines()) == 1 and "disk copy" in p.stderr
    # disk copy is the way: a new DEK under des2
    from blockcrypt.control import copy as diskcopy
    x = diskcopy.copy(state, "img", "x", des="des2")
    assert x.des == "des2" and read(state, "x", 0, 3) == b"cmk"
    hx = disks.read_disk_header(x)
    assert hx.layers[0].kek_id.startswith(f"{vault.url}/keys/{key_name}-2/") and not hx.overlay


def test_disk_from_a_platform_image_on_a_des_is_a_copy_with_progress(state, vault, des_rec):
    disks.create(state, "p", 16 * MiB)
    write(state, "p", 5 * MiB, b"platform" * 512)
    snapshots.create_snapshot(state, "p", "ps")
    snapshots.create_image(state, "pimg", "ps")
    seen = []
    c = snapshots.create_disk_from(state, "onkey", "pimg", des="des1", progress=lambda d, t: seen.append((d, t)))
    assert c.des == "des1" and c.encryption_type == "EncryptionAtRestWithCustomerKey" and c.kind == "disk"
    h = disks.read_disk_header(c)
    assert not h.overlay and h.layers[0].kek_id == des_rec.active_key  # its own DEK, no chain
    assert seen and seen[-1] == (16 * MiB, 16 * MiB)
    assert read(state, "onkey", 5 * MiB, 8) == b"platform"
    assert c.source_id == state.catalog.get_disk("pimg").disk_id


def test_double_des_gives_double_snapshots(state, vault, key_name):
    des.create(state, "dd", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True,
               enc_type=disks.TYPE_DOUBLE)
    des.create_disk(state, "vm", 4 * MiB, "dd")
    write(state, "vm", 4096, b"two layers")
    s = snapshots.create_snapshot(state, "vm", "s")
    write(state, "vm", 4096, b"changed!!!")
    j = snapshots.to_json(state, s)
    assert j["doubleEncryption"] is True and j["encryption"]["type"] == disks.TYPE_DOUBLE
    assert read(state, "s", 4096, 10) == b"two layers" and read(state, "vm", 4096, 10) == b"changed!!!"
    c = snapshots.create_disk_from(state, "c", "s")
    assert snapshots.to_json(state, c)["doubleEncryption"] is True
    assert read(state, "c", 4096, 10) == b"two layers"
    r = disks.verify(state, "c")
    assert r["ok"], r


def test_rotation_rewraps_every_member_without_rewriting_data(state, vault, des_rec, key_name):
    des.create_disk(state, "vm", 4 * MiB, "des1")
    write(state, "vm", 0, b"v1" * 5000)
    snapshots.create_snapshot(state, "vm", "s")
    snapshots.create_image(state, "i", "s")
    snapshots.create_disk_from(state, "c", "i")
    members = ["c", "i", "s", "vm"]
    before = {n: data_area(state, n) for n in members}
    new_kid = vault.key("rotate", key_name)["key"]["kid"]
    r = des.rotate(state, "des1")
    assert r["activeKey"] == new_kid and sorted(r["rewrapped"]) == members
    for n in members:
        rec = state.catalog.get_disk(n)
        assert disks.read_disk_header(rec).layers[0].kek_id == new_kid
        assert data_area(state, n) == before[n]
        assert read(state, n, 0, 2) == b"v1"


def test_revoking_the_key_stops_every_open_member(root, state, vault, key_name):
    state.catalog.set_setting("key_check_interval", str(INTERVAL_S))
    state.catalog.set_setting("key_grace_period", "30")
    des.create(state, "des1", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True)
    des.create_disk(state, "vm", 16 * MiB, "des1")
    write(state, "vm", MiB, os.urandom(4096))
    snapshots.create_snapshot(state, "vm", "s")
    snapshots.create_image(state, "img", "s")
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()
    try:
        paths = {"vm": m.disk("vm"), "s": mp / "snapshots" / "s", "img": mp / "images" / "img"}
        for p in paths.values():
            wait_for(p.exists, what=str(p))
        fds = {"vm": os.open(paths["vm"], os.O_RDWR | os.O_DIRECT)}
        fds.update({n: os.open(paths[n], os.O_RDONLY | os.O_DIRECT) for n in ("s", "img")})
        try:
            assert direct_io(fds["vm"], True) == 0
            assert all(direct_io(fds[n], False) == 0 for n in ("s", "img"))
            vault.key("disable", key_name)
            for n in ("vm", "s", "img"):
                t = until(lambda n=n: direct_io(fds[n], False) == errno.EIO, BOUND_S + 2)
                assert t is not None and t <= BOUND_S + 0.5, f"{n} still served after disable"
            states = {d["name"]: d["state"] for mm in bc_json(state, "status", codes=(51,))["mounts"]
                      for d in mm["disks"]}
            assert {states.get(n) for n in ("vm", "s", "img")} == {"KeyUnavailable"}, states
            vault.key("enable", key_name)
            for n in ("vm", "s", "img"):
                assert until(lambda n=n: direct_io(fds[n], False) == 0, BOUND_S + 2) is not None, n
        finally:
            for fd in fds.values():
                os.close(fd)
    finally:
        m.stop()
