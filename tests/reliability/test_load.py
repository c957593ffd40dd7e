"""Under steady load: SIGTERM loses no acknowledged event, a soak leaks no memory.

Real signals to a real server process, real processes measured. Each test reports
its figures (see the "figures" section at the end of the run).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.data import batches
from tests.harness.load import Tally, acked_at_least, fixed_rate, retrying_clients
from tests.harness.processes import ServerProcess, deployed, events_env
from tests.harness.servers import bridged
from tests.harness.streams import Queue, stream_contents
from tests.harness.valkey import free_port

Figures = Callable[[str], None]


# --- graceful shutdown under load ---------------------------------------------------


@pytest.mark.slow
def test_sigterm_under_load_loses_no_acknowledged_event(
    queue: Queue, tmp_path: Path, figures: Figures
) -> None:
    total, size, workers = 4000, 5, 8
    port = free_port()
    env = events_env(queue.settings, EVENTS_SHUTDOWN_GRACE_SECONDS="5")
    first = ServerProcess(env, tmp_path / "server-1.log", f"127.0.0.1:{port}")
    second = ServerProcess(env, tmp_path / "server-2.log", f"127.0.0.1:{port}")
    tally = Tally()
    times: dict[str, float] = {}
    exit_codes: list[int] = []

    async def terminate_then_restart() -> None:
        await acked_at_least(tally, total // 3)
        # Hold writes in Redis a moment, so that calls are surely in flight in the server
        # when SIGTERM lands: they must complete (200), not be dropped.
        await asyncio.to_thread(queue.rdb.client_pause, 400, all=False)
        await asyncio.sleep(0.15)
        times["sigterm"] = time.monotonic()
        first.signal(signal.SIGTERM)
        exit_codes.append(await asyncio.to_thread(first.wait, 15))
        await asyncio.sleep(0.3)  # clients meet a server that is gone, too
        await asyncio.to_thread(second.start)
        times["back"] = time.monotonic()

    async def run(url: str) -> None:
        pending = list(batches("term", total, size))
        await asyncio.gather(
            terminate_then_restart(), retrying_clients(url, pending, tally, workers, queue.api_key)
        )

    try:
        first.start()
        with bridged(f"127.0.0.1:{port}", grpc_timeout_seconds=3.0) as url:
            asyncio.run(run(url))
    finally:
        queue.rdb.client_unpause()
        first.kill()
        second.stop()

    found = stream_contents(queue.rdb, queue.keys)
    missing = [i for i in tally.acked if i not in found]
    duplicates = sum(len(ids) - 1 for ids in found.values())
    sigterm, back = times["sigterm"], times["back"]
    in_flight_ok = sum(s < sigterm < e and status == 200 for s, e, status in tally.attempts)
    refused = sum(status == 503 and s >= sigterm for s, _, status in tally.attempts)
    first_ok = min(e for s, e, status in tally.attempts if status == 200 and s >= back)
    figures(
        f"N={total}; SIGTERM after {total // 3} acked; in flight at SIGTERM, then 200:"
        f" {in_flight_ok}; 503s after SIGTERM: {refused}; first 200 {first_ok - back:.2f}s"
        f" after the restart; exit code {exit_codes}; acked={len(tally.acked)},"
        f" missing={len(missing)}, duplicates={duplicates}"
    )
    assert exit_codes == [0]
    assert tally.failures == []
    assert set(tally.statuses) <= {200, 503}
    assert in_flight_ok > 0  # calls in flight at SIGTERM completed
    assert refused > 0  # new calls were refused, retryably, while the server was going
    assert "shutting down: draining" in first.log()
    assert len(tally.acked) == total
    assert missing == []
    assert duplicates == 0


# --- soak -------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_at_a_fixed_rate_without_errors_or_memory_growth(
    queue: Queue, tmp_path: Path, figures: Figures
) -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "120"))
    warmup, rate, size = min(20.0, seconds / 6), 100, 10
    with deployed(events_env(queue.settings), tmp_path) as (server, bridge):
        soak = asyncio.run(
            fixed_rate(
                bridge.url,
                seconds,
                rate,
                size,
                pids=(server.pid, bridge.pid),
                api_key=queue.api_key,
            )
        )

    queued = sum(int(queue.rdb.xlen(stream)) for stream in queue.keys.streams())
    after_warmup = [s for s in soak.samples if s[0] >= warmup]
    base, last = after_warmup[0], after_warmup[-1]
    server_growth = (last[1] - base[1]) / base[1]
    bridge_growth = (last[2] - base[2]) / base[2]
    figures(
        f"{seconds:.0f}s at {rate} req/s x {size} events: sent {soak.sent * size} events,"
        f" accepted {soak.accepted}, errors {len(soak.errors)}, stream length {queued}; RSS"
        f" after {warmup:.0f}s warm-up -> end: server {base[1] / 1024:.1f}->{last[1] / 1024:.1f}"
        f" MiB ({server_growth:+.1%}), bridge {base[2] / 1024:.1f}->{last[2] / 1024:.1f} MiB"
        f" ({bridge_growth:+.1%})"
    )
    assert soak.errors == []
    assert soak.accepted == soak.sent * size
    assert queued == soak.accepted
    assert server_growth < 0.10
    assert bridge_growth < 0.10
