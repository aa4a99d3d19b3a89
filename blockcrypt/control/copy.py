"""Disk copy: the plaintext of one disk into a new disk with a new DEK.

Zero ranges are skipped (they stay holes in the new file). A copy is also the
way between key kinds that a re-wrap cannot cross: customer key back to a
platform key (``des=""``), and later single to double encryption.

Caveat: O(data): it reads and writes every allocated, non-zero range of the source
(SEEK_DATA/SEEK_HOLE on its file), not its whole size.
"""
from __future__ import annotations

import json
import os

from ..catalog import DiskRecord, check_name
from . import des as des_mod, disks


def copy(st, src: str, dst: str, *, des: str | None = None, progress=None) -> DiskRecord:
    """Copy a disk's plaintext into a new disk with a new DEK (skipping zero ranges, which stay holes).

    A copy of a customer-key disk keeps its disk encryption set unless another one is named;
    this is also the way from a customer key back to a platform key (``des=""``).

    The source's writer lock is held for the whole copy (a disk open for writing in a mount is
    refused: the copy is of one moment); the new disk is marked Copying in the catalog until
    the copy is done, so a killed copy shows as an incomplete disk, never as Healthy."""
    srec = st.catalog.get_disk(src)
    target_des = srec.des if des is None else (des or None)
    check_name("disk", dst)
    with disks.writers_held_off(srec):
        if st.catalog.find_disk(dst) is None:  # (an existing name: the create below says so)
            st.catalog.set_setting(disks.COPYING_KEY + dst, json.dumps({"from": src, "pid": os.getpid()}))
        try:
            if target_des:
                new = des_mod.create_disk(st, dst, srec.size, target_des, srec.sector_size, srec.revocation)
            else:
                new = disks.create(st, dst, srec.size, srec.sector_size)
        except BaseException:
            if st.catalog.find_disk(dst) is None:
                st.catalog.delete_setting(disks.COPYING_KEY + dst)
            raise
        chunk = 4 << 20
        zero = bytes(chunk)
        try:
            with disks.open_volume(st, src, read_only=True) as a, disks.open_volume(st, dst) as b:
                ss = a.sector_size
                for s0, s1 in disks.written_sector_ranges(srec.path, a):
                    for off in range(s0 * ss, s1 * ss, chunk):
                        data = a.read(off, min(chunk, s1 * ss - off))
                        if data != zero[:len(data)]:
                            b.write(off, data)
                        if progress:
                            progress(min(off + chunk, srec.size), srec.size)
                b.flush()
            st.catalog.delete_setting(disks.COPYING_KEY + dst)
        except BaseException:
            disks.delete(st, dst)
            raise
    if progress:
        progress(srec.size, srec.size)
    return new
