"""The queue, as operators see it: tail, consume, groups, replay, trim, partitions."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from events_server.cli.common import REDIS_FLAGS, non_negative, positive, redis_for
from events_server.cli.rejected import show_rejected
from events_server.consumer.consumer import Consumer
from events_server.consumer.groups import group_states, replay_dead_letters, trim
from events_server.consumer.message import default_name
from events_server.consumer.settings import ConsumerSettings
from events_server.consumer.sinks import JsonlSink
from events_server.ops.settings import add_settings_flags, settings_from_args
from events_server.pb import events_pb2 as pb
from events_server.queue.reading import (
    entries,
    partition_of,
    partition_streams,
    read_all,
    read_last,
    read_new,
)
from events_server.server.settings import Settings
from events_server.wire.codec import envelope_to_dict


def add_commands(commands: Any) -> None:
    """tail | consume | groups | replay | trim | partitions: the queue, as operators see it."""
    tail_cmd = commands.add_parser(
        "tail", help="print queued envelopes as JSON lines, oldest first"
    )
    tail_cmd.add_argument(
        "--count",
        type=non_negative,
        metavar="N",
        help="only the newest N (default: all, from the start; 0 with --follow: only new ones)",
    )
    tail_cmd.add_argument("--follow", "-f", action="store_true", help="keep printing new envelopes")
    tail_cmd.add_argument(
        "--rejected",
        action="store_true",
        help="print the rejected-requests record instead (tenant, time, errors, payload start)",
    )
    tail_cmd.add_argument(
        "--tenant", help="with --rejected: only this tenant's record (default: every tenant)"
    )
    add_settings_flags(
        tail_cmd, Settings, ("redis_url", "redis_cluster", "key_prefix", "partitions")
    )
    tail_cmd.set_defaults(run=_tail)

    consume_cmd = commands.add_parser(
        "consume", help="read a consumer group into rotating JSON Lines files"
    )
    consume_cmd.add_argument("--group", required=True, help="the consumer group to read as")
    consume_cmd.add_argument(
        "--to-jsonl", required=True, type=Path, metavar="DIR", help="where the files go"
    )
    consume_cmd.add_argument(
        "--consumer", metavar="NAME", help="this consumer's name (default: host-pid)"
    )
    consume_cmd.add_argument(
        "--max-file-bytes",
        type=positive,
        default=64 * 1024 * 1024,
        metavar="N",
        help="start a new file after this many bytes (default: 64 MiB)",
    )
    consume_cmd.add_argument(
        "--max-file-seconds",
        type=positive,
        default=3600,
        metavar="N",
        help="start a new file after this many seconds (default: 3600)",
    )
    consume_cmd.add_argument(
        "--fsync", action="store_true", help="force every line to disk before acknowledging it"
    )
    add_settings_flags(consume_cmd, Settings, (*REDIS_FLAGS, "log_level"))
    add_settings_flags(consume_cmd, ConsumerSettings, ConsumerSettings.model_fields)
    consume_cmd.set_defaults(run=_consume)

    groups_cmd = commands.add_parser(
        "groups", help="list consumer groups: pending, lag, dead letters, consumers"
    )
    groups_cmd.add_argument("--json", action="store_true", help="one JSON object per group")
    add_settings_flags(groups_cmd, Settings, REDIS_FLAGS)
    groups_cmd.set_defaults(
        run=lambda args, settings: asyncio.run(show_groups(settings, args.json, sys.stdout))
    )

    replay_cmd = commands.add_parser(
        "replay", help="move a group's dead letters back onto their partitions"
    )
    replay_cmd.add_argument(
        "--from-dead-letter",
        action="store_true",
        required=True,
        help="replay from the group's dead-letter streams (the only source there is)",
    )
    replay_cmd.add_argument("--group", required=True, help="whose dead letters")
    replay_cmd.add_argument(
        "--partition",
        type=non_negative,
        action="append",
        metavar="P",
        help="only this partition (repeatable; default: all)",
    )
    add_settings_flags(replay_cmd, Settings, REDIS_FLAGS)
    replay_cmd.set_defaults(
        run=lambda args, settings: asyncio.run(
            replay(settings, args.group, args.partition, sys.stdout)
        )
    )

    trim_cmd = commands.add_parser(
        "trim", help="remove the entries every consumer group has acknowledged"
    )
    add_settings_flags(trim_cmd, Settings, REDIS_FLAGS)
    trim_cmd.set_defaults(
        run=lambda args, settings: asyncio.run(trim_streams(settings, sys.stdout))
    )

    partitions_cmd = commands.add_parser(
        "partitions", help="which hash slot and node each partition is on, and its length"
    )
    add_settings_flags(partitions_cmd, Settings, REDIS_FLAGS)
    partitions_cmd.set_defaults(
        run=lambda args, settings: asyncio.run(show_partitions(settings, sys.stdout))
    )


def _tail(args: argparse.Namespace, settings: Settings) -> None:
    if args.rejected:
        asyncio.run(show_rejected(settings, args.tenant, args.count, args.follow, sys.stdout))
    else:
        asyncio.run(tail(settings, args.count, args.follow, sys.stdout))


def _consume(args: argparse.Namespace, settings: Settings) -> int:
    try:
        consumer_settings = settings_from_args(ConsumerSettings, args)
    except ValidationError as exc:
        print(f"events-server: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    sink = JsonlSink(
        args.to_jsonl,
        args.consumer or default_name(),
        max_bytes=args.max_file_bytes,
        max_seconds=args.max_file_seconds,
        fsync=args.fsync,
    )
    asyncio.run(consume(settings, consumer_settings, args.group, sink))
    return 0


def _print(out: TextIO, stream: str, entry_id: bytes, payload: bytes) -> None:
    envelope = pb.Envelope.FromString(payload)
    line = {"partition": partition_of(stream), "entry_id": entry_id.decode()}
    line.update(envelope_to_dict(envelope))
    out.write(json.dumps(line, ensure_ascii=False) + "\n")
    out.flush()


async def tail(settings: Settings, count: int | None, follow: bool, out: TextIO) -> None:
    """Print queued envelopes as JSON lines: all of them (or the last ``count``), then new ones."""
    async with redis_for(settings, timeout_seconds=10.0) as (redis, keys):
        streams = await partition_streams(redis, keys)
        last_seen: dict[Any, Any] = dict.fromkeys(streams, "0-0")
        if count is None:
            async for stream, entry_id, payload in read_all(redis, streams):
                _print(out, stream, entry_id, payload)
                last_seen[stream] = entry_id.decode()
        else:
            for stream, entry_id, payload in await read_last(redis, streams, count):
                _print(out, stream, entry_id, payload)
            last_seen = dict.fromkeys(streams, "$")
        while follow:
            for raw_stream, reply in await read_new(redis, last_seen):
                stream = raw_stream.decode()
                for entry_id, payload in entries(reply):
                    _print(out, stream, entry_id, payload)
                    last_seen[stream] = entry_id.decode()


async def consume(
    settings: Settings, consumer_settings: ConsumerSettings, group: str, sink: JsonlSink
) -> None:
    """Write the group's envelopes to the sink until SIGTERM or SIGINT, then stop cleanly."""
    # A blocking read must end before the socket timeout does.
    timeout = max(settings.redis_timeout_seconds, consumer_settings.block_seconds + 1.0)
    async with redis_for(settings, timeout_seconds=timeout) as (redis, keys):
        consumer = Consumer(redis, keys, group, name=sink.name, settings=consumer_settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, consumer.stop)
        print(f"events-server consuming group {group} as {consumer.name}", flush=True)
        try:
            await consumer.run(sink)
        finally:
            sink.close()


