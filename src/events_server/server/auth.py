"""Who may call: API keys (creation, listing, revocation, the cached lookup every call
makes) and, without a key, registered storefront origins (see ``storefronts``).

A key is ``evk_`` + 43 url-safe characters (256 random bits). Redis only ever holds
its SHA-256 digest: a plain hash is enough for secrets this long (nothing to brute
force), and it needs no server-side pepper that would have to be shared and rotated.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

from redis.exceptions import RedisError

from events_server.queue.connection import RedisClient
from events_server.queue.keys import KeySpace
from events_server.server.errors import PermissionDenied, StoreUnavailable, Unauthenticated
from events_server.server.lookups import CACHE_LIMIT, CachedLookup
from events_server.server.storefronts import Storefront
from events_server.server.strangers import UnknownKeyBudget
from events_server.wire.origins import REFUSED, OriginDecision, decide_origin, normalize_origin

SECRET_PREFIX = "evk_"
ID_PREFIX = "key_"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What Redis holds of a key: never the secret, only its digest."""

    id: str
    digest: str
    tenants: tuple[str, ...]
    label: str
    created: str
    origins: tuple[str, ...]
    revoked: str | None = None
    requests_per_second: float | None = None
    """The key's own rate limits; None: the server's defaults (EVENTS_KEY_*)."""
    events_per_second: float | None = None
    burst_seconds: float | None = None

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ApiKey:
        """Read the stored form back."""
        data = json.loads(raw)
        data["tenants"] = tuple(data["tenants"])
        data["origins"] = tuple(data["origins"])
        return cls(**data)


def digest_of(secret: str) -> str:
    """The stored digest of a key: hex SHA-256."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_key(
    tenants: Sequence[str], label: str = "", origins: Sequence[str] = ()
) -> tuple[ApiKey, str]:
    """A new key's record and its secret (ValueError: no tenants, or a malformed origin)."""
    tenants = tuple(dict.fromkeys(tenants))
    if not tenants or any(not t for t in tenants):
        raise ValueError("a key needs at least one tenant, and tenants are not empty")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=ID_PREFIX + secrets.token_hex(8),
        digest=digest_of(secret),
        tenants=tenants,
        label=label,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        origins=tuple(dict.fromkeys(normalize_origin(o) for o in origins)),
    )
    return key, secret


def key_writes(key: ApiKey, records: str, active: str) -> list[tuple[str, str, str]]:
    """The (hash, field, value) writes that put a key in force."""
    stored = key.to_json()
    return [(records, key.id, stored), (active, key.digest, stored)]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a call was let in as: an API key, or (keyless) a registered storefront origin."""

    tenants: tuple[str, ...]
    key: ApiKey | None = None
    storefront: Storefront | None = None

    @property
    def key_id(self) -> str:
        """The key's id; empty for keyless intake."""
        return self.key.id if self.key is not None else ""

    @property
    def limiter_id(self) -> str:
        """Whose allowance the call spends: the key's, or the storefront origin's."""
        if self.key is not None:
            return self.key.id
        assert self.storefront is not None
        return "sf:" + self.storefront.origin

    @property
    def auth(self) -> str:
        """How it was let in, as metrics and logs name it: ``key`` or ``storefront``."""
        return "key" if self.key is not None else "storefront"

    def describe(self) -> str:
        """The caller as an error message names it."""
        if self.key is not None:
            return f"key {self.key.id}"
        assert self.storefront is not None
        return f"storefront origin {self.storefront.origin!r}"


def _shown(tenant: str) -> str:
    # Cut: a 50 KB tenant would make the status too big for gRPC's metadata.
    return repr(tenant if len(tenant) <= 100 else tenant[:100] + "...")


def _event_tenant(index: int) -> str:
    return f"events[{index}].tenant"


def check_tenants(
    caller: Caller, tenants: Iterable[str], field: Callable[[int], str] = _event_tenant
) -> None:
    """Raise PermissionDenied naming the first event whose tenant the caller does not cover
    (``field``: where event ``index`` names its tenant)."""
    covered = caller.tenants
    for index, tenant in enumerate(tenants):
        if tenant not in covered:
            shown = ", ".join(repr(t) for t in covered[:5])
            more = f" and {len(covered) - 5} more" if len(covered) > 5 else ""
            if caller.key is not None:
                why = f"key {caller.key.id} may not write to tenant {_shown(tenant)}"
                fix = ""
            else:
                why = f"{caller.describe()} is not registered for tenant {_shown(tenant)}"
                fix = " (events-server storefronts add)"
            raise PermissionDenied(
                f"{field(index)}: {why} (it covers {shown}{more}){fix}; nothing was queued",
                "tenant_not_allowed",
            )


