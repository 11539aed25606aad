"""How the etcd backend reaches its endpoints: schemes, TLS material, channel options.

Theory of operation: :func:`plan` turns what the caller gave -- endpoints and, optionally, a
CA file, a client certificate and key, a server name -- into one :class:`ConnPlan`: gRPC
targets (``host:port``) and the channel credentials every endpoint shares (``None``: plain
text). It decides once, up front, and refuses what cannot be meant: ``http://`` and
``https://`` endpoints mixed, TLS files beside ``http://`` endpoints, a certificate without
its key, a file that cannot be read or holds no PEM of the right kind. Bare ``host:port``
endpoints use TLS when TLS files are given (as etcdctl does) and plain text otherwise; an
``https://`` endpoint without a CA file trusts the system's roots. A bad file thus fails at
construction with a message naming it, not later as an opaque handshake failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["ConnPlan", "plan"]


@dataclass(frozen=True)
class ConnPlan:
    targets: list[str]
    credentials: Any  # grpc.ChannelCredentials, or None for plain text
    options: list[tuple[str, Any]]

    @property
    def tls(self) -> bool:
        return self.credentials is not None


def _split(endpoint: str) -> tuple[str | None, str]:
    endpoint = endpoint.strip()
    scheme: str | None = None
    for prefix in ("http://", "https://"):
        if endpoint.startswith(prefix):
            scheme, endpoint = prefix[:-3], endpoint[len(prefix) :]
            break
    if "://" in endpoint:
        raise ValueError(f"etcd endpoints are host:port, http:// or https://, not {endpoint!r}")
    endpoint = endpoint.rstrip("/")
    if not endpoint:
        raise ValueError("empty etcd endpoint")
    return scheme, endpoint


def _read(what: str, path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the etcd {what} file {str(path)!r}: {exc.strerror}") from exc


def _certs(what: str, path: str | Path) -> bytes:
    data = _read(what, path)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"the etcd {what} file {str(path)!r} holds no PEM certificate") from exc
    return data


def _key(path: str | Path) -> bytes:
    data = _read("client key", path)
    try:
        serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: the key is encrypted; gRPC cannot ask for a passphrase.
        raise ValueError(
            f"the etcd client key file {str(path)!r} holds no unencrypted PEM private key"
        ) from exc
    return data


def plan(
    endpoints: Sequence[str],
    *,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    server_name: str | None = None,
    base_options: Sequence[tuple[str, Any]] = (),
) -> ConnPlan:
    """See the module docstring; raises ValueError for anything inconsistent."""
    split = [_split(e) for e in endpoints]
    if not split:
        raise ValueError("the etcd backend needs at least one endpoint")
    schemes = {scheme for scheme, _ in split if scheme is not None}
    if len(schemes) > 1:
        raise ValueError("etcd endpoints mix http:// and https://; use one scheme for all")
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key: give cert_file and key_file")
    files = ca_file is not None or cert_file is not None
    if schemes == {"http"} and (files or server_name is not None):
        raise ValueError(
            "TLS options were given but the etcd endpoints are http://; use https:// (or "
            "host:port) endpoints"
        )
    tls = schemes == {"https"} or files
    options = list(base_options)
    if not tls:
        if server_name is not None:
            raise ValueError("server_name only applies to TLS endpoints")
        return ConnPlan([target for _, target in split], None, options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_certs("CA", ca_file) if ca_file is not None else None,
        private_key=_key(key_file) if key_file is not None else None,
        certificate_chain=_certs("client certificate", cert_file)
        if cert_file is not None
        else None,
    )
    if server_name is not None:
        # The name the server's certificate must carry, when the endpoints are addresses.
        options.append(("grpc.ssl_target_name_override", server_name))
    return ConnPlan([target for _, target in split], credentials, options)
