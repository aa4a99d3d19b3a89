"""Fixtures for customer-managed-key tests: a purge-protected vault served over HTTPS on 127.0.0.1,
a blockcrypt state directory, and a DES on a vault key."""
import pytest

from blockcrypt.control import des
from blockcrypt.control.state import State
from support.vaultproc import VaultProcess, make_vault


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    v = VaultProcess(make_vault(tmp_path_factory.mktemp("cmk") / "vault", "--retention-days", "7",
                                "--purge-protection")).start()
    yield v
    v.stop()


@pytest.fixture
def state(tmp_path):
    return State.init(tmp_path / "state")


@pytest.fixture
def key_name(vault, request):
    name = "k-" + request.node.name.replace("_", "-").replace("[", "-").replace("]", "")[:40]
    vault.key("create", name)
    return name


@pytest.fixture
def des_rec(state, vault, key_name):
    return des.create(state, "des1", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True)
