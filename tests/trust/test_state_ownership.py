"""Issue 15, C1/H1: disk files belong to their state directory, and init never takes over a directory.

C1: a copied state directory (``cp -a prod copy``) must act on its own copies of the
disk files: the catalog stores paths relative to the state directory, and a writable
open takes an exclusive lock on the disk file itself, so no second writer (another
mount, state directory or host) can write it at the same time."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt.control import disks, rotation
from blockcrypt.control.state import State
from blockcrypt.errors import Busy, StateError

BIN = Path(sys.executable).with_name("blockcrypt")


def run(state, *args, expect=0):
    p = subprocess.run([str(BIN), "--state", str(state), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
    return p


def test_catalog_stores_paths_relative_to_the_state_directory(state):
    rec = disks.create(state, "vm1", 1 << 20)
    stored = state.catalog._conn().execute("SELECT path FROM disks WHERE name='vm1'").fetchone()[0]
    assert stored == f"disks/{rec.disk_id}.img"
    assert rec.path == str(state.path / "disks" / f"{rec.disk_id}.img")


def test_copied_state_directory_acts_on_its_own_files(tmp_path):
    prod = State.init(tmp_path / "prod")
    disks.create(prod, "vm1", 1 << 20)
    disks.create(prod, "vm2", 1 << 20)
    with disks.open_volume(prod, "vm1") as v:
        v.write(0, b"prod data" * 100)
        v.flush()
    prod_files = {p.name: p.read_bytes() for p in prod.disks_dir.iterdir()}
    shutil.copytree(prod.path, tmp_path / "copy", symlinks=True)
    copy = State.open(tmp_path / "copy")
    assert all(Path(r.path).parent == copy.disks_dir for r in copy.catalog.list_disks())
    # rotating the copy's platform key re-wraps the copy's headers only
    rotation.rotate_platform_key(copy)
    assert {p.name: p.read_bytes() for p in prod.disks_dir.iterdir()} == prod_files
    with disks.open_volume(prod, "vm1", read_only=True) as v:
        assert v.read(0, 9) == b"prod data"
    # deleting in the copy leaves prod's file alone
    rec = disks.delete(copy, "vm2")
    assert not Path(rec.path).exists()
    assert (prod.disks_dir / Path(rec.path).name).exists()
    # and both can be open for writing at once: they are different files
    with disks.open_volume(prod, "vm1") as a, disks.open_volume(copy, "vm1") as b:
        a.write(0, b"A")
        b.write(0, b"B")


def test_old_catalog_with_absolute_paths_is_converted(tmp_path):
    prod = State.init(tmp_path / "prod")
    rec = disks.create(prod, "vm1", 1 << 20)
    c = prod.catalog._conn()
    c.execute("UPDATE disks SET path = ? WHERE name = 'vm1'", (rec.path,))  # as f0b5cae wrote it
    shutil.copytree(prod.path, tmp_path / "copy")
    copy = State.open(tmp_path / "copy")
    assert copy.catalog.get_disk("vm1").path == str(copy.disks_dir / f"{rec.disk_id}.img")
    assert copy.catalog._conn().execute("SELECT path FROM disks").fetchone()[0] == f"disks/{rec.disk_id}.img"


def test_second_writer_of_a_disk_file_is_refused(state, tmp_path):
    disks.create(state, "vm1", 1 << 20)
    with disks.open_volume(state, "vm1") as v:
        v.write(0, b"x")
        # a second state directory whose catalog names the same file (a symlinked disks/,
        # a shared file system, another host): refused while the first writer has it open
        other = tmp_path / "other"
        other.mkdir()
        with sqlite3.connect(other / "catalog.db") as dst:
            state.catalog._conn().backup(dst)
        shutil.copytree(state.path / "keys", other / "keys")
        (other / "disks").symlink_to(state.disks_dir)
        with pytest.raises(Busy, match="open for writing by another process"):
            disks.open_volume(State.open(other), "vm1")
        with pytest.raises(Busy):
            disks.open_volume(state, "vm1")
        with disks.open_volume(state, "vm1", read_only=True) as r:  # readers are not locked out
            assert r.read(0, 1) == b"x"
        # header updates (key rotation of a mounted disk) still run
        rotation.rotate_platform_key(state)
    with disks.open_volume(state, "vm1") as v:  # released on close
        assert v.read(0, 1) == b"x"


# --- H1: init never takes over a directory that is not ours ---------------------------------

def _foreign_dir(tmp_path):
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    (d / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.chmod(d, 0o755)
    return d


def _snapshot(d):
    return (oct(os.stat(d).st_mode), sorted(p.name for p in d.iterdir()))


@pytest.mark.parametrize("cmd", [("init",), ("vault", "init", "--dir")])
def test_init_refuses_a_foreign_non_empty_directory(tmp_path, cmd):
    d = _foreign_dir(tmp_path)
    before = _snapshot(d)
    args = [str(BIN), *cmd, str(d)] if cmd[0] == "vault" else [str(BIN), "--state", str(d), "init"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, p.stdout
    line = p.stderr.strip()
    assert len(line.splitlines()) == 1 and "not empty" in line and "Traceback" not in line, p.stderr
    assert _snapshot(d) == before   # not chmodded, nothing added


def test_init_completes_its_own_state_directory(tmp_path):
    d = tmp_path / "st"
    run(d, "init")
    run(d, "disk", "create", "a", "--size", "1M")
    os.unlink(d / "catalog.db")
    run(d, "init")             # keys/platform.json marks it as ours
    run(d, "init")             # and again: idempotent
    empty = tmp_path / "empty"
    empty.mkdir()
    run(empty, "init")
    assert (empty / "catalog.db").exists()
