#!/usr/bin/env python3
"""Run the fio benchmark matrix against blockcrypt and its peers, in one run.

    .venv/bin/python bench/run.py --mode quick|full [--systems a,b] [--jobs x,y] [--json]

Sets every selected system up (each in its own directory under --workdir, all
mounted at once), prefills its file, then runs each job on each system,
repetition by repetition, dropping caches before every job. Writes
bench/out/<timestamp>/{raw.json,RESULTS.md,*.png}; an unfiltered full run (or
--publish) also writes bench/RESULTS.md, bench/results.json and bench/*.png.
Everything it mounted or started is torn down on success, failure, Ctrl-C or
SIGTERM.

Caveats: needs root (drop_caches, FUSE mounts, O_DIRECT on every system); one
run at a time per --workdir; numbers from a shared or busy host are noise.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import jobs as jobs_mod  # noqa: E402
from bench import profile, report, systems as systems_mod  # noqa: E402
from bench.util import BenchError, need_tool  # noqa: E402

MODES = {
    # file size, seconds per random job, ramp seconds, repetitions, openssl speed seconds
    # and how long to wait before each job for other work on the host to stop
    # and how often to repeat a measurement that other work on the host disturbed
    # and the cold start before each job (docs/BENCHMARKS.md, "Free page reporting"):
    # seconds to settle after drop_caches, then fault in and free page cache of the file
    # size plus PREFAULT_MARGIN_MIB (what a daemon's backing file can take in one job)
    "quick": {"size_bytes": 256 << 20, "runtime_s": 2.0, "ramp_s": 0.0, "reps": 1, "openssl_s": 1,
              "quiet_wait_s": 0.0, "retries": 0, "settle_s": 2.0, "prefault": "pagecache"},
    "full": {"size_bytes": 2 << 30, "runtime_s": 10.0, "ramp_s": 0.0, "reps": 3, "openssl_s": 3,
             "quiet_wait_s": 20.0, "retries": 2, "settle_s": 5.0, "prefault": "pagecache"},
}
PREFAULT_MARGIN_MIB = 1024
DEFAULT_WORKDIR = Path("/var/tmp/blockcrypt-bench")
DISTURBED_PCT = 15.0  # other processes' share of all CPUs above which a measurement is retried
OUT_DIR = HERE / "out"
PUBLISHED = ["RESULTS.md", "results.json"]


class Interrupted(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(MODES), default="quick")
    p.add_argument("--systems", help="comma-separated subset of: "
                   + ",".join(c.name for c in systems_mod.SYSTEMS))
    p.add_argument("--jobs", help="comma-separated subset of: " + ",".join(j.name for j in jobs_mod.JOBS))
    p.add_argument("--json", action="store_true", help="print the run's JSON summary on stdout")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help=f"where systems are built and mounted (default {DEFAULT_WORKDIR})")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="parent of the per-run output directory")
    p.add_argument("--size", help="file size per system, e.g. 512M (overrides the mode)")
    p.add_argument("--runtime", type=float, help="seconds per random job (overrides the mode)")
    p.add_argument("--reps", type=int, help="repetitions per job (overrides the mode)")
    p.add_argument("--retries", type=int, metavar="N",
                   help=f"repeat a measurement up to N times while other processes use more than "
                        f"{DISTURBED_PCT:.0f}%% of the CPUs (full: 2, quick: 0)")
    p.add_argument("--quiet-wait", type=float, metavar="S",
                   help="before each job wait up to S seconds for the host to be idle (full: 20, quick: 0)")
    p.add_argument("--settle", type=float, metavar="S",
                   help="seconds to wait after drop_caches before each job "
                        "(full: 5, quick: 2; docs/BENCHMARKS.md, Free page reporting)")
    p.add_argument("--prefault", metavar="KIND:MIB",
                   help="after the settle, fault in and free this much memory: none, anon:MIB or "
                        f"pagecache:MIB (default pagecache of the file size + {PREFAULT_MARGIN_MIB} MiB)")
    pub = p.add_mutually_exclusive_group()
    pub.add_argument("--publish", action="store_true", default=None,
                     help="also write bench/RESULTS.md, results.json and PNGs (default: unfiltered full runs)")
    pub.add_argument("--no-publish", dest="publish", action="store_false")
    p.add_argument("--no-plots", action="store_true", help="skip matplotlib")
    p.add_argument("--py-spy", type=Path, metavar="DIR",
                   help="sample each blockcrypt daemon with py-spy during every job; "
                        "collapsed stacks and a top-functions summary go to DIR")
    return p.parse_args(argv)


def pick(spec: str | None, table: dict, what: str) -> list[str]:
    if not spec:
        return [n for n, v in table.items() if getattr(v, "default", True)]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise BenchError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(table)}")
    if not names:
        raise BenchError(f"--{what}s is empty")
    return [n for n in table if n in names]  # canonical order


def parse_size_arg(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    if not num.isdigit() or int(num) <= 0:
        raise BenchError(f"bad --size {text!r}; use e.g. 512M or 2G")
    size = int(num) * units[unit]
    if size % (1 << 20) or size < (16 << 20):
        raise BenchError(f"bad --size {text!r}; a whole number of MiB, at least 16M")
    return size


def preflight(selected: list[systems_mod.System], workdir: Path
              ) -> tuple[list[systems_mod.System], dict[str, str]]:
    """Check the host and every system; returns the systems this build can run and
    {name: reason} for the others, each skipped with a one-line note (e.g. the native
    front end's variants before it lands)."""
    if os.geteuid() != 0:
        raise BenchError("run as root (sudo make bench): the runner drops caches and mounts FUSE file systems")
    need_tool("fio", "install it: apt-get install fio (or bash scripts/install-deps.sh)")
    if not os.path.exists("/dev/fuse") and any(s.role != "reference" for s in selected):
        raise BenchError("/dev/fuse is missing; load the fuse module (modprobe fuse)")
    kept, skipped = [], {}
    for s in selected:
        reason = s.unsupported()
        if reason:
            log(f"bench: skipping {s.name}: {reason}")
            skipped[s.name] = reason
        else:
            kept.append(s)
    if not kept:
        raise BenchError("none of the selected systems can run with this build")
    for s in kept:
        s.check()
    for s in kept:
        s.check_free()
    workdir.mkdir(parents=True, exist_ok=True)
    return kept, skipped


def _raise_interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    selected: list[systems_mod.System] = []
    t_start = time.monotonic()
    try:
        cfg = dict(MODES[args.mode])
        if args.size:
            cfg["size_bytes"] = parse_size_arg(args.size)
        if args.runtime is not None:
            if args.runtime <= 0:
                raise BenchError("--runtime must be greater than zero")
            cfg["runtime_s"] = args.runtime
        if args.quiet_wait is not None:
            cfg["quiet_wait_s"] = max(0.0, args.quiet_wait)
        if args.retries is not None:
            cfg["retries"] = max(0, args.retries)
        if args.reps is not None:
            if args.reps < 1:
                raise BenchError("--reps must be at least 1")
            cfg["reps"] = args.reps
        kind, mib = (jobs_mod.parse_prefault(args.prefault) if args.prefault is not None
                     else (cfg["prefault"], (cfg["size_bytes"] >> 20) + PREFAULT_MARGIN_MIB))
        cold = jobs_mod.ColdStart(settle_s=cfg["settle_s"] if args.settle is None else max(0.0, args.settle),
                                  prefault=kind, prefault_mib=mib)
        cfg["cold_start"] = cold
        sys_names = pick(args.systems, systems_mod.by_name(), "system")
        job_names = pick(args.jobs, jobs_mod.by_name(), "job")
        workdir = args.workdir.absolute()
        selected = [systems_mod.by_name()[n](workdir) for n in sys_names]
        jobs = [jobs_mod.by_name()[n] for n in job_names]
        selected, skipped = preflight(selected, workdir)
        filtered = bool(args.systems or args.jobs or args.size or args.runtime or args.reps
                        or args.py_spy or args.retries is not None or args.quiet_wait is not None
                        or args.settle is not None or args.prefault is not None)
        if args.py_spy and not (Path(sys.executable).parent / "py-spy").exists():
            raise BenchError("--py-spy needs py-spy in the venv: .venv/bin/pip install py-spy")
        publish = args.publish if args.publish is not None else (args.mode == "full" and not filtered)

        started = dt.datetime.now(dt.timezone.utc)
        log(f"bench: mode {args.mode}, {len(selected)} system(s) x {len(jobs)} job(s) x "
            f"{cfg['reps']} rep(s), file {cfg['size_bytes'] >> 20} MiB, work dir {workdir}; "
            f"before each job: {cold.label}")
        env = report.environment(workdir, REPO, cfg["openssl_s"])

        name_w = max(10, *(len(s.name) for s in selected))
        for s in selected:
            t0 = time.monotonic()
            s.setup(cfg["size_bytes"])
            mibs = jobs_mod.prefill(s.target, cfg["size_bytes"])
            log(f"  setup {s.name:<{name_w}} {time.monotonic() - t0:5.1f} s (prefill {mibs:,.0f} MiB/s, "
                f"daemon pid {s.daemon_pid or '-'})")
        setup_s = time.monotonic() - t_start

        runs = []
        for rep in range(1, cfg["reps"] + 1):
            for job in jobs:
                for s in selected:
                    spy = (args.py_spy.absolute() / f"{s.name}-{job.name}-r{rep}.txt"
                           if args.py_spy and s.role == "blockcrypt" else None)
                    r = measure(job, s, cfg, spy)
                    if spy is not None:
                        r["profile"] = str(spy)
                        log(profile.summary_text(spy, top_n=12))
                    r.update({"system": s.name, "job": job.name, "rep": rep})
                    runs.append(r)
                    cpu = f"{r['cpu_s_per_gib']:.2f} CPU s/GiB" if r["cpu_s_per_gib"] is not None else ""
                    noise = (f"  (other load {r['foreign_cpu_pct']:.0f}%)"
                             if (r.get("foreign_cpu_pct") or 0) >= 10 else "")
                    if r["attempts"] > 1:
                        noise += f"  (attempt {r['attempts']}; disturbed: " + ", ".join(
                            f"{v:,.0f}" for v in r["discarded_values"]) + ")"
                    log(f"  [{rep}/{cfg['reps']}] {job.name:<14} {s.name:<{name_w}} "
                        f"{r['value']:>10,.1f} {job.unit:<5} {cpu}{noise}")
        raw = {
            "schema": 1,
            "command": "bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "mode": args.mode,
            "started": started.strftime("%Y-%m-%d %H:%M"),
            "config": {**cfg, "ioengine": "psync", "direct": 1, "cold_start": cold.label},
            "environment": env,
            "systems": [s.info() for s in selected],
            "jobs": [{"name": j.name, "label": j.label, "family": j.family, "unit": j.unit,
                      "direction": j.direction, "fio": j.fio, "time_based": j.time_based,
                      "pattern": j.pattern, "ioengine": j.ioengine} for j in jobs],
            "runs": runs,
            "skipped": skipped,
        }
    except (BenchError, Interrupted, KeyboardInterrupt) as e:
        teardown(selected)
        if isinstance(e, BenchError):
            log(f"bench: error: {e}")
            return 1
        log("bench: interrupted; everything torn down")
        return 130
    except BaseException:
        teardown(selected)
        raise
    teardown(selected)

    raw["setup_s"] = setup_s
    raw["total_s"] = time.monotonic() - t_start
    raw["summary"] = report.summarize(raw)
    try:
        out_dir = write_outputs(raw, args, started, publish)
    except OSError as e:
        log(f"bench: error: cannot write results: {e}")
        return 1
    log(f"bench: done in {raw['total_s']:.0f} s; results in {out_dir}"
        + (f", published to {HERE / 'RESULTS.md'}" if publish else ""))
    if args.json:
        print(json.dumps({"summary": raw["summary"], "comparisons": report.comparisons(raw),
                          "targets": report.targets(raw), "paired": report.paired_ratios(raw),
                          "skipped": raw.get("skipped", {}),
                          "out_dir": str(out_dir)}, indent=2))
    else:
        print_summary(raw)
    return 0


def measure(job, s, cfg: dict, spy: Path | None) -> dict:
    """One repetition of `job` on `s`; repeated (up to cfg['retries'] times) while other
    processes took more than DISTURBED_PCT of the CPUs. Keeps the least disturbed attempt."""
    attempts = []
    for _ in range(1 + cfg.get("retries", 0)):
        r = jobs_mod.run_fio(job, s.target, cfg["size_bytes"], cfg["runtime_s"], cfg["ramp_s"],
                             s.daemon_pid, profile_path=spy, quiet_wait_s=cfg["quiet_wait_s"],
                             cold=cfg.get("cold_start", True), scratch_dir=s.dir.parent)
        attempts.append(r)
        if (r.get("foreign_cpu_pct") or 0.0) <= DISTURBED_PCT:
            break
    best = min(attempts, key=lambda a: a.get("foreign_cpu_pct") or 0.0)
    best["attempts"] = len(attempts)
    best["discarded_values"] = [a["value"] for a in attempts if a is not best]
    return best


def teardown(selected: list) -> None:
    # A second Ctrl-C must not cut the teardown short.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        for s in reversed(selected):
            try:
                s.teardown()
            except Exception as e:  # noqa: BLE001 - keep tearing the others down
                log(f"bench: teardown of {s.name} failed: {e}")
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)


