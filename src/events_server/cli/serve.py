"""``events-server serve``: one server process, or a supervisor of forked workers."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
from typing import Any

import uvloop

from events_server.ops.exposition import shared_by_workers, values_changed_on_one_thread
from events_server.ops.settings import add_settings_flags
from events_server.server.app import create_server
from events_server.server.settings import Settings
from events_server.server.tls import TlsFilesError

log = logging.getLogger("events_server")


def add_commands(commands: Any) -> None:
    """The ``serve`` command."""
    serve_cmd = commands.add_parser("serve", help="run the gRPC server")
    add_settings_flags(serve_cmd, Settings, Settings.model_fields)
    serve_cmd.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT."""
    if settings.workers > 1:
        with shared_by_workers():
            return serve_workers(settings)
    values_changed_on_one_thread()
    uvloop.run(serve(settings))
    return 0


async def serve(settings: Settings) -> None:
    """Run the gRPC server until SIGTERM or SIGINT, then drain gracefully."""
    try:
        # The metrics port is taken before the gRPC one: a second server on this host
        # fails here, before it has bound anything a client could reach.
        server, port = await create_server(settings)
    except OSError as exc:  # the metrics port
        print(
            f"events-server: cannot serve metrics on {settings.metrics_addr}: {exc}"
            " (another events-server on this host? give it EVENTS_METRICS_ADDR=127.0.0.1:0"
            " or another port)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    except TlsFilesError as exc:
        print(f"events-server: TLS: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except RuntimeError as exc:  # gRPC's own: the gRPC port
        print(f"events-server: cannot listen on {settings.grpc_addr}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    await server.start()
    if server.metrics_endpoint is not None:
        host = settings.metrics_addr.rpartition(":")[0]
        url = f"http://{host}:{server.metrics_endpoint.port}/metrics"
        log.info("metrics on %s", url, extra={"metrics_url": url})
    # Everything made so far lives as long as the process: keep it out of the
    # cyclic GC: a full pass over it takes ~25 ms here, a latency spike under load.
    gc.freeze()
    address = settings.grpc_addr
    if not address.startswith("unix:"):
        address = f"{address.rpartition(':')[0]}:{port}"
    # Tests and `make run` read this line to learn the port when it was 0. One write of the
    # whole line: workers share stdout, and print() writes the text and its newline apart,
    # so two workers' lines could run together (a pipe write under 4 KiB is atomic).
    sys.stdout.flush()  # whatever was printed before stays before
    os.write(
        sys.stdout.fileno(), f"events-server listening on {address} (pid {os.getpid()})\n".encode()
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", settings.shutdown_grace_seconds)
    await server.stop()
    log.info("stopped")


def _die_with_parent() -> None:
    """In a forked worker: get SIGTERM (and drain) if the supervising parent dies."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def serve_workers(settings: Settings) -> int:
    """Fork settings.workers servers sharing one port (SO_REUSEPORT); wait for them all."""
    # Fork before any gRPC object exists: gRPC's threads and polling state do
    # not survive a fork. Each worker builds its own server, channel and loop.
    children: set[int] = set()
    for index in range(settings.workers):
        # One listener for metrics: the first worker. In multiprocess mode it
        # reports the figures of all of them.
        worker = settings if index == 0 else settings.model_copy(update={"metrics_addr": ""})
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            code = 1
            try:
                uvloop.run(serve(worker))
                code = 0
            except KeyboardInterrupt:
                code = 130
            finally:
                os._exit(code)
        children.add(pid)

    def stop_all(signum: int, _frame: object) -> None:
        for child in children:
            os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    result = 0
    while children:
        pid, status = os.wait()
        children.discard(pid)
        if (code := os.waitstatus_to_exitcode(status)) != 0:
            # One worker gone means a smaller server than configured: stop, and let
            # the supervisor (systemd, Kubernetes) restart the whole set.
            log.error("worker %d exited with %d: stopping the others", pid, code)
            result = 1
            stop_all(signal.SIGTERM, None)
    return result
