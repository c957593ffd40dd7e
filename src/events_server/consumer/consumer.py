"""``Consumer``: the messages of every partition for one consumer group (see the package)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import zlib
from types import TracebackType
from typing import Any

from google.protobuf.message import DecodeError

from events_server.consumer.groups import dead_letter, ensure_group, hand_back, text
from events_server.consumer.message import Delivery, Handler, Message, Outcome, default_name
from events_server.consumer.ownership import Ownership
from events_server.consumer.settings import ConsumerSettings
from events_server.pb import events_pb2 as pb
from events_server.queue.connection import CLUSTER_ERRORS, RedisClient
from events_server.queue.keys import ENVELOPE_FIELD, TARGET_GROUP_FIELD, KeySpace

log = logging.getLogger(__name__)

ERROR_PAUSE_SECONDS = 1.0
"""Pause of a partition after Redis failed it, before trying again."""


class Consumer:
    """The messages of all partitions for one consumer group (see the module docstring)."""

    def __init__(
        self,
        redis: RedisClient,
        keys: KeySpace,
        group: str,
        *,
        name: str | None = None,
        settings: ConsumerSettings | None = None,
    ) -> None:
        if not group:
            raise ValueError("the consumer group name must not be empty")
        self.group = group
        self.name = name or default_name()
        self._redis = redis
        self._keys = keys
        self._settings = settings or ConsumerSettings()
        self._ownership = Ownership(redis, keys, group, self.name)
        self._lease_ms = math.ceil(self._settings.lease_seconds * 1000)
        self._queue: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._current: Delivery | None = None
        self._until: dict[int, float] = {}  # partition -> monotonic time our lease surely lasts
        self._releasing: set[int] = set()
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._acks: dict[int, list[str]] = {}
        self._unread: dict[int, set[str]] = {}  # read from Redis, never handed out
        self._coordinator: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._failure: BaseException | None = None

    # --- the public face -----------------------------------------------------------

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Message:
        # Asking for the next message means the loop body finished the last one.
        if self._current is not None:
            self._current.settle(Outcome.HANDLED)
            self._current = None
        await self.start()
        delivery = await self._next()
        if delivery is None:
            raise StopAsyncIteration
        self._current = delivery
        return delivery.message

    async def run(self, handler: Handler) -> None:
        """Hand every message to ``handler`` until stop(); a raising handler is retried."""
        await self.start()
        try:
            while (delivery := await self._next()) is not None:
                self._current = delivery
                try:
                    await handler(delivery.message)
                except Exception as exc:
                    message = delivery.message
                    log.warning(
                        "handler failed on partition %d entry %s (delivery %d): %s: %s",
                        message.partition,
                        message.entry_id,
                        message.deliveries,
                        type(exc).__name__,
                        exc,
                    )
                    delivery.settle(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
                else:
                    delivery.settle(Outcome.HANDLED)
                self._current = None
        finally:
            await self.close()

    async def start(self) -> None:
        """Join the group and start taking partitions (done by the first read anyway)."""
        if self._coordinator is None:
            self._coordinator = asyncio.create_task(self._coordinate(), name="consumer-balance")
            self._coordinator.add_done_callback(self._on_task_done)

    def stop(self) -> None:
        """Hand out nothing more: the iteration ends, run() returns."""
        self._stopping.set()
        while not self._queue.empty():
            queued = self._queue.get_nowait()
            if queued is not None:
                queued.settle(Outcome.ABANDONED)
        self._queue.put_nowait(None)  # wakes a reader waiting in _next

    async def close(self) -> None:
        """Stop, let the partitions finish their acknowledgements, and leave the group."""
        self.stop()
        if self._current is not None:
            # The loop body did not come back for the next message: not handled.
            self._current.settle(Outcome.ABANDONED)
            self._current = None
        tasks = [t for t in (self._coordinator, *self._workers.values()) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(*CLUSTER_ERRORS):
            await self._ownership.leave()

    # --- handing messages out ------------------------------------------------------

    async def _next(self) -> Delivery | None:
        while True:
            if self._failure is not None:
                raise self._failure
            if self._stopping.is_set():
                return None
            delivery = await self._queue.get()
            if delivery is not None and not delivery.outcome.done():
                return delivery

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("consumer task %s failed: %r", task.get_name(), error)
            self._failure = error
            self.stop()

    def _holds(self, partition: int) -> bool:
        return self._until.get(partition, 0.0) > time.monotonic()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # --- sharing the partitions ----------------------------------------------------

    async def _coordinate(self) -> None:
        # On every partition at once, not as consumers get to them: trim must not drop
        # entries of a partition this group has not reached yet.
        for partition in range(self._keys.partitions):
            try:
                await ensure_group(self._redis, self._keys, partition, self.group)
            except CLUSTER_ERRORS as exc:
                log.warning(
                    "partition %d: creating group %s failed: %s", partition, self.group, exc
                )
        while not self._stopping.is_set():
            await self._balance()
            await self._pause(self._settings.lease_seconds / 3)

    async def _balance(self) -> None:
        """Renew our leases, then give up or take partitions towards an even share."""
        started = time.monotonic()
        try:
            members: int | None = await self._ownership.join(self._lease_ms)
        except CLUSTER_ERRORS as exc:
            log.warning("consumer %s: membership heartbeat failed: %s", self.name, exc)
            members = None
        for partition in list(self._until):
            try:
                held = await self._ownership.claim(partition, self._lease_ms)
            except CLUSTER_ERRORS as exc:
                # Unknown: the lease runs out on its own unless a later renewal works.
                log.warning("partition %d: lease renewal failed: %s", partition, exc)
                continue
            if held:
                self._until[partition] = started + self._settings.lease_seconds
            else:
                log.warning("partition %d: lease lost to another consumer", partition)
                self._until[partition] = 0.0
        if members is None or self._stopping.is_set():
            return
        share = math.ceil(self._keys.partitions / max(members, 1))
        owned = sorted(p for p in self._workers if p not in self._releasing)
        for partition in owned[share:]:
            # The worker finishes its batch, then gives the lease up for another consumer.
            self._releasing.add(partition)
        start = zlib.crc32(self.name.encode()) % self._keys.partitions
        for step in range(self._keys.partitions):
            if len(owned) >= share:
                break
            partition = (start + step) % self._keys.partitions
            if partition in self._workers:
                continue
            try:
                if not await self._ownership.claim(partition, self._lease_ms):
                    continue
            except CLUSTER_ERRORS as exc:
                log.warning("partition %d: lease claim failed: %s", partition, exc)
                continue
            self._until[partition] = started + self._settings.lease_seconds
            owned.append(partition)
            worker = asyncio.create_task(self._work(partition), name=f"consumer-p{partition}")
            worker.add_done_callback(self._on_task_done)
            self._workers[partition] = worker

    # --- reading one partition -----------------------------------------------------

    async def _work(self, partition: int) -> None:
        """Read one owned partition in order: what is pending first, then new entries."""
        log.info("consumer %s: reading partition %d", self.name, partition)
        self._acks[partition] = []
        self._unread[partition] = set()
        created = False
        try:
            while self._holds(partition) and not self._stopping.is_set():
                try:
                    if not created:
                        await ensure_group(self._redis, self._keys, partition, self.group)
                        created = True
                    if not await self._drain_pending(partition):
                        break
                    if partition in self._releasing:
                        break
                    if not await self._read_new(partition):
                        break
                except CLUSTER_ERRORS as exc:
                    log.warning("partition %d: %s: %s", partition, type(exc).__name__, exc)
                    await self._pause(ERROR_PAUSE_SECONDS)
        finally:
            await self._leave_partition(partition)

    async def _drain_pending(self, partition: int) -> bool:
        """Deliver the partition's pending entries, oldest first; False: stop reading it."""
        stream = self._keys.stream(partition)
        claim_idle_ms = math.ceil(self._settings.claim_idle_seconds * 1000)
        while self._holds(partition) and not self._stopping.is_set():
            oldest: Any = await self._redis.xpending_range(stream, self.group, "-", "+", 1)
            if not oldest:
                return True
            entry_id = text(oldest[0]["message_id"])
            mine = text(oldest[0]["consumer"]) == self.name
            idle_ms = int(oldest[0]["time_since_delivered"])
            if not mine and idle_ms < claim_idle_ms:
                # Its consumer may still be at work on it, and nothing newer may go first.
                await self._pause(min(claim_idle_ms - idle_ms, self._lease_ms / 3) / 1000)
                continue
            reply: Any = await self._redis.xautoclaim(
                stream,
                self.group,
                self.name,
                min_idle_time=0 if mine else claim_idle_ms,
                start_id=entry_id,
                count=1,
            )
            claimed = reply[1]
            if not claimed or text(claimed[0][0]) != entry_id:
                continue  # deleted from the stream (and so dropped), or taken meanwhile
            fields = claimed[0][1]
            deliveries = int(oldest[0]["times_delivered"]) + 1
            delivered = await self._deliver(partition, entry_id, fields, deliveries)
            await self._flush_acks(partition)
            if not delivered:
                return False
        return False

    async def _read_new(self, partition: int) -> bool:
        """Deliver one batch of never-delivered entries; False: stop reading the partition."""
        reply: Any = await self._redis.xreadgroup(
            self.group,
            self.name,
            {self._keys.stream(partition): ">"},
            count=self._settings.batch_size,
            block=math.ceil(self._settings.block_seconds * 1000),
        )
        entries = [(text(raw_id), fields) for raw_id, fields in (reply[0][1] if reply else [])]
        unread = self._unread[partition]
        unread.update(entry_id for entry_id, _ in entries)
        try:
            for entry_id, fields in entries:
                unread.discard(entry_id)
                if not await self._deliver(partition, entry_id, fields, 1):
                    return False
        finally:
            await self._flush_acks(partition)
        unread.clear()
        return True

    async def _deliver(
        self, partition: int, entry_id: str, fields: dict[bytes, bytes], deliveries: int
    ) -> bool:
        """Hand one entry out (again after a failure, up to max_deliveries); False: stop."""
        target = fields.get(TARGET_GROUP_FIELD)
        if target is not None and target.decode() != self.group:
            self._acks[partition].append(entry_id)  # a replay meant for another group
            return True
        max_deliveries = self._settings.max_deliveries
        try:
            envelope = pb.Envelope.FromString(fields[ENVELOPE_FIELD])
        except (KeyError, DecodeError):
            await self._dead_letter(partition, entry_id, deliveries, "not an Envelope")
            return True
        if deliveries > max_deliveries:
            why = f"delivered {deliveries - 1} times without an acknowledgement"
            await self._dead_letter(partition, entry_id, deliveries - 1, why)
            return True
        while self._holds(partition) and not self._stopping.is_set():
            delivery = Delivery(Message(partition, entry_id, envelope, deliveries))
            self._queue.put_nowait(delivery)
            outcome = await delivery.outcome
            if outcome is Outcome.HANDLED:
                self._acks[partition].append(entry_id)
                return True
            if outcome is Outcome.ABANDONED:
                return False
            await self._flush_acks(partition)
            if deliveries >= max_deliveries:
                await self._dead_letter(partition, entry_id, deliveries, delivery.error)
                return True
            await self._pause(self._settings.retry_delay_seconds)
            deliveries += 1
        return False

    async def _dead_letter(self, partition: int, entry_id: str, deliveries: int, why: str) -> None:
        await self._flush_acks(partition)
        moved = await dead_letter(
            self._redis,
            self._keys,
            partition,
            self.group,
            entry_id=entry_id,
            deliveries=deliveries,
            why=why,
        )
        if moved:
            log.warning(
                "partition %d entry %s: dead-lettered after %d deliveries: %s",
                partition,
                entry_id,
                deliveries,
                why,
            )

    async def _flush_acks(self, partition: int) -> None:
        acks, self._acks[partition] = self._acks[partition], []
        if acks:
            await self._redis.xack(self._keys.stream(partition), self.group, *acks)

    async def _leave_partition(self, partition: int) -> None:
        """Acknowledge what was handled, hand back what was not, give the lease up."""
        try:
            await self._flush_acks(partition)
            if self._holds(partition):
                await hand_back(
                    self._redis,
                    self._keys,
                    partition,
                    self.group,
                    self.name,
                    unread=self._unread.pop(partition, set()),
                    most=self._settings.batch_size * 10,
                    idle_ms=math.ceil(self._settings.claim_idle_seconds * 1000),
                )
                await self._ownership.release(partition)
        except CLUSTER_ERRORS as exc:
            log.warning("partition %d: leaving it cleanly failed: %s", partition, exc)
        finally:
            self._workers.pop(partition, None)
            self._until.pop(partition, None)
            self._releasing.discard(partition)
            log.info("consumer %s: left partition %d", self.name, partition)
