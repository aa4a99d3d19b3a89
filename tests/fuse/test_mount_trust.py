"""Issue 15 over a real mount (both front ends): a disk open in a mount is not deleted (H2),
and a second writer of a mounted disk's file is refused (C1)."""
import os

from blockcrypt.control import disks
from blockcrypt.control.state import State

from support.fusehelpers import backing_path, bc, wait_for

MiB = 1 << 20


def test_disk_open_in_a_mount_is_not_deleted(state, mnt):
    disks.create(state, "vm2", 4 * MiB)
    wait_for(lambda: mnt.disk("vm2").exists(), what="disk listed")
    fd = os.open(mnt.disk("vm2"), os.O_RDWR)
    try:
        os.pwrite(fd, b"keep me" * 100, 0)
        os.fsync(fd)
        p = bc(state, "disk", "delete", "vm2", check=False)
        assert p.returncode == 6, (p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and str(mnt.mp) in lines[0] and "vm2" in lines[0], p.stderr
        assert backing_path(state, "vm2").exists()
        os.pwrite(fd, b"still here", 4096)   # the writer goes on, on a file that still exists
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(mnt.disk("vm2"), "rb") as f:
        assert f.read(7) == b"keep me" and f.seek(4096) == 4096 and f.read(10) == b"still here"


def test_delete_refused_while_the_file_is_locked_by_a_writer(state, mnt):
    """Without the status file to tell (a writer in another state directory or host), the
    writer lock on the file alone refuses the delete."""
    disks.create(state, "vm3", 4 * MiB)
    wait_for(lambda: mnt.disk("vm3").exists(), what="disk listed")
    fd = os.open(mnt.disk("vm3"), os.O_RDWR)
    try:
        os.pwrite(fd, b"x", 0)
        from blockcrypt.errors import Busy
        import pytest
        with pytest.raises(Busy, match="open for writing"):
            disks.delete(State.open(state.path), "vm3")      # the control layer, past the CLI check
        with pytest.raises(Busy, match="open for writing by another process"):
            disks.open_volume(state, "vm3")                  # a second writer of the same file
    finally:
        os.close(fd)
    assert disks.open_volume(state, "vm3", read_only=True).close() is None
