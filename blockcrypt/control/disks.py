"""Disk life cycle: create, delete, resize, dump the DEK, check, open a volume, rebuild the catalog.

These are the operations behind ``blockcrypt disk ...``; they touch the disk
header (format/), the key providers (keys/) and the catalog, and hand open
volumes (volume/) to copies, checks and the mount.

Caveat: header updates take the backing store's exclusive lock, so two CLI
processes do not interleave header writes; a mounted daemon only reads headers.
"""
from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from pathlib import Path

from .._util.clock import now_iso
from .._util.fsutil import create_private_file
from ..catalog import DiskRecord, check_name
from ..crypto import ALG_NULL
from ..errors import AlreadyExists, BadSize, BlockcryptError, Busy, CorruptHeader, NoSpace, Refused, StateError, UsageError
from ..format import ROLE_DATA, ROLE_INFRA, Header, Layout, header_copy_state, read_header, write_header
from ..format.layout import FEATURE_META_JOURNAL, FEATURE_SECTOR_META
from ..keys.envelope import DATA_ALG, INFRA_ALG, unwrap_layer, wrap_new_layer
from ..storage import LocalFileBacking, is_enospc
from ..volume import Volume

TYPE_PMK = "EncryptionAtRestWithPlatformKey"
TYPE_CMK = "EncryptionAtRestWithCustomerKey"
TYPE_DOUBLE = "EncryptionAtRestWithPlatformAndCustomerKeys"


def encryption_type(h: Header) -> str:
    """Azure's Encryption.Type: the key source of the data layer, and whether a customer
    key is doubled by the platform layer. A double disk with both layers platform-keyed
    (``disk create --double-encryption``, which no cloud offers) is of type
    EncryptionAtRestWithPlatformKey; ``is_double`` tells it apart."""
    data = h.layer(ROLE_DATA)
    customer = data is not None and data.provider != "platform"
    if h.layer(ROLE_INFRA) is not None and customer:
        return TYPE_DOUBLE
    if customer:
        return TYPE_CMK
    return TYPE_PMK


def is_double(h: Header) -> bool:
    return h.layer(ROLE_INFRA) is not None


def refuse_single_double(name: str, to_double: bool):
    """Moving a disk between single and double encryption changes its data layout: refused."""
    what = "double encryption" if to_double else "single-layer encryption"
    raise Refused(f"disk {name!r} cannot move to {what} in place (another layer stack, another layout); "
                  f"copy it instead: `blockcrypt disk copy {name} NEW_NAME --des DES` (or, with platform "
                  f"keys, `--{'double' if to_double else 'single'}-encryption`)")


def open_backing(path: str, name: str, writable: bool = True) -> LocalFileBacking:
    try:
        return LocalFileBacking(path, writable=writable)
    except FileNotFoundError:
        raise CorruptHeader(name=name, why=f"disk file {path} is missing") from None
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise CorruptHeader(name=name, why=f"disk file {path} is not a regular file") from None
        raise


@contextmanager
def header_backing(path: str, name: str, writable: bool = True):
    """The disk file's backing store, exclusively locked for header updates when writable."""
    b = open_backing(path, name, writable)
    try:
        if writable:
            b.lock()
        yield b
    finally:
        b.close()


def disk_id_of(rec: DiskRecord) -> bytes:
    """The catalog's disk id: a header copy naming another id is never used nor repaired from."""
    return bytes.fromhex(rec.disk_id)


def read_disk_header(rec: DiskRecord, repair: bool = False) -> Header:
    with header_backing(rec.path, rec.name, writable=repair) as b:
        return read_header(b, rec.name, repair=repair, expect_id=disk_id_of(rec))


def check_headers(rec: DiskRecord) -> dict:
    """Both header copies before and after repairing a damaged or stale one (`disk check`)."""
    with header_backing(rec.path, rec.name) as b:
        before = header_copy_state(b)
        read_header(b, rec.name, repair=True, expect_id=disk_id_of(rec))
        after = header_copy_state(b)
    return {"before": before, "after": after, "repaired": [k for k in before if before[k] != after[k]]}


def truncated(rec: DiskRecord, h: Header) -> str | None:
    """Why the disk file is too short for its header's size (the data past it is lost), or None."""
    try:
        have = os.stat(rec.path).st_size
    except OSError:
        return None
    lay = Layout.of(h)
    # an overlay member's first file keeps the length it had as a plain disk: its data area is
    # what must be there (a newer overlay file is longer still, up to its chunk bitmap)
    need = lay.sector_off(0) + h.size if lay.overlay else lay.backing_size(h.size)
    if have < need:
        return f"the disk file is truncated ({have} of {need} bytes): data past byte {have} is lost"
    return None


