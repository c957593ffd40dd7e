"""The gRPC server's counters and histograms: events by outcome, calls, script latency, auth.

Label values are bounded: event types, outcomes, reasons, methods and codes
come from fixed sets, and tenants are capped (``TenantLabels``). Updates are
cheap enough for every call: one increment per distinct label set of a request,
never one per event.
"""

from __future__ import annotations

import collections
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from events_server.ops.exposition import LATENCY_BUCKETS, LabelCache, Observer
from events_server.pb import events_pb2 as pb
from events_server.server.errors import IngestError, InvalidEvents, StoreUnavailable
from events_server.wire.codec import TYPE_NAMES
from events_server.wire.tracked import message_of

OTHER_TENANT = "_other"
"""Tenant label of every tenant past the cap (and of all of them when the cap is 0)."""

MAX_TENANT_LABEL_CHARS = 64

ACCEPTED, DUPLICATE, REJECTED = "accepted", "duplicate", "rejected"

BATCH_REJECTED = "batch_rejected"
"""Reason of a valid event refused because another event of its request was invalid."""

AUTH_FAILURE_KINDS = (
    "missing_key",
    "unknown_key",
    "tenant_not_allowed",
    "origin_not_allowed",
    "origin_not_registered",
)

AUTH_KINDS = ("key", "storefront")
"""How an admitted request was let in: with an API key, or keyless from a storefront origin."""
"""Kinds of ``events_auth_failures_total``: no key, a key unknown or revoked, a key not for
the tenant, a key used from a page origin it does not allow."""

MAX_CACHED_CHILDREN = 10_000
"""Children of stored events looked up by their tenant's own name (see ``_stored``); past
it the lookup starts over (tenants are bounded by the keys that cover them)."""

GATHERED_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

SCRIPT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_STATUS_OUTCOME = {
    pb.EventResult.STATUS_ACCEPTED: ACCEPTED,
    pb.EventResult.STATUS_DUPLICATE: DUPLICATE,
}
_TENANT_TYPE = operator.attrgetter("tenant", "type")


def _tracked_tenant_kind(event: pb.TrackedEvent) -> tuple[str, str]:
    """A Track event's tenant and kind (its type label: purchase, transaction_mapping, ...)."""
    message = message_of(event)
    return ("", "unknown") if message is None else (message.tenant, event.WhichOneof("kind") or "")


def _type_label(kind: int | str) -> str:
    """The type label: an Event's type name, or a Track event's kind."""
    return kind if isinstance(kind, str) else TYPE_NAMES.get(kind, "unknown")


_FIELD_INDEX = re.compile(r"^events\[(\d+)\]")


