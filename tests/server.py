"""A real `zimage serve` process on a free loopback port, and small HTTP / WebSocket clients for it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_state(pid: int) -> str | None:
    fields = proc_stat(pid)
    return fields[0] if fields else None


def worker_processes(server_pid: int) -> list[int]:
    """The server's live worker processes (multiprocessing's resource tracker, also a child, is not one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = proc_stat(int(entry.name))
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if fields and int(fields[1]) == server_pid and fields[0] != "Z" and b"spawn_main" in command:
            found.append(int(entry.name))
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Listening:
    """A server answering on a loopback port: a process (`Server`) or a thread of this one
    (`tests.support.threaded.threaded_server`)."""

    port: int
    data_dir: Path
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (a token, say)

    def as_token(self, token: str | None) -> Self:
        """This server, called with `token` (None: with no credential)."""
        return replace(self, headers={"Authorization": f"Bearer {token}"} if token else {})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={**self.headers, **(headers or {})}
        )
        if data is not None and "Content-Type" not in (headers or {}):
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()

    def oversized(self, path: str, size: int, chunked: bool = False) -> tuple[int, bytes]:
        """Start sending a body of `size` bytes and read the answer as soon as it comes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as conn:
            framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
            head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            conn.sendall(f"{head}{framing}\r\n\r\n".encode())
            block = b"x" * 65536
            sent = 0
            try:
                while sent < size:
                    conn.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block)
                    sent += len(block)
                if chunked:
                    conn.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the server stopped reading: its answer is waiting
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + 10:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, content = self.request(method, path, body)
        return status, json.loads(content) if content else None


@dataclass
class Server(Listening):
    """A `zimage serve` process, with the log of what it printed."""

    process: subprocess.Popen[bytes] = field(kw_only=True)
    log: Path = field(kw_only=True)


@contextmanager
def running_server(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, open_files: int | None = None
) -> Iterator[Server]:
    """`zimage serve ARGS` on a free port; `open_files`: its soft and hard limit on open files (systemd's
    default soft limit is 1,024)."""
    port = free_port()
    log = data_dir.parent / f"server-{port}.log"
    command = [
        sys.executable,
        "-m",
        "zimage_serve.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--device",
        "cpu",
        *args,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=None if open_files is None else lambda: limit_open_files(open_files),
        )
    server = Server(port, data_dir, process=process, log=log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()}")
            try:
                if server.request("GET", "/health")[0] in (200, 403, 503):  # answering (or refusing this address)
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield server
    finally:
        terminate(process)


def limit_open_files(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as systemd stops a service; SIGKILL after a minute."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class WorkerProc:
    """A `zimage worker` process of a cluster."""

    process: subprocess.Popen[bytes]
    log: Path
    metrics_port: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def running_worker(data_dir: Path, queue: str, *args: str) -> Iterator[WorkerProc]:
    """A worker on `queue` with `data_dir` as its shared data dir; stopped with SIGTERM at the end."""
    log = data_dir.parent / f"worker-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "zimage_serve.cli", "worker", "--queue", queue, "--data-dir", str(data_dir)]
    with open(log, "wb") as out:
        process = subprocess.Popen([*command, "--device", "cpu", *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield WorkerProc(process, log)
    finally:
        terminate(process)


def next_message(socket: Any, timeout: float = 60) -> dict[str, Any]:
    """A `websockets` client's next JSON message, past the binary preview frames a sampler sends."""
    while True:
        message = socket.recv(timeout=timeout)
        if isinstance(message, str):
            found: dict[str, Any] = json.loads(message)
            return found
