"""The catalog: disks, snapshots, images and disk encryption sets by name, in SQLite.

Disks, snapshots and images are rows of one table (``kind``), so their names are
unique across the three; ``list_disks`` gives the disks only (what the mount serves
under disks/), ``list_members`` every kind (what a rotation re-wraps).

The disk headers are the source of truth for geometry and keys; the catalog
maps names to disk files and can be rebuilt from the headers
(``blockcrypt catalog rebuild``).

Disk files belong to their state directory: the catalog stores their paths
relative to it (``disks/<id>.img``) and ``DiskRecord.path`` is that path
resolved against the catalog's own directory, so a copied state directory
(``cp -a prod copy``) acts on its own copies of the files, never on the
original's. A catalog of an older release (absolute paths) is converted on
first open: each absolute path becomes ``disks/<file name>`` of this state
directory.

Caveat: one SQLite connection per thread (WAL mode), so the multi-threaded
FUSE daemon and CLI processes can read it concurrently; writers serialize.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import AlreadyExists, NotFound, StateError, UsageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS disks (
    name TEXT PRIMARY KEY,
    disk_id TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    sector_size INTEGER NOT NULL,
    path TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'disk',
    read_only INTEGER NOT NULL DEFAULT 0,
    encryption_type TEXT NOT NULL,
    created TEXT NOT NULL,
    des TEXT,
    revocation TEXT NOT NULL DEFAULT 'immediate',
    source_id TEXT,                 -- creationData: the disk id of the member it was made from
    family_id TEXT                  -- the key lineage it shares with its family (NULL: none yet)
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS des (
    name TEXT PRIMARY KEY,
    des_id TEXT NOT NULL UNIQUE,
    key_url TEXT NOT NULL,          -- as given: https://HOST:PORT/keys/K[/VERSION]
    active_key TEXT NOT NULL,       -- versioned key id DEKs are wrapped under now
    previous_keys TEXT NOT NULL DEFAULT '[]',   -- JSON list while a rotation runs
    type TEXT NOT NULL,
    auto_rotate INTEGER NOT NULL DEFAULT 0,
    identity TEXT NOT NULL,         -- JSON: vault identity name, client id, tenant (secret in keys/des/)
    ca_file TEXT,
    created TEXT NOT NULL
);
"""

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")   # the whole name (fullmatch: no trailing newline)


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid {kind} name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class DiskRecord:
    name: str
    disk_id: str
    size: int
    sector_size: int
    path: str
    kind: str
    read_only: bool
    encryption_type: str
    created: str
    des: str | None = None
    revocation: str = "immediate"
    source_id: str | None = None
    family_id: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["read_only"] = bool(self.read_only)
        return d


@dataclass(frozen=True)
class DesRecord:
    name: str
    des_id: str
    key_url: str
    active_key: str
    previous_keys: tuple
    type: str
    auto_rotate: bool
    identity: dict
    ca_file: str | None
    created: str


