"""Vault administration on the vault's host: create a vault directory.

``init_vault`` makes the store, the master key, the TLS material and the admin
identity, in an order that a crash can resume (``.init-incomplete`` marks a
vault being made; running init again finishes it).

Caveat: this opens the vault directory directly, so it runs as a user who can
write it, on the vault's host; the running service needs no restart.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import uuid
from pathlib import Path

from .._util.clock import now_s
from .._util.fsutil import fsync_dir
from ..errors import AlreadyExists, Refused, UsageError
from .server import audit, identities, tlsgen
from .server.store import (_SCHEMA, DB_NAME, INIT_MARKER, MASTER_KEY_BYTES, MASTER_KEY_NAME, RETENTION_DAYS_MAX,
                           RETENTION_DAYS_MIN, SCHEMA_VERSION, SKUS, Store, write_private)


def init_vault(vault_dir: str | os.PathLike, *, sku: str = "standard", retention_days: int = 90,
               purge_protection: bool = False, sans: tuple[str, ...] = (),
               cert_file: str | None = None, key_file: str | None = None) -> dict:
    """Create a vault in ``vault_dir``: store, master key, TLS material, admin identity.

    Returns the admin credentials (also written to ``admin.json``, mode 0600).
    """
    if sku not in SKUS:
        raise UsageError(f"unknown sku {sku!r} (use standard or premium)")
    if not RETENTION_DAYS_MIN <= int(retention_days) <= RETENTION_DAYS_MAX:
        raise UsageError(f"retention days must be {RETENTION_DAYS_MIN}..{RETENTION_DAYS_MAX}, not {retention_days}")
    if (cert_file is None) != (key_file is None):
        raise UsageError("give both --cert and --key, or neither")
    d = Path(vault_dir)
    marker = d / INIT_MARKER
    if (d / DB_NAME).exists() and not marker.exists():
        raise AlreadyExists(kind="vault", name=str(d))
    try:
        foreign = d.is_dir() and any(d.iterdir()) and not marker.exists()
    except OSError as e:
        raise UsageError(f"cannot read {d}: {e.strerror}") from None
    if foreign:  # never chmod and fill a directory that is not ours (/etc, a home directory)
        raise Refused(f"{d} is not empty and is not a vault directory; choose a new or empty directory")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    write_private(marker, b"vault init in progress\n")
    for leftover in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", "admin.json", "serve.json"):
        with contextlib.suppress(FileNotFoundError):
            (d / leftover).unlink()
    write_private(d / MASTER_KEY_NAME, os.urandom(MASTER_KEY_BYTES))
    tmp_db = d / (DB_NAME + ".init")
    with contextlib.suppress(FileNotFoundError):
        tmp_db.unlink()
    conn = sqlite3.connect(str(tmp_db), isolation_level=None)
    conn.executescript(_SCHEMA)
    conn.execute("BEGIN")
    meta = {
        "schema_version": str(SCHEMA_VERSION),
        "vault_id": uuid.uuid4().hex,
        "tenant_id": str(uuid.uuid4()),
        "sku": sku,
        "retention_days": str(int(retention_days)),
        "purge_protection": "1" if purge_protection else "0",
        "created": str(now_s()),
    }
    conn.executemany("INSERT INTO meta (k, v) VALUES (?, ?)", meta.items())
    conn.execute("COMMIT")
    conn.close()
    os.chmod(tmp_db, 0o600)
    os.replace(tmp_db, d / DB_NAME)

    store = Store(d, _initialising=True)
    try:
        if cert_file:
            tlsgen.adopt_server_cert(d, store.tls_password, cert_file, key_file)
        else:
            tlsgen.make_ca_and_server(d, store.tls_password, sans)
        admin = identities.create_identity(store, "admin", is_admin=True)
        creds = {"client_id": admin["client_id"], "client_secret": admin["client_secret"],
                 "tenant_id": store.config.tenant_id}
        write_private(d / "admin.json", json.dumps(creds, indent=2).encode())
        with store.tx() as c:
            audit.append(c, {"identity": "local", "operation": "VaultInit", "result": "ok",
                             "detail": f"sku={sku} retention_days={retention_days} "
                                       f"purge_protection={bool(purge_protection)}"}, store.audit_key)
    finally:
        store.close()
    marker.unlink()
    fsync_dir(d)
    return creds
