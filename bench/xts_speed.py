#!/usr/bin/env python3
"""Micro-benchmark of the native AES-256-XTS core against `openssl speed`.

In one run, pinned to one CPU, it alternates ``openssl speed -elapsed -evp
aes-256-xts -bytes 4096 -seconds N`` (and the same with ``-decrypt``) with timed
loops over ``blockcrypt._xts.XtsContext`` on 4096-byte sectors: 1 MiB requests
(256 sectors per call) and 4 KiB requests (one sector per call), encrypt and
decrypt. Each figure is the median of --runs runs, in GB/s: 10**9 bytes per
CPU-second of the one working thread (openssl: its block count over the child's
exact CPU time; native: bytes over time.thread_time()), so time stolen by other
processes does not count against either side. Wall-clock figures are reported too.
Ratios are native / openssl for the same direction. Target: 1 MiB encrypt >= 90 %.

    .venv/bin/python bench/xts_speed.py            # human-readable
    .venv/bin/python bench/xts_speed.py --json     # one JSON object on stdout
    .venv/bin/python bench/xts_speed.py --aead     # also the platform AEAD layer
    .venv/bin/python bench/xts_speed.py --engine-aead  # the engine's AEAD layer vs openssl
                                                   # chacha20-poly1305 at 4 KiB (make -C native)
    .venv/bin/python bench/xts_speed.py --split    # 128 KiB / 1 MiB requests split over two
                                                   # threads vs unsplit, and the handoff latency
    .venv/bin/python bench/xts_speed.py --volume DIR   # the same through blockcrypt.volume.Volume,
                                                   # null cipher vs XTS unsplit vs split
    .venv/bin/python bench/xts_speed.py --fuse DIR     # fio 1M O_DIRECT through `blockcrypt mount`,
                                                   # null cipher vs XTS unsplit vs split (root, fio)

Caveats: a benchmark, not a test. On a shared VM the figures still move by several
per cent (neighbours share caches and the physical core), which is why runs are
interleaved, medians reported and the load average printed. `openssl speed`
encrypts one 4 KiB buffer in place with one IV, so it pays no per-sector tweak
set-up and stays in L1; the native core sets a new tweak for every 4096-byte
sector, as dm-crypt does. The 4 KiB figure includes the Python call (argument
parsing, result allocation, GIL release) for every sector.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

SECTOR_SIZE = 4096
MIB = 1 << 20
TARGET_RATIO = 0.90


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def openssl_gbps(seconds: int, decrypt: bool, cipher: str = "aes-256-xts",
                 aead: bool = False) -> tuple[float, float]:
    """One `openssl speed -elapsed` run on 4096-byte blocks.

    Returns (GB/s per CPU-second, GB/s per wall-clock second as openssl prints it).
    The CPU figure is openssl's own block count (its "Doing ... N AES-256-XTS's in
    T s" line) over the child's CPU time from getrusage, which the kernel keeps
    exactly. openssl's default divisor, user time from times(), is tick-sampled and
    reads high when other processes share the core."""
    cmd = ["openssl", "speed", "-elapsed", "-evp", cipher, "-bytes", str(SECTOR_SIZE),
           "-seconds", str(seconds)]
    if decrypt:
        cmd.insert(2, "-decrypt")
    if aead:   # a message per block: a fresh IV, the AAD and the tag every time
        cmd.insert(2, "-aead")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    text = proc.stdout + proc.stderr
    # the result line: "AES-256-XTS    7902735.02k" (thousands of bytes per second)
    name = re.escape(cipher)
    rate = re.search(r"^%s\s+([0-9.]+)k\s*$" % name, text, re.IGNORECASE | re.MULTILINE)
    count = re.search(r"on %d size blocks: (\d+) %s's in" % (SECTOR_SIZE, name), text, re.IGNORECASE)
    if not rate or not count or cpu_s <= 0:
        raise RuntimeError(f"cannot parse `{' '.join(cmd)}` output:\n{text}")
    return int(count.group(1)) * SECTOR_SIZE / cpu_s / 1e9, float(rate.group(1)) * 1000 / 1e9


def native_gbps(ctx, data: bytes, seconds: float, decrypt: bool) -> tuple[float, float]:
    """Call the core back to back on `data` for about `seconds` of wall time.

    Returns (GB/s per CPU-second of this thread, GB/s per wall-clock second). The
    first is what `openssl speed` reports by default (bytes per user CPU second), so
    the two compare fairly even when other processes share the core."""
    op = ctx.decrypt if decrypt else ctx.encrypt
    sectors_per_call = len(data) // SECTOR_SIZE
    calls_per_check = max(1, (64 * MIB) // len(data))
    sector_no, calls = 2**32, 0
    cpu_start, wall_start = time.thread_time(), time.perf_counter()
    deadline = wall_start + seconds
    while True:
        for _ in range(calls_per_check):
            op(data, sector_no)
            sector_no += sectors_per_call
        calls += calls_per_check
        wall = time.perf_counter()
        if wall >= deadline:
            cpu = time.thread_time() - cpu_start
            done = calls * len(data)
            return done / cpu / 1e9, done / (wall - wall_start) / 1e9


class _AeadAsCipher:
    """AeadSectorContext behind the encrypt/decrypt shape that native_gbps drives."""

    def __init__(self, ctx):
        self.ctx, self.meta = ctx, b""

    def encrypt(self, data, sector_no):
        return self.ctx.seal(data, sector_no)

    def decrypt(self, data, sector_no):
        return self.ctx.open(data, self.meta, 0)  # always sector 0, so the tags verify


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _us_per_call(op, data, sector_no: int, calls: int, gap_s: float = 0.0) -> float:
    """Median wall-clock µs of one call over `calls` calls (with `gap_s` of sleep
    between calls, so a helper thread that sleeps between requests has to be woken)."""
    times = []
    for i in range(calls):
        if gap_s:
            time.sleep(gap_s)
        t = time.perf_counter()
        op(data, sector_no + i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def split_main(args) -> int:
    """Requests split over the calling thread and the helper thread vs unsplit, wall clock.

    Not pinned: the point is to use both CPUs. Each figure is the median over --runs
    interleaved rounds of the median µs per call. The handoff is measured on 2-sector
    512-byte requests (the AES work is ~0.3 µs): split minus unsplit, with calls back to
    back (helper hot) and with a 200 µs sleep between calls (helper asleep unless it spins
    that long; the caller then does the whole request and only pays the post)."""
    from blockcrypt import _xts

    key = os.urandom(64)
    spins = args.split_spin_us
    variants = {"unsplit": {"split_threshold": 0}}
    for spin in spins:
        variants[f"split spin {spin} us"] = {"split_threshold": args.split_threshold, "split_spin_us": spin}
    ctxs = {name: _xts.XtsContext(key, SECTOR_SIZE, **kw) for name, kw in variants.items()}
    small = {name: _xts.XtsContext(key, 512, **{**kw, "split_threshold": min(1, kw["split_threshold"])})
             for name, kw in variants.items()}
    cases = {}
    for size in (128 * 1024, MIB):
        plain = os.urandom(size)
        cases[f"encrypt {size // 1024} KiB"] = (plain, False)
        cases[f"decrypt {size // 1024} KiB"] = (ctxs["unsplit"].encrypt(plain, 0), True)
    two = os.urandom(1024)
    samples: dict[tuple[str, str], list[float]] = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.runs):
        for name in variants:
            ctx = ctxs[name]
            for case, (data, decrypt) in cases.items():
                op = ctx.decrypt if decrypt else ctx.encrypt
                calls = max(200, int(args.native_seconds * 1e9 / 5 / len(data)))
                _us_per_call(op, data, 0, 20)
                samples.setdefault((name, case), []).append(_us_per_call(op, data, 0, calls))
            s = small[name]
            _us_per_call(s.encrypt, two, 0, 200)
            samples.setdefault((name, "2 x 512 B back to back"), []).append(_us_per_call(s.encrypt, two, 0, 20000))
            samples.setdefault((name, "2 x 512 B, 200 us apart"), []).append(
                _us_per_call(s.encrypt, two, 0, 2000, gap_s=200e-6))
    for c in (*ctxs.values(), *small.values()):
        c.wipe()
    med = {k: statistics.median(v) for k, v in samples.items()}
    case_names = list(dict.fromkeys(c for _, c in samples))
    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(), "cpus": os.cpu_count(), "openssl": _xts.openssl_version(),
        "split_threshold": args.split_threshold, "runs": args.runs,
        "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
        "unit": "wall-clock microseconds per call, median of per-run medians",
        "us_per_call": {f"{n} | {c}": round(v, 2) for (n, c), v in med.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['date']}  {result['cpu']}  {result['cpus']} CPUs  {result['openssl']}  "
          f"load {result['loadavg_before']} / {result['loadavg_after']}")
    print(f"{'µs per call (wall clock)':<28}" + "".join(f"{n:>22}" for n in variants))
    for c in case_names:
        base = med[("unsplit", c)]
        cells = []
        for n in variants:
            v = med[(n, c)]
            cells.append(f"{v:9.2f}" + (f" ({base / v:4.2f}x)" if n != "unsplit" and "KiB" in c
                                         else f" (+{v - base:5.2f})" if n != "unsplit" else "        "))
        print(f"{c:<28}" + "".join(f"{x:>22}" for x in cells))
    print("(KiB rows: speed-up over unsplit; 2 x 512 B rows: the handoff cost, split minus unsplit)")
    return 0


def volume_main(args) -> int:
    """128 KiB sequential Volume.write then Volume.read on a fresh disk, null cipher vs
    XTS unsplit vs XTS split, page cache dropped before each pass (the backing file is
    read and written through the page cache, as the FUSE daemon does)."""
    import tempfile

    from blockcrypt.control import disks
    from blockcrypt.control.state import State
    from blockcrypt.control.disks import open_volume

    req = 128 * 1024
    size = args.volume_mib * MIB
    variants = {"null": None, "xts unsplit": "0"}
    for spin in args.split_spin_us:
        variants[f"xts split spin {spin}"] = (str(args.split_threshold), str(spin))
    samples: dict[tuple[str, str], list[float]] = {}
    dropped = True
    with tempfile.TemporaryDirectory(dir=args.volume) as tmp:
        st = State.init(os.path.join(tmp, "state"))
        disks.create(st, "bench", size)
        payload = os.urandom(req)
        for _ in range(args.runs):
            for name, split in variants.items():
                env = {"BLOCKCRYPT_XTS_SPLIT_BYTES": None, "BLOCKCRYPT_XTS_SPLIT_SPIN_US": None}
                if isinstance(split, tuple):
                    env = {"BLOCKCRYPT_XTS_SPLIT_BYTES": split[0], "BLOCKCRYPT_XTS_SPLIT_SPIN_US": split[1]}
                elif split == "0":
                    env["BLOCKCRYPT_XTS_SPLIT_BYTES"] = "0"
                for k, v in env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                with open_volume(st, "bench", null_cipher=split is None) as vol:
                    dropped &= _drop_caches()
                    t = time.perf_counter()
                    for off in range(0, size, req):
                        vol.write(off, payload)
                    vol.flush()
                    samples.setdefault((name, "write"), []).append((time.perf_counter() - t) / (size // req) * 1e6)
                    dropped &= _drop_caches()
                    t = time.perf_counter()
                    for off in range(0, size, req):
                        vol.read(off, req)
                    samples.setdefault((name, "read"), []).append((time.perf_counter() - t) / (size // req) * 1e6)
        for k in ("BLOCKCRYPT_XTS_SPLIT_BYTES", "BLOCKCRYPT_XTS_SPLIT_SPIN_US"):
            os.environ.pop(k, None)
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "request_bytes": req, "disk_bytes": size, "runs": args.runs, "caches_dropped": dropped,
              "loadavg_after": round(os.getloadavg()[0], 2),
              "us_per_request": {f"{n} | {d}": round(v, 2) for (n, d), v in med.items()},
              "ratio_null_over_variant": {f"{n} | {d}": round(med[("null", d)] / v, 3)
                                          for (n, d), v in med.items() if n != "null"}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['date']}  Volume 128 KiB sequential, {args.volume_mib} MiB, {args.runs} runs, "
          f"caches {'dropped' if dropped else 'NOT dropped (not root?)'}, load {result['loadavg_after']}")
    for d in ("write", "read"):
        print(f"{d}: " + ", ".join(f"{n} {med[(n, d)]:.1f} µs"
                                   + ("" if n == "null" else f" ({med[('null', d)] / med[(n, d)]:.2f}x null)")
                                   for n in variants))
    return 0


def fuse_main(args) -> int:
    """fio through the FUSE mount: `blockcrypt --state S mount M [--bench-null-cipher]`, one
    state dir per cipher under DIR (kept for the next run), mounted in turn; the split is
    set for the daemon through BLOCKCRYPT_XTS_SPLIT_BYTES/_SPIN_US. Per repetition and
    variant: fio --rw=write --end_fsync=1, then --rw=read, bs=1M, direct=1, size=1G,
    time_based --fuse-seconds, numjobs=1, page cache dropped before each job. Medians of
    --runs interleaved repetitions; ratios are XTS / null."""
    import subprocess as sp

    bc = shutil.which("blockcrypt") or os.path.join(os.path.dirname(sys.executable), "blockcrypt")
    root = os.path.abspath(args.fuse)
    variants = {"null": None, "xts unsplit": {"BLOCKCRYPT_XTS_SPLIT_BYTES": "0"}}
    for spin in args.split_spin_us:
        variants[f"xts split spin {spin}"] = {"BLOCKCRYPT_XTS_SPLIT_BYTES": str(args.split_threshold),
                                             "BLOCKCRYPT_XTS_SPLIT_SPIN_US": str(spin)}
    mp = os.path.join(root, "mnt")
    os.makedirs(mp, exist_ok=True)
    for kind in ("null", "xts"):
        sd = os.path.join(root, f"state-{kind}")
        if not os.path.exists(sd):
            sp.run([bc, "--state", sd, "init"], check=True, capture_output=True)
            sp.run([bc, "--state", sd, "disk", "create", "d", "--size", "2G"], check=True, capture_output=True)
    samples: dict[tuple[str, str], list[float]] = {}
    loads = []
    for _ in range(args.runs):
        for name, env in variants.items():
            sd = os.path.join(root, "state-null" if env is None else "state-xts")
            cmd = [bc, "--state", sd, "mount", mp] + (["--bench-null-cipher"] if env is None else [])
            sp.run(cmd, check=True, capture_output=True, env={**os.environ, **(env or {})})
            try:
                loads.append(os.getloadavg()[0])
                for rw in ("write", "read"):
                    _drop_caches()
                    fio = ["fio", "--name=j", f"--filename={mp}/disks/d", f"--rw={rw}", "--bs=1M", "--direct=1",
                           "--size=1G", f"--runtime={args.fuse_seconds}", "--time_based=1", "--numjobs=1",
                           "--ioengine=psync", "--output-format=json"] + (["--end_fsync=1"] if rw == "write" else [])
                    out = json.loads(sp.run(fio, check=True, capture_output=True, text=True).stdout)
                    samples.setdefault((name, rw), []).append(out["jobs"][0][rw]["bw_bytes"] / 1e6)
            finally:
                sp.run([bc, "--state", sd, "umount", mp], capture_output=True, check=False)
            if not args.json:
                print(f"{name}: " + ", ".join(f"{rw} {samples[(name, rw)][-1]:.0f} MB/s" for rw in ("write", "read"))
                      + f"  (load {loads[-1]:.2f})", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "runs": args.runs,
              "loadavg_at_mounts": [round(x, 2) for x in loads],
              "median_mb_s": {f"{n} | {rw}": round(v) for (n, rw), v in med.items()},
              "ratio_to_null": {f"{n} | {rw}": round(v / med[("null", rw)], 3) for (n, rw), v in med.items()},
              "samples_mb_s": {f"{n} | {rw}": [round(x) for x in v] for (n, rw), v in samples.items()}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for rw in ("write", "read"):
        print(f"fio {rw}: " + ", ".join(f"{n} {med[(n, rw)]:.0f} MB/s"
                                       + ("" if n == "null" else f" ({med[(n, rw)] / med[('null', rw)]:.2f}x)")
                                       for n in variants))
    if max(loads) > 1.5:
        print(f"warning: load average up to {max(loads):.2f} at mount time: other work shared the 2 CPUs")
    return 0


ENGINE_AEAD_TARGET = 0.80


def engine_aead_main(args) -> int:
    """The engine's AEAD layer (native/engine/bc_layer_aead.c, what double-encrypted volumes
    use) against `openssl speed -evp chacha20-poly1305` at 4 KiB on one core: the layer's
    own figures come from `test_aead --speed` (GB/s per CPU-second of its thread, seal and
    open, one sector per call and 256), openssl's from its block count over the child's
    CPU time, both bulk (one stream, as the issue's command) and -aead (a message per
    block: IV, AAD and tag each time, which is what a sector costs). Runs interleave;
    medians of --runs."""
    binary = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "native", "test_aead")
    if not os.access(binary, os.X_OK):
        print(f"xts_speed: {binary} is missing; run `make -C native`", file=sys.stderr)
        return 2
    if shutil.which("openssl") is None:
        print("xts_speed: the `openssl` command is missing (apt-get install openssl)", file=sys.stderr)
        return 2
    load_before = f"{os.getloadavg()[0]:.2f}"
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1] if args.cpu is None else args.cpu
    os.sched_setaffinity(0, {cpu})
    samples: dict[str, list[float]] = {}
    bulk = "?"
    for _ in range(args.runs):
        for label, dec, aead in (("openssl_seal_bulk", False, False), ("openssl_seal_aead", False, True),
                                 ("openssl_open_aead", True, True)):
            samples.setdefault(label, []).append(
                openssl_gbps(args.openssl_seconds, decrypt=dec, cipher="chacha20-poly1305", aead=aead)[0])
        out = subprocess.run([binary, "--speed", str(args.native_seconds)], capture_output=True, text=True,
                             check=True).stdout
        for k, v in json.loads(out).items():
            if k == "bulk":   # the library the layer ran its ChaCha20-Poly1305 through
                bulk = v
                continue
            samples.setdefault("layer_" + k, []).append(v)
    med = {k: statistics.median(v) for k, v in samples.items()}
    # test_aead's own per-round ratios: the layer against openssl's bulk loop and libsodium's
    # one-shot seal, each round taken side by side in one thread (robust to the host's drift)
    ratios = {
        "inproc_seal_4k_vs_openssl": med["layer_seal_4k_vs_openssl"],
        "inproc_open_4k_vs_openssl": med["layer_open_4k_vs_openssl"],
        "inproc_seal_4k_vs_sodium": med["layer_seal_4k_vs_sodium"],
        "seal_4k_vs_bulk": med["layer_seal_4k"] / med["openssl_seal_bulk"],
        "seal_4k_vs_aead": med["layer_seal_4k"] / med["openssl_seal_aead"],
        "open_4k_vs_aead": med["layer_open_4k"] / med["openssl_open_aead"],
        "seal_1m_vs_aead": med["layer_seal_1m"] / med["openssl_seal_aead"],
    }
    result = {"when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "cpu": cpu,
              "cpuModel": cpu_model(), "loadBefore": load_before, "loadAfter": f"{os.getloadavg()[0]:.2f}",
              "runs": args.runs, "bulk": bulk, "medians": med, "samples": samples, "ratios": ratios,
              "target": ENGINE_AEAD_TARGET}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"engine AEAD layer vs openssl chacha20-poly1305, 4096-byte blocks, pinned to CPU {cpu}, "
          f"median of {args.runs} (GB/s per CPU-second), bulk through {bulk}; load {load_before} -> {result['loadAfter']}")
    for k in sorted(med):
        print(f"  {k:<22} {med[k]:6.3f}   [{', '.join(f'{x:.3f}' for x in samples[k])}]")
    for k, r in ratios.items():
        print(f"  ratio {k:<18} {r:5.2f}  (target >= {ENGINE_AEAD_TARGET:.2f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported (5)")
    ap.add_argument("--openssl-seconds", type=int, default=3, help="`openssl speed -seconds` (3)")
    ap.add_argument("--native-seconds", type=float, default=6.0,
                    help="CPU-seconds of one `test_aead --speed` run, split over its interleaved rounds (6)")
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last one allowed)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--no-direct-iv", action="store_true",
                    help="set every tweak through EVP_CipherInit_ex (the documented path) instead of the "
                         "self-tested direct IV write, to see what the direct path saves")
    ap.add_argument("--aead", action="store_true",
                    help="also measure the platform-layer AEAD (blockcrypt._aead) on 1 MiB requests")
    ap.add_argument("--engine-aead", action="store_true",
                    help="instead: the engine's AEAD layer (build/native/test_aead --speed) against "
                         "`openssl speed -evp chacha20-poly1305` at 4 KiB, bulk and -aead")
    ap.add_argument("--split", action="store_true",
                    help="instead: 128 KiB and 1 MiB requests split over two threads vs unsplit (wall "
                         "clock, not pinned) and the handoff latency")
    ap.add_argument("--volume", metavar="DIR", default=None,
                    help="instead: 128 KiB Volume.write/Volume.read on a disk made under DIR, null cipher "
                         "vs XTS unsplit vs split (drops the page cache: needs root)")
    ap.add_argument("--fuse", metavar="DIR", default=None,
                    help="instead: fio 1M O_DIRECT read/write through `blockcrypt mount` with state dirs "
                         "under DIR, null cipher vs XTS unsplit vs split (root, fio)")
    ap.add_argument("--fuse-seconds", type=int, default=15, help="fio runtime per job for --fuse (15)")
    ap.add_argument("--volume-mib", type=int, default=256, help="disk size for --volume (256 MiB)")
    ap.add_argument("--split-threshold", type=int, default=65536,
                    help="split threshold in bytes for --split/--volume/--fuse (65536)")
    ap.add_argument("--split-spin-us", type=int, nargs="+", default=[0, 1000],
                    help="helper spin times to compare for --split/--volume/--fuse (0 1000)")
    args = ap.parse_args(argv)

    if args.engine_aead:
        return engine_aead_main(args)
    if args.split:
        return split_main(args)
    if args.volume:
        return volume_main(args)
    if args.fuse:
        return fuse_main(args)
    if shutil.which("openssl") is None:
        print("xts_speed: the `openssl` command is missing (apt-get install openssl)", file=sys.stderr)
        return 2
    try:
        from blockcrypt import _xts
    except ImportError as e:
        print(f"xts_speed: blockcrypt._xts is not built ({e}); run `make build`", file=sys.stderr)
        return 2

    load_before = f"{os.getloadavg()[0]:.2f}"
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1] if args.cpu is None else args.cpu
    os.sched_setaffinity(0, {cpu})  # openssl inherits it: both on one core

    key = os.urandom(64)
    ctx = _xts.XtsContext(key, SECTOR_SIZE, direct_iv=not args.no_direct_iv)
    plain = os.urandom(MIB)
    cipher = ctx.encrypt(plain, 0)  # non-zero ciphertext: the zero-sector scan exits early
    cases = {
        "encrypt_1MiB": (plain, False),
        "decrypt_1MiB": (cipher, True),
        "encrypt_4KiB": (plain[:SECTOR_SIZE], False),
        "decrypt_4KiB": (cipher[:SECTOR_SIZE], True),
    }
    aead: dict = {}
    aead_version = ""
    if args.aead:
        try:
            from blockcrypt import _aead
        except ImportError as e:
            print(f"xts_speed: blockcrypt._aead is not built ({e})", file=sys.stderr)
            return 2
        aead_version = _aead.sodium_version()
        wrapper = _AeadAsCipher(_aead.AeadSectorContext(os.urandom(32), SECTOR_SIZE))
        aead_ct, wrapper.meta = wrapper.ctx.seal(plain, 0)
        aead = {"aead_seal_1MiB": (wrapper, plain, False), "aead_open_1MiB": (wrapper, aead_ct, True)}
    samples: dict[str, list[float]] = {"openssl_encrypt": [], "openssl_decrypt": []}
    samples.update({name: [] for name in cases})
    wall_samples: dict[str, list[float]] = {name: [] for name in ("openssl_encrypt", "openssl_decrypt", *cases)}
    for run in range(args.runs):
        per_cpu, per_wall = openssl_gbps(args.openssl_seconds, decrypt=False)
        samples["openssl_encrypt"].append(per_cpu)
        wall_samples["openssl_encrypt"].append(per_wall)
        for name, (data, decrypt) in cases.items():
            native_gbps(ctx, data, 0.1, decrypt)  # warm up
            per_cpu, per_wall = native_gbps(ctx, data, args.native_seconds, decrypt)
            samples[name].append(per_cpu)
            wall_samples[name].append(per_wall)
        for name, (cipher, data, decrypt) in aead.items():
            samples.setdefault(name, []).append(native_gbps(cipher, data, args.native_seconds, decrypt)[0])
        per_cpu, per_wall = openssl_gbps(args.openssl_seconds, decrypt=True)
        samples["openssl_decrypt"].append(per_cpu)
        wall_samples["openssl_decrypt"].append(per_wall)
        if not args.json:
            print(f"run {run + 1}/{args.runs}: "
                  + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.items()), file=sys.stderr)
    direct_iv = ctx.direct_iv
    ctx.wipe()

    median = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    ratios = {
        name: round(median[name] / median["openssl_decrypt" if decrypt else "openssl_encrypt"], 3)
        for name, (_, decrypt) in cases.items()
    }
    # each native figure is paired with the openssl run next to it: under a drifting
    # load on a shared machine the median of paired ratios is the steadier figure
    paired = {
        name: round(statistics.median(
            n / o for n, o in zip(samples[name], samples["openssl_decrypt" if decrypt else "openssl_encrypt"])), 3)
        for name, (_, decrypt) in cases.items()
    }
    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "pinned_cpu": cpu,
        "openssl": _xts.openssl_version(),
        "sector_size": SECTOR_SIZE,
        "direct_iv": direct_iv,
        "runs": args.runs,
        "loadavg_before": float(load_before),
        "loadavg_after": round(os.getloadavg()[0], 2),
        "unit": "GB/s (1e9 bytes per CPU-second of the one working thread), median",
        "median_gbps": median,
        "ratio_to_openssl": ratios,
        "paired_ratio_median": paired,
        "samples_gbps": {k: [round(x, 3) for x in v] for k, v in samples.items()},
        "wall_clock_median_gbps": {k: round(statistics.median(v), 3) for k, v in wall_samples.items()},
        "target_ratio": TARGET_RATIO,
        "meets_target": ratios["encrypt_1MiB"] >= TARGET_RATIO,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['date']}  {result['cpu']}  (pinned to CPU {cpu})  {result['openssl']}")
    print(f"load average before/after: {load_before} / {os.getloadavg()[0]:.2f}; tweak set by "
          + ("direct IV write (self-tested)" if direct_iv else "EVP_CipherInit_ex per sector"))
    wall = result["wall_clock_median_gbps"]
    print(f"openssl speed -evp aes-256-xts -bytes 4096: encrypt {median['openssl_encrypt']:.2f} GB/s, "
          f"decrypt {median['openssl_decrypt']:.2f} GB/s  (wall clock {wall['openssl_encrypt']:.2f} / "
          f"{wall['openssl_decrypt']:.2f} GB/s)")
    for name in cases:
        print(f"native {name:<13} {median[name]:6.2f} GB/s  {ratios[name] * 100:5.1f} % of openssl"
              f"  (paired runs: {paired[name] * 100:5.1f} %; wall clock "
              f"{result['wall_clock_median_gbps'][name]:.2f} GB/s)")
    if float(load_before) > 1.0:
        print(f"warning: load average was {load_before} on a {len(allowed)}-CPU machine: other work shares "
              "the caches and cores, so these figures are low; run again on an idle machine")
    for name in aead:
        print(f"platform AEAD {name:<15} {median[name]:6.2f} GB/s  (XChaCha20-Poly1305, libsodium {aead_version})")
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(f"1 MiB encrypt {verdict} the target of {TARGET_RATIO:.0%} of openssl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
