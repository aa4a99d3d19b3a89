"""Customer-managed keys in a key vault (ours, or any Azure Key Vault speaking the same REST API).

A disk encryption set (DES, blockcrypt/control/des.py) names a vault key and holds a
vault identity; this provider wraps and unwraps DEKs with that key through
that identity:

- wrap:   RSA-OAEP-256 of  DEK (64 bytes) || SHA-256(binding context) (32 bytes)
          (RSA-OAEP, i.e. OAEP with SHA-1, for RSA-HSM keys: a PKCS#11 token such as
          SoftHSM2 offers no OAEP with SHA-256; OAEP-SHA-1 is still a sound padding)
- unwrap: the recorded algorithm back; the digest must match this disk and layer role

Azure's wrapKey has no associated data, so the binding travels inside the
wrapped plaintext (96 bytes: fits RSA-2048 OAEP-SHA256, whose limit is 190).
The versioned key id (``https://HOST:PORT/keys/NAME/VERSION``) is recorded in
the disk header; the DES whose key it is supplies the identity. Calls carry
the disk id (``x-blockcrypt-disk-id``) so the vault's audit names the disk.

A rotation's batch (``rewrap_many``) has the vault unwrap every DEK but wraps
them under the new version with its public key here (after one full vault
re-wrap per batch proves the identity may wrap and the version is usable), so a
re-wrapped disk costs the vault one unwrap, not an unwrap and a wrap; and the
unwraps go UNWRAP_CHUNK to a request through the vault's ``unwrapkeys`` extension
(each still authorised, answered and audited on its own, with its disk id), so
they cost one HTTPS request, token check and audit commit per chunk, not per disk.

Caveats: the identity secret lives in STATE/keys/des/<des id>.json (0600);
vault errors arrive already typed (KeyUnavailable, KeyDisabled, ...) from
blockcrypt.vault.client, which this module imports lazily.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from ..._util.fsutil import atomic_write
from ...errors import (BlockcryptError, KeyDisabled, KeyError_, KeyExpired, KeyIntegrityError, NotFound,
                       UsageError)
from ..base import KekProvider, KeyStatus, WrappedKey

WRAP_ALG = "RSA-OAEP-256"
HSM_WRAP_ALG = "RSA-OAEP"
WRAP_ALGS = (WRAP_ALG, HSM_WRAP_ALG)
DEK_BYTES = 64
#: unwraps per unwrapkeys request in a rotation's batch; a batch's requests go in parallel
UNWRAP_CHUNK = 32


def wrap_alg_for(kty: str | None) -> str:
    """The wrap algorithm for a key type: RSA-OAEP for RSA-HSM keys, RSA-OAEP-256 otherwise."""
    return HSM_WRAP_ALG if kty == "RSA-HSM" else WRAP_ALG


def parse_key_url(url: str) -> tuple[str, str, str | None]:
    """https://HOST:PORT/keys/NAME[/VERSION] -> (vault base URL, key name, version or None)."""
    parts = urlsplit(url or "")
    segs = [s for s in parts.path.split("/") if s]
    if parts.scheme != "https" or not parts.netloc or len(segs) not in (2, 3) or segs[0] != "keys":
        raise UsageError(f"invalid key URL {url!r}: expected https://HOST:PORT/keys/NAME[/VERSION]")
    return f"https://{parts.netloc}", segs[1], (segs[2] if len(segs) == 3 else None)


def secret_path(state, des_id: str) -> Path:
    return Path(state.path) / "keys" / "des" / f"{des_id}.json"


def _context_digest(context: bytes) -> bytes:
    return hashlib.sha256(b"blockcrypt/v1/cmk-binding\0" + context).digest()


