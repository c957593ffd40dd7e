"""The TLS the gRPC server serves: its certificate and, for mutual TLS, the client CA."""

from __future__ import annotations

from pathlib import Path

import grpc

from events_server.server.settings import Settings


class TlsFilesError(ValueError):
    """A configured certificate, key or CA file cannot be read."""


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TlsFilesError(f"{setting}: cannot read {path!r}: {error.strerror or error}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext (no certificate configured).

    With a client CA every caller must present a certificate it signed (the handshake
    fails otherwise). The files are read once: a renewed certificate needs a restart.
    """
    if not settings.tls_cert_file:
        return None
    chain = _read(settings.tls_cert_file, "EVENTS_TLS_CERT_FILE")
    key = _read(settings.tls_key_file, "EVENTS_TLS_KEY_FILE")
    client_ca = (
        _read(settings.tls_client_ca_file, "EVENTS_TLS_CLIENT_CA_FILE")
        if settings.tls_client_ca_file
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
