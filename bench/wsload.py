"""W1's load generator: many WebSockets, several frames in flight on each, one event a frame.

python -m bench.wsload URL API_KEY --connections 32 --in-flight 8 --seconds 12 --warmup 2

One process on raw sockets (asyncio protocols on uvloop): a frame is a precomputed
event, a fresh id and a C-masked payload, the frames a read makes due leave in one
write, and each frame waits for its ``{"id", "status"}`` answer before the next one
takes its place (closed loop). So its CPU per frame stays a small fraction of what the
bridge spends on one; `make bench` reads it from /proc and prints it.

It reports as bench.window says: the frames answered ``ok`` in the window (requests),
the other answers by status, and their latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import sys
import time
from typing import cast
from urllib.parse import urlsplit

import orjson
from websockets.speedups import apply_mask

from bench.window import LoadResult, Window, no_delay, run_and_report
from bench.workload import Batches

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA
DRAIN_SECONDS = 5.0
"""After the window, how long frames still out may take to be answered."""


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 5.2)."""
    mask = random.getrandbits(32).to_bytes(4, "big")
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


class Load(Window):
    """The shared state: the window, the frames to send, what came back."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.warmup, args.seconds)
        self.args = args
        self.batches = Batches(args.seed, 0)
        self.sockets: list[WsSocket] = []
        self.finished = asyncio.get_running_loop().create_future()

    def next_frame(self, waiting: dict[str, float], now: float) -> bytes:
        frame_id, payload = self.batches.ws_frame()
        waiting[frame_id] = now
        return client_frame(OP_TEXT, payload)

    def check_done(self) -> None:
        if (
            time.monotonic() >= self.stop
            and not self.finished.done()
            and all(not s.waiting or s.closed for s in self.sockets)
        ):
            self.finished.set_result(None)


class WsSocket(asyncio.Protocol):
    """One WebSocket: handshake, then frames out and answers in, on callbacks only."""

    def __init__(self, load: Load, host: str, path: str) -> None:
        self.load = load
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.upgraded = False
        self.closed = False
        self.waiting: dict[str, float] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        self.transport = cast(asyncio.Transport, transport)
        no_delay(transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during the handshake: {exc}"))
        if self.waiting and time.monotonic() < self.load.stop:
            self.load.result.error("connection closed")
        self.load.check_done()

    def start(self) -> None:
        """Put in_flight frames out."""
        now = time.monotonic()
        out = [self.load.next_frame(self.waiting, now) for _ in range(self.load.args.in_flight)]
        assert self.transport is not None
        self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        data = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = data
                return
            status = data.split(b" ", 2)[1]
            if status != b"101":
                self.opened.set_exception(ConnectionError(f"handshake answered {data[:end]!r}"))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            self.opened.set_result(None)
            data = data[end + 4 :]
        self.buffer = self._frames(data)

    def _frames(self, data: bytes) -> bytes:
        """Handle every whole frame in data; return the rest."""
        load, result = self.load, self.load.result
        out: list[bytes] = []
        at, size = 0, len(data)
        while size - at >= 2:
            opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
            start = at + 2
            if length == 126:
                start = at + 4
                length = int.from_bytes(data[at + 2 : start], "big")
            elif length == 127:
                start = at + 10
                length = int.from_bytes(data[at + 2 : start], "big")
            if start + length > size:
                break
            payload = data[start : start + length]
            at = start + length
            if opcode == OP_TEXT:
                answer = orjson.loads(payload)
                sent = self.waiting.pop(answer.get("id"), None)
                now = time.monotonic()
                if sent is None:
                    result.error("answer to no frame")
                elif load.measure_from <= now <= load.stop:
                    if answer.get("status") == "ok":
                        result.requests += 1
                        result.latencies.append(now - sent)
                    else:
                        result.error(f"status {answer.get('status')}")
                if now < load.stop:
                    out.append(load.next_frame(self.waiting, now))
            elif opcode == OP_PING:
                out.append(client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                result.error(f"closed by the bridge {payload[:2].hex()}")
                self.closed = True
        if out:
            assert self.transport is not None
            self.transport.write(b"".join(out))
        if not self.waiting:
            load.check_done()
        return data[at:]

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()


async def run(args: argparse.Namespace) -> LoadResult:
    """Open every socket, run the window, drain, and report."""
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = f"/ws/create-events?api_key={args.api_key}"
    loop = asyncio.get_running_loop()
    load = Load(args)
    for _ in range(args.connections):
        _, sock = await loop.create_connection(
            lambda: WsSocket(load, f"{host}:{port}", path), host, port
        )
        load.sockets.append(sock)
    await asyncio.gather(*(s.opened for s in load.sockets))
    for sock in load.sockets:
        sock.start()
    load.announce()
    await load.until_stop()
    load.check_done()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(load.finished), DRAIN_SECONDS)
    unanswered = sum(len(s.waiting) for s in load.sockets if not s.closed)
    if unanswered:
        load.result.errors["unanswered"] = unanswered
    for sock in load.sockets:
        sock.close()
    return load.result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", help="the bridge, http://host:port")
    parser.add_argument("api_key")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=8, help="frames out per socket")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    return run_and_report(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
