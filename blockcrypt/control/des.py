"""Disk encryption sets (DES): customer-managed keys for disks, as in the seeds.

A DES names a vault key (``https://HOST:PORT/keys/K`` for "latest", or a
version), an encryption type, and a vault identity that the vault admin grants
get, wrapKey and unwrapKey. Disks created with ``--des`` get a DEK wrapped by
that key (keys/providers/akv.py); ``disk update --des`` moves a platform-key disk to a
DES by re-wrapping its DEK (never back: copy the disk instead).

Rotation re-wraps every DEK of the DES under the new key version; no data is
rewritten. It is crash-safe like the platform rotation: the target version is
recorded first (``active_key``, with the old one in ``previous_keys``), each
header is rewritten atomically, and ``previous_keys`` is cleared last; the
vault keeps old key versions, so a crash leaves every disk openable and the
next ``des rotate``/``des update``/auto-rotation pass finishes the job.

Creation refuses, each with one clear line: a vault without soft delete and
purge protection, a key that is not RSA 2048/3072/4096, an identity that
cannot get, wrapKey and unwrapKey (found by a probe), and more DES than the
catalog allows (``max_des``, default 50).

Caveat: the identity's secret is kept in STATE/keys/des/<des id>.json (0600).
Creating the identity needs the vault's directory (``--vault-dir``, a vault on
this host); for a remote vault the vault admin creates it and hands over the
file printed by ``blockcrypt vault identity create NAME --json``
(``--identity-file``).
"""
from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import replace
from contextlib import contextmanager
from pathlib import Path

from .._util.b64 import b64u_decode
from .._util.clock import now_iso
from ..catalog import DesRecord, check_name
from ..errors import AlreadyExists, KeyError_, KeyNotFound, KeyPurged, NotFound, Refused, UsageError
from ..format import ROLE_DATA
from ..keys.providers.akv import parse_key_url, secret_path, wrap_alg_for, write_secret
from ..keys.registry import provider_for_key_url
from . import disks, settings
from .rotation import rewrap_disks

TYPES = (disks.TYPE_CMK, disks.TYPE_DOUBLE)
RSA_SIZES = (2048, 3072, 4096)
NEEDED = ("get", "wrapKey", "unwrapKey")


def max_des(st) -> int:
    return settings.get(st, "max_des")


def grant_line(identity_name: str) -> str:
    return f"blockcrypt vault policy set --identity {identity_name} --permissions get,wrapKey,unwrapKey --dir VAULT_DIR"


def _key_bits(jwk: dict) -> int:
    try:
        raw = b64u_decode(jwk.get("n", ""))
    except ValueError:
        return 0
    return len(raw.lstrip(b"\0")) * 8


def check_vault_key(doc: dict, key_url: str) -> None:
    """Refuse keys and vaults a DES cannot use (from a GET key answer)."""
    attrs = doc.get("attributes", {})
    level = attrs.get("recoveryLevel", "")
    if "Purgeable" in level or not level.startswith(("Recoverable", "CustomizedRecoverable")):
        raise Refused(f"the vault of {key_url} has no purge protection (recoveryLevel {level or 'unknown'}): "
                      "a disk encryption set needs soft delete and purge protection "
                      "(`blockcrypt vault init --purge-protection`)")
    jwk = doc.get("key", {})
    if jwk.get("kty") not in ("RSA", "RSA-HSM") or _key_bits(jwk) not in RSA_SIZES:
        raise Refused(f"key {key_url} is {jwk.get('kty')} {_key_bits(jwk) if jwk.get('n') else ''}".rstrip()
                      + ": a disk encryption set needs an RSA key of 2048, 3072 or 4096 bits")


def probe(client, key_url: str) -> str:
    """get + wrapKey + unwrapKey with the DES identity; returns the versioned kid."""
    _, name, version = parse_key_url(key_url)
    try:
        doc = client.get_key(name, version)
    except KeyPurged:  # a 404 on a key this DES never used: a wrong name or URL, not a purge
        raise KeyNotFound(key_id=key_url) from None
    check_vault_key(doc, key_url)
    sample = os.urandom(32)
    alg = wrap_alg_for(doc["key"].get("kty"))
    kid, blob = client.wrap(name, version, sample, alg=alg)
    if client.unwrap(name, kid.rsplit("/", 1)[-1], blob, alg=alg) != sample:
        raise Refused(f"key {key_url}: the vault's wrap/unwrap round trip failed")
    return doc["key"]["kid"]


