"""TLS everywhere it can be asked for: the gRPC port (TLS, mutual TLS and the bridge known by
its certificate), the bridge's HTTPS, the Python client, and Redis over rediss://.

Every certificate comes from throwaway CAs (trustme): ``ca`` signs the servers',
``client_ca`` the callers' (the bridge's and another service's), and ``wrong_ca`` is
trusted by nobody.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import redis
import trustme
from websockets.asyncio.client import connect

from events_server.client import SyncEventsClient, UnavailableError
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.keys import register_storefront
from tests.harness.processes import BridgeProcess, ServerProcess, events_env
from tests.harness.servers import LoopThread, bridge_settings_for, serving, serving_bridge
from tests.harness.streams import queued
from tests.harness.tls import Pem, TlsFront, ca_file, https_context, issue
from tests.harness.waiting import eventually
from tests.harness.ws import ask, frame, run, ws_url

STOREFRONT = "https://shop-a.example"
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


def rebuilt(settings: Settings, **overrides: object) -> Settings:
    """The settings with ``overrides``, validated anew."""
    return Settings(**{**settings.model_dump(), **overrides})


def envelopes(rdb: redis.Redis, keys: KeySpace) -> list[pb.Envelope]:
    return [envelope for _, envelope in queued(rdb, keys)]


def https(url: str) -> str:
    return url.replace("http://", "https://", 1)


def event() -> dict[str, str]:
    return {"tenant": "t", "market": "us", "type": "click", "deduplication_id": uuid.uuid4().hex}


def tls_settings(
    settings: Settings, pki: Pki, *, mutual: bool = False, **extra: object
) -> Settings:
    mtls = {"tls_client_ca_file": str(pki.client_ca)} if mutual else {}
    return rebuilt(
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


@contextmanager
def bridge_named_server(loop: LoopThread, settings: Settings, pki: Pki) -> Iterator[str]:
    """A mutual-TLS server that knows the bridge by BRIDGE_NAME, STOREFRONT registered for
    shop-a; its address."""
    register_storefront(settings, "shop-a", STOREFRONT)
    named = tls_settings(settings, pki, mutual=True, tls_bridge_names=(BRIDGE_NAME,))
    with serving(loop, named) as (_, target):
        yield target


@contextmanager
def service_channel(target: str, pki: Pki) -> Iterator[grpc.Channel]:
    """A channel with another service's client certificate: good, but not the bridge's."""
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.service.key.read_bytes(), pki.service.cert.read_bytes()
    )
    with grpc.secure_channel(target, credentials) as channel:
        yield channel


# --- gRPC ------------------------------------------------------------------------------


def test_grpc_tls_verifies_the_server(  # noqa: PLR0917 (fixtures)
    loop: LoopThread, settings: Settings, pki: Pki, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with serving(loop, tls_settings(settings, pki)) as (_, target):
        with SyncEventsClient(target, api_key=api_key, tls_ca_file=pki.ca) as client:
            assert client.send([event()]).accepted == 1
        assert "handshake" in refused(target, api_key=api_key, tls_ca_file=pki.wrong_ca).details
        refused(target, api_key=api_key)  # plaintext, to a TLS port
    assert len(envelopes(rdb, keys)) == 1


def test_the_client_checks_the_name_it_is_told(
    loop: LoopThread, settings: Settings, pki: Pki, api_key: str, rdb: redis.Redis
) -> None:
    renamed = rebuilt(
        settings, tls_cert_file=str(pki.renamed.cert), tls_key_file=str(pki.renamed.key)
    )
    with serving(loop, renamed) as (_, target):
        refused(target, api_key=api_key, tls_ca_file=str(pki.ca))  # 127.0.0.1 is not its name
        with SyncEventsClient(
            target, api_key=api_key, tls_ca_file=pki.ca, tls_server_name="events.internal"
        ) as client:
            assert client.send([event()]).accepted == 1


def test_grpc_mutual_tls_wants_a_client_certificate_of_its_ca(  # noqa: PLR0917 (fixtures)
    loop: LoopThread, settings: Settings, pki: Pki, api_key: str, rdb: redis.Redis, keys: KeySpace
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
    loop: LoopThread, settings: Settings, pki: Pki, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with bridge_named_server(loop, settings, pki) as target:
        # Another service: its certificate is good, but it is not the bridge.
        with service_channel(target, pki) as channel:
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
        bridge = bridge_settings_for(
            target,
            grpc_ca_file=str(pki.ca),
            grpc_client_cert_file=str(pki.bridge.cert),
            grpc_client_key_file=str(pki.bridge.key),
        )
        with serving_bridge(bridge) as url, httpx.Client(base_url=url) as http:
            headers = {"origin": STOREFRONT, "user-agent": "Mozilla/5.0 (tls)"}
            answer = http.post("/create-events", json=BODY, headers=headers)
            assert answer.status_code == 200, answer.text
            bad = http.post(
                "/create-events", json=[{"tenant": "t"}], headers={"x-api-key": api_key}
            )
            assert bad.status_code == 422
            eventually(lambda: rdb.exists(keys.rejected("t")) == 1)
        assert rdb.xlen(keys.rejected("t")) == 1
        [envelope] = envelopes(rdb, keys)
        assert (envelope.storefront_origin, envelope.user_agent) == (
            STOREFRONT,
            "Mozilla/5.0 (tls)",
        )

        # Plain TLS to a mutual-TLS server: the bridge cannot even connect, and says why.
        plain = bridge_settings_for(target, grpc_ca_file=str(pki.ca))
        with serving_bridge(plain) as url:
            answer = httpx.post(f"{url}/create-events", json=BODY, headers=headers)
            assert answer.status_code == 503


def test_over_mutual_tls_a_keyless_caller_that_is_not_the_bridge_is_unauthenticated(
    loop: LoopThread, settings: Settings, pki: Pki, rdb: redis.Redis, keys: KeySpace
) -> None:
    # A good certificate, but not the bridge's: the storefront origin it names is dropped,
    # which leaves the call with no credential at all.
    with (
        bridge_named_server(loop, settings, pki) as target,
        service_channel(target, pki) as channel,
    ):
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


def test_the_bridge_serves_https(
    grpc_target: str, pki: Pki, api_key: str, rdb: redis.Redis
) -> None:
    bridge = bridge_settings_for(
        grpc_target,
        http_tls_cert_file=str(pki.server.cert),
        http_tls_key_file=str(pki.server.key),
    )
    with serving_bridge(bridge) as url:
        plain_url = url.replace("https://", "http://", 1)
        with httpx.Client(base_url=url, verify=https_context(pki.ca)) as http:
            answer = http.post("/create-events", json=[event()], headers={"x-api-key": api_key})
            assert answer.status_code == 200, answer.text
        # And so wss://: a frame over TLS, answered and queued.
        secure = ws_url(url.replace("https://", "http://", 1), api_key=api_key)
        secure = secure.replace("ws://", "wss://", 1)

        async def over_wss() -> dict[str, object]:
            async with connect(secure, ssl=https_context(pki.ca), compression=None) as ws:
                return await ask(ws, frame("tls-1", {**event(), "deduplication_id": "wss-1"}))

        assert run(over_wss()) == {"id": "tls-1", "status": "ok"}
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/healthz", verify=https_context(pki.wrong_ca))
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{plain_url}/healthz")  # plain HTTP to HTTPS


def test_the_bridge_can_require_client_certificates(grpc_target: str, pki: Pki) -> None:
    bridge = bridge_settings_for(
        grpc_target,
        http_tls_cert_file=str(pki.server.cert),
        http_tls_key_file=str(pki.server.key),
        http_tls_client_ca_file=str(pki.client_ca),
    )
    with serving_bridge(bridge) as base:
        url = f"{base}/healthz"
        assert httpx.get(url, verify=https_context(pki.ca, pki.service)).status_code == 200
        # TLS 1.3: the server's refusal arrives once the client has finished its handshake.
        with pytest.raises(httpx.TransportError):
            httpx.get(url, verify=https_context(pki.ca))
        with pytest.raises(httpx.TransportError):
            httpx.get(url, verify=https_context(pki.ca, pki.stranger))


# --- Redis over TLS --------------------------------------------------------------------


@pytest.fixture
def redis_tls(valkey: object, settings: Settings, pki: Pki) -> Iterator[int]:
    """A TLS front on loopback for the session's Valkey; its port."""
    port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    front = TlsFront(port, pki.server)
    yield front.port
    front.close()


