"""The runner's pure parts: fio job lines, fio JSON parsing, medians, ratios, targets, Markdown."""
import json
import subprocess
import shutil

import pytest

from bench import jobs, report, run


def _raw(values: dict, reps: int = 1) -> dict:
    """A run with given {system: {job: [values]}}; roles as in bench.systems."""
    roles = {"raw": ("reference", False), "null": ("blockcrypt", False), "single": ("blockcrypt", True),
             "gocryptfs": ("peer", True), "qsd": ("peer", True)}
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


def test_targets_flag_each_miss_and_only_misses():
    raw = _raw({"null": {"rand_read": [1000], "seq_read": [500]},
                "single": {"rand_read": [950], "seq_read": [400]},
                "gocryptfs": {"rand_read": [900], "seq_read": [450]},
                "qsd": {"rand_read": [1000], "seq_read": [300]}})
    rows = {r["job"]: r for r in report.comparisons(raw)}
    assert rows["rand_read"]["ratios"] == pytest.approx({"null": 0.95, "gocryptfs": 950 / 900, "qsd": 0.95})
    assert rows["rand_read"]["missed"] == ["qsd (0.95 < 1.0)"]
    assert rows["seq_read"]["missed"] == ["null (0.80 < 0.9)", "gocryptfs (0.89 < 1.0)"]
    md = report.render_markdown(raw, ["iops.png"], "raw.json")
    assert "| SINGLE | rand read 4 KiB | 0.95 | 1.06 | **0.95** |" in md
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
    assert run.pick(None, systems.by_name(), "system") == ["raw", "null", "single", "gocryptfs", "qsd"]
    with pytest.raises(run.BenchError, match="unknown system nope; choose from raw, fusepy, null"):
        run.pick("raw,nope", systems.by_name(), "system")
    assert run.parse_size_arg("512M") == 512 << 20
    assert run.parse_size_arg("2GiB") == 2 << 30
    for bad in ("0", "12x", "1000K", "8M"):
        with pytest.raises(run.BenchError, match="bad --size"):
            run.parse_size_arg(bad)
