"""Bounds on connections, so that no client can take the server's file descriptors from everyone else.

- The open-file limit is raised to its hard limit at start (systemd's default soft limit is 1,024).
- A global cap below the descriptors left once the server's own files are counted (uvicorn's
  `limit_concurrency`): a request beyond it is answered 503 instead of the process running out.
- A connection must send a request's head within `HEADER_TIMEOUT_S` of opening (or of starting its next
  request): one that opens and sends nothing, or half a request, is answered 408 and closed.
- One address may hold at most `per_address` connections at once (not a trusted proxy, which carries
  everyone's requests); beyond, a new one is answered 429 and closed at once.
- One user may hold at most `WEBSOCKETS_PER_USER` WebSockets (server/routes_ws.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from zimage_serve.workflow.validate import error_body

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 20.0
PER_ADDRESS = 256
WEBSOCKETS_PER_USER = 64
RESERVED_FILES = 128  # the server's own: queue and audit files, model files, the worker's pipes, logs
MIN_CONNECTIONS = 64


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    return soft


def connection_cap(open_files: int) -> int:
    """How many connections at once, for an open-file limit: the rest of the descriptors are the server's."""
    return max(MIN_CONNECTIONS, open_files - RESERVED_FILES)


@dataclass(frozen=True)
class ConnectionLimits:
    per_address: int = PER_ADDRESS
    header_timeout_s: float = HEADER_TIMEOUT_S
    exempt: Callable[[str], bool] = lambda address: False  # a trusted proxy's address


def _answer(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = json.dumps(error_body(reason, message, message)).encode()
    head = (
        f"HTTP/1.1 {status} {'Too Many Requests' if status == 429 else 'Request Timeout'}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


def _address_of(protocol: object) -> str | None:
    client = getattr(protocol, "client", None)
    return str(client[0]) if isinstance(client, tuple) and client else None


def bounded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with the per-address cap and the header timeout."""

    class Bounded(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            address = self.client[0] if self.client else ""
            if address and not limits.exempt(address):
                held = sum(1 for other in self.connections if _address_of(other) == address)
                if held > limits.per_address:
                    message = f"more than {limits.per_address} connections at once from {address}"
                    transport.write(_answer(429, "too_many_connections", message, "retry-after: 5\r\n"))
                    transport.close()
                    return
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                message = f"no complete request within {limits.header_timeout_s:g} s"
                self.transport.write(_answer(408, "request_timeout", message))
                self.transport.close()

    return Bounded


def bounded_server(app: Any, *, limits: ConnectionLimits, shutdown_grace_s: float, **options: Any) -> uvicorn.Server:
    """The uvicorn server for `app`, with every bound above (`options`: more of uvicorn.Config's)."""
    config = uvicorn.Config(
        app,
        http=bounded_protocol(limits),
        limit_concurrency=connection_cap(raise_open_file_limit()),
        # X-Forwarded-For is the gate's to believe, only from --trusted-proxy (uvicorn's own handling would
        # take it from any local peer)
        proxy_headers=False,
        timeout_graceful_shutdown=max(1, int(shutdown_grace_s)),
        **options,
    )
    return uvicorn.Server(config)
