"""Premium vault with RSA-HSM keys in a real SoftHSM2 token (python-pkcs11):
the private key lives in the token; SoftHSM2 offers RSA-OAEP (SHA-1) only."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import KeyType
from azure.keyvault.keys.crypto import KeyWrapAlgorithm

from vault_helpers import VaultProcess, make_vault
from vault_helpers import crypto_client, key_client

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
pytestmark = pytest.mark.skipif(not (os.path.exists(SOFTHSM_MODULE) and shutil.which("softhsm2-util")),
                                reason="SoftHSM2 is not installed (apt install softhsm2)")
DEK = bytes(range(64))


@pytest.fixture
def softhsm(tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "vault", "--pin", "1234",
                    "--so-pin", "5678"], check=True, capture_output=True)
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    return {"module": SOFTHSM_MODULE, "token": "vault", "pin_file": str(pin)}


def _token_labels(hsm) -> set[str]:
    """Labels of the token's objects, read in a child process (SoftHSM2 in this process would share fds)."""
    code = ("import json, sys, pkcs11; from pkcs11 import Attribute; "
            "t = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2]); s = t.open(user_pin=sys.argv[3]); "
            "print(json.dumps(sorted(o[Attribute.LABEL] for o in s.get_objects())))")
    out = subprocess.run([sys.executable, "-c", code, hsm["module"], hsm["token"], "1234"], check=True,
                         capture_output=True, text=True, env=os.environ.copy()).stdout
    return set(json.loads(out))


def test_rsa_hsm_keys_live_in_the_token(tmp_path, softhsm):
    d = make_vault(tmp_path / "v", "--sku", "premium", "--retention-days", "7")
    v = VaultProcess(d, ("--hsm-module", softhsm["module"], "--hsm-token", softhsm["token"],
                         "--hsm-pin-file", softhsm["pin_file"])).start()
    try:
        kc = key_client(v)
        k = kc.create_rsa_key("hsm-k", size=3072, hardware_protected=True)
        assert k.key_type == KeyType.rsa_hsm and len(k.key.n) == 384
        soft = kc.create_rsa_key("soft-k")  # software keys still work in a premium vault
        cc = crypto_client(v, k)
        w = cc.wrap_key(KeyWrapAlgorithm.rsa_oaep, DEK)
        assert cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep, w.encrypted_key).key == DEK
        # SoftHSM2 has no OAEP with SHA-256: refused both ways, so nothing is wrapped that cannot be unwrapped
        from blockcrypt.errors import VaultRequestError
        from blockcrypt.vault.client import VaultClient
        from blockcrypt.errors import KeyIntegrityError
        admin = VaultClient.for_admin(d)
        with pytest.raises(VaultRequestError) as ei:
            admin.wrap("hsm-k", None, DEK, alg="RSA-OAEP-256")
        assert ei.value.status == 400 and "RSA-OAEP" in str(ei.value)
        with pytest.raises(KeyIntegrityError):
            admin.unwrap("hsm-k", None, w.encrypted_key, alg="RSA-OAEP-256")
        assert crypto_client(v, soft).unwrap_key(
            KeyWrapAlgorithm.rsa_oaep_256,
            crypto_client(v, soft).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, DEK).encrypted_key).key == DEK
        # no private key material for it in the database
        import sqlite3
        conn = sqlite3.connect(str(d / "vault.db"))
        row = conn.execute("SELECT private_sealed, hsm_label FROM key_versions WHERE name = 'hsm-k'").fetchone()
        conn.close()
        assert row[0] is None and row[1] == f"hsm-k/{k.properties.version}"

        k2 = kc.rotate_key("hsm-k")
        assert k2.key_type == KeyType.rsa_hsm and k2.properties.version != k.properties.version
        assert cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep, w.encrypted_key).key == DEK  # old version still works
        labels = _token_labels(softhsm)
        assert {f"hsm-k/{k.properties.version}", f"hsm-k/{k2.properties.version}"} <= labels

        kc.begin_delete_key("hsm-k", _polling_interval=0).wait()
        kc.purge_deleted_key("hsm-k")
        assert not any(lbl.startswith("hsm-k/") for lbl in _token_labels(softhsm))
    finally:
        v.stop()


def test_premium_vault_without_hsm_refuses_rsa_hsm(tmp_path):
    d = make_vault(tmp_path / "v", "--sku", "premium")
    v = VaultProcess(d).start()
    try:
        with pytest.raises(HttpResponseError) as ei:
            key_client(v).create_rsa_key("hsm-x", hardware_protected=True)
        assert ei.value.status_code == 503
    finally:
        v.stop()
