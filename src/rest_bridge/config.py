"""Settings of the REST bridge, read from the environment (``EVENTS_*``) or flags."""

from __future__ import annotations

import os

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from events_server.ops.logs import IpMode
from events_server.ops.settings import (
    ACCESS_LOG_SAMPLE,
    ACCESS_LOG_SAMPLE_HELP,
    ENV_PREFIX,
    AccessLogSample,
    BridgeToken,
    LogLevel,
)

MIN_JSON_DEPTH = 3
"""How deep a valid body nests: the array, an event object, entity_identifiers or variant_ids."""

# The bridge parses a body whole on its event loop: past 2 MiB of JSON that costs more
# time than one request should hold it (and its protobuf nears the server's limits).
MAX_BODY_BYTES_CEILING = 2 * 1024 * 1024

TLS_FILES = (
    "grpc_ca_file",
    "grpc_client_cert_file",
    "grpc_client_key_file",
    "http_tls_cert_file",
    "http_tls_key_file",
    "http_tls_client_ca_file",
)


class BridgeSettings(BaseSettings):
    """Everything the bridge needs; validated once at start-up and passed in."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    grpc_target: str = Field(
        "127.0.0.1:50051", description="The events-server to call (host:port, or unix:/path)."
    )
    grpc_tls: bool = Field(
        False,
        description="Call the server over TLS (implied by grpc_ca_file), verifying its"
        " certificate against grpc_ca_file, or gRPC's default roots without one.",
    )
    grpc_ca_file: str = Field(
        "", description="PEM CA(s) the server's certificate must chain to; given: TLS."
    )
    grpc_client_cert_file: str = Field(
        "",
        description="PEM client certificate the bridge presents to the server (mutual TLS:"
        " the server knows the bridge by it).",
    )
    grpc_client_key_file: str = Field("", description="PEM private key of grpc_client_cert_file.")
    grpc_server_name: str = Field(
        "",
        description="The name the server's certificate must hold, when it is not grpc_target's"
        " host (e.g. a target given as an IP address).",
    )
    bridge_token: BridgeToken = Field(
        None,
        description="Shared secret sent on every call to prove the bridge to the server (the"
        " same EVENTS_BRIDGE_TOKEN as the server's; prefer the environment to the flag).",
    )
    http_host: str = Field("127.0.0.1", description="Address the bridge listens on.")
    http_port: int = Field(8000, ge=0, le=65535, description="Port the bridge listens on.")
    http_tls_cert_file: str = Field(
        "",
        description="PEM certificate (chain) to serve HTTPS (and wss://) with; with"
        " http_tls_key_file. Empty: plain HTTP.",
    )
    http_tls_key_file: str = Field("", description="PEM private key of http_tls_cert_file.")
    http_tls_client_ca_file: str = Field(
        "",
        description="PEM CA(s): HTTPS clients must present a certificate signed by one (for a"
        " proxy in front of the bridge that speaks mutual TLS; browsers do not).",
    )
    workers: int = Field(1, ge=1, le=64, description="Bridge processes (uvicorn workers).")
    grpc_timeout_seconds: float = Field(
        5.0, gt=0, description="Deadline of each CreateEvents call to the server, seconds."
    )
    retry_after_seconds: int = Field(
        1, ge=0, description="Retry-After sent with 503 and 429 answers, seconds."
    )
    log_level: LogLevel = Field("INFO", description="Python logging level.")
    log_client_ip: IpMode = Field(
        "truncated",
        description="Client IPs in access logs: full, truncated (IPv4 /24, IPv6 /48) or none.",
    )
    access_log_sample: AccessLogSample = Field(
        ACCESS_LOG_SAMPLE, description=ACCESS_LOG_SAMPLE_HELP
    )
    readiness_timeout_seconds: float = Field(
        1.0, gt=0, description="Deadline of the health check behind /readyz, seconds."
    )
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1,
        le=MAX_BODY_BYTES_CEILING,
        description="Largest request body accepted, in bytes: as sent and, when gzipped,"
        " once decompressed (413 past it).",
    )
    # At most 256: the stdlib JSON parser gives up near 1000 levels (RecursionError),
    # which must still mean "deeper than the limit".
    max_json_depth: int = Field(
        16,
        ge=MIN_JSON_DEPTH,
        le=256,
        description="Deepest nesting of arrays and objects in a request body (422 past it);"
        f" a valid body nests {MIN_JSON_DEPTH} deep.",
    )
    # The server's setting, read from the same variable (EVENTS_MAX_EVENTS_PER_REQUEST):
    # the bridge cannot ask the server, and must count a body's items before it validates
    # any (validating 340,000 empty objects took 12 s). Set it once for both processes.
    max_events_per_request: int = Field(
        500,
        ge=1,
        le=100_000,
        description="Events one request may carry: a body of more items is refused whole (422,"
        " too_many_events) before any is validated. The server's setting of the same name:"
        " keep them equal.",
    )
    parse_processes: int = Field(
        1,
        ge=0,
        le=64,
        description="Worker processes that parse and validate the bodies too large to parse on"
        " the event loop without holding it for more than a few ms (0: every body is parsed on"
        " the event loop).",
    )
    # HTTP connections (rest_bridge.connections): every bound is per bridge process.
    max_header_bytes: int = Field(
        16384,
        ge=1024,
        le=1024 * 1024,
        description="Largest request line plus headers, in bytes; past it the request is"
        " answered 431 and the connection closed, the rest unread.",
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Time a connection has to send a whole request line and headers, from when"
        " it opens or its next request's first byte, seconds; then it is closed (408 if it had"
        " sent part of them). Over HTTPS, also the time its TLS handshake may take.",
    )
    keep_alive_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="How long a keep-alive connection may stay idle between requests, seconds.",
    )
    body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Time a request to POST /create-events has to send its whole body, seconds"
        " (408 past it).",
    )
    max_connections: int = Field(
        4096,
        ge=16,
        description="Open connections per bridge process, WebSockets included (lowered at"
        " start-up to the open-file limit less 128). At the cap a new connection closes the"
        " longest-idle one (no request in progress); when none is idle it is answered 503.",
    )
    cors_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="How long the server's answer on a browser origin (per origin and key)"
        " is reused, seconds.",
    )
    admission_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="How long the server's admission of a caller (per key and page origin) is"
        " reused before a request's body is read, seconds (0: ask for every request).",
    )
    rejected_reports_per_second: float = Field(
        1.0,
        ge=0,
        description="Reports of refused requests (for the server's rejected-requests record)"
        " sent per second per key or page origin, in bursts of ten seconds' worth (0: no"
        " limit); the server records at most its own share of each caller anyway.",
    )
    # Group commit (rest_bridge.gather): requests that arrive while calls are out go together.
    grpc_batch_link: bool = Field(
        True,
        description="Send gathered batches on the server's batch link where it offers one"
        " (plaintext gRPC on TCP: a plain TCP connection, opened with a ticket asked over"
        " gRPC; about half the CPU of a gRPC stream's batch). False: the gRPC stream.",
    )
    grpc_gather_max_calls: int = Field(
        1,
        ge=1,
        le=64,
        description="Gathered calls to the server in flight at once; a request that finds fewer"
        " out is sent at once, the others wait for the next call to leave.",
    )
    grpc_gather_max_requests: int = Field(
        256,
        ge=1,
        le=1024,
        description="Most requests (POSTs, WebSocket frames) one gathered call carries.",
    )
    grpc_gather_max_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        description="Most bytes one gathered call carries (a larger request goes alone);"
        " at most the server's max_request_bytes.",
    )
    grpc_gather_pipeline_bytes: int = Field(
        512 * 1024,
        ge=1024,
        description="While at least this many bytes of requests wait, up to 4 gathered calls"
        " may be out (large requests gain from a second call in flight; single events from"
        " more per call).",
    )
    # WebSocket /ws/create-events (rest_bridge.ws): every bound is per bridge process.
    # Depict's events are a few hundred bytes; 16 KiB still holds a URL of 8 KiB or some
    # 700 variant ids, and keeps what 16 frames in flight on 3,072 sockets can hold small.
    ws_max_frame_bytes: int = Field(
        16384,
        ge=1024,
        le=MAX_BODY_BYTES_CEILING,
        description="Largest WebSocket message accepted on /ws/create-events, in bytes (one"
        " event in a frame); a bigger one closes the connection with code 1009.",
    )
    ws_max_fragments: int = Field(
        16,
        ge=1,
        le=1024,
        description="Frames one WebSocket message may be sent in (browsers send one); past it"
        " the connection is closed with code 1009, as for a message too large.",
    )
    ws_max_control_frames_per_second: int = Field(
        10,
        ge=1,
        description="Pings and pongs one WebSocket client may send in a second (the bridge"
        " pings every ws_ping_interval_seconds, browsers never do); past it they are dropped"
        " (a ping is not answered) and the socket is not read for the rest of the second.",
    )
    ws_write_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="How long a WebSocket's answers (and pongs) may wait for a client that does"
        " not read them, past the write buffer's 64 KiB, seconds; then the socket is dropped"
        " (no close frame: it could not be written either). Also how long a closing handshake"
        " may take before the socket is dropped.",
    )
    ws_silent_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="A WebSocket connection that has sent no frame since it opened is closed"
        " with code 1000 after this long, seconds (Depict's client sends its first event at"
        " once); at ws_max_connections, the one silent longest is closed (1013) to admit a"
        " new one.",
    )
    max_bytes_in_flight: int = Field(
        128 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes this process may hold for request bodies and WebSocket frames read"
        " and not yet answered, summed over its connections (rest_bridge.budget); past it a"
        " connection is read only while it holds less than one ws_max_frame_bytes (the others"
        " wait, their bytes in their own buffers).",
    )
    ws_max_in_flight: int = Field(
        16,
        ge=1,
        le=1024,
        description="Frames of one WebSocket connection handled at once; at the limit the"
        " bridge reads no more from that socket until one of them is answered.",
    )
    ws_max_connections: int = Field(
        3072,
        ge=1,
        description="Open WebSocket connections per bridge process, fewer than max_connections"
        " (and lowered with it, in proportion), so that sockets are left for beacons and"
        " POSTs; past it a handshake is refused with 503 and Retry-After.",
    )
    ws_idle_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="A WebSocket connection that has sent no frame and has none in flight"
        " for this long is closed with code 1000, seconds.",
    )
    ws_ping_interval_seconds: float = Field(
        20.0, gt=0, description="How often the bridge pings each WebSocket client, seconds."
    )
    ws_ping_timeout_seconds: float = Field(
        20.0,
        gt=0,
        description="A WebSocket client that does not answer a ping within this long is"
        " disconnected (code 1011), seconds.",
    )
    ws_per_message_deflate: bool = Field(
        False,
        description="Accept the permessage-deflate extension browsers offer (smaller frames,"
        " but zlib work on every frame and ~40 KiB more memory per connection).",
    )

    @property
    def grpc_secure(self) -> bool:
        """Whether the bridge calls the server over TLS."""
        return bool(self.grpc_tls or self.grpc_ca_file or self.grpc_client_cert_file)

    @model_validator(mode="after")
    def _websockets_leave_room(self) -> BridgeSettings:
        if self.ws_max_connections >= self.max_connections:
            raise ValueError(
                f"ws_max_connections ({self.ws_max_connections}) must be below max_connections"
                f" ({self.max_connections}), which WebSockets count in: else they could take"
                " every connection, and beacons and POSTs would be refused"
            )
        return self

    @model_validator(mode="after")
    def _budget_holds_every_share(self) -> BridgeSettings:
        # Each connection may always hold one frame (rest_bridge.budget): all of them
        # together must stay within the budget.
        if self.max_connections * self.ws_max_frame_bytes > self.max_bytes_in_flight:
            raise ValueError(
                f"max_bytes_in_flight ({self.max_bytes_in_flight}) must hold max_connections"
                f" ({self.max_connections}) times ws_max_frame_bytes ({self.ws_max_frame_bytes}):"
                " each connection may always hold one frame"
            )
        return self

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> BridgeSettings:
        if bool(self.grpc_client_cert_file) != bool(self.grpc_client_key_file):
            raise ValueError("grpc_client_cert_file and grpc_client_key_file go together")
        if bool(self.http_tls_cert_file) != bool(self.http_tls_key_file):
            raise ValueError("http_tls_cert_file and http_tls_key_file go together")
        if self.http_tls_client_ca_file and not self.http_tls_cert_file:
            raise ValueError("http_tls_client_ca_file needs http_tls_cert_file (HTTPS)")
        for name in TLS_FILES:
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                # Here, not once serving: uvicorn would only log a failed start.
                raise ValueError(f"{name}: cannot read {path!r}")
        return self
