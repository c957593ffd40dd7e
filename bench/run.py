"""`make bench`: start everything fresh, measure A-E and W1, print the table and ratios, write JSON.

python -m bench.run [--quick] [--server-workers N] [--bridge-workers N] [--uds]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench import replication
from bench.loadgen import Job, Result, run_job
from bench.workload import TENANTS
from events_server.server.auth import new_key
from tests.harness.keys import store_key
from tests.harness.valkey import ValkeyProcess, free_port

RESULTS = Path(__file__).parent / "results" / "latest.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = {  # ratio: minimum, from the performance issues
    "B100/A": 0.8,
    "C100/A": 0.5,
    "C100/D100": 5.0,
    "C1/D1": 2.0,
    "W1/D1": 3.0,
}
P99_TARGET_MS = 10.0
P999_TARGET_MS = 25.0

WS_CONNECTIONS = 32
WS_IN_FLIGHT = 8
"""W1: the storefront workload on the WebSocket, one event per frame."""


def tree_cpu_seconds(pid: int) -> float:
    """CPU (user+system) of a process and all its descendants so far."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def wait_http(url: str, seconds: float = 30) -> None:
    """Wait until url answers 200."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready")
        time.sleep(0.1)


@dataclass
class Phase:
    """One measured run: name, kind of load, batch size, and where it goes."""

    name: str
    label: str
    kind: str
    target: str
    batch: int
    rate: float | None = None
    concurrency: int | None = None
    """In flight in all (default: --concurrency); WebSocket: connections x in_flight."""
    in_flight: int = 1
    """WebSocket: frames in flight per connection."""


def summarize(phase: Phase, results: list[Result], cpu: dict[str, float]) -> dict[str, Any]:
    """Add up the load processes' results for one phase."""
    seconds = results[0].seconds
    latencies = sorted(x for r in results for x in r.latencies)
    errors: dict[str, int] = {}
    for r in results:
        for kind, count in r.errors.items():
            errors[kind] = errors.get(kind, 0) + count

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(int(p * len(latencies)), len(latencies) - 1)] * 1000

    return {
        "phase": phase.name,
        "label": phase.label,
        "batch": phase.batch,
        "rate": phase.rate,
        "requests_per_s": sum(r.requests for r in results) / seconds,
        "events_per_s": sum(r.events for r in results) / seconds,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "errors": errors,
        "cpu_percent": {
            "loadgen": 100 * sum(r.cpu_seconds for r in results) / seconds,
            **{name: 100 * used / seconds for name, used in cpu.items()},
        },
    }


