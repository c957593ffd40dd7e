"""TLS everywhere it can be asked for: the gRPC port (TLS, mutual TLS and the bridge known by
its certificate), the bridge's HTTPS, the Python client, and Redis over rediss://.

Every certificate comes from throwaway CAs (trustme): ``ca`` signs the servers',
``client_ca`` the callers' (the bridge's and another service's), and ``wrong_ca`` is
trusted by nobody.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import redis
import trustme

from events_server.client import SyncEventsClient, UnavailableError
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from rest_bridge.config import BridgeSettings
from tests.tls_support import (
    STOREFRONT,
    BridgeThread,
    Loop,
    Pem,
    TlsFront,
    ca_file,
    envelopes,
    issue,
    register_storefront,
    server_settings,
    serving,
)

BRIDGE_NAME = "bridge.events.internal"
BODY = [{"tenant": "shop-a", "market": "us", "type": "page_view", "user_id": "u-1"}]


@dataclass(frozen=True)
class Pki:
    """The tests' certificates, as files."""

    ca: Path
    server: Pem
    """localhost and 127.0.0.1, signed by ``ca``."""
    renamed: Pem
    """events.internal only, signed by ``ca``."""
    client_ca: Path
    bridge: Pem
    """The bridge's client certificate (BRIDGE_NAME), signed by ``client_ca``."""
    service: Pem
    """Another caller's client certificate, signed by ``client_ca``."""
    wrong_ca: Path
    stranger: Pem
    """Named as the bridge, but signed by ``wrong_ca``."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, client_ca, wrong_ca = trustme.CA(), trustme.CA(), trustme.CA()
    return Pki(
        ca=ca_file(ca, directory / "ca.pem"),
        server=issue(ca, directory, "server", "localhost", "127.0.0.1"),
        renamed=issue(ca, directory, "renamed", "events.internal"),
        client_ca=ca_file(client_ca, directory / "client-ca.pem"),
        bridge=issue(client_ca, directory, "bridge", BRIDGE_NAME),
        service=issue(client_ca, directory, "service", "service.events.internal"),
        wrong_ca=ca_file(wrong_ca, directory / "wrong-ca.pem"),
        stranger=issue(wrong_ca, directory, "stranger", BRIDGE_NAME),
    )


def event() -> dict[str, str]:
    return {"tenant": "t", "market": "us", "type": "click", "deduplication_id": uuid.uuid4().hex}


def tls_settings(
    settings: Settings, pki: Pki, *, mutual: bool = False, **extra: object
) -> Settings:
    mtls = {"tls_client_ca_file": str(pki.client_ca)} if mutual else {}
    return server_settings(
        settings,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        **mtls,
        **extra,
    )


def refused(target: str, **options: object) -> UnavailableError:
    """The error of a client that cannot complete the TLS handshake."""
    with (
        SyncEventsClient(target, deadline_seconds=1.0, **options) as client,  # type: ignore[arg-type]
        pytest.raises(UnavailableError) as caught,
    ):
        client.send([event()])
    return caught.value


# --- gRPC ------------------------------------------------------------------------------


def test_grpc_tls_verifies_the_server(  # noqa: PLR0917 (fixtures)
    loop: Loop, settings: Settings, pki: Pki, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with serving(loop, tls_settings(settings, pki)) as (_, target):
        with SyncEventsClient(target, api_key=api_key, tls_ca_file=pki.ca) as client:
            assert client.send([event()]).accepted == 1
        assert "handshake" in refused(target, api_key=api_key, tls_ca_file=pki.wrong_ca).details
        refused(target, api_key=api_key)  # plaintext, to a TLS port
    assert len(envelopes(rdb, keys)) == 1


def test_the_client_checks_the_name_it_is_told(
    loop: Loop, settings: Settings, pki: Pki, api_key: str, rdb: redis.Redis
) -> None:
    renamed = server_settings(
        settings, tls_cert_file=str(pki.renamed.cert), tls_key_file=str(pki.renamed.key)
    )
    with serving(loop, renamed) as (_, target):
        refused(target, api_key=api_key, tls_ca_file=str(pki.ca))  # 127.0.0.1 is not its name
        with SyncEventsClient(
            target, api_key=api_key, tls_ca_file=pki.ca, tls_server_name="events.internal"
        ) as client:
            assert client.send([event()]).accepted == 1


def test_grpc_mutual_tls_wants_a_client_certificate_of_its_ca(  # noqa: PLR0917 (fixtures)
    loop: Loop, settings: Settings, pki: Pki, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with serving(loop, tls_settings(settings, pki, mutual=True)) as (_, target):
        with SyncEventsClient(
            target,
            api_key=api_key,
            tls_ca_file=pki.ca,
            tls_cert_file=pki.service.cert,
            tls_key_file=pki.service.key,
        ) as client:
            assert client.send([event()]).accepted == 1
        refused(target, api_key=api_key, tls_ca_file=pki.ca)  # no certificate
        refused(
            target,
            api_key=api_key,
            tls_ca_file=pki.ca,
            tls_cert_file=pki.stranger.cert,
            tls_key_file=pki.stranger.key,
        )
    assert len(envelopes(rdb, keys)) == 1


def test_a_client_certificate_needs_its_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match="needs its key"):
        SyncEventsClient("127.0.0.1:1", tls_ca_file=pki.ca, tls_cert_file=pki.service.cert)
    with pytest.raises(ValueError, match="cannot read CA file"):
        SyncEventsClient("127.0.0.1:1", tls_ca_file=pki.ca.with_name("missing.pem"))


def test_with_mutual_tls_only_the_bridge_certificate_is_the_bridge(  # noqa: PLR0917 (fixtures)
    loop: Loop, settings: Settings, pki: Pki, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    register_storefront(settings)
    named = tls_settings(settings, pki, mutual=True, tls_bridge_names=(BRIDGE_NAME,))
    with serving(loop, named) as (_, target):
        # Another service: its certificate is good, but it is not the bridge.
        credentials = grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), pki.service.key.read_bytes(), pki.service.cert.read_bytes()
        )
        with grpc.secure_channel(target, credentials) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                events_pb2_grpc.RejectedEventsStub(channel).Record(
                    pb.RejectedRequest(tenants=["t"], payload=b"[]", payload_size=2),
                    metadata=(("x-api-key", api_key),),
                    timeout=5,
                )
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert BRIDGE_NAME in str(caught.value.details())
            events_pb2_grpc.EventsServiceStub(channel).CreateEvents(
                pb.CreateEventsRequest(
                    events=[pb.Event(tenant="t", market="us", type=pb.EVENT_TYPE_CLICK)]
                ),
                metadata=(("x-api-key", api_key), ("x-forwarded-for", "6.6.6.6")),
                timeout=5,
            )
        assert rdb.exists(keys.rejected("t")) == 0
        assert [e.client_ip for e in envelopes(rdb, keys)] == ["127.0.0.1"]
        rdb.delete(*(keys.stream(p) for p in range(keys.partitions)))

        # The bridge, known by its certificate: its forwarded context is believed.
        bridge = BridgeSettings(
            grpc_target=target,
            grpc_ca_file=str(pki.ca),
            grpc_client_cert_file=str(pki.bridge.cert),
            grpc_client_key_file=str(pki.bridge.key),
            log_level="WARNING",
        )
        with BridgeThread(bridge) as served, httpx.Client(base_url=served.url) as http:
            headers = {"origin": STOREFRONT, "user-agent": "Mozilla/5.0 (tls)"}
            answer = http.post("/create-events", json=BODY, headers=headers)
            assert answer.status_code == 200, answer.text
            bad = http.post(
                "/create-events", json=[{"tenant": "t"}], headers={"x-api-key": api_key}
            )
            assert bad.status_code == 422
            deadline = time.monotonic() + 5
            while not rdb.exists(keys.rejected("t")) and time.monotonic() < deadline:
                time.sleep(0.02)
        assert rdb.xlen(keys.rejected("t")) == 1
        [envelope] = envelopes(rdb, keys)
        assert (envelope.storefront_origin, envelope.user_agent) == (
            STOREFRONT,
            "Mozilla/5.0 (tls)",
        )

        # Plain TLS to a mutual-TLS server: the bridge cannot even connect, and says why.
        plain = BridgeSettings(grpc_target=target, grpc_ca_file=str(pki.ca), log_level="WARNING")
        with BridgeThread(plain) as served:
            answer = httpx.post(f"{served.url}/create-events", json=BODY, headers=headers)
            assert answer.status_code == 503


def test_over_mutual_tls_a_keyless_caller_that_is_not_the_bridge_is_unauthenticated(
    loop: Loop, settings: Settings, pki: Pki, rdb: redis.Redis, keys: KeySpace
) -> None:
    # A good certificate, but not the bridge's: the storefront origin it names is dropped,
    # which leaves the call with no credential at all.
    register_storefront(settings)
    named = tls_settings(settings, pki, mutual=True, tls_bridge_names=(BRIDGE_NAME,))
    with serving(loop, named) as (_, target):
        credentials = grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), pki.service.key.read_bytes(), pki.service.cert.read_bytes()
        )
        with grpc.secure_channel(target, credentials) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                events_pb2_grpc.EventsServiceStub(channel).CreateEvents(
                    pb.CreateEventsRequest(
                        events=[pb.Event(tenant="shop-a", market="us", type=pb.EVENT_TYPE_CLICK)]
                    ),
                    metadata=(("grpcgateway-origin", STOREFRONT),),
                    timeout=5,
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert envelopes(rdb, keys) == []


# --- the bridge's HTTPS ----------------------------------------------------------------


def https_client(ca: Path, cert: Pem | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


def test_the_bridge_serves_https(
    grpc_target: str, pki: Pki, api_key: str, rdb: redis.Redis
) -> None:
    bridge = BridgeSettings(
        grpc_target=grpc_target,
        http_tls_cert_file=str(pki.server.cert),
        http_tls_key_file=str(pki.server.key),
        log_level="WARNING",
    )
    with BridgeThread(bridge) as served:
        with httpx.Client(base_url=served.url, verify=https_client(pki.ca)) as http:
            answer = http.post("/create-events", json=[event()], headers={"x-api-key": api_key})
            assert answer.status_code == 200, answer.text
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{served.url}/healthz", verify=https_client(pki.wrong_ca))
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{served.port}/healthz")  # plain HTTP to HTTPS


def test_the_bridge_can_require_client_certificates(grpc_target: str, pki: Pki) -> None:
    bridge = BridgeSettings(
        grpc_target=grpc_target,
        http_tls_cert_file=str(pki.server.cert),
        http_tls_key_file=str(pki.server.key),
        http_tls_client_ca_file=str(pki.client_ca),
        log_level="WARNING",
    )
    with BridgeThread(bridge) as served:
        url = f"{served.url}/healthz"
        assert httpx.get(url, verify=https_client(pki.ca, pki.service)).status_code == 200
        # TLS 1.3: the server's refusal arrives once the client has finished its handshake.
        with pytest.raises(httpx.TransportError):
            httpx.get(url, verify=https_client(pki.ca))
        with pytest.raises(httpx.TransportError):
            httpx.get(url, verify=https_client(pki.ca, pki.stranger))


def test_bridge_tls_files_must_be_readable(pki: Pki) -> None:
    with pytest.raises(ValueError, match="grpc_ca_file: cannot read"):
        BridgeSettings(grpc_ca_file=str(pki.ca.with_name("missing.pem")))
    with pytest.raises(ValueError, match="go together"):
        BridgeSettings(http_tls_cert_file=str(pki.server.cert))


def test_server_tls_settings_go_together(settings: Settings, pki: Pki) -> None:
    with pytest.raises(ValueError, match="together"):
        server_settings(settings, tls_cert_file=str(pki.server.cert))
    with pytest.raises(ValueError, match="needs tls_cert_file"):
        server_settings(settings, tls_client_ca_file=str(pki.client_ca))
    with pytest.raises(ValueError, match="needs tls_client_ca_file"):
        server_settings(settings, tls_bridge_names="bridge")


# --- Redis over TLS --------------------------------------------------------------------


@pytest.fixture
def redis_tls(valkey: object, settings: Settings, pki: Pki) -> Iterator[int]:
    """A TLS front on loopback for the session's Valkey; its port."""
    port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    front = TlsFront(port, pki.server)
    yield front.port
    front.close()


