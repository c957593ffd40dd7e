"""Settings of the gRPC server, read from the environment (``EVENTS_*``, ``REDIS_URL``) or flags."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from events_server.ops.logs import IpMode
from events_server.ops.settings import (
    ACCESS_LOG_SAMPLE,
    ACCESS_LOG_SAMPLE_HELP,
    ENV_PREFIX,
    AccessLogSample,
    BridgeToken,
    LogLevel,
)
from events_server.queue.connection import RedisConfig
from events_server.wire.codec import varint
from events_server.wire.origins import normalize_origin

Durability = Annotated[
    Literal["none", "fsync"], BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)
]
ConfirmReplicas = Annotated[
    Literal["auto"] | Annotated[int, Field(ge=0, le=16)],
    BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v),
]


class Settings(BaseSettings):
    """Everything the server needs; validated once at start-up and passed in."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "EVENTS_REDIS_URL", "redis_url"),
        description="Redis/Valkey to queue on (env REDIS_URL).",
    )
    grpc_addr: str = Field(
        "127.0.0.1:50051", description="host:port the gRPC server listens on (port 0: any free)."
    )
    batch_link: bool = Field(
        True,
        description="Offer the REST bridge the batch link (its gathered batches as frames on a"
        " plain TCP connection, on the gRPC host and a free port; about half the CPU of a"
        " gRPC stream's batch): only while gRPC is plaintext on TCP. False: StreamGathered.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Server processes sharing the port (SO_REUSEPORT); more than 1 needs a"
        " fixed TCP port.",
    )
    tls_cert_file: str = Field(
        "",
        description="PEM certificate (chain) the gRPC server presents; with tls_key_file it"
        " serves TLS only. Empty: plaintext.",
    )
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str = Field(
        "",
        description="PEM CA(s): every caller must present a client certificate signed by one"
        " (mutual TLS; needs tls_cert_file), and such a certificate can prove the REST bridge"
        " (see tls_bridge_names).",
    )
    tls_bridge_names: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated names (a subject alternative name or the common name) of"
        " the client certificates that are the REST bridge; empty: every certificate"
        " tls_client_ca_file signed.",
    )
    bridge_token: BridgeToken = Field(
        None,
        description="Shared secret that proves the REST bridge (the same EVENTS_BRIDGE_TOKEN in"
        " both processes, 16+ characters; prefer the environment to the flag). Unset, and"
        " without tls_client_ca_file: only peers on this host (loopback, Unix socket) are"
        " believed to be the bridge.",
    )
    partitions: int = Field(
        16,
        ge=1,
        le=1024,
        description="Number of partition streams. Changing it moves users (and retries in flight)"
        " to other partitions.",
    )
    dedup_ttl_seconds: int = Field(
        86_400,
        ge=1,
        description="How long a deduplication_id (and a purchase's or transaction mapping's"
        " transaction_id) is remembered per tenant, seconds.",
    )
    key_prefix: str = Field(
        "ev", min_length=1, description="Prefix of every Redis key the service writes."
    )
    redis_cluster: bool = Field(
        False,
        description="REDIS_URL names one node of a Redis Cluster: use the cluster client, which"
        " discovers the other nodes.",
    )
    redis_timeout_seconds: float = Field(
        2.0, gt=0, description="Timeout of each Redis command (and of connecting), seconds."
    )
    redis_max_connections: int = Field(64, ge=1, description="Redis connection pool size.")
    health_interval_seconds: float = Field(
        1.0, gt=0, description="How often readiness pings Redis, seconds."
    )
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight calls may take to finish, seconds."
    )
    forwarded_hops: int = Field(
        0,
        ge=0,
        description="Trusted proxies in front of the REST bridge: the client IP (whose unknown-key"
        " allowance a call spends) is taken this many entries left of the last one in"
        " x-forwarded-for.",
    )
    log_level: LogLevel = Field("INFO", description="Python logging level.")
    log_client_ip: IpMode = Field(
        "truncated",
        description="Client IPs in access logs: full, truncated (IPv4 /24, IPv6 /48) or none."
        " Queued envelopes always keep the full address.",
    )
    access_log_sample: AccessLogSample = Field(
        ACCESS_LOG_SAMPLE, description=ACCESS_LOG_SAMPLE_HELP
    )
    metrics_addr: str = Field(
        "127.0.0.1:9464",
        description="host:port serving Prometheus /metrics (port 0: any free; empty: off).",
    )
    metrics_max_tenants: int = Field(
        100,
        ge=0,
        description="Distinct tenant label values in metrics; later tenants are counted as"
        ' tenant="_other" (0: no tenant names at all).',
    )
    metrics_sample_interval_seconds: float = Field(
        15.0, gt=0, description="How often queue sizes are read from Redis for metrics, seconds."
    )
    durability: Durability = Field(
        "none",
        description="When to acknowledge: 'none' once Redis has the events in memory; 'fsync'"
        " once Redis has also written them to its AOF on disk (WAITAOF; needs appendonly yes),"
        " and, with confirm_replicas, so have the replicas.",
    )
    confirm_replicas: ConfirmReplicas = Field(
        "auto",
        description="Replicas that must have each write (WAIT after the scripts, on the same"
        " connection) before it is acknowledged; fewer in time: refused as retryable (503)."
        " 'auto': 1 with redis_cluster (a replica per primary), 0 on one Redis.",
    )
    key_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="How long a process reuses an API key lookup, seconds: a revoked key stops"
        " working, and a new key starts working, within this time (0: look up every call).",
    )
    peer_unknown_keys_per_second: float = Field(
        20.0,
        ge=0,
        description="Unknown API keys one client address may have looked up in Redis per"
        " second (bursts of as many), per process; past it, its keys this process never found"
        " are refused as unknown without a lookup (0: no limit). Behind a proxy: see"
        " forwarded_hops.",
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Comma-separated page origins (https://shop.example) allowed to call with a"
        " key that lists no origins of its own; '*' allows any origin, but never with"
        " credentials. Empty: such keys cannot be used from browsers.",
    )
    rejected_maxlen: int = Field(
        10_000,
        ge=1,
        description="Records kept per tenant in its rejected-requests stream (XADD MAXLEN ~,"
        " approximate); older ones are trimmed.",
    )
    rejected_max_bytes: int = Field(
        33_554_432,
        ge=1_048_576,
        description="Bytes one tenant's rejected-requests stream may hold, about: with records"
        " of at most ~8.5 KiB (payload 4 KiB, errors 4 KiB), it keeps at most this / 8.5 KiB"
        " records when that is fewer than rejected_maxlen.",
    )
    rejected_records_per_second: float = Field(
        1.0,
        ge=0,
        description="Rejected-request records one caller (an API key, a storefront origin) may"
        " write per second, in bursts of ten seconds' worth, per process; past it its"
        " refusals are answered as ever but not recorded, so that no caller can flush a"
        " store's diagnostics (0: no limit).",
    )

    max_events_per_request: int = Field(
        500,
        ge=1,
        description="Events one CreateEvents call may carry; a request with more is refused"
        " whole (INVALID_ARGUMENT, HTTP 422).",
    )
    max_event_bytes: int = Field(
        32_768,
        ge=64,
        description="Largest event, in bytes of its serialized protobuf (Event.ByteSize()); a"
        " request with a larger one is refused whole.",
    )
    max_string_length: int = Field(
        8_192,
        ge=1,
        description="Longest string an event may hold, in characters: any field, list item,"
        " map key or map value.",
    )
    max_request_bytes: int = Field(
        0,
        ge=0,
        description="Largest message the gRPC server accepts (grpc.max_receive_message_length),"
        " in bytes; gRPC itself refuses a larger one with RESOURCE_EXHAUSTED (HTTP 413). At"
        " least 64 KiB: the bridge's rejected-request reports must fit too. 0 (the default):"
        " max_events_per_request events of max_event_bytes, plus 64 KiB.",
    )
    max_concurrent_calls: int = Field(
        256,
        ge=1,
        description="gRPC calls in progress at once per server process; past it a call is"
        " refused at once with RESOURCE_EXHAUSTED (HTTP 429, retry later), never queued."
        " Bounds memory too: each may hold up to max_request_bytes.",
    )

    key_requests_per_second: float = Field(
        0.0,
        ge=0,
        description="Requests/s one API key may make, shared by every server process (0: no"
        " limit); a key's own limit (keys create/limits) overrides it.",
    )
    key_events_per_second: float = Field(
        0.0, ge=0, description="Events/s one API key may send (0: no limit); keys override it."
    )
    storefront_requests_per_second: float = Field(
        500.0,
        ge=0,
        description="Requests/s the keyless traffic of one storefront origin may make, all its"
        " visitors together (0: no limit). Anyone can forge an Origin: this is what bounds it.",
    )
    storefront_events_per_second: float = Field(
        1000.0, ge=0, description="Events/s one storefront origin may send (0: no limit)."
    )
    rate_burst_seconds: float = Field(
        2.0,
        gt=0,
        description="How many seconds' worth of a rate a caller may send at once (the burst).",
    )
    max_calls_in_progress: int = Field(
        8,
        ge=1,
        description="Calls worked on at once per process (parsed, validated, written); more"
        " wait their turn, unparsed, and turns go round robin between the callers waiting,"
        " so a flood does not stand in front of a light tenant.",
    )
    max_in_flight_per_caller: int = Field(
        4,
        ge=1,
        description="Calls of one key or storefront origin worked on at once per process (at"
        " most half redis_max_connections); its further calls wait their turn, unparsed,"
        " within the Redis timeout, so a flood is shed first and other callers keep their"
        " latency and their share of the Redis pool.",
    )

    @property
    def redis(self) -> RedisConfig:
        """How to connect to Redis."""
        return RedisConfig(
            url=self.redis_url,
            cluster=self.redis_cluster,
            timeout_seconds=self.redis_timeout_seconds,
            max_connections=self.redis_max_connections,
        )

    @property
    def replicas_to_confirm(self) -> int:
        """How many replicas must have a write before it is acknowledged."""
        if self.confirm_replicas == "auto":
            return 1 if self.redis_cluster else 0
        return self.confirm_replicas

    @model_validator(mode="before")
    @classmethod
    def _request_limit_from_event_limits(cls, data: object) -> object:
        # What a full request of the largest events needs, rather than gRPC's 4 MiB of
        # anything: the limit follows the event limits it exists for.
        if isinstance(data, dict) and not int(data.get("max_request_bytes") or 0):
            fields = cls.model_fields
            events = int(
                data.get("max_events_per_request") or fields["max_events_per_request"].default
            )
            size = int(data.get("max_event_bytes") or fields["max_event_bytes"].default)
            # Per event: its bytes, a tag and a length prefix of at most 5 bytes.
            data = {**data, "max_request_bytes": events * (size + 6) + 65_536}
        return data

    @model_validator(mode="after")
    def _one_event_fits_a_request(self) -> Settings:
        # Past this, an event within max_event_bytes could still never arrive: gRPC
        # would refuse its request before the clear event_too_large could be given.
        largest = self.max_event_bytes + 1 + len(varint(self.max_event_bytes))
        if self.max_request_bytes < 65_536:
            raise ValueError(f"max_request_bytes ({self.max_request_bytes}) must be at least 65536")
        if self.max_request_bytes < largest:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) must hold one event of"
                f" max_event_bytes ({self.max_event_bytes}): at least {largest}"
            )
        return self

    @model_validator(mode="after")
    def _workers_need_a_shared_port(self) -> Settings:
        if self.workers > 1 and (
            self.grpc_addr.startswith("unix:") or self.grpc_addr.endswith(":0")
        ):
            raise ValueError(
                "workers > 1 needs a fixed TCP port in grpc_addr (a Unix socket or port 0"
                " cannot be shared)"
            )
        return self

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> Settings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file are given together, or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.tls_bridge_names and not self.tls_client_ca_file:
            raise ValueError("tls_bridge_names needs tls_client_ca_file (client certificates)")
        return self

    @field_validator("tls_bridge_names", mode="before")
    @classmethod
    def _name_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, colon, port = value.rpartition(":")
        if value and not (colon and host and port.isdigit() and int(port) <= 65535):
            raise ValueError("must be host:port (or empty, for no metrics port)")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            return tuple("*" if o.strip() == "*" else normalize_origin(o) for o in value)
        return value

    @field_validator("key_prefix")
    @classmethod
    def _no_hash_tag(cls, value: str) -> str:
        # The partition's {hash tag} must be the first braces in every key, or
        # Redis Cluster would hash on the prefix and put all partitions in one slot.
        if "{" in value or "}" in value:
            raise ValueError("must not contain '{' or '}'")
        return value
