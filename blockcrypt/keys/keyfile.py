"""Platform-key backup files: what ``blockcrypt platform-key export`` writes and ``import`` reads.

A backup file is one JSON document (mode 0600)::

    {"format": "blockcrypt-platform-keys", "formatVersion": 1, "created": "2026-12-01T16:30:00Z",
     "current": 2, "versions": [{"version": 1, "created": "..."}, {"version": 2, ...}],
     "protection": "passphrase",
     "kdf": {"name": "argon2id", "salt": "<b64>", "memoryKiB": 65536, "iterations": 3, "lanes": 4}
            | {"name": "scrypt", "salt": "<b64>", "n": 131072, "r": 8, "p": 1},
     "nonce": "<b64>", "ciphertext": "<b64>"}

``ciphertext`` is AES-256-GCM, under the key the KDF derives from the passphrase, of the
JSON list ``[{"version": N, "key": "<b64 of 32 bytes>"}, ...]``; the associated data is the
document without ``nonce`` and ``ciphertext`` (canonical JSON), so the public version list,
the KDF parameters and the format cannot be changed without the import failing. Argon2id
when this ``cryptography`` has it (44 and later), scrypt otherwise; import accepts both.

``"protection": "none"`` (``--yes-i-understand``) stores ``"keys"`` in clear instead of
``kdf``/``nonce``/``ciphertext``: the file is then as secret as the key store itself.

Caveat: the passphrase file's first line is the passphrase (a trailing newline is not part
of it); KDF parameters read from a file are bounded (a crafted file cannot make an import
take gigabytes of memory or minutes).
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._util.clock import now_iso
from ..errors import KeyBackupError, UsageError

FORMAT = "blockcrypt-platform-keys"
FORMAT_VERSION = 1
PASSPHRASE_MIN_CHARS = 12
ARGON2 = {"memoryKiB": 64 * 1024, "iterations": 3, "lanes": 4}
SCRYPT = {"n": 2 ** 17, "r": 8, "p": 1}
#: what an import accepts from a file (about 4x the defaults)
MAX_ARGON2_KIB, MAX_ARGON2_ITER, MAX_SCRYPT_N = 256 * 1024, 10, 2 ** 19


def read_passphrase(path: str) -> bytes:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the passphrase file {path}: {e.strerror}") from None
    line = raw.split(b"\n", 1)[0].rstrip(b"\r")
    if len(line.decode("utf-8", "replace")) < PASSPHRASE_MIN_CHARS:
        raise UsageError(f"the passphrase in {path} is shorter than {PASSPHRASE_MIN_CHARS} characters: "
                         "use a longer one (its first line is the passphrase)")
    return line


def _argon2():
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    except ImportError:
        return None
    return Argon2id


def _derive(passphrase: bytes, kdf: dict) -> bytes:
    salt = base64.b64decode(kdf["salt"])
    if kdf["name"] == "argon2id":
        Argon2id = _argon2()
        if Argon2id is None:
            raise KeyBackupError(why="it is protected with Argon2id, which this cryptography "
                                     "package lacks (upgrade to cryptography 44 or later)")
        return Argon2id(salt=salt, length=32, iterations=kdf["iterations"], lanes=kdf["lanes"],
                        memory_cost=kdf["memoryKiB"]).derive(passphrase)
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    return Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(passphrase)


def _aad(doc: dict) -> bytes:
    pub = {k: v for k, v in doc.items() if k not in ("nonce", "ciphertext")}
    return json.dumps(pub, sort_keys=True, separators=(",", ":")).encode()


def seal(versions: list[dict], current: int, passphrase: bytes | None) -> bytes:
    """The backup file's bytes for ``versions`` ([{"version", "created", "key": b64}]);
    ``passphrase`` None writes the keys in clear."""
    doc = {"format": FORMAT, "formatVersion": FORMAT_VERSION, "created": now_iso(), "current": current,
           "versions": [{"version": v["version"], "created": v["created"]} for v in versions]}
    secret = [{"version": v["version"], "key": v["key"]} for v in versions]
    if passphrase is None:
        doc.update(protection="none", keys=secret)
        return json.dumps(doc, indent=1).encode()
    salt = base64.b64encode(os.urandom(16)).decode()
    doc["protection"] = "passphrase"
    doc["kdf"] = ({"name": "argon2id", "salt": salt, **ARGON2} if _argon2() is not None
                  else {"name": "scrypt", "salt": salt, **SCRYPT})
    key = _derive(passphrase, doc["kdf"])
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, json.dumps(secret).encode(), _aad(doc))
    doc["nonce"] = base64.b64encode(nonce).decode()
    doc["ciphertext"] = base64.b64encode(ct).decode()
    return json.dumps(doc, indent=1).encode()


def _check_kdf(kdf) -> None:
    ok = isinstance(kdf, dict) and isinstance(kdf.get("salt"), str)
    if ok and kdf.get("name") == "argon2id":
        ok = all(isinstance(kdf.get(k), int) for k in ("memoryKiB", "iterations", "lanes")) and \
            8 * kdf["lanes"] <= kdf["memoryKiB"] <= MAX_ARGON2_KIB and 1 <= kdf["iterations"] <= MAX_ARGON2_ITER \
            and 1 <= kdf["lanes"] <= 16
    elif ok and kdf.get("name") == "scrypt":
        ok = all(isinstance(kdf.get(k), int) for k in ("n", "r", "p")) and \
            2 <= kdf["n"] <= MAX_SCRYPT_N and kdf["n"] & (kdf["n"] - 1) == 0 and 1 <= kdf["r"] <= 16 \
            and 1 <= kdf["p"] <= 4
    else:
        ok = False
    if not ok:
        raise KeyBackupError(why="its key derivation parameters are unknown or out of bounds")


def unseal(data: bytes, passphrase: bytes | None) -> tuple[list[dict], int]:
    """([{"version", "created", "key": b64}], current) from a backup file's bytes."""
    try:
        doc = json.loads(data)
        assert isinstance(doc, dict) and doc.get("format") == FORMAT
    except (ValueError, AssertionError):
        raise KeyBackupError(why="it is not a blockcrypt platform-key backup") from None
    if doc.get("formatVersion") != FORMAT_VERSION:
        raise KeyBackupError(why=f"format version {doc.get('formatVersion')!r} is not one this release reads")
    prot = doc.get("protection")
    if prot == "none":
        secret = doc.get("keys")
    elif prot == "passphrase":
        if passphrase is None:
            raise UsageError("this backup is protected by a passphrase: pass --passphrase-file FILE")
        _check_kdf(doc.get("kdf"))
        try:
            nonce, ct = base64.b64decode(doc["nonce"]), base64.b64decode(doc["ciphertext"])
            secret = json.loads(AESGCM(_derive(passphrase, doc["kdf"])).decrypt(nonce, ct, _aad(doc)))
        except InvalidTag:
            raise KeyBackupError(why="wrong passphrase, or the file was altered") from None
        except (KeyError, ValueError, TypeError):
            raise KeyBackupError(why="it is damaged") from None
    else:
        raise KeyBackupError(why=f"unknown protection {prot!r}")
    try:
        created = {v["version"]: v["created"] for v in doc["versions"]}
        out = []
        for s in secret:
            assert isinstance(s["version"], int) and s["version"] > 0
            assert len(base64.b64decode(s["key"], validate=True)) == 32
            out.append({"version": s["version"], "created": created.get(s["version"], doc["created"]),
                        "key": s["key"]})
        assert out and len({v["version"] for v in out}) == len(out)
        return out, int(doc["current"])
    except (KeyError, TypeError, ValueError, AssertionError):
        raise KeyBackupError(why="it is damaged (its key list is malformed)") from None
