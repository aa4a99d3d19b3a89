"""The runner's pure parts: fio job lines, fio JSON parsing, medians, ratios, targets, Markdown."""
import json
import subprocess
import shutil

import pytest

from bench import jobs, report, run


def _raw(values: dict, reps: int = 1) -> dict:
    """A run with given {system: {job: [values]}}; roles as in bench.systems."""
    roles = {"raw": ("reference", False), "c-floor": ("reference", False), "null": ("blockcrypt", False),
             "single": ("blockcrypt", True), "gocryptfs": ("peer", True), "qsd": ("peer", True)}
    job_list = [j for j in jobs.JOBS if any(j.name in v for v in values.values())]
    raw = {
        "command": "bench/run.py --mode quick", "mode": "quick", "started": "2026-01-01 00:00",
        "config": {"size_bytes": 256 << 20, "runtime_s": 2.0, "ramp_s": 0.0, "reps": reps,
                   "ioengine": "psync", "direct": 1},
        "environment": {"cpu": "x", "cpus": 2, "memory_gib": 1, "kernel": "k", "os": "o", "python": "3",
                        "fio": "fio-3", "gocryptfs": "g", "qemu_storage_daemon": "q", "openssl": "ossl",
                        "openssl_speed_aes_256_xts_4096": {"command": "c", "mb_per_s": 7000.0,
                                                           "mib_per_s": 6675.0},
                        "fusepy": "3", "libfuse2": "2", "backing_fs": "ext4", "git": {"commit": "abc"}},
        "systems": [{"name": n, "label": n.upper(), "role": roles[n][0], "encrypted": roles[n][1],
                     "summary": "s", "version": ""} for n in values],
        "jobs": [{"name": j.name, "label": j.label, "family": j.family, "unit": j.unit} for j in job_list],
        "runs": [{"system": s, "job": j, "rep": i + 1, "value": v, "cpu_s_per_gib": 1.5}
                 for s, per in values.items() for j, vs in per.items() for i, v in enumerate(vs)],
    }
    raw["summary"] = report.summarize(raw)
    return raw


def test_medians_and_spread():
    raw = _raw({"raw": {"seq_write": [100, 300, 200]}}, reps=3)
    cell = raw["summary"]["raw"]["seq_write"]
    assert (cell["median"], cell["min"], cell["max"], cell["n"]) == (200, 100, 300, 3)


def test_paired_ratios_pair_each_repetition_with_the_base_one():
    # rep 2 ran on a slow host for both systems: the paired ratios stay at 0.8, while the
    # ratio of medians (200 / 400 = 0.5) follows the slow repetition of one side only
    raw = _raw({"single": {"rand_read": [1000, 100, 400]}, "null": {"rand_read": [800, 80, 200]}}, reps=3)
    p = report.paired_ratios(raw)
    assert set(p) == {"null"}
    assert p["null"]["rand_read"]["per_rep"] == pytest.approx([0.8, 0.8, 0.5])
    assert p["null"]["rand_read"]["median"] == pytest.approx(0.8)
    assert report._ratio(raw["summary"], "null", "single", "rand_read") == pytest.approx(0.5)
    # a job the base did not run has no pair
    raw = _raw({"single": {"seq_write": [10]}, "null": {"rand_read": [5]}})
    assert report.paired_ratios(raw) == {}


def test_targets_flag_each_miss_and_only_misses():
    raw = _raw({"null": {"rand_read": [1000], "seq_read": [500]},
                "single": {"rand_read": [950], "seq_read": [400]},
                "gocryptfs": {"rand_read": [900], "seq_read": [450]},
                "qsd": {"rand_read": [1000], "seq_read": [300]}})
    rows = {r["job"]: r for r in report.comparisons(raw)}
    assert rows["rand_read"]["ratios"] == pytest.approx({"null": 0.95, "gocryptfs": 950 / 900, "qsd": 0.95})
    # peers: 1.5x on random jobs, 1.2x on sequential ones
    assert rows["rand_read"]["missed"] == ["gocryptfs (1.06 < 1.5)", "qsd (0.95 < 1.5)"]
    assert rows["seq_read"]["missed"] == ["null (0.80 < 0.9)", "gocryptfs (0.89 < 1.2)"]
    md = report.render_markdown(raw, ["iops.png"], "raw.json")
    assert "| SINGLE | rand read 4 KiB | 0.95 | **1.06** | **0.95** |" in md
    assert "| SINGLE | seq read 1 MiB (cold) | **0.80** | **0.89** | 1.33 |" in md
    assert "![iops](iops.png)" in md
    assert "7,000 MB/s" in md


