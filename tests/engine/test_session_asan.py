"""The session tests again, on blockcrypt._engine built with AddressSanitizer and
UndefinedBehaviorSanitizer (the harness of test_engine_asan.py: `make -C native py-asan`,
a mirrored package, a child Python with libasan preloaded).

The child serves real FUSE mounts from the sanitized session, so use-after-free or
overflows in the request paths, the hooks, the disk table, exit and close show up here.
Left out: the fio and ext4 tests (the external tools would inherit the preloaded libasan).

Caveat: leak detection is off in the child (CPython keeps memory until exit).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_engine_asan import REPO, SANITIZER_MARKS, build_and_mirror, sanitizer_env

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent")


def test_session_under_asan_and_ubsan(tmp_path):
    built = build_and_mirror()
    env = sanitizer_env()
    r = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--basetemp", str(tmp_path / "inner"), "-k", "not fio and not ext4",
                        str(REPO / "tests" / "engine" / "test_session.py")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    reports = [m for m in SANITIZER_MARKS if m in out]
    assert not reports, f"sanitizer reports {reports}:\n{out[-6000:]}"
    assert r.returncode == 0, f"exit {r.returncode}:\n{out[-6000:]}"
    assert " passed" in r.stdout and "failed" not in r.stdout and "skipped" not in r.stdout, \
        r.stdout[-2000:]
    assert os.path.exists(built)
