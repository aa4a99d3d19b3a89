"""TLS material for the vault: a private CA and a server certificate it signs,
or the operator's own certificate and key.

Both private keys are stored as PEM encrypted under a password derived from
the vault's master key, so a copy of the directory without ``master.key``
does not yield them.

Caveats: certificates are valid for 825 days and are not renewed
automatically; the SAN list is fixed at init (127.0.0.1, ::1, localhost and
any ``--san`` given).
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ...errors import UsageError
from .store import write_private

CERT_DAYS = 825


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "blockcrypt vault"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(entries) -> x509.SubjectAlternativeName:
    out = []
    for s in entries:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            out.append(x509.DNSName(s))
    return x509.SubjectAlternativeName(out)


def make_ca_and_server(vault_dir: Path, password: bytes, extra_sans=()) -> None:
    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("blockcrypt vault CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans = ["127.0.0.1", "::1", "localhost", *extra_sans]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("blockcrypt vault")).issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    enc = serialization.BestAvailableEncryption(password)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    write_private(vault_dir / "ca.key", ca_key.private_bytes(pem, pkcs8, enc))
    write_private(vault_dir / "server.key", srv_key.private_bytes(pem, pkcs8, enc))
    (vault_dir / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (vault_dir / "server.pem").write_bytes(srv_cert.public_bytes(pem) + ca_cert.public_bytes(pem))


def adopt_server_cert(vault_dir: Path, password: bytes, cert_file: str, key_file: str) -> None:
    """Use the operator's certificate chain and key (re-encrypted under the vault's password)."""
    try:
        chain = Path(cert_file).read_bytes()
        x509.load_pem_x509_certificates(chain)
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot use the given certificate/key: {e}") from None
    enc = serialization.BestAvailableEncryption(password)
    write_private(vault_dir / "server.key",
                  key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    (vault_dir / "server.pem").write_bytes(chain)
    # Clients trust the last certificate of the chain (the operator's CA, or the leaf if self-signed).
    certs = x509.load_pem_x509_certificates(chain)
    (vault_dir / "ca.pem").write_bytes(certs[-1].public_bytes(serialization.Encoding.PEM))
