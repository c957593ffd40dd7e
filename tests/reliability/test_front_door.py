"""The storefront front door under abuse (issue 19, rows 1-6): one client's attack on
/ws/create-events, a legitimate storefront beside it, the bridge a process of its own.

Each test runs an attack of tests.harness.ws_attacks for ATTACK_SECONDS against a bridge with
the default settings (but where a row says otherwise), and asserts what the legitimate
client got (every frame and POST answered, p99 within LEGIT_P99) and what the attack
cost the bridge. Before the bridge's WebSocket bounds (rest_bridge.ws_protocol,
rest_bridge.budget) each of them failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from events_server.server.settings import Settings
from tests.harness.data import TEST_TENANTS
from tests.harness.keys import create_key, register_storefront
from tests.harness.processes import BridgeProcess
from tests.harness.siege import MIB, Outcome, bridge_process, siege
from tests.harness.ws_attacks import ORIGIN, held_frame

ATTACK_SECONDS = 15.0
LEGIT_P99 = 0.5
"""Seconds: what a storefront's event may take at worst beside an attack."""


@pytest.fixture
def attacker_key(settings: Settings) -> str:
    """A key of the attacker's own (what it does is charged to it, not to the storefront)."""
    return create_key(settings.redis_url, settings.key_prefix, TEST_TENANTS, "attacker")


@pytest.fixture
def default_bridge(grpc_target: str, tmp_path: Path) -> Iterator[BridgeProcess]:
    with bridge_process(grpc_target, tmp_path) as bridge:
        yield bridge


def legit_served(outcome: Outcome) -> None:
    """The legitimate storefront got every answer, in time."""
    for got in (outcome.ws, outcome.post):
        assert got.failures == [], outcome
        assert len(got.latencies) >= 100, outcome  # ~20/s for the attack's length
        assert got.p99() <= LEGIT_P99, outcome


@pytest.mark.slow
def test_pings_from_a_client_that_never_reads_cost_bounded_memory(
    default_bridge: BridgeProcess, api_key: str, attacker_key: str, figures: Callable[[str], None]
) -> None:
    # Row 1: 125-byte pings back to back, answers never read (a 4 KiB receive window).
    outcome = siege(default_bridge, "pings", api_key, attacker_key, ATTACK_SECONDS)
    figures(f"pings: {outcome}")
    assert outcome.growth_mib <= 100, outcome
    legit_served(outcome)


@pytest.mark.slow
def test_a_message_never_finished_costs_bounded_memory_and_time(
    default_bridge: BridgeProcess, api_key: str, attacker_key: str, figures: Callable[[str], None]
) -> None:
    # Row 2: a text frame with FIN=0, then empty continuation frames, never the last.
    outcome = siege(default_bridge, "fragments", api_key, attacker_key, ATTACK_SECONDS)
    figures(f"fragments: {outcome}")
    assert outcome.growth_mib <= 100, outcome
    legit_served(outcome)


@pytest.mark.slow
def test_frames_costly_to_validate_do_not_hold_the_loop(
    default_bridge: BridgeProcess, api_key: str, attacker_key: str, figures: Callable[[str], None]
) -> None:
    # Row 3: 4 sockets, each with 16 frames in flight of ~10 KiB of invalid variant ids.
    outcome = siege(default_bridge, "costly", api_key, attacker_key, ATTACK_SECONDS, 4)
    figures(f"costly: {outcome}")
    assert outcome.attacker.get("answers", 0) > 0, outcome  # refused, and answered so
    legit_served(outcome)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["invalid", "pongs"])
def test_a_flood_of_small_frames_does_not_hold_the_loop(
    default_bridge: BridgeProcess,
    api_key: str,
    attacker_key: str,
    attack: str,
    figures: Callable[[str], None],
) -> None:
    # Row 4: one socket sending small invalid frames as fast as they are answered (256
    # unanswered at a time), or unsolicited pongs back to back.
    outcome = siege(default_bridge, attack, api_key, attacker_key, ATTACK_SECONDS)
    figures(f"{attack}: {outcome}")
    legit_served(outcome)


HELD_SOCKETS = 256
IN_FLIGHT = 16  # ws_max_in_flight, the default


@pytest.mark.slow
def test_frames_in_flight_on_many_sockets_stay_within_the_budget(
    grpc_target: str,
    settings: Settings,
    api_key: str,
    tmp_path: Path,
    figures: Callable[[str], None],
) -> None:
    # Row 5: 256 sockets of a registered storefront origin (anyone can forge one) keeping
    # 16 frames of ~15 KiB in flight each (60 MiB), past the origin's rate: the server
    # holds each refusal up to 1 s. The bridge's budget here is 8 MiB (and connections
    # 512, so that each one's share of it fits).
    register_storefront(settings, "shop-x", HELD_ORIGIN)
    in_flight = HELD_SOCKETS * IN_FLIGHT * len(held_frame(0))
    env = {
        "EVENTS_MAX_BYTES_IN_FLIGHT": str(8 * MIB),
        "EVENTS_MAX_CONNECTIONS": "512",
        "EVENTS_WS_MAX_CONNECTIONS": "384",
    }
    with bridge_process(grpc_target, tmp_path, **env) as bridge:
        page = f"{ORIGIN}{HELD_ORIGIN}"
        outcome = siege(bridge, "held", api_key, page, ATTACK_SECONDS, HELD_SOCKETS)
    figures(f"held: {in_flight / MIB:.0f} MiB in flight; {outcome}")
    assert outcome.growth_mib * MIB <= 2 * in_flight, outcome
    assert outcome.attacker["opened"] >= HELD_SOCKETS, outcome
    legit_served(outcome)


HELD_ORIGIN = "https://held.example"


@pytest.mark.slow
def test_sockets_that_never_read_their_answers_are_dropped(
    grpc_target: str,
    api_key: str,
    attacker_key: str,
    tmp_path: Path,
    figures: Callable[[str], None],
) -> None:
    # Row 6: 64 sockets sending frames whose answers are as large as they are, reading
    # none (a 4 KiB receive window), pinged every second with 1 s to answer; each sends
    # until the bridge stops reading it, and waits. A socket
    # must be gone within the ping interval and timeout plus the write timeout (2 s
    # here): none may stay open longer than DROPPED_WITHIN.
    env = {
        "EVENTS_WS_PING_INTERVAL_SECONDS": "1",
        "EVENTS_WS_PING_TIMEOUT_SECONDS": "1",
        "EVENTS_WS_WRITE_TIMEOUT_SECONDS": "2",
    }
    with bridge_process(grpc_target, tmp_path, **env) as bridge:
        outcome = siege(bridge, "unread", api_key, attacker_key, ATTACK_SECONDS, 64)
    figures(f"unread: {outcome}")
    assert outcome.attacker["ended"] == 64, outcome  # each was dropped
    assert outcome.attacker["oldest_open_ms"] <= DROPPED_WITHIN * 1000, outcome
    legit_served(outcome)


DROPPED_WITHIN = 8.0
"""Seconds: 1 s ping + 1 s pong timeout + 2 s write timeout, and room for a loaded box."""
