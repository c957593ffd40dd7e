"""Depict's real storefront client (``@depict-ai/dpc``, unchanged) in headless Chromium, end to end.

A product page served from a loopback origin of its own loads the client's bundle; the page's
origin is registered as a storefront for its tenant, and no key exists anywhere. Chromium then
does what a shopper does: views the product, sees a recommendation, clicks it, adds to cart,
buys (``sendPurchaseEvent``, then the same order again through ``dpq("purchase", ...)``, as a
reloaded thank-you page would). The client sends those events over its WebSocket
(``wss://ws.depict.ai/ws/create-events``, a literal in its code) and, for the click and the
purchase, a ``sendBeacon`` too (the purchase to ``/v2/create-events``). The page then calls
utilishared's ``send_transaction_id_to_depict`` and ``send_product_unavailable_to_depict``,
which beacon their bodies to ``/v2/track``. Chromium resolves ws.depict.ai to
the bridge, served over TLS with a throwaway certificate (only that certificate's key is
trusted). The bundle's ``BASE_URL`` is the same TLS bridge: beacons go over HTTPS, as they must
from a real (HTTPS) storefront, and one bridge app serves both transports.

What is checked is the queue: every event the client sent, each exactly once (the purchase
sent twice is queued once), with the page's origin and no key, field for field what the client
sent (its numbers as their JSON text).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from playwright.sync_api import ConsoleMessage, Page, Response, WebSocket, sync_playwright

from events_server.pb import events_pb2 as pb
from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from events_server.wire.codec import event_to_dict
from rest_bridge.config import BridgeSettings
from tests.harness.depict import (
    WS_HOST,
    Certificate,
    StorefrontServer,
    TlsBridge,
    build_bundle,
    chromium_args,
    required_tools,
)
from tests.harness.processes import run_events_server
from tests.harness.streams import queued

TENANT = "harness_store"
PRODUCT = "SKU-123"
RECOMMENDATION = "rec-0001"
WIDTH = 1280
DEADLINE = 20.0
"""Seconds any one step may take to show in Redis (the client resends a frame after 5 s)."""

EXPECTED = {
    "page_view": ("product_id", PRODUCT),
    "element_visible": ("recommendation_id", RECOMMENDATION),
    "click": ("recommendation_id", RECOMMENDATION),
    "ws_click": ("recommendation_id", RECOMMENDATION),
    "add_to_cart": ("product_id", PRODUCT),
}
"""Each event type the four actions send, once, and the id it must carry."""

ORDER = {
    "transaction_id": "T-1001",
    "currency": "SEK",
    "items": [
        {"item_id": "white-socks-xl", "price": 89.9, "quantity": 12},
        {"item_id": PRODUCT, "price": 0, "quantity": 1},
    ],
}
"""The order the page reports (GA4's purchase shape, what sendPurchaseEvent takes)."""

TRACKED = ("purchase", "transaction_mapping", "product_unavailable")
"""The v2 kinds the page sends by beacon: each queued once."""

V2_PATHS = ("/v2/create-events", "/v2/track")


@pytest.fixture(scope="session")
def tools() -> tuple[str, str]:
    """npm and chromium (skipped without them, failed on CI)."""
    return required_tools()


@pytest.fixture(scope="session")
def certificate(tools: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A throwaway certificate for ws.depict.ai and 127.0.0.1."""
    return Certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_bridge(bridge_settings: BridgeSettings, certificate: Certificate) -> Iterator[TlsBridge]:
    """The real bridge over TLS, in front of the session's gRPC server."""
    bridge = TlsBridge(bridge_settings, certificate)
    bridge.start()
    yield bridge
    bridge.stop()


@pytest.fixture(scope="session")
def storefront(
    tools: tuple[str, str], tls_bridge: TlsBridge, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StorefrontServer]:
    """The product page and the client's bundle (built once, beacons to the TLS bridge)."""
    bundle = build_bundle(tools[0], tls_bridge.url, Path(tmp_path_factory.mktemp("dpc")))
    server = StorefrontServer(bundle)
    yield server
    server.close()


class Wire:
    """What the page sent and got, as Chromium saw it (DevTools gives a beacon's body)."""

    def __init__(self, page: Page, bridge: str) -> None:
        self.beacon_urls = {f"{bridge}{path}": path for path in ("/create-events", *V2_PATHS)}
        self.sockets: list[str] = []
        self.frames: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        self.posts: dict[str, int | None] = {}
        """DevTools request id -> HTTP status (None until answered) of each POST to the bridge."""
        self.paths: dict[str, str] = {}
        """DevTools request id -> the path of each POST to the bridge."""
        self.notes: list[str] = []
        """Page errors, console errors and warnings, HTTP errors, failed requests, closes."""
        page.on("websocket", self._socket)
        page.on("response", self._response)
        page.on("requestfailed", lambda r: self.notes.append(f"failed: {r.method} {r.url}"))
        page.on("pageerror", lambda e: self.notes.append(f"page error: {e}"))
        page.on("console", self._console)
        self.devtools = page.context.new_cdp_session(page)
        self.devtools.on("Network.requestWillBeSent", self._request)
        self.devtools.on("Network.responseReceived", self._answered)
        self.devtools.send("Network.enable")

    def _socket(self, socket: WebSocket) -> None:
        self.sockets.append(socket.url)
        socket.on("framesent", lambda payload: self.frames.append(_json(payload)))
        socket.on("framereceived", lambda payload: self.replies.append(_json(payload)))
        socket.on("close", lambda s: self.notes.append(f"socket closed: {s.url}"))
        socket.on("socketerror", lambda error: self.notes.append(f"socket error: {error}"))

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.notes.append(f"{response.request.method} {response.url}: {response.status}")

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.notes.append(f"console {message.type}: {message.text[:300]}")

    def _request(self, sent: dict[str, Any]) -> None:
        request = sent["request"]
        if request["method"] == "POST" and request["url"] in self.beacon_urls:
            self.posts[sent["requestId"]] = None
            self.paths[sent["requestId"]] = self.beacon_urls[request["url"]]

    def _answered(self, received: dict[str, Any]) -> None:
        if received["requestId"] in self.posts:
            self.posts[received["requestId"]] = received["response"]["status"]

    def answered(self) -> bool:
        """Every frame id has its answer (the client resends no more) and every POST its."""
        replied = {reply.get("id") for reply in self.replies}
        frames = all(frame.get("id") in replied for frame in self.frames)
        return frames and None not in self.posts.values()

    def settled(self) -> bool:
        """Every send, each resend too, has an answer of its own: none is still on its way."""
        sent = Counter(frame.get("id") for frame in self.frames)
        replies = Counter(reply.get("id") for reply in self.replies)
        return self.answered() and all(replies[i] >= n for i, n in sent.items())

    def sent(self, path: str) -> int:
        """POSTs to the bridge's ``path`` so far."""
        return list(self.paths.values()).count(path)

    def beacons(self, path: str = "/create-events") -> list[tuple[int | None, Any]]:
        """(status, JSON body) of each POST to the bridge's ``path``, in the order sent."""
        found = []
        # A copy: asking DevTools lets Playwright's events (more POSTs) arrive meanwhile.
        for request_id, status in list(self.posts.items()):
            if self.paths[request_id] != path:
                continue
            body = self.devtools.send("Network.getRequestPostData", {"requestId": request_id})
            found.append((status, json.loads(body["postData"])))
        return found

    def __str__(self) -> str:
        lines = [f"sockets: {self.sockets}", *(f"sent: {f}" for f in self.frames)]
        lines += [*(f"reply: {r}" for r in self.replies), f"POSTs answered: {self.posts}"]
        return "\n".join([*lines, *self.notes])


def _json(payload: str | bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(payload)
    except ValueError:
        return {"unparsed": str(payload)[:300]}
    return parsed if isinstance(parsed, dict) else {"unparsed": parsed}


@pytest.fixture
def page(tools: tuple[str, str], tls_bridge: TlsBridge, certificate: Certificate) -> Iterator[Page]:
    """A fresh headless Chromium tab (Debian's chromium, no browser download)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=tools[1],
            headless=True,
            args=chromium_args(tls_bridge.port, certificate),
        )
        try:
            tab = browser.new_context(viewport={"width": WIDTH, "height": 720}).new_page()
            yield tab
        finally:
            browser.close()


Envelopes = list[pb.Envelope]


def poll(page: Page, done: Callable[[], bool], seconds: float) -> bool:
    """Whether ``done`` came true within ``seconds``; Playwright's events arrive meanwhile."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        page.wait_for_timeout(100)  # not time.sleep: this is when Playwright's events arrive
    return True


def kind(envelope: pb.Envelope) -> str:
    """What an envelope holds: a v1 event's type, or a v2 kind (purchase, ...)."""
    tracked = envelope.WhichOneof("tracked")
    return tracked if tracked else str(event_to_dict(envelope.event)["type"])


def wait_until(
    page: Page, wire: Wire, what: str, done: Callable[[], bool], envelopes: Callable[[], Envelopes]
) -> None:
    """Poll until ``done``, failing after DEADLINE with what was queued and what was sent."""
    if not poll(page, done, DEADLINE):
        queued_kinds = [kind(e) for e in envelopes()]
        pytest.fail(f"no {what} within {DEADLINE}s; queued: {queued_kinds}\n{wire}")


def as_sent(sent: dict[str, Any]) -> dict[str, Any]:
    """An event as the client sent it, as the queue keeps it: numbers as their JSON text."""
    return {
        name: json.dumps(value) if isinstance(value, int | float) else value
        for name, value in sent.items()
    }


def as_queued(queued_event: dict[str, Any], sent: dict[str, Any]) -> dict[str, Any]:
    """The queued event's values of the fields the client sent (None: not queued)."""
    return {name: queued_event.get(name) for name in sent}


def test_depicts_client_events_are_queued_once_from_a_registered_storefront(  # noqa: PLR0917
    page: Page,
    storefront: StorefrontServer,
    tls_bridge: TlsBridge,
    settings: Settings,
    rdb: redis.Redis,
    keys: KeySpace,
) -> None:
    added = run_events_server(
        settings, "storefronts", "add", "--tenant", TENANT, "--origin", storefront.origin,
        check=False,
    )  # fmt: skip
    assert added.returncode == 0, f"events-server storefronts add: {added.stderr}"
    wire = Wire(page, tls_bridge.url)

    def envelopes() -> Envelopes:
        return [envelope for _, envelope in queued(rdb, keys)]

    def queued_types() -> Counter[str]:
        return Counter(kind(e) for e in envelopes())

    def step(what: str, *types: str) -> None:
        wait_until(page, wire, what, lambda: all(queued_types()[t] for t in types), envelopes)

    url = (
        f"{storefront.origin}/page.html?tenant={TENANT}&market=se&product={PRODUCT}"
        f"&rec={RECOMMENDATION}&session=sess-42&user=user-7&stay=1"
    )
    page.goto(url)
    step("page view (setProductId)", "page_view")
    page.locator("#rec-card").scroll_into_view_if_needed()  # in view for 500 ms: an impression
    step("impression", "element_visible")
    page.locator("#rec-link").click()  # stay=1: the link does not navigate
    step("recommendation click (beacon and frame)", "click", "ws_click")
    page.locator("#add-to-cart").click()
    step("add to cart", "add_to_cart")
    buy(page, wire, step, envelopes)
    # Every frame answered: the client sends no more. A resend that went out before the answer
    # may still be on its way to Redis: it is answered too, or done within twice the bridge's
    # gRPC deadline.
    wait_until(page, wire, "answer to every frame and beacon", wire.answered, envelopes)
    poll(page, wire.settled, 2 * tls_bridge.settings.grpc_timeout_seconds)
    beacons = wire.beacons()
    purchases = wire.beacons("/v2/create-events")
    tracks = wire.beacons("/v2/track")
    seen = f"{wire}\nbeacons: {beacons}\npurchases: {purchases}\ntracks: {tracks}"
    assert f"wss://{WS_HOST}/ws/create-events" in wire.sockets, seen
    assert {reply.get("status") for reply in wire.replies} == {"ok"}, seen
    assert [status for status, _ in beacons + purchases + tracks] == [200] * 5, seen
    assert wire.notes == [], seen  # no page error, console error or warning, failed request

    everything = envelopes()
    # 6 of 6 client events, each once (the purchase sent twice too), and utilishared's two.
    assert Counter(kind(e) for e in everything) == Counter([*EXPECTED, *TRACKED]), seen
    for envelope in everything:
        assert envelope.storefront_origin == storefront.origin, envelope
        assert envelope.api_key_id == "", envelope
    check_tracked([e for e in everything if e.WhichOneof("tracked")], purchases, tracks)
    final = [e for e in everything if not e.WhichOneof("tracked")]
    events = [event_to_dict(envelope.event) for envelope in final]
    for envelope, event in zip(final, events, strict=True):
        name, value = EXPECTED[event["type"]]
        assert event[name] == value, event
        assert event["document_width"] == str(WIDTH), event
        assert (event["tenant"], event["market"], event["url"]) == (TENANT, "se", url), event
        assert (event["session_id"], event["user_id"]) == ("sess-42", "user-7"), event
        assert envelope.storefront_origin == storefront.origin, envelope
        assert envelope.api_key_id == "", envelope

    # Each frame the client sent (by its id: a resend is the same frame) is one queued event,
    # field for field; the click beacon is the one event without a frame id.
    framed = [e for e in final if e.HasField("ws_message_id")]
    ids = Counter(e.ws_message_id for e in framed)
    assert ids == Counter({frame["id"]: 1 for frame in wire.frames}), seen
    by_id = {e.ws_message_id: event_to_dict(e.event) for e in framed}
    for frame in wire.frames:
        assert as_queued(by_id[frame["id"]], frame["event"]) == as_sent(frame["event"]), frame
    [(_, [beaconed])] = beacons  # one POST of one event
    [unframed] = [event_to_dict(e.event) for e in final if not e.HasField("ws_message_id")]
    assert as_queued(unframed, beaconed) == as_sent(beaconed), beaconed


def buy(
    page: Page, wire: Wire, step: Callable[..., None], envelopes: Callable[[], Envelopes]
) -> None:
    """The page reports an order twice (the client's two purchase APIs), then calls
    utilishared's two /v2/track senders; ``step`` waits for each kind to be queued."""
    page.evaluate("order => window.dpc.sendPurchaseEvent(order)", ORDER)
    step("purchase (sendPurchaseEvent)", "purchase")
    # The same order again, through the page's queue: a reloaded thank-you page.
    page.evaluate("order => window.dpq('purchase', order)", ORDER)
    wait_until(page, wire, "answer to the second purchase",
               lambda: wire.sent("/v2/create-events") == 2 and wire.answered(),
               envelopes)  # fmt: skip
    # utilishared's /v2/track senders, as an integration calls them (a Tenant-like t).
    shop = {"tenant": TENANT, "market": "se"}
    page.evaluate("t => window.utilishared.send_transaction_id_to_depict(t, 'T-1001')", shop)
    page.evaluate(
        "t => window.utilishared.send_product_unavailable_to_depict("
        "{...t, get_product_id: () => t.product}, 'out_of_stock')",
        {**shop, "product": PRODUCT},
    )
    step(
        "mapping and unavailable product (/v2/track)", "transaction_mapping", "product_unavailable"
    )


def check_tracked(
    tracked: Envelopes,
    purchases: list[tuple[int | None, Any]],
    tracks: list[tuple[int | None, Any]],
) -> None:
    """The v2 kinds queued are what the client's beacons carried, field for field."""
    by_kind = {envelope.WhichOneof("tracked"): envelope for envelope in tracked}
    first, again = (body for _, body in purchases)
    assert first == again  # byte for byte the same order: one queued
    [sent] = first["events"]
    purchase = by_kind["purchase"].purchase
    assert (
        (first["tenant"], first["market"]) == (purchase.tenant, purchase.market) == (TENANT, "se")
    )
    assert (sent["transaction_id"], sent["currency"]) == (purchase.transaction_id, "SEK")
    assert (sent["dsid"], sent["user_id"], sent["session_id"]) == (
        purchase.dsid,
        purchase.user_id,
        purchase.session_id,
    )
    assert (
        [(p.sku, p.price_number, p.quantity) for p in purchase.products]
        == [(p["sku"], json.dumps(p["price"]), p["quantity"]) for p in sent["products"]]
        == [("white-socks-xl", "89.9", 12), (PRODUCT, "0", 1)]
    )
    [(_, mapping_body), (_, unavailable_body)] = tracks
    [mapping_sent] = mapping_body["events"]
    mapping = by_kind["transaction_mapping"].transaction_mapping
    assert mapping_sent == {
        "event_type": "transaction_mapping",
        "transaction_id": mapping.transaction_id,
        "dsid": mapping.dsid,
    }
    assert mapping.transaction_id == "T-1001"
    assert mapping.dsid == purchase.dsid
    [unavailable_sent] = unavailable_body["events"]
    unavailable = by_kind["product_unavailable"].product_unavailable
    assert unavailable_sent == {
        "event_type": "product_unavailable",
        "product_id": PRODUCT,
        "unavailability_type": "out_of_stock",
        "user_id": unavailable.user_id,
        "dsid": unavailable.dsid,
    }
    assert unavailable.product_id == PRODUCT
    assert unavailable.unavailability_type == pb.UNAVAILABILITY_TYPE_OUT_OF_STOCK
    for body in (mapping_body, unavailable_body):
        assert (body["tenant"], body["market"]) == (TENANT, "se")
