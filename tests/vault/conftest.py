"""Fixtures for the vault tests: a vault directory made by `vault init` and a
real `vault serve` subprocess on 127.0.0.1 (free port, HTTPS), stopped by the
fixture that started it, even when the test fails."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def vault_cli(*args, check=True, env=None, timeout=60):
    """Run `python -m blockcrypt.vault.cli ARGS`; returns CompletedProcess (text)."""
    p = subprocess.run([PY, "-m", "blockcrypt.vault.cli", *map(str, args)], cwd=REPO, capture_output=True,
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
        self.proc = subprocess.Popen([PY, "-m", "blockcrypt.vault.cli", "serve", "--dir", str(self.dir),
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


def make_vault(path: Path, *args) -> Path:
    vault_cli("init", "--dir", path, *args)
    return path


@pytest.fixture
def vault_factory(tmp_path):
    started: list[VaultProcess] = []

    def make(*init_args, serve_args=(), name="vault"):
        d = make_vault(tmp_path / name, *init_args)
        v = VaultProcess(d, serve_args).start()
        started.append(v)
        return v
    yield make
    for v in started:
        v.stop()


@pytest.fixture(scope="module")
def shared_vault(tmp_path_factory):
    """One purge-protected vault (retention 7 days) for a module's tests."""
    d = make_vault(tmp_path_factory.mktemp("vault") / "v", "--retention-days", "7", "--purge-protection")
    v = VaultProcess(d).start()
    yield v
    v.stop()


@pytest.fixture(scope="module")
def plain_vault(tmp_path_factory):
    """A vault without purge protection (purge allowed at once)."""
    d = make_vault(tmp_path_factory.mktemp("vault") / "p", "--retention-days", "7")
    v = VaultProcess(d).start()
    yield v
    v.stop()
