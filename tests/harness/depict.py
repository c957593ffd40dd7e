"""Depict's published storefront client for a real-browser test: its bundle, its page, a TLS bridge.

The bundle is ``tests/harness/storefront`` (``@depict-ai/dpc`` unchanged, see NOTES.md there)
built with ``npm ci`` and ``node build.mjs``. The client opens
``wss://ws.depict.ai/ws/create-events`` (a literal in its code): the bridge is served over TLS
with a throwaway certificate for that name, and Chromium resolves the name to it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from rest_bridge.config import BridgeSettings
from tests.harness.browser import StaticSite
from tests.harness.servers import UvicornThread

HARNESS = Path(__file__).parent / "storefront"
WS_HOST = "ws.depict.ai"
"""The host of the client's hard-coded WebSocket URL."""


def required_tools() -> tuple[str, str]:
    """Paths of npm and chromium (node too must be there); skipped without them, but never on CI."""
    found = {name: shutil.which(name) or "" for name in ("node", "npm", "chromium")}
    if missing := [name for name, path in found.items() if not path]:
        message = f"{' and '.join(missing)} not installed (apt-get install nodejs npm chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the Depict client test (.ci/run installs them)")
        pytest.skip(message)
    return found["npm"], found["chromium"]


def _run(command: list[str], timeout: float) -> None:
    done = subprocess.run(
        command, cwd=HARNESS, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}"
            f"\n{done.stderr[-3000:]}"
        )


def build_bundle(npm: str, base_url: str, outdir: Path) -> Path:
    """``npm ci`` in the harness, then the IIFE bundle with beacons going to ``base_url``."""
    _run([npm, "ci", "--no-audit", "--no-fund"], timeout=300)
    bundle = outdir / "dpc.bundle.js"
    _run(["node", "build.mjs", "--base-url", base_url, "--outfile", str(bundle)], timeout=120)
    return bundle


class Certificate:
    """A throwaway CA's certificate for ws.depict.ai and 127.0.0.1, written to ``directory``."""

    def __init__(self, directory: Path) -> None:
        leaf = trustme.CA().issue_cert(WS_HOST, "127.0.0.1")
        self.certfile = directory / "bridge.pem"
        self.keyfile = directory / "bridge.key"
        leaf.private_key_pem.write_to_path(str(self.keyfile))
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        self.certfile.write_bytes(chain)
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        self.spki_sha256 = base64.b64encode(hashlib.sha256(spki).digest()).decode()
        """What Chromium's --ignore-certificate-errors-spki-list takes: trust this key only."""


class TlsBridge(UvicornThread):
    """The real bridge app served by uvicorn over TLS (HTTPS and WSS) on a free loopback port."""

    def __init__(self, settings: BridgeSettings, certificate: Certificate) -> None:
        self.settings = BridgeSettings.model_validate(
            {
                **dict(settings),
                "http_tls_cert_file": str(certificate.certfile),
                "http_tls_key_file": str(certificate.keyfile),
            }
        )
        super().__init__(self.settings)


class StorefrontServer(StaticSite):
    """Serves the harness's page.html and the built bundle from a loopback origin of its own."""

    def __init__(self, bundle: Path) -> None:
        super().__init__(
            {
                "/page.html": (HARNESS / "page.html", "text/html; charset=utf-8"),
                "/dist/dpc.bundle.js": (bundle, "text/javascript; charset=utf-8"),
            }
        )


def chromium_args(bridge_port: int, certificate: Certificate) -> list[str]:
    """Flags: ws.depict.ai is the TLS bridge, every other name fails, loopback IPs are as given.

    Only the throwaway certificate's key is trusted (not every certificate error ignored).
    """
    rules = f"MAP {WS_HOST} 127.0.0.1:{bridge_port}, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
    return [
        "--no-sandbox",  # tests run as root, where Chromium's sandbox cannot start
        f"--host-resolver-rules={rules}",
        f"--ignore-certificate-errors-spki-list={certificate.spki_sha256}",
        "--disable-quic",
        "--disable-background-networking",
        "--disable-component-update",
    ]
