"""Exposing metrics: per-instance registries, multiprocess mode, the server's metrics port.

Every instance has a registry of its own (tests run several servers in one
process). In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set up by the
supervisor of ``--workers N``), prometheus-client keeps every counter and
histogram in files there, and a scrape of any process adds up all processes
that share the directory (one directory per service: the bridge and the server
must not share one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from math import isnan
from pathlib import Path
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

M = TypeVar("M", Counter, Histogram)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Request latency buckets (seconds) of both processes."""


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, when this process runs in it."""
    return os.environ.get(MULTIPROC_ENV) or None


@contextlib.contextmanager
def shared_by_workers() -> Iterator[str]:
    """Multiprocess mode for the workers started inside: the given directory, or a temporary one.

    For a supervisor, before it forks or spawns workers. The directory is emptied
    first: files of an earlier run would be added to this one's figures.
    """
    given = multiprocess_dir()
    made = None if given else tempfile.mkdtemp(prefix="events-metrics-")
    directory = given or made
    assert directory is not None
    for stale in Path(directory).glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = directory
    # prometheus-client picks its value class on import, which has happened: pick
    # again, so that metrics made after a fork keep their values in files too.
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]
    try:
        yield directory
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


class LoopValue:
    """A metric's value without prometheus-client's lock, for a process whose metrics change
    on one thread only: both services change theirs on the event loop's; the server's
    metrics port reads them on its own, and the GIL lets a float be read whole. The lock
    cost 0.18 µs on each change, and a single event makes some eight in each process."""

    _multiprocess = False

    def __init__(self, *_: Any, **__: Any) -> None:
        self._value = 0.0
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> Any:
        return self._exemplar


def values_changed_on_one_thread() -> None:
    """Metrics made from now on keep their values as LoopValue: for the process of a
    service (its metrics changed on its event loop alone), not in multiprocess mode."""
    if multiprocess_dir() is None:
        prometheus_values.ValueClass = LoopValue


def scrape_registry(own: CollectorRegistry, *local: Collector) -> CollectorRegistry:
    """What a scrape reads: ``own`` plus ``local`` collectors, or every process's metrics.

    ``local`` collectors report state that any one process can see whole (such as
    queue lengths read from Redis), so they are never added up across processes.
    """
    if multiprocess_dir() is None:
        ProcessCollector(registry=own)
        for collector in local:
            own.register(collector)
        return own
    merged = CollectorRegistry()
    MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    for collector in local:
        merged.register(collector)
    return merged


class LabelCache:
    """Labelled children by label values: ``labels()`` validates and locks on every call.

    ``counting`` and ``observing`` hand out a child's change itself, for the counts made
    for every request or event: ``Counter.inc`` and ``Histogram.observe`` check on each
    call what holds for every child (it is labelled, the amount is not negative, there is
    no exemplar), and the histogram walks its bounds in Python. Four to six calls less.
    """

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._changes: dict[tuple[int, tuple[str, ...]], Callable[[float], None]] = {}

    def get(self, metric: M, labels: tuple[str, ...]) -> M:
        """``metric.labels(*labels)``, looked up once."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def counting(self, metric: Counter, labels: tuple[str, ...]) -> Callable[[float], None]:
        """``metric.labels(*labels).inc``, for amounts that are never negative."""
        return self._change(metric, labels, increment)

    def observing(self, metric: Histogram, labels: tuple[str, ...]) -> Callable[[float], None]:
        """``metric.labels(*labels).observe``."""
        return self._change(metric, labels, Observer)

    def _change(
        self, metric: M, labels: tuple[str, ...], make: Callable[[M], Callable[[float], None]]
    ) -> Callable[[float], None]:
        key = (id(metric), labels)
        change = self._changes.get(key)
        if change is None:
            change = self._changes[key] = make(self.get(metric, labels))
        return change


def increment(counter: Counter) -> Callable[[float], None]:
    """A counter's (or labelled child's) ``inc``, for amounts that are never negative."""
    return counter._value.inc  # type: ignore[no-any-return]


class Observer:
    """A histogram's (or labelled child's) ``observe``: the same values changed (the sum,
    and the first bucket whose upper bound is at or above the amount, found by bisection;
    the last bound is +Inf), without the per-call checks."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, histogram: Histogram) -> None:
        self._bounds: list[float] = list(histogram._upper_bounds)
        self._buckets: list[Callable[[float], None]] = [b.inc for b in histogram._buckets]
        self._sum: Callable[[float], None] = histogram._sum.inc

    def __call__(self, amount: float) -> None:
        self._sum(amount)
        if not isnan(amount):  # in no bucket, as with observe()
            self._buckets[bisect_left(self._bounds, amount)](1)


class MetricsEndpoint:
    """Serves a registry on its own HTTP port, in a thread (the gRPC server's /metrics)."""

    def __init__(self, addr: str, registry: CollectorRegistry) -> None:
        host, _, port = addr.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the chosen one when asked for port 0)."""
        return self._server.server_port if self._server is not None else self._port

    def start(self) -> None:
        """Listen; fails (OSError) when the port is taken."""
        self._server, self._thread = start_http_server(self._port, self._host, self._registry)

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown()
                self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)
