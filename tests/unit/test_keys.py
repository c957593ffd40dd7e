"""Key layout: one cluster slot per partition, no cross-tenant collisions."""

from __future__ import annotations

from redis.crc import key_slot

from events_server.queue.keys import KeySpace


def test_a_partitions_stream_and_dedup_keys_share_one_slot() -> None:
    keys = KeySpace("ev", 16)
    for partition in range(16):
        slot = key_slot(keys.stream(partition).encode())
        assert key_slot(keys.dedup(partition, "shop{x}", "id-1").encode()) == slot


def test_partitions_spread_over_slots() -> None:
    keys = KeySpace("ev", 16)
    assert len({key_slot(keys.stream(p).encode()) for p in range(16)}) == 16


def test_tenant_and_id_cannot_be_confused() -> None:
    keys = KeySpace("ev", 1)
    assert keys.dedup(0, "a:b", "c") != keys.dedup(0, "a", "b:c")
