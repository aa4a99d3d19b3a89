#!/usr/bin/env python3
"""Measure the free-page-reporting effect: the same fio job, repeated, under several
cold-start policies (what happens between drop_caches and the job).

    .venv/bin/python bench/fpr.py [--systems raw,c-floor] [--job seq_write] [--size 2G]
                                  [--reps 3] [--policies none,settle5,...] [--json]

A policy is `none` (drop_caches, start at once: what the runner did before),
`settleS` (wait S seconds), `settleS+anonMIB` or `settleS+pagecacheMIB` (wait, then fault
in and free MIB MiB of anonymous memory or page cache), or `delayS` (an alias of settleS,
for sweeps). Repetitions are interleaved (rep 1 of every policy on every system, then
rep 2, ...). For each (system, policy) it prints the values, the median and the spread
((max - min) / median), and how much memory the guest reported to the host during the
settle and during the job (/sys/module/page_reporting/parameters/reported_kib).

Caveats: root only (drop_caches, FUSE); figures from a shared host carry its load (the
foreign-CPU share of each run is printed); docs/BENCHMARKS.md has the run that chose
the runner's default.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench import jobs as jobs_mod, systems as systems_mod  # noqa: E402
from bench.run import parse_size_arg, preflight, teardown  # noqa: E402
from bench.util import BenchError  # noqa: E402

DEFAULT_POLICIES = "none,settle5,settle5+anon2048,settle5+pagecache2048"


def parse_policy(text: str) -> jobs_mod.ColdStart:
    m = re.fullmatch(r"(?:(?:settle|delay)(\d+(?:\.\d+)?))?(?:\+?(anon|pagecache)(\d+))?", text)
    if text == "none":
        return jobs_mod.ColdStart()
    if not m or not text:
        raise BenchError(f"bad policy {text!r}; e.g. none, settle5, settle5+anon2048, settle5+pagecache2048")
    settle = float(m.group(1) or 0)
    kind, mib = (m.group(2), int(m.group(3))) if m.group(2) else ("none", 0)
    return jobs_mod.ColdStart(settle_s=settle, prefault=kind, prefault_mib=mib)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/fpr.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="raw")
    p.add_argument("--job", default="seq_write")
    p.add_argument("--size", default="2G")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds, for time-based jobs")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--policies", default=DEFAULT_POLICIES)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/blockcrypt-bench-fpr"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    selected = []
    try:
        size = parse_size_arg(args.size)
        policies = {name: parse_policy(name) for name in args.policies.split(",") if name}
        job = jobs_mod.by_name().get(args.job)
        if job is None:
            raise BenchError(f"unknown job {args.job}")
        table = systems_mod.by_name()
        names = [n for n in args.systems.split(",") if n]
        unknown = [n for n in names if n not in table]
        if unknown:
            raise BenchError(f"unknown system {', '.join(unknown)}")
        workdir = args.workdir.absolute()
        selected = [table[n](workdir) for n in names]
        selected, _ = preflight(selected, workdir)
        for s in selected:
            s.setup(size)
            jobs_mod.prefill(s.target, size)
        runs = []
        for rep in range(1, args.reps + 1):
            for pname, pol in policies.items():
                for s in selected:
                    r = jobs_mod.run_fio(job, s.target, size, args.runtime, 0, s.daemon_pid,
                                         cold=pol, scratch_dir=workdir)
                    runs.append({"system": s.name, "policy": pname, "rep": rep, "value": r["value"],
                                 "settle_reported_mib": r.get("settle_reported_mib"),
                                 "job_reported_mib": r.get("job_reported_mib"),
                                 "cold_start_s": r.get("cold_start_s"),
                                 "foreign_cpu_pct": r.get("foreign_cpu_pct")})
                    print(f"  [{rep}/{args.reps}] {pname:<24} {s.name:<10} {r['value']:>10,.1f} {job.unit}"
                          f"  reported settle {r.get('settle_reported_mib') or 0:,.0f} MiB, "
                          f"job {r.get('job_reported_mib') or 0:,.0f} MiB, "
                          f"cold start {r.get('cold_start_s') or 0:.1f} s, "
                          f"other load {r.get('foreign_cpu_pct') or 0:.0f}%", file=sys.stderr, flush=True)
    except (BenchError, KeyboardInterrupt) as e:
        teardown(selected)
        print(f"bench/fpr: error: {e}", file=sys.stderr)
        return 1
    teardown(selected)
    summary = []
    for pname in policies:
        for s in selected:
            vals = [r["value"] for r in runs if r["policy"] == pname and r["system"] == s.name]
            med = statistics.median(vals)
            summary.append({"policy": pname, "label": policies[pname].label, "system": s.name,
                            "values": vals, "median": med,
                            "spread_pct": 100 * (max(vals) - min(vals)) / med if med else None,
                            "max_over_min": max(vals) / min(vals) if min(vals) else None})
    if args.json:
        print(json.dumps({"job": job.name, "size": size, "runs": runs, "summary": summary}, indent=1))
    else:
        print(f"{'policy':<26}{'system':<10}{'median':>10}{'spread':>8}{'max/min':>9}  values ({job.unit})")
        for row in summary:
            print(f"{row['policy']:<26}{row['system']:<10}{row['median']:>10,.0f}"
                  f"{row['spread_pct']:>7.0f}%{row['max_over_min']:>9.2f}  "
                  + ", ".join(f"{v:,.0f}" for v in row["values"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
