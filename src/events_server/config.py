"""Settings of the gRPC server, read from the environment (``EVENTS_*``, ``REDIS_URL``) or flags."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Annotated, Literal, TypeVar

from pydantic import AliasChoices, BeforeValidator, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "EVENTS_"

S = TypeVar("S", bound=BaseSettings)

LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
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
    partitions: int = Field(
        16,
        ge=1,
        le=1024,
        description="Number of partition streams. Changing it moves users (and retries in flight)"
        " to other partitions.",
    )
    dedup_ttl_seconds: int = Field(
        86_400, ge=1, description="How long a deduplication_id is remembered per tenant, seconds."
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
        description="Trusted proxies in front of the REST bridge: the client IP is taken this many"
        " entries left of the last one in x-forwarded-for.",
    )
    log_level: LogLevel = Field("INFO", description="Python logging level.")

    @field_validator("key_prefix")
    @classmethod
    def _no_hash_tag(cls, value: str) -> str:
        # The partition's {hash tag} must be the first braces in every key, or
        # Redis Cluster would hash on the prefix and put all partitions in one slot.
        if "{" in value or "}" in value:
            raise ValueError("must not contain '{' or '}'")
        return value


def add_settings_flags(
    parser: argparse.ArgumentParser,
    settings_cls: type[BaseSettings],
    names: Iterable[str],
    short: Mapping[str, str] | None = None,
) -> None:
    """Add a --flag for each named setting (plus any ``short`` alias), with env and default."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    for name in names:
        field = settings_cls.model_fields[name]
        aliases = field.validation_alias
        env = (
            aliases.choices[0]
            if isinstance(aliases, AliasChoices) and isinstance(aliases.choices[0], str)
            else f"{prefix}{name}".upper()
        )
        flags = [f"--{name.replace('_', '-')}"]
        if short and name in short:
            flags.insert(0, short[name])
        if field.annotation is bool:
            parser.add_argument(
                *flags,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{field.description} [env {env}; default: {field.default}]",
            )
            continue
        kind: type[object] = (
            int if field.annotation is int else float if field.annotation is float else str
        )
        parser.add_argument(
            *flags,
            dest=name,
            type=kind,
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{field.description} [env {env}; default: {field.default}]",
        )


def settings_from_args(settings_cls: type[S], args: argparse.Namespace) -> S:
    """Settings from the environment, overridden by any flag given on the command line."""
    given = {
        name: value
        for name, value in vars(args).items()
        if name in settings_cls.model_fields and value is not None
    }
    return settings_cls(**given)


class ConsumerSettings(BaseSettings):
    """How a consumer reads its group: batch size, ownership leases, redelivery, dead letters."""

    model_config = SettingsConfigDict(env_prefix="EVENTS_CONSUMER_", extra="ignore", frozen=True)

    batch_size: int = Field(
        100, ge=1, le=10_000, description="Entries read from a partition per round trip."
    )
    block_seconds: float = Field(
        1.0,
        gt=0,
        description="How long one read waits for new entries, seconds (keep it below the Redis"
        " timeout).",
    )
    lease_seconds: float = Field(
        10.0,
        gt=0,
        description="A consumer owns a partition for this long unless it renews; a crashed"
        " consumer's partitions move to others after it, seconds.",
    )
    claim_idle_seconds: float = Field(
        15.0,
        ge=0,
        description="An entry another consumer left pending is reclaimed (XAUTOCLAIM) once it"
        " has been idle this long, seconds.",
    )
    max_deliveries: int = Field(
        5,
        ge=1,
        description="After this many deliveries that did not end in an ack, an entry moves to"
        " the dead-letter stream.",
    )
    retry_delay_seconds: float = Field(
        1.0, ge=0, description="Pause before handing a failed entry to the handler again, seconds."
    )
