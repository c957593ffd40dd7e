"""Hostile inputs to the gRPC server, each beside a legitimate call that must still work."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis

from events_server.pb import events_pb2 as pb
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.data import ev
from tests.harness.processes import ServerProcess, events_env
from tests.harness.streams import queued

CREATE_EVENTS = "/events.v1.EventsService/CreateEvents"
EMPTY_EVENTS_4MIB = b"\x0a\x00" * (2 * 1024 * 1024)  # two million empty events


def raw_call(
    target: str, body: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.StatusCode:
    """Send ``body`` as the CreateEvents request bytes; the status it ends with."""
    with grpc.insecure_channel(target) as channel:
        # No serializer: the body goes as it is.
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(CREATE_EVENTS)
        try:
            call(body, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def server_process(
    settings: Settings, api_key: str, tmp_path: Path, rdb: redis.Redis
) -> Iterator[tuple[ServerProcess, str]]:
    env = events_env(settings, EVENTS_METRICS_ADDR="", EVENTS_LOG_LEVEL="WARNING")
    server = ServerProcess(env, tmp_path / "server.log")
    try:
        yield server, server.start()
    finally:
        server.stop()


def test_huge_requests_of_empty_events_cost_little_memory_and_are_refused(
    server_process: tuple[ServerProcess, str],
    api_key: str,
    rdb: redis.Redis,
    keys: KeySpace,
    figures: Callable[[str], None],
) -> None:
    server, target = server_process
    legit = ((("x-api-key", api_key),),)
    assert raw_call(target, pb.CreateEventsRequest(events=[ev()]).SerializeToString(), *legit) == (
        grpc.StatusCode.OK
    )
    before = rss_kib(server.pid, "VmRSS")
    codes: list[grpc.StatusCode] = []

    def attack(metadata: tuple[tuple[str, str], ...]) -> None:
        codes.append(raw_call(target, EMPTY_EVENTS_4MIB, metadata))

    # Four at once without a key, then four with one: refused before, or right after,
    # the cheap count of the request's events.
    for metadata in ((), (("x-api-key", api_key),)):
        threads = [threading.Thread(target=attack, args=(metadata,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    peak = rss_kib(server.pid, "VmHWM")
    assert codes[:4] == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert codes[4:] == [grpc.StatusCode.INVALID_ARGUMENT] * 4
    growth_mb = (peak - before) / 1024
    assert growth_mb <= 300, f"peak RSS grew {growth_mb:.0f} MB"
    # The legitimate caller is still served, and only its events were queued.
    assert raw_call(target, pb.CreateEventsRequest(events=[ev()]).SerializeToString(), *legit) == (
        grpc.StatusCode.OK
    )
    assert len(queued(rdb, keys)) == 2
    figures(f"8 x 4 MiB of empty events: peak RSS +{growth_mb:.0f} MB, codes={set(codes)}")


def test_invalid_utf8_in_a_string_field_is_a_field_violation_not_a_traceback(
    grpc_target: str,
    api_key: str,
    rdb: redis.Redis,
    keys: KeySpace,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = ev(tenant="shop-a").SerializeToString()
    broken = good.replace(b"shop-a", b"shop\xff\xfe")
    body = b"".join(b"\x0a" + bytes([len(e)]) + e for e in (good, broken))
    with grpc.insecure_channel(grpc_target) as channel, caplog.at_level(logging.WARNING):
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(CREATE_EVENTS)
        with pytest.raises(grpc.RpcError) as caught:
            call(body, metadata=(("x-api-key", api_key),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[1]" in str(caught.value.details())
    assert "UTF-8" in str(caught.value.details())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert queued(rdb, keys) == []


def test_unknown_protobuf_fields_never_reach_the_queue(
    rdb: redis.Redis, keys: KeySpace, grpc_target: str, api_key: str
) -> None:
    event = ev().SerializeToString() + b"\xa0\x06\x07" + b"\xaa\x06\x05extra"  # fields 100, 101
    body = b"\x0a" + bytes([len(event)]) + event + b"\x12\x03odd"  # and request field 2
    with grpc.insecure_channel(grpc_target) as channel:
        reply = channel.unary_unary(
            CREATE_EVENTS,
            request_serializer=bytes,
            response_deserializer=pb.CreateEventsResponse.FromString,
        )(body, metadata=(("x-api-key", api_key),), timeout=10)
    assert reply.accepted == 1
    ((_, envelope),) = queued(rdb, keys)
    assert envelope.event == ev()
    assert b"extra" not in envelope.SerializeToString()


def test_a_second_server_fails_before_listening_when_the_metrics_port_is_taken(
    settings: Settings, tmp_path: Path
) -> None:
    first = ServerProcess(
        events_env(settings, EVENTS_METRICS_ADDR="127.0.0.1:0", EVENTS_LOG_LEVEL="INFO"),
        tmp_path / "a.log",
    )
    first.start()
    try:
        # Whatever port the first took for metrics, a second server asks for the same.
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", first.log())
        assert found is not None, first.log()
        taken = found[1]
        done = subprocess.run(
            [sys.executable, "-m", "events_server", "serve", "--grpc-addr", "127.0.0.1:0"],
            env=events_env(settings, EVENTS_METRICS_ADDR=f"127.0.0.1:{taken}"),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        first.stop()
    assert done.returncode == 1
    assert "cannot serve metrics" in done.stderr
    assert "listening" not in done.stdout
