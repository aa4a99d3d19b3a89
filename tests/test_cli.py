"""The CLI as a user runs it (the console script in a subprocess): outputs, --json, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).with_name("blockcrypt")


def run(state, *args, expect=0, env=None):
    e = dict(os.environ, BLOCKCRYPT_STATE=str(state))
    e.update(env or {})
    p = subprocess.run([str(BIN), *args], capture_output=True, text=True, env=e, timeout=60)
    assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
    return p


def one_error_line(p):
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("blockcrypt: error: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


@pytest.fixture
def sdir(tmp_path):
    d = tmp_path / "st"
    run(d, "init")
    return d


def test_disk_lifecycle_json(sdir):
    d = json.loads(run(sdir, "disk", "create", "vm1", "--size", "10G", "--json").stdout)
    assert d["sizeBytes"] == 10 << 30 and d["sectorSize"] == 4096
    assert d["encryption"]["type"] == "EncryptionAtRestWithPlatformKey"
    run(sdir, "disk", "create", "vm2", "--size", "512K", "--sector-size", "512")
    names = [x["name"] for x in json.loads(run(sdir, "disk", "list", "--json").stdout)]
    assert names == ["vm1", "vm2"]
    show = json.loads(run(sdir, "disk", "show", "vm2", "--json").stdout)
    assert show["sectorSize"] == 512 and show["encryption"]["layers"][0]["keyId"] == "platform/1"
    r = json.loads(run(sdir, "disk", "resize", "vm2", "--size", "1M", "--json").stdout)
    assert r["sizeBytes"] == 1 << 20
    assert os.path.getsize(show["path"]) == (1 << 20) + (1 << 20)
    rot = json.loads(run(sdir, "platform-key", "rotate", "--json").stdout)
    assert rot["version"] == 2 and sorted(rot["rewrapped"]) == ["vm1", "vm2"]
    run(sdir, "disk", "delete", "vm1", "--yes")
    assert not os.path.exists(d["path"])
    assert "vm1" not in run(sdir, "disk", "list").stdout


def test_catalog_rebuild(sdir):
    run(sdir, "disk", "create", "a", "--size", "1M")
    run(sdir, "disk", "create", "b", "--size", "2M")
    os.unlink(sdir / "catalog.db")
    run(sdir, "init")
    assert run(sdir, "disk", "list", "--json").stdout.strip() == "[]"
    r = json.loads(run(sdir, "catalog", "rebuild", "--json").stdout)
    assert sorted(r["disks"]) == ["a", "b"]
    assert json.loads(run(sdir, "disk", "show", "b", "--json").stdout)["sizeBytes"] == 2 << 20


@pytest.mark.parametrize("args,code,pattern", [
    (("disk", "show", "nope"), 3, "disk 'nope' not found"),
    (("disk", "delete", "nope"), 3, "not found"),
    (("disk", "create", "x", "--size", "10Q"), 2, "invalid size '10Q'"),
    (("disk", "create", "x", "--size", "0"), 2, "greater than zero"),
    (("disk", "create", "x", "--size", "1000"), 2, "multiple of the sector size"),
    (("disk", "create", "bad/name", "--size", "1M"), 2, "invalid disk name"),
    (("disk", "dump-key", "a", "--out", "/tmp/never"), 2, "--yes-i-understand"),
    (("disk", "create", "a", "--size", "1M"), 4, "disk 'a' already exists"),
    (("disk", "resize", "a", "--size", "512K"), 5, "can only grow"),
    (("disk", "create", "y"), 2, "Missing option '--size'"),
])
def test_error_lines(sdir, args, code, pattern):
    run(sdir, "disk", "create", "a", "--size", "1M")
    line = one_error_line(run(sdir, *args, expect=code))
    assert pattern in line


def test_missing_state(tmp_path):
    line = one_error_line(run(tmp_path / "none", "disk", "list", expect=10))
    assert "does not exist" in line and "blockcrypt init" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a read-only bind mount")
def test_unwritable_state(sdir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(sdir), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        line = one_error_line(run(ro, "disk", "create", "z", "--size", "1M", expect=10))
        assert "not readable and writable" in line or "read-only" in line
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_key_store_loose_permissions(sdir):
    os.chmod(sdir / "keys" / "platform.json", 0o644)
    line = one_error_line(run(sdir, "disk", "list", expect=37))
    assert "too open" in line and "chmod 600" in line


def test_key_store_missing(sdir):
    os.unlink(sdir / "keys" / "platform.json")
    assert "missing" in one_error_line(run(sdir, "disk", "list", expect=37))


def test_corrupt_header_reported(sdir):
    run(sdir, "disk", "create", "c", "--size", "1M")
    path = json.loads(run(sdir, "disk", "show", "c", "--json").stdout)["path"]
    with open(path, "r+b") as f:
        f.write(bytes(200))
        f.seek(512 * 1024)
        f.write(bytes(200))
    show = json.loads(run(sdir, "disk", "show", "c", "--json").stdout)
    assert show["health"] == "Corrupt"
    line = one_error_line(run(sdir, "disk", "dump-key", "c", "--out", str(sdir / "k"),
                              "--yes-i-understand", expect=20))
    assert "disk 'c' is corrupt" in line


def test_native_missing_message(sdir):
    """Simulate an unbuilt extension: the import of blockcrypt._engine (the volume engine) fails."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'blockcrypt._engine': raise ImportError('No module named blockcrypt._engine')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from blockcrypt.cli import main\n"
        "from blockcrypt.control import disks\n"
        "from blockcrypt.control.state import State\n"
        "from blockcrypt.control.disks import open_volume\n"
        "from blockcrypt.errors import BlockcryptError\n"
        f"st = State.open({str(sdir)!r})\n"
        "disks.create(st, 'n', 1 << 20)\n"
        "try:\n"
        "    open_volume(st, 'n')\n"
        "except BlockcryptError as e:\n"
        "    print(e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "native extension blockcrypt._engine is not built" in p.stdout
    assert "make build" in p.stdout


