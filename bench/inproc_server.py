"""The server's own CPU per event on the bridge's batches, in process: batches of N single
events, built as the bridge builds them, worked by ``GatheredStreams.work_batch`` (what the
batch link runs) against a fresh Valkey. The link's socket and the bridge are left out;
the round trip to Valkey is in. For deciding small steps on the server's path.

    python -m bench.inproc_server [--requests 8] [--batches 3000]

Prints the process CPU µs per event. Under ``valgrind --tool=callgrind`` the instructions
of two runs of different ``--batches`` give a count per event that the box's noise does not
move (docs/performance.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import uvloop

from bench.workload import TENANTS, Batches
from events_server.ops.exposition import values_changed_on_one_thread
from events_server.pb import events_pb2 as pb
from events_server.server.app import create_server
from events_server.server.auth import new_key
from events_server.server.settings import Settings
from rest_bridge.upstream import forwarded_metadata
from rest_bridge.validation import validate_request
from tests.harness.keys import store_key
from tests.harness.valkey import ValkeyProcess


class Answers:
    """The batch link's end, as work_batch sees it: the answers are counted."""

    def __init__(self) -> None:
        self.count = 0

    async def write(self, response: Any) -> None:
        self.count += 1


async def main(url: str, requests: int, batches: int) -> None:
    values_changed_on_one_thread()  # as `events-server serve` runs
    settings = Settings(redis_url=url, metrics_addr="", grpc_addr="127.0.0.1:0")
    key, secret = new_key(TENANTS, label="bench")
    store_key(redis.Redis.from_url(url), settings.key_prefix, key)
    server, _ = await create_server(settings)
    assert server.streams is not None
    workload = Batches(seed=3, worker=0)
    raws = []
    for _ in range(4096):
        request = validate_request(workload.json_body(1), 32, 1000)
        assert isinstance(request, pb.CreateEventsRequest)
        raws.append(request.SerializeToString())
    headers = {b"user-agent": b"bench/1.0", b"host": b"127.0.0.1:8000"}
    metadata = dict(forwarded_metadata(headers, "127.0.0.1", secret))
    answers = Answers()
    sent = 0
    for phase, count in (("warm-up", max(batches // 10, 1)), ("measured", batches)):
        started = time.process_time()
        for _ in range(count):
            batch = pb.GatheredRequest(call_id=sent)
            for _ in range(requests):
                batch.requests.add(
                    request=raws[sent % len(raws)],
                    metadata=metadata,
                    waited_us=100,
                    kind=pb.REQUEST_KIND_CREATE_EVENTS,
                )
                sent += 1
            await server.streams.work_batch(answers, batch, "ipv4:127.0.0.1:5555", "127.0.0.1")
        spent = (time.process_time() - started) / count / requests * 1e6
        print(f"{phase}: {spent:.1f} us/event ({requests} a batch)", flush=True)
    await server.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=8, help="single events a batch")
    parser.add_argument("--batches", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        valkey = ValkeyProcess(Path(workdir) / "valkey")
        valkey.start()
        try:
            uvloop.run(main(valkey.url, args.requests, args.batches))
        finally:
            valkey.stop()
