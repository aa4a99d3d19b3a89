#!/usr/bin/env python3
"""Where the time of one request goes: fio's completion latency through a native
blockcrypt mount against the engine's own latency histogram (status --json), so
engine time (backing I/O + crypto + locks) and transport time (kernel FUSE, the
session) are told apart.

    .venv/bin/python bench/latency_split.py [--size 1G] [--runtime 10] [--cipher xts|null]

Prints, per job, fio's mean and median completion latency, the engine's median
(from its log2 histogram: the bucket that holds the median request) and the
daemon's CPU seconds. Caches are dropped before each job, as in bench/run.py.

Caveat: the engine histogram has power-of-two buckets, so its median is a range
(2^(i-1), 2^i] microseconds; the daemon's CPU includes the session threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BC = [sys.executable, "-m", "blockcrypt"]
JOBS = {
    "rand_read_4k": ["--rw=randread", "--bs=4k", "--numjobs=1"],
    "rand_read_4k_x2": ["--rw=randread", "--bs=4k", "--numjobs=2"],
    "rand_write_4k": ["--rw=randwrite", "--bs=4k", "--numjobs=1"],
    "seq_read_1m": ["--rw=read", "--bs=1m", "--numjobs=1"],
    "seq_write_1m": ["--rw=write", "--bs=1m", "--numjobs=1"],
}


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def bc(state, *args):
    return run([*BC, "--state", state, *args], cwd=REPO)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_bucket(hist: list[int]) -> str:
    total, seen = sum(hist), 0
    for i, n in enumerate(hist):
        seen += n
        if seen * 2 >= total:
            return "<= 1 us" if i == 0 else f"{2 ** (i - 1)}-{2 ** i} us"
    return "-"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--cipher", choices=("xts", "null"), default="xts")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bc-lat-", dir="/var/tmp") as tmp:
        state, mp = f"{tmp}/state", Path(tmp) / "mnt"
        mp.mkdir()
        bc(state, "init")
        bc(state, "disk", "create", "d", "--size", a.size)
        extra = ["--bench-null-cipher"] if a.cipher == "null" else []
        info = json.loads(bc(state, "mount", str(mp), "--json", *extra).stdout)
        disk = mp / "disks" / "d"
        try:
            run(["fio", "--name=fill", f"--filename={disk}", "--rw=write", "--bs=1m", "--direct=1",
                 f"--size={a.size}", "--output-format=json"])
            keep = os.open(disk, os.O_RDONLY)  # the volume (and its counters) stays open between jobs
            for name, opts in JOBS.items():
                run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
                before = json.loads(bc(state, "status", "--json").stdout)["mounts"][0]
                c0 = cpu_s(info["pid"])
                out = run(["fio", f"--name={name}", f"--filename={disk}", "--direct=1", "--ioengine=psync",
                           f"--size={a.size}", "--time_based=1", f"--runtime={a.runtime}s", "--norandommap=1",
                           "--group_reporting=1", "--output-format=json", *opts]).stdout
                c1 = cpu_s(info["pid"])
                after = json.loads(bc(state, "status", "--json").stdout)["mounts"][0]
                job = json.loads(out)["jobs"][0]
                side = job["read"] if job["read"]["io_bytes"] else job["write"]
                h0 = before["disks"][0]["io"]["latencyUsLog2"] if before["disks"] else [0] * 32
                h1 = after["disks"][0]["io"]["latencyUsLog2"]
                hist = [y - x for x, y in zip(h0, h1)]
                clat = side["clat_ns"]
                print(f"{name:<16} {side['iops']:>10,.0f} IOPS  fio clat mean {clat['mean'] / 1000:8.1f} us, "
                      f"median {clat['percentile']['50.000000'] / 1000:8.1f} us | engine median {median_bucket(hist):>12}"
                      f" over {sum(hist):,} requests | daemon CPU {c1 - c0:.2f} s", flush=True)
                time.sleep(1)
            os.close(keep)
        finally:
            bc(state, "umount", str(mp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
