"""Key checks per key, not per disk (issue 16): with many customer-key disks on one DES, all
open (VMs running), the mount's key monitor unwraps once per check interval, whatever the
number of disks, as the vault's own audit counts it; a revocation still stops every one of
them within the interval plus one second."""
from __future__ import annotations

import errno
import json
import os
import time

from blockcrypt.control import des
from support.fusehelpers import Mount, cleanup_tree, direct_io, until

MiB = 1 << 20
N_DISKS = 16
INTERVAL_S = 1.0


def _unwraps(vault, key_name, after_seq: int) -> list[dict]:
    p = vault.cli("audit", "--key", key_name, "--json")
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    return [r for r in recs if r["seq"] > after_seq and r.get("operation") == "KeyUnwrap"]


def _last_seq(vault) -> int:
    p = vault.cli("audit", "--limit", "1", "--json")
    return json.loads(p.stdout.splitlines()[-1])["seq"]


def test_one_unwrap_per_interval_for_many_disks(root, state, vault, key_name):
    state.catalog.set_setting("key_check_interval", str(INTERVAL_S))
    des.create(state, "des1", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True)
    names = [f"vm{i:02d}" for i in range(N_DISKS)]
    for n in names:
        des.create_disk(state, n, 4 * MiB, "des1")
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()
    fds = {}
    try:
        fds = {n: os.open(m.disk(n), os.O_RDWR | os.O_DIRECT) for n in names}  # each open: its own unwrap
        assert all(direct_io(fd, True) == 0 for fd in fds.values())
        time.sleep(INTERVAL_S * 1.5)
        seq0, t0 = _last_seq(vault), time.monotonic()
        time.sleep(6 * INTERVAL_S)
        window = time.monotonic() - t0
        got = _unwraps(vault, key_name, seq0)
        checks = window / INTERVAL_S
        # one unwrap per interval (per disk it would be N_DISKS times as many)
        assert checks - 2 <= len(got) <= checks + 2, (len(got), window)
        assert len({r.get("disk_id") for r in got}) == 1        # always through one disk
        # and the answer holds for all: a revocation stops every disk within interval + 1 s
        vault.key("disable", key_name)
        t = until(lambda: all(direct_io(fd, True) == errno.EIO for fd in fds.values()), INTERVAL_S + 3)
        assert t is not None and t <= INTERVAL_S + 1.0, t
        vault.key("enable", key_name)
        assert until(lambda: all(direct_io(fd, True) == 0 for fd in fds.values()), INTERVAL_S + 3) is not None
    finally:
        for fd in fds.values():
            os.close(fd)
        vault.key("enable", key_name, check=False)
        cleanup_tree(root, state)
