"""What a mount serves: top-level directories, each filled by a *source*.

Tree::

    MOUNTPOINT/
      disks/<name>        the catalog's disks (CatalogDisks)
      snapshots/<name>    the catalog's snapshots, read-only (members.py)
      images/<name>       the catalog's images, read-only (members.py)
      temp/<name>         (a source of host-local temp disks)

A source owns one directory. It says which names it has now (:meth:`Source.entries`,
which the front ends call at most once per second, and :meth:`Source.find` on a
lookup of a name they have not seen) and opens one of them to a
:class:`~blockcrypt.volume.Volume` (:meth:`Source.open`, outside any data request).
``watched`` says whether the key monitor checks the volumes it opens (a disk whose
key lives in a key store: yes; an ephemeral temp disk: no).

Both front ends serve the directories of the sources they are given, in
:data:`DIRS` order, disks/ first; the native session gets them as its ``dirs`` and
names entries ``"<dir>/<name>"`` (:func:`join`, :func:`split`).

Owners, modes and extended attributes: a source whose files are catalog members keeps
what chmod, chown and setxattr do to them in the catalog, per disk id
(:meth:`Source.set_owner`, :meth:`Source.set_xattr`; ``Entry.attrs`` serves them back,
after a remount too); the front ends apply their defaults (0600 root, or root:disk 0660
with ``--allow-other``) where nothing was recorded. Other sources refuse both.

Caveat: an entry's ``ident`` must change when a name is deleted and made again (the
disk id does), so a front end does not serve the new disk through the old one's
open volume.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..catalog import DiskAttrs
from ..errors import NotFound, Refused, XattrUnsupported

#: every top-level directory a mount may serve, in the order it lists them
DIRS = ("disks", "snapshots", "images", "temp")


@dataclass(frozen=True)
class Entry:
    """One file of a directory, as the tree shows it."""

    name: str
    ident: str                  # stable identity: a name deleted and re-made gets a new one
    size: int
    read_only: bool
    backing_path: str | None    # for st_blocks and times while the file is not open
    attrs: DiskAttrs = field(default_factory=DiskAttrs)   # recorded chmod/chown/xattrs


class Source:
    """The contents of one top-level directory. Subclasses set ``dir`` and implement
    :meth:`entries` and :meth:`open`."""

    dir: str = "disks"
    watched: bool = True

    def entries(self) -> dict[str, Entry]:
        """Every name the directory has now."""
        raise NotImplementedError

    def find(self, name: str) -> Entry | None:
        """One name (a lookup of a name the front end has not seen); may be cheaper than
        :meth:`entries`."""
        return self.entries().get(name)

    def open(self, name: str, *, null_cipher: bool = False, cache: str = "buffered"):
        """Open ``name`` to a :class:`~blockcrypt.volume.Volume` (a BlockcryptError with an
        ``errno`` when it cannot be)."""
        raise NotImplementedError

    def set_owner(self, name: str, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None) -> None:
        """chmod/chown of ``name`` (None: not changed); refused unless the source keeps them."""
        raise Refused(f"{self.dir}/{name}: owner and mode are fixed here")

    def set_xattr(self, name: str, xname: str, value: bytes | None, flags: int = 0) -> None:
        """setxattr (value bytes) or removexattr (value None) of ``name``."""
        raise XattrUnsupported(name=xname)


class CatalogAttrs:
    """Owners, modes and xattrs of catalog members, kept in the catalog per disk id."""

    state = None

    def _ident(self, name: str) -> str:
        e = self.find(name)
        if e is None:
            raise NotFound(kind=self.dir.rstrip("s"), name=name)
        return e.ident

    def set_owner(self, name: str, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None) -> None:
        self.state.catalog.set_owner(self._ident(name), mode=mode, uid=uid, gid=gid)

    def set_xattr(self, name: str, xname: str, value: bytes | None, flags: int = 0) -> None:
        self.state.catalog.set_xattr(self._ident(name), xname, value, flags, what=f"{self.dir}/{name}")


class CatalogDisks(CatalogAttrs, Source):
    """disks/: the disks of the state directory's catalog."""

    dir = "disks"
    watched = True

    def __init__(self, state):
        self.state = state

    @staticmethod
    def _entry(r, attrs: DiskAttrs | None = None) -> Entry:
        return Entry(r.name, r.disk_id, r.size, bool(r.read_only), r.path, attrs or DiskAttrs())

    def entries(self) -> dict[str, Entry]:
        attrs = self.state.catalog.all_attrs()
        return {r.name: self._entry(r, attrs.get(r.disk_id)) for r in self.state.catalog.list_disks()}

    def find(self, name: str) -> Entry | None:
        r = self.state.catalog.find_disk(name)
        if r is None or r.kind != "disk":  # snapshots share the table
            return None
        return self._entry(r, self.state.catalog.get_attrs(r.disk_id))

    def open(self, name: str, *, null_cipher: bool = False, cache: str = "buffered"):
        from ..control.disks import open_volume
        return open_volume(self.state, name, null_cipher=null_cipher, cache=cache)


def ordered(sources) -> list[Source]:
    """The sources in :data:`DIRS` order; one per directory, disks/ among them."""
    by_dir: dict[str, Source] = {}
    for src in sources:
        if src.dir not in DIRS:
            raise ValueError(f"unknown top-level directory {src.dir!r}")
        if src.dir in by_dir:
            raise ValueError(f"two sources for {src.dir}/")
        by_dir[src.dir] = src
    if "disks" not in by_dir:
        raise ValueError("no source for disks/")
    return [by_dir[d] for d in DIRS if d in by_dir]


def join(dir_: str, name: str) -> str:
    return f"{dir_}/{name}"


def split(path: str) -> tuple[str, str]:
    """'<dir>/<name>' -> (dir, name); a bare name is in disks/."""
    d, sep, name = path.partition("/")
    return (d, name) if sep else ("disks", d)
