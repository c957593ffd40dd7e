"""The bridge's HTTP replies, written straight to ASGI (no Starlette Response objects)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole HTTP response: status, extra headers, JSON body bytes."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def send(self, send: Any, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Write it to an ASGI connection, with ``extra`` headers (CORS) if any."""
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self.body)).encode()),
                    *self.headers,
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": self.body})


def json_reply(status: int, data: Any, headers: dict[str, str] | None = None) -> Reply:
    """A JSON reply (compact UTF-8, as FastAPI's JSONResponse writes it)."""
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Reply(status, orjson.dumps(data), extra)
