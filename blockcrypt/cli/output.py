"""The CLI's contract with scripts, in one place: JSON output, JSON errors, confirmations, progress.

- ``emit(obj, as_json, text)``  one JSON document on stdout (camelCase keys, ISO 8601 UTC
  timestamps, numbers as numbers), or the text for people
- ``contract(obj)``             the conversion ``emit`` applies: snake_case keys become camelCase
  (not inside opaque maps such as ``tags``), Unix times under time-named keys and ISO strings
  with an offset or fractions become ``2026-12-01T16:30:00Z``
- ``report_error(e, as_json)``  one line ``blockcrypt: error: ...`` on stderr, or with ``--json``
  one JSON line ``{"error": {"code", "message", "exitCode"}}`` on stderr
- ``confirm(question, yes)``    destructive commands: ask on a terminal, refuse without one
  unless ``--yes`` was given (naming ``--yes``)
- ``out_file_opt(what)``        ``--out FILE`` of the commands that write secrets: a new 0600 file
- ``Progress``                  a bar with percentage, rate and ETA on a terminal (stderr); with
  ``--json`` at most one JSON progress event a second, as JSON lines on stderr, so stdout
  keeps exactly one JSON document

Caveat: the vault's REST API keeps Azure's wire format; only what the CLI prints is converted.
"""
from __future__ import annotations

import json
import re
import sys
import time

import click

from .._util.clock import iso_z

#: keys whose value is a point in time (Unix seconds in the vault's Azure-shaped answers)
TIME_KEYS = frozenset({"created", "updated", "nbf", "exp", "deletedDate", "scheduledPurgeDate", "time",
                       "started", "startedAt", "expiresOn", "lastCheck", "since", "at", "until",
                       "graceUntil", "checkedAt", "deletedAt"})
#: maps whose keys are data (names chosen by users), not field names: never converted
OPAQUE_KEYS = frozenset({"tags", "failed", "env", "errorsByDisk"})

_ISO_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]00:00)$")
_SNAKE_RE = re.compile(r"_([a-z0-9])")


def camel(key: str) -> str:
    """``retention_days`` -> ``retentionDays``; camelCase and single words stay as they are."""
    if "_" not in key or key.startswith("_"):
        return key
    return _SNAKE_RE.sub(lambda m: m.group(1).upper(), key)


