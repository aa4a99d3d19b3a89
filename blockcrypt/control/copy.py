"""Disk copy: the plaintext of one disk into a new disk with a new DEK.

Zero ranges are skipped (they stay holes in the new file). A copy is also the
way between what a re-wrap cannot cross: customer key back to a platform key
(``des=""``), and single to double encryption or back (``double``, or a DES of
the other type).

Caveat: O(data): it reads and writes every non-zero range.
"""
from __future__ import annotations

from ..catalog import DiskRecord
from ..errors import Refused
from . import des as des_mod, disks


def copy(st, src: str, dst: str, *, des: str | None = None, double: bool | None = None,
         progress=None) -> DiskRecord:
    """Copy a disk's plaintext into a new disk with new DEKs (skipping zero ranges, which stay holes).

    A copy of a customer-key disk keeps its disk encryption set unless another one is named;
    this is also the way from a customer key back to a platform key (``des=""``). On a DES the
    copy has the DES's type (a ``double`` that contradicts it is refused); with a platform key it
    is double-encrypted when ``double`` says so, or (None) when the source is."""
    srec = st.catalog.get_disk(src)
    target_des = srec.des if des is None else (des or None)
    if target_des:
        drec = st.catalog.get_des(target_des)
        des_double = drec.type == disks.TYPE_DOUBLE
        if double is not None and double != des_double:
            raise Refused(f"disk encryption set {target_des!r} is of type {drec.type}: its disks are "
                          f"{'double' if des_double else 'single-layer'}-encrypted; name a disk encryption set "
                          "of the type you want")
        new = des_mod.create_disk(st, dst, srec.size, target_des, srec.sector_size, srec.revocation)
    else:
        if double is None:
            double = disks.is_double(disks.read_disk_header(srec))
        new = disks.create(st, dst, srec.size, srec.sector_size, double=double)
    chunk = 4 << 20
    zero = bytes(chunk)
    try:
        with disks.open_volume(st, src, read_only=True) as a, disks.open_volume(st, dst) as b:
            for off in range(0, srec.size, chunk):
                data = a.read(off, chunk)
                if data != zero[:len(data)]:
                    b.write(off, data)
                if progress:
                    progress(min(off + chunk, srec.size), srec.size)
            b.flush()
    except BaseException:
        disks.delete(st, dst)
        raise
    return new
