"""A whole reply written at once under uvicorn's request cycle (rest_bridge.responses): the
very bytes uvicorn's ``send`` writes for it, and the same state after, on a real socket."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from rest_bridge.responses import Reply

REQUEST_ID = (b"x-request-id", b"b2-1")
DATE = [(b"date", b"Sun, 06 Dec 2026 23:59:59 GMT")]


class Counted:
    """A transport whose writes are counted (the direct write is one, uvicorn's two)."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.raw.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


async def _cycle(keep_alive: bool, method: str = "POST") -> tuple[Any, socket.socket, list[int]]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    raw, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
    transport: Any = Counted(raw)
    completed: list[int] = []
    logger = logging.getLogger("test")
    cycle = RequestResponseCycle(
        scope={"type": "http", "method": method},  # type: ignore[typeddict-item]
        transport=transport,
        flow=FlowControl(transport),
        logger=logger,
        access_logger=logger,
        access_log=False,
        default_headers=DATE,
        message_event=asyncio.Event(),
        expect_100_continue=True,
        keep_alive=keep_alive,
        on_response=lambda: completed.append(1),
    )
    return cycle, peer, completed


async def _read(peer: socket.socket) -> bytes:
    for _ in range(5):
        await asyncio.sleep(0)
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


async def _both(reply: Reply, keep_alive: bool, extra: list[tuple[bytes, bytes]]) -> list[Any]:
    """What the direct write and uvicorn's send (reached through a plain function) leave."""
    seen = []
    for direct in (True, False):
        cycle, peer, completed = await _cycle(keep_alive)

        async def generic(message: Any, cycle: Any = cycle) -> None:
            await cycle.send(message)

        await reply.send(cycle.send if direct else generic, extra, REQUEST_ID)
        assert cycle.transport.writes == (1 if direct else 2)
        seen.append(
            (
                await _read(peer),
                cycle.response_complete,
                cycle.keep_alive,
                cycle.waiting_for_100_continue,
                cycle.message_event.is_set(),
                cycle.transport.is_closing(),
                completed,
            )
        )
        peer.close()
    return seen


CASES = [
    (Reply(200, b'{"accepted":1}'), True, []),
    (Reply(200, b'{"accepted":1}'), False, []),  # HTTP/1.0, or the client's Connection: close
    (Reply(413, b'{"detail":"x"}', [(b"connection", b"close")]), True, []),
    (Reply(503, b"{}", [(b"retry-after", b"1"), (b"Connection", b"keep-alive, Close")]), True, []),
    (
        Reply(422, b'{"detail":[]}'),
        True,
        [(b"access-control-allow-origin", b"https://shop.example"), (b"vary", b"Origin")],
    ),
]


@pytest.mark.parametrize(("reply", "keep_alive", "extra"), CASES)
def test_the_direct_write_leaves_what_uvicorns_send_does(
    reply: Reply, keep_alive: bool, extra: list[tuple[bytes, bytes]]
) -> None:
    direct, generic = asyncio.run(_both(reply, keep_alive, extra))
    assert direct == generic
    assert direct[0].startswith(b"HTTP/1.1 %d " % reply.status)
    assert direct[0].endswith(b"\r\n\r\n" + reply.body)
    assert b"x-request-id: b2-1\r\n" in direct[0]
    assert direct[-1] == [1]  # the response is complete: the next pipelined request may start


def test_a_header_uvicorn_refuses_is_still_refused() -> None:
    async def scenario() -> bytes:
        cycle, peer, completed = await _cycle(True)
        with pytest.raises(RuntimeError, match="Invalid HTTP header value"):
            await Reply(200, b"{}").send(cycle.send, [(b"x-bad", b"a\r\nset-cookie: x=1")])
        assert not completed
        data = await _read(peer)
        peer.close()
        return data

    assert asyncio.run(scenario()) == b""


def test_a_client_gone_gets_nothing_written() -> None:
    async def scenario() -> tuple[bytes, list[int]]:
        cycle, peer, completed = await _cycle(True)
        cycle.disconnected = True
        await Reply(200, b"{}").send(cycle.send, [], REQUEST_ID)
        data = await _read(peer)
        peer.close()
        return data, completed

    assert asyncio.run(scenario()) == (b"", [])


def test_a_paused_writer_is_waited_for_as_uvicorn_waits() -> None:
    async def scenario() -> tuple[bool, bytes]:
        cycle, peer, _ = await _cycle(True)
        cycle.flow.pause_writing()
        sending = asyncio.ensure_future(Reply(200, b"{}").send(cycle.send, [], REQUEST_ID))
        await _read(peer)
        waited = not sending.done()
        cycle.flow.resume_writing()
        await sending
        data = await _read(peer)
        peer.close()
        return waited, data

    waited, data = asyncio.run(scenario())
    assert waited
    assert data.endswith(b"\r\n\r\n{}")
