"""What a real server's log would show, watched in this process: a 5xx answer, a logged traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.support.app import AppServer


class _Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.found.append(self.format(record))


@contextmanager
def no_server_errors(server: AppServer) -> Iterator[None]:
    """Fails at the end if, meanwhile, the server answered a 5xx or logged a traceback (what the old
    process tests looked for in its log as " 500 " and "Traceback"). An exception a route lets out fails
    its request at once: the TestClient raises it."""
    errors: list[str] = []

    def note(response: Any) -> None:
        if response.status_code >= 500:
            errors.append(f"{response.request.method} {str(response.request.url)[:200]}: {response.status_code}")

    hooks = server.client.event_hooks
    hooks["response"].append(note)
    server.client.event_hooks = hooks
    tracebacks = _Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(tracebacks)
        hooks = server.client.event_hooks
        hooks["response"].remove(note)
        server.client.event_hooks = hooks
    assert not errors, errors[:20]
    assert not tracebacks.found, "\n".join(tracebacks.found)[-3000:]
