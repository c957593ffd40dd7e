"""Beacons over real HTTP: the bodies Depict's storefront client sends, keyless and keyed.

Depict's client (``@depict-ai/dpc``) sends no key: ``navigator.sendBeacon(url,
new Blob([json], {type: "application/json"}))``, falling back to the same JSON in a
Blob typed ``application/x-www-form-urlencoded``, then ``fetch(url, {credentials:
"include"})``; a string beacon goes as ``text/plain;charset=UTF-8``. Each is JSON
unless the key came in the X-API-KEY cookie (see rest_bridge.body). A keyless
request is let in by its Origin, registered for its events' tenants with
``events-server storefronts add``.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
import redis

from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.processes import run_events_server
from tests.harness.streams import queued
from tests.harness.web import cors_headers

URL = "/create-events"
TENANT = "shop-b"
# What Depict's client sends: document_width is window.innerWidth, a number.
EVENT = {
    "tenant": TENANT,
    "market": "se",
    "type": "page_view",
    "dsid": "d-1",
    "url": "https://shop.example/product/1",
    "document_width": 1280,
}
BODY = json.dumps([EVENT]).encode()

# What each beacon carries as its Content-Type.
BEACON_TYPES = {
    "Blob application/json": "application/json",
    "Blob application/x-www-form-urlencoded": "application/x-www-form-urlencoded",
    "string": "text/plain;charset=UTF-8",
}


@pytest.fixture
def storefront(settings: Settings, rdb: redis.Redis) -> str:
    """An origin of its own (no answer about it is cached anywhere), registered for TENANT.

    After ``rdb``, which clears the session's Redis keys, registrations included.
    """
    origin = f"https://{uuid.uuid4().hex[:12]}.shop.example"
    run_events_server(settings, "storefronts", "add", "--tenant", TENANT, "--origin", origin)
    return origin


# --- keyed beacons: JSON unless the key is a cookie (pass today) -------------------------


@pytest.mark.parametrize("content_type", list(BEACON_TYPES.values()), ids=list(BEACON_TYPES))
def test_a_beacon_type_with_the_key_in_the_query_is_json(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace, content_type: str
) -> None:
    # A key in the URL is the page's own: no other site's page can send it for the visitor.
    answer = httpx.post(
        f"{bridge}{URL}",
        params={"api_key": api_key},
        content=BODY,
        headers={"content-type": content_type},
    )
    assert answer.status_code == 200, answer.text
    [(_, envelope)] = queued(rdb, keys)
    assert envelope.event.document_width == "1280"


@pytest.mark.parametrize("content_type", list(BEACON_TYPES.values()), ids=list(BEACON_TYPES))
def test_a_beacon_type_with_the_key_in_a_header_is_json(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace, content_type: str
) -> None:
    # An X-API-KEY header makes the browser ask first (a preflight): no CSRF either.
    answer = http.post(URL, content=BODY, headers={"content-type": content_type})
    assert answer.status_code == 200, answer.text
    assert len(queued(rdb, keys)) == 1


@pytest.mark.parametrize(
    "content_type", ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None]
)
def test_a_beacon_type_with_the_key_in_the_cookie_is_415(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace, content_type: str | None
) -> None:
    # Any site's page can send these cross-site with the visitor's cookies, unasked.
    headers = {"content-type": content_type} if content_type else {}
    with httpx.Client(base_url=bridge, timeout=10, cookies={"X-API-KEY": api_key}) as client:
        answer = client.post(URL, content=BODY, headers=headers)
    assert answer.status_code == 415
    assert answer.headers["accept-post"] == "application/json"
    what = f"Content-Type {content_type.split(';')[0]}" if content_type else "a body without"
    detail = answer.json()["detail"]
    assert detail.startswith(what)
    assert "not accepted with the key in the X-API-KEY cookie" in detail
    assert detail.endswith(
        ": send application/json (or application/*+json); or, unless the key is in the"
        " X-API-KEY cookie, the JSON as text/plain or application/x-www-form-urlencoded"
        " (beacons)"
    )
    assert queued(rdb, keys) == []


def test_a_json_body_with_the_key_in_the_cookie_is_json(
    bridge: str, api_key: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    # application/json is never sent cross-site unasked: the browser preflights it.
    with httpx.Client(base_url=bridge, timeout=10, cookies={"X-API-KEY": api_key}) as client:
        answer = client.post(URL, content=BODY, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert len(queued(rdb, keys)) == 1


def test_a_form_body_is_read_as_json_not_as_form_fields(
    http: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    form = b"tenant=shop-b&market=se&type=page_view"
    answer = http.post(
        URL, content=form, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert (error["type"], error["loc"]) == ("json_invalid", ["body", 0])
    assert queued(rdb, keys) == []


@pytest.mark.parametrize("content_type", list(BEACON_TYPES.values()), ids=list(BEACON_TYPES))
def test_a_keyless_beacon_without_an_origin_is_401(
    keyless: httpx.Client, rdb: redis.Redis, keys: KeySpace, content_type: str
) -> None:
    # Not a browser (browsers always send Origin with a POST): nothing lets it in.
    answer = keyless.post(URL, content=BODY, headers={"content-type": content_type})
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "APIKey"
    assert answer.json()["detail"].startswith("missing API key")
    assert queued(rdb, keys) == []


# --- keyless, from a storefront origin (wait for the server's keyless intake) --------------


@pytest.mark.parametrize("content_type", list(BEACON_TYPES.values()), ids=list(BEACON_TYPES))
def test_a_keyless_beacon_from_a_registered_origin_is_queued(
    keyless: httpx.Client,
    storefront: str,
    rdb: redis.Redis,
    keys: KeySpace,
    content_type: str,
) -> None:
    answer = keyless.post(
        URL, content=BODY, headers={"content-type": content_type, "origin": storefront}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 1
    # The page may read it (fetch with credentials: "include" needs the exact origin).
    assert cors_headers(answer) == {
        "access-control-allow-origin": storefront,
        "access-control-allow-credentials": "true",
        "access-control-expose-headers": "Retry-After, X-Request-Id",
        "vary": "Origin",
    }
    [(_, envelope)] = queued(rdb, keys)
    assert envelope.event.tenant == TENANT
    assert envelope.event.document_width == "1280"
    assert envelope.storefront_origin == storefront
    assert envelope.api_key_id == ""


def test_a_keyless_beacon_from_an_unregistered_origin_is_403_before_its_body_is_read(
    keyless: httpx.Client, rdb: redis.Redis, keys: KeySpace
) -> None:
    origin = f"https://{uuid.uuid4().hex[:12]}.elsewhere.example"
    answer = keyless.post(
        URL, content=BODY, headers={"content-type": "text/plain", "origin": origin}
    )
    assert answer.status_code == 403
    detail = answer.json()["detail"]
    # Refused on its headers (rest_bridge.admission): no event was read to be named.
    assert detail.startswith(f"storefront origin {origin!r} is not registered for any tenant")
    assert "events-server storefronts add" in detail
    assert detail.endswith("nothing was queued")
    assert answer.headers["connection"] == "close"  # its body unread
    assert cors_headers(answer) == {}  # a refused page reads nothing
    assert queued(rdb, keys) == []


def test_a_keyless_request_for_a_tenant_the_origin_is_not_registered_for_is_403(
    keyless: httpx.Client, storefront: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    other = {**EVENT, "tenant": "shop-x"}
    answer = keyless.post(URL, json=[EVENT, other], headers={"origin": storefront})
    assert answer.status_code == 403
    detail = answer.json()["detail"]
    assert detail.startswith("events[1].tenant: ")
    assert "'shop-x'" in detail
    assert detail.endswith("nothing was queued")
    assert queued(rdb, keys) == []


def test_a_cookie_key_with_text_plain_is_415_even_from_a_registered_origin(
    bridge: str, api_key: str, storefront: str, rdb: redis.Redis, keys: KeySpace
) -> None:
    with httpx.Client(base_url=bridge, timeout=10, cookies={"X-API-KEY": api_key}) as client:
        answer = client.post(
            URL, content=BODY, headers={"content-type": "text/plain", "origin": storefront}
        )
    assert answer.status_code == 415
    assert "with the key in the X-API-KEY cookie" in answer.json()["detail"]
    assert queued(rdb, keys) == []


def test_a_credentialed_preflight_from_a_registered_origin_echoes_it_with_credentials(
    keyless: httpx.Client, storefront: str
) -> None:
    # What the browser asks before sendBeacon's application/json Blob (credentials
    # mode "include": the page's cookies go along, so "*" would not do).
    answer = keyless.options(
        URL,
        headers={
            "origin": storefront,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert answer.status_code == 204, answer.text
    headers = cors_headers(answer)
    assert headers["access-control-allow-origin"] == storefront
    assert headers["access-control-allow-credentials"] == "true"
    assert headers["vary"] == "Origin"
    assert "Content-Type" in headers["access-control-allow-headers"]
    assert headers["access-control-allow-methods"] == "POST"
