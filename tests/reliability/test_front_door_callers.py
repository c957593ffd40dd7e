"""The front door under abuse, rows 7 to 9 of issue 19: who the caller is, and what it costs.

Each attack runs as a process of its own (tests.harness.attacker) beside a legitimate
client from the same address (a keyed WebSocket and keyed POSTs, ~20/s each), against a
server and a bridge in processes of their own, and each test asserts what the legitimate
client got and what the store kept.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from events_server.queue.keys import KeySpace
from events_server.server.settings import Settings
from tests.harness.abuse import Attack, Legit, tree_rss_kib
from tests.harness.keys import create_key, register_storefront
from tests.harness.processes import deployed, events_env
from tests.harness.streams import records, wait_for_records

Figures = Callable[[str], None]

MEMORY_BOUND_KIB = 1024 * 1024
"""Row 8: the bridge (its parse workers included) holds at most 1 GiB under the attack."""


@pytest.mark.slow
def test_a_flood_of_made_up_keys_from_a_clients_address_refuses_none_of_its_good_keys(
    settings: Settings, rdb: redis.Redis, tmp_path: Path, figures: Figures
) -> None:
    # Row 7: the flood shares the client's address (one NAT, or a proxy not counted in
    # EVENTS_FORWARDED_HOPS), and spends that address's unknown-key allowance at once;
    # the good key's cached answers expire every 0.3 s meanwhile.
    key = create_key(settings.redis_url, settings.key_prefix, ["shop-x"], "legit")
    env = events_env(
        settings, EVENTS_PEER_UNKNOWN_KEYS_PER_SECOND="5", EVENTS_KEY_CACHE_SECONDS="0.3"
    )
    with deployed(env, tmp_path) as (_, bridge), Legit(bridge.url, key) as legit:
        time.sleep(0.5)
        attack = Attack("keys", bridge.url, 8, 8)
        flood = attack.result()
    figures(f"flood {flood}; legit POSTs {legit.posts.summary()}, frames {legit.frames.summary()}")
    assert flood.get("401", 0) > 100  # the flood ran, and was refused
    assert set(legit.posts.outcomes) == {"200"}  # good keys never refused
    assert set(legit.frames.outcomes) == {"ok"}
    assert legit.closed is None  # the keyed WebSocket stayed open (no 4100)


@pytest.mark.slow
def test_unauthenticated_large_bodies_cost_the_bridge_little_and_legit_clients_nothing(
    settings: Settings, rdb: redis.Redis, tmp_path: Path, figures: Figures
) -> None:
    # Row 8: valid 1 MiB bodies, without a key or with a made-up one, from 256 connections.
    key = create_key(settings.redis_url, settings.key_prefix, ["shop-x"], "legit")
    with deployed(events_env(settings), tmp_path) as (_, bridge), Legit(bridge.url, key) as legit:
        time.sleep(0.5)
        before = peak = tree_rss_kib(bridge.pid)
        attack = Attack("bodies", bridge.url, 15, 256)
        while attack.running():
            peak = max(peak, tree_rss_kib(bridge.pid))
            if peak > MEMORY_BOUND_KIB:
                attack.stop()  # the harm is done: no need to take the box down with it
            time.sleep(0.1)
        flood = attack.result()
    figures(
        f"bridge RSS {before // 1024} -> peak {peak // 1024} MiB; attack {flood};"
        f" legit POSTs {legit.posts.summary()}, frames {legit.frames.summary()}"
    )
    assert peak <= MEMORY_BOUND_KIB
    assert sum(n for status, n in flood.items() if status in {"401", "403"}) > 100
    assert set(legit.posts.outcomes) == {"200"}
    assert set(legit.frames.outcomes) == {"ok"}
    assert legit.closed is None
    assert legit.posts.p99() <= 0.5
    assert legit.frames.p99() <= 0.5


@pytest.mark.slow
def test_invalid_frames_from_a_forged_storefront_origin_do_not_flush_the_stores_diagnostics(
    settings: Settings, rdb: redis.Redis, keys: KeySpace, tmp_path: Path, figures: Figures
) -> None:
    # Row 9: each invalid frame is a rejected-request record for the storefront's tenant.
    key = create_key(settings.redis_url, settings.key_prefix, ["shop-x"], "legit")
    origin = f"https://shop-{uuid.uuid4().hex[:8]}.example"
    register_storefront(settings, "shop-x", origin)
    # A small stream, so that a flush takes a few hundred records, not thousands.
    env = events_env(settings, EVENTS_REJECTED_MAXLEN="200")
    with deployed(env, tmp_path) as (_, bridge):
        with httpx.Client(base_url=bridge.url, headers={"x-api-key": key}, timeout=10) as http:
            for n in range(5):  # what the store's integration really gets wrong
                bad = {"tenant": "shop-x", "market": "us", "type": "clack", "user_id": f"real-{n}"}
                assert http.post("/create-events", json=[bad]).status_code == 422
        wait_for_records(rdb, keys, "shop-x", 5)
        with Legit(bridge.url, key) as legit:
            time.sleep(0.5)
            flood = Attack("frames", bridge.url, 8, 4, origin).result()
        time.sleep(1)  # the last records are written in the background
    kept = records(rdb, keys, "shop-x")
    real = [r for r in kept if b'"user_id":"real-' in r[b"payload"].replace(b" ", b"")]
    figures(
        f"attack {flood}; stream holds {len(kept)} records, {len(real)} of the 5 real;"
        f" legit POSTs {legit.posts.summary()}, frames {legit.frames.summary()}"
    )
    assert flood.get("not-ok", 0) > 300  # refused as ever, each one
    assert len(real) == 5  # the store's own diagnostics are still there
    assert set(legit.posts.outcomes) == {"200"}
    assert set(legit.frames.outcomes) == {"ok"}
