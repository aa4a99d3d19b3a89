"""Fixtures for the benchmark harness tests: they run the real runner, fio and mounts.

Caveat: they need root, fio and /dev/fuse; peers (gocryptfs, qemu) are skipped when
missing, and every test uses its own --workdir so a real benchmark run is not touched.
"""
import os
import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root")
    if not shutil.which("fio"):
        reasons.append("needs fio")
    if reasons:
        skip = pytest.mark.skip(reason=", ".join(reasons))
        for item in items:
            if "needs_root" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_root: runs mounts, fio and drop_caches as root")