def _identity(st, name: str, vault_dir: str | None, identity_file: str | None) -> tuple[dict, str, bool]:
    """(public identity, secret, created_now). Reuses a pending identity of an earlier attempt."""
    pending = Path(st.path) / "keys" / "des" / f"pending-{name}.json"
    if identity_file:
        try:
            doc = json.loads(Path(identity_file).read_text())
            # `vault identity create --json` writes camelCase (clientId); older files snake_case
            doc = {{"clientId": "client_id", "clientSecret": "client_secret", "tenantId": "tenant_id"}.get(k, k): v
                   for k, v in doc.items()}
            secret = doc["client_secret"]
            ident = {"name": doc.get("name", ""), "client_id": doc["client_id"], "tenant_id": doc["tenant_id"]}
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"cannot read identity file {identity_file}: need client_id, client_secret and "
                             f"tenant_id ({e.__class__.__name__})") from None
        return ident, secret, False
    if not vault_dir:
        raise UsageError("give --vault-dir (a vault on this host: the DES identity is created there) "
                         "or --identity-file (from `blockcrypt vault identity create NAME --json`)")
    if pending.exists():
        doc = json.loads(pending.read_text())
        return {k: doc[k] for k in ("name", "client_id", "tenant_id")}, doc["client_secret"], False
    from ..vault.server import identities
    from ..vault.server.store import open_store
    store = open_store(vault_dir)
    try:
        made = identities.create_identity(store, f"des-{name}-{uuid.uuid4().hex[:8]}")
        tenant = store.config.tenant_id
    finally:
        store.close()
    doc = {"name": made["name"], "client_id": made["client_id"], "client_secret": made["client_secret"],
           "tenant_id": tenant}
    write_secret(st, f"pending-{name}", doc)
    return {k: doc[k] for k in ("name", "client_id", "tenant_id")}, doc["client_secret"], True


def create(st, name: str, key_url: str, *, enc_type: str = disks.TYPE_CMK, auto_rotate: bool = False,
           vault_dir: str | None = None, identity_file: str | None = None, ca_file: str | None = None,
           grant: bool = False) -> DesRecord:
    check_name("disk encryption set", name)
    if enc_type not in TYPES:
        raise UsageError(f"unsupported encryption type {enc_type!r} (one of {', '.join(TYPES)})")
    provider = provider_for_key_url(key_url)
    if provider != "vault":
        return _create_external(st, name, key_url, provider, enc_type=enc_type, auto_rotate=auto_rotate,
                                identity_file=identity_file, ca_file=ca_file)
    from ..vault.client import VaultClient

    base, _key, version = parse_key_url(key_url)
    _check_new(st, name)
    if auto_rotate and version:
        raise UsageError("--auto-rotate needs a key URL without a version (it follows the newest version)")
    if ca_file is None and vault_dir:
        ca_file = str(Path(vault_dir) / "ca.pem")
    ident, secret, _made = _identity(st, name, vault_dir, identity_file)
    if grant:
        if not vault_dir:
            raise UsageError("--grant needs --vault-dir (it sets the access policy in that vault)")
        from ..vault.server import policies
        from ..vault.server.store import open_store
        store = open_store(vault_dir)
        try:
            policies.set_policy(store, ident["name"], list(NEEDED))
        finally:
            store.close()
    client = VaultClient(base, tenant_id=ident["tenant_id"], client_id=ident["client_id"],
                         client_secret=secret, ca_file=ca_file)
    try:
        kid = probe(client, key_url)
    except KeyError_ as e:
        if e.reason == "KeyAccessDenied":
            raise Refused(f"identity {ident['name'] or ident['client_id']} cannot get, wrapKey and unwrapKey "
                          f"{key_url} ({e}); the vault admin must run: {grant_line(ident['name'] or ident['client_id'])}"
                          f" -- then run this command again") from None
        raise
    des_id = uuid.uuid4().hex
    write_secret(st, des_id, {"client_secret": secret})
    rec = DesRecord(name, des_id, key_url, kid, (), enc_type, auto_rotate, ident, ca_file, now_iso())
    try:
        st.catalog.insert_des(rec)
    except BaseException:
        secret_path(st, des_id).unlink(missing_ok=True)
        raise
    (Path(st.path) / "keys" / "des" / f"pending-{name}.json").unlink(missing_ok=True)
    return rec


def _check_new(st, name: str) -> None:
    if st.catalog.find_des(name) is not None:
        raise AlreadyExists(kind="disk encryption set", name=name)
    limit = max_des(st)
    if len(st.catalog.list_des()) >= limit:
        raise Refused(f"this catalog already has {limit} disk encryption sets, its limit "
                      "(`blockcrypt config set max_des N` to change it)")


