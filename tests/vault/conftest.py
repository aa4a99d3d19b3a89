"""Fixtures for the vault tests: a vault directory made by `vault init` and a
real `vault serve` subprocess on 127.0.0.1 (free port, HTTPS), stopped by the
fixture that started it, even when the test fails. Helpers live in
vault_helpers.py (a unique module name: `conftest` is ambiguous across the tree)."""
from __future__ import annotations

import pytest

from vault_helpers import VaultProcess, make_vault


@pytest.fixture
def vault_factory(tmp_path):
    started: list[VaultProcess] = []

    def make(*init_args, serve_args=(), name="vault"):
        d = make_vault(tmp_path / name, *init_args)
        v = VaultProcess(d, serve_args).start()
        started.append(v)
        return v
    yield make
    for v in started:
        v.stop()


@pytest.fixture(scope="module")
def shared_vault(tmp_path_factory):
    """One purge-protected vault (retention 7 days) for a module's tests."""
    d = make_vault(tmp_path_factory.mktemp("vault") / "v", "--retention-days", "7", "--purge-protection")
    v = VaultProcess(d).start()
    yield v
    v.stop()


@pytest.fixture(scope="module")
def plain_vault(tmp_path_factory):
    """A vault without purge protection (purge allowed at once)."""
    d = make_vault(tmp_path_factory.mktemp("vault") / "p", "--retention-days", "7")
    v = VaultProcess(d).start()
    yield v
    v.stop()
