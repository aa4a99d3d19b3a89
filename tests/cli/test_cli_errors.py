"""Errors as a user meets them through the CLI (a real vault over HTTPS on 127.0.0.1): one line
`blockcrypt: error: ...` with our advice and no Azure boilerplate, times as ISO dates, and four
key failures that look different (not found, purged, not in this store, audience mismatch); the
vault directory's default (no --dir needed)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from blockcrypt import errors
from support.vaultfixtures import vault  # noqa: F401  (fixture)

BIN = Path(sys.executable).with_name("blockcrypt")
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def bc(*args, expect=0, env=None, state=None):
    e = dict(os.environ, **(env or {}))
    if state is not None:
        e["BLOCKCRYPT_STATE"] = str(state)
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, env=e, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
    return p


def line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockcrypt: error: "), p.stderr
    assert "Traceback" not in p.stderr and "go.microsoft.com" not in p.stderr and "Unix time" not in p.stderr
    return lines[0]


def test_key_not_found_in_the_vault(vault):
    msg = line(bc("vault", "key", "show", "no-such", "--dir", vault.dir, expect=errors.VaultNotFound.exit_code))
    assert "key no-such not found in the vault" in msg and "vault key list" in msg
    err = json.loads(bc("vault", "key", "show", "no-such", "--dir", vault.dir, "--json",
                        expect=errors.VaultNotFound.exit_code).stderr)
    assert err["error"]["code"] == "VaultNotFound"


def test_purge_protection_gives_an_iso_date(vault):
    bc("vault", "key", "create", "pp", "--dir", vault.dir)
    bc("vault", "key", "delete", "pp", "--dir", vault.dir)
    msg = line(bc("vault", "key", "purge", "pp", "--yes", "--dir", vault.dir,
                  expect=errors.VaultForbidden.exit_code))
    assert "purge protection" in msg and ISO.search(msg) and "vault key recover" in msg, msg
    bc("vault", "key", "recover", "pp", "--dir", vault.dir)


def test_des_on_a_mistyped_key_is_not_found_not_purged(vault, tmp_path):
    st = tmp_path / "st"
    bc("init", state=st)
    bc("vault", "key", "create", "real", "--dir", vault.dir)
    p = bc("des", "create", "d", "--key-url", f"{vault.url}/keys/reall", "--vault-dir", vault.dir, "--grant",
           state=st, expect=errors.KeyNotFound.exit_code)
    msg = line(p)
    assert "was not found" in msg and "check the key name" in msg and "purged" not in msg, msg


def test_localhost_is_an_audience_mismatch_not_a_policy(vault, tmp_path):
    st = tmp_path / "st"
    bc("init", state=st)
    bc("vault", "key", "create", "aud", "--dir", vault.dir)
    url = vault.url.replace("127.0.0.1", "localhost")
    p = bc("des", "create", "d", "--key-url", f"{url}/keys/aud", "--vault-dir", vault.dir, "--grant",
           state=st, expect=errors.VaultAudienceMismatch.exit_code)
    msg = line(p)
    assert vault.url in msg and "localhost and 127.0.0.1" in msg and "policy set" not in msg, msg
    # with the vault's own URL the same command works
    bc("des", "create", "d", "--key-url", f"{vault.url}/keys/aud", "--vault-dir", vault.dir, "--grant", state=st)


def test_vault_dir_defaults_beside_the_state_dir(tmp_path):
    st = tmp_path / "st"
    e = {k: v for k, v in os.environ.items() if k != "BLOCKCRYPT_VAULT_DIR"}
    p = subprocess.run([str(BIN), "--state", str(st), "vault", "init", "--json"], capture_output=True, text=True,
                       env=e, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["dir"] == str(tmp_path / "st-vault")
    p = subprocess.run([str(BIN), "vault", "identity", "list", "--json"], capture_output=True, text=True,
                       env=dict(e, BLOCKCRYPT_STATE=str(st)), timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)[0]["admin"] is True, p.stderr
    # $BLOCKCRYPT_VAULT_DIR wins over the default; --dir over both
    other = tmp_path / "other"
    bc("vault", "init", "--dir", other)
    names = {i["name"] for i in json.loads(bc("vault", "identity", "list", "--json",
                                              env={"BLOCKCRYPT_VAULT_DIR": str(other)}).stdout)}
    assert names
    p = bc("vault", "identity", "list", "--dir", tmp_path / "nothing", expect=10,
           env={"BLOCKCRYPT_VAULT_DIR": str(other)})
    assert str(tmp_path / "nothing") in line(p)


def test_usage_errors_are_one_line_with_a_pointer_to_help(tmp_path):
    msg = line(bc("disk", "create", "x", expect=2, state=tmp_path))
    assert "Missing option '--size'" in msg
    msg = line(bc("disk", "frobnicate", expect=2, state=tmp_path))
    assert "No such command 'frobnicate'" in msg and "blockcrypt disk --help" in msg
