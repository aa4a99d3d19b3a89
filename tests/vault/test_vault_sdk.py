"""The official azure-keyvault-keys SDK (KeyClient, CryptographyClient) and
azure-identity against a real `vault serve` on 127.0.0.1 over HTTPS."""
from __future__ import annotations

import datetime as dt
import time

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.keyvault.keys import JsonWebKey, KeyType
from azure.keyvault.keys.crypto import KeyWrapAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vault_helpers import vault_cli
from vault_helpers import credential, crypto_client, key_client

DEK = bytes(range(64))  # a 64-byte XTS DEK, as blockcrypt wraps them


def _identity(v, name, perms):
    out = vault_cli("identity", "create", name, "--dir", v.dir, "--json").stdout
    import json
    ident = json.loads(out)
    if perms:
        vault_cli("policy", "set", "--dir", v.dir, "--identity", name, "--permissions", perms)
    return ident


def test_sdk_create_get_list_wrap_unwrap(shared_vault):
    kc = key_client(shared_vault)
    k2 = kc.create_rsa_key("sdk-2048", size=2048, tags={"purpose": "disk"})
    k3 = kc.create_rsa_key("sdk-3072", size=3072)
    k4 = kc.create_rsa_key("sdk-4096", size=4096)
    for k, bits in ((k2, 2048), (k3, 3072), (k4, 4096)):
        assert k.key_type == KeyType.rsa
        assert len(k.key.n) * 8 == bits
        assert k.id == f"{shared_vault.url}/keys/{k.name}/{k.properties.version}"
        assert not hasattr(k.key, "d") or k.key.d is None  # public part only
        assert k.properties.recovery_level == "CustomizedRecoverable"
        assert k.properties.recoverable_days == 7
    got = kc.get_key("sdk-2048")
    assert got.id == k2.id and got.properties.tags == {"purpose": "disk"}
    assert {p.name for p in kc.list_properties_of_keys()} >= {"sdk-2048", "sdk-3072", "sdk-4096"}

    for k in (k2, k3, k4):
        cc = crypto_client(shared_vault, k)
        for alg in (KeyWrapAlgorithm.rsa_oaep_256, KeyWrapAlgorithm.rsa_oaep):
            w = cc.wrap_key(alg, DEK)
            assert w.key_id == k.id and len(w.encrypted_key) == len(k.key.n)
            assert cc.unwrap_key(alg, w.encrypted_key).key == DEK


def test_sdk_remote_wrap_with_least_privilege_identity(shared_vault):
    """An identity with wrapKey+unwrapKey only: the SDK cannot read the key, so wrap runs in the vault."""
    kc = key_client(shared_vault)
    k = kc.create_rsa_key("sdk-remote")
    des = _identity(shared_vault, "des-remote", "wrapKey,unwrapKey")
    cc = crypto_client(shared_vault, k.id, des)
    w = cc.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, DEK)
    assert w.key_id == k.id
    assert cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w.encrypted_key).key == DEK
    # ... and it may not do anything else
    with pytest.raises(HttpResponseError) as ei:
        key_client(shared_vault, des).get_key("sdk-remote")
    assert ei.value.status_code == 403 and ei.value.error.code == "Forbidden"
    out = vault_cli("audit", "--dir", shared_vault.dir, "--key", "sdk-remote", "--json").stdout
    import json
    recs = [json.loads(line) for line in out.splitlines()]
    ops = [(r["identity"], r["operation"], r["status"]) for r in recs]
    assert ("des-remote", "KeyWrap", 200) in ops and ("des-remote", "KeyUnwrap", 200) in ops
    assert ("des-remote", "KeyGet", 403) in ops


def test_sdk_disable_enable_expiry(shared_vault):
    kc = key_client(shared_vault)
    k = kc.create_rsa_key("sdk-states")
    cc = crypto_client(shared_vault, k)
    wrapped = cc.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, DEK).encrypted_key

    props = kc.update_key_properties("sdk-states", enabled=False)
    assert props.properties.enabled is False
    with pytest.raises(HttpResponseError) as ei:
        cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
    assert ei.value.status_code == 403
    assert ei.value.error.code == "Forbidden" and ei.value.error.innererror["code"] == "KeyDisabled"

    kc.update_key_properties("sdk-states", enabled=True)
    assert cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == DEK

    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    kc.update_key_properties("sdk-states", expires_on=past)
    with pytest.raises(HttpResponseError) as ei:
        cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
    assert ei.value.status_code == 403 and ei.value.error.innererror["code"] == "KeyExpired"

    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    kc.update_key_properties("sdk-states", expires_on=future + dt.timedelta(days=1), not_before=future)
    with pytest.raises(HttpResponseError) as ei:
        cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
    assert ei.value.error.innererror["code"] == "KeyNotYetValid"
    got = kc.get_key("sdk-states").properties
    assert int(got.not_before.timestamp()) == int(future.timestamp())


def test_sdk_rotate_keeps_old_versions(shared_vault):
    kc = key_client(shared_vault)
    k1 = kc.create_rsa_key("sdk-rot")
    old = crypto_client(shared_vault, k1).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, DEK).encrypted_key
    k2 = kc.rotate_key("sdk-rot")
    assert k2.properties.version != k1.properties.version and k2.key.n != k1.key.n
    assert kc.get_key("sdk-rot").id == k2.id
    assert [p.version for p in kc.list_properties_of_key_versions("sdk-rot")] == [k1.properties.version,
                                                                               k2.properties.version]
    assert crypto_client(shared_vault, k1.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, old).key == DEK
    assert kc.get_key("sdk-rot", k1.properties.version).id == k1.id


