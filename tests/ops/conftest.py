"""Fixtures for the operations tests (issue 16): a state directory, a tree that is always
cleaned (mounts, loop devices), a purge-protected vault over HTTPS on 127.0.0.1 and a key in it.

Everything is real: FUSE mounts, the vault server, fio, systemd-analyze."""
from __future__ import annotations

import os

import pytest

from support.treefixtures import root, state  # noqa: F401  (fixtures)
from support.vaultfixtures import key_name, vault  # noqa: F401  (fixtures)

HERE = os.path.dirname(os.path.abspath(__file__))
FUSE_TESTS = ("test_notify.py", "test_metrics.py", "test_status.py", "test_keychecks.py", "test_logs.py")


def pytest_collection_modifyitems(config, items):
    if os.path.exists("/dev/fuse"):
        return
    for item in items:
        if os.path.basename(str(item.fspath)) in FUSE_TESTS and str(item.fspath).startswith(HERE):
            item.add_marker(pytest.mark.skip(reason="/dev/fuse is absent"))