def test_markdown_without_peers_or_blockcrypt_has_no_target_table():
    md = report.render_markdown(_raw({"raw": {"seq_write": [1.0]}, "gocryptfs": {"seq_write": [2.0]}}),
                                [], "raw.json")
    assert "## Targets" not in md
    assert "| seq write 1 MiB | MiB/s | 1.00 | 2.00 |" in md


def test_plots_are_small_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    raw = _raw({"raw": {"seq_write": [900], "rand_read": [9000]},
                "null": {"seq_write": [500], "rand_read": [8000]},
                "single": {"seq_write": [480], "rand_read": [7900]},
                "qsd": {"seq_write": [300], "rand_read": [7000]}})
    paths = report.draw_plots(raw, tmp_path)
    assert {p.name for p in paths} == {"throughput.png", "iops.png", "cpu.png", "ratios-single.png"}
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 120_000


def test_unaligned_job_line_keeps_every_request_off_4k():
    job = jobs.by_name()["unaligned_512"]
    cmd = jobs.fio_command(job, "/x/disk", 64 << 20, 2.0, 0.0, "/x/out.json")
    assert "--offset=512" in cmd and "--blockalign=4k" in cmd and "--bs=512" in cmd
    assert f"--size={(64 << 20) - 4096}" in cmd and "--direct=1" in cmd


@pytest.mark.skipif(not shutil.which("fio"), reason="needs fio")
def test_parse_real_fio_json(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"\1" * (4 << 20))
    job = jobs.Job("mixed", "mixed", "iops", "both", {"rw": "randrw", "rwmixread": "70", "bs": "16k"})
    out = tmp_path / "out.json"
    cmd = jobs.fio_command(job, target, 4 << 20, 0.3, 0, out)
    cmd = [c for c in cmd if c != "--direct=1"] + ["--direct=0"]  # tmp_path may be tmpfs
    subprocess.run(cmd, check=True, capture_output=True)
    r = jobs.parse_fio(out.read_text(), job)
    assert r["value"] == pytest.approx(r["read"]["iops"] + r["write"]["iops"])
    assert r["read"]["io_bytes"] > 0 and r["write"]["io_bytes"] > 0
    assert r["io_bytes"] == r["read"]["io_bytes"] + r["write"]["io_bytes"]


def test_parse_fio_garbage_is_a_bench_error():
    with pytest.raises(run.BenchError, match="no JSON"):
        jobs.parse_fio("fio: something broke", jobs.JOBS[0])
    with pytest.raises(run.BenchError, match="unreadable JSON"):
        jobs.parse_fio("{\"jobs\": []}", jobs.JOBS[0])
    with pytest.raises(run.BenchError, match="error 5"):
        jobs.parse_fio(json.dumps({"jobs": [{"error": 5}]}), jobs.JOBS[0])


def test_filters_and_sizes():
    from bench import systems
    assert run.pick("qsd,raw", systems.by_name(), "system") == ["raw", "qsd"]
    assert run.pick(None, systems.by_name(), "system") == [
        "raw", "c-floor", "null", "single", "single-direct", "fusepy-single", "gocryptfs", "qsd"]
    with pytest.raises(run.BenchError, match="unknown system nope; choose from raw, c-floor, c-floor-direct, "
                                             "fusepy, null, single, null-direct"):
        run.pick("raw,nope", systems.by_name(), "system")
    assert run.parse_size_arg("512M") == 512 << 20
    assert run.parse_size_arg("2GiB") == 2 << 30
    for bad in ("0", "12x", "1000K", "8M"):
        with pytest.raises(run.BenchError, match="bad --size"):
            run.parse_size_arg(bad)


