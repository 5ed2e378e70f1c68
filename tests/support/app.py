"""The server's ASGI application in this process, with the real SQLite queue in a temporary folder.

`serving()` gives an `AppServer` with the same calls as a real process's `Server` (`request`, `json`,
`as_token`, `data_dir`), so the job helpers work with either; routes are tested here, and real processes
stay for what only they show (kill, restart, the worker process, the cluster, the browser, the CLI).
Prompts run in this process's threads (`worker_process=False`): the same Worker and Executor as in
the worker process, without a process start and a second torch import per test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient, WebSocketTestSession

from zimage_serve.limits import Limits
from zimage_serve.security.guard import SecuritySettings
from zimage_serve.server.app import create_app
from zimage_serve.server.runtime import Runtime, ServerSettings
from zimage_serve.worker.build import RunSettings

HOST = "127.0.0.1"
PORT = 8188
RUN_FIELDS = frozenset(f.name for f in fields(RunSettings))


def server_settings(data_dir: Path, auth: str, security: dict[str, Any] | None, **given: Any) -> ServerSettings:
    """A test server's settings: on the CPU, prompts in this process's threads; `given` are ServerSettings'
    fields or RunSettings' (preload=False, say), `security` SecuritySettings' beside `auth`."""
    run = RunSettings(**{"device": "cpu", **{k: v for k, v in given.items() if k in RUN_FIELDS}})
    rest = {k: v for k, v in given.items() if k not in RUN_FIELDS}
    return ServerSettings(
        data_dir=data_dir,
        run=run,
        worker_process=False,
        security=SecuritySettings(auth=auth, **(security or {})),
        **rest,
    )


@dataclass
class AppServer:
    client: TestClient
    data_dir: Path
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (a token, say)

    def as_token(self, token: str | None) -> AppServer:
        """This server, called with `token` (None: with no credential)."""
        return replace(self, headers={"Authorization": f"Bearer {token}"} if token else {})

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.client.app.app.state.runtime  # type: ignore[attr-defined]
        return runtime

    @property
    def url(self) -> str:
        return f"http://{HOST}:{PORT}"

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        content = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        sent = {**self.headers, **(headers or {})}
        if content is not None and not any(k.lower() == "content-type" for k in sent):
            sent["Content-Type"] = "application/json"
        response = self.client.request(method, path, content=content, headers=sent)
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, content = self.request(method, path, body)
        return status, json.loads(content) if content else None

    def websocket(self, path: str = "/ws", headers: dict[str, str] | None = None) -> WebSocketTestSession:
        # A path alone would be sent with TestClient's own Host, which the gate refuses on loopback.
        return self.client.websocket_connect(f"ws://{HOST}:{PORT}{path}", headers={**self.headers, **(headers or {})})


@contextmanager
def serving(
    data_dir: Path,
    *,
    auth: str = "off",
    limits: Limits | None = None,
    security: dict[str, Any] | None = None,
    client: str = HOST,
    **settings: Any,
) -> Iterator[AppServer]:
    """The application on `data_dir`, started (recovery, worker threads) and stopped with its lifespan.

    `settings` are ServerSettings' fields or RunSettings'; `security` SecuritySettings' beside `auth`; `client` is the
    address requests come from."""
    config = server_settings(data_dir, auth, security, port=PORT, limits=limits or Limits(), **settings)
    app = create_app(config)
    with TestClient(app, base_url=f"http://{HOST}:{PORT}", client=(client, 50000)) as test_client:
        yield AppServer(test_client, data_dir)
