"""Issue 15, fault injection on the Python side of the storage seam: header writes under EIO,
ENOSPC and short writes at random points never leave a header half-written (the engine's own
fault tests are native/engine/tests/test_engine.c test_faults)."""
import errno
import random

import pytest

from blockcrypt.control import disks
from blockcrypt.format import read_header, write_header
from blockcrypt.storage import LocalFileBacking


class FaultyBacking:
    """A backing that fails write_at/flush with EIO or ENOSPC one call in `one_in`, writing a
    random prefix first on a failing write (a short write)."""

    def __init__(self, inner, rng, one_in=3):
        self.inner, self.rng, self.one_in = inner, rng, one_in
        self.location, self.writable = inner.location, inner.writable
        self.injected = 0

    def _fail(self):
        if self.rng.randrange(self.one_in) == 0:
            self.injected += 1
            return OSError(self.rng.choice((errno.EIO, errno.ENOSPC)), "injected")
        return None

    def read_at(self, off, length):
        return self.inner.read_at(off, length)

    def write_at(self, off, data):
        e = self._fail()
        if e:
            self.inner.write_at(off, bytes(data)[:self.rng.randrange(len(data) + 1)])
            raise e
        self.inner.write_at(off, data)

    def flush(self):
        e = self._fail()
        if e:
            raise e
        self.inner.flush()


@pytest.mark.parametrize("seed", range(3))
def test_header_writes_under_faults_are_all_or_nothing(state, seed):
    rec = disks.create(state, "h", 1 << 20)
    rng = random.Random(seed)
    good = disks.read_disk_header(rec)
    failures = 0
    with LocalFileBacking(rec.path) as inner:
        fb = FaultyBacking(inner, rng)
        for i in range(200):
            new = good.evolve(size=good.size + 4096 * (i + 1))
            try:
                good = write_header(fb, new)
            except OSError as e:
                assert e.errno in (errno.EIO, errno.ENOSPC)   # the caller gets the error
                failures += 1
                got = read_header(inner, "h", expect_id=good.disk_id)
                # the previous header, or the new one when only its second copy failed
                assert got.size in (good.size, new.size), (got.size, good.size, new.size)
                good = got
                # a damaged copy is repaired from the other before the next write
                good = read_header(inner, "h", repair=True, expect_id=good.disk_id)
            else:
                assert read_header(inner, "h").size == new.size
    assert failures > 20 and fb.injected == failures
