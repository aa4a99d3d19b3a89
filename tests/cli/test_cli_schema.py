"""The JSON contract (docs/CLI.md): every command of the click tree, run with --json as a script
runs it (the console script in a subprocess, a real vault over HTTPS on 127.0.0.1, a real FUSE
mount), prints one JSON document on stdout that validates against tests/cli/cli_schema.json;
every key is camelCase and every timestamp ISO 8601 UTC; stderr carries only JSON lines
(progress events, errors)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from blockcrypt.cli.main import cli
from blockcrypt.cli.reference import walk
from support.vaultproc import VaultProcess, make_vault

BIN = Path(sys.executable).with_name("blockcrypt")
SCHEMA = json.loads((Path(__file__).with_name("cli_schema.json")).read_text())
CAMEL = re.compile(r"^[a-z][a-zA-Z0-9]*$")
ISO_UTC = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
DATE_LIKE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}")
#: maps keyed by data, not field names (docs/CLI.md): tags, per-disk failures, header copies A/B
OPAQUE = {"tags", "failed", "before", "after"}
TIME_KEYS = {"created", "updated", "nbf", "exp", "deletedDate", "scheduledPurgeDate", "time", "started"}


def schema(*where) -> dict:
    """A part of cli_schema.json (``"commands", "disk show"``), with the shared $defs it refers to."""
    part = SCHEMA
    for w in where:
        part = part[w]
    return {"$defs": SCHEMA["$defs"], **part}


def leaf_commands() -> set[str]:
    out = set()
    for path, cmd in walk(cli):
        if path and (not hasattr(cmd, "commands") or getattr(cmd, "invoke_without_command", False)):
            out.add(" ".join(path))
    return out


def check_shape(obj, where="$", key=None):
    """camelCase keys (outside opaque maps), ISO 8601 UTC times, no stringly numbers for sizes."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if key not in OPAQUE:
                assert CAMEL.match(k), f"{where}: key {k!r} is not camelCase"
            check_shape(v, f"{where}.{k}", k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            check_shape(v, f"{where}[{i}]", key)
    elif obj is not None and key in TIME_KEYS:
        assert isinstance(obj, str) and ISO_UTC.match(obj), f"{where}: {key} = {obj!r} is not ISO 8601 UTC"
    elif isinstance(obj, str) and DATE_LIKE.match(obj):
        assert ISO_UTC.match(obj), f"{where}: timestamp {obj!r} is not ISO 8601 UTC (...Z)"


class Runner:
    def __init__(self, state: Path, env: dict):
        self.state, self.env, self.seen = state, env, {}

    def __call__(self, *args, expect=0, stdin=None):
        """Run `blockcrypt ARGS --json`; validate stdout against its command's schema; return it."""
        args = [str(a) for a in args]
        e = dict(os.environ, BLOCKCRYPT_STATE=str(self.state), **self.env)
        p = subprocess.run([str(BIN), *args, "--json"], capture_output=True, text=True, env=e, timeout=180,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
        for line in p.stderr.splitlines():
            ev = json.loads(line)  # stderr with --json: JSON lines only
            jsonschema.validate(ev, schema("error") if "error" in ev else schema("progress"))
        if expect:
            return json.loads(p.stderr.splitlines()[-1])
        path = self.command_path(args)
        if path == "vault audit":  # a log: JSON Lines (docs/CLI.md)
            doc = [json.loads(l) for l in p.stdout.splitlines()]
        else:
            doc = json.loads(p.stdout)  # exactly one document
        jsonschema.validate(doc, schema("commands", path))
        check_shape(doc, path)
        self.seen[path] = self.seen.get(path, 0) + 1
        return doc

    @staticmethod
    def command_path(args) -> str:
        cmd, path = cli, []
        for a in args:
            sub = getattr(cmd, "commands", {}).get(a)
            if sub is None:
                if a.startswith("-") and path[:2] == ["vault", "audit"]:
                    continue
                break
            cmd = sub
            path.append(a)
        return " ".join(path)


@pytest.fixture(scope="module")
def vaults(tmp_path_factory):
    d = tmp_path_factory.mktemp("schema-vaults")
    protected = VaultProcess(make_vault(d / "pp", "--retention-days", "7", "--purge-protection")).start()
    plain = VaultProcess(make_vault(d / "plain", "--retention-days", "7")).start()
    yield protected, plain
    protected.stop()
    plain.stop()


def test_every_command_json_validates(tmp_path, vaults):
    protected, plain = vaults
    st = tmp_path / "st"
    run = Runner(st, {"BLOCKCRYPT_VAULT_DIR": str(protected.dir)})

    run("init")
    # disks
    run("disk", "create", "a", "--size", "4M")
    run("disk", "create", "b", "--size", "1M", "--sector-size", "512", "--double-encryption")
    assert [d["name"] for d in run("disk", "list")] == ["a", "b"]
    run("disk", "show", "a")
    run("disk", "resize", "a", "--size", "8M")
    run("disk", "update", "a", "--revocation", "on-restart")
    run("disk", "copy", "a", "a2")
    run("disk", "export", "a", tmp_path / "a.raw")
    run("disk", "dump-key", "a", "--out", tmp_path / "a.key", "--yes-i-understand")
    assert run("disk", "verify", "a")["ok"] is True
    run("disk", "check", "a")
    # snapshots and images
    run("snapshot", "create", "a", "s1")
    run("snapshot", "create", "a", "s2")
    run("snapshot", "list")
    run("snapshot", "show", "s1")
    run("snapshot", "diff", "s1", "s2")
    run("image", "create", "i1", "--source", "s1")
    run("image", "list")
    run("image", "show", "i1")
    run("disk", "create", "c", "--source", "i1")
    run("disk", "delete", "c", "--yes")
    run("image", "delete", "i1", "--yes")
    run("snapshot", "delete", "s2", "--yes")
    run("snapshot", "delete", "s1", "--yes")
    # platform keys, catalog, settings
    run("platform-key", "list")
    rot = run("platform-key", "rotate")
    assert rot["version"] == 2
    pp = tmp_path / "pass"
    pp.write_text("a passphrase of some length\n")
    ex = run("platform-key", "export", "--out", tmp_path / "keys.bak", "--passphrase-file", pp)
    assert ex["versions"] == [2] and ex["protection"] == "passphrase"   # 1 was retired by the rotation
    assert run("platform-key", "import", tmp_path / "keys.bak", "--passphrase-file", pp)["unchanged"] == [2]
    run("catalog", "rebuild")
    assert run("config", "set", "max_des", "7")["value"] == 7
    assert run("config", "get", "key_check_interval")["value"] == 60
    assert isinstance(run("config", "get"), list)

    # the vault (the default --dir is $BLOCKCRYPT_VAULT_DIR: no --dir below)
    vd = tmp_path / "v"
    init = run("vault", "init", "--dir", vd, "--retention-days", "7")
    assert init["retentionDays"] == 7 and init["purgeProtection"] is False
    ident = run("vault", "identity", "create", "app")
    run("vault", "identity", "list")
    run("vault", "policy", "set", "--identity", "app", "--permissions", "get,wrapKey")
    assert run("vault", "policy", "show", "--identity", "app")["permissions"] == ["get", "wrapKey"]
    run("vault", "identity", "delete", ident["name"], "--yes")
    k = run("vault", "key", "create", "k1", "--tag", "owner_team=disks")
    assert k["tags"] == {"owner_team": "disks"}  # user data is not camelCased
    run("vault", "key", "list")
    run("vault", "key", "show", "k1")
    run("vault", "key", "show", "k1", "--versions")
    run("vault", "key", "disable", "k1")
    run("vault", "key", "enable", "k1")
    # customer-managed keys: a DES on the purge-protected vault
    run("des", "create", "d1", "--key-url", f"{protected.url}/keys/k1", "--vault-dir", protected.dir, "--grant")
    run("des", "list")
    run("des", "show", "d1")
    run("disk", "create", "cm", "--size", "1M", "--des", "d1")
    run("vault", "key", "rotate", "k1")
    r = run("des", "rotate", "d1")
    assert r["activeKey"]["keyUrl"] == r["des"]["activeKey"]["keyUrl"]  # one shape, never a bare string
    run("des", "update", "d1", "--auto-rotate")
    run("disk", "delete", "cm", "--yes")
    run("des", "delete", "d1", "--yes")
    run("vault", "audit", "--limit", "5")
    run("vault", "audit", "verify")
    assert run("vault", "audit", "prune", "--before", "2000-01-01", "--yes")["pruned"] == 0
    # delete, recover and purge on a vault without purge protection
    run("vault", "key", "create", "gone", "--dir", plain.dir)
    dk = run("vault", "key", "delete", "gone", "--dir", plain.dir)
    assert dk["scheduledPurgeDate"] > dk["deletedDate"]  # ISO strings sort as times
    run("vault", "key", "recover", "gone", "--dir", plain.dir)
    run("vault", "key", "delete", "gone", "--dir", plain.dir)
    run("vault", "key", "list", "--deleted", "--dir", plain.dir)
    run("vault", "key", "purge", "gone", "--dir", plain.dir, "--yes")

    # vault serve --json: one JSON line once listening
    p = subprocess.Popen([str(BIN), "vault", "serve", "--dir", str(vd), "--listen", "127.0.0.1:0", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ev = json.loads(p.stdout.readline())
        jsonschema.validate(ev, schema("commands", "vault serve"))
        assert ev["url"].startswith("https://127.0.0.1:")
        run.seen["vault serve"] = 1
    finally:
        p.terminate()
        p.wait(20)
        p.stdout.close()
        p.stderr.close()

    # mount, status, umount (a real FUSE mount)
    status = run("status")
    assert status["mounts"] == []
    if os.path.exists("/dev/fuse") and os.geteuid() == 0:
        mp = tmp_path / "mnt"
        mp.mkdir()
        run("mount", mp)
        try:
            s = run("status")
            assert s["mounts"] and s["mounts"][0]["state"].startswith(("running", "starting"))
        finally:
            run("umount", mp)

    missing = leaf_commands() - set(run.seen)
    if not (os.path.exists("/dev/fuse") and os.geteuid() == 0):
        missing -= {"mount", "umount"}
    assert not missing, f"commands never run with --json here (add them, and their schema): {sorted(missing)}"


def test_errors_with_json_are_json_on_stderr(tmp_path):
    st = tmp_path / "st"
    run = Runner(st, {})
    run("init")
    for args, code, name in ((("disk", "show", "nope"), 3, "NotFound"),
                             (("disk", "create", "x", "--size", "10Q"), 2, "BadSize"),
                             (("disk", "create", "x"), 2, "UsageError"),
                             (("disk", "frobnicate"), 2, "UsageError"),
                             (("config", "set", "max_des", "many"), 2, "UsageError")):
        err = run(*args, expect=code)
        assert err["error"]["code"] == name and err["error"]["exitCode"] == code, err
        assert "\n" not in err["error"]["message"]
