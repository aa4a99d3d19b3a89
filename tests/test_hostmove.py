"""Backing up a host, restoring it, moving a platform-key disk to another host: the steps of
docs/OPERATIONS.md ("Backup, restore and moving hosts"), run as the doc gives them (the CLI
in a subprocess, two state directories), with the data compared after."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from blockcrypt.control.disks import open_volume
from blockcrypt.control.state import State

from support.clihelpers import bc, bcj

MiB = 1 << 20


def write_marker(state, name, marker: bytes):
    vol = open_volume(State.open(state), name)
    try:
        vol.write(3 * MiB + 17, marker)
        vol.flush()
    finally:
        vol.close()


def read_marker(state, name, n: int) -> bytes:
    vol = open_volume(State.open(state), name, read_only=True)
    try:
        return vol.read(3 * MiB + 17, n)
    finally:
        vol.close()


def copy_disk_files(src_state, dst_dir):
    """`cp --sparse=always STATE/disks/*.img DEST/` as the doc says (disks quiesced)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    files = sorted((Path(src_state) / "disks").glob("*.img"))
    subprocess.run(["cp", "--sparse=always", *map(str, files), str(dst_dir)], check=True)
    return files


@pytest.fixture
def passphrase(tmp_path):
    p = tmp_path / "backup-passphrase"
    p.write_text("correct horse battery staple\n")
    p.chmod(0o600)
    return p


def test_back_up_and_restore_a_host(tmp_path, passphrase):
    a = tmp_path / "hostA"
    bc(a, "init")
    bc(a, "disk", "create", "vm1", "--size", "8M")
    bc(a, "disk", "create", "vm2", "--size", "8M")
    write_marker(a, "vm1", b"vm1-data-before-the-backup")
    write_marker(a, "vm2", b"vm2-data-before-the-backup")
    # back up: the platform keys sealed under a passphrase, the disk files beside them
    backup = tmp_path / "backup"
    backup.mkdir()
    r = bcj(a, "platform-key", "export", "--out", backup / "platform-keys.json", "--passphrase-file", passphrase)
    assert r["versions"] == [1] and r["protection"] == "passphrase"
    assert (backup / "platform-keys.json").stat().st_mode & 0o777 == 0o600
    raw = json.loads((backup / "platform-keys.json").read_text())
    key_b64 = json.loads((a / "keys" / "platform.json").read_text())["versions"][0]["key"]
    assert key_b64 not in (backup / "platform-keys.json").read_text() and raw["kdf"]["name"] in ("argon2id", "scrypt")
    copy_disk_files(a, backup / "disks")
    # an existing file is never overwritten
    bc(a, "platform-key", "export", "--out", backup / "platform-keys.json", "--passphrase-file", passphrase,
       expect=4)
    shutil.rmtree(a)  # the host is lost

    b = tmp_path / "hostB"
    bc(b, "init")
    # the new store's own (unused) platform/1 differs from the backup's: refused without --replace-unused
    p = bc(b, "platform-key", "import", backup / "platform-keys.json", "--passphrase-file", passphrase, expect=39)
    assert "--replace-unused" in p.stderr
    p = bc(b, "platform-key", "import", backup / "platform-keys.json", "--passphrase-file", passphrase,
           "--replace-unused", expect=2)   # no terminal and no --yes: refused, names --yes
    assert "--yes" in p.stderr
    r = bcj(b, "platform-key", "import", backup / "platform-keys.json", "--passphrase-file", passphrase,
            "--replace-unused", "--yes")
    assert r["replaced"] == [1] and r["added"] == [] and r["current"] == 1
    for f in (backup / "disks").glob("*.img"):
        subprocess.run(["cp", "--sparse=always", str(f), str(b / "disks")], check=True)
    rb = bcj(b, "catalog", "rebuild")
    assert sorted(rb["disks"]) == ["vm1", "vm2"]
    assert read_marker(b, "vm1", 26) == b"vm1-data-before-the-backup"
    assert read_marker(b, "vm2", 26) == b"vm2-data-before-the-backup"
    assert bcj(b, "disk", "show", "vm1")["health"] == "Healthy"
    # a second import changes nothing (idempotent)
    r = bcj(b, "platform-key", "import", backup / "platform-keys.json", "--passphrase-file", passphrase)
    assert r["unchanged"] == [1] and r["added"] == [] and r["replaced"] == []
    # now a disk uses platform/1 here: even --replace-unused refuses another key for it
    other = tmp_path / "other"
    bc(other, "init")
    bc(other, "platform-key", "export", "--out", tmp_path / "other-keys.json", "--passphrase-file", passphrase)
    p = bc(b, "platform-key", "import", tmp_path / "other-keys.json", "--passphrase-file", passphrase,
           "--replace-unused", "--yes", expect=39)
    assert "disks here use it" in p.stderr
    assert read_marker(b, "vm1", 26) == b"vm1-data-before-the-backup"


