"""Platform-managed keys: the default KEK provider, a versioned key store in the state directory.

The store is ``STATE/keys/platform.json`` (directory 0700, file 0600, owned by
the user running blockcrypt). It holds 256-bit platform keys by version::

    {"format": 1, "current": 2, "pending_rotation": 2 | null, "retired": [1],
     "versions": [{"version": 1, "created": "...", "key": "<base64>"}, ...]}

``retired`` lists the versions a rotation forgot (purged: data under them is gone); a
version the store has neither kept nor retired is *not in this store* (a disk file
copied from another host): ``KeyNotInStore`` says to import it (``platform-key import``
of a backup that ``platform-key export`` wrote, keys/keyfile.py).

A DEK is wrapped with AES-256-GCM under the current version: blob = nonce(12)
|| ciphertext || tag(16); the associated data is the binding context (disk id
and layer role) plus the versioned KEK id, so a wrapped DEK moved to another
disk, role or version does not unwrap.

The store is rewritten atomically (temp file, fsync, rename, fsync of the
directory). Rotation adds a version, re-wraps every disk's DEK (no data is
rewritten) and forgets versions no disk uses any more; see rotate_platform_key()
in blockcrypt/disks.py for the crash-safe sequence.

With ``blockcrypt init --platform-keys pkcs11:token=T;object=K?module-path=M&pin-source=file:P``
the keys live in a PKCS#11 token instead (providers/pkcs11.py): the store
records ``"backend": "pkcs11"`` and the URI, each version is a non-extractable
AES-256 key object (CKA_ID = the version) and its entries carry no key; the
wrap is the same AES-256-GCM construction, computed inside the token. A
rotation creates the new object before the store names it and destroys
retired objects after the store has forgotten them, so a crash leaves at most
an unused object (reused or destroyed by the next rotation).

Caveat: the platform keys are the root of trust of platform-keyed disks; in
the file backend they are stored in plaintext, protected by file permissions
(like a LUKS key file). Put the state directory on storage you trust, or keep
the platform keys in a token.
"""
from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..._util.clock import now_iso
from ..._util.fsutil import atomic_write
from ...errors import (KeyError_, KeyIntegrityError, KeyNotInStore, KeyPurged, KeyStoreError, PlatformKeyConflict,
                       UsageError)
from ..base import KekProvider, KeyStatus, WrappedKey

STORE_NAME = "platform.json"
WRAP_ALG = "A256GCM"


