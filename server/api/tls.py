"""TLS and mutual TLS credentials for the gRPC port, from PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc

from adapters.errors import InvalidArgument


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """None without a certificate (plaintext); with ``client_ca``, clients need a certificate it signed."""
    if cert is None and key is None:
        if client_ca is not None:
            raise InvalidArgument("tls_client_ca needs tls_cert and tls_key (mutual TLS runs over TLS)")
        return None
    if cert is None or key is None:
        raise InvalidArgument("TLS needs both tls_cert and tls_key (PEM files)")
    ca = _read(client_ca, "client CA bundle")
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def channel_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Client side: trust ``ca`` (default: system roots); present ``cert``/``key`` for mutual TLS."""
    if (cert is None) != (key is None):
        raise InvalidArgument("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA bundle"),
        private_key=_read(key, "client key"),
        certificate_chain=_read(cert, "client certificate"),
    )
