"""Abusive WebSocket clients of /ws/create-events, as a process of their own.

``python -m tests.harness.ws_attacks ATTACK BASE KEY SECONDS [SOCKETS]`` (KEY may be
``origin=https://...``: a page's socket) prints "ready" once its SOCKETS are open (the
onset is not what is measured; or after ONSET_SECONDS), attacks until SECONDS have
passed (opening a new socket when the bridge closes one) and prints what it saw as
JSON. Its sockets speak raw RFC 6455
(frames masked with a zero key), so that it sends what no library would: pings back to
back, a message never finished, floods of pongs.

ATTACK is one of ATTACKS: the rows of the front-door issue (19).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

PATH = "/ws/create-events"
TEXT, CONT, PING, PONG = 0x1, 0x0, 0x9, 0xA

ORIGIN = "origin="
"""A KEY argument that starts so is a page's origin instead: the sockets send it, no key."""

ONSET_SECONDS = 5.0

COSTLY_VARIANTS = 5_000
"""Empty objects as variant ids: a frame of ~10 KiB, under the 16 KiB frame limit, costly
to validate (one error each)."""


def ws_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A client frame (masked with a zero key: the payload is sent as it is)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes([first, 0x80 | size])
    elif size < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", size)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", size)
    return head + b"\0\0\0\0" + payload


def open_ws(
    base: str, key: str | None = None, origin: str | None = None, rcvbuf: int | None = None
) -> socket.socket:
    """A socket past its WebSocket handshake (ConnectionError when it is refused)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf is not None:  # a small window: what the bridge writes backs up at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect((host, int(port)))
    lines = [
        f"GET {PATH}{f'?api_key={key}' if key else ''} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *([f"Origin: {origin}"] if origin else []),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            sock.close()
            raise ConnectionError("closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
    sock.settimeout(None)
    return sock


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """The next server frame (opcode, payload); ConnectionError once the socket ends."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    first, second = exactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", exactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", exactly(8))[0]
    return first & 0x0F, exactly(size)


def costly_frame(n: int) -> bytes:
    variants = ",".join(["{}"] * COSTLY_VARIANTS)
    event = f'{{"tenant":"shop-x","market":"us","type":"click","variant_ids":[{variants}]}}'
    return ws_frame(TEXT, f'{{"id":"costly-{n}","event":{event}}}'.encode())


def held_frame(n: int) -> bytes:
    """A valid event of ~15 KiB (its URL and variant ids: strings of at most the server's
    8,192 characters), under the 16 KiB frame limit."""
    url = "https://shop.example/" + "p" * 7_000
    variants = [f"v{i}-" + "x" * 400 for i in range(19)]
    event = {
        "tenant": "shop-x",
        "market": "us",
        "type": "page_view",
        "user_id": "a",
        "url": url,
        "variant_ids": variants,
    }
    return ws_frame(TEXT, json.dumps({"id": f"held-{n}", "event": event}).encode())


def unread_frame(n: int) -> bytes:
    """A frame refused with its (long) id repeated: a 12 KiB answer for 12 KiB sent."""
    return ws_frame(TEXT, json.dumps({"id": f"{n}-" + "u" * 12_000}).encode())


