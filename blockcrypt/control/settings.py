"""The catalog settings: one table of name, default, validator and help.

``blockcrypt config get/set`` and the mount daemon's key monitor both read it:
``get(st, name)`` returns the typed value (a float for intervals), ``set_(st, name,
text)`` validates and stores the canonical text.

Every setting has a type and a range in one table (``SETTINGS``); ``set_``
refuses anything else (``inf``, ``nan``, ``1e300``, negative), so a running
mount never sees a value it cannot wait on.

Caveat: settings live in the catalog, so a running mount reads a change at its
next use (the key monitor re-reads them every second, so a shorter interval
applies at once), except the ones marked ``mount_time``: ``encryption_at_host``,
``temp_disks`` and ``temp_dir`` are read when a mount starts and a change takes a
remount (as a VM is deallocated and reallocated to change encryption at host).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..errors import UsageError
from .tempdisks import check_temp_dir, parse_on_off, parse_specs


def _number(kind: type, low, high) -> Callable[[str], object]:
    """A parser for a finite ``kind`` (int or float) in [low, high]: ValueError otherwise."""
    def parse(text: str):
        v = kind(str(text).strip())
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError
        if not low <= v <= high:
            raise ValueError
        return v
    return parse


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    parse: Callable[[str], object]    # text -> value, ValueError when invalid
    help: str
    expects: str                      # what a valid value is, for the error line
    mount_time: bool = False          # read when a mount starts only: a change needs a remount


DAY_S = 86400


def _metrics_listen(text: str) -> str:
    """'' (off) or a loopback HOST:PORT (the option --metrics-allow-remote alone opens others)."""
    text = str(text).strip()
    if text in ("", "off"):
        return ""
    from .._util.metricsweb import check_listen
    check_listen(text)
    return text

#: every setting with its type and range: `config set` refuses anything else, and a stored
#: value that does not parse (an older release, a hand-edited catalog) reads as the default
SETTINGS = {s.name: s for s in (
    Setting("max_des", "50", _number(int, 1, 10000), "most disk encryption sets in this catalog",
            "a whole number from 1 to 10000"),
    Setting("key_check_interval", "60", _number(float, 0.1, DAY_S),
            "seconds between key checks in a mount (revocation bound)", "seconds, from 0.1 to 86400"),
    Setting("key_grace_period", "3600", _number(float, 1, 30 * DAY_S),
            "seconds a mount serves from a cached key while the vault is unreachable",
            "seconds, from 1 to 2592000 (30 days)"),
    Setting("auto_rotate_interval", "3600", _number(float, 1, 365 * DAY_S),
            "seconds between auto-rotation passes in a mount", "seconds, from 1 to 31536000 (a year)"),
    Setting("on_revoke", "", str, "command run with the disk name when a key revocation stops a disk",
            "a command line"),
    Setting("encryption_at_host", "false", parse_on_off,
            "encrypt the mount's temp disks under an ephemeral key (read at mount time: remount to change)",
            "true or false", mount_time=True),
    Setting("temp_disks", "", lambda t: ",".join(str(s) for s in parse_specs(t)),
            "temp disks every mount offers, NAME:SIZE[,NAME:SIZE...] (read at mount time)",
            "NAME:SIZE pairs separated by commas, e.g. scratch:10G,swap:2G", mount_time=True),
    Setting("temp_dir", "", check_temp_dir,
            "host-local directory of the temp disk files, default STATE/temp (read at mount time)",
            "an absolute path, or empty for STATE/temp", mount_time=True),
    # -- issue 16: operations (metrics, logs) --------------------------------------------------
    Setting("metrics_listen", "", _metrics_listen,
            "HOST:PORT of the mount's Prometheus endpoint, loopback only (empty: off; read at mount time)",
            "HOST:PORT on a loopback address, e.g. 127.0.0.1:9464, or empty for off", mount_time=True),
    Setting("log_max_bytes", "10485760", _number(int, 65536, 1 << 40),
            "size at which the mount's log file rotates (read at mount time)",
            "a whole number of bytes from 65536", mount_time=True),
    Setting("log_files", "5", _number(int, 1, 1000),
            "rotated mount log files kept besides the current one (read at mount time)",
            "a whole number from 1 to 1000", mount_time=True),
    Setting("xattrs", "false", parse_on_off,
            "serve user. and trusted. extended attributes on disk files, for libvirt's DAC driver (read at "
            "mount time; with them on, the kernel asks for security.capability before every write: one "
            "more FUSE round trip per write)", "true or false", mount_time=True),
    Setting("warning_repeat_interval", "300", _number(float, 0, DAY_S),
            "seconds between repeats of a warning that lasts (a vault outage): the first one is logged, "
            "then one per interval, then a line when it ends", "seconds, from 0 to 86400"),
)}


def setting(name: str) -> Setting:
    s = SETTINGS.get(name)
    if s is None:
        raise UsageError(f"unknown setting {name!r} (one of {', '.join(SETTINGS)})")
    return s


def get_text(st, name: str) -> str:
    return st.catalog.get_setting(name, setting(name).default)


def get(st, name: str):
    """The typed value; a stored value that no longer validates gives the default."""
    s = setting(name)
    try:
        return s.parse(get_text(st, name))
    except (TypeError, ValueError, OverflowError, UsageError):
        return s.parse(s.default)


def set_(st, name: str, text: str) -> str:
    s = setting(name)
    try:
        value = s.parse(text)
    except (TypeError, ValueError, UsageError):
        raise UsageError(f"invalid value {text!r} for {name}: {s.expects}") from None
    if isinstance(value, bool):
        canonical = "true" if value else "false"
    elif isinstance(value, int):
        canonical = str(value)
    elif isinstance(value, str):
        canonical = value.strip()
    else:
        canonical = text.strip()
    st.catalog.set_setting(name, canonical)
    return canonical
