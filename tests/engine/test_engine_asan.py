"""The differential test again, on blockcrypt._engine built with AddressSanitizer and
UndefinedBehaviorSanitizer.

`make -C native py-asan` compiles the extension (the same sources as setup.py) into
build/asan/; build/asan/site/blockcrypt/ mirrors the package with symlinks except for
_engine, which points at the sanitized build, and PYTHONPATH puts it first. A child
Python with libasan preloaded runs test_engine_differential.py; the test fails on any
sanitizer report, a non-zero exit, or if `blockcrypt._engine` came from anywhere else.

Caveat: leak detection is off in the child (CPython itself keeps memory until exit);
the C tests (make -C native sanitize) run with it on.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASAN_DIR = REPO / "build" / "asan"
SITE = ASAN_DIR / "site"
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehavior")


def build_and_mirror() -> Path:
    r = subprocess.run(["make", "-s", "-C", str(REPO / "native"), "py-asan", f"PY={sys.executable}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"sanitized build failed:\n{r.stdout}\n{r.stderr}"
    built = sorted(ASAN_DIR.glob("_engine*.so"))
    assert len(built) == 1, built
    pkg = SITE / "blockcrypt"
    if SITE.exists():
        subprocess.run(["rm", "-rf", str(SITE)], check=True)
    pkg.mkdir(parents=True)
    for entry in (REPO / "blockcrypt").iterdir():
        if entry.name == "__pycache__" or entry.name.startswith("_engine"):
            continue
        (pkg / entry.name).symlink_to(entry)
    (pkg / built[0].name).symlink_to(built[0])
    return built[0]


def sanitizer_env() -> dict:
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert os.path.isabs(libasan) and os.path.exists(libasan), f"no libasan: {libasan!r}"
    env = dict(os.environ)
    env.update({
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "PYTHONPATH": str(SITE),
        "BC_ENGINE_EXPECT_DIR": str(ASAN_DIR),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONMALLOC": "malloc",   # every Python buffer under ASan, not in pymalloc arenas
    })
    return env


def test_differential_under_asan_and_ubsan(tmp_path):
    built = build_and_mirror()
    env = sanitizer_env()
    probe = subprocess.run([sys.executable, "-P", "-c", "import blockcrypt._engine as e; print(e.__file__)"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert os.path.realpath(probe.stdout.strip()) == str(built.resolve()), probe.stdout
    r = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--basetemp", str(tmp_path / "inner"),
                        str(REPO / "tests" / "engine" / "test_engine_differential.py")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    reports = [m for m in SANITIZER_MARKS if m in out]
    assert not reports, f"sanitizer reports {reports}:\n{out[-6000:]}"
    assert r.returncode == 0, f"exit {r.returncode}:\n{out[-6000:]}"
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]
