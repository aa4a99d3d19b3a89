"""A real `blockcrypt vault serve` subprocess on 127.0.0.1 (HTTPS, free port) for tests, and the
`vault` CLI run as a user runs it. Shared by tests/vault and tests/cmk."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def vault_cli(*args, check=True, env=None, timeout=60):
    """Run `python -m blockcrypt vault ARGS`; returns CompletedProcess (text)."""
    p = subprocess.run([PY, "-m", "blockcrypt", "vault", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"vault {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p


class VaultProcess:
    def __init__(self, vault_dir: Path, extra=()):
        self.dir = Path(vault_dir)
        self.extra = tuple(extra)
        self.proc = None
        self.url = None

    def start(self, timeout_s: float = 20.0, listen: str = "127.0.0.1:0"):
        log = open(self.dir.parent / f"serve-{self.dir.name}.log", "ab")
        self.proc = subprocess.Popen([PY, "-m", "blockcrypt", "vault", "serve", "--dir", str(self.dir),
                                      "--listen", listen, *self.extra], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=log)
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(b"vault listening on "):
                self.url = line.decode().split()[-1]
                return self
            if self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"vault serve did not start: {line!r}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def admin(self) -> dict:
        return json.loads((self.dir / "admin.json").read_text())

    def restart(self):
        """Stop and serve again on the same port (tokens and key URLs stay valid)."""
        self.stop()
        return self.start(listen=f"127.0.0.1:{self.port}")

    def cli(self, *args, check=True):
        return vault_cli(*args, "--dir", self.dir, check=check)

    def key(self, *args, check=True):
        """`vault key ARGS --json` as the admin identity; the parsed JSON (or the process on failure)."""
        p = vault_cli("key", *args, "--dir", self.dir, "--json", check=check)
        return json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else p


def make_vault(path: Path, *args) -> Path:
    vault_cli("init", "--dir", path, *args)
    return path
