"""Fixtures shared by the test directories that mount, loop or serve below tmp: a ``root``
(the test's tmp_path) that is always cleaned after the test (mounts unmounted, loop devices
detached: support.fusehelpers.cleanup_tree), and a fresh ``state`` directory in it. A conftest
imports them (``from support.treefixtures import root, state``); they override the plain
``state`` of tests/conftest.py there."""
from __future__ import annotations

import pytest

from blockcrypt.control.state import State

from .fusehelpers import cleanup_tree


@pytest.fixture
def root(tmp_path):
    yield tmp_path
    cleanup_tree(tmp_path)


@pytest.fixture
def state(root):
    return State.init(root / "state")
