"""A real server for a test about what it answers over a socket, not about how it stops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.server import Server, running_server


@contextmanager
def socket_server(data_dir: Path, *args: str) -> Iterator[Server]:
    """`running_server`, stopped with SIGKILL at the end (its worker process dies with it).

    A SIGTERM lets the worker process finish starting (importing torch: many seconds on a busy machine)
    before it can be told to stop; a test that only sends requests need not wait for that. The log stays
    (`server.log`) for the test to read afterwards."""
    with running_server(data_dir, *args) as server:
        try:
            yield server
        finally:
            server.process.kill()
            server.process.wait(30)
