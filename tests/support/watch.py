"""What a real server's log would show, watched in this process: a 5xx answer, a logged traceback; and
which calls ran on the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tests.support.app import AppServer

T = TypeVar("T")


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


def calls_on_the_loop(function: Callable[..., T], seen: list[bool]) -> Callable[..., T]:
    """`function`, noting in `seen` for each call whether it ran on an event loop's thread (where a slow
    call would keep every other request waiting)."""

    def watched(*args: Any, **kwargs: Any) -> T:
        try:
            asyncio.get_running_loop()
            seen.append(True)
        except RuntimeError:
            seen.append(False)
        return function(*args, **kwargs)

    return watched