def _create_external(st, name: str, key_url: str, provider: str, *, enc_type: str, auto_rotate: bool,
                     identity_file: str | None, ca_file: str | None) -> DesRecord:
    """A DES on a key of another provider (OpenBao/Vault transit, ...): the identity comes from a
    file the key server's admin hands over; the provider probes the key and the access."""
    _check_new(st, name)
    prov = st.keys.get(provider)
    doc = None
    if identity_file:
        try:
            doc = json.loads(Path(identity_file).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read identity file {identity_file} ({e.__class__.__name__})") from None
    ident, secret = prov.identity_from(doc)
    des_id = uuid.uuid4().hex
    write_secret(st, des_id, secret)
    rec = DesRecord(name, des_id, key_url, key_url, (), enc_type, auto_rotate, ident, ca_file, now_iso())
    try:
        kid = prov.probe(rec)
        if auto_rotate and prov.is_versioned(key_url):
            raise UsageError("--auto-rotate needs a key URL without a version (it follows the newest version)")
        rec = DesRecord(name, des_id, key_url, kid, (), enc_type, auto_rotate, ident, ca_file, rec.created)
        st.catalog.insert_des(rec)
    except BaseException:
        prov.forget(des_id)
        secret_path(st, des_id).unlink(missing_ok=True)
        raise
    return rec


def _same_key(prov, rec: DesRecord, key_url: str) -> bool:
    """Whether ``key_url`` is (a version of) the DES's key; a KMIP DES may move to another key id
    on its server (that is its rotation)."""
    if hasattr(prov, "same_key"):
        return prov.same_key(rec, key_url)
    try:
        return prov.des_for(key_url).des_id == rec.des_id
    except NotFound:
        return False


def provider_of(rec: DesRecord) -> str:
    """The provider name of a DES's key (as recorded in its disks' headers)."""
    return provider_for_key_url(rec.key_url)


def delete(st, name: str) -> DesRecord:
    rec = st.catalog.get_des(name)
    users = st.catalog.disks_of_des(name)
    if users:
        raise Refused(f"disk encryption set {name!r} is used by {len(users)} disk(s) "
                      f"({', '.join(d.name for d in users[:5])}); delete or copy them first")
    st.catalog.delete_des(name)
    secret_path(st, rec.des_id).unlink(missing_ok=True)
    st.keys.get(provider_of(rec)).forget(rec.des_id)
    return rec


def to_json(st, rec: DesRecord) -> dict:
    return {
        "name": rec.name, "id": rec.des_id, "type": rec.type, "created": rec.created,
        "activeKey": {"keyUrl": rec.active_key, "sourceKeyUrl": rec.key_url},
        "previousKeys": [{"keyUrl": k} for k in rec.previous_keys],
        "rotationToLatestKeyVersionEnabled": rec.auto_rotate,
        "identity": {"name": rec.identity.get("name"), "clientId": rec.identity.get("client_id"),
                     "tenantId": rec.identity.get("tenant_id")},
        "disks": [d.name for d in st.catalog.disks_of_des(rec.name)],
    }


# --- rotation ------------------------------------------------------------------------------

@contextmanager
def des_lock(st, name: str):
    """Serializes the DES's rotation with the creation of disks on it (an exclusive flock on
    STATE/run/des-NAME.lock): a disk created while a rotation runs would be wrapped under the
    version the rotation leaves, after the rotation listed the disks, and stay there."""
    d = Path(st.path) / "run"
    d.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(d / f"des-{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rotate(st, name: str, target_kid: str | None = None, on_step=None) -> dict:
    """Re-wrap every DEK of the DES under ``target_kid`` (default: the pending or newest version)."""
    with des_lock(st, name):
        return _rotate(st, name, target_kid, on_step)


def _rotate(st, name: str, target_kid: str | None, on_step) -> dict:
    step = on_step or (lambda s, d=None: None)
    rec = st.catalog.get_des(name)
    pname = provider_of(rec)
    prov = st.keys.get(pname)
    if target_kid is None:
        target_kid = rec.active_key if rec.previous_keys else prov.latest_version(rec)
    if target_kid != rec.active_key:
        step("begin", target_kid)
        prev = tuple(dict.fromkeys((*rec.previous_keys, rec.active_key)))
        st.catalog.update_des(name, active_key=target_kid, previous_keys=prev)

    def plan(h, layer):
        if layer.role == ROLE_DATA and layer.provider == pname and layer.kek_id != target_kid:
            return pname, target_kid
        return None

    rewrapped, _, _ = rewrap_disks(st, st.catalog.disks_of_des(name), plan, step)
    step("finish", None)
    st.catalog.update_des(name, previous_keys=())
    return {"des": name, "activeKey": target_kid, "rewrapped": rewrapped}


def update(st, name: str, *, key_url: str | None = None, auto_rotate: bool | None = None, on_step=None) -> dict:
    rec = st.catalog.get_des(name)
    result = {"des": name, "rewrapped": []}
    if auto_rotate is not None:
        if auto_rotate and st.keys.get(provider_of(rec)).is_versioned(key_url or rec.key_url):
            raise UsageError("--auto-rotate needs a key URL without a version")
        st.catalog.update_des(name, auto_rotate=auto_rotate)
    if key_url is not None:
        prov = st.keys.get(provider_of(rec))
        if provider_for_key_url(key_url) != provider_of(rec) or not _same_key(prov, rec, key_url):
            raise Refused("a disk encryption set keeps its key; give a new version of " + rec.key_url)
        new = replace(rec, key_url=key_url)
        kid = probe(prov.client_for(rec), key_url) if provider_of(rec) == "vault" else prov.probe(new)
        st.catalog.update_des(name, key_url=key_url)
        result = rotate(st, name, kid, on_step=on_step)
    elif rec.previous_keys:
        result = rotate(st, name, on_step=on_step)
    return result


def auto_rotate_pass(st) -> list[dict]:
    """One pass of auto-rotation: every DES that follows its key's newest version and is behind."""
    done = []
    for rec in st.catalog.list_des():
        if rec.previous_keys:
            done.append(rotate(st, rec.name))
            continue
        if not rec.auto_rotate:
            continue
        latest = st.keys.get(provider_of(rec)).latest_version(rec)
        if latest != rec.active_key:
            done.append(rotate(st, rec.name, latest))
    return done


# --- disks on a DES -----------------------------------------------------------------------------

def create_disk(st, name: str, size: int, des_name: str, sector_size: int = 4096,
                revocation: str = "immediate", kind: str = "disk", on_step=None):
    """A disk on a DES: the data layer's DEK wrapped by its customer key; on a DES of type
    EncryptionAtRestWithPlatformAndCustomerKeys also an infrastructure layer whose own DEK
    the platform key store wraps. Under the DES's lock, so a rotation running at the same
    time either sees the new disk or runs after it (``on_step("wrap", key)``: tests)."""
    with des_lock(st, st.catalog.get_des(des_name).name):
        rec = st.catalog.get_des(des_name)
        if on_step:
            on_step("wrap", rec.active_key)
        return disks.create(st, name, size, sector_size, provider=provider_of(rec), kek_ref=rec.active_key,
                            des=des_name, revocation=revocation, double=rec.type == disks.TYPE_DOUBLE,
                            kind=kind)


def refuse_type_change(name: str):
    raise Refused(f"the encryption type of disk encryption set {name!r} is fixed at creation; "
                  "create another disk encryption set and `blockcrypt disk copy` the disks to it")


def move_disk_to_des(st, disk_name: str, des_name: str):
    """A platform-key disk moves to a DES: its DEK is re-wrapped by the vault key; no data rewritten."""
    drec = st.catalog.get_disk(disk_name)
    des = st.catalog.get_des(des_name)
    if drec.des == des_name:
        return drec
    if drec.des is not None:
        raise Refused(f"disk {disk_name!r} already uses disk encryption set {drec.des!r}; "
                      "use `des update` to rotate its key, or `disk copy` to a new disk")
    if disks.is_double(disks.read_disk_header(drec)) != (des.type == disks.TYPE_DOUBLE):
        disks.refuse_single_double(disk_name, des.type == disks.TYPE_DOUBLE)

    def plan(h, layer):
        return (provider_of(des), des.active_key) if layer.role == ROLE_DATA else None

    _, _, headers = rewrap_disks(st, [drec], plan)
    new = headers[disk_name]
    with st.catalog.transaction() as c:
        st.catalog.update_disk(disk_name, c, des=des_name, encryption_type=disks.encryption_type(new))
    return st.catalog.get_disk(disk_name)


def refuse_back_to_platform(disk_name: str, des_name: str):
    raise Refused(f"disk {disk_name!r} is encrypted with a customer-managed key (disk encryption set "
                  f"{des_name!r}), which cannot be turned off; copy it to a new disk instead: "
                  f"`blockcrypt disk copy {disk_name} NEW_NAME --des ''` (a platform-key copy)")
