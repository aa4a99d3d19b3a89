"""Issue 15, M2: after a revocation, handles already open read no cached plaintext: the native
session makes the kernel drop the disk's cached pages (fuse_lowlevel_notify_inval_inode), so a
buffered read answers EIO and an mmap of the disk faults (real mount, real vault)."""
import errno
import os
import subprocess
import sys

import pytest

from blockcrypt.control import des
from support.fusehelpers import Mount

from test_cmk_mount import BOUND_S, direct_io, until

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent")

SECRET = b"cached plaintext " * 241   # 4097 bytes: the first page and a bit

CHILD = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 8192, prot=mmap.PROT_READ)
sys.stdout.write("ready " + m[:16].decode() + "\n"); sys.stdout.flush()
sys.stdin.readline()
sys.stdout.write("after " + m[:16].decode() + "\n"); sys.stdout.flush()
"""


def test_revocation_drops_cached_plaintext(root, state, vault, key_name, monkeypatch):
    monkeypatch.setenv("BLOCKCRYPT_FRONTEND", "native")
    state.catalog.set_setting("key_check_interval", "1")
    des.create(state, "des1", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True)
    des.create_disk(state, "vm", 16 << 20, "des1")
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()
    path = m.disk("vm")
    fd = os.open(path, os.O_RDWR)
    child = None
    try:
        os.pwrite(fd, SECRET, 0)
        os.fsync(fd)
        assert os.pread(fd, len(SECRET), 0) == SECRET          # now in the page cache
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().startswith("ready cached plain")
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)    # opened before: a new open drops the cache
        vault.key("disable", key_name)
        t = until(lambda: direct_io(dfd, False) == errno.EIO, BOUND_S + 3)
        os.close(dfd)
        assert t is not None, "the disk was not revoked"
        with pytest.raises(OSError) as ei:
            os.pread(fd, 4096, 0)                              # the same handle, buffered
        assert ei.value.errno == errno.EIO
        child.stdin.write("\n")
        child.stdin.flush()
        out = child.stdout.read()
        child.wait(10)
        assert "after" not in out and child.returncode == -7, (out, child.returncode)  # SIGBUS
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        os.close(fd)
        vault.key("enable", key_name)
        m.stop()
