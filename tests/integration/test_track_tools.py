"""The operators' tools with Depict's v2 kinds, for real: `events-server tail`, `tail --rejected`,
`replay` of dead letters, and the JSON Lines sink."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from events_server.consumer import Consumer, JsonlSink, Message
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.consumers import FAST, run, take
from tests.harness.data import ev, mapping, product, purchase, text_price, unavailable
from tests.harness.processes import run_events_server, tail
from tests.harness.rpc import send, track
from tests.harness.streams import wait_for_records

KINDS = ("purchase", "transaction_mapping", "product_unavailable")

PURCHASE_JSON = {
    "tenant": "shop-a",
    "market": "se",
    "dsid": "3n0kq7c1x9s",
    "transaction_id": "T-1001",
    "currency": "SEK",
    "products": [
        {"sku": "a", "price_text": "19,50 kr", "quantity": 1},
        {"sku": "b", "price_number": "89.90000000000000000001", "quantity": 12},
    ],
}


def test_tail_prints_each_kind_under_its_name_with_prices_as_sent(
    stub: events_pb2_grpc.EventsServiceStub, settings: Settings, rdb: redis.Redis
) -> None:
    track(
        stub,
        purchase(text_price("a", "19,50 kr"), product("b", "89.90000000000000000001", 12)),
        mapping(),
        unavailable(deduplication_id="r-1"),
    )
    send(stub, ev())
    lines = tail(settings)
    by_kind = {
        next(k for k in ("event", *KINDS) if k in line): {
            k: v for k, v in line.items() if k in ("event", *KINDS)
        }
        for line in lines
    }
    assert by_kind["purchase"] == {"purchase": PURCHASE_JSON}
    assert by_kind["transaction_mapping"] == {
        "transaction_mapping": {
            "tenant": "shop-a",
            "market": "se",
            "dsid": "3n0kq7c1x9s",
            "transaction_id": "T-1001",
        }
    }
    assert by_kind["product_unavailable"] == {
        "product_unavailable": {
            "tenant": "shop-a",
            "market": "se",
            "user_id": "user-1",
            "dsid": "3n0kq7c1x9s",
            "product_id": "p-17",
            "unavailability_type": "out_of_stock",
            "deduplication_id": "r-1",
        }
    }
    assert by_kind["event"]["event"]["type"] == "add_to_cart"
    assert all(line["api_key_id"] and line["received_at"] for line in lines)


def test_tail_rejected_shows_a_refused_track_request(
    stub: events_pb2_grpc.EventsServiceStub, settings: Settings, keys: KeySpace, rdb: redis.Redis
) -> None:
    with pytest.raises(grpc.RpcError):
        track(stub, mapping(tenant="shop-t1"), purchase(tenant="shop-t1", products=[]))
    wait_for_records(rdb, keys, "shop-t1")
    [record] = tail(settings, "--rejected", "--tenant", "shop-t1")
    assert record["source"] == "grpc"
    assert [e["field"] for e in record["errors"]] == ["events[1].purchase.products"]
    payload = json.loads(record["payload"])
    assert [next(iter(item)) for item in payload] == ["transaction_mapping", "purchase"]
    assert payload[1]["purchase"]["products"] == []


def test_a_dead_lettered_purchase_is_replayed_and_read_as_a_purchase(
    stub: events_pb2_grpc.EventsServiceStub, settings: Settings, keys: KeySpace, rdb: redis.Redis
) -> None:
    track(stub, purchase(), mapping())

    async def refuse_purchases(client: Any) -> list[str]:
        consumer = Consumer(client, keys, "orders", settings=FAST)
        seen: list[str] = []

        async def handler(message: Message) -> None:
            seen.append(message.kind)
            if message.purchase is not None:
                raise ValueError("no ledger yet")
            if seen.count("purchase") == FAST.max_deliveries:
                consumer.stop()

        await consumer.run(handler)
        return seen

    seen = run(settings, refuse_purchases)
    assert seen.count("purchase") == FAST.max_deliveries
    dead = sum(int(rdb.xlen(keys.dead_letters(p, "orders"))) for p in range(keys.partitions))
    assert dead == 1
    replayed = run_events_server(settings, "replay", "--from-dead-letter", "--group", "orders")
    assert replayed.stdout.startswith("replayed 1 dead letters of group orders")

    async def again(client: Any) -> list[Message]:
        async with Consumer(client, keys, "orders", settings=FAST) as consumer:
            return await take(consumer, 1)

    (message,) = run(settings, again)
    assert message.kind == "purchase"
    assert message.purchase is not None
    assert message.purchase.transaction_id == "T-1001"


def test_the_jsonl_sink_writes_each_kind_as_tail_prints_it(
    stub: events_pb2_grpc.EventsServiceStub,
    settings: Settings,
    keys: KeySpace,
    rdb: redis.Redis,
    tmp_path: Path,
) -> None:
    track(
        stub,
        purchase(text_price("a", "19,50 kr"), product("b", "89.90000000000000000001", 12)),
        mapping(),
    )
    sink = JsonlSink(tmp_path, "c1")

    async def scenario(client: Any) -> None:
        async with Consumer(client, keys, "jsonl", settings=FAST) as consumer:
            for message in await take(consumer, 2):
                sink.write(message)

    run(settings, scenario)
    sink.close()
    written = [json.loads(line) for path in tmp_path.glob("*.jsonl") for line in path.open()]
    printed = tail(settings)
    assert sorted(json.dumps(x, sort_keys=True) for x in written) == sorted(
        json.dumps(x, sort_keys=True) for x in printed
    )
    assert {k for line in written for k in line if k in KINDS} == {
        "purchase",
        "transaction_mapping",
    }
    assert next(line["purchase"] for line in written if "purchase" in line) == PURCHASE_JSON
