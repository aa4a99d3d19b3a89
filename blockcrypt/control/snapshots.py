"""Snapshots, images and disks made from them: copy-on-write members of a family.

A *family* is a disk, its snapshots and images, the disks made from those, and so
on. Its members share one DEK lineage (the same wrapped DEK, bound to the family
id), so a chunk of ciphertext means the same thing in every member and is shared
as it is (docs/FORMAT.md, "Snapshots and images"). Each member is a chain of files
(native/engine/bc_storage_cow.c): its own top file over its parent's files.

- ``snapshot create DISK S`` *freezes* the disk's current top file: that file (its
  bytes never change again) becomes the snapshot's, and the disk goes on in a new,
  empty top file over it. The disk keeps its name and id; the snapshot gets a new
  id. A disk open in a live mount is switched to its new top by the daemon
  (mount/switch.py, control/live.py) before the command returns.
- ``image create I --source DISK`` freezes like a snapshot; ``--source SNAPSHOT``
  makes an empty read-only top over the snapshot.
- ``disk create D --source SNAPSHOT|IMAGE [--size]`` makes an empty writable top.

Each is O(1): a header write and a sparse file, whatever the size and the data.

Keys: a member keeps its source's DES (a customer-key family stays on its customer
key; another DES for a disk from a customer-key image is refused, naming ``disk
copy``); double-encrypted sources give double-encrypted members (same layers).

Deleting: a member no other file is built on is removed with its file. A snapshot
or image whose file is the parent of exactly one other file, of a member not open
in a live mount, is *merged* into that file (the chunks the child lacks are copied
up into it, made durable, then the child's parent pointer skips the file, which is
removed); anything else is refused with one line naming the dependents.

Caveats: ``snapshot create`` on a mounted disk is point-in-time as of the daemon's
switch (writes in flight finish first); like a power cut, it is crash-consistent,
not application-consistent (sync or fsfreeze first). A crash of this command
between its file and catalog steps leaves either an unused new file (removed by
``catalog rebuild``) or a catalog that ``catalog rebuild`` repairs from the headers.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from .._util.clock import now_iso
from ..catalog import DiskRecord, check_name
from ..errors import AlreadyExists, BadSize, NoSpace, NotFound, Refused, StateError
from ..format import Header, Layout, read_header, write_header
from ..format.layout import (CHUNK_BYTES, FEATURE_OVERLAY, MAP_AREA_OFFSET, MAX_CHAIN_FILES,
                             MAX_FAMILY_DISK_SIZE, map_chunks_for)
from ..storage import LocalFileBacking, is_enospc
from ..volume.volume import chain_below, file_path, settle_journal
from . import disks

log = logging.getLogger("blockcrypt.snapshots")

KINDS = ("snapshot", "image")


# --- headers --------------------------------------------------------------------------

def _family_of(h: Header) -> tuple[bytes, bytes]:
    """(family id, own file id) of a header: a file outside any family is the first of its own."""
    if h.overlay:
        return h.family_id, h.file_id
    return h.disk_id, h.disk_id


def _as_member(h: Header, **kw) -> Header:
    fam, fid = _family_of(h)
    base = dict(required_features=h.required_features | FEATURE_OVERLAY, family_id=fam, file_id=fid,
                parent_id=h.parent_id if h.overlay else None, map_chunks=h.map_chunks if h.overlay else 0,
                chunk_bytes=h.chunk_bytes if h.overlay else CHUNK_BYTES, source_id=h.source_id)
    base.update(kw)
    return h.evolve(**base)


def _check_family_size(name: str, size: int) -> None:
    if size > MAX_FAMILY_DISK_SIZE:
        raise BadSize(value=size, why=f"{name!r}: members of a family (snapshots, images, disks made from them) "
                                      f"hold at most {MAX_FAMILY_DISK_SIZE} bytes")


def _depth(path: str, h: Header, name: str) -> int:
    return len(chain_below(path, h, name))


def _new_top(st, h_child: Header, name: str) -> tuple[Path, Header]:
    """Write a new, empty top file for header ``h_child`` (an overlay over its parent)."""
    path = Path(file_path(str(st.disks_dir), h_child.file_id))
    try:
        b = LocalFileBacking(str(path), True, create_mode=0o600)
    except FileExistsError:
        raise StateError(path=str(path), why="a file with this id exists") from None
    except OSError as e:
        raise StateError(path=str(st.path), why=f"cannot create the file ({e.strerror})") from None
    try:
        b.set_size(Layout.of(h_child).backing_size(h_child.size))
        written = write_header(b, h_child)
    except OSError as e:
        b.close()
        path.unlink(missing_ok=True)
        if is_enospc(e):
            raise NoSpace(name=name) from None
        raise
    except BaseException:
        b.close()
        path.unlink(missing_ok=True)
        raise
    b.close()
    return path, written


def _child_header(parent: Header, *, disk_id: bytes, name: str, kind: str, read_only: bool,
                  size: int | None = None, source_id: bytes) -> Header:
    fam, parent_file = _family_of(parent)
    return _as_member(parent, disk_id=disk_id, name=name, kind=kind, read_only=read_only,
                      size=size if size is not None else parent.size, seqno=0, file_id=Header.new_id(),
                      parent_id=parent_file, map_chunks=map_chunks_for(parent.size),
                      chunk_bytes=CHUNK_BYTES, source_id=source_id)


def _record(h: Header, path: Path, *, des, revocation: str, source_id: bytes | None) -> DiskRecord:
    fam, _ = _family_of(h)
    return DiskRecord(h.name, h.disk_id_hex, h.size, h.sector_size, str(path), h.kind, h.read_only,
                      disks.encryption_type(h), now_iso(), des, revocation,
                      source_id.hex() if source_id else None, fam.hex())


def _check_new_name(st, kind: str, name: str) -> None:
    check_name(kind, name)
    other = st.catalog.find_disk(name)
    if other is not None:
        raise AlreadyExists(kind=other.kind, name=name) if other.kind == kind else \
            Refused(f"the name {name!r} is taken by {other.kind} {name!r} (disks, snapshots and images "
                    "share one name space)")


# --- freezing a disk: snapshot create, image create --source DISK ---------------------------

def _freeze(st, disk_name: str, name: str, kind: str) -> DiskRecord:
    """The disk's current top file becomes member ``name`` (kind snapshot or image); the disk
    goes on in a new top file over it."""
    rec = st.catalog.get_disk(disk_name)
    if rec.kind != "disk":
        raise Refused(f"{rec.kind} {disk_name!r} is not a disk; "
                      + ("use `image create NAME --source SNAPSHOT`" if kind == "image" else "snapshot a disk"))
    _check_new_name(st, kind, name)
    _check_family_size(disk_name, rec.size)
    with disks.header_backing(rec.path, disk_name) as fb:
        hf = read_header(fb, disk_name, repair=True)
        if _depth(rec.path, hf, disk_name) + 2 > MAX_CHAIN_FILES:
            raise Refused(f"disk {disk_name!r} has {MAX_CHAIN_FILES - 1} files in its chain; delete old "
                          "snapshots or copy it (`blockcrypt disk copy`)")
        member_id = Header.new_id()
        # the disk's new top: the same header (name, id, keys) over the frozen file
        h_top = _child_header(hf, disk_id=hf.disk_id, name=hf.name, kind="disk", read_only=False,
                              source_id=hf.source_id if hf.overlay else None)
        top_path, _ = _new_top(st, h_top, disk_name)
        try:
            # the frozen file: the member's header (same file, same keys, a new id)
            h_member = _as_member(hf, disk_id=member_id, name=name, kind=kind, read_only=True,
                                  source_id=hf.disk_id)
            write_header(fb, h_member)
            try:
                member = _record(h_member, Path(rec.path), des=rec.des, revocation=rec.revocation,
                                 source_id=hf.disk_id)
                fam = member.family_id
                with st.catalog.transaction() as c:
                    st.catalog.update_disk(disk_name, c, path=str(top_path), family_id=fam)
                    st.catalog.insert_disk(member, c)
            except BaseException:
                write_header(fb, hf.evolve(seqno=hf.seqno + 1))  # the file is the disk's again
                raise
        except BaseException:
            top_path.unlink(missing_ok=True)
            raise
    try:
        _switch_live(st, disk_name)
    except BaseException:
        # the daemon still writes the old file: it is the disk's again, the member is gone
        with disks.header_backing(rec.path, disk_name) as fb:
            cur = read_header(fb, disk_name)
            write_header(fb, hf.evolve(seqno=cur.seqno))
        with st.catalog.transaction() as c:
            st.catalog.delete_disk(name, c)
            st.catalog.update_disk(disk_name, c, path=rec.path)
        top_path.unlink(missing_ok=True)
        raise
    log.info("%s %s of disk %s: file %s frozen, disk goes on in %s", kind, name, disk_name, rec.path, top_path)
    return st.catalog.get_disk(name)


def _switch_live(st, disk_name: str) -> None:
    """A live mount that has the disk open moves it to the catalog's top file now."""
    from . import live
    live.request(st, disk_name)


