"""The runner for real: fio, FUSE mounts, drop_caches, teardown on success, error and Ctrl-C."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import jobs
from bench.util import is_mounted, mount_points

pytestmark = pytest.mark.needs_root

REPO = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(REPO / "bench" / "run.py")]
HAVE_PEERS = bool(shutil.which("gocryptfs") and shutil.which("qemu-storage-daemon"))


def _bench(tmp_path, *args, timeout=300, env=None):
    # a short cold start: the real path (drop caches, settle, prefault), not the run's 1-5 s
    cmd = RUN + ["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out"), "--no-publish",
                 "--settle", "0.1", "--prefault", "pagecache:32", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _leftovers(workdir: Path) -> tuple[list, list]:
    """Mounts under workdir and live processes naming it in their argv."""
    mounts = [m for m in mount_points() if m.startswith(str(workdir))]
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(workdir) in argv and state != "Z":
            procs.append(argv.replace("\0", " ")[:120])
    return mounts, procs


def test_raw_end_to_end_writes_json_markdown_and_plots(tmp_path):
    p = _bench(tmp_path, "--systems", "raw", "--jobs", "seq_write,seq_read,rand_read,unaligned_512",
               "--size", "32M", "--runtime", "0.5", "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    out_dir = Path(summary["out_dir"])
    raw = json.loads((out_dir / "raw.json").read_text())
    assert [r["job"] for r in raw["runs"]] == ["seq_write", "seq_read", "rand_read", "unaligned_512"]
    for r in raw["runs"]:
        assert r["value"] > 0 and r["io_bytes"] > 0
    # one sequential pass over the whole file, nothing more
    assert raw["runs"][0]["write"]["io_bytes"] == 32 << 20
    assert raw["runs"][1]["read"]["io_bytes"] == 32 << 20
    md = (out_dir / "RESULTS.md").read_text()
    assert "| seq write 1 MiB | MiB/s |" in md and "openssl speed -evp aes-256-xts -bytes 4096" in md
    assert "before every job: drop_caches, settle 0.1 s, prefault 32 MiB pagecache;" in md
    assert all(r["cold_start_s"] >= 0.1 for r in raw["runs"])
    assert (out_dir / "iops.png").exists() or "Plots not drawn" in md
    assert not (tmp_path / "w" / "raw").exists()
    assert _leftovers(tmp_path / "w") == ([], [])


def test_unaligned_requests_are_512_aligned_and_never_4k_aligned(tmp_path):
    target = tmp_path / "disk.img"
    with open(target, "wb") as f:
        f.truncate(16 << 20)
    job = jobs.by_name()["unaligned_512"]
    cmd = jobs.fio_command(job, target, 16 << 20, 0.3, 0, tmp_path / "o.json")
    cmd = [c for c in cmd if c != "--direct=1"] + [f"--write_iolog={tmp_path / 'io.log'}"]
    subprocess.run(cmd, check=True, capture_output=True)
    offsets = [int(line.split()[3]) for line in (tmp_path / "io.log").read_text().splitlines()
               if " write " in line]
    assert len(offsets) > 100
    assert all(o % 4096 == 512 for o in offsets)
    assert max(offsets) + 512 <= 16 << 20


@pytest.mark.skipif(not HAVE_PEERS, reason="needs gocryptfs and qemu-storage-daemon (install-deps --bench)")
def test_every_system_measures_and_tears_down(tmp_path):
    p = _bench(tmp_path, "--systems", "raw,c-floor,fusepy,null,single,gocryptfs,qsd",
               "--jobs", "rand_write,seq_read", "--size", "32M", "--runtime", "0.5", "--json", timeout=400)
    assert p.returncode == 0, p.stderr
    raw = json.loads((Path(json.loads(p.stdout)["out_dir"]) / "raw.json").read_text())
    seen = {(r["system"], r["job"]) for r in raw["runs"] if r["value"] > 0}
    assert seen == {(s, j) for s in ("raw", "c-floor", "fusepy", "null", "single", "gocryptfs", "qsd")
                    for j in ("rand_write", "seq_read")}
    for r in raw["runs"]:
        if r["system"] == "raw":
            assert r["daemon_cpu_s"] is None
        else:  # the daemon's own CPU was counted
            assert r["daemon_cpu_s"] is not None and r["daemon_cpu_s"] >= 0, r
            # /proc counts CPU in clock ticks (10 ms): a 32 MiB cached read can finish in
            # less (24 ms, 1.3 GB/s, at 4224da3), but 0.5 s of fsync'd random writes cannot
            if r["job"] == "rand_write":
                assert r["cpu_s_per_gib"] > 0, r
    comps = json.loads(p.stdout)["comparisons"]
    assert {c["job"] for c in comps if c["system"] == "single"} == {"rand_write", "seq_read"}
    assert set(comps[0]["ratios"]) == {"null", "c-floor", "gocryptfs", "qsd"}
    targets = {t["key"]: t for t in json.loads(p.stdout)["targets"]}
    assert set(targets["vs_floor"]["cells"]) == {"rand_write", "seq_read"}
    assert _leftovers(tmp_path / "w") == ([], [])


def test_unknown_system_is_one_line(tmp_path):
    p = _bench(tmp_path, "--systems", "raw,zfs")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "bench: error: unknown system zfs; choose from raw, c-floor, c-floor-direct, fusepy, null, single, "
        "null-direct, single-direct, fusepy-null, fusepy-single, fusepy-single-direct, gocryptfs, qsd, double, "
        "double-cmk"]


def test_fio_missing_is_one_line(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path / "empty"))
    p = _bench(tmp_path, "--systems", "raw", env=env)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "bench: error: fio not found; install it: apt-get install fio (or bash scripts/install-deps.sh)"]


def test_not_root_is_refused(tmp_path):
    """The runner, loaded as root and then really running as nobody (setuid), refuses in one line.
    Loading first keeps the test independent of whether nobody can read the checkout."""
    tmp_path.chmod(0o777)
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'bench')!r})\n"
        "import run\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        f"sys.exit(run.main(['--systems', 'raw', '--workdir', {str(tmp_path / 'w')!r}, "
        f"'--out', {str(tmp_path / 'out')!r}]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("bench: error: run as root")


@pytest.mark.skipif(not shutil.which("gocryptfs"), reason="needs gocryptfs")
def test_busy_mount_point_is_refused_and_left_alone(tmp_path):
    busy = tmp_path / "w" / "gocryptfs" / "plain"
    busy.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(busy)], check=True)
    try:
        p = _bench(tmp_path, "--systems", "raw,gocryptfs")
        assert p.returncode == 1
        assert p.stderr.strip().splitlines() == [
            f"bench: error: mount point {busy} is busy (already mounted); unmount it "
            f"(umount {busy}) or choose another --workdir"]
        assert is_mounted(busy)  # not ours: untouched
    finally:
        subprocess.run(["umount", str(busy)], check=False)


@pytest.mark.skipif(not HAVE_PEERS, reason="needs gocryptfs and qemu-storage-daemon")
def test_ctrl_c_tears_everything_down(tmp_path):
    workdir = tmp_path / "w"
    cmd = RUN + ["--workdir", str(workdir), "--out", str(tmp_path / "out"), "--no-publish",
                 "--systems", "raw,single,gocryptfs,qsd", "--jobs", "rand_read", "--size", "32M",
                 "--runtime", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        export = workdir / "qsd" / "export.img"
        while not is_mounted(export) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert is_mounted(export), proc.stderr.read() if proc.poll() is not None else "not mounted"
        time.sleep(3)  # now in the middle of a 60 s fio job
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; everything torn down" in err
    assert _leftovers(workdir) == ([], [])
    assert not (workdir / "gocryptfs").exists() and not (workdir / "single").exists()


def _floor_mount(tmp_path, *flags, size=8 << 20):
    """Start the C floor (built on first use) on a fresh backing file; (proc, backing, disk file)."""
    from bench import systems
    exe = systems.build_floor()
    backing, mnt = tmp_path / "backing.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(size)
    log = open(tmp_path / "floor.log", "wb")
    proc = subprocess.Popen([str(exe), *flags, str(backing), "vm1", str(mnt)], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 20
    while not is_mounted(mnt) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert is_mounted(mnt), (tmp_path / "floor.log").read_text()
    return proc, backing, mnt


def _floor_stop(proc, mnt):
    subprocess.run(["umount", str(mnt)], check=False)
    proc.wait(timeout=20)


@pytest.mark.parametrize("flags", [(), ("--direct",)], ids=["buffered", "direct"])
def test_c_floor_serves_the_backing_file(tmp_path, flags):
    proc, backing, mnt = _floor_mount(tmp_path, *flags)
    disk = mnt / "disks" / "vm1"
    try:
        assert os.listdir(mnt) == ["disks"] and os.listdir(mnt / "disks") == ["vm1"]
        assert disk.stat().st_size == 8 << 20
        data = os.urandom(2 << 20)
        # O_DIRECT 2 MiB write from an aligned buffer, as fio does: the kernel may send 1 MiB requests
        import mmap
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pwritev(fd, [buf], 1 << 20) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(disk, "r+b") as f:  # an unaligned buffered write (read-modify-write in the page cache)
            f.seek(512 * 3 + 7)
            f.write(b"floor")
        with open(backing, "rb") as f:
            f.seek(1 << 20)
            assert f.read(len(data)) == data
            f.seek(512 * 3 + 7)
            assert f.read(5) == b"floor"
        # discard reaches the backing file: the range becomes a hole
        blocks = os.stat(backing).st_blocks
        subprocess.run(["fallocate", "--punch-hole", "--offset", str(1 << 20), "--length", str(2 << 20),
                        str(disk)], check=True)
        assert os.stat(backing).st_blocks <= blocks - (2 << 20) // 512
        with open(disk, "rb") as f:
            f.seek(1 << 20)
            assert f.read(1 << 20) == bytes(1 << 20)
        p = subprocess.run(["truncate", "-s", "4M", str(disk)], capture_output=True, text=True)
        assert p.returncode != 0 and "not permitted" in p.stderr
        assert os.stat(backing).st_size == 8 << 20
    finally:
        _floor_stop(proc, mnt)
    log = (tmp_path / "floor.log").read_text()
    assert "max_write 1048576, max_read 1048576, async_dio on" in log
    assert "largest write 1048576" in log  # 1 MiB requests really arrived (max_pages negotiated)


def test_unsupported_variants_are_skipped_not_fatal(tmp_path, monkeypatch):
    """Before `blockcrypt mount --frontend` exists the front-end variants are skipped with a
    note and the rest of the run goes on."""
    from bench import run as run_mod, systems
    monkeypatch.setattr(systems, "_MOUNT_HELP", {systems.blockcrypt_cli(): "Usage: mount --json\n"})
    selected = [systems.RawFile(tmp_path / "w"), systems.BlockcryptFusepySingle(tmp_path / "w")]
    kept, skipped = run_mod.preflight(selected, tmp_path / "w")
    assert [s.name for s in kept] == ["raw"]
    assert skipped == {"fusepy-single": "`blockcrypt mount` has no --frontend option in this build "
                                        "(the native front end has not landed)"}
    with pytest.raises(run_mod.BenchError, match="none of the selected systems can run"):
        run_mod.preflight(selected[1:], tmp_path / "w")


def test_cold_start_settles_and_prefaults(tmp_path):
    cold = jobs.ColdStart(settle_s=0.3, prefault="pagecache", prefault_mib=16)
    t0 = time.monotonic()
    info = cold.apply(tmp_path)
    assert time.monotonic() - t0 >= 0.3
    assert "settle_reported_mib" in info
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone
    jobs.ColdStart(prefault="anon", prefault_mib=16).apply()


def _has_frontend() -> bool:
    from bench import systems
    try:
        return "--frontend" in systems.mount_help(systems.blockcrypt_cli())
    except Exception:  # noqa: BLE001 - no CLI: skip
        return False


def _backing_fds(pid: int, under: Path) -> list[int]:
    """open(2) flags of `pid`'s descriptors on files under `under`."""
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        if target.startswith(str(under)) and target.endswith(".img"):
            flags.append(int(next(l for l in info.splitlines() if l.startswith("flags:")).split()[1], 8))
    return flags


