"""A loop turn's writes sent together (rest_bridge.writes), on a real socket pair."""

from __future__ import annotations

import asyncio
import socket

from rest_bridge.writes import TurnWrites


def _pending(peer: socket.socket) -> bytes:
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


async def _connected() -> tuple[TurnWrites, socket.socket]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
    return TurnWrites(transport), peer


async def _turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_a_turns_writes_leave_together_at_its_end_in_order() -> None:
    async def scenario() -> None:
        writes, peer = await _connected()
        writes.write(b"HTTP/1.1 200 OK\r\n\r\n")
        writes.write(bytearray(b'{"accepted":1}'))
        assert _pending(peer) == b""  # held until the turn ends
        await _turn()
        assert _pending(peer) == b'HTTP/1.1 200 OK\r\n\r\n{"accepted":1}'
        writes.write(b"next")
        await _turn()
        assert _pending(peer) == b"next"
        writes.close()
        peer.close()

    asyncio.run(scenario())


def test_what_ends_the_transport_writes_what_is_held_first() -> None:
    async def scenario() -> None:
        writes, peer = await _connected()
        writes.write(b"answer")
        writes.write_eof()
        await _turn()
        assert _pending(peer) == b"answer"
        assert _pending(peer) == b""  # and then the end
        writes.close()
        peer.close()
        closing, other = await _connected()
        closing.write(b"last words")
        closing.close()
        await _turn()
        assert _pending(other) == b"last words"
        other.close()
        aborted, third = await _connected()
        aborted.write(b"dropped")
        aborted.abort()
        await _turn()
        assert _pending(third) == b""
        third.close()

    asyncio.run(scenario())


def test_a_whole_response_goes_at_once_unless_writes_of_its_turn_are_held() -> None:
    async def scenario() -> None:
        writes, peer = await _connected()
        writes.write_whole(b"HTTP/1.1 200 OK\r\n\r\n{}")
        await asyncio.sleep(0)
        assert _pending(peer) == b"HTTP/1.1 200 OK\r\n\r\n{}"  # not held for the turn's end
        writes.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writes.write_whole(b"HTTP/1.1 200 OK\r\n\r\n{}")
        assert _pending(peer) == b""  # after what is held, in order
        await _turn()
        assert _pending(peer) == b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n{}"
        peer.close()
        writes.close()

    asyncio.run(scenario())
