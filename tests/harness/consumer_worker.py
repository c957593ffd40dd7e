"""A consumer process for the kill test: it handles each message by logging it, slowly.

    python -m tests.harness.consumer_worker REDIS_URL PREFIX PARTITIONS GROUP NAME LOG_FILE

Each handled message appends ``<monotonic ns> <partition> <entry id> <deliveries>`` to
LOG_FILE (line-buffered: a line is written whole before the message is acknowledged).
CLOCK_MONOTONIC is one clock for every process of the machine, so the logs of several
workers merge into one order. SIGTERM stops it cleanly; the test also SIGKILLs it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import TextIO

from events_server.consumer import Consumer, ConsumerSettings, Message
from events_server.queue.connection import connect
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.consumers import FAST

SETTINGS = FAST.model_copy(
    update={
        "batch_size": 50,
        "block_seconds": 0.2,
        "claim_idle_seconds": 0.5,
        "retry_delay_seconds": 0.05,
        # Redeliveries after a kill are expected here: none may end up a dead letter.
        "max_deliveries": ConsumerSettings.model_fields["max_deliveries"].default,
    }
)
"""The tests' FAST settings, with bigger batches and the default max_deliveries."""
HANDLE_SECONDS = 0.002
"""Time each message takes, so that a kill lands in the middle of a batch."""


async def main(settings: Settings, group: str, name: str, log: TextIO) -> None:
    """Consume until SIGTERM."""
    redis = connect(settings.redis)
    keys = KeySpace(settings.key_prefix, settings.partitions)
    consumer = Consumer(redis, keys, group, name=name, settings=SETTINGS)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, consumer.stop)
    print("ready", flush=True)
    try:

        async def handle(message: Message) -> None:
            log.write(
                f"{time.monotonic_ns()} {message.partition} {message.entry_id}"
                f" {message.deliveries}\n"
            )
            await asyncio.sleep(HANDLE_SECONDS)

        await consumer.run(handle)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    url, prefix, partitions, group, name, path = sys.argv[1:]
    config = Settings(redis_url=url, key_prefix=prefix, partitions=int(partitions))
    with open(path, "a", buffering=1, encoding="utf-8") as log_file:
        asyncio.run(main(config, group, name, log_file))