class PlatformKeyStore:
    """The key store file; every method re-reads it so several processes agree."""

    def __init__(self, keys_dir: Path):
        self.dir = Path(keys_dir)
        self.path = self.dir / STORE_NAME

    # -- life cycle -------------------------------------------------------------
    def create(self, pkcs11_uri: str | None = None) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if self.path.exists():
            doc = self.load()  # validates permissions and content
            if pkcs11_uri and doc.get("uri") != _token_keys(pkcs11_uri).uri.full():
                raise KeyStoreError(path=str(self.path), why="exists already with another key backend "
                                    "(the platform keys cannot move; initialise a new state directory)")
            return
        doc = {"format": 1, "current": 1, "pending_rotation": None, "versions": []}
        if pkcs11_uri:
            keys = _token_keys(pkcs11_uri)
            doc.update(backend="pkcs11", uri=keys.uri.full())
            version = max(keys.versions() or [0]) + 1   # never reuse an object someone else made
            doc["current"] = version
        else:
            version = 1
        doc["versions"] = [self._new_version(doc, version)]
        self._save(doc)

    def _new_version(self, doc: dict, version: int) -> dict:
        if doc.get("backend") == "pkcs11":
            keys = self.token_keys(doc)
            if version not in keys.versions():   # made by an interrupted rotation: reuse it
                keys.create(version)
            return {"version": version, "created": now_iso()}
        return {"version": version, "created": now_iso(),
                "key": base64.b64encode(os.urandom(32)).decode()}

    @staticmethod
    def token_keys(doc: dict):
        """The token's key objects of a pkcs11-backed store (None for the file backend)."""
        if doc.get("backend") != "pkcs11":
            return None
        return _token_keys(doc["uri"])

    def _check_perms(self) -> None:
        for p, want in ((self.dir, 0o700), (self.path, 0o600)):
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise KeyStoreError(path=str(self.path),
                                    why="missing (run `blockcrypt init` to create the state directory)") from None
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeyStoreError(path=str(self.path),
                                    why=f"{p} has mode {mode:04o}, too open (chmod {want:o} {p})")
            if st.st_uid != os.geteuid():
                raise KeyStoreError(path=str(self.path),
                                    why=f"{p} is owned by uid {st.st_uid}, not by the user running blockcrypt")

    def load(self) -> dict:
        self._check_perms()
        try:
            doc = json.loads(self.path.read_bytes())
            assert doc["format"] == 1 and doc["versions"]
            assert doc.get("backend", "file") in ("file", "pkcs11")
            for v in doc["versions"]:
                if doc.get("backend") == "pkcs11":
                    assert "key" not in v and isinstance(v["version"], int) and doc["uri"]
                elif len(base64.b64decode(v["key"])) != 32:
                    raise ValueError
        except PermissionError:
            raise KeyStoreError(path=str(self.path), why="not readable by this user") from None
        except Exception:
            raise KeyStoreError(path=str(self.path), why="unreadable or damaged") from None
        return doc

    def _save(self, doc: dict) -> None:
        atomic_write(self.path, json.dumps(doc, indent=1).encode())

    # -- queries ------------------------------------------------------------------
    @staticmethod
    def _absent(doc: dict, version: int) -> KeyError_:
        """The error for a version the store lacks: purged when a rotation retired it here,
        otherwise not in this store (it may be in another host's: import it)."""
        if version in doc.get("retired", ()):
            return KeyPurged(key_id=f"platform/{version}")
        return KeyNotInStore(version=version)

    def key(self, version: int) -> bytes:
        doc = self.load()
        if doc.get("backend") == "pkcs11":
            raise TypeError("the platform keys of this store are in a PKCS#11 token and never leave it")
        for v in doc["versions"]:
            if v["version"] == version:
                return base64.b64decode(v["key"])
        raise self._absent(doc, version)

    def keys_for(self, version: int):
        """(doc, token keys or None) for a version the store knows; KeyPurged for one it forgot,
        KeyNotInStore for one it never had."""
        doc = self.load()
        if not any(v["version"] == version for v in doc["versions"]):
            raise self._absent(doc, version)
        return doc, self.token_keys(doc)

    def backend(self) -> str:
        return self.load().get("backend", "file")

    def current(self) -> int:
        return self.load()["current"]

    def versions(self) -> list[dict]:
        """Public view: version numbers and dates, never key bytes."""
        doc = self.load()
        return [{"version": v["version"], "created": v["created"],
                 "current": v["version"] == doc["current"]} for v in doc["versions"]]

    def pending_rotation(self) -> int | None:
        return self.load().get("pending_rotation")

    # -- rotation steps (see disks.rotate_platform_key) -------------------------------
    def begin_rotation(self) -> int:
        """Add a new current version and mark the rotation pending; resume one if pending."""
        doc = self.load()
        if doc.get("pending_rotation"):
            return doc["pending_rotation"]
        new = max(v["version"] for v in doc["versions"]) + 1
        doc["versions"].append(self._new_version(doc, new))
        doc["current"] = new
        doc["pending_rotation"] = new
        self._save(doc)
        return new

    def finish_rotation(self, in_use: set[int]) -> list[int]:
        """Clear the pending mark and forget versions that no disk uses; returns the removed ones."""
        doc = self.load()
        keep = in_use | {doc["current"]}
        removed = [v["version"] for v in doc["versions"] if v["version"] not in keep]
        doc["versions"] = [v for v in doc["versions"] if v["version"] in keep]
        doc["retired"] = sorted(set(doc.get("retired", [])) | set(removed))
        doc["pending_rotation"] = None
        self._save(doc)
        keys = self.token_keys(doc)
        if keys is not None:   # after the store forgot them: a crash here leaves unused objects only
            for v in keys.versions():
                if v not in keep and v < doc["current"]:
                    keys.destroy(v)
        return removed


    # -- backup and moving hosts (keys/keyfile.py; cli/platformkey.py) -------------------
    def _file_doc(self) -> dict:
        doc = self.load()
        if doc.get("backend") == "pkcs11":
            raise KeyStoreError(path=str(self.path), why="its platform keys are in a PKCS#11 token and never "
                                "leave it: back up the token with its own tools")
        return doc

    def export_versions(self, versions: list[int] | None = None) -> tuple[list[dict], int]:
        """([{"version", "created", "key"}], current) of every version (or of ``versions``)."""
        doc = self._file_doc()
        have = {v["version"]: v for v in doc["versions"]}
        for n in versions or ():
            if n not in have:
                raise self._absent(doc, n)
        picked = [have[n] for n in sorted(versions)] if versions else [have[n] for n in sorted(have)]
        return [{"version": v["version"], "created": v["created"], "key": v["key"]} for v in picked], doc["current"]

    def import_versions(self, versions: list[dict], *, unused: set[int] = frozenset(),
                        replace_unused: bool = False) -> dict:
        """Add the backup's versions this store lacks. A version it holds with the same key is
        left as it is (an import is idempotent); with a different key the import is refused
        (PlatformKeyConflict, nothing written), unless ``replace_unused`` and the version is in
        ``unused`` (no disk of this state directory uses it: the caller checked), as on a host
        made with `blockcrypt init` for a restore. The current version does not change.
        Returns {"added": [...], "unchanged": [...], "replaced": [...]}."""
        doc = self._file_doc()
        have = {v["version"]: v for v in doc["versions"]}
        added, same, replaced = [], [], []
        for v in sorted(versions, key=lambda v: v["version"]):
            n = v["version"]
            mine = have.get(n)
            if mine is None:
                added.append(n)
            elif base64.b64decode(mine["key"]) == base64.b64decode(v["key"]):
                same.append(n)
            elif n in unused and replace_unused:
                replaced.append(n)
            elif n in unused:
                raise PlatformKeyConflict(version=n, hint=f"; no disk here uses this store's platform key {n}: "
                                          "pass --replace-unused to replace it with the backup's")
            else:
                raise PlatformKeyConflict(version=n, hint="; disks here use it, so it stays (docs/OPERATIONS.md: "
                                          "moving a disk between hosts whose key versions collide)")
        if doc.get("pending_rotation") is not None and (added or replaced):
            raise KeyStoreError(path=str(self.path), why="a platform-key rotation is pending: finish it "
                                "(`blockcrypt platform-key rotate`) before importing keys")
        if added or replaced:
            byv = {x["version"]: x for x in versions}
            for n in replaced:
                have[n] = {"version": n, "created": byv[n]["created"], "key": byv[n]["key"]}
            for n in added:
                have[n] = {"version": n, "created": byv[n]["created"], "key": byv[n]["key"]}
            doc["versions"] = [have[n] for n in sorted(have)]
            doc["retired"] = [n for n in doc.get("retired", []) if n not in have]
            self._save(doc)
        return {"added": added, "unchanged": same, "replaced": replaced}