HEALTH = ("Healthy", "Corrupt", "Truncated", "KeyUnavailable", "Copying")


def health(st, rec: DiskRecord, check_keys: bool = False) -> tuple[str, str | None, Header | None]:
    """(state, why, header) of disk ``rec``, one of HEALTH: a header that cannot be read or names
    another disk is Corrupt, a short file Truncated; with ``check_keys`` every layer's DEK is
    unwrapped (a vault round trip for customer keys): a DEK grafted from another disk is
    Corrupt, a key that does not answer KeyUnavailable. A copy not finished is Copying."""
    copying = copy_in_progress(st, rec.name)
    if copying:
        return "Copying", copying, None
    try:
        h = read_disk_header(rec)
    except BlockcryptError as e:
        return "Corrupt", str(e), None
    why = truncated(rec, h)
    if why:
        return "Truncated", why, h
    if h.size != rec.size or h.sector_size != rec.sector_size:
        return "Corrupt", (f"the catalog says {rec.size} bytes in {rec.sector_size}-byte sectors, the header "
                           f"{h.size} in {h.sector_size} (`blockcrypt catalog rebuild` takes the header's)"), h
    if check_keys:
        from ..errors import KeyError_, KeyIntegrityError
        for layer in h.layers:
            try:
                del_ = unwrap_layer(st.keys, h, layer.role)
                del del_
            except KeyError_ as e:
                if isinstance(e, KeyIntegrityError):
                    return "Corrupt", str(e), h
                return "KeyUnavailable", str(e), h
            except BlockcryptError as e:  # a wrapped DEK bound to another disk
                return "Corrupt", str(e), h
    return "Healthy", None, h


COPYING_KEY = "copying/"


def copy_in_progress(st, name: str) -> str | None:
    """Why disk ``name`` is not a whole disk yet (a copy into it runs, or was interrupted), or None."""
    import json
    text = st.catalog.get_setting(COPYING_KEY + name)
    if not text:
        return None
    info = json.loads(text)
    pid = info.get("pid")
    alive = False
    try:
        os.kill(pid, 0)
        alive = True
    except (OSError, TypeError):
        pass
    if alive:
        return f"a copy from disk {info.get('from')!r} is running (pid {pid})"
    return (f"the copy from disk {info.get('from')!r} was interrupted: the disk is incomplete; "
            f"delete it and copy again")


def open_layers(st, h: Header) -> list[tuple]:
    """The layer stack of header ``h`` for the engine, outermost first, DEKs unwrapped:
    the data layer, then (double encryption) the infrastructure layer with the disk id
    its sectors are bound to.

    The keys are bytearrays: the caller hands the list to a Volume (which copies the keys
    into locked memory) and then wipes it (:func:`wipe_layers`). The providers' own bytes
    objects cannot be wiped (immutable); they are dropped at once (docs/KEYS.md)."""
    layers = [(h.layer(ROLE_DATA).data_alg, bytearray(unwrap_layer(st.keys, h, ROLE_DATA)))]
    infra = h.layer(ROLE_INFRA)
    if infra is not None:
        if infra.data_alg != INFRA_ALG:
            raise CorruptHeader(name=h.name, why=f"unknown infrastructure layer algorithm {infra.data_alg!r}")
        try:
            layers.append((infra.data_alg, bytearray(unwrap_layer(st.keys, h, ROLE_INFRA)), h.binding_id))
        except BaseException:
            wipe_layers(layers)
            raise
    return layers


def wipe_layers(layers) -> None:
    """Zero every bytearray key of a layer list (in place; the engine holds its own copy)."""
    for layer in layers:
        key = layer[1]
        if isinstance(key, bytearray):
            key[:] = bytes(len(key))


def open_volume(st, name: str, *, null_cipher: bool = False, read_only: bool = False,
                cache: str = "buffered") -> Volume:
    """Open disk ``name`` of the catalog: its header (repaired when writable), its keys, the engine."""
    rec = st.catalog.get_disk(name)
    writable = not (read_only or rec.read_only)
    header = read_disk_header(rec, repair=writable)  # a damaged or stale copy is rewritten when writable
    if header.disk_id.hex() != rec.disk_id:
        raise CorruptHeader(name=name, why="the disk file belongs to another disk id")
    short = truncated(rec, header)
    if short:
        raise CorruptHeader(name=name, why=short)
    layers = [(ALG_NULL, b"")] if null_cipher else open_layers(st, header)
    try:
        return Volume(rec.path, header, layers, name=rec.name, kind=rec.kind, read_only=not writable,
                      cache=cache)
    finally:
        wipe_layers(layers)


