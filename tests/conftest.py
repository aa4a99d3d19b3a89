"""Shared fixtures: a fresh state directory per test (real files, real keys)."""
import pytest

from blockcrypt.state import State


@pytest.fixture
def state(tmp_path):
    return State.init(tmp_path / "state")