def _token_keys(uri: str):
    from .pkcs11 import Pkcs11Keys, parse_uri
    u = parse_uri(uri)
    if u.version is not None:
        raise UsageError("--platform-keys names the key, not a version: drop ;id= from the PKCS#11 URI")
    return Pkcs11Keys(u)


def parse_platform_kek_id(kek_id: str) -> int:
    prefix, _, ver = kek_id.partition("/")
    if prefix != "platform" or not ver.isdigit():
        raise KeyIntegrityError(key_id=kek_id, msg="not a platform key id")
    return int(ver)


class PlatformKeyProvider(KekProvider):
    """AES-256-GCM wrap under versioned platform keys from the state directory."""

    NAME = "platform"

    def __init__(self, state):
        self.store = PlatformKeyStore(Path(state.path) / "keys")

    def default_ref(self) -> str:
        return "platform/latest"

    def _resolve(self, kek_ref: str) -> int:
        if kek_ref in ("platform", "platform/latest", "", None):
            return self.store.current()
        return parse_platform_kek_id(kek_ref)

    def status(self, kek_ref: str) -> KeyStatus:
        version = self._resolve(kek_ref)
        kek_id = f"platform/{version}"
        try:
            _doc, keys = self.store.keys_for(version)
            if keys is not None:
                keys.check(version)
        except KeyError_ as e:
            return KeyStatus(kek_id, False, e.reason, str(e))
        return KeyStatus(kek_id, True)

    def wrap(self, kek_ref: str, dek: bytes, context: bytes, disk_id: str | None = None) -> WrappedKey:
        version = self._resolve(kek_ref)
        kek_id = f"platform/{version}"
        _doc, keys = self.store.keys_for(version)
        if keys is not None:
            return WrappedKey(self.NAME, kek_id, WRAP_ALG,
                              keys.encrypt(version, bytes(dek), context + kek_id.encode()))
        nonce = os.urandom(12)
        ct = AESGCM(self.store.key(version)).encrypt(nonce, bytes(dek), context + kek_id.encode())
        return WrappedKey(self.NAME, kek_id, WRAP_ALG, nonce + ct)

    def unwrap(self, wrapped: WrappedKey, context: bytes, disk_id: str | None = None) -> bytes:
        version = parse_platform_kek_id(wrapped.kek_id)
        if wrapped.algorithm != WRAP_ALG or len(wrapped.blob) < 12 + 16:
            raise KeyIntegrityError(key_id=wrapped.kek_id, msg="unknown wrap algorithm or short blob")
        _doc, keys = self.store.keys_for(version)
        if keys is not None:
            return keys.decrypt(version, wrapped.blob, context + wrapped.kek_id.encode())
        key = self.store.key(version)
        try:
            return AESGCM(key).decrypt(wrapped.blob[:12], wrapped.blob[12:],
                                       context + wrapped.kek_id.encode())
        except InvalidTag:
            raise KeyIntegrityError(key_id=wrapped.kek_id,
                                    msg="authentication failed: wrong disk, role or key version, or tampered; a disk "
                                        "from another host was wrapped under that host's key of this version "
                                        "(docs/OPERATIONS.md: moving a disk to another host)") from None
