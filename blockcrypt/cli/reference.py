"""docs/CLI.md, generated from the click tree and blockcrypt/errors.py so it cannot drift.

``python -m blockcrypt.cli.reference --write docs/CLI.md`` (``make cli-doc``) rewrites it;
tests/cli/test_contract.py fails when the file differs from ``render()``.

Caveat: the conventions section below is prose kept here, beside the code it describes
(cli/output.py); edit it here, not in docs/CLI.md.
"""
from __future__ import annotations

import inspect
import sys

import click

from .. import errors

CONVENTIONS = """\
# The blockcrypt command line

This file is generated from the command tree (`blockcrypt/cli/`) and the error classes
(`blockcrypt/errors.py`) by `make cli-doc`; a test fails when it is stale. Do not edit it
by hand: edit `blockcrypt/cli/reference.py` or the commands' help text.

## The contract

Scripts may rely on everything in this section; it changes only with a major version.

- **Output.** Every command takes `--json`. With it, stdout carries exactly one JSON
  document (an object, or a list for listings), and nothing else. Keys are camelCase
  (`sizeBytes`, `retentionDays`, `clientId`); names inside maps keyed by data (`tags`,
  `failed`, `disk check`'s header copies `A`/`B`) are kept as given. Numbers are JSON numbers (never strings). Every timestamp
  is ISO 8601 UTC to the second: `2026-12-01T16:30:00Z`. A thing has one shape wherever
  it appears (a disk encryption set's `activeKey` is always `{"keyUrl", "sourceKeyUrl"}`).
  The one exception is `vault audit --json`, a log: JSON Lines, one record (an object of
  the same contract) a line. The vault's REST API keeps Azure Key Vault's wire format (Unix
  times, its field names); only what the CLI prints follows this contract.
- **Errors.** A failure prints one line on stderr, `blockcrypt: error: WHAT HAPPENED; WHAT
  TO DO`, and exits with the code of the table below; no traceback, no upstream
  boilerplate. With `--json` that line is a JSON object instead:
  `{"error": {"code": "NotFound", "message": "...", "exitCode": 3}}` where `code` is the
  error class of the table.
- **Progress.** Long work (`disk copy`, `disk verify`, `disk export`, `disk create
  --source`, `platform-key rotate`, `des rotate`, `des update`) draws a bar on a terminal
  (stderr) with percentage, rate and ETA. With `--json` it writes at most one JSON line a
  second (and the last one) on **stderr**:
  `{"event": "progress", "operation": "copy", "done": 4194304, "total": 8589934592,
  "unit": "bytes", "percent": 0.0, "ratePerSecond": 1.2e8, "etaSeconds": 71.0}`, so stdout
  keeps its one document. On a pipe without `--json`: no progress at all.
- **Confirmations.** Destructive commands (`disk delete`, `snapshot delete`, `image
  delete`, `des delete`, `vault key purge`, `vault identity delete`) ask on a terminal and
  take `--yes` (`-y`) for scripts. Without a terminal and without `--yes` they refuse
  (`ConfirmationNeeded`, exit 2) and change nothing. `disk dump-key` always needs
  `--yes-i-understand`.
- **Defaults.** The state directory is `--state`, else `$BLOCKCRYPT_STATE`, else
  `/var/lib/blockcrypt`. The vault directory is `--dir`, else `$BLOCKCRYPT_VAULT_DIR`, else
  the state directory's path with `-vault` appended (`/var/lib/blockcrypt-vault`). The
  vault URL of `vault key` commands is `--url`, else `$BLOCKCRYPT_VAULT_URL`, else the
  running vault's `serve.json`.
- **Shell completion** (click's): `eval "$(_BLOCKCRYPT_COMPLETE=bash_source blockcrypt)"` in
  `~/.bashrc` (`zsh_source` for zsh, `fish_source` for fish).
"""


def _error_classes():
    out = []
    for name, cls in vars(errors).items():
        if inspect.isclass(cls) and issubclass(cls, errors.BlockcryptError):
            out.append(cls)
    return out


