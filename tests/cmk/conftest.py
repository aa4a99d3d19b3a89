"""Fixtures for customer-managed-key tests: a purge-protected vault served over HTTPS on 127.0.0.1,
a blockcrypt state directory, a DES on a vault key, and a root (tmp_path) that is always cleaned
of mounts and loop devices (support/treefixtures.py)."""
import pytest

from blockcrypt.control import des
from blockcrypt.control.state import State
from support.treefixtures import root  # noqa: F401  (fixture)
from support.vaultfixtures import key_name, vault  # noqa: F401  (fixtures)


@pytest.fixture
def state(tmp_path):
    return State.init(tmp_path / "state")


@pytest.fixture
def des_rec(state, vault, key_name):
    return des.create(state, "des1", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True)
