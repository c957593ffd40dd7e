"""Every Redis key name the service uses, in one place.

Layout (prefix ``ev`` by default, partition ``p`` in ``0..P-1``)::

    ev:{p7}:events                      stream of Envelope bytes, field ``e``
    ev:{p7}:dedup:<len>:<tenant>:<id>   string, value = the entry id; expires (seconds)
    ev:{p7}:tx:<kind>:<len>:<tenant>:<transaction id>
                                        string, value = the entry id of the tenant's
                                        purchase (or, apart, transaction_mapping) of that
                                        transaction; expires (seconds), as dedup keys do
    ev:{p7}:fsync-barrier               string, rewritten to order WAITAOF (durability=fsync)
    ev:rejected:<tenant>                stream of rejected requests, capped (MAXLEN ~)
    ev:{p7}:dead:<group>                stream: entries <group> gave up on (dead letters)
    ev:{p7}:owner:<group>               string: the consumer of <group> that owns the
                                        partition; expires (milliseconds)
    ev:members:<group>                  sorted set: live consumers of <group>, scored by
                                        when their membership expires (unix milliseconds)
    ev:{keys}:records                   hash: API key id -> key record JSON (revoked too)
    ev:{keys}:active                    hash: SHA-256 of a key in force -> key record JSON
    ev:{keys}:storefronts               hash: registered page origin -> storefront JSON
                                        (the tenants it may write without a key)
    ev:{rl:<caller>}:rate               hash: the caller's rate-limit schedule (GCRA
                                        times, ms); expires when idle

The ``{keys}`` tag keeps the key hashes and the storefronts in one slot, so creating
and revoking a key are one MULTI. The ``{p7}`` hash tag puts everything of one partition
in one Redis Cluster slot, so no script (enqueue, dead-letter, replay, trim, lease) ever
crosses slots.
"""

from __future__ import annotations

from dataclasses import dataclass

ENVELOPE_FIELD = b"e"
"""Stream entry field that holds the serialized Envelope."""

TARGET_GROUP_FIELD = b"g"
"""Field of a replayed entry: the only consumer group meant to handle it."""

REPLAY_OF_FIELD = b"o"
"""Field of a replayed entry: the id the entry first had."""

# Field names of a record in the stream.
F_TENANT = b"tenant"
F_AT = b"at"
F_SOURCE = b"source"
F_ERRORS = b"errors"
F_PAYLOAD = b"payload"
F_SIZE = b"payload_size"


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Key names under one prefix for ``partitions`` partitions."""

    prefix: str
    partitions: int

    def tag(self, partition: int) -> str:
        """The hash tag shared by everything in one partition."""
        return f"{{p{partition}}}"

    def stream(self, partition: int) -> str:
        """The partition's stream of envelopes."""
        return f"{self.prefix}:{self.tag(partition)}:events"

    def streams(self) -> list[str]:
        """All partition streams, in partition order."""
        return [self.stream(p) for p in range(self.partitions)]

    def dedup(self, partition: int, tenant: str, dedup_id: str) -> str:
        """Dedup key of one (tenant, deduplication_id); its TTL is set in seconds (EX)."""
        # The tenant is length-prefixed: with a plain separator, tenant "a:b" +
        # id "c" and tenant "a" + id "b:c" would share a key, and one store
        # could suppress another's events.
        return f"{self.prefix}:{self.tag(partition)}:dedup:{len(tenant)}:{tenant}:{dedup_id}"

    def transaction(self, partition: int, tenant: str, kind: str, transaction_id: str) -> str:
        """Dedup key of one tenant's transaction, per ``kind`` (``purchase`` or
        ``transaction_mapping``: each is queued once per transaction, apart from the other)."""
        # Length-prefixed tenant, as in dedup(); the kind is one of a fixed few names.
        return (
            f"{self.prefix}:{self.tag(partition)}:tx:{kind}:{len(tenant)}:{tenant}:{transaction_id}"
        )

    def transaction_pattern(self) -> str:
        """SCAN pattern matching every transaction dedup key (for operators and tests)."""
        return f"{self.prefix}:{{p*}}:tx:*"

    def fsync_barrier(self, partition: int) -> str:
        """A string written (durability=fsync) so that WAITAOF covers a duplicate's first copy."""
        return f"{self.prefix}:{self.tag(partition)}:fsync-barrier"

    def dedup_pattern(self) -> str:
        """SCAN pattern matching every dedup key (for operators and tests)."""
        return f"{self.prefix}:{{p*}}:dedup:*"

    def rejected(self, tenant: str) -> str:
        """One tenant's stream of rejected requests, capped by XADD MAXLEN ~ (never expires)."""
        # Only the tenant varies after the fixed part, so no separator can be forged; a
        # partition key never matches, as those start with "{p" right after the prefix.
        return f"{self.prefix}:rejected:{tenant}"

    def rejected_pattern(self) -> str:
        """SCAN pattern matching every tenant's rejected stream."""
        return f"{self.prefix}:rejected:*"

    def dead_letters(self, partition: int, group: str) -> str:
        """Stream of the partition's entries that ``group`` gave up on."""
        return f"{self.prefix}:{self.tag(partition)}:dead:{group}"

    def owner(self, partition: int, group: str) -> str:
        """Lease naming the one consumer of ``group`` that reads the partition (PX, ms)."""
        return f"{self.prefix}:{self.tag(partition)}:owner:{group}"

    def members(self, group: str) -> str:
        """Sorted set of the group's live consumers, scored by expiry (unix ms)."""
        return f"{self.prefix}:members:{group}"

    def api_keys(self) -> str:
        """Hash of every API key record by id (never a secret)."""
        return f"{self.prefix}:{{keys}}:records"

    def api_key_digests(self) -> str:
        """Hash of the keys in force, by SHA-256 digest of the secret."""
        return f"{self.prefix}:{{keys}}:active"

    def storefronts(self) -> str:
        """Hash of registered storefront origins: origin -> the tenants it may write."""
        return f"{self.prefix}:{{keys}}:storefronts"

    def limiter(self, caller: str) -> str:
        """A caller's rate-limit state; its own hash tag spreads callers over a cluster."""
        # Key ids and origins hold no braces; an origin is short (the Origin header).
        return f"{self.prefix}:{{rl:{caller}}}:rate"
