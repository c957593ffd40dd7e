"""`make bench`: start everything fresh, measure every phase, print the tables, write JSON.

python -m bench.run [--quick] [--only C1@16,D1@16] [--server-workers N] [--bridge-workers N]
                    [--uds] [--python-http] [--log-level L] [--access-log-sample S]

The services run with their default log settings (INFO, the default access-line sample)
unless the last two options say otherwise; their log lines go to files, as to a collector.

The HTTP phases C and D are driven by wrk when it is installed (`apt-get install wrk`),
else by the Python generator, with a warning: it takes a large share of the two cores
and understates both services. E (open loop; wrk is closed-loop and Debian has no
wrk2) is bench.httpload's, W1 bench.wsload's, A and B the Python generator's. Extra
phases kept in modules of their own join through EXTRAS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import replication
from bench.phases import Phase, Runner
from bench.report import Check, Row, check, check_table, errors_line, phase_table, row
from bench.services import Bench, log_settings
from bench.wrk import wrk_binary

RESULTS = Path(__file__).parent / "results" / "latest.json"

WS_CONNECTIONS = 32
WS_IN_FLIGHT = 8
"""W1: the storefront workload on the WebSocket, one event per frame."""

HTTP_CONNECTIONS = (16, 64)
"""C1 and D1 run at each; C100 and D100 at the first."""

ExtraPhase = Callable[[argparse.Namespace], dict[str, Any] | None]
EXTRAS: dict[str, ExtraPhase] = {"R": replication.phase}
"""Optional phases in modules of their own, by phase name, e.g. ``{"R": replication.phase}``.
Each runs after the tables, once the services above have stopped (it starts what it
needs), is given the options (--seconds, --warmup, --quick...), prints its own lines,
and returns what the JSON results keep under its name (None: nothing). ``--only R``
runs one alone, ``--skip R`` leaves it out."""


def phases(bench: Bench) -> list[Phase]:
    """Every phase but E (which needs C1's throughput) and the extras."""
    bridge, naive, grpc = bench.bridge_url, bench.naive_url, bench.grpc_target
    low, high = HTTP_CONNECTIONS
    ws = f"bridge WebSocket, {WS_CONNECTIONS} sockets x {WS_IN_FLIGHT}"
    return [
        Phase("A", "ceiling: our script, direct", "script", bench.valkey.url, 100),
        Phase("B100", "gRPC CreateEvents", "grpc", grpc, 100),
        Phase("B1", "gRPC CreateEvents", "grpc", grpc, 1),
        Phase("W1", ws, "ws", bridge, 1, WS_CONNECTIONS, in_flight=WS_IN_FLIGHT),
        Phase("C100", "bridge POST /create-events", "http", bridge, 100, low),
        Phase(f"C1@{low}", "bridge POST /create-events", "http", bridge, 1, low),
        Phase(f"C1@{high}", "bridge POST /create-events", "http", bridge, 1, high),
        Phase("D100", "naive peer (baseline)", "http", naive, 100, low),
        Phase(f"D1@{low}", "naive peer (baseline)", "http", naive, 1, low),
        Phase(f"D1@{high}", "naive peer (baseline)", "http", naive, 1, high),
    ]


def checks(rows: list[Row]) -> list[Check]:
    """Every ratio and figure that has a target, from this run's rows."""
    by = {r["phase"]: r for r in rows}

    def rate(name: str) -> float:
        return float(by[name]["events_per_s"])

    found: list[Check] = []
    for name, top, bottom, target in (("B100/A", "B100", "A", 0.8), ("C100/A", "C100", "A", 0.5)):
        if top in by and bottom in by:
            found.append(check(name, rate(top) / rate(bottom), target))
    if "C100" in by and "D100" in by:
        found.append(check("C100/D100", rate("C100") / rate("D100"), 5, 8))
    for conns in HTTP_CONNECTIONS:
        c1, d1 = f"C1@{conns}", f"D1@{conns}"
        if c1 in by and d1 in by:
            found.append(check(f"C1/D1 at {conns} connections", rate(c1) / rate(d1), 2, 3))
    d1s = [rate(f"D1@{n}") for n in HTTP_CONNECTIONS if f"D1@{n}" in by]
    if "W1" in by and d1s:
        found.append(check("W1/D1 (D1: the better of its two)", rate("W1") / max(d1s), 3))
    for conns in HTTP_CONNECTIONS:
        if (c1 := f"C1@{conns}") in by:
            per = by[c1]["cpu_us_per_event"]
            found.append(
                check(f"{c1} bridge + server CPU, µs/event", per["bridge"] + per["server"],
                      150, 100, most=True)
            )  # fmt: skip
    if "E" in by:
        found.append(check("E p99 ms", by["E"]["p99_ms"], 10, most=True))
        found.append(check("E p99.9 ms", by["E"]["p999_ms"], 25, most=True))
    return found


def describe_run(args: argparse.Namespace, load_before: float) -> str:
    """One line naming the run: when, which commit, how busy the box was, which driver."""
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    driver = "wrk" if args.http_driver == "wrk" else "the Python generator (no wrk)"
    return (
        f"run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit},"
        f" {os.cpu_count()} CPUs, load average {load_before:.1f} before and"
        f" {os.getloadavg()[0]:.1f} after, C/D driven by {driver},"
        f" {args.seconds:g} s measured per phase after {args.warmup:g} s warm-up,"
        f" services at {log_settings(args)}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short phases (under 60 s in all)")
    parser.add_argument("--seconds", type=float, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each phase")
    parser.add_argument("--concurrency", type=int, default=32, help="A, B: requests in flight")
    parser.add_argument("--loadgen-procs", type=int, default=2, help="Python generator processes")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk's threads")
    parser.add_argument("--python-http", action="store_true", help="C, D without wrk")
    parser.add_argument("--server-workers", type=int, default=1)
    parser.add_argument("--bridge-workers", type=int, default=1)
    parser.add_argument("--uds", action="store_true", help="bridge -> server over a Unix socket")
    parser.add_argument("--log-level", help="both services' log level (default: theirs)")
    parser.add_argument(
        "--access-log-sample",
        type=float,
        help="both services' share of successful access lines written (default: theirs)",
    )
    parser.add_argument("--only", help="comma-separated phases to run (e.g. A,C1@16,E)")
    parser.add_argument("--skip", help="comma-separated phases to leave out")
    args = parser.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 12.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)
    args.http_driver = "wrk" if wrk_binary() and not args.python_http else "python"
    return args


def wanted(args: argparse.Namespace, name: str) -> bool:
    """Whether --only and --skip leave phase name in."""
    if args.only and name not in args.only.split(","):
        return False
    return not (args.skip and name in args.skip.split(","))


def main() -> int:
    """Run the benchmark."""
    args = parse_args()
    warn_without_wrk(args)
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        bench = Bench(args, Path(tmp))
        bench.start()
        try:
            with multiprocessing.get_context("spawn").Pool(args.loadgen_procs) as pool:
                runner = Runner(bench, args, pool, Path(tmp))
                for phase in [p for p in phases(bench) if wanted(args, p.name)]:
                    rows.append(row(phase.name, phase.label, phase.batch, runner.measure(phase)))
                    report_progress(rows[-1])
                c1 = [r["requests_per_s"] for r in rows if r["phase"].startswith("C1@")]
                if c1 and wanted(args, "E"):
                    rate = max(c1) * 0.5
                    label = "bridge, open loop at 50% of C1's best"
                    e = Phase("E", label, "http", bench.bridge_url, 1, rate=rate)
                    rows.append(row(e.name, e.label, e.batch, runner.measure(e)))
                    report_progress(rows[-1])
        finally:
            bench.stop()
    found = checks(rows)
    print()
    print(describe_run(args, load_before))
    print()
    print(phase_table(rows))
    print()
    print(check_table(found))
    if (errors := errors_line(rows)) is not None:
        print(f"\n{errors}")
    extras = {name: extra(args) for name, extra in EXTRAS.items() if wanted(args, name)}
    write_results(args, rows, found, extras)
    warn_without_wrk(args)
    return 0


def warn_without_wrk(args: argparse.Namespace) -> None:
    """Say, before and after the tables, when C and D were not driven by wrk."""
    if args.http_driver != "wrk" and not args.python_http:
        print(
            "\nWARNING: wrk is not installed (Debian, Ubuntu: apt-get install wrk), so the HTTP"
            " phases C and D fell back to the Python generator, which takes a large share of"
            " the cores and understates both services: their figures and ratios are not"
            " comparable with wrk's.",
            file=sys.stderr,
            flush=True,
        )


def report_progress(done: Row) -> None:
    """One line as each phase ends."""
    print(
        f"{done['phase']}: {done['events_per_s']:,.0f} events/s, p99 {done['p99_ms']:.2f} ms,"
        f" errors {done['errors']} ({done['load']})",
        flush=True,
    )


def write_results(
    args: argparse.Namespace, rows: list[Row], found: list[Check], extras: dict[str, Any]
) -> None:
    """bench/results/latest.json: the settings, every row, every check, the extras'."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = dict(vars(args))
    RESULTS.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "settings": settings,
                "phases": rows,
                "checks": found,
                "extras": extras,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten: {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
