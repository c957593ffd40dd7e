"""``events-server``: run the gRPC server, look at what is queued, manage API keys."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import heapq
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import uvloop
from pydantic import ValidationError
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from events_server import rejected
from events_server.cluster import CLUSTER_ERRORS
from events_server.codec import envelope_to_dict
from events_server.config import (
    ConsumerSettings,
    Settings,
    add_settings_flags,
    settings_from_args,
)
from events_server.consumer import Consumer, default_name
from events_server.exposition import shared_by_workers
from events_server.groups import group_states, replay_dead_letters, trim
from events_server.keys import ENVELOPE_FIELD, KeySpace
from events_server.keys_cli import add_key_commands, run_key_command
from events_server.logs import setup_logging
from events_server.pb import events_pb2 as pb
from events_server.server import create_server
from events_server.sinks import JsonlSink
from events_server.store import RedisClient, connect

log = logging.getLogger("events_server")

PAGE = 500
"""Entries fetched per stream per round trip when reading the whole queue."""

FOLLOW_BLOCK_MS = 1000


def _entry_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _entries(reply: Any) -> list[tuple[bytes, bytes]]:
    """(entry id, envelope bytes) pairs of an XRANGE/XREVRANGE reply."""
    return [(entry_id, fields[ENVELOPE_FIELD]) for entry_id, fields in reply or ()]


def _partition_of(stream: str) -> int:
    return int(stream.split("{p", 1)[1].split("}", 1)[0])


async def _streams(redis: RedisClient, keys: KeySpace) -> list[str]:
    """The configured partition streams plus any left over from another partition count."""
    found = {keys.stream(p) for p in range(keys.partitions)}
    pattern = f"{keys.prefix}:{{p*}}:events"
    async for name in redis.scan_iter(match=pattern, count=1000, _type="STREAM"):
        found.add(name.decode())
    return sorted(found, key=_partition_of)


async def _read_all(
    redis: RedisClient, streams: Sequence[str]
) -> AsyncIterator[tuple[str, bytes, bytes]]:
    """Every entry of every stream, oldest first (a k-way merge over paged XRANGEs)."""
    cursors = dict.fromkeys(streams, "-")
    pending: dict[str, int] = {}  # entries of each stream still in the heap
    heap: list[tuple[tuple[int, int], str, bytes, bytes]] = []

    async def refill(stream: str) -> None:
        page = _entries(await redis.xrange(stream, min=cursors[stream], max="+", count=PAGE))
        for entry_id, payload in page:
            heapq.heappush(heap, (_entry_key(entry_id), stream, entry_id, payload))
        if page:
            cursors[stream] = "(" + page[-1][0].decode()
        pending[stream] = len(page)

    for stream in streams:
        await refill(stream)
    while heap:
        _, stream, entry_id, payload = heapq.heappop(heap)
        yield stream, entry_id, payload
        pending[stream] -= 1
        if pending[stream] == 0:
            await refill(stream)


async def _read_last(
    redis: RedisClient, streams: Sequence[str], count: int
) -> list[tuple[str, bytes, bytes]]:
    """The newest ``count`` entries across all streams, oldest first."""
    if count <= 0:
        return []
    newest: list[tuple[tuple[int, int], str, bytes, bytes]] = []
    for stream in streams:
        for entry_id, payload in _entries(await redis.xrevrange(stream, count=count)):
            newest.append((_entry_key(entry_id), stream, entry_id, payload))
    newest.sort()
    return [(s, i, p) for _, s, i, p in newest[-count:]]


async def _read_new(redis: RedisClient, last_seen: dict[Any, Any]) -> list[Any]:
    """Entries after ``last_seen`` of each stream, waiting up to FOLLOW_BLOCK_MS for some."""
    if isinstance(redis, RedisCluster):
        # One stream per XREAD: the partitions live in different slots.
        replies: list[Any] = await asyncio.gather(
            *(redis.xread({s: i}, block=FOLLOW_BLOCK_MS) for s, i in last_seen.items())
        )
        return [stream for reply in replies for stream in reply or ()]
    reply: Any = await redis.xread(last_seen, block=FOLLOW_BLOCK_MS)
    return list(reply or ())


def _print(out: TextIO, stream: str, entry_id: bytes, payload: bytes) -> None:
    envelope = pb.Envelope.FromString(payload)
    line = {"partition": _partition_of(stream), "entry_id": entry_id.decode()}
    line.update(envelope_to_dict(envelope))
    out.write(json.dumps(line, ensure_ascii=False) + "\n")
    out.flush()


async def tail(settings: Settings, count: int | None, follow: bool, out: TextIO) -> None:
    """Print queued envelopes as JSON lines: all of them (or the last ``count``), then new ones."""
    redis = connect(settings.model_copy(update={"redis_timeout_seconds": 10.0}))
    try:
        keys = KeySpace(settings.key_prefix, settings.partitions)
        streams = await _streams(redis, keys)
        last_seen: dict[Any, Any] = dict.fromkeys(streams, "0-0")
        if count is None:
            async for stream, entry_id, payload in _read_all(redis, streams):
                _print(out, stream, entry_id, payload)
                last_seen[stream] = entry_id.decode()
        else:
            for stream, entry_id, payload in await _read_last(redis, streams, count):
                _print(out, stream, entry_id, payload)
            last_seen = dict.fromkeys(streams, "$")
        while follow:
            for raw_stream, entries in await _read_new(redis, last_seen):
                stream = raw_stream.decode()
                for entry_id, payload in _entries(entries):
                    _print(out, stream, entry_id, payload)
                    last_seen[stream] = entry_id.decode()
    finally:
        await redis.aclose()


async def tail_rejected(
    settings: Settings, tenant: str | None, count: int | None, follow: bool, out: TextIO
) -> None:
    """Print rejected-request records as JSON lines (see events_server.rejected)."""
    redis = connect(settings.model_copy(update={"redis_timeout_seconds": 10.0}))
    try:
        keys = KeySpace(settings.key_prefix, settings.partitions)
        await rejected.tail_rejected(
            redis, keys, tenant=tenant, count=count, follow=follow, out=out
        )
    finally:
        await redis.aclose()


async def serve(settings: Settings) -> None:
    """Run the gRPC server until SIGTERM or SIGINT, then drain gracefully."""
    server, port = await create_server(settings)
    try:
        await server.start()
    except OSError as exc:  # the metrics port (gRPC's own failures raise RuntimeError)
        print(
            f"events-server: cannot serve metrics on {settings.metrics_addr}: {exc}",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    if server.metrics_endpoint is not None:
        host = settings.metrics_addr.rpartition(":")[0]
        url = f"http://{host}:{server.metrics_endpoint.port}/metrics"
        log.info("metrics on %s", url, extra={"metrics_url": url})
    # Everything made so far lives as long as the process: keep it out of the
    # cyclic GC: a full pass over it takes ~25 ms here, a latency spike under load.
    gc.freeze()
    address = settings.grpc_addr
    if not address.startswith("unix:"):
        address = f"{address.rpartition(':')[0]}:{port}"
    # Tests and `make run` read this line to learn the port when it was 0.
    print(f"events-server listening on {address} (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", settings.shutdown_grace_seconds)
    await server.stop()
    log.info("stopped")


def _die_with_parent() -> None:
    """In a forked worker: get SIGTERM (and drain) if the supervising parent dies."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def serve_workers(settings: Settings) -> int:
    """Fork settings.workers servers sharing one port (SO_REUSEPORT); wait for them all."""
    # Fork before any gRPC object exists: gRPC's threads and polling state do
    # not survive a fork. Each worker builds its own server, channel and loop.
    children: set[int] = set()
    for index in range(settings.workers):
        # One listener for metrics: the first worker. In multiprocess mode it
        # reports the figures of all of them.
        worker = settings if index == 0 else settings.model_copy(update={"metrics_addr": ""})
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            code = 1
            try:
                uvloop.run(serve(worker))
                code = 0
            except KeyboardInterrupt:
                code = 130
            finally:
                os._exit(code)
        children.add(pid)

    def stop_all(signum: int, _frame: object) -> None:
        for child in children:
            os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    result = 0
    while children:
        pid, status = os.wait()
        children.discard(pid)
        if (code := os.waitstatus_to_exitcode(status)) != 0:
            # One worker gone means a smaller server than configured: stop, and let
            # the supervisor (systemd, Kubernetes) restart the whole set.
            log.error("worker %d exited with %d: stopping the others", pid, code)
            result = 1
            stop_all(signal.SIGTERM, None)
    return result


