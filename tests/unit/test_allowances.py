"""Per-name allowances: a burst, then the rate; each name its own; a rate of 0 is no limit."""

from __future__ import annotations

import time

from events_server.ops.allowances import Allowances


def test_a_name_gets_its_burst_then_its_rate_and_other_names_are_untouched() -> None:
    allowances = Allowances(per_second=10.0, burst=3)
    assert [allowances.take("flood") for _ in range(5)] == [True, True, True, False, False]
    assert allowances.take("other")  # its own bucket
    time.sleep(0.15)  # 1.5 tokens back at 10/s
    assert allowances.take("flood")
    assert not allowances.take("flood")


def test_no_rate_is_no_limit() -> None:
    allowances = Allowances(per_second=0.0, burst=0)
    assert all(allowances.take("any") for _ in range(1000))