def create_snapshot(st, disk_name: str, name: str) -> DiskRecord:
    return _freeze(st, disk_name, name, "snapshot")


def create_image(st, name: str, source: str) -> DiskRecord:
    src = st.catalog.find_disk(source)
    if src is None:
        raise NotFound(kind="disk or snapshot", name=source)
    if src.kind == "disk":
        return _freeze(st, source, name, "image")
    if src.kind != "snapshot":
        raise Refused(f"an image is made from a disk or a snapshot, not from {src.kind} {source!r}")
    return _overlay(st, src, name, kind="image", read_only=True)


def _overlay(st, src: DiskRecord, name: str, *, kind: str, read_only: bool, size: int | None = None,
             revocation: str | None = None) -> DiskRecord:
    """A new member over ``src``'s file: an empty top (O(1))."""
    _check_new_name(st, kind, name)
    hs = disks.read_disk_header(src)
    new_size = hs.size if size is None else size
    if new_size < hs.size:
        raise BadSize(value=new_size, why=f"smaller than its source {src.kind} {src.name!r} ({hs.size} bytes)")
    disks._check_size(new_size, hs.sector_size)
    _check_family_size(name, new_size)
    if _depth(src.path, hs, src.name) + 2 > MAX_CHAIN_FILES:
        raise Refused(f"{src.kind} {src.name!r} is {MAX_CHAIN_FILES - 1} files deep; copy it instead "
                      "(`blockcrypt disk copy`)")
    h = _child_header(hs, disk_id=Header.new_id(), name=name, kind=kind, read_only=read_only, size=new_size,
                      source_id=hs.disk_id)
    path, _ = _new_top(st, h, name)
    try:
        rec = _record(h, path, des=src.des, revocation=revocation or src.revocation, source_id=hs.disk_id)
        with st.catalog.transaction() as c:
            st.catalog.insert_disk(rec, c)
            if src.family_id is None:
                st.catalog.update_disk(src.name, c, family_id=rec.family_id)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return st.catalog.get_disk(name)


