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