class Bench:
    """The processes under test, started once per run against one fresh Valkey."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.valkey = ValkeyProcess(workdir / "valkey")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.grpc_port = free_port()
        self.grpc_target = (
            f"unix:{workdir / 'events.sock'}" if args.uds else f"127.0.0.1:{self.grpc_port}"
        )
        self.bridge_port = free_port()
        self.naive_port = free_port()
        self.key, self.secret = new_key(TENANTS, label="bench")

    def start(self) -> None:
        """Valkey, events-server, rest-bridge and the naive peer, each ready to serve."""
        self.valkey.start()
        env = {
            **os.environ,
            "REDIS_URL": self.valkey.url,
            "EVENTS_LOG_LEVEL": "WARNING",
            "EVENTS_METRICS_ADDR": "127.0.0.1:0",
        }
        py = sys.executable
        workers = (
            ["--workers", str(self.args.server_workers)] if self.args.server_workers > 1 else []
        )
        bridge_workers = (
            ["--workers", str(self.args.bridge_workers)] if self.args.bridge_workers > 1 else []
        )

        def spawn(*argv: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen([py, "-m", *argv], stdout=subprocess.DEVNULL, env=env)

        self.procs["server"] = spawn(
            "events_server", "serve", "--grpc-addr", self.grpc_target, *workers
        )
        self.procs["bridge"] = spawn(
            "rest_bridge", "--grpc-target", self.grpc_target,
            "--port", str(self.bridge_port), "--log-level", "warning", *bridge_workers,
        )  # fmt: skip
        self.procs["naive"] = spawn(
            "uvicorn", "bench.naive_peer:app", "--port", str(self.naive_port),
            "--log-level", "warning", "--no-access-log", *bridge_workers,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{self.bridge_port}/readyz")
        wait_http(f"http://127.0.0.1:{self.naive_port}/openapi.json")

    def stop(self) -> None:
        """Stop everything this run started."""
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.valkey.stop()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process under test (with its workers)."""
        assert self.valkey.proc is not None
        pids = {"valkey": self.valkey.proc.pid, **{n: p.pid for n, p in self.procs.items()}}
        return {name: tree_cpu_seconds(pid) for name, pid in pids.items()}

    def phases(self) -> list[Phase]:
        """A to D; E is added once C1's throughput is known."""
        bridge = f"http://127.0.0.1:{self.bridge_port}"
        naive = f"http://127.0.0.1:{self.naive_port}"
        return [
            Phase("A", "ceiling: our script, direct", "script", self.valkey.url, 100),
            Phase("B100", "gRPC CreateEvents", "grpc", self.grpc_target, 100),
            Phase("B1", "gRPC CreateEvents", "grpc", self.grpc_target, 1),
            Phase(
                "W1",
                f"bridge WebSocket, {WS_CONNECTIONS} sockets x {WS_IN_FLIGHT}",
                "ws",
                bridge,
                1,
                concurrency=WS_CONNECTIONS * WS_IN_FLIGHT,
                in_flight=WS_IN_FLIGHT,
            ),
            Phase("C100", "bridge POST /create-events", "http", bridge, 100),
            Phase("C1", "bridge POST /create-events", "http", bridge, 1),
            Phase("D100", "naive peer (baseline)", "http", naive, 100),
            Phase("D1", "naive peer (baseline)", "http", naive, 1),
        ]

    def measure(self, pool: Any, phase: Phase) -> dict[str, Any]:
        """Run one phase from every load process at once and add up what they saw."""
        redis.Redis.from_url(self.valkey.url).flushall()
        store_key(redis.Redis.from_url(self.valkey.url), "ev", self.key)
        procs = self.args.loadgen_procs
        jobs = [
            Job(
                kind=phase.kind,
                target=phase.target,
                batch=phase.batch,
                concurrency=max((phase.concurrency or self.args.concurrency) // procs, 1),
                in_flight=phase.in_flight,
                seconds=self.args.seconds,
                warmup=self.args.warmup,
                worker=worker,
                seed=zlib.crc32(f"{phase.name}-{worker}".encode()),
                rate=None if phase.rate is None else phase.rate / procs,
                api_key=self.secret,
            )
            for worker in range(procs)
        ]
        pending = pool.map_async(run_job, jobs)
        time.sleep(self.args.warmup)
        before, calls_before = self.cpu(), self.gathered()
        time.sleep(self.args.seconds)
        after, calls_after = self.cpu(), self.gathered()
        results: list[Result] = pending.get(timeout=self.args.seconds * 4 + 60)
        cpu = {name: after[name] - before[name] for name in after}
        row = summarize(phase, results, cpu)
        calls = calls_after[0] - calls_before[0]
        row["requests_per_call"] = (calls_after[1] - calls_before[1]) / calls if calls else None
        return row

    def gathered(self) -> tuple[float, float]:
        """The bridge's gathered calls so far, and the requests they carried (its /metrics)."""
        found = {
            "events_gathered_call_requests_count": 0.0,
            "events_gathered_call_requests_sum": 0.0,
        }
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.bridge_port}/metrics", timeout=5
            ) as answer:
                for line in answer.read().decode().splitlines():
                    name, _, figure = line.partition(" ")
                    if name in found:
                        found[name] += float(figure)
        except OSError:
            pass
        return found["events_gathered_call_requests_count"], found[
            "events_gathered_call_requests_sum"
        ]


