"""Group administration on real Valkey: trim never drops an unacknowledged entry."""

from __future__ import annotations

import itertools
from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events_server.consumer.groups import TRIM
from events_server.queue.keys import KeySpace

_streams = itertools.count()


def text(value: Any) -> str:
    """A reply as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def trim(rdb: redis.Redis, stream: str) -> Any:
    """groups.TRIM on one stream: [entries removed, first id kept]."""
    return rdb.eval(TRIM.source, 1, stream)


# Per group: how many entries it was given (read), and which of those it acknowledged.
group_plans = st.lists(
    st.tuples(st.integers(0, 30), st.lists(st.integers(0, 29), max_size=30)),
    min_size=0,
    max_size=3,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entries=st.integers(0, 30), plans=group_plans)
def test_trim_removes_only_what_every_group_acknowledged(
    rdb: redis.Redis, keys: KeySpace, entries: int, plans: list[tuple[int, list[int]]]
) -> None:
    stream = f"{keys.prefix}:{{p0}}:trim-{next(_streams)}"
    ids = [text(rdb.xadd(stream, {"e": str(n)})) for n in range(entries)]
    unacknowledged: set[str] = set()
    for index, (read, acks) in enumerate(plans):
        group = f"g{index}"
        rdb.xgroup_create(stream, group, id="0", mkstream=True)
        reply: Any = rdb.xreadgroup(group, "c", {stream: ">"}, count=read) if read else []
        given_ids = [text(entry_id) for entry_id, _ in (reply[0][1] if reply else [])]
        acked = {given_ids[i] for i in acks if i < len(given_ids)}
        if acked:
            rdb.xack(stream, group, *acked)
        unacknowledged |= set(ids) - acked

    removed, _ = trim(rdb, stream)
    found: Any = rdb.xrange(stream)
    left = [text(entry_id) for entry_id, _ in found]

    assert unacknowledged <= set(left)  # nothing anyone still needs is gone
    assert removed == len(ids) - len(left)
    if plans and left:
        # ...and everything before the first entry some group still needs is gone.
        assert left[0] in unacknowledged
    if not plans:
        assert left == ids  # no group has read anything yet: keep it all
    rdb.delete(stream)


def test_trim_leaves_a_missing_stream_and_a_wrong_type_alone(
    rdb: redis.Redis, keys: KeySpace
) -> None:
    assert trim(rdb, keys.stream(0)) == [0, b""]
    rdb.set(keys.stream(1), "not a stream")
    assert trim(rdb, keys.stream(1)) == [0, b""]
    assert rdb.get(keys.stream(1)) == b"not a stream"
