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

from .._util.b64 import b64u_decode as b64d, b64u_encode as b64e
from ..errors import (AlreadyExists, NotFound, Refused, StateError, UsageError, XattrExists, XattrMissing,
                      XattrTooLarge, XattrUnsupported)

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
CREATE TABLE IF NOT EXISTS disk_attrs (  -- what chmod, chown and setxattr did to a disk file
    disk_id TEXT PRIMARY KEY,
    mode INTEGER,                   -- NULL: the mount's default (0600, 0660 with --allow-other)
    uid INTEGER,
    gid INTEGER,
    xattrs TEXT NOT NULL DEFAULT '{}'   -- JSON: name -> base64 value (user.* and trusted.* only)
);
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


#: bounds on one disk's extended attributes (libvirt's DAC driver keeps three short ones)
XATTR_NAME_MAX = 255           # bytes (the kernel's XATTR_NAME_MAX)
XATTR_VALUE_MAX = 4096         # bytes per value
XATTRS_PER_DISK_MAX = 32
XATTRS_BYTES_MAX = 16384       # names and values of one disk together
XATTR_NAMESPACES = ("user.", "trusted.")
XATTR_CREATE, XATTR_REPLACE = 1, 2   # setxattr(2) flags


def check_xattr_name(name: str) -> str:
    """A name this catalog stores: ``user.*`` or ``trusted.*``, at most 255 bytes."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > XATTR_NAME_MAX:
        raise XattrTooLarge(name=name, limit=f"names of at most {XATTR_NAME_MAX} bytes")
    if not any(name.startswith(ns) and len(name) > len(ns) for ns in XATTR_NAMESPACES):
        raise XattrUnsupported(name=name)
    return name


@dataclass(frozen=True)
class DiskAttrs:
    """What chmod, chown and setxattr recorded for one disk file (None: the mount's default)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    xattrs: tuple = ()          # ((name, value bytes), ...) sorted by name

    def to_json(self) -> dict:
        return {"mode": None if self.mode is None else f"{self.mode:04o}", "uid": self.uid, "gid": self.gid,
                "xattrs": sorted(n for n, _ in self.xattrs)}


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
        c = conn or self._conn()
        c.execute("DELETE FROM disk_attrs WHERE disk_id IN (SELECT disk_id FROM disks WHERE name = ?)", (name,))
        c.execute("DELETE FROM disks WHERE name = ?", (name,))

    # -- owners, modes and extended attributes of disk files -------------------------------
    @staticmethod
    def _attrs(row) -> DiskAttrs:
        xa = tuple(sorted((n, b64d(v)) for n, v in json.loads(row["xattrs"]).items()))
        return DiskAttrs(row["mode"], row["uid"], row["gid"], xa)

    def get_attrs(self, disk_id: str) -> DiskAttrs:
        row = self._conn().execute("SELECT * FROM disk_attrs WHERE disk_id = ?", (disk_id,)).fetchone()
        return self._attrs(row) if row else DiskAttrs()

    def all_attrs(self) -> dict[str, DiskAttrs]:
        """disk id -> its attributes, for every disk that has any (one query for a whole table push)."""
        return {r["disk_id"]: self._attrs(r) for r in self._conn().execute("SELECT * FROM disk_attrs").fetchall()}

    def _attrs_row(self, c, disk_id: str) -> DiskAttrs:
        c.execute("INSERT OR IGNORE INTO disk_attrs (disk_id) VALUES (?)", (disk_id,))
        return self._attrs(c.execute("SELECT * FROM disk_attrs WHERE disk_id = ?", (disk_id,)).fetchone())

    def set_owner(self, disk_id: str, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None) -> DiskAttrs:
        """Record a chmod (permission bits only) and/or chown of a disk file; None leaves one as it is."""
        if mode is not None and mode & ~0o777:
            raise Refused("setuid, setgid and sticky bits are not kept on disk files: chmod the permission "
                          "bits (0o777) only")
        for what, v in (("uid", uid), ("gid", gid)):
            if v is not None and not 0 <= v < 2 ** 32 - 1:
                raise UsageError(f"invalid {what} {v}")
        with self.transaction() as c:
            self._attrs_row(c, disk_id)
            for col, v in (("mode", mode), ("uid", uid), ("gid", gid)):
                if v is not None:
                    c.execute(f"UPDATE disk_attrs SET {col} = ? WHERE disk_id = ?", (v, disk_id))
            return self._attrs(c.execute("SELECT * FROM disk_attrs WHERE disk_id = ?", (disk_id,)).fetchone())

    def set_xattr(self, disk_id: str, name: str, value: bytes | None, flags: int = 0,
                  *, what: str = "disk") -> DiskAttrs:
        """setxattr (``value`` bytes; XATTR_CREATE/XATTR_REPLACE in ``flags``) or removexattr
        (``value`` None) of a disk file, within the bounds above."""
        check_xattr_name(name)
        if value is not None and len(value) > XATTR_VALUE_MAX:
            raise XattrTooLarge(name=name, limit=f"values of at most {XATTR_VALUE_MAX} bytes")
        with self.transaction() as c:
            cur = dict(self._attrs_row(c, disk_id).xattrs)
            if value is None:
                if name not in cur:
                    raise XattrMissing(kind=what, xname=name)
                del cur[name]
            else:
                if flags & XATTR_CREATE and name in cur:
                    raise XattrExists(kind=what, xname=name)
                if flags & XATTR_REPLACE and name not in cur:
                    raise XattrMissing(kind=what, xname=name)
                cur[name] = bytes(value)
                if len(cur) > XATTRS_PER_DISK_MAX:
                    raise XattrTooLarge(name=name, limit=f"{XATTRS_PER_DISK_MAX} attributes per disk")
                total = sum(len(n.encode("utf-8", "surrogateescape")) + len(v) for n, v in cur.items())
                if total > XATTRS_BYTES_MAX:
                    raise XattrTooLarge(name=name, limit=f"{XATTRS_BYTES_MAX} bytes of names and values per disk")
            c.execute("UPDATE disk_attrs SET xattrs = ? WHERE disk_id = ?",
                      (json.dumps({n: b64e(v) for n, v in sorted(cur.items())}), disk_id))
            return self._attrs(c.execute("SELECT * FROM disk_attrs WHERE disk_id = ?", (disk_id,)).fetchone())

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
