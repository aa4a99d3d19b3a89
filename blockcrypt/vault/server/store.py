"""The vault's directory and its SQLite store.

Layout of a vault directory ``D`` (made by :func:`init_vault`)::

    D/vault.db        SQLite, WAL journal, synchronous=FULL: config, keys, identities,
                      policies, audit
    D/master.key      32 random bytes, mode 0600: encrypts private keys at rest
                      (AES-256-GCM, AAD = key name and version) and derives the
                      token-signing key and the TLS key passwords (HKDF-SHA256)
    D/ca.pem          the vault's CA certificate (give it to clients to trust)
    D/ca.key          the CA private key, PEM encrypted under a master-key-derived password
    D/server.pem      server certificate (SAN 127.0.0.1, ::1, localhost, extra --san)
    D/server.key      server private key, PEM encrypted the same way
    D/admin.json      the admin identity made at init (client id, secret, tenant), mode 0600
    D/serve.json      written by ``vault serve``: its URL and pid (removed on clean exit)
    D/.init-incomplete  present only while ``vault init`` runs; a vault with it does not open,
                      and ``vault init`` may be run again over it

All writes go through :meth:`Store.tx`, one ``BEGIN IMMEDIATE`` transaction at a
time behind a process-local lock; SQLite's WAL makes every committed
transaction survive a kill -9 of the process, and an uncommitted one vanish.
Reads (:meth:`Store.read`) run on connections of their own (a small pool), each
in one read transaction: a consistent snapshot of what was committed, that
never waits for a writer's commit (its fsync), so key lookups and RSA work of
concurrent requests go on while the audit group commit (audit.py) syncs. A read
inside this thread's open write transaction uses the writer's connection and
sees its changes.

Caveats: whoever can read ``master.key`` and ``vault.db`` holds every software
key; keep the directory on an encrypted, root-only file system. The master key
is not rotatable yet.
"""
from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..._util.fsutil import atomic_write
from ...errors import StateError

DB_NAME = "vault.db"
INIT_MARKER = ".init-incomplete"
MASTER_KEY_NAME = "master.key"
MASTER_KEY_BYTES = 32
SCHEMA_VERSION = 1
SKUS = ("standard", "premium")
RETENTION_DAYS_MIN = 7
RETENTION_DAYS_MAX = 90

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS key_versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    kty TEXT NOT NULL,
    key_size_bits INTEGER NOT NULL,
    key_ops TEXT NOT NULL,
    n TEXT NOT NULL,
    e TEXT NOT NULL,
    private_sealed BLOB,
    hsm_label TEXT,
    enabled INTEGER NOT NULL,
    nbf INTEGER,
    exp INTEGER,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    tags TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX IF NOT EXISTS key_versions_name ON key_versions (name, seq);