#: the largest disk: its file (data offset included) must stay below 2**63 bytes (off_t)
MAX_DISK_SIZE = (1 << 63) - (16 << 20)


def _check_size(size: int, sector_size: int) -> None:
    if sector_size not in (512, 4096):
        raise UsageError(f"invalid sector size {sector_size}: use 512 or 4096")
    if size > MAX_DISK_SIZE:
        raise BadSize(value=size, why=f"larger than the largest disk ({MAX_DISK_SIZE} bytes, 8 EiB less 16 MiB)")
    if size % sector_size:
        raise BadSize(value=size, why=f"not a multiple of the sector size ({sector_size} bytes)")


REVOCATION_POLICIES = ("immediate", "on-restart")


def _check_layout_size(size: int, layout: Layout) -> None:
    if layout.max_size is not None and size > layout.max_size:
        raise BadSize(value=size, why=f"a double-encrypted disk holds at most {layout.max_size} bytes "
                                      "(its sector metadata starts at 8 TiB of the disk file)")


def create(st, name: str, size: int, sector_size: int = 4096, *, provider: str = "platform",
           kek_ref: str | None = None, kind: str = "disk", read_only: bool = False,
           des: str | None = None, revocation: str = "immediate", double: bool = False) -> DiskRecord:
    """A new disk under fresh DEKs. ``double``: a second, independent infrastructure layer
    (XChaCha20-Poly1305, its DEK wrapped by the platform key store) below the data layer."""
    check_name("disk", name)
    _check_size(size, sector_size)
    layout = Layout.with_meta(sector_size) if double else Layout(sector_size)
    _check_layout_size(size, layout)
    if revocation not in REVOCATION_POLICIES:
        raise UsageError(f"invalid revocation policy {revocation!r}: use immediate or on-restart")
    if st.catalog.find_disk(name) is not None:
        raise AlreadyExists(kind="disk", name=name)
    disk_id = Header.new_id()
    layers = (wrap_new_layer(st.keys, provider, kek_ref, disk_id, ROLE_DATA),)
    if double:
        layers += (wrap_new_layer(st.keys, "platform", None, disk_id, ROLE_INFRA, INFRA_ALG),)
    h = Header(disk_id=disk_id, name=name, size=size, sector_size=sector_size, cipher=DATA_ALG,
               kind="disk" if kind == "copying" else kind, read_only=read_only, layers=layers,
               required_features=FEATURE_SECTOR_META | FEATURE_META_JOURNAL if double else 0)
    path = st.disks_dir / f"{disk_id.hex()}.img"
    try:
        b = LocalFileBacking(str(path), True, create_mode=0o600)
    except OSError as e:
        raise StateError(path=str(st.path), why=f"cannot create the disk file ({e.strerror})") from None
    try:
        try:
            b.set_size(layout.backing_size(size))
            write_header(b, h)
        except OSError as e:
            if is_enospc(e):
                raise NoSpace(name=name) from None
            if e.errno == errno.EFBIG:
                raise BadSize(value=size, why="too large for the backing file system") from None
            raise
        finally:
            b.close()
        rec = DiskRecord(name, disk_id.hex(), size, sector_size, str(path), kind, read_only,
                         encryption_type(h), now_iso(), des, revocation)
        with st.catalog.transaction() as c:
            st.catalog.insert_disk(rec, c)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return rec


#: how long `disk delete` waits for a writer that is closing the disk (seconds)
CLOSING_WAIT_S = 2.0


def delete(st, name: str) -> DiskRecord:
    """Remove the disk from the catalog and unlink its file. Refused while anyone has the file
    open for writing (the engine's writer lock, held here until the file is gone, so no writer
    opens it in between); the CLI also refuses a disk open in a mount of this state directory."""
    rec = st.catalog.get_disk(name)
    if rec.kind not in ("disk", "copying"):
        raise Refused(f"{name!r} is a{'n' if rec.kind == 'image' else ''} {rec.kind}: "
                      f"`blockcrypt {rec.kind} delete {name}`")
    try:
        b = LocalFileBacking(rec.path, writable=True)
    except FileNotFoundError:
        b = None
    except OSError as e:
        if e.errno != errno.EINVAL:  # not a regular file: nothing writes it; it goes
            raise StateError(path=str(st.path), why=f"cannot open the file of disk {name!r} ({e.strerror})") from None
        b = None
    try:
        # the kernel releases a just-closed handle asynchronously: give a closing writer a moment
        deadline = time.monotonic() + CLOSING_WAIT_S
        while b is not None and not b.lock_writer() and time.monotonic() < deadline:
            time.sleep(0.05)
        if b is not None and not b.lock_writer():
            raise Busy(f"disk {name!r} is open for writing (in a mount, or by another state directory or host); "
                       "close it there first")
        with st.catalog.transaction() as c:
            st.catalog.delete_disk(name, c)
            st.catalog.delete_setting(COPYING_KEY + name, c)
        Path(rec.path).unlink(missing_ok=True)
    finally:
        if b is not None:
            b.close()
    return rec


