"""A throw-away certificate authority for TLS between test processes on loopback.

Theory of operation: :func:`make_pki` writes, into one directory, a self-signed CA and two
leaf certificates it signs -- a server certificate valid for ``127.0.0.1``, ``::1`` and
``localhost`` and a client certificate (for servers that demand one, as etcd does with
``--client-cert-auth``) -- each with its private key (P-256, unencrypted PEM, mode 0600).
:class:`~agentcluster.store._etcd_cluster.EtcdCluster` uses it to start etcd with TLS, and
the etcd backend's tests to connect to it. Nothing here is fit to protect anything: the keys
live next to the certificates in a temporary directory, and they last a day.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TestPKI", "make_jwt_keys", "make_pki"]

_VALID = datetime.timedelta(days=1)
# A clock that is a little behind the one that made the certificate must still accept it.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class TestPKI:
    """Paths of the PEM files :func:`make_pki` wrote."""

    __test__ = False  # a name pytest would otherwise try to collect

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, now: datetime.datetime
) -> x509.CertificateBuilder:
    """A certificate for ``key``'s public half, valid from a little before ``now`` for a day."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALID)
    )


def _leaf(
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), ca_name, key, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if ExtendedKeyUsageOID.SERVER_AUTH in usages:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: str | Path, *, ca_name: str = "agentcluster test CA") -> TestPKI:
    """Write a CA, a loopback server certificate and a client certificate into
    ``directory`` (created if missing); returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    issuer = _name(ca_name)
    ca = (
        _builder(issuer, issuer, ca_key, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .sign(ca_key, hashes.SHA256())
    )
    pki = TestPKI(
        ca_file=out / "ca.pem",
        server_cert=out / "server.pem",
        server_key=out / "server-key.pem",
        client_cert=out / "client.pem",
        client_key=out / "client-key.pem",
    )
    _write_cert(pki.ca_file, ca)
    # The server certificate is a client certificate too: etcd's JSON gateway dials its own
    # gRPC listener with it, and with ``--client-cert-auth`` that listener checks it as one.
    server, server_key = _leaf(
        "127.0.0.1",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        ca_key,
        issuer,
        now,
    )
    _write_cert(pki.server_cert, server)
    _write_key(pki.server_key, server_key)
    client, client_key = _leaf("client", [ExtendedKeyUsageOID.CLIENT_AUTH], ca_key, issuer, now)
    _write_cert(pki.client_cert, client)
    _write_key(pki.client_key, client_key)
    return pki


def make_jwt_keys(directory: str | Path) -> tuple[Path, Path]:
    """Write a P-256 key pair for signing ES256 tokens (etcd's ``--auth-token jwt,...``)
    into ``directory``; returns ``(private key, public key)`` paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = out / "jwt-key.pem", out / "jwt-pub.pem"
    _write_key(private, key)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public
