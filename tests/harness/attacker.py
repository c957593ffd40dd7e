"""An attacker of the bridge's front door, as its own process (its CPU is not the test's).

``python -m tests.harness.attacker KIND URL SECONDS CONNECTIONS [ORIGIN]`` runs until
SECONDS have passed, then prints how it was answered as JSON ({answer: count}); a line
"ready" comes first, right before the attack. The kinds (issue 19, rows 7 to 9):

- ``keys``: one-event POSTs, each with a made-up API key, back to back on each connection
  (the unknown-key allowance of the address they share with real clients);
- ``bodies``: valid 1 MiB bodies without a key or with a made-up one, back to back on each
  connection (what the bridge holds before the server learns there is no caller);
- ``frames``: invalid frames from ORIGIN, a registered storefront's, forged, on each of
  CONNECTIONS WebSockets, 16 in flight each (each one a rejected-request record).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException
from websockets.typing import Origin

MAX_BODY = 1024 * 1024


def large_body(tenant: str = "shop-x") -> bytes:
    """A valid body of 500 events just under 1 MiB (the bridge's default max_body_bytes)."""
    ids = [f"v{n:015d}" for n in range(96)]
    event = {"tenant": tenant, "market": "us", "type": "click", "user_id": "u", "variant_ids": ids}
    body = json.dumps([event] * 500, separators=(",", ":")).encode()
    assert len(body) <= MAX_BODY, len(body)
    return body


SMALL = json.dumps([{"tenant": "shop-x", "market": "us", "type": "page_view"}]).encode()


async def _answer(reader: asyncio.StreamReader) -> tuple[str, bool]:
    """The status of an HTTP answer, and whether the connection stays open after it."""
    status = (await reader.readline()).split(b" ", 2)
    if len(status) < 2:
        raise ConnectionResetError("closed")
    length, keep = 0, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"connection" and b"close" in value.lower():
            keep = False
    await reader.readexactly(length)
    return status[1].decode(), keep


async def posts(
    url: str, seconds: float, connections: int, body: bytes, key: Callable[[int], str | None]
) -> Counter[str]:
    """POST ``body`` back to back on each connection, reconnecting when one is closed."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    end = time.monotonic() + seconds
    seen: Counter[str] = Counter()

    async def one(n: int) -> None:
        while time.monotonic() < end:
            writer = None
            try:
                reader, writer = await asyncio.open_connection(host, port)
                keep = True
                while keep and time.monotonic() < end:
                    secret = key(n)
                    head = (
                        f"POST /create-events HTTP/1.1\r\nHost: {host}\r\n"
                        "Content-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n"
                        + (f"X-API-KEY: {secret}\r\n" if secret else "")
                        + "\r\n"
                    )
                    writer.write(head.encode() + body)
                    answer = asyncio.ensure_future(_answer(reader))
                    # Answered and closed before the whole body went: the answer counts.
                    with contextlib.suppress(OSError):
                        await writer.drain()
                    status, keep = await asyncio.wait_for(answer, 30)
                    seen[status] += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
                seen[type(error).__name__] += 1
                await asyncio.sleep(0.01)
            finally:
                if writer is not None:
                    writer.close()

    await asyncio.gather(*(one(n) for n in range(connections)))
    return seen


async def _answers(socket: Any, window: asyncio.Semaphore, seen: Counter[str]) -> None:
    async for text in socket:
        seen[json.loads(text).get("status", "?")] += 1
        window.release()


async def frames(url: str, seconds: float, connections: int, origin: str) -> Counter[str]:
    """Invalid frames (an unknown event type) from ``origin``, 16 in flight per socket."""
    ws = url.replace("http://", "ws://", 1) + "/ws/create-events"
    end = time.monotonic() + seconds
    seen: Counter[str] = Counter()

    async def one(n: int) -> None:
        while time.monotonic() < end:
            try:
                async with connect(ws, origin=Origin(origin), compression=None) as socket:
                    window = asyncio.Semaphore(16)
                    reader = asyncio.create_task(_answers(socket, window, seen))
                    count = 0
                    while time.monotonic() < end and not reader.done():
                        await window.acquire()
                        count += 1
                        event = {"tenant": "shop-x", "market": "us", "type": "junk"}
                        await socket.send(json.dumps({"id": f"a{n}-{count}", "event": event}))
                    reader.cancel()
            except (OSError, WebSocketException) as error:
                seen[type(error).__name__] += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(one(n) for n in range(connections)))
    return seen


def main() -> None:
    kind, url, seconds, connections = sys.argv[1:5]
    print("ready", flush=True)
    if kind == "keys":
        made_up = lambda n: f"evk_made-up-{uuid.uuid4().hex}"  # noqa: E731
        seen = asyncio.run(posts(url, float(seconds), int(connections), SMALL, made_up))
    elif kind == "bodies":
        # Half without a key, half with a made-up one.
        key = lambda n: None if n % 2 else f"evk_made-up-{uuid.uuid4().hex}"  # noqa: E731
        seen = asyncio.run(posts(url, float(seconds), int(connections), large_body(), key))
    elif kind == "frames":
        seen = asyncio.run(frames(url, float(seconds), int(connections), sys.argv[5]))
    else:
        raise SystemExit(f"unknown attack {kind!r}")
    print(json.dumps(dict(seen)), flush=True)


if __name__ == "__main__":
    main()