async def consume(
    settings: Settings, consumer_settings: ConsumerSettings, group: str, sink: JsonlSink
) -> None:
    """Write the group's envelopes to the sink until SIGTERM or SIGINT, then stop cleanly."""
    # A blocking read must end before the socket timeout does.
    timeout = max(settings.redis_timeout_seconds, consumer_settings.block_seconds + 1.0)
    redis = connect(settings.model_copy(update={"redis_timeout_seconds": timeout}))
    keys = KeySpace(settings.key_prefix, settings.partitions)
    consumer = Consumer(redis, keys, group, name=sink.name, settings=consumer_settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, consumer.stop)
    print(f"events-server consuming group {group} as {consumer.name}", flush=True)
    try:
        await consumer.run(sink)
    finally:
        sink.close()
        await redis.aclose()


async def show_groups(settings: Settings, as_json: bool, out: TextIO) -> None:
    """Print every consumer group with its pending, lag and dead-letter counts."""
    redis = connect(settings)
    try:
        states = await group_states(redis, KeySpace(settings.key_prefix, settings.partitions))
    finally:
        await redis.aclose()
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
    redis = connect(settings)
    try:
        keys = KeySpace(settings.key_prefix, settings.partitions)
        moved = await replay_dead_letters(redis, keys, group, partitions)
    finally:
        await redis.aclose()
    detail = ", ".join(f"partition {p}: {n}" for p, n in sorted(moved.items()))
    out.write(f"replayed {sum(moved.values())} dead letters of group {group}")
    out.write(f" ({detail})\n" if detail else "\n")


