"""Fixtures for the FUSE integration tests: a state directory in tmp, a real
detached mount, and a teardown that always unmounts and detaches loop devices.

The whole directory is skipped, with the reason, only when /dev/fuse is absent.
"""
from __future__ import annotations

import os

import pytest

from support.fusehelpers import Mount, assert_clean_logs, cleanup_tree
from support.treefixtures import root, state  # noqa: F401  (fixtures)

HERE = os.path.dirname(os.path.abspath(__file__))
NO_FUSE = "/dev/fuse is absent: the FUSE integration tests need a FUSE-capable host"


def pytest_collection_modifyitems(config, items):
    if os.path.exists("/dev/fuse"):
        return
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.skip(reason=NO_FUSE))


@pytest.fixture
def mnt(state, root):
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp).start()
    yield m
    cleanup_tree(root, state)
    assert_clean_logs(state)


@pytest.fixture(autouse=True, params=["native", "fusepy"])
def frontend(request, monkeypatch):
    """Every test here runs over both front ends: the libfuse 3 session in C and fusepy."""
    monkeypatch.setenv("BLOCKCRYPT_FRONTEND", request.param)
    return request.param
