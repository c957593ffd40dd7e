"""How a consumer reads its group, from ``EVENTS_CONSUMER_*`` or the caller."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
