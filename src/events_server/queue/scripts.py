"""Lua scripts run by their SHA, with the one NOSCRIPT fallback every caller shares."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import NoScriptError

from events_server.queue.connection import RedisClient

Command = tuple[Any, ...]
Send = Callable[[list[Command]], Awaitable[list[Any]]]
"""Sends commands (pipelined, on whatever transport) and returns their replies in order,
error replies as exceptions rather than raised."""


class LuaScript:
    """A script run with EVALSHA, falling back to EVAL where the server lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def command(self, argv: Sequence[Any], *, by_sha: bool = True) -> Command:
        """The EVALSHA (or EVAL) command for ``argv`` = (numkeys, *keys, *args)."""
        # Names as str: the cluster client routes by command name and cannot read bytes.
        if by_sha:
            return ("EVALSHA", self.sha, *argv)
        return ("EVAL", self.source, *argv)

    async def run_all(self, send: Send, argvs: Sequence[Sequence[Any]]) -> list[Any]:
        """Run the script once per argv through ``send``; EVAL those a node had no copy of."""
        replies = await send([self.command(argv) for argv in argvs])
        redo = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if redo:
            # NOSCRIPT means nothing ran, so running again is safe. EVAL runs the script
            # and caches it on that node; SCRIPT LOAD on a cluster would go to every
            # primary and fail while one is down.
            again = await send([self.command(argvs[i], by_sha=False) for i in redo])
            for i, reply in zip(redo, again, strict=True):
                replies[i] = reply
        return replies

    async def __call__(self, redis: RedisClient, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run once on the node that serves ``keys`` (which must share one hash slot)."""

        async def send(commands: list[Command]) -> list[Any]:
            replies = []
            for command in commands:
                try:
                    replies.append(await redis.execute_command(*command))
                except NoScriptError as exc:
                    replies.append(exc)
            return replies

        (reply,) = await self.run_all(send, [(len(keys), *keys, *args)])
        if isinstance(reply, Exception):
            raise reply
        return reply
