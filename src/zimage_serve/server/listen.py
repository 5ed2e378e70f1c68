"""The server's listening sockets, bound before anything else starts.

uvicorn binds only after the application's lifespan has started: the worker process, recovery, a model
loading. A port already taken (ComfyUI's default is ours too) then showed as uvicorn's raw
`[Errno 98]` after the banner, and the command exited half a minute later, once the worker had stopped.
Binding here first turns that into one line naming the option to change, before anything starts; the
bound sockets are handed to uvicorn, so there is no window in which another program could take the port.
"""

from __future__ import annotations

import errno
import socket

from zimage_serve.errors import ZImageError


class ListenError(ZImageError):
    """The address or port cannot be listened on; the message names the option that fixes it."""


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for `host`:`port`, as asyncio's create_server would bind them (every address the
    name resolves to; IPv6 sockets IPv6-only; SO_REUSEADDR, so a restart does not wait for TIME_WAIT)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenError(f"{host!r} is not an address or a name this machine can resolve: fix --listen") from exc
    bound: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
                sock.listen(2048)  # uvicorn's default backlog
            except OSError as exc:
                raise ListenError(refusal(host, port, exc)) from exc
            sock.set_inheritable(True)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def refusal(host: str, port: int, exc: OSError) -> str:
    """One line: what is wrong with host:port and the option that fixes it."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use (ComfyUI, or another zimage serve?): choose another with --port"
    if exc.errno == errno.EACCES:
        return f"port {port} on {host} needs privileges to listen on: choose one above 1023 with --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine: choose one of its addresses (or 0.0.0.0) with --listen"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}): check --listen and --port"