def resize(st, name: str, new_size: int) -> DiskRecord:
    rec = st.catalog.get_disk(name)
    _check_size(new_size, rec.sector_size)
    if rec.read_only:
        raise Refused(f"{rec.kind} {name!r} is read-only and cannot be resized")
    if new_size < rec.size:
        raise Refused(f"disk {name!r} can only grow ({new_size} < current {rec.size} bytes); "
                      "copy it to a smaller disk instead")
    with header_backing(rec.path, name) as b:
        h = read_header(b, name, repair=True, expect_id=disk_id_of(rec))
        _check_layout_size(new_size, Layout.of(h))
        try:
            b.set_size(Layout.of(h).backing_size(new_size))
            new = write_header(b, h.evolve(size=new_size))
        except OSError as e:
            if is_enospc(e):
                raise NoSpace(name=name) from None
            raise BadSize(value=new_size, why=f"the backing file cannot grow ({e.strerror})") from None
        try:
            with st.catalog.transaction() as c:
                st.catalog.update_disk(name, c, size=new_size)
        except BlockcryptError:
            write_header(b, new.evolve(size=h.size))  # header and catalog keep agreeing on the old size
            raise
    return st.catalog.get_disk(name)


def dump_key(st, name: str, out: str) -> str:
    """Write the DEKs to a new 0600 file (the emergency way out, as with LUKS): the 64-byte
    data-layer DEK, then on a double-encrypted disk the 32-byte infrastructure DEK
    (docs/FORMAT.md shows how to decrypt a sector with both)."""
    rec = st.catalog.get_disk(name)
    h = read_disk_header(rec)
    roles = [ROLE_DATA] + ([ROLE_INFRA] if h.layer(ROLE_INFRA) is not None else [])
    fd = create_private_file(out)
    try:
        for role in roles:
            dek = unwrap_layer(st.keys, h, role)
            os.write(fd, dek)
            del dek
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(out)
        raise
    os.close(fd)
    return out


def _des_of_key(st, h: Header) -> str | None:
    """The DES whose vault key wraps this disk's DEK (for a rebuilt catalog)."""
    layer = h.layer(ROLE_DATA)
    if layer is None or layer.provider == "platform":
        return None
    try:
        return st.keys.get(layer.provider).des_for(layer.kek_id).name
    except BlockcryptError:   # an unknown provider, or no DES (any more) for that key
        return None


# --- catalog rebuild ------------------------------------------------------------------