async def show_groups(settings: Settings, as_json: bool, out: TextIO) -> None:
    """Print every consumer group with its pending, lag and dead-letter counts."""
    async with redis_for(settings) as (redis, keys):
        states = await group_states(redis, keys)
    if as_json:
        for state in states:
            out.write(json.dumps(state.as_dict()) + "\n")
        return
    if not states:
        out.write("no consumer groups\n")
        return
    out.write(f"{'GROUP':<24} {'PENDING':>9} {'LAG':>9} {'DEAD':>7}  CONSUMERS\n")
    for state in states:
        lag = "?" if state.lag is None else str(state.lag)
        consumers = ", ".join(state.consumers) or "-"
        out.write(
            f"{state.group:<24} {state.pending:>9} {lag:>9} {state.dead_letters:>7}  {consumers}\n"
        )


async def replay(settings: Settings, group: str, partitions: list[int] | None, out: TextIO) -> None:
    """Move the group's dead letters back onto their partitions for another try."""
    async with redis_for(settings) as (redis, keys):
        moved = await replay_dead_letters(redis, keys, group, partitions)
    detail = ", ".join(f"partition {p}: {n}" for p, n in sorted(moved.items()))
    out.write(f"replayed {sum(moved.values())} dead letters of group {group}")
    out.write(f" ({detail})\n" if detail else "\n")


async def trim_streams(settings: Settings, out: TextIO) -> None:
    """Remove the entries every group has acknowledged."""
    async with redis_for(settings) as (redis, keys):
        removed = await trim(redis, keys)
    detail = ", ".join(f"partition {p}: {n}" for p, n in sorted(removed.items()))
    out.write(f"removed {sum(removed.values())} acknowledged entries")
    out.write(f" ({detail})\n" if detail else "\n")


async def show_partitions(settings: Settings, out: TextIO) -> None:
    """Print each partition's hash slot, the node serving it, and its length; then per node."""
    async with redis_for(settings) as (redis, keys):
        if isinstance(redis, RedisCluster):
            await redis.initialize()
        partitions: Counter[str] = Counter()
        entries: Counter[str] = Counter()
        out.write(f"{'PARTITION':>9} {'SLOT':>5}  {'NODE':<24} {'ENTRIES':>9}\n")
        for partition in range(keys.partitions):
            stream = keys.stream(partition)
            served_by = redis.get_node_from_key(stream) if isinstance(redis, RedisCluster) else None
            node = served_by.name if served_by is not None else settings.redis_url
            length = int(await redis.xlen(stream))
            partitions[node] += 1
            entries[node] += length
            out.write(f"{partition:>9} {key_slot(stream.encode()):>5}  {node:<24} {length:>9}\n")
    for node in sorted(partitions):
        out.write(f"{node}: {partitions[node]} partitions, {entries[node]} entries\n")