def test_redis_over_tls(  # noqa: PLR0917 (fixtures)
    loop: Loop,
    settings: Settings,
    pki: Pki,
    api_key: str,
    rdb: redis.Redis,
    keys: KeySpace,
    redis_tls: int,
) -> None:
    url = f"rediss://127.0.0.1:{redis_tls}/0?ssl_ca_certs={pki.ca}"
    with (
        serving(loop, server_settings(settings, redis_url=url)) as (_, target),
        SyncEventsClient(target, api_key=api_key) as client,
    ):
        assert client.send([event()]).accepted == 1
    assert len(envelopes(rdb, keys)) == 1
    # A Redis whose certificate the server cannot verify is a Redis it cannot write to.
    wrong = f"rediss://127.0.0.1:{redis_tls}/0?ssl_ca_certs={pki.wrong_ca}"
    with (
        serving(loop, server_settings(settings, redis_url=wrong)) as (_, target),
        SyncEventsClient(target, api_key=api_key, deadline_seconds=1.0) as client,
        pytest.raises(UnavailableError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"),
    ):
        client.send([event()])
    assert len(envelopes(rdb, keys)) == 1


# --- the two commands, as deployed -----------------------------------------------------


def test_the_commands_serve_mutual_tls_and_https_end_to_end(
    settings: Settings, pki: Pki, rdb: redis.Redis, keys: KeySpace, tmp_path: Path
) -> None:
    register_storefront(settings)
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "EVENTS_KEY_PREFIX": settings.key_prefix,
        "EVENTS_PARTITIONS": str(settings.partitions),
        "EVENTS_METRICS_ADDR": "127.0.0.1:0",
        "EVENTS_LOG_LEVEL": "INFO",
        # The server's side.
        "EVENTS_TLS_CERT_FILE": str(pki.server.cert),
        "EVENTS_TLS_KEY_FILE": str(pki.server.key),
        "EVENTS_TLS_CLIENT_CA_FILE": str(pki.client_ca),
        "EVENTS_TLS_BRIDGE_NAMES": BRIDGE_NAME,
        # The bridge's side: the same environment, as on one host.
        "EVENTS_GRPC_CA_FILE": str(pki.ca),
        "EVENTS_GRPC_CLIENT_CERT_FILE": str(pki.bridge.cert),
        "EVENTS_GRPC_CLIENT_KEY_FILE": str(pki.bridge.key),
        "EVENTS_HTTP_TLS_CERT_FILE": str(pki.server.cert),
        "EVENTS_HTTP_TLS_KEY_FILE": str(pki.server.key),
    }
    server_log = tmp_path / "server.log"
    with server_log.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "events_server", "serve", "--grpc-addr", "127.0.0.1:0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    bridge: subprocess.Popen[bytes] | None = None
    try:
        assert server.stdout is not None
        listening = re.match(r"events-server listening on (\S+)", server.stdout.readline())
        assert listening is not None, server_log.read_text()
        port = _free_port()
        bridge = subprocess.Popen(
            [sys.executable, "-m", "rest_bridge", "--port", str(port), "--grpc-target",
             listening[1], "--log-level", "WARNING"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"https://127.0.0.1:{port}"
        verify = https_client(pki.ca)
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{url}/readyz", verify=verify, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert bridge.poll() is None, "rest-bridge exited"
            assert time.monotonic() < deadline, "rest-bridge did not get ready"
            time.sleep(0.05)
        answer = httpx.post(
            f"{url}/create-events",
            json=BODY,
            headers={"origin": STOREFRONT, "user-agent": "Mozilla/5.0 (e2e)"},
            verify=verify,
        )
        assert answer.status_code == 200, answer.text
    finally:
        for child in (bridge, server):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(10)
        if server.stdout is not None:
            server.stdout.close()
    [envelope] = envelopes(rdb, keys)
    assert (envelope.storefront_origin, envelope.user_agent) == (STOREFRONT, "Mozilla/5.0 (e2e)")
    logged = server_log.read_text()
    assert "gRPC over mutual TLS" in logged
    assert BRIDGE_NAME in logged


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