class TenantLabels:
    """Bounded tenant label values: the first ``limit`` tenants seen keep their name."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._known: set[str] = set()

    def __call__(self, tenant: str, admit: bool = True) -> str:
        """The label for ``tenant``; only ``admit`` may take one of the free places."""
        if tenant in self._known:
            return tenant
        if admit and len(self._known) < self._limit and 0 < len(tenant) <= MAX_TENANT_LABEL_CHARS:
            self._known.add(tenant)
            return tenant
        return OTHER_TENANT


def _reasons(count: int, error: IngestError) -> list[str]:
    """Why each of ``count`` events of a failed request was refused."""
    if isinstance(error, InvalidEvents):
        # A violation of the request as a whole (too many events) is every event's reason.
        whole = next(
            (v.reason or "invalid" for v in error.violations if not _FIELD_INDEX.match(v.field)),
            BATCH_REJECTED,
        )
        reasons = [whole] * count
        seen: set[int] = set()
        for violation in error.violations:
            match = _FIELD_INDEX.match(violation.field)
            if match is not None and (index := int(match[1])) < count and index not in seen:
                seen.add(index)  # an event's first violation names it
                reasons[index] = violation.reason or "invalid"
        return reasons
    if isinstance(error, StoreUnavailable):
        return ["unavailable"] * count
    return ["error"] * count


class ServerMetrics:
    """The gRPC server's counters and histograms; cheap enough to update on every call."""

    def __init__(self, max_tenants: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tenant_label = TenantLabels(max_tenants)
        self._children = LabelCache()
        self._stored_children: dict[tuple[str, int | str, str], Callable[[float], None]] = {}
        self.events = Counter(
            "events",
            "Events by tenant, type and outcome (accepted, duplicate, rejected); reason says why"
            " one was rejected. A Track event's type is its kind (purchase, transaction_mapping,"
            " product_unavailable).",
            ["tenant", "type", "outcome", "reason"],
            registry=self.registry,
        )
        self.rpc_requests = Counter(
            "events_grpc_requests",
            "gRPC calls by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "events_grpc_request_duration_seconds",
            "Time to answer a gRPC call, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.script_seconds = Histogram(
            "events_redis_script_duration_seconds",
            "Round trip of one pipeline of dedup+enqueue script calls to Redis.",
            buckets=SCRIPT_BUCKETS,
            registry=self.registry,
        )
        self._script_seconds = Observer(self.script_seconds)
        self.auth_failures = Counter(
            "events_auth_failures",
            "Refused API keys by kind: " + ", ".join(AUTH_FAILURE_KINDS) + ".",
            ["kind"],
            registry=self.registry,
        )
        for kind in AUTH_FAILURE_KINDS:  # present at 0 from the start, so rates work
            self.auth_failures.labels(kind)
        self.admissions = Counter(
            "events_admitted_requests",
            "CreateEvents calls let in, by how: an API key, or a registered storefront origin"
            " without a key.",
            ["auth"],
            registry=self.registry,
        )
        for auth in AUTH_KINDS:
            self.admissions.labels(auth)
        self.rate_limited_calls = Counter(
            "events_rate_limited",
            "CreateEvents calls refused for their caller's rate limit (429), by how the caller"
            " was let in and which key (its id) or storefront origin it is.",
            ["auth", "caller"],
            registry=self.registry,
        )

        self.gathered_requests = Counter(
            "events_gathered_requests",
            "Requests the REST bridge sent gathered (several in one BridgeIngest call), by the"
            " status code each ended with, as a CreateEvents call of its own would have.",
            ["code"],
            registry=self.registry,
        )
        self.gathered_call_size = Histogram(
            "events_gathered_call_requests",
            "Requests per gathered call of the REST bridge (count: calls; sum: requests).",
            buckets=GATHERED_BUCKETS,
            registry=self.registry,
        )
        self._call_size = Observer(self.gathered_call_size)

        self.batch_links = Counter(
            "events_batch_link_connections",
            "Connections to the batch link's port by outcome: accepted (a good ticket), refused"
            " (none, a bad, used or late one, too many waiting for theirs, the server stopping).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("accepted", "refused"):
            self.batch_links.labels(outcome)

        self.unconfirmed = Counter(
            "events_redis_confirmations_timed_out",
            "Pipelines of writes refused (503) because their Redis primary did not confirm"
            " them in time: fewer replicas than EVENTS_CONFIRM_REPLICAS had them (or, with"
            " durability=fsync, had them on disk), by primary.",
            ["node"],
            registry=self.registry,
        )

    def count_events(
        self,
        events: Sequence[pb.Event] | Sequence[pb.TrackedEvent],
        reply: pb.CreateEventsResponse | None,
        error: IngestError | None = None,
    ) -> None:
        """Count a call's events (CreateEvents' or Track's) by outcome: from its reply, or from
        the error that ended it."""
        if not events:
            return
        kinds: Callable[[Any], tuple[str, int | str]] = (
            _TENANT_TYPE if isinstance(events[0], pb.Event) else _tracked_tenant_kind
        )
        if reply is not None and (reply.duplicates == 0 or reply.accepted == 0):
            # One outcome for all (the usual case): no need to walk the results.
            outcome = ACCEPTED if reply.duplicates == 0 else DUPLICATE
            if len(events) == 1:  # a storefront's request
                self._stored(kinds(events[0]), outcome)(1)
                return
            for tenant_kind, n in collections.Counter(map(kinds, events)).items():
                self._stored(tenant_kind, outcome)(n)
            return
        counts: dict[tuple[str, int | str, str, str], int] = {}
        if reply is not None:
            for event, result in zip(events, reply.results, strict=False):
                outcome = _STATUS_OUTCOME.get(result.status, "unknown")
                key = (*kinds(event), outcome, "")
                counts[key] = counts.get(key, 0) + 1
        elif error is not None:
            for event, reason in zip(events, _reasons(len(events), error), strict=True):
                key = (*kinds(event), REJECTED, reason)
                counts[key] = counts.get(key, 0) + 1
        # One increment per distinct key, not per event.
        for (tenant, kind, outcome, reason), n in counts.items():
            labels = (
                self.tenant_label(tenant, admit=outcome != REJECTED),
                _type_label(kind),
                outcome,
                reason,
            )
            self._children.get(self.events, labels).inc(n)

    def _stored(self, tenant_kind: tuple[str, int | str], outcome: str) -> Callable[[float], None]:
        """The increment of the events counter's child of stored events of a tenant and
        type, by their own values: a stored event's tenant label, once given, never changes
        (a known tenant stays known; past the cap, every newcomer is ``_other`` for good)."""
        key = (*tenant_kind, outcome)
        child = self._stored_children.get(key)
        if child is None:
            if len(self._stored_children) >= MAX_CACHED_CHILDREN:
                self._stored_children.clear()
            tenant, kind = tenant_kind
            labels = (self.tenant_label(tenant), _type_label(kind), outcome, "")
            child = self._stored_children[key] = self._children.counting(self.events, labels)
        return child

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Count one finished gRPC call and its duration."""
        self._children.counting(self.rpc_requests, (method, code))(1)
        self._children.observing(self.rpc_seconds, (method,))(seconds)

    def gathered(self, requests: int) -> None:
        """Count one gathered call of ``requests`` requests."""
        self._call_size(requests)

    def gathered_request(self, code: str) -> None:
        """Count one request of a gathered call, by the status code it ended with."""
        self._children.counting(self.gathered_requests, (code,))(1)

    def unconfirmed_write(self, node: str) -> None:
        """Count one pipeline of writes ``node`` did not confirm (nodes: the primaries)."""
        self._children.get(self.unconfirmed, (node,)).inc()

    def observe_script(self, seconds: float) -> None:
        """Record one round trip of script calls to Redis."""
        self._script_seconds(seconds)

    def admitted(self, auth: str) -> None:
        """Count one call let in (``auth`` from AUTH_KINDS)."""
        self._children.counting(self.admissions, (auth,))(1)

    def rate_limited(self, auth: str, caller: str) -> None:
        """Count one call refused for its rate (callers are keys and registered origins:
        operators create them, so the label set stays bounded)."""
        self._children.get(self.rate_limited_calls, (auth, caller)).inc()

    def auth_failure(self, kind: str) -> None:
        """Count one refused API key (``kind`` from AUTH_FAILURE_KINDS)."""
        self.auth_failures.labels(kind).inc()