@pytest.mark.parametrize("name, direct", [("single", False), ("single-direct", True), ("c-floor-direct", True)])
def test_backing_cache_variants_really_open_the_backing_file_that_way(tmp_path, name, direct):
    """The systems measure what their names say: `-direct` daemons hold the backing file O_DIRECT."""
    from bench import systems
    if name != "c-floor-direct" and not _has_frontend():
        pytest.skip("this build has no `blockcrypt mount --frontend`")
    s = systems.by_name()[name](tmp_path / "w")
    s.check()
    try:
        s.setup(32 << 20)
        with open(s.target, "r+b") as f:  # the native session opens the volume on first open
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
            flags = _backing_fds(s.daemon_pid, s.dir)
        assert flags, f"no backing file open in daemon {s.daemon_pid}"
        assert any(bool(fl & os.O_DIRECT) for fl in flags) is direct, [oct(fl) for fl in flags]
        if name.startswith("single"):
            assert s.info()["frontend"] == "native"
    finally:
        s.teardown()
    assert _leftovers(tmp_path / "w") == ([], [])


def test_front_end_variants_measure(tmp_path):
    if not _has_frontend():
        pytest.skip("this build has no `blockcrypt mount --frontend`")
    names = ("null-direct", "single-direct", "fusepy-null", "fusepy-single")
    p = _bench(tmp_path, "--systems", ",".join(names), "--jobs", "rand_read", "--size", "32M",
               "--runtime", "0.5", "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    raw = json.loads((Path(out["out_dir"]) / "raw.json").read_text())
    info = {s["name"]: s for s in raw["systems"]}
    assert {n: (info[n]["frontend"], info[n]["backing_cache"]) for n in names} == {
        "null-direct": ("native", "none"), "single-direct": ("native", "none"),
        "fusepy-null": ("fusepy", "buffered"), "fusepy-single": ("fusepy", "buffered")}
    assert all(r["value"] > 0 and r["daemon_cpu_s"] is not None for r in raw["runs"])
    rows = {c["system"]: c for c in out["comparisons"]}
    assert rows["single-direct"]["baseline"] == "null-direct" and rows["fusepy-single"]["baseline"] == "fusepy-null"
    assert _leftovers(tmp_path / "w") == ([], [])


def test_double_encryption_systems_measure_and_tear_down(tmp_path):
    """double (platform + platform) and double-cmk (a customer key in a vault on 127.0.0.1 over
    the platform key): both measure, their disks have two layers, and nothing is left (no
    mount, no daemon, no vault)."""
    p = _bench(tmp_path, "--systems", "double,double-cmk", "--jobs", "rand_read", "--size", "32M",
               "--runtime", "0.5", "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    raw = json.loads((Path(out["out_dir"]) / "raw.json").read_text())
    assert {r["system"] for r in raw["runs"] if r["value"] > 0} == {"double", "double-cmk"}
    assert _leftovers(tmp_path / "w") == ([], [])
