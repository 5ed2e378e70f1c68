"""No secret is shown: a Redis URL's password is hidden wherever the URL is printed, logged or answered, and
the password can be given where no command line shows it."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, running_redis
from tests.server import free_port
from tests.support.app import serving
from tests.support.tokens import make_tokens
from zimage_serve.errors import ZImageError
from zimage_serve.queue import backends
from zimage_serve.queue.redis_queue import RedisQueue
from zimage_serve.redact import redacted

SECRET = "s3cret-Pa55"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"redis://:{SECRET}@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        (f"--queue=rediss://ops:{SECRET}@cache/1?prefix=a:", "--queue=rediss://ops:***@cache/1?prefix=a:"),
        (f"cannot reach redis://u:{SECRET}@h:1/0 now", "cannot reach redis://u:***@h:1/0 now"),
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
        ("http://127.0.0.1:8188/view?filename=a:b.png", "http://127.0.0.1:8188/view?filename=a:b.png"),
    ],
)
def test_a_urls_password_is_hidden(text: str, shown: str) -> None:
    assert redacted(text) == shown


def test_system_stats_shows_the_command_line_to_admins_only_and_never_a_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    argv = ["/usr/bin/zimage", "serve", "--queue", f"redis://:{SECRET}@10.0.0.5:6379/0", "--data-dir", "/srv/z"]
    monkeypatch.setattr(sys, "argv", argv)
    with serving(data, auth="on", preload=False) as server:
        status, stats = server.as_token(tokens["user"]).json("GET", "/system_stats")
        assert status == 200 and stats["system"]["argv"] == ["zimage", "--disable-api-nodes"]
        status, _, body = server.as_token(tokens["admin"]).request("GET", "/system_stats")
        argv_seen = json.loads(body)["system"]["argv"]
        assert status == 200 and SECRET.encode() not in body
        assert argv_seen[:3] == argv[:3] and argv_seen[3] == "redis://:***@10.0.0.5:6379/0"
        assert argv_seen[-1] == "--disable-api-nodes"


def test_a_refused_queue_url_is_named_without_its_password() -> None:
    with pytest.raises(ZImageError) as refused:
        backends.choose(f"memcached://:{SECRET}@10.0.0.5/0")
    assert SECRET not in str(refused.value) and "memcached://:***@10.0.0.5/0" in str(refused.value)


def test_the_worker_prints_its_queue_without_the_password(tmp_path: Path) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"  # nobody listens: the worker says where, then waits
    command = [sys.executable, "-m", "zimage_serve.cli", "worker", "--queue", url, "--data-dir", str(tmp_path)]
    worker = subprocess.Popen([*command, "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stderr is not None
        first = worker.stderr.readline()
        assert first.startswith("zimage worker: queue redis://:***@127.0.0.1:"), first
    finally:
        worker.kill()
        _, rest = worker.communicate(timeout=60)
    assert SECRET not in first + rest


@pytest.fixture
def guarded_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis", "--requirepass", SECRET) as server:
        yield server


def test_the_redis_password_can_come_from_the_environment_or_a_file(
    guarded_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = guarded_redis.url  # no password in it
    monkeypatch.setenv("ZIMAGE_REDIS_PASSWORD", SECRET)
    assert RedisQueue(url, prefix="env:").count("pending") == 0
    monkeypatch.delenv("ZIMAGE_REDIS_PASSWORD")
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.setenv("ZIMAGE_REDIS_PASSWORD_FILE", str(secret_file))
    assert RedisQueue(url, prefix="file:").count("pending") == 0
    monkeypatch.setenv("ZIMAGE_REDIS_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ZImageError, match="ZIMAGE_REDIS_PASSWORD_FILE: cannot read"):
        RedisQueue(url, prefix="missing:")


def test_tokens_queue_and_audit_files_are_readable_by_the_server_user_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    previous = os.umask(0o022)  # a usual umask: files 0644 and folders 0755 unless made otherwise
    try:
        make_tokens(data)
        with serving(data, auth="on", preload=False) as server:
            server.request("GET", "/queue")  # an audited request
        created = {
            path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode)
            for path in [data, *data.glob("*.sqlite3*"), data / "audit", *(data / "audit").iterdir()]
        }
    finally:
        os.umask(previous)
    assert created["data"] == 0o700 and created["data/audit"] == 0o700
    assert {name: mode for name, mode in created.items() if mode != 0o600} == {"data": 0o700, "data/audit": 0o700}
    assert {"data/auth.sqlite3", "data/queue.sqlite3"} <= created.keys()  # -wal, -shm: gone once closed
    # A file an operator left open to everyone (restored from a backup, say) is narrowed, and said so.
    (data / "queue.sqlite3").chmod(0o644)
    with caplog.at_level(logging.WARNING), serving(data, auth="on", preload=False):
        pass
    assert stat.S_IMODE((data / "queue.sqlite3").stat().st_mode) == 0o600
    assert "queue.sqlite3 was readable by other users (mode 644): it is 0600 now" in caplog.text
