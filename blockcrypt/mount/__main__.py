"""``python -m blockcrypt.mount serve ...``: the mount daemon's entry point (started by
``blockcrypt mount``; see daemon.py).

Caveat: an internal interface: its options may change with the daemon.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..errors import BlockcryptError
from ..control.tempdisks import parse_specs
from .daemon import serve
from .temp_source import TempConfig


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blockcrypt.mount")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run a mount daemon (used by `blockcrypt mount`)")
    s.add_argument("--state", required=True)
    s.add_argument("--mountpoint", required=True)
    s.add_argument("--id", required=True)
    s.add_argument("--ready-fd", type=int)
    s.add_argument("--daemon", action="store_true")
    s.add_argument("--allow-other", action="store_true")
    s.add_argument("--bench-null-cipher", action="store_true")
    s.add_argument("--frontend", default="native")
    s.add_argument("--backing-cache", default="buffered")
    s.add_argument("--temp-disk", action="append", default=[])
    s.add_argument("--temp-dir")
    s.add_argument("--encryption-at-host", action="store_true")
    s.add_argument("--metrics")
    s.add_argument("--metrics-allow-remote", action="store_true")
    a = ap.parse_args(argv)
    if a.daemon:
        if os.fork() > 0:
            os._exit(0)  # the daemon is re-parented to init; `mount` reaps this process
        try:
            os.setsid()
        except OSError:
            pass
        os.chdir("/")
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        temp = None
        if a.temp_dir is not None:  # `blockcrypt mount` resolved options and settings already
            temp = TempConfig(tuple(parse_specs(a.temp_disk)), a.temp_dir, a.encryption_at_host)
        serve(a.state, a.mountpoint, a.id, allow_other=a.allow_other, null_cipher=a.bench_null_cipher,
              frontend=a.frontend, backing_cache=a.backing_cache, temp=temp, ready_fd=a.ready_fd,
              metrics=a.metrics, metrics_allow_remote=a.metrics_allow_remote)
    except BlockcryptError as e:
        logging.getLogger("blockcrypt.mount").error("mount failed: %s", e)
        print(f"blockcrypt: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_main())