def _with_pairs(raw: dict) -> dict:
    """Systems as bench.systems records them now: single names its null cipher and floor."""
    for s in raw["systems"]:
        if s["name"] == "single":
            s.update({"baseline": "null", "floor": "c-floor", "frontend": "native"})
    return raw


def test_target_table_marks_each_row_met_or_missed():
    raw = _with_pairs(_raw({
        "c-floor": {"seq_write": [1000], "rand_read": [10000], "rand_read_2j": [18000]},
        "null": {"seq_write": [900], "rand_read": [9500], "rand_read_2j": [17000]},
        "single": {"seq_write": [880], "rand_read": [9000], "rand_read_2j": [15000]},
        "gocryptfs": {"seq_write": [700], "rand_read": [5000], "rand_read_2j": [9000]},
        "qsd": {"seq_write": [800], "rand_read": [7000], "rand_read_2j": [8000]},
    }))
    for r in raw["runs"]:  # single uses less CPU than gocryptfs except on rand_read_2j
        r["cpu_s_per_gib"] = {("single", "rand_read_2j"): 12.0, ("gocryptfs", "rand_read_2j"): 10.0}.get(
            (r["system"], r["job"]), 1.0 if r["system"] == "single" else 2.0)
    raw["summary"] = report.summarize(raw)
    rows = {r["key"]: r for r in report.targets(raw)}
    assert rows["vs_null"]["cells"]["rand_read"]["met"] is True        # 0.95
    assert rows["vs_null"]["cells"]["rand_read_2j"]["met"] is False    # 0.88 < 0.9
    assert rows["vs_null"]["met"] is False
    assert rows["vs_floor"]["cells"]["seq_write"]["value"] == pytest.approx(0.88)
    assert rows["vs_floor"]["met"] is False                      # 15000 / 18000 = 0.83 < 0.85
    assert rows["vs_gocryptfs"]["met"] is True                   # 1.26 seq (>= 1.2), 1.8 and 1.67 random
    assert rows["vs_qsd"]["cells"]["seq_write"]["met"] is False  # 1.10 < 1.2 on a sequential job
    assert rows["vs_qsd"]["cells"]["rand_read_2j"]["met"] is True
    assert rows["cpu_vs_gocryptfs"]["cells"]["rand_read_2j"]["value"] == pytest.approx(1.2)
    assert rows["cpu_vs_gocryptfs"]["met"] is False
    assert rows["scaling_2j"]["value"] == pytest.approx(15000 / 9000) and rows["scaling_2j"]["met"] is True
    md = report.render_markdown(raw, [], "raw.json")
    assert "**SINGLE** (native front end) against the design's targets" in md
    assert "| vs C-FLOOR | ≥ 0.85× | 0.88 | 0.90 | **0.83** | missed (1 of 3) |" in md
    assert "| vs GOCRYPTFS | ≥ 1.5× random, ≥ 1.2× sequential | 1.26 | 1.80 | 1.67 | met |" in md
    assert "| rand read 4 KiB: 2 jobs / 1 job | ≥ 1.6 | 1.67 | met |" in md
    assert "Targets met: 2 of 6 measured (0 without data)." in md
    # the ratios table compares single with its floor too
    assert "| vs NULL | ≥ 0.9× | 0.98 | 0.95 | **0.88** | missed (1 of 3) |" in md
    assert "| SINGLE | seq write 1 MiB | 0.98 | 0.88 | 1.26 | **1.10** |" in md


def test_target_rows_without_their_systems_say_so():
    raw = _with_pairs(_raw({"single": {"rand_read": [900], "rand_read_2j": [1000]}}))
    rows = {r["key"]: r for r in report.targets(raw)}
    assert rows["vs_null"]["met"] is None and rows["vs_floor"]["cells"] == {}
    assert rows["scaling_2j"]["met"] is False  # 1.11 < 1.6
    md = report.render_markdown(raw, [], "raw.json")
    assert "| rand read 4 KiB: 2 jobs / 1 job | ≥ 1.6 | **1.11** | missed |" in md
    assert "Targets met: 0 of 1 measured (5 without data)." in md


