"""Two consumer processes in one group, one SIGKILLed mid-batch 5 times, over 10,000 events."""

from __future__ import annotations

import functools
import random
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

from events_server.config import Settings
from events_server.keys import KeySpace
from events_server.pb import events_pb2_grpc
from tests.test_consumer import Entry, entry_key, produce
from tests.test_server import eventually

ROOT = Path(__file__).resolve().parent.parent
GROUP = "kill-test"
EVENTS = 10_000
KILLS = 5


class Worker:
    """One tests.consumer_worker process."""

    def __init__(self, settings: Settings, name: str, log: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "tests.consumer_worker",
                settings.redis_url, settings.key_prefix, str(settings.partitions),
                GROUP, name, str(log),
            ],
            cwd=ROOT,
        )  # fmt: skip

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


def handled(logs: list[Path]) -> list[tuple[int, int, str, int]]:
    """Every handling in every log, in time order: (ns, partition, entry id, deliveries)."""
    lines = []
    for log in logs:
        if log.exists():
            for line in log.read_text().splitlines():
                ns, partition, entry_id, deliveries = line.split()
                lines.append((int(ns), int(partition), entry_id, int(deliveries)))
    return sorted(lines)


def out_of_order(lines: list[tuple[int, int, str, int]], queued: set[Entry]) -> int:
    """Handlings of an entry while an older entry of its partition was not handled yet."""
    order: dict[int, list[str]] = defaultdict(list)
    for partition, entry_id in queued:
        order[partition].append(entry_id)
    position = {}
    for partition, ids in order.items():
        ids.sort(key=entry_key)
        position.update({(partition, entry_id): i for i, entry_id in enumerate(ids)})
    seen: dict[int, set[int]] = defaultdict(set)
    done: dict[int, int] = defaultdict(int)  # how many of the oldest are all handled
    violations = 0
    for _, partition, entry_id, _ in lines:
        index = position[(partition, entry_id)]
        if index > done[partition]:
            violations += 1
        seen[partition].add(index)
        while done[partition] in seen[partition]:
            done[partition] += 1
    return violations


@pytest.mark.slow
def test_every_event_is_handled_in_order_while_a_consumer_is_killed_mid_batch(
    stub: events_pb2_grpc.EventsServiceStub,
    rdb: redis.Redis,
    settings: Settings,
    keys: KeySpace,
    tmp_path: Path,
) -> None:
    queued = produce(stub, 4_000, users=500)
    later: set[Entry] = set()
    # The rest arrives while the consumers work and die.
    producer = threading.Thread(target=lambda: later.update(produce(stub, 6_000, users=500)))
    logs: list[Path] = []

    def start(name: str) -> Worker:
        logs.append(tmp_path / f"{name}.log")
        return Worker(settings, name, logs[-1])

    survivor = start("survivor")
    victim = start("victim-0")
    rng = random.Random(6)
    mid_batch = 0

    def busy(name: str) -> bool:
        log = tmp_path / f"{name}.log"
        return log.exists() and log.stat().st_size > 0 and pending_of(rdb, keys)[name] > 0

    try:
        producer.start()
        for kill in range(1, KILLS + 1):
            time.sleep(rng.uniform(0.2, 0.6))
            # Busy: it has handled messages and holds entries it has not acknowledged...
            eventually(functools.partial(busy, victim.name), within=10)
            time.sleep(rng.uniform(0.02, 0.1))  # ...and is somewhere inside a batch.
            victim.kill()
            mid_batch += pending_of(rdb, keys)[victim.name] > 0
            victim = start(f"victim-{kill}")
        producer.join(60)
        queued |= later
        assert len(queued) == EVENTS

        def all_done() -> bool:
            unique = {(p, entry_id) for _, p, entry_id, _ in handled(logs)}
            return unique >= queued and sum(pending_of(rdb, keys).values()) == 0

        eventually(all_done, within=60)
    finally:
        codes = [survivor.terminate(), victim.terminate()]
        victim.kill()
        survivor.kill()

    lines = handled(logs)
    unique = {(p, entry_id) for _, p, entry_id, _ in lines}
    redeliveries = len(lines) - len(unique)
    violations = out_of_order(lines, queued)
    pending_at_end = sum(pending_of(rdb, keys).values())
    dead = sum(rdb.xlen(keys.dead_letters(p, GROUP)) for p in range(keys.partitions))
    print(
        f"\nconsumer kill test: {EVENTS} events, {keys.partitions} partitions, 2 consumers,"
        f" {KILLS} SIGKILLs ({mid_batch} mid-batch)\n"
        f"  handled at least once: {len(unique & queued)}/{EVENTS}\n"
        f"  handlings: {len(lines)} (redeliveries: {redeliveries},"
        f" with deliveries > 1: {sum(1 for line in lines if line[3] > 1)})\n"
        f"  pending at the end: {pending_at_end}; dead letters: {dead}\n"
        f"  handled before an older entry of its partition: {violations}"
    )
    assert codes == [0, 0]
    assert mid_batch == KILLS
    assert unique == queued
    assert pending_at_end == 0
    assert dead == 0
    assert violations == 0
    assert redeliveries > 0  # the kills did interrupt batches


def test_the_order_check_counts_a_skip_but_not_a_replay() -> None:
    queued = {(0, "1-0"), (0, "2-0"), (0, "3-0"), (1, "1-0")}
    replay = [(1, 0, "1-0", 1), (2, 0, "2-0", 1), (3, 0, "1-0", 2), (4, 0, "2-0", 2)]
    assert out_of_order([*replay, (5, 1, "1-0", 1), (6, 0, "3-0", 1)], queued) == 0
    skip = [(1, 0, "1-0", 1), (2, 0, "3-0", 1), (3, 0, "2-0", 1)]
    assert out_of_order(skip, queued) == 1
