"""Random FUSE operation sequences against the reference model (issue 15): a seeded mix of
buffered and O_DIRECT reads and writes at any offset and length, writes at and across the
end, hole punches, zero ranges, fsyncs, truncates, reopens and a remount, through a real
mount (both front ends), each answer checked against tests/engine/refmodel.py's RefVolume.

Bounded for `make test` (BLOCKCRYPT_FUZZ_SECONDS, default 8 per front end); `make fuzz`
runs it longer. A failure names the seed (BLOCKCRYPT_FUZZ_SEED replays it) and the
operations leading to it."""
from __future__ import annotations

import errno
import mmap
import os
import random
import sys
import time
from pathlib import Path

from blockcrypt.control import disks

from support.fusehelpers import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from refmodel import RefVolume  # noqa: E402

SECONDS = float(os.environ.get("BLOCKCRYPT_FUZZ_SECONDS", "8"))
SIZE = 4 << 20
KiB = 1024


def _span(rng: random.Random, align: int = 1) -> tuple[int, int]:
    """A random (offset, length) inside the disk, mostly small, sometimes large."""
    length = rng.choice([1, 7, 512, 4096, 4099, 65536, 131072 + 5, 1 << 20])
    off = rng.randrange(0, SIZE)
    if align > 1:
        off -= off % align
        length = max(align, length - length % align)
    return off, min(length, SIZE - off) or align


def test_random_operation_sequences_match_the_reference_model(state, mnt):
    seed = int(os.environ.get("BLOCKCRYPT_FUZZ_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    ss = rng.choice([512, 4096])
    disks.create(state, "z", SIZE, sector_size=ss)
    wait_for(lambda: mnt.disk("z").exists(), what="disk listed")
    ref = RefVolume(SIZE, ss, os.urandom(64))
    path = mnt.disk("z")
    fd = os.open(path, os.O_RDWR)
    dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)  # page-aligned: O_DIRECT needs it
    log: list[str] = []
    ops = 0

    def check(cond, what):
        assert cond, f"seed {seed} (BLOCKCRYPT_FUZZ_SEED={seed} replays it), op {ops}: {what}; last ops: {log[-8:]}"

    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            ops += 1
            op = rng.choices(["write", "read", "dwrite", "dread", "punch", "zero", "fsync", "end", "truncate",
                              "reopen"], [25, 25, 10, 10, 6, 6, 6, 4, 2, 3])[0]
            if op in ("write", "read"):
                off, n = _span(rng)
                log.append(f"{op} {off}+{n}")
                if op == "write":
                    data = rng.randbytes(n)
                    check(os.pwrite(fd, data, off) == n and ref.write(off, data) == n, "short write")
                else:
                    check(os.pread(fd, n, off) == ref.read(off, n), "read differs")
            elif op in ("dwrite", "dread"):
                off, n = _span(rng, align=4096)
                n = min(n, len(buf))
                log.append(f"{op} {off}+{n}")
                view = memoryview(buf)[:n]
                if op == "dwrite":
                    view[:] = rng.randbytes(n)
                    check(os.pwritev(dfd, [view], off) == n, "short O_DIRECT write")
                    ref.write(off, bytes(view))
                else:
                    got = os.preadv(dfd, [view], off)
                    check(got == n and bytes(view) == ref.read(off, n), "O_DIRECT read differs")
                view.release()
            elif op in ("punch", "zero"):
                off, n = _span(rng)
                log.append(f"{op} {off}+{n}")
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if op == "punch" else FALLOC_FL_ZERO_RANGE
                fallocate(fd, mode, off, n)
                ref.discard(off, n)
            elif op == "fsync":
                log.append("fsync")
                os.fsync(rng.choice([fd, dfd]))
            elif op == "end":  # at the end: EFBIG; across it: clipped
                off = rng.choice([SIZE, SIZE + 4096, SIZE - 100])
                log.append(f"write-at-end {off}")
                data = rng.randbytes(300)
                try:
                    n = os.pwrite(fd, data, off)
                except OSError as e:
                    check(e.errno == errno.EFBIG and off >= SIZE, f"errno {e.errno} at {off}")
                else:
                    check(off < SIZE and n == ref.write(off, data) == SIZE - off, f"{n} bytes at {off}")
            elif op == "truncate":
                log.append("truncate")
                os.ftruncate(fd, SIZE)  # the current size: a no-op
                try:
                    os.ftruncate(fd, SIZE + rng.choice([-4096, 4096]))
                    check(False, "a resize through the file system succeeded")
                except OSError as e:
                    check(e.errno == errno.EPERM, f"resize: errno {e.errno}")
                check(os.fstat(fd).st_size == SIZE, "size changed")
            else:
                log.append("reopen")
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
        # everything reads back, then again after a remount (all of it is on the backing file)
        check(os.pread(fd, SIZE, 0) == ref.read(0, SIZE), "final read differs")
    finally:
        buf.close()
        os.close(fd)
        os.close(dfd)
    mnt.restart()
    wait_for(lambda: path.exists(), what="disk listed after the remount")
    with open(path, "rb") as f:
        check(f.read() == ref.read(0, SIZE), "after a remount the disk differs")
    assert ops > 50, f"only {ops} operations in {SECONDS} s"