def create_disk_from(st, name: str, source: str, *, size: int | None = None, des: str | None = None,
                     revocation: str | None = None, progress=None) -> DiskRecord:
    """``disk create NAME --source SNAPSHOT|IMAGE``: an empty writable top over the source (O(1)),
    on the source's DES. Another DES: refused for a customer-key source (the key must stay,
    as the seeds require: `disk copy` makes a new DEK); for a platform-key source it is a
    full copy under a new DEK (with progress)."""
    src = st.catalog.find_disk(source)
    if src is None or src.kind not in KINDS:
        raise NotFound(kind="snapshot or image", name=source)
    if des is not None and (des or None) != src.des:
        if src.des:
            raise Refused(f"a disk made from customer-key {src.kind} {source!r} must use its disk encryption "
                          f"set {src.des!r}; to move to another key copy it: "
                          f"`blockcrypt disk copy {source} {name} --des {des or chr(39) * 2}`")
        from .copy import copy
        return copy(st, source, name, des=des, progress=progress, size=size)
    return _overlay(st, src, name, kind="disk", read_only=False, size=size, revocation=revocation)


# --- listing and showing --------------------------------------------------------------------

def list_members(st, kind: str) -> list[DiskRecord]:
    return st.catalog.list_members(kind)


def source_of(st, rec: DiskRecord) -> dict | None:
    """creationData, as Azure names it: where the member came from."""
    if not rec.source_id:
        return None
    src = next((r for r in st.catalog.list_members() if r.disk_id == rec.source_id), None)
    option = {"snapshot": "Copy", "image": "FromImage"}.get(src.kind if src else "", "Copy")
    return {"createOption": option,
            "sourceResourceId": f"/{src.kind}s/{src.name}" if src else None,
            "sourceUniqueId": rec.source_id}


def to_json(st, rec: DiskRecord) -> dict:
    h = disks.read_disk_header(rec)
    enc = {"type": disks.encryption_type(h)}
    if rec.des:
        enc["diskEncryptionSetId"] = rec.des
    out = {"name": rec.name, "kind": rec.kind, "id": rec.disk_id, "sizeBytes": rec.size,
           "sectorSize": rec.sector_size, "readOnly": bool(rec.read_only), "created": rec.created,
           "encryption": enc, "doubleEncryption": disks.is_double(h),
           "familyId": (h.family_id.hex() if h.overlay else None),
           "chainDepth": _depth(rec.path, h, rec.name) + 1,
           "spaceUsedBytes": os.stat(rec.path).st_blocks * 512,
           "creationData": source_of(st, rec)}
    return out


