"""The bridge's own CPU per request, in process: its ASGI app driven directly, the server
stubbed by a gatherer that answers at once. What uvicorn, the gRPC call and the server cost
is left out: this is for deciding small steps on the bridge's per-request path, steadier
than a whole `make bench` run on a shared box.

    python -m bench.inproc [--rounds 5] [--requests 4000] [--only v1,v2,wire]

Prints, per round, the process CPU µs per request (or frame) of each path. ``wire`` is v1
through the bridge's HTTP protocol (uvicorn's httptools protocol with the bridge's
bounds) on a transport that only records what is written: the request's bytes in, the
response's bytes out, uvicorn's per-request work included.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

import orjson
import uvloop
from fastapi import FastAPI

from bench.workload import Batches
from events_server.pb import events_pb2 as pb
from rest_bridge.admission import Admission
from rest_bridge.app import Bridge
from rest_bridge.config import BridgeSettings
from rest_bridge.cors import Cors
from rest_bridge.metrics import BridgeMetrics
from rest_bridge.offload import BodyParser
from rest_bridge.routes import v1, v2

KEY = "bench-key-0123456789abcdef"


class AtOnce:
    """A gatherer whose server answers every request at once (serializing it, as the real
    one does)."""

    async def _answer(self, request: Any, metadata: Any, ws_message_id: Any = None) -> Any:
        request.SerializeToString()
        dict(metadata)
        n = len(request.events)
        return pb.CreateEventsResponse(
            accepted=n,
            results=[
                pb.EventResult(status=pb.EventResult.STATUS_ACCEPTED, entry_id="1-0", partition=3)
            ]
            * n,
        )

    def submit(self, request: Any, metadata: Any, ws_message_id: Any = None) -> Any:
        future = asyncio.get_running_loop().create_future()
        coroutine = self._answer(request, metadata, ws_message_id)
        try:
            coroutine.send(None)
        except StopIteration as done:
            future.set_result(done.value)
        return future

    def create_events(self, request: Any, metadata: Any, ws_message_id: Any = None) -> Any:
        return self._answer(request, metadata, ws_message_id)

    def track(self, request: Any, metadata: Any) -> Any:
        return self._answer(request, metadata)


class Receive:
    """uvicorn's request cycle as far as the bridge looks at it: the whole body is in."""

    more_body = False

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": self.body, "more_body": False}


def _bridge() -> Bridge:
    # The key is admitted once, for longer than any run (no server to ask).
    settings = BridgeSettings(admission_cache_seconds=86_400)
    gatherer: Any = AtOnce()
    cors = Cors(lambda: None, settings)  # type: ignore[arg-type,return-value]
    parser = BodyParser(settings)
    admission = Admission(lambda: None, settings)  # type: ignore[arg-type,return-value]
    admission._admitted.put((KEY, None), True)
    create = v1.CreateEvents(settings, gatherer, cors, parser, None, admission)
    track = v2.Track(settings, gatherer, cors, parser, None, admission)
    return Bridge(FastAPI(), create, cors, settings, None, BridgeMetrics(), gatherer, track)


def _scope(path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 40000),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"x-api-key", KEY.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "state": {},
    }


V2_BODY = orjson.dumps(
    {
        "tenant": "storefront-1",
        "market": "se",
        "events": [
            {
                "event_type": "purchase",
                "transaction_id": "T-1",
                "currency": "SEK",
                "user_id": "u-1",
                "products": [{"sku": "white-socks-xl", "price": "89.90", "quantity": 2}],
            }
        ],
    }
)


async def _http(bridge: Bridge, path: str, bodies: list[bytes], n: int) -> float:
    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    started = time.process_time()
    for i in range(n):
        body = bodies[i % len(bodies)]
        await bridge(_scope(path, body), Receive(body).receive, send)
    return (time.process_time() - started) / n * 1e6


class Recorder:
    """A connection's transport as the protocol sees it: what is written is counted."""

    def __init__(self) -> None:
        self.answered = asyncio.Event()
        self.closing = False
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        assert data.startswith(b"HTTP/1.1 200 "), data[:200]
        self.answered.set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_protocol(self) -> Any:
        return self.protocol


async def _wire(bridge: Bridge, bodies: list[bytes], n: int) -> float:
    from uvicorn.config import Config  # noqa: PLC0415 (only this mode needs them)
    from uvicorn.server import ServerState  # noqa: PLC0415

    from rest_bridge.cli import uvicorn_options  # noqa: PLC0415
    from rest_bridge.connections import ConnectionGuard  # noqa: PLC0415
    from rest_bridge.https import bridge_protocol  # noqa: PLC0415

    settings = BridgeSettings()
    bridge.connection_guard = ConnectionGuard(settings, None)
    config = Config(bridge, **uvicorn_options(settings))  # as the bridge's own
    state = ServerState()
    state.default_headers = [(b"date", b"Sun, 06 Dec 2026 23:59:59 GMT")]
    protocol: Any = bridge_protocol(config, state, {})
    transport = Recorder()
    transport.protocol = protocol
    protocol.connection_made(transport)
    heads = [
        b"POST /create-events HTTP/1.1\r\nhost: 127.0.0.1:8000\r\ncontent-type: application/json"
        b"\r\nx-api-key: %s\r\ncontent-length: %d\r\n\r\n%s" % (KEY.encode(), len(b), b)
        for b in bodies
    ]
    started = time.process_time()
    for i in range(n):
        transport.answered.clear()
        protocol.data_received(heads[i % len(heads)])
        await transport.answered.wait()
        await asyncio.sleep(0)  # the turn's end: the cycle's task finishes
    spent = (time.process_time() - started) / n * 1e6
    protocol.connection_lost(None)
    return spent


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--only", default="v1,v2")
    args = parser.parse_args()
    bridge = _bridge()
    batches = Batches(seed=1, worker=0)
    v1_bodies = [batches.json_body(1) for _ in range(256)]
    random.Random(2).shuffle(v1_bodies)
    paths = {"v1": ("/create-events", v1_bodies), "v2": ("/v2/create-events", [V2_BODY])}
    chosen = args.only.split(",")
    figures: dict[str, list[float]] = {name: [] for name in chosen}

    async def run(name: str, n: int) -> float:
        if name == "wire":
            return await _wire(bridge, v1_bodies, n)
        return await _http(bridge, *paths[name], n)

    for name in chosen:  # warm-up
        await run(name, 500)
    for _ in range(args.rounds):
        for name in chosen:
            figures[name].append(await run(name, args.requests))
    for name, values in figures.items():
        shown = " ".join(f"{v:.1f}" for v in values)
        print(f"{name}: median {statistics.median(values):.1f} us/request ({shown})")


if __name__ == "__main__":
    uvloop.run(main())  # the bridge's loop
