"""No client can take the server's connections from everyone else: half-open connections from one address,
one user's WebSockets, and a request head that never ends."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.server import Listening, running_server
from tests.support.threaded import threaded_server
from tests.support.tokens import make_tokens
from zimage_serve.server.connections import PER_ADDRESS, WEBSOCKETS_PER_USER, connection_cap, raise_open_file_limit

SYSTEMD_DEFAULT = 1024  # the soft limit on open files a service gets unless its unit says otherwise


def connect(server: Listening, source: str = "127.0.0.1") -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=60, source_address=(source, 0))
    return connection


def status_of(connection: socket.socket) -> int:
    """The status of the answer on `connection` (0: closed without one)."""
    head = b""
    while b"\r\n" not in head:
        chunk = connection.recv(4096)
        if not chunk:
            return 0
        head += chunk
    return int(head.split(b" ", 2)[1])


def websocket_request(server: Listening, token: str, client_id: str) -> bytes:
    return (
        f"GET /ws?clientId={client_id}&token={token} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


@contextmanager
def held(count: int, open_one: object) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        opened = []
        for _ in range(count):
            connection = open_one()  # type: ignore[operator]
            stack.callback(connection.close)
            opened.append(connection)
        yield opened


def test_half_open_connections_and_one_users_websockets_lock_nobody_out(tmp_path: Path) -> None:
    raise_open_file_limit()  # this process holds 1,100 connections too
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with running_server(data, "--auth", "on", "--no-preload", open_files=SYSTEMD_DEFAULT) as served:
        alice, bob = served.as_token(tokens["user"]), served.as_token(tokens["other"])
        assert connection_cap(SYSTEMD_DEFAULT) > PER_ADDRESS + WEBSOCKETS_PER_USER + 100

        # 1,100 connections from one address that send half a request head and wait.
        def half_open() -> socket.socket:
            connection = connect(served)
            connection.sendall(b"GET /system_stats HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            return connection

        with held(1100, half_open) as opened:
            # Beyond the cap, each was answered 429 and closed at once; the rest hold a descriptor each.
            refused = [c for c in opened[PER_ADDRESS + 5 :] if status_of(c) == 429]
            assert len(refused) == len(opened) - PER_ADDRESS - 5
            # Someone else, from another address, is served.
            other = connect(served, "127.0.0.2")
            head = f"GET /system_stats HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n"
            other.sendall(f"{head}Authorization: Bearer {tokens['other']}\r\n\r\n".encode())
            assert status_of(other) == 200
            other.close()

        # One user opens 1,000 WebSockets: past the cap they are refused before the handshake.
        statuses: list[int] = []

        def alices_socket() -> socket.socket:
            connection = connect(served)
            connection.sendall(websocket_request(served, tokens["user"], f"tab{len(statuses)}"))
            statuses.append(status_of(connection))
            return connection

        with held(1000, alices_socket):
            assert statuses.count(101) == WEBSOCKETS_PER_USER and statuses.count(403) == 1000 - WEBSOCKETS_PER_USER
            bobs = connect(served, "127.0.0.3")
            bobs.sendall(websocket_request(served, tokens["other"], "bob"))
            assert status_of(bobs) == 101  # another user is not counted against alice
            bobs.close()
            assert bob.json("GET", "/queue")[0] == 200 and alice.json("GET", "/queue")[0] == 200
        assert served.process.poll() is None


def test_a_request_head_that_never_ends_is_cut_off(tmp_path: Path) -> None:
    with threaded_server(tmp_path / "data", header_timeout_s=0.5) as server:
        silent = connect(server)  # connects and sends nothing
        slow = connect(server)
        slow.sendall(b"GET /system_stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert status_of(silent) == 408 and status_of(slow) == 408
        assert server.json("GET", "/system_stats")[0] == 200  # a client that sends its head is served
