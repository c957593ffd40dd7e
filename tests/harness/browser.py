"""A real browser: Debian's headless Chromium driven by Playwright, and pages of other origins.

Playwright is only the driver: it launches the system's ``chromium`` (no browser of
its own is downloaded). Each page comes from a loopback port of its own, so that every
call from it to the bridge is cross-origin.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from playwright.sync_api import Browser, sync_playwright

FLAGS = (
    "--no-sandbox",  # tests run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_binary() -> str:
    """Debian's chromium; the test is skipped where it is not installed, but never on CI."""
    binary = shutil.which("chromium")
    if binary is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the browser test (.ci/run installs it)")
        pytest.skip(message)
    return binary


@contextmanager
def headless_chromium() -> Iterator[Browser]:
    """The system's Chromium, headless, under Playwright; closed on the way out."""
    binary = chromium_binary()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


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


@contextmanager
def page_server(html: str) -> Iterator[PageServer]:
    """A PageServer of ``html``, stopped on the way out."""
    server = PageServer(html)
    try:
        yield server
    finally:
        server.close()
