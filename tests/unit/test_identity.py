"""Service identity's parts: which peers and addresses are on this host, the start-up
warning, the modes, and the shared token as both processes read it."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from events_server.server.identity import BridgeIdentity
from events_server.server.settings import Settings
from events_server.wire.addresses import is_local_address, is_local_peer
from rest_bridge.cli import settings_to_env
from rest_bridge.config import BridgeSettings

TOKEN = "the-tests-bridge-token-" + "x" * 16


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.8.0.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/run/events.sock", True),
        ("unix:", True),
        ("ipv4:10.0.0.7:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("ipv6:[fe80::1%eth0]:5000", False),
        ("", False),
    ],
)
def test_which_peers_are_on_this_host(peer: str, local: bool) -> None:
    assert is_local_peer(peer) is local


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/run/events.sock", True),
        ("dns:///localhost:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("events.internal:50051", False),
        ("10.0.0.7:50051", False),
    ],
)
def test_which_addresses_are_on_this_host(address: str, local: bool) -> None:
    assert is_local_address(address) is local


def test_a_server_open_to_other_hosts_without_an_identity_warns() -> None:
    warning = BridgeIdentity().startup_warning("0.0.0.0:50051")
    assert warning is not None
    assert "no bridge identity is configured" in warning
    assert BridgeIdentity().startup_warning("127.0.0.1:50051") is None
    assert BridgeIdentity(token=TOKEN).startup_warning("0.0.0.0:50051") is None
    assert BridgeIdentity(client_certificates=True).startup_warning("[::]:50051") is None


def test_identity_modes_are_described() -> None:
    assert BridgeIdentity().mode == "loopback"
    assert BridgeIdentity(token=TOKEN).mode == "token"
    assert BridgeIdentity(token=TOKEN, client_certificates=True).mode == "mtls+token"
    named = BridgeIdentity(client_certificates=True, names=["bridge.internal"])
    assert "bridge.internal" in named.describe()


def test_the_token_must_be_long_and_printable() -> None:
    with pytest.raises(ValidationError, match="at least 16 printable ASCII"):
        Settings(bridge_token="short")
    with pytest.raises(ValidationError, match="at least 16 printable ASCII"):
        BridgeSettings(bridge_token="é" * 20)
    assert Settings(bridge_token="").bridge_token is None  # empty: unset
    token = BridgeSettings(bridge_token=TOKEN).bridge_token
    assert isinstance(token, SecretStr)
    assert TOKEN not in repr(BridgeSettings(bridge_token=TOKEN))


def test_bridge_workers_get_the_token_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = BridgeSettings(bridge_token=TOKEN, grpc_target="127.0.0.1:1")
    for name, value in settings_to_env(settings).items():
        monkeypatch.setenv(name, value)
    again = BridgeSettings()
    assert again.bridge_token is not None
    assert again.bridge_token.get_secret_value() == TOKEN
    assert again == settings
