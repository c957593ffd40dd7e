"""An attack on a bridge process (tests.harness.ws_attacks) with a legitimate client beside it.

The bridge runs as a process of its own (its memory measured alone), in front of the
session's gRPC server; the attacker is another process. The legitimate client, in the
test's process, keeps one keyed WebSocket sending one event at a time and one keep-alive
connection posting one event at a time, each at ``LEGIT_RATE`` a second, as Depict's
storefronts do: what they got (latencies, failures) and the bridge's memory over the
attack are the outcome.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection

from tests.harness.processes import BridgeProcess, rss_kib
from tests.harness.ws import event, frame, opened

LEGIT_RATE = 20.0
LEGIT_TIMEOUT = 5.0
MIB = 1024 * 1024


@dataclass
class Legit:
    """What the legitimate client got."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0

    def __str__(self) -> str:
        ordered = sorted(self.latencies)
        p50 = ordered[len(ordered) // 2] * 1000 if ordered else 0.0
        failed = f", failed {self.failures[:3]}" if self.failures else ""
        return f"{len(ordered)} ok, p50 {p50:.0f} ms, p99 {self.p99() * 1000:.0f} ms{failed}"


@dataclass
class Outcome:
    """What an attack did: to the legitimate client, to the bridge's memory, as it saw it."""

    ws: Legit
    post: Legit
    rss_before: int
    rss_peak: int
    attacker: dict[str, Any]

    @property
    def growth_mib(self) -> float:
        return (self.rss_peak - self.rss_before) / 1024

    def __str__(self) -> str:
        return (
            f"legit WS {self.ws}; legit POST {self.post}; bridge"
            f" {self.rss_before // 1024} -> {self.rss_peak // 1024} MiB; attacker {self.attacker}"
        )


async def _legit_ws(base: str, key: str, until: float, got: Legit) -> None:
    try:
        async with opened(base, key) as ws:
            await _legit_frames(ws, until, got)
    except Exception as error:  # a handshake that fails or times out: a failure too
        got.failures.append(f"handshake: {type(error).__name__}")


async def _legit_frames(ws: ClientConnection, until: float, got: Legit) -> None:
    n = 0
    while time.monotonic() < until:
        began = time.monotonic()
        n += 1
        try:
            await ws.send(frame(f"legit-{n}", event(user_id="legit")))
            answer = json.loads(await asyncio.wait_for(ws.recv(), LEGIT_TIMEOUT))
        except Exception as error:  # a closed socket too: a failure
            got.failures.append(type(error).__name__)
            return
        if answer.get("status") != "ok":
            got.failures.append(str(answer)[:200])
        else:
            got.latencies.append(time.monotonic() - began)
        await asyncio.sleep(max(0.0, began + 1 / LEGIT_RATE - time.monotonic()))


async def _legit_post(base: str, key: str, until: float, got: Legit) -> None:
    headers = {"x-api-key": key}
    async with httpx.AsyncClient(base_url=base, timeout=LEGIT_TIMEOUT, headers=headers) as http:
        while time.monotonic() < until:
            began = time.monotonic()
            try:
                answer = await http.post("/create-events", json=[event(user_id="legit")])
                status: int | str = answer.status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            if status == 200:
                got.latencies.append(time.monotonic() - began)
            else:
                got.failures.append(str(status))
            await asyncio.sleep(max(0.0, began + 1 / LEGIT_RATE - time.monotonic()))


def legit_traffic(base: str, key: str, seconds: float) -> tuple[Legit, Legit]:
    """A storefront's WebSocket and POSTs for ``seconds``: what each got."""
    ws, post = Legit(), Legit()

    async def both() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(_legit_ws(base, key, until, ws), _legit_post(base, key, until, post))

    asyncio.run(both())
    return ws, post


@contextmanager
def bridge_process(target: str, logs: Path, **env: str) -> Iterator[BridgeProcess]:
    """A bridge process in front of ``target``, its settings ``env`` (EVENTS_*: a setting an
    older bridge lacks is ignored, as a flag would not be)."""
    bridge = BridgeProcess(
        target, logs / "bridge.log", "--log-level", "WARNING", env={**os.environ, **env}
    )
    bridge.start()
    try:
        yield bridge
    finally:
        bridge.stop()


class _Sampler(threading.Thread):
    """The bridge's peak resident memory while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = rss_kib(pid)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except (OSError, RuntimeError):
                return


def siege(  # noqa: PLR0917
    bridge: BridgeProcess,
    attack: str,
    legit_key: str,
    attacker_key: str,
    seconds: float,
    sockets: int = 1,
) -> Outcome:
    """Run ``attack`` for ``seconds`` with legitimate traffic beside it (from when the
    attacker is up, for ``seconds`` less 2)."""
    legit_traffic(bridge.url, legit_key, 1.0)  # warm: channel up, keys cached
    before = rss_kib(bridge.pid)
    sampler = _Sampler(bridge.pid)
    sampler.start()
    argv = [sys.executable, "-m", "tests.harness.ws_attacks", attack, bridge.url, attacker_key]
    attacker = subprocess.Popen(
        [*argv, str(seconds), str(sockets)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "ready", "the attacker never got a socket"
        ws, post = legit_traffic(bridge.url, legit_key, seconds - 2)
        out, _ = attacker.communicate(timeout=seconds + 30)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait(10)
        sampler.done.set()
        sampler.join(5)
    return Outcome(ws, post, before, sampler.peak, json.loads(out.strip().splitlines()[-1]))