class KeyStore:
    """The keys in Redis: two hashes under one hash tag, so a cluster sees one slot.

    ``records`` maps id -> ApiKey JSON (revoked keys stay, for ``keys list``);
    ``active`` maps digest -> ApiKey JSON of keys in force, so a lookup is one HGET.
    """

    def __init__(self, redis: RedisClient, keys: KeySpace) -> None:
        self._redis = redis
        self._records = keys.api_keys()
        self._active = keys.api_key_digests()

    async def create(
        self,
        tenants: Sequence[str],
        label: str = "",
        origins: Sequence[str] = (),
        *,
        requests_per_second: float | None = None,
        events_per_second: float | None = None,
        burst_seconds: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key for ``tenants``: its record, and the secret (which is never stored)."""
        key, secret = new_key(tenants, label, origins)
        key = replace(
            key,
            requests_per_second=requests_per_second,
            events_per_second=events_per_second,
            burst_seconds=burst_seconds,
        )
        async with self._redis.pipeline(transaction=True) as pipe:
            for name, field, value in key_writes(key, self._records, self._active):
                pipe.hset(name, field, value)
            await pipe.execute()
        return key, secret

    async def list(self) -> list[ApiKey]:
        """Every key ever created, revoked ones included, oldest first."""
        raw = await self._redis.hvals(self._records)
        return sorted((ApiKey.from_json(r) for r in raw), key=lambda k: (k.created, k.id))

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke a key (None: no such key). Its record stays, marked revoked."""
        raw = await self._redis.hget(self._records, key_id)
        if raw is None:
            return None
        key = ApiKey.from_json(raw)
        if key.revoked is None:
            revoked = datetime.now(UTC).isoformat(timespec="seconds")
            key = replace(key, revoked=revoked)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self._active, key.digest)
                pipe.hset(self._records, key.id, key.to_json())
                await pipe.execute()
        return key

    async def set_rates(
        self,
        key_id: str,
        *,
        requests_per_second: float | None,
        events_per_second: float | None,
        burst_seconds: float | None,
    ) -> ApiKey | None:
        """Change a key's rate limits (None each: back to the server's default)."""
        raw = await self._redis.hget(self._records, key_id)
        if raw is None:
            return None
        key = replace(
            ApiKey.from_json(raw),
            requests_per_second=requests_per_second,
            events_per_second=events_per_second,
            burst_seconds=burst_seconds,
        )
        async with self._redis.pipeline(transaction=True) as pipe:
            if key.revoked is None:
                pipe.hset(self._active, key.digest, key.to_json())
            pipe.hset(self._records, key.id, key.to_json())
            await pipe.execute()
        return key

    async def find(self, digest: str) -> ApiKey | None:
        """The key in force with this digest, if any."""
        raw = await self._redis.hget(self._active, digest)
        return None if raw is None else ApiKey.from_json(raw)

    async def active_origins(self) -> set[str]:
        """Every origin any key in force lists."""
        raw = await self._redis.hvals(self._active)
        return {origin for r in raw for origin in ApiKey.from_json(r).origins}


