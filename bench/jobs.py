"""The fio job matrix and one measured fio run (with the daemon's CPU time).

Every job uses direct=1 (O_DIRECT, as QEMU opens a disk with cache=none), one
file of the run's size, and group_reporting, so the JSON has one aggregate per
job; all but seq_write_aio (libaio, iodepth 4) use ioengine=psync. Sequential
jobs make one pass over the whole file (the read pass starts from a cold cache);
random jobs are time based. Before every measured job the same ColdStart runs
for every system (drop caches, settle, prefault).

The 512-byte job writes at offsets 512 + k * 4096: every request is 512-byte
aligned and none is 4 KiB aligned, so a 4 KiB-sector disk must read-modify-write
each one (fio: offset=512, blockalign=4k, bs=512, size = file size - 4 KiB).

Caveats: psync means queue depth 1 per fio job, so parallelism comes only from
numjobs (and iodepth in seq_write_aio); the page cache of the *backing* file still serves the FUSE daemons
after the first touch within a job (caches are dropped only between jobs).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .util import (CLOCK_TICKS_PER_S, BenchError, cpu_times, drop_caches, host_cpu_ticks,
                   prefault_anon, prefault_pagecache, reported_kib, run, wait_quiet)

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Job:
    name: str               # key for --jobs
    label: str              # what tables and plots show
    family: str             # "throughput" (MiB/s) or "iops"
    direction: str          # "read", "write" or "both": which side is the metric
    fio: dict = field(default_factory=dict)
    time_based: bool = True
    size_trim_bytes: int = 0  # fio size = file size - this (room for offset=)
    pattern: str = "random"   # "sequential" or "random": which peer target applies

    @property
    def ioengine(self) -> str:
        return self.fio.get("ioengine", "psync")

    @property
    def unit(self) -> str:
        return "MiB/s" if self.family == "throughput" else "IOPS"


JOBS: list[Job] = [
    Job("seq_write", "seq write 1 MiB", "throughput", "write",
        {"rw": "write", "bs": "1M", "end_fsync": "1"}, time_based=False, pattern="sequential"),
    Job("seq_write_aio", "seq write 1 MiB libaio QD4", "throughput", "write",
        {"rw": "write", "bs": "1M", "ioengine": "libaio", "iodepth": "4", "end_fsync": "1"},
        time_based=False, pattern="sequential"),
    Job("seq_read", "seq read 1 MiB (cold)", "throughput", "read",
        {"rw": "read", "bs": "1M"}, time_based=False, pattern="sequential"),
    Job("rand_read", "rand read 4 KiB", "iops", "read",
        {"rw": "randread", "bs": "4k", "numjobs": "1"}),
    Job("rand_read_2j", "rand read 4 KiB x2 jobs", "iops", "read",
        {"rw": "randread", "bs": "4k", "numjobs": "2"}),
    Job("rand_write", "rand write 4 KiB fsync/32", "iops", "write",
        {"rw": "randwrite", "bs": "4k", "fsync": "32"}),
    Job("unaligned_512", "rand write 512 B unaligned", "iops", "write",
        {"rw": "randwrite", "bs": "512", "blockalign": "4k", "offset": "512"},
        size_trim_bytes=4096),
    Job("mixed_16k", "randrw 70/30 16 KiB x2 jobs", "iops", "both",
        {"rw": "randrw", "rwmixread": "70", "bs": "16k", "numjobs": "2"}),
]


@dataclass(frozen=True)
class ColdStart:
    """What happens between dropping the caches and starting a job, identical for every
    system: drop caches, wait `settle_s`, then fault in and free `prefault_mib` MiB of
    anonymous memory or page cache. On a VM with free page reporting the host takes freed
    memory back; how much of it a job must fault in again otherwise depends on how long
    after drop_caches it starts (docs/BENCHMARKS.md, "Free page reporting")."""

    settle_s: float = 0.0
    prefault: str = "none"        # "none" | "anon" | "pagecache"
    prefault_mib: int = 0

    def __post_init__(self):
        if self.prefault not in PREFAULT_KINDS:
            raise BenchError(f"unknown prefault kind {self.prefault!r}; choose from {', '.join(PREFAULT_KINDS)}")
        if self.settle_s < 0 or self.prefault_mib < 0:
            raise BenchError("settle and prefault sizes cannot be negative")

    @property
    def label(self) -> str:
        pre = f", prefault {self.prefault_mib} MiB {self.prefault}" if self.prefault != "none" else ""
        return f"drop_caches, settle {self.settle_s:g} s{pre}"

    def apply(self, scratch_dir: Path | None = None) -> dict:
        """Do it; returns how long it took and how much memory the guest reported to the
        host during the settle (MiB)."""
        t0 = time.monotonic()
        drop_caches()
        r0 = reported_kib()
        if self.settle_s > 0:
            time.sleep(self.settle_s)
        r1 = reported_kib()
        if self.prefault == "anon":
            prefault_anon(self.prefault_mib)
        elif self.prefault == "pagecache":
            base = Path(scratch_dir) if scratch_dir is not None else Path("/var/tmp")
            prefault_pagecache(base / f".bench-prefault-{os.getpid()}", self.prefault_mib)
        return {"cold_start_s": time.monotonic() - t0,
                "settle_reported_mib": (r1 - r0) / 1024 if r0 is not None and r1 is not None else None}


PREFAULT_KINDS = ("none", "anon", "pagecache")
NO_CONTROL = ColdStart()                 # what the runner did before (drop_caches, start at once)
# the full mode's cold start (bench/run.py MODES), measured in docs/BENCHMARKS.md
DEFAULT_COLD_START = ColdStart(settle_s=5.0, prefault="pagecache", prefault_mib=3072)


def parse_prefault(text: str) -> tuple[str, int]:
    """'anon:1024' -> ('anon', 1024); 'none' -> ('none', 0)."""
    kind, _, mib = text.partition(":")
    if kind == "none" and not mib:
        return "none", 0
    if kind not in PREFAULT_KINDS or not mib.isdigit():
        raise BenchError(f"bad --prefault {text!r}; use none, anon:MIB or pagecache:MIB")
    return kind, int(mib)


def by_name() -> dict[str, Job]:
    return {j.name: j for j in JOBS}


def fio_command(job: Job, target: Path, size_bytes: int, runtime_s: float, ramp_s: float,
                output: Path) -> list[str]:
    opts = {
        "name": job.name, "filename": str(target), "size": str(size_bytes - job.size_trim_bytes),
        "ioengine": "psync", "direct": "1", "group_reporting": "1", "thread": "1",
        **job.fio,
    }
    if job.time_based:
        opts.update({"time_based": "1", "runtime": f"{runtime_s:g}s", "norandommap": "1"})
        if ramp_s > 0:
            opts["ramp_time"] = f"{ramp_s:g}s"
    return ["fio", "--output-format=json", f"--output={output}"] + [f"--{k}={v}" for k, v in opts.items()]


def _side(d: dict) -> dict:
    pct = (d.get("clat_ns") or {}).get("percentile") or {}
    return {
        "io_bytes": int(d.get("io_bytes", 0)),
        "bw_bytes": float(d.get("bw_bytes", 0)),
        "iops": float(d.get("iops", 0.0)),
        "clat_p50_us": pct.get("50.000000", 0) / 1000,
        "clat_p99_us": pct.get("99.000000", 0) / 1000,
    }


def parse_fio(text: str, job: Job) -> dict:
    """Metric and details from fio's JSON output (one group-reported job)."""
    start = text.find("{")
    if start < 0:
        raise BenchError(f"fio {job.name}: no JSON in its output")
    try:
        data = json.loads(text[start:])
        j = data["jobs"][0]
    except (ValueError, KeyError, IndexError) as e:
        raise BenchError(f"fio {job.name}: unreadable JSON output ({e})") from None
    if j.get("error"):
        raise BenchError(f"fio {job.name}: error {j['error']} reported by fio")
    read, write = _side(j.get("read", {})), _side(j.get("write", {}))
    if job.family == "throughput":
        side = read if job.direction == "read" else write
        value = side["bw_bytes"] / MiB
    else:
        value = {"read": read["iops"], "write": write["iops"],
                 "both": read["iops"] + write["iops"]}[job.direction]
    return {"value": value, "read": read, "write": write,
            "io_bytes": read["io_bytes"] + write["io_bytes"],
            "fio_usr_cpu_pct": j.get("usr_cpu"), "fio_sys_cpu_pct": j.get("sys_cpu"),
            "fio_version": data.get("fio version")}


