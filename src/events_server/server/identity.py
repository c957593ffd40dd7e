"""Who speaks for browsers: the one place that decides whether a call comes from the REST bridge.

The bridge forwards what it knows of a browser's request (``FORWARDED_METADATA``: the
client's address, user agent, referer and host, the page's origin, the WebSocket frame
id), and the page origin is also how a keyless storefront is let in. So that context is
believed from the bridge alone: from any other caller it is dropped before a servicer
sees the call (``call_metadata``). Such a caller's ``client_ip`` is its peer, and without
a key it is refused (UNAUTHENTICATED) whatever origin it names. The methods in
``BRIDGE_ONLY_METHODS`` refuse everybody else (PERMISSION_DENIED).

How the bridge is recognised, by what is configured:

- ``EVENTS_TLS_CLIENT_CA_FILE`` (mutual TLS): by its client certificate, which gRPC has
  verified against that CA: one that holds a name of ``EVENTS_TLS_BRIDGE_NAMES`` (a
  subject alternative name or the common name), or any, when no names are given.
- ``EVENTS_BRIDGE_TOKEN``: by that shared secret, sent as ``x-events-bridge-token``
  metadata and compared in constant time.
- Both: either proves it.
- Neither: by where it calls from: a peer on this host (a loopback address or a Unix
  socket) is the bridge, which is how ``make run`` and the README start the two side by
  side. Every process on the host is then trusted as the bridge.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from events_server.wire.addresses import is_local_address, is_local_peer
from events_server.wire.metadata import (
    BATCH_LINK_METHOD,
    FORWARDED_METADATA,
    GATHERED_METHOD,
    GATHERED_STREAM_METHOD,
    MD_BRIDGE_TOKEN,
    REJECTED_SERVICE_NAME,
)

log = logging.getLogger(__name__)

BRIDGE_ONLY_METHODS = frozenset(
    {
        f"/{REJECTED_SERVICE_NAME}/Record",
        GATHERED_METHOD,
        GATHERED_STREAM_METHOD,
        BATCH_LINK_METHOD,
    }
)
"""Methods no caller but the bridge may call (the access interceptor refuses the rest)."""

# What gRPC's auth context holds of a verified client certificate's names.
_CERT_NAMES = ("x509_subject_alternative_name", "x509_common_name")


@dataclass(frozen=True, slots=True)
class CallIdentity:
    """What a call is believed to be: the bridge or not, and the metadata believed of it."""

    bridge: bool
    metadata: dict[str, str]
    """Its text metadata: without the bridge credential, and without the forwarded client
    context unless it is the bridge."""


current: ContextVar[CallIdentity | None] = ContextVar("call_identity", default=None)
"""The identity of the call being handled (set by the access interceptor)."""


def text_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """A call's text metadata, as sent (binary ``-bin`` entries left out)."""
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def _untrusted(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k not in FORWARDED_METADATA}


def call_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """The metadata believed of the call being handled (see the module's docstring).

    Outside a call the access interceptor saw (a streaming method), nothing forwarded is
    believed.
    """
    identity = current.get()
    if identity is not None:
        return identity.metadata
    metadata = text_metadata(context)
    metadata.pop(MD_BRIDGE_TOKEN, None)
    return _untrusted(metadata)


class BridgeIdentity:
    """Recognises the REST bridge, as configured (see the module's docstring)."""

    def __init__(
        self,
        token: str | None = None,
        client_certificates: bool = False,
        names: Iterable[str] = (),
    ) -> None:
        self._token = token.encode() if token else None
        self._certificates = client_certificates
        self._names = frozenset(names)
        self.ignored = 0
        """Calls whose forwarded context was dropped: they were not the bridge."""

    @property
    def mode(self) -> str:
        """How the bridge is recognised: ``mtls``, ``token``, ``mtls+token`` or ``loopback``."""
        modes = [m for m, on in (("mtls", self._certificates), ("token", self._token)) if on]
        return "+".join(modes) or "loopback"

    def describe(self) -> str:
        """What proves the bridge, as messages name it."""
        proofs = []
        if self._certificates:
            names = ", ".join(sorted(self._names)) if self._names else "any name"
            proofs.append(f"a client certificate of EVENTS_TLS_CLIENT_CA_FILE naming {names}")
        if self._token:
            proofs.append(f"the EVENTS_BRIDGE_TOKEN as {MD_BRIDGE_TOKEN} metadata")
        return " or ".join(proofs) or "a peer on the server's host (loopback or Unix socket)"

    def is_bridge(self, context: grpc.aio.ServicerContext[Any, Any], token: str | None) -> bool:
        """Whether the caller proved to be the bridge (``token``: the credential it sent)."""
        if self._token is None and not self._certificates:
            return is_local_peer(context.peer())
        # Constant time: how much of a guess was right must not show in the timing.
        if (
            self._token is not None
            and token is not None
            and hmac.compare_digest(token.encode("utf-8", "replace"), self._token)
        ):
            return True
        if self._certificates:
            auth = context.auth_context()
            names = [n for key in _CERT_NAMES for n in auth.get(key, ())]
            # gRPC has verified any certificate against the client CA in the handshake.
            if names and (not self._names or any(n.decode() in self._names for n in names)):
                return True
        return False

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> CallIdentity:
        """Who the call is, and the metadata believed of it."""
        metadata = text_metadata(context)
        bridge = self.is_bridge(context, metadata.pop(MD_BRIDGE_TOKEN, None))
        if not bridge and not FORWARDED_METADATA.isdisjoint(metadata):
            self._ignore(context)
            metadata = _untrusted(metadata)
        return CallIdentity(bridge, metadata)

    def _ignore(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.ignored += 1
        if self.ignored & (self.ignored - 1) == 0:  # 1st, 2nd, 4th...: no log flood
            # A direct caller naming a browser's context is unusual; a bridge that is not
            # recognised (a credential missing on one side) is a misconfiguration.
            log.warning(
                "forwarded client context ignored (%d calls so far): %s is not the REST"
                " bridge, which is known by %s",
                self.ignored,
                context.peer(),
                self.describe(),
            )

    def startup_warning(self, grpc_addr: str) -> str | None:
        """What to warn of at start: other hosts can connect, and nothing tells the bridge."""
        if self.mode != "loopback" or is_local_address(grpc_addr):
            return None
        return (
            f"gRPC listens on {grpc_addr}, beyond this host, but no bridge identity is"
            " configured (EVENTS_BRIDGE_TOKEN, or EVENTS_TLS_CLIENT_CA_FILE for mutual TLS):"
            " only callers on this host are believed to be the REST bridge. A bridge on"
            " another host gets no client context believed, cannot file rejected requests,"
            " and its keyless storefront requests are refused."
        )

    async def refuse(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        """End a call to a bridge-only method from another caller: PERMISSION_DENIED."""
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} is for the REST bridge only, and this caller is not it (the bridge is"
            f" known by {self.describe()})",
        )