class AkvKeyProvider(KekProvider):
    """DEKs wrapped by an RSA key in an Azure-Key-Vault-compatible vault (ours or Azure's)."""

    NAME = "vault"

    def __init__(self, state):
        self.state = state
        self._clients: dict[str, object] = {}
        self._kty: dict[tuple[str, str], str] = {}   # (vault, key name) -> kty (fixed for a key's life)
        self._no_batch: set[str] = set()             # vaults without unwrapkeys (Azure's)
        self._lock = threading.Lock()

    # -- identity of the DES that owns a key ----------------------------------------------------
    def des_for(self, kek_ref: str):
        base, name, _ = parse_key_url(kek_ref)
        for d in self.state.catalog.list_des():
            b, n, _v = parse_key_url(d.key_url)
            if (b, n) == (base, name):
                return d
        raise NotFound(kind="disk encryption set for key", name=f"{base}/keys/{name}")

    def client_for(self, des):
        with self._lock:
            c = self._clients.get(des.des_id)
            if c is None:
                from ...vault.client import VaultClient
                ident = des.identity
                secret = json.loads(secret_path(self.state, des.des_id).read_text())["client_secret"]
                base, _, _ = parse_key_url(des.key_url)
                c = VaultClient(base, tenant_id=ident["tenant_id"], client_id=ident["client_id"],
                                client_secret=secret, ca_file=des.ca_file)
                self._clients[des.des_id] = c
            return c

    @staticmethod
    def is_versioned(url: str) -> bool:
        """Whether a key URL names one version (a DES on it cannot follow the newest)."""
        return parse_key_url(url)[2] is not None

    def forget(self, des_id: str) -> None:
        with self._lock:
            self._clients.pop(des_id, None)

    # -- the provider interface -------------------------------------------------------------
    def default_ref(self) -> str:
        raise UsageError("a customer-managed key needs a disk encryption set (--des)")

    def status(self, kek_ref: str, disk_id: str | None = None) -> KeyStatus:
        des = self.des_for(kek_ref)
        _, name, version = parse_key_url(kek_ref)
        try:
            st = self.client_for(des).status(name, version)
        except KeyError_ as e:
            return KeyStatus(kek_ref, False, e.reason, str(e))
        # a disabled or expired key still answers GET: its attributes say it cannot wrap or unwrap
        if st["state"] == "disabled":
            err = KeyDisabled(key_id=st["kid"])
        elif st["state"] in ("expired", "not-yet-valid"):
            err = KeyExpired(key_id=st["kid"])
        else:
            return KeyStatus(st["kid"], True)
        return KeyStatus(st["kid"], False, err.reason, str(err))

    def latest_version(self, des) -> str:
        """The versioned kid of the key's newest version (what 'latest' means now)."""
        _, name, _ = parse_key_url(des.key_url)
        return self.client_for(des).get_key(name, None)["key"]["kid"]

    def _alg(self, des, base: str, name: str, disk_id: str | None) -> str:
        kty = self._kty.get((base, name))
        if kty is None:
            kty = self._kty[(base, name)] = self.client_for(des).get_key(name, None, disk_id=disk_id)["key"]["kty"]
        return wrap_alg_for(kty)

    def wrap(self, kek_ref: str, dek: bytes, context: bytes, disk_id: str | None = None) -> WrappedKey:
        if len(dek) != DEK_BYTES:
            raise ValueError("DEK must be 64 bytes")
        des = self.des_for(kek_ref)
        base, name, version = parse_key_url(kek_ref)
        alg = self._alg(des, base, name, disk_id)
        kid, blob = self.client_for(des).wrap(name, version, bytes(dek) + _context_digest(context),
                                              alg=alg, disk_id=disk_id)
        return WrappedKey(self.NAME, kid, alg, blob)

    def unwrap(self, wrapped: WrappedKey, context: bytes, disk_id: str | None = None) -> bytes:
        if wrapped.algorithm not in WRAP_ALGS:
            raise KeyIntegrityError(key_id=wrapped.kek_id, msg=f"unexpected wrap algorithm {wrapped.algorithm}")
        des = self.des_for(wrapped.kek_id)
        _, name, version = parse_key_url(wrapped.kek_id)
        plain = self.client_for(des).unwrap(name, version, wrapped.blob, alg=wrapped.algorithm, disk_id=disk_id)
        return self._check_plain(wrapped, context, plain)

    @staticmethod
    def _check_plain(wrapped: WrappedKey, context: bytes, plain: bytes) -> bytes:
        """The DEK of an unwrapped ``plain``, if its binding digest is this disk's and layer's."""
        if len(plain) != DEK_BYTES + 32 or plain[DEK_BYTES:] != _context_digest(context):
            raise KeyIntegrityError(key_id=wrapped.kek_id, msg="the wrapped key belongs to another disk or layer")
        return plain[:DEK_BYTES]


    # -- a rotation's batch ------------------------------------------------------------------------
    def rewrap_many(self, items, pool=None) -> list:
        """A rotation's batch (``[(wrapped, context, to_ref, disk_id)]``, one result per item).

        Within one key and to one version: the first item is re-wrapped wholly by the vault
        (unwrap, then wrapKey under the target version), which proves for the batch that the
        identity may still wrap and the version is usable; the version's public key and
        attributes come with one GET. Meanwhile every other DEK is unwrapped by the vault (the
        private key never leaves it), UNWRAP_CHUNK to an ``unwrapkeys`` request (one request
        each against a vault without it, such as Azure's), the requests in parallel over
        ``pool``; once the proof holds, each is wrapped here with that public key and the same
        algorithm, as Azure's CryptographyClient wraps locally. Each disk's unwrap is audited
        with its disk id; the batch's wrapKey once. A version that is disabled, outside its
        validity window or without wrapKey in its key_ops, or a vault that refuses the first
        item, sends every item the single way (each gets the vault's own answer; the DEKs
        already unwrapped are dropped); so does another key or an unversioned target."""
        single = super().rewrap_many
        out: list = [None] * len(items)
        groups: dict[str, list[int]] = {}
        rest: list[int] = []
        for i, (wrapped, _, to_ref, _) in enumerate(items):
            try:
                base, name, version = parse_key_url(to_ref)
                same = parse_key_url(wrapped.kek_id)[:2] == (base, name)
            except UsageError:
                same, version = False, None
            if same and version and wrapped.algorithm in WRAP_ALGS:
                groups.setdefault(to_ref, []).append(i)
            else:
                rest.append(i)
        for i, r in zip(rest, single([items[i] for i in rest], pool=pool)):
            out[i] = r
        for to_ref, idx in groups.items():
            first, others = idx[0], idx[1:]

            def prove(first=first, to_ref=to_ref, others=others):
                """The first item re-wrapped wholly by the vault, and the wrapping key it proves."""
                r = single([items[first]])[0]
                key = None if isinstance(r, BaseException) or not others else self._wrapping_key(to_ref, r)
                return r, key
            # the others by source version (one unwrapkeys request each), UNWRAP_CHUNK values a request
            by_src: dict[tuple, list[int]] = {}
            for i in others:
                by_src.setdefault((items[i][0].kek_id, items[i][0].algorithm), []).append(i)
            chunks = [ids[j:j + UNWRAP_CHUNK] for ids in by_src.values() for j in range(0, len(ids), UNWRAP_CHUNK)]
            plains = None
            if pool is not None and chunks:   # the proof and the unwraps at once; the wraps wait for it
                proof = pool.submit(prove)
                unwrapping = [pool.submit(self._unwrap_many, [items[i] for i in ids]) for ids in chunks]
                out[first], key = proof.result()
                plains = [f.result() for f in unwrapping]
            else:
                out[first], key = prove()
            if key is None:   # not proven: every other item the single way, with the vault's own answer
                for i, r in zip(others, single([items[i] for i in others], pool=pool)):
                    out[i] = r
                continue
            if plains is None:
                plains = [self._unwrap_many([items[i] for i in ids]) for ids in chunks]
            pub, alg, kid = key
            for ids, results in zip(chunks, plains):
                for i, plain in zip(ids, results):
                    wrapped, context, _, _ = items[i]
                    if isinstance(plain, BaseException):
                        out[i] = plain
                        continue
                    try:
                        dek = self._check_plain(wrapped, context, plain)
                    except BlockcryptError as e:
                        out[i] = e
                        continue
                    try:
                        out[i] = WrappedKey(self.NAME, kid, alg, pub.encrypt(dek + _context_digest(context),
                                                                            _oaep(alg)))
                    finally:
                        del dek
            del plains
        return out

    def _unwrap_many(self, items) -> list:
        """The plaintexts (or errors) of ``items`` (``(wrapped, context, _, disk_id)``, all under one
        key version and algorithm): one unwrapkeys request where the vault has it, else one
        unwrap each (also when the batch request itself fails for another reason than the key,
        so each item gets the answer :meth:`unwrap` would give)."""
        from ...vault.client import BatchUnsupported
        wrapped = items[0][0]
        des = self.des_for(wrapped.kek_id)
        base, name, version = parse_key_url(wrapped.kek_id)
        client = self.client_for(des)
        if base not in self._no_batch:
            try:
                return client.unwrap_many(name, version, [(w.blob, d) for w, _, _, d in items], alg=wrapped.algorithm)
            except BatchUnsupported:
                self._no_batch.add(base)
            except BlockcryptError as e:   # the key refused (disabled, deleted, denied) or the vault away
                return [e] * len(items)
        out = []
        for w, context, _, disk_id in items:
            try:
                out.append(client.unwrap(name, version, w.blob, alg=w.algorithm, disk_id=disk_id))
            except BlockcryptError as e:
                out.append(e)
        return out

    def _wrapping_key(self, to_ref: str, proof: WrappedKey):
        """(public key, algorithm, kid) of the version the vault just wrapped ``proof`` under, if
        that version may wrap now; else None."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        from ..._util.b64 import b64u_decode
        _, name, version = parse_key_url(to_ref)
        try:
            b = self.client_for(self.des_for(to_ref)).get_key(name, version)
            jwk, a = b["key"], b.get("attributes", {})
            now = time.time()
            if (jwk.get("kid") != proof.kek_id or not a.get("enabled") or "wrapKey" not in jwk.get("key_ops", ())
                    or (a.get("nbf") is not None and now < a["nbf"])
                    or (a.get("exp") is not None and now >= a["exp"])):
                return None
            pub = rsa.RSAPublicNumbers(int.from_bytes(b64u_decode(jwk["e"]), "big"),
                                       int.from_bytes(b64u_decode(jwk["n"]), "big")).public_key()
        except (BlockcryptError, KeyError, TypeError, ValueError):
            return None
        return pub, proof.algorithm, proof.kek_id


def _oaep(alg: str):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    h = hashes.SHA256() if alg == WRAP_ALG else hashes.SHA1()
    return padding.OAEP(mgf=padding.MGF1(algorithm=h), algorithm=h, label=None)


def write_secret(state, des_id: str, doc: dict) -> Path:
    p = secret_path(state, des_id)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(p.parent, 0o700)
    atomic_write(p, json.dumps(doc).encode(), 0o600)
    return p