class Authenticator:
    """Cached key lookups for the server.

    A lookup (found or not) is reused for ``cache_seconds``: that bounds how long a
    revoked key keeps working, and how long a new key may be refused after a
    client tried it before it existed.
    """

    def __init__(
        self,
        store: KeyStore,
        cache_seconds: float,
        fallback_origins: Sequence[str],
        storefronts: Callable[[str], Awaitable[Storefront | None]] | None = None,
        *,
        peer_unknown_keys_per_second: float = 0.0,
    ) -> None:
        self._store = store
        self._strangers = UnknownKeyBudget(peer_unknown_keys_per_second)
        self._storefronts = storefronts
        self._ttl = cache_seconds
        self._fallback = tuple(fallback_origins)
        self._lookup = CachedLookup(store.find, cache_seconds, "API key")
        self._digests: dict[str, str] = {}
        """The digests of secrets of keys found in force (a SHA-256 costs more than a look)."""
        self._origins: tuple[float, frozenset[str]] = (0.0, frozenset())

    async def admit(self, secret: str | None, origin: str | None, peer: str = "") -> Caller:
        """Who the call is: its key (checked against the page origin), else its storefront.

        Unauthenticated without either; PermissionDenied for an origin the key does not
        allow. A keyless origin that is not registered covers no tenant. ``peer`` is the
        client's address, whose unknown keys are bounded (see ``strangers``).
        """
        if secret or self._storefronts is None or origin is None:
            key = await self.authenticate(secret, peer)
            self.check_origin(key, origin)
            return Caller(key.tenants, key=key)
        front = await self._storefronts(origin)
        if front is None:
            # Not refused here: each event is then refused by its tenant (check_tenants),
            # which names what to register. A forged Origin costs nothing anyway, so
            # nothing is learnt that a registered one would not tell.
            front = Storefront(origin[:200], (), "")
        return Caller(front.tenants, storefront=front)

    def admit_known(self, secret: str | None, origin: str | None) -> Caller | None:
        """``admit``'s answer when it needs no lookup (the key in force, or the storefront,
        cached and fresh), without a coroutine; None when ``admit`` is to be awaited. Raises
        what ``admit`` raises for the same caller."""
        if secret or self._storefronts is None or origin is None:
            digest = self._digests.get(secret) if secret else None
            cached = self._lookup.fresh(digest) if digest is not None else None
            if cached is None or (key := cached[1]) is None:
                return None  # unknown here, or revoked: ``authenticate`` says which
            self.check_origin(key, origin)
            return Caller(key.tenants, key=key)
        storefronts = self._storefronts
        if not isinstance(storefronts, CachedLookup):
            return None
        cached_front = storefronts.fresh(origin)
        if cached_front is None or (front := cached_front[1]) is None:
            return None  # looked up, or not registered: ``admit`` says so
        return Caller(front.tenants, storefront=front)

    async def authenticate(self, secret: str | None, peer: str = "") -> ApiKey:
        """The key in force for this secret, or Unauthenticated."""
        if not secret:
            raise Unauthenticated(
                "missing API key: send it as x-api-key metadata (HTTP: the X-API-KEY header,"
                " the api_key query parameter or the X-API-KEY cookie), or send from a"
                " registered storefront origin",
                "missing_key",
            )
        digest = self._digests.get(secret) or digest_of(secret)
        # A key found before is looked up again whatever its address spent: a flood of
        # made-up keys from a client's address (one NAT, or a proxy not counted in
        # EVENTS_FORWARDED_HOPS) must not lock out the keys in use there.
        asks = self._strangers.allows(peer) or self._lookup.found_before(digest)
        key = await self._lookup(digest, fetch=asks)
        if key is None:
            if asks:  # refusals past the allowance cost nothing, so they take nothing
                self._strangers.spend(peer)
            raise Unauthenticated("unknown or revoked API key", "unknown_key")
        if secret not in self._digests:  # keys in force only: made-up ones never stay
            if len(self._digests) >= CACHE_LIMIT:
                self._digests.clear()
            self._digests[secret] = digest
        return key

    async def find(self, secret: str | None) -> ApiKey | None:
        """The key in force for this secret, or None (no error either way)."""
        return await self._lookup(digest_of(secret)) if secret else None

    def decide(self, key: ApiKey, origin: str) -> OriginDecision:
        """May this key be used from a page of ``origin``."""
        return decide_origin(key.origins, origin, self._fallback)

    def check_origin(self, key: ApiKey, origin: str | None) -> None:
        """Raise PermissionDenied when a browser page of ``origin`` may not use the key."""
        if origin is not None and not self.decide(key, origin).allowed:
            raise PermissionDenied(
                f"origin {origin[:200]!r} may not use key {key.id}: it is not on the key's origins"
                " (keys create --origin) nor, for a key without any, in EVENTS_CORS_ORIGINS;"
                " nothing was queued",
                "origin_not_allowed",
            )

    async def decide_any(self, origin: str) -> OriginDecision:
        """Without a key (a CORS preflight, a keyless request): is the origin a registered
        storefront, allowed for some key, or allowed globally."""
        if origin in self._fallback:
            return OriginDecision(allowed=True, credentials=True)
        if self._storefronts is not None and await self._storefronts(origin) is not None:
            return OriginDecision(allowed=True, credentials=True)
        expires, listed = self._origins
        now = time.monotonic()
        if expires <= now:
            try:
                listed = frozenset(await self._store.active_origins())
            except RedisError as error:
                raise StoreUnavailable(
                    f"redis: {type(error).__name__}: {error} (reading key origins)"
                ) from error
            self._origins = (now + self._ttl, listed)
        if origin in listed:
            return OriginDecision(allowed=True, credentials=True)
        if "*" in self._fallback and origin != "null":
            return OriginDecision(allowed=True, credentials=False)
        return REFUSED
