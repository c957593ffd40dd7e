"""Load for the fault and load tests: retrying clients, a fixed-rate sender, their tallies."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.harness.data import event
from tests.harness.processes import rss_kib

RETRYABLE_HTTP = frozenset({503, 429})


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Tally:
    """What a retrying client saw."""

    acked: dict[str, dict[str, Any]] = field(default_factory=dict)
    """deduplication_id -> its result in the 200 that acknowledged it."""
    statuses: Counter[int] = field(default_factory=Counter)
    """Every HTTP status answered, retries included."""
    failures: list[str] = field(default_factory=list)
    """Answers that are neither a 200 nor a retryable refusal."""
    attempts: list[tuple[float, float, int]] = field(default_factory=list)
    """(started, ended, HTTP status) of every request sent, monotonic seconds."""

    @property
    def refusals(self) -> int:
        """Retryable refusals seen (each one retried)."""
        return sum(n for status, n in self.statuses.items() if status in RETRYABLE_HTTP)


async def post_until_acked(
    client: httpx.AsyncClient,
    body: list[dict[str, Any]],
    tally: Tally,
    *,
    give_up_after: float = 60.0,
) -> bool:
    """POST until a 200, retrying refusals (503, 429) with backoff; False on anything else."""
    backoff = 0.01
    deadline = time.monotonic() + give_up_after
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            answer = await client.post("/create-events", json=body)
        except httpx.TransportError as error:
            tally.failures.append(f"transport: {error!r}")
            return False
        tally.attempts.append((started, time.monotonic(), answer.status_code))
        tally.statuses[answer.status_code] += 1
        if answer.status_code == 200:
            for sent, result in zip(body, answer.json()["results"], strict=True):
                tally.acked[sent["deduplication_id"]] = result
            return True
        if answer.status_code not in RETRYABLE_HTTP or "retry-after" not in answer.headers:
            tally.failures.append(f"{answer.status_code}: {answer.text[:200]}")
            return False
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 0.2)
    tally.failures.append(f"still refused after {give_up_after}s")
    return False


async def acked_at_least(tally: Tally, count: int, give_up: asyncio.Event | None = None) -> bool:
    """Wait until ``count`` events are acknowledged; False if ``give_up`` is set first."""
    while len(tally.acked) < count:
        if give_up is not None and give_up.is_set():
            return False
        await asyncio.sleep(0.005)
    return True


async def retrying_clients(
    url: str, pending: list[list[dict[str, Any]]], tally: Tally, workers: int, api_key: str
) -> None:
    """``workers`` clients posting the pending requests until each is acknowledged."""
    async with httpx.AsyncClient(
        base_url=url, timeout=10, headers={"x-api-key": api_key}
    ) as client:

        async def worker() -> None:
            while pending:
                await post_until_acked(client, pending.pop(), tally)

        await asyncio.gather(*(worker() for _ in range(workers)))


@dataclass
class SoakResult:
    """What a fixed-rate run saw."""

    sent: int = 0
    accepted: int = 0
    errors: list[str] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds since start, server RSS KiB, bridge RSS KiB)."""


async def fixed_rate(  # noqa: PLR0917
    url: str,
    seconds: float,
    rate: float,
    size: int,
    pids: tuple[int, int],
    api_key: str,
    sample_every: float = 5.0,
) -> SoakResult:
    """POST ``rate`` requests of ``size`` new events a second for ``seconds``; sample RSS."""
    result = SoakResult()
    limit = asyncio.Semaphore(32)

    def sample(at: float) -> None:
        result.samples.append((at, rss_kib(pids[0]), rss_kib(pids[1])))

    headers = {"x-api-key": api_key}
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as client:

        async def one(n: int) -> None:
            body = [event("soak", n * size + i) for i in range(size)]
            try:
                answer = await client.post("/create-events", json=body)
            except httpx.TransportError as error:
                result.errors.append(repr(error))
                return
            finally:
                limit.release()
            if answer.status_code != 200:
                result.errors.append(f"{answer.status_code}: {answer.text[:200]}")
                return
            result.accepted += answer.json()["accepted"]

        start = time.monotonic()
        next_sample = start
        tasks = []
        while (now := time.monotonic()) - start < seconds:
            if now >= next_sample:
                sample(now - start)
                next_sample += sample_every
            await limit.acquire()
            tasks.append(asyncio.create_task(one(result.sent)))
            result.sent += 1
            # Fixed rate: request n leaves at start + n / rate, whatever the others do.
            await asyncio.sleep(max(0.0, start + result.sent / rate - time.monotonic()))
        await asyncio.gather(*tasks)
        sample(time.monotonic() - start)
    return result
