"""The REST bridge app: the contract's POST /create-events, Depict's v2 POST /v2/create-events and
/v2/track, WebSocket /ws/create-events, docs, health."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import grpc
from fastapi import FastAPI, Header, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyCookie, APIKeyHeader, APIKeyQuery
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import WithJsonSchema

from events_server.pb import events_pb2_grpc
from events_server.wire.metadata import SERVICE_NAME
from rest_bridge.access import AccessMiddleware
from rest_bridge.admission import Admission
from rest_bridge.batch_link import link_host
from rest_bridge.channel import upstream_channel
from rest_bridge.config import BridgeSettings
from rest_bridge.connections import ConnectionGuard
from rest_bridge.contract import DESCRIPTION, TAG, ValidationErrorItem
from rest_bridge.cors import Cors, is_preflight
from rest_bridge.gather import Gatherer
from rest_bridge.hot import HotPosts
from rest_bridge.https import server_context
from rest_bridge.metrics import BridgeMetrics
from rest_bridge.models import Event
from rest_bridge.models_v2 import TrackV2Request
from rest_bridge.offload import BodyParser
from rest_bridge.rejected import RejectedReporter
from rest_bridge.routes import v1, v2
from rest_bridge.routes.steps import JsonPost
from rest_bridge.ws import WS_PATH, WebSocketIngest

CONTRACT_PATH = v1.PATH

# gRPC's default reconnect backoff grows to 120 s: after a server restart the bridge
# could keep answering 503 for minutes. The server is near; trying each second is cheap.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# Contract header parameters: plain `type: string` in the schema, None when absent.
OptionalHeader = Annotated[str | None, WithJsonSchema({"type": "string"}), Header()]


class Bridge:
    """The ASGI app: POST /create-events, /v2/create-events and /v2/track, their preflights
    and WebSocket /ws/create-events to lean handlers, the rest to FastAPI.

    Every HTTP request passes AccessMiddleware first (request id, access line, metrics);
    the WebSocket endpoint writes its own lines.
    """

    def __init__(  # noqa: PLR0917
        self,
        api: FastAPI,
        create_events: v1.CreateEvents,
        cors: Cors,
        settings: BridgeSettings,
        ws: WebSocketIngest | None = None,
        metrics: BridgeMetrics | None = None,
        gatherer: Gatherer | None = None,
        track: v2.Track | None = None,
    ) -> None:
        self.api = api
        self.gatherer = gatherer
        self.create_events = create_events
        self.cors = cors
        self.ws = ws
        self.metrics = metrics if metrics is not None else BridgeMetrics()
        self._posts: dict[str, JsonPost] = {CONTRACT_PATH: create_events}
        if track is not None:
            self._posts.update(dict.fromkeys(v2.PATHS, track))
        self._entry = AccessMiddleware(
            self._dispatch,
            self.metrics,
            settings.log_client_ip,
            routes=tuple(self._posts),
            sample=settings.access_log_sample,
        )
        self.hot_posts = HotPosts(self._posts, self._entry)
        """The same routes, served from the protocol's callbacks when they can be."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and (post := self._posts.get(scope["path"])) is not None
        ):
            # The storefront's path: one layer, its reply sent with its request id.
            await self._entry.answer(post, scope, receive, send)
            return
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (post := self._posts.get(scope["path"])) is not None:
            if scope["method"] == "POST":  # (served by __call__; kept for any other caller)
                await post(scope, receive, send)
                return
            if scope["method"] == "OPTIONS" and is_preflight(scope):
                await self.cors.preflight(scope, send)
                return
        elif scope["type"] == "websocket" and scope["path"] == WS_PATH and self.ws is not None:
            await self.ws(scope, receive, send)
            return
        await self.api(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document (equal to the contract but for the title)."""
        return self.api.openapi()

    connection_guard: ConnectionGuard | None = None
    """The bounds of its HTTP connections (rest_bridge.connections), set by create_app."""


def _document_contract(api: FastAPI) -> None:
    """Declare POST /create-events exactly as the contract does, for /openapi.json and /docs."""

    @api.post(
        CONTRACT_PATH,
        tags=[TAG],
        summary="Create Events",
        description=DESCRIPTION,
        response_model=None,
    )
    async def create_events(  # noqa: PLR0917 (FastAPI declares parameters positionally)
        request: list[Event],
        referer: OptionalHeader = None,
        user_agent: OptionalHeader = None,
        x_forwarded_for: OptionalHeader = None,
        x_forwarded_host: OptionalHeader = None,
        key_in_query: str | None = Security(APIKeyQuery(name="api_key", auto_error=False)),
        key_in_header: str | None = Security(APIKeyHeader(name="X-API-KEY", auto_error=False)),
        key_in_cookie: str | None = Security(APIKeyCookie(name="X-API-KEY", auto_error=False)),
    ) -> None:
        # Never called: Bridge sends every POST here to rest_bridge.routes.v1.CreateEvents.
        raise NotImplementedError

    _document_v2(api)

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(
                title=api.title, version=api.version, routes=api.routes, tags=api.openapi_tags
            )
            # Match the 422 bodies we really send (see ValidationErrorItem).
            schema["components"]["schemas"]["ValidationError"] = (
                ValidationErrorItem.model_json_schema()
            )
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


V2_TAG = "Events (v2)"


def _document_v2(api: FastAPI) -> None:
    """Declare Depict's two v2 operations exactly as its spec does (contract/
    create-events-v2.openapi.yaml); rest_bridge.routes.v2.Track serves both."""

    async def operation(
        request: TrackV2Request,
        key_in_query: str | None = Security(APIKeyQuery(name="api_key", auto_error=False)),
        key_in_header: str | None = Security(APIKeyHeader(name="X-API-KEY", auto_error=False)),
        key_in_cookie: str | None = Security(APIKeyCookie(name="X-API-KEY", auto_error=False)),
    ) -> None:
        raise NotImplementedError  # never called (see above)

    # One declaration under both paths; the names keep the spec's two operationIds.
    for path, name, summary, deprecated in (
        (v2.CREATE_EVENTS_PATH, "create_events_v2", "Create Events V2", False),
        (v2.TRACK_PATH, "track_v2", "Track V2", True),
    ):
        api.post(
            path,
            name=name,
            tags=[V2_TAG],
            summary=summary,
            response_model=None,
            deprecated=deprecated,
        )(operation)


def create_app(settings: BridgeSettings) -> Bridge:
    """The bridge; its one gRPC channel opens and closes with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with upstream_channel(settings, RECONNECT_OPTIONS) as channel:
            app.state.events = events_pb2_grpc.EventsServiceStub(channel)
            app.state.gathered = events_pb2_grpc.BridgeIngestStub(channel)
            app.state.health = health_pb2_grpc.HealthStub(channel)
            app.state.rejected = events_pb2_grpc.RejectedEventsStub(channel)
            app.state.origins = events_pb2_grpc.OriginsStub(channel)
            # Start-up objects live as long as the process: keep them out of the
            # cyclic GC: a full pass over them takes ~25 ms, a latency spike under load.
            gc.freeze()
            yield
            await rejected.drain()
            parser.close()
            ws.close()
            gatherer.link.close()

    # No redirect of /create-events/ to /create-events: its Location would repeat the
    # query, api_key included (any path with a trailing slash is a 404).
    api = FastAPI(title="Event ingestion", version="1.0", lifespan=lifespan, redirect_slashes=False)
    _document_contract(api)

    @api.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        try:
            reply = await request.app.state.health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=settings.readiness_timeout_seconds,
            )
        except grpc.aio.AioRpcError as error:
            return JSONResponse({"status": error.code().name}, status_code=503)
        ready = reply.status == health_pb2.HealthCheckResponse.SERVING
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return JSONResponse({"status": name}, status_code=200 if ready else 503)

    rejected = RejectedReporter(
        lambda: api.state.rejected,
        settings.grpc_timeout_seconds,
        settings.rejected_reports_per_second,
    )
    cors = Cors(lambda: api.state.origins, settings)
    counters = BridgeMetrics()
    gatherer = Gatherer(
        lambda: api.state.gathered,
        lambda: api.state.events,
        timeout_seconds=settings.grpc_timeout_seconds,
        max_calls=settings.grpc_gather_max_calls,
        max_requests=settings.grpc_gather_max_requests,
        max_bytes=settings.grpc_gather_max_bytes,
        large_bytes=settings.grpc_gather_pipeline_bytes,
        link_host=(
            link_host(settings.grpc_target, settings.grpc_secure)
            if settings.grpc_batch_link
            else None
        ),
        observe=counters.gathered,
    )
    parser = BodyParser(settings)  # one pool of parse processes for every route
    admission = Admission(lambda: api.state.origins, settings)  # who, before any body is read
    create_events = v1.CreateEvents(settings, gatherer, cors, parser, rejected, admission)
    track = v2.Track(settings, gatherer, cors, parser, rejected, admission)
    ws = WebSocketIngest(settings, cors, counters, rejected, gatherer, admission)
    bridge = Bridge(api, create_events, cors, settings, ws, counters, gatherer, track)

    @api.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(bridge.metrics.scrape), media_type=CONTENT_TYPE_LATEST)

    # The HTTP connection bounds, read by the protocol uvicorn serves it with.
    bridge.connection_guard = ConnectionGuard(
        settings, bridge.metrics.registry, server_context(settings)
    )
    return bridge
