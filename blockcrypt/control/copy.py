"""Disk copy: the plaintext of one disk (or snapshot, or image) into a new disk with a new DEK.

Zero ranges are skipped (they stay holes in the new file). A copy is also the
way between what a re-wrap cannot cross: customer key back to a platform key
(``des=""``), another DES, and single to double encryption or back (``double``,
or a DES of the other type); and the way out of a family (a disk made from a
snapshot on another DES).

While it runs the new disk's catalog row has kind ``copying`` (KIND_COPYING): not
listed, not mounted, not openable as a disk. Only the last step makes it a disk, so
an interrupted copy (Ctrl-C, kill -9, a full file system) never leaves a half disk
in the catalog; the next copy to that name removes the leftover.

Caveat: O(data): it reads and writes every allocated, non-zero range of the source
(SEEK_DATA/SEEK_HOLE on its file), not its whole size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..catalog import DiskRecord, check_name
from ..errors import BadSize, Refused
from . import des as des_mod, disks

KIND_COPYING = "copying"
CHUNK = 4 << 20


def _remove_leftover(st, name: str) -> None:
    rec = st.catalog.find_disk(name)
    if rec is not None and rec.kind == KIND_COPYING:
        with st.catalog.transaction() as c:
            st.catalog.delete_disk(name, c)
            st.catalog.delete_setting(disks.COPYING_KEY + name, c)
        Path(rec.path).unlink(missing_ok=True)


def copy(st, src: str, dst: str, *, des: str | None = None, double: bool | None = None,
         progress=None, size: int | None = None) -> DiskRecord:
    """Copy a member's plaintext into a new disk with new DEKs (skipping zero ranges, which stay holes).

    A copy of a customer-key disk keeps its disk encryption set unless another one is named;
    this is also the way from a customer key back to a platform key (``des=""``). On a DES the
    copy has the DES's type (a ``double`` that contradicts it is refused); with a platform key it
    is double-encrypted when ``double`` says so, or (None) when the source is.
    ``progress(done_bytes, total_bytes)`` after each chunk.

    The source's writer lock is held for the whole copy (a disk open for writing in a mount is
    refused: the copy is of one moment); the new disk is marked Copying (health) until the copy
    is done, and its row is of kind ``copying`` (not a disk), so a killed copy shows as an
    incomplete disk, never as Healthy, and the next copy to that name removes it."""
    srec = st.catalog.get_disk(src)
    new_size = srec.size if size is None else size
    if new_size < srec.size:
        raise BadSize(value=new_size, why=f"smaller than {src!r} ({srec.size} bytes)")
    _remove_leftover(st, dst)
    target_des = srec.des if des is None else (des or None)
    check_name("disk", dst)
    with disks.writers_held_off(srec):
        if st.catalog.find_disk(dst) is None:  # (an existing name: the create below says so)
            st.catalog.set_setting(disks.COPYING_KEY + dst, json.dumps({"from": src, "pid": os.getpid()}))
        try:
            if target_des:
                drec = st.catalog.get_des(target_des)
                des_double = drec.type == disks.TYPE_DOUBLE
                if double is not None and double != des_double:
                    raise Refused(f"disk encryption set {target_des!r} is of type {drec.type}: its disks are "
                                  f"{'double' if des_double else 'single-layer'}-encrypted; name a disk "
                                  "encryption set of the type you want")
                des_mod.create_disk(st, dst, new_size, target_des, srec.sector_size, srec.revocation,
                                    kind=KIND_COPYING)
            else:
                if double is None:
                    double = disks.is_double(disks.read_disk_header(srec))
                disks.create(st, dst, new_size, srec.sector_size, double=double, kind=KIND_COPYING)
        except BaseException:
            if st.catalog.find_disk(dst) is None:
                st.catalog.delete_setting(disks.COPYING_KEY + dst)
            raise
        zero = bytes(CHUNK)
        try:
            with disks.open_volume(st, src, read_only=True) as a, disks.open_volume(st, dst) as b:
                ss = a.sector_size
                for s0, s1 in disks.written_sector_ranges(a):
                    for off in range(s0 * ss, s1 * ss, CHUNK):
                        data = a.read(off, min(CHUNK, s1 * ss - off))
                        if data != zero[:len(data)]:
                            b.write(off, data)
                        if progress:
                            progress(min(off + CHUNK, srec.size), srec.size)
                b.flush()
            with st.catalog.transaction() as c:
                st.catalog.update_disk(dst, c, kind="disk", source_id=srec.disk_id)
                st.catalog.delete_setting(disks.COPYING_KEY + dst, c)
        except BaseException:
            _remove_leftover(st, dst)
            raise
    if progress:
        progress(srec.size, srec.size)
    return st.catalog.get_disk(dst)