def print_table(rows: list[dict[str, Any]], ratios: dict[str, dict[str, Any]]) -> None:
    """The results as a table a person can read."""
    names = ["loadgen", "valkey", "server", "bridge", "naive"]
    print()
    cpu_head = " ".join(f"{n:>7}" for n in names)
    print(
        f"{'phase':5} {'what':32} {'batch':>5} {'events/s':>10} {'req/s':>8} {'p50 ms':>7}"
        f" {'p99 ms':>7} {'p99.9':>7} {'errors':>6} {'req/call':>8}  CPU% {cpu_head}"
    )
    for row in rows:
        cpu = " ".join(f"{row['cpu_percent'].get(n, 0):>7.0f}" for n in names)
        per_call = f"{row['requests_per_call']:.1f}" if row.get("requests_per_call") else "-"
        print(
            f"{row['phase']:5} {row['label'][:32]:32} {row['batch']:>5}"
            f" {row['events_per_s']:>10,.0f} {row['requests_per_s']:>8,.0f}"
            f" {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['p999_ms']:>7.2f}"
            f" {sum(row['errors'].values()):>6} {per_call:>8}       {cpu}"
        )
    print()
    for name, ratio in ratios.items():
        verdict = "met" if ratio["met"] else "MISSED"
        print(f"{name:>10} = {ratio['value']:.2f}  (target {ratio['target']}: {verdict})")


def main() -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short phases (under 60 s in all)")
    parser.add_argument("--seconds", type=float, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each phase")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight, in all")
    parser.add_argument("--loadgen-procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--server-workers", type=int, default=1)
    parser.add_argument("--bridge-workers", type=int, default=1)
    parser.add_argument("--uds", action="store_true", help="bridge -> server over a Unix socket")
    parser.add_argument("--only", help="comma-separated phases to run (e.g. A,B100)")
    args = parser.parse_args()
    args.seconds = args.seconds or (4.0 if args.quick else 12.0)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        bench = Bench(args, Path(tmp))
        bench.start()
        rows: list[dict[str, Any]] = []
        try:
            with multiprocessing.get_context("spawn").Pool(args.loadgen_procs) as pool:
                phases = bench.phases()
                if args.only:
                    phases = [p for p in phases if p.name in args.only.split(",")]
                for phase in phases:
                    rows.append(bench.measure(pool, phase))
                    done = rows[-1]
                    print(
                        f"{phase.name}: {done['events_per_s']:,.0f} events/s,"
                        f" p99 {done['p99_ms']:.2f} ms, errors {done['errors']}",
                        flush=True,
                    )
                by_name = {r["phase"]: r for r in rows}
                if "C1" in by_name:
                    rate = by_name["C1"]["requests_per_s"] * 0.5
                    bridge = f"http://127.0.0.1:{bench.bridge_port}"
                    label = "bridge at 50% of C1 max"
                    rows.append(bench.measure(pool, Phase("E", label, "http", bridge, 1, rate)))
                    print(f"E: p50 {rows[-1]['p50_ms']:.2f} ms, p99 {rows[-1]['p99_ms']:.2f} ms",
                          flush=True)  # fmt: skip
        finally:
            bench.stop()

    by_name = {r["phase"]: r for r in rows}
    ratios: dict[str, dict[str, Any]] = {}
    for name, target in TARGETS.items():
        top, bottom = name.split("/")
        if top in by_name and bottom in by_name:
            value = by_name[top]["events_per_s"] / by_name[bottom]["events_per_s"]
            ratios[name] = {"value": value, "target": target, "met": value >= target}
    if "E" in by_name:
        for name, field, most in (
            ("E p99 ms", "p99_ms", P99_TARGET_MS),
            ("E p99.9 ms", "p999_ms", P999_TARGET_MS),
        ):
            figure = by_name["E"][field]
            ratios[name] = {"value": figure, "target": f"<= {most}", "met": figure <= most}
    print_table(rows, ratios)
    confirmation = replication.phase(args)  # R: what replica confirmation costs

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "settings": {k: v for k, v in vars(args).items()},
                "phases": rows,
                "ratios": ratios,
                "replication": confirmation,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
