"""The storefront's POSTs served without a task when the whole body came with the head.

uvicorn runs every request as a task: its app's coroutines (the access layer, the route,
the gatherer's wait) are created, suspended and resumed as a chain, once for the call to
the server and once for its answer. For a beacon, whose body arrives in the packet of its
head, that machinery was half of the bridge's CPU per request (bench.inproc: the app
alone 34 µs, through uvicorn's protocol 67 µs). Here such a request is served from the
protocol's callbacks instead: ``JsonPost.start`` takes it as far as the call to the
server without waiting (when any step would wait or refuse, nothing is done and uvicorn's
task serves it, as before), and the answer's callback writes the reply and its access
line. What the client sees and the logs and metrics say are the same either way.

HotHttpProtocol holds back uvicorn's task for such a request until the end of the read
that brought its head: if the body is not all in by then (a large or slow body), the task
is started as before, and reads it under the body timeout.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from events_server.ops.logs import request_id as current_request_id
from rest_bridge.access import REQUEST_ID_BYTES, AccessMiddleware, request_id_of
from rest_bridge.connections import app_attribute
from rest_bridge.http_budget import BudgetedHttpProtocol
from rest_bridge.responses import Reply, json_reply, write_at_once
from rest_bridge.routes.steps import JsonPost, Started

log = logging.getLogger(__name__)

_FAILED = json_reply(500, {"detail": "Internal Server Error"})


class HotPosts:
    """The JSON POST routes, served from the protocol's callbacks (see the module's doc)."""

    def __init__(self, posts: Mapping[str, JsonPost], access: AccessMiddleware) -> None:
        self._posts = posts
        self._access = access
        self._sending: set[asyncio.Task[None]] = set()

    def serves(self, scope: Mapping[str, object]) -> bool:
        """Whether the request is a POST to one of the routes (its body may be taken here)."""
        return scope["method"] == "POST" and scope["path"] in self._posts

    def serve(self, cycle: RequestResponseCycle) -> bool:
        """Serve the request of ``cycle`` (``serves`` it, its body all in) if it can be
        without waiting; False, nothing done, when uvicorn's task must."""
        scope = cast(dict[str, Any], cycle.scope)
        route = self._posts[scope["path"]]
        started = time.perf_counter()
        rid = request_id_of(scope)
        token = current_request_id.set(rid)  # the metadata's id, as AccessMiddleware sets it
        try:
            begun = route.start(scope, bytes(cycle.body))
        except Exception:
            # Raised in the parser's callback it would be answered 400: uvicorn's task is
            # to serve the request (and answer 500, logged, if it fails the same way).
            log.exception("the quick way failed; the request goes to the app")
            return False
        finally:
            current_request_id.reset(token)
        if begun is None:
            return False
        cycle.body = bytearray()  # taken, as uvicorn's receive takes it
        begun.future.add_done_callback(
            functools.partial(self._answer, cycle, route, begun, rid, started)
        )
        return True

    def _answer(
        self,
        cycle: RequestResponseCycle,
        route: JsonPost,
        begun: Started,
        rid: str,
        started: float,
        _: asyncio.Future[Any],
    ) -> None:
        token = current_request_id.set(rid)
        status = 500
        try:
            try:
                reply = route.finish(begun)
            except (Exception, asyncio.CancelledError):  # a bug: answered, as uvicorn would
                log.exception("Exception in ASGI application")
                reply = _FAILED
            status = reply.status
            last = (REQUEST_ID_BYTES, rid.encode())
            if cycle.disconnected:
                return  # uvicorn's send drops it too
            if not write_at_once(cycle, status, [*reply.headers, *begun.cors], reply.body, last):
                self._send(reply, cycle, begun.cors, last)
        finally:
            scope = cast(dict[str, Any], cycle.scope)
            self._access.done(scope, scope["path"], status, started)
            current_request_id.reset(token)

    def _send(
        self,
        reply: Reply,
        cycle: RequestResponseCycle,
        cors: list[tuple[bytes, bytes]],
        last: tuple[bytes, bytes],
    ) -> None:
        """Send through uvicorn's ``send``: the direct write cannot (the client not reading)."""
        task = asyncio.get_running_loop().create_task(reply.send(cycle.send, cors, last))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)


class HotHttpProtocol(BudgetedHttpProtocol):
    """The bridge's HTTP protocol, serving the JSON POSTs through HotPosts when it can."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hot = app_attribute(self.app, "hot_posts", HotPosts)
        self._held: tuple[RequestResponseCycle, Any] | None = None
        """A hot request's cycle and app whose task waits for the end of this read."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._held is not None:
            # Its body is still on its way: uvicorn's task reads it, under the body timeout.
            cycle, app = self._held
            self._held = None
            super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._held is not None and self._hot is not None:
            cycle, app = self._held
            self._held = None
            if not self._hot.serve(cycle):
                super()._start_asgi_task(cycle, app)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if self._hot is not None and app is self.app and self._hot.serves(cycle.scope):
            if cycle.more_body:  # its head is in, its body not yet
                self._held = (cycle, app)
                return
            if self._hot.serve(cycle):  # a pipelined request, its turn come
                return
        super()._start_asgi_task(cycle, app)
