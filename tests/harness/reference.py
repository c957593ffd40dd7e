"""A plain FastAPI app served by uvicorn on loopback, as the bridge is: the reference the
bridge's 422s are compared with (tests/integration/test_numbers_and_422.py, test_v2_422.py);
and the shape of a JSON schema, to compare the reference's with a contract's."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Set
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI


@contextmanager
def serving(app: FastAPI) -> Iterator[httpx.Client]:
    """A client of ``app`` served on a free loopback port until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # "critical": a reference's 500s (bodies FastAPI cannot answer) are expected, their
    # tracebacks noise.
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    host, port = sock.getsockname()
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def schema_shape(schema: Any, words: Set[str], untyped_consts: bool = False) -> Any:
    """A JSON schema without the keys in ``words`` (titles, descriptions, ...), at every
    depth; allOf [$ref] as $ref; with ``untyped_consts``, a const without the
    `type: string` pydantic adds to it."""
    if isinstance(schema, list):
        return [schema_shape(item, words, untyped_consts) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if list(schema.get("allOf", [{}])[0]) == ["$ref"] and len(schema["allOf"]) == 1:
        schema = {**{k: v for k, v in schema.items() if k != "allOf"}, **schema["allOf"][0]}
    if untyped_consts and "const" in schema:
        schema = {k: v for k, v in schema.items() if k != "type"}
    return {k: schema_shape(v, words, untyped_consts) for k, v in schema.items() if k not in words}