def run_fio(job: Job, target: Path, size_bytes: int, runtime_s: float, ramp_s: float,
            daemon_pid: int | None, *, cold: ColdStart | bool = True, profile_path: Path | None = None,
            quiet_wait_s: float = 0.0, scratch_dir: Path | None = None) -> dict:
    """Wait (up to `quiet_wait_s`) for an idle host, apply the cold start (drop caches,
    settle, prefault; `cold=True` is DEFAULT_COLD_START, False skips it), run one fio job;
    return its metric plus the daemon's CPU time.

    With `profile_path`, py-spy samples the daemon during the job (collapsed stacks).
    """
    # the quiet wait comes first, so the settle time is the same for every job and system
    waited_s, pre_busy_pct = wait_quiet(quiet_wait_s)
    if cold is True:
        cold = DEFAULT_COLD_START
    cold_info = cold.apply(scratch_dir) if cold else {}
    with tempfile.NamedTemporaryFile(prefix="fio-", suffix=".json") as out:
        cmd = fio_command(job, target, size_bytes, runtime_s, ramp_s, Path(out.name))
        timeout_s = 600 + 4 * (runtime_s + ramp_s)
        spy = start_py_spy(daemon_pid, profile_path) if profile_path and daemon_pid else None
        try:
            kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            rep0 = reported_kib()
            cpu0, host0, t0 = cpu_times(daemon_pid), host_cpu_ticks(), time.monotonic()
            run(cmd, timeout_s=timeout_s)
            elapsed_s = time.monotonic() - t0
            cpu1, host1 = cpu_times(daemon_pid), host_cpu_ticks()
            rep1 = reported_kib()
            kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            if spy is not None:
                stop_py_spy(spy)
        result = parse_fio(Path(out.name).read_text(errors="replace"), job)
    daemon_user_s = (cpu1[0] - cpu0[0]) if cpu0 is not None and cpu1 is not None else None
    daemon_cpu_s = (sum(cpu1) - sum(cpu0)) if cpu0 is not None and cpu1 is not None else None
    result["elapsed_s"] = elapsed_s
    result.update(cold_info)
    result["job_reported_mib"] = (rep1 - rep0) / 1024 if rep0 is not None and rep1 is not None else None
    result["quiet_wait_s"] = waited_s
    result["pre_job_host_busy_pct"] = pre_busy_pct if pre_busy_pct >= 0 else None
    result["daemon_cpu_s"] = daemon_cpu_s
    gib = result["io_bytes"] / GiB
    # ramp_time I/O is not in io_bytes but its CPU is in daemon_cpu_s: a slight overestimate.
    result["cpu_s_per_gib"] = (daemon_cpu_s / gib) if daemon_cpu_s is not None and gib > 0 else None
    busy, user, total = (host1[i] - host0[i] for i in range(3))
    result["host_cpu_busy_pct"] = 100.0 * busy / total if total else None
    fio_cpu_s = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    result["fio_cpu_s"] = fio_cpu_s
    # User-mode CPU of every other process on the host: noise in the figures. System time is
    # left out because kernel threads doing our own writeback and I/O completion land there.
    result["foreign_cpu_s"] = max(0.0, user / CLOCK_TICKS_PER_S - kids1.ru_utime + kids0.ru_utime
                                  - (daemon_user_s or 0.0))
    result["foreign_cpu_pct"] = (100.0 * result["foreign_cpu_s"] / (elapsed_s * (os.cpu_count() or 1))
                                 if elapsed_s > 0 else None)
    return result


def start_py_spy(pid: int, path: Path) -> subprocess.Popen:
    """py-spy recording `pid` as collapsed stacks (one 'frame;frame;... count' line each)."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        raise BenchError("py-spy not found next to this python; .venv/bin/pip install py-spy")
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path.with_suffix(".log"), "wb")
    try:
        proc = subprocess.Popen([str(exe), "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                                 "--nolineno", "--threads", "--output", str(path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    finally:
        log.close()
    time.sleep(0.5)  # let it attach before the job starts
    return proc


def stop_py_spy(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prefill(target: Path, size_bytes: int) -> float:
    """Write the whole file once (not measured), so every measured job overwrites; MiB/s."""
    job = Job("prefill", "prefill", "throughput", "write",
              {"rw": "write", "bs": "1M", "end_fsync": "1"}, time_based=False)
    return run_fio(job, target, size_bytes, 0, 0, None, cold=False)["value"]
