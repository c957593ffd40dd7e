"""Headless Chromium driven over the DevTools protocol, and pages served from other origins."""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class DevToolsError(RuntimeError):
    """A DevTools command failed, or a page's script threw."""


class Session:
    """One DevTools websocket: commands answered by id, events kept for whoever waits."""

    def __init__(self, url: str) -> None:
        self._stack = ExitStack()
        self._ws: ClientConnection = self._stack.enter_context(
            connect(url, max_size=None, open_timeout=10)
        )
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 20, **params: Any) -> dict[str, Any]:
        """Send a command; its result (events arriving meanwhile are kept)."""
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.0, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise DevToolsError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            if "method" in message:
                self.events.append(message)

    def wait_for(
        self, method: str, matches: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        """The params of the first event ``method`` (kept or to come) that ``matches``."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method and matches(event["params"]):
                    params: dict[str, Any] = event["params"]
                    return params
            left = deadline - time.monotonic()
            if left <= 0:
                raise DevToolsError(f"no {method} event within {timeout}s")
            message = json.loads(self._ws.recv(timeout=left))
            if "method" in message:
                self.events.append(message)

    def close(self) -> None:
        """Close the websocket."""
        self._stack.close()


class Page(Session):
    """A browser tab."""

    def open(self, url: str) -> None:
        """Load ``url`` and wait until it has loaded."""
        self.call("Page.enable")
        self.call("Network.enable")  # so that requests and their answers are seen as events
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired", lambda _: True)

    def evaluate(self, expression: str) -> Any:
        """Run JavaScript in the page, awaiting a promise; its JSON-able value."""
        result = self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise DevToolsError(f"script threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def response_to(self, url_prefix: str, method: str = "POST") -> dict[str, Any]:
        """The response (status, headers) the page got for its request to ``url_prefix``."""
        sent = self.wait_for(
            "Network.requestWillBeSent",
            lambda p: (
                p["request"]["url"].startswith(url_prefix) and p["request"]["method"] == method
            ),
        )
        received = self.wait_for(
            "Network.responseReceived", lambda p: p["requestId"] == sent["requestId"]
        )
        response: dict[str, Any] = received["response"]
        return response


class Chromium:
    """A headless Chromium process with DevTools on a port it picks itself."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.profile = profile
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.browser = Session(self._browser_url())

    def _browser_url(self) -> str:
        # Chromium writes the port it bound, and the browser's websocket path, here.
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and len(active.read_text().split()) == 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DevToolsError("chromium did not start (no DevToolsActivePort)")
            time.sleep(0.05)
        port, path = active.read_text().split()
        self.port = int(port)
        return f"ws://127.0.0.1:{port}{path}"

    def new_page(self) -> Page:
        """A fresh tab (about:blank)."""
        target = self.browser.call("Target.createTarget", url="about:blank")["targetId"]
        return Page(f"ws://127.0.0.1:{self.port}/devtools/page/{target}")

    def close(self) -> None:
        """Quit the browser."""
        self.browser.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class PageServer:
    """Serves one HTML page at / on its own loopback port: an origin of its own."""

    def __init__(self, html: str) -> None:
        body = html.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
