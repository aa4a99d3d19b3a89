#!/usr/bin/env python3
"""Snapshot, image and disk-from-snapshot times, and fio on a disk with 0, 1 and 10 snapshots.

    .venv/bin/python bench/snapshots.py [--size 1T] [--written 10G] [--trials 5] [--dir DIR]
                                        [--fio] [--fio-size 1G] [--fio-runtime 10] [--json]

Create times: a disk of --size with --written bytes of random data spread over it
(64 MiB runs at even intervals, written through the engine and flushed), then per
trial: ``snapshot create`` (the disk's file frozen, a new top), ``image create
--source SNAPSHOT``, ``disk create --source IMAGE`` and ``image create --source
DISK``, each timed in-process (control/snapshots.py) and once through the CLI
(process start included). Target: each under 1 s for 1 TiB with 10 GiB written.
The space each new member's own file takes is reported too (a header: it must not
grow with the data).

--fio: a real mount; for n in 0, 1, 10: a disk of --fio-size filled sequentially,
n snapshots taken (each after rewriting a tenth of the disk, so chains hold data at
every level), then the bench matrix's random and sequential jobs (bench/jobs.py
shapes: 4 KiB randread/randwrite, 1 MiB seq read/write, O_DIRECT, libaio depth 4)
for --fio-runtime seconds each; ratios against n = 0. The first writes after a
snapshot copy 64 KiB chunks up; the randwrite job runs after a warm-up pass so it
measures the steady state, and reports the warm-up's rate as well. Run on a quiet
host (the script prints the load average it saw).

Everything happens in a temporary directory (or --dir) that is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blockcrypt._util.units import parse_size  # noqa: E402
from blockcrypt.control import disks, snapshots  # noqa: E402
from blockcrypt.control.state import State  # noqa: E402

MiB = 1 << 20
RUN = 64 * MiB


def fill(st, name: str, size: int, written: int) -> float:
    """Write ``written`` bytes of random data in 64 MiB runs spread evenly over the disk."""
    runs = max(1, written // RUN)
    stride = size // runs
    block = os.urandom(4 * MiB)
    t0 = time.monotonic()
    with disks.open_volume(st, name) as v:
        for r in range(runs):
            base = r * stride
            for off in range(0, min(RUN, written - r * RUN), len(block)):
                v.write(base + off, block)
        v.flush()
    return time.monotonic() - t0


def own_bytes(st, name: str) -> int:
    return os.stat(st.catalog.get_disk(name).path).st_blocks * 512


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def create_times(st, size: int, written: int, trials: int) -> dict:
    disks.create(st, "d", size)
    fill_s = fill(st, "d", size, written)
    res = {k: [] for k in ("snapshotCreate", "imageFromSnapshot", "diskFromImage", "imageFromDisk")}
    space = {}
    for t in range(trials):
        res["snapshotCreate"].append(timed(lambda: snapshots.create_snapshot(st, "d", f"s{t}")))
        res["imageFromSnapshot"].append(timed(lambda: snapshots.create_image(st, f"i{t}", f"s{t}")))
        res["diskFromImage"].append(timed(lambda: snapshots.create_disk_from(st, f"c{t}", f"i{t}")))
        res["imageFromDisk"].append(timed(lambda: snapshots.create_image(st, f"g{t}", "d")))
    for n in ("d", "i0", "c0", "g0"):
        space[n] = own_bytes(st, n)
    cli = {}
    env = dict(os.environ, BLOCKCRYPT_STATE=str(st.path))
    for label, args in (("snapshotCreate", ["snapshot", "create", "d", "cli-s"]),
                        ("diskFromSnapshot", ["disk", "create", "cli-c", "--source", "cli-s"])):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "blockcrypt.cli", *args], check=True, env=env, capture_output=True)
        cli[label] = time.perf_counter() - t0
    out = {"sizeBytes": size, "writtenBytes": written, "fillSeconds": round(fill_s, 2), "trials": trials,
           "frozenFileBytes": own_bytes(st, "s0"), "newFileBytes": space,
           "cliSeconds": {k: round(v, 3) for k, v in cli.items()}}
    for k, v in res.items():
        out[k] = {"medianS": round(statistics.median(v), 4), "maxS": round(max(v), 4)}
    out["targetMet"] = all(out[k]["maxS"] < 1.0 for k in res)
    return out


# --- fio -----------------------------------------------------------------------------------

JOBS = (("randread-4k", "randread", "4k"), ("randwrite-4k", "randwrite", "4k"),
        ("seqread-1m", "read", "1M"), ("seqwrite-1m", "write", "1M"))


def _fio(path: Path, rw: str, bs: str, size: int, runtime: int) -> float:
    r = subprocess.run(["fio", "--name=j", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--size={size}",
                        "--direct=1", "--ioengine=libaio", "--iodepth=4", "--time_based", f"--runtime={runtime}",
                        "--randrepeat=0", "--output-format=json"], capture_output=True, text=True, check=True,
                       timeout=runtime + 120)
    j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = j["read"] if "read" in rw else j["write"]
    return side["iops"] if bs == "4k" else side["bw_bytes"] / MiB


def fio_matrix(st, root: Path, size: int, runtime: int) -> dict:
    from blockcrypt.mount import daemon
    mp = root / "mnt"
    mp.mkdir()
    daemon.mount(st, str(mp))
    out = {}
    try:
        for n in (0, 1, 10):
            name = f"f{n}"
            disks.create(st, name, size)
            path = mp / "disks" / name
            for _ in range(100):
                if path.exists():
                    break
                time.sleep(0.05)
            subprocess.run(["fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M", f"--size={size}",
                            "--direct=1", "--ioengine=libaio", "--iodepth=4", "--output-format=json"],
                           check=True, capture_output=True)
            for k in range(n):
                subprocess.run(["fio", "--name=dirty", f"--filename={path}", "--rw=randwrite", "--bs=64k",
                                f"--size={size}", f"--io_size={size // 10}", "--direct=1", "--ioengine=libaio",
                                "--iodepth=4", "--output-format=json"], check=True, capture_output=True)
                snapshots.create_snapshot(st, name, f"{name}-s{k}")
            res = {}
            if n:  # the first writes after the last snapshot copy chunks up: measured apart
                res["randwrite-4k-first"] = _fio(path, "randwrite", "4k", size, runtime)
            for label, rw, bs in JOBS:
                res[label] = _fio(path, rw, bs, size, runtime)
            out[str(n)] = res
    finally:
        daemon.umount(st, str(mp))
    base = out["0"]
    out["ratios"] = {n: {k: round(out[n][k] / base[k], 3) for k, _, _ in JOBS} for n in ("1", "10")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1T")
    ap.add_argument("--written", default="10G")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--fio", action="store_true")
    ap.add_argument("--fio-size", default="1G")
    ap.add_argument("--fio-runtime", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bc-snapbench-", dir=a.dir))
    try:
        st = State.init(root / "state")
        res = {"host": {"loadavg": os.getloadavg(), "cpus": os.cpu_count()},
               "create": create_times(st, parse_size(a.size), parse_size(a.written), a.trials)}
        if a.fio:
            if shutil.which("fio") is None:
                raise SystemExit("fio is not installed (scripts/install-deps.sh --bench)")
            st2 = State.init(root / "state2")
            res["fio"] = fio_matrix(st2, root, parse_size(a.fio_size), a.fio_runtime)
            res["host"]["loadavgAfter"] = os.getloadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        c = res["create"]
        print(f"disk {c['sizeBytes'] >> 30} GiB, {c['writtenBytes'] >> 30} GiB written "
              f"(fill {c['fillSeconds']} s), {c['trials']} trials, load {res['host']['loadavg'][0]:.2f}")
        for k in ("snapshotCreate", "imageFromSnapshot", "diskFromImage", "imageFromDisk"):
            print(f"  {k:<18} median {c[k]['medianS'] * 1000:8.1f} ms   max {c[k]['maxS'] * 1000:8.1f} ms")
        print(f"  CLI (process start included): {c['cliSeconds']}")
        print(f"  new files' own space: {c['newFileBytes']}; target < 1 s: {'met' if c['targetMet'] else 'MISSED'}")
        if "fio" in res:
            print("  fio ratios vs no snapshot:", json.dumps(res["fio"]["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