def test_backup_file_errors_are_one_line(tmp_path, passphrase):
    a = tmp_path / "hostA"
    bc(a, "init")
    out = tmp_path / "k.json"
    p = bc(a, "platform-key", "export", "--out", out, expect=2)   # neither a passphrase nor the confirmation
    assert "--passphrase-file" in p.stderr and "--yes-i-understand" in p.stderr and not out.exists()
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    p = bc(a, "platform-key", "export", "--out", out, "--passphrase-file", short, expect=2)
    assert "12 characters" in p.stderr and not out.exists()
    bc(a, "platform-key", "export", "--out", out, "--passphrase-file", passphrase)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the right passphrase\n")
    b = tmp_path / "hostB"
    bc(b, "init")
    before = (b / "keys" / "platform.json").read_bytes()
    p = bc(b, "platform-key", "import", out, "--passphrase-file", wrong, "--replace-unused", "--yes", expect=47)
    assert "wrong passphrase" in p.stderr
    p = bc(b, "platform-key", "import", out, expect=2)
    assert "--passphrase-file" in p.stderr
    doc = json.loads(out.read_text())   # the public version list is bound to the sealed keys
    doc["versions"][0]["version"] = 7
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    bc(b, "platform-key", "import", tampered, "--passphrase-file", passphrase, expect=47)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{\"format\": \"something else\"}")
    p = bc(b, "platform-key", "import", garbage, "--passphrase-file", passphrase, expect=47)
    assert "not a blockcrypt platform-key backup" in p.stderr
    assert (b / "keys" / "platform.json").read_bytes() == before   # nothing imported by any of them
    # raw export: only with the confirmation, 0600, and it imports without a passphrase
    rawf = tmp_path / "raw.json"
    r = bcj(a, "platform-key", "export", "--out", rawf, "--yes-i-understand")
    assert r["protection"] == "none" and rawf.stat().st_mode & 0o777 == 0o600
    r = bcj(b, "platform-key", "import", rawf, "--replace-unused", "--yes")
    assert r["replaced"] == [1]


def test_move_a_platform_key_disk_to_another_host(tmp_path, passphrase):
    a, b = tmp_path / "hostA", tmp_path / "hostB"
    bc(a, "init")
    bc(b, "init")
    bc(a, "disk", "create", "web", "--size", "8M")
    write_marker(a, "web", b"web-data-from-host-a")
    bc(b, "disk", "create", "db", "--size", "8M")          # host B's own disk, on its own platform/1
    write_marker(b, "db", b"db-data-of-host-b")
    # both hosts have a platform/1 in use: host A's cannot go to host B ...
    bc(a, "platform-key", "export", "--out", tmp_path / "all.json", "--passphrase-file", passphrase)
    p = bc(b, "platform-key", "import", tmp_path / "all.json", "--passphrase-file", passphrase, expect=39)
    assert "nothing was imported" in p.stderr
    # ... so host A rotates until its disk is on a version host B lacks, and exports that one
    rot = bcj(a, "platform-key", "rotate")
    assert rot["version"] == 2 and rot["rewrapped"] == ["web"]
    show = bcj(a, "disk", "show", "web")
    (layer,) = show["encryption"]["layers"]
    assert layer["keyId"] == "platform/2"
    bc(a, "platform-key", "export", "--version", "2", "--out", tmp_path / "v2.json", "--passphrase-file", passphrase)
    # the disk file goes to host B; without its key there, it says so (not "purged")
    (disk_file,) = [f for f in (a / "disks").glob("*.img")]
    subprocess.run(["cp", "--sparse=always", str(disk_file), str(b / "disks")], check=True)
    rb = bcj(b, "catalog", "rebuild")
    assert sorted(rb["disks"]) == ["db", "web"]
    p = bc(b, "disk", "dump-key", "web", "--out", tmp_path / "dek", "--yes-i-understand", expect=46)
    assert ("platform key 2 is not in this key store; import it with `blockcrypt platform-key import`"
            in p.stderr), p.stderr
    assert "purged" not in p.stderr and not (tmp_path / "dek").exists()
    show = bcj(b, "disk", "show", "web")
    assert show["health"] == "KeyUnavailable" and "platform key 2 is not in this key store" in show["error"]
    r = bcj(b, "platform-key", "import", tmp_path / "v2.json", "--passphrase-file", passphrase)
    assert r["added"] == [2] and r["current"] == 1
    assert read_marker(b, "web", 20) == b"web-data-from-host-a"
    assert read_marker(b, "db", 17) == b"db-data-of-host-b"
    # host B goes on making disks under its own current key
    bc(b, "disk", "create", "new", "--size", "1M")
    assert bcj(b, "disk", "show", "new")["encryption"]["layers"][0]["keyId"] == "platform/1"
    # a version host B's store forgot in a rotation is still reported as purged
    bc(b, "disk", "delete", "web", "--yes") if "--yes" in bc(b, "disk", "delete", "--help").stdout else \
        bc(b, "disk", "delete", "web")
    rot = bcj(b, "platform-key", "rotate")
    assert 2 in rot["retired"]
    subprocess.run(["cp", "--sparse=always", str(disk_file), str(b / "disks")], check=True)
    bc(b, "catalog", "rebuild")
    p = bc(b, "disk", "dump-key", "web", "--out", tmp_path / "dek", "--yes-i-understand", expect=35)
    assert "purged" in p.stderr