def get(st, kind: str, name: str) -> DiskRecord:
    return st.catalog.get_member(kind, name)


# --- deleting ----------------------------------------------------------------------------------

def _children_of(st, rec: DiskRecord, h: Header) -> list[tuple[DiskRecord, Header]]:
    """Members whose top file sits directly on ``rec``'s file."""
    _fam, fid = _family_of(h)
    out = []
    for r in st.catalog.list_members():
        if r.name == rec.name or r.family_id != rec.family_id or r.family_id is None:
            continue
        try:
            rh = disks.read_disk_header(r)
        except Exception:
            continue
        if rh.overlay and rh.parent_id == fid:
            out.append((r, rh))
    return out


def dependents(st, kind: str, name: str) -> list[str]:
    """The members built directly on member ``name`` (``delete`` merges into one, refuses more)."""
    rec = st.catalog.get_member(kind, name)
    return [r.name for r, _ in _children_of(st, rec, disks.read_disk_header(rec))]


def delete(st, kind: str, name: str) -> dict:
    rec = st.catalog.get_member(kind, name)
    h = disks.read_disk_header(rec)
    children = _children_of(st, rec, h)
    if not children:
        with st.catalog.transaction() as c:
            st.catalog.delete_disk(name, c)
        Path(rec.path).unlink(missing_ok=True)
        return {"deleted": name, "merged": None}
    if len(children) > 1:
        names = ", ".join(f"{r.kind} {r.name!r}" for r, _ in children)
        raise Refused(f"{kind} {name!r} is the base of {names}; delete them first (or copy them: "
                      f"`blockcrypt disk copy`)")
    child, ch = children[0]
    from . import live
    if child.kind == "disk" and live.is_open(st, child.name):
        raise Refused(f"{kind} {name!r} is the base of {child.kind} {child.name!r}, which is open in the mount; "
                      f"close it (detach its loop device, stop its VM) and delete again")
    _merge_into_child(st, rec, h, child, ch)
    with st.catalog.transaction() as c:
        st.catalog.delete_disk(name, c)
    Path(rec.path).unlink(missing_ok=True)
    return {"deleted": name, "merged": child.name}


def _copy_range(src, dst, off: int, length: int) -> None:
    """dst holds [off, off+length) as src has it (a hole where src has zeros: whatever a
    copy-up left there before a crash is overwritten)."""
    data = src.read_at(off, length)
    if any(data):
        dst.write_at(off, data)
    else:
        try:
            dst.punch(off, length)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            dst.write_at(off, data)


def _merge_into_child(st, rec: DiskRecord, h: Header, child: DiskRecord, ch: Header) -> None:
    """Copy up into the child's file every chunk it takes from ``rec``'s file, make that
    durable, then point the child past the file (an atomic header write)."""
    chunk = ch.chunk_bytes
    lay = Layout.of(ch)
    nbits = ch.map_chunks
    nbytes = (nbits + 7) // 8
    # the tables below are read and written directly: each file's journal into its table first
    settle_journal(rec.path, h)
    settle_journal(child.path, ch)
    # which chunks the merged file holds (its own bitmap, or all of them: the first file of a family)
    with LocalFileBacking(rec.path, writable=False) as pb:
        parent_bits = pb.read_at(MAP_AREA_OFFSET, (h.map_chunks + 7) // 8) if h.overlay and h.parent_id else None
        with disks.header_backing(child.path, child.name) as cb:
            child_bits = bytearray(cb.read_at(MAP_AREA_OFFSET, nbytes))
            for c in range(nbits):
                if child_bits[c // 8] >> (c % 8) & 1:
                    continue
                if parent_bits is not None and c < h.map_chunks and not (parent_bits[c // 8] >> (c % 8) & 1):
                    continue  # the merged file does not hold it either: it comes from further down
                # copy chunk c (data, and metadata when the layers have some)
                _copy_range(pb, cb, lay.data_off + c * chunk, chunk)
                if lay.meta_bytes:
                    per = chunk // lay.sector_size * lay.meta_bytes
                    _copy_range(pb, cb, lay.meta_area_off + c * per, per)
                child_bits[c // 8] |= 1 << (c % 8)
            cb.flush()
            cb.write_at(MAP_AREA_OFFSET, bytes(child_bits))
            cb.flush()
            hc = read_header(cb, child.name)
            # the child now holds what it took from the file; below it: the file's parent
            new = hc.evolve(parent_id=h.parent_id if h.overlay else None)
            if not h.overlay or h.parent_id is None:
                new = new.evolve(map_chunks=hc.map_chunks)
            write_header(cb, new)


