"""Whether an address is on this host: what identifies the REST bridge when nothing else does."""

from __future__ import annotations

import functools
import ipaddress

_UNIX = ("unix:", "unix-abstract:")


@functools.lru_cache(maxsize=1024)  # asked on every call: ipaddress takes microseconds
def _loopback(host: str) -> bool:
    host = host.strip("[]").partition("%")[0]
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name, or nothing at all
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:/path``) is on
    this host: a loopback address or a Unix socket."""
    if peer.startswith(("ipv4:127.", *_UNIX)):  # gRPC writes addresses canonically
        return True
    kind, _, rest = peer.partition(":")
    return kind in ("ipv4", "ipv6") and _loopback(rest.rpartition(":")[0])


def is_local_address(address: str) -> bool:
    """Whether a listening address or a gRPC target (``host:port``, ``[::1]:port``,
    ``dns:///host:port``, ``unix:/path``) is on this host only: ``0.0.0.0``, ``[::]`` and
    host names are not."""
    split = split_address(address)
    return split is None or _loopback(split[0])


def split_address(address: str) -> tuple[str, str] | None:
    """A listening address's or a gRPC target's host (IPv6 without its brackets) and port
    ("" when it names none); None for a Unix socket."""
    if address.startswith(_UNIX):
        return None
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        address = address.removeprefix(scheme)
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or (host.count(":") and not host.startswith("[")):
        return address.strip("[]"), ""  # no port: a bare host or IPv6 address
    return host.strip("[]"), port
