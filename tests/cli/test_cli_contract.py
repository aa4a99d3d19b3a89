"""The CLI as a contract, from its click tree: help text on every command and option, --json on
every command, the exit-code table of docs/CLI.md against blockcrypt/errors.py, docs/CLI.md
generated and current, the README's and docs' `blockcrypt ...` commands real (each one's
--help runs), shell completion, confirmations (--yes; a refusal without a terminal; a question
on one), progress (a bar on a terminal; JSON lines at most once a second with --json)."""
from __future__ import annotations

import inspect
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from blockcrypt import errors
from blockcrypt.cli.main import cli
from blockcrypt.cli.reference import exit_code_rows, render, walk

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).with_name("blockcrypt")
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def run(state, *args, expect=0, env=None, stdin=subprocess.DEVNULL):
    e = dict(os.environ, BLOCKCRYPT_STATE=str(state), **(env or {}))
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, env=e, timeout=120,
                       stdin=stdin)
    assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
    return p


def commands():
    return [(" ".join(p), c) for p, c in walk(cli)]


# --- help, --json -------------------------------------------------------------------------------

def test_every_command_and_option_has_help():
    missing = []
    for name, cmd in commands():
        if not (cmd.help or "").strip():
            missing.append(f"command `blockcrypt {name}`")
        for p in cmd.params:
            if isinstance(p, click.Option) and not (p.help or "").strip():
                missing.append(f"option {'/'.join(p.opts)} of `blockcrypt {name}`")
    assert not missing, "no help text: " + "; ".join(missing)


def test_every_command_takes_json():
    without = []
    for name, cmd in commands():
        runs = not isinstance(cmd, click.Group) or cmd.invoke_without_command
        if name and runs and not any(isinstance(p, click.Option) and "--json" in p.opts for p in cmd.params):
            without.append(name)
    assert not without, f"commands without --json: {without}"


# --- exit codes ---------------------------------------------------------------------------------

def _doc_exit_table() -> dict[str, int]:
    text = (REPO / "docs" / "CLI.md").read_text()
    table = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for m in re.finditer(r"^\| (\d+) \| `(\w+)` \|", table, re.M):
        rows[m.group(2)] = int(m.group(1))
    others = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \| - \|", table, re.M)}
    return rows, others


def test_exit_code_table_matches_errors_py():
    rows, others = _doc_exit_table()
    classes = {c.__name__.rstrip("_"): c.exit_code for c in vars(errors).values()
               if inspect.isclass(c) and issubclass(c, errors.BlockcryptError)}
    assert rows == classes, "docs/CLI.md's exit-code table differs from blockcrypt/errors.py (make cli-doc)"
    assert others == set(errors.OTHER_EXIT_CODES)
    # the four key failures a user must tell apart have four codes
    distinct = [errors.KeyNotFound, errors.KeyPurged, errors.KeyNotInStore, errors.KeyAccessDenied,
                errors.VaultAudienceMismatch, errors.VaultNotFound, errors.VaultForbidden, errors.VaultRequestError]
    assert len({c.exit_code for c in distinct}) == len(distinct)
    # `status` for monitoring scripts (issue 16): 50-53, one finding each, nothing else on them
    status = {errors.StatusMountDead: 50, errors.StatusDiskStopped: 51, errors.StatusDiskCorrupt: 52,
              errors.StatusServingOnGrace: 53}
    assert {c: c.exit_code for c in status} == status
    assert sorted(v for v in classes.values() if 50 <= v <= 59) == [50, 51, 52, 53]