def write_outputs(raw: dict, args, started: dt.datetime, publish: bool) -> Path:
    out_dir = args.out.absolute() / started.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    if not args.no_plots:
        try:
            plots = report.draw_plots_anywhere(raw, out_dir)
        except ImportError:
            raw["plot_error"] = ("matplotlib is not installed (apt-get install python3-matplotlib, "
                                 "or .venv/bin/pip install '.[bench]')")
            log(f"bench: warning: {raw['plot_error']}; no plots")
    (out_dir / "raw.json").write_text(json.dumps(raw, indent=1) + "\n")
    (out_dir / "RESULTS.md").write_text(report.render_markdown(raw, [p.name for p in plots], "raw.json"))
    if publish:
        for old in HERE.glob("*.png"):
            if old.name != "xts_speed.png":
                old.unlink()
        for p in plots:
            shutil.copy2(p, HERE / p.name)
        (HERE / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
        (HERE / "RESULTS.md").write_text(
            report.render_markdown(raw, [p.name for p in plots], "bench/results.json"))
    return out_dir


def print_summary(raw: dict) -> None:
    label = {s["name"]: s["label"] for s in raw["systems"]}
    names = [s["name"] for s in raw["systems"]]
    w = max(14, *(len(n) for n in names))
    print(f"{'job':<16}{'unit':<6}" + "".join(f"{n:>{w}}" for n in names))
    for j in raw["jobs"]:
        cells = [raw["summary"].get(n, {}).get(j["name"], {}).get("median") for n in names]
        print(f"{j['name']:<16}{j['unit']:<6}" + "".join(
            f"{(f'{c:,.1f}' if c is not None else '-'):>{w}}" for c in cells))
    for row in report.comparisons(raw):
        if not any(r is not None for r in row["ratios"].values()):
            continue
        ratios = ", ".join(f"vs {o} {r:.2f}" for o, r in row["ratios"].items() if r is not None)
        flag = "  MISSED: " + "; ".join(row["missed"]) if row["missed"] else ""
        print(f"{label[row['system']]} {row['job']}: {ratios}{flag}")
    for row in report.targets(raw):
        if row["key"] == "scaling_2j":
            value = "–" if row["value"] is None else f"{row['value']:.2f}"
        else:
            value = ", ".join(f"{j} {c['value']:.2f}" for j, c in row["cells"].items()) or "no data"
        print(f"target single {row['label']} ({row['goal']}): {value}: {report._verdict(row)}")
    for sysname, per_job in report.paired_ratios(raw).items():
        cells = ", ".join(f"{j} {c['median']:.2f}" for j, c in per_job.items())
        print(f"paired {label.get(sysname, sysname)} / single (median of per-repetition ratios): {cells}")


if __name__ == "__main__":
    sys.exit(main())
