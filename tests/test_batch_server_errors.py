"""`zimage batch --server`: a server that refuses the token, or that nothing answers for, stops the batch at
once with one line saying what to pass (it used to fail every row with a bare 401, or retry in silence for
17 s); the client's retries for a server that drops mid-run are kept."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server import free_port
from tests.support.threaded import threaded_server
from tests.support.tokens import make_tokens
from zimage_serve.client import AsyncClient, AuthenticationError, ServerUnavailable


def zimage_batch(
    tmp_path: Path, server: str, token: str | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = tmp_path / "rows.csv"
    rows.write_text("prompt\na red circle\na blue square\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "ZIMAGE_TOKEN"}
    if token is not None:
        env["ZIMAGE_TOKEN"] = token
    command = [sys.executable, "-m", "zimage_serve.cli", "batch", str(rows), "-t", "zimage-nano", "--server", server]
    started = time.monotonic()
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120
    )
    return result, time.monotonic() - started


def test_a_server_nobody_answers_for_is_one_line_at_once(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result, seconds = zimage_batch(tmp_path, url)
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        f"error: cannot reach {url}: connection refused (is the server running, on this address and port?): "
        "check --server"
    ], result.stderr
    assert seconds < 10, seconds  # the retries took ~17 s
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_a_refused_token_says_to_pass_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with threaded_server(data, auth="on") as server:
        missing, _ = zimage_batch(tmp_path / "a", server.url)
        wrong, _ = zimage_batch(tmp_path / "b", server.url, token=tokens["bad"])
        right, _ = zimage_batch(tmp_path / "c", server.url, token=tokens["user"])
    for result, advice in ((missing, "it needs an API token"), (wrong, "the token given was refused")):
        assert result.returncode == 1, result
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {server.url} refused the request (401: "), line
        assert f"{advice}" in line and line.endswith("--token or $ZIMAGE_TOKEN"), line
    assert right.returncode == 0, right.stderr
    assert len(list((tmp_path / "c" / "out").glob("*.png"))) == 2


def test_check_does_not_retry_but_the_other_calls_still_do() -> None:
    calls: list[str] = []
    down = {"left": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if down["left"]:
            down["left"] -= 1
            raise httpx.ConnectError("connection refused", request=request)
        if request.headers.get("authorization") != "Bearer right":
            return httpx.Response(401, json={"error": {"type": "unauthorized", "message": "no", "details": "no"}})
        return httpx.Response(200, json={"queue_running": [], "queue_pending": []})

    async def main() -> None:
        transport = httpx.MockTransport(answer)
        async with AsyncClient("http://server", "wrong", transport=transport, websocket=False) as client:
            with pytest.raises(AuthenticationError):
                await client.check()
        async with AsyncClient("http://server", "right", transport=transport, backoff=0.01) as client:
            down["left"] = 1
            with pytest.raises(ServerUnavailable, match="cannot reach http://server"):
                await client.check()
            assert len(calls) == 2  # once each: no retry
            await client.check()
            down["left"] = 2  # the server drops mid-run: the next call waits it out
            assert await client.queued() == set()
            assert len(calls) == 6

    asyncio.run(main())
