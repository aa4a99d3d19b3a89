"""Fixtures shared by the tests that need a customer-managed key: a purge-protected vault
served over HTTPS on 127.0.0.1 for the module, and a fresh key in it per test. A conftest
imports them (``from support.vaultfixtures import key_name, vault``)."""
from __future__ import annotations

import pytest

from .vaultproc import VaultProcess, make_vault


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    v = VaultProcess(make_vault(tmp_path_factory.mktemp("vault") / "vault", "--retention-days", "7",
                                "--purge-protection")).start()
    yield v
    v.stop()


@pytest.fixture
def key_name(vault, request):
    name = "k-" + request.node.name.replace("_", "-").replace("[", "-").replace("]", "")[:40]
    vault.key("create", name)
    return name
