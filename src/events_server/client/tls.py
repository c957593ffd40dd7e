"""TLS to the gRPC server, as its callers set it up: the Python client and the REST bridge."""

from __future__ import annotations

from pathlib import Path

import grpc

PathLike = str | Path


def read_pem(path: PathLike, what: str) -> bytes:
    """A PEM file's bytes; ValueError naming the setting when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {what} {str(path)!r}: {error.strerror or error}") from None


def channel_credentials(
    ca_file: PathLike | None = None,
    cert_file: PathLike | None = None,
    key_file: PathLike | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials that verify the server against ``ca_file`` (gRPC's default roots when
    None) and, given ``cert_file`` and ``key_file``, present that client certificate (mTLS).

    The files are read once, here: ValueError when one cannot be, or only one of the client
    certificate and its key is given.
    """
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, "CA file") if ca_file else None,
        private_key=read_pem(key_file, "client key file") if key_file else None,
        certificate_chain=read_pem(cert_file, "client certificate file") if cert_file else None,
    )


def name_options(server_name: str | None) -> list[tuple[str, str]]:
    """Channel options checking the server's certificate for ``server_name`` instead of the
    target's host (for a target given as an IP address, or behind a load balancer)."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []
