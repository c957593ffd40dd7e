"""``EventsClient``: CreateEvents and Track with retries of UNAVAILABLE within one deadline."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from typing import Any, Unpack

import grpc
from google.protobuf.message import Message

from events_server.client.batcher import Batcher
from events_server.client.errors import error_from_rpc
from events_server.client.lifecycle import AsyncClosing
from events_server.client.options import (
    ClientOptions,
    EventLike,
    Options,
    TrackedLike,
    build_request,
    build_track_request,
)
from events_server.client.tls import channel_credentials, name_options
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.wire.metadata import MD_API_KEY, REQUEST_ID_HEADER, new_request_id

log = logging.getLogger("events_server.client")


class EventsClient(AsyncClosing):
    """Async CreateEvents and Track client. Create it inside the event loop that will use it."""

    def __init__(self, target: str, **options: Unpack[ClientOptions]) -> None:
        self._options = opts = Options(**options)
        reconnect_ms = max(int(opts.initial_backoff_seconds * 1000), 1)
        channel_options: list[tuple[str, Any]] = [
            # gRPC's own reconnect backoff (1 s, growing to 2 min) would leave our
            # retries failing fast against a server that is back already.
            ("grpc.initial_reconnect_backoff_ms", reconnect_ms),
            ("grpc.min_reconnect_backoff_ms", reconnect_ms),
            ("grpc.max_reconnect_backoff_ms", max(int(opts.max_backoff_seconds * 1000), 1)),
        ]
        if opts.secure:
            # The files are read here: a missing one is a ValueError now, not a retry later.
            credentials = channel_credentials(
                opts.tls_ca_file, opts.tls_cert_file, opts.tls_key_file
            )
            self._channel = grpc.aio.secure_channel(
                target, credentials, options=channel_options + name_options(opts.tls_server_name)
            )
        else:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options)
        self._stub = events_pb2_grpc.EventsServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self._channel.close()

    async def send(
        self, events: Iterable[EventLike], *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse:
        """Queue ``events``: one result per event, in order (accepted, or duplicate)."""
        return await self.send_request(build_request(events), deadline_seconds=deadline_seconds)

    async def track(
        self, events: Iterable[TrackedLike], *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse:
        """Queue Depict's v2 events (purchases, transaction mappings, unavailable products):
        one result per event, in order (accepted, or duplicate: a purchase already queued
        for its transaction, say)."""
        return await self.send_track_request(
            build_track_request(events), deadline_seconds=deadline_seconds
        )

    async def send_request(
        self, request: pb.CreateEventsRequest, *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse:
        """Send a built request as it is, retrying UNAVAILABLE until the deadline."""
        return await self._call(self._stub.CreateEvents, "CreateEvents", request, deadline_seconds)

    async def send_track_request(
        self, request: pb.TrackRequest, *, deadline_seconds: float | None = None
    ) -> pb.CreateEventsResponse:
        """Send a built Track request as it is, retrying UNAVAILABLE until the deadline."""
        return await self._call(self._stub.Track, "Track", request, deadline_seconds)

    async def _call(
        self, method: Any, name: str, request: Message, deadline_seconds: float | None
    ) -> pb.CreateEventsResponse:
        request_id = new_request_id()
        metadata: list[tuple[str, str]] = [(REQUEST_ID_HEADER, request_id)]
        opts = self._options
        if opts.api_key:
            metadata.append((MD_API_KEY, opts.api_key))
        seconds = opts.deadline_seconds if deadline_seconds is None else deadline_seconds
        deadline = time.monotonic() + seconds
        attempt = 0
        while True:
            try:
                reply: pb.CreateEventsResponse = await method(
                    request, timeout=max(deadline - time.monotonic(), 0.001), metadata=metadata
                )
                return reply
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise error_from_rpc(error, request_id) from error
                # Full jitter: clients that failed together do not retry together.
                ceiling = min(
                    opts.max_backoff_seconds,
                    opts.initial_backoff_seconds * opts.backoff_multiplier**attempt,
                )
                pause = random.uniform(0, ceiling)
                if time.monotonic() + pause >= deadline:
                    raise error_from_rpc(error, request_id) from error
                attempt += 1
                log.info(
                    "%s unavailable (%s), retry %d in %.3fs",
                    name,
                    error.details(),
                    attempt,
                    pause,
                    extra={"request_id": request_id},
                )
                await asyncio.sleep(pause)

    def batcher(
        self, *, max_events: int = 500, max_delay_seconds: float = 0.2, max_in_flight: int = 4
    ) -> Batcher:
        """A Batcher sending through this client."""
        return Batcher(
            self,
            max_events=max_events,
            max_delay_seconds=max_delay_seconds,
            max_in_flight=max_in_flight,
        )
