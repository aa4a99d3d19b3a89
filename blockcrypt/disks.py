"""Disk life cycle: create, delete, resize, dump the DEK, rotate platform keys, rebuild the catalog.

These are the operations behind ``blockcrypt disk ...``; they touch the disk
header (format/), the key providers (keys/) and the catalog, never the data area.

Caveat: header updates take an exclusive flock on the disk file, so two CLI
processes do not interleave header writes; a mounted daemon only reads headers.
"""
from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .catalog import DiskRecord, check_name
from .errors import (AlreadyExists, BadSize, BlockcryptError, CorruptHeader, NoSpace, Refused,
                     StateError, UsageError)
from .format import (DATA_OFFSET, ROLE_DATA, ROLE_PLATFORM, Header, Layer, binding_context,
                     binding_digest, read_header, write_header)
from .keys.base import WrappedKey
from .keys.platform import PlatformKeyStore, parse_platform_kek_id

DEK_BYTES = 64
DATA_ALG = "aes-xts-plain64"

TYPE_PMK = "EncryptionAtRestWithPlatformKey"
TYPE_CMK = "EncryptionAtRestWithCustomerKey"
TYPE_DOUBLE = "EncryptionAtRestWithPlatformAndCustomerKeys"


def new_dek() -> bytes:
    while True:
        dek = os.urandom(DEK_BYTES)
        if dek[:32] != dek[32:]:  # XTS refuses equal halves
            return dek


def encryption_type(h: Header) -> str:
    data = h.layer(ROLE_DATA)
    if h.layer(ROLE_PLATFORM) is not None:
        return TYPE_DOUBLE
    if data is not None and data.provider != "platform":
        return TYPE_CMK
    return TYPE_PMK


def wrapped_of(layer: Layer) -> WrappedKey:
    return WrappedKey(layer.provider, layer.kek_id, layer.wrap_alg, layer.wrapped_dek)


def layer_from(role: int, wk: WrappedKey, disk_id: bytes, data_alg: str = DATA_ALG) -> Layer:
    return Layer(role, wk.provider, wk.kek_id, wk.algorithm, data_alg, wk.blob,
                 binding_digest(disk_id, role))


def unwrap_layer(st, h: Header, role: int = ROLE_DATA) -> bytes:
    layer = h.layer(role)
    if layer is None:
        raise CorruptHeader(name=h.name, why=f"no key for layer role {role}")
    if layer.binding != binding_digest(h.disk_id, role):
        raise CorruptHeader(name=h.name, why="the wrapped key is bound to another disk")
    return st.keys.get(layer.provider).unwrap(wrapped_of(layer), binding_context(h.disk_id, role),
                                              disk_id=h.disk_id_hex)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def header_fd(path: str, name: str, writable: bool = True):
    """An fd on the disk file, exclusively flocked for header updates when writable."""
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CorruptHeader(name=name, why=f"disk file {path} is missing") from None
    try:
        if writable:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def read_disk_header(rec: DiskRecord, repair: bool = False) -> Header:
    with header_fd(rec.path, rec.name, writable=repair) as fd:
        return read_header(fd, rec.name, repair=repair)


def _check_size(size: int, sector_size: int) -> None:
    if sector_size not in (512, 4096):
        raise UsageError(f"invalid sector size {sector_size}: use 512 or 4096")
    if size % sector_size:
        raise BadSize(value=size, why=f"not a multiple of the sector size ({sector_size} bytes)")


REVOCATION_POLICIES = ("immediate", "on-restart")


def create(st, name: str, size: int, sector_size: int = 4096, *, provider: str = "platform",
           kek_ref: str | None = None, kind: str = "disk", read_only: bool = False,
           des: str | None = None, revocation: str = "immediate") -> DiskRecord:
    check_name("disk", name)
    _check_size(size, sector_size)
    if revocation not in REVOCATION_POLICIES:
        raise UsageError(f"invalid revocation policy {revocation!r}: use immediate or on-restart")
    if st.catalog.find_disk(name) is not None:
        raise AlreadyExists(kind="disk", name=name)
    disk_id = Header.new_id()
    prov = st.keys.get(provider)
    dek = new_dek()
    wk = prov.wrap(kek_ref or prov.default_ref(), dek, binding_context(disk_id, ROLE_DATA), disk_id=disk_id.hex())
    del dek
    h = Header(disk_id=disk_id, name=name, size=size, sector_size=sector_size, cipher=DATA_ALG,
               kind=kind, read_only=read_only, layers=(layer_from(ROLE_DATA, wk, disk_id),))
    path = st.disks_dir / f"{disk_id.hex()}.img"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StateError(path=str(st.path), why=f"cannot create the disk file ({e.strerror})") from None
    try:
        try:
            os.ftruncate(fd, DATA_OFFSET + size)
            write_header(fd, h)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(name=name) from None
            if e.errno == errno.EFBIG:
                raise BadSize(value=size, why="too large for the backing file system") from None
            raise
        finally:
            os.close(fd)
        rec = DiskRecord(name, disk_id.hex(), size, sector_size, str(path), kind, read_only,
                         encryption_type(h), _now(), des, revocation)
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
    with header_fd(rec.path, name) as fd:
        h = read_header(fd, name, repair=True)
        try:
            os.ftruncate(fd, DATA_OFFSET + new_size)
        except OSError as e:
            raise BadSize(value=new_size, why=f"the backing file cannot grow ({e.strerror})") from None
        write_header(fd, h.evolve(size=new_size))
    with st.catalog.transaction() as c:
        st.catalog.update_disk(name, c, size=new_size)
    return st.catalog.get_disk(name)


