"""Running one phase: the load from its driver (wrk, bench.wsload, bench.httpload or the
Python generator processes), every process's CPU sampled at the window's two ends."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.loadgen import Job, Result, run_job
from bench.report import Measured, percentiles_ms
from bench.services import Bench, cpu_seconds
from bench.wrk import run_wrk, write_script


@dataclass
class Phase:
    """One measured run: name, kind of load, batch size, and where it goes."""

    name: str
    label: str
    kind: str
    """"script" | "grpc" | "http" | "ws"."""
    target: str
    batch: int
    connections: int | None = None
    """In flight in all: HTTP connections, WebSockets (default: --concurrency)."""
    rate: float | None = None
    """Requests/s for an open-loop phase (bench.httpload)."""
    in_flight: int = 1
    """WebSocket: frames in flight per socket."""


class Runner:
    """Runs phases against a started Bench."""

    def __init__(self, bench: Bench, args: argparse.Namespace, pool: Any, workdir: Path) -> None:
        self.bench, self.args, self.pool, self.workdir = bench, args, pool, workdir
        self.use_wrk = args.http_driver == "wrk"

    def measure(self, phase: Phase) -> Measured:
        """The phase, from a fresh Valkey, by the driver it takes."""
        self.bench.fresh()
        if phase.kind == "ws":
            return self.websocket(phase)
        if phase.kind == "http" and phase.rate is not None:
            return self.open_loop(phase)
        if phase.kind == "http" and self.use_wrk:
            return self.wrk(phase)
        return self.python(phase)

    def _window(self) -> tuple[dict[str, float], tuple[float, float], float]:
        return self.bench.cpu(), self.bench.gathered(), time.monotonic()

    def _per_call(self, before: tuple[float, float], after: tuple[float, float]) -> float | None:
        calls = after[0] - before[0]
        return (after[1] - before[1]) / calls if calls else None

    def python(self, phase: Phase) -> Measured:
        """The Python generator: --loadgen-procs asyncio processes, closed loop."""
        args, procs = self.args, self.args.loadgen_procs
        jobs = [
            Job(
                kind=phase.kind,
                target=phase.target,
                batch=phase.batch,
                concurrency=max((phase.connections or args.concurrency) // procs, 1),
                seconds=args.seconds,
                warmup=args.warmup,
                worker=worker,
                seed=zlib.crc32(f"{phase.name}-{worker}".encode()),
                rate=None if phase.rate is None else phase.rate / procs,
                api_key=self.bench.secret,
            )
            for worker in range(procs)
        ]
        pending = self.pool.map_async(run_job, jobs)
        time.sleep(args.warmup)
        cpu0, calls0, t0 = self._window()
        time.sleep(args.seconds)
        cpu1, calls1, t1 = self._window()
        results: list[Result] = pending.get(timeout=args.seconds * 4 + 60)
        errors: dict[str, int] = {}
        for r in results:
            for kind, count in r.errors.items():
                errors[kind] = errors.get(kind, 0) + count
        cpu = {name: cpu1[name] - cpu0[name] for name in cpu1}
        cpu["loadgen"] = sum(r.cpu_seconds for r in results)
        load = f"python, {procs} x {max((phase.connections or args.concurrency) // procs, 1)}"
        return Measured(
            requests=sum(r.requests for r in results),
            events=sum(r.events for r in results),
            seconds=results[0].seconds,
            latencies_ms=percentiles_ms([x for r in results for x in r.latencies]),
            errors=errors,
            cpu=cpu,
            cpu_window=t1 - t0,
            requests_per_call=self._per_call(calls0, calls1),
            load=load,
        )

    def wrk(self, phase: Phase) -> Measured:
        """wrk: an unmeasured warm-up run, then the measured one."""
        connections = phase.connections or self.args.concurrency
        seed = zlib.crc32(phase.name.encode())
        script = write_script(self.workdir, phase.name, phase.batch, self.bench.secret, seed)
        threads = self.args.wrk_threads
        run_wrk(phase.target, script, connections, threads, self.args.warmup)
        cpu0, calls0, t0 = self._window()
        done = run_wrk(phase.target, script, connections, threads, self.args.seconds)
        cpu1, calls1, t1 = self._window()
        cpu = {name: cpu1[name] - cpu0[name] for name in cpu1}
        cpu["loadgen"] = done.cpu_seconds
        return Measured(
            requests=done.requests,
            events=done.requests * phase.batch,
            seconds=done.seconds,
            latencies_ms=(done.p50_ms, done.p99_ms, done.p999_ms, done.mean_ms),
            errors=done.errors,
            cpu=cpu,
            cpu_window=t1 - t0,
            requests_per_call=self._per_call(calls0, calls1),
            load=f"wrk, {connections} conn",
        )

    def websocket(self, phase: Phase) -> Measured:
        """bench.wsload: closed loop, in_flight frames out on each socket."""
        connections = phase.connections or self.args.concurrency
        return self.generator(
            "bench.wsload",
            phase,
            [f"--connections={connections}", f"--in-flight={phase.in_flight}"],
            f"ws, {connections} x {phase.in_flight} in flight",
        )

    def open_loop(self, phase: Phase) -> Measured:
        """bench.httpload: one-event POSTs at phase.rate."""
        assert phase.rate is not None
        return self.generator(
            "bench.httpload", phase, [f"--rate={phase.rate}"], f"open loop, {phase.rate:,.0f} req/s"
        )

    def generator(self, module: str, phase: Phase, options: list[str], load: str) -> Measured:
        """A bench.window generator in a process of its own, its CPU read from /proc like
        the others', sampled when it says its window opens and closes."""
        argv = [
            sys.executable, "-m", module, phase.target, self.bench.secret, *options,
            f"--seconds={self.args.seconds}", f"--warmup={self.args.warmup}",
            f"--seed={zlib.crc32(phase.name.encode())}",
        ]  # fmt: skip
        with subprocess.Popen(argv, stdout=subprocess.PIPE) as gen:
            assert gen.stdout is not None

            def expect(line: bytes) -> None:
                said = gen.stdout.readline() if gen.stdout else b""
                if said.strip() != line:
                    gen.kill()
                    raise RuntimeError(f"{module} said {said!r}, not {line!r}")

            expect(b"measuring")
            cpu0, calls0, t0 = self._window()
            gen0 = cpu_seconds(gen.pid)
            expect(b"stopped")
            cpu1, calls1, t1 = self._window()
            gen1 = cpu_seconds(gen.pid)
            out = gen.stdout.read()
        if gen.returncode != 0:
            raise RuntimeError(f"{module} exited {gen.returncode}")
        result = orjson.loads(out)
        cpu = {name: cpu1[name] - cpu0[name] for name in cpu1}
        cpu["loadgen"] = gen1 - gen0
        return Measured(
            requests=result["requests"],
            events=result["requests"] * phase.batch,
            seconds=result["seconds"],
            latencies_ms=percentiles_ms(result["latencies"]),
            errors=result["errors"],
            cpu=cpu,
            cpu_window=t1 - t0,
            requests_per_call=self._per_call(calls0, calls1),
            load=load,
        )