class Attack:
    """One attack's sockets, their threads and the tally."""

    def __init__(self, base: str, key: str, seconds: float, sockets: int = 1) -> None:
        self.sockets = sockets
        self.base, self.key = base, key
        self.end = time.monotonic() + seconds
        self.seen: dict[str, int] = {"opened": 0, "refused": 0, "ended": 0, "bytes_sent": 0}
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.socks: dict[socket.socket, float] = {}
        """Open sockets, and when each opened."""

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.seen[what] = self.seen.get(what, 0) + n

    def connect(self, rcvbuf: int | None = None) -> socket.socket | None:
        while time.monotonic() < self.end:
            try:
                if self.key.startswith(ORIGIN):  # a page's socket: its Origin, no key
                    sock = open_ws(self.base, origin=self.key[len(ORIGIN) :], rcvbuf=rcvbuf)
                else:
                    sock = open_ws(self.base, self.key, rcvbuf=rcvbuf)
            except OSError:
                self.count("refused")
                time.sleep(0.05)
                continue
            self.count("opened")
            with self.lock:
                self.socks[sock] = time.monotonic()
                if self.seen["opened"] >= self.sockets:  # every socket is up: the attack is on
                    self.ready.set()
            return sock
        return None

    def send_forever(
        self, make: Callable[[int], bytes], rcvbuf: int | None = None, again: bool = True
    ) -> None:
        """Send what ``make`` gives, back to back, on a socket reopened when it ends (when
        ``again``)."""
        while (sock := self.connect(rcvbuf)) is not None:
            n = 0  # each socket starts its own sequence
            opened = time.monotonic()
            try:
                while time.monotonic() < self.end:
                    data = make(n)
                    n += 1
                    sock.sendall(data)
                    self.count("bytes_sent", len(data))
            except OSError:
                if time.monotonic() < self.end:  # the bridge ended it, not stop_at_end
                    self.count("ended")
                    self.lived(time.monotonic() - opened)
            self.drop(sock)
            if not again:
                return

    def lived(self, seconds: float) -> None:
        """A socket the bridge ended lived ``seconds``: the longest such life is kept."""
        with self.lock:
            self.seen["longest_life_ms"] = max(
                self.seen.get("longest_life_ms", 0), round(seconds * 1000)
            )

    def in_flight(self, make: Callable[[int], bytes], window: int) -> None:
        """Keep ``window`` frames unanswered on a socket: a new one per answer."""
        n = 0
        while (sock := self.connect()) is not None:
            try:
                for _ in range(window):
                    sock.sendall(make(n))
                    n += 1
                while time.monotonic() < self.end:
                    opcode, payload = read_frame(sock)
                    if opcode == PING:
                        sock.sendall(ws_frame(PONG, payload))
                    elif opcode == TEXT:
                        self.count("answers")
                        sock.sendall(make(n))
                        n += 1
                    else:
                        break
            except OSError:
                pass
            self.count("ended")
            self.drop(sock)

    def drop(self, sock: socket.socket) -> None:
        with self.lock:
            self.socks.pop(sock, None)
        sock.close()

    def stop_at_end(self) -> None:
        """At the end, shut every socket: blocked sends and reads return."""
        time.sleep(max(0.0, self.end - time.monotonic()))
        with self.lock:
            self.seen["open_at_end"] = len(self.socks)
            now = time.monotonic()
            ages = [now - opened for opened in self.socks.values()]
            self.seen["oldest_open_ms"] = round(max(ages, default=0) * 1000)
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _pings(attack: Attack, _: int) -> None:
    burst = ws_frame(PING, b"p" * 125) * 64
    attack.send_forever(lambda n: burst, rcvbuf=4096)


def _fragments(attack: Attack, _: int) -> None:
    empty = ws_frame(CONT, b"", fin=False) * 1024
    attack.send_forever(lambda n: ws_frame(TEXT, b'{"id"', fin=False) if n == 0 else empty)


def _costly(attack: Attack, _: int) -> None:
    attack.in_flight(costly_frame, 16)


def _invalid(attack: Attack, _: int) -> None:
    invalid = ws_frame(TEXT, b"x")
    attack.in_flight(lambda n: invalid, 256)


def _pongs(attack: Attack, _: int) -> None:
    burst = ws_frame(PONG, b"") * 1024
    attack.send_forever(lambda n: burst)


def _held(attack: Attack, _: int) -> None:
    attack.send_forever(held_frame)


def _unread(attack: Attack, _: int) -> None:
    attack.send_forever(unread_frame, rcvbuf=4096, again=False)


ATTACKS: dict[str, Callable[[Attack, int], None]] = {
    "pings": _pings,
    "fragments": _fragments,
    "costly": _costly,
    "invalid": _invalid,
    "pongs": _pongs,
    "held": _held,
    "unread": _unread,
}


def main(argv: list[str]) -> dict[str, Any]:
    name, base, key, seconds = argv[:4]
    sockets = int(argv[4]) if len(argv) > 4 else 1
    attack = Attack(base, key, float(seconds), sockets)
    threads = [
        threading.Thread(target=ATTACKS[name], args=(attack, i), daemon=True)
        for i in range(sockets)
    ]
    for thread in threads:
        thread.start()
    # Ready once every socket is up, or after ONSET_SECONDS (a bridge that cannot take
    # them all is attacked by as many as it took).
    if attack.ready.wait(ONSET_SECONDS) or attack.seen["opened"]:
        print("ready", flush=True)
    attack.stop_at_end()
    for thread in threads:
        thread.join(10)
    return attack.seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
