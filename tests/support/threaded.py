"""The server's application behind uvicorn in a thread of this process, on a real loopback port.

For tests whose client needs a socket (the browser, the Python client, `zimage batch --server`, the
examples' scripts) but which are not about processes: no `zimage serve` start, and no worker process
importing torch (seconds of CPU each); prompts run in this process's worker threads. Kill, restart and the
worker process stay with `tests.server.running_server`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.server import Listening
from tests.support.app import server_settings
from zimage_serve.server.app import create_app
from zimage_serve.server.connections import HEADER_TIMEOUT_S, ConnectionLimits, bounded_server
from zimage_serve.server.listen import bind

HOST = "127.0.0.1"


@contextmanager
def threaded_server(
    data_dir: Path,
    *,
    auth: str = "off",
    security: dict[str, Any] | None = None,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    **settings: Any,
) -> Iterator[Listening]:
    """The application on `data_dir` on a free port; `settings` are ServerSettings' fields or RunSettings', `security`
    SecuritySettings' beside `auth`. Stopped, with its lifespan, at the end."""
    sockets = bind(HOST, 0)
    port = int(sockets[0].getsockname()[1])
    config = server_settings(data_dir, auth, security, listen=HOST, port=port, **settings)
    # log_config=None: uvicorn's records (an exception a route let out) reach the root logger, and caplog.
    app = create_app(config)
    network = app.app.state.runtime.security.network
    limits = ConnectionLimits(header_timeout_s=header_timeout_s, exempt=network.trusted)
    server = bounded_server(
        app, limits=limits, shutdown_grace_s=config.run.shutdown_grace_s, log_config=None, log_level="warning"
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, name="zimage-test-server")
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start (its error is in the log above)")
            thread.join(0.02)
        yield Listening(port, data_dir)
    finally:
        server.should_exit = True
        thread.join(120)
        for sock in sockets:
            sock.close()