def dump_key(st, name: str, out: str) -> str:
    """Write the data-layer DEK to a new 0600 file (the emergency way out, as with LUKS)."""
    rec = st.catalog.get_disk(name)
    h = read_disk_header(rec)
    if h.layer(ROLE_PLATFORM) is not None:
        raise Refused(f"disk {name!r} is double-encrypted: its data area is not plain aes-xts-plain64")
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise AlreadyExists(kind="file", name=out) from None
    except OSError as e:
        raise UsageError(f"cannot create {out}: {e.strerror}") from None
    try:
        dek = unwrap_layer(st, h)
        os.write(fd, dek)
        os.fsync(fd)
        del dek
    except BaseException:
        os.close(fd)
        os.unlink(out)
        raise
    os.close(fd)
    return out


# --- platform key rotation ---------------------------------------------------------

ROTATION_STEPS = ("new-version", "rewrap", "retire")


def rotate_platform_key(st, on_step=None) -> dict:
    """Add a platform key version and re-wrap every platform-keyed DEK under it.

    Crash-safe by construction: (1) the new version is added and marked pending
    (one atomic store write); (2) each disk header is rewritten atomically
    under the new version, one disk at a time; (3) versions no disk uses are
    forgotten and the pending mark cleared. Old versions remain until step 3,
    so a crash anywhere leaves every disk openable; running it again resumes the
    pending rotation. ``on_step(step, detail)`` is called before each step (tests).
    """
    store = PlatformKeyStore(st.path / "keys")
    prov = st.keys.get("platform")
    step = on_step or (lambda s, d=None: None)
    step("new-version", None)
    target = store.begin_rotation()
    target_id = f"platform/{target}"
    rewrapped, skipped = [], []
    for rec in st.catalog.list_disks():
        step("rewrap", rec.name)
        with header_fd(rec.path, rec.name) as fd:
            h = read_header(fd, rec.name, repair=True)
            changed = h
            for layer in h.layers:
                if layer.provider != "platform" or layer.kek_id == target_id:
                    continue
                wk = prov.rewrap(wrapped_of(layer), binding_context(h.disk_id, layer.role), target_id)
                changed = changed.with_layer(layer_from(layer.role, wk, h.disk_id, layer.data_alg))
            if changed is not h:
                write_header(fd, changed)
                rewrapped.append(rec.name)
            else:
                skipped.append(rec.name)
    step("retire", None)
    in_use = set()
    for rec in st.catalog.list_disks():
        for layer in read_disk_header(rec).layers:
            if layer.provider == "platform":
                in_use.add(parse_platform_kek_id(layer.kek_id))
    removed = store.finish_rotation(in_use)
    return {"version": target, "rewrapped": rewrapped, "unchanged": skipped, "retired": removed}


def _des_of_key(st, h: Header) -> str | None:
    """The DES whose vault key wraps this disk's DEK (for a rebuilt catalog)."""
    layer = h.layer(ROLE_DATA)
    if layer is None or layer.provider != "vault":
        return None
    from .keys.vault import parse_key_url
    base, name, _version = parse_key_url(layer.kek_id)
    for d in st.catalog.list_des():
        if parse_key_url(d.key_url)[:2] == (base, name):
            return d.name
    return None


def copy(st, src: str, dst: str, *, des: str | None = None, progress=None) -> DiskRecord:
    """Copy a disk's plaintext into a new disk with a new DEK (skipping zero ranges, which stay holes).

    A copy of a customer-key disk keeps its disk encryption set unless another one is named;
    this is also the way from a customer key back to a platform key (``des=""``)."""
    from .volume import Volume
    srec = st.catalog.get_disk(src)
    target_des = srec.des if des is None else (des or None)
    if target_des:
        from . import des as des_mod
        new = des_mod.create_disk(st, dst, srec.size, target_des, srec.sector_size, srec.revocation)
    else:
        new = create(st, dst, srec.size, srec.sector_size)
    chunk = 4 << 20
    zero = bytes(chunk)
    try:
        with Volume.open(st, src, read_only=True) as a, Volume.open(st, dst) as b:
            for off in range(0, srec.size, chunk):
                data = a.read(off, chunk)
                if data != zero[:len(data)]:
                    b.write(off, data)
                if progress:
                    progress(min(off + chunk, srec.size), srec.size)
            b.flush()
    except BaseException:
        delete(st, dst)
        raise
    return new


# --- catalog rebuild ------------------------------------------------------------------

def rebuild_catalog(st) -> dict:
    """Rebuild the catalog from the disk headers in STATE/disks."""
    recs, bad = [], []
    old = {r.disk_id: r for r in st.catalog.list_disks()}
    for path in sorted(st.disks_dir.glob("*.img")):
        try:
            with header_fd(str(path), path.name, writable=False) as fd:
                h = read_header(fd, path.name)
        except BlockcryptError as e:
            bad.append({"path": str(path), "error": str(e)})
            continue
        prev = old.get(h.disk_id_hex)
        created = prev.created if prev else _now()
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
