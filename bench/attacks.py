"""The bridge's hardening attacks, measured: ``python -m bench.attacks`` (about a minute).

Starts Valkey, an events-server and a rest-bridge as child processes (the bridge under
``prlimit --nofile=1024``, the common default), then runs each attack of the hardening
issue beside legitimate traffic and prints what both got:

- 422 amplification: two connections posting a 1 KiB gzip of 340,000 empty objects in a
  loop, while a legitimate client posts one event at a time;
- 1,100 idle sockets, then a legitimate request;
- a 1 MB and a 64 MB request header (status, time, bridge memory);
- a request line sent a byte a second (when the bridge drops it);
- ``POST /create-events/?api_key=...`` (the trailing slash).

Everything runs on loopback; each phase is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from events_server.server.settings import Settings
from tests.harness.keys import create_key
from tests.harness.processes import ServerProcess, events_env, rss_kib
from tests.harness.valkey import ValkeyProcess, free_port

EMPTY_OBJECTS = b"[" + b",".join([b"{}"] * 340_000) + b"]"
BAD_VARIANTS = (
    b'[{"tenant":"shop-x","market":"us","type":"click","variant_ids":['
    + b",".join([b"[]"] * 330_000)
    + b"]}]"
)
LEGIT = [{"tenant": "shop-x", "market": "us", "type": "page_view", "user_id": "u-1"}]


def start_bridge(target: str, log: Path, nofile: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    prefix = ["prlimit", f"--nofile={nofile}:{nofile}"] if shutil.which("prlimit") else []
    with log.open("a") as out:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "rest_bridge", "--port", str(port),
             "--grpc-target", target, "--log-level", "WARNING"],
            stdout=out, stderr=out,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"bridge did not start; see {log}")


def legit(url: str, key: str, timeout: float = 5.0) -> tuple[int | str, float]:
    started = time.monotonic()
    try:
        answer = httpx.post(
            f"{url}/create-events", json=LEGIT, headers={"x-api-key": key}, timeout=timeout
        )
        status: int | str = answer.status_code
    except httpx.HTTPError as error:
        status = type(error).__name__
    return status, time.monotonic() - started


def paced_legit(url: str, key: str, seconds: float, rate: float = 20.0) -> str:
    """One-event POSTs at ``rate`` a second on one keep-alive connection: how they fared."""
    latencies: list[float] = []
    failed: list[int | str] = []
    with httpx.Client(base_url=url, timeout=5, headers={"x-api-key": key}) as client:
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            began = time.monotonic()
            try:
                status: int | str = client.post("/create-events", json=LEGIT).status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            if status == 200:
                latencies.append(time.monotonic() - began)
            else:
                failed.append(status)
            sent += 1
            time.sleep(max(0.0, start + sent / rate - time.monotonic()))
    latencies.sort()
    if not latencies:
        return f"0 of {sent} x 200, failed {failed[:3]}"
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return (
        f"{len(latencies)} of {sent} x 200 (p50 {p50:.0f} ms, p99 {p99:.0f} ms,"
        f" max {latencies[-1] * 1000:.0f} ms){f', failed {failed[:3]}' if failed else ''}"
    )


def amplification(url: str, key: str, seconds: float, name: str, raw: bytes) -> None:
    body = gzip.compress(raw, 9)
    seen: list[tuple[int | str, int, float]] = []
    stop = threading.Event()

    def attacker() -> None:
        headers = {"content-type": "application/json", "content-encoding": "gzip",
                   "x-api-key": key}  # fmt: skip
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    answer = client.post(f"{url}/create-events", content=body, headers=headers)
                    seen.append(
                        (answer.status_code, len(answer.content), time.monotonic() - started)
                    )
                except httpx.HTTPError as error:
                    seen.append((type(error).__name__, 0, time.monotonic() - started))

    threads = [threading.Thread(target=attacker) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    fared = paced_legit(url, key, seconds)
    stop.set()
    for thread in threads:
        thread.join(120)
    print(
        f"{name} ({len(body)} B gzip, 2 connections in a loop, {seconds:.0f} s):"
        f" attacker got {len(seen)} answers"
        f" (status {sorted({a[0] for a in seen}, key=str)},"
        f" largest body {max((a[1] for a in seen), default=0)} B,"
        f" slowest {max((a[2] for a in seen), default=0):.2f} s);"
        f" legit at 20/s: {fared}"
    )


def idle_sockets(url: str, key: str, count: int) -> None:
    port = int(url.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.settimeout(2)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        time.sleep(0.5)
        results = [legit(url, key) for _ in range(5)]
        still_open = 0
        for sock in held:
            sock.setblocking(False)
            try:
                still_open += sock.recv(1) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
        print(
            f"{count} idle sockets ({len(held)} connected, {still_open} still open):"
            f" 5 legit requests -> {[(s, round(t, 2)) for s, t in results]}"
        )
    finally:
        for sock in held:
            sock.close()


def big_header(url: str, key: str, size: int, pid: int) -> None:
    port = int(url.rsplit(":", 1)[1])
    before = rss_kib(pid)
    started = time.monotonic()
    status = "none"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (
            b"POST /create-events HTTP/1.1\r\nHost: x\r\nX-API-KEY: "
            + key.encode()
            + b"\r\nX-Big: "
        )

        def send() -> None:
            with contextlib.suppress(OSError):  # refused before the end
                sock.sendall(head + b"a" * size + b"\r\nContent-Length: 2\r\n\r\n[]")

        sender = threading.Thread(target=send)
        sender.start()
        try:
            first = sock.recv(65536)
            status = first.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
        except OSError as error:
            status = type(error).__name__
        took = time.monotonic() - started
        sender.join(60)
    after = rss_kib(pid)
    print(
        f"{size / 1e6:g} MB header: {status!r} in {took:.2f} s;"
        f" bridge RSS {before // 1024} -> {after // 1024} MiB;"
        f" legit then: {legit(url, key)[0]}"
    )


def slow_header(url: str, limit: float) -> None:
    port = int(url.rsplit(":", 1)[1])
    started = time.monotonic()
    verdict = "still open"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.5)
        for byte in b"POST /create-events HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            if time.monotonic() - started > limit:
                break
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(1024)
            except TimeoutError:
                continue
            except OSError as error:
                verdict = (
                    f"dropped ({type(error).__name__}) after {time.monotonic() - started:.1f} s"
                )
                break
            first = answer.split(b"\r\n", 1)[0].decode(errors="replace")
            verdict = f"answered {first!r} / closed after {time.monotonic() - started:.1f} s"
            break
    print(f"headers sent at ~2 bytes/s: {verdict} (watched {limit:.0f} s)")


def trailing_slash(url: str, key: str) -> None:
    answer = httpx.post(
        f"{url}/create-events/?api_key={key}", json=LEGIT, follow_redirects=False, timeout=5
    )
    location = answer.headers.get("location", "")
    print(
        f"POST /create-events/?api_key=KEY: {answer.status_code},"
        f" Location {'holds the key' if key in location else repr(location)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the 422 phase")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="attacks-"))
    valkey = ValkeyProcess(work / "valkey")
    valkey.start()
    settings = Settings(redis_url=valkey.url, key_prefix="atk", partitions=4)
    key = create_key(valkey.url, "atk", ["shop-x"])
    server = ServerProcess(
        events_env(settings, EVENTS_METRICS_ADDR="", EVENTS_LOG_LEVEL="WARNING"),
        work / "server.log",
    )
    target = server.start()
    bridge, url = start_bridge(target, work / "bridge.log", nofile=1024)
    try:
        print(f"legit alone: {legit(url, key)}")
        trailing_slash(url, key)
        big_header(url, key, 1_000_000, bridge.pid)
        big_header(url, key, 64_000_000, bridge.pid)
        slow_header(url, 20.0)
        idle_sockets(url, key, 1100)
        print(f"legit at 20/s alone: {paced_legit(url, key, 5)}")
        amplification(url, key, args.seconds, "340k empty objects", EMPTY_OBJECTS)
        amplification(url, key, args.seconds, "1 event of 330k bad variant ids", BAD_VARIANTS)
    finally:
        bridge.terminate()
        try:
            bridge.wait(15)
        except subprocess.TimeoutExpired:
            bridge.kill()
            bridge.wait(10)
        server.stop()
        valkey.kill()
        for name in ("bridge.log", "server.log"):
            log: Any = (work / name).read_text()[-1500:]
            print(f"{name} tail:\n{log}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
