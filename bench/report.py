"""What `make bench` prints: one row per phase, the checks against their targets, as
Markdown tables that paste into the README and docs/performance.md as they are."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

PROCESSES = ["loadgen", "valkey", "server", "bridge", "naive"]

Row = dict[str, Any]
Check = dict[str, Any]


@dataclass
class Measured:
    """One phase as its load generator and /proc saw it over the measured window."""

    requests: int
    events: int
    seconds: float
    """The window the rates are over (the load generator's own)."""
    latencies_ms: tuple[float, float, float, float]
    """p50, p99, p99.9 and mean."""
    errors: dict[str, int]
    cpu: dict[str, float]
    """CPU seconds each process used in the window (``loadgen``: the generator's)."""
    cpu_window: float
    """Wall seconds between the two CPU samples."""
    requests_per_call: float | None = None
    load: str = ""
    """How the load was made: driver and connections or rate."""
    extra: dict[str, Any] = field(default_factory=dict)


def percentiles_ms(latencies: list[float]) -> tuple[float, float, float, float]:
    """p50, p99, p99.9 and mean of latencies in seconds, in ms."""
    if not latencies:
        nan = float("nan")
        return nan, nan, nan, nan
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(int(p * len(ordered)), len(ordered) - 1)] * 1000

    return pct(0.50), pct(0.99), pct(0.999), statistics.fmean(ordered) * 1000


def row(name: str, label: str, batch: int, m: Measured) -> Row:
    """One phase's line, as the JSON results keep it."""
    p50, p99, p999, mean = m.latencies_ms
    return {
        "phase": name,
        "label": label,
        "load": m.load,
        "batch": batch,
        "requests_per_s": m.requests / m.seconds,
        "events_per_s": m.events / m.seconds,
        "p50_ms": p50,
        "p99_ms": p99,
        "p999_ms": p999,
        "mean_ms": mean,
        "errors": m.errors,
        "requests_per_call": m.requests_per_call,
        "cpu_percent": {n: 100 * used / m.cpu_window for n, used in m.cpu.items()},
        # Over the events the load generator counted in its window (the CPU window is
        # the same span, give or take the samples' few milliseconds).
        "cpu_us_per_event": {
            n: 1e6 * used / m.events if m.events else float("nan") for n, used in m.cpu.items()
        },
        **m.extra,
    }


def check(
    name: str, value: float, target: float, stretch: float | None = None, most: bool = False
) -> Check:
    """A figure against its target: at least target (or at most, when ``most``)."""

    def meets(bound: float) -> bool:
        return value <= bound if most else value >= bound

    sign = "≤" if most else "≥"
    return {
        "name": name,
        "value": value,
        "target": f"{sign} {target:g}",
        "stretch": None if stretch is None else f"{sign} {stretch:g}",
        "met": meets(target),
        "stretch_met": None if stretch is None else meets(stretch),
    }


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def phase_table(rows: list[Row]) -> str:
    """The phases as a Markdown table."""
    lines = [
        "| phase | what | load | events/s | p50 / p99 / p99.9 ms | errors | req/call"
        " | CPU % gen / valkey / server / bridge / naive | µs per event: gen / bridge / server |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = " / ".join(f"{r['cpu_percent'].get(n, 0):.0f}" for n in PROCESSES)
        per_event = " / ".join(
            f"{r['cpu_us_per_event'].get(n, float('nan')):.0f}"
            for n in ("loadgen", "bridge", "server")
        )
        per_call = f"{r['requests_per_call']:.1f}" if r.get("requests_per_call") else "-"
        latency = f"{_ms(r['p50_ms'])} / {_ms(r['p99_ms'])} / {_ms(r['p999_ms'])}"
        lines.append(
            f"| {r['phase']} | {r['label']} | {r['load']} | {r['events_per_s']:,.0f}"
            f" | {latency} | {sum(r['errors'].values())} | {per_call} | {cpu} | {per_event} |"
        )
    return "\n".join(lines)


def check_table(checks: list[Check]) -> str:
    """The checks as a Markdown table."""
    lines = ["| check | value | target | stretch |", "|---|---:|---|---|"]
    for c in checks:
        verdict = "met" if c["met"] else "**missed**"
        stretch = "-"
        if c["stretch"] is not None:
            stretch = f"{c['stretch']} {'met' if c['stretch_met'] else 'missed'}"
        lines.append(f"| {c['name']} | {c['value']:.2f} | {c['target']} {verdict} | {stretch} |")
    return "\n".join(lines)


def errors_line(rows: list[Row]) -> str | None:
    """The phases that saw errors, and which, or None."""
    seen = [f"{r['phase']}: {r['errors']}" for r in rows if r["errors"]]
    return "errors: " + "; ".join(seen) if seen else None