async def trim_streams(settings: Settings, out: TextIO) -> None:
    """Remove the entries every group has acknowledged."""
    redis = connect(settings)
    try:
        removed = await trim(redis, KeySpace(settings.key_prefix, settings.partitions))
    finally:
        await redis.aclose()
    detail = ", ".join(f"partition {p}: {n}" for p, n in sorted(removed.items()))
    out.write(f"removed {sum(removed.values())} acknowledged entries")
    out.write(f" ({detail})\n" if detail else "\n")


async def show_partitions(settings: Settings, out: TextIO) -> None:
    """Print each partition's hash slot, the node serving it, and its length; then per node."""
    keys = KeySpace(settings.key_prefix, settings.partitions)
    redis = connect(settings)
    try:
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
    finally:
        await redis.aclose()
    for node in sorted(partitions):
        out.write(f"{node}: {partitions[node]} partitions, {entries[node]} entries\n")


REDIS_FLAGS = ("redis_url", "redis_cluster", "key_prefix", "partitions", "redis_timeout_seconds")
"""The settings every queue command needs."""


def _add_queue_commands(commands: Any) -> None:
    """consume | groups | replay | trim | partitions: the queue, as operators see it."""
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
        type=_positive,
        default=64 * 1024 * 1024,
        metavar="N",
        help="start a new file after this many bytes (default: 64 MiB)",
    )
    consume_cmd.add_argument(
        "--max-file-seconds",
        type=_positive,
        default=3600,
        metavar="N",
        help="start a new file after this many seconds (default: 3600)",
    )
    consume_cmd.add_argument(
        "--fsync", action="store_true", help="force every line to disk before acknowledging it"
    )
    add_settings_flags(consume_cmd, Settings, (*REDIS_FLAGS, "log_level"))
    add_settings_flags(consume_cmd, ConsumerSettings, ConsumerSettings.model_fields)

    groups_cmd = commands.add_parser(
        "groups", help="list consumer groups: pending, lag, dead letters, consumers"
    )
    groups_cmd.add_argument("--json", action="store_true", help="one JSON object per group")
    add_settings_flags(groups_cmd, Settings, REDIS_FLAGS)

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
        type=_non_negative,
        action="append",
        metavar="P",
        help="only this partition (repeatable; default: all)",
    )
    add_settings_flags(replay_cmd, Settings, REDIS_FLAGS)

    trim_cmd = commands.add_parser(
        "trim", help="remove the entries every consumer group has acknowledged"
    )
    add_settings_flags(trim_cmd, Settings, REDIS_FLAGS)

    partitions_cmd = commands.add_parser(
        "partitions", help="which hash slot and node each partition is on, and its length"
    )
    add_settings_flags(partitions_cmd, Settings, REDIS_FLAGS)


def _run_queue_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run consume | groups | replay | trim | partitions; returns the exit code."""
    try:
        if args.command == "consume":
            return _consume(args, settings)
        if args.command == "groups":
            asyncio.run(show_groups(settings, args.json, sys.stdout))
        elif args.command == "replay":
            asyncio.run(replay(settings, args.group, args.partition, sys.stdout))
        elif args.command == "trim":
            asyncio.run(trim_streams(settings, sys.stdout))
        elif args.command == "partitions":
            asyncio.run(show_partitions(settings, sys.stdout))
    except CLUSTER_ERRORS as exc:
        print(f"events-server {args.command}: redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """The events-server argument parser."""
    parser = argparse.ArgumentParser(
        prog="events-server", description="Run the event ingestion gRPC server, or read its queue."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the gRPC server")
    add_settings_flags(serve_cmd, Settings, Settings.model_fields)

    tail_cmd = commands.add_parser(
        "tail", help="print queued envelopes as JSON lines, oldest first"
    )
    tail_cmd.add_argument(
        "--count",
        type=_non_negative,
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
    _add_queue_commands(commands)
    add_key_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the events-server command."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(Settings, args)
    except ValidationError as exc:
        print(f"events-server: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        if args.command == "serve" and settings.workers > 1:
            with shared_by_workers():
                return serve_workers(settings)
        if args.command == "serve":
            uvloop.run(serve(settings))
        elif args.command == "tail" and args.rejected:
            asyncio.run(tail_rejected(settings, args.tenant, args.count, args.follow, sys.stdout))
        elif args.command == "tail":
            asyncio.run(tail(settings, args.count, args.follow, sys.stdout))
        elif args.command == "keys":
            return run_key_command(args, settings, sys.stdout)
        else:
            return _run_queue_command(args, settings)
    except KeyboardInterrupt:
        return 130
    return 0
