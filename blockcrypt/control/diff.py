"""Changed ranges between two members of a family, from their chunk maps (no data read);
and the flat export of a member (its chain's ciphertext laid out as one plain64 image).

As EBS ListChangedBlocks and Azure's page-range diff let backup tools copy only
what changed: ``snapshot diff OLD NEW`` lists the byte ranges where the two
members' chains take a chunk from different files. A chunk is copied up into a
file only when it is written there, so a chunk held by the same file in both
chains is the same bytes, and one held by different files was written in between.

Caveat: the unit is the chunk (64 KiB): a 4 KiB write shows as its whole chunk;
a chunk written back with its old bytes still shows (no data is compared). Bits
not yet flushed (a mounted disk's very last writes) are not in the maps; diff
snapshots, whose files are frozen.
"""
from __future__ import annotations

import re

from .._util.fsutil import create_private_file
from ..errors import Refused
from ..format.layout import MAP_AREA_OFFSET, map_chunks_for
from ..storage import LocalFileBacking
from ..volume.volume import chain_below
from . import disks

_RUN = re.compile(r"1+")


def _bits(path: str, nchunks: int) -> int:
    with LocalFileBacking(path, writable=False) as b:
        raw = b.read_at(MAP_AREA_OFFSET, (nchunks + 7) // 8)
    return int.from_bytes(raw, "little") & ((1 << nchunks) - 1)


def holders(rec, nchunks: int) -> dict:
    """{file id (hex) or None (no file: zeros): the chunks (a bit mask) it serves} over
    chunks [0, nchunks) of member ``rec``'s chain."""
    h = disks.read_disk_header(rec)
    files = [(rec.path, h.map_chunks if h.overlay else 0, h)] + chain_below(rec.path, h, rec.name)
    full = (1 << nchunks) - 1
    left, out = full, {}
    for path, mc, fh in files:
        mine = (full & ~((1 << min(mc, nchunks)) - 1))  # at or past its map: its own
        if mc:
            mine |= _bits(path, min(mc, nchunks))
        mine &= left
        out[fh.own_file_id.hex()] = out.get(fh.own_file_id.hex(), 0) | mine
        left &= ~mine
        if not left:
            break
    out[None] = left
    return out


def diff(st, old: str, new: str) -> dict:
    a, b = st.catalog.get_disk(old), st.catalog.get_disk(new)
    if not a.family_id or a.family_id != b.family_id:
        raise Refused(f"{a.kind} {old!r} and {b.kind} {new!r} are not of one family (made from one disk); "
                      "their changes cannot be listed from the maps")
    ha = disks.read_disk_header(a)
    chunk = ha.chunk_bytes
    size = max(a.size, b.size)
    n = map_chunks_for(size, chunk)
    ma, mb = holders(a, n), holders(b, n)
    same = 0
    for f, bits in ma.items():
        same |= bits & mb.get(f, 0)
    changed = ((1 << n) - 1) & ~same
    ranges = []
    s = bin(changed)[2:][::-1]  # index i = chunk i
    for m in _RUN.finditer(s):
        off = m.start() * chunk
        end = min(m.end() * chunk, size)
        ranges.append({"offset": off, "length": end - off})
    if a.size != b.size:  # a grown member: the new tail differs in size, whatever it holds
        lo = min(a.size, b.size)
        if not ranges or ranges[-1]["offset"] + ranges[-1]["length"] < lo:
            ranges.append({"offset": lo, "length": size - lo})
        else:
            ranges[-1] = {"offset": ranges[-1]["offset"], "length": size - ranges[-1]["offset"]}
    return {"old": old, "new": new, "chunkBytes": chunk, "sizeBytes": size,
            "changedBytes": sum(r["length"] for r in ranges), "changedRanges": ranges}


def _runs(mask: int):
    s = bin(mask)[2:][::-1]
    for m in _RUN.finditer(s):
        yield m.start(), m.end()


def export(st, name: str, out: str, progress=None) -> dict:
    """Write member ``name``'s data area as one flat file: exactly dm-crypt aes-xts-plain64
    under the family's DEK (sector n at n * sector size, tweak n), whatever chain it sits
    on; holes stay holes. Double-encrypted members have no plain64 image (their sectors
    are AEAD ciphertext with metadata apart): refused, naming dump-key and FORMAT.md."""
    import errno
    import os

    rec = st.catalog.get_disk(name)
    h = disks.read_disk_header(rec)
    if disks.is_double(h):
        raise Refused(f"{rec.kind} {name!r} is double-encrypted: it has no flat plain64 image; use "
                      f"`blockcrypt disk dump-key` and docs/FORMAT.md to read its sectors")
    fd = create_private_file(out)
    data_off, size = h.data_offset, h.size
    chunk = h.chunk_bytes if h.overlay else (1 << 20)
    n = map_chunks_for(size, chunk)
    try:
        os.ftruncate(fd, size)
        if h.overlay and h.parent_id is not None:
            by_file = holders(rec, n)
            files = {fh.own_file_id.hex(): p for p, _mc, fh in chain_below(rec.path, h, name)}
            files[h.own_file_id.hex()] = rec.path
        else:
            by_file = {h.own_file_id.hex(): (1 << n) - 1}
            files = {h.own_file_id.hex(): rec.path}
        total = sum(bin(m).count("1") for f, m in by_file.items() if f is not None) * chunk
        done = 0
        for fid, mask in by_file.items():
            if fid is None:
                continue  # no file holds it: a hole
            src = os.open(files[fid], os.O_RDONLY | os.O_CLOEXEC)
            try:
                for c0, c1 in _runs(mask):
                    for c in range(c0, c1, 16):
                        off = c * chunk
                        length = min(min(c + 16, c1) * chunk, size) - off
                        if length <= 0:
                            continue
                        buf = os.pread(src, length, data_off + off)
                        buf += bytes(length - len(buf))
                        if any(buf):
                            os.pwrite(fd, buf, off)
                        done += length
                        if progress:
                            progress(min(done, total), total)
            finally:
                os.close(src)
        os.fsync(fd)
    except BaseException as e:
        os.close(fd)
        os.unlink(out)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            from ..errors import NoSpace
            raise NoSpace(name=out) from None
        raise
    os.close(fd)
    iv = " --iv-large-sectors" if h.sector_size != 512 else ""
    line = (f"cryptsetup open --type plain -c aes-xts-plain64 -s 512 --sector-size {h.sector_size}{iv} "
            f"--key-file KEYFILE --keyfile-size 64 {out} {name}")
    return {"name": name, "file": out, "sizeBytes": size, "cryptsetup": line}
