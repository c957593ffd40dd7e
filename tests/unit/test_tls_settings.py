"""TLS settings refused at start-up, in both processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from events_server.server.settings import Settings
from rest_bridge.config import BridgeSettings


def test_server_tls_settings_go_together() -> None:
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file"):
        Settings(tls_cert_file="/etc/events/server.pem")
    with pytest.raises(ValidationError, match="needs tls_cert_file"):
        Settings(tls_client_ca_file="/etc/events/clients-ca.pem")
    with pytest.raises(ValidationError, match="needs tls_client_ca_file"):
        Settings(tls_bridge_names="bridge.events.internal")
    named = Settings(
        tls_cert_file="s.pem",
        tls_key_file="s.key",
        tls_client_ca_file="ca.pem",
        tls_bridge_names=" bridge-a.internal, bridge-b.internal ,",
    )
    assert named.tls_bridge_names == ("bridge-a.internal", "bridge-b.internal")


def test_bridge_tls_files_must_be_readable_and_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="grpc_ca_file: cannot read"):
        BridgeSettings(grpc_ca_file=str(tmp_path / "missing.pem"))
    pem = tmp_path / "bridge.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ValidationError, match="go together"):
        BridgeSettings(http_tls_cert_file=str(pem))
    with pytest.raises(ValidationError, match="go together"):
        BridgeSettings(grpc_client_cert_file=str(pem))
    with pytest.raises(ValidationError, match="needs http_tls_cert_file"):
        BridgeSettings(http_tls_client_ca_file=str(pem))
    assert BridgeSettings(grpc_ca_file=str(pem)).grpc_secure
    assert BridgeSettings(grpc_tls=True).grpc_secure
    assert not BridgeSettings().grpc_secure
