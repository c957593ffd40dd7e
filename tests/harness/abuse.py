"""A legitimate client beside an attack: what it got, and the attacker as a child process.

``Legit`` is what the adversarial pass of issue 19 ran beside each attack: a keyed
WebSocket sending one frame at a time and keyed one-event POSTs, each about 20 a second,
from the same address as the attacker (loopback). ``Attack`` runs tests.harness.attacker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.harness.processes import rss_kib

RATE = 20.0


@dataclass
class Fared:
    """How one kind of legitimate request fared: each outcome, and the good ones' latency."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def good(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] += 1
        self.latencies.append(seconds)

    def p99(self) -> float:
        """The 99th percentile of the good ones' latency, seconds (0 without any)."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0

    def summary(self) -> str:
        return f"{dict(self.outcomes)} p99 {self.p99() * 1000:.0f} ms"


class Legit:
    """Keyed POSTs and a keyed WebSocket at ``RATE`` a second each, in threads of their own."""

    def __init__(self, url: str, key: str, tenant: str = "shop-x") -> None:
        self.url = url
        self.key = key
        self.tenant = tenant
        self.posts = Fared()
        self.frames = Fared()
        self.closed: tuple[int, str] | None = None
        """The WebSocket's close code and reason, if it was closed."""
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._post, daemon=True),
            threading.Thread(target=lambda: asyncio.run(self._socket()), daemon=True),
        ]

    def __enter__(self) -> Legit:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def event(self, n: int) -> dict[str, Any]:
        return {"tenant": self.tenant, "market": "us", "type": "page_view", "user_id": f"l{n}"}

    def _post(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10, headers={"x-api-key": self.key}) as http:
            start, n = time.monotonic(), 0
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    status = str(http.post("/create-events", json=[self.event(n)]).status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                if status == "200":
                    self.posts.good(status, time.monotonic() - began)
                else:
                    self.posts.outcomes[status] += 1
                n += 1
                self._stop.wait(max(0.0, start + n / RATE - time.monotonic()))

    async def _socket(self) -> None:
        ws = self.url.replace("http://", "ws://", 1) + f"/ws/create-events?api_key={self.key}"
        try:
            async with connect(ws, compression=None) as socket:
                start, n = time.monotonic(), 0
                while not self._stop.is_set():
                    began = time.monotonic()
                    frame_id = f"legit-{n}"
                    await socket.send(json.dumps({"id": frame_id, "event": self.event(n)}))
                    try:
                        answer = json.loads(await asyncio.wait_for(socket.recv(), 5))
                    except TimeoutError:
                        self.frames.outcomes["unanswered"] += 1
                    else:
                        if answer.get("status") == "ok" and answer.get("id") == frame_id:
                            self.frames.good("ok", time.monotonic() - began)
                        else:
                            self.frames.outcomes[str(answer.get("status"))] += 1
                    n += 1
                    await asyncio.sleep(max(0.0, start + n / RATE - time.monotonic()))
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            self.closed = (rcvd.code, rcvd.reason) if rcvd else (1006, "")
        except OSError as error:
            self.closed = (0, f"{type(error).__name__}: {error}")


class Attack:
    """tests.harness.attacker as a child process; ``result()`` waits for its answers."""

    def __init__(self, kind: str, url: str, seconds: float, connections: int, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.attacker", kind, url, str(seconds),
             str(connections), *extra],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Kill it (an attack that already did its harm)."""
        if self.running():
            self.proc.kill()
        self.proc.wait(10)

    def result(self, timeout: float = 60) -> dict[str, int]:
        """How its requests were answered (empty when it was stopped)."""
        out, _ = self.proc.communicate(timeout=timeout)
        lines = out.strip().splitlines()
        return json.loads(lines[-1]) if lines and self.proc.returncode == 0 else {}


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the bridge's parse workers), KiB."""
    total = 0
    for each in [pid, *_children(pid)]:
        with contextlib.suppress(OSError, RuntimeError):  # gone meanwhile
            total += rss_kib(each)
    return total


def _children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(child) for child in found]
