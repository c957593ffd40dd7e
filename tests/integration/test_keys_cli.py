"""``events-server keys``: real processes against the session's Valkey."""

from __future__ import annotations

import json
import subprocess

import httpx
import redis

from events_server.server.auth import SECRET_PREFIX, digest_of
from events_server.server.settings import Settings
from tests.harness.processes import run_events_server
from tests.harness.waiting import eventually


def keys_cmd(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``events-server keys ...`` against the session's Redis and prefix."""
    return run_events_server(settings, "keys", *args, check=False)


def test_create_prints_the_key_once_on_the_last_line_and_it_works(
    bridge: str, settings: Settings, rdb: redis.Redis
) -> None:
    made = keys_cmd(
        settings, "create", "--tenant", "shop-a", "--tenant", "shop-b", "--label", "web shop",
        "--origin", "https://Shop.Example:443",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    secret = lines[-1]
    assert secret.startswith(SECRET_PREFIX)
    assert made.stdout.count(secret) == 1
    assert "tenants=shop-a,shop-b" in made.stdout
    assert "origins=https://shop.example" in made.stdout  # as browsers send it
    answer = httpx.post(
        f"{bridge}/create-events",
        json=[{"tenant": "shop-b", "market": "us", "type": "click"}],
        headers={"x-api-key": secret},
        timeout=10,
    )
    assert answer.status_code == 200

    listed = keys_cmd(settings, "list", "--json")
    assert listed.returncode == 0
    [record] = [r for r in map(json.loads, listed.stdout.splitlines()) if r["label"] == "web shop"]
    assert record["tenants"] == ["shop-a", "shop-b"]
    assert record["origins"] == ["https://shop.example"]
    assert record["revoked"] is None
    assert record["id"] in lines[0]
    for shown in (listed.stdout, keys_cmd(settings, "list").stdout):
        assert secret not in shown
        assert digest_of(secret) not in shown


def test_revoke_marks_the_key_and_it_stops_working(
    bridge: str, settings: Settings, rdb: redis.Redis
) -> None:
    made = keys_cmd(settings, "create", "--tenant", "shop-a", "--label", "gone")
    secret = made.stdout.split()[-1]
    event = [{"tenant": "shop-a", "market": "us", "type": "click"}]

    def status() -> int:
        url = f"{bridge}/create-events"
        return httpx.post(url, json=event, headers={"x-api-key": secret}, timeout=10).status_code

    assert status() == 200
    [record] = [
        r
        for r in map(json.loads, keys_cmd(settings, "list", "--json").stdout.splitlines())
        if r["label"] == "gone"
    ]
    revoked = keys_cmd(settings, "revoke", record["id"])
    assert revoked.returncode == 0
    assert f"revoked {record['id']}" in revoked.stdout
    listed = keys_cmd(settings, "list").stdout
    assert "revoked=" in next(line for line in listed.splitlines() if record["id"] in line)
    assert rdb.hget(f"{settings.key_prefix}:{{keys}}:active", digest_of(secret)) is None
    eventually(lambda: status() == 401, within=settings.key_cache_seconds + 1)


def test_bad_input_is_refused_with_a_reason(settings: Settings, rdb: redis.Redis) -> None:
    no_tenant = keys_cmd(settings, "create", "--label", "x")
    assert no_tenant.returncode == 2
    assert "--tenant" in no_tenant.stderr
    for origin in ("null", "*", "https://shop.example/path", "ftp://shop.example", "shop.example"):
        bad = keys_cmd(settings, "create", "--tenant", "t", "--origin", origin)
        assert bad.returncode == 2, origin
        assert "must look like https://shop.example" in bad.stderr
        assert bad.stdout == ""
    empty = keys_cmd(settings, "create", "--tenant", "")
    assert empty.returncode == 2
    assert "tenants are not empty" in empty.stderr
    unknown = keys_cmd(settings, "revoke", "key_nope")
    assert unknown.returncode == 1
    assert "no key 'key_nope'" in unknown.stderr