def test_redis_over_tls(  # noqa: PLR0917 (fixtures)
    loop: LoopThread,
    settings: Settings,
    pki: Pki,
    api_key: str,
    rdb: redis.Redis,
    keys: KeySpace,
    redis_tls: int,
) -> None:
    url = f"rediss://127.0.0.1:{redis_tls}/0?ssl_ca_certs={pki.ca}"
    with (
        serving(loop, rebuilt(settings, redis_url=url)) as (_, target),
        SyncEventsClient(target, api_key=api_key) as client,
    ):
        assert client.send([event()]).accepted == 1
    assert len(envelopes(rdb, keys)) == 1
    # A Redis whose certificate the server cannot verify is a Redis it cannot write to.
    wrong = f"rediss://127.0.0.1:{redis_tls}/0?ssl_ca_certs={pki.wrong_ca}"
    with (
        serving(loop, rebuilt(settings, redis_url=wrong)) as (_, target),
        SyncEventsClient(target, api_key=api_key, deadline_seconds=1.0) as client,
        pytest.raises(UnavailableError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"),
    ):
        client.send([event()])
    assert len(envelopes(rdb, keys)) == 1


# --- the two commands, as deployed -----------------------------------------------------


def test_the_commands_serve_mutual_tls_and_https_end_to_end(
    settings: Settings, pki: Pki, rdb: redis.Redis, keys: KeySpace, tmp_path: Path
) -> None:
    register_storefront(settings, "shop-a", STOREFRONT)
    env = events_env(
        settings,
        EVENTS_METRICS_ADDR="127.0.0.1:0",
        # The server's side.
        EVENTS_TLS_CERT_FILE=str(pki.server.cert),
        EVENTS_TLS_KEY_FILE=str(pki.server.key),
        EVENTS_TLS_CLIENT_CA_FILE=str(pki.client_ca),
        EVENTS_TLS_BRIDGE_NAMES=BRIDGE_NAME,
        # The bridge's side: the same environment, as on one host.
        EVENTS_GRPC_CA_FILE=str(pki.ca),
        EVENTS_GRPC_CLIENT_CERT_FILE=str(pki.bridge.cert),
        EVENTS_GRPC_CLIENT_KEY_FILE=str(pki.bridge.key),
        EVENTS_HTTP_TLS_CERT_FILE=str(pki.server.cert),
        EVENTS_HTTP_TLS_KEY_FILE=str(pki.server.key),
    )
    server = ServerProcess(env, tmp_path / "server.log")
    bridge = BridgeProcess(
        server.start(), tmp_path / "bridge.log", "--log-level", "WARNING", env=env
    )
    url = https(bridge.url)
    try:
        bridge.spawn()

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", verify=https_context(pki.ca)).status_code == 200
            except httpx.TransportError:
                return False

        eventually(ready, within=15)
        answer = httpx.post(
            f"{url}/create-events",
            json=BODY,
            headers={"origin": STOREFRONT, "user-agent": "Mozilla/5.0 (e2e)"},
            verify=https_context(pki.ca),
        )
        assert answer.status_code == 200, answer.text
    finally:
        bridge.stop()
        server.stop()
    [envelope] = envelopes(rdb, keys)
    assert (envelope.storefront_origin, envelope.user_agent) == (STOREFRONT, "Mozilla/5.0 (e2e)")
    assert "gRPC over mutual TLS" in server.log()
    assert BRIDGE_NAME in server.log()
