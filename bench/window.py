"""What the raw-socket load generators (bench.wsload, bench.httpload) share: the measured
window, what they report, and how they tell the orchestrator where the window is.

Each runs in a process of its own. It prints ``measuring`` when its warm-up ends and
``stopped`` when the window ends (the orchestrator samples every process's CPU, its own
included, at each), then one JSON line: a LoadResult.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson


@dataclass
class LoadResult:
    """What a generator saw in its measured window."""

    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Window:
    """The warm-up's end and the window's, on the monotonic clock."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.measure_from = time.monotonic() + warmup
        self.stop = self.measure_from + seconds
        self.result = LoadResult(seconds=seconds)

    def announce(self) -> None:
        """Print ``measuring`` when the window opens (now, if it already has)."""
        loop = asyncio.get_running_loop()
        loop.call_at(self.measure_from, lambda: print("measuring", flush=True))

    async def until_stop(self) -> None:
        """Wait for the window's end, and say so."""
        await asyncio.sleep(max(self.stop - time.monotonic(), 0))
        print("stopped", flush=True)


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Small writes each way: Nagle would hold them back for the peer's ACKs."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_and_report(main: Coroutine[Any, Any, LoadResult]) -> int:
    """Run a generator on uvloop (asyncio's loop without it) and print its result."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        result = asyncio.run(main)
    else:
        result = uvloop.run(main)
    sys.stdout.write(orjson.dumps(asdict(result)).decode() + "\n")
    return 0
