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
from contextlib import contextmanager
from pathlib import Path

from .._util.clock import now_iso
from ..catalog import DiskRecord, check_name
from ..crypto import ALG_NULL
from ..errors import AlreadyExists, BadSize, BlockcryptError, CorruptHeader, NoSpace, Refused, StateError, UsageError
from ..format import ROLE_DATA, ROLE_INFRA, Header, Layout, header_copy_state, read_header, write_header
from ..format.layout import FEATURE_SECTOR_META
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


def read_disk_header(rec: DiskRecord, repair: bool = False) -> Header:
    with header_backing(rec.path, rec.name, writable=repair) as b:
        return read_header(b, rec.name, repair=repair)


def check_headers(rec: DiskRecord) -> dict:
    """Both header copies before and after repairing a damaged or stale one (`disk check`)."""
    with header_backing(rec.path, rec.name) as b:
        before = header_copy_state(b)
        read_header(b, rec.name, repair=True)
        after = header_copy_state(b)
    return {"before": before, "after": after, "repaired": [k for k in before if before[k] != after[k]]}


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
            layers.append((infra.data_alg, bytearray(unwrap_layer(st.keys, h, ROLE_INFRA)), h.disk_id))
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
    layers = [(ALG_NULL, b"")] if null_cipher else open_layers(st, header)
    try:
        return Volume(rec.path, header, layers, name=rec.name, kind=rec.kind, read_only=not writable,
                      cache=cache)
    finally:
        wipe_layers(layers)


def _check_size(size: int, sector_size: int) -> None:
    if sector_size not in (512, 4096):
        raise UsageError(f"invalid sector size {sector_size}: use 512 or 4096")
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
               kind=kind, read_only=read_only, layers=layers,
               required_features=FEATURE_SECTOR_META if double else 0)
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


def delete(st, name: str) -> DiskRecord:
    rec = st.catalog.get_disk(name)
    with st.catalog.transaction() as c:
        st.catalog.delete_disk(name, c)
    Path(rec.path).unlink(missing_ok=True)
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
        h = read_header(b, name, repair=True)
        _check_layout_size(new_size, Layout.of(h))
        try:
            b.set_size(Layout.of(h).backing_size(new_size))
        except OSError as e:
            raise BadSize(value=new_size, why=f"the backing file cannot grow ({e.strerror})") from None
        write_header(b, h.evolve(size=new_size))
    with st.catalog.transaction() as c:
        st.catalog.update_disk(name, c, size=new_size)
    return st.catalog.get_disk(name)


def dump_key(st, name: str, out: str) -> str:
    """Write the DEKs to a new 0600 file (the emergency way out, as with LUKS): the 64-byte
    data-layer DEK, then on a double-encrypted disk the 32-byte infrastructure DEK
    (docs/FORMAT.md shows how to decrypt a sector with both)."""
    rec = st.catalog.get_disk(name)
    h = read_disk_header(rec)
    roles = [ROLE_DATA] + ([ROLE_INFRA] if h.layer(ROLE_INFRA) is not None else [])
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise AlreadyExists(kind="file", name=out) from None
    except OSError as e:
        raise UsageError(f"cannot create {out}: {e.strerror}") from None
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
    """Rebuild the catalog from the disk headers in STATE/disks."""
    recs, bad = [], []
    old = {r.disk_id: r for r in st.catalog.list_disks()}
    for path in sorted(st.disks_dir.glob("*.img")):
        try:
            with header_backing(str(path), path.name, writable=False) as b:
                h = read_header(b, path.name)
        except BlockcryptError as e:
            bad.append({"path": str(path), "error": str(e)})
            continue
        prev = old.get(h.disk_id_hex)
        created = prev.created if prev else now_iso()
        des = prev.des if prev else _des_of_key(st, h)
        revocation = prev.revocation if prev else "immediate"
        recs.append(DiskRecord(h.name, h.disk_id_hex, h.size, h.sector_size, str(path), h.kind,
                               h.read_only, encryption_type(h), created, des, revocation))
    names = [r.name for r in recs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise Refused(f"two disk files claim the name(s) {sorted(dupes)}; move one out of {st.disks_dir}")
    st.catalog.replace_all(recs)
    return {"disks": sorted(r.name for r in recs), "unreadable": bad}


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


def verify(st, name: str, progress=None) -> dict:
    """Scrub: read every written sector of disk ``name`` through its layers and list the ones
    that fail (a tag that does not verify on a double-encrypted disk; a storage error).
    Holes are skipped; nothing is written. ``progress(done_bytes, total_bytes)``."""
    from ..errors import IntegrityError
    rec = st.catalog.get_disk(name)
    with open_volume(st, name, read_only=True) as v:
        ss, size = v.sector_size, v.size
        lay = v.layout
        ranges = []
        for d0, d1 in _written_ranges(rec.path, lay.sector_off(0), lay.sector_off(0) + size):
            s0 = (d0 - lay.data_off) // ss
            s1 = (d1 - lay.data_off + ss - 1) // ss
            if ranges and ranges[-1][1] >= s0:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], s1))
            else:
                ranges.append((s0, s1))
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
