"""`zimage serve` on a port in use or an address it cannot listen on: one line naming the option to change,
at once, before anything starts (it used to print its banner, then uvicorn's raw `[Errno 98]`, and exit half
a minute later, once the worker it had started had stopped)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from zimage_serve.server.listen import ListenError, bind


@contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port another program listens on (as ComfyUI would on 8188)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


def zimage_serve(data: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    answer = subprocess.run(
        [sys.executable, "-m", "zimage_serve.cli", "serve", "--data-dir", str(data), "--device", "cpu", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return answer, time.monotonic() - started


def test_a_port_in_use_is_one_line_naming_port_before_anything_starts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with taken_port() as port:
        answer, seconds = zimage_serve(data, "--port", str(port))
    assert answer.returncode == 1, answer
    lines = answer.stderr.strip().splitlines()
    assert lines == [f"error: port {port} on 127.0.0.1 is in use (ComfyUI, or another zimage serve?): "
                     "choose another with --port"], answer.stderr  # fmt: skip
    assert "zimage-serve on" not in answer.stderr and "Errno" not in answer.stderr
    assert not (data / "queue.sqlite3").exists()  # refused before the queue, the worker or a model
    assert seconds < 20, seconds  # the old way took ~28 s (a worker started, then stopped)


def test_an_address_not_of_this_machine_is_one_line_naming_listen(tmp_path: Path) -> None:
    answer, _ = zimage_serve(tmp_path / "data", "--listen", "192.0.2.1", "--port", "8188")  # TEST-NET-1
    assert answer.returncode == 1, answer
    assert answer.stderr.strip().splitlines() == [
        "error: 192.0.2.1 is not an address of this machine: choose one of its addresses (or 0.0.0.0) with --listen"
    ], answer.stderr


def test_bind_hands_over_listening_sockets_and_closes_them_on_refusal() -> None:
    [sock] = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # already listening: uvicorn takes over a socket no other program can take meanwhile
        with pytest.raises(ListenError, match=f"port {port} on 127.0.0.1 is in use"):
            bind("127.0.0.1", port)
    finally:
        sock.close()