class Catalog:
    def __init__(self, db_path: Path):
        self.db_path = Path(db_path)
        self.state_dir = self.db_path.parent.absolute()
        self._local = threading.local()

    def _stored_path(self, path: str) -> str:
        """The path as the catalog stores it: relative to the state directory."""
        p = Path(path)
        if not p.is_absolute():
            return p.as_posix()
        try:
            return p.absolute().relative_to(self.state_dir).as_posix()
        except ValueError:
            return f"disks/{p.name}"  # a file outside this state directory is not ours: ours is disks/NAME

    def _resolved_path(self, stored: str) -> str:
        return str(self.state_dir / stored)

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            try:
                c = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as e:
                raise StateError(path=str(self.db_path), why=f"catalog cannot be opened ({e})") from None
            c.row_factory = sqlite3.Row
            self._local.conn = c
            if not self._migrated:
                self._migrate(c)
        return c

    #: columns added to tables after their first release: (table, column, declaration)
    ADDED_COLUMNS = (("disks", "des", "TEXT"), ("disks", "revocation", "TEXT NOT NULL DEFAULT 'immediate'"),
                     ("disks", "source_id", "TEXT"), ("disks", "family_id", "TEXT"))

    def _migrate(self, c: sqlite3.Connection) -> None:
        """Bring an older catalog up to this schema (new tables, new columns); idempotent."""
        try:
            have = {r["name"] for r in c.execute("PRAGMA table_info(disks)").fetchall()}
            if have:
                c.executescript(SCHEMA)
                for table, col, decl in self.ADDED_COLUMNS:
                    if col not in have:
                        c.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
                absolute = c.execute("SELECT name, path FROM disks WHERE path LIKE '/%'").fetchall()
                if absolute:  # an older catalog, or one copied from another state directory
                    c.execute("BEGIN IMMEDIATE")
                    for r in absolute:
                        c.execute("UPDATE disks SET path = ? WHERE name = ?",
                                  (self._stored_path(r["path"]), r["name"]))
                    c.execute("COMMIT")
        except sqlite3.Error as e:
            raise StateError(path=str(self.db_path), why=f"catalog cannot be upgraded ({e})") from None
        self._migrated = True

    _migrated = False

    def create(self) -> None:
        with self._writing():
            self._conn().executescript(SCHEMA)

    @contextmanager
    def _writing(self):
        """A catalog write that fails (a full state file system, an I/O error) is one StateError
        line, never a traceback; SQLite has rolled it back, so nothing changed."""
        try:
            yield
        except sqlite3.Error as e:
            if isinstance(e, sqlite3.IntegrityError):
                raise
            raise StateError(path=str(self.db_path.parent),
                             why=f"the catalog cannot be written ({e}); nothing was changed") from None

    @contextmanager
    def transaction(self):
        c = self._conn()
        with self._writing():
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # a failed statement may have ended the transaction already
                raise
            else:
                c.execute("COMMIT")

    def _rec(self, row) -> DiskRecord:
        return DiskRecord(row["name"], row["disk_id"], row["size"], row["sector_size"],
                          self._resolved_path(row["path"]),
                          row["kind"], bool(row["read_only"]), row["encryption_type"], row["created"],
                          row["des"], row["revocation"], row["source_id"], row["family_id"])

    def list_disks(self) -> list[DiskRecord]:
        """The disks (kind 'disk': what the mount serves under disks/)."""
        rows = self._conn().execute("SELECT * FROM disks WHERE kind = 'disk' ORDER BY name").fetchall()
        return [self._rec(r) for r in rows]

    def list_members(self, kind: str | None = None) -> list[DiskRecord]:
        """Disks, snapshots and images (or those of one kind): every file a rotation re-wraps."""
        if kind is None:
            rows = self._conn().execute("SELECT * FROM disks ORDER BY name").fetchall()
        else:
            rows = self._conn().execute("SELECT * FROM disks WHERE kind = ? ORDER BY name", (kind,)).fetchall()
        return [self._rec(r) for r in rows]

    def family(self, family_id: str) -> list[DiskRecord]:
        rows = self._conn().execute("SELECT * FROM disks WHERE family_id = ? ORDER BY name", (family_id,)).fetchall()
        return [self._rec(r) for r in rows]

    def get_member(self, kind: str, name: str) -> DiskRecord:
        rec = self.find_disk(name)
        if rec is None or rec.kind != kind:
            raise NotFound(kind=kind, name=name)
        return rec

    def find_disk(self, name: str) -> DiskRecord | None:
        row = self._conn().execute("SELECT * FROM disks WHERE name = ?", (name,)).fetchone()
        return self._rec(row) if row else None

    def get_disk(self, name: str) -> DiskRecord:
        rec = self.find_disk(name)
        if rec is None:
            raise NotFound(kind="disk", name=name)
        return rec

    def insert_disk(self, rec: DiskRecord, conn=None) -> None:
        c = conn or self._conn()
        try:
            c.execute("INSERT INTO disks (name, disk_id, size, sector_size, path, kind, read_only, encryption_type, "
                      "created, des, revocation, source_id, family_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (rec.name, rec.disk_id, rec.size, rec.sector_size, self._stored_path(rec.path), rec.kind,
                       int(rec.read_only), rec.encryption_type, rec.created, rec.des, rec.revocation,
                       rec.source_id, rec.family_id))
        except sqlite3.IntegrityError:
            raise AlreadyExists(kind=rec.kind, name=rec.name) from None

    def update_disk(self, name: str, conn=None, **fields) -> None:
        c = conn or self._conn()
        if "path" in fields:
            fields["path"] = self._stored_path(fields["path"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        c.execute(f"UPDATE disks SET {cols} WHERE name = ?", (*fields.values(), name))

    def delete_disk(self, name: str, conn=None) -> None:
        (conn or self._conn()).execute("DELETE FROM disks WHERE name = ?", (name,))

    def disks_of_des(self, des_name: str) -> list[DiskRecord]:
        rows = self._conn().execute("SELECT * FROM disks WHERE des = ? ORDER BY name", (des_name,)).fetchall()
        return [self._rec(r) for r in rows]

    # -- settings ----------------------------------------------------------------------
    def get_setting(self, key: str, default: str | None = None) -> str | None:
        row = self._conn().execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row["v"] if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self._writing():
            self._set_setting(key, value)

    def _set_setting(self, key: str, value: str) -> None:
        self._conn().execute("INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                             (key, value))

    def delete_setting(self, key: str, conn=None) -> None:
        with self._writing():
            (conn or self._conn()).execute("DELETE FROM meta WHERE k = ?", (key,))

    # -- disk encryption sets ----------------------------------------------------------------
    @staticmethod
    def _des(row) -> DesRecord:
        return DesRecord(row["name"], row["des_id"], row["key_url"], row["active_key"],
                         tuple(json.loads(row["previous_keys"])), row["type"], bool(row["auto_rotate"]),
                         json.loads(row["identity"]), row["ca_file"], row["created"])

    def list_des(self) -> list[DesRecord]:
        return [self._des(r) for r in self._conn().execute("SELECT * FROM des ORDER BY name").fetchall()]

    def find_des(self, name: str) -> DesRecord | None:
        row = self._conn().execute("SELECT * FROM des WHERE name = ?", (name,)).fetchone()
        return self._des(row) if row else None

    def get_des(self, name: str) -> DesRecord:
        rec = self.find_des(name)
        if rec is None:
            raise NotFound(kind="disk encryption set", name=name)
        return rec

    def insert_des(self, d: DesRecord, conn=None) -> None:
        c = conn or self._conn()
        try:
            c.execute("INSERT INTO des VALUES (?,?,?,?,?,?,?,?,?,?)",
                      (d.name, d.des_id, d.key_url, d.active_key, json.dumps(list(d.previous_keys)), d.type,
                       int(d.auto_rotate), json.dumps(d.identity), d.ca_file, d.created))
        except sqlite3.IntegrityError:
            raise AlreadyExists(kind="disk encryption set", name=d.name) from None

    def update_des(self, name: str, conn=None, **fields) -> None:
        enc = {k: (json.dumps(list(v)) if k == "previous_keys" else json.dumps(v) if k == "identity"
                   else int(v) if k == "auto_rotate" else v) for k, v in fields.items()}
        cols = ", ".join(f"{k} = ?" for k in enc)
        (conn or self._conn()).execute(f"UPDATE des SET {cols} WHERE name = ?", (*enc.values(), name))

    def delete_des(self, name: str, conn=None) -> None:
        (conn or self._conn()).execute("DELETE FROM des WHERE name = ?", (name,))

    def replace_all(self, recs: list[DiskRecord]) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM disks")
            for r in recs:
                self.insert_disk(r, c)
