"""The blockcrypt console script on a state directory given by path, as an operator runs it
(no terminal on stdin), with its exit code checked and an error kept to one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).with_name("blockcrypt")


def bc(state_dir, *args, expect: int = 0) -> subprocess.CompletedProcess:
    e = dict(os.environ, BLOCKCRYPT_STATE=str(state_dir))
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, env=e, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
    if expect != 0:
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("blockcrypt: error: "), p.stderr
    return p


def bcj(state_dir, *args):
    return json.loads(bc(state_dir, *args, "--json").stdout)
