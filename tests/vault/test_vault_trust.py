"""Issue 15 on the vault: `vault key disable NAME` is a kill switch for every version (H4)."""
from __future__ import annotations

import json

from blockcrypt.vault.client import VaultClient
from vault_helpers import vault_cli


def _enabled(d, name):
    c = VaultClient.for_admin(d)
    return {it["kid"].rsplit("/", 1)[1]: it["attributes"]["enabled"] for it in c.list_versions(name)}


def test_disable_acts_on_every_version_and_says_so(shared_vault):
    d = shared_vault.dir
    first = json.loads(vault_cli("key", "create", "ks-k", "--dir", d, "--json").stdout)["key"]["kid"]
    vault_cli("key", "rotate", "ks-k", "--dir", d)
    vault_cli("key", "rotate", "ks-k", "--dir", d)
    assert list(_enabled(d, "ks-k").values()) == [True] * 3
    p = vault_cli("key", "disable", "ks-k", "--dir", d)
    assert "disabled 3 version(s) of key ks-k" in p.stdout and first in p.stdout, p.stdout
    assert list(_enabled(d, "ks-k").values()) == [False] * 3   # the old versions too
    v1 = first.rsplit("/", 1)[1]
    out = json.loads(vault_cli("key", "enable", "ks-k", "--version", v1, "--dir", d, "--json").stdout)
    assert [x["version"] for x in out["versions"]] == [v1] and out["attributes"]["enabled"] is True
    st = _enabled(d, "ks-k")
    assert st.pop(v1) is True and list(st.values()) == [False, False]
    out = json.loads(vault_cli("key", "enable", "ks-k", "--dir", d, "--json").stdout)
    assert len(out["versions"]) == 3 and all(_enabled(d, "ks-k").values())


# --- M8: no serving with loose permissions ---------------------------------------------------

import os  # noqa: E402

import pytest  # noqa: E402

from vault_helpers import make_vault  # noqa: E402


@pytest.mark.parametrize("what,mode", [("master.key", 0o644), ("", 0o755), ("server.key", 0o640)])
def test_serve_refuses_loose_permissions(tmp_path, what, mode):
    d = make_vault(tmp_path / "v")
    p = d / what if what else d
    os.chmod(p, mode)
    r = vault_cli("serve", "--dir", d, "--listen", "127.0.0.1:0", check=False, timeout=30)
    assert r.returncode == 10, (r.returncode, r.stdout, r.stderr)
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "too open" in line and f"{mode:04o}" in line, r.stderr
    assert not (d / "serve.json").exists()
