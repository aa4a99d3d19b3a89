"""A real `blockcrypt vault serve` subprocess on 127.0.0.1 (HTTPS, free port), for tests outside tests/vault."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def vault_cli(*args, check=True, timeout=60):
    p = subprocess.run([sys.executable, "-m", "blockcrypt.vault.cli", *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if check and p.returncode != 0:
        raise AssertionError(f"vault {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p


class Vault:
    def __init__(self, vault_dir: Path):
        self.dir = Path(vault_dir)
        self.proc = None
        self.url = None
        self.listen = "127.0.0.1:0"

    def start(self, timeout_s: float = 20.0):
        log = open(self.dir.parent / f"serve-{self.dir.name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "blockcrypt.vault.cli", "serve", "--dir", str(self.dir),
                                      "--listen", self.listen], cwd=REPO, stdout=subprocess.PIPE, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(b"vault listening on "):
                self.url = line.decode().split()[-1]
                self.listen = self.url.split("://", 1)[1]  # restart on the same port
                return self
            if self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError("vault serve did not start")

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

    def cli(self, *args, check=True):
        return vault_cli(*args, "--dir", self.dir, check=check)

    def key(self, *args, check=True):
        p = vault_cli("key", *args, "--dir", self.dir, "--json", check=check)
        return json.loads(p.stdout) if check and p.stdout.strip() else p

    def admin_client(self):
        from blockcrypt.vault.client import VaultClient
        return VaultClient.for_admin(self.dir, self.url)


def make_vault(path: Path, *init_args) -> Vault:
    vault_cli("init", "--dir", path, *init_args)
    return Vault(path)