def rebuild_catalog(st) -> dict:
    """Rebuild the catalog from the disk headers in STATE/disks: disks, snapshots and images
    with their families (family id, source) from the overlay fields. A file no member
    stands on and no chain uses (a crashed `snapshot create`'s new top) is left out and
    listed as unused."""
    recs, bad = [], []
    old = {r.disk_id: r for r in st.catalog.list_disks()}
    for path in sorted(st.disks_dir.glob("*.img")):
        try:
            with header_backing(str(path), path.name, writable=False) as b:
                try:
                    expect = bytes.fromhex(path.stem)  # files are named <disk id>.img (<file id>.img
                except ValueError:                     # in an overlay chain)
                    expect = None
                h = read_header(b, path.name)
            if expect is not None and h.own_file_id != expect:
                raise CorruptHeader(name=path.name, why=f"the header names file {h.own_file_id.hex()}, "
                                                        f"not {expect.hex()}")
            check_name("disk", h.name)  # a header's name reaches paths, the mount and hooks
        except BlockcryptError as e:
            bad.append({"path": str(path), "error": str(e)})
            continue
        prev = old.get(h.disk_id_hex)
        created = prev.created if prev else now_iso()
        des = prev.des if prev else _des_of_key(st, h)
        revocation = prev.revocation if prev else "immediate"
        fam = h.family_id.hex() if h.overlay and h.family_id else None
        src = h.source_id.hex() if h.overlay and h.source_id else (prev.source_id if prev else None)
        recs.append(DiskRecord(h.name, h.disk_id_hex, h.size, h.sector_size, str(path), h.kind,
                               h.read_only, encryption_type(h), created, des, revocation, src, fam))
    # two files claiming one disk: a `snapshot create` crashed after writing its new top and
    # before committing; the file whose own file id some other file's chain names is frozen
    by_name: dict[str, list] = {}
    for r in recs:
        by_name.setdefault((r.name, r.disk_id), []).append(r)
    unused = []
    if any(len(v) > 1 for v in by_name.values()):
        parents = set()
        for path in sorted(st.disks_dir.glob("*.img")):
            try:
                with header_backing(str(path), path.name, writable=False) as b:
                    h = read_header(b, path.name)
                if h.overlay and h.parent_id:
                    parents.add(h.parent_id.hex())
            except BlockcryptError:
                continue
        keep = []
        for key, group in by_name.items():
            if len(group) == 1:
                keep += group
                continue
            # the newest top is the one nobody builds on; an unused duplicate has no data of its own
            tops = [r for r in group if Path(r.path).stem not in parents]
            keep.append(tops[0] if tops else group[0])
            unused += [r.path for r in group if r is not keep[-1] and Path(r.path).stem not in parents]
        recs = keep
    names = [r.name for r in recs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise Refused(f"two disk files claim the name(s) {sorted(dupes)}; move one out of {st.disks_dir}")
    st.catalog.replace_all(recs)
    return {"disks": sorted(r.name for r in recs if r.kind == "disk"),
            "snapshots": sorted(r.name for r in recs if r.kind == "snapshot"),
            "images": sorted(r.name for r in recs if r.kind == "image"), "unreadable": bad, "unused": unused}


# --- scrub ------------------------------------------------------------------------------

def _written_ranges(path: str, start: int, end: int):
    """[start, end) of the backing file split into its allocated ranges (SEEK_DATA/SEEK_HOLE);
    the whole range when the file system cannot tell."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        off = start
        while off < end:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole after off
                    return
                yield off, end
                return
            if d >= end:
                return
            h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
            yield d, h
            off = h
    finally:
        os.close(fd)


def written_sector_ranges(v) -> list[tuple[int, int]]:
    """[(first sector, end sector)) of open volume ``v`` that hold data in any of its files (its
    own and, for a family member, its chain's; the rest are holes and read as zeros): copies and
    scrubs take time by data, not size."""
    ss, size, lay = v.sector_size, v.size, v.layout
    spans = sorted(r for f in v.files for r in _written_ranges(f, lay.sector_off(0), lay.sector_off(0) + size))
    ranges: list[tuple[int, int]] = []
    for d0, d1 in spans:
        s0 = (d0 - lay.data_off) // ss
        s1 = (d1 - lay.data_off + ss - 1) // ss
        if ranges and ranges[-1][1] >= s0:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], s1))
        else:
            ranges.append((s0, s1))
    return ranges


@contextmanager
def writers_held_off(rec: DiskRecord):
    """Hold the engine's writer lock on the disk file: nobody writes it until the block ends
    (a copy of one moment). Busy when a writer (a mount) has it open now."""
    b = open_backing(rec.path, rec.name, writable=True)
    try:
        if not b.lock_writer():
            raise Busy(f"disk {rec.name!r} is open for writing (in a mount?): a copy would be of no single "
                       "moment; close it there (or unmount) and copy then")
        yield
    finally:
        b.close()


def verify(st, name: str, progress=None) -> dict:
    """Scrub: read every written sector of disk ``name`` through its layers and list the ones
    that fail (a tag that does not verify on a double-encrypted disk; a storage error).
    Holes are skipped; nothing is written. ``progress(done_bytes, total_bytes)``."""
    from ..errors import IntegrityError
    rec = st.catalog.get_disk(name)
    with open_volume(st, name, read_only=True) as v:
        ss = v.sector_size
        ranges = written_sector_ranges(v)
        total = sum(s1 - s0 for s0, s1 in ranges) * ss
        bad, done = [], 0
        chunk = (1 << 20) // ss
        for s0, s1 in ranges:
            for c0 in range(s0, s1, chunk):
                c1 = min(c0 + chunk, s1)
                try:
                    v.read(c0 * ss, (c1 - c0) * ss)
                except IntegrityError:
                    for s in range(c0, c1):  # which sectors of the chunk
                        try:
                            v.read(s * ss, ss)
                        except IntegrityError:
                            bad.append(s)
                done += (c1 - c0) * ss
                if progress:
                    progress(done, total)
    return {"name": name, "sectorSize": ss, "scannedBytes": total, "badSectors": bad, "ok": not bad}
