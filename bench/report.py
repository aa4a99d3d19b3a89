"""Turn a run (raw.json) into medians, ratios, RESULTS.md and PNG plots; collect the environment.

Targets checked (docs/BENCHMARKS.md, /work/shared/DESIGN.md): on every job the
single-layer disk at >= 0.9x the same path with the null cipher, >= 0.85x the bare
C libfuse 3 floor, >= 1.5x gocryptfs and qemu-storage-daemon on random jobs and
>= 1.2x on sequential ones, no more daemon CPU per GiB than gocryptfs; and rand
read 4 KiB with 2 jobs >= 1.6x the same with 1 job. `targets()` is that table for
the `single` system; `comparisons()` gives the ratios of every encrypted
blockcrypt system against its own null cipher, its floor and each peer.

Caveats: the targets' ratios are of medians, not medians of ratios (paired_ratios()
gives those: each repetition against the base's same one); with one repetition
(quick mode) a ratio can move by the run-to-run noise of either side. Plots need
matplotlib; without it RESULTS.md is still written and says so.
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

from .util import first_line, mount_points

TARGET_VS_NULL = 0.9
TARGET_VS_FLOOR = 0.85
TARGET_VS_PEER_RANDOM = 1.5
TARGET_VS_PEER_SEQUENTIAL = 1.2
TARGET_SCALING_2J = 1.6       # rand read 4 KiB, 2 jobs / 1 job
TARGET_CPU_VS_GOCRYPTFS = 1.0  # daemon CPU s/GiB, single / gocryptfs: at most
PLOT_DPI = 80


# ---------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 0.0


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


def openssl_speed(seconds: int) -> dict:
    """`openssl speed -evp aes-256-xts -bytes 4096` on one core, in MB/s (10^6) and MiB/s."""
    cmd = ["openssl", "speed", "-evp", "aes-256-xts", "-bytes", "4096", "-seconds", str(seconds)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=seconds * 4 + 30)
        out = proc.stdout.decode(errors="replace")
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    m = re.search(r"^AES-256-XTS\s+([\d.]+)k\s*$", out, re.MULTILINE | re.IGNORECASE)
    if not m:
        return {"command": " ".join(cmd), "mb_per_s": None, "mib_per_s": None}
    bytes_per_s = float(m.group(1)) * 1000
    return {"command": " ".join(cmd), "mb_per_s": bytes_per_s / 1e6, "mib_per_s": bytes_per_s / (1 << 20)}


def _pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001 - informational
        return "not installed"


def _git(repo: Path) -> dict:
    def g(*args):
        try:
            p = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=10)
            return p.stdout.decode().strip() if p.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": g("rev-parse", "--short=10", "HEAD") or "unknown",
            "dirty": bool(g("status", "--porcelain", "--untracked-files=no"))}


def _fs_of(path: Path) -> str:
    mps = mount_points()
    p = Path(path).absolute()
    for cand in [p, *p.parents]:
        if str(cand) in mps:
            return f"{mps[str(cand)]} ({cand})"
    return "unknown"


def environment(workdir: Path, repo: Path, openssl_seconds: int) -> dict:
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(_mem_gib(), 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": sys.version.split()[0],
        "fio": first_line(["fio", "--version"]),
        "gocryptfs": first_line(["gocryptfs", "-version"]),
        "qemu_storage_daemon": first_line(["qemu-storage-daemon", "--version"]),
        "openssl": first_line(["openssl", "version"]),
        "openssl_speed_aes_256_xts_4096": openssl_speed(openssl_seconds),
        "fusepy": _pkg_version("fusepy"),
        "libfuse2": first_line(["dpkg-query", "-W", "-f", "${Version}", "libfuse2"]),
        "libfuse3": first_line(["dpkg-query", "-W", "-f", "${Version}", "libfuse3-3"]),
        "backing_fs": _fs_of(workdir),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": _git(repo),
    }


# ------------------------------------------------------------------- numbers
def summarize(raw: dict) -> dict:
    """{system: {job: {median, min, max, n, cpu_s_per_gib}}} from raw['runs']."""
    out: dict = {}
    for r in raw["runs"]:
        cell = out.setdefault(r["system"], {}).setdefault(r["job"], {"values": [], "cpu": []})
        cell["values"].append(r["value"])
        if r.get("cpu_s_per_gib") is not None:
            cell["cpu"].append(r["cpu_s_per_gib"])
    for jobs in out.values():
        for name, cell in list(jobs.items()):
            v, c = cell["values"], cell["cpu"]
            jobs[name] = {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v),
                          "cpu_s_per_gib": statistics.median(c) if c else None}
    return out


def paired_ratios(raw: dict, base: str = "single") -> dict:
    """{system: {job: {"median": m, "per_rep": [...]}}}: for every system but base, the
    ratio of its value to base's in the same repetition of the same job (the two ran
    back to back), and the median of those. On a host whose speed drifts within minutes
    (this VM's random jobs move 2-6x between repetitions of one system), a median of
    paired ratios follows the systems' difference more closely than the ratio of two
    medians, which the targets still use."""
    by: dict = {}
    for r in raw["runs"]:
        by.setdefault((r["system"], r["job"]), {})[r.get("rep", 1)] = r["value"]
    out: dict = {}
    for (sysname, job), reps in by.items():
        if sysname == base or (base, job) not in by:
            continue
        ref = by[(base, job)]
        per = [reps[k] / ref[k] for k in sorted(reps) if k in ref and ref[k]]
        if per:
            out.setdefault(sysname, {})[job] = {"median": statistics.median(per), "per_rep": per}
    return out


def _ratio(summary: dict, a: str, b: str, job: str) -> float | None:
    try:
        num, den = summary[a][job]["median"], summary[b][job]["median"]
    except KeyError:
        return None
    return num / den if den else None


def _pattern(job: dict) -> str:
    """'sequential' or 'random' (raw.json before the field: by the job's name)."""
    return job.get("pattern") or ("sequential" if job["name"].startswith("seq") else "random")


def peer_target(job: dict) -> float:
    return TARGET_VS_PEER_SEQUENTIAL if _pattern(job) == "sequential" else TARGET_VS_PEER_RANDOM


def _baseline_and_floor(sysinfo: dict, names: set) -> tuple[str | None, str | None]:
    """The null-cipher system and the floor this system is compared with, if in the run.
    Runs recorded before systems named them: `null`, no floor."""
    if "baseline" in sysinfo or "floor" in sysinfo:
        base, floor = sysinfo.get("baseline"), sysinfo.get("floor")
    else:
        base, floor = "null", None
    return (base if base in names else None), (floor if floor in names else None)


def comparisons(raw: dict) -> list[dict]:
    """One row per (encrypted blockcrypt system, job): ratios to its null cipher, its floor
    and every peer, the target of each, and the misses."""
    summary = raw["summary"]
    systems = raw["systems"]
    names = {s["name"] for s in systems}
    peers = [s["name"] for s in systems if s["role"] == "peer"]
    rows = []
    for sysinfo in systems:
        if sysinfo["role"] != "blockcrypt" or not sysinfo["encrypted"]:
            continue
        sysname = sysinfo["name"]
        base, floor = _baseline_and_floor(sysinfo, names)
        for job in raw["jobs"]:
            row = {"system": sysname, "job": job["name"], "ratios": {}, "targets": {}, "missed": [],
                   "baseline": base, "floor": floor}
            others = ([(base, TARGET_VS_NULL)] if base else []) + ([(floor, TARGET_VS_FLOOR)] if floor else []) \
                + [(peer, peer_target(job)) for peer in peers]
            for other, target in others:
                r = _ratio(summary, sysname, other, job["name"])
                row["ratios"][other] = r
                row["targets"][other] = target
                if r is not None and r < target:
                    row["missed"].append(f"{other} ({r:.2f} < {target})")
            rows.append(row)
    return rows


def _system(raw: dict, name: str) -> dict | None:
    return next((s for s in raw["systems"] if s["name"] == name), None)


def targets(raw: dict, system: str = "single") -> list[dict]:
    """The design's target table for one system (default the single-layer disk): one row
    per target, a cell per job where it applies, and whether the row is met (None: no data)."""
    summary = raw["summary"]
    me = _system(raw, system)
    if me is None or system not in summary:
        return []
    names = {s["name"] for s in raw["systems"]}
    label = {s["name"]: s["label"] for s in raw["systems"]}
    base, floor = _baseline_and_floor(me, names)
    rows = []

    def ratio_row(key: str, other: str | None, what: str, goal_of, goal_text: str, get=_ratio, at_most=False):
        cells = {}
        if other is not None:
            for job in raw["jobs"]:
                v = get(summary, system, other, job["name"])
                if v is None:
                    continue
                goal = goal_of(job)
                cells[job["name"]] = {"value": v, "goal": goal, "met": v <= goal if at_most else v >= goal}
        rows.append({"key": key, "label": what, "versus": other, "goal": goal_text, "cells": cells,
                     "met": all(c["met"] for c in cells.values()) if cells else None})

    ratio_row("vs_null", base, f"vs {label.get(base, 'null cipher (same path)')}",
              lambda j: TARGET_VS_NULL, f"≥ {TARGET_VS_NULL}×")
    ratio_row("vs_floor", floor, f"vs {label.get(floor, 'C libfuse 3 floor')}",
              lambda j: TARGET_VS_FLOOR, f"≥ {TARGET_VS_FLOOR}×")
    for peer in ("gocryptfs", "qsd"):
        ratio_row(f"vs_{peer}", peer if peer in names else None, f"vs {label.get(peer, peer)}", peer_target,
                  f"≥ {TARGET_VS_PEER_RANDOM}× random, ≥ {TARGET_VS_PEER_SEQUENTIAL}× sequential")

    def cpu_ratio(summ, a, b, job):
        try:
            num, den = summ[a][job]["cpu_s_per_gib"], summ[b][job]["cpu_s_per_gib"]
        except KeyError:
            return None
        return num / den if num is not None and den else None

    ratio_row("cpu_vs_gocryptfs", "gocryptfs" if "gocryptfs" in names else None,
              "daemon CPU s/GiB / gocryptfs's", lambda j: TARGET_CPU_VS_GOCRYPTFS,
              f"≤ {TARGET_CPU_VS_GOCRYPTFS}×", get=cpu_ratio, at_most=True)

    try:
        scaling = summary[system]["rand_read_2j"]["median"] / summary[system]["rand_read"]["median"]
    except (KeyError, ZeroDivisionError):
        scaling = None
    rows.append({"key": "scaling_2j", "label": "rand read 4 KiB: 2 jobs / 1 job", "versus": None,
                 "goal": f"≥ {TARGET_SCALING_2J}", "value": scaling,
                 "cells": {}, "met": None if scaling is None else scaling >= TARGET_SCALING_2J})
    return rows


def _verdict(row: dict) -> str:
    if row["met"] is None:
        return "–"
    if row["met"]:
        return "met"
    cells = row["cells"]
    if cells:
        return f"missed ({sum(1 for c in cells.values() if not c['met'])} of {len(cells)})"
    return "missed"


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "–"
    if unit == "IOPS" or v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fmt_ratio(r: float | None, target: float) -> str:
    if r is None:
        return "–"
    return f"**{r:.2f}**" if r < target else f"{r:.2f}"


# ---------------------------------------------------------------- RESULTS.md
def render_markdown(raw: dict, plots: list[str], raw_json_name: str) -> str:
    env, cfg, summary = raw["environment"], raw["config"], raw["summary"]
    systems = raw["systems"]
    label = {s["name"]: s["label"] for s in systems}
    jobs = raw["jobs"]
    L = []
    git = env.get("git", {})
    L.append("# blockcrypt benchmark results\n")
    L.append(f"Made by `{raw['command']}` on {raw['started']} (UTC), commit "
             f"`{git.get('commit', '?')}`{' (with uncommitted changes)' if git.get('dirty') else ''}; "
             f"{cfg['reps']} repetition(s) per job, medians shown; "
             f"file size {cfg['size_bytes'] >> 20} MiB, random jobs {cfg['runtime_s']:g} s each. "
             f"Method and how to read this: [docs/BENCHMARKS.md](../docs/BENCHMARKS.md). "
             f"Raw data: `{raw_json_name}`.\n")

    jl = {j["name"]: j["label"] for j in jobs}
    trows = targets(raw)
    if trows:
        me = _system(raw, "single")
        fe = me.get("frontend")
        L.append("## Targets\n")
        L.append(f"**{me['label']}**" + (f" ({fe} front end)" if fe else "")
                 + (", not the native front end: it had not landed in this build" if fe == "fusepy" else "")
                 + f" against the design's targets; a cell is the ratio of medians, **bold** = missed, "
                   f"– = a system of the row was not in the run.\n")
        tjobs = [j for j in jobs if any(j["name"] in r["cells"] for r in trows)]
        L.append("| target | goal | " + " | ".join(j["label"] for j in tjobs) + " | |")
        L.append("|---|---|" + "---:|" * len(tjobs) + "---|")
        for r in trows:
            if r["key"] == "scaling_2j":
                continue
            cells = []
            for j in tjobs:
                c = r["cells"].get(j["name"])
                cells.append("–" if c is None else (f"{c['value']:.2f}" if c["met"] else f"**{c['value']:.2f}**"))
            L.append(f"| {r['label']} | {r['goal']} | " + " | ".join(cells) + f" | {_verdict(r)} |")
        L.append("")
        sc = next(r for r in trows if r["key"] == "scaling_2j")
        L.append("| target | goal | value | |")
        L.append("|---|---|---:|---|")
        v = "–" if sc["value"] is None else (f"{sc['value']:.2f}" if sc["met"] else f"**{sc['value']:.2f}**")
        L.append(f"| {sc['label']} | {sc['goal']} | {v} | {_verdict(sc)} |")
        L.append("")
        met = sum(1 for r in trows if r["met"])
        known = sum(1 for r in trows if r["met"] is not None)
        L.append(f"Targets met: {met} of {known} measured ({len(trows) - known} without data).\n")

    rows = comparisons(raw)
    if rows:
        L.append("## Ratios\n")
        L.append(f"Each encrypted blockcrypt system against the same path with the null cipher "
                 f"(target ≥ {TARGET_VS_NULL}×), its floor (≥ {TARGET_VS_FLOOR}×) and each peer "
                 f"(≥ {TARGET_VS_PEER_RANDOM}× random, ≥ {TARGET_VS_PEER_SEQUENTIAL}× sequential); "
                 f"**bold** = target missed.\n")
        peers = [s["name"] for s in systems if s["role"] == "peer"]
        cols = ([("baseline", "vs its null cipher")] if any(r["baseline"] for r in rows) else []) \
            + ([("floor", "vs its floor")] if any(r["floor"] for r in rows) else []) \
            + [(p, f"vs {label[p]}") for p in peers]
        L.append("| system | job | " + " | ".join(c[1] for c in cols) + " |")
        L.append("|---|---|" + "---:|" * len(cols))
        for row in rows:
            cells = []
            for key, _ in cols:
                other = row.get(key) if key in ("baseline", "floor") else key
                if other is None:
                    cells.append("–")
                    continue
                cells.append(_fmt_ratio(row["ratios"].get(other), row["targets"].get(other, 0)))
            L.append(f"| {label[row['system']]} | {jl[row['job']]} | " + " | ".join(cells) + " |")
        missed = [r for r in rows if r["missed"]]
        L.append("")
        if missed:
            L.append("Missed: " + "; ".join(f"{label[r['system']]}, {jl[r['job']]} vs " + ", ".join(r["missed"])
                                           for r in missed) + ".\n")
        else:
            L.append("All targets met on every job.\n")
        if any(r["floor"] for r in rows) or any(r["baseline"] for r in rows):
            pairs = sorted({(r["system"], r["baseline"], r["floor"]) for r in rows}, key=lambda t: t[0])
            L.append("Pairs: " + "; ".join(
                f"{label[a]} — null cipher: {label.get(b, '–') if b else '–'}, floor: "
                f"{label.get(f, '–') if f else '–'}" for a, b, f in pairs) + ".\n")

    if raw.get("skipped"):
        L.append("Skipped (this build cannot run them): " + "; ".join(
            f"`{n}` ({why})" for n, why in raw["skipped"].items()) + ".\n")

    names = [s["name"] for s in systems]
    L.append("## Results (median)\n")
    L.append("| job | unit | " + " | ".join(label[n] for n in names) + " |")
    L.append("|---|---|" + "---:|" * len(names))
    for j in jobs:
        cells = [_fmt(summary.get(n, {}).get(j["name"], {}).get("median"), j["unit"]) for n in names]
        L.append(f"| {j['label']} | {j['unit']} | " + " | ".join(cells) + " |")
    L.append("")
    if cfg["reps"] > 1:
        spread = []
        for n in names:
            for j in jobs:
                c = summary.get(n, {}).get(j["name"])
                if c and c["median"]:
                    spread.append(((c["max"] - c["min"]) / c["median"], n, j["label"]))
        if spread:
            worst = max(spread)
            L.append(f"Largest spread between repetitions: {worst[0] * 100:.0f} % "
                     f"({label[worst[1]]}, {worst[2]}); all repetitions are in the raw JSON.\n")

    foreign = [r["foreign_cpu_pct"] for r in raw["runs"] if r.get("foreign_cpu_pct") is not None]
    if foreign:
        retried = sum(1 for r in raw["runs"] if r.get("attempts", 1) > 1)
        L.append(f"Background load (CPU used by other processes during the kept measurements, share "
                 f"of all {env.get('cpus', '?')} CPUs): median {statistics.median(foreign):.0f} %, "
                 f"worst {max(foreign):.0f} %; {retried} of {len(raw['runs'])} measurements were "
                 f"repeated because other work disturbed them (up to {cfg.get('retries', 0)} retries, "
                 f"the least disturbed attempt kept).\n")

    daemons = [s["name"] for s in systems
               if any(r["system"] == s["name"] and r.get("cpu_s_per_gib") is not None for r in raw["runs"])]
    if daemons:
        L.append("## Daemon CPU seconds per GiB moved (median; lower is better)\n")
        L.append("| job | " + " | ".join(label[n] for n in daemons) + " |")
        L.append("|---|" + "---:|" * len(daemons))
        for j in jobs:
            cells = [_fmt(summary.get(n, {}).get(j["name"], {}).get("cpu_s_per_gib")) for n in daemons]
            L.append(f"| {j['label']} | " + " | ".join(cells) + " |")
        L.append("")

    if plots:
        L.append("## Plots\n")
        for p in plots:
            L.append(f"![{Path(p).stem}]({Path(p).name})\n")
    elif raw.get("plot_error"):
        L.append(f"Plots not drawn: {raw['plot_error']}.\n")

    L.append("## Systems\n")
    for s in systems:
        ver = f" — {s['version']}" if s.get("version") else ""
        L.append(f"- **{s['label']}** (`{s['name']}`): {s['summary']}{ver}")
    L.append("")

    ossl = env.get("openssl_speed_aes_256_xts_4096", {})
    L.append("## Environment\n")
    L.append(f"- CPU: {env['cpu']}, {env['cpus']} cores; memory {env['memory_gib']} GiB")
    L.append(f"- OS: {env['os']}, kernel {env['kernel']}; backing file system: {env['backing_fs']}; "
             f"load average at start {', '.join(str(x) for x in env.get('loadavg_at_start', []))}")
    L.append(f"- fio: {env['fio']}; gocryptfs: {env['gocryptfs']}")
    L.append(f"- qemu-storage-daemon: {env['qemu_storage_daemon']}")
    L.append(f"- Python {env['python']}; fusepy {env['fusepy']}; libfuse2 {env['libfuse2']}; "
             f"libfuse3 {env.get('libfuse3', 'unknown')}")
    if ossl.get("mb_per_s"):
        L.append(f"- {env['openssl']}: `{ossl['command']}` = {ossl['mb_per_s']:,.0f} MB/s "
                 f"({ossl['mib_per_s']:,.0f} MiB/s) on one core")
    else:
        L.append(f"- {env['openssl']}: speed figure unavailable")
    L.append(f"- fio settings: ioengine={cfg['ioengine']} (libaio for the QD4 job), direct={cfg['direct']}; "
             f"before every job: {cfg.get('cold_start', 'drop_caches')}; setup (mounts + prefill) took {raw.get('setup_s', 0):.0f} s, "
             f"the whole run {raw.get('total_s', 0):.0f} s")
    L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------- plots
SYSTEM_PYTHON = "/usr/bin/python3"


def draw_plots_anywhere(raw: dict, out_dir: Path) -> list[Path]:
    """draw_plots here, or with the system python (Debian's python3-matplotlib) if this
    interpreter has no matplotlib; ImportError when neither has it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        return draw_plots(raw, out_dir)
    if not os.path.exists(SYSTEM_PYTHON) or os.path.realpath(SYSTEM_PYTHON) == os.path.realpath(sys.executable):
        raise ImportError("matplotlib")
    import json
    import tempfile
    repo = str(Path(__file__).resolve().parents[1])
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from bench.report import draw_plots; "
            "print(json.dumps([str(p) for p in draw_plots(json.load(open(sys.argv[2])), Path(sys.argv[3]))]))")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(raw, f)
        f.flush()
        proc = subprocess.run([SYSTEM_PYTHON, "-c", code, repo, f.name, str(out_dir)],
                              capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise ImportError("matplotlib")
    return [Path(p) for p in json.loads(proc.stdout.strip().splitlines()[-1])]


def _short(v: float) -> str:
    if v >= 10000:
        return f"{v / 1000:.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"


def draw_plots(raw: dict, out_dir: Path) -> list[Path]:
    """One grouped bar chart per metric family, plus the ratio chart; returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = raw["systems"]
    summary = raw["summary"]
    colors = plt.get_cmap("tab10").colors
    color = {s["name"]: colors[i % len(colors)] for i, s in enumerate(systems)}
    paths = []

    def grouped(fname, title, ylabel, jobs, names, getter, hlines=(), fmt=None, log_scale=False):
        if not jobs or not names:
            return
        fig, ax = plt.subplots(figsize=(max(7.0, 1.5 * len(jobs) + 3.5), 3.8))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(jobs))]
            vals = [getter(n, j) for j in jobs]
            bars = ax.bar(xs, [v or 0 for v in vals], width, label=next(s["label"] for s in systems
                                                                         if s["name"] == n),
                          color=color[n])
            for b, v in zip(bars, vals):
                if v is not None:
                    ax.annotate(fmt.format(v) if fmt else _short(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=7, rotation=90,
                                xytext=(0, 2), textcoords="offset points")
        for y, text in hlines:
            ax.axhline(y, color="grey", lw=0.8, ls="--")
        if log_scale:
            ax.set_yscale("log")
        ax.set_xticks(range(len(jobs)))
        ax.set_xticklabels([j["label"] for j in jobs], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.18)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=PLOT_DPI)
        plt.close(fig)
        paths.append(path)

    def med(n, j):
        return summary.get(n, {}).get(j["name"], {}).get("median")

    def cpu(n, j):
        return summary.get(n, {}).get(j["name"], {}).get("cpu_s_per_gib")

    all_names = [s["name"] for s in systems]
    tp = [j for j in raw["jobs"] if j["family"] == "throughput"]
    io = [j for j in raw["jobs"] if j["family"] == "iops"]
    grouped("throughput.png", "Sequential throughput, MiB/s (higher is better)", "MiB/s", tp, all_names, med)
    grouped("iops.png", "Random I/O, IOPS (higher is better)", "IOPS", io, all_names, med)
    daemons = [s["name"] for s in systems
               if any(r["system"] == s["name"] and r.get("cpu_s_per_gib") is not None for r in raw["runs"])]
    grouped("cpu.png", "Daemon CPU seconds per GiB moved (lower is better)", "CPU s / GiB",
            raw["jobs"], daemons, cpu, fmt="{:.2g}", log_scale=True)

    rows = comparisons(raw)
    if rows:
        others = sorted({o for r in rows for o in r["ratios"]}, key=all_names.index)
        mine = list(dict.fromkeys(r["system"] for r in rows))
        for m in mine:
            lookup = {(r["job"], o): r["ratios"][o] for r in rows if r["system"] == m for o in r["ratios"]}
            label = next(s["label"] for s in systems if s["name"] == m)
            grouped(f"ratios-{m}.png", f"{label}: ratio to each system (higher is better); "
                    f"dashed: targets {TARGET_VS_NULL}x null, {TARGET_VS_FLOOR}x floor, "
                    f"{TARGET_VS_PEER_SEQUENTIAL}x/{TARGET_VS_PEER_RANDOM}x peers",
                    "ratio", raw["jobs"], others, lambda o, j: lookup.get((j["name"], o)),
                    hlines=[(TARGET_VS_NULL, "vs null"), (TARGET_VS_FLOOR, "vs floor"),
                            (TARGET_VS_PEER_SEQUENTIAL, "vs peers, sequential"),
                            (TARGET_VS_PEER_RANDOM, "vs peers, random")],
                    fmt="{:.2f}")
    return paths
