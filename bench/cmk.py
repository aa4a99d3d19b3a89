#!/usr/bin/env python3
"""Customer-managed-key benchmarks: DES rotation time vs disk count and size, and revocation latency.

    .venv/bin/python bench/cmk.py [--disks 1000] [--sizes 1G,1T] [--trials 5] [--interval 1,2] [--json]

Rotation: N disks on one disk encryption set, then the vault key is rotated and
``des.rotate`` re-wraps every DEK (one unwrap + one wrap through the vault over
HTTPS and one atomic header write per disk). Run for each disk size: the time
must not depend on it, because no data is rewritten. The platform-key rotation
of the same disks is timed too.

Revocation: a CMK disk held open through a real mount (like a VM), the key
disabled at a random moment, O_DIRECT writes every 10 ms until EIO: latency per
trial against the bound (check interval + 1 s).

Everything runs on 127.0.0.1 in a temporary directory and is torn down.
"""
from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blockcrypt.control import des, disks  # noqa: E402
from blockcrypt.control import rotation
from blockcrypt.control.state import State  # noqa: E402
from blockcrypt._util.units import parse_size  # noqa: E402


def vault_cli(*args):
    p = subprocess.run([sys.executable, "-m", "blockcrypt", "vault", *map(str, args)], capture_output=True,
                       text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(f"vault {' '.join(map(str, args))}: {p.stderr.strip()}")
    return p.stdout


class Vault:
    def __init__(self, d: Path):
        self.dir = d
        vault_cli("init", "--dir", d, "--purge-protection", "--retention-days", "7")
        self.proc = subprocess.Popen([sys.executable, "-m", "blockcrypt", "vault", "serve", "--dir", str(d),
                                      "--listen", "127.0.0.1:0"], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("vault listening on "):
            raise SystemExit("vault serve did not start")
        self.url = line.split()[-1]

    def key(self, *args):
        return json.loads(vault_cli("key", *args, "--dir", self.dir, "--json") or "{}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def bench_rotation(root: Path, vault: Vault, n_disks: int, size: int) -> dict:
    st = State.init(root / f"state-{size}")
    key = f"rot{size}"
    vault.key("create", key)
    des.create(st, "des", f"{vault.url}/keys/{key}", vault_dir=str(vault.dir), grant=True)
    t0 = time.perf_counter()
    for i in range(n_disks):
        des.create_disk(st, f"d{i:04d}", size, "des")
    t_create = time.perf_counter() - t0
    new_kid = vault.key("rotate", key)["key"]["kid"]
    t0 = time.perf_counter()
    r = des.rotate(st, "des", new_kid)
    t_rotate = time.perf_counter() - t0
    assert len(r["rewrapped"]) == n_disks
    # the same disks moved off the DES would be platform keys; time a platform rotation on as many disks
    pst = State.init(root / f"pstate-{size}")
    for i in range(n_disks):
        disks.create(pst, f"p{i:04d}", size)
    t0 = time.perf_counter()
    pr = rotation.rotate_platform_key(pst)
    t_platform = time.perf_counter() - t0
    assert len(pr["rewrapped"]) == n_disks
    used = sum(f.stat().st_blocks * 512 for f in (st.path / "disks").glob("*.img"))
    shutil.rmtree(st.path)
    shutil.rmtree(pst.path)
    return {"disks": n_disks, "diskSizeBytes": size, "createSeconds": round(t_create, 2),
            "rotateSeconds": round(t_rotate, 2), "msPerDisk": round(1000 * t_rotate / n_disks, 2),
            "platformRotateSeconds": round(t_platform, 2), "backingBytesUsed": used}


def _dio_write(fd: int) -> int:
    buf = mmap.mmap(-1, 4096)
    try:
        buf.write(os.urandom(4096))
        os.pwritev(fd, [buf], 1 << 20)
        return 0
    except OSError as e:
        return e.errno
    finally:
        buf.close()


def bench_revocation(root: Path, vault: Vault, interval: float, trials: int) -> dict:
    st = State.init(root / f"rstate-{interval}")
    st.catalog.set_setting("key_check_interval", str(interval))
    key = f"rev{str(interval).replace('.', '-')}"
    vault.key("create", key)
    des.create(st, "des", f"{vault.url}/keys/{key}", vault_dir=str(vault.dir), grant=True)
    des.create_disk(st, "vm", 64 << 20, "des")
    mp = root / f"mnt-{interval}"
    mp.mkdir()
    bc = [sys.executable, "-m", "blockcrypt.cli", "--state", str(st.path)]
    subprocess.run([*bc, "mount", str(mp)], check=True, capture_output=True)
    lat = []
    try:
        fd = os.open(mp / "disks" / "vm", os.O_RDWR | os.O_DIRECT)
        try:
            for _ in range(trials):
                time.sleep(random.uniform(0, interval))  # disable at a random phase of the check cycle
                vault.key("disable", key)
                t0 = time.monotonic()
                while _dio_write(fd) != errno.EIO:
                    if time.monotonic() - t0 > interval + 10:
                        raise SystemExit("I/O never stopped")
                    time.sleep(0.01)
                lat.append(time.monotonic() - t0)
                vault.key("enable", key)
                t1 = time.monotonic()
                while _dio_write(fd) != 0:
                    if time.monotonic() - t1 > interval + 10:
                        raise SystemExit("I/O never came back")
                    time.sleep(0.01)
        finally:
            os.close(fd)
    finally:
        subprocess.run([*bc, "umount", str(mp)], capture_output=True)
    return {"intervalSeconds": interval, "boundSeconds": interval + 1, "trials": trials,
            "latencySeconds": [round(x, 3) for x in lat], "median": round(statistics.median(lat), 3),
            "max": round(max(lat), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disks", type=int, default=1000)
    ap.add_argument("--sizes", default="1G,1T")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--interval", default="1,2")
    ap.add_argument("--skip-revocation", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bc-cmk-bench-"))
    vault = Vault(root / "vault")
    out = {"rotation": [], "revocation": []}
    try:
        for s in a.sizes.split(","):
            r = bench_rotation(root, vault, a.disks, parse_size(s))
            out["rotation"].append(r)
            if not a.json:
                print(f"rotation: {r['disks']} disks of {s}: DES re-wrap {r['rotateSeconds']} s "
                      f"({r['msPerDisk']} ms/disk), platform re-wrap {r['platformRotateSeconds']} s, "
                      f"backing space used {r['backingBytesUsed'] >> 20} MiB", flush=True)
        if not a.skip_revocation:
            for iv in a.interval.split(","):
                r = bench_revocation(root, vault, float(iv), a.trials)
                out["revocation"].append(r)
                if not a.json:
                    print(f"revocation: interval {iv} s: EIO after median {r['median']} s, max {r['max']} s "
                          f"(bound {r['boundSeconds']} s) over {r['trials']} trials", flush=True)
    finally:
        vault.stop()
        shutil.rmtree(root, ignore_errors=True)
    if a.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
