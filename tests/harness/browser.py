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
from pathlib import Path
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


class StaticSite:
    """Serves fixed files from a loopback port of its own: an origin of its own.

    ``routes`` maps a path to (what to serve, its Content-Type); bytes are served as
    they are, a Path is read on each request. Anything else is 404 (204 for the
    favicon, so a page's console stays clean).
    """

    def __init__(self, routes: dict[str, tuple[bytes | Path, str]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                source, content_type = routes.get(self.path.split("?")[0], (b"", ""))
                if not content_type:
                    self.send_response(204 if self.path == "/favicon.ico" else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = source.read_bytes() if isinstance(source, Path) else source
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
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


class PageServer(StaticSite):
    """Serves one HTML page at /."""

    def __init__(self, html: str) -> None:
        super().__init__({"/": (html.encode(), "text/html; charset=utf-8")})


@contextmanager
def page_server(html: str) -> Iterator[PageServer]:
    """A PageServer of ``html``, stopped on the way out."""
    server = PageServer(html)
    try:
        yield server
    finally:
        server.close()
