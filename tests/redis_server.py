"""A real redis-server (Debian's package) for the tests: started on a free loopback port in a folder of
its own, with AOF on and fsync at every write, so that a restart keeps everything it acknowledged."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.server import free_port


@dataclass
class RedisServer:
    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)  # more redis-server options (--requirepass ...)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no", *self.extra,
        ]  # fmt: skip
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        password = self.extra[self.extra.index("--requirepass") + 1] if "--requirepass" in self.extra else None
        client = redis.Redis(port=self.port, password=password, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.folder / "redis.log").read_text()[-2000:]
                    raise RuntimeError(f"redis-server did not start: {log}") from None
                time.sleep(0.05)
        client.close()

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(20)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


@contextmanager
def running_redis(folder: Path, *extra: str) -> Iterator[RedisServer]:
    """A redis-server in `folder`; `extra` are more of its options (--requirepass ...)."""
    if not redis_available():
        pytest.fail("redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)")
    server = RedisServer(folder, extra=list(extra))
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)
