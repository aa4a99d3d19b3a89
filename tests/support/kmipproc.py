"""A real PyKMIP server (`pykmip-server`, test-only by its own docs) on 127.0.0.1 over TLS with client
certificates, for tests: a CA, a server certificate and client certificates made with `cryptography`.

PyKMIP names a client by its certificate's common name; objects belong to their creator and the
default operation policy lets only the owner use them, so a certificate with another common name is
a client without access."""
from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


class TestPki:
    def __init__(self, d: Path):
        self.dir = Path(d)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca = (x509.CertificateBuilder().subject_name(_name("blockcrypt test CA")).issuer_name(_name("blockcrypt test CA"))
                   .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(self.ca_key, hashes.SHA256()))
        self.ca_path = self.dir / "ca.pem"
        self.ca_path.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            import ipaddress
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        cert = b.sign(self.ca_key, hashes.SHA256())
        cp, kp = self.dir / f"{cn}.crt", self.dir / f"{cn}.key"
        cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, kp)
        return cp, kp


class KmipProcess:
    def __init__(self, d: Path):
        self.dir = Path(d)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = TestPki(self.dir / "pki")
        self.server_cert, self.server_key = self.pki.issue("127.0.0.1", server=True)
        self.port = free_port()
        self.proc = None
        self.log_path = self.dir / "server.log"
        (self.dir / "policies").mkdir(exist_ok=True)
        conf = self.dir / "server.conf"
        conf.write_text("[server]\nhostname=127.0.0.1\nport=%d\ncertificate_path=%s\nkey_path=%s\nca_path=%s\n"
                        "auth_suite=TLS1.2\npolicy_path=%s\nenable_tls_client_auth=True\nlogging_level=INFO\n"
                        "database_path=%s\n" % (self.port, self.server_cert, self.server_key, self.pki.ca_path,
                                               self.dir / "policies", self.dir / "kmip.db"))
        self.conf = conf

    def start(self, timeout_s: float = 30.0) -> "KmipProcess":
        exe = Path(sys.executable).parent / "pykmip-server"
        log = open(self.dir / "stdout.log", "ab")
        # its own process group: PyKMIP serves each connection in a child process, which would
        # outlive a signal sent to the server alone
        self.proc = subprocess.Popen([str(exe), "-f", str(self.conf), "-l", str(self.log_path)],
                                     stdout=log, stderr=log, cwd=self.dir, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pykmip-server exited {self.proc.returncode}: "
                                     f"{(self.dir / 'stdout.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("pykmip-server did not come up")

    def stop(self):
        """Stop the server and every connection process it forked (its process group)."""
        if self.proc is None:
            return
        pgid = self.proc.pid   # start_new_session: the group id is the server's pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            os.killpg(pgid, signal.SIGKILL)   # connection processes left behind
        except ProcessLookupError:
            pass
        self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def client(self, cert: Path, key: Path):
        from kmip.pie.client import ProxyKmipClient
        return ProxyKmipClient(hostname="127.0.0.1", port=self.port, cert=str(cert), key=str(key),
                               ca=str(self.pki.ca_path), config_file="/dev/null")