def test_status_exits_with_the_worst_finding_in_one_line():
    """What `status` raises (mount/daemon.py problems: a StatusFinding), from the worst kind down:
    the first finding of that kind, how many more there are, and what to do about it."""
    from blockcrypt.mount.daemon import problems
    grace = {"name": "g", "state": "ServingOnGrace", "graceSecondsLeft": 41.6}
    corrupt = [{"name": "c", "state": "Corrupt", "integrityErrors": 3},
               {"name": "s", "dir": "snapshots", "state": "Corrupt", "error": {"message": "bad header"}}]
    stopped = {"name": "k", "state": "KeyUnavailable", "keyError": {"reason": "KeyDisabled"}, "serving": True}
    dead = {"id": "m2", "mountpoint": "/mnt/b", "state": "dead"}

    def mounts(*disks, more=()):
        return [{"id": "m1", "mountpoint": "/mnt/a", "state": "running",
                 "disks": [{"name": "a", "state": "open"}, *disks]}, *more]
    assert problems(mounts()) is None
    cases = [
        (mounts(grace), errors.StatusServingOnGrace,
         "disks/g serves on its grace period (42 s left); bring the key vault back before the grace period ends"),
        (mounts(grace, *corrupt), errors.StatusDiskCorrupt,
         "disks/c is corrupt (3 integrity failure(s)) (and 1 more); run `blockcrypt disk verify NAME`"),
        (mounts(grace, *corrupt[1:], stopped), errors.StatusDiskStopped,
         "disks/k serves until the next mount but its key is revoked (KeyDisabled); see its keyError and the "
         "mount log"),
        (mounts(grace, stopped, more=[dead, dict(dead, id="m3")]), errors.StatusMountDead,
         "mount m2 at /mnt/b is dead (and 1 more); clean up with `blockcrypt umount MOUNTPOINT` and mount again"),
    ]
    for ms, cls, line in cases:
        e = problems(ms)
        assert type(e) is cls and isinstance(e, errors.StatusFinding) and str(e) == line, (cls, str(e))


def test_cli_md_is_generated_and_current():
    assert (REPO / "docs" / "CLI.md").read_text() == render(), \
        "docs/CLI.md is stale: run `make cli-doc` (python -m blockcrypt.cli.reference --write docs/CLI.md)"
    assert len(exit_code_rows()) >= len(errors.OTHER_EXIT_CODES) + 30


# --- the README and docs name real commands --------------------------------------------------------



TOP = {n for n in cli.commands if n not in ("mount", "umount", "status", "init")}  # also plain words


def doc_commands():
    """(file, line, words) of every `blockcrypt SUBCOMMAND ...` in a code block or inline code."""
    out = []
    for f in DOCS:
        in_block = False
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block = not in_block
                continue
            # a command line starts a code line, an inline code span, or follows ; && | $(
            chunks = [line.strip()] if in_block else re.findall(r"`([^`]+)`", line)
            if not in_block:  # `disk copy --des ''`: a command named without its program
                chunks = ["blockcrypt " + ch if ch.split(" ", 1)[0] in TOP and " " in ch else ch for ch in chunks]
            for ch in chunks:
                for m in re.finditer(r"(?:^|[;&|(]\s*)(?:\$ )?(?:[A-Z_]+=\S+\s+)*(blockcrypt (?:--state \S+ )?(?:[a-z][\w-]*)[^#;&|)]*)",
                                     ch):
                    out.append((f.name, n, m.group(1).split()))
    return out


def resolve(words):
    """(command path, command, option words) for `blockcrypt ...` words; None if not a command."""
    cmd, path = cli, []
    rest = words[1:]
    if rest[:1] == ["--state"]:
        rest = rest[2:]
    while rest and isinstance(cmd, click.Group) and rest[0] in cmd.commands:
        cmd = cmd.commands[rest[0]]
        path.append(rest.pop(0))
    return path, cmd, [w for w in rest if w.startswith("--")]