def test_skipped_systems_are_reported():
    raw = _raw({"raw": {"seq_write": [1.0]}})
    raw["skipped"] = {"fusepy-single": "`blockcrypt mount` has no --frontend option in this build"}
    md = report.render_markdown(raw, [], "raw.json")
    assert "Skipped (this build cannot run them): `fusepy-single` (`blockcrypt mount` has no --frontend" in md


def test_job_matrix_has_both_rand_read_widths_and_libaio_qd4():
    by = jobs.by_name()
    assert by["rand_read"].fio["numjobs"] == "1" and by["rand_read_2j"].fio["numjobs"] == "2"
    cmd = jobs.fio_command(by["seq_write_aio"], "/x/disk", 64 << 20, 2.0, 0.0, "/x/out.json")
    assert [c for c in cmd if c.startswith("--ioengine")] == ["--ioengine=libaio"]
    assert "--iodepth=4" in cmd and "--direct=1" in cmd and "--bs=1M" in cmd and "--rw=write" in cmd
    assert by["seq_write_aio"].pattern == "sequential" and by["rand_write"].pattern == "random"
    assert report.peer_target({"name": "seq_write_aio", "pattern": "sequential"}) == 1.2


def test_cold_start_options():
    assert jobs.parse_prefault("anon:512") == ("anon", 512)
    assert jobs.parse_prefault("none") == ("none", 0)
    for bad in ("anon", "swap:5", "pagecache:x"):
        with pytest.raises(run.BenchError, match="bad --prefault"):
            jobs.parse_prefault(bad)
    with pytest.raises(run.BenchError, match="unknown prefault kind"):
        jobs.ColdStart(prefault="swap")
    from bench import fpr
    assert fpr.parse_policy("settle5+anon2048") == jobs.ColdStart(5.0, "anon", 2048)
    assert fpr.parse_policy("delay2") == jobs.ColdStart(2.0)
    assert fpr.parse_policy("none") == jobs.ColdStart()
    with pytest.raises(run.BenchError, match="bad policy"):
        fpr.parse_policy("settle+")


def test_blockcrypt_systems_map_to_front_ends(monkeypatch, tmp_path):
    from bench import systems
    old = "Usage: blockcrypt mount [OPTIONS] MOUNTPOINT\n  --bench-null-cipher\n  --json\n"
    new = old + "  --frontend [native|fusepy]\n  --backing-cache [buffered|none]\n"
    monkeypatch.setattr(systems, "blockcrypt_cli", lambda: "/nonexistent/blockcrypt")
    monkeypatch.setattr(systems, "_MOUNT_HELP", {"/nonexistent/blockcrypt": old})
    make = {n: c(tmp_path) for n, c in systems.by_name().items()}
    # before the native front end: null/single are the fusepy mount, the variants are skipped
    assert make["single"].unsupported() is None and make["single"].all_mount_args() == []
    assert make["null"].all_mount_args() == ["--bench-null-cipher"]
    assert make["single"].info()["frontend"] == "fusepy"
    assert "no --frontend option" in make["fusepy-single"].unsupported()
    assert "no --frontend option" in make["single-direct"].unsupported()
    monkeypatch.setattr(systems, "_MOUNT_HELP", {"/nonexistent/blockcrypt": new})
    make = {n: c(tmp_path) for n, c in systems.by_name().items()}
    assert all(s.unsupported() is None for s in make.values())
    assert make["single"].all_mount_args() == ["--frontend", "native"]
    assert make["null"].all_mount_args() == ["--bench-null-cipher", "--frontend", "native"]
    assert make["single-direct"].all_mount_args() == ["--frontend", "native", "--backing-cache", "none"]
    assert make["fusepy-null"].all_mount_args() == ["--bench-null-cipher", "--frontend", "fusepy"]
    info = make["single"].info()
    assert (info["frontend"], info["baseline"], info["floor"]) == ("native", "null", "c-floor")
    assert make["single-direct"].info()["floor"] == "c-floor-direct"
