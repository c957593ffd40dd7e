"""A real browser: pages of other origins send events with fetch and navigator.sendBeacon.

Headless Chromium (Debian's ``chromium``) is driven by Playwright; the pages come
from loopback ports of their own, so every call to the bridge is cross-origin, with
the browser's own preflights, CORS checks and beacons.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from playwright.sync_api import Browser, Page, Response

from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.browser import PageServer, headless_chromium, page_server
from tests.harness.keys import create_key
from tests.harness.servers import LoopThread, bridged, serving
from tests.harness.streams import queued

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>a storefront</title>
<script>
async function sendFetch(url, key, events, encoding) {
  let body = JSON.stringify(events);
  const headers = {"Content-Type": "application/json", "X-API-KEY": key};
  if (encoding === "gzip") {
    body = await new Response(
      new Blob([body]).stream().pipeThrough(new CompressionStream("gzip"))
    ).arrayBuffer();
    headers["Content-Encoding"] = "gzip";
  }
  try {
    const answer = await fetch(url, {method: "POST", headers, body});
    return {
      status: answer.status,
      body: await answer.json(),
      requestId: answer.headers.get("X-Request-Id"),
    };
  } catch (error) {
    return {error: String(error)};
  }
}

function sendBeacon(url, key, events) {
  return navigator.sendBeacon(url + "?api_key=" + encodeURIComponent(key), JSON.stringify(events));
}
</script>
"""


def event(user_id: str) -> dict[str, str]:
    """An event of the tenant the browser test's key covers."""
    return {"tenant": "shop-x", "market": "us", "type": "page_view", "user_id": user_id}


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Headless Chromium; skipped where it is not installed, but never on CI."""
    with headless_chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def store() -> Iterator[PageServer]:
    """The storefront's pages: an origin the key lists."""
    with page_server(PAGE) as server:
        yield server


@pytest.fixture(scope="module")
def stranger() -> Iterator[PageServer]:
    """Another site's pages: an origin the key does not list."""
    with page_server(PAGE) as server:
        yield server


@pytest.fixture(scope="module")
def store_key(valkey: Any, settings: Settings, store: PageServer) -> str:
    """A key for tenant shop-x, to be used from the store's pages only."""
    return create_key(valkey.url, settings.key_prefix, ["shop-x"], origins=[store.origin])


@pytest.fixture(scope="module")
def events_url(loop: LoopThread, settings: Settings, store_key: str) -> Iterator[str]:
    """/create-events of a bridge whose server reads keys afresh (a new key's origin counts)."""
    own = settings.model_copy(update={"key_cache_seconds": 0.0})
    with serving(loop, own) as (_, target), bridged(target) as url:
        yield f"{url}/create-events"


@pytest.fixture
def tab(chromium: Browser) -> Iterator[Page]:
    """A fresh browser tab, in a context (cookies, cache) of its own."""
    context = chromium.new_context()
    yield context.new_page()
    context.close()


def call(page: Page, function: str, *args: Any) -> Any:
    """Call one of the page's functions with JSON arguments."""
    return page.evaluate(f"{function}(...{json.dumps(args)})")


def send_beacon(
    page: Page, events_url: str, key: str, events: list[dict[str, str]]
) -> tuple[Any, Response]:
    """Call the page's sendBeacon: whether the browser took the beacon, and the answer the
    browser got for it (the POST whose URL carries the key)."""
    with page.expect_response(
        lambda r: r.url.startswith(f"{events_url}?api_key=") and r.request.method == "POST"
    ) as answer:
        taken = call(page, "sendBeacon", events_url, key, events)
    return taken, answer.value


def test_a_store_page_sends_with_fetch_and_sendbeacon(  # noqa: PLR0917 (fixtures)
    tab: Page,
    store: PageServer,
    events_url: str,
    store_key: str,
    rdb: redis.Redis,
    keys: KeySpace,
) -> None:
    tab.goto(f"{store.origin}/")
    sent = call(tab, "sendFetch", events_url, store_key, [event("by-fetch")])
    assert sent["status"] == 200, sent
    assert sent["body"]["accepted"] == 1
    assert sent["requestId"]  # an exposed header: the page can read it
    zipped = call(tab, "sendFetch", events_url, store_key, [event("by-gzip")], "gzip")
    assert zipped["status"] == 200, zipped
    # Errors are readable by the page too: its status, its body.
    invalid = call(tab, "sendFetch", events_url, store_key, [{**event("x"), "type": "nope"}])
    assert invalid["status"] == 422
    assert invalid["body"]["detail"][0]["loc"] == ["body", 0, "type"]

    taken, beacon = send_beacon(tab, events_url, store_key, [event("by-beacon")])
    assert taken is True
    assert beacon.status == 200  # the beacon's POST, as the browser saw it

    users = sorted(envelope.event.user_id for _, envelope in queued(rdb, keys))
    assert users == ["by-beacon", "by-fetch", "by-gzip"]
    referers = {envelope.referer for _, envelope in queued(rdb, keys)}
    assert referers == {f"{store.origin}/"}  # the page the events came from


def test_a_page_of_another_origin_is_refused(  # noqa: PLR0917 (fixtures)
    tab: Page,
    stranger: PageServer,
    events_url: str,
    store_key: str,
    rdb: redis.Redis,
    keys: KeySpace,
) -> None:
    tab.goto(f"{stranger.origin}/")
    # The preflight is refused: the browser never sends the POST, and says only this.
    sent = call(tab, "sendFetch", events_url, store_key, [event("by-fetch")])
    assert sent == {"error": "TypeError: Failed to fetch"}
    # A beacon needs no preflight: the server itself refuses the key from this origin.
    taken, beacon = send_beacon(tab, events_url, store_key, [event("by-beacon")])
    assert taken is True
    assert beacon.status == 403
    assert queued(rdb, keys) == []
