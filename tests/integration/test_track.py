"""Track (Depict's v2 kinds) over real gRPC against real Valkey: each kind queued and read back
as its typed message, one purchase per transaction, tenants, validation, prices, rates."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import grpc
import pytest
import redis

from events_server.consumer import Consumer, Message
from events_server.ops.logs import JsonFormatter
from events_server.pb import events_pb2 as pb
from events_server.pb import events_pb2_grpc
from events_server.queue.keys import KeySpace
from events_server.server.app import EventsServer
from events_server.server.routing import partition_for, partition_for_tracked
from events_server.server.settings import Settings
from events_server.wire.codec import envelope_to_dict
from events_server.wire.metadata import MD_API_KEY, MD_ORIGIN
from events_server.wire.violations import unpack_violations
from tests.harness.consumers import FAST, run, take
from tests.harness.data import ev, mapping, product, purchase, text_price, unavailable
from tests.harness.keys import create_key, register_storefront
from tests.harness.metrics import scrape, server_metrics_url, value
from tests.harness.processes import run_events_server
from tests.harness.rpc import (
    ACCEPTED,
    DUPLICATE,
    gathered_call,
    send,
    statuses,
    track,
    violation_details,
    violations,
)
from tests.harness.streams import queued, wait_for_records


def gathered_track(
    target: str,
    metadata: dict[str, str],
    *requests: list[pb.TrackedEvent],
    ws_message_id: str | None = None,
) -> list[pb.SubResponse]:
    """One gathered call of TRACK sub-requests, as the REST bridge sends /v2/ bodies."""
    call = pb.GatheredRequest(
        requests=[
            pb.SubRequest(
                request=pb.TrackRequest(events=events).SerializeToString(),
                metadata=metadata,
                kind=pb.REQUEST_KIND_TRACK,
                ws_message_id=ws_message_id,
            )
            for events in requests
        ]
    )
    return list(gathered_call(target, call).responses)


def held(client: redis.Redis, keys: KeySpace) -> list[tuple[str, Any]]:
    """(kind, message) of everything queued, stream by stream."""
    return [
        (kind, getattr(envelope, kind))
        for _, envelope in queued(client, keys)
        for kind in [envelope.WhichOneof("tracked") or "event"]
    ]


# --- each kind ----------------------------------------------------------------------


def test_each_kind_is_queued_and_a_consumer_reads_it_as_its_typed_message(
    stub: events_pb2_grpc.EventsServiceStub, settings: Settings, keys: KeySpace, rdb: redis.Redis
) -> None:
    reply = track(
        stub,
        purchase(),
        mapping(),
        unavailable(unavailability_type=pb.UNAVAILABILITY_TYPE_MISSING),
        metadata=(("grpcgateway-user-agent", "ignored: not the bridge"),),
    )
    assert statuses(reply) == [ACCEPTED] * 3
    send(stub, ev())  # a CreateEvents event beside them

    async def read(client: Any) -> list[Message]:
        async with Consumer(client, keys, "v2", settings=FAST) as consumer:
            return await take(consumer, 4)

    by_kind = {m.kind: m for m in run(settings, read)}
    assert sorted(by_kind) == ["event", "product_unavailable", "purchase", "transaction_mapping"]
    bought = by_kind["purchase"].purchase
    assert bought is not None
    assert (bought.transaction_id, bought.currency, bought.dsid) == ("T-1001", "SEK", "3n0kq7c1x9s")
    assert [(p.sku, p.price_number, p.quantity) for p in bought.products] == [
        ("white-socks-xl", "89.9", 12)
    ]
    mapped = by_kind["transaction_mapping"].transaction_mapping
    assert mapped is not None
    assert mapped.transaction_id == "T-1001"
    gone = by_kind["product_unavailable"].product_unavailable
    assert gone is not None
    assert (gone.product_id, gone.unavailability_type) == ("p-17", pb.UNAVAILABILITY_TYPE_MISSING)
    # Each accessor answers for its own kind only; the tenant for every kind.
    assert by_kind["purchase"].event is None
    assert by_kind["event"].purchase is None
    assert by_kind["event"].event is not None
    assert {m.tenant for m in by_kind.values()} == {"shop-a"}
    # The same context as a CreateEvents event: key id, address, time.
    envelope = by_kind["purchase"].envelope
    assert envelope.api_key_id == by_kind["event"].envelope.api_key_id != ""
    assert envelope.client_ip == "127.0.0.1"
    assert envelope.received_at.seconds > 0


def test_an_unavailable_product_shares_its_users_partition_and_an_order_its_transactions(
    stub: events_pb2_grpc.EventsServiceStub, keys: KeySpace, rdb: redis.Redis
) -> None:
    reply = track(
        stub,
        unavailable(user_id="u-7"),
        purchase(user_id="u-7", transaction_id="T-2"),
        mapping(dsid="d-1", transaction_id="T-2"),
    )
    first = send(stub, ev(user_id="u-7"))
    assert reply.results[0].partition == first.results[0].partition
    assert first.results[0].partition == partition_for(ev(user_id="u-7"), keys.partitions)
    # An order goes by its transaction, whichever shopper its copies name.
    by_transaction = partition_for_tracked(purchase(transaction_id="T-2").purchase, keys.partitions)
    assert reply.results[1].partition == reply.results[2].partition == by_transaction


# --- one purchase per transaction ------------------------------------------------------


def test_a_purchase_sent_again_over_grpc_and_gathered_is_queued_once(
    stub: events_pb2_grpc.EventsServiceStub,
    grpc_target: str,
    api_key: str,
    keys: KeySpace,
    rdb: redis.Redis,
) -> None:
    first = track(stub, purchase())
    again = track(stub, purchase(), purchase())  # a reloaded thank-you page, twice at once
    # As the bridge sends /v2/create-events and /v2/track bodies: gathered TRACK sub-requests.
    answers = gathered_track(grpc_target, {MD_API_KEY: api_key}, [purchase()], [purchase()])
    assert statuses(first) == [ACCEPTED]
    assert statuses(again) == [DUPLICATE, DUPLICATE]
    assert [a.code for a in answers] == [0, 0]
    assert [statuses(a.response) for a in answers] == [[DUPLICATE], [DUPLICATE]]
    entry = first.results[0].entry_id
    assert {r.entry_id for r in again.results} == {entry}
    assert {a.response.results[0].entry_id for a in answers} == {entry}
    assert [kind for kind, _ in held(rdb, keys)] == ["purchase"]


def test_a_gathered_purchase_first_makes_the_grpc_one_a_duplicate(
    stub: events_pb2_grpc.EventsServiceStub,
    grpc_target: str,
    api_key: str,
    keys: KeySpace,
    rdb: redis.Redis,
) -> None:
    (answer,) = gathered_track(grpc_target, {MD_API_KEY: api_key}, [purchase(transaction_id="G")])
    assert statuses(answer.response) == [ACCEPTED]
    assert statuses(track(stub, purchase(transaction_id="G"))) == [DUPLICATE]
    assert len(queued(rdb, keys)) == 1


def test_a_purchase_resent_naming_another_shopper_is_still_a_duplicate(
    stub: events_pb2_grpc.EventsServiceStub, keys: KeySpace, rdb: redis.Redis
) -> None:
    # The thank-you page names a dsid; the shop's backend sends the same order under its
    # user id; a mapping of the transaction names yet another session.
    first = track(stub, purchase(transaction_id="T-77"))
    again = track(
        stub,
        purchase(transaction_id="T-77", dsid=None, user_id="customer-9"),
        purchase(transaction_id="T-77", dsid="another-tab", session_id="s-1"),
        mapping(transaction_id="T-77", dsid=None, user_id="customer-9"),
    )
    assert statuses(first) == [ACCEPTED]
    assert statuses(again) == [DUPLICATE, DUPLICATE, ACCEPTED]
    assert again.results[0].entry_id == first.results[0].entry_id
    # The mapping lands beside its purchase, whoever either names.
    assert {r.partition for r in (*first.results, *again.results)} == {first.results[0].partition}
    assert sorted(kind for kind, _ in held(rdb, keys)) == ["purchase", "transaction_mapping"]


def test_the_dedup_is_per_tenant_and_per_kind_and_keeps_for_the_dedup_ttl(
    stub: events_pb2_grpc.EventsServiceStub, settings: Settings, keys: KeySpace, rdb: redis.Redis
) -> None:
    reply = track(
        stub,
        purchase(),
        purchase(tenant="shop-b"),  # another tenant's equal transaction id is its own
        mapping(),  # a mapping of that transaction, apart from its purchase
        mapping(),
        purchase(transaction_id="T-1002"),
    )
    assert statuses(reply) == [ACCEPTED, ACCEPTED, ACCEPTED, DUPLICATE, ACCEPTED]
    assert sorted((kind, m.tenant, m.transaction_id) for kind, m in held(rdb, keys)) == [
        ("purchase", "shop-a", "T-1001"),
        ("purchase", "shop-a", "T-1002"),
        ("purchase", "shop-b", "T-1001"),
        ("transaction_mapping", "shop-a", "T-1001"),
    ]
    message = purchase().purchase
    key = keys.transaction(
        partition_for_tracked(message, keys.partitions), "shop-a", "purchase", "T-1001"
    )
    assert rdb.get(key) == reply.results[0].entry_id.encode()
    assert 0 < int(rdb.ttl(key)) <= settings.dedup_ttl_seconds
    assert len(list(rdb.scan_iter(match=keys.transaction_pattern()))) == 4


def test_an_unavailable_product_is_deduplicated_on_its_deduplication_id_only(
    stub: events_pb2_grpc.EventsServiceStub, keys: KeySpace, rdb: redis.Redis
) -> None:
    reply = track(
        stub,
        unavailable(deduplication_id="r-1"),
        unavailable(deduplication_id="r-1"),
        unavailable(),
        unavailable(),
    )
    assert statuses(reply) == [ACCEPTED, DUPLICATE, ACCEPTED, ACCEPTED]
    assert len(queued(rdb, keys)) == 3


def test_a_websocket_frames_resend_is_a_duplicate_by_its_frame_id(
    grpc_target: str, api_key: str, keys: KeySpace, rdb: redis.Redis
) -> None:
    keyed = {MD_API_KEY: api_key}
    first, again = gathered_track(
        grpc_target, keyed, [unavailable()], [unavailable()], ws_message_id="f-1"
    )
    (other,) = gathered_track(grpc_target, keyed, [unavailable()], ws_message_id="f-2")
    (two,) = gathered_track(grpc_target, keyed, [unavailable(), mapping()], ws_message_id="f-3")
    assert [statuses(a.response) for a in (first, again, other)] == [
        [ACCEPTED],
        [DUPLICATE],
        [ACCEPTED],
    ]
    found = unpack_violations([(t.key, t.value) for t in two.trailers])
    assert [(v.field, v.reason) for v in found] == [("events", "ws_one_event")]
    assert sorted(e.ws_message_id for _, e in queued(rdb, keys)) == ["f-1", "f-2"]


# --- tenants and callers -------------------------------------------------------------


def test_a_key_for_another_tenant_is_refused_and_nothing_is_queued(
    grpc_target: str, settings: Settings, keys: KeySpace, rdb: redis.Redis
) -> None:
    narrow = create_key(settings.redis_url, settings.key_prefix, ["shop-a"], "narrow")
    with grpc.insecure_channel(grpc_target) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            track(stub, purchase(), mapping(tenant="shop-b"), metadata=((MD_API_KEY, narrow),))
        assert statuses(track(stub, purchase(), metadata=((MD_API_KEY, narrow),))) == [ACCEPTED]
        with pytest.raises(grpc.RpcError) as unkeyed:
            track(stub, purchase(transaction_id="T-9"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "events[1].transaction_mapping.tenant" in str(caught.value.details())
    assert "may not write to tenant 'shop-b'" in str(caught.value.details())
    assert unkeyed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [kind for kind, _ in held(rdb, keys)] == ["purchase"]  # the later, allowed one


def test_a_registered_storefront_tracks_keyless_through_the_bridge(
    grpc_target: str, settings: Settings, keys: KeySpace, rdb: redis.Redis
) -> None:
    register_storefront(settings, "shop-g", "https://shop-g.example")
    answers = gathered_track(
        grpc_target,
        {MD_ORIGIN: "https://shop-g.example"},
        [purchase(tenant="shop-g")],
        [mapping(tenant="shop-h")],  # a tenant the origin is not registered for
    )
    assert statuses(answers[0].response) == [ACCEPTED]
    assert grpc.StatusCode.PERMISSION_DENIED.value[0] == answers[1].code
    ((_, envelope),) = queued(rdb, keys)
    assert envelope.storefront_origin == "https://shop-g.example"
    assert envelope.api_key_id == ""


def test_a_sub_request_of_an_unknown_kind_is_invalid(grpc_target: str, api_key: str) -> None:
    call = pb.GatheredRequest(
        requests=[pb.SubRequest(metadata={MD_API_KEY: api_key}, kind=7)]  # type: ignore[arg-type]
    )
    (answer,) = gathered_call(grpc_target, call).responses
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    found = unpack_violations([(t.key, t.value) for t in answer.trailers])
    assert [(v.field, v.reason) for v in found] == [("kind", "enum")]


# --- validation ----------------------------------------------------------------------


def _no_products() -> pb.TrackedEvent:
    event = purchase()
    del event.purchase.products[:]
    return event


def _no_price() -> pb.TrackedEvent:
    event = purchase()
    event.purchase.products[0].ClearField("price_number")
    return event


INVALID = [
    (purchase(tenant=""), "events[0].purchase.tenant", "string_too_short"),
    (mapping(market=""), "events[0].transaction_mapping.market", "string_too_short"),
    (purchase(dsid=""), "events[0].purchase.dsid", "string_too_short"),
    (unavailable(user_id=""), "events[0].product_unavailable.user_id", "string_too_short"),
    (mapping(session_id=""), "events[0].transaction_mapping.session_id", "string_too_short"),
    (purchase(transaction_id=""), "events[0].purchase.transaction_id", "string_too_short"),
    (
        mapping(transaction_id=""),
        "events[0].transaction_mapping.transaction_id",
        "string_too_short",
    ),
    (purchase(currency="sek"), "events[0].purchase.currency", "string_pattern_mismatch"),
    (purchase(currency=""), "events[0].purchase.currency", "string_pattern_mismatch"),
    (purchase(currency="ZWD\n"), "events[0].purchase.currency", "string_pattern_mismatch"),
    (_no_products(), "events[0].purchase.products", "too_short"),
    (
        purchase(product(), product(sku="")),
        "events[0].purchase.products[1].sku",
        "string_too_short",
    ),
    (
        purchase(product(), product(quantity=0)),
        "events[0].purchase.products[1].quantity",
        "greater_than_equal",
    ),
    (
        purchase(product(price="-0.01")),
        "events[0].purchase.products[0].price_number",
        "greater_than_equal",
    ),
    (
        purchase(product(price="19,50")),
        "events[0].purchase.products[0].price_number",
        "float_parsing",
    ),
    (purchase(product(price="")), "events[0].purchase.products[0].price_number", "float_parsing"),
    (_no_price(), "events[0].purchase.products[0].price", "missing"),
    (unavailable(product_id=""), "events[0].product_unavailable.product_id", "string_too_short"),
    (
        unavailable(unavailability_type=pb.UNAVAILABILITY_TYPE_UNSPECIFIED),
        "events[0].product_unavailable.unavailability_type",
        "missing",
    ),
    (
        unavailable(unavailability_type=9),
        "events[0].product_unavailable.unavailability_type",
        "enum",
    ),
    (pb.TrackedEvent(), "events[0].kind", "missing"),
    (
        purchase(product(sku="s" * 9000)),  # max_string_length is 8192
        "events[0].purchase.products[0].sku",
        "string_too_long",
    ),
    (
        purchase(*(product(sku=f"{n}" * 8000) for n in range(5))),  # max_event_bytes is 32768
        "events[0]",
        "event_too_large",
    ),
]


@pytest.mark.parametrize("case", INVALID, ids=[f"{f}:{r}" for _, f, r in INVALID])
def test_an_invalid_v2_event_is_refused_naming_its_field(
    stub: events_pb2_grpc.EventsServiceStub,
    keys: KeySpace,
    rdb: redis.Redis,
    case: tuple[pb.TrackedEvent, str, str],
) -> None:
    event, field, reason = case
    with pytest.raises(grpc.RpcError) as caught:
        track(stub, purchase(transaction_id="valid-one"), event)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == [(field.replace("events[0]", "events[1]"), reason)]
    assert queued(rdb, keys) == []  # all or nothing, as CreateEvents


def test_too_many_events_and_bytes_that_are_no_track_request_are_refused(
    stub: events_pb2_grpc.EventsServiceStub, settings: Settings, channel: grpc.Channel
) -> None:
    many = [purchase(transaction_id=f"T-{n}") for n in range(settings.max_events_per_request + 1)]
    with pytest.raises(grpc.RpcError) as caught:
        track(stub, *many)
    assert violations(caught.value) == [("events", "too_many_events")]
    raw: Any = channel.unary_unary(
        "/events.v1.EventsService/Track",
        response_deserializer=pb.CreateEventsResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as garbage:
        raw(b"\x0a\x05\xff\xff\xff\xff\xff", timeout=5)  # one event: not a TrackedEvent
    with pytest.raises(grpc.RpcError) as truncated:
        raw(b"\x0a\x09", timeout=5)
    assert violations(garbage.value) == [("events[0]", "protobuf_invalid")]
    assert "not a valid TrackedEvent" in violation_details(garbage.value)[0][2]
    assert violations(truncated.value) == [("events", "protobuf_invalid")]
    assert "not a valid TrackRequest" in violation_details(truncated.value)[0][2]


def test_an_invalid_track_request_is_recorded_as_rejected(
    stub: events_pb2_grpc.EventsServiceStub, keys: KeySpace, rdb: redis.Redis
) -> None:
    with pytest.raises(grpc.RpcError):
        track(stub, purchase(tenant="shop-c", currency="kronor"))
    (record,) = wait_for_records(rdb, keys, "shop-c")
    errors = json.loads(record[b"errors"])
    assert [e["field"] for e in errors] == ["events[0].purchase.currency"]
    payload = json.loads(record[b"payload"])
    assert payload[0]["purchase"]["currency"] == "kronor"
    assert payload[0]["purchase"]["products"][0]["price_number"] == "89.9"


# --- prices, rates, metrics ------------------------------------------------------------


def test_prices_are_kept_exactly_as_sent(
    stub: events_pb2_grpc.EventsServiceStub, keys: KeySpace, rdb: redis.Redis
) -> None:
    sent = purchase(
        text_price("a", "19.50"),
        text_price("b", "19,50 kr"),
        product("c", "89.90000000000000000001"),
        product("d", "1e3"),
        product("e", "0"),
    )
    assert statuses(track(stub, sent)) == [ACCEPTED]
    ((_, envelope),) = queued(rdb, keys)
    assert envelope.purchase == sent.purchase
    products = envelope_to_dict(envelope)["purchase"]["products"]
    assert [p.get("price_text", p.get("price_number")) for p in products] == [
        "19.50",
        "19,50 kr",
        "89.90000000000000000001",
        "1e3",
        "0",
    ]
    assert [next(k for k in p if k.startswith("price")) for p in products] == [
        "price_text",
        "price_text",
        "price_number",
        "price_number",
        "price_number",
    ]


def test_each_tracked_event_counts_against_the_rate_and_is_counted_by_kind(
    grpc_target: str,
    grpc_server: tuple[EventsServer, int],
    settings: Settings,
    keys: KeySpace,
    rdb: redis.Redis,
) -> None:
    made = run_events_server(
        settings, "keys", "create", "--tenant", "shop-a", "--events-per-second", "4",
        "--burst-seconds", "1",
    )  # fmt: skip
    secret = made.stdout.splitlines()[-1]
    url = server_metrics_url(grpc_server[0])

    def accepted(samples: Any) -> list[float]:
        return [
            value(samples, "events_total", tenant="shop-a", type=kind, outcome=outcome, reason="")
            for kind in ("purchase", "transaction_mapping", "product_unavailable")
            for outcome in ("accepted", "duplicate")
        ]

    before = accepted(scrape(url))
    with grpc.insecure_channel(grpc_target) as channel:
        stub = events_pb2_grpc.EventsServiceStub(channel)
        keyed = ((MD_API_KEY, secret),)
        reply = track(stub, purchase(), mapping(), unavailable(), mapping(), metadata=keyed)
        # Four events of a burst of four: the next one is over the rate.
        with pytest.raises(grpc.RpcError) as caught:
            track(stub, purchase(transaction_id="T-2"), metadata=keyed)
    assert statuses(reply) == [ACCEPTED, ACCEPTED, ACCEPTED, DUPLICATE]
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = accepted(scrape(url))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 0, 1, 1, 1, 0]
    assert len(queued(rdb, keys)) == 3


def test_track_calls_and_gathered_track_requests_write_access_lines(
    stub: events_pb2_grpc.EventsServiceStub, grpc_target: str, api_key: str, rdb: redis.Redis
) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("events_server.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        track(stub, purchase(), mapping(), metadata=(("x-request-id", "track-1"),))
        gathered_track(
            grpc_target, {MD_API_KEY: api_key, "x-request-id": "track-2"}, [unavailable()]
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = {
        line.get("request_id"): line
        for line in map(json.loads, out.getvalue().splitlines())
        if line.get("request_id") in ("track-1", "track-2")
    }
    assert {
        rid: (x["method"], x["code"], x["events"], x["accepted"]) for rid, x in lines.items()
    } == {
        "track-1": ("/events.v1.EventsService/Track", "OK", 2, 2),
        "track-2": ("/events.v1.EventsService/Track", "OK", 1, 1),
    }
