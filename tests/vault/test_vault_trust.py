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
