"""`zimage serve` run in this process: its options, TOML file and environment made into the server's
settings and application as the command makes them, the application then asked through a test client
instead of served by uvicorn (which is what a real process is still needed for)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import uvicorn
from starlette.testclient import TestClient

from tests.server import free_port
from tests.support.app import HOST, AppServer
from tests.support.cli import run

T = TypeVar("T")


def serve_command(
    args: list[str], ask: Callable[[AppServer], T], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str, list[T]]:
    """(exit code, stdout, stderr, [what `ask` returned]) of `zimage serve ARGS` (on a free port, the CPU,
    prompts in this process's threads, no model preloaded: ARGS may say otherwise). `ask` is called once,
    with the started application, where uvicorn would serve it; the list is empty if it never got there.
    Assert on its answers afterwards: the command turns an exception raised within it into exit status 70."""
    answers: list[T] = []

    def asked_instead_of_served(server: uvicorn.Server, sockets: Any = None) -> None:
        app = server.config.app
        data_dir = app.app.state.runtime.settings.data_dir
        with TestClient(app, base_url=f"http://{HOST}:{server.config.port}") as client:
            answers.append(ask(AppServer(client, data_dir)))

    monkeypatch.setattr(uvicorn.Server, "run", asked_instead_of_served)
    defaults = ["--port", str(free_port()), "--device", "cpu", "--no-worker-process", "--no-preload"]
    code, out, err = run(["serve", *defaults, *args], capsys)
    return code, out, err, answers
