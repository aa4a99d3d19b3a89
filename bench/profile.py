"""Summaries of py-spy collapsed stacks (``py-spy record --format raw``): where a daemon's time goes.

    python -m bench.profile FILE [FILE...]    # top functions, self and inclusive

Only samples taken inside a FUSE request (below fusepy's callback wrapper)
count. Self time is the innermost Python frame of a sample (time in a C extension or a
system call shows up as the Python function that called it); inclusive time
counts a function once per sample that has it anywhere on its stack.

Caveats: py-spy samples without --idle skip threads it judges idle (blocked in
read(/dev/fuse)), so percentages are of *busy* samples; without --native, the
native XTS core and libfuse's C loop are folded into their Python callers.
"""
from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_THREAD = re.compile(r"^(thread \(|process \d+)")


REQUEST_FRAME = "FUSE._wrapper (fuse.py)"  # every FUSE request enters Python here


def parse(path: Path, requests_only: bool = True) -> tuple[Counter, Counter, int]:
    """(self samples, inclusive samples, total samples) per 'function (file)'.

    `requests_only` keeps the samples taken inside a FUSE request (below fusepy's
    callback wrapper) and drops background threads and libfuse's own loop.
    """
    self_c: Counter = Counter()
    incl_c: Counter = Counter()
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not _THREAD.match(f)]
        if not frames or (requests_only and REQUEST_FRAME not in frames):
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    return self_c, incl_c, total


def area(frame: str) -> str:
    """Coarse owner of a frame: which file or library the time belongs to."""
    if frame.startswith("FUSE.__init__ "):
        return "libfuse loop (C; mostly waiting)"
    m = re.search(r"\(([^)]*)\)\s*$", frame)
    src = m.group(1) if m else frame
    for key, name in (("fuse.py", "fusepy"), ("fusefs.py", "blockcrypt/fusefs.py"),
                      ("volume.py", "blockcrypt/volume.py"), ("backing.py", "blockcrypt/backing.py"),
                      ("crypto", "blockcrypt/crypto"), ("threading.py", "threading"),
                      ("logging", "logging")):
        if key in src:
            return name
    return src


def summary_text(path: Path, top_n: int = 15) -> str:
    try:
        self_c, incl_c, total = parse(path)
    except OSError as e:
        return f"profile {path}: unreadable ({e.strerror})"
    if not total:
        return f"profile {path}: no samples"
    _, _, everything = parse(path, requests_only=False)
    lines = [f"profile {Path(path).name}: {total} samples inside FUSE requests "
             f"({everything - total} elsewhere: libfuse loop, background threads)"]
    by_area: Counter = Counter()
    for f, n in self_c.items():
        by_area[area(f)] += n
    lines.append("  self time by area: " + ", ".join(f"{a} {100 * n / total:.0f}%"
                                                   for a, n in by_area.most_common(6)))
    lines.append("  self      incl      function")
    for f, n in self_c.most_common(top_n):
        lines.append(f"  {100 * n / total:5.1f}%   {100 * incl_c[f] / total:5.1f}%   {f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m bench.profile FILE [FILE...]", file=sys.stderr)
        return 2
    for p in argv:
        print(summary_text(Path(p)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
