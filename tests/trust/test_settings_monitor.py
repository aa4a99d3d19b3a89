"""Issue 15, H3: settings validated against one table (type and range), and a key monitor
that survives any stored value and wakes when the interval changes."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockcrypt.control import settings
from blockcrypt.errors import UsageError
from blockcrypt.mount.monitor import KeyMonitor

BIN = Path(sys.executable).with_name("blockcrypt")


@pytest.mark.parametrize("name,value", [
    ("key_check_interval", "inf"), ("key_check_interval", "nan"), ("key_check_interval", "1e300"),
    ("key_check_interval", "-1"), ("key_check_interval", "0"), ("key_check_interval", "0.01"),
    ("key_grace_period", "Infinity"), ("auto_rotate_interval", "1e12"), ("max_des", "1e3"),
    ("max_des", "0"), ("max_des", "99999999999999999999"), ("key_check_interval", ""),
])
def test_out_of_range_values_are_refused(state, name, value):
    before = settings.get_text(state, name)
    with pytest.raises(UsageError, match=f"invalid value .* for {name}: "):
        settings.set_(state, name, value)
    assert settings.get_text(state, name) == before


def test_cli_refuses_inf_with_one_line(tmp_path):
    d = tmp_path / "st"
    subprocess.run([str(BIN), "--state", str(d), "init"], check=True, capture_output=True)
    p = subprocess.run([str(BIN), "--state", str(d), "config", "set", "key_check_interval", "inf"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "from 0.1 to 86400" in p.stderr


class _NoDisks:
    def open_disks(self):
        return []

    def notify_changed(self):
        pass


class _CountingMonitor(KeyMonitor):
    def __init__(self, *a):
        super().__init__(*a)
        self.checks = []

    def check_once(self):
        self.checks.append(time.monotonic())


@pytest.mark.parametrize("stored", ["inf", "nan", "1e300", "-5", "garbage"])
def test_monitor_survives_any_stored_value_and_resumes(state, stored):
    """A value stored past the table (an older release, a hand-edited catalog) reads as the
    default; setting a good value again brings checks back in a running monitor."""
    state.catalog.set_setting("key_check_interval", stored)
    m = _CountingMonitor(_NoDisks(), state)
    m.start()
    try:
        time.sleep(1.5)
        assert m.thread.is_alive()
        assert m.checks == []        # the default (60 s): no spinning on nan
        settings.set_(state, "key_check_interval", "0.2")
        t0 = time.monotonic()
        deadline = t0 + 5
        while len(m.checks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(m.checks) >= 3, m.checks
        assert m.checks[0] - t0 < 1.5   # woke within the settings poll, not after the old 60 s
    finally:
        m.stop()
    assert not m.thread.is_alive()


def test_shorter_interval_applies_at_once(state):
    settings.set_(state, "key_check_interval", "3600")
    m = _CountingMonitor(_NoDisks(), state)
    m.start()
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        settings.set_(state, "key_check_interval", "1")
        deadline = t0 + 5
        while not m.checks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.checks and m.checks[0] - t0 < 2.5, m.checks
    finally:
        m.stop()