def iso(value):
    """A timestamp in the one CLI format: ``2026-12-01T16:30:00Z`` (None stays None)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return iso_z(value)
    if isinstance(value, str):
        m = _ISO_RE.match(value)
        if m:
            return m.group(1) + "Z"
    return value


def contract(obj, key: str | None = None):
    """The CLI's JSON shape of ``obj`` (see the module docstring)."""
    if isinstance(obj, dict):
        if key in OPAQUE_KEYS:
            return {k: contract(v) for k, v in obj.items()}
        return {camel(k): contract(v, camel(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [contract(v, key) for v in obj]
    if key in TIME_KEYS and isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj > 0:
        return iso_z(obj)
    if isinstance(obj, str):
        return iso(obj)
    return obj


def dumps(obj) -> str:
    return json.dumps(contract(obj), indent=2, sort_keys=True)


def emit(obj, as_json: bool, text: str | None = None) -> None:
    """The result of a command: one JSON document (``--json``) or the text for people."""
    if as_json:
        click.echo(dumps(obj))
    elif text is not None:
        click.echo(text)


def json_line(obj, err: bool = False) -> None:
    """One compact JSON line (events of a running command: progress, a server's address)."""
    click.echo(json.dumps(contract(obj), sort_keys=True), err=err)


def wants_json(argv) -> bool:
    """Whether ``--json`` is among the command line's options (before a ``--``)."""
    for a in argv or ():
        if a == "--":
            return False
        if a == "--json":
            return True
    return False


def error_code(e) -> str:
    """The stable code of an error in JSON: its class name (``NotFound``, ``KeyPurged``, ...)."""
    return type(e).__name__.rstrip("_")


def report_error(code: str, message: str, exit_code: int, as_json: bool) -> int:
    """The one error format: one line on stderr, text or JSON. Returns the exit code."""
    message = " ".join(str(message).split())
    if as_json:
        click.echo(json.dumps({"error": {"code": code, "message": message, "exitCode": exit_code}},
                              sort_keys=True), err=True)
    else:
        click.echo(f"blockcrypt: error: {message}", err=True)
    return exit_code


def is_terminal() -> bool:
    """Someone to ask: stdin and stderr are a terminal (never in CI, a pipe or a cron job)."""
    try:
        return bool(sys.stdin and sys.stdin.isatty() and sys.stderr and sys.stderr.isatty())
    except (AttributeError, ValueError):  # closed or absent streams
        return False


def confirm(action: str, yes: bool) -> None:
    """Ask before destroying something ("delete disk vm1 and its data"): on a terminal ask (no
    means Aborted, exit 130); without a terminal refuse unless ``--yes`` was given."""
    if yes:
        return
    from ..errors import ConfirmationNeeded
    if not is_terminal():
        raise ConfirmationNeeded(action=action)
    if not click.confirm(action[:1].upper() + action[1:] + "?", default=False, err=True):
        raise click.exceptions.Abort()


def yes_opt(fn):
    return click.option("--yes", "-y", "yes", is_flag=True,
                        help="do not ask for confirmation (scripts; needed without a terminal)")(fn)


def out_file_opt(what: str, detail: str = ""):
    """``--out FILE`` of the commands that write secrets to a file (`disk dump-key`, `platform-key
    export`): required, never a directory; the command makes it a new file of mode 0600 and refuses
    an existing one (AlreadyExists: _util/fsutil.py's create_private_file)."""
    return click.option("--out", required=True, type=click.Path(dir_okay=False),
                        help=f"new file to write {what} to (mode 0600; an existing file is refused)"
                             + (f"; {detail}" if detail else ""))


def _rate(n: float) -> str:
    from .._util.units import format_size
    return f"{format_size(int(n))}/s"


def _eta(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress of long work, called as ``progress(done, total)`` (bytes, or items with
    ``unit="items"``).

    On a terminal: a bar on stderr with percentage, rate and ETA, redrawn at most 10 times a
    second. With ``--json``: JSON lines on stderr, at most one a second plus the last one:
    ``{"event": "progress", "operation", "done", "total", "unit", "percent",
    "ratePerSecond", "etaSeconds"}``. Otherwise (a pipe, a log): nothing.
    """

    def __init__(self, as_json: bool, what: str, operation: str | None = None, unit: str = "bytes"):
        self.as_json, self.what, self.unit = as_json, what, unit
        self.operation = operation or what.split()[0]
        self.tty = bool(sys.stderr) and sys.stderr.isatty()
        self._t0 = time.monotonic()
        self._last = 0.0
        self._drawn = False
        self._final = False

    def _numbers(self, done: int, total: int, now: float):
        pct = 100.0 * done / total if total else 100.0
        elapsed = max(now - self._t0, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 and total >= done else None
        return pct, rate, eta

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        last = done >= total
        if self.as_json:
            if self._final or not (last or now - self._last >= 1.0):
                return
            self._last, self._final = now, last
            pct, rate, eta = self._numbers(done, total, now)
            json_line({"event": "progress", "operation": self.operation, "done": done, "total": total,
                       "unit": self.unit, "percent": round(pct, 1), "ratePerSecond": round(rate, 1),
                       "etaSeconds": None if eta is None else round(eta, 1)}, err=True)
            return
        if not self.tty or not (last or now - self._last >= 0.1):
            return
        self._last, self._drawn = now, True
        pct, rate, eta = self._numbers(done, total, now)
        bar = "#" * int(pct // 4)
        if self.unit == "bytes":
            from .._util.units import format_size
            amount, speed = f"{format_size(done)}/{format_size(total)}", _rate(rate)
        else:
            amount, speed = f"{done}/{total}", f"{rate:.1f}/s"
        click.echo(f"\r  {self.what} [{bar:<25}] {pct:5.1f}% {amount} {speed} ETA "
                   f"{_eta(eta) if eta is not None else '--:--'}\x1b[K", nl=False, err=True)

    def done(self) -> None:
        if self._drawn:
            click.echo("", err=True)
            self._drawn = False