def test_docs_commands_exist_and_their_options_too():
    found = doc_commands()
    assert len(found) >= 40, found
    bad, paths = [], set()
    for fname, n, words in found:
        if len(words) < 2 or words[1] in ("is", "and", "or", "the", "a", "can", "refuses", "keeps", "itself", "writes"):
            continue  # prose ("blockcrypt refuses ...")
        path, cmd, opts = resolve(words)
        if not path:
            bad.append(f"{fname}:{n}: `{' '.join(words[:3])}` is not a command")
            continue
        if isinstance(cmd, click.Group) and not cmd.invoke_without_command and len(words) > len(path) + 1 \
                and words[len(path) + 1] not in ("/", "|", "...", "[--json]"):
            bad.append(f"{fname}:{n}: `blockcrypt {' '.join(path)} {words[len(path) + 1]}` is not a command")
        known = {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
        known |= {"--help", "-h"} | {o for p in cli.params if isinstance(p, click.Option) for o in p.opts}
        for o in opts:
            o = o.split("=")[0].rstrip("]").rstrip(",")
            if re.fullmatch(r"--[a-z][\w-]*", o) and o not in known:
                bad.append(f"{fname}:{n}: `blockcrypt {' '.join(path)}` has no option {o}")
        paths.add(tuple(path))
    assert not bad, "\n".join(bad)
    for path in sorted(paths):  # and each one's --help runs, as a user would type it
        p = subprocess.run([str(BIN), *path, "--help"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "Usage: blockcrypt" in p.stdout, (path, p.stderr)


def test_shell_completion_is_clicks():
    p = subprocess.run([str(BIN)], env=dict(os.environ, _BLOCKCRYPT_COMPLETE="bash_source"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "complete -o nosort -F" in p.stdout and "_BLOCKCRYPT_COMPLETE" in p.stdout
    p = subprocess.run([str(BIN)], env=dict(os.environ, _BLOCKCRYPT_COMPLETE="bash_complete",
                                            COMP_WORDS="blockcrypt di", COMP_CWORD="1"),
                       capture_output=True, text=True, timeout=60)
    assert "plain,disk" in p.stdout.split()
    p = subprocess.run([str(BIN)], env=dict(os.environ, _BLOCKCRYPT_COMPLETE="bash_complete",
                                            COMP_WORDS="blockcrypt vault key pu", COMP_CWORD="3"),
                       capture_output=True, text=True, timeout=60)
    assert "plain,purge" in p.stdout.split()


# --- confirmations ----------------------------------------------------------------------------------

@pytest.fixture
def sdir(tmp_path):
    d = tmp_path / "st"
    run(d, "init")
    return d


def _on_terminal(state, args, answer: bytes, timeout_s=60):
    """Run the CLI with stdin/stdout/stderr on a pseudo-terminal; answer its question."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["BLOCKCRYPT_STATE"] = str(state)
        os.execv(str(BIN), [str(BIN), *map(str, args)])
    out, sent = b"", False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if not sent and b"[y/N]" in out:
            os.write(fd, answer)
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


DESTRUCTIVE = [
    (("disk", "create", "v", "--size", "1M"), ("disk", "delete", "v"), ("disk", "show", "v")),
    (("snapshot", "create", "base", "v"), ("snapshot", "delete", "v"), ("snapshot", "show", "v")),
    (("image", "create", "v", "--source", "base"), ("image", "delete", "v"), ("image", "show", "v")),
]


@pytest.mark.parametrize("make,delete,show", DESTRUCTIVE, ids=[d[1][0] for d in DESTRUCTIVE])
def test_destructive_commands_confirm(sdir, make, delete, show):
    run(sdir, "disk", "create", "base", "--size", "1M")
    run(sdir, *make)
    p = run(sdir, *delete, expect=2)  # no terminal, no --yes: refused, names --yes
    assert p.stderr.startswith("blockcrypt: error: ") and "--yes" in p.stderr and len(p.stderr.splitlines()) == 1
    err = json.loads(run(sdir, *delete, "--json", expect=2).stderr)
    assert err["error"]["code"] == "ConfirmationNeeded"
    run(sdir, *show)  # still there
    code, out = _on_terminal(sdir, delete, b"n\n")  # a terminal: asked; "no" changes nothing
    assert code == 130 and "[y/N]" in out and "aborted" in out, out
    run(sdir, *show)
    code, out = _on_terminal(sdir, delete, b"y\n")
    assert code == 0 and "deleted" in out, out
    run(sdir, *show, expect=3)


def test_dump_key_still_needs_its_own_flag(sdir):
    run(sdir, "disk", "create", "a", "--size", "1M")
    p = run(sdir, "disk", "dump-key", "a", "--out", sdir / "k", expect=2)
    assert "--yes-i-understand" in p.stderr


@pytest.mark.parametrize("cmd", [("disk", "dump-key", "a"), ("platform-key", "export")])
def test_secret_out_file_is_a_new_0600_file(sdir, tmp_path, cmd):
    """`disk dump-key --out` and `platform-key export --out` (one option, cli/output.py's
    out_file_opt): a new file of mode 0600 also under a umask that would take the write bit away;
    an existing file is refused and kept as it was; a directory is refused before any work."""
    run(sdir, "disk", "create", "a", "--size", "1M")
    out = tmp_path / "secret"
    old = os.umask(0o277)
    try:
        run(sdir, *cmd, "--out", out, "--yes-i-understand")
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o600 and out.stat().st_size > 0
    (tmp_path / "other").write_bytes(b"keep me")
    p = run(sdir, *cmd, "--out", tmp_path / "other", "--yes-i-understand", expect=errors.AlreadyExists.exit_code)
    assert "already exists" in p.stderr and (tmp_path / "other").read_bytes() == b"keep me"
    p = run(sdir, *cmd, "--out", tmp_path, "--yes-i-understand", expect=2)
    assert "is a directory" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# --- progress ---------------------------------------------------------------------------------------

def _filled_disk(sdir, name, size_mb):
    """A disk with size_mb MiB of data (written through the volume API, so the copy has work)."""
    run(sdir, "disk", "create", name, "--size", f"{size_mb}M")
    code = ("import os, sys\n"
            "from blockcrypt.control.state import State\n"
            "from blockcrypt.control.disks import open_volume\n"
            f"st = State.open({str(sdir)!r})\n"
            f"v = open_volume(st, {name!r})\n"
            "blk = os.urandom(1 << 20)\n"
            f"for i in range({size_mb}): v.write(i << 20, blk)\n"
            "v.close()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_copy_progress_json_is_one_document_and_at_most_one_event_a_second(sdir):
    _filled_disk(sdir, "big", 256)
    t0 = time.monotonic()
    p = run(sdir, "disk", "copy", "big", "big2", "--json")
    elapsed = time.monotonic() - t0
    doc = json.loads(p.stdout)  # stdout: one document, the copy
    assert doc["name"] == "big2"
    events = [json.loads(l) for l in p.stderr.splitlines()]
    assert events and all(e["event"] == "progress" and e["operation"] == "copy" for e in events)
    assert len(events) <= elapsed + 2, (len(events), elapsed)
    assert events[-1]["done"] == events[-1]["total"] and events[-1]["percent"] == 100.0
    p = run(sdir, "disk", "copy", "big", "big3")  # a pipe, no --json: no progress noise at all
    assert p.stderr == "" and p.stdout.strip() == "copied big to big3"


def test_progress_bar_on_a_terminal(sdir):
    _filled_disk(sdir, "big", 64)
    code, out = _on_terminal(sdir, ("disk", "copy", "big", "big2"), b"")
    assert code == 0, out
    assert re.search(r"copying big \[#+ *\] +100\.0% ", out), out
    assert "/s ETA" in out and "copied big to big2" in out
    code, out = _on_terminal(sdir, ("disk", "verify", "big"), b"")
    assert code == 0 and "100.0%" in out and "ETA" in out, out


def test_rotation_progress_counts_disks(sdir):
    for n in ("r1", "r2", "r3"):
        run(sdir, "disk", "create", n, "--size", "1M")
    p = run(sdir, "platform-key", "rotate", "--json")
    assert sorted(json.loads(p.stdout)["rewrapped"]) == ["r1", "r2", "r3"]
    events = [json.loads(l) for l in p.stderr.splitlines()]
    assert events and all(e["operation"] == "platform-key rotate" and e["unit"] == "disks" for e in events)
    assert events[-1]["done"] == events[-1]["total"] == 3 and len(events) <= 3
