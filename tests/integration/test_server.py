"""The assembled server: health, reflection, port ownership, outages, graceful shutdown."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer, create_server
from events_server.server.settings import Settings
from events_server.wire.metadata import SERVICE_NAME
from tests.harness.data import ev
from tests.harness.processes import ServerProcess, events_env
from tests.harness.rpc import NOT_SERVING, SERVING, health_of, keyed_channel, send
from tests.harness.servers import LoopThread, bridged, serving
from tests.harness.streams import queued
from tests.harness.valkey import SessionValkey, free_port
from tests.harness.waiting import eventually
from tests.harness.web import keyed_client


def test_health_is_serving_for_the_server_and_the_service(channel: grpc.Channel) -> None:
    assert health_of(channel, "") == SERVING
    assert health_of(channel) == SERVING


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    described = database.FindFileContainingSymbol(SERVICE_NAME)
    assert "Envelope" in {m.name for m in described.message_type}


def test_a_second_server_cannot_share_the_port(
    loop: LoopThread, settings: Settings, grpc_server: tuple[EventsServer, int]
) -> None:
    taken = settings.model_copy(update={"grpc_addr": f"127.0.0.1:{grpc_server[1]}"})

    async def bind() -> None:
        await create_server(taken)

    # SO_REUSEPORT is off: grpcio would otherwise let both bind and split traffic.
    with pytest.raises(RuntimeError):
        loop.run(bind())


@pytest.fixture
def outage(valkey: SessionValkey, rdb: redis.Redis) -> Iterator[Callable[[], None]]:
    """Kills the session's Valkey for real (after rdb cleaned it); yields its restart."""
    process = valkey.killable()
    process.kill()
    try:
        yield process.start
    finally:
        if not process.running():
            process.start()


def test_redis_down_means_unavailable_and_503_then_recovery(  # noqa: PLR0917
    outage: Callable[[], None],
    stub: events_pb2_grpc.EventsServiceStub,
    channel: grpc.Channel,
    http: httpx.Client,
    rdb: redis.Redis,
    keys: KeySpace,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        send(stub, ev(deduplication_id="down"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    body = [{"tenant": "shop-a", "market": "us", "type": "click", "deduplication_id": "down"}]
    answer = http.post("/create-events", json=body)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert "redis" in answer.json()["detail"]

    eventually(lambda: health_of(channel) == NOT_SERVING)
    assert http.get("/readyz").status_code == 503

    outage()  # restart

    def succeeds() -> bool:
        return http.post("/create-events", json=body).status_code == 200

    recovery = eventually(succeeds)
    assert recovery < 3.0
    eventually(lambda: health_of(channel) == SERVING)
    assert http.get("/readyz").status_code == 200
    # Nothing was queued by the failed attempts, and the retry queued it once.
    assert [e.event.deduplication_id for _, e in queued(rdb, keys)] == ["down"]


def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(
    api_key: str, valkey: SessionValkey, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    valkey.killable()
    env = events_env(
        settings,
        EVENTS_SHUTDOWN_GRACE_SECONDS="5",
        EVENTS_METRICS_ADDR="127.0.0.1:0",
        # Longer than the CLIENT PAUSE below, so the held call waits instead of failing.
        EVENTS_REDIS_TIMEOUT_SECONDS="6",
    )
    server = ServerProcess(env)
    target = server.start()
    try:
        with keyed_channel(target, api_key) as channel:
            stub = events_pb2_grpc.EventsServiceStub(channel)
            assert health_of(channel) == SERVING
            # Hold every write in Redis so the call is still in flight at SIGTERM.
            rdb.client_pause(3000, all=False)  # all=False: pause writes only
            result: dict[str, object] = {}

            def call() -> None:
                started = time.monotonic()
                try:
                    result["reply"] = send(stub, ev(deduplication_id="in-flight"))
                except grpc.RpcError as error:
                    result["error"] = error
                result["seconds"] = time.monotonic() - started

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(0.5)
            server.signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as refused:
                send(stub, ev())
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            caller.join(10)
        assert server.wait(10) == 0
    finally:
        rdb.client_unpause()
        server.kill()
    reply = result.get("reply")
    assert isinstance(reply, pb.CreateEventsResponse), result
    assert reply.accepted == 1
    assert float(result["seconds"]) > 1.0  # type: ignore[arg-type] # it really was held in Redis across the SIGTERM
    assert [e.event.deduplication_id for _, e in queued(rdb, keys)] == ["in-flight"]


def test_workers_share_one_port_and_stop_together(
    api_key: str, valkey: SessionValkey, settings: Settings, rdb: redis.Redis, keys: KeySpace
) -> None:
    port = free_port()
    env = events_env(settings, EVENTS_METRICS_ADDR=f"127.0.0.1:{free_port()}")
    server = ServerProcess(env, None, f"127.0.0.1:{port}", workers=2)
    server.start()
    try:
        pids = set(server.pids)
        assert len(pids) == 2, server.pids
        for n in range(20):  # a new channel, a new connection: the kernel spreads them
            with keyed_channel(f"127.0.0.1:{port}", api_key) as channel:
                send(events_pb2_grpc.EventsServiceStub(channel), ev(deduplication_id=f"w{n}"))
        server.signal(signal.SIGTERM)
        assert server.wait(15) == 0
    finally:
        server.kill()
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    assert len(queued(rdb, keys)) == 20


def test_bridge_reaches_the_server_over_a_unix_socket(  # noqa: PLR0917
    api_key: str,
    loop: LoopThread,
    settings: Settings,
    tmp_path: Path,
    rdb: redis.Redis,
    keys: KeySpace,
) -> None:
    socket_path = tmp_path / "events.sock"
    on_socket = settings.model_copy(update={"grpc_addr": f"unix:{socket_path}"})

    with (
        serving(loop, on_socket),
        bridged(f"unix:{socket_path}") as url,
        keyed_client(url, api_key) as client,
    ):
        event = {"tenant": "t", "market": "m", "type": "page_view", "user_id": "u"}
        answer = client.post("/create-events", json=[event])
    assert answer.status_code == 200, answer.text
    [(_, envelope)] = queued(rdb, keys)
    assert envelope.event.user_id == "u"
