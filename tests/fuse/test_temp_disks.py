"""Temp disks on a real mount, over both front ends: served as temp/<name>, sparse, gone at
unmount; without encryption at host the file holds the plain sectors (the marker is found
in it) and `status` says so; with it the marker is nowhere in the file, the data survives
closing and reopening within the mount, a kill -9 leaves a file nobody can read (no header,
noise where the marker was) and the next mount deletes it; the settings apply only when a
mount starts; ext4 works on an encrypted temp disk."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blockcrypt.control import disks
from blockcrypt.errors import BlockcryptError
from blockcrypt.format import read_header
from blockcrypt.mount import daemon as bmount
from blockcrypt.storage import LocalFileBacking

from support.fusehelpers import Mount, bc, bc_json, loopdev, mounted_fs, need, sh, wait_for

MiB = 1 << 20
OFF = 3 * MiB + 4096 + 123   # unaligned: read-modify-write inside the engine


def marker() -> bytes:
    return b"TEMP-DISK-MARKER-" + os.urandom(8).hex().encode()


def put(path: Path, data: bytes, off: int = OFF) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, off) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def get(path: Path, n: int, off: int = OFF) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def temp_file(state, name: str) -> Path:
    return state.path / "temp" / f"{name}.tmpdisk"


def mount_entry(state) -> dict:
    (m,) = bmount.status(state)
    return m


@pytest.fixture
def mp(root):
    p = root / "mnt"
    p.mkdir()
    return p


def test_plain_temp_disk_stores_plain_sectors_and_status_says_so(state, mp):
    m = Mount(state, mp, temp_disks=["scratch:64M"]).start()
    t = mp / "temp" / "scratch"
    assert sorted(os.listdir(mp)) == ["disks", "images", "snapshots", "temp"] and os.listdir(mp / "temp") == ["scratch"]
    assert t.stat().st_size == 64 * MiB
    f = temp_file(state, "scratch")
    assert f.stat().st_size == 64 * MiB and f.stat().st_blocks == 0  # sparse
    mk = marker()
    put(t, mk)
    assert get(t, len(mk)) == mk
    with open(f, "rb") as raw:                       # plain sectors: the same bytes, same place
        raw.seek(OFF)
        assert raw.read(len(mk)) == mk
    assert 0 < f.stat().st_blocks * 512 <= 64 * 1024  # only what was written is allocated
    e = mount_entry(state)
    assert e["encryptionAtHost"] is False
    assert e["tempDisks"][0]["encrypted"] is False and "NOT ENCRYPTED" in e["tempDisks"][0]["encryption"]
    text = bc(state, "status").stdout
    assert "encryption at host: off" in text and "temp disk scratch  64M  NOT ENCRYPTED: plain sectors" in text
    m.stop()
    assert not f.exists()                            # gone at unmount


def test_encrypted_temp_disk_hides_the_marker_and_keeps_its_key_for_the_mount(state, mp):
    m = Mount(state, mp, temp_disks=["scratch:64M", "swap:16M"], encryption_at_host=True).start()
    t = mp / "temp" / "scratch"
    mk = marker()
    put(t, mk)
    assert get(t, len(mk)) == mk                     # closed and reopened: same ephemeral key
    f = temp_file(state, "scratch")
    raw = f.read_bytes()
    assert mk not in raw and raw[OFF - 123:OFF - 123 + 4096] != bytes(4096)
    e = mount_entry(state)
    assert e["encryptionAtHost"] is True and all(d["encrypted"] for d in e["tempDisks"])
    assert bc_json(state, "status")["mounts"][0]["encryptionAtHost"] is True
    text = bc(state, "status").stdout
    assert "encryption at host: on" in text and "ephemeral key" in text and "NOT ENCRYPTED" not in text
    assert not [l for l in Path(m.info["log"]).read_text().splitlines() if "WARNING" in l or "ERROR" in l]
    m.stop()
    assert not f.exists() and not temp_file(state, "swap").exists()


def test_after_kill9_the_encrypted_leftover_is_unreadable_and_the_next_mount_deletes_it(state, mp):
    m = Mount(state, mp, temp_disks=["scratch:32M"], encryption_at_host=True).start()
    mk = marker()
    put(mp / "temp" / "scratch", mk)
    m.kill9()
    f = temp_file(state, "scratch")
    assert f.exists()                                # the daemon had no chance to delete it
    raw = f.read_bytes()
    assert mk not in raw
    sector = raw[OFF - 123:OFF - 123 + 4096]
    assert len(set(sector)) > 200                    # noise under a key that died with the daemon
    with LocalFileBacking(str(f), writable=False) as b, pytest.raises(BlockcryptError):
        read_header(b, "scratch")                   # no header, no wrapped key: nothing opens it
    m2 = Mount(state, mp).start()                    # cleans the stale mount, deletes the leftover
    assert not f.exists()
    assert "left by a mount that did not stop cleanly" in Path(m2.info["log"]).read_text()
    assert os.listdir(mp / "temp") == []             # temp/ is there, empty: no temp disk this time
    m2.stop()


def test_settings_apply_only_when_a_mount_starts(state, mp):
    bc(state, "config", "set", "temp_disks", "scratch:16M")
    bc(state, "config", "set", "encryption_at_host", "false")
    disks.create(state, "d1", 16 * MiB)
    m = Mount(state, mp).start()
    assert mount_entry(state)["encryptionAtHost"] is False
    p = bc(state, "config", "set", "encryption_at_host", "true")
    assert "read when a mount starts" in p.stderr
    assert mount_entry(state)["encryptionAtHost"] is False       # the running mount keeps its value
    show = bc_json(state, "disk", "show", "d1")
    assert show["encryptionAtHost"] is False and show["encryptionAtHostFrom"] == f"mount {m.info['id']}"
    mk = marker()
    put(mp / "temp" / "scratch", mk)
    assert mk in temp_file(state, "scratch").read_bytes()        # still plain sectors
    m.stop()
    show = bc_json(state, "disk", "show", "d1")
    assert show["encryptionAtHost"] is True and show["encryptionAtHostFrom"].startswith("setting")
    m = Mount(state, mp).start()                                 # the remount takes the new value
    assert mount_entry(state)["encryptionAtHost"] is True
    assert bc_json(state, "disk", "show", "d1")["encryptionAtHost"] is True
    put(mp / "temp" / "scratch", mk)
    assert mk not in temp_file(state, "scratch").read_bytes()
    m.stop()


def test_ext4_on_an_encrypted_temp_disk_in_a_chosen_temp_dir(state, mp, root):
    need("losetup", "mkfs.ext4", "fsck.ext4")
    tdir = root / "scratch-dir"
    m = Mount(state, mp, temp_disks=["t1:128M"], temp_dir=str(tdir), encryption_at_host=True).start()
    mk = marker()
    with loopdev(mp / "temp" / "t1") as dev:
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted_fs(dev, root / "fs") as fs:
            (fs / "f").write_bytes(mk * 1000)
            os.sync()
        sh("fsck.ext4", "-f", "-n", dev)
        with mounted_fs(dev, root / "fs") as fs:
            assert (fs / "f").read_bytes() == mk * 1000
    f = tdir / "t1.tmpdisk"
    assert f.exists() and mk not in f.read_bytes()
    assert not (state.path / "temp").exists() or not list((state.path / "temp").iterdir())
    m.stop()
    assert not f.exists()


def test_bad_temp_disk_options_are_one_line_errors_and_mount_nothing(state, mp):
    for args, words in ((["--temp-disk", "nosize"], "use NAME:SIZE"),
                        (["--temp-disk", "a:1000"], "4096-byte sectors"),
                        (["--temp-disk", "a:1M", "--temp-disk", "a:2M"], "given twice")):
        p = bc(state, "mount", mp, *args, check=False)
        assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not bmount.mounts_at(str(mp)) and not (state.path / "temp").exists()