def test_dump_key_file_and_no_key_on_stdout(sdir, tmp_path):
    run(sdir, "disk", "create", "a", "--size", "1M")
    out = tmp_path / "a.key"
    p = run(sdir, "disk", "dump-key", "a", "--out", str(out), "--yes-i-understand", "--json")
    info = json.loads(p.stdout)
    assert "--iv-large-sectors" in info["cryptsetup"] and "--offset 2048" in info["cryptsetup"]
    key = out.read_bytes()
    assert len(key) == 64 and oct(os.stat(out).st_mode & 0o777) == "0o600"
    assert key.hex() not in p.stdout and key.hex() not in p.stderr
    # never overwrites an existing file
    line = one_error_line(run(sdir, "disk", "dump-key", "a", "--out", str(out), "--yes-i-understand", expect=4))
    assert "already exists" in line


def test_no_key_material_in_any_output(sdir):
    store = json.loads((sdir / "keys" / "platform.json").read_text())
    secrets = [v["key"] for v in store["versions"]]
    outs = []
    for args in (("disk", "create", "a", "--size", "1M", "--json"), ("disk", "show", "a", "--json"),
                 ("platform-key", "list", "--json"), ("platform-key", "rotate", "--json")):
        p = run(sdir, *args)
        outs.append(p.stdout + p.stderr)
    store = json.loads((sdir / "keys" / "platform.json").read_text())
    secrets += [v["key"] for v in store["versions"]]
    for s in secrets:
        assert all(s not in o for o in outs)


def test_catalog_from_before_des_columns_is_upgraded(sdir):
    """A catalog made before disk encryption sets existed keeps working (columns added on open)."""
    import sqlite3
    run(sdir, "disk", "create", "old", "--size", "1M")
    db = sqlite3.connect(sdir / "catalog.db")
    db.executescript("""
        CREATE TABLE disks_v1 AS SELECT name, disk_id, size, sector_size, path, kind, read_only,
                                        encryption_type, created FROM disks;
        DROP TABLE disks; ALTER TABLE disks_v1 RENAME TO disks; DROP TABLE des;
    """)
    db.close()
    show = json.loads(run(sdir, "disk", "show", "old", "--json").stdout)
    assert show["revocation"] == "immediate" and show["health"] == "Healthy"
    assert json.loads(run(sdir, "des", "list", "--json").stdout) == []