CREATE TABLE IF NOT EXISTS deleted_keys (
    name TEXT PRIMARY KEY,
    deleted_date INTEGER NOT NULL,
    scheduled_purge_date INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (
    client_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    secret_salt BLOB NOT NULL,
    secret_hash BLOB NOT NULL,
    is_admin INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS policies (
    client_id TEXT PRIMARY KEY,
    permissions TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    record TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class VaultConfig:
    vault_id: str
    tenant_id: str
    sku: str
    retention_days: int
    purge_protection: bool

    @property
    def recovery_level(self) -> str:
        base = "Recoverable" if self.retention_days == RETENTION_DAYS_MAX else "CustomizedRecoverable"
        return base if self.purge_protection else base + "+Purgeable"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600."""
    atomic_write(path, data, 0o600)


class Store:
    """An open vault directory: config, master-key derived secrets, SQLite."""

    def __init__(self, vault_dir: str | os.PathLike, *, _initialising: bool = False):
        self.dir = Path(vault_dir)
        db_path = self.dir / DB_NAME
        if not db_path.exists():
            raise StateError(path=str(self.dir), why="not a vault directory (run `vault init --dir` first)")
        if not _initialising and (self.dir / INIT_MARKER).exists():
            raise StateError(path=str(self.dir), why="`vault init` did not finish here; run it again")
        mk_path = self.dir / MASTER_KEY_NAME
        try:
            master = mk_path.read_bytes()
        except OSError as e:
            raise StateError(path=str(self.dir), why=f"cannot read {MASTER_KEY_NAME}: {e.strerror}") from None
        if len(master) != MASTER_KEY_BYTES:
            raise StateError(path=str(self.dir), why=f"{MASTER_KEY_NAME} has the wrong length")
        self._seal_key = _derive(master, b"blockcrypt-vault key sealing v1")
        self.token_key = _derive(master, b"blockcrypt-vault token signing v1")
        self.tls_password = _derive(master, b"blockcrypt-vault tls key password v1").hex().encode()
        self.audit_key = _derive(master, b"blockcrypt-vault audit chain v1")
        del master
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(db_path), isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._in_tx = False
        self._tx_thread: int | None = None
        self._db_path = db_path
        self._readers: queue.SimpleQueue = queue.SimpleQueue()   # idle read connections
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()    # not the write lock: a read never waits for a commit
        self._closed = False
        self.config = self._load_config()

    # -- config -----------------------------------------------------------------
    def _load_config(self) -> VaultConfig:
        rows = {r["k"]: r["v"] for r in self._conn.execute("SELECT k, v FROM meta")}
        try:
            return VaultConfig(
                vault_id=rows["vault_id"],
                tenant_id=rows["tenant_id"],
                sku=rows["sku"],
                retention_days=int(rows["retention_days"]),
                purge_protection=rows["purge_protection"] == "1",
            )
        except KeyError as e:
            raise StateError(path=str(self.dir), why=f"vault.db lacks its configuration ({e.args[0]})") from None

    # -- transactions -------------------------------------------------------------
    @contextlib.contextmanager
    def tx(self):
        """One write transaction (re-entrant: nested uses join the outer one)."""
        with self._lock:
            if self._in_tx:
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._in_tx, self._tx_thread = True, threading.get_ident()
            try:
                yield self._conn
            except BaseException:
                self._in_tx, self._tx_thread = False, None
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._in_tx, self._tx_thread = False, None
                self._conn.execute("COMMIT")

    def in_tx(self) -> bool:
        """Whether this thread has a write transaction open."""
        return self._tx_thread == threading.get_ident()

    @contextlib.contextmanager
    def read(self):
        """A read-only snapshot of the committed state (this thread's open transaction, if any)."""
        if self.in_tx():
            yield self._conn
            return
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._new_reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:
                conn.close()
            else:
                self._readers.put(conn)

    def _new_reader(self) -> sqlite3.Connection:
        with self._readers_lock:
            if self._closed:
                raise StateError(path=str(self.dir), why="the vault store is closed")
            conn = sqlite3.connect(str(self._db_path), isolation_level=None, check_same_thread=False, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA query_only=ON")
            self._all_readers.append(conn)
            return conn

    def close(self) -> None:
        with self._lock, self._readers_lock:
            self._closed = True
            for conn in self._all_readers:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._conn.close()

    # -- private key sealing --------------------------------------------------------
    def seal(self, name: str, version: str, secret: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self._seal_key).encrypt(nonce, secret, _aad(name, version))

    def unseal(self, name: str, version: str, sealed: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag
        try:
            return AESGCM(self._seal_key).decrypt(sealed[:12], sealed[12:], _aad(name, version))
        except (InvalidTag, ValueError):
            raise StateError(path=str(self.dir), why=f"sealed key {name}/{version} fails its integrity check") from None


def _aad(name: str, version: str) -> bytes:
    return f"blockcrypt-vault:key:{name}:{version}".encode()


def _derive(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def open_store(vault_dir: str | os.PathLike) -> Store:
    return Store(vault_dir)
