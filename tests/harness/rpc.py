"""gRPC calls as the tests make them: keyed channels, CreateEvents, Track, gathered calls,
health, rich statuses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.wire.metadata import GATHERED_METHOD, SERVICE_NAME

ACCEPTED = pb.EventResult.STATUS_ACCEPTED
DUPLICATE = pb.EventResult.STATUS_DUPLICATE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextlib.contextmanager
def keyed_channel(target: str, api_key: str) -> Iterator[grpc.Channel]:
    """A sync gRPC channel that sends ``api_key`` as x-api-key metadata on every call."""
    with grpc.insecure_channel(target) as channel:
        yield grpc.intercept_channel(channel, KeyMetadata(api_key))


class KeyMetadata(grpc.UnaryUnaryClientInterceptor):
    """Sends an API key as x-api-key metadata on every call of a sync channel."""

    def __init__(self, api_key: str) -> None:
        self._metadata = (("x-api-key", api_key),)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = (*(details.metadata or ()), *self._metadata)
        return continuation(details._replace(metadata=metadata), request)


def send(
    stub: events_pb2_grpc.EventsServiceStub,
    *events: pb.Event,
    metadata: tuple[tuple[str, str], ...] = (),
) -> pb.CreateEventsResponse:
    """CreateEvents with these events (and metadata); the reply."""
    reply: pb.CreateEventsResponse = stub.CreateEvents(
        pb.CreateEventsRequest(events=events), metadata=metadata, timeout=5
    )
    return reply


def track(
    stub: events_pb2_grpc.EventsServiceStub,
    *events: pb.TrackedEvent,
    metadata: tuple[tuple[str, str], ...] = (),
) -> pb.CreateEventsResponse:
    """Track with these v2 events (and metadata); the reply."""
    reply: pb.CreateEventsResponse = stub.Track(
        pb.TrackRequest(events=events), metadata=metadata, timeout=5
    )
    return reply


def gathered_call(target: str, call: pb.GatheredRequest) -> pb.GatheredResponse:
    """One CreateEventsGathered call, as the REST bridge makes it, on a channel of its own."""
    with grpc.insecure_channel(target) as channel:
        rpc = channel.unary_unary(
            GATHERED_METHOD,
            request_serializer=pb.GatheredRequest.SerializeToString,
            response_deserializer=pb.GatheredResponse.FromString,
        )
        reply: pb.GatheredResponse = rpc(call, timeout=10)
    return reply


def statuses(reply: pb.CreateEventsResponse) -> list[int]:
    """The status of each event of a reply."""
    return [r.status for r in reply.results]


def accepted_now(stub: events_pb2_grpc.EventsServiceStub, event: pb.Event) -> bool:
    """Whether sending ``event`` queues it now (False on any RPC error), for eventually()."""
    try:
        return statuses(send(stub, event)) == [ACCEPTED]
    except grpc.RpcError:
        return False


def health_of(channel: grpc.Channel, service: str = SERVICE_NAME) -> int:
    """The health check's answer for ``service``."""
    health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs package omits its methods
    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    status: int = reply.status
    return status


def violation_details(error: grpc.RpcError) -> list[tuple[str, str, str]]:
    """(field, reason, description) of each field violation of an INVALID_ARGUMENT."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return [(v.field, v.reason, v.description) for v in bad_request.field_violations]


def violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, reason) of each field violation of an INVALID_ARGUMENT."""
    return [(field, reason) for field, reason, _ in violation_details(error)]