def test_sdk_soft_delete_recover_and_purge_protection(shared_vault):
    kc = key_client(shared_vault)
    k = kc.create_rsa_key("sdk-del")
    before = time.time()
    deleted = kc.begin_delete_key("sdk-del", _polling_interval=0).result()
    assert deleted.recovery_id == f"{shared_vault.url}/deletedkeys/sdk-del"
    assert abs(deleted.deleted_date.timestamp() - before) < 10
    assert abs((deleted.scheduled_purge_date - deleted.deleted_date).total_seconds() - 7 * 86400) < 2
    with pytest.raises(ResourceNotFoundError):
        kc.get_key("sdk-del")
    assert "sdk-del" in {d.name for d in kc.list_deleted_keys()}
    assert "sdk-del" not in {p.name for p in kc.list_properties_of_keys()}
    assert kc.get_deleted_key("sdk-del").id == k.id
    with pytest.raises(ResourceExistsError):  # name still reserved
        kc.create_rsa_key("sdk-del")
    with pytest.raises(HttpResponseError) as ei:  # purge protection holds for 7 days
        kc.purge_deleted_key("sdk-del")
    assert ei.value.status_code == 403
    recovered = kc.begin_recover_deleted_key("sdk-del", _polling_interval=0).result()
    assert recovered.id == k.id
    assert kc.get_key("sdk-del").id == k.id


def test_sdk_purge_without_protection(plain_vault):
    kc = key_client(plain_vault)
    k = kc.create_rsa_key("sdk-purge")
    assert k.properties.recovery_level == "CustomizedRecoverable+Purgeable"
    kc.begin_delete_key("sdk-purge", _polling_interval=0).wait()
    kc.purge_deleted_key("sdk-purge")
    with pytest.raises(ResourceNotFoundError):
        kc.get_deleted_key("sdk-purge")
    with pytest.raises(ResourceNotFoundError):
        kc.get_key("sdk-purge")
    assert kc.create_rsa_key("sdk-purge").properties.version != k.properties.version  # name free again


def test_sdk_import_jwk(shared_vault):
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pn = priv.private_numbers()

    def b(i):
        return i.to_bytes((i.bit_length() + 7) // 8, "big")
    jwk = JsonWebKey(kty="RSA", n=b(pn.public_numbers.n), e=b(pn.public_numbers.e), d=b(pn.d), p=b(pn.p),
                     q=b(pn.q), dp=b(pn.dmp1), dq=b(pn.dmq1), qi=b(pn.iqmp), key_ops=["wrapKey", "unwrapKey"])
    kc = key_client(shared_vault)
    k = kc.import_key("sdk-imported", jwk)
    assert k.key.n == b(pn.public_numbers.n) and sorted(k.key_operations) == ["unwrapKey", "wrapKey"]
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = priv.public_key().encrypt(DEK, oaep)
    assert crypto_client(shared_vault, k).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == DEK


def test_sdk_refusals(shared_vault):
    kc = key_client(shared_vault)
    for kwargs in ({"size": 1024}, {"size": 8192}):
        with pytest.raises(HttpResponseError) as ei:
            kc.create_rsa_key("sdk-bad", **kwargs)
        assert ei.value.status_code == 400 and ei.value.error.code == "BadParameter"
    with pytest.raises(HttpResponseError) as ei:
        kc.create_rsa_key("sdk-bad", hardware_protected=True)
    assert ei.value.status_code == 400 and "premium" in ei.value.error.message
    with pytest.raises(HttpResponseError) as ei:
        kc.create_ec_key("sdk-bad")
    assert ei.value.status_code == 400
    with pytest.raises(ResourceNotFoundError):
        kc.get_key("sdk-bad")
    with pytest.raises(HttpResponseError) as ei:
        kc.create_rsa_key("bad_name_with_underscore")
    assert ei.value.status_code == 400


def test_sdk_forbidden_identity_is_403_and_audited(shared_vault):
    nobody = _identity(shared_vault, "nobody", "")
    with pytest.raises(HttpResponseError) as ei:
        key_client(shared_vault, nobody).create_rsa_key("sdk-nope")
    assert ei.value.status_code == 403 and ei.value.error.innererror["code"] == "AccessDenied"
    import json
    recs = [json.loads(x) for x in vault_cli("audit", "--dir", shared_vault.dir, "--json").stdout.splitlines()]
    hits = [r for r in recs if r.get("identity") == "nobody" and r.get("operation") == "KeyCreate"]
    assert hits and hits[-1]["status"] == 403 and hits[-1]["result"] == "AccessDenied"
    assert hits[-1]["key"] == "sdk-nope"


def test_azure_identity_client_secret_credential(shared_vault):
    """Stretch: azure-identity's ClientSecretCredential with its authority pointed at the vault."""
    from azure.identity import ClientSecretCredential
    from azure.keyvault.keys import KeyClient
    a = shared_vault.admin()
    ca = str(shared_vault.dir / "ca.pem")
    cred = ClientSecretCredential(a["tenant_id"], a["client_id"], a["client_secret"], authority=shared_vault.url,
                                  disable_instance_discovery=True, connection_verify=ca)
    kc = KeyClient(shared_vault.url, cred, verify_challenge_resource=False, connection_verify=ca)
    k = kc.create_rsa_key("sdk-identity")
    assert kc.get_key("sdk-identity").id == k.id
    assert credential(shared_vault).get_token(f"{shared_vault.url}/.default", tenant_id=a["tenant_id"]).token
