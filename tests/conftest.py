"""Shared fixtures: a fresh state directory per test (real files, real keys).

tests/ is on sys.path (pytest rootdir conftest), so `support` imports as a package."""
import pytest

from blockcrypt.control.state import State


@pytest.fixture
def state(tmp_path):
    return State.init(tmp_path / "state")
