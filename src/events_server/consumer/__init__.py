"""Reading the queue: ``Consumer``, an async iterator over the envelopes of a consumer group.

    from events_server.consumer import Consumer, KeySpace, RedisConfig, connect

    redis = connect(RedisConfig(url="redis://127.0.0.1:6379/0"))
    async with Consumer(redis, KeySpace("ev", 16), "analytics") as consumer:
        async for message in consumer:
            await handle(message.envelope)  # acknowledged when the loop asks for the next

or, with retries of a failing handler and dead letters::

    await Consumer(redis, keys, "analytics").run(handle)

- The group is created on every partition stream if missing, reading from the start.
- One consumer of a group reads a partition at a time (leases, see ``ownership``), so
  each partition is handled in order; the live consumers of a group share the partitions.
- An entry is acknowledged only after its handler succeeded. Entries a dead consumer
  left pending are reclaimed with XAUTOCLAIM once idle for ``claim_idle_seconds``,
  oldest first, before anything newer of that partition.
- After ``max_deliveries`` deliveries without an acknowledgement an entry moves to the
  group's dead-letter stream of its partition (``events-server replay`` brings it back).
- Delivery is at least once: after a crash, what was handled but not yet acknowledged
  is handled again. Handlers must tolerate that (``(partition, entry_id)`` is unique).

Needs the ``consumer`` extra (redis); it loads no gRPC server or web framework.
"""

from events_server.consumer.consumer import Consumer
from events_server.consumer.groups import GroupState, group_states, replay_dead_letters, trim
from events_server.consumer.message import Handler, Message, default_name
from events_server.consumer.settings import ConsumerSettings
from events_server.consumer.sinks import JsonlSink
from events_server.queue.connection import RedisClient, RedisConfig, connect
from events_server.queue.keys import KeySpace

__all__ = [
    "Consumer",
    "ConsumerSettings",
    "GroupState",
    "Handler",
    "JsonlSink",
    "KeySpace",
    "Message",
    "RedisClient",
    "RedisConfig",
    "connect",
    "default_name",
    "group_states",
    "replay_dead_letters",
    "trim",
]