#: what the classes whose template is only ``{msg}`` stand for
MEANINGS = {
    "BlockcryptError": "a failure of blockcrypt's own (the root class; the message says what)",
    "UsageError": "bad usage: a missing or invalid option or argument",
    "Refused": "refused: the operation would lose data or break a rule (the message says why and what to do)",
    "Busy": "in use: a disk open in a mount or by another writer (the message names it)",
    "MountError": "the mount daemon did not start or stop (the message names its log)",
    "VaultRequestError": "the vault refused a request (bad parameter, conflict); the message carries its reason",
    "VaultApiError": "the vault server's own error answer (inside the server; a client sees VaultRequestError)",
    "TokenInvalid": "a bearer token the vault server refuses (inside the server; a client sees 401)",
    "VaultNotFound": "the vault has no such key (or deleted key): the message names it and how to list them",
    "VaultForbidden": "the vault forbids the operation (purge protection, a disabled key, missing permission)",
    "StatusFinding": "the base of `status`'s findings (50-53), never raised itself",
}


def exit_code_rows() -> list[tuple[int, str, str]]:
    """(exit code, code, meaning) for every error class and every other exit code."""
    rows = []
    for cls in _error_classes():
        doc = " ".join((cls.__doc__ or "").split())
        meaning = doc if doc != "{msg}" else MEANINGS.get(cls.__name__, "(the message says what)")
        rows.append((cls.exit_code, cls.__name__.rstrip("_"), meaning))
    for code, meaning in errors.OTHER_EXIT_CODES.items():
        rows.append((code, "-", meaning))
    return sorted(rows, key=lambda r: (r[0], r[1] != "-", r[1]))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _exit_table() -> str:
    lines = ["## Exit codes", "",
             "`code` is the `error.code` of `--json` errors (the class in `blockcrypt/errors.py`); "
             "a message template's `{fields}` are filled in at the time of the error.", "",
             "| exit | code | meaning |", "|---:|---|---|"]
    for code, name, meaning in exit_code_rows():
        lines.append(f"| {code} | {'`' + name + '`' if name != '-' else '-'} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def walk(cmd: click.Command, path=()):
    """(path, command) for ``cmd`` and every command under it, in order."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from walk(cmd.commands[name], path + (name,))


def _option_line(p: click.Parameter) -> str:
    if isinstance(p, click.Argument):
        return ""
    names = ", ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts))
    extra = []
    if isinstance(p.type, click.Choice):
        extra.append("one of " + ", ".join(f"`{c}`" for c in p.type.choices))
    if getattr(p, "show_default", False) and p.default not in (None, False, ()):
        extra.append(f"default `{p.default}`")
    if getattr(p, "envvar", None):
        extra.append(f"env `{p.envvar}`")
    if getattr(p, "required", False):
        extra.append("required")
    help_text = " ".join((getattr(p, "help", None) or "").split())
    tail = f" ({'; '.join(extra)})" if extra else ""
    return f"| {names} | {_cell(help_text)}{_cell(tail)} |"


def _command_section(path, cmd: click.Command) -> str:
    ctx = click.Context(cmd, info_name=" ".join(("blockcrypt", *path)))
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    title = " ".join(("blockcrypt", *path))
    lines = [f"### `{title}`", "", f"    {title} {usage}", ""]
    help_text = inspect.cleandoc(cmd.help or "")
    if help_text:
        lines += [help_text, ""]
    opts = [_option_line(p) for p in cmd.params if not isinstance(p, click.Argument)]
    opts = [o for o in opts if o]
    if opts:
        lines += ["| option | meaning |", "|---|---|", *opts, ""]
    if isinstance(cmd, click.Group):
        lines += ["Commands: " + ", ".join(f"`{n}`" for n in sorted(cmd.commands)), ""]
    return "\n".join(lines)


def render() -> str:
    from .main import cli
    parts = [CONVENTIONS, _exit_table(), "## Commands\n"]
    for path, cmd in walk(cli):
        parts.append(_command_section(path, cmd))
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if len(argv) == 2 and argv[0] == "--write":
        with open(argv[1], "w") as f:
            f.write(text)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
