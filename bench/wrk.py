"""The HTTP phases' closed-loop driver: `wrk` (Debian's package) with a generated Lua script.

wrk is a C load generator (LuaJIT for the request bodies), so at a few thousand
requests a second it takes a few percent of a core where the Python generator took
a large share of the box's two. The script carries the workload's ~600-byte events
and, like bench.workload, gives 30% of events a fresh ``deduplication_id`` (5% of
those repeat a recent one); its ``done`` prints one JSON line that run_wrk reads.

wrk is closed-loop only (Debian has no wrk2), so the open-loop phase E stays with the
Python generator.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.workload import DEDUP_SHARE, REPEAT_SHARE, Batches

TIMEOUT_SECONDS = 10
"""A request unanswered this long counts as a timeout error."""

_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50_us":%.1f,"p99_us":%.1f,"p999_us":%.1f,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.mean))
end
"""

_REQUEST = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local counter, recent, recent_n, at = 0, {}, 0, 0
local headers

function init(args)
  math.randomseed(seed + 7919 * tid)
  headers = {["Content-Type"] = "application/json", ["X-API-KEY"] = api_key}
end

local function dedup_id()
  if recent_n > 0 and math.random() < repeat_share then
    return recent[math.random(math.min(recent_n, 1000))]
  end
  counter = counter + 1
  local id = nonce .. "-" .. tid .. "-" .. counter
  recent[(recent_n % 1000) + 1] = id
  recent_n = recent_n + 1
  return id
end

function request()
  local parts = {}
  for i = 1, batch do
    local event = events[at + 1]
    at = (at + 1) % #events
    if math.random() < dedup_share then
      parts[i] = event .. ',"deduplication_id":"' .. dedup_id() .. '"}'
    else
      parts[i] = event .. "}"
    end
  end
  return wrk.format("POST", path, headers, "[" .. table.concat(parts, ",") .. "]")
end
"""


def wrk_binary() -> str | None:
    """wrk's path, or None when it is not installed."""
    return shutil.which("wrk")


def lua_string(text: str) -> str:
    """text as a Lua long string literal."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def lua_script(batches: Batches, batch: int, api_key: str, nonce: str, seed: int) -> str:
    """The script wrk runs: the events (each without its closing brace), the settings,
    the body builder and the summary."""
    events = ",\n".join(lua_string(e[:-1].decode()) for e in batches.json_events)
    return (
        f"events = {{\n{events}\n}}\n"
        f"batch = {batch}\npath = {lua_string('/create-events')}\n"
        f"api_key = {lua_string(api_key)}\nnonce = {lua_string(nonce)}\n"
        f"seed = {seed}\ndedup_share = {DEDUP_SHARE}\nrepeat_share = {REPEAT_SHARE}\n"
        + _REQUEST
        + _DONE
    )


@dataclass
class WrkRun:
    """What one wrk run measured, and the CPU wrk itself used."""

    requests: int
    seconds: float
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    cpu_seconds: float


def run_wrk(url: str, script: Path, connections: int, threads: int, seconds: float) -> WrkRun:
    """Run wrk once and read its summary (a non-zero exit or no summary raises)."""
    binary = wrk_binary()
    assert binary is not None
    argv = [
        binary, f"--threads={min(threads, connections)}", f"--connections={connections}",
        f"--duration={max(round(seconds), 1)}s", f"--timeout={TIMEOUT_SECONDS}s",
        f"--script={script}", f"{url}/create-events",
    ]  # fmt: skip
    # wrk is reaped here, so its CPU is in this process's children's usage after the run.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = [line for line in done.stdout.splitlines() if line.startswith("WRK_JSON ")]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-500:]}{done.stderr}")
    summary = json.loads(found[-1].removeprefix("WRK_JSON "))
    errors = {
        f"wrk {kind}": summary[kind]
        for kind in ("connect", "read", "write", "status", "timeout")
        if summary[kind]
    }
    return WrkRun(
        requests=summary["requests"] - summary["status"],
        seconds=summary["duration_us"] / 1e6,
        errors=errors,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        p999_ms=summary["p999_us"] / 1000,
        mean_ms=summary["mean_us"] / 1000,
        cpu_seconds=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )


def write_script(workdir: Path, name: str, batch: int, api_key: str, seed: int) -> Path:
    """A phase's script file, with its own events and deduplication ids."""
    path = workdir / f"{name}.lua"
    nonce = f"{name}-{os.getpid()}-{seed}"
    path.write_text(lua_script(Batches(seed, 0), batch, api_key, nonce, seed))
    return path
