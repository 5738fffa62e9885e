"""What one connection may hold (issue 29): every request head on a keep-alive connection is bounded in
time, not only the first; past the connection cap a request gets 503, and once a connection closes a new
one is served. Raw sockets, as a slow or greedy client would use them."""

from __future__ import annotations

import contextlib
import select
import socket
import time

import pytest

import meshserve.server.serve as serve_module
from meshserve.engine.async_llm import AsyncLLM
from meshserve.errors import InputError
from meshserve.server.serve import ServerThread, free_port, server_config
from tests.server.conftest import ENGINE_ARGS, MODEL

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def response(conn: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response read off the socket (a Content-Length body): (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "content-length"
    )
    while len(body) < length:
        body += conn.recv(4096)
    return int(lines[0].split()[1]), body


def closed_while_dribbling(conn: socket.socket, head: bytes, every_s: float) -> float | None:
    """Send ``head`` a byte every ``every_s``; the seconds until the server closed the connection, or None
    if the whole head went out first."""
    start = time.monotonic()
    for byte in head:
        if select.select([conn], [], [], every_s)[0]:
            with contextlib.suppress(ConnectionResetError):
                assert conn.recv(4096) == b"", "answered a head that is not complete"
            return time.monotonic() - start
        try:
            conn.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
    return None


def test_a_slow_head_on_a_later_keep_alive_request_is_closed(server, monkeypatch):
    timeout = 0.5
    monkeypatch.setattr(serve_module, "HEADER_TIMEOUT_S", timeout)
    with connect(server.url) as conn:
        conn.sendall(HEALTH)
        assert response(conn)[0] == 200
        # a whole head, then a body slower than the head timeout: the head was in time, so it is served
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        body = b'{"prompt": "hello", "max_tokens": 2}'
        conn.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(2 * timeout)
        conn.sendall(body[5:])
        assert response(conn)[0] == 200
        # the next head, a byte at a time (uvicorn's keep-alive timer stops at its first byte)
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
        after = closed_while_dribbling(conn, head, every_s=0.05)
        assert after is not None and after < timeout + 3.0, f"closed after {after} s"
    assert response_of_a_new_connection(server.url) == 200


def response_of_a_new_connection(url: str) -> int:
    with connect(url) as conn:
        conn.sendall(HEALTH)
        return response(conn)[0]


def test_past_the_connection_cap_a_request_gets_503_and_a_closed_one_makes_room(model_dir, monkeypatch):
    cap = 3
    monkeypatch.setattr(serve_module, "KEEP_ALIVE_S", 60)  # the held connections stay open for the test
    monkeypatch.setattr(serve_module, "HEADER_TIMEOUT_S", 60.0)
    llm = AsyncLLM.from_args(model_dir, **ENGINE_ARGS)
    capped = ServerThread(llm, MODEL, free_port(), max_connections=cap)
    held = [connect(capped.url) for _ in range(cap)]
    try:
        for conn in held:  # each kept alive after its answer
            conn.sendall(HEALTH)
            assert response(conn)[0] == 200
        assert response_of_a_new_connection(capped.url) == 503
        for conn in held:  # the ones held are still served
            conn.sendall(HEALTH)
            assert response(conn)[0] == 200
        held.pop().close()
        deadline = time.monotonic() + 10  # the server sees the close a moment later
        while (status := response_of_a_new_connection(capped.url)) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
    finally:
        for conn in held:
            conn.close()
        capped.stop()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "many", True])
def test_a_connection_cap_below_one_or_not_an_integer_is_refused(bad):
    with pytest.raises(InputError) as err:
        server_config(object(), "127.0.0.1", 1, "warning", 1.0, max_connections=bad)
    assert err.value.field == "max_connections"
