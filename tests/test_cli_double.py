"""`blockcrypt disk create --double-encryption`, `disk show --json` and `disk dump-key` on a
double-encrypted disk, through the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_cli_create_show_dump_key(sdir_double, tmp_path):
    run = sdir_double
    p = run("disk", "create", "dd", "--size", "8M", "--double-encryption", "--json")
    d = json.loads(p.stdout)
    assert d["encryption"]["type"] == "EncryptionAtRestWithPlatformKey"
    assert d["encryption"]["doubleEncryption"] is True
    assert [(l["role"], l["algorithm"], l["provider"]) for l in d["encryption"]["layers"]] == [
        ("data", "aes-xts-plain64", "platform"), ("infrastructure", "xchacha20-poly1305", "platform")]
    out = tmp_path / "dd.key"
    p = run("disk", "dump-key", "dd", "--out", str(out), "--yes-i-understand", "--json")
    j = json.loads(p.stdout)
    assert [k["bytes"] for k in j["keys"]] == [64, 32]
    assert out.stat().st_size == 96 and oct(out.stat().st_mode & 0o777) == "0o600"
    assert out.read_bytes().hex() not in p.stdout + p.stderr
    p = run("disk", "create", "x", "--size", "8M", "--double-encryption", "--des", "nope", expect=2)
    assert len(p.stderr.strip().splitlines()) == 1
    for flag, want in (("--single-encryption", False), ("--double-encryption", True), (None, True)):
        name = f"copy{int(want)}{flag is None}"
        p = run("disk", "copy", "dd", name, *([flag] if flag else []), "--json")
        result = _json_docs(p.stdout)[-1]  # after any progress events
        assert result["encryption"]["doubleEncryption"] is want, flag


def _json_docs(text: str) -> list:
    """The JSON documents of an output, one after the other (progress events, then a result)."""
    dec, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = dec.raw_decode(text, i)
        docs.append(doc)
    return docs


@pytest.fixture
def sdir_double(tmp_path):
    sdir = tmp_path / "state"
    env = {**os.environ, "BLOCKCRYPT_STATE": str(sdir)}

    def run(*args, expect=0):
        p = subprocess.run([sys.executable, "-m", "blockcrypt", *args], capture_output=True, text=True, env=env)
        assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
        return p

    run("init")
    return run


def test_disk_verify_lists_exactly_the_bad_sectors(sdir_double, tmp_path):
    run = sdir_double
    run("disk", "create", "v", "--size", "16M", "--double-encryption")
    from blockcrypt.control.state import State
    from blockcrypt.control.disks import open_volume
    from blockcrypt.format import layout
    st = State.open(str(tmp_path / "state"))
    with open_volume(st, "v") as v:
        v.write(0, os.urandom(1 << 20))            # sectors 0..255
        v.write(8 << 20, os.urandom(64 << 10))     # sectors 2048..2063, after a hole
    p = run("disk", "verify", "v", "--json")
    r = json.loads(p.stdout)
    assert r["ok"] and r["badSectors"] == [] and r["scannedBytes"] >= (1 << 20) + (64 << 10)
    assert r["scannedBytes"] < 4 << 20  # holes are skipped
    path = st.catalog.get_disk("v").path
    for off in (layout.DATA_OFFSET + 7 * 4096 + 5,                         # data of sector 7
                layout.META_AREA_OFFSET + 2050 * 96 + 8,                    # nonce of sector 2050
                layout.META_AREA_OFFSET + 200 * 96 + 40):                   # tag of sector 200
        with open(path, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 1]))
    p = run("disk", "verify", "v", "--json", expect=22)
    r = json.loads(p.stdout)
    assert r["badSectors"] == [7, 200, 2050] and not r["ok"]
    p = run("disk", "verify", "v", expect=22)
    assert "3 bad sector(s)" in p.stdout and "7, 200, 2050" in p.stdout
