"""Two consumer processes in one group, one SIGKILLed mid-batch 5 times, over 10,000 events."""

from __future__ import annotations

import functools
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis

from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.consumers import Entry, handled, out_of_order, produce
from tests.harness.streams import Queue
from tests.harness.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]


GROUP = "kill-test"


EVENTS = 10_000


KILLS = 5


class Worker:
    """One tests.harness.consumer_worker process."""

    def __init__(self, settings: Settings, name: str, log: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "tests.harness.consumer_worker",
                settings.redis_url, settings.key_prefix, str(settings.partitions),
                GROUP, name, str(log),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        # Wait until its SIGTERM handler is in place.
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        if not ready or self.proc.stdout.readline() != "ready\n":
            self.kill()
            raise RuntimeError(f"consumer worker {name} did not start")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        """SIGTERM: a clean stop; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


class Workers:
    """The worker processes of the test, their logs, and the current victim."""

    def __init__(self, settings: Settings, rdb: redis.Redis, keys: KeySpace, logs: Path) -> None:
        self.settings = settings
        self.rdb = rdb
        self.keys = keys
        self.directory = logs
        self.logs: list[Path] = []
        self.victim: Worker

    def start(self, name: str) -> Worker:
        """Start a worker logging to <name>.log; the last one started is the victim."""
        self.logs.append(self.directory / f"{name}.log")
        self.victim = Worker(self.settings, name, self.logs[-1])
        return self.victim

    def busy(self, name: str) -> bool:
        """It has handled messages and holds entries it has not acknowledged."""
        log = self.directory / f"{name}.log"
        return log.exists() and log.stat().st_size > 0 and pending_of(self.rdb, self.keys)[name] > 0

    def kill_victim_mid_batch(self, times: int, rng: random.Random) -> tuple[int, int]:
        """SIGKILL the victim inside a batch ``times`` times, restarting it as a new consumer."""
        kills = mid_batch = 0
        for _ in range(50):
            if mid_batch == times:
                break
            time.sleep(rng.uniform(0.2, 0.6))
            eventually(functools.partial(self.busy, self.victim.name), within=10)
            time.sleep(rng.uniform(0.01, 0.06))  # a little while into its batch...
            if not self.busy(self.victim.name):
                continue  # ...unless it is between two batches just now
            self.victim.kill()
            kills += 1
            # What it held as it died: given to it, not acknowledged.
            mid_batch += pending_of(self.rdb, self.keys)[self.victim.name] > 0
            self.start(f"victim-{kills}")
        return kills, mid_batch


def pending_of(rdb: redis.Redis, keys: KeySpace) -> dict[str, int]:
    """The group's unacknowledged entries, by consumer."""
    found: dict[str, int] = defaultdict(int)
    for stream in keys.streams():
        try:
            summary: Any = rdb.xpending(stream, GROUP)
        except redis.ResponseError:  # NOGROUP: no consumer has started yet
            continue
        for consumer in summary["consumers"]:
            found[consumer["name"].decode()] += int(consumer["pending"])
    return found


@pytest.mark.slow
def test_every_event_is_handled_in_order_while_a_consumer_is_killed_mid_batch(
    stub: events_pb2_grpc.EventsServiceStub, queue: Queue, tmp_path: Path
) -> None:
    queued = produce(stub, 4_000, users=500)
    later: set[Entry] = set()
    # The rest arrives while the consumers work and die.
    producer = threading.Thread(target=lambda: later.update(produce(stub, 6_000, users=500)))
    workers = Workers(queue.settings, queue.rdb, queue.keys, tmp_path)
    survivor = workers.start("survivor")
    workers.start("victim-0")
    try:
        producer.start()
        kills, mid_batch = workers.kill_victim_mid_batch(KILLS, random.Random(6))
        producer.join(60)
        queued |= later
        assert len(queued) == EVENTS

        def all_done() -> bool:
            unique = {(p, entry_id) for _, p, entry_id, _ in handled(workers.logs)}
            return unique >= queued and sum(pending_of(queue.rdb, queue.keys).values()) == 0

        eventually(all_done, within=60)
    finally:
        codes = [survivor.terminate(), workers.victim.terminate()]
        workers.victim.kill()
        survivor.kill()

    lines = handled(workers.logs)
    unique = {(p, entry_id) for _, p, entry_id, _ in lines}
    redeliveries = len(lines) - len(unique)
    violations = out_of_order(lines, queued)
    pending_at_end = sum(pending_of(queue.rdb, queue.keys).values())
    dead = sum(
        queue.rdb.xlen(queue.keys.dead_letters(p, GROUP)) for p in range(queue.keys.partitions)
    )
    print(
        f"\nconsumer kill test: {EVENTS} events, {queue.keys.partitions} partitions, 2 consumers,"
        f" {kills} SIGKILLs ({mid_batch} mid-batch)\n"
        f"  handled at least once: {len(unique & queued)}/{EVENTS}\n"
        f"  handlings: {len(lines)} (redeliveries: {redeliveries},"
        f" with deliveries > 1: {sum(1 for line in lines if line[3] > 1)})\n"
        f"  pending at the end: {pending_at_end}; dead letters: {dead}\n"
        f"  handled before an older entry of its partition: {violations}"
    )
    assert codes == [0, 0]
    assert mid_batch == KILLS
    assert kills < 2 * KILLS  # nearly every kill lands mid-batch
    assert unique == queued
    assert pending_at_end == 0
    assert dead == 0
    assert violations == 0
    assert redeliveries > 0  # the kills did interrupt batches
