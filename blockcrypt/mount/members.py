"""snapshots/ and images/ of the mount tree (tree.py): the catalog's snapshots and images,
served read-only so that `qemu-img convert`, a backup tool or a read-only loop device can
read them.

Owners, modes and xattrs set on them are kept in the catalog like a disk's (tree.CatalogAttrs).

Caveat: they open through the same path as disks (control/disks.open_volume, read-only),
so the key monitor watches them: revoking a family's key stops its open snapshots and
images too.
"""
from __future__ import annotations

from ..catalog import DiskAttrs
from .tree import CatalogAttrs, Entry, Source


class CatalogMembers(CatalogAttrs, Source):
    """One kind of the catalog's read-only members: ``snapshot`` (snapshots/) or ``image`` (images/)."""

    watched = True

    def __init__(self, state, kind: str):
        self.state = state
        self.kind = kind
        self.dir = f"{kind}s"

    @staticmethod
    def _entry(r, attrs=None) -> Entry:
        return Entry(r.name, r.disk_id, r.size, True, r.path, attrs or DiskAttrs())

    def entries(self) -> dict[str, Entry]:
        attrs = self.state.catalog.all_attrs()
        return {r.name: self._entry(r, attrs.get(r.disk_id)) for r in self.state.catalog.list_members(self.kind)}

    def find(self, name: str) -> Entry | None:
        r = self.state.catalog.find_disk(name)
        return None if r is None or r.kind != self.kind else self._entry(r, self.state.catalog.get_attrs(r.disk_id))

    def open(self, name: str, *, null_cipher: bool = False, cache: str = "buffered"):
        from ..control.disks import open_volume
        rec = self.state.catalog.get_member(self.kind, name)
        return open_volume(self.state, rec.name, null_cipher=null_cipher, cache=cache, read_only=True)
