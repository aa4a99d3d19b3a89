#!/usr/bin/env python3
"""Snapshot, image and disk-from-snapshot times, and fio on a disk with 0, 1 and 10 snapshots.

    .venv/bin/python bench/snapshots.py [--size 1T] [--written 10G] [--trials 5] [--dir DIR]
                                        [--fio] [--fio-size 1G] [--fio-runtime 10] [--reps 3]
                                        [--jobs a,b] [--json]

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
every level), then bench/jobs.py's 8 jobs (the same matrix as bench/run.py, with its
cold start before every job), --reps times, the three disks back to back per job;
ratios of medians against n = 0. The first writes after a snapshot copy 64 KiB
chunks up: one rand_write run per disk before the matrix measures that, apart. Run
on a quiet host (the script prints the load average it saw).

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

def fio_matrix(st, root: Path, size: int, runtime: int, reps: int, jobs: list[str] | None = None) -> dict:
    """bench/jobs.py's 8 jobs on disks with 0, 1 and 10 snapshots, on one mount.

    Every (rep, job) runs the three disks back to back, each after the same cold start
    (bench/jobs.py DEFAULT_COLD_START: drop caches, settle 5 s, prefault 3 GiB of page
    cache), so host drift lands on all three alike; ratios are of medians over reps."""
    from bench.jobs import JOBS, run_fio
    from blockcrypt.mount import daemon
    chosen = [j for j in JOBS if jobs is None or j.name in jobs]
    mp = root / "mnt"
    mp.mkdir()
    scratch = root / "scratch"
    scratch.mkdir()
    daemon.mount(st, str(mp))
    counts = (0, 1, 10)
    runs = {str(n): {j.name: [] for j in chosen} for n in counts}
    first = {}
    try:
        paths = {}
        for n in counts:
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
            paths[n] = path
        # The first 4 KiB writes after the last snapshot copy 64 KiB chunks up: measured once,
        # apart, before the matrix (later writes land in chunks already copied).
        rw = next(j for j in JOBS if j.name == "rand_write")
        for n in counts:
            first[str(n)] = round(run_fio(rw, paths[n], size, runtime, 0, None, scratch_dir=scratch)["value"], 1)
        for rep in range(reps):
            for job in chosen:
                for n in counts:
                    r = run_fio(job, paths[n], size, runtime, 0, None, scratch_dir=scratch)
                    runs[str(n)][job.name].append(round(r["value"], 1))
                    print(f"rep {rep + 1}/{reps} {job.name:<14} {n:>2} snapshots: {r['value']:10.1f} {job.unit}",
                          file=sys.stderr, flush=True)
    finally:
        daemon.umount(st, str(mp))
    med = {n: {k: statistics.median(v) for k, v in runs[n].items()} for n in runs}
    return {"sizeBytes": size, "runtimeS": runtime, "reps": reps,
            "coldStart": "drop_caches, settle 5 s, prefault 3072 MiB pagecache",
            "units": {j.name: j.unit for j in chosen}, "runs": runs, "medians": med,
            "randWriteFirstAfterSnapshot": first,
            "ratios": {n: {k: round(med[n][k] / med["0"][k], 3) for k in med["0"]} for n in ("1", "10")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1T")
    ap.add_argument("--written", default="10G")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--fio", action="store_true")
    ap.add_argument("--fio-size", default="1G")
    ap.add_argument("--fio-runtime", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", default=None, help="comma-separated bench/jobs.py job names (default: all 8)")
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
            res["fio"] = fio_matrix(st2, root, parse_size(a.fio_size), a.fio_runtime, a.reps,
                                    a.jobs.split(",") if a.jobs else None)
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
            f = res["fio"]
            print(f"  fio, median of {f['reps']} reps; ratio to no snapshot (target >= 0.8):")
            for k, unit in f["units"].items():
                m = f["medians"]
                print(f"    {k:<14} {m['0'][k]:9.1f} {unit:<5}  1: {f['ratios']['1'][k]:5.2f}  "
                      f"10: {f['ratios']['10'][k]:5.2f}")
            print(f"  first 4 KiB random writes after the last snapshot: {f['randWriteFirstAfterSnapshot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
