"""BASELINE, not our service: the ingestion endpoint a team would write first.

A plain FastAPI app that, per event, does `SET NX EX` for the dedup key and then
`XADD`, with redis-py and no gRPC hop: two round trips per event. `make bench`
runs it as the "naive peer" (D) that our service is compared against. It is not
atomic (a failed XADD after the SET leaves a key that swallows the retry).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from redis.asyncio import Redis

from rest_bridge.models import Event

app = FastAPI(title="naive peer (baseline)")
redis = Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


@app.post("/create-events")
async def create_events(events: list[Event]) -> dict[str, Any]:
    """Per event: SET NX EX the dedup key, then XADD the event as JSON."""
    results = []
    for event in events:
        if event.deduplication_id is not None:
            key = f"naive:dedup:{event.tenant}:{event.deduplication_id}"
            if not await redis.set(key, 1, nx=True, ex=86_400):
                results.append("duplicate")
                continue
        await redis.xadd("naive:events", {"e": event.model_dump_json(exclude_none=True)})
        results.append("accepted")
    return {"results": results}
